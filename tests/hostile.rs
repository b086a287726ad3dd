//! Hostile input against the real `magnetar serve` binary on loopback: what the issue
//! "Reliability and security" lists and `server_protocol.rs` / `upstream_*.rs` do not
//! already cover. Each test states the expected answer (close, ignore, bound) and then
//! checks that the server is still healthy: the process is alive, no session panicked
//! (`magnetar_session_panics_total` is 0), every core's heartbeat still advances (no core
//! is stuck or gone), and a normal client gets a stored torrent in under a second.
//!
//! Already covered elsewhere (not repeated here):
//! - garbage / wrong protocol string instead of a handshake, a 4 GiB length prefix, a
//!   frame that stops half way, out-of-range and "negative" (>= 2^31) pieces, a request
//!   flood past reqq, handshake / idle timeouts, per-IP and global connection caps, a
//!   second extension handshake that changes or disables our id:
//!   `server_protocol.rs`
//! - lying upstream peers (metadata_size too large or changing, unrequested pieces,
//!   wrong sizes, wrong bytes, silence): `upstream_fetch.rs`
//! - trackers answering garbage, too-large bodies, silence: `upstream_sources.rs`
//!
//! Every loop here has a count bound and a time bound, and every address is on loopback
//! (127.0.0.0/8). The figures the tests measure (KiB per idle connection, upstream
//! packets per random-hash handshake, RSS deltas) are printed; run with `--nocapture` to
//! see them. SECURITY.md quotes them.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kit::*;
use common::peer::*;
use common::ServerProc;
use magnetar::wire::{
    decode_frame, encode_metadata_request, Decoded, ExtHandshake, Frame, HANDSHAKE_LEN,
};
use sha1::{Digest, Sha1};

// ---------------------------------------------------------------------------------------
// Client side: a blocking peer with deadlines.
// ---------------------------------------------------------------------------------------

const OUR_ID: u8 = 5;

/// A hit: our handshake + extension handshake (ut_metadata = OUR_ID); reads the server's
/// handshake and extension handshake. Returns the peer and the server's ut_metadata id.
fn open_hit(addr: SocketAddr, key: &[u8; 20]) -> (Peer, u8) {
    let o = open(addr, key, OUR_ID);
    (o.peer, o.server_id)
}

// ---------------------------------------------------------------------------------------
// 1. Bencode bombs in the extension handshake.
// ---------------------------------------------------------------------------------------

/// Payloads that are not a valid, bounded bencoded dict: the connection is closed right
/// after our handshakes, with nothing else sent, and the server is fine.
fn bencode_bombs() -> Vec<(&'static str, Vec<u8>)> {
    let nest = |n: usize, open: &[u8], leaf: &[u8]| {
        let mut v = Vec::new();
        for _ in 0..n {
            v.extend_from_slice(open);
        }
        v.extend_from_slice(leaf);
        v.extend(std::iter::repeat_n(b'e', n));
        v
    };
    let mut in_m = b"d1:m".to_vec();
    in_m.extend(nest(70, b"d1:a", b"i1e"));
    in_m.push(b'e');
    vec![
        // 20 000 bytes: over EXT_HANDSHAKE_BYTES_MAX (16 KiB), under FRAME_BYTES_MAX.
        ("10k nested lists", nest(10_000, b"l", b"")),
        // 16 000 bytes: under the size cap, so the depth cap (64) must catch it.
        ("8k nested lists", nest(8_000, b"l", b"")),
        ("70 nested dicts under m", in_m),
        (
            "string length 4294967295",
            b"d1:md11:ut_metadatai1ee1:v4294967295:abce".to_vec(),
        ),
        (
            "string length past usize",
            b"d1:v99999999999999999999999:abce".to_vec(),
        ),
        (
            "integer overflow as the payload",
            b"i99999999999999999999999e".to_vec(),
        ),
        (
            "a dict that never ends",
            b"d1:md11:ut_metadatai1ee".to_vec(),
        ),
        ("a dict key that is an integer", b"di1ei2ee".to_vec()),
        ("leading zero length", b"d01:mdee".to_vec()),
    ]
}

#[test]
fn bencode_bombs_in_the_extension_handshake_are_closed() {
    let fx = fixture();
    let mut server = serve(&fx, &["--handshake-hold-ms", "200"]);
    let before = metrics(&server);
    let bombs = bencode_bombs();
    for (what, bomb) in &bombs {
        // As the first message after the handshake, in the same write.
        let mut p = Peer::connect(server.addr);
        let mut wire = handshake(reserved(false), &fx.small.key);
        wire.extend(extended(0, bomb));
        p.try_send(&wire);
        let (got, took) = p
            .closed_within(PROMPT)
            .unwrap_or_else(|| panic!("{what}: still open after {PROMPT:?}"));
        assert!(
            took < Duration::from_secs(2),
            "{what}: closed after {took:?}"
        );
        // Our handshake and extension handshake (a hit answers at once), nothing more.
        assert!(got.len() >= HANDSHAKE_LEN, "{what}: {got:?}");
        let mut rest = &got[HANDSHAKE_LEN..];
        let mut frames = 0;
        while let Ok(Decoded::Done(f, n)) = decode_frame(rest) {
            assert!(matches!(f, Frame::Extended { id: 0, .. }), "{what}: {f:?}");
            rest = &rest[n..];
            frames += 1;
        }
        assert!(rest.is_empty() && frames <= 1, "{what}: {got:?}");

        // As a later extension handshake on a connection that is being served.
        let (mut p, server_id) = open_hit(server.addr, &fx.small.key);
        fetch_all_on(&mut p, server_id, &fx.small, OUR_ID);
        p.try_send(&extended(0, bomb));
        let (got, _) = p
            .closed_within(PROMPT)
            .unwrap_or_else(|| panic!("{what} (later): still open"));
        assert!(got.is_empty(), "{what} (later): sent {got:?}");

        normal_fetch(&server, &fx.normal, what);
    }
    let (m, _) = metrics_until(&server, PROMPT, |m| {
        get(m, "magnetar_protocol_errors_total")
            >= get(&before, "magnetar_protocol_errors_total") + 2 * bombs.len() as u64
    });
    assert_eq!(
        get(&m, "magnetar_protocol_errors_total") - get(&before, "magnetar_protocol_errors_total"),
        2 * bombs.len() as u64,
        "each bomb counted once as a protocol error"
    );
    assert_healthy(&mut server, &before, &fx.normal, "after bencode bombs");
}

