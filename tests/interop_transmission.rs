//! Transmission 3 (Debian `transmission-cli` 3.00) on its default settings gets metadata
//! from magnetar. Transmission reads no `x.pe` and never dials peers in 127.0.0.0/8 or ::1
//! (martian to it), so it finds magnetar the only way left: through a tracker magnetar
//! announces to (`--announce-tracker`), on a non-loopback address. The test makes that
//! address: a network namespace of its own joined by a veth pair (`common::Netns`),
//! opentracker and magnetar on the host side, Transmission inside. Its time to metadata is
//! printed next to a libtorrent seed's, found the same way. Every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kit::{metrics, Metrics};
use common::*;
use magnetar::upstream::tracker::{announce_event, AnnounceEvent, AnnounceRequest};

/// Seconds one Transmission fetch may take (its announce and connect pacing is in
/// seconds; a fetch that works takes a few).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Fetches from each side in the comparison.
const ROUNDS: usize = 3;
/// magnetar's median may be at most this many times the libtorrent seed's, plus the
/// slack: Transmission's own pacing (announce, then its peer manager's connect pulse)
/// dominates both, so the goal is "no slower", not a ratio of transfer times.
const RATIO_MAX: f64 = 1.25;
const SLACK_S: f64 = 1.0;

fn metric(m: &Metrics, name: &str) -> Option<f64> {
    m.get(name.trim_end()).copied()
}

