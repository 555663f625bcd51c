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
// Closes the cp.async group of this thread's copies issued since the last one.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most N of this thread's cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}

// One pass's online-softmax step of the tensor-core decode builds, for a lane's two heads
// (2c + e): Sᵀ's accumulator st {position g: heads 2c, 2c + 1; position g + 8: the same}, the
// positions past the chunk masked (live0, live1), times sk; each head's running max over its 8
// lanes, m and this lane's share of l updated, the Oᵀ tiles rescaled; p[e] the two positions'
// probabilities for the caller's Pᵀ tile.
template <int KS>
__device__ __forceinline__ void tc_softmax_step(const float* st, bool live0, bool live1, float sk, float* m, float* l,
                                                float (*o)[4], float (*p)[2]) {
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
        p[e][0] = __expf(s0 - m2), p[e][1] = __expf(s1 - m2);
        l[e] = l[e] * corr + p[e][0] + p[e][1];  // this lane's share; the head's 8 lanes summed at the end
#pragma unroll
        for (int k = 0; k < KS; k++) {
            o[k][e] *= corr;
            o[k][2 + e] *= corr;
        }
    }
}

// After a warp's passes: each of the lane's two heads' l summed over its 8 lanes, and the heads'
// max and sum into the block's shared sm, sl [warp][head] (read by `finish_heads`).
__device__ __forceinline__ void tc_head_states(const float* m, float* l, float (*sm)[8], float (*sl)[8]) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
        if (g == 0) {
            sm[warp][2 * c + e] = m[e];
            sl[warp][2 * c + e] = l[e];
        }
    }
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
    chunk = token_chunk(chunk, splits, pos);
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
        float p[2][2];
        tc_softmax_step<KS>(st, kb + g <= hi, kb + g + 8 <= hi, sk, m, l, o, p);
