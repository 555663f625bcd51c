// The quantized linears of ModelOpt checkpoints (core's ops/quant_linear.rs states the math):
// FP8 E4M3 weights with per-tensor or per-row scales and E4M3 activations at a static input
// scale; NVFP4 weights (E2M1 two a byte, E4M3 block scales per 16, a global scale), weight-only.
// Every product is formed from the codes' values, which are exact in f32 and bf16 (E4M3: 4
// significant bits; E2M1 times an E4M3 block scale: 6), summed in f32, and scaled once at the
// end: y = acc · s_in · s_w + bias, rounded once to the output dtype. T is float or bf16_t.

__device__ __forceinline__ float e2m1_value(unsigned int c) {
    const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = mag[c & 7u];
    return (c & 8u) ? -v : v;
}

// x's E4M3 codes at scale s_in (their values, unscaled): the FP8 linear's input.
template <typename T>
__device__ void e4m3_codes(const T* x, const float* s_in, T* out, long n) {
    float s = s_in[0];
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        store_f(out, i, e4m3_round(load_f(x, i) / s));
}

// Each row's E4M3 codes at its own scale (max |x| / 448, or 1 for a row of zeros), written to
// s_out[row]: the dynamic per-token FP8 input. One block a row.
template <typename T>
__device__ void e4m3_codes_rows(const T* x, float* s_out, T* out, int k) {
    __shared__ float part[32];
    long row = blockIdx.x;
    const T* xr = x + row * k;
    float a = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) a = fmaxf(a, fabsf(load_f(xr, i)));
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = a;
    __syncthreads();
    a = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) a = fmaxf(a, part[w]);
    float s = a > 0.0f ? a / 448.0f : 1.0f;
    if (threadIdx.x == 0) s_out[row] = s;
    for (int i = threadIdx.x; i < k; i += blockDim.x) store_f(out, row * k + i, e4m3_round(load_f(xr, i) / s));
}

// E4M3 weight codes' values into T (unscaled).
template <typename T>
__device__ void fp8_values(const unsigned char* w, T* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        store_f(out, i, e4m3_value(w[i]));
}

// NVFP4 weight [rows, k] values times their block scales into T (not times the global scale).
template <typename T>
__device__ void nvfp4_values(const unsigned char* w, const unsigned char* bs, T* out, long n, int k) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long row = i / k;
        int col = (int)(i % k);
        unsigned int byte = w[i >> 1];
        unsigned int code = (i & 1) ? (byte >> 4) : (byte & 15u);
        store_f(out, i, e2m1_value(code) * e4m3_value(bs[row * (k / 16) + col / 16]));
    }
}

// y[m, n] = acc · s_a · s_w (+ bias): s_a one value, one an activation row (`a_per_row`) or
// none (nullptr), s_w one value or one a weight row (`per_row`), bias [n] or none.
template <typename T>
__device__ void lowbit_epilogue(const float* acc, const float* s_a, int a_per_row, const float* s_w, int per_row,
                                const T* bias, T* y, long m, int n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m * n; i += (long)gridDim.x * blockDim.x) {
        int j = (int)(i % n);
        float sa = s_a ? s_a[a_per_row ? i / n : 0] : 1.0f;
        float v = acc[i] * (sa * s_w[per_row ? j : 0]);
        if (bias) v += load_f(bias, j);
        store_f(y, i, v);
    }
}

// An attention output's head rows (head h of token t at x + h·hs + t·ts, d values) as the E4M3
// codes (a byte each) of their values divided by s_in[0], written token-major, out[(t·heads +
// h)·d + e]: what an FP8 o_proj reads (`quant=fp8` on a cached attention; the values are the
// attention's, already rounded to T, so the codes are the ones the linear would make). One
// block a (token, head) row.
template <typename T>
__device__ void e4m3_heads(const T* x, long long hs, long long ts, int heads, int d, const float* s_in,
                           unsigned char* out) {
    long row = blockIdx.x;
    const T* xr = x + (row % heads) * hs + (row / heads) * ts;
    float s = s_in[0];
    for (int e = threadIdx.x; e < d; e += blockDim.x) out[row * d + e] = e4m3_code_rn(load_f(xr, e) / s);
}

