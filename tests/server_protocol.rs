//! The real `magnetar serve` binary, driven over loopback TCP by a blocking client built
//! on the crate's own sans-IO codec, follows docs/protocol-facts.md: handshake bits and echo, extension handshake first, HaveNone only
//! with the Fast bit, ut_metadata ids, piece sizes, rejects, the flood cap, hostile input,
//! timeouts, keep-alives and connection caps.
//!
//! Every read has a deadline and every loop a bound, so no test can hang.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::info::*;
use common::peer::*;
use common::*;
use magnetar::limits;
use magnetar::wire::{
    decode_frame, encode_keepalive, Decoded, ExtHandshake, Frame, MetadataMsg, Reserved,
    HANDSHAKE_LEN,
};

const PIECE: usize = limits::METADATA_PIECE_BYTES;

// ---------------------------------------------------------------------------------------
// Test torrents, bencoded by hand (keys sorted), imported with `magnetar import`.
// ---------------------------------------------------------------------------------------

struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    /// v1, one metadata piece.
    small: Torrent,
    /// v1, five metadata pieces (> 64 KiB).
    large: Torrent,
    /// v2 only.
    v2: Torrent,
    /// v1 + v2: handshake by either key.
    hybrid: Torrent,
    hybrid_v2_key: [u8; 20],
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let small = v1_info("small.bin", 500);
    let large = v1_info("large.bin", 4000);
    let v2 = v2_info("v2only.bin");
    let hybrid = hybrid_info("hybrid.bin");
    let data = import_all(
        tmp.path(),
        &[
            ("small", &small),
            ("large", &large),
            ("v2", &v2),
            ("hybrid", &hybrid),
        ],
    );
    let fx = Fixture {
        small: Torrent::v1(small),
        large: Torrent::v1(large),
        v2: Torrent::v2(v2),
        hybrid_v2_key: v2_key(&hybrid),
        hybrid: Torrent::v1(hybrid),
        data,
        _tmp: tmp,
    };
    assert_eq!(fx.small.pieces(), 1);
    assert_eq!(fx.large.pieces(), 5);
    assert!(fx.large.info.len() > 4 * PIECE);
    assert_eq!(fx.v2.pieces(), 1);
    fx
}

fn serve(fx: &Fixture, flags: &[&str]) -> ServerProc {
    let mut args = vec!["--log", "warn", "--threads", "2"];
    args.extend_from_slice(flags);
    ServerProc::start(&fx.data, &args)
}

// ---------------------------------------------------------------------------------------
// 1 + 2 + 3: handshake, extension handshake, HaveNone.
// ---------------------------------------------------------------------------------------

/// We send only the 48-byte head (no peer id); the server answers at once.
fn open_head_only(addr: SocketAddr, key: &[u8; 20], fast: bool) -> Opened {
    let head = handshake(reserved(fast), key)[..48].to_vec();
    let start = Instant::now();
    let o = open_with(Peer::connect(addr), &head);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answer to a 48-byte head took {:?}",
        start.elapsed()
    );
    o
}

fn check_handshake(o: &Opened, key: &[u8; 20], v2_bit: bool, what: &str) {
    let h = &o.handshake;
    assert_eq!(h[0], 19, "{what}");
    assert_eq!(&h[1..20], b"BitTorrent protocol", "{what}");
    assert_eq!(&h[28..48], key, "{what}: must echo exactly our 20 bytes");
    assert_eq!(h[25] & 0x10, 0x10, "{what}: BEP 10 bit (byte 5 0x10)");
    assert_eq!(h[27] & 0x04, 0x04, "{what}: Fast bit (byte 7 0x04)");
    assert_eq!(
        h[27] & 0x10 != 0,
        v2_bit,
        "{what}: v2 upgrade bit (byte 7 0x10) must be set iff the torrent has v2, reserved {:02x?}",
        &h[20..28]
    );
    assert_ne!(
        &h[48..68],
        &CLIENT_PEER_ID,
        "{what}: server has its own peer id"
    );
}

