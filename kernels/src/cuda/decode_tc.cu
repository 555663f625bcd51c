// The split-KV decode's throughput build on tensor cores (`paged_decode_tc`), compiled after
// decode.cu in the same modules (`decode`, `decode_fp8kv`): its partial states and merge are
// decode.cu's (`finish_heads`), its fragment helpers attention.cuh's.

// A shared-memory pointer as the 32-bit shared-window address PTX's shared instructions take.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned s;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
    return s;
}

// 16 bytes global -> shared without passing through registers (sm_80+); `bytes` 0 fills zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes) : "memory");
#else
    __trap();
#endif
}

// ldmatrix .x4 (sm_75+): four 8x8 matrices of 16-bit values from shared memory, lanes 8i..8i+7
// giving matrix i's eight row addresses (16-byte aligned); lane (g, c) = (lane / 4, lane % 4)
// gets, in r[i], matrix i's elements [g][2c], [g][2c+1], or with TRANS [2c][g], [2c+1][g].
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(unsigned* r, const bf16_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(p))
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(p))
                     : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
#endif
}

// Split-KV decode on tensor cores (bf16, sm_80+), for a GQA group of at most 8 query heads:
// block (t, kv head, s) of 4 warps attends for the group over chunk s, each cached K/V row read
// once for all its heads. The heads are the N side of the MMAs (m16n8k16), so no MMA lane is
// wasted on them and a lane keeps 2 heads' state: Sᵀ = K·Qᵀ (16 positions × 8 heads, K the A
// operand from shared memory, Q the B operand in registers), the online softmax per head (its
// 16 scores in the 8 lanes of one c), then Oᵀ += Vᵀ·Pᵀ (Vᵀ read from the V tile as A, Pᵀ the B
// operand through a small shared tile, P = hi + lo as `paged_prefill_tc`). Each warp takes 16
// positions a pass (every 4th run of 16 from the chunk's first); a bf16 cache's rows go to
// shared memory by cp.async (no registers), an FP8 cache's codes are loaded into registers a
// pass ahead and converted to bf16 (exactly) as they are staged. Plain causal scores only (the caller sends windows and
// soft-caps to the CUDA-core builds). Partials and the merge as `paged_decode_split_grouped`
// (`finish_heads`), the staging tiles reused for the warps' output rows. Launched as the
// grouped builds, grid (tokens, kv_heads, splits). LDSM: the K and Vᵀ A-fragments by one
// `ldmatrix` each a k-step (Vᵀ's `.trans`) instead of 32-bit / 16-bit shared loads and packs
// (`[kernels] decode_ldmatrix`; row addresses checked against the plain loads' elements in
// NumPy, conflict-free at RS = D + 8).
template <int D, typename C, bool LDSM>
__device__ void paged_decode_tc(const bf16_t* q, const C* k_cache, const C* v_cache, const long long* token_seq,
                                const long long* token_pos, const long long* page_indptr, const int* page_indices,
                                int page_size, int heads, int kv_heads, long tokens, float scale, int chunk,
                                int splits, float* partial, int* counters, bf16_t* out_all, long long ohs,
                                long long ots, float k_scale, float v_scale) {
    constexpr int KS = D / 16;  // k-steps of Sᵀ over the head dim; 16-dim tiles of Oᵀ
    constexpr int RS = D + 8;   // shared row stride in bf16
    constexpr int WARPS = 4;
    constexpr int R = 16 * (D / 8) / 32;  // 16-byte row pieces a lane stages, of K and of V
    constexpr int PER = (D + 31) / 32;
    // Staging: [WARPS][K, V][16][RS] bf16; after the loop, [WARPS][8][D] f32 output rows.
    __shared__ __align__(16) unsigned char smem[WARPS * 2 * 16 * RS * sizeof(bf16_t)];
    __shared__ __align__(16) bf16_t pt[WARPS][2][8][16];  // Pᵀ hi, lo: [head][position]
    __shared__ float sm[WARPS][8], sl[WARPS][8];
    long t = blockIdx.x;
    int kvh = blockIdx.y, s = blockIdx.z;
    int group = heads / kv_heads, h0 = kvh * group;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    long long seq = token_seq[t], pos = token_pos[t];
    long long lo = (long long)s * chunk, hi = lo + chunk - 1;
    if (hi > pos) hi = pos;
    int active = (int)(pos / chunk) + 1;
    if (s >= active) return;
    const int* pages = page_indices + page_indptr[seq];
    bf16_t* kt = (bf16_t*)smem + warp * 2 * 16 * RS;
    bf16_t* vt = kt + 16 * RS;
    // Qᵀ as B fragments: head g's dims 16k + 2c, +1 and 16k + 2c + 8, +9 (heads past the group 0).
    unsigned qb[KS][2];
    const bf16_t* qrow = q + ((long)(h0 + g) * tokens + t) * D;
#pragma unroll
    for (int k = 0; k < KS; k++) {
        qb[k][0] = g < group ? *(const unsigned*)(qrow + 16 * k + 2 * c) : 0u;
        qb[k][1] = g < group ? *(const unsigned*)(qrow + 16 * k + 2 * c + 8) : 0u;
    }
    // Oᵀ tile k: regs {dim 16k + g: heads 2c, 2c + 1; dim 16k + g + 8: heads 2c, 2c + 1}.
    float o[KS][4];
#pragma unroll
    for (int k = 0; k < KS; k++) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.0f;
    float m[2] = {-3.0e38f, -3.0e38f}, l[2] = {0.0f, 0.0f};  // heads 2c, 2c + 1
    const float sk = scale * k_scale;
    // An FP8 cache's codes of positions kb .. kb + 15 into registers (past hi: zero, masked
    // below). A pass requests the next pass's right after staging its own, so those loads are
    // in flight while it computes (bf16 rows go to shared memory by cp.async instead).
    uint2 kr[is_fp8<C>::value ? R : 1], vr[is_fp8<C>::value ? R : 1];
    auto load_fp8 = [&](long long kb) {
        if constexpr (is_fp8<C>::value) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                int piece = lane + 32 * i, r = piece / (D / 8), ch = piece % (D / 8);
                long long p = kb + r;
                kr[i] = vr[i] = make_uint2(0u, 0u);
                if (p <= hi) {
                    long slot = kv_slot(pages, p, page_size);
                    long base = (slot * kv_heads + kvh) * D + ch * 8;
                    kr[i] = *(const uint2*)(k_cache + base);
                    vr[i] = *(const uint2*)(v_cache + base);
                }
            }
        }
    };
    load_fp8(lo + 16 * warp);
    for (long long kb = lo + 16 * warp; kb <= hi; kb += 16 * WARPS) {
        // K and V of positions kb .. kb + 15 into the warp's tiles as bf16.
        if constexpr (is_fp8<C>::value) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                int piece = lane + 32 * i, r = piece / (D / 8), ch = piece % (D / 8);
                *(uint4*)(kt + r * RS + ch * 8) = fp8x8_as_bf16(kr[i]);
                *(uint4*)(vt + r * RS + ch * 8) = fp8x8_as_bf16(vr[i]);
            }
            load_fp8(kb + 16 * WARPS);
        } else {
#pragma unroll
            for (int i = 0; i < R; i++) {
                int piece = lane + 32 * i, r = piece / (D / 8), ch = piece % (D / 8);
                long long p = kb + r;
                long slot = p <= hi ? kv_slot(pages, p, page_size) : 0;
                long base = (slot * kv_heads + kvh) * D + ch * 8;
                int bytes = p <= hi ? 16 : 0;
                cp_async16(kt + r * RS + ch * 8, k_cache + base, bytes);
                cp_async16(vt + r * RS + ch * 8, v_cache + base, bytes);
            }
            cp_async_wait_all();
        }
        __syncwarp();
        // Sᵀ: regs {position g: heads 2c, 2c + 1; position g + 8: heads 2c, 2c + 1}.
        float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < KS; k++) {
            unsigned a[4];
            if constexpr (LDSM) {
                // Matrices (positions 0-7 | 8-15) x (dims 16k.. | 16k + 8..): lanes 0-15 rows
                // 0-15 at 16k, lanes 16-31 rows 0-15 at 16k + 8.
                ldsm_x4<false>(a, kt + (lane & 15) * RS + 16 * k + (lane >> 4) * 8);
            } else {
                const bf16_t* kr = kt + g * RS + 16 * k + 2 * c;
                a[0] = *(const unsigned*)kr;
                a[1] = *(const unsigned*)(kr + 8 * RS);
                a[2] = *(const unsigned*)(kr + 8);
                a[3] = *(const unsigned*)(kr + 8 * RS + 8);
            }
            mma_bf16(st, a, qb[k][0], qb[k][1]);
        }
        bool live0 = kb + g <= hi, live1 = kb + g + 8 <= hi;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            float s0 = live0 ? st[e] * sk : __int_as_float(0xff800000);  // -inf
            float s1 = live1 ? st[2 + e] * sk : __int_as_float(0xff800000);
            float mx = fmaxf(s0, s1);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            float m2 = fmaxf(m[e], mx);
            float corr = __expf(m[e] - m2);
            m[e] = m2;
            float p0 = __expf(s0 - m2), p1 = __expf(s1 - m2);
            l[e] = l[e] * corr + p0 + p1;  // this lane's share; the head's 8 lanes summed at the end
