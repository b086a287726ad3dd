#!/usr/bin/env python3
"""Medians per concurrency, the io_uring goals and a chart from benches/compare.sh's
OUT/results.jsonl.

  summarize.py OUT   writes OUT/summary.md and OUT/compare.svg, prints the summary

Every value is the median over runs of one (server, mode, connections) cell; a cell with no
run (a server that did not start, a loadgen without a result, a concurrency not swept)
shows n/a, and a goal that needs it says n/a instead of PASS.
"""
import json
import math
import os
import statistics
import sys

ORDER = ["floor", "uring", "epoll", "libtorrent", "floor-utp", "floor-cc-utp", "uring-utp", "gso-utp", "nogso-utp", "base-utp",
         "epoll-utp", "libtorrent-utp"]
LABEL = {
    "floor": "kernel floor (C, epoll)",
    "uring": "magnetar io_uring",
    "epoll": "magnetar epoll",
    "libtorrent": "libtorrent 2.0 (python)",
    "uring-utp": "magnetar io_uring, uTP",
    "epoll-utp": "magnetar epoll, uTP",
    "libtorrent-utp": "libtorrent 2.0 (python), uTP",
    "floor-utp": "UDP floor (C, recvmmsg + GSO sendmmsg), uTP",
    "floor-cc-utp": "UDP floor with a congestion window (FLOOR_CWND=10), uTP",
    "gso-utp": "magnetar io_uring, uTP, --utp-gso on",
    "nogso-utp": "magnetar io_uring, uTP, --utp-gso off",
    "base-utp": "magnetar io_uring, uTP, BASE_M (the build before)",
}
COLORS = {"floor": "#7f7f7f", "uring": "#1f77b4", "epoll": "#ff7f0e", "libtorrent": "#d62728",
          "uring-utp": "#1f77b4", "epoll-utp": "#ff7f0e", "libtorrent-utp": "#d62728",
          "floor-utp": "#7f7f7f", "floor-cc-utp": "#c7c7c7", "gso-utp": "#17becf", "nogso-utp": "#bcbd22", "base-utp": "#9467bd"}
TRANSPORTS = [("TCP", "tcp"), ("uTP", "utp")]
# Ratio rows (numerator, denominator) of churn fetches/s and fetches per CPU-s per
# concurrency; each is printed when both servers ran.
RATIOS = [
    ("uring", "floor"), ("uring", "epoll"), ("uring", "libtorrent"),
    ("uring-utp", "epoll-utp"), ("uring-utp", "libtorrent-utp"), ("uring-utp", "uring"),
    ("uring-utp", "floor-utp"), ("uring-utp", "floor-cc-utp"), ("floor-cc-utp", "floor-utp"), ("uring-utp", "base-utp"), ("uring-utp", "gso-utp"),
]


def transport_of(server):
    return "utp" if server.endswith("-utp") else "tcp"


def label(server):
    return LABEL.get(server, server)