/// Integers that overflow in *fields* of a well-formed extension handshake are ignored
/// (the field counts as absent, as libtorrent does), not fatal: a `reqq` or `p` of
/// 10^23 is nonsense but not an attack on us. An overflowing `ut_metadata` id means the
/// peer gave us no usable id: its requests go unanswered until a later handshake
/// gives one. A `metadata_size` that fits u64 but is absurd on a miss is refused as a
/// client fill (nothing allocated).
#[test]
fn integer_overflow_in_extension_handshake_fields_is_ignored() {
    let fx = fixture();
    let mut server = serve(&fx, &["--handshake-hold-ms", "200"]);
    let before = metrics(&server);
    let big = "99999999999999999999999";

    // Overflowing reqq, p, metadata_size (and a negative one): served with our id.
    let payload = format!(
        "d1:md11:ut_metadatai{OUR_ID}ee13:metadata_sizei{big}e1:pi{big}e4:reqqi-{big}e1:v4:hoste"
    );
    let mut p = Peer::connect(server.addr);
    let mut wire = handshake(reserved(false), &fx.normal.key);
    wire.extend(extended(0, payload.as_bytes()));
    p.try_send(&wire);
    p.read_exact(HANDSHAKE_LEN, PROMPT, "handshake");
    assert!(matches!(p.recv(PROMPT), Recv::Msg(_)));
    fetch_all_on(&mut p, 2, &fx.normal, OUR_ID);

    // Overflowing ut_metadata id: no usable id, requests unanswered, connection kept;
    // a later handshake with a valid id makes it usable.
    let payload = format!("d1:md11:ut_metadatai{big}eee");
    let mut p = Peer::connect(server.addr);
    let mut wire = handshake(reserved(false), &fx.small.key);
    wire.extend(extended(0, payload.as_bytes()));
    p.try_send(&wire);
    p.read_exact(HANDSHAKE_LEN, PROMPT, "handshake");
    assert!(matches!(p.recv(PROMPT), Recv::Msg(_)));
    let mut req = Vec::new();
    encode_metadata_request(&mut req, 2, 0);
    p.try_send(&req);
    p.assert_quiet(Duration::from_millis(300), "requests without a usable id");
    p.try_send(&ext_handshake(Some(9)));
    fetch_all_on(&mut p, 2, &fx.small, 9);

    // A miss whose client claims a metadata_size of u64::MAX: the client fill is refused
    // before anything is allocated; the session waits for the (sourceless) fetch.
    let payload = format!(
        "d1:md11:ut_metadatai{OUR_ID}ee13:metadata_sizei{}ee",
        u64::MAX
    );
    let mut p = Peer::connect(server.addr);
    let mut wire = handshake(reserved(false), &[0x77; 20]);
    wire.extend(extended(0, payload.as_bytes()));
    p.try_send(&wire);
    p.read_exact(HANDSHAKE_LEN, PROMPT, "miss handshake");
    let (m, refused) = metrics_until(&server, PROMPT, |m| {
        get(m, "magnetar_client_fills_total{result=\"refused\"}") >= 1
    });
    assert!(refused, "client fill of u64::MAX bytes not refused");
    assert_eq!(
        get(&m, "magnetar_client_fills_total{result=\"started\"}"),
        0
    );
    drop(p);

    assert_eq!(get(&m, "magnetar_protocol_errors_total"), 0);
    assert_healthy(&mut server, &before, &fx.normal, "after overflowing fields");
}

// ---------------------------------------------------------------------------------------
// 2. Extension messages with ids we never offered: ignored.
// ---------------------------------------------------------------------------------------

/// Extended ids we did not offer (3, 77, 255; ut_pex's 1 on a hit, where we do not offer
/// it) and BEP 3 ids we do not know (BEP 52's 21–23, 99) are consumed and ignored,
/// whatever their payload; the connection keeps being served. A malformed message on our
/// own ut_metadata id closes it (the stream is not BEP 9). A second extension handshake
/// that changes ids is followed: `server_protocol::later_extension_handshake_changes_or_
/// disables_our_id`.
#[test]
fn extension_messages_with_unknown_ids_are_ignored() {
    let fx = fixture();
    let mut server = serve(&fx, &[]);
    let before = metrics(&server);
    let (mut p, server_id) = open_hit(server.addr, &fx.normal.key);
    assert_eq!(server_id, 2);
    let garbage: Vec<u8> = (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let mut wire = Vec::new();
    for id in [3u8, 77, 255, 1] {
        wire.extend(extended(id, &garbage));
        wire.extend(extended(id, b""));
        wire.extend(extended(id, b"d8:msg_typei0e5:piecei0ee"));
    }
    for id in [21u8, 22, 23, 99, 200] {
        wire.extend(raw_frame(id, &garbage[..100]));
    }
    // BEP 3 requests for blocks we do not have: ignored too (we have no pieces).
    wire.extend(raw_frame(6, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0]));
    assert!(p.try_send(&wire));
    p.assert_quiet(Duration::from_millis(300), "after unknown ids");
    fetch_all_on(&mut p, server_id, &fx.normal, OUR_ID);

    // Garbage on our own ut_metadata id: closed, nothing sent.
    let (mut p, server_id) = open_hit(server.addr, &fx.small.key);
    p.try_send(&extended(server_id, &garbage));
    let (got, _) = p
        .closed_within(PROMPT)
        .expect("garbage ut_metadata message: still open");
    assert!(got.is_empty(), "{got:?}");

    let m = metrics(&server);
    assert_eq!(
        get(&m, "magnetar_protocol_errors_total") - get(&before, "magnetar_protocol_errors_total"),
        1
    );
    assert_healthy(&mut server, &before, &fx.normal, "after unknown ids");
}

// ---------------------------------------------------------------------------------------
// 3. Slowloris.
// ---------------------------------------------------------------------------------------

