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
(scripts/reference-setup.sh does both). Usage: golden_llamacpp.py MODEL.gguf OUT.json
"""
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).parent))
from make_f32_gguf import copy_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = json.load(open(ROOT / "tests/data/parity_prompts.json"))


def main(model, out):
    texts = json.load(open(ROOT / "tests/data/tokenizer_texts.json"))
    # f32 KV cache (type 0), as ours: llama.cpp defaults to f16, which alone moves perplexity ~0.3%.
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0,
                type_k=0, type_v=0)
    tok = lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
    tokenizer = [{"text": s, "ids": tok(s)} for s in texts]

    variants = {}
    reader = GGUFReader(model)
    for pre in ["gpt-2", "llama-bpe", "qwen2", "starcoder", "default"]:
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

    prose = (ROOT / "tests/data/prose.txt").read_text()
    ids = tok(prose)[:1024]
    assert len(ids) == 1024, len(ids)
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[:1024], dtype=np.float64)
    nll = 0.0
    for i in range(1023):
        row = scores[i]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        nll += lse - row[ids[i + 1]]
    mean_nll = nll / 1023
    ppl = {"window_tokens": 1024, "tokens_scored": 1023, "mean_nll": mean_nll, "ppl": math.exp(mean_nll)}
    json.dump({"tokenizer": tokenizer, "pre_variants": variants, "top5": top5, "perplexity": ppl}, open(out, "w"), indent=1)
    print(json.dumps(ppl))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