def load(out):
    path = os.path.join(out, "results.jsonl")
    rows = []
    if os.path.exists(path):
        for n, line in enumerate(open(path), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                print("results.jsonl line %d: not JSON, skipped" % n, file=sys.stderr)
                continue
            if "server" in r and "mode" in r:
                rows.append(r)
    by = {}
    for r in rows:
        by.setdefault((r["server"], r["mode"], r.get("connections", 0)), []).append(r)
    return rows, by


def requested(out):
    """The servers and concurrencies compare.sh was asked for (machine.txt), if it says."""
    servers, sweep = [], []
    try:
        for line in open(os.path.join(out, "machine.txt")):
            if line.startswith("servers:"):
                servers = line.split(":", 1)[1].split()
            elif line.startswith("sweep:"):
                sweep = [int(c) for c in line.split(":", 1)[1].split() if c.isdigit()]
    except OSError:
        pass
    return servers, sweep


def med(rs, key):
    vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def f0(v):
    return "n/a" if v is None else "%.0f" % v


def f2(v):
    return "n/a" if v is None else "%.2f" % v


class Cells:
    """Medians per (server, mode, connections)."""

    def __init__(self, by):
        self.by = by

    def runs(self, s, mode, c):
        return self.by.get((s, mode, c), [])

    def get(self, s, mode, c, key):
        rs = self.runs(s, mode, c)
        if key in ("p50_us", "p99_us"):
            # A run that completed no fetch has no latency (its histogram is empty: 0).
            rs = [r for r in rs if r.get("fetches", 1) > 0]
        return med(rs, key)

    def per_cpu(self, s, c):
        return ratio(self.get(s, "churn", c, "fetches_per_sec"),
                     self.get(s, "churn", c, "server_cpu"))


def goal_every(cells, concs, a, b, key, limit, at_least):
    """Goal 'a's key vs b's at every concurrency': (verdict, detail)."""
    parts, fail, missing = [], False, False
    for c in concs:
        q = ratio(cells.get(a, "churn", c, key), cells.get(b, "churn", c, key))
        if q is None:
            missing = True
            parts.append("c=%d n/a" % c)
            continue
        ok = q >= limit if at_least else q <= limit
        fail |= not ok
        parts.append("c=%d %.2f%s" % (c, q, "" if ok else " ✗"))
    if not concs:
        return "n/a", "no concurrency measured"
    verdict = "FAIL" if fail else ("n/a" if missing else "PASS")
    return verdict, ", ".join(parts)


def goal_at(cells, c, a, b, key, limit):
    if c is None:
        return "n/a", "no such concurrency measured"
    va, vb = cells.get(a, "churn", c, key), cells.get(b, "churn", c, key)
    q = ratio(va, vb)
    if q is None:
        return "n/a", "c=%d: %s %s, %s %s" % (c, a, f0(va), b, f0(vb))
    return ("PASS" if q <= limit else "FAIL"), "c=%d: %s %s µs, %s %s µs, ratio %.2f" % (
        c, a, f0(va), b, f0(vb), q)


def goals(cells, concs):
    """The io_uring issue's goals, each (verdict, statement, detail)."""
    out = []
    for tname, ur, ep in [("TCP", "uring", "epoll"), ("uTP", "uring-utp", "epoll-utp")]:
        v, d = goal_every(cells, concs, ur, ep, "fetches_per_sec", 0.95, True)
        out.append((v, "%s, every concurrency: %s churn fetches/s ≥ 0.95 × %s's" % (tname, ur, ep), d))
        v, d = goal_every(cells, concs, ur, ep, "p50_us", 1.1, False)
        out.append((v, "%s, every concurrency: %s churn p50 ≤ 1.1 × %s's" % (tname, ur, ep), d))
    one = 1 if 1 in concs else None
    v, d = goal_at(cells, one, "uring", "floor", "p50_us", 1.3)
    out.append((v, "TCP, 1 connection: uring churn p50 ≤ 1.3 × the floor's", d))
    v, d = goal_at(cells, one, "uring-utp", "libtorrent-utp", "p50_us", 1.0)
    out.append((v, "uTP, 1 connection: uring-utp churn p50 ≤ libtorrent-utp's", d))
    # The uTP cost issue (19): fetches per server CPU-second at 64 connections.
    c64 = 64 if 64 in concs else None
    for b, limit in [("uring", 0.5), ("libtorrent-utp", 3.0), ("floor-utp", 0.8)]:
        v, d = goal_per_cpu(cells, c64, "uring-utp", b, limit)
        out.append((v, "uTP, 64 connections: uring-utp fetches per CPU-s ≥ %.1f × %s's" % (limit, b), d))
    return out


def goal_per_cpu(cells, c, a, b, limit):
    if c is None:
        return "n/a", "no such concurrency measured"
    va, vb = cells.per_cpu(a, c), cells.per_cpu(b, c)
    q = ratio(va, vb)
    if q is None:
        return "n/a", "c=%d: %s %s, %s %s" % (c, a, f0(va), b, f0(vb))
    return ("PASS" if q >= limit else "FAIL"), "c=%d: %s %s, %s %s per CPU-s, ratio %.2f" % (
        c, a, f0(va), b, f0(vb), q)


def summary(out):
    rows, by = load(out)
    cells = Cells(by)
    want_servers, want_concs = requested(out)
    present = {s for s, _, _ in by}
    servers = [s for s in ORDER if s in present or s in want_servers]
    servers += sorted(s for s in present | set(want_servers) if s not in servers)
    concs = sorted({c for _, _, c in by} | set(want_concs))
    runs = max((r.get("run", 0) for r in rows), default=0)

    lines = []
    if not rows:
        lines.append("No results in %s/results.jsonl: every cell is n/a." % out)
        lines.append("")
    for tname, t in TRANSPORTS:
        ts = [s for s in servers if transport_of(s) == t]
        if not ts:
            continue
        lines.append("### %s: churn (full fetches/s; fetch latency p50, p99 in µs)" % tname)
        lines.append("")
        lines.append("| server | " + " | ".join(
            "c=%d fetches/s | p50 | p99" % c for c in concs) + " |")
        lines.append("|---|" + "---:|---:|---:|" * len(concs))
        for s in ts:
            lines.append("| %s | " % label(s) + " | ".join(
                "%s | %s | %s" % (f0(cells.get(s, "churn", c, "fetches_per_sec")),
                                  f0(cells.get(s, "churn", c, "p50_us")),
                                  f0(cells.get(s, "churn", c, "p99_us")))
                for c in concs) + " |")
        lines.append("")
        lines.append("### %s: churn fetches per server CPU-second (server CPU in brackets); "
                     "keepalive blocks/s and p50 µs; peak RSS and errors over all runs" % tname)
        lines.append("")
        lines.append("| server | " + " | ".join("c=%d fetches/CPU-s" % c for c in concs)
                     + " | " + " | ".join("c=%d blocks/s | p50" % c for c in concs)
                     + " | RSS MB | errors |")
        lines.append("|---|" + "---:|" * len(concs) + "---:|---:|" * len(concs) + "---:|---:|")
        for s in ts:
            mine = [r for r in rows if r["server"] == s]
            cpu_cells = []
            for c in concs:
                cpu = cells.get(s, "churn", c, "server_cpu")
                pc = cells.per_cpu(s, c)
                cpu_cells.append("n/a" if pc is None else "%s (%s)" % (f0(pc), f2(cpu)))
            ka = ["%s | %s" % (f0(cells.get(s, "keepalive", c, "blocks_per_sec")),
                               f0(cells.get(s, "keepalive", c, "p50_us"))) for c in concs]
            hwm = [r.get("server_hwm_kb", 0) for r in mine]
            rss = "%.1f" % (max(hwm) / 1024) if hwm else "n/a"
            errs = "%d" % sum(r.get("errors", 0) for r in mine) if mine else "n/a"
            lines.append("| %s | " % label(s) + " | ".join(cpu_cells) + " | "
                         + " | ".join(ka) + " | %s | %s |" % (rss, errs))
        lines.append("")

    lines.append("Medians of %d run(s) per cell. c = concurrent connections (closed loop: c=1 is "
                 "one client fetching alone). CPU = server CPU time / wall time (1.00 = its one "
                 "core busy); RSS = peak (VmHWM)." % runs)
    lines.append("")

    lines.append("### Goals (io_uring issue), from the medians")
    lines.append("")
    for verdict, what, detail in goals(cells, concs):
        lines.append("- **%s** %s: %s" % (verdict, what, detail))
    lines.append("")

    pairs = [(a, b) for a, b in RATIOS if a in present and b in present]
    if pairs:
        lines.append("| ratio (churn) | " + " | ".join(
            "c=%d fetches/s | per CPU-s | p50" % c for c in concs) + " |")
        lines.append("|---|" + "---:|---:|---:|" * len(concs))
        for a, b in pairs:
            lines.append("| %s / %s | " % (a, b) + " | ".join(
                "%s | %s | %s" % (
                    f2(ratio(cells.get(a, "churn", c, "fetches_per_sec"),
                             cells.get(b, "churn", c, "fetches_per_sec"))),
                    f2(ratio(cells.per_cpu(a, c), cells.per_cpu(b, c))),
                    f2(ratio(cells.get(a, "churn", c, "p50_us"), cells.get(b, "churn", c, "p50_us"))))
                for c in concs) + " |")
        lines.append("")
        # Per-run ratios of the goal pairs, so the spread is visible next to the medians.
        for a, b in [p for p in pairs if p in (("uring", "epoll"), ("uring-utp", "epoll-utp"))]:
            for key, what in [("fetches_per_sec", "churn fetches/s"), ("p50_us", "churn p50")]:
                parts = []
                for c in concs:
                    per_run = []
                    for run in range(1, runs + 1):
                        x = [r for r in cells.runs(a, "churn", c) if r.get("run") == run]
                        y = [r for r in cells.runs(b, "churn", c) if r.get("run") == run]
                        if x and y:
                            q = ratio(x[0].get(key), y[0].get(key))
                            if q is not None:
                                per_run.append(q)
                    if per_run:
                        parts.append("c=%d %s" % (c, ", ".join("%.2f" % v for v in per_run)))
                if parts:
                    lines.append("- %s / %s %s per run: %s" % (a, b, what, "; ".join(parts)))
        lines.append("")

    drops = [(s, sum(r.get("server_udp_drops", 0) for r in rows if r["server"] == s))
             for s in servers if s.endswith("-utp")
             and any("server_udp_drops" in r for r in rows if r["server"] == s)]
    if drops:
        lines.append("Datagrams dropped on the server's UDP socket (receive buffer full), all runs: "
                     + ", ".join("%s %d" % d for d in drops) + ".")
        lines.append("")
    absent = [s for s in servers if not any(k[0] == s for k in by)]
    if absent:
        lines.append("No result at all (did not start, or every run failed): "
                     + ", ".join(absent) + ".")
        lines.append("")
    missing = ["%s %s c=%d" % (s, m, c) for s in servers if s not in absent for c in concs
               for m in ("churn", "keepalive") if not cells.runs(s, m, c)]
    if missing:
        lines.append("No result (n/a): " + ", ".join(missing) + ".")
        lines.append("")
    short = ["%s %s c=%d (%d of %d)" % (s, m, c, len(cells.runs(s, m, c)), runs)
             for s in servers for c in concs for m in ("churn", "keepalive")
             if 0 < len(cells.runs(s, m, c)) < runs]
    if short:
        lines.append("Cells with fewer runs than the others: " + ", ".join(short) + ".")
        lines.append("")
    flagged = [r for r in rows if r.get("busy_flagged")]
    if flagged:
        lines.append("%d run(s) were measured on a busy machine (see results.jsonl busy_flagged)."
                     % len(flagged))
        lines.append("")
    return servers, concs, cells, "\n".join(lines).rstrip("\n") + "\n"


def nice_ticks(vmax, n=4):
    if vmax <= 0:
        return [0, 1]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(vmax / step)) + 1)]


