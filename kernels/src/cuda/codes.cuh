// Shared by the executor's kernel sources that take dtypes as run-time codes (graph.cu, moe.cu;
// the loader prepends it after common.cuh): the codes, loads and stores by code, and the 16-byte
// bf16 chunks the decode GEMVs are built from.

// Dtype codes, as kernels/src/cuda/exec.rs numbers them.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define DT_I64 3
#define DT_BOOL 4

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float ld(const void* p, int dt, long i) {
    switch (dt) {
        case DT_F32: return ((const float*)p)[i];
        case DT_BF16: return bf16_to_f32(((const bf16_t*)p)[i]);
        case DT_F16: return f16_to_f32(((const unsigned short*)p)[i]);
        case DT_I64: return (float)((const long long*)p)[i];
        default: return (float)((const unsigned char*)p)[i];
    }
}
__device__ __forceinline__ void st(void* p, int dt, long i, float v) {
    switch (dt) {
        case DT_F32: ((float*)p)[i] = v; break;
        case DT_BF16: ((bf16_t*)p)[i] = f32_to_bf16(v); break;
        case DT_F16: ((unsigned short*)p)[i] = f32_to_f16(v); break;
        case DT_I64: ((long long*)p)[i] = (long long)v; break;
        default: ((unsigned char*)p)[i] = v != 0.0f; break;
    }
}
// What storing `v` as `dt` and loading it back gives.
__device__ __forceinline__ float rnd(int dt, float v) {
    switch (dt) {
        case DT_BF16: return bf16_to_f32(f32_to_bf16(v));
        case DT_F16: return f16_to_f32(f32_to_f16(v));
        default: return v;
    }
}
__device__ __forceinline__ int dt_size(int dt) {
    return dt == DT_F32 ? 4 : dt == DT_I64 ? 8 : dt == DT_BOOL ? 1 : 2;
}


// round(round(silu(round(g))) * round(u)): the unfused linear, SiLU and multiply's roundings
// (the rounding of g and u is exact for values already bf16).
__device__ __forceinline__ bf16_t swiglu_value(float g, float u) {
    float gr = bf16_to_f32(f32_to_bf16(g)), ur = bf16_to_f32(f32_to_bf16(u));
    float s = bf16_to_f32(f32_to_bf16(gate_act(0, gr)));
    return f32_to_bf16(s * ur);
}

// 8 weights (as f32) against a 16-byte chunk of an activation row (8 bf16), added into acc in
// element order: every bf16 GEMV's sum.
__device__ __forceinline__ void dot_chunk_f(const float* wf, uint4 xv, float& acc) {
    const bf16_t* xp = (const bf16_t*)&xv;
    float xf[8];
#pragma unroll
    for (int j = 0; j < 8; j++) xf[j] = bf16_to_f32(xp[j]);
#pragma unroll
    for (int j = 0; j < 8; j++) acc += wf[j] * xf[j];
}

// One 16-byte chunk c of a weight row (8 weights) against the M activation rows, into acc.
template <int M>
__device__ __forceinline__ void gemv_chunk(const bf16_t* x, int k, uint4 wv, int c, float* acc) {
    const bf16_t* wp = (const bf16_t*)&wv;
    float wf[8];
#pragma unroll
    for (int j = 0; j < 8; j++) wf[j] = bf16_to_f32(wp[j]);
#pragma unroll
    for (int i = 0; i < M; i++) dot_chunk_f(wf, *(const uint4*)(x + (long)i * k + c * 8), acc[i]);
}

// One 16-byte weight chunk against one activation chunk, as `gemv_chunk<1>` adds them.
__device__ __forceinline__ void dot_chunk(uint4 wv, uint4 xv, float& acc) {
    const bf16_t* wp = (const bf16_t*)&wv;
    float wf[8];
#pragma unroll
    for (int j = 0; j < 8; j++) wf[j] = bf16_to_f32(wp[j]);
    dot_chunk_f(wf, xv, acc);
}

// One 16-byte chunk of the gate and up rows against the same chunk of x, into g and u.
__device__ __forceinline__ void swiglu_chunk(uint4 gv, uint4 uv, uint4 xv, float& g, float& u) {
    const bf16_t* gp = (const bf16_t*)&gv;
    const bf16_t* up = (const bf16_t*)&uv;
    const bf16_t* xp = (const bf16_t*)&xv;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        float xf = bf16_to_f32(xp[e]);
        g += bf16_to_f32(gp[e]) * xf;
        u += bf16_to_f32(up[e]) * xf;
    }
}

// g and u summed over the warp.
__device__ __forceinline__ void warp_sum2(float& g, float& u) {
    for (int o = 16; o > 0; o >>= 1) {
        g += __shfl_xor_sync(0xffffffffu, g, o);
        u += __shfl_xor_sync(0xffffffffu, u, o);
    }
}
