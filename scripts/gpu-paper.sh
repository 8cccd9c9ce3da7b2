#!/usr/bin/env bash
# The paper's throughput protocol (Keyformer, MLSys 2024, Table 1) on the GPU machine: the
# llama2-7b shape with random weights, prompt + generation of PROMPT + GEN tokens, each policy
# at the largest batch whose caches fit (-b max; the budget of a compressed policy is a share
# of the prompt, fixed while generating). One row per policy, appended to OUT/paper.md and
# OUT/paper.jsonl. At 4096 + 4096 a row takes 4-6 minutes on an H100/H200, so a device call
# runs one or two.
#
#   scripts/gpu-paper.sh OUT PROMPT GEN POLICY[,POLICY...] [BATCH]
#   e.g. scripts/gpu-paper.sh $OUT 4096 4096 full,keyformer:budget=50%
#
# BATCH defaults to max (give 1 for batch-1 rows). SHAPE (default llama2-7b) picks the random
# weights' shape: the paper's own models are gptj-6b, mpt-7b and cerebras-gpt-6.7b.
# The binary: see scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
out=$1 prompt=$2 gen=$3 policies=$4 batch=${5:-max}
bin="${KEYFORMER_BIN:-.gpu/keyformer}"
mkdir -p "$out"
"$bin" bench --device cuda --random-weights "${SHAPE:-llama2-7b}" -p "$prompt" -n "$gen" -b "$batch" --kv-policy "$policies" \
    --json | tee -a "$out/paper.jsonl"