def log_ticks(lo, hi):
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo / 1.0001 <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    return ticks


def fmt_tick(v, unit=""):
    if v >= 1e6:
        return "%g M%s" % (v / 1e6, unit)
    if v >= 1e3:
        return "%g k%s" % (v / 1e3, unit)
    return "%g %s" % (v, unit) if unit else "%g" % v


def panel(out, x0, y0, pw, ph, title, series, concs, log_y, unit):
    """One chart: series = [(server, [(c, value or None)])], x = concurrency (log)."""
    out.append('<text x="%.0f" y="%.0f" text-anchor="middle" font-size="13">%s</text>'
               % (x0 + pw / 2, y0 - 10, title))
    vals = [v for _, pts in series for _, v in pts if v is not None and v > 0]
    out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#999"/>'
               % (x0, y0, pw, ph))
    if not vals or not concs:
        out.append('<text x="%.0f" y="%.0f" text-anchor="middle" fill="#555">n/a (no results)</text>'
                   % (x0 + pw / 2, y0 + ph / 2))
        return
    lx0, lx1 = math.log(min(concs)), math.log(max(concs))
    pad = 18

    def xs(c):
        if lx1 == lx0:
            return x0 + pw / 2
        return x0 + pad + (math.log(c) - lx0) / (lx1 - lx0) * (pw - 2 * pad)

    if log_y:
        lo, hi = min(vals), max(vals)
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        ticks = log_ticks(lo, hi)
        if len(ticks) > 8:
            ticks = [t for t in ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9]

        def ys(v):
            return y0 + ph - (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) * ph
    else:
        ticks = nice_ticks(max(vals))
        top = ticks[-1] or 1

        def ys(v):
            return y0 + ph - v / top * ph
    for t in ticks:
        y = ys(t)
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>'
                   % (x0, y, x0 + pw, y))
        out.append('<text x="%.1f" y="%.1f" text-anchor="end" font-size="10">%s</text>'
                   % (x0 - 4, y + 3, fmt_tick(t, unit)))
    for c in concs:
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="10">%d</text>'
                   % (xs(c), y0 + ph + 14, c))
    out.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="11" fill="#555">'
               'concurrent connections (log)</text>' % (x0 + pw / 2, y0 + ph + 30))
    for s, pts in series:
        color = COLORS.get(s, "#333")
        dash = ' stroke-dasharray="5,3"' if s.startswith("epoll") or s.startswith("libtorrent") else ""
        good = [(xs(c), ys(v)) for c, v in pts if v is not None and v > 0]
        # Lines only between measured neighbours: a gap (n/a) breaks the line.
        seg = []
        for c, v in pts + [(None, None)]:
            if v is not None and v > 0:
                seg.append((xs(c), ys(v)))
                continue
            if len(seg) > 1:
                out.append('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>'
                           % (color, dash, " ".join("%.1f,%.1f" % p for p in seg)))
            seg = []
        for x, y in good:
            out.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (x, y, color))


