// Kernels behind the CUDA graph executor (plugins/src/compile/cuda): each takes its tensors'
// dtypes as run-time codes, so one kernel serves every dtype mix the op rules allow (torch's
// promotion: bf16 * f32 -> f32). Each computes in f32 (i64 stays integral) and rounds once to
// the output dtype, as the CPU reference does.

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
// stream of a fused add + norm). With `qs` set (`quant=fp8`), out gets a byte a value: the E4M3
// code of the value rounded to dt_out, divided by qs[0] (as the FP8 linears quantize).
extern "C" __global__ void rmsnorm(const void* x, const void* res, void* res_out, int dt_x, const void* w, int dt_w,
                                   void* out, int dt_out, int dt_norm, int n, float eps, const float* qs) {
    pdl_enter();
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
        float o = ld(w, dt_w, i) * rnd(dt_norm, v * r);
        if (qs)
            ((unsigned char*)out)[row * n + i] = e4m3_code_rn(rnd(dt_out, o) / qs[0]);
        else
            st(out, dt_out, row * n + i, o);
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

// gate_up rows [gate (inter) | up (inter)] (or two tensors: `up` set) ->
// out = round(round(act(gate)) * up), act as `gate_act`.
extern "C" __global__ void silu_mul(const void* gate, const void* up, int dt, void* out, long rows, int inter, int act,
                                    const float* qs) {
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
    float v = rnd(dt, gate_act(act, g)) * u;
    if (qs)
        ((unsigned char*)out)[i] = e4m3_code_rn(rnd(dt, v) / qs[0]);
    else
        st(out, dt, i, v);
}

// `silu_mul` over bf16, 8 values a thread with 16-byte loads and stores (inter % 8 == 0, every
// pointer 16-byte aligned); the same rounding. With `qs`, 8 E4M3 codes a thread (as `silu_mul`).
// Grid (x: a row's 8-value pieces, y: rows, striding past 65,535), so no thread divides.
extern "C" __global__ void silu_mul_bf16x8(const bf16_t* gate, const bf16_t* up, bf16_t* out, long rows, int inter,
                                           const float* qs) {
    pdl_enter();
    int j = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j >= inter) return;
    float s = qs ? qs[0] : 1.0f;
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const bf16_t* gp = up ? gate + r * inter + j : gate + r * 2 * inter + j;
        const bf16_t* upp = up ? up + r * inter + j : gate + r * 2 * inter + inter + j;
        uint4 gv = *(const uint4*)gp, uv = *(const uint4*)upp, ov;
        const bf16_t *g8 = (const bf16_t*)&gv, *u8 = (const bf16_t*)&uv;
        bf16_t* o8 = (bf16_t*)&ov;
#pragma unroll
        for (int k = 0; k < 8; k++) o8[k] = swiglu_value(bf16_to_f32(g8[k]), bf16_to_f32(u8[k]));
        if (qs)
            *(uint2*)((unsigned char*)out + r * inter + j) = e4m3x8_codes(o8, s);
        else
            *(uint4*)(out + r * inter + j) = ov;
    }
}

// Records a bad index v in *bad for the host (`exec::bad_index` reads it back): v + 1 for one
// past the end, v itself when negative, so that no bad index leaves the flag 0.
__device__ __forceinline__ void flag_bad_index(long long* bad, long long v) {
    atomicExch((unsigned long long*)bad, (unsigned long long)(v < 0 ? v : v + 1));
}

// out[t, :] = the row of ids[t] in a table of `vocab` rows of `row_bytes` of which `weight`
// holds rows start .. start + rows (the whole table: start 0, vocab = rows); a token whose row
// another rank holds gets zeros, an id outside the table writes zeros and is flagged in *bad. A thread copies 16 bytes of a row: one 16-byte load and store where
// `vec` (row_bytes % 16 == 0, both pointers 16-byte aligned), else byte by byte. Grid (x: a
// row's 16-byte spans, y: tokens, striding past 65,535), so no thread divides.
extern "C" __global__ void embedding_rows(const unsigned char* weight, const long long* ids, unsigned char* out,
                                          long tokens, long row_bytes, long rows, long start, long vocab,
                                          long long* bad, int vec) {
    pdl_enter();
    long j = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (j >= row_bytes) return;
    for (long t = blockIdx.y; t < tokens; t += gridDim.y) {
        long long id = ids[t];
        bool known = id >= 0 && id < vocab;
        if (!known && j == 0) flag_bad_index(bad, id);
        long long local = id - start;
        const unsigned char* src = known && local >= 0 && local < rows ? weight + local * row_bytes + j : nullptr;
        unsigned char* dst = out + t * row_bytes + j;
        if (vec) {
            *(uint4*)dst = src ? *(const uint4*)src : make_uint4(0u, 0u, 0u, 0u);
        } else {
            for (long b = 0; b < 16 && j + b < row_bytes; b++) dst[b] = src ? src[b] : 0;
        }
    }
}

