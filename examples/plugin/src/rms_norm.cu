// `example.rms_norm(x, w)` on the GPU: one block per row of x [rows, n], out = x / sqrt(mean(x²) +
// eps) · w, in f32 whatever the storage dtype. The host compiles this source with NVRTC for the
// device's architecture and prepends its shared helpers (bf16_t, bf16_to_f32, f32_to_bf16,
// block_sum), so nothing here needs a CUDA header. Launched with a block of a multiple of 32
// threads (at most 1024), one block per row.

template <typename T> __device__ float ld(const T* p, long i);
template <> __device__ float ld<float>(const float* p, long i) { return p[i]; }
template <> __device__ float ld<bf16_t>(const bf16_t* p, long i) { return bf16_to_f32(p[i]); }
__device__ void st(float* p, long i, float v) { p[i] = v; }
__device__ void st(bf16_t* p, long i, float v) { p[i] = f32_to_bf16(v); }

template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* out, int n, float eps) {
    long row = blockIdx.x;
    const T* xr = x + row * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float a = ld(xr, i);
        ss += a * a;
    }
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) st(out, row * n + i, ld(w, i) * (ld(xr, i) * r));
}

extern "C" __global__ void example_rms_norm_f32(const float* x, const float* w, float* out, int n, float eps) {
    rms_norm(x, w, out, n, eps);
}

extern "C" __global__ void example_rms_norm_bf16(const bf16_t* x, const bf16_t* w, bf16_t* out, int n, float eps) {
    rms_norm(x, w, out, n, eps);
}
