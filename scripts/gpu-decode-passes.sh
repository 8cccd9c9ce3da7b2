#!/usr/bin/env bash
# The decode attention's layouts (issue 21, part 4: Keyformer's scoring at the largest batch),
# checked and measured side by side in one call on the GPU machine (about 6 minutes):
#   1. `keyformer gpu-check` as it runs by default, then with every decode attention in one
#      pass (KEYFORMER_DECODE_PASS=one-pass: the model rows' kept tokens and graph replay go
#      through it too); each pass also has rows of its own (outputs and scores against the CPU,
#      the same victim as the CPU policy);
#   2. the paper's batch of 56 (llama2-7b shape, 4096 + 64, budget 50%) for window, h2o and
#      keyformer under each layout: ranges with the victims in a kernel of their own (the
#      default at large batches), whole heads per combining block, and one pass. Keyformer's
#      cost is its ms a step over window's in the same layout.
#
#   scripts/gpu-decode-passes.sh OUT_DIR [KEYFORMER_BINARY]   (.gpu/keyformer by default)
#
# Writes OUT_DIR/gpu-check.md, OUT_DIR/gpu-check-one-pass.md, OUT_DIR/b56.json and
# OUT_DIR/b56.md (ms a step per policy and layout, and each policy's cost over window).
set -uo pipefail
out=${1:?usage: scripts/gpu-decode-passes.sh OUT_DIR [KEYFORMER_BINARY]}
bin=${2:-.gpu/keyformer}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
status=0
timeout 200 "$bin" gpu-check > "$out/gpu-check.md" 2>&1 || status=1
KEYFORMER_DECODE_PASS=one-pass timeout 200 "$bin" gpu-check > "$out/gpu-check-one-pass.md" 2>&1 || status=1
: > "$out/b56.json"
for pass in ranges-own-kernel whole-heads one-pass; do
    KEYFORMER_DECODE_PASS=$pass timeout 150 "$bin" bench --device cuda --random-weights llama2-7b -p 4096 -n 64 -b 56 \
        --kv-policy window:budget=50%,h2o:budget=50%,keyformer:budget=50% --json 2>/dev/null |
        sed "s/^{/{\"pass\":\"$pass\",/" >> "$out/b56.json" || status=1
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/b56.json") if l.startswith("{")]
ms = {(r["pass"], r["kv"].split("@")[0]): r["ms_per_step"] for r in rows}
with open(f"{out}/b56.md", "w") as f:
    f.write("| layout | window ms/step | h2o | keyformer | h2o over window | keyformer over window |\n")
    f.write("|---|---:|---:|---:|---:|---:|\n")
    for p in dict.fromkeys(r["pass"] for r in rows):
        w, h, k = (ms.get((p, kv)) for kv in ("window", "h2o", "keyformer"))
        over = lambda x: f"{100 * (x / w - 1):+.1f}%" if x and w else "-"
        cell = lambda x: f"{x:.2f}" if x else "-"
        f.write(f"| {p} | {cell(w)} | {cell(h)} | {cell(k)} | {over(h)} | {over(k)} |\n")
print(open(f"{out}/b56.md").read())
PY
grep -c FAIL "$out/gpu-check.md" "$out/gpu-check-one-pass.md"
exit $status
