#!/usr/bin/env python3
"""Streaming perplexity for every KV policy at several budgets, on one text.

    scripts/kv_sweep.py --file TEXT --ctx 1024 --budgets 64,128,256,512 --out results.jsonl
        [--policies full,window,...] [--seeds 0,1,2] [--windows 1] [--model M] [--threads 2] [--bin B]

Each (policy, budget, seed) is one `keyformer perplexity --json` run (the first `budget` tokens
of each window are the prompt, every later token is a decode step with eviction). `full` is run
with the same split, so every row is measured by the same protocol. Rows already in --out are
skipped (an interrupted sweep resumes). `--table` prints the Markdown table of --out.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = "full,window,sink,h2o,tova,snapkv,random,knorm,keyformer"
SEEDED = {"keyformer", "random"}


def key(row):
    return (row["text"], row["ctx"], row["policy"], row["budget"], row["seed"])


def run(args):
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {key(json.loads(l)) for l in out.read_text().splitlines() if l.strip()}
    kf = args.bin
    text = Path(args.file).name
    jobs = []
    for budget in args.budgets.split(","):
        for policy in args.policies.split(","):
            seeds = args.seeds.split(",") if policy in SEEDED else ["0"]
            for seed in seeds:
                jobs.append((policy, int(budget), int(seed)))
    for i, (policy, budget, seed) in enumerate(jobs):
        row_key = (text, args.ctx, policy, budget, seed)
        if row_key in done:
            continue
        cmd = [str(kf), "--threads", str(args.threads), "perplexity", "--model", args.model, "--file", args.file,
               "--ctx", str(args.ctx), "--max-windows", str(args.windows), "--kv-policy", policy,
               "--kv-budget", str(budget), "--seed", str(seed), "--json"]
        print(f"[{i + 1}/{len(jobs)}] {policy} budget {budget} seed {seed}", file=sys.stderr, flush=True)
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        row = {"text": text, "ctx": args.ctx, "policy": policy, "budget": budget, "seed": seed,
               "ppl": r["ppl"], "mean_nll": r["mean_nll"], "tokens_scored": r["tokens_scored"],
               "kv_cache": r["kv_cache"]}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(path):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["text"], r["ctx"]), {}).setdefault(r["policy"], {}).setdefault(r["budget"], []).append(r["ppl"])
    for (text, ctx), pols in by.items():
        budgets = sorted({b for p in pols.values() for b in p})
        print(f"\n**{text}**, window {ctx} tokens, streaming perplexity (lower is better; "
              f"keyformer and random: mean of seeds, min-max in brackets)\n")
        print("| policy | " + " | ".join(f"{b}" for b in budgets) + " |")
        print("|---|" + "---:|" * len(budgets))
        order = [p for p in POLICIES.split(",") if p in pols]
        for p in order:
            cells = []
            for b in budgets:
                v = pols[p].get(b)
                if not v:
                    cells.append("")
                elif len(v) == 1:
                    cells.append(f"{v[0]:.2f}")
                else:
                    cells.append(f"{sum(v) / len(v):.2f} [{min(v):.2f}-{max(v):.2f}]")
            print(f"| {p} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bin", default=str(ROOT / "target/release/keyformer"), help="the keyformer binary")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        table(args.out)
        return
    if not args.file:
        ap.error("--file is required")
    run(args)
    table(args.out)


if __name__ == "__main__":
    main()
