#!/usr/bin/env bash
# Serving SmolLM2 on the CPU: autodeploy serve and llama-cpp-python's OpenAI server on the same
# GGUF with the same threads, each under the same aiperf load (streamed completions, ISL/OSL
# tokens, generation past EOS, fixed concurrency; aiperf limited to one worker, as it shares
# the CPU). Needs: pip install aiperf==0.13.0
# "llama-cpp-python[server]==0.3.36" (AIPERF and LLAMA_PY name their interpreters) and a
# tokenizer folder for aiperf (TOKENIZER; tests/fixtures/make_smollm2_reference.py's model
# files, or transformers' AutoTokenizer on the GGUF, saved).
#   bash benches/cpu/serve.sh [concurrency] [requests] [isl] [osl]
set -euo pipefail
cd "$(dirname "$0")/../.."
conc=${1:-4} n=${2:-32} isl=${3:-128} osl=${4:-64}
threads=${THREADS:-2}
aiperf=${AIPERF:-aiperf} llama_py=${LLAMA_PY:-python3} tok=${TOKENIZER:?set TOKENIZER to a SmolLM2 tokenizer folder}
gguf=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
out=${OUT_DIR:-/tmp/serve-bench}
mkdir -p "$out"
wait_up() { for _ in $(seq 300); do curl -sf "localhost:$1/v1/models" >/dev/null && return 0; sleep 0.5; done; return 1; }
load() {
  "$aiperf" profile --model smollm2 --url "http://127.0.0.1:$1" --endpoint-type completions --streaming \
    --tokenizer "$tok" --concurrency "$conc" --request-count "$n" --warmup-request-count "$conc" \
    --isl "$isl" --osl "$osl" --extra-inputs "$3" --random-seed 1 --use-legacy-max-tokens --workers-max 1 --record-processors 1 --no-auto-plot \
    --output-artifact-dir "$out/$2" >"$out/$2.log" 2>&1
  python3 benches/aiperf_summary.py "$out/$2" "$2"
}
RAYON_NUM_THREADS=$threads target/release/autodeploy serve --config benches/cpu/smollm2-serve.toml --served-model-name smollm2 --port 8401 2>"$out/autodeploy.log" &
pid=$!
wait_up 8401 && load 8401 autodeploy '{"ignore_eos": true}'
kill -TERM $pid; wait $pid || true
"$llama_py" -m llama_cpp.server --model "$gguf" --model_alias smollm2 --n_threads "$threads" --n_ctx 2048 --interrupt_requests False --port 8402 >"$out/llama.log" 2>&1 &
pid=$!
# Its server has no ignore_eos: the EOS tokens (<|endoftext|> 0, <|im_end|> 2) are banned instead;
# by default it cuts a streaming request short when the next arrives (interrupt_requests).
wait_up 8402 && load 8402 llama-cpp-python '{"logit_bias": {"0": -100, "2": -100}}'
kill -TERM $pid; wait $pid || true