#define LOWBIT_ELEMENTWISE(S, T)                                                                                      \
    extern "C" __global__ void e4m3_codes_##S(const T* x, const float* s_in, T* out, long n) {                        \
        pdl_enter();                                                                                                  \
        e4m3_codes<T>(x, s_in, out, n);                                                                               \
    }                                                                                                                 \
    extern "C" __global__ void e4m3_codes_rows_##S(const T* x, float* s_out, T* out, int k) {                         \
        pdl_enter();                                                                                                  \
        e4m3_codes_rows<T>(x, s_out, out, k);                                                                         \
    }                                                                                                                 \
    extern "C" __global__ void e4m3_heads_##S(const T* x, long long hs, long long ts, int heads, int d,               \
                                              const float* s_in, unsigned char* out) {                                \
        pdl_enter();                                                                                                  \
        e4m3_heads<T>(x, hs, ts, heads, d, s_in, out);                                                                \
    }                                                                                                                 \
    extern "C" __global__ void fp8_values_##S(const unsigned char* w, T* out, long n) {                               \
        pdl_enter();                                                                                                  \
        fp8_values<T>(w, out, n);                                                                                     \
    }                                                                                                                 \
    extern "C" __global__ void nvfp4_values_##S(const unsigned char* w, const unsigned char* bs, T* out, long n,      \
                                                int k) {                                                              \
        pdl_enter();                                                                                                  \
        nvfp4_values<T>(w, bs, out, n, k);                                                                            \
    }                                                                                                                 \
    extern "C" __global__ void lowbit_epilogue_##S(const float* acc, const float* s_a, int a_per_row,                 \
                                                   const float* s_w, int per_row, const T* bias, T* y, long m,        \
                                                   int n) {                                                           \
        pdl_enter();                                                                                                  \
        lowbit_epilogue<T>(acc, s_a, a_per_row, s_w, per_row, bias, y, m, n);                                         \
    }
LOWBIT_ELEMENTWISE(f32, float)
LOWBIT_ELEMENTWISE(bf16, bf16_t)

// Eight activations from 16-byte-aligned memory as f32.
__device__ __forceinline__ void load8(const bf16_t* p, float* o) {
    uint4 v = *(const uint4*)p;
    const bf16_t* h = (const bf16_t*)&v;
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = bf16_to_f32(h[j]);
}
__device__ __forceinline__ void load8(const float* p, float* o) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}

// Chunks of a weight row (16 bytes each) a lane has in flight at once.
#define LOWBIT_INFLIGHT 4

// The decode GEMVs (m <= 8 activation rows), one warp a weight row, each lane reading 16-byte
// chunks of the row LOWBIT_INFLIGHT at a time, the activations (16-byte-aligned rows) small
// enough to stay in cache; lane 0 stores y[i, row] = sum · scale (+ bias).
// The scale of activation row i is s_a[i] when `a_per_row`, else s_a[0]; times s_w.
template <typename T, int M>
__device__ __forceinline__ void gemv_store_scaled(float* acc, const float* s_a, int a_per_row, float s_w,
                                                  const T* bias, T* y, int n, int row, int lane) {
    float b = bias ? load_f(bias, row) : 0.0f;
#pragma unroll
    for (int i = 0; i < M; i++) {
        float v = acc[i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) store_f(y, (long)i * n + row, v * (s_a[a_per_row ? i : 0] * s_w) + b);
    }
}

// FP8: xq holds the activations' E4M3 codes' values (`e4m3_codes`); k % 16 == 0. A chunk is
// 16 codes.
template <typename T, int M>
__device__ void gemv_fp8(const T* xq, const unsigned char* w, const float* s_in, int in_per_row, const float* s_w,
                         int per_row, const T* bias, T* y, int n, int k) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const uint4* wr = (const uint4*)(w + (long)row * k);
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    int chunks = k / 16;
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOWBIT_INFLIGHT) {
        uint4 wv[LOWBIT_INFLIGHT];
#pragma unroll
        for (int u = 0; u < LOWBIT_INFLIGHT; u++) {
            int c = c0 + 32 * u;
            wv[u] = c < chunks ? wr[c] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < LOWBIT_INFLIGHT; u++) {
            int c = c0 + 32 * u;
            if (c >= chunks) break;
            float wf[16];
            e4m3x4(wv[u].x, wf);
            e4m3x4(wv[u].y, wf + 4);
            e4m3x4(wv[u].z, wf + 8);
            e4m3x4(wv[u].w, wf + 12);
#pragma unroll
            for (int i = 0; i < M; i++) {
                float xf[16];
                load8(xq + (long)i * k + c * 16, xf);
                load8(xq + (long)i * k + c * 16 + 8, xf + 8);
#pragma unroll
                for (int j = 0; j < 16; j++) acc[i] += wf[j] * xf[j];
            }
        }
    }
    gemv_store_scaled<T, M>(acc, s_in, in_per_row, s_w[per_row ? row : 0], bias, y, n, row, lane);
}

#define GEMV_FP8(S, T, M)                                                                                             \
    extern "C" __global__ void gemv_fp8_m##M##_##S(const T* xq, const unsigned char* w, const float* s_in,            \
                                                   int in_per_row, const float* s_w, int per_row, const T* bias,     \
                                                   T* y, int n, int k, int prefetch) {                                \
        int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                                                       \
        if (row < n) prefetch_l2(w + (long)row * k, prefetch, threadIdx.x & 31);                                      \
        pdl_enter();                                                                                                  \
        gemv_fp8<T, M>(xq, w, s_in, in_per_row, s_w, per_row, bias, y, n, k);                                         \
    }
GEMV_FP8(f32, float, 1)
GEMV_FP8(f32, float, 2)
GEMV_FP8(f32, float, 4)
GEMV_FP8(f32, float, 8)
GEMV_FP8(bf16, bf16_t, 1)
GEMV_FP8(bf16, bf16_t, 2)
GEMV_FP8(bf16, bf16_t, 4)
GEMV_FP8(bf16, bf16_t, 8)

