//! The miss path with real parts on loopback: an info-hash magnetar lacks is fetched from
//! the swarm (opentracker over HTTP and UDP, a local Mainline DHT, the connecting client
//! itself), verified, stored and served; a lying peer is banned; a crowd of clients
//! waiting on one miss causes one upstream fetch.

#![allow(deprecated)] // mainline's blocking API is deprecated in favour of async; fine in tests.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::bep9::{fetch_metadata, FakeSeed, SeedBehaviour};
use common::info::v1_info;
use common::tracker::wait_listed;
use common::*;
use sha1::{Digest, Sha1};

/// Flags for a server that must not reach any real network.
const OFFLINE: [&str; 2] = ["--threads", "2"];

fn content_dir(torrents_dir: &std::path::Path) -> std::path::PathBuf {
    torrents_dir.join("content")
}

fn tracker_miss(label: &str, udp: bool) {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents[label];
    let key = t.key();
    let tracker = opentracker(&[key]);
    let url = if udp {
        tracker.udp_url()
    } else {
        tracker.http_url()
    };
    let seed = LtSeed::start(
        &[&t.path],
        &content_dir(&tdir),
        &["--tracker".into(), tracker.http_url()],
    );
    wait_listed(&tracker.http_url(), key, seed.port);

    let data = tmp.path().join("data");
    let server = ServerProc::start(&data, &[&OFFLINE[..], &["--tracker", &url]].concat());
    let got = lt_fetch(&t.magnet(server.addr), &tmp.path().join("first.info"), 30);
    assert!(got == t.info, "{label}: first client got wrong bytes");

    // Everything upstream goes away: the second client can only be served from the store.
    drop(seed);
    drop(tracker);
    let got = lt_fetch(&t.magnet(server.addr), &tmp.path().join("second.info"), 30);
    assert!(got == t.info, "{label}: second client got wrong bytes");
}

#[test]
fn miss_filled_through_http_tracker_then_served_from_store() {
    tracker_miss("v1-large", false);
}

#[test]
fn miss_filled_through_udp_tracker_then_served_from_store() {
    tracker_miss("hybrid-large", true);
}

/// A local DHT (mainline's testnet); the seed's address is announced into it; magnetar,
/// bootstrapped to it, finds and fetches.
#[test]
fn miss_filled_through_local_dht() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents["v1-small"];
    let key = t.key();
    let seed = LtSeed::start(&[&t.path], &content_dir(&tdir), &[]);

    let testnet = mainline::Testnet::builder(8).build().unwrap();
    let announcer = mainline::Dht::builder()
        .bootstrap(&testnet.bootstrap)
        .build()
        .unwrap();
    announcer
        .announce_peer(mainline::Id::from_bytes(key).unwrap(), Some(seed.port))
        .expect("announcing the seed into the testnet");

    let data = tmp.path().join("data");
    let mut flags: Vec<String> = vec!["--threads".into(), "2".into()];
    for b in &testnet.bootstrap {
        flags.push("--dht-bootstrap".into());
        flags.push(b.clone());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = ServerProc::start(&data, &flags);
    let got = lt_fetch(&t.magnet(server.addr), &tmp.path().join("dht.info"), 45);
    assert!(got == t.info, "wrong bytes through the DHT");
}

/// A libtorrent seed that is itself pointed at magnetar (it connects to us for a hash we
/// lack): magnetar takes the metadata from that connection, and then serves others.
#[test]
fn connecting_seed_fills_the_miss_itself() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let t = &torrents["v2-large"];
    let data = tmp.path().join("data");
    let server = ServerProc::start(&data, &OFFLINE);
    let _seed = LtSeed::start(
        &[&t.path],
        &content_dir(&tdir),
        &["--connect-peer".into(), server.addr.to_string()],
    );
    // No tracker, no DHT: only the seed's own connection can fill this miss.
    let got = lt_fetch(
        &t.magnet(server.addr),
        &tmp.path().join("opportunistic.info"),
        30,
    );
    assert!(got == t.info, "wrong bytes from the opportunistic fill");
}

