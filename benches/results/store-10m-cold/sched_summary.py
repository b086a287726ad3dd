#!/usr/bin/env python3
"""Where the cold phase's CPU time went: reads a run's sched.txt (cgroup.sh) and prints, per
server thread group, the CPU and run-queue wait during the cold phase (deltas of
/proc/PID/task/*/schedstat), each load generator's totals (the hot one's run-queue wait is
time the measuring client itself waited for CPU 1), and each CPU's busy share.
  sched_summary.py OUT/sched.txt [...]"""
import re
import sys


def parse(path):
    parts, cur = {}, None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("=="):
            cur = line[3:]
            parts[cur] = []
        elif cur is not None and line:
            parts[cur].append(line.split())
    return parts


def threads(rows):
    out = {}
    for r in rows:
        if len(r) < 4 or r[0].startswith("cpu"):
            continue
        name = re.sub(r"\d+$", "#", r[0])
        cpu, wait, n, minflt, majflt = (int(x) for x in (r[1:6] + ["0", "0"])[:5])
        t = out.setdefault(name, [0, 0, 0, 0, 0, 0])
        t[0] += cpu
        t[1] += wait
        t[2] += n
        t[3] += 1
        t[4] += minflt
        t[5] += majflt
    return out


def cpus(rows):
    out = {}
    for r in rows:
        if r[0] in ("cpu0", "cpu1"):
            v = [int(x) for x in r[1:]]
            idle = v[3] + v[4]
            out[r[0]] = (sum(v[:8]), idle)
    return out


for path in sys.argv[1:]:
    p = parse(path)
    before = next(k for k in p if k.startswith("before"))
    wall = None
    print(f"# {path}")
    b, a = threads(p[before]), threads(p["after"])
    cb, ca = cpus(p[before]), cpus(p["after"])
    for c in ca:
        tot = ca[c][0] - cb[c][0]
        idle = ca[c][1] - cb[c][1]
        print(f"{c}: busy {100 * (tot - idle) / tot:.0f}% over {tot / 100:.1f} s")
        wall = tot / 100
    print("server threads (cold phase):   cpu_s  runq_wait_s  slices  threads  minflt  majflt")
    for name in sorted(a, key=lambda k: -(a[k][0] - b.get(k, [0] * 6)[0])):
        d = [a[name][i] - b.get(name, [0] * 6)[i] for i in range(6)]
        print(f"  {name:28s} {d[0] / 1e9:6.2f} {d[1] / 1e9:10.2f} {d[2]:8d} {a[name][3]:6d} {d[4]:7d} {d[5]:7d}")
    for k in p:
        if k.startswith("loadgen"):
            t = threads(p[k])
            cpu = sum(v[0] for v in t.values())
            wait = sum(v[1] for v in t.values())
            print(f"{k}: cpu {cpu / 1e9:.2f} s, run-queue wait {wait / 1e9:.2f} s (whole life)")
