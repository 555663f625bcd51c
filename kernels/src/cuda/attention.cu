// Attention over a paged KV cache, the page table in CSR form (FlashInfer's layout):
// sequence s owns pages page_indices[page_indptr[s] .. page_indptr[s+1]]; position p of s lives
// in slot page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size of the caches
// [slot, kv_heads, D]. q and out are [heads, tokens, D]; this step's k/v [kv_heads, tokens, D].
// Each query token t of sequence token_seq[t] at position token_pos[t] attends causally to its
// positions 0..=token_pos[t] (ragged batches: prefill and decode tokens mixed in one step).

// This step's keys and values into their slots; one thread per element.
template <typename T>
__device__ void write_kv(const T* k, const T* v, T* k_cache, T* v_cache, const long long* token_seq,
                         const long long* token_pos, const long long* page_indptr, const int* page_indices,
                         int page_size, int kv_heads, long tokens, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)kv_heads * tokens * d) return;
    int e = i % d;
    long t = (i / d) % tokens;
    int h = i / ((long)d * tokens);
    long long pos = token_pos[t];
    long slot = (long)page_indices[page_indptr[token_seq[t]] + pos / page_size] * page_size + pos % page_size;
    long dst = (slot * kv_heads + h) * d + e;
    k_cache[dst] = k[i];
    v_cache[dst] = v[i];
}

// One block of 4 warps per (query token, query head). Each warp takes every 4th position and
// keeps an online softmax (running max m, sum l, and its lanes' share of the output row: D/32
// values per lane); the warps' partial results are merged at the end. Scores and sums in f32;
// the output rounds once to T.
template <typename T, int D>
__device__ void paged_attention(const T* q, const T* k_cache, const T* v_cache, const long long* token_seq,
                                const long long* token_pos, const long long* page_indptr, const int* page_indices,
                                int page_size, int heads, int kv_heads, long tokens, float scale, T* out) {
    constexpr int PER = D / 32;
    constexpr int WARPS = 4;
    long t = blockIdx.x;
    int h = blockIdx.y;
    int kvh = h / (heads / kv_heads);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long s = token_seq[t], pos = token_pos[t];
    const int* pages = page_indices + page_indptr[s];
    float qv[PER], acc[PER];
    for (int i = 0; i < PER; i++) {
        qv[i] = load_f(q, ((long)h * tokens + t) * D + lane * PER + i);
        acc[i] = 0.0f;
    }
    float m = -3.0e38f, l = 0.0f;
    for (long long p = warp; p <= pos; p += WARPS) {
        long slot = (long)pages[p / page_size] * page_size + p % page_size;
        long base = (slot * kv_heads + kvh) * D + lane * PER;
        float dot = 0.0f;
        for (int i = 0; i < PER; i++) dot += qv[i] * load_f(k_cache, base + i);
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float sc = dot * scale;
        float m2 = fmaxf(m, sc);
        float corr = __expf(m - m2), w = __expf(sc - m2);
        l = l * corr + w;
        for (int i = 0; i < PER; i++) acc[i] = acc[i] * corr + w * load_f(v_cache, base + i);
        m = m2;
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    for (int i = 0; i < PER; i++) sacc[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float M = sm[0];
        for (int w2 = 1; w2 < WARPS; w2++) M = fmaxf(M, sm[w2]);
        float L = 0.0f;
        for (int w2 = 0; w2 < WARPS; w2++) L += sl[w2] * __expf(sm[w2] - M);
        for (int i = 0; i < PER; i++) {
            int e = lane * PER + i;
            float o = 0.0f;
            for (int w2 = 0; w2 < WARPS; w2++) o += sacc[w2][e] * __expf(sm[w2] - M);
            store_f(out, ((long)h * tokens + t) * D + e, o / L);
        }
    }
}

#define ATTN_INSTANTIATE(T, S)                                                                                        \
    extern "C" __global__ void write_kv_##S(const T* k, const T* v, T* k_cache, T* v_cache,                          \
                                           const long long* token_seq, const long long* token_pos,                   \
                                           const long long* page_indptr, const int* page_indices, int page_size,     \
                                           int kv_heads, long tokens, int d) {                                       \
        write_kv<T>(k, v, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size, kv_heads,    \
                    tokens, d);                                                                                       \
    }                                                                                                                 \
    extern "C" __global__ void paged_attention_d64_##S(                                                              \
        const T* q, const T* k_cache, const T* v_cache, const long long* token_seq, const long long* token_pos,     \
        const long long* page_indptr, const int* page_indices, int page_size, int heads, int kv_heads, long tokens, \
        float scale, T* out) {                                                                                        \
        paged_attention<T, 64>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size,      \
                               heads, kv_heads, tokens, scale, out);                                                  \
    }                                                                                                                 \
    extern "C" __global__ void paged_attention_d128_##S(                                                             \
        const T* q, const T* k_cache, const T* v_cache, const long long* token_seq, const long long* token_pos,     \
        const long long* page_indptr, const int* page_indices, int page_size, int heads, int kv_heads, long tokens, \
        float scale, T* out) {                                                                                        \
        paged_attention<T, 128>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size,     \
                                heads, kv_heads, tokens, scale, out);                                                 \
    }

ATTN_INSTANTIATE(float, f32)
ATTN_INSTANTIATE(bf16_t, bf16)
