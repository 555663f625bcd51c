// Kernels of the canonical mixture-of-experts op (`torch_moe`, core's ops/moe.rs) behind the CUDA
// graph executor (kernels/src/cuda/exec/moe.rs launches them): routing, the chosen experts'
// gate/up and down rows, the grouped prefill path, and the sum in expert order. Dtypes are
// run-time codes (codes.cuh).

// ---- Mixture of experts (`torch_moe`): routing, the chosen experts' gate/up and down rows, and
// the sum in expert order. Correctness first: one warp a weight row, each token-expert pair a
// GEMV, so only the chosen experts' weights are read (decode); prefill rereads an expert's rows
// for each token routed to it (a grouped GEMM is left to do).

// A warp's dot product of `n` values of `a` (dtype dt) and `w` (dtype dt), every lane gets it.
__device__ __forceinline__ float warp_dot(const void* a, long a0, const void* w, long w0, int dt, int n) {
    float s = 0.0f;
    for (int k = threadIdx.x & 31; k < n; k += 32) s += ld(a, dt, a0 + k) * ld(w, dt, w0 + k);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// Per token: softmax of its `experts` router logits in f32, the `top_k` largest (ties to the
// lower index), divided by their sum when `norm`, rounded to dt unless `weights_f32`; or with
// `sigmoid` (Llama 4's) the `top_k` largest logits, each weight sigmoid(logit) rounded to dt.
// One warp a token: lane l holds experts l, l + 32, ...; each of the top_k picks is a warp
// argmax over the experts not yet taken.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

// `warp_best` in two warp reductions where the hardware has them (sm_80+): the largest score
// as an order-preserving integer key, then the lowest expert id holding it, then the score from
// its lane (expert e lives in lane e % 32). Same result, fewer dependent shuffles. A lane with
// no candidate holds `best` = INT_MAX (key 0 sorts below every score).
__device__ __forceinline__ void warp_pick(float& v, int& i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned u = __float_as_uint(v + 0.0f);  // -0 reads as +0, as the float compare sees them
    unsigned key = i == 0x7fffffff ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
    unsigned top = __reduce_max_sync(0xffffffffu, key);
    int win = (int)__reduce_min_sync(0xffffffffu, (unsigned)(key == top && i != 0x7fffffff ? i : 0x7fffffff));
    v = __shfl_sync(0xffffffffu, v, win & 31);
    i = win;
#else
    warp_best(v, i);
#endif
}

// Each lane keeps the routing score of its first `ROUTE_HELD` experts (lane + 32·j) in registers
// and a bit a held expert once picked, so a pick reads no memory (larger expert counts reread
// the rest and check the picks so far).
#define ROUTE_HELD 8
// Expert parallelism: the chosen experts this rank holds (`offset` .. `offset + local`) are
// written as local indices, the others as -1 (every later kernel skips those slots).
// Token t's routing by one whole warp (`moe_route`'s, and `moe_router_route_bf16`'s last block's).
__device__ void route_token(const void* logits, int ldt, int dt, long t, int experts, int top_k, int norm,
                            int weights_f32, int sigmoid, int offset, int local, int* idx, float* wts) {
    int lane = threadIdx.x & 31;
    long row = t * experts;
    int* chosen = idx + t * top_k;
    // The score a pick compares: the logit (sigmoid) or exp(logit - max) (softmax).
    float mx = 0.0f, sum = 1.0f;
    if (!sigmoid) {
        mx = -__int_as_float(0x7f800000);
        for (int e = lane; e < experts; e += 32) mx = fmaxf(mx, ld(logits, ldt, row + e));
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        sum = 0.0f;
        for (int e = lane; e < experts; e += 32) sum += expf(ld(logits, ldt, row + e) - mx);
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    auto score = [&](int e) {
        float v = ld(logits, ldt, row + e);
        return sigmoid ? v : expf(v - mx);
    };
    float held[ROUTE_HELD];
#pragma unroll
    for (int j = 0; j < ROUTE_HELD; j++) held[j] = lane + 32 * j < experts ? score(lane + 32 * j) : 0.0f;
    unsigned taken = 0;  // bit j: expert lane + 32·j picked
    float total = 0.0f;
    for (int k = 0; k < top_k; k++) {
        float bp = -__int_as_float(0x7f800000);
        int best = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < ROUTE_HELD; j++) {
            int e = lane + 32 * j;
            if (e < experts && !((taken >> j) & 1) && (held[j] > bp || best == 0x7fffffff)) {
                bp = held[j];
                best = e;
            }
        }
        for (int e = lane + 32 * ROUTE_HELD; e < experts; e += 32) {
            bool was = false;
            for (int j = 0; j < k; j++) was |= chosen[j] == e;
            float p = score(e);
            if (!was && (p > bp || best == 0x7fffffff)) {
                bp = p;
                best = e;
            }
        }
        warp_pick(bp, best);
        if ((best & 31) == lane && best < 32 * ROUTE_HELD) taken |= 1u << (best >> 5);
        if (lane == 0) {
            chosen[k] = best;
            wts[t * top_k + k] = sigmoid ? rnd(dt, 1.0f / (1.0f + expf(-bp))) : bp / sum;
        }
        total += bp / sum;
        __syncwarp();
    }
    for (int k = lane; k < top_k; k += 32) {
        if (!sigmoid) {
            float w = norm ? wts[t * top_k + k] / total : wts[t * top_k + k];
            wts[t * top_k + k] = weights_f32 ? w : rnd(dt, w);
        }
        int e = chosen[k] - offset;
        chosen[k] = e >= 0 && e < local ? e : -1;
    }
}

extern "C" __global__ void moe_route(const void* logits, int ldt, int dt, long tokens, int experts, int top_k,
                                     int norm, int weights_f32, int sigmoid, int offset, int local, int* idx,
                                     float* wts) {
    pdl_enter();
    long t = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= tokens) return;
    route_token(logits, ldt, dt, t, experts, top_k, norm, weights_f32, sigmoid, offset, local, idx, wts);
}

