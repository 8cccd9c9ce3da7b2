#!/usr/bin/env python3
"""Golden dequantisation vectors from the `gguf` package (independent of our code).

For every tensor type we read: random blocks (scales forced to small finite f16 values) and
what gguf-py's dequantiser makes of them; for the real model file: the first and a middle
stretch of each tensor type present, by tensor name and element offset.
Usage: golden_quant.py MODEL.gguf OUT.json
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of f16 scale fields inside one block, per type.
SCALE_OFFSETS = {
    T.F16: [0], T.BF16: [], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q8_0: [0], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def random_blocks(qtype, n_blocks, rng):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(-0.05, 0.05, size=n_blocks)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.BF16:
        vals = rng.uniform(-2, 2, size=n_blocks).astype(np.float32)
        raw[:, :] = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def main(model, out):
    rng = np.random.default_rng(1234)
    cases = []
    for qtype, n_blocks in [(T.F16, 64), (T.BF16, 64), (T.Q4_0, 4), (T.Q4_1, 4), (T.Q5_0, 4), (T.Q5_1, 4),
                            (T.Q8_0, 4), (T.Q2_K, 2), (T.Q3_K, 2), (T.Q4_K, 2), (T.Q5_K, 2), (T.Q6_K, 2)]:
        raw = random_blocks(qtype, n_blocks, rng)
        vals = dequantize(raw.reshape(-1), qtype).reshape(-1)
        cases.append({"type": qtype.name, "bytes_hex": raw.tobytes().hex(), "values": [float(v) for v in vals]})
    real = []
    seen = set()
    for t in GGUFReader(model).tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        vals = dequantize(t.data, t.tensor_type).reshape(-1)
        mid = (len(vals) // 2) // 256 * 256
        for start in (0, mid):
            real.append({"tensor": t.name, "type": t.tensor_type.name, "start": int(start),
                         "values": [float(v) for v in vals[start:start + 256]]})
    json.dump({"random": cases, "model": real}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
