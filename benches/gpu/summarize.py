"""One line per `autodeploy bench` JSON object read from stdin (the full JSON is kept too)."""
import json
import sys

for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    c = d["config"]
    print(
        f"{c['model'].split('/')[-1]:24} {c['compile_backend']:9} {c['mode']:10} batch {c['batch']:3} "
        f"isl {c['isl']} osl {c['osl']}: decode {d['decode_ms_per_step']:.3f} ms/step, "
        f"{d['output_tok_per_s']:.0f} tok/s out, prefill {d['prefill_ms']:.1f} ms, "
        f"{d['achieved_weight_gb_per_s']:.0f} GB/s = {100 * d['fraction_of_floor']:.1f}% of "
        f"{d['floor_gb_per_s']:.0f} GB/s floor; build {d['build_ms'] / 1e3:.1f} s; {d['device']}"
        + "".join(f"; {k}={v}" for k, v in c.get("env", {}).items())
    )
    print("   ", line)
