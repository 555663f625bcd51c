// Kernels behind the CUDA graph executor (plugins/src/compile/cuda): each takes its tensors'
// dtypes as run-time codes, so one kernel serves every dtype mix the op rules allow (torch's
// promotion: bf16 * f32 -> f32). Each computes in f32 (i64 stays integral) and rounds once to
// the output dtype, as the CPU reference does.

// Dtype codes, as kernels/src/cuda/exec.rs numbers them.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define DT_I64 3
#define DT_BOOL 4

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float ld(const void* p, int dt, long i) {
    switch (dt) {
        case DT_F32: return ((const float*)p)[i];
        case DT_BF16: return bf16_to_f32(((const bf16_t*)p)[i]);
        case DT_F16: return f16_to_f32(((const unsigned short*)p)[i]);
        case DT_I64: return (float)((const long long*)p)[i];
        default: return (float)((const unsigned char*)p)[i];
    }
}
__device__ __forceinline__ void st(void* p, int dt, long i, float v) {
    switch (dt) {
        case DT_F32: ((float*)p)[i] = v; break;
        case DT_BF16: ((bf16_t*)p)[i] = f32_to_bf16(v); break;
        case DT_F16: ((unsigned short*)p)[i] = f32_to_f16(v); break;
        case DT_I64: ((long long*)p)[i] = (long long)v; break;
        default: ((unsigned char*)p)[i] = v != 0.0f; break;
    }
}
// What storing `v` as `dt` and loading it back gives.
__device__ __forceinline__ float rnd(int dt, float v) {
    switch (dt) {
        case DT_BF16: return bf16_to_f32(f32_to_bf16(v));
        case DT_F16: return f16_to_f32(f32_to_f16(v));
        default: return v;
    }
}
__device__ __forceinline__ int dt_size(int dt) {
    return dt == DT_F32 ? 4 : dt == DT_I64 ? 8 : dt == DT_BOOL ? 1 : 2;
}

#define MAXR 6
// Sizes of the (contiguous) output and, per input, the strides (in elements) it is read with;
// a broadcast dim has stride 0.
struct Strided {
    int rank;
    long long size[MAXR];
    long long sa[MAXR];
    long long sb[MAXR];
};

__device__ __forceinline__ void offsets(const Strided& s, long i, long& oa, long& ob) {
    oa = 0;
    ob = 0;
    for (int d = s.rank - 1; d >= 0; d--) {
        long long c = i % s.size[d];
        i /= s.size[d];
        oa += c * s.sa[d];
        ob += c * s.sb[d];
    }
}

// out[i] (contiguous over s.size, dtype dt_out) = in (read with strides s.sa), converted.
// Used for contiguous copies of transposes, slices, expands, casts, and (with s.sb as the
// destination's strides) for writing into a slice of a larger tensor (cat).
extern "C" __global__ void copy_strided(const void* in, int dt_in, void* out, int dt_out, long n, Strided s,
                                        int strided_dst) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long oa, ob;
    offsets(s, i, oa, ob);
    long dst = strided_dst ? ob : i;
    if (dt_in == dt_out) {
        switch (dt_size(dt_in)) {
            case 8: ((long long*)out)[dst] = ((const long long*)in)[oa]; return;
            case 4: ((float*)out)[dst] = ((const float*)in)[oa]; return;
            case 2: ((unsigned short*)out)[dst] = ((const unsigned short*)in)[oa]; return;
            default: ((unsigned char*)out)[dst] = ((const unsigned char*)in)[oa]; return;
        }
    }
    st(out, dt_out, dst, ld(in, dt_in, oa));
}

// Binary ops with broadcasting: 0 add, 1 sub, 2 mul, 3 div.
extern "C" __global__ void binary(const void* a, int dt_a, const void* b, int dt_b, void* out, int dt_out, long n,
                                  int op, Strided s) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long oa, ob;
    offsets(s, i, oa, ob);
    if (dt_out == DT_I64) {
        long long x = ((const long long*)a)[oa], y = ((const long long*)b)[ob];
        long long r = op == 0 ? x + y : op == 1 ? x - y : op == 2 ? x * y : (y != 0 ? x / y : 0);
        ((long long*)out)[i] = r;
        return;
    }
    float x = ld(a, dt_a, oa), y = ld(b, dt_b, ob);
    float r = op == 0 ? x + y : op == 1 ? x - y : op == 2 ? x * y : x / y;
    st(out, dt_out, i, r);
}

// Unary ops over contiguous tensors, output dtype = input dtype: 0 neg, 1 rsqrt, 2 silu, 3 cos,
// 4 sin, 5 add scalar, 6 mul scalar, 7 pow scalar (x*x when p = 2, as the CPU does), 8 tanh,
// 9 div scalar, 10 gelu (erf), 11 gelu (tanh approximation).
extern "C" __global__ void unary(const void* in, void* out, int dt, long n, int op, double scalar) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (dt == DT_I64) {
        long long x = ((const long long*)in)[i];
        long long r = op == 0 ? -x : op == 5 ? x + (long long)scalar : op == 6 ? x * (long long)scalar : x;
        ((long long*)out)[i] = r;
        return;
    }
    float x = ld(in, dt, i), r;
    float sf = (float)scalar;
    switch (op) {
        case 0: r = -x; break;
        case 1: r = 1.0f / sqrtf(x); break;
        case 2: r = x / (1.0f + expf(-x)); break;
        case 3: r = cosf(x); break;
        case 4: r = sinf(x); break;
        case 5: r = x + sf; break;
        case 6: r = x * sf; break;
        case 8: r = tanhf(x); break;
        case 9: r = x / sf; break;
        case 10: r = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); break;
        case 11: r = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); break;
        case 12: r = floorf(x); break;
        case 13: r = log1pf(x); break;
        case 7:
        default: r = sf == 2.0f ? x * x : powf(x, sf); break;
    }
    st(out, dt, i, r);
}

// Mean over the last dim of `n`; one block per row.
extern "C" __global__ void mean_last(const void* in, int dt_in, void* out, int dt_out, int n) { pdl_enter();
    long row = blockIdx.x;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += ld(in, dt_in, row * n + i);
    s = block_sum(s);
    if (threadIdx.x == 0) st(out, dt_out, row, s / n);
}

