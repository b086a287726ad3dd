#!/usr/bin/env python3
"""Medians of run.sh's raw output: per benchmark, base and new criterion point estimates
(the middle of criterion's [low est high]), their medians over rounds, and new/base."""
import re, statistics, sys
from collections import defaultdict

vals = defaultdict(lambda: defaultdict(list))
side = name = None
unit = {"ps": 1e-3, "ns": 1, "µs": 1e3, "us": 1e3, "ms": 1e6}
for line in open(sys.argv[1]):
    if line.startswith("== "):
        side = line.split()[1]
        continue
    m = re.match(r"(store/\S+)", line)
    if m:
        name = m.group(1)
    t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if t and name:
        vals[name][side].append(float(t.group(1)) * unit[t.group(2)])
for name, by in vals.items():
    if not by["base"] or not by["new"]:
        # A benchmark only one side has (added after the base commit).
        for side, v in by.items():
            if v:
                print(f"{name}: {side} only, median {statistics.median(v):.1f} ns {v}")
        continue
    b, n = statistics.median(by["base"]), statistics.median(by["new"])
    print(f"{name}: base median {b:.1f} ns {by['base']}, new median {n:.1f} ns {by['new']}, new/base {n / b:.2f}")