// The router's linear and the routing in one launch (bf16, hidden % 8 == 0; the `fuse_moe_router`
// transform's op): block (b, t) of 8 warps computes token t's router logits 8b .. 8b + 7, a warp
// a row x[t] · w[e] with 16-byte loads, rounded to bf16 as the linear's output is, into
// `logits` [tokens, experts]; the last of the token's blocks to finish (`last_to_finish` on
// counters[t], zero before and re-armed after) reads the token's logits from L2 into shared
// memory (at most ROUTER_MAX_EXPERTS) and routes the token with its first warp as `moe_route`
// does. One launch a layer fewer than the router GEMV and `moe_route`.
#define ROUTER_MAX_EXPERTS 512
extern "C" __global__ void moe_router_route_bf16(const bf16_t* x, const bf16_t* w, bf16_t* logits, int* counters,
                                                 long tokens, int hidden, int experts, int top_k, int norm,
                                                 int weights_f32, int sigmoid, int offset, int local, int* idx,
                                                 float* wts) {
    pdl_enter();
    long t = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, e = blockIdx.x * 8 + warp;
    if (e < experts) {
        const uint4* wr = (const uint4*)(w + (long)e * hidden);
        const uint4* xr = (const uint4*)(x + t * hidden);
        float acc = 0.0f;
#pragma unroll 4
        for (int c = lane; c < hidden / 8; c += 32) {
            uint4 wv = wr[c], xv = xr[c];
            const bf16_t *wp = (const bf16_t*)&wv, *xp = (const bf16_t*)&xv;
#pragma unroll
            for (int j = 0; j < 8; j++) acc += bf16_to_f32(wp[j]) * bf16_to_f32(xp[j]);
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) logits[t * experts + e] = f32_to_bf16(acc);
    }
    if (!last_to_finish(counters + t, gridDim.x)) return;
    // Other blocks wrote them: read past L1.
    __shared__ float lg[ROUTER_MAX_EXPERTS];
    const unsigned short* bits = (const unsigned short*)(logits + t * experts);
    for (int i = threadIdx.x; i < experts; i += blockDim.x) lg[i] = __uint_as_float((unsigned)__ldcg(bits + i) << 16);
    __syncthreads();
    if (warp == 0)
        route_token(lg, DT_F32, DT_BF16, 0, experts, top_k, norm, weights_f32, sigmoid, offset, local,
                    idx + t * top_k, wts + t * top_k);
}

