#!/usr/bin/env bash
# What was written without a GPU at hand and waits for one: the checks first, then the timings
# that decide the settings left off by default (docs/developing.md, "Fusions on and off by default"
# and the kernel knobs). Each part fits one device call (10 minutes; the first process on a
# fresh machine also compiles the kernels, about 200 s, cached for the calls after it on the
# same machine): run them one call each, in this order.
#   PARTS=checks bash benches/gpu/pending.sh BIN_DIR      (then quant, suite, rest, fp8, moe, long, profile)
# BIN_DIR holds release binaries built on a development machine (the GPU machine has no Rust):
#   autodeploy  (cargo build --release -p autodeploy)
#   cuda_check  (cargo build --release -p autodeploy-kernels --example cuda_check)
#   cuda-tests  (cargo test --release -p autodeploy-tests --test cuda --no-run: target/release/deps/cuda-*)
#   BUILT       (optional: which commit they are, printed first)
# The parts (PARTS, default all but profile, in this order):
#   checks  cuda_check whole (every kernel against the CPU), then the CUDA tests of the q/k
#           norms fused into the attention, the MoE router fused, the split-KV decode's steps
#           (small ones through either build: `decode_latency_build`).
#   quant   the CUDA tests of the quantized checkpoints (with the folds on by default, the
#           cases without them, the gated epilogue, the attention writing o_proj's codes) and
#           of the tensor-core decode; the test binary's failures name each case.
#   suite   the CUDA tests of every fixture family against the CPU (f32 and bf16, every
#           compile and attention backend).
#   rest    the other CUDA tests.
#   fp8     the 8B shape at batch 1: bf16, FP8 with and without the gated epilogue and the
#           input folds (session 34: the epilogue alone beat it with the folds; the GEMV now
#           stages an op's codes in shared memory), NVFP4 with and without the epilogue (twice,
#           in the same order, so drift shows); FP8 offline 1,000 x 128/128 with and without
#           the epilogue; bf16 offline.
#   moe     Qwen3-30B-A3B at batch 1: the defaults and the router fused into the MoE op (twice);
#           then the steps with the small norm launches left out (AUTODEPLOY_PROFILE_SKIP:
#           outputs wrong; the difference is what those launches cost inside the captured step).
#   long    the 8B at 2,000 positions, batch 32 and batch 1 (twice each; batch 1 also through the
#           throughput build, AUTODEPLOY_DECODE_LATENCY=0), bf16 cache against FP8 cache (at
#           batch 32 also the FP8 cache's tensor-core decode through bf16 tiles,
#           AUTODEPLOY_DECODE_FP8_CODES=0);
#           the tensor-core decode's ldmatrix fragment loads off/on at batch 64.
#   prefill the tensor-core prefill with a GQA group's heads a block against one head a block
#           (AUTODEPLOY_PREFILL_GROUP), together with a mixed step's decodes through the
#           split-KV decode (AUTODEPLOY_MIXED_SPLIT): prefill ms of 256 x 128 and offline
#           1,000 x 128/128; then each alone offline.
#   bigbatch the decode step at batch 256 and 512 (session 37's cliff past 256 tokens); ncu of
#           each kernel at decode batch 256 (short prompts) and in the offline run's shape
#           (1,024 x 128: its 8,192-token prefill steps, then decode steps at ~130 positions).
#   offline FP8 and bf16 offline 1,000 x 128/128 alone, and FP8 with an FP8 KV cache (the
#           checkpoint has no kv_cache_quant_algo: scales 1), with max_batch_size 512, and
#           with both (1,024 at max_seq_len 288).
#   gemvdetail  ncu's sections and stall reasons for the FP8 and NVFP4 decode GEMVs at batch 1.
#   offprof the FP8 offline target run (FP8 KV, 1,024 sequences) twice; ncu of each kernel in
#           its shape (the 8B cut to 4 layers, 1,024 x 128 through `bench --mode throughput`):
#           the 8,192-token prefill steps (the first 1,200 launches), then past the warm-up's
#           and first run's prefills (from launch 1,750) the steps that carry decodes.
#   fp8cost the FP8 8B at batch 1 without its norms, without its attention (wrong outputs: what
#           they cost inside the step's graph).
#   moedetail  ncu's sections and stall reasons for Qwen3-30B-A3B's MoE and attention kernels
#           at batch 1.
#   longdetail  the same sections for the latency build at batch 1 x 2,000.
#   attnprof, attndetail  the tensor-core split-KV decode at batch 32 x 2,000, bf16 against FP8
#           cache: each launch's time and DRAM bytes; ncu's warp-state and occupancy sections.
#   cudacheck  cuda_check whole (the first step of `checks`).
#   chunkab the split-KV decode's chunks planned at the least chunk worth a block, the kernels'
#           `token_chunk` lengthening them only past what 32 cover, against BASE_BIN's
#           (07462a7's or older: max_seq_len / 32): Qwen3-30B-A3B, the 8B at max_seq_len 4,096.
#   ab      the batch-1 decodes (8B bf16/FP8/NVFP4 at 128 positions, 8B 1 x 2,000 over either
#           cache, Qwen3-30B-A3B) against BASE_BIN's binaries, alternating. BASE_BIN: another
#           commit's `autodeploy` (git worktree add /tmp/base COMMIT; cargo build --release
#           -p autodeploy there with CARGO_TARGET_DIR set apart), stripped, with its BUILT,
#           in the same carried archive.
#   tf      PDL_TRIGGER_FIRST (AUTODEPLOY_KERNEL_DEFINES) against BASE_BIN (the same kernels
#           without it) at batch 1 (8B FP8, NVFP4, Qwen3-30B-A3B), then cuda_check with it.
#   moechecks cuda_check whole, then the CUDA tests of the MoE kernels.
#   held    weight chunks loaded before the PDL wait (DOWN_HELD, GEMV_HELD) on and off at
#           batch 1: Qwen3-30B-A3B and the 8B bf16.
#   moeab   Qwen3-30B-A3B at batch 1 against BASE_BIN's binaries, alternating, three times.
#   tfmod   PDL_TRIGGER_FIRST in one module at a time (PDL_TRIGGER_FIRST@MODULE=1) at batch 1:
#           the FP8 8B (graph, quant, decode), the NVFP4 8B (quant), Qwen3-30B-A3B (moe, graph);
#           TFMOD_CONFIGS="llama-3.1-8b-fp8 ..." keeps only those configs (a call's time limit).
#   normtf  the RMSNorm writing FP8 codes triggering first (NORM_CODES_TRIGGER_FIRST, default 1)
#           against waiting first (=0) at batch 1: FP8 8B (twice), NVFP4 8B; the bf16 8B with
#           PDL_TRIGGER_FIRST@graph.
#   ablate  the FP8 and NVFP4 8B batch-1 step with one op kind skipped (AUTODEPLOY_PROFILE_SKIP):
#           each kind's cost inside the step.
#   ablate2 the FP8 8B batch-1 step's parts outside the GEMVs, by skipping (as ablate).
#   ablate3 Qwen3-30B-A3B's batch-1 step by skipping (as ablate): MoE, norms, attention.
#   qattn   Qwen3-30B-A3B at batch 1 with the latency attention at 8 positions a pass.
#   epiab   the FP8 gated epilogue on top of the defaults, batch 1.
#   inflight the FP8 and NVFP4 tensor-core GEMVs' weight steps in flight (the same variable)
#           timed in the whole 8B batch-1 step.
#   targets the batch-1 targets at the defaults (8B bf16, FP8, NVFP4; Qwen3-30B-A3B), twice.
#   targets2 the FP8-cache (8B at 2,000 positions, batch 32 and 1) and offline targets.
#   longcheck cuda_check whole, then the 8B at batch 1 x 2,000 over either cache.
#   longprof each kernel's time and DRAM bytes at batch 1 x 2,000, bf16 against FP8 cache.
#   profile each kernel's time in one decode step (ncu, kernels run one at a time, so no
#           overlap: the per-kernel floor, not the step) of the FP8 8B and Qwen3-30B-A3B at
#           batch 1 with every fusion on, and of the FP8 8B at batch 256, the models cut to 4
#           layers; $OUT/ncu-*.csv.
# Each bench line is benches/gpu/summarize.py's summary; the JSON lines go to $OUT (default /tmp).
# KCACHE (a .tar.xz of an earlier call's $OUT/kcache.tar.xz, carried) skips most of a fresh
# machine's kernel compile; see below. A binary started by hand after this script on the same
# machine finds that cache only through AUTODEPLOY_KERNEL_CACHE=/tmp/kcache/ptx
# CUDA_CACHE_PATH=/tmp/kcache/jit; without them it compiles every module cold (~270 s).
set -u
BIN=${1:?usage: pending.sh BIN_DIR}
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp}
PARTS=${PARTS:-checks quant suite rest fp8 moe long}
ALL_ON=("[transforms.fuse_moe_router]" "enabled = true" "[transforms.fuse_quant_gated_epilogue]" "enabled = true")
B="$BIN/autodeploy"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "binaries: $(cat "$BIN/BUILT" 2>/dev/null || echo unknown)"
# Config variants live beside the originals (their model paths are relative to them), removed
# on exit.
variant() { # name base.toml lines...
    local f="$H/.pending-$1.toml"
    cp "$H/$2" "$f"
    shift 2
    printf '\n%s' "$@" >>"$f"
    echo >>"$f"
    echo "$f"
}
trap 'rm -f "$H"/.pending-*.toml' EXIT
# A kernel cache carried from an earlier call (KCACHE=gpu-carry/kcache.tar.xz, carried): NVRTC's
# PTX (AUTODEPLOY_KERNEL_CACHE, keyed by source, arch and NVRTC version) and the driver's JIT
# cache of that PTX (CUDA_CACHE_PATH), so a fresh machine compiles only the modules whose
# source changed; written back as $KCACHE_OUT/kcache.tar.xz (default $OUT) for the next call,
# without the entries this call neither read nor wrote (older sources' modules: the carry is
# limited, session 38's cache had grown to 13 MB compressed). A file read has its access time
# moved past the marker (relatime: it was not after the modification time tar restored); on a
# noatime mount every carried file would go, and the next call compiles everything again.
if [ -n "${KCACHE:-}" ]; then
    mkdir -p /tmp/kcache/ptx /tmp/kcache/jit
    if [ -f "$KCACHE" ]; then tar xJf "$KCACHE" -C /tmp/kcache; fi
    touch /tmp/kcache/.marker
    export AUTODEPLOY_KERNEL_CACHE=/tmp/kcache/ptx CUDA_CACHE_PATH=/tmp/kcache/jit CUDA_CACHE_MAXSIZE=4294967296
    trap 'rm -f "$H"/.pending-*.toml
        find /tmp/kcache -type f ! -name .marker ! -anewer /tmp/kcache/.marker ! -newer /tmp/kcache/.marker -delete
        XZ_OPT=-9 tar cJf "${KCACHE_OUT:-$OUT}/kcache.tar.xz" -C /tmp/kcache .' EXIT
    echo "kernel cache: $(find /tmp/kcache -type f | wc -l) files from ${KCACHE}"