// RMSNorm of rows of `n`, one block per row: out = w * round_norm(x * rsqrt(mean(x²) + eps)).
// With `res` set, x = round(x + res) first, and that sum is written to `res_out` (the residual
// stream of a fused add + norm).
extern "C" __global__ void rmsnorm(const void* x, const void* res, void* res_out, int dt_x, const void* w, int dt_w,
                                   void* out, int dt_out, int dt_norm, int n, float eps) { pdl_enter();
    long row = blockIdx.x;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld(x, dt_x, row * n + i);
        if (res) {
            v = rnd(dt_x, v + ld(res, dt_x, row * n + i));
            st(res_out, dt_x, row * n + i, v);
        }
        ss += v * v;
    }
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    const void* src = res ? res_out : x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld(src, dt_x, row * n + i);
        st(out, dt_out, row * n + i, ld(w, dt_w, i) * rnd(dt_norm, v * r));
    }
}

// LayerNorm of rows of `n`, one block per row, as torch computes it: mean and biased variance
// in f32, out = round((x - mean) * rsqrt(var + eps) * w + b) (no bias: b = 0).
extern "C" __global__ void layer_norm(const void* x, int dt_x, const void* w, int dt_w, const void* b, int dt_b,
                                      void* out, int dt_out, int n, float eps) { pdl_enter();
    long row = blockIdx.x;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += ld(x, dt_x, row * n + i);
    float mean = block_sum(s) / n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float d = ld(x, dt_x, row * n + i) - mean;
        ss += d * d;
    }
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = (ld(x, dt_x, row * n + i) - mean) * r * ld(w, dt_w, i);
        if (b) v += ld(b, dt_b, i);
        st(out, dt_out, row * n + i, v);
    }
}

// Rotate-half RoPE: x [rows, d] contiguous where the table row of x's row r is
// (r % table_rows); cos/sin [table_rows, d]. out = round(round(x·cos) + round(rot(x)·sin)).
extern "C" __global__ void rope(const void* x, int dt, const void* cos, const void* sin, void* out, long rows,
                                long table_rows, int d) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int h = d / 2;
    if (i >= rows * h) return;
    long r = i / h;
    int j = i % h;
    long t = r % table_rows;
    float a = ld(x, dt, r * d + j), b = ld(x, dt, r * d + j + h);
    float c1 = ld(cos, dt, t * d + j), s1 = ld(sin, dt, t * d + j);
    float c2 = ld(cos, dt, t * d + j + h), s2 = ld(sin, dt, t * d + j + h);
    st(out, dt, r * d + j, rnd(dt, rnd(dt, a * c1) + rnd(dt, -b * s1)));
    st(out, dt, r * d + j + h, rnd(dt, rnd(dt, b * c2) + rnd(dt, a * s2)));
}

// A gated MLP's activation of its gate (`GateAct`): 0 silu, 1 gelu (tanh approximation), 2 gelu
// (erf).
__device__ __forceinline__ float gate_act(int act, float g) {
    return act == 0   ? g / (1.0f + expf(-g))
           : act == 1 ? 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)))
                      : 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
}

// gate_up rows [gate (inter) | up (inter)] (or two tensors: `up` set) ->
// out = round(round(act(gate)) * up), act as `gate_act`.
extern "C" __global__ void silu_mul(const void* gate, const void* up, int dt, void* out, long rows, int inter, int act) {
    pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * inter) return;
    long r = i / inter, j = i % inter;
    float g, u;
    if (up) {
        g = ld(gate, dt, i);
        u = ld(up, dt, i);
    } else {
        g = ld(gate, dt, r * 2 * inter + j);
        u = ld(gate, dt, r * 2 * inter + inter + j);
    }
    st(out, dt, i, rnd(dt, gate_act(act, g)) * u);
}

// round(round(silu(round(g))) * round(u)): the unfused linear, SiLU and multiply's roundings
// (the rounding of g and u is exact for values already bf16).
__device__ __forceinline__ bf16_t swiglu_value(float g, float u) {
    float gr = bf16_to_f32(f32_to_bf16(g)), ur = bf16_to_f32(f32_to_bf16(u));
    float s = bf16_to_f32(f32_to_bf16(gr / (1.0f + expf(-gr))));
    return f32_to_bf16(s * ur);
}

// `silu_mul` over bf16, 8 values a thread with 16-byte loads and stores (inter % 8 == 0, every
// pointer 16-byte aligned); the same rounding.
extern "C" __global__ void silu_mul_bf16x8(const bf16_t* gate, const bf16_t* up, bf16_t* out, long rows, int inter) {
    pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int per_row = inter / 8;
    if (i >= rows * per_row) return;
    long r = i / per_row, j = (i % per_row) * 8;
    const bf16_t* gp = up ? gate + r * inter + j : gate + r * 2 * inter + j;
    const bf16_t* upp = up ? up + r * inter + j : gate + r * 2 * inter + inter + j;
    uint4 gv = *(const uint4*)gp, uv = *(const uint4*)upp, ov;
    const bf16_t *g8 = (const bf16_t*)&gv, *u8 = (const bf16_t*)&uv;
    bf16_t* o8 = (bf16_t*)&ov;
#pragma unroll
    for (int k = 0; k < 8; k++) o8[k] = swiglu_value(bf16_to_f32(g8[k]), bf16_to_f32(u8[k]));
    *(uint4*)(out + r * inter + j) = ov;
}

// out[t] = weight[ids[t]], rows of `row_bytes`; an id outside [0, rows) writes zeros and sets
// *bad to the id + 1 (the host reports it).
// out[t, :] = the row of ids[t] in a table of `vocab` rows of which `weight` holds rows
// start .. start + rows (the whole table: start 0, vocab = rows); a token whose row another rank
// holds gets zeros, an id outside the table sets *bad.
extern "C" __global__ void embedding_rows(const unsigned char* weight, const long long* ids, unsigned char* out,
                                          long tokens, long row_bytes, long rows, long start, long vocab,
                                          long long* bad) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * row_bytes) return;
    long t = i / row_bytes, j = i % row_bytes;
    long long id = ids[t];
    if (id < 0 || id >= vocab) {
        if (j == 0) atomicExch((unsigned long long*)bad, (unsigned long long)(id + 1));
        out[i] = 0;
        return;
    }
    long long local = id - start;
    out[i] = (local >= 0 && local < rows) ? weight[local * row_bytes + j] : 0;
}

