#!/usr/bin/env python3
"""Golden kept tokens of kvpress's ExpectedAttentionPress (the reference for our `expected`
policy) on a tiny Hugging Face model folder.

Runs the press over a fixed prompt of token ids through transformers (CPU, f32), records the
scores its `score` gives each layer, and writes for every (layer, KV head) the positions the
press keeps (its own top-k, `n_kept` tokens) and the scores themselves. Run it in the kvpress
environment that scripts/kvpress-ruler.sh makes:

    ~/.cache/keyformer/kvpress-venv/bin/python tools/reference/golden_expected_attention.py \
        tests/golden/families/hf/qwen2 tests/golden/expected_attention_qwen2.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from kvpress import ExpectedAttentionPress

PROMPT_LEN = 40
COMPRESSION = 0.5


def main(folder, out):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # Token ids spread over the vocabulary, fixed (no tokenizer enters the comparison).
    ids = [(7 + 37 * i) % model.config.vocab_size for i in range(PROMPT_LEN)]
    press = ExpectedAttentionPress(compression_ratio=COMPRESSION)
    recorded = {}
    score = press.score

    def recording_score(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs)
        recorded[module.layer_idx] = s[0].detach().float()
        return s

    press.score = recording_score
    with torch.no_grad(), press(model):
        model(torch.tensor([ids]))
    n_kept = int(PROMPT_LEN * (1 - COMPRESSION))
    layers = []
    for layer in sorted(recorded):
        s = recorded[layer]
        kept = [sorted(int(p) for p in s[h].topk(n_kept).indices) for h in range(s.shape[0])]
        # The press pins its 4 sinks by giving them max + 1: report the others' scores only.
        layers.append({"kept": kept, "scores": [[float(v) for v in s[h, press.n_sink:]] for h in range(s.shape[0])]})
    json.dump(
        {
            "folder": folder,
            "ids": ids,
            "n_kept": n_kept,
            "n_sink": press.n_sink,
            "n_future_positions": press.n_future_positions,
            "layers": layers,
        },
        open(out, "w"),
        indent=1,
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
