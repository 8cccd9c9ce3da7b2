#!/usr/bin/env bash
# Quantised weights on the GPU (issue 21, part 1), run on the GPU machine in one call:
#   1. gpu-check at the llama2-7b shape (every op, with each quantised type's Q8 activations,
#      GEMV of 1 and 4 rows, f16 tiles through cuBLAS, dequantiser and embedding lookup against
#      the CPU) and the whole tiny model in every type against the CPU;
#   2. batch-1 decode at 4096 tokens of context, llama2-7b shape, f16 against Q4_K, Q8_0 and
#      Q4_0 random blocks (full cache and keyformer@50%), then small batches (GEMV of several
#      rows) and a batch of 16 (f16 tiles through cuBLAS).
#
#   scripts/gpu-quantised.sh [OUT_DIR]
#
# The binary is built on a CPU machine and carried, as for scripts/gpu-check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/keyformer-gpu}}"
mkdir -p "$out"
bin="${KEYFORMER_BIN:-.gpu/keyformer}"
status=0
"$bin" gpu-check --gpu-weights native --shape llama2-7b --model-shape tiny --model-prompt 100 --model-steps 8 \
    --model-type f16,q4_0,q4_1,q5_0,q5_1,q8_0,q4_k,q5_k,q6_k | tee "$out/gpu-check-quantised.md" || status=1
for t in f16 q4_k q8_0 q4_0; do
    "$bin" bench --device cuda --random-weights llama2-7b --random-type "$t" -p 4096 -n 128 -b 1 \
        --kv-policy full,keyformer:budget=50% | tee "$out/bench-batch1-$t.md" || status=1
done
for t in f16 q4_k; do
    "$bin" bench --device cuda --random-weights llama2-7b --random-type "$t" -p 1024 -n 64 -b 4,8,16,32 \
        --kv-policy full | tee "$out/bench-batched-$t.md" || status=1
done
exit $status