// NVFP4, weight-only: x as it is; a chunk is 32 codes (two blocks of 16, each times its E4M3
// block scale), k % 32 == 0. `lut` holds each byte's two E2M1 values as f16 pairs.
template <typename T, int M>
__device__ void gemv_nvfp4(const T* x, const unsigned char* w, const unsigned char* bs, const float* s2,
                           const T* bias, T* y, int n, int k, const unsigned int* lut) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const uint4* wr = (const uint4*)(w + (long)row * (k / 2));
    const unsigned char* br = bs + (long)row * (k / 16);
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    int chunks = k / 32;
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOWBIT_INFLIGHT) {
        uint4 wv[LOWBIT_INFLIGHT];
        unsigned short sv[LOWBIT_INFLIGHT];
#pragma unroll
        for (int u = 0; u < LOWBIT_INFLIGHT; u++) {
            int c = c0 + 32 * u;
            wv[u] = c < chunks ? wr[c] : make_uint4(0, 0, 0, 0);
            sv[u] = c < chunks ? *(const unsigned short*)(br + 2 * c) : 0;
        }
#pragma unroll
        for (int u = 0; u < LOWBIT_INFLIGHT; u++) {
            int c = c0 + 32 * u;
            if (c >= chunks) break;
            const unsigned int words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
            float wf[32];
#pragma unroll
            for (int q = 0; q < 4; q++) {
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    unsigned int pair = lut[(words[q] >> (8 * b)) & 0xffu];
                    float lo, hi;
                    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
                        : "=f"(lo), "=f"(hi)
                        : "r"(pair));
                    wf[8 * q + 2 * b] = lo;
                    wf[8 * q + 2 * b + 1] = hi;
                }
            }
            float s0 = e4m3_value(sv[u] & 0xffu), s1 = e4m3_value(sv[u] >> 8);
#pragma unroll
            for (int i = 0; i < M; i++) {
                float xf[32];
#pragma unroll
                for (int q = 0; q < 4; q++) load8(x + (long)i * k + c * 32 + 8 * q, xf + 8 * q);
                float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
                for (int j = 0; j < 16; j++) a0 += wf[j] * xf[j];
#pragma unroll
                for (int j = 16; j < 32; j++) a1 += wf[j] * xf[j];
                acc[i] += a0 * s0 + a1 * s1;
            }
        }
    }
    gemv_store_scaled<T, M>(acc, s2, 0, 1.0f, bias, y, n, row, lane);
}

// Each byte's two E2M1 values (lower nibble first) as an f16 pair, for the NVFP4 GEMV.
__device__ __forceinline__ void nvfp4_lut(unsigned int* lut) {
    const unsigned short f16[16] = {0x0000, 0x3800, 0x3c00, 0x3e00, 0x4000, 0x4200, 0x4400, 0x4600,
                                    0x8000, 0xb800, 0xbc00, 0xbe00, 0xc000, 0xc200, 0xc400, 0xc600};
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[i] = f16[i & 15] | ((unsigned int)f16[i >> 4] << 16);
    __syncthreads();
}

#define GEMV_NVFP4(S, T, M)                                                                                           \
    extern "C" __global__ void gemv_nvfp4_m##M##_##S(const T* x, const unsigned char* w, const unsigned char* bs,     \
                                                     const float* s2, const T* bias, T* y, int n, int k,             \
                                                     int prefetch) {                                                  \
        __shared__ unsigned int lut[256];                                                                             \
        int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                                                       \
        if (row < n) prefetch_l2(w + (long)row * (k / 2), prefetch, threadIdx.x & 31);                                \
        nvfp4_lut(lut);                                                                                               \
        pdl_enter();                                                                                                  \
        gemv_nvfp4<T, M>(x, w, bs, s2, bias, y, n, k, lut);                                                           \
    }
GEMV_NVFP4(f32, float, 1)
GEMV_NVFP4(f32, float, 2)
GEMV_NVFP4(f32, float, 4)
GEMV_NVFP4(f32, float, 8)
GEMV_NVFP4(bf16, bf16_t, 1)
GEMV_NVFP4(bf16, bf16_t, 2)
GEMV_NVFP4(bf16, bf16_t, 4)
GEMV_NVFP4(bf16, bf16_t, 8)

