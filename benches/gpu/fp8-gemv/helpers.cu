// Fill and streaming kernels for bench.py (the kernels it times are quant.cu's, as the engine
// runs them).
extern "C" __global__ void fill_e4m3(unsigned char* p, long n, unsigned seed) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        unsigned char c = (unsigned char)(h & 0xff);
        if ((c & 0x7f) == 0x7f) c ^= 1;  // no NaN codes
        p[i] = c;
    }
}
extern "C" __global__ void fill_bf16(bf16_t* p, long n, unsigned seed, float scale) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        p[i] = f32_to_bf16(((h & 0xffff) / 65536.0f - 0.5f) * scale);
    }
}
extern "C" __global__ void bf16_to_f32_k(const bf16_t* p, float* q, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        q[i] = bf16_to_f32(p[i]);
}
extern "C" __global__ void stream_read(const uint4* p, long n16, float* sink) {
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (long)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        s += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
    }
    if (s == 12345.0f) sink[0] = s;
}
