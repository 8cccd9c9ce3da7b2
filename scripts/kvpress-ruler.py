#!/usr/bin/env python3
"""kvpress (NVIDIA) on exactly the RULER cases `keyformer eval --export-cases` wrote: the same
model (a GGUF file, read by transformers' GGUF loader, or a Hugging Face folder), the same
token ids (the export carries ours, so tokenizer differences cannot enter), kvpress's own
protocol (the context prefilled under the press and compressed, then the question and a greedy
answer with the compressed cache, positions continuing the context's), on the CPU.

    scripts/kvpress-ruler.sh --cases cases.jsonl --model MODEL.gguf --out kvpress.jsonl \\
        [--presses streaming_llm,observed_attention,snapkv,tova,knorm,expected_attention,keydiff,adakv_expected_attention] \\
        [--kept 25,50]

`--kept` is the share of the context kept, in percent (kvpress's compression_ratio is the share
removed: 1 - kept/100). One JSON row per (case, press, kept): {"doc", "task", "policy",
"budget", "metrics": {"score", "full_score", "prompt_tokens"}, "output"} (the shape of
`keyformer eval`'s results.jsonl rows, so scripts/ruler-table.py reads both). Rows already in
--out are skipped (resumable). Scored as RULER's string_match_all, like keyformer's rows.

Versions: kvpress 0.5.5 with transformers 5.2 (kvpress pins transformers < 5.3);
scripts/kvpress-ruler.sh makes that environment.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path


def score(output, answers):
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers) if answers else 0.0


def make_press(name, ratio):
    import kvpress as kp
    if name == "none":
        return None
    table = {
        "streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "observed_attention": lambda: kp.ObservedAttentionPress(compression_ratio=ratio),
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "random": lambda: kp.RandomPress(compression_ratio=ratio),
        "expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "keydiff": lambda: kp.KeyDiffPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=ratio)),
        "pyramidkv": lambda: kp.PyramidKVPress(compression_ratio=ratio),
        "kvzip": lambda: kp.KVzipPress(compression_ratio=ratio),
    }
    if name not in table:
        sys.exit(f"unknown press '{name}' (known: {', '.join(sorted(table))})")
    return table[name]()


def load(model_path, attention):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(model_path)
    kw = dict(dtype=torch.float32, attn_implementation=attention)
    if p.is_dir():
        return AutoModelForCausalLM.from_pretrained(p, **kw).eval(), AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, **kw).eval()
    return model, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--presses", default="streaming_llm,observed_attention,snapkv,tova,knorm,expected_attention,"
                                          "keydiff,adakv_expected_attention")
    ap.add_argument("--kept", default="25,50")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers
    from transformers import pipeline
    import kvpress  # noqa: F401  (registers the pipeline)
    transformers.utils.logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    # sdpa for speed; ObservedAttention needs the attention weights, so it runs eager.
    model, tok = load(a.model, "sdpa")
    # KVzip loads the tokenizer again by the model's name (for its chat template), which a
    # GGUF file loaded from a folder does not give: hand it the one loaded here.
    import kvpress.presses.kvzip_press as kvzip_module

    class SameTokenizer:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return tok

    kvzip_module.AutoTokenizer = SameTokenizer
    pipes = {"sdpa": pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")}
    if "observed_attention" in a.presses.split(","):
        eager, _ = load(a.model, "eager")
        pipes["eager"] = pipeline("kv-press-text-generation", model=eager, tokenizer=tok, device="cpu")
    cases = [json.loads(l) for l in open(a.cases) if l.strip()]
    out = Path(a.out)
    done = set()
    if out.exists():
        for l in out.read_text().splitlines():
            try:
                r = json.loads(l)
                done.add((r["doc"], r["policy"], r["budget"]))
            except (json.JSONDecodeError, KeyError):
                pass
    presses = a.presses.split(",")
    kept = [int(k) for k in a.kept.split(",")]
    total = len(cases) * (1 + len(presses) * len(kept))
    n, t0 = 0, time.time()

    def answer(case, press, name="none"):
        context = torch.tensor([case["context_ids"]])
        question = torch.tensor([case["question_ids"]])
        pipe = pipes["eager" if name == "observed_attention" else "sdpa"]
        with torch.no_grad():
            r = pipe._forward({"context_ids": context, "questions_ids": [question]},
                              max_new_tokens=case["max_new_tokens"], press=press)
        return r[0] if isinstance(r, list) else r["answer"] if isinstance(r, dict) else str(r)

    with out.open("a") as f:
        for case in cases:
            prompt_tokens = len(case["context_ids"]) + len(case["question_ids"])
            full_text = answer(case, None)
            full = score(full_text, case["answers"])
            n += 1
            for name in presses:
                for k in kept:
                    key = (case["id"], f"kvpress:{name}", f"{k}%")
                    n += 1
                    if key in done:
                        continue
                    text = answer(case, make_press(name, 1 - k / 100), name)
                    row = {"task": "ruler", "doc": case["id"], "policy": key[1], "budget": key[2], "seed": 0,
                           "metrics": {"score": score(text, case["answers"]), "full_score": full,
                                       "prompt_tokens": prompt_tokens},
                           "output": text, "full_output": full_text}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    el = time.time() - t0
                    print(f"kvpress: {n}/{total} ({el:.0f} s, ETA {el / n * (total - n):.0f} s)", file=sys.stderr,
                          flush=True)


if __name__ == "__main__":
    main()
