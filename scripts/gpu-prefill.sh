#!/usr/bin/env bash
# The prompt's speed on the GPU (issue 21, part 2), side by side in one run: a 4096-token prefill
# of the llama2-7b shape (random f16 weights) through flash.cu's default kernel (128 query rows a
# block), its 64-row kernel (KEYFORMER_FLASH_KERNEL=lean), the earlier cuBLAS blocks
# (KEYFORMER_FLASH_PREFILL=0) and the default with -ub 4096 (the prompt in one pass), each
# policy's first prefill (cold: the allocator's pool emptied, caches allocated) and its warm
# median of three; then transformers' prefill on the same card (scripts/hf_anchor.py, sdpa,
# after a warm-up, median of three).
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
policies=full,full,h2o:budget=50%,keyformer:budget=50%,kvzip:budget=50%
run() {  # label, environment assignment (or -), extra bench flags
    label=$1; assignment=$2; shift 2
    [ "$assignment" = - ] && assignment=KEYFORMER_UNSET=1
    env "$assignment" timeout 200 "$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 16 -b 1 \
        --kv-policy "$policies" --json "$@" 2>/dev/null | sed "s/^{/{\"path\":\"$label\",/" >> "$out/prefill.json"
}
run "flash (128-row blocks)" -
run "flash (64-row blocks)" KEYFORMER_FLASH_KERNEL=lean
run "cuBLAS blocks" KEYFORMER_FLASH_PREFILL=0
run "flash, -ub 4096" - -ub 4096
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
    gpu = rows[0]["gpu"] if rows else "?"
    f.write(f"{gpu}, llama2-7b shape, random f16 weights, 4096-token prompt\n\n")
    f.write("| path | policy | prefill s (first) | prefill s (warm, median of 3) | vs transformers (warm) | decode t/s |\n")
    f.write("|---|---|---:|---:|---:|---:|\n")
    for r in rows:
        vs = f"{hf['prefill_s'] / r['prefill_warm_s']:.2f}x" if hf else ""
        f.write(f"| {r['path']} | {r['kv']} | {r['prefill_s']:.4f} | {r['prefill_warm_s']:.4f} | {vs} | {r['decode_tok_s']:.1f} |\n")
    if hf:
        f.write(f"| transformers (sdpa) | full | | {hf['prefill_s']:.4f} | 1.00x | {hf['decode_tok_s']:.1f} |\n")
print(open(f"{out}/prefill.md").read())
PY
