// (attention.cuh before this: the cache layout, the FP8 cache's helpers, the MMA helpers.)

// This step's keys and values into their slots; one thread per element.
template <typename T, typename C>
__device__ void write_kv(const T* k, const T* v, C* k_cache, C* v_cache, const long long* token_seq,
                         const long long* token_pos, const long long* page_indptr, const int* page_indices,
                         int page_size, int kv_heads, long tokens, int d, float ks, float vs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)kv_heads * tokens * d) return;
    int e = i % d;
    long t = (i / d) % tokens;
    int h = i / ((long)d * tokens);
    long long pos = token_pos[t];
    long slot = kv_slot(page_indices + page_indptr[token_seq[t]], pos, page_size);
    long dst = (slot * kv_heads + h) * d + e;
    put_kv(k_cache, dst, load_f(k, i), ks);
    put_kv(v_cache, dst, load_f(v, i), vs);
}

// One block of 4 warps per (query token, query head). Each warp takes every 4th position and
// keeps an online softmax (running max m, sum l, and its lanes' share of the output row: D/32
// values per lane); the warps' partial results are merged at the end. Scores and sums in f32;
// the output rounds once to T. `window` > 0: only the last `window` positions (itself
// included); `window` < 0: chunked attention, only the positions of its own chunk of -window
// (from pos / -window · -window; every kernel taking `window` reads it so); `softcap` > 0: each score becomes softcap * tanh(score / softcap).
template <typename T, typename C, int D, bool G>
__device__ void paged_attention(const T* q, const C* k_cache, const C* v_cache, const long long* token_seq,
                                const long long* token_pos, const long long* page_indptr, const int* page_indices,
                                int page_size, int heads, int kv_heads, long tokens, float scale, T* out,
                                long long ohs, long long ots, int window, float softcap, int dd, float ks, float vs) {
    const int d = G ? dd : D;  // the row length: D itself, or (a general build) up to D
    constexpr int PER = (D + 31) / 32;  // elements per lane; lanes past d idle
    constexpr int WARPS = 4;
    long t = blockIdx.x;
    int h = blockIdx.y;
    int kvh = h / (heads / kv_heads);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long s = token_seq[t], pos = token_pos[t];
    const int* pages = page_indices + page_indptr[s];
    float qv[PER], acc[PER];
    const bool live = lane * PER < d;
    for (int i = 0; i < PER; i++) {
        qv[i] = live ? load_f(q, ((long)h * tokens + t) * d + lane * PER + i) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -3.0e38f, l = 0.0f;
    long long first = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    if (window < 0) first = pos / -window * -window;  // chunked attention: its own chunk
    for (long long p = first + warp; p <= pos; p += WARPS) {
        long slot = kv_slot(pages, p, page_size);
        long base = (slot * kv_heads + kvh) * d + lane * PER;
        float dot = 0.0f;
        if (live)
            for (int i = 0; i < PER; i++) dot += qv[i] * load_f(k_cache, base + i);
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float sc = dot * (scale * ks);
        if (softcap > 0.0f) sc = softcap * tanhf(sc / softcap);
        float m2 = fmaxf(m, sc);
        float corr = __expf(m - m2), w = __expf(sc - m2);
        l = l * corr + w;
        if (live)
            for (int i = 0; i < PER; i++) acc[i] = acc[i] * corr + w * load_f(v_cache, base + i);
        m = m2;
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    if (live)
        for (int i = 0; i < PER; i++) sacc[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float M = sm[0];
        for (int w2 = 1; w2 < WARPS; w2++) M = fmaxf(M, sm[w2]);
        float L = 0.0f;
        for (int w2 = 0; w2 < WARPS; w2++) L += sl[w2] * __expf(sm[w2] - M);
        for (int i = 0; i < PER && live; i++) {
            int e = lane * PER + i;
            float o = 0.0f;
            for (int w2 = 0; w2 < WARPS; w2++) o += sacc[w2][e] * __expf(sm[w2] - M);
            store_f(out, (long)h * ohs + (long)t * ots + e, o / L * vs);
        }
    }
}


#define PAGED(T, C, S, D, G, P, K)                                                                                          \
    extern "C" __global__ void paged_attention_##P##D##_##S(                                                         \
        const T* q, const C* k_cache, const C* v_cache, const long long* token_seq, const long long* token_pos,     \
        const long long* page_indptr, const int* page_indices, int page_size, int heads, int kv_heads, long tokens, \
        float scale, T* out, long long ohs, long long ots, int window, float softcap, int d KV_##K##_PARAMS) {      \
        pdl_enter();                                                                                                  \
        paged_attention<T, C, D, G>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size, \
                                    heads, kv_heads, tokens, scale, out, ohs, ots, window, softcap, d, KV_##K##_ARGS); \
    }

#define ATTN_INSTANTIATE(T, C, S, K)                                                                                  \
    extern "C" __global__ void write_kv_##S(const T* k, const T* v, C* k_cache, C* v_cache,                          \
                                           const long long* token_seq, const long long* token_pos,                   \
                                           const long long* page_indptr, const int* page_indices, int page_size,     \
                                           int kv_heads, long tokens, int d KV_##K##_PARAMS) {                       \
        pdl_enter();                                                                                                  \
        write_kv<T, C>(k, v, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size, kv_heads, \
                       tokens, d, KV_##K##_ARGS);                                                                     \
    }                                                                                                                 \
    PAGED(T, C, S, 16, false, d, K) PAGED(T, C, S, 32, false, d, K) PAGED(T, C, S, 64, false, d, K)                   \
    PAGED(T, C, S, 96, false, d, K) PAGED(T, C, S, 128, false, d, K) PAGED(T, C, S, 256, false, d, K)                 \
    PAGED(T, C, S, 32, true, g, K) PAGED(T, C, S, 64, true, g, K) PAGED(T, C, S, 128, true, g, K)                     \
    PAGED(T, C, S, 256, true, g, K)

// The loader compiles this source twice, as modules NVRTC builds in parallel (with decode.cu's):
// the builds over a cache in the model's dtype, and (with KV_FP8_BUILDS defined) those over an
// FP8 cache.
#ifndef KV_FP8_BUILDS
ATTN_INSTANTIATE(float, float, f32, plain)
ATTN_INSTANTIATE(bf16_t, bf16_t, bf16, plain)
#else
ATTN_INSTANTIATE(float, fp8_t, f32_fp8kv, fp8)
ATTN_INSTANTIATE(bf16_t, fp8_t, bf16_fp8kv, fp8)
#endif

// Tensor-core prefill over the paged cache (bf16, FlashAttention-2's scheme with mma.sync
// m16n8k16, sm_80+): one warp per (tile, query head), a tile being up to 16 consecutive query
// tokens of one sequence (`tiles`: i64 pairs of first token and count, planned once per step on
// the host; count 0: nothing to do). The warp walks the sequence's positions 16 at a time up
// to its last token's: K and V of those positions go to shared memory, S = Q·Kᵀ (f32
// accumulate) is scaled and causally masked, an online softmax per row keeps m and l, and
// O += P·V with P split into two bf16 terms (P = hi + lo), so the weights keep ~16 bits as the
// CPU's f32 softmax does rather than bf16's 8. Output rounds once to bf16.
// C: the cache's type (bf16_t, or fp8_t: its tiles converted to bf16 as they are staged; the
// scales as in the other kernels, k_scale with the score scale, v_scale on the output).
// GRP: a block of W = blockDim.x / 32 warps takes W query heads of one GQA group (W divides the
// group) for the same tile: they stage each 16 positions' K and V once for all W heads, the
// block's threads loading them together, and each thread holds its share of the next 16
// positions in registers while the warps compute on the current ones. Without GRP a block is
// one warp (W = 1) and loads as it goes.
template <int D, typename C, bool GRP>
__device__ void paged_prefill_tc(const bf16_t* q, const C* k_cache, const C* v_cache,
                                 const long long* token_seq, const long long* token_pos, const long long* page_indptr,
                                 const int* page_indices, const long long* tiles, int page_size, int heads,
                                 int kv_heads, long tokens, float scale, bf16_t* out, long long ohs, long long ots,
                                 float k_scale, float v_scale) {
    constexpr int KS = D / 16;  // k-steps of S over the head dim
    constexpr int NT = D / 8;   // 8-wide column tiles of O
    constexpr int RS = D + 8;   // shared row stride in bf16 (16-byte multiple, fewer bank conflicts)
    constexpr int CH = D / 8;         // 16-byte (8-value) chunks of a row
    constexpr int STAGE = 16 * CH;    // chunks of 16 positions' K (and as many of V)
    constexpr int PF = GRP ? (STAGE + 63) / 64 : 1;  // a thread's share with W >= 2 warps
    __shared__ __align__(16) bf16_t ks[16 * RS];
    __shared__ __align__(16) bf16_t vs[16 * RS];
    int tile = blockIdx.x;
    int h = GRP ? blockIdx.y * (int)(blockDim.x >> 5) + (int)(threadIdx.x >> 5) : blockIdx.y;
    long t0 = (long)tiles[2 * tile];
    int cnt = (int)tiles[2 * tile + 1];
    if (cnt <= 0) return;  // the whole block: its warps share the tile
    int kvh = h / (heads / kv_heads);
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    long long seq = token_seq[t0], pos0 = token_pos[t0];
    long long last = pos0 + cnt - 1;  // the tile's rows sit at positions pos0 + row
    const int* pages = page_indices + page_indptr[seq];
    // Q as A fragments, rows past the tile zero.
    unsigned qa[KS][4];
    const bf16_t* qh = q + ((long)h * tokens + t0) * D;
    auto q2 = [&](int row, int col) -> unsigned {
        return row < cnt ? *(const unsigned*)(qh + (long)row * D + col) : 0u;
    };
#pragma unroll
    for (int k = 0; k < KS; k++) {
        qa[k][0] = q2(g, k * 16 + 2 * c);
        qa[k][1] = q2(g + 8, k * 16 + 2 * c);
        qa[k][2] = q2(g, k * 16 + 2 * c + 8);
        qa[k][3] = q2(g + 8, k * 16 + 2 * c + 8);
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-3.0e38f, -3.0e38f}, l[2] = {0.0f, 0.0f};  // rows g and g + 8
    // The cache's bytes of chunk i of positions kb .. kb + 15: 16 of bf16, 8 of FP8 codes (zero
    // past `last`: masked below).
    using Raw = typename kv_raw8<C>::type;
    auto fetch = [&](long long kb, int i, Raw& kr, Raw& vr) {
        int r = i / CH, ch = i % CH;
        long long p = kb + r;
        kr = vr = Raw{};
        if (p <= last) {
            long base = (kv_slot(pages, p, page_size) * kv_heads + kvh) * D + ch * 8;
            kr = *(const Raw*)(k_cache + base);
            vr = *(const Raw*)(v_cache + base);
        }
    };
    auto put = [&](int i, const Raw& kr, const Raw& vr) {
        int r = i / CH, ch = i % CH;
        if constexpr (is_fp8<C>::value) {
            *(uint4*)(ks + r * RS + ch * 8) = fp8x8_as_bf16(kr);
            *(uint4*)(vs + r * RS + ch * 8) = fp8x8_as_bf16(vr);
        } else {
            *(uint4*)(ks + r * RS + ch * 8) = kr;
            *(uint4*)(vs + r * RS + ch * 8) = vr;
        }
    };
    Raw kn[PF], vn[PF];  // GRP: this thread's chunks of the next 16 positions
    if constexpr (GRP) {
#pragma unroll
        for (int j = 0; j < PF; j++)
            if (threadIdx.x + j * blockDim.x < STAGE) fetch(0, threadIdx.x + j * blockDim.x, kn[j], vn[j]);
    }
    for (long long kb = 0; kb <= last; kb += 16) {
        // K and V of positions kb .. kb + 15 into shared memory, once the block is done with
        // the last ones.
        __syncthreads();
        if constexpr (GRP) {
#pragma unroll
            for (int j = 0; j < PF; j++)
                if (threadIdx.x + j * blockDim.x < STAGE) put(threadIdx.x + j * blockDim.x, kn[j], vn[j]);
        } else {
            for (int i = lane; i < STAGE; i += 32) {
                fetch(kb, i, kn[0], vn[0]);
                put(i, kn[0], vn[0]);
            }
        }
        __syncthreads();
        if constexpr (GRP) {
            if (kb + 16 <= last) {
#pragma unroll
                for (int j = 0; j < PF; j++)
                    if (threadIdx.x + j * blockDim.x < STAGE)
                        fetch(kb + 16, threadIdx.x + j * blockDim.x, kn[j], vn[j]);
            }
        }
        // S for keys kb + 8j + (0..8), j = 0, 1.
        float sc[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            const bf16_t* kr = ks + (8 * j + g) * RS + 2 * c;
#pragma unroll
            for (int k = 0; k < KS; k++)
                mma_bf16(sc[j], qa[k], *(const unsigned*)(kr + k * 16), *(const unsigned*)(kr + k * 16 + 8));
        }
        // Scale, causal mask, online softmax per row (the row's 16 scores sit in 4 lanes).
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int row = g + 8 * half;
            long long lim = row < cnt ? pos0 + row : -1;
            float mx = -3.0e38f;
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    long long key = kb + 8 * j + 2 * c + e;
                    float v = key <= lim ? sc[j][2 * half + e] * (scale * k_scale) : __int_as_float(0xff800000);  // -inf
                    sc[j][2 * half + e] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m2 = fmaxf(m[half], mx);
            float corr = __expf(m[half] - m2);
            m[half] = m2;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = __expf(sc[j][2 * half + e] - m2);
                    sc[j][2 * half + e] = p;
                    sum += p;
                }
            l[half] = l[half] * corr + sum;  // this lane's share; the row's 4 lanes summed at the end
#pragma unroll
            for (int n = 0; n < NT; n++) {
                o[n][2 * half] *= corr;
                o[n][2 * half + 1] *= corr;
            }
        }
        // P (16 rows × 16 keys) as A fragments: hi = bf16(P), lo = bf16(P - hi).
        unsigned phi[4], plo[4];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            // regs: (row g, keys 2c..) tile 0, (row g+8) tile 0, (row g) tile 1, (row g+8) tile 1
            int j = r >> 1, e = (r & 1) * 2;
            float a = sc[j][e], b = sc[j][e + 1];
            phi[r] = pack_bf16(a, b);
            float ah = bf16_to_f32((bf16_t)(phi[r] & 0xffffu)), bh = bf16_to_f32((bf16_t)(phi[r] >> 16));
            plo[r] = pack_bf16(a - ah, b - bh);
        }
        // O += P · V: B[key][dim] = V rows 2c, 2c+1 and 2c+8, 2c+9 at dim 8n + g.
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const bf16_t* vc = vs + 8 * n + g;
            unsigned b0 = pack_raw(vc[(2 * c) * RS], vc[(2 * c + 1) * RS]);
            unsigned b1 = pack_raw(vc[(2 * c + 8) * RS], vc[(2 * c + 9) * RS]);
            mma_bf16(o[n], phi, b0, b1);
            mma_bf16(o[n], plo, b0, b1);
        }
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float L = l[half];
        L += __shfl_xor_sync(0xffffffffu, L, 1);
        L += __shfl_xor_sync(0xffffffffu, L, 2);
        int row = g + 8 * half;
        if (row >= cnt) continue;
        bf16_t* orow = out + (long)h * ohs + (long)(t0 + row) * ots;
        float inv = v_scale / L;