// ---------------------------------------------------------------------------------------------
// The FP8 decode GEMV on tensor cores (sm_89+), activations quantized inside: y[m, n] for
// m <= 8 activation rows of T, E4M3 weights [n, k], k % 16 == 0. One block takes 16 weight
// rows, its FP8_TC_WARPS warps splitting k in steps of 128 (warp w: steps w, w + warps, ...); a
// step is four `mma.m16n8k32` E4M3 × E4M3 → f32 with the activation rows as the 8 columns (those
// past m zero). The block quantizes the activations a chunk of FP8_TC_CHUNK at a time into shared
// memory (x / s rounded to nearest even, saturating: `e4m3_round`), the first weight loads of
// the chunk already under way. Lane (g, t) = (lane / 4, lane % 4) reads 32 contiguous weight
// bytes of rows g and g + 8 at t·32 of the step (so a warp's two loads cover whole 128-byte
// lines of 16 rows) and the 32 activation codes at the same k: the
// bytes a lane holds stand for the k the fragment layout names, and since the activations are
// permuted alike the products are the same. Each mma starts from zero and is added in f32 (no
// reliance on the tensor core's accumulation width), the warps' sums meet in shared memory, and
// the scales and bias apply once: y = acc · s_a · s_w + bias, as `gemv_fp8`. `dynamic`: each
// activation row's scale is max |x| / 448 (1 for a row of zeros), found by the block first, as
// `e4m3_codes_rows`. `xc` set: the activations arrive as E4M3 codes at s_in[0] already (an
// RMSNorm with `quant=fp8` made them; `x` unread), and the block copies them into shared memory
// a chunk at a time, as it stages the codes it quantizes itself. The first chunk's weight pieces
// are requested before the wait for the kernels ahead.
// (benches/gpu/fp8-gemv times other warp and in-flight counts by defining these first.)
#ifndef FP8_TC_WARPS
#define FP8_TC_WARPS 8
#endif
#ifndef FP8_TC_INFLIGHT
#define FP8_TC_INFLIGHT 2
#endif
#define FP8_TC_CHUNK 4096
// Bytes between activation rows in shared memory: a chunk plus 64, so the two rows a quarter
// warp reads in one step fall in different banks.
#define FP8_TC_STRIDE (FP8_TC_CHUNK + 64)

// 16 activations (16-byte-aligned) at scale s as E4M3 codes, lowest k in the lowest byte.
template <typename T>
__device__ __forceinline__ uint4 e4m3_pack16(const T* x, float s) {
    float v[16];
    load8(x, v);
    load8(x + 8, v + 8);
    unsigned int wd[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        unsigned short lo = 0, hi = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(v[4 * q + 1] / s), "f"(v[4 * q] / s));
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(v[4 * q + 3] / s), "f"(v[4 * q + 2] / s));
#endif
        wd[q] = (unsigned int)lo | ((unsigned int)hi << 16);
    }
    return make_uint4(wd[0], wd[1], wd[2], wd[3]);
}

// The FP8 GEMM's input as bytes (cuBLASLt reads E4M3 codes): each bf16 activation row's codes
// at scale s_in[0], or with `dynamic` at the row's own (max |x| / 448, 1 for a row of zeros,
// written to s_out[row]), the same codes `e4m3_codes` / `e4m3_codes_rows` give the values of.
// One block a row; k % 16 == 0, x and out 16-byte aligned (the launcher checks); sm_89+.
extern "C" __global__ void e4m3_bytes_rows_bf16(const bf16_t* x, const float* s_in, int dynamic, float* s_out,
                                                unsigned char* out, int k) {
    pdl_enter();
    __shared__ float part[32];
    long row = blockIdx.x;
    const bf16_t* xr = x + row * k;
    float s = 1.0f;
    if (dynamic) {
        float a = 0.0f;
        for (int i = threadIdx.x; i < k; i += blockDim.x) a = fmaxf(a, fabsf(bf16_to_f32(xr[i])));
        for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = a;
        __syncthreads();
        a = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) a = fmaxf(a, part[w]);
        s = a > 0.0f ? a / 448.0f : 1.0f;
        if (threadIdx.x == 0) s_out[row] = s;
    } else {
        s = s_in[0];
    }
    uint4* o = (uint4*)(out + row * k);
    for (int c = threadIdx.x; c < k / 16; c += blockDim.x) o[c] = e4m3_pack16(xr + 16 * c, s);
}

__device__ __forceinline__ void mma_e4m3(const unsigned int* a, unsigned int b0, unsigned int b1, float* acc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    float d0, d1, d2, d3;
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
    acc[0] += d0, acc[1] += d1, acc[2] += d2, acc[3] += d3;
#endif
}

// Each warp's sums for the block's 16 MMA rows (acc in the m16n8 C layout: (row g, column 2t),
// (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)) into `part[warp]`, then a barrier.
__device__ __forceinline__ void tc_parts(float (*part)[16][8], const float* acc) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    part[warp][g][2 * t] = acc[0];
    part[warp][g][2 * t + 1] = acc[1];
    part[warp][g + 8][2 * t] = acc[2];
    part[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
}

// The tensor-core GEMVs' end: the warps' sums for the block's 16 weight rows meet in `part`
// (`tc_parts`), and thread r + 16·i (< 16·M) stores y[i, row0 + r] = sum · scale(i, row) + bias.
template <typename T, int M, int WARPS, typename Scale>
__device__ __forceinline__ void tc_gemv_store(float (*part)[16][8], const float* acc, int row0, int n, const T* bias,
                                              T* y, Scale scale) {
    tc_parts(part, acc);
    if (threadIdx.x < 16 * M) {
        int r = threadIdx.x % 16, i = threadIdx.x / 16, row = row0 + r;
        if (row < n) {
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < WARPS; q++) v += part[q][r][i];
            float b = bias ? load_f(bias, row) : 0.0f;
            store_f(y, (long)i * n + row, v * scale(i, row) + b);
        }
    }
}

