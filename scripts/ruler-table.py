#!/usr/bin/env python3
"""The RULER tables of docs/results.md from results.jsonl files (`keyformer eval --tasks ruler`
and scripts/kvpress-ruler.py write the same row shape).

    scripts/ruler-table.py OURS/results.jsonl KVPRESS.jsonl [--task ruler] [--by-task]

For each policy and budget: the mean score over the cases (RULER's average: every task has the
same number of cases), a 95% interval over the cases (Student's t on the per-case scores), and
the share of the full cache's mean. `--by-task` adds a table per RULER task.
"""
import argparse
import json
import math
import statistics
from collections import defaultdict

# Student's t, 97.5% quantile, by degrees of freedom (then 1.96).
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def t975(df):
    keys = sorted(k for k in T975 if k <= df)
    return T975[keys[-1]] if keys and df <= 120 else 1.96


def interval(xs):
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def budget_key(b):
    return (b.endswith("%"), float(b.rstrip("%")) if b.rstrip("%").replace(".", "").isdigit() else 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--task", default="ruler")
    ap.add_argument("--by-task", action="store_true")
    a = ap.parse_args()
    rows = []
    for f in a.files:
        for line in open(f):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("task") == a.task:
                rows.append(r)
    if not rows:
        raise SystemExit(f"no {a.task} rows in {a.files}")
    # Per-case scores, averaged over seeds first.
    per = defaultdict(lambda: defaultdict(list))  # (policy, budget) -> doc -> scores
    full = {}
    for r in rows:
        per[(r["policy"], r["budget"])][r["doc"]].append(r["metrics"]["score"])
        full[r["doc"]] = r["metrics"]["full_score"]
    budgets = sorted({b for _, b in per}, key=budget_key)
    policies = sorted({p for p, _ in per}, key=lambda p: (p.startswith("kvpress:"), p))
    docs = sorted(full)
    full_mean, full_ci = interval([full[d] for d in docs])
    tasks = sorted({d.split("@")[0] for d in docs})
    print(f"{len(docs)} cases ({len(tasks)} tasks: {', '.join(tasks)}); full cache {100 * full_mean:.1f} "
          f"± {100 * full_ci:.1f}\n")
    print("| policy | " + " | ".join(f"{b} kept" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for p in policies:
        cells = []
        for b in budgets:
            d = per.get((p, b))
            if not d or set(d) != set(docs):
                cells.append("" if not d else f"({len(d)} of {len(docs)} cases)")
                continue
            m, ci = interval([statistics.fmean(d[x]) for x in docs])
            share = f" ({100 * m / full_mean:.0f}%)" if full_mean > 0 else ""
            cells.append(f"{100 * m:.1f} ± {100 * ci:.1f}{share}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    print(f"| *full cache* | " + " | ".join(f"{100 * full_mean:.1f}" for _ in budgets) + " |")
    if a.by_task:
        for b in budgets:
            print(f"\n{b} kept, by task (mean score over the task's cases):\n")
            print("| policy | " + " | ".join(tasks) + " |")
            print("|---|" + "---:|" * len(tasks))
            for p in policies + ["*full cache*"]:
                cells = []
                for t in tasks:
                    ds = [x for x in docs if x.split("@")[0] == t]
                    if p == "*full cache*":
                        cells.append(f"{100 * statistics.fmean(full[x] for x in ds):.0f}")
                        continue
                    d = per.get((p, b), {})
                    vals = [statistics.fmean(d[x]) for x in ds if x in d]
                    cells.append(f"{100 * statistics.fmean(vals):.0f}" if len(vals) == len(ds) else "")
                print(f"| {p} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