#pragma unroll
        for (int n = 0; n < NT; n++)
            *(unsigned*)(orow + 8 * n + 2 * c) = pack_bf16(o[n][2 * half] * inv, o[n][2 * half + 1] * inv);
    }
}

// An entry point NAME of paged_prefill_tc<D, C, GRP>.
#define PREFILL_TC_ENTRY(NAME, D, C, K, GRP)                                                                          \
    extern "C" __global__ void NAME(                                                                                  \
        const bf16_t* q, const C* k_cache, const C* v_cache, const long long* token_seq, const long long* token_pos, \
        const long long* page_indptr, const int* page_indices, const long long* tiles, int page_size, int heads,    \
        int kv_heads, long tokens, float scale, bf16_t* out, long long ohs, long long ots KV_##K##_PARAMS) {        \
        pdl_enter();                                                                                                  \
        paged_prefill_tc<D, C, GRP>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, tiles,     \
                                    page_size, heads, kv_heads, tokens, scale, out, ohs, ots, KV_##K##_ARGS);         \
    }
#define PREFILL_TC(D, C, S, K)                                     \
    PREFILL_TC_ENTRY(paged_prefill_tc_d##D##_##S, D, C, K, false) \
    PREFILL_TC_ENTRY(paged_prefill_tc_grp_d##D##_##S, D, C, K, true)
#ifndef KV_FP8_BUILDS
PREFILL_TC(32, bf16_t, bf16, plain)
PREFILL_TC(64, bf16_t, bf16, plain)
PREFILL_TC(96, bf16_t, bf16, plain)
PREFILL_TC(128, bf16_t, bf16, plain)
#else
PREFILL_TC(32, fp8_t, bf16_fp8kv, fp8)
PREFILL_TC(64, fp8_t, bf16_fp8kv, fp8)
PREFILL_TC(96, fp8_t, bf16_fp8kv, fp8)
PREFILL_TC(128, fp8_t, bf16_fp8kv, fp8)
#endif

// RoPE of q and k fused with the KV-cache write (rotate-half; cos/sin one [tokens, d] table):
// q_out [heads, tokens, d] = rope(q); the cache slots of this step's tokens get rope(k) and v.
// Rounds where the unfused rope does. q, k, v are read through strides (elements between heads,
// between tokens; rows contiguous): [heads, tokens, d] is (tokens·d, d), and column slices of
// one fused q/k/v linear's [tokens, n] output need no copy. blockIdx.y a head (q's, then k's);
// a thread four consecutive pairs (j, j + d/2) of one token's row (d a multiple of 8), its
// indices in 32 bits (session 37, H100: one thread a pair with 64-bit divisions took 194 µs
// for an 8B prefill step of 8,192 tokens, 1 TB/s).
// The rotate-half pair (a, b) = (x[j], x[j + d/2]) rotated by its table values (c1, s1 at j,
// c2, s2 at j + d/2): lo, hi as the `rope` kernel rounds them (each product, then their sum,
// to T).
template <typename T>
__device__ __forceinline__ void rope_rotate(const T* like, float a, float b, float c1, float s1, float c2, float s2,
                                            float& lo, float& hi) {
    lo = round_as(like, round_as(like, a * c1) + round_as(like, -b * s1));
    hi = round_as(like, round_as(like, b * c2) + round_as(like, a * s2));
}
// The same for token t's row, the table values read at table row t.
template <typename T>
__device__ __forceinline__ void rope_pair(const T* cos, const T* sin, long t, int d, int j, float a, float b, float& lo,
                                          float& hi) {
    int half = d / 2;
    rope_rotate(cos, a, b, load_f(cos, t * d + j), load_f(sin, t * d + j), load_f(cos, t * d + j + half),
                load_f(sin, t * d + j + half), lo, hi);
}

// VEC: every row start (q, k, v, cos, sin, q_out at their strides) 16-byte aligned, so a
// thread's four consecutive values of a row are one 8-byte (bf16) or 16-byte (f32) load or
// store (the host checks); else element by element. The same roundings either way.
template <typename T, typename C>
__device__ void rope_write_kv(const T* q, const T* k, const T* v, const T* cos, const T* sin, T* q_out, C* k_cache,
                              C* v_cache, const long long* token_seq, const long long* token_pos,
                              const long long* page_indptr, const int* page_indices, int page_size, int heads,
                              int kv_heads, long tokens, int d, long long qhs, long long qts, long long khs,
                              long long kts, long long vhs, long long vts, float ks, float vs, bool vec) {
    int half = d / 2, quads = d / 8;
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)tokens * (unsigned)quads) return;
    long t = i / (unsigned)quads;
    int j0 = 4 * (int)(i % (unsigned)quads);
    int hh = blockIdx.y;
    const T* x = hh < heads ? q + hh * qhs + t * qts : k + (hh - heads) * khs + t * kts;
    float lo[4], hi[4];
    if (vec) {
        float a[4], b[4], c1[4], s1[4], c2[4], s2[4];
        load_row<4>(x + j0, a);
        load_row<4>(x + j0 + half, b);
        load_row<4>(cos + t * d + j0, c1);
        load_row<4>(sin + t * d + j0, s1);
        load_row<4>(cos + t * d + j0 + half, c2);
        load_row<4>(sin + t * d + j0 + half, s2);
#pragma unroll
        for (int u = 0; u < 4; u++) rope_rotate(cos, a[u], b[u], c1[u], s1[u], c2[u], s2[u], lo[u], hi[u]);
    } else {
#pragma unroll
        for (int u = 0; u < 4; u++)
            rope_pair(cos, sin, t, d, j0 + u, load_f(x, j0 + u), load_f(x, j0 + u + half), lo[u], hi[u]);
    }
    if (hh < heads) {
        T* o = q_out + ((long)hh * tokens + t) * d;
        if (vec) {
            store_row4(o + j0, lo);
            store_row4(o + j0 + half, hi);
            return;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            store_f(o, j0 + u, lo[u]);
            store_f(o, j0 + u + half, hi[u]);
        }
        return;
    }
    int kh = hh - heads;
    long long pos = token_pos[t];
    long slot = kv_slot(page_indices + page_indptr[token_seq[t]], pos, page_size);
    long dst = (slot * kv_heads + kh) * d;
    const T* vr = v + kh * vhs + t * vts;
    float va[4], vb[4];
    if (vec) {
        load_row<4>(vr + j0, va);
        load_row<4>(vr + j0 + half, vb);
    } else {
#pragma unroll
        for (int u = 0; u < 4; u++) va[u] = load_f(vr, j0 + u), vb[u] = load_f(vr, j0 + u + half);
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
        put_kv(k_cache, dst + j0 + u, lo[u], ks);
        put_kv(k_cache, dst + j0 + u + half, hi[u], ks);
        put_kv(v_cache, dst + j0 + u, va[u], vs);
        put_kv(v_cache, dst + j0 + u + half, vb[u], vs);
    }
}