#pragma unroll
        for (int e = 0; e < 2; e++) {
            // Pᵀ[head 2c + e][position g, g + 8] as hi + lo.
            bf16_t h0b = f32_to_bf16(p[e][0]), h1b = f32_to_bf16(p[e][1]);
            pt[warp][0][2 * c + e][g] = h0b;
            pt[warp][0][2 * c + e][g + 8] = h1b;
            pt[warp][1][2 * c + e][g] = f32_to_bf16(p[e][0] - bf16_to_f32(h0b));
            pt[warp][1][2 * c + e][g + 8] = f32_to_bf16(p[e][1] - bf16_to_f32(h1b));
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
    // The warps' states into shared memory (the output rows reuse the tiles once every warp is
    // past its loop).
    tc_head_states(m, l, sm, sl);
    __syncthreads();
    float* sacc = (float*)smem;  // [WARPS][8][D]
#pragma unroll
    for (int e = 0; e < 2; e++) {
        int head = 2 * c + e;
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

#ifdef KV_FP8_BUILDS
// mma.sync m16n8k16 with f16 inputs, f32 accumulate (sm_80+): fragment layouts as `mma_bf16`'s.
__device__ __forceinline__ void mma_f16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
// Two f32 as an f16 pair (round to nearest), the first in the low half.
__device__ __forceinline__ unsigned f16x2_of(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
    return r;
}
// The f16 in the low 16 bits of h as f32.
__device__ __forceinline__ float f16_lo_f32(unsigned h) {
    float f;
    asm("{ .reg .b16 a; cvt.u16.u32 a, %1; cvt.f32.f16 %0, a; }" : "=f"(f) : "r"(h));
    return f;
}
// Two E4M3 codes (the low 16 bits of w, lower code first) as an f16 pair, exactly: one `cvt` on
// sm_89+.
__device__ __forceinline__ unsigned e4m3x2_f16x2(unsigned w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned r;
    asm("{ .reg .b16 a; cvt.u16.u32 a, %1; cvt.rn.f16x2.e4m3x2 %0, a; }" : "=r"(r) : "r"(w));
    return r;
#else
    return f16x2_of(e4m3_value(w & 0xffu), e4m3_value((w >> 8) & 0xffu));
#endif
}

// The FP8 cache's tensor-core decode with its MMA fragments made straight from the cached codes
// (`[kernels] decode_fp8_codes`; sm_89+): `paged_decode_tc`'s blocks, warps, passes, softmax,
// partials and merge, but the K and V codes go to shared memory by cp.async, two passes a warp
// in flight (no registers held for the next pass, no bf16 staging tiles), and each fragment
// register is two codes converted to f16 by one `cvt` (E4M3 values are exact in f16), the MMAs
// in f16. Dimensions and positions are permuted inside each MMA (a dot product does not care
// in which order it sums), so that a lane's codes sit side by side:
// - Sᵀ = K·Qᵀ: lane (g, c) reads 8 codes of row g (and g + 8) at dims 32j + 8c .. +7, which
//   are k-steps 2j (dims +0, 1 | +2, 3 as k-indices 2c, 2c+1 | 2c+8, 2c+9) and 2j + 1 (+4..7);
//   Q's B fragments follow the same order (8 query dims a lane, converted once).
// - Oᵀ += Vᵀ·Pᵀ: lane (g, c) reads the 4 codes at dims 32j + 4g .. +3 of rows c, c+4, c+8,
//   c+12 (k-indices 2c, 2c+1, 2c+8, 2c+9); byte permutes pair the rows, so tile 2j's M rows g,
//   g + 8 are dims 4g, 4g+1 and tile 2j + 1's are 4g+2, 4g+3. Pᵀ goes through a small shared
//   tile in the same position order, as f16 hi + lo (one f16 alone, 11 bits, failed cuda_check's
//   short sequences by cancellation: outputs near 0 from a few terms near 1).
// Q goes to f16 times 2^-e, e the least that keeps the group's largest |q| below 2^15 (2^e
// folded into the score scale). Rows are RB bytes apart, an odd multiple of 32, so both
// fragment reads are free of bank conflicts. Positions past `hi` are zero-filled and masked.
template <int D>
__device__ void paged_decode_tc_codes(const bf16_t* q, const fp8_t* k_cache, const fp8_t* v_cache,
                                      const long long* token_seq, const long long* token_pos,
                                      const long long* page_indptr, const int* page_indices, int page_size, int heads,
                                      int kv_heads, long tokens, float scale, int chunk, int splits, float* partial,
                                      int* counters, bf16_t* out_all, long long ohs, long long ots, float k_scale,
                                      float v_scale) {
    constexpr int KS = D / 16, CH = D / 32;           // k-steps over the head dim; 32-dim chunks
    constexpr int RB = (D / 4) % 16 == 8 ? D : D + 32;  // row stride in bytes: an odd multiple of 32
    constexpr int WARPS = 4, STAGES = 2;
    constexpr int TILE = 16 * RB;                 // one pass's K (or V) codes
    constexpr int R = 16 * (D / 16) / 32;         // 16-byte pieces a lane stages, of K and of V
    constexpr int PER = (D + 31) / 32;
    constexpr int STAGE_BYTES = WARPS * STAGES * 2 * TILE;
    constexpr int OUT_BYTES = WARPS * 8 * D * 4;  // the warps' output rows after the loop
    __shared__ __align__(16) unsigned char smem[STAGE_BYTES > OUT_BYTES ? STAGE_BYTES : OUT_BYTES];
    __shared__ __align__(16) unsigned short pt[WARPS][2][8][16];  // Pᵀ hi, lo as f16: [head][slot]
    __shared__ float sm[WARPS][8], sl[WARPS][8];
    static_assert(R * 32 == 16 * D / 16, "a pass's pieces split evenly over the lanes");
    long t = blockIdx.x;
    int kvh = blockIdx.y, s = blockIdx.z;
    int group = heads / kv_heads, h0 = kvh * group;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    long long seq = token_seq[t], pos = token_pos[t];
    chunk = token_chunk(chunk, splits, pos);
    long long lo = (long long)s * chunk, hi = lo + chunk - 1;
    if (hi > pos) hi = pos;
    int active = (int)(pos / chunk) + 1;
    if (s >= active) return;
    const int* pages = page_indices + page_indptr[seq];
    unsigned char* wbase = smem + warp * STAGES * 2 * TILE;  // [stage][K, V][16][RB]
    // Positions kb .. kb + 15's codes into stage `st` (past hi: zeros).
    auto stage = [&](int st, long long kb) {
        unsigned char* kt = wbase + st * 2 * TILE;
        if (kb <= hi) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                int piece = lane + 32 * i, r = piece / (D / 16), ch = piece % (D / 16);
                long long p = kb + r;
                long slot = p <= hi ? kv_slot(pages, p, page_size) : 0;
                long base = (slot * kv_heads + kvh) * D + ch * 16;
                int bytes = p <= hi ? 16 : 0;
                cp_async16(kt + r * RB + ch * 16, k_cache + base, bytes);
                cp_async16(kt + TILE + r * RB + ch * 16, v_cache + base, bytes);
            }
        }
        cp_async_commit();
    };
    const long long first = lo + 16 * warp;
    stage(0, first);
    stage(1, first + 16 * WARPS);
    // Qᵀ as f16 B fragments in the permuted order: head g's dims 32j + 8c .. +7.
    float qv[CH][8];
    float amax = 0.0f;
    const bf16_t* qrow = q + ((long)(h0 + g) * tokens + t) * D;
#pragma unroll
    for (int j = 0; j < CH; j++) {
        uint4 w = g < group ? *(const uint4*)(qrow + 32 * j + 8 * c) : make_uint4(0u, 0u, 0u, 0u);
        unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            qv[j][2 * i] = __uint_as_float(ws[i] << 16);
            qv[j][2 * i + 1] = __uint_as_float(ws[i] & 0xffff0000u);
            amax = fmaxf(amax, fmaxf(fabsf(qv[j][2 * i]), fabsf(qv[j][2 * i + 1])));
        }
    }
