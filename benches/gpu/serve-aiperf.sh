#!/usr/bin/env bash
# Serving on the GPU under NVIDIA's aiperf (from PyPI): `autodeploy serve` on the Llama-3.1-8B
# shape with dummy weights at concurrency 1, 16 and 64, 128 prompt / 128 generated tokens
# (ignore_eos), streamed completions. aiperf sends text, so the model folder gets a tokenizer:
# SmolLM2's (TOKENIZER, a folder; its ids are all below Llama-3.1's vocabulary), which aiperf
# also uses to size the prompts. Token counts are the server's (`usage`): the stand-in tokenizer
# has no text for most of the dummy model's ids, so counting the text would undercount.
#   AIPERF=aiperf TOKENIZER=path/to/tokenizer bash benches/gpu/serve-aiperf.sh [autodeploy]
set -euo pipefail
bin=${1:-target/release/autodeploy}
aiperf=${AIPERF:-aiperf} tok=${TOKENIZER:?set TOKENIZER to a tokenizer folder}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
mkdir -p "$work/model"
cp "$here/../configs/Llama-3.1-8B-Instruct/config.json" "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$work/model/"
sed -e "s|^model = .*|model = \"$work/model\"|" "$here/llama-3.1-8b-serve.toml" >"$work/serve.toml"
port=${PORT:-8124}
"$bin" serve --config "$work/serve.toml" --served-model-name llama --port "$port" 2>"$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "localhost:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.5
done
for c in 1 16 64; do
  n=$((c < 8 ? 16 : 4 * c))
  "$aiperf" profile --model llama --url "http://127.0.0.1:$port" --endpoint-type completions --streaming \
    --tokenizer "$tok" --concurrency "$c" --request-count "$n" --warmup-request-count "$c" \
    --isl 128 --osl 128 --extra-inputs '{"ignore_eos": true}' --use-legacy-max-tokens --use-server-token-count --random-seed 1 \
    --no-auto-plot --output-artifact-dir "$work/c$c" >"$work/c$c.log" 2>&1 || { tail -20 "$work/c$c.log"; exit 1; }
  python3 "$here/../aiperf_summary.py" "$work/c$c" "concurrency $c"
done
kill -TERM $pid
wait $pid
echo "server exit: $?"
