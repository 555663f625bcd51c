// `example.topk(x)`, attrs `k=<1..=8>`: the k largest values of each row of x [rows, n] and
// their indices, largest first (ties: the lower index first). One thread per row keeps its k
// best in registers; the host prepends its helpers (bf16_t, bf16_to_f32) and compiles this with
// NVRTC.

template <typename T> __device__ float ld(const T* p, long i);
template <> __device__ float ld<float>(const float* p, long i) { return p[i]; }
template <> __device__ float ld<bf16_t>(const bf16_t* p, long i) { return bf16_to_f32(p[i]); }
__device__ void st(float* p, long i, float v) { p[i] = v; }
__device__ void st(bf16_t* p, long i, float v) { p[i] = f32_to_bf16(v); }

template <typename T>
__device__ void topk(const T* x, T* values, long* indices, long rows, int n, int k) {
    long row = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float best[8];
    long at[8];
    for (int j = 0; j < k; j++) { best[j] = -3.0e38f; at[j] = -1; }
    for (int i = 0; i < n; i++) {
        float v = ld(x, row * n + i);
        if (at[k - 1] >= 0 && !(v > best[k - 1])) continue;
        // Insert v at its place, shifting the smaller ones down.
        int j = k - 1;
        while (j > 0 && (at[j - 1] < 0 || v > best[j - 1])) { best[j] = best[j - 1]; at[j] = at[j - 1]; j--; }
        best[j] = v;
        at[j] = i;
    }
    for (int j = 0; j < k; j++) { st(values, row * k + j, best[j]); indices[row * k + j] = at[j]; }
}

extern "C" __global__ void example_topk_f32(const float* x, float* values, long* indices, long rows, int n, int k) {
    topk(x, values, indices, rows, n, k);
}

extern "C" __global__ void example_topk_bf16(const bf16_t* x, bf16_t* values, long* indices, long rows, int n, int k) {
    topk(x, values, indices, rows, n, k);
}