/// A valid handshake sent one byte a second is closed at the handshake timeout (an
/// absolute deadline from the connect, not reset by each byte), sixteen of them at once,
/// while a normal client is served at normal latency.
#[test]
fn slowloris_handshake_one_byte_a_second_is_closed_at_the_handshake_timeout() {
    let fx = fixture();
    let mut server = serve(&fx, &["--handshake-timeout-ms", "2500"]);
    let before = metrics(&server);
    let addr = server.addr;
    let key = fx.small.key;
    let loris: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut p = Peer::connect(addr);
                let start = Instant::now();
                let hs = handshake(reserved(false), &key);
                for (i, b) in hs.iter().enumerate() {
                    if !p.try_send(&[*b]) {
                        return (i, start.elapsed());
                    }
                    if let Some((got, _)) = p.closed_within(Duration::from_secs(1)) {
                        assert!(got.is_empty(), "{got:?}");
                        return (i + 1, start.elapsed());
                    }
                    assert!(start.elapsed() < Duration::from_secs(10));
                }
                panic!("a one-byte-a-second handshake was completed and answered");
            })
        })
        .collect();
    // Meanwhile, normal clients are unaffected.
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        worst = worst.max(normal_fetch(&server, &fx.normal, "during slowloris"));
        std::thread::sleep(Duration::from_millis(300 * (i % 2)));
    }
    for l in loris {
        let (bytes, took) = l.join().expect("slowloris thread");
        assert!(bytes <= 4, "{bytes} bytes accepted");
        assert!(
            took >= Duration::from_millis(2000) && took < Duration::from_millis(4500),
            "closed after {took:?}, handshake timeout 2.5 s"
        );
    }
    let m = metrics(&server);
    assert!(
        get(&m, "magnetar_session_timeouts_total{phase=\"handshake\"}")
            - get(
                &before,
                "magnetar_session_timeouts_total{phase=\"handshake\"}"
            )
            >= 16
    );
    println!("slowloris handshake: 16 closed at ~2.5 s; normal fetch worst {worst:?}");
    assert_healthy(
        &mut server,
        &before,
        &fx.normal,
        "after slowloris handshakes",
    );
}

/// After the handshake, a peer that trickles one byte of a frame every 400 ms and never
/// completes it is closed at the idle timeout (1.5 s here): bytes that never make a
/// message are not activity. (Complete messages, keep-alives included, are activity:
/// a peer sending a keep-alive every minute holds its slot, bounded by
/// `connections-per-ip-max`; see the next test.)
#[test]
fn slowloris_partial_frame_trickle_is_closed_at_the_idle_timeout() {
    let fx = fixture();
    let mut server = serve(
        &fx,
        &[
            "--idle-timeout-ms",
            "1500",
            "--keepalive-interval-ms",
            "600",
        ],
    );
    let before = metrics(&server);
    let (mut p, server_id) = open_hit(server.addr, &fx.small.key);
    // A request, but announced as 64 KiB long: it can never complete at this rate.
    let mut frame = (64u32 * 1024).to_be_bytes().to_vec();
    frame.push(20);
    frame.push(server_id);
    frame.extend_from_slice(b"d8:msg_typei0e5:piecei0ee");
    frame.resize(64 * 1024 + 4, b' ');
    let start = Instant::now();
    let mut closed_at = None;
    for b in frame.iter().take(20) {
        if !p.try_send(&[*b]) {
            closed_at = Some(start.elapsed());
            break;
        }
        // Keep-alives may come; a close ends the trickle.
        let wait = Instant::now() + Duration::from_millis(400);
        while let Some(left) = wait.checked_duration_since(Instant::now()) {
            match p.recv(left) {
                Recv::Msg(m) => assert!(m.is_keepalive(), "{m:?}"),
                Recv::Closed => {
                    closed_at = Some(start.elapsed());
                    break;
                }
                Recv::Timeout => break,
            }
        }
        if closed_at.is_some() {
            break;
        }
    }
    let closed_at = closed_at.unwrap_or_else(|| {
        panic!(
            "a peer trickling a never-ending frame (1 byte / 400 ms) is still open after \
             {:?}, idle timeout 1.5 s",
            start.elapsed()
        )
    });
    assert!(
        closed_at < Duration::from_secs(4),
        "closed after {closed_at:?}"
    );
    assert_healthy(&mut server, &before, &fx.normal, "after a trickling peer");
}

/// Slow peers that hold their slot with keep-alives cannot take more than
/// `connections-per-ip-max` slots from one address: the next connection from it is
/// refused at once, and another address is served at normal latency.
#[test]
fn trickling_peers_are_bounded_by_the_per_ip_cap() {
    let fx = fixture();
    let mut server = serve(&fx, &["--connections-per-ip-max", "8"]);
    let before = metrics(&server);
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = connect_from(src(50), server.addr).unwrap();
        let mut p = Peer::wrap(s);
        let mut first = handshake(reserved(false), &fx.small.key);
        first.extend(ext_handshake(Some(OUR_ID)));
        assert!(p.try_send(&first));
        p.read_exact(HANDSHAKE_LEN, PROMPT, "held peer");
        held.push(p);
    }
    for round in 0..3 {
        for p in &mut held {
            assert!(
                p.try_send(&[0, 0, 0, 0]),
                "held peer closed in round {round}"
            );
        }
        let mut ninth = Peer::wrap(connect_from(src(50), server.addr).unwrap());
        ninth.try_send(&handshake(reserved(false), &fx.small.key));
        let (got, took) = ninth.closed_within(PROMPT).expect("9th from one address");
        assert!(
            got.is_empty() && took < Duration::from_secs(1),
            "{got:?} {took:?}"
        );
        normal_fetch(&server, &fx.normal, "other address while one is capped");
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = metrics(&server);
    assert!(
        get(&m, "magnetar_connections_refused_total{reason=\"per_ip\"}") >= 3,
        "refusals counted"
    );
    assert_healthy(&mut server, &before, &fx.normal, "with a capped address");
}

// ---------------------------------------------------------------------------------------
// 4. 10k idle connections.
// ---------------------------------------------------------------------------------------

/// Raises this process's RLIMIT_NOFILE (the server inherits it) towards `want`; returns
/// the soft limit in effect.
fn raise_nofile(want: u64) -> u64 {
    // SAFETY: plain data in and out of get/setrlimit.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur >= want {
            return r.rlim_cur;
        }
        // Root may raise the hard limit too; if not, go up to the hard limit.
        let both = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return want;
        }
        r.rlim_cur = r.rlim_max.min(want);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

