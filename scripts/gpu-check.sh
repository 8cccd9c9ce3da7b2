#!/usr/bin/env bash
# The GPU checks and a first benchmark table, run on the GPU machine in one call (about 4
# minutes):
#   1. keyformer gpu-check: every CUDA op against the CPU backend at the llama2-7b, llama3-8b and
#      SmolLM2 shapes, and the whole model against the CPU on random weights (logits, the tokens
#      Keyformer / H2O / window keep, CUDA-graph replay against plain launches);
#   2. batch-1 decode of the llama2-7b shape (random weights) at 4096 tokens of context, full /
#      h2o@90% / keyformer@50% / window@50%, with its fraction of the bandwidth floor;
#   3. the Hugging Face anchor at the same shape (scripts/hf_anchor.py: transformers, f16, sdpa);
#   4. torch's device copy bandwidth, an outside reference for the floor.
# The paper's protocol at the largest batches takes longer than one call: scripts/gpu-paper.sh.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# The binary is built on a CPU machine (no CUDA needed) and carried:
#   cargo build --release --features cuda -p keyformer-cli && mkdir -p .gpu && strip -o .gpu/keyformer target/release/keyformer
# KEYFORMER_BIN overrides where it is looked for. Without a GPU, gpu-check says so and this
# script exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/keyformer-gpu}}"
mkdir -p "$out"
bin="${KEYFORMER_BIN:-.gpu/keyformer}"
if [ ! -x "$bin" ]; then
    echo "gpu-check: no binary at $bin (see the header of $0)" >&2
    exit 2
fi
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv | tee "$out/nvidia-smi.csv"
"$bin" gpu-check | tee "$out/gpu-check.md" || status=1
# Widths that are no multiple of any chunk size, and a long cache.
"$bin" gpu-check --slots 1000 --shape llama3-8b,smollm2-135m --model-shape none | tee "$out/gpu-check-1000.md" || status=1
"$bin" gpu-check --slots 8192 --shape llama2-7b,llama3-8b --model-shape none | tee "$out/gpu-check-8192.md" || status=1
"$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 128 -b 1 \
    --kv-policy full,h2o:budget=90%,keyformer:budget=50%,window:budget=50% | tee "$out/bench-batch1.md" || status=1
python3 scripts/hf_anchor.py --shape llama2-7b --prompt 4096 --gen 128 --batch 1 | tee "$out/hf-anchor.md" || status=1
python3 - <<'PY' 2>&1 | tee "$out/torch-copy.txt"
import torch
x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
best = 0.0
for _ in range(10):
    start.record(); y.copy_(x); end.record(); torch.cuda.synchronize()
    # A copy reads and writes every byte.
    best = max(best, 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9)
print(f"torch device copy: {best:.0f} GB/s (read + write), {torch.cuda.get_device_name()}")
PY
exit $status
