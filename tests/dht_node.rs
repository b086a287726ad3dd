//! magnetar's DHT node as other clients see it (docs/dht.md), on loopback with bootstraps
//! the test controls: raw KRPC from a UDP socket (every transaction-id length, odd `v`/`ip`,
//! IPv4 and IPv6), and libtorrent 2.0.8 (`tests/interop/lt_dht.py`) keeping magnetar's node
//! in its routing table, sampling it (BEP 51), finding magnetar through it with announces
//! off, and fetching metadata as a DHT-only client on ::1. Every wait is bounded.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::transmission::{require_transmission, Transmission};
use common::*;
use magnetar::dht::krpc::{self, Body};

fn hash_of(stem: &str) -> [u8; 20] {
    let (v1, _) = fixture_hashes(stem);
    hex::decode(v1.unwrap()).unwrap().try_into().unwrap()
}

/// Where the node under test has its DHT.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DhtAt {
    /// The default: the serving port, beside uTP.
    Serving,
    /// `--dht-socket own --dht-port D`.
    Own,
}

/// A magnetar holding v1_single (public) and v1_multi (private), serving on 127.0.0.1
/// (`ServerProc`'s listener and P) and [::1]:P, its DHT node on P (`DhtAt::Serving`) or on
/// a UDP port D of every address (`DhtAt::Own`), with no announces and a bootstrap that
/// answers nothing (nothing but the test talks to it). Returns the DHT node's port.
fn magnetar_node(data: &Path, at: DhtAt) -> (ServerProc, u16) {
    let fixtures = repo_path("tests/fixtures/torrents");
    import(
        data,
        &[
            &fixtures.join("v1_single.torrent"),
            &fixtures.join("v1_multi.torrent"),
        ],
    );
    let (port, dht_port) = (free_port(), free_udp_port());
    let listen4 = format!("127.0.0.1:{port}");
    let listen6 = format!("[::1]:{port}");
    let dht = dht_port.to_string();
    let mut args = vec![
        "--listen",
        &listen4,
        "--listen",
        &listen6,
        "--dht-bootstrap",
        "127.0.0.1:9",
        "--no-dht-announce",
    ];
    if at == DhtAt::Own {
        args.extend(["--dht-socket", "own", "--dht-port", &dht]);
    }
    let server = ServerProc::start(data, &args);
    (server, if at == DhtAt::Own { dht_port } else { port })
}

fn free_udp_port() -> u16 {
    // A dual-stack [::] socket holds the port on both families, which the node binds
    // (0.0.0.0:D and [::]:D, IPv6-only).
    UdpSocket::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `query` to `to` and returns the reply to it (answers, not the pings the node
/// sends a newcomer), retrying a lost datagram up to 3 times.
fn ask(to: SocketAddr, query: &[u8]) -> Vec<u8> {
    let bind: SocketAddr = if to.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        s.send_to(query, to).unwrap();
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                break;
            };
            let reply = &buf[..n];
            let is_query = matches!(krpc::decode(reply).map(|m| m.body), Ok(Body::Query { .. }));
            if from == to && !is_query {
                return reply.to_vec();
            }
        }
    }
    panic!("no reply from {to} to {}", String::from_utf8_lossy(query));
}

fn query(t: &[u8], method: &str, args: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut q = b"d1:ad2:id20:abcdefghij0123456789".to_vec();
    q.extend_from_slice(args);
    q.extend_from_slice(b"e");
    q.extend_from_slice(extra);
    q.extend_from_slice(format!("1:q{}:{method}1:t{}:", method.len(), t.len()).as_bytes());
    q.extend_from_slice(t);
    q.extend_from_slice(b"1:y1:qe");
    q
}

fn hash_arg(key: &str, h: &[u8; 20]) -> Vec<u8> {
    let mut a = format!("{}:{key}20:", key.len()).into_bytes();
    a.extend_from_slice(h);
    a
}

