// The split-KV decode builds over the paged cache (attention.cuh before this: the layout, the
// FP8 cache's helpers, the MMA helpers). Compiled as its own modules, beside attention.cu's,
// so NVRTC builds them in parallel.

// The merge weights of lane L's chunks L and L + 32 (of `splits`, at most 64; rows of d values,
// then m and l): w[j] = exp(m - M), M the largest m of all chunks, 0 past `splits`. Returns the
// sum of l · w over all chunks, on every lane. Called by a whole warp (reads bypass L1: other
// blocks wrote the partials).
__device__ __forceinline__ float chunk_weights(const float* p, int splits, int d, int lane, float* w) {
    float m[2] = {-3.0e38f, -3.0e38f}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 2; j++) {
        w[j] = 0.0f;
        if (lane + 32 * j < splits) {
            m[j] = __ldcg(&p[(lane + 32 * j) * (d + 2) + d]);
            l[j] = __ldcg(&p[(lane + 32 * j) * (d + 2) + d + 1]);
        }
    }
    float M = fmaxf(m[0], m[1]);
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float L = 0.0f;
#pragma unroll
    for (int j = 0; j < 2; j++)
        if (lane + 32 * j < splits) {
            w[j] = __expf(m[j] - M);
            L += l[j] * w[j];
        }
    for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    return L;
}

// Combines `splits` (at most 64) partial softmax states (rows of d values, then m and l) into
// one output row; called by one block of at least 32 threads (reads bypass L1: other blocks
// wrote the partials). One round trip to L2 for the common case: each thread requests its first
// output element of the first HELD chunks while the first warp requests every chunk's m and l
// (HELD = 0: two round trips, and 16 registers fewer).
template <typename T, int HELD>
__device__ void merge_partials(const float* p, int splits, int d, T* out_row) {
    __shared__ float w[64];
    __shared__ float inv_l;
    float held[HELD > 0 ? HELD : 1];
    if (threadIdx.x < d)
#pragma unroll
        for (int s = 0; s < HELD; s++)
            if (s < splits) held[s] = __ldcg(&p[s * (d + 2) + threadIdx.x]);
    if (threadIdx.x < 32) {
        int lane = threadIdx.x;
        float wl[2];
        float L = chunk_weights(p, splits, d, lane, wl);
#pragma unroll
        for (int j = 0; j < 2; j++)
            if (lane + 32 * j < splits) w[lane + 32 * j] = wl[j];
        if (lane == 0) inv_l = 1.0f / L;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float o = 0.0f;
        // The same sum in the same order either way (chunk 0 first).
        if (e == (int)threadIdx.x) {
#pragma unroll
            for (int s = 0; s < HELD; s++)
                if (s < splits) o += held[s] * w[s];
        } else {
#pragma unroll
            for (int s = 0; s < HELD; s++)
                if (s < splits) o += __ldcg(&p[s * (d + 2) + e]) * w[s];
        }
        for (int s = HELD; s < splits; s++) o += __ldcg(&p[s * (d + 2) + e]) * w[s];
        store_f(out_row, e, o * inv_l);
    }
}

// `merge_partials` by one warp (lane L combining elements L·PER ..): the chunks' weights stay
// in the lanes that read their m and l and reach the others by shuffle, so warps of one block
// can merge different heads at once. The same sums in the same order (chunk 0 first).
template <typename T, int PER>
__device__ void merge_partials_warp(const float* p, int splits, int d, T* out_row, int lane) {
    float w[2];
    float L = chunk_weights(p, splits, d, lane, w);
    const bool live = lane * PER < d;
    float o[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) o[i] = 0.0f;
    for (int s = 0; s < splits; s++) {
        float ws = __shfl_sync(0xffffffffu, s < 32 ? w[0] : w[1], s & 31);
        if (live)
#pragma unroll
            for (int i = 0; i < PER; i++) o[i] += __ldcg(&p[s * (d + 2) + lane * PER + i]) * ws;
    }
    float inv_l = 1.0f / L;
    if (live)
#pragma unroll
        for (int i = 0; i < PER; i++) store_f(out_row, lane * PER + i, o[i] * inv_l);
}