// act[s, j] = round(round(act(round(g))) * round(u)) for slot s = token * top_k + k, with g and u
// rows j and inter + j of expert idx[s]'s gate_up [2·inter, hidden] against the token's x, or
// against round(x · scale_in[s]) where `scale_in` is set (sigmoid routing). One warp a (slot, j).
__device__ __forceinline__ float warp_dot_scaled(const void* a, long a0, float sc, const void* w, long w0, int dt,
                                                 int n) {
    float s = 0.0f;
    for (int k = threadIdx.x & 31; k < n; k += 32) s += rnd(dt, ld(a, dt, a0 + k) * sc) * ld(w, dt, w0 + k);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

extern "C" __global__ void moe_gate_up(const void* x, const void* w_gu, const int* idx, int dt, long slots, int top_k,
                                       int hidden, int inter, int act, const float* scale_in, void* out) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= slots * inter) return;
    long s = warp / inter;
    int j = warp % inter;
    long e = idx[s], t = s / top_k;
    if (e < 0) return;  // another rank's expert
    long base = e * 2 * (long)inter * hidden;
    float g, u;
    if (scale_in) {
        float sc = scale_in[s];
        g = rnd(dt, warp_dot_scaled(x, t * hidden, sc, w_gu, base + (long)j * hidden, dt, hidden));
        u = rnd(dt, warp_dot_scaled(x, t * hidden, sc, w_gu, base + (long)(inter + j) * hidden, dt, hidden));
    } else {
        g = rnd(dt, warp_dot(x, t * hidden, w_gu, base + (long)j * hidden, dt, hidden));
        u = rnd(dt, warp_dot(x, t * hidden, w_gu, base + (long)(inter + j) * hidden, dt, hidden));
    }
    if ((threadIdx.x & 31) == 0) st(out, dt, s * inter + j, rnd(dt, gate_act(act, g)) * u);
}

// contrib[s, j] = round(round(act[s] · down[idx[s]] row j) * wts[s]) in f32 (wts null: not
// scaled). One warp a (s, j).
extern "C" __global__ void moe_down(const void* act, const void* w_down, const int* idx, const float* wts, int dt,
                                    long slots, int hidden, int inter, float* contrib) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= slots * hidden) return;
    long s = warp / hidden;
    int j = warp % hidden;
    if (idx[s] < 0) return;  // another rank's expert: moe_combine skips it
    long base = (long)idx[s] * hidden * inter;
    float d = rnd(dt, warp_dot(act, s * inter, w_down, base + (long)j * inter, dt, inter));
    if ((threadIdx.x & 31) == 0) contrib[s * hidden + j] = wts ? rnd(dt, d * wts[s]) : d;
}

// `moe_gate_up` and `moe_down` over bf16 with 16-byte loads (hidden and inter multiples of 8,
// 16-byte aligned pointers; the launcher checks): the same roundings, one warp a (slot, row)
// reading the chosen expert's row 8 weights a lane at a time, as the dense decode GEMVs do.
// Row j of slot s's activation, its chosen expert `ex` (local id; the caller skips -1), `sc` the
// input's scale where `scaled` (sigmoid routing): one warp.
__device__ __forceinline__ void gate_up_row_bf16(const bf16_t* x, const bf16_t* w_gu, int ex, long s, int j, int top_k,
                                                 int hidden, int inter, int act, bool scaled, float sc,
                                                 bf16_t* out) {
    int lane = threadIdx.x & 31;
    const bf16_t* base = w_gu + (long)ex * 2 * inter * hidden;
    const uint4* wg = (const uint4*)(base + (long)j * hidden);
    const uint4* wu = (const uint4*)(base + (long)(inter + j) * hidden);
    const uint4* xr = (const uint4*)(x + (s / top_k) * hidden);
    float g = 0.0f, u = 0.0f;
    if (scaled) {
        for (int c = lane; c < hidden / 8; c += 32) {
            uint4 xv = xr[c];
            bf16_t* xp = (bf16_t*)&xv;
#pragma unroll
            for (int e = 0; e < 8; e++) xp[e] = f32_to_bf16(bf16_to_f32(xp[e]) * sc);
            swiglu_chunk(wg[c], wu[c], xv, g, u);
        }
    } else {
#pragma unroll 4
        for (int c = lane; c < hidden / 8; c += 32) swiglu_chunk(wg[c], wu[c], xr[c], g, u);
    }
    warp_sum2(g, u);
    if (lane == 0) {
        float gr = bf16_to_f32(f32_to_bf16(g)), ur = bf16_to_f32(f32_to_bf16(u));
        out[s * inter + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
    }
}

extern "C" __global__ void moe_gate_up_bf16(const bf16_t* x, const bf16_t* w_gu, const int* idx, long slots,
                                            int top_k, int hidden, int inter, int act, const float* scale_in,
                                            bf16_t* out) {
    pdl_enter();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= slots * inter) return;
    long s = warp / inter;
    if (idx[s] < 0) return;  // another rank's expert
    gate_up_row_bf16(x, w_gu, idx[s], s, (int)(warp % inter), top_k, hidden, inter, act, scale_in != nullptr,
                     scale_in ? scale_in[s] : 1.0f, out);
}