fn check_ext_handshake(o: &Opened, t: &Torrent, reqq: u32, what: &str) {
    let ext = o.ext();
    assert!(matches!(ext.ut_metadata, Some(id) if id != 0), "{what}");
    assert_eq!(ext.metadata_size, Some(t.info.len() as u64), "{what}");
    let v = ext.client.unwrap_or_else(|| panic!("{what}: no `v`"));
    assert!(
        String::from_utf8_lossy(v).starts_with("magnetar"),
        "{what}: v = {:?}",
        String::from_utf8_lossy(v)
    );
    assert_eq!(ext.reqq, Some(reqq), "{what}");
    assert_eq!(ext.yourip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), "{what}");
    let raw = b"6:yourip4:\x7f\x00\x00\x01";
    assert!(
        o.ext_payload.windows(raw.len()).any(|w| w == raw),
        "{what}: yourip must be 4 raw bytes: {:?}",
        String::from_utf8_lossy(&o.ext_payload)
    );
}

#[test]
fn handshake_answers_the_head_at_once_with_the_right_bits_and_extension_handshake() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    let reqq = limits::REQUESTS_QUEUED_MAX as u32;
    let cases: [(&str, &Torrent, [u8; 20], bool); 5] = [
        ("v1 small", &fx.small, fx.small.key, false),
        ("v1 large", &fx.large, fx.large.key, false),
        ("v2 only", &fx.v2, fx.v2.key, true),
        ("hybrid by v1 key", &fx.hybrid, fx.hybrid.key, true),
        ("hybrid by v2 key", &fx.hybrid, fx.hybrid_v2_key, true),
    ];
    for (what, t, key, v2_bit) in cases {
        for fast in [false, true] {
            let what = format!("{what}, fast={fast}");
            let mut o = open_head_only(server.addr, &key, fast);
            check_handshake(&o, &key, v2_bit, &what);
            check_ext_handshake(&o, t, reqq, &what);
            if fast {
                let m = o.peer.msg(&what);
                assert!(
                    matches!(m.frame(), Frame::HaveNone),
                    "{what}: HaveNone must follow the extension handshake, got {m:?}"
                );
            }
            // Our peer id arrives late, then our extension handshake and a request: the
            // next frame is the data message (no bitfield, no HaveNone without Fast).
            std::thread::sleep(Duration::from_millis(20));
            o.peer.send(&CLIENT_PEER_ID);
            let mut wire = ext_handshake(Some(7));
            wire.extend(request(o.server_id, 0));
            o.peer.send(&wire);
            let m = o.peer.msg(&what);
            let (id, msg, _) = m.metadata();
            assert_eq!(id, 7, "{what}");
            assert_eq!(
                msg,
                MetadataMsg::Data {
                    piece: 0,
                    total_size: t.info.len() as u64
                },
                "{what}"
            );
        }
    }
}

#[test]
fn have_none_only_with_fast_bit_and_never_a_bitfield() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    for fast in [false, true] {
        let what = format!("fast={fast}");
        let mut first = handshake(reserved(fast), &fx.large.key);
        first.extend(ext_handshake(Some(3)));
        let mut o = open_with(Peer::connect(server.addr), &first);
        if fast {
            let m = o.peer.msg(&what);
            assert!(matches!(m.frame(), Frame::HaveNone), "{what}: {m:?}");
        }
        // Whatever comes next must be the answer to our request, nothing in between.
        o.peer.send(&request(o.server_id, 1));
        let m = o.peer.msg(&what);
        let (id, msg, block) = m.metadata();
        assert_eq!(id, 3, "{what}");
        assert_eq!(
            msg,
            MetadataMsg::Data {
                piece: 1,
                total_size: fx.large.info.len() as u64
            },
            "{what}"
        );
        assert!(block == fx.large.info[PIECE..2 * PIECE], "{what}");
        o.peer
            .assert_quiet(Duration::from_millis(200), &format!("{what}: after data"));
    }
}

// ---------------------------------------------------------------------------------------
// 4: pipelined fetch with any ut_metadata id, and a stream split into tiny chunks.
// ---------------------------------------------------------------------------------------

#[test]
fn pipelined_fetch_with_any_peer_ut_metadata_id() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    for t in [&fx.small, &fx.large, &fx.v2, &fx.hybrid] {
        for our_id in [1u8, 2, 3, 42, 255] {
            let mut o = open(server.addr, &t.key, our_id);
            fetch_all(&mut o, t, our_id);
        }
    }
    // Nothing unrequested follows a complete fetch.
    let mut o = open(server.addr, &fx.large.key, 9);
    fetch_all(&mut o, &fx.large, 9);
    o.peer
        .assert_quiet(Duration::from_millis(300), "after a complete fetch");
}