fi
cut4() { # name model-folder (relative to benches/): a copy in $OUT/cut-<name> cut to 4 layers
    rm -rf "$OUT/cut-$1" && cp -r "$H/../$2" "$OUT/cut-$1"
    python3 -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c['num_hidden_layers']=4; json.dump(c,open(p,'w'))" "$OUT/cut-$1"
}
on_cut() { # name base.toml cut-name [lines...]: a variant of base.toml reading $OUT/cut-<cut-name>
    local f
    f=$(variant "$1" "$2" "${@:4}")
    sed -i "s|^model = .*|model = \"$OUT/cut-$3\"|" "$f"
    echo "$f"
}
stall_metrics() { # [extra causes...]: ncu's warps stalled per issued instruction, by cause
    local m
    m=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard \
        barrier wait math_pipe_throttle mio_throttle lg_throttle not_selected no_instruction dispatch_stall "$@")
    echo "${m%,}"
}
ncu_kernels() { # config batch prompt-length launches [skip]: each kernel's mean time, DRAM GB/s
    # and share of the time (ncu, one launch at a time) in `bench --mode throughput` of that
    # shape, keyed by grid (a step's prefill and decode launches list apart), the first `skip`
    # launches (default 0) not profiled
    local c=$1 b=$2 isl=$3 n=$4 skip=${5:-0}
    echo "  -- $(basename "$c" .toml), batch $b, prompts of $isl, launches $skip.. +$n"
    timeout 240 ncu --print-units base --clock-control none --csv \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        -k 'regex:^(?!fill)' --launch-skip "$skip" --launch-count "$n" \
        "$B" bench --config "$c" --mode throughput --batch "$b" --isl "$isl" --osl 8 \
        >"$OUT/ncu-big-$b.csv" 2>"$OUT/ncu-big-$b.err" || tail -3 "$OUT/ncu-big-$b.err"
    python3 - "$OUT/ncu-big-$b.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and (r[0] == "ID" or r[0].isdigit())]
head, rows = rows[0], rows[1:]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
g = head.index("Grid Size") if "Grid Size" in head else None
# Per launch (ID): its time (ns) and DRAM bytes; then per (kernel, grid): launches, mean time,
# DRAM GB/s over its launches.
per = collections.defaultdict(dict)
for r in rows:
    per[(r[0], r[k].split("(")[0], r[g] if g is not None else "")][r[m]] = float(r[v].replace(",", ""))
t = collections.defaultdict(lambda: [0, 0.0, 0.0])
for (_, name, grid), ms in per.items():
    a = t[(name, grid)]
    a[0] += 1
    a[1] += ms.get("gpu__time_duration.sum", 0.0)
    a[2] += ms.get("dram__bytes_read.sum", 0.0) + ms.get("dram__bytes_write.sum", 0.0)
total = sum(a[1] for a in t.values()) or 1.0
for (name, grid), (n, ns, by) in sorted(t.items(), key=lambda kv: -kv[1][1]):
    print(f"  {name[:44]:<44} {grid:>16} {n:4d} launches, mean {ns / n / 1e3:8.2f} us, "
          f"{by / max(ns, 1.0):7.0f} GB/s, {100 * ns / total:5.1f}% of the time")
PY
}
ncu_detail() { # kernel-regex mode batch: ncu's sections for one launch of the kernel in the 8B
    # (cut to 4 layers) at `batch` x 2,000 positions, bf16 cache and FP8 cache
    cut4 8b configs/Llama-3.1-8B-Instruct
    local base c stalls
    for base in llama-3.1-8b-long.toml llama-3.1-8b-long-fp8kv.toml; do
        c=$(on_cut "detail-$base" "$base" 8b)
        echo "  -- $base"
        stalls=$(stall_metrics drain membar sleeping),smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum
        timeout 200 ncu --section WarpStateStats --section Occupancy --section LaunchStats --section SpeedOfLight \
            --metrics "$stalls" -k "regex:$1" --launch-skip 6 --launch-count 1 \
            "$B" bench --config "$c" --mode "$2" --batch "$3" --isl 2000 --osl 4 2>&1 |
            grep -E "Duration|Registers|Occupancy|Block Limit (Reg|Shared)|Waves|Warp Cycles Per Issued|DRAM Throughput|Compute \(SM\)|Static Shared|issue_stalled|local_" | head -40
    done
}
cuda_check_all() { # seconds [pattern]: cuda_check whole; its exit, count and time, then its
    # failures and the lines the pattern picks
    local t0
    t0=$(date +%s)
    timeout "$1" "$BIN/cuda_check" >"$OUT/cuda_check.log" 2>&1
    echo "cuda_check exit $?: $(grep -c ' ok$' "$OUT/cuda_check.log") checks ok in $(($(date +%s) - t0)) s (kernel compile included)"
    grep -E "FAILED|all kernels|error${2:+|$2}" "$OUT/cuda_check.log" | head -20
}
cuda_tests() { # seconds filters-and-flags...: the CUDA tests (ignored ones included), a line each
    local secs=$1
    shift
    timeout "$secs" "$BIN/cuda-tests" --include-ignored --test-threads 1 "$@" 2>&1 |
        grep -E "^test |panicked|FAILED|failed|test result" | head -60
}
bench() { # label config args... (env from the caller)
    local label=$1 cfg=$2
    shift 2
    printf '%-44s ' "$label"
    timeout 120 "$B" bench --config "$cfg" "$@" 2>"$OUT/pending-last.err" | tee -a "$OUT/pending.json" |
        python3 "$H/summarize.py" 2>/dev/null | head -1
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "(failed:)"; tail -3 "$OUT/pending-last.err"; }
}
precompile() { # defines config [binary]: a short run that compiles the modules this define set
    # changes (NVRTC, not timed), so the timed runs after it find them cached
    AUTODEPLOY_KERNEL_DEFINES=$1 timeout 300 "${3:-$B}" bench --config "$2" --mode latency --batch 1 --isl 16 \
        --osl 2 >/dev/null 2>&1 || echo "(compile run with ${1:-no defines} failed)"
}
off() { # label config [env]
    printf '%-44s ' "$1"
    timeout 120 env ${3:-} "$B" bench --config "$2" --mode offline --num-requests 1000 --isl 128 --osl 128 \
        2>"$OUT/pending-last.err" | tee -a "$OUT/pending.json" |
        python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ['wall_s','output_tok_per_s','steps','mean_step_ms','prefill_s','decode_only_s']})" ||
        tail -3 "$OUT/pending-last.err"
}
for part in $PARTS; do
    echo "== $part"
    case $part in
    cudacheck)
        cuda_check_all 330 "device copy"
        ;;
    checks)
        cuda_check_all 330 "device copy"
        cuda_tests 240 fused_qk_norms fused_moe_router fused_router a_decode_step_past_the_split \
            a_mixed_steps_decodes small_decode_steps
        ;;
    quant)
        cuda_tests 560 quantized_checkpoints batched_bf16_decode
        ;;
    suite)
        cuda_tests 560 cuda_matches_cpu
        ;;
    rest)
        cuda_tests 560 --skip cuda_matches_cpu --skip fused_qk_norms --skip quantized_checkpoints \
            --skip batched_bf16_decode --skip fused_moe_router --skip fused_router
        ;;
    fp8)
        # (Since session 34 the folds, fuse_gated_act + fuse_fp8_input_quant, are defaults.)
        epi=$(variant fp8-epi llama-3.1-8b-fp8.toml "[transforms.fuse_quant_gated_epilogue]" "enabled = true")
        nofold=$(variant fp8-nofold llama-3.1-8b-fp8.toml "[transforms.fuse_fp8_input_quant]" "enabled = false")
        epinofold=$(variant fp8-epi-nofold llama-3.1-8b-fp8.toml "[transforms.fuse_quant_gated_epilogue]" "enabled = true" \
            "[transforms.fuse_fp8_input_quant]" "enabled = false")
        nepi=$(variant nvfp4-epi llama-3.1-8b-nvfp4.toml "[transforms.fuse_quant_gated_epilogue]" "enabled = true")
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for _ in 1 2; do
            bench "8B bf16 batch 1" "$H/llama-3.1-8b.toml" $lat
            bench "8B FP8 batch 1" "$H/llama-3.1-8b-fp8.toml" $lat
            bench "8B FP8 batch 1, input folds off" "$nofold" $lat
            bench "8B FP8 batch 1, gated epilogue" "$epi" $lat
            bench "8B FP8 batch 1, gated epilogue, input folds off" "$epinofold" $lat
            bench "8B NVFP4 batch 1" "$H/llama-3.1-8b-nvfp4.toml" $lat
            bench "8B NVFP4 batch 1, gated epilogue" "$nepi" $lat
        done
        oepi=$(variant fp8-off-epi llama-3.1-8b-fp8-offline.toml "[transforms.fuse_quant_gated_epilogue]" "enabled = true")
        off "FP8 offline" "$H/llama-3.1-8b-fp8-offline.toml"
        off "FP8 offline, gated epilogue" "$oepi"
        off "bf16 offline" "$H/llama-3.1-8b-offline.toml"
        off "FP8 offline (again)" "$H/llama-3.1-8b-fp8-offline.toml"
        ;;
    moe)
        # (Since session 34 the q/k norms fused into the attention are a default.)
        router=$(variant moe-router qwen3-30b-a3b.toml "[transforms.fuse_moe_router]" "enabled = true")
        lat="--mode latency --batch 1 --isl 128 --osl 64"
        for _ in 1 2; do
            bench "Qwen3-30B-A3B batch 1" "$H/qwen3-30b-a3b.toml" $lat
            bench "Qwen3-30B-A3B batch 1, router fused" "$router" $lat
        done
        AUTODEPLOY_PROFILE_SKIP=torch_rmsnorm bench "  without torch_rmsnorm (wrong outputs)" "$H/qwen3-30b-a3b.toml" $lat
        AUTODEPLOY_PROFILE_SKIP=fused_add_rmsnorm bench "  without fused_add_rmsnorm (wrong outputs)" \
            "$H/qwen3-30b-a3b.toml" $lat
        ;;
    offprof)
        off "FP8 offline, FP8 KV, 1,024" "$H/llama-3.1-8b-fp8-offline-1k.toml"
        off "FP8 offline, FP8 KV, 1,024 (again)" "$H/llama-3.1-8b-fp8-offline-1k.toml"
        cut4 8b-fp8 configs/Llama-3.1-8B-Instruct-FP8
        c=$(on_cut big-fp8 llama-3.1-8b-fp8-offline-1k.toml 8b-fp8)
        ncu_kernels "$c" 1024 128 1200
        ncu_kernels "$c" 1024 128 300 1750
        ;;
    fp8cost)
        # What the FP8 8B's batch-1 step spends inside its CUDA graph on the launches besides
        # the GEMVs: the step without the norms, without the attention (wrong outputs; the
        # difference is their cost in the step, overlap included), twice.
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for _ in 1 2; do
            bench "8B FP8 batch 1" "$H/llama-3.1-8b-fp8.toml" $lat
            AUTODEPLOY_PROFILE_SKIP=torch_rmsnorm,fused_add_rmsnorm bench "  without the norms (wrong outputs)" \
                "$H/llama-3.1-8b-fp8.toml" $lat
            AUTODEPLOY_PROFILE_SKIP=attention_with_kv_cache bench "  without the attention (wrong outputs)" \
                "$H/llama-3.1-8b-fp8.toml" $lat
        done
        ;;
    long)
        for _ in 1 2; do
            bench "8B 32 x 2000, bf16 cache" "$H/llama-3.1-8b-long.toml" --mode throughput --batch 32 --isl 2000 --osl 16
            bench "8B 32 x 2000, FP8 cache" "$H/llama-3.1-8b-long-fp8kv.toml" --mode throughput --batch 32 --isl 2000 --osl 16
            AUTODEPLOY_DECODE_FP8_CODES=0 bench "8B 32 x 2000, FP8 cache, bf16 tiles" "$H/llama-3.1-8b-long-fp8kv.toml" \
                --mode throughput --batch 32 --isl 2000 --osl 16
        done
        # (Batch 1 runs the latency build, which reads the FP8 cache's codes on CUDA cores:
        # since session 40 by integer operations, `e4m3x4_int`.)
        # And both through rope_write_kv + the throughput build (tensor cores, a GQA group a
        # block) instead (AUTODEPLOY_DECODE_LATENCY=0).
        for _ in 1 2; do
            for c in llama-3.1-8b-long llama-3.1-8b-long-fp8kv; do
                bench "8B 1 x 2000, $c" "$H/$c.toml" --mode latency --batch 1 --isl 2000 --osl 8
                AUTODEPLOY_DECODE_LATENCY=0 bench "8B 1 x 2000, $c, throughput build" "$H/$c.toml" \
                    --mode latency --batch 1 --isl 2000 --osl 8
            done
        done
        for _ in 1 2; do
            bench "8B batch 64, tensor-core decode" "$H/llama-3.1-8b.toml" --mode throughput --batch 64
            AUTODEPLOY_DECODE_LDSM=1 bench "8B batch 64, ldmatrix" "$H/llama-3.1-8b.toml" --mode throughput --batch 64
        done
        ;;
    ab)
        # The batch-1 decode steps the latency build runs, these binaries against BASE_BIN's
        # (another commit's release binaries, carried beside; without it, these alone), each
        # pair alternating, twice: the 8B in bf16, FP8 and NVFP4 at 128 positions, the 8B at
        # 2,000 positions over either cache, Qwen3-30B-A3B. (Session 41: d6e8cf8's L1 prefetch
        # of this step's position against 9c94972, measured at 2,000 only.)
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        long="--mode latency --batch 1 --isl 2000 --osl 8"
        for run in "8B bf16:llama-3.1-8b:$lat" "8B FP8:llama-3.1-8b-fp8:$lat" "8B NVFP4:llama-3.1-8b-nvfp4:$lat" \
            "8B 1 x 2000 bf16 cache:llama-3.1-8b-long:$long" "8B 1 x 2000 FP8 cache:llama-3.1-8b-long-fp8kv:$long" \
            "Qwen3-30B-A3B:qwen3-30b-a3b:--mode latency --batch 1 --isl 128 --osl 64"; do
            IFS=: read -r label c args <<<"$run"
            for _ in 1 2; do
                # shellcheck disable=SC2086
                bench "$label" "$H/$c.toml" $args
                # shellcheck disable=SC2086
                [ -n "${BASE_BIN:-}" ] && B="$BASE_BIN/autodeploy" bench "  (base: $(cat "$BASE_BIN/BUILT" 2>/dev/null))" "$H/$c.toml" $args
            done
        done
        ;;
    chunkab)
        # Split-KV chunks planned at the least chunk worth a block and lengthened by the kernel
        # only past what 32 of them cover (`token_chunk`), these binaries against BASE_BIN's
        # (07462a7's or older: planned at max_seq_len / 32), alternating, CHUNKAB_REPS times
        # (default 2): batch 1 at
        # 128 positions for Qwen3-30B-A3B (max_seq_len 1,024: chunks of 16 against 32), the 8B
        # bf16 and FP8 at max_seq_len 4,096 (as the serving configs have it: 16 against 128).
        # (The tensor-core throughput build's plan is the same both ways up to 8,192 positions:
        # chunks of at least 256.)
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for c in llama-3.1-8b llama-3.1-8b-fp8; do
            sed 's/^max_seq_len = 512$/max_seq_len = 4096/' "$H/$c.toml" >"$H/.pending-$c-4k.toml"
            grep -q '^max_seq_len = 4096$' "$H/.pending-$c-4k.toml" || echo "chunkab: no max_seq_len = 512 in $c.toml"
        done
        for run in "Qwen3-30B-A3B:$H/qwen3-30b-a3b.toml:--mode latency --batch 1 --isl 128 --osl 64" \
            "8B bf16 max_seq_len 4096:$H/.pending-llama-3.1-8b-4k.toml:$lat" \
            "8B FP8 max_seq_len 4096:$H/.pending-llama-3.1-8b-fp8-4k.toml:$lat"; do
            IFS=: read -r label cfg args <<<"$run"
            for _ in $(seq "${CHUNKAB_REPS:-2}"); do
                # shellcheck disable=SC2086
                bench "$label" "$cfg" $args
                # shellcheck disable=SC2086
                B="$BASE_BIN/autodeploy" bench "  (base: $(cat "$BASE_BIN/BUILT" 2>/dev/null))" "$cfg" $args
            done
        done
        ;;
    moechecks)
        # cuda_check whole, then the CUDA tests of the MoE kernels (the fused router against
        # the CPU on the qwen3_moe fixture, the router's own routing, grouped against per slot).
        cuda_check_all 330 "device copy"
        cuda_tests 200 fused_moe_router fused_router grouped_moe
        ;;
    held)
        # Weight chunks loaded before the PDL wait (AUTODEPLOY_KERNEL_DEFINES): the MoE down
        # rows' (DOWN_HELD, default 4; 0 = none) and the one-row bf16 split GEMV's (GEMV_HELD,
        # default 0): Qwen3-30B-A3B and the 8B bf16 at batch 1, alternating, twice. Each define
        # set's module compiles first (not timed).
        q="--mode latency --batch 1 --isl 128 --osl 64"
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for d in GEMV_HELD=4 DOWN_HELD=0; do precompile $d "$H/qwen3-30b-a3b.toml"; done
        for _ in 1 2; do
            for d in "" DOWN_HELD=0 GEMV_HELD=4; do
                # shellcheck disable=SC2086
                AUTODEPLOY_KERNEL_DEFINES=$d bench "Qwen3-30B-A3B ${d:-defaults}" "$H/qwen3-30b-a3b.toml" $q
            done
            for d in "" GEMV_HELD=4; do
                # shellcheck disable=SC2086
                AUTODEPLOY_KERNEL_DEFINES=$d bench "8B bf16 ${d:-defaults}" "$H/llama-3.1-8b.toml" $lat
            done
        done
        ;;
    moeab)
        # Qwen3-30B-A3B at batch 1 against BASE_BIN's binaries (session 43: moe_down_bf16
        # reading its expert ids and first weight chunks and moe_combine its token's expert order
        # before their wait), alternating, three times. BASE_BIN's own modules compile first.
        precompile "" "$H/qwen3-30b-a3b.toml" "$BASE_BIN/autodeploy"
        for _ in 1 2 3; do
            bench "Qwen3-30B-A3B" "$H/qwen3-30b-a3b.toml" --mode latency --batch 1 --isl 128 --osl 64
            B="$BASE_BIN/autodeploy" bench "  (base: $(cat "$BASE_BIN/BUILT" 2>/dev/null))" "$H/qwen3-30b-a3b.toml" \
                --mode latency --batch 1 --isl 128 --osl 64
        done
        ;;
    normtf)
        # The RMSNorm writing FP8 codes triggering its successor (the FP8 GEMV) before its wait
        # (NORM_CODES_TRIGGER_FIRST, the default since session 45: FP8 8B 1.9% faster) against
        # it waiting first (=0): the FP8 8B, alternating, twice; then the NVFP4 8B (norms
        # writing bf16: the define changes nothing) once each.
        precompile "NORM_CODES_TRIGGER_FIRST=0" "$H/llama-3.1-8b-fp8.toml"
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for c in llama-3.1-8b-fp8 llama-3.1-8b-fp8 llama-3.1-8b-nvfp4; do
            # shellcheck disable=SC2086
            bench "$c" "$H/$c.toml" $lat
            # shellcheck disable=SC2086
            AUTODEPLOY_KERNEL_DEFINES=NORM_CODES_TRIGGER_FIRST=0 bench "$c, codes norm waiting first" "$H/$c.toml" $lat
        done
        # The bf16 8B (its norms and GEMVs all graph.cu's) with all of graph.cu triggering first.
        precompile "PDL_TRIGGER_FIRST@graph=1" "$H/llama-3.1-8b.toml"
        for _ in 1 2; do
            # shellcheck disable=SC2086
            bench "8B bf16" "$H/llama-3.1-8b.toml" $lat
            # shellcheck disable=SC2086
            AUTODEPLOY_KERNEL_DEFINES=PDL_TRIGGER_FIRST@graph=1 bench "8B bf16, graph.cu triggering first" \
                "$H/llama-3.1-8b.toml" $lat
        done
        ;;
    ablate)
        # Where the batch-1 step goes without a timeline (no nsys on these machines): the step
        # with one op kind not run at all (AUTODEPLOY_PROFILE_SKIP; wrong outputs, timing only),
        # so the difference from the full step is that kind's cost inside the step, overlap
        # included. The FP8 8B, then the NVFP4 8B.
        lat="--mode latency --batch 1 --isl 128 --osl 64"
        for spec in "llama-3.1-8b-fp8:torch_quant_fp8_linear" "llama-3.1-8b-nvfp4:torch_quant_nvfp4_linear"; do
            c=${spec%%:*}
            for skip in "" "${spec#*:}" "fused_add_rmsnorm,torch_rmsnorm" "torch_gated_act" "attention_with_kv_cache" \
                "aten.linear"; do
                # shellcheck disable=SC2086
                AUTODEPLOY_PROFILE_SKIP=$skip bench "$c, skipping ${skip:-nothing}" "$H/$c.toml" $lat
            done
        done
        ;;
    ablate2)
        # The FP8 8B batch-1 step's parts outside the layers' GEMVs, by skipping
        # (AUTODEPLOY_PROFILE_SKIP, as ablate): every op (what is left is the host, the graph
        # launch and the argmax), the RoPE tables' element-wise ops, the views, the embedding
        # and the logits' row gather, and everything but the linears.
        lat="--mode latency --batch 1 --isl 128 --osl 64"
        rope="aten._to_copy,aten.cat,aten.cos,aten.mul.Tensor,aten.sin"
        views="aten.reshape,aten.transpose.int,aten.slice.Tensor,aten.view,aten.unsqueeze"
        rest="aten.embedding,aten.index_select,attention_with_kv_cache,fused_add_rmsnorm,torch_gated_act,torch_rmsnorm"
        for skip in "" "$rope,$views,$rest,aten.linear,torch_quant_fp8_linear" "$rope" "$views" \
            "aten.embedding,aten.index_select" "$rope,$views,$rest"; do
            # shellcheck disable=SC2086
            AUTODEPLOY_PROFILE_SKIP=$skip bench "skipping ${skip:-nothing}" "$H/llama-3.1-8b-fp8.toml" $lat
        done
        ;;
    ablate3)
        # Qwen3-30B-A3B's batch-1 step by skipping (as ablate): the MoE op, the norms, the
        # attention; only the MoE ops run; only the linears (q/k/v, o, router, LM head) run.
        lat="--mode latency --batch 1 --isl 128 --osl 64"
        small="aten._to_copy,aten.cat,aten.cos,aten.mul.Tensor,aten.sin,aten.embedding,aten.index_select"
        views="aten.reshape,aten.transpose.int,aten.slice.Tensor,aten.view,aten.unsqueeze"
        norms="fused_add_rmsnorm,torch_rmsnorm"
        for skip in "" "torch_moe" "$norms" "attention_with_kv_cache" \
            "$small,$views,$norms,attention_with_kv_cache,aten.linear" "$small,$views,$norms,attention_with_kv_cache,torch_moe"; do
            # shellcheck disable=SC2086
            AUTODEPLOY_PROFILE_SKIP=$skip bench "skipping ${skip:-nothing}" "$H/qwen3-30b-a3b.toml" $lat
        done
        ;;
    qattn)
        # Qwen3-30B-A3B's attention (7.4 us a layer in the batch-1 step, the FP8 8B's 4.0:
        # session 45's ablate3): the latency build at 8 positions a warp and pass (chunks of 32,
        # half the partial states to merge) against the default 4; and at max_seq_len 512 (its
        # config has 1,024: before session 46's `Split::plan` that gave chunks of 32, two passes
        # of the four warps, where 512 gives 16, one pass; now both give 16, so the two should
        # time alike), alternating, twice.
        q="--mode latency --batch 1 --isl 128 --osl 64"
        v="$H/.pending-qchunk.toml"
        sed 's/^max_seq_len = 1024$/max_seq_len = 512/' "$H/qwen3-30b-a3b.toml" >"$v"
        grep -q '^max_seq_len = 512$' "$v" || echo "qattn: no max_seq_len = 1024 in qwen3-30b-a3b.toml"
        for _ in 1 2; do
            # shellcheck disable=SC2086
            bench "Qwen3-30B-A3B" "$H/qwen3-30b-a3b.toml" $q
            # shellcheck disable=SC2086
            AUTODEPLOY_ATTN_U=8 bench "Qwen3-30B-A3B, 8 positions a pass" "$H/qwen3-30b-a3b.toml" $q
            # shellcheck disable=SC2086
            bench "Qwen3-30B-A3B, max_seq_len 512 (chunks of 16)" "$v" $q
        done
        ;;
    epiab)
        # The FP8 gate/up GEMV writing the down projection's codes (fuse_quant_gated_epilogue)
        # on top of the defaults, alternating, twice (session 34: no faster than the folds).
        v=$(variant epiab llama-3.1-8b-fp8.toml "[transforms.fuse_quant_gated_epilogue]" "enabled = true")
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for _ in 1 2; do
            # shellcheck disable=SC2086
            bench "FP8 8B" "$H/llama-3.1-8b-fp8.toml" $lat
            # shellcheck disable=SC2086
            bench "FP8 8B, gated epilogue" "$v" $lat
        done
        ;;
    inflight)
        # The quantized tensor-core GEMVs' weight steps in flight (AUTODEPLOY_KERNEL_DEFINES:
        # FP8 4, default 2; NVFP4 2, default 1; the first are requested before the PDL wait)
        # timed in the whole batch-1 step, where benches/gpu/fp8-gemv times the GEMVs back to
        # back without the norm and attention kernels between; alternating, twice. The define
        # set's quant module compiles first (not timed).
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        IF=FP8_TC_INFLIGHT=4,NVFP4_TC_INFLIGHT=2
        precompile $IF "$H/llama-3.1-8b-nvfp4.toml"
        for _ in 1 2; do
            for c in fp8 nvfp4; do
                for d in "" $IF; do
                    # shellcheck disable=SC2086
                    AUTODEPLOY_KERNEL_DEFINES=$d bench "8B $c ${d:-defaults}" "$H/llama-3.1-8b-$c.toml" $lat
                done
            done
        done
        ;;
    tf)
        # PDL_TRIGGER_FIRST alone, in the fewest runs (one call's last device minutes): these
        # binaries with it against BASE_BIN's (the same kernels without the define: session 43
        # passed BASE_BIN=/tmp/newbin, these binaries), alternating: the 8B FP8 and NVFP4 at batch 1,
        # Qwen3-30B-A3B, twice while time lasts. The define's modules compile first (not timed).
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        TF=PDL_TRIGGER_FIRST=1
        precompile $TF "$H/llama-3.1-8b-nvfp4.toml"
        for _ in 1 2; do
            for run in "8B FP8:llama-3.1-8b-fp8:$lat" "8B NVFP4:llama-3.1-8b-nvfp4:$lat" \
                "Qwen3-30B-A3B:qwen3-30b-a3b:--mode latency --batch 1 --isl 128 --osl 64"; do
                IFS=: read -r label c args <<<"$run"
                # shellcheck disable=SC2086
                AUTODEPLOY_KERNEL_DEFINES=$TF bench "$label $TF" "$H/$c.toml" $args
                # shellcheck disable=SC2086
                B="$BASE_BIN/autodeploy" bench "  (base: $(cat "$BASE_BIN/BUILT" 2>/dev/null))" "$H/$c.toml" $args
            done
        done
        # Every kernel against the CPU with the successors launching early (its modules
        # compiled above).
        AUTODEPLOY_KERNEL_DEFINES=$TF cuda_check_all 200 "device copy"
        ;;
    tfmod)
        # PDL_TRIGGER_FIRST in one module at a time (session 43: in all of them the FP8 8B
        # gained 2.7%, the NVFP4 8B and Qwen3-30B-A3B lost 8% and 6%): the FP8 8B with it in the
        # norms' module (graph), the FP8 GEMVs' (quant), the decode attention's; then the
        # NVFP4 8B with it in quant, Qwen3-30B-A3B in moe, graph and decode (its attention
        # costs 7.4 us a layer in the step, session 45); alternating with the defaults, twice.
        # Each define set's module compiles first (not timed).
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        q="--mode latency --batch 1 --isl 128 --osl 64"
        for run in "8B FP8:llama-3.1-8b-fp8:$lat:graph quant decode" "8B NVFP4:llama-3.1-8b-nvfp4:$lat:quant" \
            "Qwen3-30B-A3B:qwen3-30b-a3b:$q:moe graph decode"; do
            IFS=: read -r label c args mods <<<"$run"
            [[ " ${TFMOD_CONFIGS:-$c} " == *" $c "* ]] || continue
            for m in $mods; do precompile "PDL_TRIGGER_FIRST@$m=1" "$H/$c.toml"; done
            for _ in 1 2; do
                # shellcheck disable=SC2086
                bench "$label defaults" "$H/$c.toml" $args
                for m in $mods; do
                    # shellcheck disable=SC2086
                    AUTODEPLOY_KERNEL_DEFINES=PDL_TRIGGER_FIRST@$m=1 bench "$label trigger first in $m" "$H/$c.toml" $args
                done
            done
        done
        ;;
    targets)
        # Issue 24's and 25's batch-1 targets at HEAD's defaults on whatever card came (they are
        # stated for an H200): the 8B bf16, FP8, NVFP4 at 128 positions and Qwen3-30B-A3B,
        # twice, alternating.
        lat="--mode latency --batch 1 --isl 128 --osl 128"
        for _ in 1 2; do
            bench "8B bf16 batch 1" "$H/llama-3.1-8b.toml" $lat
            bench "8B FP8 batch 1" "$H/llama-3.1-8b-fp8.toml" $lat
            bench "8B NVFP4 batch 1" "$H/llama-3.1-8b-nvfp4.toml" $lat
            bench "Qwen3-30B-A3B batch 1" "$H/qwen3-30b-a3b.toml" --mode latency --batch 1 --isl 128 --osl 64
        done
        ;;
    targets2)
        # Issue 25's FP8-cache and offline targets: the 8B at 2,000 positions (batch 32, then
        # batch 1) over either cache, alternating; FP8 offline 1,000 x 128/128 at the defaults
        # and with an FP8 cache at max_batch_size 1,024.
        for _ in 1 2; do
            for c in llama-3.1-8b-long llama-3.1-8b-long-fp8kv; do
                bench "8B 32 x 2000, $c" "$H/$c.toml" --mode throughput --batch 32 --isl 2000 --osl 16
            done
        done
        for c in llama-3.1-8b-long llama-3.1-8b-long-fp8kv; do
            bench "8B 1 x 2000, $c" "$H/$c.toml" --mode latency --batch 1 --isl 2000 --osl 8
        done
        off "FP8 offline" "$H/llama-3.1-8b-fp8-offline.toml"
        off "FP8 offline, FP8 KV cache, max_batch_size 1024" "$H/llama-3.1-8b-fp8-offline-1k.toml"
        ;;
    longcheck)
        # The decode builds after session 41's rewrite of their loop (the step's own positions
        # after the cached ones, one copy of their code): cuda_check whole, then the 8B at batch
        # 1 x 2,000 over either cache (twice, alternating).
        cuda_check_all 330 "device copy"
        for _ in 1 2; do
            for c in llama-3.1-8b-long llama-3.1-8b-long-fp8kv; do
                bench "8B 1 x 2000, $c" "$H/$c.toml" --mode latency --batch 1 --isl 2000 --osl 8
            done
        done
        ;;
    longprof)
        # Where the FP8 cache's batch-1 decode at 2,000 positions loses to the bf16 cache's
        # (session 41: 5.96-5.98 against 5.74-5.75 ms/step, either decode build): each kernel's
        # time and DRAM bytes in both, the 8B cut to 4 layers (decode launches keyed apart from
        # the prefill's by grid).
        cut4 8b configs/Llama-3.1-8B-Instruct
        for c in llama-3.1-8b-long llama-3.1-8b-long-fp8kv; do
            ncu_kernels "$(on_cut "prof-$c" "$c.toml" 8b)" 1 2000 400
        done
        ;;
    profile)
        # The model configs cut to 4 layers, beside a config naming them by absolute path.
        for m in Llama-3.1-8B-Instruct-FP8:configs/Llama-3.1-8B-Instruct-FP8 \
            Qwen3-30B-A3B:../tests/fixtures/model-configs/Qwen/Qwen3-30B-A3B; do
            cut4 "${m%%:*}" "${m#*:}"
        done
        f8=$(on_cut prof-fp8 llama-3.1-8b-fp8.toml Llama-3.1-8B-Instruct-FP8 "${ALL_ON[@]}")
        f8b=$(on_cut prof-fp8-big llama-3.1-8b-fp8-offline.toml Llama-3.1-8B-Instruct-FP8)
        moe=$(on_cut prof-moe qwen3-30b-a3b.toml Qwen3-30B-A3B "${ALL_ON[@]}")
        # (label, config, bench arguments): batch 1, and the FP8 8B's decode at batch 256 (the
        # offline run's steady state: where its 13 ms decode steps go).
        for run in "1:$f8:--mode latency --batch 1 --isl 16 --osl 8" "1:$moe:--mode latency --batch 1 --isl 16 --osl 8" \
            "256:$f8b:--mode throughput --batch 256 --isl 128 --osl 8"; do
            IFS=: read -r batch c args <<<"$run"
            tag=$(basename "$c" .toml)-b$batch
            echo "  -- $tag"
            # shellcheck disable=SC2086
            timeout 250 ncu --print-units base --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
                -k 'regex:^(?!fill)' --launch-skip 200 --launch-count 120 \
                "$B" bench --config "$c" --compile-backend opt $args \
                >"$OUT/ncu-$tag.csv" 2>"$OUT/ncu-$tag.err" || tail -3 "$OUT/ncu-$tag.err"
            python3 - "$OUT/ncu-$tag.csv" <<'PY'
