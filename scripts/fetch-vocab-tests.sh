#!/usr/bin/env bash
# llama.cpp's vocabulary test files (models/ggml-vocab-*.gguf with .inp/.out), from the
# llama-cpp-python 0.3.36 source package fetched with pip, extracted once into the cache;
# prints the folder (crates/keyformer/tests/vocab_files.rs reads it as KEYFORMER_VOCAB_DIR).
set -euo pipefail
version=0.3.36
cache=${KEYFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyformer}
dir="$cache/llama.cpp/$version"
out="$dir/vocab"
if [ ! -f "$out/.complete" ]; then
  mkdir -p "$dir" "$out"
  if ! ls "$dir"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$version" -d "$dir" >&2
  fi
  tar -xzf "$dir"/llama_cpp_python-$version.tar.gz -C "$out" --strip-components=4 \
    --wildcards "llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-*"
  touch "$out/.complete"
fi
echo "$out"
