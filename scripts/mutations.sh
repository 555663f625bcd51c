#!/usr/bin/env bash
# The mutation check of the test suite (tests/README.md): runs the CPU tests that compare against
# transformers with each deliberate bug of core/src/mutation.rs switched on, and fails unless
# every bug makes at least one of them fail. Prints one line per mutation and test binary.
# Usage: scripts/mutations.sh [MUTATION...]   (all when none is given)
set -euo pipefail
cd "$(dirname "$0")/.."

mutations=("$@")
if [ ${#mutations[@]} -eq 0 ]; then
  mutations=(skip_kv_write shift_rope no_causal_mask swap_heads wrong_page fp8_raw_input reduce_one_rank)
fi
tests=(parity generate pt2 gguf quant sharding)

cargo test -p autodeploy-tests --locked --no-run "${tests[@]/#/--test=}" >/dev/null 2>&1 ||
  cargo test -p autodeploy-tests --locked --no-run "${tests[@]/#/--test=}"

missed=()
for m in "${mutations[@]}"; do
  caught=()
  for t in "${tests[@]}"; do
    log=$(mktemp)
    if AUTODEPLOY_MUTATION="$m" cargo test -p autodeploy-tests --locked --test "$t" >"$log" 2>&1; then
      echo "mutation $m: tests/$t.rs passes"
    else
      failed=$(grep -E '^test .* FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr "\n" " " || true)
      if [ -z "$failed" ]; then
        echo "mutation $m: tests/$t.rs did not run:" >&2
        tail -20 "$log" >&2
        rm -f "$log"
        exit 1
      fi
      echo "mutation $m: tests/$t.rs catches it in: $failed"
      caught+=("$t")
    fi
    rm -f "$log"
  done
  if [ ${#caught[@]} -eq 0 ]; then
    missed+=("$m")
  fi
done
if [ ${#missed[@]} -gt 0 ]; then
  echo "mutation check FAILED: no test catches ${missed[*]}" >&2
  exit 1
fi
echo "mutation check: each of ${#mutations[@]} mutations is caught by at least one test"
