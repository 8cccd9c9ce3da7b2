#!/usr/bin/env bash
# Reproduces docs/results/: the evaluation matrix of `keyformer eval` on SmolLM2-135M-Instruct
# (Q4_1), every policy x budget, and Keyformer's ablations. About 50 minutes on 2 cores.
#   scripts/eval-smollm2.sh [RAW_DIR]
# Raw rows go to RAW_DIR (default target/eval-smollm2; an interrupted run resumes there); the
# tables and plots are copied to docs/results/<part>/. Data: scripts/fetch-texts.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
raw=${1:-target/eval-smollm2}
texts=$(bash scripts/fetch-texts.sh)
cargo build --release -q -p keyformer-cli
# A private copy, so that rebuilding during the run cannot change the binary under it.
bin=$(mktemp -d)/keyformer
cp target/release/keyformer "$bin"

part() { # name, then eval arguments
  local name=$1; shift
  echo "== $name: keyformer eval $*" >&2
  # --kv-min-budget 1: the budgets are exact percentages, as when docs/results/ was made
  # (before percentages had a floor).
  "$bin" eval --out "$raw/$name" --kv-min-budget 1 "$@" >/dev/null
  mkdir -p "docs/results/$name"
  cp "$raw/$name"/summary.md "$raw/$name"/summary.json "$raw/$name"/*.svg "docs/results/$name/"
  cp "$raw/$name"/*.png "docs/results/$name/" 2>/dev/null || true
}

# Every policy at every budget (percent of the prompt); keyformer over seeds 0, 1, 2.
part brown --data "$texts/brown.jsonl" --tasks fidelity,generation --limit 5 \
  --prompt-tokens 1024 --continuation-tokens 128
part howto-summary --data "$texts/python-howto.jsonl" --tasks summary \
  --prompt-tokens 1024 --summary-tokens 128
part needle --data "$texts/brown.txt" --tasks needle \
  --needle-lengths 1024,2048,4096 --needle-depths 0,25,50,75,100
part genesis-ppl --data "$texts/kjv-genesis.txt" --tasks ppl --ppl-ctx 1024
# Keyformer's ablations at 30% and 50%: noise type, recent-window ratio, frozen key tokens.
part ablation --data "$texts/brown.jsonl" --tasks fidelity --limit 4 \
  --prompt-tokens 1024 --continuation-tokens 128 --budgets 30%,50% \
  --policies h2o,keyformer,keyformer:noise=gaussian,keyformer:noise=constant,keyformer:noise=none,keyformer:recent=10%,keyformer:recent=20%,keyformer:recent=40%,keyformer:recent=50%,keyformer:frozen
echo "tables and plots: docs/results/" >&2
