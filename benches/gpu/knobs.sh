#!/usr/bin/env bash
# The CUDA executor's measuring knobs against the defaults on the 8B shape, batch 1, `opt`
# (README: "Knobs for measuring the CUDA kernels"), one run each (~10 s); ROUNDS=2 repeats the
# list in the same order, so drift shows.
#   bash benches/gpu/knobs.sh [path/to/autodeploy]      (default: target/release/autodeploy)
set -euo pipefail
bin=${1:-target/release/autodeploy}
here=$(dirname "$0")
settings=(
  ""
  "AUTODEPLOY_GEMV_SPLIT=1"
  "AUTODEPLOY_GEMV_SPLIT=4"
  "AUTODEPLOY_SWIGLU_SPLIT=1"
  "AUTODEPLOY_SWIGLU_SPLIT=2"
  "AUTODEPLOY_ATTN_U=8"
  "AUTODEPLOY_ATTN_GROUP=0"
  "AUTODEPLOY_PREFETCH_ROW=0"
  "AUTODEPLOY_PREFETCH_ROW=2048"
)
# KNOBS="A=1 B=2;A=1" replaces the list: settings separated by ';', an empty one the defaults.
if [[ -n "${KNOBS:-}" ]]; then IFS=';' read -r -a settings <<< "$KNOBS"; fi
for _ in $(seq "${ROUNDS:-1}"); do
  for s in "${settings[@]}"; do
    printf '%-28s ' "${s:-defaults}"
    env $s "$bin" bench --config "$here/llama-3.1-8b.toml" --compile-backend opt --mode latency \
      --isl 128 --osl 128 --batch 1 2>/dev/null | python3 "$here/summarize.py" | head -1
  done
done
