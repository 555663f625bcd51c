# Times the FP8 decode GEMVs of kernels/src/cuda/quant.cu on the Llama-3.1-8B shapes (q/k/v,
# o, gate/up, down), 32 layers of distinct E4M3 weights, each sequence captured in one CUDA
# graph (no programmatic dependent launch), against a plain streaming read of the same bytes;
# and checks each build's outputs against an f64 product of the same codes. Needs CuPy (the GPU
# machine has it):   python3 benches/gpu/fp8-gemv/bench.py
import cupy as cp, numpy as np, os
from graph_time import us_per_layer
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
src = "".join(open(p).read() + "\n" for p in [os.path.join(root, "kernels/src/cuda/common.cuh"),
              os.path.join(root, "kernels/src/cuda/quant.cu"), os.path.join(here, "helpers.cu")])
# The bf16 decode GEMVs the engine runs for the same shapes (graph.cu), for comparison.
bsrc = "".join(open(p).read() + "\n" for p in [os.path.join(root, "kernels/src/cuda/common.cuh"),
               os.path.join(root, "kernels/src/cuda/codes.cuh"), os.path.join(root, "kernels/src/cuda/graph.cu"),
               os.path.join(here, "helpers.cu")])
bmod = cp.RawModule(code=bsrc, options=("-std=c++17",))
mod = cp.RawModule(code=src, options=("-std=c++17",))
K = mod.get_function
# Other warp (a block's) and in-flight (a lane's) counts of gemv_fp8_tc, built separately.
VARIANTS = {(w, u): cp.RawModule(code=src, options=("-std=c++17", f"-DFP8_TC_WARPS={w}", f"-DFP8_TC_INFLIGHT={u}"))
            for w, u in [(8, 1), (8, 4), (16, 1), (16, 2)]}
i32, i64 = np.int32, np.int64
L = 32
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers", L, "shapes", SHAPES, flush=True)
W = {nm: cp.empty(L * n * k, dtype=cp.uint8) for nm, n, k in SHAPES}
for s, (nm, n, k) in enumerate(SHAPES):
    K("fill_e4m3")((8192,), (256,), (W[nm], i64(W[nm].size), np.uint32(s + 1)))
MMAX = 8
X = {nm: cp.empty(MMAX * k, dtype=cp.uint16) for nm, n, k in SHAPES}
XF = {nm: cp.empty(MMAX * k, dtype=cp.float32) for nm, n, k in SHAPES}
for s, (nm, n, k) in enumerate(SHAPES):
    K("fill_bf16")((64,), (256,), (X[nm], i64(X[nm].size), np.uint32(s + 11), np.float32(4.0)))
    K("bf16_to_f32_k")((64,), (256,), (X[nm], XF[nm], i64(X[nm].size)))
XQ = {nm: cp.empty(MMAX * k, dtype=cp.float32) for nm, n, k in SHAPES}  # codes' values (f32 or bf16)
Y = {nm: cp.empty(MMAX * n, dtype=cp.float32) for nm, n, k in SHAPES}
rows = cp.zeros(MMAX, dtype=cp.float32)
s_in = cp.array([0.0123], dtype=cp.float32)
s_w = {nm: cp.asarray(np.random.default_rng(5).uniform(0.5e-3, 2e-3, n).astype(np.float32)) for nm, n, k in SHAPES}
sink = cp.zeros(4, dtype=cp.float32)
null = np.uint64(0)
cp.cuda.Device().synchronize()

def wl(nm, l, k, n):
    return np.uint64(W[nm].data.ptr + l * n * k)

