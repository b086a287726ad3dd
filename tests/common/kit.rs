//! The hostile-input fixture: stored torrents, a server on them, and what tests observe
//! of it (/metrics, RSS, core heartbeats, a normal client's latency). Shared by
//! `hostile.rs` (TCP) and `hostile_utp.rs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{bep9, http, info, ServerProc};

/// What "normal latency" means for a stored torrent on loopback.
pub const NORMAL_LATENCY: Duration = Duration::from_secs(1);
pub use super::peer::PROMPT;

pub use super::info::Torrent;

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub data: PathBuf,
    /// One metadata piece.
    pub small: Torrent,
    /// Three metadata pieces: what the health check fetches.
    pub normal: Torrent,
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let small = info::v1_info("small.bin", 100);
    let normal = info::v1_info("normal.bin", 2000);
    let data = info::import_all(
        tmp.path(),
        &[("small.bin", &small), ("normal.bin", &normal)],
    );
    let (small, normal) = (Torrent::v1(small), Torrent::v1(normal));
    assert_eq!(normal.pieces(), 3);
    Fixture {
        _tmp: tmp,
        data,
        small,
        normal,
    }
}

pub fn serve(fx: &Fixture, flags: &[&str]) -> ServerProc {
    let mut args = vec!["--log", "error", "--threads", "2"];
    args.extend_from_slice(flags);
    ServerProc::start(&fx.data, &args)
}

pub type Metrics = HashMap<String, f64>;

/// One scrape of the server's /metrics: every sample, by name with its labels.
pub fn metrics(server: &ServerProc) -> Metrics {
    let reply = http::get(&server.url("/metrics"));
    assert_eq!(reply.status, 200, "GET /metrics: {}", reply.text());
    reply
        .text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// A sample of `m` (`name` with its labels, if any) as a counter.
pub fn get(m: &Metrics, name: &str) -> u64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("metric {name} missing from /metrics")) as u64
}

/// One scrape, one sample (`name` with its labels, if any).
pub fn metric(server: &ServerProc, name: &str) -> f64 {
    *metrics(server)
        .get(name)
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

pub fn core_heartbeats(m: &Metrics) -> Vec<u64> {
    let workers = get(m, "magnetar_workers");
    (0..workers)
        .map(|i| {
            get(
                m,
                &format!("magnetar_core_heartbeats_total{{core=\"{i}\"}}"),
            )
        })
        .collect()
}

/// Polls /metrics until `done` holds or `within` passes; returns the last scrape.
pub fn metrics_until(
    server: &ServerProc,
    within: Duration,
    mut done: impl FnMut(&Metrics) -> bool,
) -> (Metrics, bool) {
    let deadline = Instant::now() + within;
    loop {
        let m = metrics(server);
        if done(&m) {
            return (m, true);
        }
        if Instant::now() >= deadline {
            return (m, false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn rss_kib(server: &ServerProc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
        .expect("server /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// One normal client fetch of `t`; returns how long it took. Panics if it fails, returns
/// wrong bytes, or is slower than `NORMAL_LATENCY`.
pub fn normal_fetch(server: &ServerProc, t: &Torrent, what: &str) -> Duration {
    let start = Instant::now();
    let info = bep9::fetch_metadata(server.addr, &t.key, PROMPT)
        .unwrap_or_else(|e| panic!("{what}: normal client not served: {e}"));
    let took = start.elapsed();
    assert!(info == t.info, "{what}: normal client got wrong bytes");
    assert!(
        took < NORMAL_LATENCY,
        "{what}: normal client took {took:?} (> {NORMAL_LATENCY:?})"
    );
    took
}

/// The server survived: the process is alive, no session panicked, every core's
/// heartbeat advances past `before` (no core stuck or gone), and a normal client is
/// served at normal latency.
pub fn assert_healthy(server: &mut ServerProc, before: &Metrics, t: &Torrent, what: &str) {
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "{what}: the server process exited"
    );
    normal_fetch(server, t, what);
    let old = core_heartbeats(before);
    let (m, advanced) = metrics_until(server, Duration::from_secs(3), |m| {
        core_heartbeats(m)
            .iter()
            .zip(&old)
            .all(|(new, old)| new > old)
    });
    assert!(
        advanced,
        "{what}: a core's heartbeat stopped: {old:?} -> {:?}",
        core_heartbeats(&m)
    );
    assert_eq!(
        get(&m, "magnetar_session_panics_total"),
        0,
        "{what}: a session panicked"
    );
    assert_eq!(get(&m, "magnetar_workers"), old.len() as u64);
}
