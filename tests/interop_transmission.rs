//! Transmission 3 (Debian `transmission-cli` 3.00) on its default settings gets metadata
//! from magnetar. Transmission reads no `x.pe` and never dials peers in 127.0.0.0/8 or ::1
//! (martian to it), so it finds magnetar the only way left: through a tracker magnetar
//! announces to (`--announce-tracker`), on a non-loopback address. The test makes that
//! address: a network namespace of its own joined by a veth pair (`common::Netns`),
//! opentracker and magnetar on the host side, Transmission inside. Its time to metadata is
//! printed next to a libtorrent seed's, found the same way. Every wait is bounded.
//!
//! What Transmission 3 does on the wire, from its own log (`TR_DEBUG_FD`): it dials uTP
//! first, opens with the MSE handshake and offers RC4 only (encryption "preferred" provides
//! no plaintext), and then stalls. Transmission before 4.1 does not process BT messages
//! that arrive in the same read as the peer's BT handshake until more bytes arrive
//! (transmission/transmission#6909, fixed by #6913): magnetar's extension handshake comes
//! right behind its BT handshake, so Transmission sees it only when magnetar's first
//! keep-alive arrives (`--keepalive-interval-ms`, 30 s by default). A libtorrent seed
//! coalesces the same way and its keep-alive comes later still (about a minute), so both
//! times are dominated by that wait and by Transmission's pacing (announce, then a connect
//! pulse, then one ut_metadata request per 500 ms), not by the server. (With magnetar's
//! `--keepalive-interval-ms 1000` the same fetch takes about 10 s.)
//!
//! Why magnetar's uTP matters to Transmission 3: its uTP attempt at a server with `--utp
//! off` times out after about 9 s, its TCP fallback then aborts itself (magnetar sees a
//! TCP connection closed at once), and it waits 900 s before dialling that peer again.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::kit::{metrics, Metrics};
use common::tracker::{wait_announced_by_magnetar, wait_listed};
use common::transmission::{require_transmission, Transmission};
use common::*;

/// How long one Transmission fetch may take: the stall described above lasts until the
/// server's first keep-alive (magnetar: 30 s; libtorrent: about 65 s).
const FETCH_TIMEOUT: Duration = Duration::from_secs(150);
/// magnetar may take at most this many times the libtorrent seed's time, plus the slack:
/// Transmission's own pacing dominates both, so the goal is "no slower". One fetch each:
/// both times are set by timers (keep-alive intervals, Transmission's pulses), and a
/// fetch costs tens of seconds.
const RATIO_MAX: f64 = 1.2;
const SLACK_S: f64 = 1.0;

fn metric(m: &Metrics, name: &str) -> Option<f64> {
    m.get(name.trim_end()).copied()
}

/// The settings a user would have, but for what keeps traffic on this machine: no DHT,
/// no local peer discovery, no UPnP/NAT-PMP (the namespace routes nowhere anyway).
/// Encryption ("preferred": MSE first), uTP, PEX: Transmission's defaults, untouched.
const SETTINGS: &str = r#"{
    "dht-enabled": false,
    "lpd-enabled": false,
    "port-forwarding-enabled": false
}"#;

/// What one Transmission fetch gave.
struct TrFetch {
    /// The info dict of the .torrent Transmission wrote.
    info: Vec<u8>,
    /// From starting transmission-cli to that .torrent on disk.
    seconds: f64,
    /// Its output and libtransmission's deep log.
    log: String,
}

impl TrFetch {
    /// The lines of Transmission's log about its connection to `server` (how it dialled,
    /// the MSE choice, the handshakes), without the timestamps' date.
    fn wire(&self, server: SocketAddr) -> Vec<String> {
        const EVENTS: &[&str] = &[
            "Starting an OUTGOING",
            "got an encrypted handshake",
            "crypto select is",
            "handshakeDone",
            "got ltep handshake",
            "requesting metadata piece #0",
            "utp_on_state_change -- changed to connected",
        ];
        let tag = format!("[{}]:{}", server.ip(), server.port());
        self.log
            .lines()
            .filter(|l| {
                (l.contains(&tag) && EVENTS.iter().any(|e| l.contains(e)))
                    || l.contains("Saving completed metadata")
            })
            .map(|l| l.get(12..).unwrap_or(l).to_string())
            .collect()
    }

    /// How Transmission dialled `server`: "uTP" or "TCP" (its last attempt), if it did.
    fn transport(&self, server: SocketAddr) -> Option<&'static str> {
        let tag = format!("connection with [{}]:{}", server.ip(), server.port());
        self.log
            .lines()
            .rfind(|l| l.contains("Starting an OUTGOING") && l.contains(&tag))
            .map(|l| if l.contains("TCP") { "TCP" } else { "uTP" })
    }

    /// The MSE crypto_select the server answered (1 plaintext, 2 RC4), if MSE ran.
    fn crypto_select(&self, server: SocketAddr) -> Option<u32> {
        let tag = format!("[{}]:{}", server.ip(), server.port());
        self.log
            .lines()
            .filter(|l| l.contains(&tag))
            .find_map(|l| l.split("crypto select is ").nth(1))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    }
}