// out[o, k, :] = x[o, idx[k], :] for x [outer, len, inner] (elements of `esize` bytes);
// a bad index is flagged in *bad.
extern "C" __global__ void index_select(const unsigned char* x, const long long* idx, unsigned char* out, long outer,
                                        long nidx, long len, long inner_bytes, long long* bad) { pdl_enter();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= outer * nidx * inner_bytes) return;
    long b = i % inner_bytes, k = (i / inner_bytes) % nidx, o = i / (inner_bytes * nidx);
    long long j = idx[k];
    if (j < 0 || j >= len) {
        if (b == 0) flag_bad_index(bad, j);
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
// runs it); the 16-byte chunk each lane reads is `gemv_chunk` (codes.cuh).

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
// A lane's first GEMV_HELD chunks (an experiment define, AUTODEPLOY_KERNEL_DEFINES; 0 by
// default) are loaded before the kernel's wait into `held` and added first, in the loop's order.
#ifndef GEMV_HELD
#define GEMV_HELD 0
#endif
template <int S>
__device__ __forceinline__ void gemv_held_loads(const bf16_t* w, int n, int k, uint4* held) {
#if GEMV_HELD > 0
    int row = blockIdx.x * (8 / S) + (threadIdx.x >> 5) / S, part = (threadIdx.x >> 5) % S;
    const uint4* wr = (const uint4*)(w + (long)(row < n ? row : 0) * k);
#pragma unroll
    for (int i = 0; i < GEMV_HELD; i++) {
        int c = (threadIdx.x & 31) + 32 * part + 32 * S * i;
        if (row < n && c < k / 8) held[i] = wr[c];
    }
#endif
}

template <int S>
__device__ void gemv_bf16_split(const bf16_t* x, const bf16_t* w, const uint4* held, bf16_t* y, int n, int k,
                                int accumulate) {
    __shared__ float part_sum[8];
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * (8 / S) + wib / S, part = wib % S;
    float acc[1] = {0.0f};
    if (row < n) {
        const uint4* wr = (const uint4*)(w + (long)row * k);
        int chunks = k / 8;
#if GEMV_HELD > 0
        uint4 xa[GEMV_HELD];
#pragma unroll
        for (int i = 0; i < GEMV_HELD; i++) {
            int c = lane + 32 * part + 32 * S * i;
            if (c < chunks) xa[i] = ((const uint4*)x)[c];
        }
#pragma unroll
        for (int i = 0; i < GEMV_HELD; i++)
            if (lane + 32 * part + 32 * S * i < chunks) dot_chunk(held[i], xa[i], acc[0]);
#endif
#pragma unroll 4
        for (int c = lane + 32 * part + 32 * S * GEMV_HELD; c < chunks; c += 32 * S) gemv_chunk<1>(x, k, wr[c], c, acc);
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
        uint4 held[GEMV_HELD > 0 ? GEMV_HELD : 1];                                                                    \
        gemv_held_loads<S>(w, n, k, held);                                                                            \
        pdl_enter();                                                                                                  \
        gemv_bf16_split<S>(x, w, held, y, n, k, accumulate);                                                          \
    }
GEMV_SPLIT(2)
GEMV_SPLIT(4)

// RMSNorm of bf16 rows (bf16 weight, output and norm dtype: the HF Llama family), the row held
// in registers: each thread loads 8 values with one 16-byte load (n % 8 == 0, n <= 8 * 1024),
// one block reduction, one store. Same rounding as `rmsnorm`; with `qs`, 8 E4M3 codes a thread
// out (one 8-byte store), as `rmsnorm`'s, and then the FP8 GEMV that reads those codes may
// launch before this kernel waits (`pdl_enter_trigger_first`), so its first weight loads overlap
// the kernel ahead of this one (NORM_CODES_TRIGGER_FIRST, an experiment define: 0 waits first).
// H100, batch 1 (sessions 44-45): every graph.cu kernel triggering first made the FP8 8B step
// 2.0% faster and the NVFP4 8B's 8% slower; this kernel alone, with codes, 1.9% faster on the
// FP8 8B, the NVFP4 8B (norms writing bf16) unchanged.
#ifndef NORM_CODES_TRIGGER_FIRST
#define NORM_CODES_TRIGGER_FIRST 1
#endif
extern "C" __global__ void rmsnorm_bf16x8(const bf16_t* x, const bf16_t* res, bf16_t* res_out, const bf16_t* w,
                                          bf16_t* out, int n, float eps, const float* qs) {
    long row = blockIdx.x;
    int c = threadIdx.x;  // chunk of 8
    bool live = c * 8 < n;
    // The norm's weight is never written during a step: read before waiting on the kernel ahead.
    uint4 wv;
    if (live) wv = *(const uint4*)(w + c * 8);
    pdl_enter_trigger_first(NORM_CODES_TRIGGER_FIRST && qs != nullptr);
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
    if (qs) {
        *(uint2*)((unsigned char*)out + row * n + c * 8) = e4m3x8_codes(op, qs[0]);
        return;
    }
    *(uint4*)(out + row * n + c * 8) = ov;
}

// The gate/up linear of a SwiGLU MLP with its activation as the epilogue, for one bf16 row:
// w_gate_up [2·inter, k] (gate rows first); warp j computes gate_j and up_j (each rounded to
// bf16, as the linear's output is) and writes out[j] = round(round(silu(gate_j)) * up_j).
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