// out[o, k, :] = x[o, idx[k], :] for x [outer, len, inner] (elements of `esize` bytes);
// a bad index sets *bad.
extern "C" __global__ void index_select(const unsigned char* x, const long long* idx, unsigned char* out, long outer,
                                        long nidx, long len, long inner_bytes, long long* bad) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= outer * nidx * inner_bytes) return;
    long b = i % inner_bytes, k = (i / inner_bytes) % nidx, o = i / (inner_bytes * nidx);
    long long j = idx[k];
    if (j < 0 || j >= len) {
        if (b == 0) atomicExch((unsigned long long*)bad, (unsigned long long)(j + 1));
        out[i] = 0;
        return;
    }
    out[i] = x[(o * len + j) * inner_bytes + b];
}

// Greedy sampling in two passes: block (r, b) of `argmax_partial` finds the best of its slice
// of row r (ties: lowest index; NaN wins, as torch.argmax), then `argmax_final` picks among a
// row's blocks. Many blocks per row keep a large vocabulary from running on one SM.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi) || (v != v && bv == bv) || (v != v && bv != bv && i < bi);
}

__device__ void block_best(float& best, int& idx) {
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (better(ob, oi, best, idx)) {
            best = ob;
            idx = oi;
        }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sb[warp] = best;
        si[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            if (better(sb[w], si[w], best, idx)) {
                best = sb[w];
                idx = si[w];
            }
        }
    }
}

extern "C" __global__ void argmax_partial(const void* logits, int dt, float* part_v, int* part_i, int vocab) { pdl_enter();
    long base = (long)blockIdx.x * vocab;
    int per = (vocab + gridDim.y - 1) / gridDim.y;
    int lo = blockIdx.y * per, hi = min(vocab, lo + per);
    float best = __int_as_float(0xff800000);
    int idx = 0x7fffffff;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float v = ld(logits, dt, base + i);
        if (better(v, i, best, idx)) {
            best = v;
            idx = i;
        }
    }
    block_best(best, idx);
    if (threadIdx.x == 0) {
        part_v[blockIdx.x * gridDim.y + blockIdx.y] = best;
        part_i[blockIdx.x * gridDim.y + blockIdx.y] = idx;
    }
}

extern "C" __global__ void argmax_final(const float* part_v, const int* part_i, long long* out, int parts) { pdl_enter();
    float best = __int_as_float(0xff800000);
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) {
        float v = part_v[blockIdx.x * parts + i];
        int j = part_i[blockIdx.x * parts + i];
        if (better(v, j, best, idx)) {
            best = v;
            idx = j;
        }
    }
    block_best(best, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = idx;
}

// Synthetic weights made where they live (core's `weights::Synthetic`, `load_format = "dummy"`),
// the same values the CPU makes. Uniform: a weight's generated parts in one launch (a table of
// `parts` rows of five i64: first value, value count, seed, scale's f32 bits, first chunk; then
// the total chunk count): thread c fills chunk c of all the parts' chunks, its part's chunk k (`chunk` values, the last may be short) with its xorshift32 stream from
// (seed ^ k·0x9e3779b9) | 1; every f32 operation rounded on its own, as the CPU's (no fused
// multiply-add), then stored as dt (bf16 round-to-nearest-even, as the CPU casts). A MoE
// weight is hundreds of experts' parts: one launch each made Qwen3-30B-A3B take 90 s.
extern "C" __global__ void fill_uniform(void* out, int dt, const long long* table, int parts, int chunk) {
    pdl_enter();
    long c = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= table[5 * parts]) return;
    int lo = 0, hi = parts - 1;  // the last part whose first chunk is <= c
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[5 * mid + 4] <= c) lo = mid; else hi = mid - 1;
    }
    const long long* p = table + 5 * lo;
    long k = c - p[4];
    long start = p[0] + k * chunk;
    long end = start + chunk < p[0] + p[1] ? start + chunk : p[0] + p[1];
    float scale = __int_as_float((int)p[3]);
    unsigned int x = ((unsigned int)p[2] ^ ((unsigned int)k * 0x9e3779b9u)) | 1u;
    for (long i = start; i < end; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        float u = __fdiv_rn(__uint2float_rn(x), 4294967296.0f);
        st(out, dt, i, __fmul_rn(__fadd_rn(__fmul_rn(u, 2.0f), -1.0f), scale));
    }
}

extern "C" __global__ void fill_const(void* out, int dt, long n, float v) {
    pdl_enter();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) st(out, dt, i, v);
}

// Decode-sized linear layers (m <= 8 rows of activations), bf16: y[m, n] = x[m, k] · w[n, k]ᵀ
// (+ y when `accumulate`), f32 accumulation, one warp per output row reading the weight row
// 16 bytes per lane at a time (the activations are small and stay in cache). Rows of 8 weights
// are read whole: k % 8 == 0 and 16-byte aligned pointers (the launcher checks, else cuBLAS
// runs it).
// One 16-byte chunk c of a weight row (8 weights) against the M activation rows, into acc.
template <int M>
__device__ __forceinline__ void gemv_chunk(const bf16_t* x, int k, uint4 wv, int c, float* acc) {
    const bf16_t* wp = (const bf16_t*)&wv;
    float wf[8];
#pragma unroll
    for (int j = 0; j < 8; j++) wf[j] = bf16_to_f32(wp[j]);
#pragma unroll
    for (int i = 0; i < M; i++) {
        float xf[8];
        uint4 xv = *(const uint4*)(x + (long)i * k + c * 8);
        const bf16_t* xp = (const bf16_t*)&xv;
#pragma unroll
        for (int j = 0; j < 8; j++) xf[j] = bf16_to_f32(xp[j]);
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i] += wf[j] * xf[j];
    }
}

