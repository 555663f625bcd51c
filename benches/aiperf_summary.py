#!/usr/bin/env python3
"""One JSON line from an aiperf run's export: TTFT, ITL, request latency, output and request
throughput. Usage: python benches/aiperf_summary.py ARTIFACT_DIR LABEL"""
import glob
import json
import sys

art, label = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(art + "/**/profile_export_aiperf.json", recursive=True))
d = json.load(open(files[0]))
out = {"run": label}
for k in ("time_to_first_token", "inter_token_latency", "request_latency", "output_sequence_length",
          "output_token_throughput", "request_throughput"):
    v = d.get(k) or d.get("records", {}).get(k)
    if isinstance(v, dict):
        out[k] = {s: v.get(s) for s in ("unit", "avg", "p50", "p90", "p99") if s in v}
print(json.dumps(out))
