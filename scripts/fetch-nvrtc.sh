#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler, no GPU needed) from the PyPI package
# nvidia-cuda-nvrtc into .cache/cuda/, once, and prints the folder to put on LD_LIBRARY_PATH.
# The CUDA kernel test (kernels/tests/cuda_compile.rs) compiles every kernel with it for sm_80
# and sm_90. Needs python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=.cache/cuda/nvidia/cu13/lib
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  mkdir -p .cache/cuda .cache/wheels
  echo "fetching NVRTC (58 MB) from PyPI package nvidia-cuda-nvrtc ..." >&2
  python3 -m pip download --quiet --no-deps --dest .cache/wheels "nvidia-cuda-nvrtc==13.*"
  wheel=$(ls -t .cache/wheels/nvidia_cuda_nvrtc-13*.whl | head -n 1)
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" .cache/cuda
fi
echo "$(pwd)/$lib"