// RoPE (rotate-half) of one head row of d values held across a warp, PER values a lane (lane L
// holds elements L·PER ..): the partner of element j is j ± d/2. When d/2 is a multiple of PER
// (every head dim with a kernel of its own) element i's partner is element i of lane L ± d/2/PER;
// otherwise (a head dim run by a wider kernel, e.g. 136 by the 256 one, where a lane may hold
// elements of both halves) it is element (i ± r) mod PER of that lane or the next one past it,
// r = d/2 mod PER. `c`/`s` point at the lane's
// elements of the token's cos/sin row. Rounds as the `rope` kernel does: each product, then
// their sum, to T. Every lane of the warp must call it (shuffles).
template <typename T, int PER>
__device__ __forceinline__ void rope_lanes(float* x, const T* c, const T* s, bool live, int lane, int d) {
    const int half = d / 2, q = half / PER, r = half % PER;
    float y[PER];
    if (r == 0) {
        int src = (lane * PER < half ? lane + q : lane - q) & 31;
#pragma unroll
        for (int i = 0; i < PER; i++) y[i] = __shfl_sync(0xffffffffu, x[i], src);
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            // Lower lanes need element (i + r) mod PER (of the lane after, past a wrap); upper
            // lanes element (i - r) mod PER (of the lane before, past a wrap).
            int up_i = (i + r) % PER, down_i = (i + PER - r) % PER;
            float send_up = x[0], send_down = x[0];
#pragma unroll
            for (int k = 1; k < PER; k++) {
                send_up = k == up_i ? x[k] : send_up;
                send_down = k == down_i ? x[k] : send_down;
            }
            float a = __shfl_sync(0xffffffffu, send_up, (lane + q + (i + r >= PER)) & 31);
            float b = __shfl_sync(0xffffffffu, send_down, (lane - q - (i < r)) & 31);
            y[i] = lane * PER + i < half ? a : b;
        }
    }
#pragma unroll
    for (int i = 0; i < PER; i++) {
        if (live) {
            float cv = load_f(c, i), sv = load_f(s, i);
            float a = round_as(c, x[i] * cv), b = round_as(c, (lane * PER + i < half ? -y[i] : y[i]) * sv);
            x[i] = round_as(c, a + b);
        }
    }
}

