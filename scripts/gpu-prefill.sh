#!/usr/bin/env bash
# The prompt's speed on the GPU (issue 21, part 2), side by side in one run: a 4096-token prefill
# of the llama2-7b shape (random f16 weights) through flash.cu and through the earlier cuBLAS
# blocks (KEYFORMER_FLASH_PREFILL=0), each policy twice where the first run pays cuBLAS's
# lazy loading; then transformers' prefill on the same card (scripts/hf_anchor.py, sdpa).
#
#   scripts/gpu-prefill.sh OUT_DIR [KEYFORMER_BINARY]     (on the GPU machine; .gpu/keyformer by default)
#
# Writes OUT_DIR/prefill.md (one table) and OUT_DIR/prefill.json (the bench rows).
set -uo pipefail
out=${1:?usage: scripts/gpu-prefill.sh OUT_DIR [KEYFORMER_BINARY]}
bin=${2:-.gpu/keyformer}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
: > "$out/prefill.json"
for path in flash cublas; do
    flag=1; [ "$path" = cublas ] && flag=0
    KEYFORMER_FLASH_PREFILL=$flag timeout 200 "$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 16 \
        -b 1 --kv-policy full,full,h2o:budget=50%,keyformer:budget=50%,kvzip:budget=50% --json 2>/dev/null |
        sed "s/^{/{\"path\":\"$path\",/" >> "$out/prefill.json"
done
timeout 200 python3 scripts/hf_anchor.py --shape llama2-7b --prompt 4096 --gen 16 --batch 1 --json \
    > "$out/hf-anchor.json" 2>/dev/null
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/prefill.json") if l.startswith("{")]
try:
    hf = json.loads(open(f"{out}/hf-anchor.json").read().splitlines()[-1])
except Exception:
    hf = None
with open(f"{out}/prefill.md", "w") as f:
    f.write("| path | policy | prefill s (4096 tokens) | decode t/s |\n|---|---|---:|---:|\n")
    for r in rows:
        f.write(f"| {r['path']} | {r['kv']} | {r['prefill_s']:.4f} | {r['decode_tok_s']:.1f} |\n")
    if hf:
        f.write(f"| transformers (sdpa) | full | {hf['prefill_s']:.4f} | {hf['decode_tok_s']:.1f} |\n")
print(open(f"{out}/prefill.md").read())
PY