/// The heaviest test of the file (~5 s on 2 cores; bounded: 2 × 10k connects within a
/// 20 s budget, every wait capped). Runs in CI like the rest. 10 000 connections from 10
/// loopback addresses, each past the handshake (a hit) and then silent. The server holds
/// them all while a normal client is served at normal latency, and its RSS grows by a few
/// KiB per connection (printed). Closing them all brings `connections_open` back to 0 and
/// `connections_closed` up to `connections_accepted`. A second round must not grow RSS
/// further (nothing per connection outlives it).
#[test]
fn ten_thousand_idle_connections_while_a_normal_client_is_served() {
    const IDLE: usize = 10_000;
    const SOURCES: usize = 10;
    let limit = raise_nofile(IDLE as u64 * 2 + 4096);
    assert!(
        limit >= IDLE as u64 + 2048,
        "RLIMIT_NOFILE {limit} is too low for {IDLE} connections"
    );
    let budget = Instant::now() + Duration::from_secs(20);
    let fx = fixture();
    let mut server = serve(
        &fx,
        &[
            "--connections-max",
            "20000",
            "--connections-per-ip-max",
            "20000",
        ],
    );
    normal_fetch(&server, &fx.normal, "warm-up");
    let before = metrics(&server);
    let rss_before = rss_kib(&server);

    let mut first = handshake(reserved(false), &fx.small.key);
    first.extend(ext_handshake(Some(OUR_ID)));
    // Two rounds: the second must not grow the server's memory (nothing per connection
    // outlives it; the allocator reuses what the first round freed).
    let mut rss_rounds = Vec::new();
    for round in 0..2 {
        let start = Instant::now();
        let mut idle = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            assert!(
                Instant::now() < budget,
                "round {round}: only {i} connections in budget"
            );
            let mut s = connect_from(src(100 + (i % SOURCES) as u8), server.addr)
                .unwrap_or_else(|e| panic!("round {round}, connection {i}: {e}"));
            s.write_all(&first).unwrap();
            idle.push(s);
        }
        let connected = start.elapsed();
        let (m, all_open) = metrics_until(&server, Duration::from_secs(10), |m| {
            get(m, "magnetar_connections_open") >= IDLE as u64
                && get(m, "magnetar_hits_total")
                    >= get(&before, "magnetar_hits_total") + ((round + 1) * IDLE) as u64
        });
        assert!(
            all_open,
            "round {round}: server holds {} of {IDLE} connections ({} hits)",
            get(&m, "magnetar_connections_open"),
            get(&m, "magnetar_hits_total")
        );
        let rss_held = rss_kib(&server);
        let mut worst = Duration::ZERO;
        for _ in 0..5 {
            worst = worst.max(normal_fetch(
                &server,
                &fx.normal,
                "with 10k idle connections",
            ));
        }
        let per_conn = (rss_held.saturating_sub(rss_before)) as f64 / IDLE as f64;
        println!(
            "10k idle, round {round}: connected in {connected:?}; RSS {rss_before} KiB -> \
             {rss_held} KiB = {per_conn:.2} KiB per idle connection; normal fetch worst {worst:?}"
        );
        assert!(
            per_conn < 32.0,
            "{per_conn:.1} KiB per idle connection (limits.rs promises a few KiB)"
        );
        rss_rounds.push(rss_held);

        drop(idle);
        let (m, drained) = metrics_until(&server, Duration::from_secs(10), |m| {
            get(m, "magnetar_connections_open") == 0
                && get(m, "magnetar_connections_closed_total")
                    == get(m, "magnetar_connections_accepted_total")
        });
        assert!(
            drained,
            "after closing: open {}, accepted {}, closed {}",
            get(&m, "magnetar_connections_open"),
            get(&m, "magnetar_connections_accepted_total"),
            get(&m, "magnetar_connections_closed_total")
        );
        println!(
            "10k idle, round {round}: RSS after closing them all {} KiB",
            rss_kib(&server)
        );
    }
    let growth = rss_rounds[1] as f64 / rss_rounds[0] as f64;
    assert!(
        growth < 1.15,
        "a second round of 10k connections grew RSS {} -> {} KiB",
        rss_rounds[0],
        rss_rounds[1]
    );
    assert_healthy(
        &mut server,
        &before,
        &fx.normal,
        "after 10k idle connections",
    );
}

// ---------------------------------------------------------------------------------------
// 5. Connect/close storms.
// ---------------------------------------------------------------------------------------

/// 20 000 connections opened and closed as fast as two threads can (bounded by 20 s):
/// a quarter each reset at once, closed at once, reset after 20 garbage bytes, closed
/// right after a full handshake. Afterwards every accepted connection is counted closed,
/// none is open, and the server serves at normal latency.
#[test]
fn connect_close_storm_leaves_the_server_fine() {
    const PER_THREAD: usize = 10_000;
    raise_nofile(8192);
    let fx = fixture();
    let mut server = serve(&fx, &[]);
    let before = metrics(&server);
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = server.addr;
    let key = fx.small.key;
    let start = Instant::now();
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut done = 0usize;
                let mut failed = 0usize;
                for i in 0..PER_THREAD {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let sock = socket_from(src(150 + t * 8 + (i % 8) as u8));
                    if sock.connect_timeout(&addr.into(), PROMPT).is_err() {
                        failed += 1;
                        continue;
                    }
                    match i % 4 {
                        0 => sock.set_linger(Some(Duration::ZERO)).unwrap(),
                        1 => {}
                        2 => {
                            let _ = sock.send(&[0x42; 20]);
                            sock.set_linger(Some(Duration::ZERO)).unwrap();
                        }
                        _ => {
                            let _ = sock.send(&handshake(reserved(false), &key));
                        }
                    }
                    drop(sock);
                    done += 1;
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0, 0);
    for t in threads {
        let (d, f) = t.join().unwrap();
        done += d;
        failed += f;
    }
    let took = start.elapsed();
    let (m, drained) = metrics_until(&server, Duration::from_secs(10), |m| {
        get(m, "magnetar_connections_open") == 0
            && get(m, "magnetar_connections_closed_total")
                == get(m, "magnetar_connections_accepted_total")
    });
    let accepted = get(&m, "magnetar_connections_accepted_total")
        - get(&before, "magnetar_connections_accepted_total");
    let refused = get(&m, "magnetar_connections_refused_total{reason=\"per_ip\"}")
        + get(&m, "magnetar_connections_refused_total{reason=\"global\"}");
    println!(
        "storm: {done} connect+close in {took:?} ({:.0}/s), {failed} connects failed; \
         server accepted {accepted}, refused {refused}, handshakes {}, invalid {}",
        done as f64 / took.as_secs_f64(),
        get(&m, "magnetar_handshakes_total"),
        get(&m, "magnetar_handshakes_invalid_total"),
    );
    assert!(
        drained,
        "connections_closed does not catch up: open {}, accepted {}, closed {}",
        get(&m, "magnetar_connections_open"),
        get(&m, "magnetar_connections_accepted_total"),
        get(&m, "magnetar_connections_closed_total")
    );
    assert!(done >= 2000, "only {done} connections in 20 s");
    assert!(
        failed * 100 <= done,
        "{failed} of {done} connects failed (listen backlog overflow?)"
    );
    assert_healthy(
        &mut server,
        &before,
        &fx.normal,
        "after a connect/close storm",
    );
}