// RMSNorm of one head row of d values held across a warp, PER values a lane (lane L holds
// elements L·PER ..), as the `rmsnorm` kernel computes it with the norm's dtype the row's:
// x = round(w · round(x · rsqrt(mean(x²) + eps))), both roundings to T (Qwen3's and Gemma 3's
// q/k norms fused into the attention: `qk_norm`). `w` points at the lane's elements of the
// weight row. Every lane of the warp must call it (shuffles).
template <typename T, int PER>
__device__ __forceinline__ void norm_lanes(float* x, const T* w, bool live, int d, float eps) {
    float ss = 0.0f;
    if (live)
#pragma unroll
        for (int i = 0; i < PER; i++) ss += x[i] * x[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = 1.0f / sqrtf(ss / d + eps);
    if (live)
#pragma unroll
        for (int i = 0; i < PER; i++) x[i] = round_as(w, load_f(w, i) * round_as(w, x[i] * r));
}

// Split-KV decode (FlashInfer's decode design): a query token's positions are cut into
// `splits` chunks of `chunk` (lengthened for this token where they do not cover it:
// `token_chunk`); block (t, h, s) attends over chunk s only and writes its partial softmax state
// (max m, sum l, unnormalised output row) to `partial`; the last block of (t, h) to finish (an
// atomic counter per (t, h) in `counters`, zero between steps) combines the chunks into out (a
// token whose positions fit one chunk writes out directly). More blocks than (tokens × heads)
// keep the GPU busy when a decode batch is small, and each warp keeps four positions in flight.
// The grid is fixed by `splits` (chunks past a sequence's length exit at once), so a captured
// CUDA graph replays as the sequence grows.
// partial layout: [tokens, heads, splits, D + 2] floats. The output row of (t, h) is at
// out + h·ohs + t·ots: [heads, tokens, D] is (tokens·D, D), [tokens, heads, D] (what the o
// projection reads, so no transposing copy) is (D, heads·D).
//
// Two builds. The throughput one (EARLY false: 4 positions per warp and pass, everything after
// the wait, few registers so many blocks fit) reads every position from the cache: the step's
// k/v were written (and rotated) by `write_kv`/`rope_write_kv` before it; k_new, v_new, cos and
// sin are unused. The latency one, for a few decode tokens (EARLY: 8 positions per warp and pass
// at head dims up to 128, the first pass's cached K/V requested before the wait, about twice the
// registers: at batch 64 on an H200 it made the 8B step 9.2 -> 12.1 ms), saves that launch: the
// step's keys and values come straight from the linears' output (k_new/v_new, [kv_heads,
// tokens, D]) and, when `cos` is given, q and k get their RoPE here (cos/sin one [tokens, D]
// table, rounded as the `rope` kernel rounds). Positions below a sequence's cached length come
// from the cache, the step's own positions (its tokens are consecutive, the first at
// seq_start) from k_new/v_new, so no block reads a slot this kernel writes; block (t, first q
// head of a kv group, last chunk of t) stores token t's k and v in the cache for the steps
// after, from the registers its attention read them into.
template <typename T, typename C, int D, bool G, bool EARLY, int UE>
__device__ void paged_decode_split(const T* q, const T* k_new, const T* v_new, const T* cos, const T* sin,
                                   C* k_cache, C* v_cache, const long long* token_seq, const long long* token_pos,
                                   const long long* page_indptr, const int* page_indices, const long long* seq_start,
                                   const long long* cached_len, int page_size, int heads, int kv_heads, long tokens,
                                   float scale, int chunk, int splits, float* partial, int* counters, T* out_all,
                                   long long ohs, long long ots, int window, float softcap, int dd, float ks,
                                   float vs, const T* qn, const T* kn, float neps) {
    const int d = G ? dd : D;  // as paged_attention
    constexpr int PER = (D + 31) / 32;
    constexpr int WARPS = 4;
    constexpr int U = EARLY && D <= 128 ? UE : 4;
    if constexpr (!EARLY) pdl_enter();
    long t = blockIdx.x;
    int h = blockIdx.y, s = blockIdx.z;
    int group = heads / kv_heads;
    int kvh = h / group;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long seq = token_seq[t], pos = token_pos[t];
    chunk = token_chunk(chunk, splits, pos);
    long long lo = (long long)s * chunk, hi = lo + chunk - 1;
    if (hi > pos) hi = pos;
    // A sliding window: positions before pos + 1 - window are skipped (a chunk wholly before it
    // leaves an empty partial state, which the merge weighs by zero).
    if (window > 0 && lo < pos + 1 - window) lo = pos + 1 - window;
    // Chunked attention (window < 0: chunks of -window positions): its own chunk only.
    if (window < 0 && lo < pos / -window * -window) lo = pos / -window * -window;
    // Chunks past this token's position have nothing to do; the active ones are 0..active.
    int active = (int)(pos / chunk) + 1;
    // Stores token t's k and v in the cache: the block of its last chunk (which holds them in
    // registers) and the first q head of the kv group.
    bool writer = s == active - 1 && h % group == 0;
    // (Such a block exits without waiting on the kernels ahead: it touches no memory, and its
    // exit frees its SM for the GEMV ahead's blocks still to start.)
    if (s >= active) return;
    float* out = partial + (((long)t * heads + h) * splits + s) * (d + 2);
    const int* pages = page_indices + page_indptr[seq];
    const long long cached = cached_len[seq], first_tok = seq_start[seq];
    const long long ready = cached - 1;  // the last position written before this step
    const bool live = lane * PER < d;
    // K and V of all U positions are requested together (one memory latency per iteration,
    // not two), PER values per lane in one vector load where they fit.
    float kf[U][PER], vf[U][PER];
    // (In raw units: `RawUnits`; q, the dot products, the softmax weights and the output are
    // scaled to match.)
    using Raw = RawUnits<C>;
    auto load_slot = [&](int u, long slot) {
        long base = (slot * kv_heads + kvh) * d + lane * PER;
        if (live) {
            load_row_raw<PER>(k_cache + base, kf[u]);
            load_row_raw<PER>(v_cache + base, vf[u]);
        }
    };
    // Cached positions p0 .. p0 + U - 1 (none past `last`): one page lookup (a division, a
    // dependent load) a pass where they share a page, as they do unless the pass crosses one,
    // else one a position.
    auto load_cached = [&](long long p0, long long last) {
        if (p0 > last) return;  // (nor is p0's page the sequence's to read)
        int pi = (int)p0, pg = pi / page_size, off = pi - pg * page_size;
        const bool one_page = off + U <= page_size;
        const long first_slot = (long)pages[pg] * page_size + off;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (p0 + u <= last) load_slot(u, one_page ? first_slot + u : kv_slot(pages, p0 + u, page_size));
    };
    // This step's position p: its token's index in the step (tp) and the lane's offset into that
    // token's k_new/v_new rows (base).
    auto step_row = [&](long long p, long& tp, long& base) {
        tp = first_tok + (p - cached);
        base = ((long)kvh * tokens + tp) * d + lane * PER;
    };
    // Position p of this step: its token's row of k_new/v_new, k rotated.
    auto load_new = [&](float* kr, float* vr, long long p) {
        long tp, base;
        step_row(p, tp, base);
        if (live) {
            load_row<PER>(k_new + base, kr);
            load_row<PER>(v_new + base, vr);
        }
        if (kn) norm_lanes<T, PER>(kr, kn + lane * PER, live, d, neps);
        if (cos) rope_lanes<T, PER>(kr, cos + tp * d + lane * PER, sin + tp * d + lane * PER, live, lane, d);
        // As the cache will hold them (the cached positions' units).
        if constexpr (is_fp8<C>::value) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                kr[i] = kv_units<C>(kr[i], ks);
                vr[i] = kv_units<C>(vr[i], vs);
            }
        }
    };
    // The chunk's positions the cache holds (all of them for the throughput build; for the
    // latency build those written before this step), WARPS · U a pass; this step's own
    // positions (the latency build's, at most a few, the chunk's last) after them, one at a time.
    const long long cached_hi = EARLY && ready < hi ? ready : hi;
    long long first = lo + warp * U;
    const long long step_lo = cached_hi + 1 > lo ? cached_hi + 1 : lo;
    if constexpr (EARLY) {
        // Cached positions were written by earlier steps: the first pass's are requested before
        // waiting for the kernels ahead (the step metadata is uploaded before the step, too).
        load_cached(first, cached_hi);
        pdl_enter();
        // This step's positions follow the cached ones (before them, their registers beside the
        // first pass's made the build spill): the first one a warp takes has its k/v rows and
        // RoPE tables asked into L1 as soon as the kernels ahead have written them, so the tail
        // does not wait on L2 after the loop.
        if (step_lo + warp <= hi && live) {
            long tp, base;
            step_row(step_lo + warp, tp, base);
            prefetch_l1(k_new + base);
            prefetch_l1(v_new + base);
            if (cos) {
                prefetch_l1(cos + tp * d + lane * PER);
                prefetch_l1(sin + tp * d + lane * PER);
            }
        }
    }
    float qv[PER], acc[PER];
    const long qrow = ((long)h * tokens + t) * d + lane * PER;
    if (live) load_row<PER>(q + qrow, qv);
    if (EARLY && qn) norm_lanes<T, PER>(qv, qn + lane * PER, live, d, neps);
    if (EARLY && cos) rope_lanes<T, PER>(qv, cos + t * d + lane * PER, sin + t * d + lane * PER, live, lane, d);
    for (int i = 0; i < PER; i++) {
        qv[i] = live ? qv[i] * (scale * ks) * Raw::pre : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -3.0e38f, l = 0.0f;
    // One position's score (reduced over the warp, in raw units) into the running softmax
    // state; vr in raw units.
    auto attend = [&](float dot, const float* vr) {
        dot *= Raw::post;
        if (softcap > 0.0f) dot = softcap * tanhf(dot / softcap);
        float m2 = fmaxf(m, dot);
        float corr = __expf(m - m2), w = __expf(dot - m2), wr = w * Raw::pre;
        l = l * corr + w;
        if (live)
#pragma unroll
            for (int i = 0; i < PER; i++) acc[i] = acc[i] * corr + wr * vr[i];
        m = m2;
    };
    for (long long p0 = first; p0 <= cached_hi; p0 += WARPS * U) {
        float dot[U];
        if (!EARLY || p0 != first) load_cached(p0, cached_hi);
#pragma unroll
        for (int u = 0; u < U; u++) {
            float d = 0.0f;
            if (live)
#pragma unroll
                for (int i = 0; i < PER; i++) d += qv[i] * kf[u][i];
            dot[u] = d;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < U; u++) dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], o);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (p0 + u > cached_hi) break;
            attend(dot[u], vf[u]);
        }
    }
    if constexpr (EARLY) {
        // This step's positions in the chunk, a warp each in turn (one copy of `load_new` in
        // the code: unrolled a pass, the FP8 cache's division and rounding filled the
        // instruction cache). Block (t, first q head of the group, last chunk) stores token t's
        // k (rotated) and v in its cache slot for the steps after, from the registers they were
        // read into.
#pragma unroll 1
        for (long long p = step_lo + warp; p <= hi; p += WARPS) {
            float kr[PER], vr[PER], vraw[PER];
            load_new(kr, vr, p);
            float dot = 0.0f;
            if (live)
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    dot += qv[i] * (kr[i] * Raw::unit);
                    vraw[i] = vr[i] * Raw::unit;
                }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            attend(dot, vraw);
            if (writer && p == pos && live) {
                long base = (kv_slot(pages, pos, page_size) * kv_heads + kvh) * d + lane * PER;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    put_units(k_cache, base + i, kr[i]);
                    put_units(v_cache, base + i, vr[i]);
                }
            }
        }
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    if (live)
        for (int i = 0; i < PER; i++) sacc[warp][lane * PER + i] = acc[i] * (vs * Raw::post);
    __syncthreads();
    float M = sm[0];
    for (int w2 = 1; w2 < WARPS; w2++) M = fmaxf(M, sm[w2]);
    float L = 0.0f;
    for (int w2 = 0; w2 < WARPS; w2++) L += sl[w2] * __expf(sm[w2] - M);
    T* out_row = out_all + h * ohs + t * ots;
    if (active == 1) {
        // The only chunk: the output directly, as merging its one partial state would give.
        float inv_l = 1.0f / L;
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float o = 0.0f;
            for (int w2 = 0; w2 < WARPS; w2++) o += sacc[w2][e] * __expf(sm[w2] - M);
            store_f(out_row, e, o * inv_l);
        }
        return;
    }
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float o = 0.0f;
        for (int w2 = 0; w2 < WARPS; w2++) o += sacc[w2][e] * __expf(sm[w2] - M);
        out[e] = o;
    }
    if (threadIdx.x == 0) {
        out[d] = M;
        out[d + 1] = L;
    }
    // The last chunk to finish merges them all.
    if (!last_to_finish(counters + t * heads + h, active)) return;
    // The throughput build keeps its registers few (more blocks fit at large batches).
    merge_partials<T, EARLY ? 16 : 0>(partial + ((long)t * heads + h) * splits * (d + 2), active, d, out_row);
}

