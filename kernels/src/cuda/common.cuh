// Shared by every kernel source (prepended by the loader): dtype helpers without CUDA headers,
// so NVRTC needs no include path. bf16 is the top half of an f32; f32 -> bf16 rounds to
// nearest-even, as torch does.
typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float load_f(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void store_f(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(bf16_t* p, long i, float v) { p[i] = f32_to_bf16(v); }
// What storing then loading `v` as T gives (torch rounds each op's result to its dtype).
__device__ __forceinline__ float round_as(const float*, float v) { return v; }
__device__ __forceinline__ float round_as(const bf16_t*, float v) { return bf16_to_f32(f32_to_bf16(v)); }

// The value of an E4M3 code (not NaN: weights and saturated activations have none).
__device__ __forceinline__ float e4m3_value(unsigned int c) {
    // As f32 bits: the sign to bit 31, exponent and mantissa under f32's (bias 127 vs 7);
    // subnormal codes become f32 subnormals (NVRTC keeps them: no -ftz), then times 2^120.
    unsigned int bits = ((c & 0x80u) << 24) | ((c & 0x7fu) << 20);
    return __uint_as_float(bits) * 1.329227995784916e36f;  // 2^120
}

// The nearest E4M3 code's value (ties to even, saturating at ±448), as torch's
// `clamp(-448, 448).to(float8_e4m3fn)` and the CPU's `f32_to_e4m3`.
__device__ __forceinline__ float e4m3_round(float v) {
    float a = fminf(fabsf(v), 448.0f);
    float r;
    if (a < 0.015625f) {
        r = rintf(a * 512.0f) * 0.001953125f;  // subnormal steps of 2^-9
    } else {
        int e;
        frexpf(a, &e);  // a = f · 2^e, f in [0.5, 1)
        float step = ldexpf(1.0f, e - 4);
        r = rintf(a / step) * step;
    }
    return copysignf(r, v);
}

// Four E4M3 codes of a 32-bit word (lowest byte first) as f32.
__device__ __forceinline__ void e4m3x4(unsigned int w, float* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned int lo, hi;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
    unsigned short h[4] = {(unsigned short)(lo & 0xffffu), (unsigned short)(lo >> 16), (unsigned short)(hi & 0xffffu),
                           (unsigned short)(hi >> 16)};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h[j]));
        out[j] = f;
    }
#else
#pragma unroll
    for (int j = 0; j < 4; j++) out[j] = e4m3_value((w >> (8 * j)) & 0xffu);
#endif
}

// The E4M3 code (a byte) of a value E4M3 represents exactly (`e4m3_round`'s results).
__device__ __forceinline__ unsigned char e4m3_code_of(float r) {
    unsigned int bits = __float_as_uint(r);
    unsigned int sign = (bits >> 24) & 0x80u;
    float a = fabsf(r);
    if (a < 0.015625f) return (unsigned char)(sign | (unsigned int)(a * 512.0f));  // subnormal: steps of 2^-9
    unsigned int e = ((bits >> 23) & 0xffu) - 127u + 7u;                          // E4M3 bias 7
    return (unsigned char)(sign | (e << 3) | ((bits >> 20) & 7u));
}

// The code of the nearest E4M3 value to v (ties to even, saturating): the CPU's `f32_to_e4m3`.
__device__ __forceinline__ unsigned char e4m3_code_rn(float v) {
    return v != v ? (unsigned char)0x7f : e4m3_code_of(e4m3_round(v));  // NaN: the CPU's NaN code
}

// The codes (`e4m3_code_rn`) of eight bf16 values divided by s, the lowest index in the lowest
// byte: what the 8-wide kernels writing FP8 codes store.
// On sm_89+ by the hardware's conversion (round to nearest even, saturating to ±448: the same
// codes, as `e4m3_pack16`'s, which cuda_check holds to the CPU's).
__device__ __forceinline__ uint2 e4m3x8_codes(const bf16_t* v, float s) {
    unsigned int q[2] = {0u, 0u};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
        unsigned short two;
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(two) : "f"(bf16_to_f32(v[k + 1]) / s), "f"(bf16_to_f32(v[k]) / s));
        q[k / 4] |= (unsigned int)two << (8 * (k % 4));
    }
#else
#pragma unroll
    for (int k = 0; k < 8; k++) q[k / 4] |= (unsigned int)e4m3_code_rn(bf16_to_f32(v[k]) / s) << (8 * (k % 4));