// `tc_gemv_store` for a gated MLP's gate/up GEMV (`gemv_fp8_tc`'s GATED build): the block's 16
// MMA rows are 8 gate rows row0 .. row0 + 7 (C rows 0-7) and their up rows n + row0 .. (C rows
// 8-15) of a [2n, k] weight; thread r + 8·i (< 8·M) stores y[i, row0 + r] (y [m, n]) =
// round(round(act(g)) · u), g and u each the row's sum · scale + bias rounded to T: what the
// plain GEMV, then `silu_mul`, store. With `qs` (one f32: the next FP8 linear's input scale) y
// is bytes and gets the E4M3 code of that value / qs[0] instead (`silu_mul`'s codes).
template <typename T, int M, int WARPS, typename Scale>
__device__ __forceinline__ void tc_gemv_store_gated(float (*part)[16][8], const float* acc, int row0, int n,
                                                    const T* bias, T* y, Scale scale, int act, const float* qs) {
    tc_parts(part, acc);
    if (threadIdx.x < 8 * M) {
        int r = threadIdx.x % 8, i = threadIdx.x / 8, row = row0 + r;
        if (row < n) {
            float gs = 0.0f, us = 0.0f;
#pragma unroll
            for (int q = 0; q < WARPS; q++) gs += part[q][r][i], us += part[q][r + 8][i];
            float gb = bias ? load_f(bias, row) : 0.0f, ub = bias ? load_f(bias, n + row) : 0.0f;
            float gv = round_as(bias, gs * scale(i, row) + gb), uv = round_as(bias, us * scale(i, n + row) + ub);
            float v = round_as(bias, gate_act(act, gv)) * uv;
            if (qs)
                ((unsigned char*)y)[(long)i * n + row] = e4m3_code_rn(round_as(bias, v) / qs[0]);
            else
                store_f(y, (long)i * n + row, v);
        }
    }
}

// GATED: the weight is a gated MLP's fused gate/up [2n, k] (gate rows first) and y [m, n] gets
// act(gate) · up (`act` as `gate_act`), 8 gate rows and their 8 up rows a block; with `qs`, as
// E4M3 codes at that scale (`tc_gemv_store_gated`).
template <typename T, int M, bool GATED>
__device__ void gemv_fp8_tc(const T* x, const unsigned char* xc, const unsigned char* w, const float* s_in, int dynamic,
                            const float* s_w, int per_row, const T* bias, T* y, int n, int k, int act,
                            const float* qs) {
    __shared__ float s_tok[8];
    __shared__ float part[FP8_TC_WARPS][16][8];
    __shared__ __align__(16) unsigned char xs[M * FP8_TC_STRIDE];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = blockIdx.x * (GATED ? 8 : 16);
    // Rows past n (the last block of an n % 16 != 0 call) read row n - 1 and are not stored.
    const unsigned char* wa = w + (long)min(row0 + g, n - 1) * k + t * 32;
    const unsigned char* wb =
        w + (GATED ? (long)n + min(row0 + g, n - 1) : (long)min(row0 + g + 8, n - 1)) * k + t * 32;
    // The weight pieces of a chunk's first steps, in flight while the activations are staged.
    int kc = 0, len = min(FP8_TC_CHUNK, k), steps = (len + 127) / 128, s0 = warp;
    uint4 ra[FP8_TC_INFLIGHT][2], rb[FP8_TC_INFLIGHT][2];
    auto load = [&]() {
#pragma unroll
        for (int u = 0; u < FP8_TC_INFLIGHT; u++) {
            int s = s0 + u * FP8_TC_WARPS;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                // A lane's 16-byte pieces past the chunk (k % 128 != 0: the last step's) are zeros.
                int off = s * 128 + t * 32 + 16 * h;
                bool in = s < steps && off < len;
                ra[u][h] = in ? *(const uint4*)(wa + kc + off - t * 32) : make_uint4(0, 0, 0, 0);
                rb[u][h] = in ? *(const uint4*)(wb + kc + off - t * 32) : make_uint4(0, 0, 0, 0);
            }
        }
    };
    // Weights are never written during a step: the first chunk's are requested before waiting
    // for the kernels ahead (which write x).
    load();
    pdl_enter();
    if (dynamic) {
        for (int i = 0; i < M; i++) {
            float a = 0.0f;
            for (int j = threadIdx.x; j < k; j += blockDim.x) a = fmaxf(a, fabsf(load_f(x, (long)i * k + j)));
            for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
            if (lane == 0) part[0][warp][i] = a;
        }
        __syncthreads();
        if (threadIdx.x < M) {
            float a = 0.0f;
            for (int v = 0; v < FP8_TC_WARPS; v++) a = fmaxf(a, part[0][v][threadIdx.x]);
            s_tok[threadIdx.x] = a > 0.0f ? a / 448.0f : 1.0f;
        }
    } else if (threadIdx.x < M) {
        s_tok[threadIdx.x] = s_in[0];
    }
    __syncthreads();
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // The activations' codes go to shared memory a chunk at a time, 16 a thread at a time, while
    // the weight loads are in flight: copied where an RMSNorm or gated activation made them
    // (`xc`: one round trip for the block, not one a warp and step), else quantized from x.
    const long xrow = (long)(g < M ? g : 0);
    for (; kc < k; kc += FP8_TC_CHUNK) {
        if (kc > 0) {
            len = min(FP8_TC_CHUNK, k - kc), steps = (len + 127) / 128, s0 = warp;
            load();
        }
        const unsigned char* xl = xs + xrow * FP8_TC_STRIDE + t * 32;
        int groups = len / 16;
        for (int j = threadIdx.x; j < M * groups; j += blockDim.x) {
            int i = j / groups, q = j % groups;
            *(uint4*)(xs + i * FP8_TC_STRIDE + q * 16) =
                xc ? *(const uint4*)(xc + (long)i * k + kc + q * 16) : e4m3_pack16(x + (long)i * k + kc + q * 16, s_tok[i]);
        }
        __syncthreads();
        while (true) {
#pragma unroll
            for (int u = 0; u < FP8_TC_INFLIGHT; u++) {
                int s = s0 + u * FP8_TC_WARPS;
                if (s >= steps) break;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    bool in = g < M && s * 128 + t * 32 + 16 * h < len;
                    uint4 xb = in ? *(const uint4*)(xl + s * 128 + 16 * h) : make_uint4(0, 0, 0, 0);
                    uint4 a = ra[u][h], b = rb[u][h];
                    unsigned int a1[4] = {a.x, b.x, a.y, b.y};
                    mma_e4m3(a1, xb.x, xb.y, acc);
                    unsigned int a2[4] = {a.z, b.z, a.w, b.w};
                    mma_e4m3(a2, xb.z, xb.w, acc);
                }
            }
            s0 += FP8_TC_WARPS * FP8_TC_INFLIGHT;
            if (s0 >= steps) break;
            load();
        }
        __syncthreads();
    }
    auto scale = [&](int i, int row) { return s_tok[i] * s_w[per_row ? row : 0]; };
    if constexpr (GATED)
        tc_gemv_store_gated<T, M, FP8_TC_WARPS>(part, acc, row0, n, bias, y, scale, act, qs);
    else
        tc_gemv_store<T, M, FP8_TC_WARPS>(part, acc, row0, n, bias, y, scale);
}

