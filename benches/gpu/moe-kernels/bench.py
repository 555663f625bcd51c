# Times torch_moe's decode kernels (kernels/src/cuda/moe.cu) and the variants in variants.cu
# on the Qwen3-30B-A3B shape (batch 1: 8 of 128 experts), 48 layers of distinct weights, each
# launch sequence captured in one CUDA graph (no programmatic dependent launch), against a
# plain streaming read of the same bytes. Needs CuPy (the GPU machine has it):
#   python3 benches/gpu/moe-kernels/bench.py
# BENCHMARKS.md (session 23) has its numbers on an H200.
import cupy as cp, numpy as np, sys, os
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
src = "".join(open(p).read() for p in
              [os.path.join(root, "kernels/src/cuda/common.cuh"), os.path.join(root, "kernels/src/cuda/codes.cuh"),
               os.path.join(root, "kernels/src/cuda/moe.cu"),
               os.path.join(here, "variants.cu")])
mod = cp.RawModule(code=src, options=("-std=c++17",))
K = lambda n: mod.get_function(n)
L, E, TOPK, H, I = 48, 128, 8, 2048, 768
print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers", L, "experts", E, "top_k", TOPK, "hidden", H, "inter", I)
i32, i64 = np.int32, np.int64
gu = cp.empty(L * E * 2 * I * H, dtype=cp.uint16)
dn = cp.empty(L * E * H * I, dtype=cp.uint16)
for a, seed in ((gu, 1), (dn, 2)):
    K("fill_bf16")((4096,), (256,), (a, i64(a.size), np.uint32(seed)))
x = cp.empty(L * H, dtype=cp.uint16); K("fill_bf16")((64,), (256,), (x, i64(x.size), np.uint32(3)))
logits = cp.empty(L * E, dtype=cp.uint16); K("fill_bf16")((8,), (256,), (logits, i64(logits.size), np.uint32(4)))
logits_f = cp.empty(L * E, dtype=cp.uint16)
idx = cp.zeros(L * TOPK, dtype=cp.int32); wts = cp.zeros(L * TOPK, dtype=cp.float32)
act = cp.zeros(L * TOPK * I, dtype=cp.uint16); contrib = cp.zeros(L * TOPK * H, dtype=cp.float32)
y = cp.zeros(L * H, dtype=cp.uint16)
sink = cp.zeros(4, dtype=cp.float32)
cp.cuda.Device().synchronize()
def lp(a, l, per):  # pointer to layer l of array a
    return np.uint64(a.data.ptr + l * per * a.itemsize)
GU, DN = E * 2 * I * H, E * H * I
def route(l):
    K("moe_route")((1,), (128,), (lp(logits, l, E), i32(1), i32(1), i64(1), i32(E), i32(TOPK), i32(1), i32(1), i32(0),
                                 lp(idx, l, TOPK), lp(wts, l, TOPK)))
def gu_base(l):
    K("moe_gate_up_bf16")(((TOPK * I * 32 + 255) // 256,), (256,), (lp(x, l, H), lp(gu, l, GU), lp(idx, l, TOPK), i64(TOPK),
        i32(TOPK), i32(H), i32(I), i32(0), np.uint64(0), lp(act, l, TOPK * I)))
def gu_var(name, R=1, S=1):
    def f(l):
        warps = TOPK * I // R * S
        K(name)(((warps * 32 + 255) // 256,), (256,), (lp(x, l, H), lp(gu, l, GU), lp(idx, l, TOPK), i64(TOPK), i32(TOPK),
            i32(H), i32(I), i32(0), lp(act, l, TOPK * I)))
    return f
def dn_base(l):
    K("moe_down_bf16")(((TOPK * H * 32 + 255) // 256,), (256,), (lp(act, l, TOPK * I), lp(dn, l, DN), lp(idx, l, TOPK),
        lp(wts, l, TOPK), i64(TOPK), i32(H), i32(I), lp(contrib, l, TOPK * H)))
def dn_var(name, R):
    def f(l):
        K(name)(((TOPK * H // R * 32 + 255) // 256,), (256,), (lp(act, l, TOPK * I), lp(dn, l, DN), lp(idx, l, TOPK),
            lp(wts, l, TOPK), i64(TOPK), i32(H), i32(I), lp(contrib, l, TOPK * H)))
    return f
def combine(l):
    K("moe_combine")(((H + 255) // 256,), (256,), (lp(contrib, l, TOPK * H), lp(idx, l, TOPK), i32(1), i64(1), i32(TOPK),
        i32(H), lp(y, l, H)))
def stream(nbytes, which):
    def f(l):
        base = gu if which == 0 else dn
        # a different expert region each layer, no L2 reuse
        K("stream_read")((132 * 8,), (256,), (lp(base, l, GU if which == 0 else DN), i64(nbytes // 16), sink))
    return f

s = cp.cuda.Stream(non_blocking=True)
def timed(name, fns, reps=20):
    with s:
        for l in range(L):
            for f in fns: f(l)
        s.synchronize()
        s.begin_capture()
        for l in range(L):
            for f in fns: f(l)
        g = s.end_capture()
        g.launch(s); s.synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(s)
        for _ in range(reps): g.launch(s)
        b.record(s); b.synchronize()
    us = cp.cuda.get_elapsed_time(a, b) * 1000 / reps / L
    print(f"{name:40s} {us:8.2f} us/layer", flush=True)
    return us

timed("route", [route])
for l in range(L): route(l)
cp.cuda.Device().synchronize()
print("experts layer 0:", idx[:TOPK].get(), "weights", wts[:TOPK].get())
EXP_BYTES = TOPK * (2 * I * H + H * I) * 2
r = timed("stream 75 MB (gate_up + down bytes)", [stream(EXP_BYTES, 0)])
print(f"   -> {EXP_BYTES / r / 1e6:.0f} GB/s")
r = timed("stream 50 MB (gate_up bytes)", [stream(TOPK * 2 * I * H * 2, 0)]); print(f"   -> {TOPK*2*I*H*2 / r / 1e6:.0f} GB/s")
r = timed("stream 25 MB (down bytes)", [stream(TOPK * I * H * 2, 1)]); print(f"   -> {TOPK*I*H*2 / r / 1e6:.0f} GB/s")
def check(ref, out, what):
    d = np.abs(ref.view(np.uint16).astype(np.uint32) - out.view(np.uint16).astype(np.uint32)).max() if out.dtype == np.uint16 else np.abs(ref - out).max()
    print(f"   {what}: max diff vs base {d}")
t = timed("gate_up base", [gu_base]); ref_act = act.get()
for name, R, S in [("gu_r1", 1, 1), ("gu_r2", 2, 1), ("gu_s2", 1, 2), ("gu_s4", 1, 4)]:
    t = timed(name, [gu_var(name, R, S)]); check(ref_act, act.get(), "act (bf16 ulps)")
for l in range(L): gu_base(l)
t = timed("down base", [dn_base]); ref_c = contrib.get()
for name, R in [("dn_r1", 1), ("dn_r2", 2), ("dn_r4", 4)]:
    t = timed(name, [dn_var(name, R)]); check(ref_c, contrib.get(), "contrib")
timed("combine", [combine])
timed("chain base: route gate_up down combine", [route, gu_base, dn_base, combine])
timed("chain: route gu_r2 dn_r4 combine", [route, gu_var("gu_r2", 2), dn_var("dn_r4", 4), combine])
timed("chain: route gu_s2 dn_r2 combine", [route, gu_var("gu_s2", 1, 2), dn_var("dn_r2", 2), combine])
