//! `GET /metrics`: the Prometheus text format (version 0.0.4), written straight from the
//! per-core counters at scrape time.
//!
//! Why a plain writer and not the `metrics` + `metrics-exporter-prometheus` crates: the
//! counters already exist (`server::stats`, single writer per core, no shared atomics on the
//! hot path); those crates would want a global recorder and a second, shared copy of every
//! counter, updated on the hot path or mirrored periodically. Summing the snapshots at
//! scrape time and printing ~100 lines is less code than the glue, and exact.
//!
//! Names: every `CoreStats` counter `x` is `magnetar_x_total` with its doc comment as help,
//! except families split by a label (`FAMILIES`: `connections_refused_global` is
//! `magnetar_connections_refused_total{reason="global"}`). A counter added to `CoreStats`
//! shows up here without touching this file. Per-core series (`core="N"`) for the few
//! figures where balance across cores matters (`PER_CORE`).
//!
//! Other subsystems (the miss path) register a `MetricsHook` that appends its own lines,
//! using `write_counter` / `write_gauge` / `write_histogram`.

use std::fmt::Write;
use std::sync::Arc;

use crate::server::stats::{CoreStats, StatsSnapshot, COUNTER_DOCS, RTT_BUCKETS_US};
use crate::store::{RecoveryReport, StoreStats};

/// Appends lines in the Prometheus text format to the scrape (called on the admin thread at
/// every scrape; must not block).
pub type MetricsHook = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Counters whose name starts with the prefix form one metric with a label whose value is
/// the rest of the name.
const FAMILIES: &[(&str, &str, &str, &str)] = &[
    (
        "connections_refused_",
        "magnetar_connections_refused_total",
        "reason",
        "Connections closed at accept, by the cap that refused them.",
    ),
    (
        "rejects_",
        "magnetar_rejects_sent_total",
        "reason",
        "ut_metadata reject messages sent, by reason.",
    ),
    (
        "timeouts_",
        "magnetar_session_timeouts_total",
        "phase",
        "Sessions closed by a timeout, by the phase they were in.",
    ),
    (
        "session_ends_",
        "magnetar_session_ends_total",
        "reason",
        "Sessions ended, by reason (both transports).",
    ),
    (
        "client_fills_",
        "magnetar_client_fills_total",
        "result",
        "Metadata fetched from the connecting client itself, by outcome.",
    ),
];

/// Counters also exported per core.
const PER_CORE: &[&str] = &[
    "connections_accepted",
    "handshakes",
    "hits",
    "misses",
    "blocks_served",
    "bytes_served",
    "heartbeats",
];