#define GEMV_FP8_TC(S, T, M)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * FP8_TC_WARPS)                                                   \
        gemv_fp8_tc_m##M##_##S(const T* x, const unsigned char* xc, const unsigned char* w, const float* s_in,        \
                               int dynamic, const float* s_w, int per_row, const T* bias, T* y, int n, int k,         \
                               int prefetch) {                                                                        \
        int warp = threadIdx.x >> 5, per = 16 / FP8_TC_WARPS;                                                         \
        for (int r = blockIdx.x * 16 + per * warp; r < min(n, blockIdx.x * 16 + per * (warp + 1)); r++)               \
            prefetch_l2(w + (long)r * k, prefetch, threadIdx.x & 31);                                                 \
        gemv_fp8_tc<T, M, false>(x, xc, w, s_in, dynamic, s_w, per_row, bias, y, n, k, 0, nullptr);                   \
    }                                                                                                                 \
    /* The gated build: w [2n, k], y [m, n]; prefetches each row pair's heads. */                                     \
    extern "C" __global__ void __launch_bounds__(32 * FP8_TC_WARPS)                                                   \
        gemv_fp8_tc_gated_m##M##_##S(const T* x, const unsigned char* xc, const unsigned char* w,                     \
                                     const float* s_in, int dynamic, const float* s_w, int per_row, const T* bias,    \
                                     T* y, int n, int k, int prefetch, int act, const float* qs) {                    \
        for (int r = blockIdx.x * 8 + (threadIdx.x >> 5); r < min(n, blockIdx.x * 8 + 8); r += FP8_TC_WARPS) {        \
            prefetch_l2(w + (long)r * k, prefetch, threadIdx.x & 31);                                                 \
            prefetch_l2(w + ((long)n + r) * k, prefetch, threadIdx.x & 31);                                           \
        }                                                                                                             \
        gemv_fp8_tc<T, M, true>(x, xc, w, s_in, dynamic, s_w, per_row, bias, y, n, k, act, qs); /* waits */           \
    }
GEMV_FP8_TC(f32, float, 1)
GEMV_FP8_TC(f32, float, 2)
GEMV_FP8_TC(f32, float, 4)
GEMV_FP8_TC(f32, float, 8)
GEMV_FP8_TC(bf16, bf16_t, 1)
GEMV_FP8_TC(bf16, bf16_t, 2)
GEMV_FP8_TC(bf16, bf16_t, 4)
GEMV_FP8_TC(bf16, bf16_t, 8)