#endif
    return make_uint2(q[0], q[1]);
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets
// the total.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < (int)(blockDim.x >> 5)) ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// Programmatic dependent launch (sm_90+; the executor launches with programmatic stream
// serialization, see exec.rs): first thing in every executor kernel, wait until the kernels
// before it in the stream have finished and their writes are visible, then let the next kernel
// start launching, so its launch and block scheduling overlap this kernel's run. Before it a
// kernel may only read memory that nothing in the step writes (weights, the KV cache below each
// sequence's cached length, the step metadata uploaded before the step), or what a kernel two
// or more launches ahead wrote (the launch just before let this one start only after its own
// wait, so every kernel before that one has finished: the MoE down and combine kernels'
// expert ids, read from L2 by `__ldcg` so no stale L1 copy answers), and write nothing. A
// no-op before sm_90 and for ordinary launches.
// PDL_TRIGGER_FIRST (an experiment define, AUTODEPLOY_KERNEL_DEFINES): let the next kernel
// launch before waiting, so it can start once every block of this one has started, and its own
// pre-wait weight loads overlap this kernel's predecessor too. Still correct: a kernel cannot
// complete before its own wait returned, so each wait still covers every kernel before it; but
// a launch no longer implies that the kernel two ahead has finished, so the kernels that read
// its output before their wait wait first under it (`pdl_enter_before_upstream`).
// The wait and the trigger in the order `trigger_first` says (uniform across the grid).
__device__ __forceinline__ void pdl_sequence(bool trigger_first) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (trigger_first) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!trigger_first) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#ifdef PDL_TRIGGER_FIRST
#define PDL_ALWAYS_TRIGGER_FIRST true
#else
#define PDL_ALWAYS_TRIGGER_FIRST false
#endif
__device__ __forceinline__ void pdl_enter() { pdl_sequence(PDL_ALWAYS_TRIGGER_FIRST); }

// `pdl_enter` with the trigger first where `first` (uniform across the grid): the next kernel
// may launch once every block of this one has started, before this one waits. Correct for the
// same reason as PDL_TRIGGER_FIRST, provided the next kernel reads nothing but weights before
// its own wait (a GEMV): `rmsnorm_bf16x8` writing FP8 codes for the FP8 GEMV after it.
__device__ __forceinline__ void pdl_enter_trigger_first(bool first) {
    pdl_sequence(first || PDL_ALWAYS_TRIGGER_FIRST);
}

// Around a kernel's reads of what a kernel two or more launches ahead wrote (see `pdl_enter`):
// with the default order they go between these two, before the wait; under PDL_TRIGGER_FIRST,
// where a launch no longer implies those kernels finished, after it.
__device__ __forceinline__ void pdl_enter_before_upstream() {
#ifdef PDL_TRIGGER_FIRST
    pdl_enter();
#endif
}
__device__ __forceinline__ void pdl_enter_after_upstream() {
#ifndef PDL_TRIGGER_FIRST
    pdl_enter();
#endif
}

// A gated MLP's activation of its gate (`GateAct`): 0 silu, 1 gelu (tanh approximation), 2 gelu
// (erf). SiLU by the fast exp and divide (within a few ulps of f32 of the IEEE forms, far under
// a bf16 rounding's 2^16, where those take tens of instructions a value in kernels meant to
// stream bytes); every kernel computing it calls this, so fused and unfused builds stay
// bit-equal.
__device__ __forceinline__ float gate_act(int act, float g) {
    return act == 0   ? __fdividef(g, 1.0f + __expf(-g))
           : act == 1 ? 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)))
                      : 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
}

// Whether this block is the last of `active` blocks to finish (then it re-arms `counter` for the
// next launch): called by the whole block after it stored its part (decode.cu's split-KV chunks,
// moe.cu's router rows). The
// block's stores are ordered before thread 0's release (the barrier, then a gpu-scope acq_rel
// atomic); the last block's acquire makes every chunk's visible to it.
__device__ __forceinline__ bool last_to_finish(int* counter, int active) {
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        int before;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        last = before == active - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

// Asks L2 for the first `bytes` at `p` (128-byte lines, the warp's lanes taking turns). The
// GEMVs call it for their weight rows before `pdl_enter()`: weights are never written during a
// step, so under programmatic dependent launch a GEMV's first weight reads are under way while
// the kernels ahead run. Only the head of each row (`Gpu::prefetch_row`, at most the row, 1 KiB
// by default): on an H200 whole rows made the 8B decode step 24% slower, a budget of 16-32 MB
// a kernel made it slower too, and 2 KiB a row slowed the GEMVs alone.
__device__ __forceinline__ void prefetch_l2(const void* p, long bytes, int lane) {
    for (long off = (long)lane * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)p + off));
}

// Asks this SM's L1 for the line holding `p` (a hint: no register waits on it).
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

// The tensor-core step of attention.cu's prefill, decode.cu's decode and quant.cu's NVFP4 GEMV
// (mma.sync m16n8k16, bf16 in, f32 accumulate, sm_80+).
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): g = lane / 4, c = lane % 4. A (16×16, row):
// regs {A[g][2c..], A[g+8][2c..], A[g][2c+8..], A[g+8][2c+8..]}, two bf16 each, lower column in
// the low half. B (16×8, col): {B[2c..][g], B[2c+8..][g]}. C (16×8 f32): {C[g][2c], C[g][2c+1],
// C[g+8][2c], C[g+8][2c+1]}.
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the host launches this kernel on sm_80+ only
#endif
}
