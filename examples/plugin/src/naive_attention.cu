// The `naive` attention backend on the GPU: cached attention over the paged KV cache, written
// for reading, not speed. The host prepends its helpers (bf16_t, bf16_to_f32, f32_to_bf16) and
// compiles this with NVRTC for the device. Layouts: q and out [heads, tokens, d], this step's k
// and v [kv_heads, tokens, d], the caches [slot, kv_heads, d] where position p of sequence s is
// slot page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size.

template <typename T> __device__ float ld(const T* p, long i);
template <> __device__ float ld<float>(const float* p, long i) { return p[i]; }
template <> __device__ float ld<bf16_t>(const bf16_t* p, long i) { return bf16_to_f32(p[i]); }
__device__ void st(float* p, long i, float v) { p[i] = v; }
__device__ void st(bf16_t* p, long i, float v) { p[i] = f32_to_bf16(v); }

__device__ long slot_of(const long* page_indptr, const int* page_indices, long s, long p, int page_size) {
    return (long)page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size;
}

// One thread per element of this step's k and v: each token's row goes to its slot.
template <typename T>
__device__ void write_kv(const T* k, const T* v, T* kc, T* vc, const long* token_seq, const long* token_pos,
                         const long* page_indptr, const int* page_indices, int page_size, int kv_heads,
                         long tokens, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)kv_heads * tokens * d) return;
    long e = i % d, t = (i / d) % tokens, h = i / (d * tokens);
    long slot = slot_of(page_indptr, page_indices, token_seq[t], token_pos[t], page_size);
    long dst = (slot * kv_heads + h) * d + e;
    kc[dst] = k[i];
    vc[dst] = v[i];
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_total(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / 32); w++) s += part[w];
        total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// One block per (token, head), one thread per element of the head: position by position, the
// score q·k (a block sum), then an online softmax over the positions 0..=pos, each thread
// keeping its own element of the weighted sum of v.
template <typename T>
__device__ void attend(const T* q, const T* kc, const T* vc, T* out, const long* token_seq, const long* token_pos,
                       const long* page_indptr, const int* page_indices, int page_size, int heads, int kv_heads,
                       long tokens, int d, float scale) {
    long t = blockIdx.x;
    int h = blockIdx.y, e = threadIdx.x;
    int kvh = h / (heads / kv_heads);
    long s = token_seq[t], pos = token_pos[t];
    float qe = e < d ? ld(q, ((long)h * tokens + t) * d + e) : 0.0f;
    float m = -1e30f, l = 0.0f, acc = 0.0f;
    for (long p = 0; p <= pos; p++) {
        long at = (slot_of(page_indptr, page_indices, s, p, page_size) * kv_heads + kvh) * d;
        float score = block_total(e < d ? qe * ld(kc, at + e) : 0.0f) * scale;
        float m2 = fmaxf(m, score);
        float keep = __expf(m - m2), w = __expf(score - m2);
        acc = acc * keep + (e < d ? w * ld(vc, at + e) : 0.0f);
        l = l * keep + w;
        m = m2;
    }
    if (e < d) st(out, ((long)h * tokens + t) * d + e, acc / l);
}

#define NAIVE_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void naive_write_kv_##NAME(const T* k, const T* v, T* kc, T* vc,                  \
                                                     const long* token_seq, const long* token_pos,          \
                                                     const long* page_indptr, const int* page_indices,      \
                                                     int page_size, int kv_heads, long tokens, int d) {     \
        write_kv(k, v, kc, vc, token_seq, token_pos, page_indptr, page_indices, page_size, kv_heads,        \
                 tokens, d);                                                                                \
    }                                                                                                       \
    extern "C" __global__ void naive_attend_##NAME(const T* q, const T* kc, const T* vc, T* out,            \
                                                   const long* token_seq, const long* token_pos,            \
                                                   const long* page_indptr, const int* page_indices,        \
                                                   int page_size, int heads, int kv_heads, long tokens,     \
                                                   int d, float scale) {                                    \
        attend(q, kc, vc, out, token_seq, token_pos, page_indptr, page_indices, page_size, heads, kv_heads, \
               tokens, d, scale);                                                                           \
    }

NAIVE_KERNELS(float, f32)
NAIVE_KERNELS(bf16_t, bf16)
