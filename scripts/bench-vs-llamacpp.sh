#!/usr/bin/env bash
# Side-by-side speed: keyformer vs llama.cpp's llama-bench on the same GGUF file and threads.
#
#   scripts/bench-vs-llamacpp.sh [-m MODEL] [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r REPS]
#
# llama-bench is built once from the llama-cpp-python source package (fetched with pip,
# vendored llama.cpp, native CPU flags, ~20 minutes on 2 cores) and cached in
# $KEYFORMER_CACHE/llama.cpp (default ~/.cache/keyformer/llama.cpp). Prints a Markdown table
# with tokens/s of both engines and the ratio ours/theirs per test.
set -euo pipefail
cd "$(dirname "$0")/.."

model=smollm2-135m threads=2 n_prompt=512 n_gen=128 reps=3
while getopts "m:t:p:n:r:" opt; do
  case $opt in
    m) model=$OPTARG ;; t) threads=$OPTARG ;; p) n_prompt=$OPTARG ;; n) n_gen=$OPTARG ;; r) reps=$OPTARG ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
  esac
done

cache=${KEYFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyformer}
llama_version=0.3.36
llama_dir="$cache/llama.cpp/$llama_version"
llama_bench="$llama_dir/build/bin/llama-bench"
if [ ! -x "$llama_bench" ]; then
  echo "building llama-bench from llama-cpp-python $llama_version (once) ..." >&2
  mkdir -p "$llama_dir"
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake ninja
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$llama_version" -d "$llama_dir"
  tar -xzf "$llama_dir"/llama_cpp_python-*.tar.gz -C "$llama_dir"
  src=$(echo "$llama_dir"/llama_cpp_python-*/vendor/llama.cpp)
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$src" -B "$llama_dir/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$llama_dir/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-tokenize >&2
fi

cargo build --release -q -p keyformer-cli
kf=target/release/keyformer
path=$("$kf" info --model "$model" | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')

ours=$("$kf" bench --model "$path" -t "$threads" -p "$n_prompt" -n "$n_gen" -r "$reps" --json)
theirs=$("$llama_bench" -m "$path" -t "$threads" -p "$n_prompt" -n "$n_gen" -r "$reps" -o json 2>/dev/null)

python3 - "$ours" "$theirs" "$threads" "$path" <<'PY'
import json, sys, platform
ours, theirs, threads, path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
def test_name(r):
    return f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
llama = {test_name(r): r for r in theirs}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"model: {path.split('/')[-1]}, threads: {threads}, CPU: {cpu}\n")
print("| test | keyformer t/s (median, min-max) | llama.cpp t/s (mean ± sd) | ours / theirs |")
print("|---|---:|---:|---:|")
for r in ours["results"]:
    l = llama.get(r["test"])
    if l is None:
        continue
    print(f"| {r['test']} | {r['median_tok_s']:.1f} ({r['min_tok_s']:.1f}-{r['max_tok_s']:.1f}) | "
          f"{l['avg_ts']:.1f} ± {l['stddev_ts']:.1f} | {r['median_tok_s'] / l['avg_ts']:.2f}x |")
PY
