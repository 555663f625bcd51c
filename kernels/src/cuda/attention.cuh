// Shared by attention.cu (KV writes, ragged paged attention, tensor-core prefill, RoPE + KV
// write, slot attention) and decode.cu (the split-KV decode builds), each compiled as its own
// NVRTC modules (and again with KV_FP8_BUILDS defined, for an FP8 cache) after this header.
//
// Attention over a paged KV cache, the page table in CSR form (FlashInfer's layout):
// sequence s owns pages page_indices[page_indptr[s] .. page_indptr[s+1]]; position p of s lives
// in slot page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size of the caches
// [slot, kv_heads, D]. q and out are [heads, tokens, D]; this step's k/v [kv_heads, tokens, D].
// Each query token t of sequence token_seq[t] at position token_pos[t] attends causally to its
// positions 0..=token_pos[t] (ragged batches: prefill and decode tokens mixed in one step).


// The slot of position p of a sequence whose pages are `pages` (its run of page_indices): the
// division in 32 bits (positions stay below MAX_SEQ_LEN = 2^24 and the page size is an int),
// as a 64-bit one is a long instruction sequence, paid for every position a kernel reads.
__device__ __forceinline__ long kv_slot(const int* pages, long long p, int page_size) {
    int pi = (int)p, pg = pi / page_size;
    return (long)pages[pg] * page_size + (pi - pg * page_size);
}

// The chunk of the split-KV decode's `splits` for a token at position `pos`: the planned
// `chunk` (`Split::plan`: the fewest positions worth a block) while chunk · splits positions
// cover the token's, else the least multiple of it that does. The grid (splits blocks a head)
// stays fixed, so a captured graph replays as sequences grow, and a short sequence is cut as
// finely as a long one allows, whatever the longest sequence the engine was planned for.
// (In 32 bits, as `kv_slot` divides: positions stay below 2^24, and chunk · splits covers
// at most that and a chunk.)
__device__ __forceinline__ int token_chunk(int chunk, int splits, long long pos) {
    return chunk * ((int)pos / (chunk * splits) + 1);
}

//
// The cache holds C: the model's dtype T, or fp8_t. An FP8 cache (`kv_cache_dtype = "fp8"`)
// holds one E4M3 code a value, of x / k_scale for keys and x / v_scale for values (one scale
// each a layer: `ks`, `vs`). The kernels read codes as their values (exact in f32) and apply
// the scales outside their loops over positions: k_scale with the score scale, v_scale to the
// output (the CPU's reference reads K and V as e4m3(x / s) · s). With C = T the scales are 1
// and nothing rounds: the same arithmetic, bit for bit.
struct fp8_t {
    unsigned char c;
};
__device__ __forceinline__ float load_f(const fp8_t* p, long i) { return e4m3_value(p[i].c); }
template <typename C>
struct is_fp8 {
    static constexpr bool value = false;
};
template <>
struct is_fp8<fp8_t> {
    static constexpr bool value = true;
};
// Eight of a cache's values as loaded: 16 bytes of bf16, 8 of E4M3 codes.
template <typename C>
struct kv_raw8 {
    using type = uint4;
};
template <>
struct kv_raw8<fp8_t> {
    using type = uint2;
};
// A key or value in cache C's units: for E4M3 the value of the code of x / s.
template <typename C>
__device__ __forceinline__ float kv_units(float x, float s) {
    if constexpr (is_fp8<C>::value)
        return e4m3_round(x / s);
    else
        return x;
}
// A value already in cache C's units (`kv_units`) into slot i.
__device__ __forceinline__ void put_units(float* p, long i, float u) { p[i] = u; }
__device__ __forceinline__ void put_units(bf16_t* p, long i, float u) { store_f(p, i, u); }
__device__ __forceinline__ void put_units(fp8_t* p, long i, float u) { p[i].c = e4m3_code_of(u); }
template <typename C>
__device__ __forceinline__ void put_kv(C* p, long i, float x, float s) {
    put_units(p, i, kv_units<C>(x, s));
}
// `N` consecutive values (a lane's share of a head row) as f32: one 8- or 16-byte load for
// bf16 rows of 4 or 8, one 16-byte load for f32 rows of 4, else element by element. Callers'
// offsets are multiples of N (rows start at multiples of the head dim). (The decode builds'
// lanes and `rope_write_kv`'s 16-byte-aligned rows.)
template <int N>
__device__ __forceinline__ void load_row(const bf16_t* p, float* out) {
    if constexpr (N == 4) {
        uint2 v = *(const uint2*)p;
        const bf16_t* h = (const bf16_t*)&v;
#pragma unroll
        for (int i = 0; i < 4; i++) out[i] = bf16_to_f32(h[i]);
    } else if constexpr (N == 8) {
        uint4 v = *(const uint4*)p;
        const bf16_t* h = (const bf16_t*)&v;
#pragma unroll
        for (int i = 0; i < 8; i++) out[i] = bf16_to_f32(h[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) out[i] = bf16_to_f32(p[i]);
    }
}
template <int N>
__device__ __forceinline__ void load_row(const float* p, float* out) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            float4 v = *(const float4*)(p + i);
            out[i] = v.x;
            out[i + 1] = v.y;
            out[i + 2] = v.z;
            out[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) out[i] = p[i];
    }
}

