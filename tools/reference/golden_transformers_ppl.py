#!/usr/bin/env python3
"""Perplexity of the first 1024-token window of tests/data/prose.txt under transformers (CPU
torch, f32; the GGUF's quantised weights dequantised by transformers' GGUF loader), with the
token ids of llama.cpp's tokenizer (vocab-only llama-cpp-python). The reference for a
quantised model's arithmetic: llama.cpp quantises activations to 8 bits in its products, which
moves Qwen2.5-Coder's perplexity by 0.3-0.5%.
Usage: golden_transformers_ppl.py MODEL.gguf OUT.json   (needs LLAMA_CPP_LIB_PATH, as
golden_llamacpp.py does)
"""
import json
import math
import sys
from pathlib import Path

import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def main(model, out, window=1024):
    text = (ROOT / "tests/data/prose.txt").read_text()
    vocab = Llama(model_path=model, vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)[:window]
    del vocab
    path = Path(model)
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1)
    json.dump({"perplexity": {"window_tokens": len(ids), "tokens_scored": len(ids) - 1, "mean_nll": nll,
                              "ppl": math.exp(nll)}}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