#[test]
fn stream_split_into_odd_chunks_and_late_peer_id() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    let t = &fx.large;

    // The server's id is what its extension handshake says; learn it once.
    let server_id = open(server.addr, &t.key, 1).server_id;

    // Everything a client sends, dribbled 1..7 bytes at a time.
    let mut stream = handshake(reserved(true), &t.key);
    stream.extend(ext_handshake(Some(42)));
    stream.extend(requests(server_id, 0..t.pieces() as u32));
    let mut peer = Peer::connect(server.addr);
    let mut at = 0;
    let mut size = 1;
    while at < stream.len() {
        let end = stream.len().min(at + size);
        peer.send(&stream[at..end]);
        at = end;
        size = size % 7 + 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let hs = peer.read_exact(HANDSHAKE_LEN, PROMPT, "handshake (dribbled)");
    assert_eq!(&hs[28..48], &t.key);
    let m = peer.msg("ext handshake (dribbled)");
    assert!(matches!(m.frame(), Frame::Extended { id: 0, .. }), "{m:?}");
    let m = peer.msg("HaveNone (dribbled)");
    assert!(matches!(m.frame(), Frame::HaveNone), "{m:?}");
    let mut o = Opened {
        peer,
        handshake: hs,
        ext_payload: Vec::new(),
        server_id,
    };
    let mut got = Vec::new();
    for piece in 0..t.pieces() as u32 {
        let (id, msg, block) = o.peer.msg_skipping_keepalives("dribbled data").metadata();
        assert_eq!(id, 42);
        assert_eq!(
            msg,
            MetadataMsg::Data {
                piece,
                total_size: t.info.len() as u64
            }
        );
        got.extend(block);
    }
    assert!(got == t.info);

    // The peer id arrives well after the server answered the head, itself split.
    let head = handshake(reserved(false), &t.key)[..48].to_vec();
    let mut o = open_with(Peer::connect(server.addr), &head);
    std::thread::sleep(Duration::from_millis(100));
    o.peer.send(&CLIENT_PEER_ID[..5]);
    std::thread::sleep(Duration::from_millis(30));
    let mut rest = CLIENT_PEER_ID[5..].to_vec();
    rest.extend(ext_handshake(Some(255)));
    o.peer.send(&rest);
    fetch_all(&mut o, t, 255);
}

// ---------------------------------------------------------------------------------------
// 5: out-of-range pieces are rejected; the connection stays usable.
// ---------------------------------------------------------------------------------------

#[test]
fn out_of_range_pieces_are_rejected_with_the_same_piece() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    for t in [&fx.small, &fx.large] {
        let count = t.pieces() as u32;
        let mut o = open(server.addr, &t.key, 5);
        for bad in [count, 1 << 31, u32::MAX] {
            o.peer.send(&request(o.server_id, bad));
            let (id, msg, _) = o.peer.msg_skipping_keepalives("reject").metadata();
            assert_eq!(id, 5);
            assert_eq!(msg, MetadataMsg::Reject { piece: bad });
        }
        // A mix in one write is answered in order.
        o.peer.send(&requests(o.server_id, [count, 0, 1 << 31]));
        let answers: Vec<_> = (0..3)
            .map(|_| o.peer.msg_skipping_keepalives("mixed").metadata().1)
            .collect();
        assert_eq!(answers[0], MetadataMsg::Reject { piece: count });
        assert_eq!(
            answers[1],
            MetadataMsg::Data {
                piece: 0,
                total_size: t.info.len() as u64
            }
        );
        assert_eq!(answers[2], MetadataMsg::Reject { piece: 1 << 31 });
        // Still usable.
        fetch_all(&mut o, t, 5);
    }

    // BEP 9: a msg_type we do not know is ignored, the connection kept.
    let mut o = open(server.addr, &fx.small.key, 5);
    let body = b"d8:msg_typei3e5:piecei0ee";
    let mut unknown = Vec::new();
    magnetar::wire::encode_extended_header(&mut unknown, o.server_id, body.len());
    unknown.extend_from_slice(body);
    o.peer.send(&unknown);
    o.peer
        .assert_quiet(Duration::from_millis(200), "after unknown msg_type");
    fetch_all(&mut o, &fx.small, 5);
}