#pragma unroll
            for (int k = 0; k < KS; k++) {
                o[k][e] *= corr;
                o[k][2 + e] *= corr;
            }
            // Pᵀ[head 2c + e][position g, g + 8] as hi + lo.
            bf16_t h0b = f32_to_bf16(p0), h1b = f32_to_bf16(p1);
            pt[warp][0][2 * c + e][g] = h0b;
            pt[warp][0][2 * c + e][g + 8] = h1b;
            pt[warp][1][2 * c + e][g] = f32_to_bf16(p0 - bf16_to_f32(h0b));
            pt[warp][1][2 * c + e][g + 8] = f32_to_bf16(p1 - bf16_to_f32(h1b));
        }
        __syncwarp();
        // B = Pᵀ (16 positions × 8 heads): head g's positions 2c, 2c + 1 and 2c + 8, 2c + 9.
        const bf16_t* ph = &pt[warp][0][g][2 * c];
        const bf16_t* pl = &pt[warp][1][g][2 * c];
        unsigned bh0 = *(const unsigned*)ph, bh1 = *(const unsigned*)(ph + 8);
        unsigned bl0 = *(const unsigned*)pl, bl1 = *(const unsigned*)(pl + 8);
        // A = Vᵀ tile k (16 dims × 16 positions): V[position][dim] read across rows.