/// Every query answered whatever the length of `t`; `v` and `ip` of odd lengths tolerated;
/// `get_peers` for the stored public hash lists magnetar's serving address (with announces
/// off) at the family of the asker, not for the private one; BEP 51 samples hold the
/// public hash only; unknown methods get 204. On 127.0.0.1 and ::1.
#[test]
fn raw_krpc_is_answered_on_both_families() {
    for at in [DhtAt::Serving, DhtAt::Own] {
        raw_krpc_is_answered(at);
    }
}

fn raw_krpc_is_answered(at: DhtAt) {
    let tmp = tempfile::tempdir().unwrap();
    let (server, dht_port) = magnetar_node(&tmp.path().join("data"), at);
    let (public, private) = (hash_of("v1_single"), hash_of("v1_multi"));
    for ip in ["127.0.0.1", "::1"] {
        let node = SocketAddr::new(ip.parse().unwrap(), dht_port);
        // jech/dht's 4 bytes, libtorrent's 2, 1, and 8; a libtorrent-style 4-byte v, a
        // 2-byte v, and an `ip` of 5 bytes.
        let extras: [&[u8]; 3] = [b"1:v4:LT\x02\x00", b"1:v2:XX", b"2:ip5:abcde"];
        for (t, extra) in [&b"\x01"[..], b"aa", b"\x00\x00\xff\xfe", b"abcdefgh"]
            .into_iter()
            .zip(extras.iter().cycle())
        {
            let reply = ask(node, &query(t, "ping", b"", extra));
            let m = krpc::decode(&reply).unwrap();
            assert_eq!(m.t, t, "{ip}: t echoed byte for byte");
            assert!(matches!(m.body, Body::Response(_)), "{ip}: {m:?}");

            let reply = ask(
                node,
                &query(t, "get_peers", &hash_arg("info_hash", &public), b""),
            );
            let m = krpc::decode(&reply).unwrap();
            assert_eq!(m.t, t);
            let Body::Response(r) = m.body else {
                panic!("{ip}: {m:?}")
            };
            // Itself, at a listener on the address the query reached.
            assert_eq!(r.values.len(), 1, "{ip}: {:?}", r.values);
            assert_eq!(r.values[0].ip().to_string(), ip, "{:?}", r.values);
            assert!(server.addrs.contains(&r.values[0]), "{:?}", r.values);
            assert!(r.token.is_some());
        }
        let reply = ask(
            node,
            &query(b"pv", "get_peers", &hash_arg("info_hash", &private), b""),
        );
        let Body::Response(r) = krpc::decode(&reply).unwrap().body else {
            panic!()
        };
        assert!(
            r.values.is_empty(),
            "{ip}: a private torrent is never listed (BEP 27)"
        );

        let reply = ask(
            node,
            &query(
                b"sa",
                "sample_infohashes",
                &hash_arg("target", &[0; 20]),
                b"",
            ),
        );
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("3:numi1e7:samples20:"), "{ip}: {text}");
        assert!(reply.windows(20).any(|w| w == public), "{ip}: {text}");
        assert!(text.contains("8:intervali"), "{ip}: {text}");

        let reply = ask(
            node,
            &query(b"u", "vote", &hash_arg("target", &[0; 20]), b""),
        );
        assert_eq!(
            krpc::decode(&reply).unwrap().body,
            Body::Error { code: 204 }
        );
        let reply = ask(node, b"d1:ad2:id3:abce1:q4:ping1:t1:x1:y1:qe");
        assert_eq!(
            krpc::decode(&reply).unwrap().body,
            Body::Error { code: 203 }
        );
    }
    let m = kit::metrics(&server);
    assert!(m["magnetar_dht_node_self_listed_total"] >= 8.0, "{m:?}");
    assert!(
        m["magnetar_dht_node_samples_answered_total"] >= 2.0,
        "{m:?}"
    );
}