#pragma unroll
    for (int o2 = 16; o2 > 0; o2 >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o2));
    int ex = (int)((__float_as_uint(amax) >> 23) & 0xffu) - 127;
    int shift = ex > 14 ? ex - 14 : 0;  // |q| · 2^-shift < 2^15
    float down = __uint_as_float((unsigned)(127 - shift) << 23);
    unsigned qb[KS][2];
#pragma unroll
    for (int j = 0; j < CH; j++) {
        qb[2 * j][0] = f16x2_of(qv[j][0] * down, qv[j][1] * down);
        qb[2 * j][1] = f16x2_of(qv[j][2] * down, qv[j][3] * down);
        qb[2 * j + 1][0] = f16x2_of(qv[j][4] * down, qv[j][5] * down);
        qb[2 * j + 1][1] = f16x2_of(qv[j][6] * down, qv[j][7] * down);
    }
    const float sk = scale * k_scale * __uint_as_float((unsigned)(127 + shift) << 23);
    // Oᵀ tile 2j + h: regs {dim 32j + 4g + 2h: heads 2c, 2c + 1; dim 32j + 4g + 2h + 1: the same}.
    float o[KS][4];
#pragma unroll
    for (int k = 0; k < KS; k++) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.0f;
    float m[2] = {-3.0e38f, -3.0e38f}, l[2] = {0.0f, 0.0f};  // heads 2c, 2c + 1
    // Tile row r's slot in Pᵀ: rows c, c + 4 at 2c, 2c + 1; rows c + 8, c + 12 at 2c + 8, 2c + 9.
    const int slot_g = 2 * (g & 3) + ((g >> 2) & 1);  // row g's (row g + 8's: + 8)
    int st = 0;
    for (long long kb = first; kb <= hi; kb += 16 * WARPS) {
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        const unsigned char* kt = wbase + st * 2 * TILE;
        const unsigned char* vt = kt + TILE;
        // Sᵀ: regs {position g: heads 2c, 2c + 1; position g + 8: heads 2c, 2c + 1}.
        float sa[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < CH; j++) {
            uint2 r0 = *(const uint2*)(kt + g * RB + 32 * j + 8 * c);
            uint2 r1 = *(const uint2*)(kt + (g + 8) * RB + 32 * j + 8 * c);
            unsigned a[4];
            a[0] = e4m3x2_f16x2(r0.x), a[1] = e4m3x2_f16x2(r1.x);
            a[2] = e4m3x2_f16x2(r0.x >> 16), a[3] = e4m3x2_f16x2(r1.x >> 16);
            mma_f16(sa, a, qb[2 * j][0], qb[2 * j][1]);
            a[0] = e4m3x2_f16x2(r0.y), a[1] = e4m3x2_f16x2(r1.y);
            a[2] = e4m3x2_f16x2(r0.y >> 16), a[3] = e4m3x2_f16x2(r1.y >> 16);
            mma_f16(sa, a, qb[2 * j + 1][0], qb[2 * j + 1][1]);
        }
        float p[2][2];
        tc_softmax_step<KS>(sa, kb + g <= hi, kb + g + 8 <= hi, sk, m, l, o, p);
#pragma unroll
        for (int e = 0; e < 2; e++) {
            // Pᵀ as hi + lo in f16 (22 significant bits, as `paged_decode_tc`'s bf16 pair).
            unsigned ph = f16x2_of(p[e][0], p[e][1]);
            unsigned pl = f16x2_of(p[e][0] - f16_lo_f32(ph), p[e][1] - f16_lo_f32(ph >> 16));
            pt[warp][0][2 * c + e][slot_g] = (unsigned short)(ph & 0xffffu);
            pt[warp][0][2 * c + e][slot_g + 8] = (unsigned short)(ph >> 16);
            pt[warp][1][2 * c + e][slot_g] = (unsigned short)(pl & 0xffffu);
            pt[warp][1][2 * c + e][slot_g + 8] = (unsigned short)(pl >> 16);
        }
        __syncwarp();
        // B = Pᵀ (k-indices 2c, 2c+1 | 2c+8, 2c+9 = rows c, c+4 | c+8, c+12) for head g.
        unsigned bh0 = *(const unsigned*)&pt[warp][0][g][2 * c], bh1 = *(const unsigned*)&pt[warp][0][g][2 * c + 8];
        unsigned bl0 = *(const unsigned*)&pt[warp][1][g][2 * c], bl1 = *(const unsigned*)&pt[warp][1][g][2 * c + 8];
#pragma unroll
        for (int j = 0; j < CH; j++) {
            unsigned w0 = *(const unsigned*)(vt + c * RB + 32 * j + 4 * g);
            unsigned w1 = *(const unsigned*)(vt + (c + 4) * RB + 32 * j + 4 * g);
            unsigned w2 = *(const unsigned*)(vt + (c + 8) * RB + 32 * j + 4 * g);
            unsigned w3 = *(const unsigned*)(vt + (c + 12) * RB + 32 * j + 4 * g);
            unsigned x01 = __byte_perm(w0, w1, 0x5140), x23 = __byte_perm(w0, w1, 0x7362);
            unsigned y01 = __byte_perm(w2, w3, 0x5140), y23 = __byte_perm(w2, w3, 0x7362);
            unsigned a[4];
            a[0] = e4m3x2_f16x2(x01), a[1] = e4m3x2_f16x2(x01 >> 16);
            a[2] = e4m3x2_f16x2(y01), a[3] = e4m3x2_f16x2(y01 >> 16);
            mma_f16(o[2 * j], a, bh0, bh1);
            mma_f16(o[2 * j], a, bl0, bl1);
            a[0] = e4m3x2_f16x2(x23), a[1] = e4m3x2_f16x2(x23 >> 16);
            a[2] = e4m3x2_f16x2(y23), a[3] = e4m3x2_f16x2(y23 >> 16);
            mma_f16(o[2 * j + 1], a, bh0, bh1);
            mma_f16(o[2 * j + 1], a, bl0, bl1);
        }
        __syncwarp();  // the stage and Pᵀ are read before they are written again
        stage(st, kb + 2 * 16 * WARPS);
        st ^= 1;
    }
    cp_async_wait<0>();
    tc_head_states(m, l, sm, sl);
    __syncthreads();
    float* sacc = (float*)smem;  // [WARPS][8][D]
