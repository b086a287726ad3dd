//! Hostile MSE/PE input against the real `magnetar serve` on loopback: a truncated DH key,
//! padding past the cap, a req hash naming no stored torrent, a flood of DH handshakes from
//! one address. Each states the answer (close, count, bound) and then checks the server is
//! healthy (`common::kit::assert_healthy`). Plus the positive case: the crate's own MSE
//! initiator gets a stored torrent over an encrypted handshake, plaintext and RC4.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::kit::*;
use common::ServerProc;
use magnetar::mse::{CryptoPolicy, Initiator, InitiatorStep};
use magnetar::wire::{
    decode_frame, decode_metadata, encode_handshake, encode_metadata_request, Decoded,
    ExtHandshake, Frame, MetadataMsg, Reserved, HANDSHAKE_LEN, OUR_UT_METADATA_ID,
};

fn serve(fx: &Fixture, extra: &[&str]) -> ServerProc {
    let mut args = vec!["--log", "error", "--threads", "2"];
    args.extend_from_slice(extra);
    ServerProc::start(&fx.data, &args)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Reads until the server closes (or `within` passes); returns the bytes and whether it
/// closed.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => {}
        }
    }
    (got, false)
}

/// Random-looking bytes that do not start a plaintext handshake (first byte != 0x13).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i == 0 {
                0xA5
            } else {
                x as u8
            }
        })
        .collect()
}

#[test]
fn a_truncated_dh_key_is_closed_at_the_handshake_timeout() {
    let fx = fixture();
    let mut server = serve(&fx, &["--handshake-timeout-ms", "1000"]);
    let before = metrics(&server);
    let mut s = connect(server.addr);
    s.write_all(&noise(50, 1)).unwrap(); // half of a 96-byte Ya
    let (got, closed) = read_until_closed(&mut s, PROMPT);
    assert!(closed, "closed within {PROMPT:?}");
    assert!(got.is_empty(), "nothing answered to half a key");
    assert_healthy(&mut server, &before, &fx.normal, "truncated DH key");
}

#[test]
fn padding_past_the_cap_is_closed_after_our_key() {
    let fx = fixture();
    let mut server = serve(&fx, &[]);
    let before = metrics(&server);
    let mut s = connect(server.addr);
    // Ya, then 2 000 bytes in which HASH('req1', S) never appears (PadA is at most 512).
    s.write_all(&noise(96 + 2_000, 2)).unwrap();
    let (got, closed) = read_until_closed(&mut s, PROMPT);
    assert!(closed, "closed once the sync window passed");
    assert!(
        (96..=96 + 512).contains(&got.len()),
        "only Yb + PadB went out ({} bytes)",
        got.len()
    );
    let m = metrics(&server);
    assert!(get(&m, "magnetar_mse_handshakes_failed_total") >= 1);
    assert_healthy(&mut server, &before, &fx.normal, "padding past the cap");
}

/// Runs the crate's initiator against the server; returns the stream after the handshake
/// (decrypting with its cipher if RC4) or the server's close.
fn mse_connect(
    addr: SocketAddr,
    key: [u8; 20],
    policy: CryptoPolicy,
) -> Result<(TcpStream, Vec<u8>, Option<magnetar::mse::Rc4Pair>), String> {
    mse_connect_naming(addr, key, key, policy)
}

/// As `mse_connect`, but the BitTorrent handshake inside names `named`, whatever torrent
/// req2 proved (`key`).
fn mse_connect_naming(
    addr: SocketAddr,
    key: [u8; 20],
    named: [u8; 20],
    policy: CryptoPolicy,
) -> Result<(TcpStream, Vec<u8>, Option<magnetar::mse::Rc4Pair>), String> {
    let mut s = connect(addr);
    let mut ini = Initiator::new(&[7u8; 32], 100, key, policy);
    let mut out = Vec::new();
    ini.opening(&mut out);
    s.write_all(&out).unwrap();
    let mut ia = Vec::new();
    encode_handshake(
        &mut ia,
        Reserved::ours(true, false, false),
        &named,
        b"-HM0001-hostile-mse-",
    );
    ExtHandshake {
        ut_metadata: Some(9),
        ..ExtHandshake::default()
    }
    .encode(&mut ia);
    let mut inbuf = Vec::new();
    let deadline = Instant::now() + PROMPT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Err("closed during the handshake".into()),
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
        out.clear();
        match ini.on_bytes(&inbuf, &mut out, &ia) {
            Ok(InitiatorStep::NeedMore { consumed }) => {
                inbuf.drain(..consumed);
                s.write_all(&out).unwrap();
            }
            Ok(InitiatorStep::Done {
                consumed, cipher, ..
            }) => {
                s.write_all(&out).unwrap();
                let mut rest = inbuf.split_off(consumed);
                let mut cipher = cipher;
                if let Some(c) = cipher.as_mut() {
                    c.decrypt_in_place(&mut rest);
                }
                return Ok((s, rest, cipher));
            }
            Err(e) => return Err(format!("initiator: {e}")),
        }
    }
    Err("handshake timed out".into())
}

