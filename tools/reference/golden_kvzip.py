#!/usr/bin/env python3
"""Golden scores and kept tokens of kvpress's KVzipPress (the reference for our `kvzip` policy
with `recent=0:layers=global`) on a tiny Hugging Face model folder.

Runs the press over a fixed prompt of token ids through transformers (CPU, f32, sdpa as the
press requires): the model reads the prompt, then the press asks it to repeat the prompt (its
words, the chat template's end of turn) and scores each prompt token by the largest attention
the repetition pays it. Writes the press's score of every (layer, KV head, position) and the
positions each (layer, KV head) keeps after its model-wide top-k (no window, 4 sinks). The
prompt is all context: the press's chat-template prefix is set to none, as our engine repeats
whatever prompt it is given. Run it in the kvpress environment that scripts/kvpress-ruler.sh
makes:

    ~/.cache/keyformer/kvpress-venv/bin/python tools/reference/golden_kvzip.py \
        tests/golden/families/hf/qwen2 tests/golden/kvzip_qwen2.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress import KVzipPress

PROMPT_LEN = 40
COMPRESSION = 0.5


def main(folder, out):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    # Token ids spread over the vocabulary, fixed; none is a special token of the tiny
    # vocabulary's last ids.
    ids = [(7 + 37 * i) % (model.config.vocab_size - 16) for i in range(PROMPT_LEN)]
    press = KVzipPress(compression_ratio=COMPRESSION)
    recorded = {}
    compress_post = press.compress_post

    def recording_compress_post(m):
        # The scores before the press pins its sinks (it gives them max + 1).
        recorded["scores"] = press.score_val.detach().clone().float()
        recorded["suffix"] = [int(t) for t in press._suffix_ids[0]]
        compress_post(m)

    press.compress_post = recording_compress_post
    with torch.no_grad(), press(model):
        press.prefix_length = 0  # the whole prompt is context
        # The press reads the repetition through the cache it is given (as kvpress's pipeline
        # gives one): without it the repetition would attend to itself alone.
        model(torch.tensor([ids]), past_key_values=DynamicCache())
    scores = recorded["scores"]  # [layers, 1, kv heads, positions]
    n_layers, _, n_kv, n = scores.shape
    layers = []
    for layer_idx, layer in enumerate(model.model.layers):
        _, heads, positions = layer.self_attn.masked_key_indices
        pruned = [set() for _ in range(n_kv)]
        for h, p in zip(heads.tolist(), positions.tolist()):
            pruned[h].add(p)
        kept = [[p for p in range(n) if p not in pruned[h]] for h in range(n_kv)]
        layers.append({"kept": kept, "scores": [[float(v) for v in scores[layer_idx, 0, h]] for h in range(n_kv)]})
    json.dump(
        {
            "folder": folder,
            "ids": ids,
            "compression_ratio": COMPRESSION,
            "n_sink": press.n_sink,
            "suffix": recorded["suffix"],
            "layers": layers,
        },
        open(out, "w"),
        indent=1,
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