#define SPLIT_ENTRY(T, C, S, D, G, P, NAME, EARLY, UE, BOUNDS, K)                                                     \
    extern "C" __global__ void BOUNDS NAME##_##P##D##_##S(                                                            \
        const T* q, const T* k_new, const T* v_new, const T* cos, const T* sin, C* k_cache, C* v_cache,              \
        const long long* token_seq, const long long* token_pos, const long long* page_indptr,                       \
        const int* page_indices, const long long* seq_start, const long long* cached_len, int page_size,            \
        int heads, int kv_heads, long tokens, float scale, int chunk, int splits, float* partial, int* counters,     \
        T* out, long long ohs, long long ots, int window, float softcap, int d KV_##K##_PARAMS, const T* qn,        \
        const T* kn, float neps) {                                                                                    \
        /* the latency build takes no window or soft-cap (constants: compiled away); only it */                     \
        /* normalises (qn, kn: the q/k norms' weights, or null) */                                                   \
        paged_decode_split<T, C, D, G, EARLY, UE>(q, k_new, v_new, cos, sin, k_cache, v_cache, token_seq, token_pos, \
                                                  page_indptr, page_indices, seq_start, cached_len, page_size, heads, \
                                                  kv_heads, tokens, scale, chunk, splits, partial, counters, out,     \
                                                  ohs, ots, EARLY ? 0 : window, EARLY ? 0.0f : softcap, d,            \
                                                  KV_##K##_ARGS, EARLY ? qn : nullptr, EARLY ? kn : nullptr, neps);   \
    }
// The end of a split-KV block over `n` query heads h0 .. h0 + n - 1 of token t, chunk s of
// `active`: each of its WARPS warps left, for each head g, its max m, sum l and unnormalised
// output row (v_scale applied) in shared memory (`sm`/`sl` [WARPS][rows], `sacc`
// [WARPS][rows][stride], row g of warp w at w·rows + g; the caller synchronised). Merges the
// warps; a token whose positions fit one chunk writes out directly, else the chunk's partial
// state goes to `partial` and the last block of (t, h0) to finish (counter t·heads + h0) merges
// the chunks, one warp a head.
template <typename T, int WARPS, int PER>
__device__ void finish_heads(const float* sm, const float* sl, const float* sacc, int rows, int stride, int n, int d,
                             long t, int h0, int s, int active, int heads, int splits, float* partial, int* counters,
                             T* out_all, long long ohs, long long ots) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
        int g = e / d, j = e % d;
        float M = sm[g];
        for (int w2 = 1; w2 < WARPS; w2++) M = fmaxf(M, sm[w2 * rows + g]);
        float L = 0.0f, o = 0.0f;
        for (int w2 = 0; w2 < WARPS; w2++) {
            float c = __expf(sm[w2 * rows + g] - M);
            L += sl[w2 * rows + g] * c;
            o += sacc[(long)(w2 * rows + g) * stride + j] * c;
        }
        if (active == 1) {
            store_f(out_all, (h0 + g) * ohs + t * ots + j, o / L);
        } else {
            float* out = partial + (((long)t * heads + h0 + g) * splits + s) * (d + 2);
            out[j] = o;
            if (j == 0) {
                out[d] = M;
                out[d + 1] = L;
            }
        }
    }
    if (active == 1) return;
    if (!last_to_finish(counters + t * heads + h0, active)) return;
    for (int g = warp; g < n; g += WARPS)
        merge_partials_warp<T, PER>(partial + ((long)t * heads + h0 + g) * splits * (d + 2), active, d,
                                    out_all + (h0 + g) * ohs + t * ots, lane);
}