// Each of the M sums over the warp; lane 0 stores output `row` of each (plus y's value there
// when accumulating).
template <int M>
__device__ __forceinline__ void gemv_store(const float* acc, bf16_t* y, int n, int row, int lane, int accumulate) {
#pragma unroll
    for (int i = 0; i < M; i++) {
        float v = acc[i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) {
            long at = (long)i * n + row;
            if (accumulate) v += bf16_to_f32(y[at]);
            y[at] = f32_to_bf16(v);
        }
    }
}

template <int M>
__device__ void gemv_bf16(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k, int accumulate) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= n) return;
    const uint4* wr = (const uint4*)(w + (long)warp * k);
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    int chunks = k / 8;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) gemv_chunk<M>(x, k, wr[c], c, acc);
    gemv_store<M>(acc, y, n, warp, lane, accumulate);
}

#define GEMV(M)                                                                                                       \
    extern "C" __global__ void gemv_bf16_m##M(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k,             \
                                              int accumulate, int prefetch) {                                         \
        int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                                                       \
        if (row < n) prefetch_l2(w + (long)row * k, prefetch, threadIdx.x & 31);                                      \
        pdl_enter();                                                                                                  \
        gemv_bf16<M>(x, w, y, n, k, accumulate);                                                                      \
    }
GEMV(1)
GEMV(2)
GEMV(4)
GEMV(8)

// The same for one activation row with S warps a weight row (`Gpu::gemv_split`): warp `part`
// of a row reads its chunks part, part + S, ... (lane-interleaved as above), so a short row
// (q/k/v, o: k = 4096, 16 chunks a lane) has S times the loads in flight; the S partial sums
// meet in shared memory and the row's first warp stores. Blocks of 256 threads: 8 / S rows.
template <int S>
__device__ void gemv_bf16_split(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k, int accumulate) {
    __shared__ float part_sum[8];
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * (8 / S) + wib / S, part = wib % S;
    float acc[1] = {0.0f};
    if (row < n) {
        const uint4* wr = (const uint4*)(w + (long)row * k);
        int chunks = k / 8;
#pragma unroll 4
        for (int c = lane + 32 * part; c < chunks; c += 32 * S) gemv_chunk<1>(x, k, wr[c], c, acc);
    }
    float v = acc[0];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) part_sum[wib] = v;
    __syncthreads();
    if (part == 0 && lane == 0 && row < n) {
        float t = part_sum[wib];
#pragma unroll
        for (int j = 1; j < S; j++) t += part_sum[wib + j];
        if (accumulate) t += bf16_to_f32(y[row]);
        y[row] = f32_to_bf16(t);
    }
}

#define GEMV_SPLIT(S)                                                                                                 \
    extern "C" __global__ void gemv_bf16_m1_s##S(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k,          \
                                                 int accumulate, int prefetch) {                                      \
        int row = blockIdx.x * (8 / S) + (threadIdx.x >> 5) / S;                                                      \
        if (row < n && (threadIdx.x >> 5) % S == 0) prefetch_l2(w + (long)row * k, prefetch, threadIdx.x & 31);       \
        pdl_enter();                                                                                                  \
        gemv_bf16_split<S>(x, w, y, n, k, accumulate);                                                                \
    }
GEMV_SPLIT(2)
GEMV_SPLIT(4)

// RMSNorm of bf16 rows (bf16 weight, output and norm dtype: the HF Llama family), the row held
// in registers: each thread loads 8 values with one 16-byte load (n % 8 == 0, n <= 8 * 1024),
// one block reduction, one store. Same rounding as `rmsnorm`.
extern "C" __global__ void rmsnorm_bf16x8(const bf16_t* x, const bf16_t* res, bf16_t* res_out, const bf16_t* w,
                                          bf16_t* out, int n, float eps) {
    long row = blockIdx.x;
    int c = threadIdx.x;  // chunk of 8
    bool live = c * 8 < n;
    // The norm's weight is never written during a step: read before waiting on the kernel ahead.
    uint4 wv;
    if (live) wv = *(const uint4*)(w + c * 8);
    pdl_enter();
    float v[8];
    float ss = 0.0f;
    if (live) {
        uint4 xv = *(const uint4*)(x + row * n + c * 8);
        const bf16_t* xp = (const bf16_t*)&xv;
        if (res) {
            uint4 rv = *(const uint4*)(res + row * n + c * 8);
            const bf16_t* rp = (const bf16_t*)&rv;
            uint4 sv;
            bf16_t* sp = (bf16_t*)&sv;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                sp[j] = f32_to_bf16(bf16_to_f32(xp[j]) + bf16_to_f32(rp[j]));
                v[j] = bf16_to_f32(sp[j]);
            }
            *(uint4*)(res_out + row * n + c * 8) = sv;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = bf16_to_f32(xp[j]);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) ss += v[j] * v[j];
    }
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    if (!live) return;
    const bf16_t* wp = (const bf16_t*)&wv;
    uint4 ov;
    bf16_t* op = (bf16_t*)&ov;
#pragma unroll
    for (int j = 0; j < 8; j++) op[j] = f32_to_bf16(bf16_to_f32(wp[j]) * bf16_to_f32(f32_to_bf16(v[j] * r)));
    *(uint4*)(out + row * n + c * 8) = ov;
}

// The gate/up linear of a SwiGLU MLP with its activation as the epilogue, for one bf16 row:
// w_gate_up [2·inter, k] (gate rows first); warp j computes gate_j and up_j (each rounded to
// bf16, as the linear's output is) and writes out[j] = round(round(silu(gate_j)) * up_j).
// One 16-byte chunk of the gate and up rows against the same chunk of x, into g and u.
__device__ __forceinline__ void swiglu_chunk(uint4 gv, uint4 uv, uint4 xv, float& g, float& u) {
    const bf16_t* gp = (const bf16_t*)&gv;
    const bf16_t* up = (const bf16_t*)&uv;
    const bf16_t* xp = (const bf16_t*)&xv;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        float xf = bf16_to_f32(xp[e]);
        g += bf16_to_f32(gp[e]) * xf;
        u += bf16_to_f32(up[e]) * xf;
    }
}

// g and u summed over the warp.
__device__ __forceinline__ void warp_sum2(float& g, float& u) {
    for (int o = 16; o > 0; o >>= 1) {
        g += __shfl_xor_sync(0xffffffffu, g, o);
        u += __shfl_xor_sync(0xffffffffu, u, o);
    }
}

