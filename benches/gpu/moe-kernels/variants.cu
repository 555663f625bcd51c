// MoE decode kernel variants timed against graph.cu's by bench.py (not part of the engine; none
// measured faster on an H200, BENCHMARKS.md session 23), and a weight filler and a plain
// streaming read for the bench.
extern "C" __global__ void fill_bf16(bf16_t* p, long n, unsigned seed) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        float v = ((h & 0xffff) / 65536.0f - 0.5f) * 0.05f;
        p[i] = f32_to_bf16(v);
    }
}

// Variant B: R consecutive outputs a warp, all chunk loads of a pass issued before any math.
template <int R>
__device__ __forceinline__ void gu_rows(const bf16_t* x, const bf16_t* w_gu, const int* idx, long slots, int top_k,
                                        int hidden, int inter, int act, bf16_t* out) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    long per_slot = inter / R;
    if (warp >= slots * per_slot) return;
    long s = warp / per_slot;
    int j0 = (warp % per_slot) * R;
    const bf16_t* base = w_gu + (long)idx[s] * 2 * inter * hidden;
    const uint4* xr = (const uint4*)(x + (s / top_k) * hidden);
    float g[R], u[R];
#pragma unroll
    for (int r = 0; r < R; r++) g[r] = u[r] = 0.0f;
    int chunks = hidden / 8;
    for (int c0 = lane; c0 < chunks; c0 += 32 * 4) {
        uint4 wg[R][4], wu[R][4], xv[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int c = c0 + 32 * q;
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (c < chunks) {
                    wg[r][q] = ((const uint4*)(base + (long)(j0 + r) * hidden))[c];
                    wu[r][q] = ((const uint4*)(base + (long)(inter + j0 + r) * hidden))[c];
                }
            }
            if (c < chunks) xv[q] = xr[c];
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            if (c0 + 32 * q < chunks) {
#pragma unroll
                for (int r = 0; r < R; r++) swiglu_chunk(wg[r][q], wu[r][q], xv[q], g[r], u[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        warp_sum2(g[r], u[r]);
        if (lane == 0) {
            float gr = bf16_to_f32(f32_to_bf16(g[r])), ur = bf16_to_f32(f32_to_bf16(u[r]));
            out[s * inter + j0 + r] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
        }
    }
}
extern "C" __global__ void gu_r1(const bf16_t* x, const bf16_t* w, const int* idx, long slots, int top_k, int hidden,
                                 int inter, int act, bf16_t* out) {
    gu_rows<1>(x, w, idx, slots, top_k, hidden, inter, act, out);
}
extern "C" __global__ void gu_r2(const bf16_t* x, const bf16_t* w, const int* idx, long slots, int top_k, int hidden,
                                 int inter, int act, bf16_t* out) {
    gu_rows<2>(x, w, idx, slots, top_k, hidden, inter, act, out);
}

// Variant C: S warps share an output (split over the hidden chunks), partial sums in shared memory.
template <int S>
__device__ __forceinline__ void gu_split(const bf16_t* x, const bf16_t* w_gu, const int* idx, long slots, int top_k,
                                         int hidden, int inter, int act, bf16_t* out) {
    __shared__ float part[2][32];
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long out_i = ((long)blockIdx.x * blockDim.x + threadIdx.x) / (32 * S);
    int piece = wib % S;
    bool ok = out_i < slots * inter;
    float g = 0.0f, u = 0.0f;
    long s = 0;
    int j = 0;
    if (ok) {
        s = out_i / inter;
        j = out_i % inter;
        const bf16_t* base = w_gu + (long)idx[s] * 2 * inter * hidden;
        const uint4* wg = (const uint4*)(base + (long)j * hidden);
        const uint4* wu = (const uint4*)(base + (long)(inter + j) * hidden);
        const uint4* xr = (const uint4*)(x + (s / top_k) * hidden);
#pragma unroll 4
        for (int c = lane + 32 * piece; c < hidden / 8; c += 32 * S) swiglu_chunk(wg[c], wu[c], xr[c], g, u);
    }
    warp_sum2(g, u);
    if (lane == 0) { part[0][wib] = g; part[1][wib] = u; }
    __syncthreads();
    if (ok && piece == 0 && lane == 0) {
        for (int q = 1; q < S; q++) { g += part[0][wib + q]; u += part[1][wib + q]; }
        float gr = bf16_to_f32(f32_to_bf16(g)), ur = bf16_to_f32(f32_to_bf16(u));
        out[s * inter + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
    }
}
extern "C" __global__ void gu_s2(const bf16_t* x, const bf16_t* w, const int* idx, long slots, int top_k, int hidden,
                                 int inter, int act, bf16_t* out) {
    gu_split<2>(x, w, idx, slots, top_k, hidden, inter, act, out);
}
extern "C" __global__ void gu_s4(const bf16_t* x, const bf16_t* w, const int* idx, long slots, int top_k, int hidden,
                                 int inter, int act, bf16_t* out) {
    gu_split<4>(x, w, idx, slots, top_k, hidden, inter, act, out);
}

// Down variants: R rows a warp, all loads of the row first.
template <int R>
__device__ __forceinline__ void dn_rows(const bf16_t* act, const bf16_t* w_down, const int* idx, const float* wts,
                                        long slots, int hidden, int inter, float* contrib) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    long per_slot = hidden / R;
    if (warp >= slots * per_slot) return;
    long s = warp / per_slot;
    int j0 = (warp % per_slot) * R;
    const bf16_t* base = w_down + (long)idx[s] * hidden * inter;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    int chunks = inter / 8;
    for (int c0 = lane; c0 < chunks; c0 += 32 * 4) {
        uint4 wv[R][4];
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int r = 0; r < R; r++)
                if (c0 + 32 * q < chunks) wv[r][q] = ((const uint4*)(base + (long)(j0 + r) * inter))[c0 + 32 * q];
#pragma unroll
        for (int q = 0; q < 4; q++)
            if (c0 + 32 * q < chunks)
#pragma unroll
                for (int r = 0; r < R; r++) gemv_chunk<1>(act + s * inter, inter, wv[r][q], c0 + 32 * q, &acc[r]);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float d = acc[r];
        for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        float dr = bf16_to_f32(f32_to_bf16(d));
        if (lane == 0) contrib[s * hidden + j0 + r] = wts ? bf16_to_f32(f32_to_bf16(dr * wts[s])) : dr;
    }
}
extern "C" __global__ void dn_r1(const bf16_t* a, const bf16_t* w, const int* idx, const float* wts, long slots,
                                 int hidden, int inter, float* c) { dn_rows<1>(a, w, idx, wts, slots, hidden, inter, c); }
extern "C" __global__ void dn_r2(const bf16_t* a, const bf16_t* w, const int* idx, const float* wts, long slots,
                                 int hidden, int inter, float* c) { dn_rows<2>(a, w, idx, wts, slots, hidden, inter, c); }
extern "C" __global__ void dn_r4(const bf16_t* a, const bf16_t* w, const int* idx, const float* wts, long slots,
                                 int hidden, int inter, float* c) { dn_rows<4>(a, w, idx, wts, slots, hidden, inter, c); }

// Reading floor probe: each warp streams a contiguous byte range (sum of words), same total bytes.
extern "C" __global__ void stream_read(const uint4* p, long n16, float* sink) {
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (long)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        s += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
    }
    if (s == 12345.0f) sink[0] = s;
}
