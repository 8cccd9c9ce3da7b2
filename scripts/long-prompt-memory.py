#!/usr/bin/env python3
"""Peak memory of one long prompt against its length, with and without chunked prefill.

    scripts/long-prompt-memory.py [--model qwen2.5-coder-0.5b] [--lengths 2000,8000,16000,32000]
                                  [--configs full,kf50,kf50-chunk,kf1024,kf1024-chunk]
                                  [--chunk 512] [--json out.json]

Each (length, config) is one `keyformer run` over the first LENGTH tokens (about) of Paul
Graham's essays (scripts/fetch-texts.sh) with one generated token; the process's peak resident
memory (the model's mapped weights included) comes from the kernel (wait4), the KV cache's peak
bytes from the run's `kv_cache.bytes_peak`. Configs: full (the whole cache), kf50 (keyformer,
50% of the prompt), kf1024 (keyformer, 1024 tokens), each `-chunk` trimmed every --chunk tokens
(`--prefill-chunk`). Prints a Markdown table; the ratio column compares each row with the same
config at the shortest length.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/keyformer"

CONFIGS = {
    "full": [],
    "kf50": ["--kv-policy", "keyformer", "--kv-budget", "50%"],
    "kf1024": ["--kv-policy", "keyformer", "--kv-budget", "1024"],
}


def config_args(name, chunk):
    base, _, chunked = name.partition("-")
    if base not in CONFIGS or chunked not in ("", "chunk"):
        sys.exit(f"unknown config {name!r} (full, kf50, kf1024, each with -chunk)")
    return CONFIGS[base] + (["--prefill-chunk", str(chunk)] if chunked else [])


def essays_text():
    texts = subprocess.run([str(ROOT / "scripts/fetch-texts.sh")], check=True, capture_output=True, text=True)
    folder = Path(texts.stdout.strip())
    with open(folder / "paul-graham.jsonl") as f:
        return "\n\n".join(json.loads(line)["context"] for line in f)


def prompt_file(model, text, tokens, out_dir):
    """A file of about `tokens` tokens: the text cut at a character count scaled from a probe."""
    path = out_dir / f"prompt-{tokens}.txt"
    probe = text[:20000]
    # `tokenize` prints one line per token (id, then the piece).
    ids = subprocess.run([str(BIN), "tokenize", "-m", model, "--file", "/dev/stdin"], input=probe,
                         check=True, capture_output=True, text=True).stdout.count("\n")
    chars = int(len(probe) / max(ids, 1) * tokens * 0.99)
    if chars > len(text):
        sys.exit(f"the essays hold fewer than {tokens} tokens")
    path.write_text(text[:chars])
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lengths", default="2000,8000,16000,32000")
    ap.add_argument("--configs", default="full,kf50,kf50-chunk,kf1024,kf1024-chunk")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "keyformer-cli"], cwd=ROOT, check=True)
    out_dir = ROOT / "target/long-prompt"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = essays_text()
    lengths = [int(n) for n in a.lengths.split(",")]
    configs = a.configs.split(",")
    rows = []
    for n in lengths:
        path = prompt_file(a.model, text, n, out_dir)
        for name in configs:
            cmd_args = config_args(name, a.chunk)
            r, seconds, peak = run_measured(a.model, path, cmd_args)
            row = {"config": name, "target_tokens": n, "prompt_tokens": r["prompt_tokens"],
                   "peak_rss_mib": peak / 2**20, "kv_peak_mib": r["kv_cache"]["bytes_peak"] / 2**20,
                   "kv_held_mib": r["kv_cache"]["bytes_held_max"] / 2**20, "seconds": seconds,
                   "prefill_tok_s": r["timings"]["prefill_tok_s"]}
            rows.append(row)
            print(f"{name} @ {r['prompt_tokens']} tokens: peak RSS {row['peak_rss_mib']:.0f} MiB, KV peak "
                  f"{row['kv_peak_mib']:.0f} MiB, {seconds:.0f} s", file=sys.stderr, flush=True)
    first = {}
    print(f"\nmodel {a.model}, chunk {a.chunk} tokens, one generated token\n")
    print("| config | prompt tokens | peak RSS MiB | vs shortest | KV peak MiB | KV after prompt MiB | prefill t/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: (configs.index(r["config"]), r["prompt_tokens"])):
        base = first.setdefault(row["config"], row["peak_rss_mib"])
        print(f"| {row['config']} | {row['prompt_tokens']} | {row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / base:.2f}x "
              f"| {row['kv_peak_mib']:.1f} | {row['kv_held_mib']:.1f} | {row['prefill_tok_s']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def run_measured(model, path, args):
    """Run one measurement; returns (report, seconds, peak resident bytes of that process)."""
    cmd = [str(BIN), "run", "-m", model, "--file", str(path), "--max-tokens", "1", "--temperature", "0", "--json", *args]
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux), after its output.
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')}")
    return json.loads(out), seconds, usage.ru_maxrss * 1024


if __name__ == "__main__":
    main()