pub fn write_help_type(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', " ");
    let _ = writeln!(out, "# HELP {name} {}", help.trim());
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `name value` with HELP and TYPE lines; `labels` like `reason="x"` or empty.
pub fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    write_help_type(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

pub fn write_gauge(out: &mut String, name: &str, help: &str, value: f64) {
    write_help_type(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A histogram from per-bucket (not cumulative) counts: `bucket_counts[i]` counts
/// observations `<= upper_bounds[i]` and above the previous bound; one extra trailing
/// element counts the rest (+Inf). Bounds and sum in the metric's unit (seconds, by
/// Prometheus convention).
pub fn write_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    upper_bounds: &[f64],
    bucket_counts: &[u64],
    sum: f64,
) {
    assert_eq!(
        bucket_counts.len(),
        upper_bounds.len() + 1,
        "one +Inf bucket"
    );
    write_help_type(out, name, "histogram", help);
    let mut cumulative = 0;
    for (bound, count) in upper_bounds.iter().zip(bucket_counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += bucket_counts[upper_bounds.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {cumulative}");
}

fn doc_of(name: &str) -> &'static str {
    COUNTER_DOCS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, d)| d.trim())
}

/// Everything the scrape reads, gathered by the caller.
pub struct Scrape<'a> {
    pub cores: &'a [Arc<CoreStats>],
    pub store: StoreStats,
    pub blocklist_entries: usize,
    pub recovery: &'a RecoveryReport,
    pub uptime_s: f64,
    pub ready: bool,
    pub admin: &'a [(&'static str, &'static str, u64)],
    pub hooks: &'a [MetricsHook],
}

pub fn render(s: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let per_core: Vec<StatsSnapshot> = s.cores.iter().map(|c| StatsSnapshot::of(c)).collect();
    let total = StatsSnapshot::sum(s.cores.iter().map(|c| &**c));
    let fields = total.fields();

    write_help_type(
        &mut out,
        "magnetar_build_info",
        "gauge",
        "Version of the running magnetar.",
    );
    let _ = writeln!(
        out,
        "magnetar_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    write_gauge(
        &mut out,
        "magnetar_uptime_seconds",
        "Seconds since the process started serving.",
        s.uptime_s,
    );
    write_gauge(
        &mut out,
        "magnetar_ready",
        "1 once the store is recovered and the listeners accept; 0 while starting or stopping.",
        if s.ready { 1.0 } else { 0.0 },
    );
    write_gauge(
        &mut out,
        "magnetar_workers",
        "Worker threads (cores) serving peers.",
        s.cores.len() as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_connections_open",
        "Peer connections open now (accepted minus closed).",
        total.sessions_open() as f64,
    );

    for (prefix, metric, label, help) in FAMILIES {
        write_help_type(&mut out, metric, "counter", help);
        for (name, value) in &fields {
            if let Some(rest) = name.strip_prefix(prefix) {
                let _ = writeln!(out, "{metric}{{{label}=\"{rest}\"}} {value}");
            }
        }
    }
    for (name, value) in &fields {
        if FAMILIES.iter().any(|(p, ..)| name.starts_with(p)) {
            continue;
        }
        write_counter(
            &mut out,
            &format!("magnetar_{name}_total"),
            doc_of(name),
            *value,
        );
    }

    write_help_type(
        &mut out,
        "magnetar_core_connections_open",
        "gauge",
        "Peer connections open now, per core.",
    );
    for (i, c) in per_core.iter().enumerate() {
        let open = c.sessions_open();
        let _ = writeln!(out, "magnetar_core_connections_open{{core=\"{i}\"}} {open}");
    }
    for name in PER_CORE {
        let metric = format!("magnetar_core_{name}_total");
        write_help_type(
            &mut out,
            &format!("magnetar_core_{name}_total"),
            "counter",
            &format!("Per core: {}", doc_of(name)),
        );
        for (i, c) in per_core.iter().enumerate() {
            let v = c
                .fields()
                .into_iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| v);
            let _ = writeln!(out, "{metric}{{core=\"{i}\"}} {v}");
        }
    }

    let mut rtt_buckets = [0u64; RTT_BUCKETS_US.len() + 1];
    let mut rtt_sum_us = 0;
    for c in s.cores {
        for (sum, b) in rtt_buckets.iter_mut().zip(&c.utp_rtt.buckets) {
            *sum += b.get();
        }
        rtt_sum_us += c.utp_rtt.sum_us.get();
    }
    let bounds: Vec<f64> = RTT_BUCKETS_US.iter().map(|&us| us as f64 / 1e6).collect();
    write_histogram(
        &mut out,
        "magnetar_utp_rtt_seconds",
        "Smoothed round-trip time of uTP connections, recorded when each closes.",
        &bounds,
        &rtt_buckets,
        rtt_sum_us as f64 / 1e6,
    );

    write_gauge(
        &mut out,
        "magnetar_store_records",
        "Records (info dicts) in the store; a hybrid counts once.",
        s.store.records as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_store_bytes",
        "Info dict bytes of the stored records.",
        s.store.bytes as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_store_segments",
        "Segment files in the store.",
        s.store.segments as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_store_disk_bytes",
        "Bytes of segment files (what store-capacity bounds).",
        s.store.disk_bytes as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_store_capacity_bytes",
        "The store-capacity setting (0: unbounded).",
        s.store.capacity_bytes as f64,
    );
    write_gauge(
        &mut out,
        "magnetar_store_index_bytes",
        "Anonymous memory of the store's index (its tables at capacity and the segment slot table).",
        s.store.index_bytes as f64,
    );
    for (name, help, v) in [
        (
            "magnetar_store_segments_evicted_total",
            "Segments deleted to stay within store-capacity.",
            s.store.segments_evicted,
        ),
        (
            "magnetar_store_records_reappended_total",
            "Records served recently, copied out of a segment being evicted.",
            s.store.records_reappended,
        ),
        (
            "magnetar_store_records_evicted_total",
            "Records dropped with their evicted segment (refetched on their next miss).",
            s.store.records_evicted,
        ),
        (
            "magnetar_store_append_errors_total",
            "Appends and deletes that failed writing or syncing (nothing was stored).",
            s.store.append_errors,
        ),
        (
            "magnetar_store_append_errors_no_space_total",
            "Of those, failures for lack of space on the device (ENOSPC).",
            s.store.append_errors_no_space,
        ),
        (
            "magnetar_store_records_corrupt_on_serve_total",
            "Records restored from the index checkpoint whose bytes failed verification when first served (damaged on disk): dropped, never served.",
            s.store.records_corrupt_on_serve,
        ),
    ] {
        write_counter(&mut out, name, help, v);
    }
    write_gauge(
        &mut out,
        "magnetar_blocklist_entries",
        "Info-hashes on the blocklist.",
        s.blocklist_entries as f64,
    );

    let r = s.recovery;
    let recovery: [(&str, &str, u64); 10] = [
        (
            "segments",
            "Segments scanned at start-up.",
            r.segments as u64,
        ),
        (
            "records",
            "Verified records indexed at start-up.",
            r.records as u64,
        ),
        ("bytes", "Info dict bytes verified at start-up.", r.bytes),
        (
            "torn_tails_truncated",
            "Segments whose torn tail was cut off at start-up.",
            r.torn_tails_truncated as u64,
        ),
        (
            "bytes_truncated",
            "Bytes cut off torn tails at start-up.",
            r.bytes_truncated,
        ),
        (
            "corrupt_records_skipped",
            "Records that failed verification at start-up (never served).",
            r.corrupt_records_skipped as u64,
        ),
        (
            "duplicates",
            "Verified records whose info-hash was already indexed.",
            r.duplicates as u64,
        ),
        (
            "tombstones",
            "Tombstones (deletions) read.",
            r.tombstones as u64,
        ),
        (
            "deleted_skipped",
            "Records not indexed because a tombstone deleted them.",
            r.deleted_skipped as u64,
        ),
        (
            "blocked_skipped",
            "Records not indexed because their hash is on the blocklist.",
            r.blocked_skipped as u64,
        ),
    ];
    for (name, help, v) in recovery {
        write_gauge(
            &mut out,
            &format!("magnetar_recovery_{name}"),
            help,
            v as f64,
        );
    }
    write_gauge(
        &mut out,
        "magnetar_recovery_seconds",
        "Time recovery took at start-up.",
        r.elapsed.as_secs_f64(),
    );

    for (name, help, v) in s.admin {
        write_counter(&mut out, name, help, *v);
    }
    for hook in s.hooks {
        hook(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cores_labels_families_and_histograms() {
        let a = Arc::new(CoreStats::default());
        let b = Arc::new(CoreStats::default());
        a.hits.add(3);
        b.hits.add(4);
        a.connections_refused_per_ip.inc();
        b.connections_accepted.add(2);
        b.connections_closed.inc();
        let hook: MetricsHook = Arc::new(|out: &mut String| {
            write_histogram(out, "x_seconds", "h", &[0.1, 1.0], &[1, 2, 3], 4.5)
        });
        let text = render(&Scrape {
            cores: &[a, b],
            store: StoreStats::default(),
            blocklist_entries: 0,
            recovery: &RecoveryReport::default(),
            uptime_s: 1.0,
            ready: true,
            admin: &[],
            hooks: &[hook],
        });
        assert!(text.contains("\nmagnetar_hits_total 7\n"), "{text}");
        assert!(text.contains("magnetar_core_hits_total{core=\"1\"} 4\n"));
        assert!(text.contains("magnetar_connections_refused_total{reason=\"per_ip\"} 1\n"));
        assert!(text.contains("magnetar_connections_open 1\n"));
        assert!(
            text.contains("# HELP magnetar_hits_total Handshakes for an info-hash in the store.")
        );
        assert!(text.contains("x_seconds_bucket{le=\"1\"} 3\nx_seconds_bucket{le=\"+Inf\"} 6\n"));
        // Every sample line is `name{labels} value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
