// Sampling on the GPU, with the CPU sampler's semantics (core/src/sampling.rs) so a seeded
// request picks the same token on either device: scores s = x/T; top-k keeps the first k in
// descending order (ties: lower index first), top-p the shortest such prefix whose softmax mass
// reaches top_p; the token is the first kept one in index order whose cumulative mass exceeds
// u·(kept mass), u the runtime's uniform draw. T <= 0 is argmax. One block per row, nothing
// sorted: without top-k/top-p a row takes a max pass and one scan over contiguous chunks; the
// cuts are thresholds on a 64-bit order key (the score's bits, then the inverted index) found
// by a radix select over the score's 32 bits (digits of 11, 11 and 10 bits) and, where scores
// tie, a scan in index order. Masses are exp(s - max) in 2^-40 fixed point, so every sum is
// exact and the same whatever order the additions land in.
struct RowSampling {
    float temperature;
    int top_k;
    float top_p;
    float u;
};

#define SAMPLE_BINS 2048

__device__ __forceinline__ unsigned int score_key(float s) {
    unsigned int b = __float_as_uint(s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long order_key(float s, int i) {
    return ((unsigned long long)score_key(s) << 32) | (unsigned int)(0xffffffffu - (unsigned int)i);
}

__device__ __forceinline__ float sample_score(const void* logits, int dt, long at, float t) {
    float x = dt == 0 ? ((const float*)logits)[at] : bf16_to_f32(((const bf16_t*)logits)[at]);
    return t > 0.0f ? x / t : x;
}

// exp(s - mx) in 2^-40 units: at most 2^40, so a vocabulary of 2^21 sums without overflow.
__device__ __forceinline__ unsigned long long fixed_mass(float s, float mx) {
    return (unsigned long long)(expf(s - mx) * 1099511627776.0f);
}

__device__ float block_max_f(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : -3.0e38f;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

__device__ unsigned long long block_min_u64(unsigned long long v) {
    __shared__ unsigned long long part[32];
    __shared__ unsigned long long total;
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w < v ? w : v;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : ~0ull;
        for (int o = 16; o > 0; o >>= 1) {
            unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
            v = w < v ? w : v;
        }
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// Integer sums over the block (exact, so the same in any order).
__device__ unsigned long long block_sum_u64(unsigned long long v) {
    __shared__ unsigned long long part[32];
    __shared__ unsigned long long total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0ull;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// Exclusive prefix sum over the block in thread order (exact for integers); every thread also
// gets the total.
template <typename T>
__device__ T block_scan(T v, T* total_out) {
    __shared__ T part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (int)(blockDim.x >> 5);
    T x = v;
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) part[warp] = x;
    __syncthreads();
    if (warp == 0) {
        T w = lane < warps ? part[lane] : (T)0;
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        part[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    T before = (warp > 0 ? part[warp - 1] : (T)0) + x - v;
    *total_out = part[warps - 1];
    __syncthreads();
    return before;
}

__device__ __forceinline__ bool reaches(unsigned long long w, double target, bool strict) {
    double x = (double)w;
    return strict ? x > target : x >= target;
}

// What a row's search reads: its logits, temperature, max score, and where the kept keys start.
struct SampleRow {
    const void* logits;
    int dt;
    long base;
    int vocab;
    float t;
    float mx;
};

__device__ __forceinline__ unsigned long long bin_weight(const unsigned int* p0, const unsigned int* p1,
                                                         const unsigned int* p2, const unsigned int* p3, int j) {
    return (unsigned long long)p0[j] + ((unsigned long long)p1[j] << 11) + ((unsigned long long)p2[j] << 22) +
           ((unsigned long long)p3[j] << 33);
}

__device__ __forceinline__ unsigned long long row_weight(const SampleRow& r, float s, bool count) {
    return count ? 1ull : fixed_mass(s, r.mx);
}

// The weight of the keys >= lo: their count or their fixed-point mass.
__device__ unsigned long long kept_weight(const SampleRow& r, unsigned long long lo, bool count) {
    unsigned long long acc = 0;
    for (int i = threadIdx.x; i < r.vocab; i += blockDim.x) {
        float s = sample_score(r.logits, r.dt, r.base + i, r.t);
        if (order_key(s, i) >= lo) acc += row_weight(r, s, count);
    }
    return block_sum_u64(acc);
}

// The largest key c such that W(c), the weight of the keys >= max(c, lo), reaches `target`
// (`strict`: exceeds it); the returned c may be any key that cuts the same set. `lo` when none
// does (the CPU's fallback: the last kept token).
__device__ unsigned long long radix_threshold(const SampleRow& r, unsigned long long lo, bool count, double target,
                                              bool strict) {
    // A bin's weight in four 32-bit parts of 11 bits (the last 8: w <= 2^40), as 64-bit
    // shared-memory atomics are compare-and-swap loops and 32-bit adds are native; a part summed
    // over a vocabulary of up to 2^21 fits.
    __shared__ unsigned int part0[SAMPLE_BINS], part1[SAMPLE_BINS], part2[SAMPLE_BINS], part3[SAMPLE_BINS];
    __shared__ unsigned int cnt[SAMPLE_BINS];
    __shared__ int s_digit;
    __shared__ unsigned long long s_above;
    __shared__ unsigned int s_count;
    const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    unsigned int prefix = 0;       // the score-key digits found so far
    unsigned long long above = 0;  // the weight of kept keys above the prefix's range
    int lane = threadIdx.x & 31;
    for (int level = 0; level < 3; level++) {
        int shift = shifts[level], bins = 1 << widths[level];
        unsigned int hi_mask = level == 0 ? 0u : ~0u << (shift + widths[level]);
        for (int j = threadIdx.x; j < bins; j += blockDim.x) {
            part0[j] = 0;
            part1[j] = 0;
            part2[j] = 0;
            part3[j] = 0;
            cnt[j] = 0;
        }
        __syncthreads();
        // Warp-uniform trip count, so the whole warp meets at the match below.
        for (int i0 = 0; i0 < r.vocab; i0 += blockDim.x) {
            int i = i0 + threadIdx.x;
            int d = -1;
            unsigned long long w = 0;
            if (i < r.vocab) {
                float s = sample_score(r.logits, r.dt, r.base + i, r.t);
                unsigned int sk = score_key(s);
                if (order_key(s, i) >= lo && (sk & hi_mask) == prefix) {
                    d = (int)((sk >> shift) & (unsigned int)(bins - 1));
                    w = row_weight(r, s, count);
                }
            }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
            // One atomic per part and distinct digit in the warp: the lanes sharing a digit add
            // first (w <= 2^40).
            unsigned int peers = __match_any_sync(0xffffffffu, d);
            unsigned int s0 = __reduce_add_sync(peers, (unsigned int)(w & 0x7ffull));
            unsigned int s1 = __reduce_add_sync(peers, (unsigned int)((w >> 11) & 0x7ffull));
            unsigned int s2 = __reduce_add_sync(peers, (unsigned int)((w >> 22) & 0x7ffull));
            unsigned int s3 = __reduce_add_sync(peers, (unsigned int)(w >> 33));
            if (d >= 0 && lane == __ffs(peers) - 1) {
                atomicAdd(&part0[d], s0);
                atomicAdd(&part1[d], s1);
                atomicAdd(&part2[d], s2);
                atomicAdd(&part3[d], s3);
                atomicAdd(&cnt[d], (unsigned int)__popc(peers));
            }
#else
            if (d >= 0) {
                atomicAdd(&part0[d], (unsigned int)(w & 0x7ffull));
                atomicAdd(&part1[d], (unsigned int)((w >> 11) & 0x7ffull));
                atomicAdd(&part2[d], (unsigned int)((w >> 22) & 0x7ffull));
                atomicAdd(&part3[d], (unsigned int)(w >> 33));
                atomicAdd(&cnt[d], 1u);
            }
#endif
        }
        __syncthreads();
        // Warp 0 finds the largest digit whose bin (with everything above it) reaches the
        // target: each lane sums a run of bins, a suffix scan across lanes finds the lane, that
        // lane walks its run.
        if (threadIdx.x < 32) {
            int per = bins / 32, first = lane * per;
            unsigned long long own = 0;
            for (int j = 0; j < per; j++) own += bin_weight(part0, part1, part2, part3, first + j);
            unsigned long long incl = own;  // the weight of this lane's bins and every lane's above
            for (int o = 1; o < 32; o <<= 1) {
                unsigned long long y = __shfl_down_sync(0xffffffffu, incl, o);
                if (lane + o < 32) incl += y;
            }
            unsigned int sat = __ballot_sync(0xffffffffu, reaches(above + incl, target, strict));
            if (lane == 0) s_digit = -1;
            __syncwarp();
            if (sat != 0u && lane == 31 - __clz(sat)) {
                unsigned long long acc = above + incl - own;
                for (int j = per - 1; j >= 0; j--) {
                    unsigned long long m = bin_weight(part0, part1, part2, part3, first + j);
                    if (cnt[first + j] > 0 && reaches(acc + m, target, strict)) {
                        s_digit = first + j;
                        s_above = acc;
                        s_count = cnt[first + j];
                        break;
                    }
                    acc += m;
                }
            }
        }
        __syncthreads();
        int digit = s_digit;
        unsigned int n = s_count;
        above = s_above;
        __syncthreads();
        if (digit < 0) return lo;
        prefix |= (unsigned int)digit << shift;
        unsigned long long cut = (unsigned long long)prefix << 32;  // the lowest key of the prefix
        if (n == 1) return cut > lo ? cut : lo;
        if (level < 2) continue;
        // `n` kept keys share the score `prefix`, each of weight m; the j-th of them (ascending
        // index) is the cut, j the fewest that reach the target.
        float s_tie = 0.0f;
        {
            unsigned int b = prefix & 0x80000000u ? prefix & 0x7fffffffu : ~prefix;
            s_tie = __uint_as_float(b);
        }
        unsigned long long m = row_weight(r, s_tie, count);
        // The estimate, then exact steps (it can be off by one in double rounding).
        double est = m > 0 ? (target - (double)above) / (double)m : (double)n;
        est = strict ? floor(est) + 1.0 : ceil(est);
        unsigned int j = est > (double)n ? n : (est < 1.0 ? 1u : (unsigned int)est);
        while (j < n && !reaches(above + (unsigned long long)j * m, target, strict)) j++;
        while (j > 1 && reaches(above + (unsigned long long)(j - 1) * m, target, strict)) j--;
        // The j-th tie in index order: each thread counts a contiguous chunk, a scan finds the
        // chunk, its thread walks it.
        int chunk = (r.vocab + (int)blockDim.x - 1) / (int)blockDim.x;
        int from = (int)threadIdx.x * chunk, to = min(from + chunk, r.vocab);
        unsigned int mine = 0;
        for (int i = from; i < to; i++) {
            float s = sample_score(r.logits, r.dt, r.base + i, r.t);
            if (score_key(s) == prefix && order_key(s, i) >= lo) mine++;
        }
        unsigned int total;
        unsigned int before = block_scan(mine, &total);
        __shared__ unsigned long long s_cut;
        if (threadIdx.x == 0) s_cut = lo;
        __syncthreads();
        if (before < j && j <= before + mine) {
            unsigned int seen = before;
            for (int i = from; i < to; i++) {
                float s = sample_score(r.logits, r.dt, r.base + i, r.t);
                unsigned long long k = order_key(s, i);
                if (score_key(s) == prefix && k >= lo && ++seen == j) {
                    s_cut = k;
                    break;
                }
            }
        }
        __syncthreads();
        return s_cut;
    }
    return lo;
}

extern "C" __global__ void sample_rows(const void* logits, int dt, const RowSampling* params, long long* out,
                                       int vocab) { pdl_enter();
    long row = blockIdx.x;
    RowSampling p = params[row];
    SampleRow r = {logits, dt, row * (long)vocab, vocab, p.temperature, 0.0f};
    if (!(r.t > 0.0f)) {
        // Argmax: the largest key.
        unsigned long long best = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned long long k = order_key(sample_score(logits, dt, r.base + i, 0.0f), i);
            best = k > best ? k : best;
        }
        best = ~block_min_u64(~best);
        if (threadIdx.x == 0) out[row] = (long long)(0xffffffffu - (unsigned int)(best & 0xffffffffu));
        return;
    }
    float mx = -3.0e38f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, sample_score(logits, dt, r.base + i, r.t));
    r.mx = block_max_f(mx);
    // The kept set: keys >= lo (top-k, then top-p, cut in descending order).
    unsigned long long lo = 0;
    if (p.top_k > 0 && p.top_k < vocab) lo = radix_threshold(r, 0ull, true, (double)p.top_k, false);
    if (p.top_p < 1.0f) {
        // The shortest prefix whose mass reaches top_p: the largest cut that still keeps it.
        unsigned long long z = kept_weight(r, lo, false);
        unsigned long long c = radix_threshold(r, lo, false, (double)p.top_p * (double)z, false);
        if (c > lo) lo = c;
    }
    // The first kept token in index order whose cumulative mass exceeds u·(kept mass): each
    // thread sums a contiguous chunk, a scan finds the chunk, its thread walks it.
    int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    int from = (int)threadIdx.x * chunk, to = min(from + chunk, vocab);
    unsigned long long mine = 0;
    int last = -1;
    for (int i = from; i < to; i++) {
        float s = sample_score(logits, dt, r.base + i, r.t);
        if (order_key(s, i) >= lo) {
            mine += fixed_mass(s, r.mx);
            last = i;
        }
    }
    unsigned long long z;
    unsigned long long before = block_scan(mine, &z);
    double target = (double)p.u * (double)z;
    __shared__ int s_pick;
    if (threadIdx.x == 0) s_pick = -1;
    __syncthreads();
    if (!((double)before > target) && (double)(before + mine) > target) {
        unsigned long long acc = before;
        for (int i = from; i < to; i++) {
            float s = sample_score(logits, dt, r.base + i, r.t);
            if (order_key(s, i) >= lo) {
                acc += fixed_mass(s, r.mx);
                if ((double)acc > target) {
                    s_pick = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    int pick = s_pick;
    if (pick < 0) {
        // u·z rounded up to z: the last kept token, as the CPU does.
        unsigned long long k = last < 0 ? ~0ull : ~(unsigned long long)last;
        pick = (int)~block_min_u64(k);
    }
    if (threadIdx.x == 0) out[row] = pick;
}
