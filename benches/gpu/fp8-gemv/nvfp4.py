# Times the NVFP4 tensor-core decode GEMV of kernels/src/cuda/quant.cu (`gemv_nvfp4_tc_m1_bf16`,
# the gated build for gate/up) on the Llama-3.1-8B shapes at batch 1, 32 layers of distinct
# weights, each sequence captured in one CUDA graph, at several warps a block (NVFP4_TC_WARPS,
# splitting k) and steps in flight a warp (NVFP4_TC_INFLIGHT), against a plain streaming read of
# the same bytes (codes and block scales); and checks every build's outputs against the default
# build's (the same products summed in another order). Needs CuPy (the GPU machine has it):
#   python3 benches/gpu/fp8-gemv/nvfp4.py
import cupy as cp, numpy as np, os
from graph_time import us_per_layer
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
src = "".join(open(p).read() + "\n" for p in [os.path.join(root, "kernels/src/cuda/common.cuh"),
              os.path.join(root, "kernels/src/cuda/quant.cu"), os.path.join(here, "helpers.cu")])
BUILDS = [(8, 1), (4, 2), (4, 1), (6, 1), (8, 2), (12, 1), (16, 1)]  # (warps, in flight); (8, 1) the default
MODS = {b: cp.RawModule(code=src, options=("-std=c++17", f"-DNVFP4_TC_WARPS={b[0]}", f"-DNVFP4_TC_INFLIGHT={b[1]}"))
        for b in BUILDS}
i32, i64 = np.int32, np.int64
L = 32
# (name, output rows n, k, gated): gate/up is the gated build over [2 · 14336, 4096].
SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 14336, 4096, True),
          ("down", 4096, 14336, False)]
print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers", L, "builds (warps, in flight)", BUILDS,
      flush=True)
K = MODS[BUILDS[0]].get_function
rows_of = lambda n, gated: 2 * n if gated else n
W = {nm: cp.empty(L * rows_of(n, gd) * k // 2, dtype=cp.uint8) for nm, n, k, gd in SHAPES}
S = {nm: cp.empty(L * rows_of(n, gd) * k // 16, dtype=cp.uint8) for nm, n, k, gd in SHAPES}
for s, (nm, n, k, gd) in enumerate(SHAPES):
    K("fill_e4m3")((8192,), (256,), (W[nm], i64(W[nm].size), np.uint32(s + 1)))
    K("fill_e4m3")((8192,), (256,), (S[nm], i64(S[nm].size), np.uint32(s + 101)))
    # Block scales of moderate size (E4M3 codes 0x20-0x3f, either sign): no overflow in bf16 sums.
    S[nm] = (S[nm] & cp.uint8(0x9f)) | cp.uint8(0x20)
X = {nm: cp.empty(k, dtype=cp.uint16) for nm, n, k, gd in SHAPES}
for s, (nm, n, k, gd) in enumerate(SHAPES):
    K("fill_bf16")((64,), (256,), (X[nm], i64(k), np.uint32(s + 11), np.float32(4.0)))
Y = {nm: cp.empty(n, dtype=cp.uint16) for nm, n, k, gd in SHAPES}
s2 = cp.array([0.37], dtype=cp.float32)
sink = cp.zeros(4, dtype=cp.float32)
null = np.uint64(0)
cp.cuda.Device().synchronize()

def launch(build, nm, n, k, gd, l):
    get = MODS[build].get_function
    w = np.uint64(W[nm].data.ptr + l * rows_of(n, gd) * k // 2)
    bs = np.uint64(S[nm].data.ptr + l * rows_of(n, gd) * k // 16)
    threads = (32 * build[0],)
    if gd:
        get("gemv_nvfp4_tc_gated_m1_bf16")(((n + 7) // 8,), threads, (X[nm], w, bs, s2, null, Y[nm], i32(n), i32(k), i32(0)))
    else:
        get("gemv_nvfp4_tc_m1_bf16")(((n + 15) // 16,), threads, (X[nm], w, bs, s2, null, Y[nm], i32(n), i32(k)))

def stream(nm, n, k, gd, l):
    nb = rows_of(n, gd) * k
    K("stream_read")((132 * 8,), (256,), (np.uint64(W[nm].data.ptr + l * nb // 2), i64(nb // 32), sink))
    K("stream_read")((132 * 8,), (256,), (np.uint64(S[nm].data.ptr + l * nb // 16), i64(nb // 256), sink))

def timed(f):
    return us_per_layer(f, L)

total = {b: 0.0 for b in BUILDS}
total_stream = 0.0
for nm, n, k, gd in SHAPES:
    nbytes = rows_of(n, gd) * k * (1 / 2 + 1 / 16)
    t = timed(lambda l: stream(nm, n, k, gd, l))
    total_stream += t
    print(f"{nm:8s} {nbytes / 1e6:6.1f} MB  stream {t:7.2f} us ({nbytes / t / 1e3:5.0f} GB/s)", flush=True)
    ref = None
    for b in BUILDS:
        t = timed(lambda l: launch(b, nm, n, k, gd, l))
        total[b] += t
        Y[nm].fill(0)
        launch(b, nm, n, k, gd, 0)
        y = (Y[nm].get().astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if ref is None:
            ref = y
        diff = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)
        print(f"  warps {b[0]:2d} in flight {b[1]}: {t:7.2f} us ({nbytes / t / 1e3:5.0f} GB/s), "
              f"max |y - default| / max |y| {diff:.1e}", flush=True)
print(f"a layer's four GEMVs: stream {total_stream:.2f} us; " +
      ", ".join(f"{b}: {total[b]:.2f} us" for b in BUILDS), flush=True)
