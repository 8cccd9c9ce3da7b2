#!/usr/bin/env bash
# Side-by-side speed: keyformer vs llama.cpp's llama-bench on the same GGUF file and threads.
#
#   scripts/bench-vs-llamacpp.sh [-m MODEL] [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r REPS]
#
# llama-bench comes from scripts/build-llamacpp.sh (built once from the llama-cpp-python source
# package, native CPU flags, cached). Prints a Markdown table with tokens/s of both engines and
# the ratio ours/theirs per test.
set -euo pipefail
cd "$(dirname "$0")/.."

model=smollm2-135m threads=2 n_prompt=512 n_gen=128 reps=3
while getopts "m:t:p:n:r:" opt; do
  case $opt in
    m) model=$OPTARG ;; t) threads=$OPTARG ;; p) n_prompt=$OPTARG ;; n) n_gen=$OPTARG ;; r) reps=$OPTARG ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
  esac
done

llama_bench="$(scripts/build-llamacpp.sh)/build/bin/llama-bench"

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