// ---------------------------------------------------------------------------------------
// 6: flood protection.
//
// The server counts a peer's pipelined burst (requests in consecutive reads that each
// filled its buffer) against reqq. TCP decides how a write arrives: loopback may hand
// one write over in two or three chunks, and the server may read between them, which
// starts a new burst. So the checks are: the first reqq answers are data, the next is a
// reject, and the burst cannot buy more than a few reqq of blocks (not one per request).
// ---------------------------------------------------------------------------------------

/// How many reqq-sized bursts one large client write may be seen as (see above).
const BURSTS_PER_WRITE_MAX: usize = 3;

fn assert_flood_capped(order: &str, reqq: usize, n: usize) {
    let runs = compress_runs(order);
    let data = order.chars().filter(|&c| c == 'D').count();
    assert_eq!(order.len(), n);
    assert!(
        order.starts_with(&"D".repeat(reqq)) && order[reqq..].starts_with('r'),
        "{n} requests in one write with reqq {reqq}: the first {reqq} get data, then a reject; \
         answer pattern (run-length): {runs}"
    );
    assert!(
        data <= BURSTS_PER_WRITE_MAX * reqq,
        "{n} requests in one write with reqq {reqq} got {data} blocks; answer pattern \
         (run-length): {runs}"
    );
}

#[test]
fn flood_of_requests_beyond_reqq_is_rejected() {
    let fx = fixture();
    let server = serve(&fx, &["--requests-queued-max", "8"]);
    let t = &fx.large;
    let mut o = open(server.addr, &t.key, 4);
    assert_eq!(
        o.ext().reqq,
        Some(8),
        "reqq advertises --requests-queued-max"
    );

    const N: usize = 1000;
    o.peer
        .send(&requests(o.server_id, std::iter::repeat_n(0u32, N)));
    let (mut data, mut rejects, mut order) = (0usize, 0usize, String::new());
    for i in 0..N {
        let m = match o.peer.recv(Duration::from_secs(10)) {
            Recv::Msg(m) => m,
            other => panic!("answer {i} of {N}: {other:?} (data {data}, rejects {rejects})"),
        };
        if matches!(m.frame(), Frame::KeepAlive) {
            continue;
        }
        let (id, msg, block) = m.metadata();
        assert_eq!(id, 4);
        match msg {
            MetadataMsg::Data {
                piece: 0,
                total_size,
            } => {
                assert_eq!(total_size, t.info.len() as u64);
                assert!(block == t.info[..PIECE]);
                data += 1;
                order.push('D');
            }
            MetadataMsg::Reject { piece: 0 } => {
                rejects += 1;
                order.push('r');
            }
            other => panic!("answer {i}: {other:?}"),
        }
    }
    assert_eq!(data + rejects, N);
    assert_flood_capped(&order, 8, N);
    o.peer
        .assert_quiet(Duration::from_millis(200), "after the flood's answers");
    // The connection still serves.
    fetch_all(&mut o, t, 4);
}

/// Same with the default cap (250): 2000 requests for piece 0 in one 62 KB write (one
/// loopback segment) must not become 2000 blocks (32 MiB) of replies.
#[test]
fn flood_beyond_the_default_reqq_is_rejected() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    let t = &fx.large;
    let mut o = open(server.addr, &t.key, 4);
    let reqq = limits::REQUESTS_QUEUED_MAX;
    assert_eq!(o.ext().reqq, Some(reqq as u32));

    const N: usize = 2000;
    o.peer
        .send(&requests(o.server_id, std::iter::repeat_n(0u32, N)));
    let (mut data, mut rejects, mut order) = (0usize, 0usize, String::new());
    for i in 0..N {
        let m = match o.peer.recv(Duration::from_secs(10)) {
            Recv::Msg(m) => m,
            other => panic!("answer {i} of {N}: {other:?} (data {data}, rejects {rejects})"),
        };
        if matches!(m.frame(), Frame::KeepAlive) {
            continue;
        }
        match m.metadata().1 {
            MetadataMsg::Data { piece: 0, .. } => {
                data += 1;
                order.push('D');
            }
            MetadataMsg::Reject { piece: 0 } => {
                rejects += 1;
                order.push('r');
            }
            other => panic!("answer {i}: {other:?}"),
        }
    }
    assert_eq!(data + rejects, N);
    assert_flood_capped(&order, reqq, N);
}

fn compress_runs(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let mut n = 1;
        while chars.peek() == Some(&c) {
            chars.next();
            n += 1;
        }
        out.push_str(&format!("{n}{c} "));
    }
    out
}