#pragma unroll
        for (int k = 0; k < KS; k++) {
            unsigned a[4];
            if constexpr (LDSM) {
                // Transposed matrices (positions 0-7 | 8-15) x (dims 16k.. | 16k + 8..): lane
                // groups of 8 give rows 0-7 at 16k, 0-7 at 16k + 8, 8-15 at 16k, 8-15 at 16k + 8.
                ldsm_x4<true>(a, vt + ((lane & 7) + ((lane >> 4) << 3)) * RS + 16 * k + ((lane >> 3) & 1) * 8);
            } else {
                const bf16_t* vc = vt + 16 * k + g;
                a[0] = pack_raw(vc[(2 * c) * RS], vc[(2 * c + 1) * RS]);
                a[1] = pack_raw(vc[(2 * c) * RS + 8], vc[(2 * c + 1) * RS + 8]);
                a[2] = pack_raw(vc[(2 * c + 8) * RS], vc[(2 * c + 9) * RS]);
                a[3] = pack_raw(vc[(2 * c + 8) * RS + 8], vc[(2 * c + 9) * RS + 8]);
            }
            mma_bf16(o[k], a, bh0, bh1);
            mma_bf16(o[k], a, bl0, bl1);
        }
        __syncwarp();  // the tiles are read before the next pass stages over them
    }
    // Each head's l summed over its 8 lanes; the warps' states into shared memory (the tiles
    // reused once every warp is past its loop).
#pragma unroll
    for (int e = 0; e < 2; e++) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
    }
    __syncthreads();
    float* sacc = (float*)smem;  // [WARPS][8][D]
#pragma unroll
    for (int e = 0; e < 2; e++) {
        int head = 2 * c + e;
        if (g == 0) {
            sm[warp][head] = m[e];
            sl[warp][head] = l[e];
        }
        float* dst = sacc + (warp * 8 + head) * D + g;
#pragma unroll
        for (int k = 0; k < KS; k++) {
            dst[16 * k] = o[k][e] * v_scale;
            dst[16 * k + 8] = o[k][2 + e] * v_scale;
        }
    }
    __syncthreads();
    finish_heads<bf16_t, WARPS, PER>(&sm[0][0], &sl[0][0], sacc, 8, D, group, D, t, h0, s, active, heads, splits,
                                     partial, counters, out_all, ohs, ots);
}

// Entry points with the grouped builds' parameters (the latency build's extras unused, the q/k
// norms' three last ones too): the plain fragment loads (`paged_decode_tc_`), and ldmatrix
// (`paged_decode_tc_ldsm_`).
#define DECODE_TC(D, C, S, K) DECODE_TC_ENTRY(D, C, S, K, , false) DECODE_TC_ENTRY(D, C, S, K, ldsm_, true)
#define DECODE_TC_ENTRY(D, C, S, K, N, L)                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 4) paged_decode_tc_##N##d##D##_##S(                              \
        const bf16_t* q, const bf16_t* k_new, const bf16_t* v_new, const bf16_t* cos, const bf16_t* sin,             \
        C* k_cache, C* v_cache, const long long* token_seq, const long long* token_pos,                             \
        const long long* page_indptr, const int* page_indices, const long long* seq_start,                          \
        const long long* cached_len, int page_size, int heads, int kv_heads, long tokens, float scale, int chunk,   \
        int splits, float* partial, int* counters, bf16_t* out, long long ohs, long long ots, int window,           \
        float softcap, int d KV_##K##_PARAMS, const bf16_t*, const bf16_t*, float) {                                 \
        pdl_enter();                                                                                                  \
        paged_decode_tc<D, C, L>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size,   \
                                 heads, kv_heads, tokens, scale, chunk, splits, partial, counters, out, ohs, ots,   \
                                 KV_##K##_ARGS);                                                                      \
    }
#ifndef KV_FP8_BUILDS
DECODE_TC(32, bf16_t, bf16, plain)
DECODE_TC(64, bf16_t, bf16, plain)
DECODE_TC(96, bf16_t, bf16, plain)
DECODE_TC(128, bf16_t, bf16, plain)
#else
DECODE_TC(32, fp8_t, bf16_fp8kv, fp8)
DECODE_TC(64, fp8_t, bf16_fp8kv, fp8)
DECODE_TC(96, fp8_t, bf16_fp8kv, fp8)
DECODE_TC(128, fp8_t, bf16_fp8kv, fp8)
#endif