#[test]
fn a_req_hash_for_a_torrent_we_do_not_hold_is_closed_and_counted() {
    let fx = fixture();
    let mut server = serve(&fx, &[]);
    let before = metrics(&server);
    let unknown = [0x5au8; 20];
    let res = mse_connect(server.addr, unknown, CryptoPolicy::PreferPlaintext);
    assert!(res.is_err(), "an unknown hash cannot be served over MSE");
    let (m, counted) = metrics_until(&server, PROMPT, |m| {
        get(m, "magnetar_mse_unknown_info_hash_total") >= 1
    });
    assert!(counted, "counted as unknown");
    assert_eq!(get(&m, "magnetar_misses_total"), 0, "no fetch started");
    assert_healthy(&mut server, &before, &fx.normal, "unknown req2");
}

/// The positive case with the crate's own initiator: plaintext and RC4 both give the
/// stored bytes.
#[test]
fn our_own_initiator_is_served_over_plaintext_and_rc4() {
    let fx = fixture();
    let server = serve(&fx, &[]);
    for policy in [CryptoPolicy::PreferPlaintext, CryptoPolicy::Rc4Only] {
        let (mut s, mut stream, mut cipher) =
            mse_connect(server.addr, fx.small.key, policy).expect("MSE handshake");
        // The stream: their handshake, their extension handshake; then ask for piece 0.
        let deadline = Instant::now() + PROMPT;
        let mut buf = [0u8; 4096];
        let mut asked = false;
        let mut info = None;
        while info.is_none() && Instant::now() < deadline {
            if stream.len() >= HANDSHAKE_LEN && !asked {
                let mut req = Vec::new();
                // Our handshake said ut_metadata 9; the server's id is magnetar's own.
                encode_metadata_request(&mut req, OUR_UT_METADATA_ID, 0);
                if let Some(c) = cipher.as_mut() {
                    c.encrypt_in_place(&mut req);
                }
                s.write_all(&req).unwrap();
                asked = true;
            }
            let mut pos = HANDSHAKE_LEN.min(stream.len());
            while let Ok(Decoded::Done(frame, n)) = decode_frame(&stream[pos..]) {
                pos += n;
                if let Frame::Extended { id: 9, payload } = frame {
                    if let Ok((MetadataMsg::Data { .. }, data)) = decode_metadata(payload) {
                        info = Some(data.to_vec());
                    }
                }
            }
            if info.is_some() {
                break;
            }
            if let Ok(n) = s.read(&mut buf) {
                let mut chunk = buf[..n].to_vec();
                if let Some(c) = cipher.as_mut() {
                    c.decrypt_in_place(&mut chunk);
                }
                stream.extend_from_slice(&chunk);
            }
        }
        assert_eq!(info.as_deref(), Some(&fx.small.info[..]), "{policy:?}");
    }
    let m = metrics(&server);
    assert!(get(&m, "magnetar_mse_plaintext_selected_total") >= 1);
    assert!(get(&m, "magnetar_mse_rc4_selected_total") >= 1);
}

/// An MSE handshake proves one torrent (req2); the BitTorrent handshake inside it must name
/// the same one. Naming another (stored or not) is closed: no handshake for it comes
/// back, nothing is looked up as a miss and nothing is fetched; it is counted. Both crypto
/// choices; the suite's second pass runs it on epoll.
#[test]
fn an_encrypted_handshake_naming_another_torrent_is_closed_and_fetches_nothing() {
    let fx = fixture();
    let mut server = serve(&fx, &[]);
    let before = metrics(&server);
    let unknown = [0x5a; 20];
    let mut tries = 0;
    for policy in [CryptoPolicy::PreferPlaintext, CryptoPolicy::Rc4Only] {
        for named in [unknown, fx.normal.key] {
            tries += 1;
            let (mut s, mut stream, mut cipher) =
                mse_connect_naming(server.addr, fx.small.key, named, policy)
                    .expect("the MSE handshake itself completes");
            let (rest, closed) = read_until_closed(&mut s, PROMPT);
            let mut rest = rest;
            if let Some(c) = cipher.as_mut() {
                c.decrypt_in_place(&mut rest);
            }
            stream.extend_from_slice(&rest);
            assert!(
                closed,
                "{policy:?}, {named:02x?}: the connection stays open"
            );
            assert!(
                !stream.windows(20).any(|w| w == named),
                "{policy:?}: the server answered a handshake for the torrent it was not proved"
            );
        }
    }
    let m = metrics(&server);
    let delta = |name: &str| get(&m, name) - get(&before, name);
    assert_eq!(delta("magnetar_mse_torrent_mismatch_total"), tries);
    assert_eq!(delta("magnetar_misses_total"), 0, "no miss, so no fetch");
    assert_eq!(delta("magnetar_hits_total"), 0, "nothing served");
    assert_healthy(&mut server, &before, &fx.small, "mismatched MSE handshakes");
}

