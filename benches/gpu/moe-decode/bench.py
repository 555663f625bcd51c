# Times the MoE decode kernels of kernels/src/cuda/moe.cu (`moe_gate_up_bf16`, `moe_down_bf16`,
# `moe_combine`: `torch_moe`'s per-slot path) on the Qwen3-30B-A3B shape (hidden 2048, expert
# inter 768, top-8 of 128), 48 layers each with its own chosen experts' weights, each sequence
# captured in one CUDA graph, at several run lengths (MOE_GU_ROWS, MOE_DOWN_ROWS: consecutive
# rows a warp), against a plain streaming read of the same bytes; and checks that every build's
# outputs equal the (1, 1) build's bit for bit (each row's sum is formed the same way).
# Needs CuPy (the GPU machine has it):   python3 benches/gpu/moe-decode/bench.py
import cupy as cp, numpy as np, os
here = os.path.dirname(os.path.abspath(__file__))
cuda = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(here))), "kernels/src/cuda")
src = "".join(open(p).read() + "\n" for p in [os.path.join(cuda, "common.cuh"), os.path.join(cuda, "codes.cuh"),
              os.path.join(cuda, "moe.cu"), os.path.join(here, "../fp8-gemv/helpers.cu")])
BUILDS = [(1, 1), (2, 2), (1, 2), (1, 4), (2, 4), (4, 4)]  # (MOE_GU_ROWS, MOE_DOWN_ROWS); (1, 1) the default
MODS = {b: cp.RawModule(code=src, options=("-std=c++17", f"-DMOE_GU_ROWS={b[0]}", f"-DMOE_DOWN_ROWS={b[1]}"))
        for b in BUILDS}
i32, i64 = np.int32, np.int64
L, HID, INTER, TOPK = 48, 2048, 768, 8
print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), f"layers {L} hidden {HID} inter {INTER} top-{TOPK}",
      "builds (gate/up rows, down rows) a warp", BUILDS, flush=True)
K = MODS[BUILDS[0]].get_function
null = np.uint64(0)
rng = np.random.default_rng(3)
for tokens in (1, 4):
    slots = tokens * TOPK
    # Each layer's chosen experts only (slot s reads expert idx[s] of its layer's block of 8).
    gu = cp.empty(L * TOPK * 2 * INTER * HID, dtype=cp.uint16)
    dn = cp.empty(L * TOPK * HID * INTER, dtype=cp.uint16)
    K("fill_bf16")((8192,), (256,), (gu, i64(gu.size), np.uint32(7), np.float32(0.1)))
    K("fill_bf16")((8192,), (256,), (dn, i64(dn.size), np.uint32(8), np.float32(0.1)))
    x = cp.empty(tokens * HID, dtype=cp.uint16)
    K("fill_bf16")((64,), (256,), (x, i64(x.size), np.uint32(9), np.float32(2.0)))
    idx = cp.asarray(np.concatenate([rng.permutation(TOPK) for _ in range(tokens)]).astype(np.int32))
    wts = cp.asarray(rng.uniform(0.05, 0.3, slots).astype(np.float32))
    act = cp.empty(slots * INTER, dtype=cp.uint16)
    contrib = cp.empty(slots * HID, dtype=cp.float32)
    y = cp.empty(tokens * HID, dtype=cp.uint16)
    sink = cp.zeros(4, dtype=cp.float32)
    gu_l = lambda l: np.uint64(gu.data.ptr + l * TOPK * 2 * INTER * HID * 2)
    dn_l = lambda l: np.uint64(dn.data.ptr + l * TOPK * HID * INTER * 2)

    def run(b, what):
        get = MODS[b].get_function
        def f(l):
            if what in ("gate_up", "all"):
                runs = (INTER + b[0] - 1) // b[0]
                get("moe_gate_up_bf16")(((slots * runs * 32 + 255) // 256,), (256,), (x, gu_l(l), idx, i64(slots),
                    i32(TOPK), i32(HID), i32(INTER), i32(0), null, act))
            if what in ("down", "all"):
                runs = (HID + b[1] - 1) // b[1]
                get("moe_down_bf16")(((slots * runs * 32 + 255) // 256,), (256,), (act, dn_l(l), idx, wts, i64(slots),
                    i32(HID), i32(INTER), contrib))
            if what == "all":
                get("moe_combine")(((tokens * HID + 255) // 256,), (256,), (contrib, idx, i32(1), i64(tokens), i32(TOPK),
                    i32(HID), y))
        return f

    def stream(what):
        def f(l):
            if what in ("gate_up", "all"):
                K("stream_read")((132 * 8,), (256,), (gu_l(l), i64(TOPK * 2 * INTER * HID // 8), sink))
            if what in ("down", "all"):
                K("stream_read")((132 * 8,), (256,), (dn_l(l), i64(TOPK * HID * INTER // 8), sink))
        return f

    st = cp.cuda.Stream(non_blocking=True)
    def timed(f, reps=20):
        with st:
            for l in range(L): f(l)
            st.synchronize()
            st.begin_capture()
            for l in range(L): f(l)
            g = st.end_capture()
            g.launch(st); st.synchronize()
            a, e = cp.cuda.Event(), cp.cuda.Event()
            a.record(st)
            for _ in range(reps): g.launch(st)
            e.record(st); e.synchronize()
        return cp.cuda.get_elapsed_time(a, e) * 1000 / reps / L

    print(f"tokens {tokens} ({slots} slots), us a layer:", flush=True)
    for what in ("gate_up", "down", "all"):
        nbytes = TOPK * INTER * HID * 2 * (3 if what == "all" else 2 if what == "gate_up" else 1)
        t = timed(stream(what))
        line = f"  {what:8s} stream {t:6.2f} ({nbytes / t / 1e3:5.0f} GB/s)"
        ref = None
        for b in BUILDS:
            t = timed(run(b, what))
            line += f" | {b}: {t:6.2f}"
            if what == "all":
                y.fill(0)
                run(b, "all")(0)
                out = (act.get(), contrib.get(), y.get())
                if ref is None:
                    ref = out
                same = all(np.array_equal(p, q) for p, q in zip(out, ref))
                line += "" if same else " (DIFFERS)"
        print(line, flush=True)
