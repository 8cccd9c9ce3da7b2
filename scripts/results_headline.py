#!/usr/bin/env python3
"""Headline tables from the evaluation's summaries (docs/results/*/summary.json).

  python3 scripts/results_headline.py docs/results [--budgets 30%,50%]

Prints Markdown: every policy at the given budgets on each task's main metric, the full
cache's own score where the task has one, and for each budget whether keyformer beats each
baseline on every task.
"""
import argparse
import json
import pathlib

# task -> (metric, higher is better, label)
MAIN = {
    "fidelity": ("mean_kl", False, "fidelity: mean KL (lower is better)"),
    "generation": ("rougeL", True, "generation: ROUGE-L vs full cache's text"),
    "summary": ("rougeL", True, "summary: ROUGE-L vs reference"),
    "needle": ("correct", True, "needle: passkey accuracy"),
    "ppl": ("ppl", False, "ppl: perplexity (lower is better)"),
}
BASELINES = ["window", "sink", "h2o", "tova", "snapkv", "knorm"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--budgets", default="30%,50%")
    args = ap.parse_args()
    budgets = args.budgets.split(",")
    # (task, policy, budget) -> means; parts other than the ablation only.
    cell = {}
    for f in sorted(pathlib.Path(args.folder).glob("*/summary.json")):
        if f.parent.name == "ablation":
            continue
        for row in json.loads(f.read_text()):
            cell[(row["task"], row["policy"], row["budget"])] = row["mean"]
    tasks = [t for t in MAIN if any(k[0] == t for k in cell)]
    policies = sorted({k[1] for k in cell})
    head = "| policy | " + " | ".join(f"{t} @{b}" for t in tasks for b in budgets) + " |"
    print(head)
    print("|---|" + "---:|" * (len(tasks) * len(budgets)))
    for p in policies:
        vals = []
        for t in tasks:
            m = MAIN[t][0]
            for b in budgets:
                v = cell.get((t, p, b), {}).get(m)
                vals.append("" if v is None else f"{v:.4f}" if v < 10 else f"{v:.2f}")
        print(f"| {p} | " + " | ".join(vals) + " |")
    fulls = []
    for t in tasks:
        m = MAIN[t][0]
        for b in budgets:
            v = next((c.get("full_" + m) for (tt, _, bb), c in cell.items() if tt == t and bb == b and "full_" + m in c), None)
            fulls.append("" if v is None else f"{v:.4f}")
    if any(fulls):
        print("| *full cache* | " + " | ".join(fulls) + " |")
    print()
    print("Metrics: " + "; ".join(MAIN[t][2] for t in tasks) + ".")
    print()
    print("Does keyformer beat the baseline? (one mark per task, in the order above: + better, - worse, = equal)")
    print()
    all_budgets = sorted({k[2] for k in cell if k[2].endswith("%")}, key=lambda b: float(b[:-1]))
    print("| baseline | " + " | ".join(all_budgets) + " |")
    print("|---|" + "---|" * len(all_budgets))
    for base in BASELINES:
        if not any(k[1] == base for k in cell):
            continue
        marks = []
        for b in all_budgets:
            s = ""
            for t in tasks:
                m, higher, _ = MAIN[t]
                k, o = cell.get((t, "keyformer", b), {}).get(m), cell.get((t, base, b), {}).get(m)
                if k is None or o is None:
                    s += "?"
                elif abs(k - o) <= 1e-12:
                    s += "="
                else:
                    s += "+" if (k > o) == higher else "-"
            marks.append(s)
        print(f"| {base} | " + " | ".join(marks) + " |")


if __name__ == "__main__":
    main()