// contrib[s, j] of `moe_down_bf16`: one warp, slot s's chosen expert row `wr` of `inter / 8`
// 16-byte chunks, lane l's first DOWN_HELD of them (l, l + 32, ...) already loaded into `held`
// (the rest are read here), added in the order the plain loop adds them. DOWN_HELD: 4 unless
// an experiment sets it (AUTODEPLOY_KERNEL_DEFINES; 0 reads every chunk after the wait).
#ifndef DOWN_HELD
#define DOWN_HELD 4
#endif
__device__ __forceinline__ void down_row_bf16(const bf16_t* act, const uint4* wr, const uint4* held, const float* wts,
                                              long s, int j, int hidden, int inter, float* contrib) {
    int lane = threadIdx.x & 31;
    const uint4* ar = (const uint4*)(act + s * inter);
    uint4 xa[DOWN_HELD > 0 ? DOWN_HELD : 1];
#pragma unroll
    for (int i = 0; i < DOWN_HELD; i++)
        if (lane + 32 * i < inter / 8) xa[i] = ar[lane + 32 * i];
    float acc[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < DOWN_HELD; i++)
        if (lane + 32 * i < inter / 8) dot_chunk(held[i], xa[i], acc[0]);
#pragma unroll 4
    for (int c = lane + 32 * DOWN_HELD; c < inter / 8; c += 32) gemv_chunk<1>(act + s * inter, inter, wr[c], c, acc);
    float d = acc[0];
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    float dr = bf16_to_f32(f32_to_bf16(d));
    if (lane == 0) contrib[s * hidden + j] = wts ? bf16_to_f32(f32_to_bf16(dr * wts[s])) : dr;
}

// The expert ids come from the routing two launches ahead (`moe_route` or the fused router,
// then `moe_gate_up_bf16`): that gate/up kernel let this one launch only after its own
// `pdl_enter()` wait, so the routing has finished and its ids are in L2 before this kernel
// starts. A warp therefore reads its slot's expert id and its first weight chunks before its
// wait, and those loads overlap the gate/up kernel's last rows (the activations it reads after
// the wait).
extern "C" __global__ void moe_down_bf16(const bf16_t* act, const bf16_t* w_down, const int* idx, const float* wts,
                                         long slots, int hidden, int inter, float* contrib) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    bool live = warp < slots * hidden;
    long s = live ? warp / hidden : 0;
    int j = (int)(warp % hidden);
    pdl_enter_before_upstream();
    int ex = live ? __ldcg(idx + s) : -1;  // from L2: no older L1 copy
    const uint4* wr = (const uint4*)(w_down + (long)(ex < 0 ? 0 : ex) * hidden * inter + (long)j * inter);
    uint4 held[DOWN_HELD > 0 ? DOWN_HELD : 1];
#pragma unroll
    for (int i = 0; i < DOWN_HELD; i++)
        if (ex >= 0 && lane + 32 * i < inter / 8) held[i] = wr[lane + 32 * i];
    pdl_enter_after_upstream();
    if (ex < 0) return;  // past the last slot, or another rank's expert: moe_combine skips it
    down_row_bf16(act, wr, held, wts, s, j, hidden, inter, contrib);
}