// ---------------------------------------------------------------------------------------
// 6. Amplification: handshakes for random info-hashes.
// ---------------------------------------------------------------------------------------

/// A UDP "tracker" that counts datagrams and never answers, and a TCP "parent" that counts
/// connections and closes each at once: every packet a miss sends upstream lands here.
struct Upstream {
    udp_port: u16,
    tcp_port: u16,
    datagrams: Arc<AtomicUsize>,
    connects: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let up = Upstream {
            udp_port: udp.local_addr().unwrap().port(),
            tcp_port: tcp.local_addr().unwrap().port(),
            datagrams: Arc::default(),
            connects: Arc::default(),
            stop: Arc::default(),
        };
        let (count, stop) = (up.datagrams.clone(), up.stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if udp.recv_from(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let (count, stop) = (up.connects.clone(), up.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        up
    }

    fn flags(&self) -> [String; 4] {
        [
            "--tracker".into(),
            format!("udp://127.0.0.1:{}/announce", self.udp_port),
            "--parent".into(),
            format!("127.0.0.1:{}", self.tcp_port),
        ]
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.datagrams.load(Ordering::SeqCst),
            self.connects.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A key nobody has: a counter hashed (distinct per call and per test).
fn random_key(tag: u64, i: u64) -> [u8; 20] {
    let mut h = Sha1::new();
    h.update(b"hostile random key");
    h.update(tag.to_le_bytes());
    h.update(i.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.finalize().into()
}

/// One handshake for `key` from `source`; waits (bounded) until the server answered or
/// closed, so the server has decided on the miss before the next one, then hangs up.
fn miss_handshake(source: Ipv4Addr, addr: SocketAddr, key: &[u8; 20]) {
    let Ok(s) = connect_from(source, addr) else {
        return;
    };
    let mut p = Peer::wrap(s);
    if !p.try_send(&handshake(reserved(false), key)) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.buf.len() < HANDSHAKE_LEN && p.fill(deadline) == Ok(true) {}
}

const UDP_SENDS_PER_ANNOUNCE_MAX: usize = 3; // 4 s tracker timeout: sends at 0, 1, 3 s

/// Waits until every started fetch has ended (fetch timeout 4 s), then a little for the
/// last datagrams.
fn fetches_settled(server: &ServerProc) -> Metrics {
    let ended = |m: &Metrics| {
        get(m, "magnetar_upstream_fetches_failed_deadline_total")
            + get(m, "magnetar_upstream_fetches_failed_no_peers_total")
            + get(m, "magnetar_upstream_fetches_failed_other_total")
            + get(m, "magnetar_upstream_fetches_succeeded_total")
    };
    let (m, settled) = metrics_until(server, Duration::from_secs(15), |m| {
        ended(m) >= get(m, "magnetar_upstream_fetches_started_total")
    });
    assert!(settled, "fetches did not end within 15 s");
    std::thread::sleep(Duration::from_millis(300));
    m
}

/// 2000 handshakes for random unknown info-hashes from one address: the per-IP miss
/// window (30 a minute) admits 30, so 30 fetches, each one announce to the tracker (at
/// most 3 datagrams with a 4 s fetch timeout) and one connect to the parent. Then 25
/// handshakes for one unknown hash from another address make one fetch (the rest join
/// it), and after it failed, 25 more from a third address make none (negative cache).
#[test]
fn random_hash_handshakes_from_one_ip_are_capped_by_the_per_ip_window() {
    const N: u64 = 2000;
    let fx = fixture();
    let up = Upstream::start();
    let flags = up.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--fetch-timeout-ms", "4000", "--handshake-hold-ms", "100"]);
    let mut server = serve(&fx, &args);
    let before = metrics(&server);
    let start = Instant::now();
    for i in 0..N {
        assert!(start.elapsed() < Duration::from_secs(20), "slow at {i}");
        miss_handshake(src(60), server.addr, &random_key(1, i));
    }
    let burst = start.elapsed();
    let one = random_key(2, 0);
    for _ in 0..25 {
        miss_handshake(src(61), server.addr, &one);
    }
    normal_fetch(&server, &fx.normal, "during random-hash misses");
    let m = fetches_settled(&server);
    let (datagrams, connects) = up.counts();
    let fetches = get(&m, "magnetar_upstream_fetches_started_total");
    let misses = get(&m, "magnetar_misses_total");
    let refused_ip = get(&m, "magnetar_misses_refused_per_ip_total");
    println!(
        "amplification, one IP: {N} random-hash handshakes in {burst:?} -> {misses} misses \
         seen, {refused_ip} refused by the per-IP window, {fetches} fetches (incl. 1 for the \
         shared hash, {} joins) -> {datagrams} UDP datagrams, {connects} TCP connects = \
         {:.4} datagrams + {:.4} connects per handshake",
        get(&m, "magnetar_upstream_joins_total"),
        datagrams as f64 / (N + 25) as f64,
        connects as f64 / (N + 25) as f64,
    );
    assert_eq!(misses, N + 25, "every handshake reached the server");
    assert_eq!(
        fetches,
        30 + 1,
        "30 per minute from one IP, +1 for the shared hash"
    );
    assert_eq!(refused_ip, N - 30);
    assert_eq!(get(&m, "magnetar_upstream_joins_total"), 24);
    assert_eq!(connects as u64, fetches, "one parent connect per fetch");
    assert!(
        datagrams as u64 <= fetches * UDP_SENDS_PER_ANNOUNCE_MAX as u64,
        "{datagrams} datagrams for {fetches} fetches"
    );
    assert!(datagrams as u64 >= fetches, "each fetch announced");

    // The shared hash failed: now negative-cached, no upstream packet for it.
    for _ in 0..25 {
        miss_handshake(src(62), server.addr, &one);
    }
    std::thread::sleep(Duration::from_millis(300));
    let m = metrics(&server);
    assert_eq!(get(&m, "magnetar_upstream_fetches_started_total"), fetches);
    assert_eq!(
        get(&m, "magnetar_upstream_refused_negative_cache_total"),
        25
    );
    assert_eq!(
        up.counts(),
        (datagrams, connects),
        "no packet for a cached failure"
    );
    assert_healthy(&mut server, &before, &fx.normal, "after random-hash misses");
}

/// 2000 handshakes for random hashes from 20 addresses (100 each): the per-IP window
/// would admit 600, but the global bounds hold it lower: at most `fetches_per_shard_max`
/// (64) running per shard (2 shards) and `misses_per_second_max` (100/s, burst 100).
#[test]
fn random_hash_handshakes_from_many_ips_are_capped_by_the_global_bounds() {
    const IPS: u8 = 20;
    const PER_IP: u64 = 100;
    let fx = fixture();
    let up = Upstream::start();
    let flags = up.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--fetch-timeout-ms", "4000", "--handshake-hold-ms", "100"]);
    let mut server = serve(&fx, &args);
    let before = metrics(&server);
    let addr = server.addr;
    let start = Instant::now();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..PER_IP * IPS as u64 / 4 {
                    if start.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let ip = t * (IPS / 4) + (i % (IPS / 4) as u64) as u8;
                    miss_handshake(src(200 + ip), addr, &random_key(3 + t as u64, i));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let burst = start.elapsed();
    let m_burst = metrics(&server);
    normal_fetch(
        &server,
        &fx.normal,
        "during random-hash misses from many IPs",
    );
    let m = fetches_settled(&server);
    let (datagrams, connects) = up.counts();
    let n = PER_IP * IPS as u64;
    let fetches = get(&m, "magnetar_upstream_fetches_started_total");
    println!(
        "amplification, {IPS} IPs: {n} random-hash handshakes in {burst:?} -> {} misses, \
         {} refused per IP, {} refused fetches_per_shard_max, {} refused \
         misses_per_second_max -> {fetches} fetches -> {datagrams} UDP datagrams, \
         {connects} TCP connects = {:.4} datagrams + {:.4} connects per handshake",
        get(&m, "magnetar_misses_total"),
        get(&m, "magnetar_misses_refused_per_ip_total"),
        get(&m, "magnetar_upstream_refused_fetches_per_shard_total"),
        get(&m, "magnetar_upstream_refused_misses_per_second_total"),
        datagrams as f64 / n as f64,
        connects as f64 / n as f64,
    );
    assert_eq!(get(&m, "magnetar_misses_total"), n);
    // Per IP: 30 a minute.
    assert!(fetches <= IPS as u64 * 30);
    // Global token bucket: 100 at once, then 100 a second.
    let bucket = 100 + (100.0 * (burst.as_secs_f64() + 0.5)) as u64;
    assert!(
        fetches <= bucket,
        "{fetches} fetches > bucket bound {bucket}"
    );
    // Running at once: 64 per shard; every fetch lasts 4 s, so within a burst shorter
    // than that no more than 2 × 64 can have started.
    if burst < Duration::from_millis(3500) {
        assert!(
            get(&m_burst, "magnetar_upstream_fetches_started_total") <= 2 * 64,
            "more fetches than fetches_per_shard_max × shards"
        );
    }
    assert!(
        get(&m, "magnetar_upstream_refused_fetches_per_shard_total")
            + get(&m, "magnetar_upstream_refused_misses_per_second_total")
            > 0,
        "a global bound was reached"
    );
    assert_eq!(connects as u64, fetches, "one parent connect per fetch");
    assert!(datagrams as u64 <= fetches * UDP_SENDS_PER_ANNOUNCE_MAX as u64);
    assert_healthy(
        &mut server,
        &before,
        &fx.normal,
        "after random-hash misses from many IPs",
    );
}

/// Peers at 127.a.b.c:PORT (any a, b, c) for the server to dial: a wildcard listener on
/// PORT receives them all, counts each connection and closes it at once (the server's
/// peer fails fast and it moves on). Only loopback sources are expected (the server under
/// test). Returns (PORT, connections, stop flag).
fn counting_peers() -> (u16, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tried = Arc::new(AtomicUsize::new(0));
    let (s, t) = (stop.clone(), tried.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, from)) => {
                    assert!(from.ip().is_loopback(), "connection from {from}");
                    t.fetch_add(1, Ordering::SeqCst);
                    drop(conn);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    (port, tried, stop)
}

/// Amplification through ut_pex: a client waiting on a miss sends 90 ut_pex messages of
/// 50 peers each (4 500 distinct addresses it chose), one every 30 ms so that the fetch
/// drains its candidate queue (1024) in between. The fetch dials them (8 at once), so one
/// handshake plus ~29 KB of PEX makes the server open TCP connections to addresses of the
/// client's choosing. Bounded by `CANDIDATES_PER_FETCH_MAX` (4096) per fetch and by the
/// fetch timeout; the figure is printed. (A client that is the victim's
/// attacker gets ~50 SYNs, plus retransmissions to a silent victim, per 300-byte PEX
/// message: see SECURITY.md.)
#[test]
fn pex_from_a_waiting_client_is_bounded_per_fetch() {
    const MESSAGES: u32 = 90;
    const PER_MESSAGE: u32 = 50;
    let fx = fixture();
    let (peer_port, tried, stop) = counting_peers();
    let mut server = serve(
        &fx,
        &["--fetch-timeout-ms", "4000", "--handshake-hold-ms", "100"],
    );
    let before = metrics(&server);
    let mut p = Peer::connect(server.addr);
    let mut first = handshake(reserved(false), &random_key(30, 0));
    first.extend(ext_handshake(Some(OUR_ID)));
    assert!(p.try_send(&first));
    p.read_exact(HANDSHAKE_LEN, PROMPT, "miss handshake");
    // The held-out extension handshake offers ut_pex while we wait.
    let pex_id = match p.recv(PROMPT) {
        Recv::Msg(m) => match decode_frame(&m.0) {
            Ok(Decoded::Done(Frame::Extended { id: 0, payload }, _)) => {
                ExtHandshake::decode(payload)
                    .unwrap()
                    .ut_pex
                    .expect("ut_pex offered on a miss")
            }
            other => panic!("expected the extension handshake, got {other:?}"),
        },
        other => panic!("expected the extension handshake, got {other:?}"),
    };
    let start = Instant::now();
    let mut pex_bytes = 0;
    for m in 0..MESSAGES {
        let mut compact = Vec::new();
        for k in 0..PER_MESSAGE {
            let i = m * PER_MESSAGE + k;
            compact.extend_from_slice(&[127, 2, (i >> 8) as u8, i as u8]);
            compact.extend_from_slice(&peer_port.to_be_bytes());
        }
        let mut payload = format!("d5:added{}:", compact.len()).into_bytes();
        payload.extend_from_slice(&compact);
        payload.push(b'e');
        let msg = extended(pex_id, &payload);
        pex_bytes += msg.len();
        assert!(p.try_send(&msg), "closed while sending PEX");
        std::thread::sleep(Duration::from_millis(30));
    }
    let closed = p.closed_within(Duration::from_secs(8));
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let m = metrics(&server);
    let tried = tried.load(Ordering::SeqCst);
    println!(
        "pex amplification: 1 handshake + {MESSAGES} ut_pex messages ({pex_bytes} bytes, {} \
         peers taken) -> {tried} outbound TCP connections in {took:?} (one fetch)",
        get(&m, "magnetar_pex_peers_received_total"),
    );
    assert!(
        closed.is_some(),
        "the client is closed when the fetch fails"
    );
    assert_eq!(get(&m, "magnetar_upstream_fetches_started_total"), 1);
    // One connection's PEX feeds at most PEX_PEERS_PER_CONNECTION_MAX (100) candidates,
    // and each candidate gets at most two TCP connections: the plaintext attempt and, after
    // a close without a byte (what a peer that requires encryption does to a plaintext
    // handshake, and what these listeners do), one MSE attempt (upstream/peer.rs).
    assert!(
        tried <= 2 * 100,
        "{tried} connections from one client's PEX"
    );
    assert!(get(&m, "magnetar_pex_peers_received_total") <= 100);
    assert!(tried as u32 <= 2 * MESSAGES * PER_MESSAGE);
    assert_healthy(&mut server, &before, &fx.normal, "after a PEX flood");
}

// ---------------------------------------------------------------------------------------
// 7. A tracker that answers with 100k peers.
// ---------------------------------------------------------------------------------------

/// Every announce gets a compact list of 100 000 distinct peers (600 KB, under the 1 MiB
/// response cap), all on loopback and all on one port where a listener counts
/// connections and closes them. Two concurrent misses: each fetch tries at most
/// `PEERS_PER_RESPONSE_MAX` (500) of them, and the server's RSS stays within 50 MB of
/// where it started.
#[test]
fn tracker_with_a_huge_peer_list_keeps_the_fetch_bounded() {
    const PEERS: u32 = 100_000;
    const MISSES: u64 = 2;
    let fx = fixture();
    let (peer_port, tried, stop) = counting_peers();
    let mut compact = Vec::with_capacity(PEERS as usize * 6);
    for i in 0..PEERS {
        let ip = [127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        compact.extend_from_slice(&ip);
        compact.extend_from_slice(&peer_port.to_be_bytes());
    }
    let mut body = format!("d8:intervali1800e5:peers{}:", compact.len()).into_bytes();
    body.extend_from_slice(&compact);
    body.push(b'e');
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let response = Arc::new(response);
    let tracker = TcpListener::bind("127.0.0.1:0").unwrap();
    let tracker_url = format!("http://{}/announce", tracker.local_addr().unwrap());
    tracker.set_nonblocking(true).unwrap();
    let announces = Arc::new(AtomicUsize::new(0));
    {
        let (stop, announces) = (stop.clone(), announces.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = tracker.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                announces.fetch_add(1, Ordering::SeqCst);
                let response = response.clone();
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(PROMPT)).unwrap();
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(&response);
                });
            }
        });
    }

    let mut server = serve(
        &fx,
        &[
            "--tracker",
            &tracker_url,
            "--fetch-timeout-ms",
            "5000",
            "--handshake-hold-ms",
            "100",
        ],
    );
    normal_fetch(&server, &fx.normal, "warm-up");
    let before = metrics(&server);
    let rss_before = rss_kib(&server);
    let mut waiting = Vec::new();
    for i in 0..MISSES {
        let mut p = Peer::connect(server.addr);
        p.try_send(&handshake(reserved(false), &random_key(10, i)));
        waiting.push(p);
    }
    // Sample RSS until the fetches end.
    let mut rss_max = rss_before;
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        rss_max = rss_max.max(rss_kib(&server));
        let m = metrics(&server);
        let ended = get(&m, "magnetar_upstream_fetches_failed_deadline_total")
            + get(&m, "magnetar_upstream_fetches_failed_no_peers_total")
            + get(&m, "magnetar_upstream_fetches_failed_other_total");
        if ended >= MISSES || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &mut waiting {
        assert!(
            p.closed_within(Duration::from_secs(3)).is_some(),
            "a waiting client is closed when its fetch fails"
        );
    }
    let tried = tried.load(Ordering::SeqCst);
    let announced = announces.load(Ordering::SeqCst);
    let delta_mib = rss_max.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "huge peer list: {MISSES} fetches, {announced} announces answered with {PEERS} peers \
         each -> {tried} peer connections; RSS {rss_before} KiB -> max {rss_max} KiB \
         (+{delta_mib:.1} MiB)"
    );
    stop.store(true, Ordering::Relaxed);
    assert_eq!(announced as u64, MISSES, "one announce per fetch");
    // 100k compact peers are ~600 KB, past TRACKER_RESPONSE_BYTES_MAX (64 KiB): the
    // answer is refused whole, so no peer from it is tried (a smaller oversized list would
    // be cut to PEERS_PER_RESPONSE_MAX).
    assert!(PEERS as usize * 6 > magnetar::upstream::tracker::TRACKER_RESPONSE_BYTES_MAX);
    assert_eq!(tried, 0, "an answer over the size cap is refused whole");
    assert!(delta_mib < 50.0, "RSS grew {delta_mib:.1} MiB");
    assert_healthy(&mut server, &before, &fx.normal, "after huge peer lists");
}

// ---------------------------------------------------------------------------------------
// 8. Malformed DHT replies.
// ---------------------------------------------------------------------------------------

/// The transaction id of a KRPC query (`1:t<len>:<tid>`), if one can be found.
fn krpc_tid(query: &[u8]) -> Option<&[u8]> {
    let at = query.windows(3).position(|w| w == b"1:t")? + 3;
    let colon = at + query[at..].iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&query[at..colon]).ok()?.parse().ok()?;
    query.get(colon + 1..colon + 1 + len)
}

