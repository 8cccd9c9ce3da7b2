#!/usr/bin/env python3
"""Where transformers' prefill spends its GPU time: one forward pass over a prompt at a
keyformer `--random-weights` shape (f16, sdpa), under torch.profiler, kernels grouped by kind.
The counterpart of `scripts/ncu-step.py --all` over `keyformer bench --device cuda -n 1`.

    python3 scripts/hf_prefill_profile.py --shape llama2-7b --prompt 4096

Needs torch with CUDA and transformers (the GPU machine has both); no network, no weights.
"""
import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from hf_anchor import SHAPES

# Kernel names to kinds, first match wins (cuBLAS/CUTLASS GEMMs, the sdpa kernels, the rest).
KINDS = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "sm80_")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ]


def kind_of(name):
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (norms, RoPE, element-wise, copies)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--top", type=int, default=12, help="kernels listed one by one")
    a = ap.parse_args()
    cfg = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt), device="cuda")
    with torch.inference_mode():
        for _ in range(2):  # warm-up (cuBLAS heuristics, allocator)
            model(ids, use_cache=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, use_cache=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(ids, use_cache=True)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in kernels)  # microseconds
    by_kind = collections.defaultdict(float)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_kind[kind_of(e.name)] += e.device_time_total
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time_total
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}: {a.shape}, {a.prompt}-token prefill, {wall * 1e3:.1f} ms wall "
          f"(unprofiled), {total / 1e3:.1f} ms of kernels, {len(kernels)} launches\n")
    print("| kind | ms | share |\n|---|---:|---:|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e3:.1f} | {100 * us / total:.0f}% |")
    print("\n| kernel | launches | ms | share |\n|---|---:|---:|---:|")
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"| {name[:90]} | {n} | {us / 1e3:.2f} | {100 * us / total:.0f}% |")


if __name__ == "__main__":
    main()