#pragma unroll
    for (int e = 0; e < 2; e++) {
        int head = 2 * c + e;
        float* dst = sacc + (warp * 8 + head) * D + 4 * g;
#pragma unroll
        for (int j = 0; j < CH; j++)
            *(float4*)(dst + 32 * j) = make_float4(o[2 * j][e] * v_scale, o[2 * j][2 + e] * v_scale,
                                                   o[2 * j + 1][e] * v_scale, o[2 * j + 1][2 + e] * v_scale);
    }
    __syncthreads();
    finish_heads<bf16_t, WARPS, PER>(&sm[0][0], &sl[0][0], sacc, 8, D, group, D, t, h0, s, active, heads, splits,
                                     partial, counters, out_all, ohs, ots);
}

#define DECODE_TC_CODES(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128, 5) paged_decode_tc_codes_d##D##_bf16_fp8kv(                     \
        const bf16_t* q, const bf16_t* k_new, const bf16_t* v_new, const bf16_t* cos, const bf16_t* sin,             \
        fp8_t* k_cache, fp8_t* v_cache, const long long* token_seq, const long long* token_pos,                     \
        const long long* page_indptr, const int* page_indices, const long long* seq_start,                          \
        const long long* cached_len, int page_size, int heads, int kv_heads, long tokens, float scale, int chunk,   \
        int splits, float* partial, int* counters, bf16_t* out, long long ohs, long long ots, int window,           \
        float softcap, int d, float ks, float vs, const bf16_t*, const bf16_t*, float) {                             \
        pdl_enter();                                                                                                  \
        paged_decode_tc_codes<D>(q, k_cache, v_cache, token_seq, token_pos, page_indptr, page_indices, page_size,   \
                                 heads, kv_heads, tokens, scale, chunk, splits, partial, counters, out, ohs, ots, ks, \
                                 vs);                                                                                 \
    }
DECODE_TC_CODES(32)
DECODE_TC_CODES(64)
DECODE_TC_CODES(96)
DECODE_TC_CODES(128)
#endif
