#!/usr/bin/env python3
"""Golden values from llama.cpp (through llama-cpp-python) on the Q4_1 file.

- token ids of every text in tests/data/tokenizer_texts.json (special tokens parsed, no BOS:
  the model's add_bos_token is false) and of the parity prompts;
- the same texts through SmolLM2's vocabulary with `tokenizer.ggml.pre` set to other
  pre-tokenizers (a vocab-only GGUF copy), to check each regex table we implement;
- top-5 next tokens and their logits after each parity prompt;
- mean NLL / perplexity of the first 1024-token window of tests/data/prose.txt, over every
  predicted token (1023 of them), the same definition `keyformer perplexity` uses.
Needs LLAMA_CPP_LIB_PATH pointing at a llama.cpp build and llama_cpp on PYTHONPATH
(scripts/reference-setup.sh does both). Usage:
    golden_llamacpp.py MODEL.gguf OUT.json [--no-pre-variants] [--ppl-window N ...]
The defaults (pre-tokenizer variants on, one 1024-token window under "perplexity") are what
tests/golden/llamacpp.json (SmolLM2) is made with. Each extra --ppl-window N other than 1024
adds "perplexity_N" (the first N tokens of the prose, N - 1 of them scored), e.g. 512 for a
cheaper CI check; --no-pre-variants leaves "pre_variants" out (used for the Qwen goldens).
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter
import llama_cpp
import llama_cpp.llama
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).parent))
from make_f32_gguf import copy_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = json.load(open(ROOT / "tests/data/parity_prompts.json"))


def perplexity(llm, ids, n):
    """Mean NLL over the n - 1 predicted tokens of the first n-token window of `ids`."""
    ids = ids[:n]
    assert len(ids) == n, len(ids)
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[:n], dtype=np.float64)
    nll = 0.0
    for i in range(n - 1):
        row = scores[i]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        nll += lse - row[ids[i + 1]]
    mean_nll = nll / (n - 1)
    return {"window_tokens": n, "tokens_scored": n - 1, "mean_nll": mean_nll, "ppl": math.exp(mean_nll)}


def main(model, out, pre_variants=True, windows=(1024,)):
    texts = json.load(open(ROOT / "tests/data/tokenizer_texts.json"))
    # f32 KV cache (type 0), as ours: llama.cpp defaults to f16, which alone moves perplexity ~0.3%.
    # And llama.cpp's plain kernels, not the weight repacking it does at load on some CPUs
    # (extra buffer types: Q4_0/Q4_K into interleaved blocks with their own kernels): the
    # repacked Q4_K path moved Qwen2.5-Coder-1.5B's perplexity by 0.57% against the plain one
    # (1.8169 against 1.8272 on an AVX-512 machine), so a golden made with it would depend on
    # the CPU that made it.
    plain_kernels = llama_cpp.llama_model_default_params

    def model_params():
        params = plain_kernels()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0,
                type_k=0, type_v=0)
    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_kernels
    tok = lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
    tokenizer = [{"text": s, "ids": tok(s)} for s in texts]

    variants = {}
    reader = GGUFReader(model)
    for pre in (["gpt-2", "llama-bpe", "qwen2", "starcoder", "default"] if pre_variants else []):
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/vocab-{pre}.gguf"
            writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
            copy_metadata(reader, writer, {"tokenizer.ggml.pre": pre})
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            vocab = Llama(model_path=path, vocab_only=True, verbose=False)
            variants[pre] = [vocab.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in texts]
            del vocab

    top5 = []
    for p in PROMPTS:
        ids = tok(p)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        order = np.argsort(-logits)[:5]
        top5.append({"prompt": p, "ids": ids, "top5": [int(i) for i in order],
                     "top5_logits": [float(logits[i]) for i in order]})

    prose = tok((ROOT / "tests/data/prose.txt").read_text())
    doc = {"tokenizer": tokenizer}
    if pre_variants:
        doc["pre_variants"] = variants
    doc["top5"] = top5
    for n in windows:
        doc["perplexity" if n == 1024 else f"perplexity_{n}"] = perplexity(llm, prose, n)
        print(json.dumps(doc["perplexity" if n == 1024 else f"perplexity_{n}"]))
    json.dump(doc, open(out, "w"), indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--no-pre-variants", action="store_true")
    ap.add_argument("--ppl-window", type=int, action="append", default=[],
                    help="extra perplexity window (tokens); 1024 is always computed")
    a = ap.parse_args()
    main(a.model, a.out, pre_variants=not a.no_pre_variants,
         windows=[1024] + [n for n in a.ppl_window if n != 1024])