// ---------------------------------------------------------------------------------------
// 7-10: peers the server must drop.
// ---------------------------------------------------------------------------------------

/// A miss with no upstream source: the handshake is answered at once (echoing the
/// hash), the extension handshake is held for `--handshake-hold-ms` and then sent without
/// `metadata_size`, and when the fetch fails (`--fetch-timeout-ms`) the client is closed.
#[test]
fn unknown_info_hash_is_held_then_closed_when_the_fetch_fails() {
    let fx = fixture();
    let server = serve(
        &fx,
        &["--handshake-hold-ms", "300", "--fetch-timeout-ms", "1500"],
    );
    let key = [0xab; 20];
    let mut p = Peer::connect(server.addr);
    let started = Instant::now();
    p.send(&handshake(reserved(true), &key));
    let (got, _) = p.assert_closed_within(Duration::from_secs(10), "miss without sources");
    let elapsed = started.elapsed();
    assert!(got.len() >= HANDSHAKE_LEN, "our handshake first: {got:?}");
    assert_eq!(&got[28..48], &key, "the 20 bytes are echoed");
    // Then exactly one extension handshake, without metadata_size (and HaveNone).
    let mut rest = &got[HANDSHAKE_LEN..];
    let mut ext = Vec::new();
    while let Ok(Decoded::Done(frame, n)) = decode_frame(rest) {
        if let Frame::Extended { id: 0, payload } = frame {
            ext.push(ExtHandshake::decode(payload).unwrap().metadata_size);
        }
        rest = &rest[n..];
    }
    assert_eq!(
        ext,
        vec![None],
        "one held-out extension handshake without metadata_size"
    );
    assert!(
        elapsed >= Duration::from_millis(1400),
        "closed only when the fetch failed: {elapsed:?}"
    );
    // The hash is now in the negative cache: the next client is closed without waiting.
    let mut p = Peer::connect(server.addr);
    let started = Instant::now();
    p.send(&handshake(reserved(true), &key));
    p.assert_closed_within(Duration::from_secs(5), "negative-cached miss");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The server is fine afterwards.
    let mut o = open(server.addr, &fx.small.key, 1);
    fetch_all(&mut o, &fx.small, 1);
}

#[test]
fn peer_without_extension_protocol_is_closed() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    for reserved in [[0u8; 8], [0, 0, 0, 0, 0, 0, 0, 0x05]] {
        let mut p = Peer::connect(server.addr);
        p.send(&handshake(Reserved(reserved), &fx.small.key));
        let (got, _) = p.assert_closed_within(PROMPT, "peer without BEP 10");
        assert!(
            got.is_empty() || got.len() == HANDSHAKE_LEN,
            "at most our handshake, no extension messages: {} bytes {got:?}",
            got.len()
        );
        if got.len() == HANDSHAKE_LEN {
            assert_eq!(&got[28..48], &fx.small.key);
        }
    }
}