extern "C" __global__ void gemv_swiglu_bf16(const bf16_t* x, const bf16_t* w, bf16_t* out, int inter, int k,
                                            int prefetch) {
    int j = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (j < inter) {
        prefetch_l2(w + (long)j * k, prefetch, lane);
        prefetch_l2(w + (long)(j + inter) * k, prefetch, lane);
    }
    pdl_enter();
    if (j >= inter) return;
    const uint4* wg = (const uint4*)(w + (long)j * k);
    const uint4* wu = (const uint4*)(w + (long)(j + inter) * k);
    const uint4* xr = (const uint4*)x;
    float g = 0.0f, u = 0.0f;
#pragma unroll 4
    for (int c = lane; c < k / 8; c += 32) swiglu_chunk(wg[c], wu[c], xr[c], g, u);
    warp_sum2(g, u);
    if (lane == 0) out[j] = swiglu_value(g, u);
}

// The same with S warps an output (`Gpu::swiglu_split`), as `gemv_bf16_split`: warp `part` of
// output j reads chunks part, part + S, ... of its gate and up rows; the partial sums meet in
// shared memory. Smaller pieces of work than one warp an output, so the last wave of blocks
// (the 8B's 28672 rows: 1792 blocks of 8 warps, 1.7 waves on an H200) leaves less idle.
template <int S>
__device__ void gemv_swiglu_split(const bf16_t* x, const bf16_t* w, bf16_t* out, int inter, int k) {
    __shared__ float part_g[8], part_u[8];
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int j = blockIdx.x * (8 / S) + wib / S, part = wib % S;
    float g = 0.0f, u = 0.0f;
    if (j < inter) {
        const uint4* wg = (const uint4*)(w + (long)j * k);
        const uint4* wu = (const uint4*)(w + (long)(j + inter) * k);
        const uint4* xr = (const uint4*)x;
#pragma unroll 4
        for (int c = lane + 32 * part; c < k / 8; c += 32 * S) swiglu_chunk(wg[c], wu[c], xr[c], g, u);
    }
    warp_sum2(g, u);
    if (lane == 0) {
        part_g[wib] = g;
        part_u[wib] = u;
    }
    __syncthreads();
    if (part == 0 && lane == 0 && j < inter) {
        float tg = part_g[wib], tu = part_u[wib];
#pragma unroll
        for (int p = 1; p < S; p++) {
            tg += part_g[wib + p];
            tu += part_u[wib + p];
        }
        out[j] = swiglu_value(tg, tu);
    }
}

#define SWIGLU_SPLIT(S)                                                                                               \
    extern "C" __global__ void gemv_swiglu_bf16_s##S(const bf16_t* x, const bf16_t* w, bf16_t* out, int inter,       \
                                                     int k, int prefetch) {                                           \
        int j = blockIdx.x * (8 / S) + (threadIdx.x >> 5) / S;                                                        \
        if (j < inter && (threadIdx.x >> 5) % S == 0) {                                                               \
            prefetch_l2(w + (long)j * k, prefetch, threadIdx.x & 31);                                                 \
            prefetch_l2(w + (long)(j + inter) * k, prefetch, threadIdx.x & 31);                                       \
        }                                                                                                             \
        pdl_enter();                                                                                                  \
        gemv_swiglu_split<S>(x, w, out, inter, k);                                                                    \
    }
SWIGLU_SPLIT(2)
SWIGLU_SPLIT(4)

// ---- Mixture of experts (`torch_moe`): routing, the chosen experts' gate/up and down rows, and
// the sum in expert order. Correctness first: one warp a weight row, each token-expert pair a
// GEMV, so only the chosen experts' weights are read (decode); prefill rereads an expert's rows
// for each token routed to it (a grouped GEMM is left to do).

