#!/usr/bin/env python3
"""One line per run dir of caps.sh / sched.sh: hot p99 alone / under the cold load, ratio,
cold rate, errors, page-in mean wait, and CPU 0/1 busy share in the cold phase (sched.txt).
Usage: table.py [RESULTS_DIR] (default: this script's directory)."""
import json, re, sys, glob, os
here = os.path.dirname(os.path.abspath(__file__))
top = sys.argv[1] if len(sys.argv) > 1 else here
for d in sorted(glob.glob(os.path.join(top, "*-*"))):
    try:
        lines = [l for l in open(d + "/summary.txt") if l.startswith("{")]
        h, hc, c = [json.loads(l) for l in lines[:3]]
    except Exception as e:
        print(f"{d}: incomplete ({e})"); continue
    s = open(d + "/summary.txt").read()
    m = lambda k: int(re.search(k + r" (\d+)", s).group(1))
    wait = m("magnetar_page_in_wait_us_total") / max(1, m("magnetar_page_ins_total")) / 1000
    busy = re.findall(r"cpu(\d): busy (\d+)%", os.popen(f"python3 {here}/../sched_summary.py {d}/sched.txt").read())
    print(f"{os.path.basename(d):16} hot p99 {h['p99_us']/1000:5.2f} -> {hc['p99_us']/1000:5.2f} ms = {hc['p99_us']/h['p99_us']:.2f}x"
          f"  hot p50 {h['p50_us']}/{hc['p50_us']} us  cold {c['fetches_per_sec']:6.0f}/s  errors {h['errors']+hc['errors']+c['errors']}"
          f"  page-in wait {wait:.2f} ms  busy " + " ".join(f"cpu{a} {b}%" for a, b in busy))
