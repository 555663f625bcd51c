#!/usr/bin/env bash
# The example plugin's own op (`example.rms_norm`) on a GPU, without cargo: runs the host with the
# op in place of every RMSNorm on the CPU and on CUDA (its CUDA C kernel, compiled and launched by
# the host) and compares the greedy tokens with the built-in norm's on the CPU.
#   bash examples/plugin/scripts/cuda-op-check.sh path/to/autodeploy path/to/libautodeploy_example_plugin.so
# (cli/tests/plugins.rs does the same where cargo and a GPU are on one machine.)
set -euo pipefail
bin=$(realpath "$1"); lib=$(realpath "$2")
root=$(realpath "$(dirname "$0")/../../..")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf '[[library]]\npath = "%s"\n' "$lib" > "$dir/plugin-registry.toml"
run() { # device, use_example_rmsnorm
  printf 'model = "%s"\ndtype = "float32"\ndevice = "%s"\nmax_new_tokens = 12\n[[prompts]]\ntoken_ids = [1, 17, 42, 7]\n[[prompts]]\ntoken_ids = [3, 5, 100, 200, 9]\n[transforms.fold_norm_scale]\nenabled = false\n[transforms.use_example_rmsnorm]\nenabled = %s\n' \
    "$root/tests/fixtures/qwen3" "$1" "$2" > "$dir/cfg.toml"
  (cd "$dir" && RUST_LOG=warn "$bin" --config cfg.toml --plugins plugin-registry.toml) | grep '\] output'
}
(cd "$dir" && "$bin" graph --plugins plugin-registry.toml --config <(printf 'model = "%s"\ndevice = "cpu"\n[transforms.use_example_rmsnorm]\nenabled = true\n' "$root/tests/fixtures/qwen3") --stage post_load_fusion) \
  | grep -E '^# \[stage=post_load_fusion, transform=use_example_rmsnorm\]'
ref=$(run cpu false); cpu=$(run cpu true); gpu=$(run cuda true)
echo "built-in norm, cpu:"; echo "$ref"
echo "example.rms_norm, cuda:"; echo "$gpu"
[ "$ref" = "$cpu" ] || { echo "FAIL: example.rms_norm on the CPU differs"; exit 1; }
[ "$ref" = "$gpu" ] || { echo "FAIL: example.rms_norm on CUDA differs"; exit 1; }
echo "OK: example.rms_norm gives the built-in norm's tokens on cpu and cuda"