fn lt_dht(args: &[&str]) -> serde_json::Value {
    let out = run_ok_unless_crashed(|| {
        let mut c = Command::new(PYTHON);
        c.arg(repo_path("tests/interop/lt_dht.py")).args(args);
        c
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("lt_dht.py {args:?}: {e}: {stdout}"))
}

/// libtorrent, given magnetar's node (IPv4, then IPv6), queries it with its 2-byte
/// transaction ids, keeps it in its routing table (with `dht_prefer_verified_node_ids` on,
/// as shipped), finds magnetar's serving address through its own get_peers lookup with
/// magnetar's announces off, and (IPv4) gets the stored public hash in BEP 51 samples.
#[test]
fn libtorrent_keeps_magnetar_in_its_table_and_finds_it_there() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (server, dht_port) = magnetar_node(&tmp.path().join("data"), DhtAt::Serving);
    let public = hex::encode(hash_of("v1_single"));
    for ip in ["127.0.0.1", "::1"] {
        let node = SocketAddr::new(ip.parse().unwrap(), dht_port).to_string();
        let r = lt_dht(&["probe", &node, &public, "--listen", ip, "--timeout", "30"]);
        assert_eq!(r["in_table"], true, "{ip}: {r}");
        assert_eq!(r["still_in_table"], true, "{ip}: {r}");
        let peers: Vec<&str> = r["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        let listed: Vec<SocketAddr> = peers.iter().filter_map(|p| p.parse().ok()).collect();
        assert!(
            listed
                .iter()
                .any(|p| server.addrs.contains(p) && p.ip().to_string() == ip),
            "{ip}: {r}"
        );
        if ip == "127.0.0.1" {
            // libtorrent 2.0.8 sends sample_infohashes only through its IPv4 node on a
            // loopback-only session; the IPv6 answer is checked with raw KRPC above.
            assert_eq!(r["samples"], serde_json::json!([public]), "{r}");
            assert_eq!(r["num"], 1, "{r}");
        }
    }
}

/// A DHT-only libtorrent client on ::1 (no tracker, no x.pe) given magnetar's node finds
/// magnetar through it (announces off) and gets the metadata.
#[test]
fn dht_only_libtorrent_on_ipv6_gets_metadata_from_magnetar() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (server, dht_port) = magnetar_node(&tmp.path().join("data"), DhtAt::Serving);
    let node = format!("[::1]:{dht_port}");
    let magnet = format!("magnet:?xt=urn:btih:{}", hex::encode(hash_of("v1_single")));
    let out = tmp.path().join("got.info");
    let r = lt_dht(&[
        "fetch",
        &node,
        &magnet,
        out.to_str().unwrap(),
        "--listen",
        "::1",
        "--timeout",
        "60",
    ]);
    assert_eq!(r["ok"], true, "{r}");
    let v6 = server.addrs.iter().find(|a| a.is_ipv6()).unwrap();
    let serving = format!("::1:{}", v6.port());
    assert!(
        r["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == &serde_json::json!(serving)),
        "{r}"
    );
    let info = std::fs::read(&out).unwrap();
    let torrent = fixture("v1_single.torrent");
    assert!(
        torrent.windows(info.len()).any(|w| w == info),
        "the info dict libtorrent got is the fixture's"
    );
    eprintln!("libtorrent DHT-only on ::1: metadata in {} s", r["seconds"]);
}

/// The DHT and uTP on one serving port P (the default): a DHT-only libtorrent client that
/// speaks uTP only (no TCP), given magnetar's node at P, finds magnetar through it and
/// fetches the metadata over uTP from P, on 127.0.0.1 and on ::1, while raw KRPC pings to
/// P from another socket are all answered. Run on both drivers (MAGNETAR_DRIVER=epoll).
#[test]
fn utp_fetches_and_dht_queries_share_the_serving_port() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (server, port) = magnetar_node(&tmp.path().join("data"), DhtAt::Serving);
    let magnet = format!("magnet:?xt=urn:btih:{}", hex::encode(hash_of("v1_single")));
    let torrent = fixture("v1_single.torrent");
    for ip in ["127.0.0.1", "::1"] {
        let at = SocketAddr::new(ip.parse().unwrap(), port);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pinger = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut answered = 0u32;
                // Bounded: the fetch's own timeout is 60 s.
                for i in 0..2000u32 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let reply = ask(at, &query(&i.to_be_bytes(), "ping", b"", b""));
                    assert_eq!(krpc::decode(&reply).unwrap().t, i.to_be_bytes());
                    answered += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                answered
            })
        };
        let out = tmp
            .path()
            .join(format!("got-{}.info", ip.replace(':', "_")));
        let r = lt_dht(&[
            "fetch",
            &at.to_string(),
            &magnet,
            out.to_str().unwrap(),
            "--listen",
            ip,
            "--timeout",
            "60",
            "--utp-only",
        ]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let pings = pinger.join().expect("every ping answered during the fetch");
        assert_eq!(r["ok"], true, "{ip}: {r}");
        // libtorrent prints an IPv6 peer as "::1:P".
        let listed = |p: &serde_json::Value| {
            let p = p.as_str().unwrap_or("");
            let (host, port) = p.rsplit_once(':').unwrap_or(("", ""));
            let addr = format!(
                "{}:{port}",
                if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                }
            );
            addr.parse::<SocketAddr>()
                .is_ok_and(|a| server.addrs.contains(&a) && host == ip)
        };
        assert!(
            r["peers"].as_array().unwrap().iter().any(listed),
            "{ip}: {r}"
        );
        let info = std::fs::read(&out).unwrap();
        assert!(torrent.windows(info.len()).any(|w| w == info), "{ip}");
        assert!(pings >= 1, "{ip}");
        eprintln!(
            "{ip}: uTP-only DHT fetch in {} s, {pings} pings answered meanwhile",
            r["seconds"]
        );
    }
    let m = kit::metrics(&server);
    assert!(
        m["magnetar_utp_connections_established_total"] >= 2.0,
        "both fetches over uTP: {m:?}"
    );
    assert!(m["magnetar_hits_total"] >= 2.0, "{m:?}");
    assert_eq!(m["magnetar_dht_inbox_dropped_total"], 0.0, "{m:?}");
}