/// A DHT "node" that answers every query with something malformed, in turn: random
/// bytes, truncated bencode, a reply whose `nodes` holds 2 500 entries (65 000 bytes,
/// all pointing back here), a 10k-deep bencode bomb, a reply with integer overflows and
/// wrong types, `values` with peers of the wrong length, an answer to another
/// transaction. Returns (address, queries seen, stop flag).
fn malformed_dht_node() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (q, s) = (queries.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut turn = 0usize;
        let port = addr.port().to_be_bytes();
        while !s.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            q.fetch_add(1, Ordering::SeqCst);
            let tid = krpc_tid(&buf[..n]).unwrap_or(b"aa").to_vec();
            let wrap = |r: &[u8]| {
                let mut v = b"d1:r".to_vec();
                v.extend_from_slice(r);
                v.extend(format!("1:t{}:", tid.len()).bytes());
                v.extend_from_slice(&tid);
                v.extend_from_slice(b"1:y1:re");
                v
            };
            let id: Vec<u8> = (0..20).map(|i| (i * 13 + turn) as u8).collect();
            let reply: Vec<u8> = match turn % 7 {
                0 => (0..200).map(|i| (i * 7 + turn * 3) as u8).collect(),
                1 => {
                    let mut v = wrap(b"d2:id20:");
                    v.truncate(v.len() / 2);
                    v
                }
                2 => {
                    let mut nodes = Vec::with_capacity(2500 * 26);
                    for k in 0..2500u32 {
                        nodes.extend((0..20).map(|j| (k as usize * 31 + j) as u8));
                        nodes.extend_from_slice(&[127, 0, 0, 1]);
                        nodes.extend_from_slice(&port);
                    }
                    let mut r = b"d2:id20:".to_vec();
                    r.extend_from_slice(&id);
                    r.extend(format!("5:nodes{}:", nodes.len()).bytes());
                    r.extend_from_slice(&nodes);
                    r.push(b'e');
                    wrap(&r)
                }
                3 => {
                    let mut v = vec![b'l'; 10_000];
                    v.extend(vec![b'e'; 10_000]);
                    v
                }
                4 => {
                    let mut r = b"d2:idi99999999999999999999999e5:nodesi-1e5:token".to_vec();
                    r.extend_from_slice(b"li1ee6:valuesd1:ai1eee");
                    wrap(&r)
                }
                5 => {
                    let mut r = b"d2:id20:".to_vec();
                    r.extend_from_slice(&id);
                    r.extend_from_slice(b"5:token2:tt6:valuesl5:abcde7:abcdefg0:ee");
                    wrap(&r)
                }
                _ => {
                    let mut r = b"d2:id20:".to_vec();
                    r.extend_from_slice(&id);
                    r.extend_from_slice(b"e1:t2:zz1:y1:re");
                    let mut v = b"d1:r".to_vec();
                    v.extend_from_slice(&r);
                    v
                }
            };
            let _ = sock.send_to(&reply, from);
            turn += 1;
        }
    });
    (addr, queries, stop)
}