// A warp's dot product of `n` values of `a` (dtype dt) and `w` (dtype dt), every lane gets it.
__device__ __forceinline__ float warp_dot(const void* a, long a0, const void* w, long w0, int dt, int n) {
    float s = 0.0f;
    for (int k = threadIdx.x & 31; k < n; k += 32) s += ld(a, dt, a0 + k) * ld(w, dt, w0 + k);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// Per token: softmax of its `experts` router logits in f32, the `top_k` largest (ties to the
// lower index), divided by their sum when `norm`, rounded to dt unless `weights_f32`; or with
// `sigmoid` (Llama 4's) the `top_k` largest logits, each weight sigmoid(logit) rounded to dt.
// One warp a token: lane l holds experts l, l + 32, ...; each of the top_k picks is a warp
// argmax over the experts not yet taken.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

// `warp_best` in two warp reductions where the hardware has them (sm_80+): the largest score
// as an order-preserving integer key, then the lowest expert id holding it, then the score from
// its lane (expert e lives in lane e % 32). Same result, fewer dependent shuffles. A lane with
// no candidate holds `best` = INT_MAX (key 0 sorts below every score).
__device__ __forceinline__ void warp_pick(float& v, int& i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned u = __float_as_uint(v + 0.0f);  // -0 reads as +0, as the float compare sees them
    unsigned key = i == 0x7fffffff ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
    unsigned top = __reduce_max_sync(0xffffffffu, key);
    int win = (int)__reduce_min_sync(0xffffffffu, (unsigned)(key == top && i != 0x7fffffff ? i : 0x7fffffff));
    v = __shfl_sync(0xffffffffu, v, win & 31);
    i = win;
#else
    warp_best(v, i);
#endif
}

// Each lane keeps the routing score of its first `ROUTE_HELD` experts (lane + 32·j) in registers
// and a bit a held expert once picked, so a pick reads no memory (larger expert counts reread
// the rest and check the picks so far).
#define ROUTE_HELD 8
// Expert parallelism: the chosen experts this rank holds (`offset` .. `offset + local`) are
// written as local indices, the others as -1 (every later kernel skips those slots).
extern "C" __global__ void moe_route(const void* logits, int ldt, int dt, long tokens, int experts, int top_k,
                                     int norm, int weights_f32, int sigmoid, int offset, int local, int* idx,
                                     float* wts) {
    pdl_enter();
    long t = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (t >= tokens) return;
    long row = t * experts;
    int* chosen = idx + t * top_k;
    // The score a pick compares: the logit (sigmoid) or exp(logit - max) (softmax).
    float mx = 0.0f, sum = 1.0f;
    if (!sigmoid) {
        mx = -__int_as_float(0x7f800000);
        for (int e = lane; e < experts; e += 32) mx = fmaxf(mx, ld(logits, ldt, row + e));
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        sum = 0.0f;
        for (int e = lane; e < experts; e += 32) sum += expf(ld(logits, ldt, row + e) - mx);
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    auto score = [&](int e) {
        float v = ld(logits, ldt, row + e);
        return sigmoid ? v : expf(v - mx);
    };
    float held[ROUTE_HELD];
#pragma unroll
    for (int j = 0; j < ROUTE_HELD; j++) held[j] = lane + 32 * j < experts ? score(lane + 32 * j) : 0.0f;
    unsigned taken = 0;  // bit j: expert lane + 32·j picked
    float total = 0.0f;
    for (int k = 0; k < top_k; k++) {
        float bp = -__int_as_float(0x7f800000);
        int best = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < ROUTE_HELD; j++) {
            int e = lane + 32 * j;
            if (e < experts && !((taken >> j) & 1) && (held[j] > bp || best == 0x7fffffff)) {
                bp = held[j];
                best = e;
            }
        }
        for (int e = lane + 32 * ROUTE_HELD; e < experts; e += 32) {
            bool was = false;
            for (int j = 0; j < k; j++) was |= chosen[j] == e;
            float p = score(e);
            if (!was && (p > bp || best == 0x7fffffff)) {
                bp = p;
                best = e;
            }
        }
        warp_pick(bp, best);
        if ((best & 31) == lane && best < 32 * ROUTE_HELD) taken |= 1u << (best >> 5);
        if (lane == 0) {
            chosen[k] = best;
            wts[t * top_k + k] = sigmoid ? rnd(dt, 1.0f / (1.0f + expf(-bp))) : bp / sum;
        }
        total += bp / sum;
        __syncwarp();
    }
    for (int k = lane; k < top_k; k += 32) {
        if (!sigmoid) {
            float w = norm ? wts[t * top_k + k] / total : wts[t * top_k + k];
            wts[t * top_k + k] = weights_f32 ? w : rnd(dt, w);
        }
        int e = chosen[k] - offset;
        chosen[k] = e >= 0 && e < local ? e : -1;
    }
}

// act[s, j] = round(round(act(round(g))) * round(u)) for slot s = token * top_k + k, with g and u
// rows j and inter + j of expert idx[s]'s gate_up [2·inter, hidden] against the token's x, or
// against round(x · scale_in[s]) where `scale_in` is set (sigmoid routing). One warp a (slot, j).
__device__ __forceinline__ float warp_dot_scaled(const void* a, long a0, float sc, const void* w, long w0, int dt,
                                                 int n) {
    float s = 0.0f;
    for (int k = threadIdx.x & 31; k < n; k += 32) s += rnd(dt, ld(a, dt, a0 + k) * sc) * ld(w, dt, w0 + k);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

extern "C" __global__ void moe_gate_up(const void* x, const void* w_gu, const int* idx, int dt, long slots, int top_k,
                                       int hidden, int inter, int act, const float* scale_in, void* out) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= slots * inter) return;
    long s = warp / inter;
    int j = warp % inter;
    long e = idx[s], t = s / top_k;
    if (e < 0) return;  // another rank's expert
    long base = e * 2 * (long)inter * hidden;
    float g, u;
    if (scale_in) {
        float sc = scale_in[s];
        g = rnd(dt, warp_dot_scaled(x, t * hidden, sc, w_gu, base + (long)j * hidden, dt, hidden));
        u = rnd(dt, warp_dot_scaled(x, t * hidden, sc, w_gu, base + (long)(inter + j) * hidden, dt, hidden));
    } else {
        g = rnd(dt, warp_dot(x, t * hidden, w_gu, base + (long)j * hidden, dt, hidden));
        u = rnd(dt, warp_dot(x, t * hidden, w_gu, base + (long)(inter + j) * hidden, dt, hidden));
    }
    if ((threadIdx.x & 31) == 0) st(out, dt, s * inter + j, rnd(dt, gate_act(act, g)) * u);
}

// contrib[s, j] = round(round(act[s] · down[idx[s]] row j) * wts[s]) in f32 (wts null: not
// scaled). One warp a (s, j).
extern "C" __global__ void moe_down(const void* act, const void* w_down, const int* idx, const float* wts, int dt,
                                    long slots, int hidden, int inter, float* contrib) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= slots * hidden) return;
    long s = warp / hidden;
    int j = warp % hidden;
    if (idx[s] < 0) return;  // another rank's expert: moe_combine skips it
    long base = (long)idx[s] * hidden * inter;
    float d = rnd(dt, warp_dot(act, s * inter, w_down, base + (long)j * inter, dt, inter));
    if ((threadIdx.x & 31) == 0) contrib[s * hidden + j] = wts ? rnd(dt, d * wts[s]) : d;
}

// `moe_gate_up` and `moe_down` over bf16 with 16-byte loads (hidden and inter multiples of 8,
// 16-byte aligned pointers; the launcher checks): the same roundings, one warp a (slot, row)
// reading the chosen expert's row 8 weights a lane at a time, as the dense decode GEMVs do.
extern "C" __global__ void moe_gate_up_bf16(const bf16_t* x, const bf16_t* w_gu, const int* idx, long slots,
                                            int top_k, int hidden, int inter, int act, const float* scale_in,
                                            bf16_t* out) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= slots * inter) return;
    long s = warp / inter;
    int j = warp % inter;
    if (idx[s] < 0) return;  // another rank's expert
    const bf16_t* base = w_gu + (long)idx[s] * 2 * inter * hidden;
    const uint4* wg = (const uint4*)(base + (long)j * hidden);
    const uint4* wu = (const uint4*)(base + (long)(inter + j) * hidden);
    const uint4* xr = (const uint4*)(x + (s / top_k) * hidden);
    float g = 0.0f, u = 0.0f;
    if (scale_in) {
        float sc = scale_in[s];
        for (int c = lane; c < hidden / 8; c += 32) {
            uint4 xv = xr[c];
            bf16_t* xp = (bf16_t*)&xv;
#pragma unroll
            for (int e = 0; e < 8; e++) xp[e] = f32_to_bf16(bf16_to_f32(xp[e]) * sc);
            swiglu_chunk(wg[c], wu[c], xv, g, u);
        }
    } else {
#pragma unroll 4
        for (int c = lane; c < hidden / 8; c += 32) swiglu_chunk(wg[c], wu[c], xr[c], g, u);
    }
    warp_sum2(g, u);
    if (lane == 0) {
        float gr = bf16_to_f32(f32_to_bf16(g)), ur = bf16_to_f32(f32_to_bf16(u));
        out[s * inter + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
    }
}

