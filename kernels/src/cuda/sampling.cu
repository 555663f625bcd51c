// Greedy sampling on the GPU: the argmax of each row of logits (f32), one block per row, so the
// decode loop copies one id per sequence to the host instead of the vocabulary's logits.
// Ties pick the lowest index, as torch.argmax does.
extern "C" __global__ void argmax_rows_f32(const float* logits, long long* out, int vocab) {
    const float* row = logits + (long)blockIdx.x * vocab;
    float best = __int_as_float(0xff800000);  // -inf
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > best || (v == best && i < idx) || (v != v && best == best)) {  // NaN wins, as in torch
            best = v;
            idx = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ob > best || (ob == best && oi < idx) || (ob != ob && best == best)) {
            best = ob;
            idx = oi;
        }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sb[warp] = best;
        si[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            if (sb[w] > best || (sb[w] == best && si[w] < idx) || (sb[w] != sb[w] && best == best)) {
                best = sb[w];
                idx = si[w];
            }
        }
        out[blockIdx.x] = idx;
    }
}