// rope_write_kv with each head row of q and k RMS-normalised before its rotation (the q/k norms
// fused into the op, `qk_norm`; qn/kn the weights): one warp a row, q's heads × tokens then
// k's, lanes over the pairs (j, j + d/2), j = lane, lane + 32, ..: the row's sum of squares
// first, then each pair's norm (`rmsnorm`'s arithmetic with the norm's dtype T: round(w ·
// round(x · rsqrt(mean(x²) + eps)))) and rotation as rope_write_kv rounds it. A k row's warp
// also copies its v row to the cache.
template <typename T, typename C>
__device__ void rope_norm_write_kv(const T* q, const T* k, const T* v, const T* cos, const T* sin, T* q_out,
                                   C* k_cache, C* v_cache, const long long* token_seq, const long long* token_pos,
                                   const long long* page_indptr, const int* page_indices, int page_size, int heads,
                                   int kv_heads, long tokens, int d, long long qhs, long long qts, long long khs,
                                   long long kts, long long vhs, long long vts, float ks, float vs, const T* qn,
                                   const T* kn, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= (long)(heads + kv_heads) * tokens) return;  // whole warps
    int hh = row / tokens;
    long t = row % tokens;
    int half = d / 2;
    const T* x = hh < heads ? q + hh * qhs + t * qts : k + (hh - heads) * khs + t * kts;
    const T* w = hh < heads ? qn : kn;
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) {
        float a = load_f(x, j);
        ss += a * a;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = 1.0f / sqrtf(ss / d + eps);
    long dst = 0;
    if (hh >= heads) {
        long long pos = token_pos[t];
        long slot = kv_slot(page_indices + page_indptr[token_seq[t]], pos, page_size);
        dst = (slot * kv_heads + (hh - heads)) * d;
        const T* vr = v + (hh - heads) * vhs + t * vts;
        for (int j = lane; j < d; j += 32) put_kv(v_cache, dst + j, load_f(vr, j), vs);
    }
    for (int j = lane; j < half; j += 32) {
        float a = round_as(x, load_f(w, j) * round_as(x, load_f(x, j) * r));
        float b = round_as(x, load_f(w, j + half) * round_as(x, load_f(x, j + half) * r));
        float lo, hi;
        rope_pair(cos, sin, t, d, j, a, b, lo, hi);
        if (hh < heads) {
            T* o = q_out + ((long)hh * tokens + t) * d;
            store_f(o, j, lo);
            store_f(o, j + half, hi);
        } else {
            put_kv(k_cache, dst + j, lo, ks);
            put_kv(k_cache, dst + j + half, hi, ks);
        }
    }
}

