//! `GET /`: a status page rendered on the server (no JavaScript): uptime, hit rate, store
//! size, traffic per core, the most recently stored torrents, and a box that turns a magnet
//! or info-hash into its .torrent (`GET /lookup`).
//!
//! "Top torrents served" would need a per-record counter, i.e. state every core writes on
//! the hit path; the page lists the most recently stored torrents instead.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{unix_now, AdminState};
use crate::metainfo;
use crate::server::stats::StatsSnapshot;
use crate::store::RecordRef;

const RECENT_MAX: usize = 15;

pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;\
padding:0 1em;color:#222}table{border-collapse:collapse}td,th{padding:.2em .8em;\
border-bottom:1px solid #ddd;text-align:left}th{background:#f4f4f4}\
input[type=text]{width:40em;max-width:100%}code{font-size:.9em}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n",
        escape(title)
    )
}

fn html(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        text,
    )
        .into_response()
}

pub(super) fn message_page(status: StatusCode, msg: &str) -> Response {
    let body = format!(
        "<h1>magnetar</h1><p id=\"message\">{}</p><p><a href=\"/\">Back to the status page</a></p>",
        escape(msg)
    );
    html(status, page("magnetar", &body))
}

/// The most served stored torrents: the cores' per-hash counts merged, a hybrid's two
/// keys added up.
fn top_served(state: &AdminState) -> Vec<(RecordRef, u64)> {
    let mut counts = std::collections::HashMap::new();
    for core in state.cores() {
        core.served.merge_into(&mut counts);
    }
    let mut per_record: Vec<(RecordRef, u64)> = Vec::new();
    for (key, count) in counts {
        let Some(r) = state.store.lookup(&key) else {
            continue;
        };
        match per_record.iter_mut().find(|(x, _)| x.same_record(&r)) {
            Some((_, c)) => *c += count,
            None => per_record.push((r, count)),
        }
        if per_record.len() > 4 * RECENT_MAX {
            per_record.sort_by_key(|b| std::cmp::Reverse(b.1));
            per_record.truncate(2 * RECENT_MAX);
        }
    }
    per_record.sort_by_key(|b| std::cmp::Reverse(b.1));
    per_record.truncate(RECENT_MAX);
    per_record
}

fn recent_records(state: &AdminState) -> Vec<RecordRef> {
    // Min-heap of (stored_at, n) keeps the newest RECENT_MAX in one pass over the index.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut kept: Vec<Option<RecordRef>> = Vec::new();
    state.store.for_each_record(|r| {
        let t = r.stored_at();
        if heap.len() < RECENT_MAX {
            heap.push(Reverse((t, kept.len())));
            kept.push(Some(r.clone()));
        } else if heap.peek().is_some_and(|Reverse((oldest, _))| t > *oldest) {
            if let Some(Reverse((_, i))) = heap.pop() {
                kept[i] = None;
            }
            heap.push(Reverse((t, kept.len())));
            kept.push(Some(r.clone()));
        }
    });
    let mut out: Vec<RecordRef> = kept.into_iter().flatten().collect();
    out.sort_by_key(|r| Reverse(r.stored_at()));
    out
}