// ---------------------------------------------------------------------------------------------
// The NVFP4 decode GEMV on tensor cores (bf16 activations, sm_80+): y[m, n] for m <= 8
// activation rows, E2M1 weights [n, k] two a byte (lower nibble first) with E4M3 block scales
// [n, k / 16] and the global scale s2; k % 64 == 0. As `gemv_fp8_tc`: a block takes 16 weight
// rows, its NVFP4_TC_WARPS warps splitting k in steps of 128 bytes (256 weights), lane (g, t) =
// (lane / 4, lane % 4) reading 32 contiguous bytes of rows g and g + 8 at t·32 of a step (a
// warp's two loads cover whole 128-byte lines of 16 rows) with the four block scales of those
// 64 weights. Each code becomes its bf16 value by byte permutes (`e2m1x8_bf16`, exact), times
// its block scale as bf16 (exact: an E2M1 value times an E4M3 one has at most 5 significant
// bits and stays in range), and the pairs are the A operand of `mma.m16n8k16` bf16 × bf16 →
// f32, the activation rows (read from global memory at the k the lane's weights stand for, so
// permuted alike) the 8 columns, those past m zero. The first steps' weights and scales are
// requested before waiting for the kernels ahead (weights are never written during a step).
// The warps' sums meet in shared memory; y = acc · s2 + bias, rounded once. The CUDA-core
// `gemv_nvfp4` sums each block of 16 first and then scales it: the two differ by f32 rounding.
// 8 warps, one step in flight each (the host launches 32 · NVFP4_TC_WARPS threads: exec/quant.rs's
// constant must agree): on an H100 a layer's four 8B GEMVs 14% faster than 4 warps with two
// (benches/gpu/fp8-gemv/nvfp4.py, session 36); the o and down projections' 256 blocks leave most
// of the SMs' warp slots empty at 4.
#ifndef NVFP4_TC_WARPS
#define NVFP4_TC_WARPS 8
#endif
#ifndef NVFP4_TC_INFLIGHT
#define NVFP4_TC_INFLIGHT 1
#endif

// Eight E2M1 codes (a 32-bit word, code i in bits 4i..4i+3) as four bf16 pairs, codes 2j and
// 2j + 1 in p[j] (lower half first). The magnitude (3 bits) selects the high and the low byte
// of its bf16 value from two 8-byte tables; the sign goes to the high byte's top bit.
__device__ __forceinline__ void e2m1x8_bf16(unsigned int w, unsigned int* p) {
    // |value| of codes 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6 = bf16 0x0000, 3F00, 3F80, 3FC0, 4000,
    // 4040, 4080, 40C0: high bytes 00 3F 3F 3F 40 40 40 40, low bytes 00 00 80 C0 00 40 80 C0.
    const unsigned int h0 = 0x3F3F3F00u, h1 = 0x40404040u, l0 = 0xC0800000u, l1 = 0xC0804000u;
    unsigned int sel_a = w & 0x7777u, sel_b = (w >> 16) & 0x7777u;  // codes 0-3, 4-7
    // Sign bits: code 2i's (bit 8i + 3) is bit 7 of byte i of w << 4, code 2i + 1's bit 7 of
    // byte i of w.
    unsigned int up = w << 4;
    unsigned int ha = __byte_perm(h0, h1, sel_a) | (__byte_perm(up, w, 0x5140) & 0x80808080u);
    unsigned int hb = __byte_perm(h0, h1, sel_b) | (__byte_perm(up, w, 0x7362) & 0x80808080u);
    unsigned int la = __byte_perm(l0, l1, sel_a), lb = __byte_perm(l0, l1, sel_b);
    p[0] = __byte_perm(la, ha, 0x5140);
    p[1] = __byte_perm(la, ha, 0x7362);
    p[2] = __byte_perm(lb, hb, 0x5140);
    p[3] = __byte_perm(lb, hb, 0x7362);
}

// a · b for bf16 pairs whose products are exact (so the rounding does not matter): an FMA with
// -0 (bf16x2 multiply is sm_90+, the FMA sm_80+).
__device__ __forceinline__ unsigned int mul_bf16x2_exact(unsigned int a, unsigned int b) {
    unsigned int d = 0u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
#endif
    return d;
}