import csv, sys, collections
# (ncu's own lines and the bench's JSON line share the file: the rows are those with an ID.)
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and (r[0] == "ID" or r[0].isdigit())]
head, rows = rows[0], rows[1:]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
t = collections.defaultdict(list)
for r in rows:
    if r[m] == "gpu__time_duration.sum":
        t[r[k].split("(")[0]].append(float(r[v].replace(",", "")))
for name, xs in sorted(t.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {name[:48]:<48} {len(xs):4d} launches, mean {sum(xs) / len(xs) / 1e3:8.2f} us")
PY
        done
        ;;
    offline)
        # FP8 and bf16 offline 1,000 x 128/128 alone (the fp8 part's offline runs without its
        # batch-1 list), FP8 twice.
        off "FP8 offline" "$H/llama-3.1-8b-fp8-offline.toml"
        off "bf16 offline" "$H/llama-3.1-8b-offline.toml"
        off "FP8 offline (again)" "$H/llama-3.1-8b-fp8-offline.toml"
        f8kv=$(variant fp8-off-kv llama-3.1-8b-fp8-offline.toml 'kv_cache_dtype = "fp8"')
        off "FP8 offline, FP8 KV cache" "$f8kv"
        # Larger batches (TensorRT-LLM's offline runs batch far more than 256 requests): the
        # weights read once for more rows, the fixed costs of a step shared by more tokens.
        # 1,024 sequences fit at max_seq_len 288 (128 + 128 tokens and a page to spare).
        b512=$(variant fp8-off-512 llama-3.1-8b-fp8-offline.toml)
        sed -i 's/^max_batch_size = .*/max_batch_size = 512/' "$b512"
        off "FP8 offline, max_batch_size 512" "$b512"
        off "FP8 offline, FP8 KV cache, max_batch_size 1024" "$H/llama-3.1-8b-fp8-offline-1k.toml"
        ;;
    prefill)
        # The tensor-core prefill with a GQA group's heads a block (`prefill_group_heads`,
        # AUTODEPLOY_PREFILL_GROUP=1; cuda_check's "heads grouped" cases check it): the 8B's
        # prefill of 256 x 128 tokens (throughput bench: its prefill ms) and offline 1,000 x
        # 128/128 (FP8; FP8 with an FP8 cache at max_batch_size 1,024), alternating.
        b1k=$H/llama-3.1-8b-fp8-offline-1k.toml
        for _ in 1 2; do
            for g in 0 1; do
                # (With the group, also a mixed step's decodes through split-KV: AUTODEPLOY_MIXED_SPLIT.)
                export AUTODEPLOY_MIXED_SPLIT=$g
                AUTODEPLOY_PREFILL_GROUP=$g bench "8B FP8 256 x 128, prefill group $g" "$H/llama-3.1-8b-fp8-offline.toml" \
                    --mode throughput --batch 256 --isl 128 --osl 4
                AUTODEPLOY_PREFILL_GROUP=$g bench "8B bf16 256 x 128, prefill group $g" "$H/llama-3.1-8b-offline.toml" \
                    --mode throughput --batch 256 --isl 128 --osl 4
                off "FP8 offline, prefill group $g" "$H/llama-3.1-8b-fp8-offline.toml" AUTODEPLOY_PREFILL_GROUP=$g
                off "FP8 offline, FP8 KV, 1,024, prefill group $g" "$b1k" AUTODEPLOY_PREFILL_GROUP=$g
            done
        done
        unset AUTODEPLOY_MIXED_SPLIT
        # Each alone, offline at 1,024.
        # (Both on by default since session 38: each alone sets the other off.)
        off "FP8 offline, FP8 KV, 1,024, prefill group alone" "$b1k" "AUTODEPLOY_PREFILL_GROUP=1 AUTODEPLOY_MIXED_SPLIT=0"
        off "FP8 offline, FP8 KV, 1,024, mixed split alone" "$b1k" "AUTODEPLOY_MIXED_SPLIT=1 AUTODEPLOY_PREFILL_GROUP=0"
        ;;
    bigbatch)
        # Session 37, H100: offline at max_batch_size 512 gave 11,851 tok/s against 20,435 at
        # 256 (decode steps 34 ms against 8 ms: steps past 256 tokens left the split-KV decode,
        # since fixed). The decode step at batch 256 and 512, FP8 and bf16 (max_batch_size 512
        # for both), then each kernel's time at batch 256 and 1,024.
        f512=$(variant fp8-512 llama-3.1-8b-fp8-offline.toml)
        sed -i 's/^max_batch_size = .*/max_batch_size = 512/' "$f512"
        b512=$(variant bf16-512 llama-3.1-8b-offline.toml)
        sed -i 's/^max_batch_size = .*/max_batch_size = 512/' "$b512"
        for b in 256 512; do
            bench "8B FP8 batch $b (max 512)" "$f512" --mode throughput --batch $b --isl 128 --osl 32
            bench "8B bf16 batch $b (max 512)" "$b512" --mode throughput --batch $b --isl 128 --osl 32
        done
        # Each kernel of the FP8 8B cut to 4 layers (the offline target's settings: FP8 cache,
        # max_batch_size 1,024), short prompts so most launches are decode steps; the summary
        # keys each kernel by its grid, so decode and prefill launches list apart.
        cut4 8b-fp8 configs/Llama-3.1-8B-Instruct-FP8
        c=$(on_cut big-fp8 llama-3.1-8b-fp8-offline-1k.toml 8b-fp8)
        # (batch:prompt length:launches): decode steps at 256 after short prompts; the offline
        # run's shape, 1,024 x 128: its sixteen 8,192-token prefill steps, then decode steps at
        # 128-136 positions (the summary keys launches by grid, so the two list apart).
        ncu_kernels "$c" 256 16 700
        ncu_kernels "$c" 1024 128 1500
        ;;
    gemvdetail)
        # ncu's sections for the FP8 and NVFP4 decode GEMVs at batch 1 (what bounds each: DRAM,
        # issue, occupancy, stall reasons), the 8B cut to 4 layers: one layer's q/k/v, o, gate/up
        # and down launches.
        cut4 8b-fp8 configs/Llama-3.1-8B-Instruct-FP8
        cut4 8b-nvfp4 configs/Llama-3.1-8B-Instruct-NVFP4
        for spec in llama-3.1-8b-fp8.toml:8b-fp8:gemv_fp8_tc llama-3.1-8b-nvfp4.toml:8b-nvfp4:gemv_nvfp4_tc; do
            IFS=: read -r base cut kern <<<"$spec"
            c=$(on_cut "gdetail-$cut" "$base" "$cut")
            echo "  -- $base ($kern)"
            stalls=$(stall_metrics)
            timeout 240 ncu --section WarpStateStats --section Occupancy --section LaunchStats --section SpeedOfLight \
                --metrics "$stalls" -k "regex:$kern" --launch-skip 40 --launch-count 4 \
                "$B" bench --config "$c" --mode latency --batch 1 --isl 128 --osl 16 2>&1 |
                grep -E "gemv_|Duration|Registers Per|Achieved Occupancy|Block Limit (Reg|Shared)|Warp Cycles Per Issued|Issue Slots Busy|DRAM Throughput|Compute \(SM\)|Grid Size|issue_stalled" | head -80
        done
        ;;
    moedetail)
        # ncu's sections and stall reasons for the MoE decode kernels of Qwen3-30B-A3B at batch 1
        # (cut to 4 layers): what bounds the per-slot gate/up and down GEMVs (rows of 2,048 and
        # 768 values: short, so latency and waves more than bytes) and the routing.
        cut4 moe ../tests/fixtures/model-configs/Qwen/Qwen3-30B-A3B
        c=$(on_cut moedetail qwen3-30b-a3b.toml moe)
        stalls=$(stall_metrics)
        timeout 240 ncu --section WarpStateStats --section Occupancy --section LaunchStats --section SpeedOfLight \
            --metrics "$stalls" -k 'regex:moe_|paged_decode' --launch-skip 40 --launch-count 10 \
            "$B" bench --config "$c" --mode latency --batch 1 --isl 128 --osl 16 2>&1 |
            grep -E "moe_|paged_decode|Duration|Registers Per|Achieved Occupancy|Block Limit (Reg|Shared)|Warp Cycles Per Issued|DRAM Throughput|Grid Size|Waves Per SM|issue_stalled" | head -120
        ;;
    attndetail)
        # ncu's warp-state, occupancy and memory sections for one launch of the tensor-core
        # split-KV decode at batch 32 x 2,000, bf16 cache and FP8 cache (what bounds each).
        ncu_detail paged_decode_tc throughput 32
        ;;
    longdetail)
        # The same for the latency build at batch 1 x 2,000 (session 41: 26 us a layer with the
        # bf16 cache, 34 with the FP8 cache, where it reads 8 and 4 MB).
        ncu_detail paged_decode_split_early latency 1
        ;;
    attnprof)
        # The decode attention alone at batch 32 x 2,000 positions, bf16 cache against FP8 cache
        # (session 35, H200: the FP8 cache 1-2% slower a step, where its KV bytes are half):
        # each attention kernel's time and DRAM bytes, the model cut to 4 layers.
        cut4 8b configs/Llama-3.1-8B-Instruct
        for base in llama-3.1-8b-long.toml llama-3.1-8b-long-fp8kv.toml; do
            c=$(on_cut "prof-$base" "$base" 8b)
            echo "  -- $base"
            timeout 250 ncu --print-units base --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
                -k 'regex:paged_decode|merge|combine' --launch-count 40 \
                "$B" bench --config "$c" --mode throughput --batch 32 --isl 2000 --osl 4 \
                >"$OUT/ncu-attn-$base.csv" 2>"$OUT/ncu-attn-$base.err" || tail -3 "$OUT/ncu-attn-$base.err"
            python3 - "$OUT/ncu-attn-$base.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and (r[0] == "ID" or r[0].isdigit())]
head, rows = rows[0], rows[1:]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
t = collections.defaultdict(lambda: collections.defaultdict(list))
for r in rows:
    t[r[k].split("(")[0]][r[m]].append(float(r[v].replace(",", "")))
for name, ms in t.items():
    us = sum(ms["gpu__time_duration.sum"]) / len(ms["gpu__time_duration.sum"]) / 1e3
    gb = sum(ms["dram__bytes_read.sum"]) / len(ms["dram__bytes_read.sum"]) / 1e9
    print(f"  {name[:48]:<48} {len(ms['gpu__time_duration.sum']):4d} launches, mean {us:8.2f} us, {gb:6.3f} GB read, {gb / us * 1e3:6.0f} GB/s")
PY
        done
        ;;
    *) echo "unknown part $part (checks quant suite rest fp8 moe long profile offline prefill bigbatch attnprof attndetail gemvdetail moedetail fp8cost offprof)" ;;
    esac
done