// The choice (index q < top_k into a token's `ti`) of the lowest expert id above `last`, its id
// in `pe`; -1 when none is left (the rest are other ranks' experts, -1): walking a token's
// choices in ascending expert order, the order `moe_combine` adds them in.
__device__ __forceinline__ int next_choice(const int* ti, int top_k, int last, int& pe) {
    int pick = -1;
    pe = 0x7fffffff;
    for (int q = 0; q < top_k; q++) {
        int e = ti[q];
        if (e > last && e < pe) {
            pe = e;
            pick = q;
        }
    }
    return pick;
}

// ---- Grouped MoE (many tokens: from `Gpu::moe_grouped_min` slots an expert, the launcher
// picks): the slots grouped by expert first, then one warp an (expert, row) reads that row once
// for every slot routed to the expert, `MOE_GROUP` slots a pass, their inputs staged in shared
// memory, so a layer reads each chosen expert once instead of once a slot. A slot's arithmetic
// is the per-slot kernels' own (same lanes, same order), so both paths give the same bits.

// One block: `group` = [offsets (experts + 1), cursor (experts), perm (slots)]; perm lists the
// slots of expert 0, then of expert 1, ... (within an expert in no set order; each slot's output
// does not depend on it).
extern "C" __global__ void moe_group(const int* idx, long slots, int experts, int* group) {
    pdl_enter();
    int* offsets = group;
    int* cursor = group + experts + 1;
    int* perm = cursor + experts;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) cursor[e] = 0;
    __syncthreads();
    for (long s = threadIdx.x; s < slots; s += blockDim.x)
        if (idx[s] >= 0) atomicAdd(&cursor[idx[s]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int e = 0; e < experts; e++) {
            offsets[e] = total;
            total += cursor[e];
            cursor[e] = 0;
        }
        offsets[experts] = total;
    }
    __syncthreads();
    for (long s = threadIdx.x; s < slots; s += blockDim.x) {
        int e = idx[s];
        if (e >= 0) perm[offsets[e] + atomicAdd(&cursor[e], 1)] = (int)s;
    }
}

// A block of 8 warps takes 8 consecutive rows of one expert; for each `MOE_GROUP` of its slots
// the block stages their input rows in shared memory, `MOE_TILE` values at a time, and each warp
// reads its row's weights once against all of them.
#define MOE_GROUP 8
#define MOE_TILE 1024
#define MOE_ROWS 8

// Chunks c0 .. c0 + chunks (8 values each) of the input rows of the `MOE_GROUP` slots in `slot`
// (-1: none, staged as zeros) into `tile`: slot s reads row s / per_row of `src` (rows of `len`
// values: a token's x is shared by its top_k slots, an activation row is the slot's own), its
// values scaled by `scale[s]` where `scale` is set, rounded as the per-slot kernel rounds. The
// whole block calls it.
__device__ __forceinline__ void moe_stage(bf16_t (*tile)[MOE_TILE], const int* slot, const bf16_t* src, int len,
                                          int per_row, const float* scale, int c0, int chunks) {
    for (int i = threadIdx.x; i < MOE_GROUP * chunks; i += blockDim.x) {
        int m = i / chunks, c = i % chunks;
        uint4 v = {0u, 0u, 0u, 0u};
        if (slot[m] >= 0) {
            v = ((const uint4*)(src + (long)(slot[m] / per_row) * len))[c0 + c];
            if (scale) {
                float sc = scale[slot[m]];
                bf16_t* vp = (bf16_t*)&v;
#pragma unroll
                for (int q = 0; q < 8; q++) vp[q] = f32_to_bf16(bf16_to_f32(vp[q]) * sc);
            }
        }
        *(uint4*)&tile[m][c * 8] = v;
    }
}

// A grouped block's place: expert e, the warp's row j of `rows` (8 rows a block), and the
// expert's slots (`first` in perm, `n` of them).
struct MoeBlock {
    int e, j, first, n;
};
__device__ __forceinline__ MoeBlock moe_block(int rows, const int* group) {
    int blocks_e = (rows + MOE_ROWS - 1) / MOE_ROWS;
    MoeBlock b;
    b.e = blockIdx.x / blocks_e;
    b.j = (blockIdx.x % blocks_e) * MOE_ROWS + (threadIdx.x >> 5);
    b.first = group[b.e];
    b.n = group[b.e + 1] - b.first;
    return b;
}