/// A liar (as a parent node, tried first) and an honest seed (via the tracker): the
/// clients get the right bytes, and the liar is asked once and never again.
#[test]
fn lying_peer_is_banned_and_the_fetch_completes() {
    let info = v1_info("poisoned", 4000); // 5 metadata pieces
    let key: [u8; 20] = Sha1::digest(&info).into();
    let liar = FakeSeed::start(info.clone(), key, SeedBehaviour::Liar);
    let honest = FakeSeed::start(
        info.clone(),
        key,
        SeedBehaviour::Honest {
            delay: Duration::from_millis(300),
        },
    );
    let tracker = opentracker(&[key]);
    // Put the honest seed on the tracker (announce on its behalf, with its port).
    {
        use magnetar::upstream::tracker::{announce, AnnounceRequest};
        let req = AnnounceRequest {
            info_hash: key,
            peer_id: *b"-TS0001-honestseed00",
            port: honest.addr.port(),
            left: 0,
            numwant: 0,
        };
        announce(&tracker.http_url(), &req, Duration::from_secs(5)).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &tmp.path().join("data"),
        &[
            &OFFLINE[..],
            &[
                "--tracker",
                &tracker.http_url(),
                "--parent",
                &liar.addr.to_string(),
            ],
        ]
        .concat(),
    );
    let got =
        fetch_metadata(server.addr, &key, Duration::from_secs(30)).expect("fetch through magnetar");
    assert!(got == info);
    let again = fetch_metadata(server.addr, &key, Duration::from_secs(10)).unwrap();
    assert!(again == info);
    assert_eq!(
        liar.connections(),
        1,
        "the liar is banned after its first bad answer"
    );
    assert_eq!(honest.connections(), 1);
}