pub(super) async fn status_page(State(state): State<Arc<AdminState>>) -> Response {
    let cores = state.cores();
    let total = StatsSnapshot::sum(cores.iter().map(|c| &**c));
    let store = state.store.stats();
    let lookups = total.hits + total.misses;
    let hit_rate = if lookups > 0 {
        format!("{:.1}%", 100.0 * total.hits as f64 / lookups as f64)
    } else {
        "n/a (no lookups yet)".to_owned()
    };
    let open = total.sessions_open();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>magnetar {}</h1>\n<p id=\"state\">{}</p>\n<table id=\"summary\">\
         <tr><th>Uptime</th><td id=\"uptime\">{}</td></tr>\
         <tr><th>Hit rate</th><td id=\"hit-rate\">{hit_rate}</td></tr>\
         <tr><th>Handshakes</th><td>{} ({} hits, {} misses)</td></tr>\
         <tr><th>Connections open</th><td>{open}</td></tr>\
         <tr><th>Metadata served</th><td>{} in {} blocks</td></tr>\
         <tr><th>Stored torrents</th><td id=\"store-records\">{}</td></tr>\
         <tr><th>Store size</th><td id=\"store-size\">{} in {} segments</td></tr>\
         <tr><th>Blocklist</th><td>{} entries</td></tr>\
         </table>\n",
        env!("CARGO_PKG_VERSION"),
        if !state.is_ready() {
            "Not ready".to_owned()
        } else {
            // A degraded dependency that does not stop serving (the shared tier).
            let notes = state.readiness_notes();
            if notes.is_empty() {
                "Ready".to_owned()
            } else {
                escape(&format!("Ready; {}", notes.join("; ")))
            }
        },
        human_duration(state.started.elapsed().as_secs()),
        total.handshakes,
        total.hits,
        total.misses,
        human_bytes(total.bytes_served),
        total.blocks_served,
        store.records,
        human_bytes(store.bytes),
        store.segments,
        state.store.blocklist_len(),
    );
    b.push_str(
        "<h2>Get a .torrent</h2>\n<form id=\"lookup\" action=\"/lookup\" method=\"get\">\
         <label for=\"q\">Magnet link or info-hash</label><br>\
         <input type=\"text\" id=\"q\" name=\"q\" placeholder=\"magnet:?xt=urn:btih:… or 40/64 hex\" required> \
         <button type=\"submit\">Get .torrent</button></form>\n",
    );
    b.push_str("<h2>Per core</h2>\n<table id=\"cores\"><tr><th>Core</th><th>Accepted</th><th>Open</th><th>Hits</th><th>Misses</th><th>Served</th></tr>");
    for (i, c) in cores.iter().enumerate() {
        let s = StatsSnapshot::of(c);
        let _ = write!(
            b,
            "<tr><td>{i}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.connections_accepted,
            s.sessions_open(),
            s.hits,
            s.misses,
            human_bytes(s.bytes_served)
        );
    }
    b.push_str("</table>\n");
    b.push_str("<h2>Top served</h2>\n<table id=\"top\"><tr><th>Name</th><th>Times served</th><th>Info-hash</th></tr>");
    for (r, count) in top_served(&state) {
        let hashes = r.hashes();
        let hex = hashes
            .v1
            .map(hex::encode)
            .or(hashes.v2.map(hex::encode))
            .unwrap_or_default();
        let name = metainfo::validate_info(r.info())
            .map(|s| s.name)
            .unwrap_or_else(|_| "?".into());
        let _ = write!(
            b,
            "<tr><td><a href=\"/torrents/{hex}.torrent\">{}</a></td><td>{count}</td><td><code>{hex}</code></td></tr>",
            escape(&name)
        );
    }
    b.push_str("</table>\n");
    b.push_str("<h2>Recently stored</h2>\n<table id=\"recent\"><tr><th>Name</th><th>Size</th><th>Stored</th><th>Info-hash</th></tr>");
    let now = unix_now();
    for r in recent_records(&state) {
        let hashes = r.hashes();
        let hex = hashes
            .v1
            .map(hex::encode)
            .or(hashes.v2.map(hex::encode))
            .unwrap_or_default();
        let (name, size) = match metainfo::validate_info(r.info()) {
            Ok(s) => (s.name, s.total_size),
            Err(_) => (String::from("?"), 0),
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/torrents/{hex}.torrent\">{}</a></td><td>{}</td><td>{} ago</td><td><code>{hex}</code></td></tr>",
            escape(&name),
            human_bytes(size),
            human_duration(now.saturating_sub(r.stored_at())),
        );
    }
    b.push_str("</table>\n<p><a href=\"/metrics\">Metrics</a> · <a href=\"/healthz\">Health</a> · <a href=\"/readyz\">Readiness</a></p>");
    html(StatusCode::OK, page("magnetar status", &b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_formats_sizes() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(3725), "1h 2m 5s");
    }
}