// Split-KV decode's throughput build over a GQA group: block (t, b, s) attends for the HB query
// heads b·HB .. b·HB + HB - 1, which share one kv head, so each cached K/V row is read once for
// all of them (the one-head build reads it once a head, through L2) and the grid has HB times
// fewer blocks. Otherwise as the throughput build of `paged_decode_split`: every position from
// the cache (written before it), partials [tokens, heads, splits, D + 2], a token whose positions
// fit one chunk writing out directly; the last block of (t, b) to finish (counter t·heads +
// b·HB) merges its heads, one warp a head.
template <typename T, typename C, int D, bool G, int HB>
__device__ void paged_decode_split_grouped(const T* q, const C* k_cache, const C* v_cache,
                                           const long long* token_seq, const long long* token_pos,
                                           const long long* page_indptr, const int* page_indices, int page_size,
                                           int heads, int kv_heads, long tokens, float scale, int chunk, int splits,
                                           float* partial, int* counters, T* out_all, long long ohs, long long ots,
                                           int window, float softcap, int dd, float ks, float vs) {
    const int d = G ? dd : D;  // as paged_attention
    constexpr int PER = (D + 31) / 32;
    constexpr int WARPS = 4;
    constexpr int U = HB >= 8 ? 2 : 4;
    pdl_enter();
    long t = blockIdx.x;
    int h0 = blockIdx.y * HB, s = blockIdx.z;
    int kvh = h0 / (heads / kv_heads);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long seq = token_seq[t], pos = token_pos[t];
    chunk = token_chunk(chunk, splits, pos);
    long long lo = (long long)s * chunk, hi = lo + chunk - 1;
    if (hi > pos) hi = pos;
    if (window > 0 && lo < pos + 1 - window) lo = pos + 1 - window;  // as paged_decode_split
    if (window < 0 && lo < pos / -window * -window) lo = pos / -window * -window;
    int active = (int)(pos / chunk) + 1;
    if (s >= active) return;
    const int* pages = page_indices + page_indptr[seq];
    const bool live = lane * PER < d;
    float qv[HB][PER], acc[HB][PER], m[HB], l[HB];
#pragma unroll
    for (int g = 0; g < HB; g++) {
        if (live) load_row<PER>(q + ((long)(h0 + g) * tokens + t) * d + lane * PER, qv[g]);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            qv[g][i] = live ? qv[g][i] * (scale * ks) : 0.0f;
            acc[g][i] = 0.0f;
        }
        m[g] = -3.0e38f;
        l[g] = 0.0f;
    }
    float kf[U][PER], vf[U][PER];
    for (long long p0 = lo + warp * U; p0 <= hi; p0 += WARPS * U) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            long long p = p0 + u <= hi ? p0 + u : hi;
            long slot = kv_slot(pages, p, page_size);
            long base = (slot * kv_heads + kvh) * d + lane * PER;
            if (live) {
                load_row<PER>(k_cache + base, kf[u]);
                load_row<PER>(v_cache + base, vf[u]);
            }
        }
        float dot[HB][U];