#[test]
fn garbage_instead_of_a_handshake_is_closed_at_the_handshake_timeout() {
    let fx = fixture();
    // Bytes that are not a plaintext handshake may be the start of an MSE handshake (a
    // random 96-byte DH key and padding, docs/transports.md): like libtorrent, magnetar
    // cannot tell garbage from a slow encrypted peer before the handshake timeout. So
    // garbage is never answered and is closed at that timeout (1 s here).
    let server = serve(&fx, &["--handshake-timeout-ms", "1000"]);
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"GET ",
        b"\x13BitTorrent protocoX",
    ] {
        let mut p = Peer::connect(server.addr);
        p.send(garbage);
        let (got, took) = p.assert_closed_within(Duration::from_secs(3), "garbage");
        assert!(got.is_empty(), "{garbage:?}: got {got:?}");
        assert!(took < Duration::from_secs(3), "{garbage:?}: {took:?}");
    }
    // 96 random-looking bytes are a DH key: answered with ours (Yb + at most 512 bytes of
    // padding), then closed when no valid MSE step 3 follows before the timeout.
    let mut p = Peer::connect(server.addr);
    p.send(&[0x8f; 96]);
    let (got, took) = p.assert_closed_within(Duration::from_secs(3), "a lone DH key");
    assert!(
        (96..=96 + 512).contains(&got.len()),
        "got {} bytes",
        got.len()
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn huge_length_prefix_closes_only_that_connection() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    let too_big = (limits::FRAME_BYTES_MAX + 1) as u32;
    for prefix in [u32::MAX, 1 << 31, too_big] {
        let mut o = open(server.addr, &fx.large.key, 1);
        o.peer.send(&prefix.to_be_bytes());
        let (got, took) = o.peer.assert_closed_within(PROMPT, "huge length prefix");
        assert!(got.is_empty(), "prefix {prefix}: got {got:?}");
        assert!(took < Duration::from_secs(3), "prefix {prefix}: {took:?}");
        // A normal client on a new connection is still served.
        let mut o = open(server.addr, &fx.large.key, 2);
        fetch_all(&mut o, &fx.large, 2);
    }
    // A request behind the bad prefix in the same write is never answered.
    let mut o = open(server.addr, &fx.large.key, 3);
    let mut wire = u32::MAX.to_be_bytes().to_vec();
    wire.extend(request(o.server_id, 0));
    o.peer.send(&wire);
    let (got, _) = o
        .peer
        .assert_closed_within(PROMPT, "huge prefix before a request");
    assert!(
        got.is_empty(),
        "no reply for requests after a bad frame: {got:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 11: timeouts and keep-alives.
// ---------------------------------------------------------------------------------------

#[test]
fn handshake_timeout_idle_timeout_and_keepalives() {
    let fx = fixture();
    let server = serve(
        &fx,
        &[
            "--handshake-timeout-ms",
            "300",
            "--keepalive-interval-ms",
            "200",
            "--idle-timeout-ms",
            "1500",
        ],
    );
    let addr = server.addr;

    // Run the three slow cases side by side.
    let silent = std::thread::spawn(move || {
        // Connect and send nothing; then send 47 of the 48 head bytes and stop.
        let mut p = Peer::connect(addr);
        let (got, took) = p.assert_closed_within(Duration::from_secs(5), "silent connection");
        assert!(got.is_empty());
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(3),
            "handshake timeout 300 ms, closed after {took:?}"
        );
    });
    let key = fx.small.key;
    let partial = std::thread::spawn(move || {
        let mut p = Peer::connect(addr);
        p.send(&handshake(reserved(false), &key)[..47]);
        let (got, took) = p.assert_closed_within(Duration::from_secs(5), "partial head");
        assert!(got.is_empty());
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(3),
            "partial head: closed after {took:?}"
        );
    });

    // After the handshake we stay silent: keep-alives, then the idle close.
    let key = fx.small.key;
    let idle = std::thread::spawn(move || {
        let mut o = open(addr, &key, 1);
        let start = Instant::now();
        let mut keepalives = Vec::new();
        let closed_at = loop {
            match o.peer.recv(Duration::from_secs(6)) {
                Recv::Msg(m) => {
                    assert!(matches!(m.frame(), Frame::KeepAlive), "{m:?}");
                    keepalives.push(start.elapsed());
                }
                Recv::Closed => break start.elapsed(),
                Recv::Timeout => panic!("not closed by the 1.5 s idle timeout within 6 s"),
            }
            assert!(keepalives.len() < 1000);
        };
        assert!(
            !keepalives.is_empty(),
            "at least one keep-alive before the idle close"
        );
        assert!(
            keepalives[0] >= Duration::from_millis(100),
            "{keepalives:?}"
        );
        assert!(keepalives.iter().all(|&k| k <= closed_at));
        assert!(
            closed_at >= Duration::from_millis(1200) && closed_at < Duration::from_secs(5),
            "idle timeout 1.5 s, closed after {closed_at:?} (keep-alives at {keepalives:?})"
        );
    });

    // A peer that keeps talking (its own keep-alives every 300 ms) is not idle.
    let key = fx.small.key;
    let chatty = std::thread::spawn(move || {
        let mut o = open(addr, &key, 1);
        let mut ka = Vec::new();
        encode_keepalive(&mut ka);
        let start = Instant::now();
        for _ in 0..100 {
            if start.elapsed() >= Duration::from_millis(2600) {
                break;
            }
            o.peer.send(&ka);
            o.peer
                .assert_quiet(Duration::from_millis(300), "peer sending keep-alives");
        }
        o.peer.send(&request(o.server_id, 0));
        let (id, msg, _) = o.peer.msg_skipping_keepalives("after 2.6 s").metadata();
        assert_eq!(id, 1);
        assert!(matches!(msg, MetadataMsg::Data { piece: 0, .. }));
    });

    silent.join().expect("silent connection");
    partial.join().expect("partial head");
    idle.join().expect("idle timeout");
    chatty.join().expect("chatty peer");
}