/// `--dht-incoming-queries-per-ip-per-second-max` and `--dht-incoming-queries-per-second-max`
/// reach the node: of 20 pings sent at once from one address, no more than the budget (5)
/// are answered; the rest are dropped and counted under the budget that refused them.
/// (With the default budgets of 100 and 1 000 all 20 would be.)
#[test]
fn incoming_queries_past_the_budgets_are_dropped() {
    for (flag, counter) in [
        (
            "--dht-incoming-queries-per-ip-per-second-max",
            "magnetar_dht_node_queries_rate_limited_total",
        ),
        (
            "--dht-incoming-queries-per-second-max",
            "magnetar_dht_node_queries_rate_limited_global_total",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let server = ServerProc::start(
            &tmp.path().join("d"),
            &[
                "--listen",
                &listen,
                "--dht-bootstrap",
                "127.0.0.1:9",
                "--no-dht-announce",
                flag,
                "5",
            ],
        );
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // The node is up once it answers (that answer spends one of the 5).
        ask(to, &query(b"up", "ping", b"", b""));
        std::thread::sleep(Duration::from_millis(1100));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for i in 0..20u8 {
            s.send_to(&query(&[b'p', i], "ping", b"", b""), to).unwrap();
        }
        let mut answered = 0;
        let mut buf = [0u8; 4096];
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let Ok((n, _)) = s.recv_from(&mut buf) else {
                continue;
            };
            if matches!(
                krpc::decode(&buf[..n]).map(|m| m.body),
                Ok(Body::Response { .. })
            ) {
                answered += 1;
            }
        }
        assert!(
            (1..=5).contains(&answered),
            "{flag}: {answered} of 20 pings answered with a budget of 5 a second"
        );
        let m = kit::metrics(&server);
        assert!(m[counter] >= 15.0, "{flag}: {m:?}");
    }
}

/// Whether this test may make network namespaces (root, and `ip netns` works); a clear
/// skip message otherwise. CI runs as root, where this is always true.
fn netns_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root to make a network namespace (CI runs as root)");
        return false;
    }
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP {test}: no network namespace support (`ip netns list` failed)");
    }
    ok
}

