#!/usr/bin/env bash
# The CPU-speed tables of docs/benchmarks.md in one command (about 20 minutes on 2 cores):
#   1. keyformer vs llama.cpp at depth 0: pp512 and tg128;
#   2. keyformer vs llama.cpp: tg128 after 8064 tokens of context (8064 + 128 fills SmolLM2's
#      8192-token context; pp512 would not fit there);
#   3. our generation at that depth by KV policy at a 50% budget (the budget as speed), the
#      policies' repetitions interleaved so that the machine's changing load falls on all alike.
#   scripts/bench-cpu.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
scripts/bench-vs-llamacpp.sh -d 0 -r "$reps" -k f16
echo
scripts/bench-vs-llamacpp.sh -p 0 -d 8064 -r "$reps" -k f16
echo
target/release/keyformer bench -p 0 -n 128 -d 8064 --kv-policy full,window,h2o,keyformer --kv-budget 50% \
  -r "$((reps + 2))" --interleave
