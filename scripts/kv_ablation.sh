#!/usr/bin/env bash
# Keyformer's ablation (noise type, temperature schedule, frozen selection) by streaming
# perplexity on the Brown window at one budget; writes one JSON row per (variant, seed).
#   scripts/kv_ablation.sh [BUDGET] [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-128}
out=${2:-docs/kv-compression/ablation-brown-1024-b$budget.jsonl}
texts=$(scripts/fetch-texts.sh)
cargo build --release -q -p keyformer-cli
kf=target/release/keyformer
: > "$out"
run() { # label, flags...
  local label=$1; shift
  for seed in 0 1 2; do
    r=$("$kf" perplexity --file "$texts/brown.txt" --ctx 1024 --max-windows 1 --kv-budget "$budget" \
        --seed "$seed" --json "$@")
    echo "{\"variant\": \"$label\", \"seed\": $seed, \"flags\": \"$*\", \"result\": $r}" >> "$out"
  done
}
run "keyformer gumbel, tau 1->2 (paper)" --kv-policy keyformer
run "keyformer gumbel, tau 1->1" --kv-policy keyformer --keyformer-tau-end 1
run "keyformer gaussian, tau 1->2" --kv-policy keyformer --keyformer-noise gaussian
run "keyformer constant, tau 1->2" --kv-policy keyformer --keyformer-noise constant
run "keyformer none, tau 1->2" --kv-policy keyformer --keyformer-noise none
run "keyformer gumbel, frozen (reference code)" --kv-policy keyformer --keyformer-frozen
echo "$out"
