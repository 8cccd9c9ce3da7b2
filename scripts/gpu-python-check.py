#!/usr/bin/env python3
"""The Python package on the GPU (run on the GPU machine): the same tiny models on
device="cpu" and device="cuda" through `keyformer.Engine`, greedy generation under the full
cache and Keyformer, and the logits of a teacher-forced prompt, side by side.

    pip install --no-deps --target DIR keyformer-*.whl   # a wheel built with --features cuda
    PYTHONPATH=DIR python3 scripts/gpu-python-check.py [MODEL.gguf ...]

Exits non-zero when a check fails. The tolerances are gpu-check's: the GPU rounds every product's
input to f16, so logits agree to ~1e-3 of their range and a near-tie may flip a greedy token.
"""
import sys

import numpy as np

import keyformer

models = sys.argv[1:] or ["tests/golden/families/llama.gguf", "tests/golden/families/qwen2.gguf",
                          "tests/golden/families/gemma2.gguf"]
assert keyformer.has_cuda(), "this keyformer was built without CUDA"
failed = 0
for path in models:
    cpu, gpu = keyformer.Engine(path), keyformer.Engine(path, device="cuda")
    assert gpu.device == "cuda"
    prompt = [(i * 7919 + 13) % cpu.vocab_size for i in range(100)]
    for kv in [None, "keyformer:budget=50%:min-budget=8", "h2o:budget=50%:min-budget=8"]:
        a = cpu.generate(prompt, max_tokens=16, seed=0, kv=kv)
        b = gpu.generate(prompt, max_tokens=16, seed=0, kv=kv)
        agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
        ok = agree >= 0.9 * len(a.token_ids) and a.kv_cache["budget_tokens"] == b.kv_cache["budget_tokens"]
        failed += not ok
        print(f"| {path} | generate {kv or 'full'} | {agree}/{len(a.token_ids)} greedy tokens agree | "
              f"budget {a.kv_cache['budget_tokens']} / {b.kv_cache['budget_tokens']} | {'pass' if ok else 'FAIL'} |")
    la, lb = cpu.logits(prompt[:64]), gpu.logits(prompt[:64])
    err = float(np.abs(la - lb).max() / np.abs(la).max())
    ok = la.shape == lb.shape and err < 2e-2
    failed += not ok
    print(f"| {path} | logits {la.shape} | max error {err:.2e} of the largest logit | | {'pass' if ok else 'FAIL'} |")
    pieces = list(gpu.stream(prompt, max_tokens=8, seed=0))
    ok = "".join(pieces) == gpu.generate(prompt, max_tokens=8, seed=0).text
    failed += not ok
    print(f"| {path} | stream on the GPU joins to generate's text | {len(pieces)} pieces | | {'pass' if ok else 'FAIL'} |")
sys.exit(1 if failed else 0)
