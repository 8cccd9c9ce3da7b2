#!/usr/bin/env python3
"""The Hugging Face anchor for `keyformer bench --device cuda`: transformers at the same model
shapes with random weights, f16, sdpa attention, `generate` with the full cache (greedy, no early
stop), timed the same way (tokens generated per second of decoding, and of the whole call).

    python3 scripts/hf_anchor.py --shape llama2-7b --prompt 4096 --gen 128 --batch 1 [--json]

Needs torch with CUDA and transformers (the GPU machine has both); no network, no weights.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# The shapes of keyformer's `--random-weights` (models/random.rs).
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("--device", default="cuda", help="cuda (the anchor), or cpu to try the script on a small shape")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    cfg = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg).eval()
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    if not a.json:
        print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, {gpu}, "
              f"{a.shape} random weights (f16, sdpa)\n")
        print("| prompt+gen | batch | t/s (decode) | t/s (total) | ms/step | prefill s | peak GiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for batch in a.batch:
        ids = torch.randint(0, cfg.vocab_size, (batch, a.prompt), device=a.device)
        mask = torch.ones_like(ids)
        kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            prefills = []
            for _ in range(3):  # the prefill alone, for the split: the median of three
                t0 = time.perf_counter()
                model(ids, attention_mask=mask, use_cache=True)
                sync()
                prefills.append(time.perf_counter() - t0)
            prefill = sorted(prefills)[1]
            t1 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.gen, min_new_tokens=a.gen, **kwargs)
            sync()
            total = time.perf_counter() - t1
        made = out.shape[1] - a.prompt
        decode = max(total - prefill, 1e-9)
        row = dict(shape=a.shape, gpu=gpu, prompt=a.prompt, gen=made, batch=batch,
                   decode_tok_s=batch * made / decode, total_tok_s=batch * made / total,
                   ms_per_step=decode * 1e3 / made, prefill_s=prefill,
                   peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else 0)
        if a.json:
            print(json.dumps(row))
        else:
            print(f"| {a.prompt}+{made} | {batch} | {row['decode_tok_s']:.1f} | {row['total_tok_s']:.1f} | "
                  f"{row['ms_per_step']:.2f} | {prefill:.2f} | {row['peak_gpu_bytes'] / 2**30:.1f} |")


if __name__ == "__main__":
    main()
