#!/usr/bin/env bash
# The server tests (tests/serve/): `autodeploy serve` driven by the official `openai` client.
# Installs the pinned Python packages into .cache/serve-venv (a venv, else a --target folder),
# builds the binary (the dev profile `cargo test` already built) and runs pytest. Needs
# SmolLM2 (scripts/fetch-smollm2.sh) for the prefix, cancellation, overflow and shutdown tests.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(openai==3.57.0 pytest==9.2.0 tokenizers==0.23.3)
venv=.cache/serve-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, pytest, tokenizers" 2>/dev/null; then
  rm -rf "$venv"
  if python3 -m venv "$venv" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
  else
    # No venv module (Debian without python3-venv): a plain folder on PYTHONPATH.
    mkdir -p "$venv/bin"
    python3 -m pip install --quiet --disable-pip-version-check --target "$venv/lib" "${packages[@]}"
    printf '#!/bin/sh\nPYTHONPATH="%s/lib${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$PWD/$venv" >"$venv/bin/python"
    chmod +x "$venv/bin/python"
  fi
fi
cargo build --locked --quiet -p autodeploy
export AUTODEPLOY_BIN="$PWD/target/debug/autodeploy"
cd tests/serve
exec ../../"$venv"/bin/python -m pytest -q -p no:cacheprovider "$@" .