/// Waits until magnetar reports its announce to `tracker` as live.
fn wait_announced_by_magnetar(server: &ServerProc, tracker: &str) {
    let line = format!("magnetar_tracker_announced_hashes{{tracker=\"{tracker}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics(server), &line) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "magnetar never announced to {tracker}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `port` is among the peers `tracker_url` lists for `key` (asking as a
/// leecher, then leaving so the probe is not handed out as a peer).
fn wait_listed(tracker_url: &str, key: [u8; 20], port: u16) {
    let req = AnnounceRequest {
        info_hash: key,
        peer_id: *b"-TS0001-transmission",
        port: 9,
        left: 1,
        numwant: 50,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = announce_event(
            tracker_url,
            &req,
            AnnounceEvent::Started,
            Duration::from_secs(5),
        );
        if resp.is_ok_and(|r| r.peers.iter().any(|p| p.port() == port)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} never listed by {tracker_url}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = announce_event(
        tracker_url,
        &req,
        AnnounceEvent::Stopped,
        Duration::from_secs(5),
    );
}

fn require_transmission() {
    assert!(
        Path::new("/usr/bin/transmission-cli").exists(),
        "transmission-cli is missing: run `bash scripts/test.sh`, which installs it"
    );
}

/// A `transmission-cli` inside the namespace; killed on drop (panics included).
struct Transmission {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Drop for Transmission {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The settings a user would have, but for what keeps traffic on this machine: no DHT,
/// no local peer discovery, no UPnP/NAT-PMP (the namespace routes nowhere anyway).
/// Encryption ("preferred": MSE first), uTP, PEX: Transmission's defaults, untouched.
const SETTINGS: &str = r#"{
    "dht-enabled": false,
    "lpd-enabled": false,
    "port-forwarding-enabled": false
}"#;

/// Starts `transmission-cli -g DIR/config -w DIR/download MAGNET` inside `ns`; its output
/// (with libtransmission's deep log, TR_DEBUG_FD) goes to `DIR/log`.
fn start_transmission(ns: &Netns, dir: &Path, magnet: &str) -> Transmission {
    let config = dir.join("config");
    let download = dir.join("download");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&download).unwrap();
    std::fs::write(config.join("settings.json"), SETTINGS).unwrap();
    let log = dir.join("log");
    let out = std::fs::File::create(&log).unwrap();
    let child = ns
        .command("transmission-cli")
        .arg("-g")
        .arg(&config)
        .arg("-w")
        .arg(&download)
        .arg(magnet)
        .env("TR_DEBUG_FD", "2")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawning transmission-cli in the namespace");
    Transmission { child, config, log }
}

/// The info dict of the .torrent Transmission writes into `config/torrents` once it has
/// the metadata (before that, the file it keeps for a magnet has no `info`).
fn written_info(config: &Path) -> Option<Vec<u8>> {
    let dir = std::fs::read_dir(config.join("torrents")).ok()?;
    for entry in dir.flatten() {
        let bytes = std::fs::read(entry.path()).ok()?;
        if let Ok(span) = magnetar::metainfo::info_span(&bytes) {
            return Some(bytes[span].to_vec());
        }
    }
    None
}

/// Transmission fetches `magnet`'s metadata: the info dict it wrote, and the seconds from
/// its start to the .torrent on disk.
fn transmission_fetch(ns: &Netns, dir: &Path, magnet: &str) -> (Vec<u8>, f64, String) {
    let start = Instant::now();
    let mut tr = start_transmission(ns, dir, magnet);
    loop {
        if let Some(info) = written_info(&tr.config) {
            let secs = start.elapsed().as_secs_f64();
            let _ = tr.child.kill();
            let _ = tr.child.wait();
            let log = std::fs::read_to_string(&tr.log).unwrap_or_default();
            return (info, secs, log);
        }
        if let Some(status) = tr.child.try_wait().unwrap() {
            panic!(
                "transmission-cli exited ({status}) without the metadata:\n{}",
                std::fs::read_to_string(&tr.log).unwrap_or_default()
            );
        }
        if start.elapsed() > FETCH_TIMEOUT {
            let _ = tr.child.kill();
            let _ = tr.child.wait();
            let log = std::fs::read_to_string(&tr.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            panic!(
                "Transmission had no metadata after {FETCH_TIMEOUT:?}; its log, last lines first:\n{}",
                tail.join("\n")
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

#[test]
fn transmission_finds_magnetar_through_a_tracker_and_gets_metadata_encrypted() {
    require_libtorrent();
    require_transmission();
    let ns = Netns::create();
    let host = ns.host_ip;
    let tmp = tempfile::tempdir().unwrap();
    let (torrents, data) = imported_lt_torrents(tmp.path());
    let t = &torrents["v1-large"];
    let key = t.key();
    let v1 = t.v1.clone().unwrap();

    // magnetar, on the host side of the pair, announcing to opentracker there.
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
    wait_announced_by_magnetar(&server, &url);
    wait_listed(&url, key, port);
    let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={url}");

    let mut from_magnetar = Vec::new();
    for round in 0..ROUNDS {
        let dir = tmp.path().join(format!("tr-m{round}"));
        let (info, secs, log) = transmission_fetch(&ns, &dir, &magnet);
        assert!(
            info == t.info,
            "Transmission wrote an info dict of {} bytes that differs from the {} imported",
            info.len(),
            t.info.len()
        );
        println!("round {round}: magnetar {secs:.3} s");
        if round == 0 {
            println!("--- transmission log (magnetar, round 0) ---\n{log}\n---");
        }
        from_magnetar.push(secs);
    }
    let m = metrics(&server);
    let mut interesting: Vec<_> = m
        .iter()
        .filter(|(k, v)| {
            **v != 0.0
                && (k.contains("mse") || k.contains("utp") || k.contains("accepted") || k.contains("ends"))
        })
        .collect();
    interesting.sort_by(|a, b| a.0.cmp(b.0));
    println!("magnetar metrics: {interesting:#?}");
    drop(server);
    drop(tracker);

    // The same from a libtorrent seed on the host side, found through a tracker of its own
    // (magnetar's stale entry would only slow the seed's round down).
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
    let mut from_seed = Vec::new();
    for round in 0..ROUNDS {
        let dir = tmp.path().join(format!("tr-s{round}"));
        let (info, secs, _) = transmission_fetch(&ns, &dir, &magnet);
        assert!(info == t.info, "the seed's info dict differs");
        println!("round {round}: libtorrent seed {secs:.3} s");
        from_seed.push(secs);
    }
    drop(seed);

    let (m_s, s_s) = (median(&from_magnetar), median(&from_seed));
    println!(
        "Transmission, median of {ROUNDS}: magnetar {m_s:.3} s, libtorrent seed {s_s:.3} s \
         (Transmission's announce and connect pacing dominates both)"
    );
    assert!(
        m_s <= RATIO_MAX * s_s + SLACK_S,
        "Transmission took {m_s:.3} s from magnetar against {s_s:.3} s from a libtorrent seed"
    );
}
