#!/usr/bin/env bash
# Prints the path of the default model's F32 copy, making it first if needed (with the `gguf`
# Python package, through make_f32_gguf.py; cached next to the Q4_1 file). Needs the CLI built.
set -euo pipefail
cd "$(dirname "$0")/../.."
q4=$(target/release/keyformer info | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')
[ -f "$q4" ] || { echo "could not locate the default model (got '$q4')" >&2; exit 1; }
f32="$(dirname "$q4")/SmolLM2-135M-Instruct.F32.gguf"
if [ ! -f "$f32" ]; then
  if ! python3 -c 'import gguf, numpy' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check 'gguf==0.19.0' numpy >&2
  fi
  echo "making the F32 reference copy of $q4 ..." >&2
  python3 tools/reference/make_f32_gguf.py "$q4" "$f32.part" >&2
  mv "$f32.part" "$f32"
fi
echo "$f32"
