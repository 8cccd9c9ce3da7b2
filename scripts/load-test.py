#!/usr/bin/env python3
"""Bounded load test of `keyformer serve` on loopback: the same requests under each KV setting,
with the same --kv-memory, reporting throughput, latency percentiles and peak KV memory.

    scripts/load-test.py [--clients 8] [--requests 16] [--prompt-tokens 1024] [--max-tokens 256]
                         [--kv-memory 100M] [--policies full,keyformer:50%] [--json OUT]
                         [--device cuda] [--random-weights llama2-7b]
                         [--shared-prefix-tokens 1024 --prefix-cache-memory 50%]

With --shared-prefix-tokens N every prompt starts with the same N-token text (a system prompt
shared by every client) before its own --prompt-tokens; with --prefix-cache-memory M each policy
runs twice, without and with kept prefixes (`serve --prefix-cache-memory M`), under the same
--kv-memory. Requests stream, so the time to the first token is measured per request.

Each policy gets a fresh server whose default KV policy is that one (requests carry no
override). Prompts are slices of the Brown corpus (scripts/fetch-texts.sh), each request a
different slice; with --random-weights they are random token ids, exactly --prompt-tokens
long (the random model's tokenizer has no end-of-text token, so every answer is exactly
--max-tokens long). Needs the CLI built (cargo build --release; with --features cuda for
--device cuda, the binary named by KEYFORMER_BIN).
"""

import argparse
import concurrent.futures
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

BIN = os.environ.get("KEYFORMER_BIN", "target/release/keyformer")


def start(policy, budget, kv_memory, max_batch, device, random_weights, prefix_memory="0"):
    args = [BIN, "serve", "--port", "0", "--kv-memory", kv_memory, "--max-batch", str(max_batch),
            "--max-queue", "1000", "--kv-policy", policy, "--device", device, "--prefix-cache-memory", prefix_memory]
    if random_weights:
        args += ["--random-weights", random_weights]
    if budget:
        args += ["--kv-budget", budget]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"server failed to start: {' '.join(args)}")
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            return proc, m.group(1)


def metrics(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}


def prompts(n, prompt_tokens, shared_tokens=0):
    texts = subprocess.run(["bash", "scripts/fetch-texts.sh"], check=True, capture_output=True, text=True).stdout.strip()
    words = open(os.path.join(texts, "brown.txt"), encoding="utf-8").read().split()
    # About 1.3 tokens per word of this prose; each request starts at a different place, after
    # the shared text (the corpus's last words, so it overlaps no request's own part).
    shared = " ".join(words[len(words) - int(shared_tokens / 1.3):]) + "\n\n" if shared_tokens else ""
    span = int(prompt_tokens / 1.3)
    step = max(1, (len(words) - span - int(shared_tokens / 1.3)) // max(n, 1))
    return [shared + " ".join(words[i * step:i * step + span]) for i in range(n)]


def token_prompts(n, prompt_tokens):
    """Random token ids below 256 (byte tokens: in the vocabulary of every random shape)."""
    rng = random.Random(0)
    return [[rng.randrange(1, 256) for _ in range(prompt_tokens)] for _ in range(n)]


def run_policy(label, policy, budget, args, texts, prefix_memory="0"):
    proc, addr = start(policy, budget, args.kv_memory, args.max_batch, args.device, args.random_weights, prefix_memory)
    peak = {"kv": 0.0, "batch": 0.0, "reserved": 0.0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                m = metrics(addr)
                peak["kv"] = max(peak["kv"], m["keyformer_kv_bytes_in_use"])
                peak["batch"] = max(peak["batch"], m["keyformer_batch_size"])
                peak["reserved"] = max(peak["reserved"], m["keyformer_kv_bytes_reserved"])
            except OSError:
                pass
            time.sleep(0.05)

    def one(text):
        body = json.dumps({"prompt": text, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(f"http://{addr}/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        t = time.time()
        first, usage = None, None
        with urllib.request.urlopen(req, timeout=3600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.time() - t
                usage = chunk.get("usage") or usage
        return time.time() - t, usage, first if first is not None else time.time() - t

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
        results = list(pool.map(one, texts))
    wall = time.time() - t0
    stop.set()
    poller.join()
    final = metrics(addr)
    proc.terminate()
    proc.wait(timeout=60)
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[2] for r in results)
    gen = sum(r[1]["completion_tokens"] for r in results)
    prompt = sum(r[1]["prompt_tokens"] for r in results)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {
        "kv": label,
        "requests": len(results),
        "seconds": wall,
        "requests_per_s": len(results) / wall,
        "generated_tok_per_s": gen / wall,
        "mean_prompt_tokens": prompt / len(results),
        "p50_s": statistics.median(lat),
        "p99_s": pct(0.99),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "prefix_memory": prefix_memory,
        "prefix_hits": int(final.get("keyformer_prefix_cache_hits_total", 0)),
        "prefix_tokens_reused": int(final.get("keyformer_prefix_cache_tokens_reused_total", 0)),
        "peak_kv_mib": peak["kv"] / 2**20,
        "peak_reserved_mib": peak["reserved"] / 2**20,
        "peak_batch": int(peak["batch"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kv-memory", default="100M")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--policies", default="full,keyformer:50%",
                    help="comma-separated POLICY[:BUDGET]")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--random-weights", help="serve random weights at this shape (token-id prompts)")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0,
                    help="a text of about this many tokens that every prompt starts with")
    ap.add_argument("--prefix-cache-memory", help="also run each policy with `serve --prefix-cache-memory` this")
    args = ap.parse_args()
    if args.random_weights:
        texts = token_prompts(args.requests, args.prompt_tokens)
    else:
        texts = prompts(args.requests, args.prompt_tokens, args.shared_prefix_tokens)
    rows = []
    for spec in args.policies.split(","):
        policy, _, budget = spec.partition(":")
        label = f"{policy}@{budget}" if budget else policy
        for prefix_memory in ["0"] + ([args.prefix_cache_memory] if args.prefix_cache_memory else []):
            name = label if prefix_memory == "0" else f"{label}, prefixes {prefix_memory}"
            print(f"running {name} ...", file=sys.stderr)
            rows.append(run_policy(name, policy, budget or None, args, texts, prefix_memory))
    base = rows[0]["requests_per_s"]
    model = f"random {args.random_weights} weights" if args.random_weights else "smollm2-135m"
    shared = f", a shared prefix of ~{args.shared_prefix_tokens} tokens" if args.shared_prefix_tokens else ""
    print(f"clients {args.clients}, requests {args.requests}, prompt ~{args.prompt_tokens} tokens{shared}, "
          f"max_tokens {args.max_tokens}, --kv-memory {args.kv_memory}, --device {args.device}, {model}\n")
    print("| kv | req/s | gen tok/s | p50 s | p99 s | first token p50 s | p99 s | prefix hits (tokens reused) "
          "| peak KV in use MiB | peak reserved MiB | peak batch | req/s vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kv']} | {r['requests_per_s']:.3f} | {r['generated_tok_per_s']:.1f} | {r['p50_s']:.1f} | "
              f"{r['p99_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['prefix_hits']} "
              f"({r['prefix_tokens_reused']}) | {r['peak_kv_mib']:.1f} | {r['peak_reserved_mib']:.1f} | "
              f"{r['peak_batch']} | {r['requests_per_s'] / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