/// Transmission fetches `magnet`'s metadata: the info dict it wrote, when, and its log.
fn transmission_fetch(ns: &Netns, dir: &Path, magnet: &str) -> TrFetch {
    let start = Instant::now();
    let mut tr = Transmission::start(ns, dir, magnet, SETTINGS, &[], &[]);
    loop {
        if let Some(info) = tr.written_info() {
            let seconds = start.elapsed().as_secs_f64();
            let _ = tr.child.kill();
            let _ = tr.child.wait();
            return TrFetch {
                info,
                seconds,
                log: tr.read_log(),
            };
        }
        if let Some(status) = tr.child.try_wait().unwrap() {
            panic!(
                "transmission-cli exited ({status}) without the metadata:\n{}",
                tr.read_log()
            );
        }
        if start.elapsed() > FETCH_TIMEOUT {
            let _ = tr.child.kill();
            let _ = tr.child.wait();
            panic!(
                "Transmission had no metadata after {FETCH_TIMEOUT:?}; its log (without I/O \
                 accounting), last lines first:\n{}",
                tr.log_tail(60)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on `ip` (magnetar serves TCP and uTP on it).
fn free_port_on(ip: std::net::Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn report(who: &str, f: &TrFetch, server: SocketAddr) {
    println!(
        "Transmission from {who} at {server}: {:.3} s over {}, MSE crypto_select {:?} \
         (1 plaintext, 2 RC4); its log:\n  {}",
        f.seconds,
        f.transport(server).unwrap_or("?"),
        f.crypto_select(server),
        f.wire(server).join("\n  ")
    );
}

#[test]
fn transmission_finds_magnetar_through_a_tracker_as_fast_as_a_libtorrent_seed() {
    require_libtorrent();
    require_transmission();
    let ns = Netns::create();
    let host = ns.host_ip;
    let tmp = tempfile::tempdir().unwrap();
    let (torrents, data) = imported_lt_torrents(tmp.path());
    // v1 (Transmission 3 knows no v2), 8 metadata pieces.
    let t = &torrents["v1-large"];
    let key = t.key();
    let v1 = t.v1.clone().unwrap();

    // magnetar on the host side of the pair, announcing to opentracker there.
    let tracker = opentracker_on(host, &[key]);
    let url = tracker.http_url();
    let port = free_port_on(host);
    let listen = format!("{host}:{port}");
    let server = ServerProc::start(
        &data,
        &[
            "--listen",
            &listen,
            "--public-addr",
            &listen,
            "--announce-tracker",
            &url,
        ],
    );
    let server_addr = SocketAddr::from((host, port));
    wait_announced_by_magnetar(&server, &url);
    wait_listed(&url, key, port);
    // Only `tr=`: Transmission reads no x.pe.
    let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={url}");
    let from_magnetar = transmission_fetch(&ns, &tmp.path().join("tr-magnetar"), &magnet);
    assert!(
        from_magnetar.info == t.info,
        "Transmission wrote an info dict of {} bytes that differs from the {} imported",
        from_magnetar.info.len(),
        t.info.len()
    );
    report("magnetar", &from_magnetar, server_addr);
    let m = metrics(&server);
    let count = |name: &str| metric(&m, name).unwrap_or(0.0);
    let (mse, rc4, utp) = (
        count("magnetar_mse_handshakes_done_total"),
        count("magnetar_mse_rc4_selected_total"),
        count("magnetar_utp_syns_accepted_total"),
    );
    println!(
        "magnetar saw: {mse} MSE handshakes done, {rc4} with RC4 selected, {utp} uTP SYNs accepted"
    );
    // Encryption "preferred" (the default) opens with MSE; Transmission offers RC4 only.
    assert!(
        mse >= 1.0,
        "Transmission's connection to magnetar was not an MSE handshake: {m:?}"
    );
    drop(server);
    drop(tracker);

    // The same from a libtorrent seed on the host side, found through a tracker of its own
    // (magnetar's stale entry on the first would only slow this fetch down).
    let tracker = opentracker_on(host, &[key]);
    let url = tracker.http_url();
    let seed = LtSeed::start(
        &[&t.path],
        &tmp.path().join("torrents/content"),
        &[
            "--tracker".into(),
            url.clone(),
            "--listen-ip".into(),
            host.to_string(),
        ],
    );
    wait_listed(&url, key, seed.port);
    let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={url}");
    let from_seed = transmission_fetch(&ns, &tmp.path().join("tr-seed"), &magnet);
    assert!(from_seed.info == t.info, "the seed's info dict differs");
    report(
        "a libtorrent seed",
        &from_seed,
        SocketAddr::from((host, seed.port)),
    );
    drop(seed);

    let (m_s, s_s) = (from_magnetar.seconds, from_seed.seconds);
    println!(
        "Transmission: magnetar {m_s:.3} s, libtorrent seed {s_s:.3} s (Transmission's \
         announce and connect pacing, and its wait for the server's first keep-alive, \
         dominate both)"
    );
    assert!(
        m_s <= RATIO_MAX * s_s + SLACK_S,
        "Transmission took {m_s:.3} s from magnetar against {s_s:.3} s from a libtorrent seed"
    );
}