/// The server's DHT node bootstraps from a node that answers only malformed replies:
/// the server starts, keeps serving hits at normal latency, a miss fails cleanly at the
/// fetch timeout (its client closed), no core panics and memory stays bounded.
#[test]
fn malformed_dht_replies_leave_the_server_serving() {
    let fx = fixture();
    let (dht, queries, stop) = malformed_dht_node();
    let bootstrap = dht.to_string();
    let mut server = serve(
        &fx,
        &[
            "--dht-bootstrap",
            &bootstrap,
            "--fetch-timeout-ms",
            "3000",
            "--handshake-hold-ms",
            "100",
        ],
    );
    let before = metrics(&server);
    let rss_before = rss_kib(&server);
    normal_fetch(&server, &fx.normal, "with a malformed DHT");
    // Misses drive DHT lookups through the hostile node.
    let mut waiting: Vec<Peer> = (0..3)
        .map(|i| {
            let mut p = Peer::connect(server.addr);
            p.try_send(&handshake(reserved(false), &random_key(20, i)));
            p
        })
        .collect();
    let mut rss_max = rss_before;
    for p in &mut waiting {
        let deadline = Instant::now() + Duration::from_secs(8);
        let closed = loop {
            rss_max = rss_max.max(rss_kib(&server));
            if let Some((got, took)) = p.closed_within(Duration::from_millis(200)) {
                break Some((got, took));
            }
            if Instant::now() >= deadline {
                break None;
            }
        };
        let (got, _) =
            closed.expect("a miss with only a malformed DHT is closed at the fetch timeout");
        assert!(got.len() >= HANDSHAKE_LEN, "our handshake first");
    }
    let m = metrics(&server);
    let seen = queries.load(Ordering::SeqCst);
    println!(
        "malformed DHT: {seen} queries answered with garbage; lookups started {}, refused {}; \
         fetches failed {}; RSS {rss_before} -> max {rss_max} KiB",
        get(&m, "magnetar_upstream_dht_lookups_total"),
        get(&m, "magnetar_upstream_dht_lookups_refused_total"),
        get(&m, "magnetar_upstream_fetches_failed_deadline_total")
            + get(&m, "magnetar_upstream_fetches_failed_no_peers_total"),
    );
    stop.store(true, Ordering::Relaxed);
    assert!(seen > 0, "the server's DHT node asked the bootstrap node");
    assert_eq!(get(&m, "magnetar_upstream_fetches_started_total"), 3);
    assert_eq!(get(&m, "magnetar_upstream_fetches_succeeded_total"), 0);
    assert!(
        (rss_max.saturating_sub(rss_before) as f64) < 50.0 * 1024.0,
        "RSS grew by {} KiB",
        rss_max - rss_before
    );
    assert_healthy(
        &mut server,
        &before,
        &fx.normal,
        "after malformed DHT replies",
    );
}