// Code j of a word of E4M3 codes (lowest byte first) as f32 by integer operations: its byte to
// the top of a word, an arithmetic shift by 4 (its sign to bit 31, exponent and mantissa under
// f32's at bits 26..20), a mask: `e4m3_value`'s bits, i.e. its value times 2^-120 (subnormal
// codes through f32 subnormals, which NVRTC keeps: no flush to zero). Two or three integer
// instructions a value, where the hardware's `e4m3x4` takes one and a half conversions a value,
// which sm_90 runs at a quarter of its integer rate; the decode builds convert every cached K
// and V value they read, once a query head. The same values (NaN codes aside: a cache holds
// none, its writes saturate).
__device__ __forceinline__ float e4m3_raw(unsigned int w, int j) {
    return __uint_as_float((unsigned int)((int)(w << (24 - 8 * j)) >> 4) & 0x87f00000u);
}

// Raw units: `paged_decode_split` reads an FP8 cache's codes as `e4m3_raw`'s bits (value times
// 2^-120: no multiply a value) and scales q and the softmax weights by `RawUnits<C>::pre` and
// the dot products and output by `post` instead: powers of two, so every product and sum rounds
// as in units (bar products under 2^-70, which now round as f32 subnormals), one multiply a
// position where there was one a value. Other caches' units are their values.
template <typename C>
struct RawUnits {
    static constexpr float pre = 1.0f, post = 1.0f, unit = 1.0f;
};
template <>
struct RawUnits<fp8_t> {
    // 2^64 before, 2^56 after: 2^64 · 2^-120 · 2^56 = 1.
    static constexpr float pre = 1.8446744073709552e19f, post = 7.205759403792794e16f, unit = 7.52316384526264e-37f;
};

// N codes as f32: their values, or (RAW) in raw units. Four codes a word (`e4m3_raw`) where N
// allows.
template <int N, bool RAW>
__device__ __forceinline__ void load_fp8_row(const fp8_t* p, float* out) {
    const unsigned char* b = (const unsigned char*)p;
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            unsigned int w = *(const unsigned int*)(b + i);
#pragma unroll
            for (int j = 0; j < 4; j++)
                out[i + j] = RAW ? e4m3_raw(w, j) : e4m3_raw(w, j) * 1.329227995784916e36f;  // 2^120
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++)
            out[i] = RAW ? e4m3_value(b[i]) * RawUnits<fp8_t>::unit : e4m3_value(b[i]);
    }
}
template <int N>
__device__ __forceinline__ void load_row(const fp8_t* p, float* out) {
    load_fp8_row<N, false>(p, out);
}
// `load_row` in raw units (`RawUnits`).
template <int N, typename C>
__device__ __forceinline__ void load_row_raw(const C* p, float* out) {
    load_row<N>(p, out);
}
template <int N>
__device__ __forceinline__ void load_row_raw(const fp8_t* p, float* out) {
    load_fp8_row<N, true>(p, out);
}

// Four consecutive values at p (4-element aligned: one 8-byte store for bf16, 16 for f32),
// each rounded to T.
__device__ __forceinline__ void store_row4(bf16_t* p, const float* v) {
    uint2 w;
    w.x = (unsigned)f32_to_bf16(v[0]) | ((unsigned)f32_to_bf16(v[1]) << 16);
    w.y = (unsigned)f32_to_bf16(v[2]) | ((unsigned)f32_to_bf16(v[3]) << 16);
    *(uint2*)p = w;
}
__device__ __forceinline__ void store_row4(float* p, const float* v) { *(float4*)p = make_float4(v[0], v[1], v[2], v[3]); }

// The entry points' extra parameters for each cache: none for the model's dtype (scales 1),
// the layer's k_scale and v_scale for an FP8 cache.
#define KV_plain_PARAMS
#define KV_plain_ARGS 1.0f, 1.0f
#define KV_fp8_PARAMS , float ks, float vs
#define KV_fp8_ARGS ks, vs
// (mma_bf16, the m16n8k16 bf16 tensor-core step, is common.cuh's.)
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ unsigned pack_raw(bf16_t lo, bf16_t hi) { return (unsigned)lo | ((unsigned)hi << 16); }

// Two f32 that bf16 holds exactly (an E4M3 code's value: at most 4 significant bits, exponents
// -9..8) as packed bf16: their top halves, one byte permute, no rounding (pack_bf16 rounds and
// checks for NaN, which cost several instructions a value on the FP8 cache's hot path).
__device__ __forceinline__ unsigned pack_exact_bf16(float lo, float hi) {
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}
// Eight E4M3 codes (8-byte aligned) as eight bf16, which hold their values exactly.
__device__ __forceinline__ uint4 fp8x8_as_bf16(uint2 w) {
    float f[8];
    e4m3x4(w.x, f);
    e4m3x4(w.y, f + 4);
    return make_uint4(pack_exact_bf16(f[0], f[1]), pack_exact_bf16(f[2], f[3]), pack_exact_bf16(f[4], f[5]),
                      pack_exact_bf16(f[6], f[7]));
}
__device__ __forceinline__ uint4 fp8x8_as_bf16(const fp8_t* p) { return fp8x8_as_bf16(*(const uint2*)p); }
