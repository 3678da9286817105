"""Summarise a `py-spy record --format raw` file: inclusive and self samples per function.

    python -m bench.pyspy_summary PROFILE.txt [--match compressor] [--top 30]

Each line of the raw format is `frame;frame;...;leaf COUNT` (with --subprocesses the first
frame names the process). Inclusive counts a function once per stack it appears in.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", default="", help="only stacks containing this text")
    a = p.parse_args()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    procs: Counter[str] = Counter()
    total = 0
    with open(a.path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        count = int(n)
        if a.match and a.match not in stack:
            continue
        frames = stack.split(";")
        total += count
        procs[frames[0][:80]] += count
        seen = set()
        for f in frames:
            name = re.sub(r":\d+\)", ")", f)  # drop line numbers
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
        leaf[re.sub(r":\d+\)", ")", frames[-1])] += count
    print(f"total samples {total}")
    print("\n== by process")
    for k, v in procs.most_common(10):
        print(f"{v:7d} {100 * v / total:5.1f}%  {k}")
    print("\n== inclusive")
    for k, v in inclusive.most_common(a.top):
        print(f"{v:7d} {100 * v / total:5.1f}%  {k[:150]}")
    print("\n== self (leaf)")
    for k, v in leaf.most_common(a.top):
        print(f"{v:7d} {100 * v / total:5.1f}%  {k[:150]}")


if __name__ == "__main__":
    main()
