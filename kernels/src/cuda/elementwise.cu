// RMSNorm with the residual add fused, SiLU-and-multiply, embedding rows, and RoPE, for f32 and
// bf16 (suffixes _f32, _bf16). Each rounds where torch's unfused ops round.

// One block per row of `n`: if `residual` is set, `x + residual` is formed first (rounded to T),
// written to `residual_out`, and normalised: out = w * round(x * rsqrt(mean(x^2) + eps)).
template <typename T>
__device__ void rmsnorm_residual(const T* x, const T* residual, T* residual_out, const T* w, T* out, int n, float eps) {
    long row = blockIdx.x;
    const T* xr = x + row * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = load_f(xr, i);
        if (residual) {
            v = round_as(xr, v + load_f(residual + row * n, i));
            store_f(residual_out + row * n, i, v);
        }
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = residual ? load_f(residual_out + row * n, i) : load_f(xr, i);
        store_f(out + row * n, i, load_f(w, i) * round_as(xr, v * r));
    }
}

// gate_up rows of [gate (inter) | up (inter)] -> out = round(round(silu(gate)) * up).
template <typename T>
__device__ void silu_mul(const T* gate_up, T* out, long rows, int inter) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * inter) return;
    long r = i / inter, j = i % inter;
    float g = load_f(gate_up, r * 2 * inter + j), u = load_f(gate_up, r * 2 * inter + inter + j);
    float s = round_as(gate_up, g / (1.0f + __expf(-g)));
    store_f(out, i, s * u);
}

// out[t] = weight[ids[t]] (rows of `dim`); an id outside [0, rows) writes zeros and sets *bad.
template <typename T>
__device__ void embedding(const T* weight, const long long* ids, T* out, long tokens, int dim, long rows, int* bad) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * dim) return;
    long t = i / dim, j = i % dim;
    long long id = ids[t];
    if (id < 0 || id >= rows) {
        if (j == 0) atomicExch(bad, 1);
        store_f(out, i, 0.0f);
        return;
    }
    out[i] = weight[id * dim + j];
}

// Rotate-half RoPE in place over x [heads, tokens, d] with cos/sin [tokens, d]:
// x = round(round(x * cos) + round(rot(x) * sin)), rot(x) = [-x2, x1].
template <typename T>
__device__ void rope(T* x, const T* cos, const T* sin, long heads, long tokens, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int h = d / 2;
    if (i >= heads * tokens * h) return;
    long row = i / h;
    int j = i % h;
    long t = row % tokens;
    T* xr = x + row * d;
    float a = load_f(xr, j), b = load_f(xr, j + h);
    float c1 = load_f(cos, t * d + j), s1 = load_f(sin, t * d + j);
    float c2 = load_f(cos, t * d + j + h), s2 = load_f(sin, t * d + j + h);
    float lo = round_as(xr, round_as(xr, a * c1) + round_as(xr, -b * s1));
    float hi = round_as(xr, round_as(xr, b * c2) + round_as(xr, a * s2));
    store_f(xr, j, lo);
    store_f(xr, j + h, hi);
}

#define INSTANTIATE(T, S)                                                                                              \
    extern "C" __global__ void rmsnorm_residual_##S(const T* x, const T* residual, T* residual_out, const T* w, T* out, \
                                                   int n, float eps) {                                                 \
        rmsnorm_residual<T>(x, residual, residual_out, w, out, n, eps);                                                \
    }                                                                                                                  \
    extern "C" __global__ void silu_mul_##S(const T* gate_up, T* out, long rows, int inter) {                          \
        silu_mul<T>(gate_up, out, rows, inter);                                                                        \
    }                                                                                                                  \
    extern "C" __global__ void embedding_##S(const T* weight, const long long* ids, T* out, long tokens, int dim,      \
                                            long rows, int* bad) {                                                     \
        embedding<T>(weight, ids, out, tokens, dim, rows, bad);                                                        \
    }                                                                                                                  \
    extern "C" __global__ void rope_##S(T* x, const T* cos, const T* sin, long heads, long tokens, int d) {            \
        rope<T>(x, cos, sin, heads, tokens, d);                                                                        \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