#pragma unroll
        for (int g = 0; g < HB; g++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                float d = 0.0f;
                if (live)
#pragma unroll
                    for (int i = 0; i < PER; i++) d += qv[g][i] * kf[u][i];
                dot[g][u] = d;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int g = 0; g < HB; g++)
#pragma unroll
                for (int u = 0; u < U; u++) dot[g][u] += __shfl_xor_sync(0xffffffffu, dot[g][u], o);
        if (softcap > 0.0f)
#pragma unroll
            for (int g = 0; g < HB; g++)
#pragma unroll
                for (int u = 0; u < U; u++) dot[g][u] = softcap * tanhf(dot[g][u] / softcap);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (p0 + u > hi) break;
#pragma unroll
            for (int g = 0; g < HB; g++) {
                float m2 = fmaxf(m[g], dot[g][u]);
                float corr = __expf(m[g] - m2), w = __expf(dot[g][u] - m2);
                l[g] = l[g] * corr + w;
                if (live)
#pragma unroll
                    for (int i = 0; i < PER; i++) acc[g][i] = acc[g][i] * corr + w * vf[u][i];
                m[g] = m2;
            }
        }
    }
    __shared__ float sm[WARPS][HB], sl[WARPS][HB], sacc[WARPS][HB][D];
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < HB; g++) {
            sm[warp][g] = m[g];
            sl[warp][g] = l[g];
        }
    if (live)
