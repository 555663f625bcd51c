"""Where a decode step's time goes, kernel by kernel, in the order the GPU ran them (not each
kernel alone, as ncu measures): reads `nsys stats --report cuda_gpu_trace --format csv` of a
`bench --mode latency` run traced with `--cuda-graph-trace=node` (benches/gpu/pending.sh
`timeline`). Kernels overlap under programmatic dependent launch (a kernel starts, then waits
for the one before), so a kernel's share of the step is how much later it ends than the kernel
that ended before it: those shares sum to the step. Rows: the kernel's name, launches a step,
its mean duration (start to end, the wait included) and its mean share, in µs, and the share
a step; gaps over `--host-us` (the host between steps) are counted apart.

usage: python3 timeline.py TRACE.csv [--skip FRACTION] [--host-us US]
"""
import argparse
import collections
import csv

ap = argparse.ArgumentParser()
ap.add_argument("trace")
ap.add_argument("--skip", type=float, default=0.5, help="leading fraction of kernels left out (build, prefill)")
ap.add_argument("--host-us", type=float, default=60.0)
a = ap.parse_args()
rows = list(csv.DictReader(open(a.trace)))
if not rows:
    raise SystemExit(f"{a.trace}: no rows")
cols = rows[0].keys()
start = next(c for c in cols if c.startswith("Start"))
dur = next(c for c in cols if c.startswith("Duration"))
name = "Name" if "Name" in cols else next(c for c in cols if "Name" in c)
ks = []
for r in rows:
    n = r[name]
    if n.startswith("[CUDA") or not r[dur]:
        continue
    s, d = float(r[start]), float(r[dur])
    ks.append((s + d, d, n.split("(")[0].strip()))
ks.sort()
ks = ks[int(len(ks) * a.skip):]
share = collections.defaultdict(float)
durs = collections.defaultdict(float)
count = collections.Counter()
host, gaps = 0.0, 0
for (e0, _, _), (e1, d, n) in zip(ks, ks[1:]):
    g = e1 - e0
    if g > a.host_us * 1000:
        host += g
        gaps += 1
        continue
    share[n] += g
    durs[n] += d
    count[n] += 1
steps = max(gaps, 1)
total = sum(share.values())
print(f"{len(ks)} kernels, {gaps} host gaps (> {a.host_us} us, mean {host / steps / 1000:.1f} us): "
      f"{steps} steps, {total / steps / 1000:.1f} us of kernels a step")
print(f"{'kernel':<48} {'a step':>7} {'mean us':>8} {'share us':>9} {'us a step':>10}")
for n, v in sorted(share.items(), key=lambda kv: -kv[1]):
    c = count[n]
    print(f"{n[:48]:<48} {c / steps:7.1f} {durs[n] / c / 1000:8.2f} {v / c / 1000:9.2f} {v / steps / 1000:10.1f}")
