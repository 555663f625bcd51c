#!/usr/bin/env bash
# Issue 27's runs on one machine with several GPUs, in one go: tensor parallelism against one GPU.
#   bash benches/gpu/multi-gpu.sh [path/to/autodeploy] [path/to/the cuda test binary]
# The test binary (cargo test --release -p autodeploy-tests --test cuda --no-run) runs the
# multi-GPU correctness tests first: every fixture family at TP=2 (and EP) against one rank,
# and the 8B shape's bf16 logits at TP=2 against TP=1. Then, each command's summary line
# (benches/gpu/summarize.py; the JSON lines are kept in $OUT, default /tmp):
# - Llama-3.1-8B batch-1 decode at TP=1 and TP=2, alternated, and TP=2 with the all-reduces
#   left out of each step (AUTODEPLOY_PROFILE_SKIP=all_reduce: outputs wrong; the difference
#   is what the all-reduces cost a step);
# - Llama-3.3-70B at TP=2, 4 and 8 where there are that many GPUs: batch-1 decode (its fraction
#   is of one GPU's floor: rank 0's weight bytes) and offline 1,000 x 128/128; the same for its
#   FP8 shape (ModelOpt layout), and its batch-1 decode on one GPU where it fits (an H200);
# - the 8B server at TP=2 (benches/gpu/serve.sh, concurrency 1, 16, 64), then one started
#   again whose second rank is killed: seconds until /health answers 503.
set -u
B=${1:-target/release/autodeploy}
T=${2:-}
H=$(dirname "$0")
OUT=${OUT:-/tmp}
N=$(nvidia-smi -L | wc -l)
echo "$N GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | tr -s ' ')"
if [ -n "$T" ]; then
    timeout 1200 "$T" --include-ignored --test-threads 1 sharded_ranks two_gpus 2>&1 |
        grep -E "^test |panicked|result|TP=|skipped|FAILED"
fi
lat() { # config world_size [env]
    echo "== $1 TP=$2 batch 1 ${3:-}"
    timeout 600 env ${3:-} "$B" bench --config "$H/$1.toml" --world-size "$2" --mode latency --batch 1 --isl 128 --osl 128 2>/dev/null |
        tee -a "$OUT/multi-gpu.json" | python3 "$H/summarize.py" | head -1
}
off() { # config world_size
    echo "== $1 TP=$2 offline 1000 x 128/128"
    timeout 600 "$B" bench --config "$H/$1.toml" --world-size "$2" --mode offline --num-requests 1000 --isl 128 --osl 128 2>/dev/null |
        tee -a "$OUT/multi-gpu.json" |
        python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ['wall_s','output_tok_per_s','steps','mean_step_ms','prefill_s','decode_only_s']})"
}
if [ "$N" -ge 2 ]; then
    for r in 1 2; do lat llama-3.1-8b 1; lat llama-3.1-8b 2; done
    lat llama-3.1-8b 2 AUTODEPLOY_PROFILE_SKIP=all_reduce
fi
for tp in 2 4 8; do
    if [ "$N" -ge "$tp" ]; then lat llama-3.3-70b-tp "$tp"; off llama-3.3-70b-tp "$tp"; fi
done
# The FP8 70B (ModelOpt layout): on one GPU where it fits (an H200), then split.
if nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{exit !($1 > 100000)}'; then
    lat llama-3.3-70b-fp8-tp 1
fi
for tp in 2 4 8; do
    if [ "$N" -ge "$tp" ]; then lat llama-3.3-70b-fp8-tp "$tp"; off llama-3.3-70b-fp8-tp "$tp"; fi
done
if [ "$N" -ge 2 ]; then
    bash "$H/serve.sh" "$B" "$H/llama-3.1-8b-serve-tp2.toml" 2>&1 | tail -8
    port=${PORT:-8124}
    "$B" serve --config "$H/llama-3.1-8b-serve-tp2.toml" --port "$port" 2>"$OUT/serve-tp2.log" &
    pid=$!
    for _ in $(seq 600); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.5; done
    child=$(pgrep -P "$pid" | head -1)
    echo "== server pid $pid, rank 1 pid ${child:-none}: /health $(curl -s -o /dev/null -w '%{http_code}' "localhost:$port/health")"
    if [ -n "$child" ]; then
        kill -9 "$child"
        t0=$(date +%s.%N)
        for _ in $(seq 200); do
            code=$(curl -s -o /dev/null -w '%{http_code}' "localhost:$port/health")
            [ "$code" = 503 ] && break
            sleep 0.1
        done
        echo "/health $code $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s after rank 1 was killed"
    fi
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
fi