def old(m, dt, dynamic=False, codes=True):
    x = X if dt == "bf16" else XF
    def f(l):
        for nm, n, k in SHAPES:
            if codes and dynamic:
                K(f"e4m3_codes_rows_{dt}")((m,), (256,), (x[nm], rows, XQ[nm], i32(k)))
            elif codes:
                K(f"e4m3_codes_{dt}")(((m * k + 255) // 256,), (256,), (x[nm], s_in, XQ[nm], i64(m * k)))
            K(f"gemv_fp8_m{m}_{dt}")(((n * 32 + 255) // 256,), (256,), (XQ[nm], wl(nm, l, k, n),
                rows if dynamic else s_in, i32(dynamic), s_w[nm], i32(1), null, Y[nm], i32(n), i32(k), i32(0)))
    return f

def tc(m, dt, dynamic=False, variant=None):
    x = X if dt == "bf16" else XF
    get = VARIANTS[variant].get_function if variant else K
    threads = 32 * variant[0] if variant else 256
    def f(l):
        for nm, n, k in SHAPES:
            get(f"gemv_fp8_tc_m{m}_{dt}")(((n + 15) // 16,), (threads,), (x[nm], null, wl(nm, l, k, n), s_in, i32(dynamic), s_w[nm],
                i32(1), null, Y[nm], i32(n), i32(k), i32(0)))
    return f

def stream(l):
    for nm, n, k in SHAPES:
        K("stream_read")((132 * 8,), (256,), (wl(nm, l, k, n), i64(n * k // 16), sink))

def timed(name, f, reps=20):
    us = us_per_layer(f, L, reps)
    print(f"{name:44s} {us:8.2f} us/layer", flush=True)
    return us

LAYER_BYTES = sum(n * k for _, n, k in SHAPES)

# Each shape alone (32 layers, one kernel or two a layer), GB/s of its weight bytes.
WB = {nm: cp.empty(L * n * k, dtype=cp.uint16) for nm, n, k in SHAPES}
for s_, (nm, n, k) in enumerate(SHAPES):
    bmod.get_function("fill_bf16")((8192,), (256,), (WB[nm], i64(WB[nm].size), np.uint32(s_ + 21), np.float32(0.05)))
def one(nm, n, k, what):
    def f(l):
        w = wl(nm, l, k, n)
        if what == "stream":
            K("stream_read")((132 * 8,), (256,), (w, i64(n * k // 16), sink))
        elif what == "old":
            K("e4m3_codes_bf16")(((k + 255) // 256,), (256,), (X[nm], s_in, XQ[nm], i64(k)))
            K("gemv_fp8_m1_bf16")(((n * 32 + 255) // 256,), (256,), (XQ[nm], w, s_in, i32(0), s_w[nm], i32(1), null,
                Y[nm], i32(n), i32(k), i32(0)))
        elif what == "bf16":
            wb = np.uint64(WB[nm].data.ptr + l * n * k * 2)
            if nm == "gate_up":
                bmod.get_function("gemv_swiglu_bf16_s4")((n // 2 // 2,), (256,), (X[nm], wb, Y[nm], i32(n // 2), i32(k), i32(0)))
            else:
                bmod.get_function("gemv_bf16_m1_s2")((n // 4,), (256,), (X[nm], wb, Y[nm], i32(n), i32(k), i32(0), i32(0)))
        else:
            get = VARIANTS[what].get_function if what != "tc" else K
            get("gemv_fp8_tc_m1_bf16")(((n + 15) // 16,), (32 * (what[0] if what != "tc" else 8),), (X[nm], null, w, s_in,
                i32(0), s_w[nm], i32(1), null, Y[nm], i32(n), i32(k), i32(0)))
    return f
for nm, n, k in SHAPES:
    for what in ["stream", "old", "tc", (8, 4), (16, 1), (16, 2), "bf16"]:
        t = timed(f"{nm} {what}", one(nm, n, k, what))
        print(f"   -> {n * k * (2 if what == 'bf16' else 1) / t / 1e3:.0f} GB/s", flush=True)
r = timed("stream (the layer's weight bytes)", stream)
print(f"   -> {LAYER_BYTES / r / 1e3:.0f} GB/s", flush=True)
for m in (1, 2, 4, 8):
    for dt in ("bf16", "f32") if m == 1 else ("bf16",):
        t0 = timed(f"m{m} {dt} old: codes + gemv_fp8", old(m, dt))
        if m == 1:
            timed(f"m{m} {dt} old gemv only (codes left out)", old(m, dt, codes=False))
            timed(f"m{m} {dt} old dynamic: codes_rows + gemv", old(m, dt, dynamic=True))
            timed(f"m{m} {dt} tc dynamic", tc(m, dt, dynamic=True))
        t1 = timed(f"m{m} {dt} tc static", tc(m, dt))
        print(f"   -> tc/stream {r / t1:.3f}, old/stream {r / t0:.3f}", flush=True)
        if dt == "bf16" and m in (1, 8):
            for v in VARIANTS:
                t2 = timed(f"m{m} {dt} tc static warps {v[0]} inflight {v[1]}", tc(m, dt, variant=v))
                print(f"   -> {r / t2:.3f} of stream", flush=True)

# Accuracy: layer 0, static scale, each shape, against f64 products of the same codes.
lut = np.zeros(256)
for c in range(256):
    e, mnt, sg = (c >> 3) & 15, c & 7, -1.0 if c & 0x80 else 1.0
    lut[c] = sg * (2.0 ** -6 * mnt / 8 if e == 0 else 2.0 ** (e - 7) * (1 + mnt / 8))
for m in (1, 8):
    for dt in ("f32", "bf16"):
        for nm, n, k in SHAPES:
            x = X if dt == "bf16" else XF
            K(f"e4m3_codes_f32")(((m * k + 255) // 256,), (256,), (XF[nm], s_in, XQ[nm], i64(m * k)))
            xq = XQ[nm].get()[: m * k].reshape(m, k).astype(np.float64)
            wv = lut[W[nm][: n * k].get()].reshape(n, k)
            ref = (xq @ wv.T) * (np.float64(s_in.get()[0]) * s_w[nm].get().astype(np.float64))
            outs = {}
            for which in ("old", "tc"):
                Y[nm].fill(0)
                if which == "old":
                    K(f"e4m3_codes_{dt}")(((m * k + 255) // 256,), (256,), (x[nm], s_in, XQ[nm], i64(m * k)))
                    K(f"gemv_fp8_m{m}_{dt}")(((n * 32 + 255) // 256,), (256,), (XQ[nm], wl(nm, 0, k, n), s_in, i32(0),
                        s_w[nm], i32(1), null, Y[nm], i32(n), i32(k), i32(0)))
                else:
                    K(f"gemv_fp8_tc_m{m}_{dt}")(((n + 15) // 16,), (256,), (x[nm], null, wl(nm, 0, k, n), s_in, i32(0),
                        s_w[nm], i32(1), null, Y[nm], i32(n), i32(k), i32(0)))
                y = Y[nm].get()
                if dt == "bf16":
                    y = (y.view(np.uint16)[: m * n].astype(np.uint32) << 16).view(np.float32)
                outs[which] = y[: m * n].reshape(m, n).astype(np.float64)
            sc = np.abs(ref).max()
            print(f"accuracy m{m} {dt} {nm:8s} max|ref| {sc:.3g}  old {np.abs(outs['old'] - ref).max() / sc:.2e}"
                  f"  tc {np.abs(outs['tc'] - ref).max() / sc:.2e}  (max error / max |ref|)", flush=True)

# The dynamic (per-row scale) builds against each other.
for m in (1, 8):
    for nm, n, k in SHAPES:
        outs = []
        for f in (old(m, "bf16", dynamic=True), tc(m, "bf16", dynamic=True)):
            Y[nm].fill(0); f(0)
            outs.append((Y[nm].get().view(np.uint16)[: m * n].astype(np.uint32) << 16).view(np.float32).astype(np.float64))
        sc = np.abs(outs[0]).max()
        print(f"dynamic m{m} bf16 {nm:8s} max|old - tc| / max|old| {np.abs(outs[0] - outs[1]).max() / sc:.2e}", flush=True)