/// The per-address window does not hold against many addresses: 250 sources each stay
/// under it, so only the core's DH budget bounds the work. With a budget of 40 a second per
/// core, DH handshakes stay within it (burst plus rate over the flood's time, two cores),
/// the rest are refused and counted, and a plain client is served as before.
#[test]
fn dh_handshakes_from_many_addresses_stay_within_the_core_budget() {
    const SOURCES: u8 = 250;
    const BUDGET: u64 = 40;
    let fx = fixture();
    let budget = BUDGET.to_string();
    let mut server = serve(
        &fx,
        &[
            "--mse-handshakes-per-core-per-second-max",
            &budget,
            "--connections-per-ip-max",
            "8",
        ],
    );
    let before = metrics(&server);
    let started = Instant::now();
    let mut conns = Vec::new();
    for round in 0..2u64 {
        for i in 1..=SOURCES {
            let source = std::net::Ipv4Addr::new(127, 0, 1, i);
            if let Ok(mut s) = common::peer::connect_from(source, server.addr) {
                let _ = s.write_all(&noise(96, round * 1000 + u64::from(i)));
                conns.push(s);
            }
        }
    }
    let (m, refused) = metrics_until(&server, PROMPT, |m| {
        get(m, "magnetar_mse_refused_core_budget_total") > 0
    });
    let elapsed = started.elapsed().as_secs_f64();
    assert!(refused, "the core budget refused part of the flood");
    let dh = get(&m, "magnetar_mse_handshakes_started_total");
    let per_ip = get(&m, "magnetar_mse_refused_per_ip_total");
    // Each core: a full bucket (one second's worth) plus the rate over the elapsed time.
    let allowed = 2 * (BUDGET + (BUDGET as f64 * (elapsed + 1.0)).ceil() as u64);
    println!(
        "DH from {SOURCES} addresses: {} connections in {elapsed:.2} s, {dh} handshakes started \
         (allowed {allowed}), {} refused by the core budget, {per_ip} by the per-IP window",
        conns.len(),
        get(&m, "magnetar_mse_refused_core_budget_total")
    );
    assert!(dh <= allowed, "{dh} DH handshakes, budget allows {allowed}");
    assert_eq!(
        per_ip, 0,
        "no address went over its own window: only the budget held"
    );
    let probe = Instant::now();
    drop(conns);
    assert_healthy(&mut server, &before, &fx.normal, "DH from many addresses");
    println!(
        "a plain client served {:?} after the flood",
        probe.elapsed()
    );
}

#[test]
fn a_flood_of_dh_handshakes_from_one_address_is_bounded() {
    let fx = fixture();
    let mut server = serve(&fx, &["--mse-handshakes-per-ip-per-second-max", "5"]);
    let before = metrics(&server);
    let started = Instant::now();
    let mut conns = Vec::new();
    for i in 0..200u64 {
        let mut s = connect(server.addr);
        let _ = s.write_all(&noise(96, 10 + i));
        conns.push(s);
    }
    let (m, refused) = metrics_until(&server, PROMPT, |m| {
        get(m, "magnetar_mse_refused_per_ip_total") > 0
    });
    assert!(refused, "the per-IP cap refused part of the flood");
    let dh = get(&m, "magnetar_mse_handshakes_started_total");
    let secs = started.elapsed().as_secs_f64().ceil() as u64 + 1;
    // 5 a second per core, 2 cores, over the seconds the flood took.
    assert!(
        dh <= 2 * 5 * secs,
        "{dh} DH handshakes in ~{secs} s from one address"
    );
    println!(
        "DH flood: 200 connections, {dh} handshakes started, {} refused",
        get(&m, "magnetar_mse_refused_per_ip_total")
    );
    drop(conns);
    // The flood used up the per-IP cap (64) from this address; the normal client, from
    // the same address, comes once the server has seen those closes (on a loaded machine
    // it may accept first otherwise, and refuse it by the cap, which is right).
    let (_, drained) = metrics_until(&server, PROMPT, |m| get(m, "magnetar_connections_open") < 8);
    assert!(drained, "the flood's connections were not closed");
    assert_healthy(&mut server, &before, &fx.normal, "DH flood");
}