/// 100 clients wait on one miss at once: exactly one upstream connection is made, and
/// every client gets the metadata.
#[test]
fn hundred_waiting_clients_cause_one_upstream_fetch() {
    let info = v1_info("crowd", 900); // 2 metadata pieces
    let key: [u8; 20] = Sha1::digest(&info).into();
    // Slow enough that all clients arrive while the fetch runs.
    let upstream = FakeSeed::start(
        info.clone(),
        key,
        SeedBehaviour::Honest {
            delay: Duration::from_millis(1500),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &tmp.path().join("data"),
        &[
            &OFFLINE[..],
            &[
                "--parent",
                &upstream.addr.to_string(),
                "--connections-per-ip-max",
                "1000",
                "--misses-per-ip-per-minute-max",
                "1000",
            ],
        ]
        .concat(),
    );
    let addr: SocketAddr = server.addr;
    let info = Arc::new(info);
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let info = info.clone();
            std::thread::spawn(move || {
                let got =
                    fetch_metadata(addr, &key, Duration::from_secs(30)).expect("client fetch");
                assert!(got == *info);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one miss, one upstream connection"
    );
}

/// The admin plane's `POST /fetch?wait=true` with a magnet whose `x.pe` is the only source:
/// the torrent is fetched, stored, and then served to peers.
#[test]
fn admin_fetch_uses_the_magnet_hints() {
    let info = v1_info("prefetched", 1200); // 2 metadata pieces
    let key: [u8; 20] = Sha1::digest(&info).into();
    let seed = FakeSeed::start(
        info.clone(),
        key,
        SeedBehaviour::Honest {
            delay: Duration::ZERO,
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let server = ServerProc::start(
        &tmp.path().join("data"),
        &[
            &OFFLINE[..],
            &["--admin-token-file", token.to_str().unwrap()],
        ]
        .concat(),
    );
    let admin = server.admin;
    let magnet = format!(
        "magnet:?xt=urn:btih:{}&x.pe={}",
        hex::encode(key),
        seed.addr
    );
    let mut resp = ureq::post(&format!("http://{admin}/fetch?wait=true"))
        .header("Authorization", "Bearer s3cret")
        .send(magnet.as_bytes())
        .expect("POST /fetch");
    let body = resp.body_mut().read_to_string().unwrap();
    assert_eq!(resp.status(), 200, "{body}");
    assert!(body.contains(&hex::encode(key)), "{body}");
    assert_eq!(seed.connections(), 1);
    let got = fetch_metadata(server.addr, &key, Duration::from_secs(10)).unwrap();
    assert!(got == info);
}

/// `magnetar fetch` as a one-shot command: sources from the magnet (x.pe to a liar and to
/// an honest seed), progress on stderr, a .torrent out, and the record stored.
#[test]
fn fetch_command_writes_a_torrent_and_stores_it() {
    let info = v1_info("one-shot", 3000); // 4 metadata pieces
    let key: [u8; 20] = Sha1::digest(&info).into();
    let liar = FakeSeed::start(info.clone(), key, SeedBehaviour::Liar);
    let honest = FakeSeed::start(
        info.clone(),
        key,
        SeedBehaviour::Honest {
            delay: Duration::from_millis(200),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("got.torrent");
    let data = tmp.path().join("data");
    let magnet = format!(
        "magnet:?xt=urn:btih:{}&dn=one-shot&x.pe={}&x.pe={}&x.pe=not-an-address",
        hex::encode(key),
        liar.addr,
        honest.addr
    );
    let res = run_ok(
        std::process::Command::new(magnetar_bin())
            .args([
                "fetch",
                &magnet,
                "--no-dht",
                "--fetch-timeout-ms",
                "20000",
                "--out",
            ])
            .arg(&out)
            .arg("--data-dir")
            .arg(&data),
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("peers found"), "progress lines: {stderr}");
    assert!(
        stderr.contains("warning"),
        "the bad x.pe is reported: {stderr}"
    );
    let torrent = std::fs::read(&out).unwrap();
    let span = magnetar::metainfo::info_span(&torrent).unwrap();
    assert!(torrent[span] == info[..]);
    assert_eq!(liar.connections(), 1);
    // Stored: the magnet command finds it in the data dir.
    let m = run_ok(
        std::process::Command::new(magnetar_bin())
            .args(["magnet", "--data-dir"])
            .arg(&data)
            .arg(hex::encode(key)),
    );
    assert!(String::from_utf8_lossy(&m.stdout).contains("dn=one-shot"));
}

/// Stored, non-private torrents are announced to the DHT, so a swarm finds magnetar
/// without x.pe; a private one is never announced (BEP 27).
#[test]
fn stored_hashes_are_announced_to_the_dht_but_private_ones_are_not() {
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

    let testnet = mainline::Testnet::builder(8).build().unwrap();
    let mut flags: Vec<String> = ["--threads", "2", "--dht-announces-per-second-max", "50"]
        .map(String::from)
        .to_vec();
    for b in &testnet.bootstrap {
        flags.extend(["--dht-bootstrap".into(), b.clone()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = ServerProc::start(&data, &flags);
    let port = server.addr.port();

    let client = mainline::Dht::builder()
        .bootstrap(&testnet.bootstrap)
        .build()
        .unwrap();
    let finds = |key: [u8; 20]| {
        client
            .get_peers(mainline::Id::from_bytes(key).unwrap())
            .flatten()
            .any(|p| p.port() == port)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !finds(public) {
        assert!(
            std::time::Instant::now() < deadline,
            "magnetar never showed up in the DHT"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The announcer goes round every stored record once, then sleeps for the re-announce
    // interval: give it time to reach the private one too, then count what it announced.
    std::thread::sleep(Duration::from_secs(3));
    let announced = kit::get(
        &kit::metrics(&server),
        "magnetar_dht_announces_started_total",
    );
    assert_eq!(announced, 1, "only the public torrent's key is announced");
    assert!(!finds(private), "a private torrent was announced");
}
