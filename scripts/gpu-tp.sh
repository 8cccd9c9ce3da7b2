#!/usr/bin/env bash
# Tensor parallelism's runs (issue 23) in one call on a machine with 2 or 4 GPUs:
#   1. gpu-check's tensor-parallel rows (2 shards through NCCL against the whole model, beside
#      the one-GPU rows) at the tiny shapes and the llama2-7b shape;
#   2. llama2-7b, batch 1 at 4096 + 128: the plain path, TP=1 through the shard machinery,
#      TP=2 (and TP=4 with 4 GPUs): the target is TP=2 >= 1.6x TP=1;
#   3. llama2-70b (140 GB in f16) with the paper's protocol at 4096 + 4096, full and
#      keyformer@50% at their largest batches, on all the GPUs (2 or 4), with the ratio.
#
#   scripts/gpu-tp.sh OUT_DIR [KEYFORMER_BINARY] [7b|70b]   (.gpu/keyformer; 7b: parts 1 and 2,
#                                                          about 5 minutes; 70b: part 3, a call
#                                                          of its own, up to 10 minutes)
#
# Writes OUT_DIR/tp-check.md, OUT_DIR/tp-7b.json or OUT_DIR/tp-70b.json, and prints a table.
set -uo pipefail
out=${1:?usage: scripts/gpu-tp.sh OUT_DIR [KEYFORMER_BINARY]}
bin=${2:-.gpu/keyformer}
part=${3:-7b}
mkdir -p "$out"
# NVLink multicast stays off (docs/gpu.md): NCCL must not use it on shared hosts.
export NCCL_NVLS_ENABLE=0
nccl=$(dirname "$0")/nccl-path.sh
LD_LIBRARY_PATH=$("$nccl"):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
status=0
touch "$out/tp-7b.json" "$out/tp-70b.json"
if [ "$part" = 7b ]; then
    timeout 300 "$bin" gpu-check --shape none --model-shape none --tp-shape tiny,tiny-qwen2,llama2-7b \
        --model-prompt 300 --model-steps 8 > "$out/tp-check.md" 2>&1 || status=1
    : > "$out/tp-7b.json"
    run7b() { # label, env..., -- bench flags
        local label=$1; shift
        env "$@" timeout 200 "$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 128 -b 1 \
            --kv-policy full,keyformer:budget=50% --json 2>/dev/null | sed "s/^{/{\"run\":\"$label\",/" >> "$out/tp-7b.json"
    }
    run7b plain KEYFORMER_TP_SHARDED=0
    run7b tp1 KEYFORMER_TP_SHARDED=1
    for n in 2 4; do
        [ "$gpus" -ge "$n" ] || continue
        env timeout 200 "$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 128 -b 1 -tp "$n" \
            --kv-policy full,keyformer:budget=50% --json 2>/dev/null | sed "s/^{/{\"run\":\"tp$n\",/" >> "$out/tp-7b.json"
    done
elif [ "$gpus" -ge 2 ]; then
    : > "$out/tp-70b.json"
    tp=$([ "$gpus" -ge 4 ] && echo 4 || echo 2)
    timeout 560 "$bin" bench --device cuda --random-weights llama2-70b -tp "$tp" -p 4096 -n 4096 -b max \
        --kv-policy full,keyformer:budget=50% --json 2>/dev/null | sed "s/^{/{\"run\":\"tp$tp\",/" >> "$out/tp-70b.json" \
        || status=1
fi
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{out}/{name}") if l.startswith("{")]
seven = rows("tp-7b.json")
base = {r["kv"]: r["decode_tok_s"] for r in seven if r["run"] == "tp1"}
print("| llama2-7b, batch 1, 4096 + 128 | kv | t/s (decode) | ms/step | vs TP=1 (shard machinery) |")
print("|---|---|---:|---:|---:|")
for r in seven:
    vs = f'{r["decode_tok_s"] / base[r["kv"]]:.2f}x' if r["kv"] in base else ""
    print(f'| {r["run"]} | {r["kv"]} | {r["decode_tok_s"]:.1f} | {r["ms_per_step"]:.2f} | {vs} |')
big = rows("tp-70b.json")
if big:
    full = next((r for r in big if r["kv"] == "full"), None)
    print("\n| llama2-70b, 4096 + 4096 | kv | batch | t/s (decode) | t/s (total) | vs full (decode) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in big:
        vs = f'{r["decode_tok_s"] / full["decode_tok_s"]:.2f}x' if full else ""
        print(f'| {r["run"]} | {r["kv"]} | {r["batch"]} | {r["decode_tok_s"]:.1f} | {r["total_tok_s"]:.1f} | {vs} |')
PY
[ -f "$out/tp-check.md" ] && grep -c FAIL "$out/tp-check.md"
exit $status