extern "C" __global__ void moe_down_bf16(const bf16_t* act, const bf16_t* w_down, const int* idx, const float* wts,
                                         long slots, int hidden, int inter, float* contrib) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= slots * hidden) return;
    long s = warp / hidden;
    int j = warp % hidden;
    if (idx[s] < 0) return;  // another rank's expert: moe_combine skips it
    const uint4* wr = (const uint4*)(w_down + (long)idx[s] * hidden * inter + (long)j * inter);
    float acc[1] = {0.0f};
#pragma unroll 4
    for (int c = lane; c < inter / 8; c += 32) gemv_chunk<1>(act + s * inter, inter, wr[c], c, acc);
    float d = acc[0];
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    float dr = bf16_to_f32(f32_to_bf16(d));
    if (lane == 0) contrib[s * hidden + j] = wts ? bf16_to_f32(f32_to_bf16(dr * wts[s])) : dr;
}

// ---- Grouped MoE (many tokens: from `Gpu::moe_grouped_min` slots an expert, the launcher
// picks): the slots grouped by expert first, then one warp an (expert, row) reads that row once
// for every slot routed to the expert, `MOE_GROUP` slots a pass, their inputs staged in shared
// memory, so a layer reads each chosen expert once instead of once a slot. A slot's arithmetic
// is the per-slot kernels' own (same lanes, same order), so both paths give the same bits.

// One block: `group` = [offsets (experts + 1), cursor (experts), perm (slots)]; perm lists the
// slots of expert 0, then of expert 1, ... (within an expert in no set order; each slot's output
// does not depend on it).
extern "C" __global__ void moe_group(const int* idx, long slots, int experts, int* group) {
    pdl_enter();
    int* offsets = group;
    int* cursor = group + experts + 1;
    int* perm = cursor + experts;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) cursor[e] = 0;
    __syncthreads();
    for (long s = threadIdx.x; s < slots; s += blockDim.x)
        if (idx[s] >= 0) atomicAdd(&cursor[idx[s]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int e = 0; e < experts; e++) {
            offsets[e] = total;
            total += cursor[e];
            cursor[e] = 0;
        }
        offsets[experts] = total;
    }
    __syncthreads();
    for (long s = threadIdx.x; s < slots; s += blockDim.x) {
        int e = idx[s];
        if (e >= 0) perm[offsets[e] + atomicAdd(&cursor[e], 1)] = (int)s;
    }
}

// A block of 8 warps takes 8 consecutive rows of one expert; for each `MOE_GROUP` of its slots
// the block stages their input rows in shared memory, `MOE_TILE` values at a time, and each warp
// reads its row's weights once against all of them.
#define MOE_GROUP 8
#define MOE_TILE 1024
#define MOE_ROWS 8

// Chunks c0 .. c0 + chunks (8 values each) of the input rows of the `MOE_GROUP` slots in `slot`
// (-1: none, staged as zeros) into `tile`: slot s reads row s / per_row of `src` (rows of `len`
// values: a token's x is shared by its top_k slots, an activation row is the slot's own), its
// values scaled by `scale[s]` where `scale` is set, rounded as the per-slot kernel rounds. The
// whole block calls it.
__device__ __forceinline__ void moe_stage(bf16_t (*tile)[MOE_TILE], const int* slot, const bf16_t* src, int len,
                                          int per_row, const float* scale, int c0, int chunks) {
    for (int i = threadIdx.x; i < MOE_GROUP * chunks; i += blockDim.x) {
        int m = i / chunks, c = i % chunks;
        uint4 v = {0u, 0u, 0u, 0u};
        if (slot[m] >= 0) {
            v = ((const uint4*)(src + (long)(slot[m] / per_row) * len))[c0 + c];
            if (scale) {
                float sc = scale[slot[m]];
                bf16_t* vp = (bf16_t*)&v;
#pragma unroll
                for (int q = 0; q < 8; q++) vp[q] = f32_to_bf16(bf16_to_f32(vp[q]) * sc);
            }
        }
        *(uint4*)&tile[m][c * 8] = v;
    }
}

// A grouped block's place: expert e, the warp's row j of `rows` (8 rows a block), and the
// expert's slots (`first` in perm, `n` of them).
struct MoeBlock {
    int e, j, first, n;
};
__device__ __forceinline__ MoeBlock moe_block(int rows, const int* group) {
    int blocks_e = (rows + MOE_ROWS - 1) / MOE_ROWS;
    MoeBlock b;
    b.e = blockIdx.x / blocks_e;
    b.j = (blockIdx.x % blocks_e) * MOE_ROWS + (threadIdx.x >> 5);
    b.first = group[b.e];
    b.n = group[b.e + 1] - b.first;
    return b;
}

// The slots [m0, m0 + MOE_GROUP) of the block's expert into shared `slot` (-1 past its n).
__device__ __forceinline__ void moe_slots(int* slot, const int* perm, const MoeBlock& b, int m0) {
    if (threadIdx.x < MOE_GROUP) slot[threadIdx.x] = m0 + threadIdx.x < b.n ? perm[b.first + m0 + threadIdx.x] : -1;
}