def svg(servers, concs, cells):
    pw, ph, left, gap, top, rowgap = 330, 200, 70, 90, 50, 95
    legend_w = 170
    w = left + 2 * pw + gap + legend_w
    h = top + 2 * ph + rowgap + 60
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (w, h),
           '<rect width="100%" height="100%" fill="white"/>']
    rows = [("p50_us", "churn p50 fetch latency (µs, log)", True, ""),
            ("fetches_per_sec", "churn: full fetches/s", False, "")]
    for ri, (key, what, log_y, unit) in enumerate(rows):
        for pi, (tname, t) in enumerate(TRANSPORTS):
            ts = [s for s in servers if transport_of(s) == t]
            series = [(s, [(c, cells.get(s, "churn", c, key)) for c in concs]) for s in ts]
            panel(out, left + pi * (pw + gap), top + ri * (ph + rowgap), pw, ph,
                  "%s: %s" % (tname, what), series, concs, log_y, unit)
    # One legend entry per server program: a row and its -utp row share a colour (they are
    # in different panels).
    lx, ly = left + 2 * pw + gap + 20, top + 10
    bases = []
    for s in servers:
        base = s[:-4] if s.endswith("-utp") else s
        if base not in bases:
            bases.append(base)
    for i, base in enumerate(bases):
        color = COLORS.get(base, "#333")
        dash = ' stroke-dasharray="5,3"' if base.startswith("epoll") or base.startswith("libtorrent") else ""
        y = ly + i * 20
        out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>'
                   % (lx, y, lx + 24, y, color, dash))
        out.append('<circle cx="%d" cy="%d" r="3" fill="%s"/>' % (lx + 12, y, color))
        out.append('<text x="%d" y="%d" font-size="11">%s</text>'
                   % (lx + 30, y + 4, base + (" (-utp)" if base + "-utp" in servers else "")))
    out.append('<text x="%d" y="%d" text-anchor="middle" fill="#555">each server pinned to one '
               'core, magnetar-loadgen on the other; medians over runs</text>' % (w / 2, h - 15))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    out = sys.argv[1]
    servers, concs, cells, text = summary(out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "compare.svg"), "w") as f:
        f.write(svg(servers, concs, cells))
    print(text)


if __name__ == "__main__":
    main()
