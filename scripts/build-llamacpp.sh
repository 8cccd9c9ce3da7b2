#!/usr/bin/env bash
# Builds llama.cpp (llama-bench, llama-perplexity, llama-tokenize and libllama) once from the
# llama-cpp-python source package, fetched with pip, and prints the cache folder that holds
#   build/bin/                      the binaries and shared libraries
#   llama_cpp_python-<version>/     the Python binding (for tools/reference/golden_llamacpp.py)
# Cache: $KEYFORMER_CACHE/llama.cpp/<version> (default ~/.cache/keyformer/...). Takes ~6-20
# minutes on 2 cores the first time; later calls return at once.
set -euo pipefail
version=0.3.36
cache=${KEYFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyformer}
dir="$cache/llama.cpp/$version"
if [ ! -x "$dir/build/bin/llama-bench" ]; then
  echo "building llama.cpp from llama-cpp-python $version (once) ..." >&2
  mkdir -p "$dir"
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake ninja >&2
  if ! ls "$dir"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$version" -d "$dir" >&2
  fi
  tar -xzf "$dir"/llama_cpp_python-*.tar.gz -C "$dir"
  src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$src" -B "$dir/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$dir/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-tokenize llama >&2
fi
echo "$dir"
