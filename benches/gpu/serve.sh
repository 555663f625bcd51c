#!/usr/bin/env bash
# Serving on the GPU, as BENCHMARKS.md records it: `bash benches/gpu/serve.sh [autodeploy]
# [config]` (defaults: target/release/autodeploy, benches/gpu/llama-3.1-8b-serve.toml).
# First `bench --mode latency --batch 1` (the engine alone), then `autodeploy serve` with
# benches/serve_bench.py at concurrency 1, 16 and 64 (128 prompt / 128 generated tokens), then
# the server's /metrics. One JSON line per measurement.
set -euo pipefail
bin=${1:-target/release/autodeploy}
cfg=${2:-$(dirname "$0")/llama-3.1-8b-serve.toml}
here=$(dirname "$0")
port=${PORT:-8123}
"$bin" bench --config "$cfg" --mode latency --batch 1 --isl 128 --osl 128 2>/dev/null
"$bin" serve --config "$cfg" --port "$port" 2>serve.log &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "localhost:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat serve.log; exit 1; }
  sleep 0.5
done
for c in 1 16 64; do
  n=$((c < 8 ? 16 : 4 * c))
  python3 "$here/../serve_bench.py" --url "http://127.0.0.1:$port" --concurrency "$c" --num-requests "$n" --isl 128 --osl 128
done
curl -s "localhost:$port/metrics" | grep -E '^autodeploy:(num_preemptions_total|prefix_cache_(queries|hits)_total|kv_cache_pages_total|generation_tokens_total)' || true
kill -TERM $pid
wait $pid
echo "server exit: $?"