// GATED: as `gemv_fp8_tc`'s (w a gated MLP's gate/up [2n, k], y [m, n] = act(gate) · up, 8 gate
// rows and their up rows a block).
template <int M, bool GATED>
__device__ void gemv_nvfp4_tc(const bf16_t* x, const unsigned char* w, const unsigned char* bs, const float* s2,
                              const bf16_t* bias, bf16_t* y, int n, int k, int act) {
    __shared__ float part[NVFP4_TC_WARPS][16][8];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = blockIdx.x * (GATED ? 8 : 16);
    // Rows past n (the last block of an n % 16 != 0 call) read row n - 1 and are not stored.
    long ra = min(row0 + g, n - 1), rb = GATED ? n + min(row0 + g, n - 1) : min(row0 + g + 8, n - 1);
    long len = k / 2, nscales = k / 16;  // a row's bytes of codes and of block scales
    const unsigned char* wa = w + ra * len + t * 32;
    const unsigned char* wb = w + rb * len + t * 32;
    const unsigned char* sa = bs + ra * nscales + t * 4;
    const unsigned char* sb = bs + rb * nscales + t * 4;
    const bf16_t* xr = x + (long)(g < M ? g : 0) * k + t * 64;
    // len % 32 == 0 (k % 64 == 0): a lane's 32 bytes of a step are all in the row or all past it.
    int steps = (int)((len + 127) / 128);
    uint4 ca[NVFP4_TC_INFLIGHT][2], cb[NVFP4_TC_INFLIGHT][2];
    unsigned int qa[NVFP4_TC_INFLIGHT], qb[NVFP4_TC_INFLIGHT];
    int s0 = warp;
    auto load = [&]() {
#pragma unroll
        for (int u = 0; u < NVFP4_TC_INFLIGHT; u++) {
            int s = s0 + u * NVFP4_TC_WARPS;
            bool in = s < steps && (long)s * 128 + t * 32 < len;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                ca[u][h] = in ? *(const uint4*)(wa + (long)s * 128 + 16 * h) : make_uint4(0, 0, 0, 0);
                cb[u][h] = in ? *(const uint4*)(wb + (long)s * 128 + 16 * h) : make_uint4(0, 0, 0, 0);
            }
            qa[u] = in ? *(const unsigned int*)(sa + (long)s * 16) : 0u;
            qb[u] = in ? *(const unsigned int*)(sb + (long)s * 16) : 0u;
        }
    };
    load();
    pdl_enter();
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    while (s0 < steps) {
#pragma unroll
        for (int u = 0; u < NVFP4_TC_INFLIGHT; u++) {
            int s = s0 + u * NVFP4_TC_WARPS;
            if (s >= steps) break;
            bool xin = g < M && (long)s * 128 + t * 32 < len;
            const bf16_t* xp = xr + (long)s * 256;
            // The four block scales of each row as bf16 pairs (E4M3 values are exact in bf16).
            unsigned int va[4], vb[4];
#pragma unroll
            for (int b = 0; b < 4; b++) {
                unsigned int ea = __float_as_uint(e4m3_value((qa[u] >> (8 * b)) & 0xffu)) >> 16;
                unsigned int eb = __float_as_uint(e4m3_value((qb[u] >> (8 * b)) & 0xffu)) >> 16;
                va[b] = ea | (ea << 16);
                vb[b] = eb | (eb << 16);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                // Word j of the lane's 32 bytes: its weights 8j .. 8j + 7, block j / 2.
                uint4 a4 = ca[u][j >> 2], b4 = cb[u][j >> 2];
                unsigned int wa_ = (j & 3) == 0 ? a4.x : (j & 3) == 1 ? a4.y : (j & 3) == 2 ? a4.z : a4.w;
                unsigned int wb_ = (j & 3) == 0 ? b4.x : (j & 3) == 1 ? b4.y : (j & 3) == 2 ? b4.z : b4.w;
                unsigned int pa[4], pb[4];
                e2m1x8_bf16(wa_, pa);
                e2m1x8_bf16(wb_, pb);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    pa[i] = mul_bf16x2_exact(pa[i], va[j >> 1]);
                    pb[i] = mul_bf16x2_exact(pb[i], vb[j >> 1]);
                }
                // The activations at the same k: 8 values, two MMAs' B fragments.
                uint4 xv = xin ? *(const uint4*)(xp + 8 * j) : make_uint4(0, 0, 0, 0);
                unsigned int a0[4] = {pa[0], pb[0], pa[1], pb[1]};
                mma_bf16(acc, a0, xv.x, xv.y);
                unsigned int a1[4] = {pa[2], pb[2], pa[3], pb[3]};
                mma_bf16(acc, a1, xv.z, xv.w);
            }
        }
        s0 += NVFP4_TC_WARPS * NVFP4_TC_INFLIGHT;
        if (s0 >= steps) break;
        load();
    }
    auto scale = [&](int, int) { return s2[0]; };
    if constexpr (GATED)
        tc_gemv_store_gated<bf16_t, M, NVFP4_TC_WARPS>(part, acc, row0, n, bias, y, scale, act, nullptr);
    else
        tc_gemv_store<bf16_t, M, NVFP4_TC_WARPS>(part, acc, row0, n, bias, y, scale);
}

#define GEMV_NVFP4_TC(M)                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * NVFP4_TC_WARPS)                                                 \
        gemv_nvfp4_tc_m##M##_bf16(const bf16_t* x, const unsigned char* w, const unsigned char* bs, const float* s2,  \
                                  const bf16_t* bias, bf16_t* y, int n, int k) {                                      \
        gemv_nvfp4_tc<M, false>(x, w, bs, s2, bias, y, n, k, 0);                                                      \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * NVFP4_TC_WARPS) gemv_nvfp4_tc_gated_m##M##_bf16(                \
        const bf16_t* x, const unsigned char* w, const unsigned char* bs, const float* s2, const bf16_t* bias,        \
        bf16_t* y, int n, int k, int act) {                                                                           \
        gemv_nvfp4_tc<M, true>(x, w, bs, s2, bias, y, n, k, act);                                                     \
    }
GEMV_NVFP4_TC(1)
GEMV_NVFP4_TC(2)
GEMV_NVFP4_TC(4)
GEMV_NVFP4_TC(8)
