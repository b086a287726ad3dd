#!/usr/bin/env python3
"""Medians and a chart from benches/scale.sh's OUT/results.jsonl (and OUT/data.jsonl).

  scale_summary.py OUT   writes OUT/summary.md and OUT/scale.svg, prints the summary
"""
import json
import math
import os
import statistics
import sys

ORDER = ["magnetar", "magnetar-cold", "magnetar-cgroup", "libtorrent", "libtorrent-seedmode"]
LABEL = {
    "magnetar": "magnetar",
    "magnetar-cold": "magnetar, page cache dropped",
    "magnetar-cgroup": "magnetar, cache dropped, 1 GiB cgroup",
    "libtorrent": "libtorrent 2.0 (python), metadata only",
    "libtorrent-seedmode": "libtorrent 2.0 (python), seed mode",
}
COLOR = {"magnetar": "#1f77b4", "magnetar-cold": "#17becf", "magnetar-cgroup": "#9467bd", "libtorrent": "#d62728", "libtorrent-seedmode": "#ff7f0e"}


def load(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt_s(v):
    if v is None:
        return "—"
    return "%.2f s" % v if v < 10 else "%.0f s" % v


def fmt_mb(kb):
    return "—" if kb is None else "%.0f" % (kb / 1024)


def fmt_k(k):
    return "{:,}".format(k).replace(",", " ")


def why_not(r):
    """How far a run that did not get to serving got."""
    got = "%d of %d answered" % (r["answered"], r["sample"])
    added, queued = r.get("torrents_added"), r.get("torrents_queued")
    if r["server"] != "magnetar":
        if added:
            got += ", %s of %s torrents added" % (fmt_k(added), fmt_k(r["k"]))
        if queued is not None and (added or 0) < r["k"]:
            got += ", %s of %s handed to libtorrent by lt_seed.py" % (fmt_k(queued), fmt_k(r["k"]))
    if r.get("stopped_rss_over_max_at_s") is not None:
        return "stopped at %s: private memory over %d MB (%s)" % (
            fmt_s(r["stopped_rss_over_max_at_s"]), r["rss_max_mb"], got)
    if r.get("server_exited"):
        return "exited after %s, code %s (%s)" % (fmt_s(r["stopped_at_s"]),
                                                 r.get("server_exit_code"), got)
    return "not serving after %s (%s)" % (fmt_s(r["stopped_at_s"]), got)


def cells(rows):
    """(server, K) -> dict of medians over the runs that served, plus failures/skips."""
    out = {}
    for r in rows:
        c = out.setdefault((r["server"], r["k"]), {"ok": [], "fail": [], "skip": None})
        if "skipped" in r:
            c["skip"] = r["skipped"]
        elif r["served_all"]:
            c["ok"].append(r)
        else:
            c["fail"].append(r)
    for c in out.values():
        ok = c["ok"]
        c.update(
            ready=med([r["ready_s"] for r in ok]), serving=med([r["serving_s"] for r in ok]),
            rss=med([r["rss_kb"] for r in ok]), anon=med([r["rss_anon_kb"] for r in ok]),
            rss_churn=med([r.get("rss_after_churn_kb") for r in ok]),
            fps=med([r.get("churn_fetches_per_sec") for r in ok]),
            churn_cpu=med([r.get("churn_server_cpu") for r in ok]),
            churn_errors=sum(r.get("churn_errors") or 0 for r in ok),
            cpu=med([r.get("server_cpu_s") for r in ok]),
            cg_usage=med([r.get("cgroup_max_usage_kb") for r in ok + c["fail"]]),
            cg_oom=sum(r.get("cgroup_oom_kills") or 0 for r in ok + c["fail"]),
            cg_mb=next((r["cgroup_mb"] for r in ok + c["fail"] if "cgroup_mb" in r), None),
            flagged=sum(1 for r in ok + c["fail"] if r.get("busy_flagged")),
        )
    return out


def summary(out):
    rows = load(os.path.join(out, "results.jsonl"))
    data = load(os.path.join(out, "data.jsonl"))
    c = cells(rows)
    servers = [s for s in ORDER if any(k[0] == s for k in c)]
    ks = sorted({k for _, k in c})
    sample = {r["k"]: r["sample"] for r in rows if "sample" in r}
    lines = ["| server | K | runs | time to ready | time to serving all S sampled | RSS MB "
             "| of which anon MB | churn fetches/s | server CPU in churn |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in servers:
        for k in ks:
            x = c.get((s, k))
            if x is None:
                continue
            if x["skip"] and not x["ok"] and not x["fail"]:
                lines.append("| %s | %s | 0 | — | %s | — | — | — | — |" % (LABEL[s], fmt_k(k), x["skip"]))
                continue
            if not x["ok"]:
                f = x["fail"][0]
                lines.append("| %s | %s | %d | %s | %s | %s | %s | — | — |" % (
                    LABEL[s], fmt_k(k), len(x["fail"]),
                    fmt_s(f["ready_s"]) if f["ready_s"] is not None else "not ready",
                    why_not(f), fmt_mb(f["rss_kb"]), fmt_mb(f["rss_anon_kb"])))
                continue
            serving = fmt_s(x["serving"])
            if x["fail"]:
                serving += " (%d other run(s): %s)" % (len(x["fail"]), why_not(x["fail"][0]))
            fps = "—" if x["fps"] is None else "%.0f" % x["fps"]
            if x["churn_errors"]:
                fps += " (%d errors)" % x["churn_errors"]
            lines.append("| %s | %s | %d | %s | %s | %s | %s | %s | %s |" % (
                LABEL[s], fmt_k(k), len(x["ok"]) + len(x["fail"]), fmt_s(x["ready"]), serving,
                fmt_mb(x["rss"]), fmt_mb(x["anon"]), fps,
                "—" if x["churn_cpu"] is None else "%.2f" % x["churn_cpu"]))
    per = per_torrent(servers, ks, c)
    if per:
        lines.append("")
        lines.append("| server | K | RssAnon MB | fixed (smallest K) MB | anon bytes per torrent "
                     "beyond the fixed cost |")
        lines.append("|---|---:|---:|---:|---:|")
        for s, k, anon, fixed, b in per:
            lines.append("| %s | %s | %.0f | %.0f | %.1f |" % (LABEL[s], fmt_k(k), anon / 1024,
                                                              fixed / 1024, b))
    cg = [(s, k, x) for (s, k), x in sorted(c.items()) if x.get("cg_usage") is not None]
    if cg:
        lines.append("")
        lines.append("| cgroup run | K | limit MB | ready | serving | max usage MB (anon + page "
                     "cache) | OOM kills |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for s, k, x in cg:
            lines.append("| %s | %s | %s | %s | %s | %.0f | %d |" % (
                LABEL[s], fmt_k(k), x["cg_mb"], fmt_s(x["ready"]), fmt_s(x["serving"]),
                x["cg_usage"] / 1024, x["cg_oom"]))
    lines.append("")
    lines.append("S = min(K, 1000) sampled hashes%s. Medians over the runs that got to serving "
                 "(runs column: runs made). Times from process start." % (
                     "" if not sample else " (" + ", ".join(
                         "K=%s: S=%d" % (fmt_k(k), sample[k]) for k in sorted(sample)) + ")"))
    flagged = sum(x["flagged"] for x in c.values())
    if flagged:
        lines.append("")
        lines.append("%d run(s) were measured on a busy machine (busy_flagged in results.jsonl)."
                     % flagged)
    if data:
        lines.append("")
        lines.append("| K | dict bytes | magnetar store | .torrent files | generated in |")
        lines.append("|---:|---:|---:|---:|---:|")
        for k in sorted({d["k"] for d in data}):
            by = {d["what"]: d for d in data if d["k"] == k}
            size = next(iter(by.values()))["size"]
            f = lambda w: ("%.1f MB" % (by[w]["bytes"] / 1e6)) if w in by else "—"
            g = " + ".join("%.1f s" % by[w]["gen_s"] for w in ("store", "torrents") if w in by)
            lines.append("| %s | %d | %s | %s | %s |" % (fmt_k(k), size, f("store"),
                                                        f("torrents"), g))
    return servers, ks, c, "\n".join(lines) + "\n"


def per_torrent(servers, ks, c):
    """(server, K, anon KB, fixed KB, anon bytes per torrent beyond the fixed cost) for each
    magnetar K above its smallest: the fixed cost is RssAnon at the smallest K served (rings,
    buffer pools, per-core state: what the server holds at any size)."""
    out = []
    for s in servers:
        if not s.startswith("magnetar"):
            continue
        served = [k for k in ks if (s, k) in c and c[(s, k)]["ok"] and c[(s, k)]["anon"]]
        if len(served) < 2:
            continue
        k0 = served[0]
        fixed = c[(s, k0)]["anon"]
        for k in served[1:]:
            anon = c[(s, k)]["anon"]
            out.append((s, k, anon, fixed, (anon - fixed) * 1024 / (k - k0)))
    return out


def svg(servers, ks, c):
    w, h = 900, 420
    pw, ph, top, left, gap = 340, 270, 50, 80, 110
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (w, h),
           '<rect width="100%" height="100%" fill="white"/>']
    kmin, kmax = 10 ** math.floor(math.log10(min(ks))), 10 ** math.ceil(math.log10(max(ks)))
    if kmin == kmax:
        kmin, kmax = kmin / 10, kmax * 10

    def panel(x0, title, unit, points, dashed):
        # points: server -> [(k, value, reached)]; dashed: server -> [(k, value)]
        vals = [v for ps in points.values() for _, v, _ in ps if v and v > 0]
        vals += [v for ps in dashed.values() for _, v in ps if v and v > 0]
        vmin = 10 ** math.floor(math.log10(min(vals))) if vals else 0.01
        vmax = 10 ** math.ceil(math.log10(max(vals))) if vals else 1000
        if vmin == vmax:
            vmax *= 10
        X = lambda k: x0 + (math.log10(k) - math.log10(kmin)) / (math.log10(kmax) - math.log10(kmin)) * pw
        Y = lambda v: top + ph - (math.log10(max(v, vmin)) - math.log10(vmin)) / (
            math.log10(vmax) - math.log10(vmin)) * ph
        out.append('<text x="%.0f" y="30" text-anchor="middle" font-size="14">%s</text>'
                   % (x0 + pw / 2, title))
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>'
                   % (x0, top, pw, ph))
        e = math.log10(vmin)
        while e <= math.log10(vmax) + 1e-9:
            y = Y(10 ** e)
            out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/>' % (x0, y, x0 + pw, y))
            v = 10 ** e
            lab = ("%d" % v if v >= 1 else "%g" % v) if v < 1e6 else "1e%d" % round(e)
            out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (x0 - 6, y + 4, lab))
            e += 1
        e = math.log10(kmin)
        while e <= math.log10(kmax) + 1e-9:
            x = X(10 ** e)
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#eee"/>' % (x, top, x, top + ph))
            lab = {3: "1k", 4: "10k", 5: "100k", 6: "1M", 7: "10M", 8: "100M", 2: "100"}.get(round(e), "1e%d" % e)
            out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (x, top + ph + 16, lab))
            e += 1
        out.append('<text x="%.0f" y="%d" text-anchor="middle">K torrents (log)</text>'
                   % (x0 + pw / 2, top + ph + 34))
        out.append('<text x="%d" y="%.0f" text-anchor="middle" transform="rotate(-90 %d %.0f)">%s (log)</text>'
                   % (x0 - 50, top + ph / 2, x0 - 50, top + ph / 2, unit))
        for s, ps in dashed.items():
            ps = [(k, v) for k, v in ps if v]
            if len(ps) > 1:
                out.append('<polyline fill="none" stroke="%s" stroke-width="1.5" '
                           'stroke-dasharray="5,4" points="%s"/>'
                           % (COLOR[s], " ".join("%.1f,%.1f" % (X(k), Y(v)) for k, v in ps)))
            for k, v in ps:
                out.append('<rect x="%.1f" y="%.1f" width="6" height="6" fill="white" '
                           'stroke="%s"/>' % (X(k) - 3, Y(v) - 3, COLOR[s]))
        for s, ps in points.items():
            col = COLOR[s]
            solid = [(k, v) for k, v, reached in ps if reached and v]
            if len(solid) > 1:
                out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                           % (col, " ".join("%.1f,%.1f" % (X(k), Y(v)) for k, v in solid)))
            for k, v, reached in ps:
                if not v:
                    continue
                if reached:
                    out.append('<circle cx="%.1f" cy="%.1f" r="4" fill="%s"/>' % (X(k), Y(v), col))
                else:  # did not get there: hollow marker where it stood, arrow up
                    out.append('<circle cx="%.1f" cy="%.1f" r="5" fill="white" stroke="%s" '
                               'stroke-width="2"/>' % (X(k), Y(v), col))
                    out.append('<path d="M%.1f,%.1f l0,-16 m-4,5 l4,-5 l4,5" fill="none" '
                               'stroke="%s" stroke-width="1.5"/>' % (X(k), Y(v) - 6, col))

    def series(key_ok, key_fail):
        pts = {}
        for s in servers:
            ps = []
            for k in ks:
                x = c.get((s, k))
                if not x:
                    continue
                if x["ok"]:
                    ps.append((k, key_ok(x), True))
                elif x["fail"]:
                    ps.append((k, key_fail(x["fail"][0]), False))
            pts[s] = ps
        return pts

    def dashed(key):
        return {s: [(k, key(c[(s, k)])) for k in ks if (s, k) in c and c[(s, k)]["ok"]]
                for s in servers}

    panel(left, "seconds from start: serving every sampled hash (ready: dashed)", "seconds",
          series(lambda x: x["serving"], lambda f: f["stopped_at_s"]), dashed(lambda x: x["ready"]))
    panel(left + pw + gap, "MB when serving: VmRSS (RssAnon: dashed)", "MB",
          series(lambda x: x["rss"] and x["rss"] / 1024, lambda f: f["rss_kb"] and f["rss_kb"] / 1024),
          dashed(lambda x: x["anon"] and x["anon"] / 1024))
    y = h - 38
    x = left
    for s in servers:
        out.append('<circle cx="%d" cy="%d" r="4" fill="%s"/>' % (x, y - 4, COLOR[s]))
        out.append('<text x="%d" y="%d">%s</text>' % (x + 8, y, LABEL[s]))
        x += 30 + 7 * len(LABEL[s])
    y, x = h - 16, left
    out.append('<circle cx="%d" cy="%d" r="5" fill="white" stroke="#555" stroke-width="2"/>'
               % (x, y - 4))
    out.append('<text x="%d" y="%d">did not get there: where it stood when stopped (bound or '
               'memory cap); S = min(K, 1000) sampled hashes</text>' % (x + 9, y))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    out = sys.argv[1]
    servers, ks, c, text = summary(out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    if ks:
        with open(os.path.join(out, "scale.svg"), "w") as f:
            f.write(svg(servers, ks, c))
    print(text)


if __name__ == "__main__":
    main()
