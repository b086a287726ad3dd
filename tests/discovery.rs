//! Clients that read no `x.pe` find magnetar the way they find any seed: through a tracker
//! magnetar announces to (`--announce-tracker`) and through the DHT. Real parts on loopback:
//! Debian's opentracker, libtorrent, aria2, a DHT testnet of libtorrent nodes. Each client runs on its
//! defaults (only what keeps traffic on this machine is switched off); each time to metadata
//! is printed next to a libtorrent seed's, found the same way. Every wait is bounded.

#![allow(deprecated)] // mainline's blocking API is deprecated in favour of async; fine in tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tracker::{wait_announced_by_magnetar, wait_listed};
use common::*;
use magnetar::upstream::tracker::{announce_event, AnnounceEvent, AnnounceRequest};

fn content_dir(torrents_dir: &Path) -> PathBuf {
    torrents_dir.join("content")
}

use common::kit::{metrics, Metrics};

/// The value of a metric (name and labels, as `/metrics` writes them).
fn metric(m: &Metrics, name: &str) -> Option<f64> {
    m.get(name.trim_end()).copied()
}

/// A magnetar serving `t` (imported), announcing it to `tracker`.
fn magnetar_announcing(data: &Path, t: &LtTorrent, tracker: &str, extra: &[&str]) -> ServerProc {
    import(data, &[&t.path]);
    let mut flags = vec!["--threads", "2", "--announce-tracker", tracker];
    flags.extend_from_slice(extra);
    ServerProc::start(data, &flags)
}

/// opentracker + `serve --announce-tracker`: libtorrent with a magnet carrying only `tr`
/// (no x.pe) finds magnetar and gets the metadata; then, separately, a libtorrent seed found
/// through a fresh opentracker the same way, for the time next to it.
#[test]
fn libtorrent_finds_magnetar_through_its_announce_tracker() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents["v1-small"];
    let key = t.key();
    let v1 = t.v1.clone().unwrap();

    for udp in [false, true] {
        let tracker = opentracker(&[key]);
        let url = if udp {
            tracker.udp_url()
        } else {
            tracker.http_url()
        };
        let data = tmp.path().join(format!("data-{udp}"));
        let server = magnetar_announcing(&data, t, &url, &[]);
        wait_announced_by_magnetar(&server, &url);
        wait_listed(&tracker.http_url(), key, server.addr.port());
        let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={url}");
        let LtFetch {
            info,
            seconds: secs,
            ..
        } = lt_fetch_args(&magnet, &tmp.path().join("m.info"), 60, &[]);
        assert!(info == t.info, "wrong bytes from magnetar through {url}");
        let m = metrics(&server);
        let label = format!("{{tracker=\"{url}\"}} ");
        assert_eq!(
            metric(
                &m,
                &format!("magnetar_tracker_announce_failures_total{label}")
            ),
            Some(0.0),
            "{m:?}"
        );
        assert!(metric(&m, &format!("magnetar_tracker_announces_total{label}")) >= Some(1.0));
        eprintln!(
            "libtorrent via {} tracker: magnetar {secs:.3} s",
            if udp { "udp" } else { "http" }
        );
    }

    // The same fetch from a libtorrent seed on a tracker of its own.
    let tracker = opentracker(&[key]);
    let seed = LtSeed::start(
        &[&t.path],
        &content_dir(&tdir),
        &["--tracker".into(), tracker.http_url()],
    );
    wait_listed(&tracker.http_url(), key, seed.port);
    let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={}", tracker.http_url());
    let LtFetch {
        info,
        seconds: seed_secs,
        ..
    } = lt_fetch_args(&magnet, &tmp.path().join("s.info"), 60, &[]);
    assert!(info == t.info);
    eprintln!("libtorrent via http tracker: libtorrent seed {seed_secs:.3} s");
}

/// The magnets magnetar hands out name the announce trackers (`tr`, encoded) and its
/// public address as raw `x.pe` and encoded `xsource`; `magnetar magnet` says the same.
#[test]
fn magnets_carry_announce_trackers_x_pe_and_xsource() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let fixture = repo_path("tests/fixtures/torrents/v1_single.torrent");
    import(&data, &[&fixture]);
    let hashes =
        std::fs::read_to_string(repo_path("tests/fixtures/torrents/v1_single.hashes")).unwrap();
    let v1 = hashes.split_whitespace().next().unwrap().to_string();
    let tracker = "udp://tracker.example:6969/announce";
    let server = ServerProc::start(
        &data,
        &[
            "--announce-tracker",
            tracker,
            "--tracker",
            "http://miss.example/announce",
            "--public-addr",
            "[2001:db8::1]:6881",
            "--tracker-announces-per-second-max",
            "0",
        ],
    );
    let magnet = ureq::get(&format!("http://{}/magnet/{v1}", server.admin))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let tail = "&tr=udp%3A%2F%2Ftracker.example%3A6969%2Fannounce\
                &tr=http%3A%2F%2Fmiss.example%2Fannounce\
                &x.pe=[2001:db8::1]:6881&xsource=%5B2001%3Adb8%3A%3A1%5D%3A6881";
    assert!(
        magnet.starts_with(&format!("magnet:?xt=urn:btih:{v1}&dn=")),
        "{magnet}"
    );
    assert!(magnet.trim_end().ends_with(tail), "{magnet}");

    drop(server);
    let out = run_ok(
        Command::new(magnetar_bin())
            .args(["magnet", "--data-dir"])
            .arg(&data)
            .arg(&v1)
            .args([
                "--public-addr",
                "203.0.113.5:6881",
                "--announce-tracker",
                tracker,
            ]),
    );
    let cli = String::from_utf8_lossy(&out.stdout);
    assert!(
        cli.trim_end().ends_with(
            "&tr=udp%3A%2F%2Ftracker.example%3A6969%2Fannounce\
             &x.pe=203.0.113.5:6881&xsource=203.0.113.5%3A6881"
        ),
        "{cli}"
    );
}

