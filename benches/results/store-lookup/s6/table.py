"""Medians and per-round same-run ratios of run.sh output: python3 table.py raw.txt"""
import re
import statistics as st
import sys

cur, d = None, {}
for line in open(sys.argv[1]):
    m = re.match(r"== round (\d+) fence=(\d) (\S+)", line)
    if m:
        cur = (m.group(2), m.group(1))
        continue
    m = re.match(r"(.+?)\s+median\s+([\d.]+)", line)
    if m and cur:
        d.setdefault((cur[0], m.group(1).strip()), {})[cur[1]] = float(m.group(2))
for f in "10":
    print("fenced (STORE_BENCH_FENCE=1)" if f == "1" else "back to back (no fence)")
    for k, v in d.items():
        if k[0] == f:
            print("  %-24s" % k[1], " ".join("%6.1f" % v[r] for r in sorted(v)), " median %.1f" % st.median(v.values()))
    for a, b in [("lookup_resident + copy", "base lookup + copy"), ("lookup + copy", "base lookup + copy"),
                 ("lookup", "base lookup"), ("lookup_resident", "lookup"), ("lookup_resident + copy", "lookup + copy"),
                 ("lookup + now()", "lookup")]:
        A, B = d.get((f, a)), d.get((f, b))
        if A and B:
            rs = [A[r] / B[r] for r in sorted(A) if r in B]
            print("  %s / %s: " % (a, b) + " ".join("%.2f" % x for x in rs) + "  median %.2f" % st.median(rs))
