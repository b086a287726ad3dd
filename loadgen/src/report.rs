//! What a run prints and writes: the live line, the final table, the JSON line, the
//! HdrHistogram log and the SVG percentile plot.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::peer::FetchError;
use crate::run::RunResult;

/// One live line: rates over the last second and the open connections.
pub fn live_line(at: Duration, now: [u64; 6], prev: [u64; 6], dt: f64) -> String {
    let rate = |i: usize| (now[i] - prev[i]) as f64 / dt.max(1e-6);
    format!(
        "{:>4.0}s  fetches/s {:>9.0}  blocks/s {:>9.0}  MB/s {:>8.1}  errors {:>6}  misses {:>6}  open {:>6}",
        at.as_secs_f64(),
        rate(0),
        rate(1),
        rate(2) / 1e6,
        now[3],
        now[4],
        now[5],
    )
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The final JSON line (one object, `--json`).
pub fn json(r: &RunResult, mode: &str, connections: usize, threads: usize) -> serde_json::Value {
    let f = &r.hists.fetch;
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let errors: serde_json::Map<String, serde_json::Value> = FetchError::ALL
        .iter()
        .filter(|e| r.errors[**e as usize] > 0)
        .map(|e| (e.name().to_string(), r.errors[*e as usize].into()))
        .collect();
    serde_json::json!({
        "mode": mode,
        "driver": r.driver,
        "threads": threads,
        "connections": connections,
        "established": r.established,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "fetches": r.fetches,
        "blocks": r.blocks,
        "bytes": r.bytes,
        "misses": r.misses,
        "fetches_per_sec": per_sec(r.fetches, r.elapsed),
        "blocks_per_sec": per_sec(r.blocks, r.elapsed),
        "bytes_per_sec": per_sec(r.bytes, r.elapsed),
        "p50_us": q(f, 0.5),
        "p90_us": q(f, 0.9),
        "p99_us": q(f, 0.99),
        "p999_us": q(f, 0.999),
        "max_us": f.max(),
        "first_block_p50_us": q(&r.hists.first_block, 0.5),
        "first_block_p99_us": q(&r.hists.first_block, 0.99),
        "connect_p50_us": q(&r.hists.connect, 0.5),
        "connect_p99_us": q(&r.hists.connect, 0.99),
        "errors": r.errors_total(),
        "errors_by_kind": errors,
    })
}

/// The human table.
pub fn table(r: &RunResult) -> String {
    let mut s = String::new();
    let secs = r.elapsed.as_secs_f64();
    let _ = writeln!(
        s,
        "{} fetches in {secs:.2} s: {:.0} fetches/s, {:.0} blocks/s, {:.1} MB/s; errors {}, misses {} (driver {})",
        r.fetches,
        per_sec(r.fetches, r.elapsed),
        per_sec(r.blocks, r.elapsed),
        per_sec(r.bytes, r.elapsed) / 1e6,
        r.errors_total(),
        r.misses,
        r.driver,
    );
    for e in FetchError::ALL {
        if r.errors[e as usize] > 0 {
            let _ = writeln!(s, "  error {:<14} {}", e.name(), r.errors[e as usize]);
        }
    }
    let _ = writeln!(
        s,
        "{:<14} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    for (name, h) in [
        ("connect", &r.hists.connect),
        ("first block", &r.hists.first_block),
        ("full fetch", &r.hists.fetch),
    ] {
        if h.is_empty() {
            let _ = writeln!(s, "{name:<14} {:>8}", 0);
            continue;
        }
        let _ = writeln!(
            s,
            "{name:<14} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.0}",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.mean()
        );
    }
    s
}

/// The full-fetch histogram as an HdrHistogram interval log (one interval: the run).
pub fn write_histogram_log(r: &RunResult, path: &Path) -> anyhow::Result<()> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2Serializer;
    let mut out = Vec::new();
    let mut ser = V2Serializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment("magnetar-loadgen full-fetch latency, microseconds")
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut out, &mut ser)
            .map_err(|e| anyhow::anyhow!("histogram log: {e:?}"))?;
        for (tag, h) in [
            ("fetch", &r.hists.fetch),
            ("first_block", &r.hists.first_block),
            ("connect", &r.hists.connect),
        ] {
            w.write_histogram(h, Duration::ZERO, r.elapsed, Tag::new(tag))
                .map_err(|e| anyhow::anyhow!("histogram log: {e:?}"))?;
        }
    }
    std::fs::write(path, out).with_context(|| format!("writing {path:?}"))
}

/// Latency by percentile (x: 0 … 99.99 % on the usual log(1/(1-p)) scale, y: ms).
pub fn plot_svg(r: &RunResult, title: &str) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let x_max = 4.0; // 99.99 %
    let series = [
        ("full fetch", &r.hists.fetch, "#1f77b4"),
        ("first block", &r.hists.first_block, "#ff7f0e"),
        ("connect", &r.hists.connect, "#2ca02c"),
    ];
    let qs: Vec<f64> = (0..=200)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) * x_max / 200.0))
        .collect();
    let y_max_us = series
        .iter()
        .filter(|(_, h, _)| !h.is_empty())
        .map(|(_, h, _)| h.value_at_quantile(0.9999))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let px = |x: f64| left + x / x_max * (w - left - right);
    let py = |us: f64| h - bottom - us / y_max_us * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        xml_escape(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%"].iter().enumerate() {
        let x = px(i as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            h - bottom,
            h - bottom + 18.0
        );
    }
    for i in 0..=5 {
        let us = y_max_us * i as f64 / 5.0;
        let y = py(us);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.2}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            us / 1000.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">latency (ms)</text><text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        h / 2.0,
        h / 2.0,
        (left + w - right) / 2.0,
        h - 10.0
    );
    for (n, (name, hist, color)) in series.iter().enumerate() {
        if hist.is_empty() {
            continue;
        }
        let points: Vec<String> = qs
            .iter()
            .map(|&q| {
                let x = -(1.0 - q).max(1e-12).log10();
                format!("{:.1},{:.1}", px(x), py(hist.value_at_quantile(q) as f64))
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 14.0 + n as f64 * 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
            left + 10.0,
            left + 30.0,
            left + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Hists;

    fn result() -> RunResult {
        let mut hists = Hists::new();
        for v in 1..=1000u64 {
            hists.fetch.record(v * 10).unwrap();
            hists.first_block.record(v * 5).unwrap();
            hists.connect.record(v).unwrap();
        }
        let mut errors = [0; FetchError::ALL.len()];
        errors[FetchError::Timeout as usize] = 2;
        RunResult {
            elapsed: Duration::from_secs(2),
            fetches: 1000,
            blocks: 3000,
            bytes: 3_000_000,
            misses: 1,
            established: 0,
            hists,
            errors,
            driver: "io_uring",
        }
    }

    #[test]
    fn json_has_the_promised_fields() {
        let v = json(&result(), "churn", 10, 1);
        for key in [
            "fetches_per_sec",
            "blocks_per_sec",
            "bytes_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "errors",
            "connections",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["fetches_per_sec"], 500.0);
        assert_eq!(v["errors"], 2);
        assert_eq!(v["errors_by_kind"]["timeout"], 2);
        assert!((4990..=5010).contains(&v["p50_us"].as_u64().unwrap()));
    }

    #[test]
    fn table_plot_and_log_render() {
        let r = result();
        assert!(table(&r).contains("full fetch"));
        let svg = plot_svg(&r, "a <test>");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a &lt;test&gt;"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.hlog");
        write_histogram_log(&r, &path).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("Tag=fetch"), "{text}");
    }
}