// The slots [m0, m0 + MOE_GROUP) of the block's expert into shared `slot` (-1 past its n).
__device__ __forceinline__ void moe_slots(int* slot, const int* perm, const MoeBlock& b, int m0) {
    if (threadIdx.x < MOE_GROUP) slot[threadIdx.x] = m0 + threadIdx.x < b.n ? perm[b.first + m0 + threadIdx.x] : -1;
}

extern "C" __global__ void __launch_bounds__(256) moe_gate_up_grouped_bf16(const bf16_t* x, const bf16_t* w_gu,
                                                                           const int* group, int experts, int top_k,
                                                                           int hidden, int inter, int act,
                                                                           const float* scale_in, bf16_t* out) {
    __shared__ __align__(16) bf16_t xs[MOE_GROUP][MOE_TILE];
    __shared__ int slot[MOE_GROUP];
    pdl_enter();
    const MoeBlock b = moe_block(inter, group);
    const int e = b.e, j = b.j, lane = threadIdx.x & 31;
    const int* perm = group + 2 * experts + 1;
    bool row = j < inter;
    const bf16_t* base = w_gu + (long)e * 2 * inter * hidden;
    const uint4* wg = (const uint4*)(base + (long)j * hidden);
    const uint4* wu = (const uint4*)(base + (long)(inter + j) * hidden);
    for (int m0 = 0; m0 < b.n; m0 += MOE_GROUP) {
        __syncthreads();  // the previous group's slots are read
        moe_slots(slot, perm, b, m0);
        float g[MOE_GROUP], u[MOE_GROUP];
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) g[m] = u[m] = 0.0f;
        for (int c0 = 0; c0 < hidden / 8; c0 += MOE_TILE / 8) {
            int chunks = min(MOE_TILE / 8, hidden / 8 - c0);
            __syncthreads();  // slot[] written, the previous tile read
            moe_stage(xs, slot, x, hidden, top_k, scale_in, c0, chunks);
            __syncthreads();
            if (!row) continue;
            for (int c = lane; c < chunks; c += 32) {
                uint4 gv = wg[c0 + c], uv = wu[c0 + c];
#pragma unroll
                for (int m = 0; m < MOE_GROUP; m++) {
                    if (slot[m] < 0) break;
                    swiglu_chunk(gv, uv, *(const uint4*)&xs[m][c * 8], g[m], u[m]);
                }
            }
        }
        if (!row) continue;
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) {
            if (slot[m] < 0) break;
            warp_sum2(g[m], u[m]);
            if (lane == 0) {
                float gr = bf16_to_f32(f32_to_bf16(g[m])), ur = bf16_to_f32(f32_to_bf16(u[m]));
                out[(long)slot[m] * inter + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gate_act(act, gr))) * ur);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_down_grouped_bf16(const bf16_t* act, const bf16_t* w_down,
                                                                        const int* group, const float* wts,
                                                                        int experts, int hidden, int inter,
                                                                        float* contrib) {
    __shared__ __align__(16) bf16_t as[MOE_GROUP][MOE_TILE];
    __shared__ int slot[MOE_GROUP];
    pdl_enter();
    const MoeBlock b = moe_block(hidden, group);
    const int e = b.e, j = b.j, lane = threadIdx.x & 31;
    const int* perm = group + 2 * experts + 1;
    bool row = j < hidden;
    const uint4* wr = (const uint4*)(w_down + (long)e * hidden * inter + (long)j * inter);
    for (int m0 = 0; m0 < b.n; m0 += MOE_GROUP) {
        __syncthreads();
        moe_slots(slot, perm, b, m0);
        float acc[MOE_GROUP];
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) acc[m] = 0.0f;
        for (int c0 = 0; c0 < inter / 8; c0 += MOE_TILE / 8) {
            int chunks = min(MOE_TILE / 8, inter / 8 - c0);
            __syncthreads();
            moe_stage(as, slot, act, inter, 1, nullptr, c0, chunks);
            __syncthreads();
            if (!row) continue;
            for (int c = lane; c < chunks; c += 32) {
                uint4 wv = wr[c0 + c];
#pragma unroll
                for (int m = 0; m < MOE_GROUP; m++) {
                    if (slot[m] < 0) break;
                    gemv_chunk<1>(as[m], MOE_TILE, wv, c, &acc[m]);
                }
            }
        }
        if (!row) continue;
#pragma unroll
        for (int m = 0; m < MOE_GROUP; m++) {
            if (slot[m] < 0) break;
            float d = acc[m];
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            float dr = bf16_to_f32(f32_to_bf16(d));
            if (lane == 0) contrib[(long)slot[m] * hidden + j] = wts ? bf16_to_f32(f32_to_bf16(dr * wts[slot[m]])) : dr;
        }
    }
}

