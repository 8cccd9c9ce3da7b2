#!/usr/bin/env bash
# The RULER-style comparison of docs/results.md in one command: our policies and kvpress's
# presses on the same cases of the same model, then the tables.
#
#   scripts/eval-ruler.sh [MODEL] [LENGTH] [OUT]
#     MODEL   an alias or a GGUF file (default smollm2-135m)
#     LENGTH  prompt length in tokens (default 2048)
#     OUT     output folder (default target/ruler/<model>-<length>)
#   KVPRESS=0 skips kvpress; POLICIES and BUDGETS override ours.
#
# One case per RULER task (11), answers cut at 48 tokens, budgets 25% and 50% kept; the
# question comes after the compressed context (kvpress's protocol). On 2 cores SmolLM2-135M at
# 2048 tokens took roughly 70 minutes in all (kvpress's eight presses the larger part).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2-135m}
length=${2:-2048}
out=${3:-target/ruler/$(basename "$model" .gguf)-$length}
policies=${POLICIES:-sink,h2o,tova,snapkv,keyformer,keyformer:accumulate=mean,keyformer:sinks=4,keyformer:value,keyformer:adaptive,keyformer:layers=pyramid,keyformer:accumulate=mean:sinks=4:adaptive,h2o:accumulate=mean:sinks=4:adaptive}
budgets=${BUDGETS:-25%,50%}
bin=target/release/keyformer
[ -x "$bin" ] || cargo build --release -p keyformer-cli
texts=$(scripts/fetch-texts.sh)
mkdir -p "$out"
common=(-m "$model" --data "$texts/paul-graham.jsonl" --ruler-lengths "$length" --ruler-samples 1 --ruler-answer-tokens 48)
"$bin" eval "${common[@]}" --tasks ruler --export-cases "$out/cases.jsonl" --out "$out/ours"
"$bin" eval "${common[@]}" --tasks ruler --policies "$policies" --budgets "$budgets" --seeds 0 --out "$out/ours"
files=("$out/ours/results.jsonl")
if [ "${KVPRESS:-1}" != 0 ]; then
  # kvpress reads the model file through transformers: resolve an alias to its cached file.
  file=$model
  [ -f "$file" ] || file=$("$bin" info -m "$model" | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')
  kept=$(echo "$budgets" | tr -d '%')
  scripts/kvpress-ruler.sh --cases "$out/cases.jsonl" --model "$file" --out "$out/kvpress.jsonl" --kept "$kept"
  files+=("$out/kvpress.jsonl")
fi
scripts/ruler-table.py "${files[@]}" --by-task | tee "$out/table.md"
