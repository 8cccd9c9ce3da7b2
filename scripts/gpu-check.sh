#!/usr/bin/env bash
# The GPU checks, run on the GPU machine in one call: the CUDA ops against the CPU backend
# (keyformer gpu-check, at the llama2-7b, llama3-8b and SmolLM2 shapes) and their timings, plus
# torch's device copy bandwidth as an outside reference for the bandwidth floor.
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
"$bin" gpu-check --json > "$out/gpu-check.json" 2>/dev/null || status=1
# Widths that are no multiple of any chunk size, and a long cache.
"$bin" gpu-check --slots 1000 --shape llama3-8b,smollm2-135m | tee "$out/gpu-check-1000.md" || status=1
"$bin" gpu-check --slots 8192 --shape llama2-7b,llama3-8b | tee "$out/gpu-check-8192.md" || status=1
python3 - <<'EOF' 2>&1 | tee "$out/torch-copy.txt"
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
EOF
exit $status
