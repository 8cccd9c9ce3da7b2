#!/usr/bin/env python3
"""Where one decode step's time goes, per kernel, from an Nsight Compute CSV.

Run on the GPU machine (Nsight Compute times each kernel alone, caches flushed, so small
kernels read slower than inside a replayed graph; compare kernels with each other, not the
sum with the bench's ms/step):

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \\
        .gpu/keyformer bench --device cuda --random-weights llama2-7b -p 4096 -n 4 -b 1 \\
        --kv-policy full > step.csv
    python3 scripts/ncu-step.py step.csv

A step runs from one embedding lookup to the next; the last complete one is tabulated.
With --all, every launch but the random weights' fills is tabulated: for the prefill, time
`bench ... -p 4096 -n 2` with KEYFORMER_PREFILL_CHUNK=4096 (the prompt in one pass; the two
decode steps add little); scripts/hf_prefill_profile.py is transformers' side.
"""
import collections
import csv
import sys


def main(path, whole_run=False):
    lines = [line for line in open(path) if line.startswith('"')]
    rows = list(csv.reader(lines))
    header, rows = rows[0], rows[1:]
    name, grid, value = (header.index(k) for k in ("Kernel Name", "Grid Size", "Metric Value"))
    launches = [(r[name], r[grid], float(r[value].replace(",", ""))) for r in rows]
    if whole_run:
        step = [launch for launch in launches if not launch[0].startswith("fill_random")]
        what = "the run"
    else:
        starts = [i for i, launch in enumerate(launches) if launch[0].startswith("embed")]
        if len(starts) < 2:
            sys.exit(f"{path}: fewer than two embedding lookups, so no complete decode step")
        step = launches[starts[-2]:starts[-1]]
        what = "one decode step"
    total = sum(ns for _, _, ns in step)
    by_kernel = collections.defaultdict(lambda: [0, 0.0])
    for kernel, g, ns in step:
        by_kernel[(kernel, g)][0] += 1
        by_kernel[(kernel, g)][1] += ns
    print(f"{what}: {len(step)} launches, {total / 1e3:.0f} us (kernels alone, caches flushed)\n")
    print("| kernel | grid | launches | us | us each | share |")
    print("|---|---|---:|---:|---:|---:|")
    for (kernel, g), (n, ns) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kernel} | {g} | {n} | {ns / 1e3:.0f} | {ns / n / 1e3:.1f} | {100 * ns / total:.0f}% |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--all"]
    if len(args) != 1:
        sys.exit(__doc__)
    main(args[0], whole_run="--all" in sys.argv[1:])
