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
        if by["new"] and by["new2"]:
            r = statistics.median(by["new2"]) / statistics.median(by["new"])
            print(f"{name}: new2/new {r:.2f}")
        continue
    b, n = statistics.median(by["base"]), statistics.median(by["new"])
    print(f"{name}: base median {b:.1f} ns {by['base']}, new median {n:.1f} ns {by['new']}, new/base {n / b:.2f}")
    if by["new2"]:
        n2 = statistics.median(by["new2"])
        print(f"{name}: new2 median {n2:.1f} ns {by['new2']}, new2/base {n2 / b:.2f}, new2/new {n2 / n:.2f}")
# End to end, today's serving path against the base's: the new worker's handshake uses
# `lookup_resident`, the base's used `lookup`; both then send the record's bytes.
for new_name, base_name in [
    ("store/lookup_resident_hit_copy_100k", "store/lookup_hit_copy_100k"),
    ("store/lookup_resident_hit_100k", "store/lookup_hit_100k"),
]:
    for side in ["new", "new2"]:
        n, b = vals[new_name][side], vals[base_name]["base"]
        if n and b:
            nm, bm = statistics.median(n), statistics.median(b)
            print(f"{new_name} ({side}) / {base_name} (base): {nm:.1f} / {bm:.1f} ns = {nm / bm:.2f}")