/// Transmission 3 (jech/dht) in a network namespace of its own (its DHT drops 127.0.0.0/8
/// and ::1 as martian, so magnetar is on the host end of a veth pair, 10.77.X.1), on its
/// default settings but for `dht.bootstrap` (magnetar's node, the serving port) and no
/// LPD/port mapping, with a magnet that has no tracker: it pings magnetar's node, learns
/// the other nodes from it (a 10-node testnet on the same address: jech's DHT searches only
/// once it has 4 good and 9 known nodes), searches the DHT for the hash, magnetar's node
/// lists magnetar (announces off), and Transmission gets the metadata from it, over the
/// same port. Bounded by `TR_DHT_FETCH_TIMEOUT`.
#[test]
fn transmission_finds_magnetar_through_its_dht_node_and_gets_metadata() {
    const TEST: &str = "transmission_finds_magnetar_through_its_dht_node_and_gets_metadata";
    const TR_DHT_FETCH_TIMEOUT: Duration = Duration::from_secs(240);
    if !netns_available(TEST) {
        return;
    }
    require_transmission();
    let ns = Netns::create();
    let host = ns.host_ip;
    let testnet = mainline::Testnet::builder(10)
        .bind_address(host)
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    import(&data, &[&fixture_path("v1_single.torrent")]);
    let port = std::net::TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("{host}:{port}");
    let mut args = vec!["--listen", &listen, "--no-dht-announce"];
    for b in &testnet.bootstrap {
        args.extend(["--dht-bootstrap", b]);
    }
    // Transmission before 4.1 reads the extension handshake only when more bytes follow
    // it (tests/interop_transmission.rs): a keep-alive a second later.
    args.extend(["--keepalive-interval-ms", "1000"]);
    let server = ServerProc::start(&data, &args);

    let v1 = hex::encode(hash_of("v1_single"));
    let magnet = format!("magnet:?xt=urn:btih:{v1}");
    let start = Instant::now();
    let bootstrap = format!("{host} {port}\n");
    let mut tr = Transmission::start(
        &ns,
        &tmp.path().join("tr"),
        &magnet,
        r#"{ "lpd-enabled": false, "port-forwarding-enabled": false }"#,
        &[("dht.bootstrap", &bootstrap)],
        &[("TR_DHT_VERBOSE", "1")],
    );
    let info = loop {
        if let Some(info) = tr.written_info() {
            break info;
        }
        if let Some(status) = tr.child.try_wait().unwrap() {
            panic!(
                "transmission-cli exited ({status}) without the metadata:\n{}",
                tr.read_log()
            );
        }
        if start.elapsed() > TR_DHT_FETCH_TIMEOUT {
            let m = kit::metrics(&server);
            panic!(
                "Transmission had no metadata after {TR_DHT_FETCH_TIMEOUT:?}; magnetar's DHT \
                 node: {} queries, {} answered, {} self-listed; Transmission's log, last lines \
                 first:\n{}",
                m["magnetar_dht_node_queries_received_total"],
                m["magnetar_dht_node_responses_sent_total"],
                m["magnetar_dht_node_self_listed_total"],
                tr.log_tail(80)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = start.elapsed().as_secs_f64();
    let text = tr.read_log();
    drop(tr);
    let torrent = fixture("v1_single.torrent");
    assert!(
        torrent.windows(info.len()).any(|w| w == info),
        "the info dict Transmission wrote is the fixture's"
    );
    let m = kit::metrics(&server);
    assert!(m["magnetar_dht_node_self_listed_total"] >= 1.0, "{m:?}");
    let tag = format!("[{host}]:{port}");
    let dialled: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&tag) && l.contains("Starting an OUTGOING"))
        .collect();
    assert!(
        !dialled.is_empty(),
        "Transmission dialled magnetar at {tag} (found through the DHT)"
    );
    eprintln!(
        "Transmission (jech/dht) found magnetar through its DHT node and had the metadata in \
         {seconds:.1} s; magnetar's node: {} queries received, {} answered, {} self-listed; \
         dialled: {}",
        m["magnetar_dht_node_queries_received_total"],
        m["magnetar_dht_node_responses_sent_total"],
        m["magnetar_dht_node_self_listed_total"],
        dialled.join(" | ")
    );
}