extern "C" __global__ void __launch_bounds__(256) moe_gate_up_grouped_bf16(const bf16_t* x, const bf16_t* w_gu,
                                                                           const int* group, int experts, int top_k,
                                                                           int hidden, int inter, int act,
                                                                           const float* scale_in, bf16_t* out) {
    __shared__ __align__(16) bf16_t xs[MOE_GROUP][MOE_TILE];
    __shared__ int slot[MOE_GROUP];
    pdl_enter();
    const MoeBlock b = moe_block(inter, group);
    const int e = b.e, j = b.j, lane = threadIdx.x & 31;
    const int* perm = group + 2 * experts + 1;
    bool row = j < inter;
    const bf16_t* base = w_gu + (long)e * 2 * inter * hidden;
    const uint4* wg = (const uint4*)(base + (long)j * hidden);
    const uint4* wu = (const uint4*)(base + (long)(inter + j) * hidden);
    for (int m0 = 0; m0 < b.n; m0 += MOE_GROUP) {
        __syncthreads();  // the previous group's slots are read
        moe_slots(slot, perm, b, m0);
        float g[MOE_GROUP], u[MOE_GROUP];
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) g[m] = u[m] = 0.0f;
        for (int c0 = 0; c0 < hidden / 8; c0 += MOE_TILE / 8) {
            int chunks = min(MOE_TILE / 8, hidden / 8 - c0);
            __syncthreads();  // slot[] written, the previous tile read
            moe_stage(xs, slot, x, hidden, top_k, scale_in, c0, chunks);
            __syncthreads();
            if (!row) continue;
            for (int c = lane; c < chunks; c += 32) {
                uint4 gv = wg[c0 + c], uv = wu[c0 + c];
#pragma unroll
                for (int m = 0; m < MOE_GROUP; m++) {
                    if (slot[m] < 0) break;
                    swiglu_chunk(gv, uv, *(const uint4*)&xs[m][c * 8], g[m], u[m]);
                }
            }
        }
        if (!row) continue;
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) {
            if (slot[m] < 0) break;
            warp_sum2(g[m], u[m]);
            if (lane == 0) {
                float gr = bf16_to_f32(f32_to_bf16(g[m])), ur = bf16_to_f32(f32_to_bf16(u[m]));
                out[(long)slot[m] * inter + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_down_grouped_bf16(const bf16_t* act, const bf16_t* w_down,
                                                                        const int* group, const float* wts,
                                                                        int experts, int hidden, int inter,
                                                                        float* contrib) {
    __shared__ __align__(16) bf16_t as[MOE_GROUP][MOE_TILE];
    __shared__ int slot[MOE_GROUP];
    pdl_enter();
    const MoeBlock b = moe_block(hidden, group);
    const int e = b.e, j = b.j, lane = threadIdx.x & 31;
    const int* perm = group + 2 * experts + 1;
    bool row = j < hidden;
    const uint4* wr = (const uint4*)(w_down + (long)e * hidden * inter + (long)j * inter);
    for (int m0 = 0; m0 < b.n; m0 += MOE_GROUP) {
        __syncthreads();
        moe_slots(slot, perm, b, m0);
        float acc[MOE_GROUP];
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) acc[m] = 0.0f;
        for (int c0 = 0; c0 < inter / 8; c0 += MOE_TILE / 8) {
            int chunks = min(MOE_TILE / 8, inter / 8 - c0);
            __syncthreads();
            moe_stage(as, slot, act, inter, 1, nullptr, c0, chunks);
            __syncthreads();
            if (!row) continue;
            for (int c = lane; c < chunks; c += 32) {
                uint4 wv = wr[c0 + c];
#pragma unroll
                for (int m = 0; m < MOE_GROUP; m++) {
                    if (slot[m] < 0) break;
                    gemv_chunk<1>(as[m], MOE_TILE, wv, c, &acc[m]);
                }
            }
        }
        if (!row) continue;
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) {
            if (slot[m] < 0) break;
            float d = acc[m];
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            float dr = bf16_to_f32(f32_to_bf16(d));
            if (lane == 0) contrib[(long)slot[m] * hidden + j] = wts ? bf16_to_f32(f32_to_bf16(dr * wts[slot[m]])) : dr;
        }
    }
}

// y[t, j] = the token's contributions summed in ascending expert order, each sum rounded to dt.
// Up to `COMBINE_HELD` choices a token: each one's rank among them (the experts a token chose
// are distinct) and its contribution are loaded first, all loads in flight together; more
// choices find the next expert by search, one load at a time.
#define COMBINE_HELD 16
extern "C" __global__ void moe_combine(const float* contrib, const int* idx, int dt, long tokens, int top_k, int hidden,
                                       void* y) {
    pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * hidden) return;
    long t = i / hidden;
    int j = i % hidden;
    const int* ti = idx + t * top_k;
    float acc = 0.0f;
    if (top_k <= COMBINE_HELD) {
        int e[COMBINE_HELD];
        float c[COMBINE_HELD];
#pragma unroll
        for (int q = 0; q < COMBINE_HELD; q++) {
            e[q] = q < top_k ? ti[q] : 0x7fffffff;
            // Another rank's expert (-1) adds nothing.
            c[q] = q < top_k && e[q] >= 0 ? contrib[(t * top_k + q) * hidden + j] : 0.0f;
        }
        // Choice q's rank: how many of the others hold a lower expert id.
        int rank[COMBINE_HELD];
#pragma unroll
        for (int q = 0; q < COMBINE_HELD; q++) {
            rank[q] = 0;
#pragma unroll
            for (int p = 0; p < COMBINE_HELD; p++) rank[q] += e[p] < e[q];
        }
#pragma unroll
        for (int r = 0; r < COMBINE_HELD; r++) {
            if (r >= top_k) break;
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < COMBINE_HELD; q++) v = rank[q] == r ? c[q] : v;
            acc = rnd(dt, acc + v);
        }
        st(y, dt, i, acc);
        return;
    }
    int last = -1;
    for (int k = 0; k < top_k; k++) {
        // The next expert above `last` among the token's choices.
        int pick = -1, pe = 0x7fffffff;
        for (int q = 0; q < top_k; q++) {
            int e = ti[q];
            if (e > last && e < pe) {
                pe = e;
                pick = q;
            }
        }
        if (pick < 0) break;  // the rest are other ranks' experts
        acc = rnd(dt, acc + contrib[(t * top_k + pick) * hidden + j]);
        last = pe;
    }
    st(y, dt, i, acc);
}