// ---------------------------------------------------------------------------------------
// 12: connection caps.
// ---------------------------------------------------------------------------------------

#[test]
fn per_ip_connection_cap() {
    let fx = fixture();
    let server = serve(&fx, &["--connections-per-ip-max", "3"]);
    let addr = server.addr;
    let t = &fx.small;
    let mut held: Vec<Opened> = (0..3).map(|_| open(addr, &t.key, 1)).collect();

    // The 4th from 127.0.0.1 is closed at once, without a byte.
    let mut fourth = Peer::connect(addr);
    let (got, took) = fourth.assert_closed_within(Duration::from_secs(3), "4th connection");
    assert!(got.is_empty(), "{got:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // The first three are still served.
    for o in &mut held {
        fetch_all(o, t, 1);
    }

    // Another address is not affected.
    let mut first = handshake(reserved(false), &t.key);
    first.extend(ext_handshake(Some(1)));
    let mut other = open_with(Peer::connect_from(src(2), addr), &first);
    fetch_all(&mut other, t, 1);
    assert_eq!(other.ext().yourip, Some(IpAddr::V4(src(2))));

    // Closing one frees its slot.
    drop(held.remove(0));
    let mut again = admitted_eventually(|| Peer::connect(addr), &t.key, "after a close");
    fetch_all(&mut again, t, 1);
}

#[test]
fn global_connection_cap() {
    let fx = fixture();
    let server = serve(&fx, &["--connections-max", "2"]);
    let addr = server.addr;
    let t = &fx.small;
    let mut first = handshake(reserved(false), &t.key);
    first.extend(ext_handshake(Some(1)));
    let mut a = open_with(Peer::connect_from(src(1), addr), &first);
    let b = open_with(Peer::connect_from(src(2), addr), &first);

    let mut third = Peer::connect_from(src(3), addr);
    let (got, took) = third.assert_closed_within(Duration::from_secs(3), "3rd connection, cap 2");
    assert!(got.is_empty(), "{got:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    fetch_all(&mut a, t, 1);
    drop(b);
    let mut c = admitted_eventually(
        || Peer::connect_from(src(3), addr),
        &t.key,
        "after a close, cap 2",
    );
    fetch_all(&mut c, t, 1);
}

// ---------------------------------------------------------------------------------------
// 13: a later extension handshake changes or disables our id.
// ---------------------------------------------------------------------------------------

#[test]
fn later_extension_handshake_changes_or_disables_our_id() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    let t = &fx.large;
    let mut o = open(server.addr, &t.key, 7);
    fetch(&mut o, t, 7, &[0]);

    // New id: answers use it.
    o.peer.send(&ext_handshake(Some(99)));
    fetch(&mut o, t, 99, &[1, 2]);

    // New id and requests in the same write: the handshake applies to what follows it.
    let mut wire = ext_handshake(Some(200));
    wire.extend(request(o.server_id, 3));
    o.peer.send(&wire);
    let (id, msg, _) = o.peer.msg_skipping_keepalives("id 200").metadata();
    assert_eq!(
        (id, msg),
        (
            200,
            MetadataMsg::Data {
                piece: 3,
                total_size: t.info.len() as u64
            }
        )
    );

    // ut_metadata 0 disables: requests get no reply, the connection stays open.
    o.peer.send(&ext_handshake(Some(0)));
    o.peer.send(&requests(o.server_id, [0, 1, 99]));
    o.peer
        .assert_quiet(Duration::from_millis(400), "requests after ut_metadata 0");

    // A later handshake that omits ut_metadata from `m` also disables it (the full `m`
    // is repeated every time, docs/protocol-facts.md §5).
    o.peer.send(&ext_handshake(Some(11)));
    fetch(&mut o, t, 11, &[4]);
    o.peer.send(&ext_handshake(None));
    o.peer.send(&request(o.server_id, 0));
    o.peer.assert_quiet(
        Duration::from_millis(300),
        "requests after m without ut_metadata",
    );

    // Re-enabled: served again on the same connection.
    o.peer.send(&ext_handshake(Some(1)));
    fetch_all(&mut o, t, 1);
}
