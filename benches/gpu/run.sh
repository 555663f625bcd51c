#!/usr/bin/env bash
# The GPU benchmarks recorded in BENCHMARKS.md: `bash benches/gpu/run.sh [path/to/autodeploy]`
# (default: target/release/autodeploy). One JSON line per run, summarised.
set -euo pipefail
bin=${1:-target/release/autodeploy}
here=$(dirname "$0")
run() { "$bin" bench --config "$here/$1" --compile-backend "$2" --mode "$3" --isl "${5:-128}" --osl "${6:-128}" --batch "$4" 2>/dev/null | python3 "$here/summarize.py"; }
for m in qwen2.5-0.5b.toml llama-3.2-1b.toml; do
  for b in simple cudagraph compile opt; do run "$m" "$b" latency 1; done
done
run llama-3.1-8b.toml opt latency 1
run llama-3.1-8b.toml simple latency 1
run llama-3.1-8b.toml opt throughput 64
# ModelOpt FP8 and NVFP4 layouts of the same shape (dummy codes and scales).
run llama-3.1-8b-fp8.toml opt latency 1
run llama-3.1-8b-nvfp4.toml opt latency 1
# Long prompts (2000 tokens): the ragged prefill attention on tensor cores, and on CUDA cores.
for m in llama-3.1-8b-long.toml llama-3.2-1b-long.toml; do
  run "$m" opt latency 1 2000 8
  AUTODEPLOY_PREFILL_TC=0 run "$m" opt latency 1 2000 8
done