#pragma unroll
        for (int g = 0; g < HB; g++)
#pragma unroll
            for (int i = 0; i < PER; i++) sacc[warp][g][lane * PER + i] = acc[g][i] * vs;
    __syncthreads();
    finish_heads<T, WARPS, PER>(&sm[0][0], &sl[0][0], &sacc[0][0][0], HB, D, HB, d, t, h0, s, active, heads, splits,
                                partial, counters, out_all, ohs, ots);
}

#define GROUPED_ENTRY(T, C, S, D, G, P, HB, K)                                                                       \
    extern "C" __global__ void paged_decode_split_g##HB##_##P##D##_##S(                                               \
        const T* q, const T* k_new, const T* v_new, const T* cos, const T* sin, C* k_cache, C* v_cache,              \
        const long long* token_seq, const long long* token_pos, const long long* page_indptr,                       \
        const int* page_indices, const long long* seq_start, const long long* cached_len, int page_size,            \
        int heads, int kv_heads, long tokens, float scale, int chunk, int splits, float* partial, int* counters,     \
        T* out, long long ohs, long long ots, int window, float softcap, int d KV_##K##_PARAMS, const T*,           \
        const T*, float) {                                                                                            \
        paged_decode_split_grouped<T, C, D, G, HB>(q, k_cache, v_cache, token_seq, token_pos, page_indptr,            \
                                                   page_indices, page_size, heads, kv_heads, tokens, scale, chunk,    \
                                                   splits, partial, counters, out, ohs, ots, window, softcap, d,      \
                                                   KV_##K##_ARGS);                                                    \
    }

// The latency build at 4 positions a warp held to 64 registers (8 blocks an SM) at head dims up
// to 128: at 72 an H200 fit 7 blocks an SM, so the 8B shape's 32 heads × 32 chunks (1024
// blocks) took 1.11 waves.
#define EARLY4_BOUNDS_16 __launch_bounds__(128, 8)
#define EARLY4_BOUNDS_32 __launch_bounds__(128, 8)
#define EARLY4_BOUNDS_64 __launch_bounds__(128, 8)
#define EARLY4_BOUNDS_96 __launch_bounds__(128, 8)
#define EARLY4_BOUNDS_128 __launch_bounds__(128, 8)
#define EARLY4_BOUNDS_256
// The latency build at 8 positions a warp and pass (`AUTODEPLOY_ATTN_U=8`), and at 4 (the default, `Gpu::attn_early_u`:
// half the registers for K/V, one pass over chunks of 16).
#define SPLIT(T, C, S, D, G, P, K)                                                                                    \
    SPLIT_ENTRY(T, C, S, D, G, P, paged_decode_split, false, 4, , K)                                                  \
    GROUPED_ENTRY(T, C, S, D, G, P, 2, K)                                                                             \
    GROUPED_ENTRY(T, C, S, D, G, P, 4, K)                                                                             \
    GROUPED_ENTRY(T, C, S, D, G, P, 8, K)                                                                             \
    SPLIT_ENTRY(T, C, S, D, G, P, paged_decode_split_early, true, 8, , K)                                             \
    SPLIT_ENTRY(T, C, S, D, G, P, paged_decode_split_early4, true, 4, EARLY4_BOUNDS_##D, K)

// Each head dim of `HEAD_DIMS` with the row length a constant (`_d`), and the general builds
// (`_g`, `GENERAL_DIMS`) taking it at run time for the other multiples of 8 they hold.
#define SPLIT_INSTANTIATE(T, C, S, K)                                                                                 \
    SPLIT(T, C, S, 16, false, d, K) SPLIT(T, C, S, 32, false, d, K) SPLIT(T, C, S, 64, false, d, K)                   \
    SPLIT(T, C, S, 96, false, d, K) SPLIT(T, C, S, 128, false, d, K) SPLIT(T, C, S, 256, false, d, K)                 \
    SPLIT(T, C, S, 32, true, g, K) SPLIT(T, C, S, 64, true, g, K) SPLIT(T, C, S, 128, true, g, K)                     \
    SPLIT(T, C, S, 256, true, g, K)

#ifndef KV_FP8_BUILDS
SPLIT_INSTANTIATE(float, float, f32, plain)
SPLIT_INSTANTIATE(bf16_t, bf16_t, bf16, plain)
#else
SPLIT_INSTANTIATE(float, fp8_t, f32_fp8kv, fp8)
SPLIT_INSTANTIATE(bf16_t, fp8_t, bf16_fp8kv, fp8)
#endif