/// BEP 27: a private torrent is never announced to a tracker, a public one beside it is.
#[test]
fn private_torrents_are_not_announced_to_trackers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let fixtures = repo_path("tests/fixtures/torrents");
    import(
        &data,
        &[
            &fixtures.join("v1_single.torrent"),
            &fixtures.join("v1_multi.torrent"),
        ],
    );
    let hash = |name: &str| -> [u8; 20] {
        let text = std::fs::read_to_string(fixtures.join(format!("{name}.hashes"))).unwrap();
        hex::decode(text.split_whitespace().next().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let (public, private) = (hash("v1_single"), hash("v1_multi"));
    let tracker = opentracker(&[public, private]);
    let url = tracker.http_url();
    let server = ServerProc::start(&data, &["--threads", "2", "--announce-tracker", &url]);
    wait_announced_by_magnetar(&server, &url);
    wait_listed(&url, public, server.addr.port());
    // Both were ranked at once; the public one is announced, so the private one would have
    // been by now too (one more tick at 5 a second). Give it a few ticks all the same.
    std::thread::sleep(Duration::from_secs(1));
    let m = metrics(&server);
    let label = format!("{{tracker=\"{url}\"}} ");
    assert_eq!(
        metric(&m, &format!("magnetar_tracker_announces_total{label}")),
        Some(1.0),
        "only the public torrent is announced: {m:?}"
    );
    let probe = AnnounceRequest {
        info_hash: private,
        peer_id: *b"-TS0001-privateprobe",
        port: 9,
        left: 1,
        numwant: 50,
    };
    let resp =
        announce_event(&url, &probe, AnnounceEvent::Started, Duration::from_secs(5)).unwrap();
    assert!(
        !resp.peers.iter().any(|p| p.port() == server.addr.port()),
        "the private torrent was announced"
    );
}

/// aria2 (Debian's aria2c, default transport and encryption settings; DHT and LPD off so
/// nothing leaves the machine) with a magnet carrying only `tr` finds magnetar through the
/// tracker and saves byte-identical metadata.
#[test]
fn aria2_finds_magnetar_through_its_announce_tracker() {
    require_libtorrent();
    assert!(
        Path::new("/usr/bin/aria2c").exists(),
        "aria2 is not installed (scripts/test.sh installs it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents["v1-small"];
    let key = t.key();
    let v1 = t.v1.clone().unwrap();
    let aria2 = |tracker: &str, dir: &Path| -> f64 {
        let magnet = format!("magnet:?xt=urn:btih:{v1}&tr={tracker}");
        std::fs::create_dir_all(dir).unwrap();
        let started = Instant::now();
        let mut child = Command::new("/usr/bin/aria2c")
            .args([
                "--bt-metadata-only=true",
                "--bt-save-metadata=true",
                "--enable-dht=false",
                "--enable-dht6=false",
                "--bt-enable-lpd=false",
                "--seed-time=0",
                "--no-conf=true",
                "--console-log-level=notice",
                "--summary-interval=0",
            ])
            .arg(format!("--listen-port={}", free_port()))
            .arg(format!("--dir={}", dir.display()))
            .arg(&magnet)
            .stdout(Stdio::from(
                std::fs::File::create(dir.with_extension("log")).unwrap(),
            ))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning aria2c");
        let deadline = started + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("aria2c did not get the metadata within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let secs = started.elapsed().as_secs_f64();
        assert!(status.success(), "aria2c failed: {status}");
        let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
        let saved = std::fs::read(dir.join(format!("{v1}.torrent")))
            .unwrap_or_else(|e| panic!("aria2's .torrent: {e}; aria2 said:\n{log}"));
        let span = magnetar::metainfo::info_span(&saved).unwrap();
        assert!(saved[span] == t.info[..], "aria2 saved other metadata");
        secs
    };

    let tracker = opentracker(&[key]);
    let url = tracker.http_url();
    let server = magnetar_announcing(&tmp.path().join("data"), t, &url, &[]);
    wait_announced_by_magnetar(&server, &url);
    wait_listed(&url, key, server.addr.port());
    let dir = tmp.path().join("aria2-m");
    let secs = aria2(&url, &dir);
    eprintln!("aria2 via http tracker: magnetar {secs:.3} s (process start to exit)");
    drop(server);

    let tracker = opentracker(&[key]);
    let url = tracker.http_url();
    let seed = LtSeed::start(
        &[&t.path],
        &content_dir(&tdir),
        &["--tracker".into(), url.clone()],
    );
    wait_listed(&url, key, seed.port);
    let seed_secs = aria2(&url, &tmp.path().join("aria2-s"));
    eprintln!("aria2 via http tracker: libtorrent seed {seed_secs:.3} s (process start to exit)");
}

/// Waits until a DHT lookup of `key` on `bootstrap` returns `port`.
fn wait_in_dht(bootstrap: &[String], key: [u8; 20], port: u16) {
    let client = mainline::Dht::builder()
        .bootstrap(bootstrap)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get_peers(mainline::Id::from_bytes(key).unwrap())
        .flatten()
        .any(|p| p.port() == port)
    {
        assert!(
            Instant::now() < deadline,
            "port {port} never showed up in the DHT"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// libtorrent with only a DHT (a loopback testnet), no x.pe and no tracker, finds magnetar
/// (which announced the stored hash) and gets the metadata; then a libtorrent seed found the
/// same way on a testnet of its own.
///
/// The testnet is made of libtorrent DHT nodes (`lt_client.py dht-node`), what most of the
/// public DHT runs; magnetar's node (src/dht) answers their 2-byte transaction ids, so it
/// joins their routing tables too (tests/dht_node.rs checks that, and the lookups that end
/// at magnetar with announces off). A testnet of `mainline` 8 nodes could not carry this:
/// they drop every `t` that is not 4 bytes, libtorrent's included.
#[test]
fn libtorrent_finds_magnetar_through_the_dht_alone() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents["v1-small"];
    let key = t.key();
    let magnet = format!("magnet:?xt=urn:btih:{}", t.v1.clone().unwrap());

    let testnet = LtTestnet::start(3);
    let data = tmp.path().join("data");
    import(&data, &[&t.path]);
    let mut flags: Vec<String> = vec!["--threads".into(), "2".into()];
    for b in &testnet.bootstrap {
        flags.extend(["--dht-bootstrap".into(), b.clone()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = ServerProc::start(&data, &flags);
    wait_in_dht(&testnet.bootstrap, key, server.addr.port());
    // The gauges are refreshed every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(&server);
        if metric(&m, "magnetar_dht_announced_hashes ") == Some(1.0) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        metric(&m, "magnetar_dht_announced_hashes "),
        Some(1.0),
        "{m:?}"
    );
    assert_eq!(
        metric(&m, "magnetar_dht_announce_budget_hashes "),
        Some(16_200.0),
        "{m:?}"
    );
    assert_eq!(
        metric(&m, "magnetar_dht_announces_failed_total "),
        Some(0.0),
        "{m:?}"
    );
    let bootstrap = testnet.bootstrap.join(",");
    let LtFetch {
        info,
        seconds: secs,
        ..
    } = lt_fetch_args(
        &magnet,
        &tmp.path().join("m.info"),
        60,
        &["--dht-bootstrap", &bootstrap],
    );
    assert!(info == t.info, "wrong bytes from magnetar through the DHT");
    eprintln!("libtorrent via dht: magnetar {secs:.3} s");
    drop(server);

    let testnet = LtTestnet::start(3);
    let bootstrap = testnet.bootstrap.join(",");
    let seed = LtSeed::start(
        &[&t.path],
        &content_dir(&tdir),
        &["--dht-bootstrap".into(), bootstrap.clone()],
    );
    wait_in_dht(&testnet.bootstrap, key, seed.port);
    let LtFetch {
        info,
        seconds: seed_secs,
        ..
    } = lt_fetch_args(
        &magnet,
        &tmp.path().join("s.info"),
        60,
        &["--dht-bootstrap", &bootstrap],
    );
    assert!(info == t.info);
    eprintln!("libtorrent via dht: libtorrent seed {seed_secs:.3} s");
}

/// A loopback DHT of libtorrent nodes: the first bootstraps from nobody, the others from
/// the ones before them. Killed on drop.
struct LtTestnet {
    _nodes: Vec<LtSeed>,
    bootstrap: Vec<String>,
}

impl LtTestnet {
    fn start(n: usize) -> LtTestnet {
        let mut nodes: Vec<LtSeed> = Vec::new();
        for _ in 0..n {
            let before: Vec<std::net::SocketAddr> = nodes.iter().map(LtSeed::addr).collect();
            nodes.push(LtSeed::dht_node(&before));
        }
        let bootstrap = nodes.iter().map(|n| n.addr().to_string()).collect();
        LtTestnet {
            _nodes: nodes,
            bootstrap,
        }
    }
}
