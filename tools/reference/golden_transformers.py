#!/usr/bin/env python3
"""Golden values from Hugging Face transformers (CPU torch, f32) on the F32 GGUF.

Input ids come from llama.cpp's tokenizer (golden_llamacpp.py's output): transformers' GGUF
tokenizer conversion drops SmolLM2's digit splitting, so its own ids are not the reference.
Writes, per parity prompt, the last-token logits (little-endian f32 file) and the 32-token
greedy continuation. Usage: golden_transformers.py MODEL_F32.gguf LLAMACPP.json OUT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main(model_f32, llamacpp_json, out_dir):
    out = Path(out_dir)
    path = Path(model_f32)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    cases = []
    for i, case in enumerate(json.load(open(llamacpp_json))["top5"]):
        ids = torch.tensor([case["ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float().numpy()
            gen = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2,
                                 attention_mask=torch.ones_like(ids))
        name = f"transformers_logits_{i}.f32"
        logits.astype("<f4").tofile(out / name)
        cases.append({"prompt": case["prompt"], "ids": case["ids"], "logits_file": name,
                      "greedy32": [int(t) for t in gen[0, ids.shape[1]:]]})
    json.dump({"cases": cases}, open(out / "transformers.json", "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