// y[t, j] = the token's contributions summed in ascending expert order, each sum rounded to dt.
// Up to `COMBINE_HELD` choices a token: each one's rank among them (the experts a token chose
// are distinct) and its contribution are loaded first, all loads in flight together; more
// choices find the next expert by search, one load at a time.
#define COMBINE_HELD 16
// The search: the token's choices `ti` walked in ascending expert order by `next_choice`.
__device__ float combine_by_search(const float* contrib, const int* ti, int dt, long t, int top_k, int hidden, int j) {
    float acc = 0.0f;
    int last = -1;
    for (int k = 0; k < top_k; k++) {
        int pe;
        int pick = next_choice(ti, top_k, last, pe);
        if (pick < 0) break;  // the rest are other ranks' experts
        acc = rnd(dt, acc + contrib[(t * top_k + pick) * hidden + j]);
        last = pe;
    }
    return acc;
}

// A token's choices `ti` (top_k <= COMBINE_HELD) as the sum walks them: each one's expert id
// (past top_k none, INT_MAX) and its rank, how many of the others hold a lower id (the experts a
// token chose are distinct). The ids from L2 (`__ldcg`): `moe_combine` reads them before its wait.
__device__ __forceinline__ void combine_order(const int* ti, int top_k, int* e, int* rank) {
#pragma unroll
    for (int q = 0; q < COMBINE_HELD; q++) e[q] = q < top_k ? __ldcg(ti + q) : 0x7fffffff;
#pragma unroll
    for (int q = 0; q < COMBINE_HELD; q++) {
        rank[q] = 0;
#pragma unroll
        for (int p = 0; p < COMBINE_HELD; p++) rank[q] += e[p] < e[q];
    }
}

// The sum over choices held by `combine_order`: every contribution loaded first, all loads in
// flight together, then added in rank order.
__device__ __forceinline__ float combine_held(const float* contrib, const int* e, const int* rank, int dt, long t,
                                              int top_k, int hidden, int j) {
    float c[COMBINE_HELD];
#pragma unroll
    for (int q = 0; q < COMBINE_HELD; q++)
        // Another rank's expert (-1) adds nothing.
        c[q] = q < top_k && e[q] >= 0 ? contrib[(t * top_k + q) * hidden + j] : 0.0f;
    float acc = 0.0f;
#pragma unroll
    for (int r = 0; r < COMBINE_HELD; r++) {
        if (r >= top_k) break;
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < COMBINE_HELD; q++) v = rank[q] == r ? c[q] : v;
        acc = rnd(dt, acc + v);
    }
    return acc;
}

// The expert ids come from the routing three launches ahead (then gate/up and down), so a
// token's order is worked out before the wait (common.cuh's `pdl_enter`: what a kernel two or
// more launches ahead wrote); the contributions, the launch just before's, after it.
extern "C" __global__ void moe_combine(const float* contrib, const int* idx, int dt, long tokens, int top_k, int hidden,
                                       void* y) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    bool live = i < tokens * hidden, held = top_k <= COMBINE_HELD;
    long t = live ? i / hidden : 0;
    int e[COMBINE_HELD], rank[COMBINE_HELD];
    pdl_enter_before_upstream();
    if (live && held) combine_order(idx + t * top_k, top_k, e, rank);
    pdl_enter_after_upstream();
    if (!live) return;
    int j = (int)(i % hidden);
    float v = held ? combine_held(contrib, e, rank, dt, t, top_k, hidden, j)
                   : combine_by_search(contrib, idx + t * top_k, dt, t, top_k, hidden, j);
    st(y, dt, i, v);
}
