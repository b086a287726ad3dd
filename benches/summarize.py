#!/usr/bin/env python3
"""Medians, ratios and a chart from benches/compare.sh's OUT/results.jsonl.

  summarize.py OUT   writes OUT/summary.md and OUT/compare.svg, prints the summary
"""
import json
import os
import statistics
import sys

ORDER = ["floor", "uring", "epoll", "libtorrent", "uring-utp", "libtorrent-utp"]
LABEL = {
    "floor": "kernel floor (C, epoll)",
    "uring": "magnetar io_uring",
    "epoll": "magnetar epoll",
    "libtorrent": "libtorrent 2.0 (python)",
    "uring-utp": "magnetar io_uring, uTP",
    "libtorrent-utp": "libtorrent 2.0 (python), uTP",
}
# Ratio rows: (numerator, denominator); each is printed when both servers ran.
RATIOS = [
    ("uring", "floor"), ("uring", "libtorrent"), ("uring", "epoll"),
    ("uring-utp", "libtorrent-utp"), ("uring-utp", "uring"),
]


def load(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl")) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["server"], r["mode"]), []).append(r)
    return rows, by


def med(rs, key):
    return statistics.median(r[key] for r in rs) if rs else float("nan")


def ratio(a, b):
    return a / b if b else float("nan")


def summary(out):
    rows, by = load(out)
    servers = [s for s in ORDER if any(k[0] == s for k in by)]
    lines = []
    runs = max((r["run"] for r in rows), default=0)
    lines.append("| server | churn fetches/s | p50 µs | p99 µs | CPU | fetches per CPU-s "
                 "| keepalive blocks/s | p50 µs | p99 µs | CPU | RSS MB | errors |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    med_of = {}
    for s in servers:
        c, k = by.get((s, "churn"), []), by.get((s, "keepalive"), [])
        m = {
            "fps": med(c, "fetches_per_sec"), "c50": med(c, "p50_us"), "c99": med(c, "p99_us"),
            "ccpu": med(c, "server_cpu"), "bps": med(k, "blocks_per_sec"),
            "k50": med(k, "p50_us"), "k99": med(k, "p99_us"), "kcpu": med(k, "server_cpu"),
            "rss": max([r["server_hwm_kb"] for r in c + k] or [0]) / 1024,
            "err": sum(r["errors"] for r in c + k),
        }
        m["fpc"] = ratio(m["fps"], m["ccpu"])
        m["bpc"] = ratio(m["bps"], m["kcpu"])
        med_of[s] = m
        lines.append("| %s | %.0f | %.0f | %.0f | %.2f | %.0f | %.0f | %.0f | %.0f | %.2f | %.1f | %d |" % (
            LABEL[s], m["fps"], m["c50"], m["c99"], m["ccpu"], m["fpc"], m["bps"], m["k50"],
            m["k99"], m["kcpu"], m["rss"], m["err"]))
    lines.append("")
    lines.append("Medians of %d run(s) each. CPU = server CPU time / wall time (1.00 = its one "
                 "core busy); RSS = peak (VmHWM) over the runs." % runs)
    lines.append("")
    pairs = [(a, b) for a, b in RATIOS if a in med_of and b in med_of]
    if pairs:
        lines.append("| ratio | churn fetches/s | fetches per CPU-s | keepalive blocks/s "
                     "| blocks per CPU-s | churn p99 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for a, b in pairs:
            u, o = med_of[a], med_of[b]
            lines.append("| %s / %s | %.2f | %.2f | %.2f | %.2f | %.2f |" % (
                LABEL[a], LABEL[b], ratio(u["fps"], o["fps"]), ratio(u["fpc"], o["fpc"]),
                ratio(u["bps"], o["bps"]), ratio(u["bpc"], o["bpc"]), ratio(u["c99"], o["c99"])))
        # Per-run ratios, so the spread is visible next to the medians.
        for a, b in pairs:
            for mode, key, what in [("churn", "fetches_per_sec", "Churn fetches/s"),
                                    ("keepalive", "blocks_per_sec", "Keepalive blocks/s")]:
                if mode == "keepalive" and not a.endswith("-utp"):
                    continue  # the TCP rows keep their historical per-run line (churn only)
                per_run = []
                for run in range(1, runs + 1):
                    x = [r for r in by.get((a, mode), []) if r["run"] == run]
                    y = [r for r in by.get((b, mode), []) if r["run"] == run]
                    if x and y:
                        per_run.append(ratio(x[0][key], y[0][key]))
                if per_run:
                    lines.append("")
                    lines.append("%s ratio %s / %s per run: %s (median %.2f)" % (
                        what, a, b, ", ".join("%.2f" % v for v in per_run),
                        statistics.median(per_run)))
    drops = [(s, sum(r.get("server_udp_drops", 0) for r in rows if r["server"] == s))
             for s in servers if s.endswith("-utp")
             and any("server_udp_drops" in r for r in rows if r["server"] == s)]
    if drops:
        lines.append("")
        lines.append("Datagrams dropped on the server's UDP socket (receive buffer full), all runs: "
                     + ", ".join("%s %d" % d for d in drops) + ".")
    flagged = [r for r in rows if r.get("busy_flagged")]
    if flagged:
        lines.append("")
        lines.append("%d run(s) were measured on a busy machine (see results.jsonl busy_flagged)."
                     % len(flagged))
    return servers, med_of, "\n".join(lines) + "\n"


def svg(servers, med_of):
    w, h, left, top, bottom = 820, 360, 60, 50, 70
    panel_w = (w - left - 20) / 2
    colors = {"floor": "#7f7f7f", "uring": "#1f77b4", "epoll": "#aec7e8", "libtorrent": "#d62728",
              "uring-utp": "#2ca02c", "libtorrent-utp": "#ff9896"}
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (w, h),
           '<rect width="100%" height="100%" fill="white"/>']
    for p, (key, title) in enumerate([("fps", "churn: full fetches/s"),
                                      ("bps", "keepalive: blocks/s")]):
        x0 = left + p * panel_w
        vals = [med_of[s][key] for s in servers]
        vmax = max([v for v in vals if v == v] or [1]) or 1
        out.append('<text x="%.0f" y="30" text-anchor="middle" font-size="14">%s</text>'
                   % (x0 + panel_w / 2, title))
        bw = (panel_w - 40) / max(len(servers), 1)
        for i, s in enumerate(servers):
            v = med_of[s][key]
            bh = 0 if v != v else v / vmax * (h - top - bottom)
            x = x0 + 20 + i * bw
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>'
                       % (x + 4, h - bottom - bh, bw - 8, bh, colors[s]))
            out.append('<text x="%.1f" y="%.1f" text-anchor="middle">%.0f</text>'
                       % (x + bw / 2, h - bottom - bh - 5, v))
            out.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="11">%s</text>'
                       % (x + bw / 2, h - bottom + 16, s))
        out.append('<line x1="%.0f" y1="%d" x2="%.0f" y2="%d" stroke="black"/>'
                   % (x0 + 20, h - bottom, x0 + panel_w - 20, h - bottom))
    out.append('<text x="%d" y="%d" text-anchor="middle" fill="#555">each server pinned to one '
               'core, magnetar-loadgen on the other; medians</text>' % (w / 2, h - 20))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    out = sys.argv[1]
    servers, med_of, text = summary(out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "compare.svg"), "w") as f:
        f.write(svg(servers, med_of))
    print(text)


if __name__ == "__main__":
    main()