#define ROPE_KV(T, C, S, K)                                                                                           \
    extern "C" __global__ void rope_write_kv_##S(const T* q, const T* k, const T* v, const T* cos, const T* sin,     \
                                                 T* q_out, C* k_cache, C* v_cache, const long long* token_seq,       \
                                                 const long long* token_pos, const long long* page_indptr,           \
                                                 const int* page_indices, int page_size, int heads, int kv_heads,    \
                                                 long tokens, int d, long long qhs, long long qts, long long khs,    \
                                                 long long kts, long long vhs, long long vts KV_##K##_PARAMS,        \
                                                 int vec) {                                                           \
        pdl_enter();                                                                                                  \
        rope_write_kv<T, C>(q, k, v, cos, sin, q_out, k_cache, v_cache, token_seq, token_pos, page_indptr,           \
                            page_indices, page_size, heads, kv_heads, tokens, d, qhs, qts, khs, kts, vhs, vts,       \
                            KV_##K##_ARGS, vec != 0);                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void rope_norm_write_kv_##S(                                                                \
        const T* q, const T* k, const T* v, const T* cos, const T* sin, T* q_out, C* k_cache, C* v_cache,           \
        const long long* token_seq, const long long* token_pos, const long long* page_indptr,                       \
        const int* page_indices, int page_size, int heads, int kv_heads, long tokens, int d, long long qhs,        \
        long long qts, long long khs, long long kts, long long vhs, long long vts KV_##K##_PARAMS, const T* qn,     \
        const T* kn, float eps) {                                                                                     \
        pdl_enter();                                                                                                  \
        rope_norm_write_kv<T, C>(q, k, v, cos, sin, q_out, k_cache, v_cache, token_seq, token_pos, page_indptr,      \
                                 page_indices, page_size, heads, kv_heads, tokens, d, qhs, qts, khs, kts, vhs, vts,  \
                                 KV_##K##_ARGS, qn, kn, eps);                                                         \
    }

#ifndef KV_FP8_BUILDS
ROPE_KV(float, float, f32, plain)
ROPE_KV(bf16_t, bf16_t, bf16, plain)
#else
ROPE_KV(float, fp8_t, f32_fp8kv, fp8)
ROPE_KV(bf16_t, fp8_t, bf16_fp8kv, fp8)
#endif

// AutoDeploy's triton backend's design: each sequence owns one contiguous slot of the cache
// (its pages are consecutive, so position p of sequence s is row slot_base(s) + p), and one
// fused kernel writes this step's k/v and attends. Block (t, h): positions before the
// sequence's cached length come from the cache, the step's own positions straight from k/v
// (so no block reads what another is writing); the first query head of each kv group then
// stores the token's k/v. seq_start[s]: the step's first token of s; cached_len[s]: its
// position. q, out [heads, tokens, D]; k, v [kv_heads, tokens, D]. Over an FP8 cache the step's
// own positions are read as the codes they are stored as (`kv_units`), like the cached ones, and
// k_scale / v_scale apply as in the paged kernels.
template <typename T, typename C, int D, bool G>
__device__ void slot_attention(const T* q, const T* k, const T* v, C* k_cache, C* v_cache, const long long* token_seq,
                               const long long* token_pos, const long long* seq_start, const long long* cached_len,
                               const long long* page_indptr, const int* page_indices, int page_size, int heads,
                               int kv_heads, long tokens, float scale, T* out, int dd, float ks, float vs) {
    const int d = G ? dd : D;  // as paged_attention
    constexpr int PER = (D + 31) / 32;
    constexpr int WARPS = 4;
    long t = blockIdx.x;
    int h = blockIdx.y;
    int group = heads / kv_heads, kvh = h / group;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long s = token_seq[t], pos = token_pos[t];
    long long cached = cached_len[s], start = seq_start[s];
    long base = (long)page_indices[page_indptr[s]] * page_size;  // the slot's first row
    const bool live = lane * PER < d;
    float qv[PER], acc[PER];
    for (int i = 0; i < PER; i++) {
        qv[i] = live ? load_f(q, ((long)h * tokens + t) * d + lane * PER + i) * (scale * ks) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -3.0e38f, l = 0.0f;
    for (long long p = warp; p <= pos; p += WARPS) {
        // A row of K and V in the cache's units: cached, or this step's as they will be stored.
        const bool in_cache = p < cached;
        const long row = in_cache ? ((base + p) * kv_heads + kvh) * d : ((long)kvh * tokens + start + (p - cached)) * d;
        auto kval = [&](int i) { return in_cache ? load_f(k_cache, row + i) : kv_units<C>(load_f(k, row + i), ks); };
        auto vval = [&](int i) { return in_cache ? load_f(v_cache, row + i) : kv_units<C>(load_f(v, row + i), vs); };
        float dot = 0.0f;
        if (live)
            for (int i = 0; i < PER; i++) dot += qv[i] * kval(lane * PER + i);
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float m2 = fmaxf(m, dot);
        float corr = __expf(m - m2), w = __expf(dot - m2);
        l = l * corr + w;
        if (live)
            for (int i = 0; i < PER; i++) acc[i] = acc[i] * corr + w * vval(lane * PER + i);
        m = m2;
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    if (live)
        for (int i = 0; i < PER; i++) sacc[warp][lane * PER + i] = acc[i];
    __syncthreads();
    float M = sm[0];
    for (int w2 = 1; w2 < WARPS; w2++) M = fmaxf(M, sm[w2]);
    float L = 0.0f;
    for (int w2 = 0; w2 < WARPS; w2++) L += sl[w2] * __expf(sm[w2] - M);
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float o = 0.0f;
        for (int w2 = 0; w2 < WARPS; w2++) o += sacc[w2][e] * __expf(sm[w2] - M);
        store_f(out, ((long)h * tokens + t) * d + e, o / L * vs);
    }
    if (h % group == 0) {
        long dst = ((base + pos) * kv_heads + kvh) * d;
        long src = ((long)kvh * tokens + t) * d;
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            put_kv(k_cache, dst + e, load_f(k, src + e), ks);
            put_kv(v_cache, dst + e, load_f(v, src + e), vs);
        }
    }
}

#define SLOT(T, C, S, D, G, P, K)                                                                                     \
    extern "C" __global__ void slot_attention_##P##D##_##S(                                                          \
        const T* q, const T* k, const T* v, C* k_cache, C* v_cache, const long long* token_seq,                     \
        const long long* token_pos, const long long* seq_start, const long long* cached_len,                        \
        const long long* page_indptr, const int* page_indices, int page_size, int heads, int kv_heads, long tokens, \
        float scale, T* out, int d KV_##K##_PARAMS) {                                                                \
        pdl_enter();                                                                                                  \
        slot_attention<T, C, D, G>(q, k, v, k_cache, v_cache, token_seq, token_pos, seq_start, cached_len,           \
                                   page_indptr, page_indices, page_size, heads, kv_heads, tokens, scale, out, d,     \
                                   KV_##K##_ARGS);                                                                    \
    }
#define SLOT_INSTANTIATE(T, C, S, K)                                                                                  \
    SLOT(T, C, S, 16, false, d, K) SLOT(T, C, S, 32, false, d, K) SLOT(T, C, S, 64, false, d, K)                      \
    SLOT(T, C, S, 96, false, d, K) SLOT(T, C, S, 128, false, d, K) SLOT(T, C, S, 256, false, d, K)                    \
    SLOT(T, C, S, 32, true, g, K) SLOT(T, C, S, 64, true, g, K) SLOT(T, C, S, 128, true, g, K)                        \
    SLOT(T, C, S, 256, true, g, K)
#ifndef KV_FP8_BUILDS
SLOT_INSTANTIATE(float, float, f32, plain)
SLOT_INSTANTIATE(bf16_t, bf16_t, bf16, plain)
#else
SLOT_INSTANTIATE(float, fp8_t, f32_fp8kv, fp8)
SLOT_INSTANTIATE(bf16_t, fp8_t, bf16_fp8kv, fp8)
#endif
