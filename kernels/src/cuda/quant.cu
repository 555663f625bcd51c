// The quantized linears of ModelOpt checkpoints (core's ops/quant_linear.rs states the math):
// FP8 E4M3 weights with per-tensor or per-row scales and E4M3 activations at a static input
// scale; NVFP4 weights (E2M1 two a byte, E4M3 block scales per 16, a global scale), weight-only.
// Every product is formed from the codes' values, which are exact in f32 and bf16 (E4M3: 4
// significant bits; E2M1 times an E4M3 block scale: 6), summed in f32, and scaled once at the
// end: y = acc · s_in · s_w + bias, rounded once to the output dtype. T is float or bf16_t.

// The value of an E4M3 code (not NaN: weights and saturated activations have none).
__device__ __forceinline__ float e4m3_value(unsigned int c) {
    // As f32 bits: the sign to bit 31, exponent and mantissa under f32's (bias 127 vs 7);
    // subnormal codes become f32 subnormals (NVRTC keeps them: no -ftz), then times 2^120.
    unsigned int bits = ((c & 0x80u) << 24) | ((c & 0x7fu) << 20);
    return __uint_as_float(bits) * 1.329227995784916e36f;  // 2^120
}

// Four E4M3 codes of a 32-bit word (lowest byte first) as f32.
__device__ __forceinline__ void e4m3x4(unsigned int w, float* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned int lo, hi;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
    unsigned short h[4] = {(unsigned short)(lo & 0xffffu), (unsigned short)(lo >> 16), (unsigned short)(hi & 0xffffu),
                           (unsigned short)(hi >> 16)};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h[j]));
        out[j] = f;
    }
#else
#pragma unroll
    for (int j = 0; j < 4; j++) out[j] = e4m3_value((w >> (8 * j)) & 0xffu);
#endif
}

// The nearest E4M3 code's value (ties to even, saturating at ±448), as torch's
// `clamp(-448, 448).to(float8_e4m3fn)` and the CPU's `f32_to_e4m3`.
__device__ __forceinline__ float e4m3_round(float v) {
    float a = fminf(fabsf(v), 448.0f);
    float r;
    if (a < 0.015625f) {
        r = rintf(a * 512.0f) * 0.001953125f;  // subnormal steps of 2^-9
    } else {
        int e;
        frexpf(a, &e);  // a = f · 2^e, f in [0.5, 1)
        float step = ldexpf(1.0f, e - 4);
        r = rintf(a / step) * step;
    }
    return copysignf(r, v);
}

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

// y[m, n] = acc · s_a · s_w (+ bias): s_a one value or none (nullptr), s_w one value or one a
// row (`per_row`), bias [n] or none.
template <typename T>
__device__ void lowbit_epilogue(const float* acc, const float* s_a, const float* s_w, int per_row, const T* bias, T* y,
                                long m, int n) {
    float sa = s_a ? s_a[0] : 1.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m * n; i += (long)gridDim.x * blockDim.x) {
        int j = (int)(i % n);
        float v = acc[i] * (sa * s_w[per_row ? j : 0]);
        if (bias) v += load_f(bias, j);
        store_f(y, i, v);
    }
}

#define LOWBIT_ELEMENTWISE(S, T)                                                                                      \
    extern "C" __global__ void e4m3_codes_##S(const T* x, const float* s_in, T* out, long n) {                        \
        pdl_enter();                                                                                                  \
        e4m3_codes<T>(x, s_in, out, n);                                                                               \
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
    extern "C" __global__ void lowbit_epilogue_##S(const float* acc, const float* s_a, const float* s_w, int per_row,  \
                                                   const T* bias, T* y, long m, int n) {                              \
        pdl_enter();                                                                                                  \
        lowbit_epilogue<T>(acc, s_a, s_w, per_row, bias, y, m, n);                                                    \
    }
LOWBIT_ELEMENTWISE(f32, float)
LOWBIT_ELEMENTWISE(bf16, bf16_t)

// The FP8 decode GEMV (m <= 8 activation rows): y[m, n] = xq[m, k] · w[n, k]ᵀ · s_in · s_w
// (+ bias), one warp a weight row reading 16 codes a lane at a time (k % 16 == 0, 16-byte
// aligned rows), the activations' codes (from `e4m3_codes`) small enough to stay in cache.
template <typename T, int M>
__device__ void gemv_fp8(const T* xq, const unsigned char* w, const float* s_in, const float* s_w, int per_row,
                         const T* bias, T* y, int n, int k) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const uint4* wr = (const uint4*)(w + (long)row * k);
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    int chunks = k / 16;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        uint4 wv = wr[c];
        float wf[16];
        e4m3x4(wv.x, wf);
        e4m3x4(wv.y, wf + 4);
        e4m3x4(wv.z, wf + 8);
        e4m3x4(wv.w, wf + 12);
#pragma unroll
        for (int i = 0; i < M; i++) {
            const T* xr = xq + (long)i * k + c * 16;
#pragma unroll
            for (int j = 0; j < 16; j++) acc[i] += wf[j] * load_f(xr, j);
        }
    }
    float scale = s_in[0] * s_w[per_row ? row : 0];
    float b = bias ? load_f(bias, row) : 0.0f;
#pragma unroll
    for (int i = 0; i < M; i++) {
        float v = acc[i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) store_f(y, (long)i * n + row, v * scale + b);
    }
}

#define GEMV_FP8(S, T, M)                                                                                             \
    extern "C" __global__ void gemv_fp8_m##M##_##S(const T* xq, const unsigned char* w, const float* s_in,            \
                                                   const float* s_w, int per_row, const T* bias, T* y, int n, int k,  \
                                                   int prefetch) {                                                    \
        int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                                                       \
        if (row < n) prefetch_l2(w + (long)row * k, prefetch, threadIdx.x & 31);                                      \
        pdl_enter();                                                                                                  \
        gemv_fp8<T, M>(xq, w, s_in, s_w, per_row, bias, y, n, k);                                                     \
    }
GEMV_FP8(f32, float, 1)
GEMV_FP8(f32, float, 2)
GEMV_FP8(f32, float, 4)
GEMV_FP8(f32, float, 8)
GEMV_FP8(bf16, bf16_t, 1)
GEMV_FP8(bf16, bf16_t, 2)
GEMV_FP8(bf16, bf16_t, 4)
GEMV_FP8(bf16, bf16_t, 8)
