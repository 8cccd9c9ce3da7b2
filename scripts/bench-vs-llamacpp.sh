#!/usr/bin/env bash
# Side-by-side speed: keyformer vs llama.cpp's llama-bench on the same GGUF file and threads.
#
#   scripts/bench-vs-llamacpp.sh [-m MODEL] [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r REPS]
#                                [-d DEPTHS] [-k f32|f16] [-l LOAD_MODE]
#
# llama-bench comes from scripts/build-llamacpp.sh (built once from the llama-cpp-python source
# package, native CPU flags, cached). Both engines run the same file, threads, context depths
# (-d, comma-separated: tokens already in the cache) and KV cache type (-k, default f16, which
# is llama.cpp's default). Prints a Markdown table with tokens/s of both engines, the ratio
# ours/theirs per test, and for generation the fraction of the measured read bandwidth each
# reaches (bytes a decode step reads, weights + KV cache, times tokens/s). Each engine holds its
# weights its own default way (ours: read into memory with huge pages; llama.cpp: mapped from
# the file); -l passes llama-bench a load mode (`none`: read into memory, as ours) and -l mmap
# gives ours --mmap too, so both map the file.
set -euo pipefail
cd "$(dirname "$0")/.."

model=smollm2-135m threads=2 n_prompt=512 n_gen=128 reps=3 depths=0 kv=f16 load=
while getopts "m:t:p:n:r:d:k:l:" opt; do
  case $opt in
    m) model=$OPTARG ;; t) threads=$OPTARG ;; p) n_prompt=$OPTARG ;; n) n_gen=$OPTARG ;; r) reps=$OPTARG ;;
    d) depths=$OPTARG ;; k) kv=$OPTARG ;; l) load=$OPTARG ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done

llama_bench="$(scripts/build-llamacpp.sh)/build/bin/llama-bench"

cargo build --release -q -p keyformer-cli
kf=target/release/keyformer
path=$("$kf" info --model "$model" | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')

ours_load=() theirs_load=()
if [ -n "$load" ]; then
  theirs_load=(-lm "$load")
  [ "$load" = mmap ] && ours_load=(--mmap)
fi
ours=$("$kf" "${ours_load[@]}" --kv-type "$kv" bench --model "$path" -t "$threads" -p "$n_prompt" -n "$n_gen" -d "$depths" -r "$reps" --json)
theirs=$("$llama_bench" -m "$path" -t "$threads" -p "$n_prompt" -n "$n_gen" -d "$depths" -r "$reps" \
  -ctk "$kv" -ctv "$kv" "${theirs_load[@]}" -o json 2>/dev/null)

python3 - "$ours" "$theirs" "$threads" "$path" "$kv" "${load:-default}" <<'PY'
import json, sys, platform
ours, theirs, threads, path, kv, load = json.loads(sys.argv[1]), json.loads(sys.argv[2]), *sys.argv[3:]
def test_name(r):
    base = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
    return base + (f" @ d{r['n_depth']}" if r.get("n_depth") else "")
llama = {test_name(r): r for r in theirs}
load_label = load if load != "default" else "each engine's default"
bw = ours.get("read_bandwidth_gb_s")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"model: {path.split('/')[-1]}, threads: {threads}, KV cache: {kv}, load mode: {load_label}, CPU: {cpu}, "
      f"read bandwidth: {bw:.1f} GB/s\n" if bw else f"model: {path.split('/')[-1]}, threads: {threads}\n")
print("| test | keyformer t/s (median, min-max) | llama.cpp t/s (mean ± sd) | ours / theirs | keyformer of bandwidth | llama.cpp of bandwidth | keyformer peak RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in ours["results"]:
    l = llama.get(r["test"])
    if l is None:
        continue
    frac = lambda ts: f"{r['bytes_per_token'] * ts / 1e9 / bw:.0%}" if bw and r.get("bytes_per_token") else ""
    rss = f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else ""
    print(f"| {r['test']} | {r['median_tok_s']:.1f} ({r['min_tok_s']:.1f}-{r['max_tok_s']:.1f}) | "
          f"{l['avg_ts']:.1f} ± {l['stddev_ts']:.1f} | {r['median_tok_s'] / l['avg_ts']:.2f}x | "
          f"{frac(r['median_tok_s'])} | {frac(l['avg_ts'])} | {rss} |")
PY
