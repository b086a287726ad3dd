//! Peer sources of the miss path against real parts on loopback: opentracker (Debian's, HTTP
//! and UDP), small fake trackers for the answers opentracker never gives (non-compact
//! peers, peers6, garbage, huge bodies, wrong transaction ids, silence, error actions), and
//! a `mainline` testnet for the DHT. Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aquatic_udp_protocol as proto;
use magnetar::upstream::config::UpstreamConfig;
use magnetar::upstream::dht::{self, DhtError};
use magnetar::upstream::tracker::{
    announce, spawn_announces, AnnounceRequest, TrackerError, TRACKER_RESPONSE_BYTES_MAX,
};
use magnetar::upstream::{PeerCandidate, PeerSource};

use common::opentracker;

const H1: [u8; 20] =
    *b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67";
const H2: [u8; 20] = *b"magnetar-test-hash-2";
const H3: [u8; 20] = *b"magnetar-test-hash-3";
const UNLISTED: [u8; 20] = *b"not-in-the-whitelist";

fn req(info_hash: [u8; 20], peer_id: &[u8; 20], port: u16) -> AnnounceRequest {
    AnnounceRequest {
        info_hash,
        peer_id: *peer_id,
        port,
        left: 1000,
        numwant: 50,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// opentracker

/// A running opentracker, killed on drop.
#[test]
fn http_announce_to_opentracker_finds_the_other_peer() {
    let ot = opentracker(&[H1]);
    let t = Duration::from_secs(5);
    announce(&ot.http_url(), &req(H1, b"-AA0001-aaaaaaaaaaaa", 1111), t).unwrap();
    let r = announce(&ot.http_url(), &req(H1, b"-BB0001-bbbbbbbbbbbb", 2222), t).unwrap();
    assert!(r.peers.contains(&addr("127.0.0.1:1111")), "{r:?}");
    assert!(r.interval.is_some_and(|i| i > Duration::ZERO), "{r:?}");
}

#[test]
fn udp_announce_to_opentracker_finds_the_other_peer() {
    let ot = opentracker(&[H2]);
    let t = Duration::from_secs(5);
    announce(&ot.udp_url(), &req(H2, b"-AA0001-aaaaaaaaaaaa", 3333), t).unwrap();
    // The second announce reuses the cached connection id.
    let r = announce(&ot.udp_url(), &req(H2, b"-BB0001-bbbbbbbbbbbb", 4444), t).unwrap();
    assert!(r.peers.contains(&addr("127.0.0.1:3333")), "{r:?}");
    assert!(r.interval.is_some_and(|i| i > Duration::ZERO), "{r:?}");
}

#[test]
fn opentracker_refuses_a_hash_not_in_its_whitelist() {
    let ot = opentracker(&[H1]);
    let r = req(UNLISTED, b"-AA0001-aaaaaaaaaaaa", 1111);
    match announce(&ot.http_url(), &r, Duration::from_secs(5)) {
        Err(TrackerError::Failure(m)) => assert!(m.contains("not authorized"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Over UDP it answers with the 8-byte announce header alone (no error action).
    let started = Instant::now();
    match announce(&ot.udp_url(), &r, Duration::from_secs(5)) {
        Err(TrackerError::Failure(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn spawn_announces_streams_peers_of_every_tracker() {
    let ot = opentracker(&[H3]);
    let t = Duration::from_secs(5);
    announce(&ot.http_url(), &req(H3, b"-AA0001-aaaaaaaaaaaa", 5555), t).unwrap();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let urls = vec![
        ot.http_url(),
        ot.udp_url(),
        ot.http_url(), // repeated: asked once
        "https://tracker.example/announce".to_string(),
        format!("udp://{}", silent.local_addr().unwrap()),
    ];
    let (tx, rx) = flume::unbounded();
    let started = Instant::now();
    let handle = spawn_announces(
        urls,
        req(H3, b"-BB0001-bbbbbbbbbbbb", 6666),
        Duration::from_millis(1500),
        tx,
    )
    .unwrap();
    let outcomes = handle.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    for o in &outcomes {
        match o.url.as_str() {
            u if u.starts_with("https") => {
                assert!(matches!(o.result, Err(TrackerError::BadUrl(_))), "{o:?}")
            }
            u if u == ot.http_url() || u == ot.udp_url() => assert!(o.result.is_ok(), "{o:?}"),
            _ => assert!(matches!(o.result, Err(TrackerError::Timeout)), "{o:?}"),
        }
    }
    let peers: Vec<PeerCandidate> = rx.drain().collect();
    let want = PeerCandidate {
        addr: addr("127.0.0.1:5555"),
        source: PeerSource::Tracker,
    };
    // Once from the HTTP answer and once from the UDP answer.
    assert_eq!(peers.iter().filter(|p| **p == want).count(), 2, "{peers:?}");
}

// ---------------------------------------------------------------------------------------
// A fake HTTP tracker: answers each connection, in order, with one of `responses`, and
// reports each request's head.

fn http_tracker(responses: Vec<Vec<u8>>) -> (String, flume::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/announce", listener.local_addr().unwrap());
    let (tx, rx) = flume::unbounded();
    std::thread::spawn(move || {
        for response in responses {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            // The client may hang up mid-body (too large): not an error here.
            let _ = s.write_all(&response);
            let _ = s.flush();
        }
    });
    (url, rx)
}

fn http_ok(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn http_non_compact_peers_and_the_request_we_send() {
    let body = b"d8:intervali900e5:peersld2:ip9:127.0.0.17:peer id20:aaaaaaaaaaaaaaaaaaaa4:porti1111eed2:ip8:10.0.0.74:porti2222eed2:ip7:0.0.0.04:porti1eeee";
    let (url, heads) = http_tracker(vec![http_ok(body)]);
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.peers, vec![addr("127.0.0.1:1111"), addr("10.0.0.7:2222")]);
    assert_eq!(r.interval, Some(Duration::from_secs(900)));
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    let line = head.lines().next().unwrap();
    assert_eq!(
        line,
        "GET /announce?info_hash=%01%23Eg%89%AB%CD%EF%01%23Eg%89%AB%CD%EF%01%23Eg\
         &peer_id=-MX0001-abcdefghijkl&port=6881&uploaded=0&downloaded=0&left=1000\
         &compact=1&numwant=50&event=started HTTP/1.1"
    );
}

#[test]
fn http_compact_peers6() {
    let mut body = b"d8:intervali60e5:peers0:6:peers636:".to_vec();
    for (ip, port) in [("::1", 1111u16), ("2001:db8::7", 2222)] {
        body.extend_from_slice(&ip.parse::<std::net::Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&port.to_be_bytes());
    }
    body.push(b'e');
    let (url, _) = http_tracker(vec![http_ok(&body)]);
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        r.peers,
        vec![addr("[::1]:1111"), addr("[2001:db8::7]:2222")]
    );
}

#[test]
fn http_bad_answers_are_clean_errors() {
    let huge = vec![b'x'; TRACKER_RESPONSE_BYTES_MAX + 4096];
    let mut huge_unsized =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n".to_vec();
    huge_unsized.extend_from_slice(&huge);
    let (url, _) = http_tracker(vec![
        http_ok(b"<html>not bencode</html>"),
        http_ok(b"d5:peers5:abcdee"),
        http_ok(&huge),
        huge_unsized,
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!"
            .to_vec(),
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 34\r\nConnection: close\r\n\r\nd14:failure reason12:unknown hashe"
            .to_vec(),
        http_ok(b"d14:failure reason12:unknown hashe"),
        b"SMTP ready\r\n\r\n".to_vec(),
    ]);
    let r = req(H1, b"-MX0001-abcdefghijkl", 6881);
    let t = Duration::from_secs(5);
    let results: Vec<_> = (0..8).map(|_| announce(&url, &r, t)).collect();
    let is = |i: usize, ok: fn(&TrackerError) -> bool| {
        assert!(
            matches!(&results[i], Err(e) if ok(e)),
            "{i}: {:?}",
            results[i]
        );
    };
    is(0, |e| matches!(e, TrackerError::Malformed(_)));
    is(1, |e| matches!(e, TrackerError::Malformed(_)));
    is(2, |e| matches!(e, TrackerError::TooLarge));
    is(3, |e| matches!(e, TrackerError::TooLarge));
    is(4, |e| matches!(e, TrackerError::Http(500)));
    is(
        5,
        |e| matches!(e, TrackerError::Failure(m) if m == "unknown hash"),
    );
    is(
        6,
        |e| matches!(e, TrackerError::Failure(m) if m == "unknown hash"),
    );
    is(7, |e| {
        matches!(e, TrackerError::Malformed(_) | TrackerError::Io(_))
    });
}

#[test]
fn http_silent_tracker_times_out_within_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/announce", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        // Accept and hold the connection without answering.
        let held = listener.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(held);
    });
    let started = Instant::now();
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_millis(500),
    );
    assert!(matches!(r, Err(TrackerError::Timeout)), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn http_closed_port_is_an_io_error() {
    let url = format!("http://127.0.0.1:{}/announce", common::free_port());
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(2),
    );
    assert!(matches!(r, Err(TrackerError::Io(_))), "{r:?}");
}

// ---------------------------------------------------------------------------------------
// Fake UDP trackers. `answer` gets each parsed request and the number of connect and
// announce requests seen so far (this one included) and says what to send back.

#[derive(Default)]
struct Seen {
    connects: AtomicUsize,
    announces: AtomicUsize,
}

fn udp_tracker<F>(answer: F) -> (String, Arc<Seen>)
where
    F: Fn(&proto::Request, &Seen) -> Vec<proto::Response> + Send + 'static,
{
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("udp://{}/announce", sock.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    // The thread ends after 10 s without a request.
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(request) = proto::Request::parse_bytes(&buf[..n], 1) else {
                continue;
            };
            match request {
                proto::Request::Connect(_) => seen2.connects.fetch_add(1, Ordering::SeqCst),
                proto::Request::Announce(_) => seen2.announces.fetch_add(1, Ordering::SeqCst),
                proto::Request::Scrape(_) => 0,
            };
            for response in answer(&request, &seen2) {
                let mut out = Vec::new();
                response.write_bytes(&mut out).unwrap();
                sock.send_to(&out, from).unwrap();
            }
        }
    });
    (url, seen)
}

fn tid(request: &proto::Request) -> i32 {
    match request {
        proto::Request::Connect(r) => r.transaction_id.0.get(),
        proto::Request::Announce(r) => { r.transaction_id }.0.get(),
        proto::Request::Scrape(r) => r.transaction_id.0.get(),
    }
}

fn connected(request: &proto::Request, connection_id: i64) -> proto::Response {
    proto::Response::Connect(proto::ConnectResponse {
        transaction_id: proto::TransactionId::new(tid(request)),
        connection_id: proto::ConnectionId::new(connection_id),
    })
}

fn announced(request: &proto::Request, peers: &[([u8; 4], u16)]) -> proto::Response {
    proto::Response::AnnounceIpv4(proto::AnnounceResponse {
        fixed: proto::AnnounceResponseFixedData {
            transaction_id: proto::TransactionId::new(tid(request)),
            announce_interval: proto::AnnounceInterval::new(1800),
            leechers: proto::NumberOfPeers::new(1),
            seeders: proto::NumberOfPeers::new(0),
        },
        peers: peers
            .iter()
            .map(|&(ip, port)| proto::ResponsePeer {
                ip_address: proto::Ipv4AddrBytes(ip),
                port: proto::Port::new(port.try_into().unwrap()),
            })
            .collect(),
    })
}

fn error(request: &proto::Request, message: &'static str) -> proto::Response {
    proto::Response::Error(proto::ErrorResponse {
        transaction_id: proto::TransactionId::new(tid(request)),
        message: message.into(),
    })
}

fn connection_id_of(request: &proto::Request) -> i64 {
    match request {
        proto::Request::Announce(r) => { r.connection_id }.0.get(),
        _ => panic!("not an announce"),
    }
}

#[test]
fn udp_reply_with_wrong_transaction_id_is_ignored_then_retried() {
    let (url, seen) = udp_tracker(|request, seen| match request {
        // The first connect only gets an answer to some other transaction: ignored, so
        // the client retransmits after its first wait.
        proto::Request::Connect(_) if seen.connects.load(Ordering::SeqCst) == 1 => {
            vec![proto::Response::Connect(proto::ConnectResponse {
                transaction_id: proto::TransactionId::new(tid(request).wrapping_add(1)),
                connection_id: proto::ConnectionId::new(7),
            })]
        }
        proto::Request::Connect(_) => vec![connected(request, 8)],
        // A stray answer right before the right one: ignored without a retransmission.
        proto::Request::Announce(_) => {
            assert_eq!(connection_id_of(request), 8);
            vec![
                error(
                    &proto::Request::Connect(proto::ConnectRequest {
                        transaction_id: proto::TransactionId::new(tid(request).wrapping_sub(1)),
                    }),
                    "not for you",
                ),
                announced(request, &[([127, 0, 0, 1], 1111), ([10, 0, 0, 1], 2222)]),
            ]
        }
        proto::Request::Scrape(_) => vec![],
    });
    let started = Instant::now();
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(r.peers, vec![addr("127.0.0.1:1111"), addr("10.0.0.1:2222")]);
    assert_eq!(r.interval, Some(Duration::from_secs(1800)));
    assert_eq!(seen.connects.load(Ordering::SeqCst), 2);
    assert_eq!(seen.announces.load(Ordering::SeqCst), 1);
    // One first wait (2 s / 4) passed before the retransmission.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[test]
fn udp_silent_tracker_times_out_within_the_deadline() {
    let (url, seen) = udp_tracker(|_, _| vec![]);
    let started = Instant::now();
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_millis(700),
    );
    let took = started.elapsed();
    assert!(matches!(r, Err(TrackerError::Timeout)), "{r:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // Sends at 0, 175 and 525 ms (first wait 700/4, doubling); a loaded machine may be
    // late for the last one.
    assert!((2..=3).contains(&seen.connects.load(Ordering::SeqCst)));
}

#[test]
fn udp_error_action_is_a_failure() {
    let (url, seen) = udp_tracker(|request, _| match request {
        proto::Request::Connect(_) => vec![connected(request, 9)],
        _ => vec![error(request, "torrent not registered")],
    });
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(2),
    );
    match r {
        Err(TrackerError::Failure(m)) => assert_eq!(m, "torrent not registered"),
        other => panic!("{other:?}"),
    }
    // A fresh connection id that is refused is not worth a reconnect.
    assert_eq!(seen.connects.load(Ordering::SeqCst), 1);
    assert_eq!(seen.announces.load(Ordering::SeqCst), 1);
}

#[test]
fn udp_refused_cached_connection_id_reconnects_once() {
    let (url, seen) = udp_tracker(|request, seen| match request {
        proto::Request::Connect(_) => {
            vec![connected(
                request,
                100 + seen.connects.load(Ordering::SeqCst) as i64,
            )]
        }
        // The tracker "restarts" after the first announce: the first id (101) is no longer
        // accepted.
        proto::Request::Announce(_) => {
            if seen.announces.load(Ordering::SeqCst) >= 2 && connection_id_of(request) == 101 {
                vec![error(request, "connection id expired")]
            } else {
                vec![announced(request, &[([127, 0, 0, 1], 1111)])]
            }
        }
        proto::Request::Scrape(_) => vec![],
    });
    let r = req(H1, b"-MX0001-abcdefghijkl", 6881);
    let t = Duration::from_secs(2);
    announce(&url, &r, t).unwrap();
    assert_eq!(seen.connects.load(Ordering::SeqCst), 1);
    let second = announce(&url, &r, t).unwrap();
    assert_eq!(second.peers, vec![addr("127.0.0.1:1111")]);
    assert_eq!(seen.connects.load(Ordering::SeqCst), 2);
    assert_eq!(seen.announces.load(Ordering::SeqCst), 3);
}

#[test]
fn udp_closed_port_fails_fast() {
    let url = format!("udp://127.0.0.1:{}", free_udp_port());
    let started = Instant::now();
    let r = announce(
        &url,
        &req(H1, b"-MX0001-abcdefghijkl", 6881),
        Duration::from_secs(3),
    );
    // Loopback reports the ICMP port unreachable as ECONNREFUSED on the connected socket.
    assert!(matches!(r, Err(TrackerError::Io(_))), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// DHT

fn dht_config(bootstrap: &[String]) -> UpstreamConfig {
    UpstreamConfig {
        dht_bootstrap: bootstrap.to_vec(),
        dht_port: 0,
        ..UpstreamConfig::default()
    }
}

#[test]
#[allow(deprecated)] // mainline's blocking API, for the announcing node
fn dht_get_peers_finds_a_peer_announced_on_a_testnet() {
    let testnet = mainline::Testnet::builder(10).build().unwrap();
    let announcer = mainline::Dht::builder()
        .bootstrap(&testnet.bootstrap)
        .bind_address(std::net::Ipv4Addr::LOCALHOST)
        .server_mode()
        .build()
        .unwrap();
    let hash = *b"magnetar-dht-test-h1";
    announcer
        .announce_peer(mainline::Id::from_bytes(hash).unwrap(), Some(2222))
        .unwrap();

    let node = dht::start(&dht_config(&testnet.bootstrap)).unwrap();
    assert!(node.bootstrapped());
    assert_ne!(node.local_addr().port(), 0);
    let (tx, rx) = flume::unbounded();
    let deadline = Instant::now() + Duration::from_secs(10);
    node.get_peers(hash, tx, deadline).unwrap();
    let want = PeerCandidate {
        addr: addr("127.0.0.1:2222"),
        source: PeerSource::Dht,
    };
    let mut got = Vec::new();
    while let Ok(p) = rx.recv_deadline(deadline) {
        got.push(p);
        if p == want {
            break;
        }
    }
    assert!(got.contains(&want), "{got:?}");
    assert!(node.counters.peers_found.load(Ordering::Relaxed) >= 1);
    assert_eq!(node.counters.lookups_started.load(Ordering::Relaxed), 1);
}

#[test]
fn dht_lookups_beyond_the_rate_are_refused() {
    let testnet = mainline::Testnet::builder(3).build().unwrap();
    let cfg = UpstreamConfig {
        dht_queries_per_second_max: 2,
        ..dht_config(&testnet.bootstrap)
    };
    let node = dht::start(&cfg).unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    let (tx, _rx) = flume::unbounded();
    assert_eq!(node.get_peers([1; 20], tx.clone(), deadline), Ok(()));
    assert_eq!(node.get_peers([2; 20], tx.clone(), deadline), Ok(()));
    assert_eq!(
        node.get_peers([3; 20], tx.clone(), deadline),
        Err(DhtError::RateLimited)
    );
    assert_eq!(node.counters.lookups_started.load(Ordering::Relaxed), 2);
    assert_eq!(
        node.counters.lookups_rate_limited.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn dht_start_refuses_a_bootstrap_list_that_does_not_resolve() {
    let cfg = dht_config(&["no-such-host.invalid:6881".to_string()]);
    assert!(dht::start(&cfg).is_err());
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
