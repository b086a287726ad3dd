//! The io_uring serving path answers a lone client as promptly as the epoll path does.
//!
//! Until the ring stopped using DEFER_TASKRUN (commit b6b1f2f) a completion on the
//! worker's own ring was posted only when the worker next entered that ring, and a worker
//! with one client and nothing else to do slept in monoio's ring until something woke it
//! (on Linux 6.18: the ring's eventfd, 13-15 ms late): p50 16 ms per fetch at one
//! connection against 0.2 ms on epoll. Concurrent clients (the worker never parks) and,
//! in part, busy CPUs (the late signal comes sooner) hide it, so this test keeps exactly
//! one connection open at a time.
//!
//! The same store, `--threads 1`, a fresh `magnetar serve` per batch, the drivers named
//! with `--driver` (which wins over MAGNETAR_DRIVER, set by scripts/test.sh's epoll pass).
//! Rounds alternate io_uring and epoll so machine noise hits both alike; each fetch is a
//! fresh connection (handshake, extension handshake, every piece requested and received,
//! close), over TCP and over uTP (the crate's own `UtpStream` client). Only the ratio of
//! the medians is asserted, never an absolute time.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::info::{self, Torrent};
use common::peer::{self, Msg, PROMPT};
use common::{median, ServerProc};
use magnetar::upstream::utp_stream::UtpStream;
use magnetar::wire::{decode_frame, decode_handshake_head, Decoded, Frame, MetadataMsg};
use magnetar::wire::{ExtHandshake, HANDSHAKE_LEN};

/// Rounds of (io_uring batch, epoll batch).
const ROUNDS: usize = 4;
/// Measured fetches per transport per batch (at most).
const FETCHES_PER_BATCH: usize = 50;
/// Wall time per transport over the whole test; each batch gets an equal share, so a
/// driver that is slow takes fewer samples, not more time.
const BUDGET_PER_TRANSPORT: Duration = Duration::from_secs(20);
/// Unmeasured fetches per transport after each start (page faults, first allocations).
const WARM_UP: usize = 3;
/// Fewest measured fetches per driver and transport for a median worth comparing.
const SAMPLES_MIN: usize = 20;
/// io_uring's median may be at most this many times epoll's.
const RATIO_MAX: f64 = 3.0;
/// Our ut_metadata id.
const OUR_ID: u8 = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    fn flag(self) -> &'static str {
        match self {
            Driver::IoUring => "io-uring",
            Driver::Epoll => "epoll",
        }
    }

    /// As the ready line names it.
    fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Tcp,
    Utp,
}

const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Utp];

/// Measured fetch times in ms, per driver, for one transport.
#[derive(Default)]
struct Samples {
    io_uring: Vec<f64>,
    epoll: Vec<f64>,
}

impl Samples {
    fn of(&mut self, d: Driver) -> &mut Vec<f64> {
        match d {
            Driver::IoUring => &mut self.io_uring,
            Driver::Epoll => &mut self.epoll,
        }
    }
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A `magnetar serve` on `data` with `driver`, one worker, its log (warnings, and the
/// worker's own-ring line) in `log`.
fn serve(data: &Path, driver: Driver, log: &Path) -> ServerProc {
    let cmd = ServerProc::command(
        data,
        &[
            "--log",
            "warn,magnetar::server::worker=debug",
            "--driver",
            driver.flag(),
            "--threads",
            "1",
        ],
    );
    let server = ServerProc::spawn_with_stderr(cmd, Stdio::from(File::create(log).unwrap()));
    assert_eq!(
        server.driver,
        driver.name(),
        "--driver {} serves on {}",
        driver.flag(),
        server.driver
    );
    server
}

/// The set-up flags of the io_uring server's own ring, from its log: the path this test
/// guards (a server that fell back to monoio's TCP path would not test it).
fn own_ring_flags(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("own io_uring for TCP"))
        .unwrap_or_else(|| {
            panic!(
                "the io_uring server has no own ring (MAGNETAR_URING_SETUP={:?}); its log:\n{text}",
                std::env::var("MAGNETAR_URING_SETUP").ok()
            )
        });
    let flags = line
        .split_once("flags=")
        .map(|(_, f)| f.split_whitespace().next().unwrap_or(""))
        .unwrap_or("?");
    flags.trim_matches('"').to_string()
}

/// One TCP fetch of every piece of `t` on a fresh connection, closed at the end.
fn tcp_fetch(addr: std::net::SocketAddr, t: &Torrent) {
    let mut o = peer::open(addr, &t.key, OUR_ID);
    peer::fetch_all(&mut o, t, OUR_ID);
    drop(o);
}

/// The next whole frame in `buf`, taken out of it.
fn take_frame(buf: &mut Vec<u8>) -> Option<Msg> {
    match decode_frame(buf) {
        Ok(Decoded::Done(_, n)) => Some(Msg(buf.drain(..n).collect())),
        Ok(Decoded::NeedMore(_)) => None,
        Err(e) => panic!("uTP: undecodable frame from the server: {e}"),
    }
}

/// Appends what arrives next on `s` to `buf`; panics on an error or the server's FIN.
async fn read_more(
    s: &mut UtpStream,
    buf: &mut Vec<u8>,
    deadline: monoio::time::Instant,
    what: &str,
) {
    let n = s
        .read(buf, deadline)
        .await
        .unwrap_or_else(|e| panic!("uTP: reading {what}: {e}"));
    assert!(n > 0, "uTP: the server closed before {what}");
}

/// One uTP fetch of every piece of `t` on a fresh connection, closed at the end (our FIN
/// acked, theirs received).
async fn utp_fetch(addr: std::net::SocketAddr, t: &Torrent) {
    let deadline = monoio::time::Instant::now() + PROMPT;
    let mut s = UtpStream::connect(addr, deadline)
        .await
        .unwrap_or_else(|e| panic!("uTP connect to {addr}: {e}"));
    let mut first = peer::handshake(peer::reserved(false), &t.key);
    first.extend(peer::ext_handshake(Some(OUR_ID)));
    s.write_all(first, deadline)
        .await
        .expect("uTP: send the handshakes");
    let mut buf = Vec::new();
    while buf.len() < HANDSHAKE_LEN {
        read_more(&mut s, &mut buf, deadline, "the handshake").await;
    }
    match decode_handshake_head(&buf) {
        Ok(Decoded::Done(h, _)) if h.info_hash == t.key => {}
        other => panic!("uTP: bad handshake: {other:?}"),
    }
    buf.drain(..HANDSHAKE_LEN);
    let server_id = loop {
        match take_frame(&mut buf) {
            Some(m) => match m.frame() {
                Frame::Extended { id: 0, payload } => {
                    let hs = ExtHandshake::decode(payload).expect("extension handshake");
                    break hs.ut_metadata.expect("the server's ut_metadata id");
                }
                other => panic!("uTP: expected the extension handshake, got {other:?}"),
            },
            None => read_more(&mut s, &mut buf, deadline, "the extension handshake").await,
        }
    };
    let pieces = t.pieces();
    s.write_all(peer::requests(server_id, 0..pieces as u32), deadline)
        .await
        .expect("uTP: send the requests");
    let mut got = vec![None; pieces];
    let mut left = pieces;
    while left > 0 {
        match take_frame(&mut buf) {
            Some(m) if m.is_keepalive() => {}
            Some(m) => {
                let (id, msg, block) = m.metadata();
                assert_eq!(id, OUR_ID, "uTP: data carries our ut_metadata id");
                let MetadataMsg::Data { piece, .. } = msg else {
                    panic!("uTP: expected data, got {msg:?}")
                };
                let slot = &mut got[piece as usize];
                assert!(slot.is_none(), "uTP: piece {piece} twice");
                *slot = Some(block);
                left -= 1;
            }
            None => read_more(&mut s, &mut buf, deadline, "the pieces").await,
        }
    }
    let info: Vec<u8> = got.into_iter().flatten().flatten().collect();
    assert!(info == t.info, "uTP: the pieces make the info dict");
    s.close().await;
}

/// The client's runtime (monoio on epoll, with timers) for the uTP fetches.
type ClientRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>;

/// Up to `FETCHES_PER_BATCH` measured fetches over `transport` from `server` (after the
/// warm-up), cycling through `torrents`, until `until`.
fn batch(
    server: &ServerProc,
    transport: Transport,
    torrents: &[Torrent],
    until: Instant,
    rt: &mut ClientRuntime,
) -> Vec<f64> {
    let addr = server.addr;
    let one = |rt: &mut ClientRuntime, t: &Torrent| {
        let start = Instant::now();
        match transport {
            Transport::Tcp => tcp_fetch(addr, t),
            Transport::Utp => rt.block_on(utp_fetch(addr, t)),
        }
        start.elapsed().as_secs_f64() * 1000.0
    };
    for t in torrents.iter().cycle().take(WARM_UP) {
        one(rt, t);
    }
    let mut took = Vec::new();
    for t in torrents.iter().cycle().take(FETCHES_PER_BATCH) {
        if Instant::now() >= until {
            break;
        }
        took.push(one(rt, t));
    }
    took
}

#[test]
fn io_uring_serves_one_connection_at_a_time_as_fast_as_epoll() {
    assert!(
        monoio::utils::detect_uring(),
        "io_uring is not available on this kernel: the guard cannot compare the drivers"
    );
    let tmp = tempfile::tempdir().unwrap();
    // One, three and five metadata pieces.
    let small = info::v1_info("one-piece.bin", 100);
    let normal = info::v1_info("three-pieces.bin", 2000);
    let large = info::v1_info("five-pieces.bin", 4000);
    let data = info::import_all(
        tmp.path(),
        &[
            ("one-piece.bin", &small),
            ("three-pieces.bin", &normal),
            ("five-pieces.bin", &large),
        ],
    );
    let torrents = [Torrent::v1(small), Torrent::v1(normal), Torrent::v1(large)];
    assert_eq!(
        torrents.iter().map(Torrent::pieces).collect::<Vec<_>>(),
        [1, 3, 5]
    );
    // The client's own runtime: epoll for both servers, so only the server differs.
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    let share = BUDGET_PER_TRANSPORT / (ROUNDS as u32 * 2);
    let mut samples = [Samples::default(), Samples::default()];
    let mut ring_flags = String::new();
    for round in 0..ROUNDS {
        for driver in [Driver::IoUring, Driver::Epoll] {
            let log = tmp
                .path()
                .join(format!("serve-{round}-{}.log", driver.name()));
            let mut server = serve(&data, driver, &log);
            if driver == Driver::IoUring {
                ring_flags = own_ring_flags(&log);
            }
            for (i, &transport) in TRANSPORTS.iter().enumerate() {
                let until = Instant::now() + share;
                let took = batch(&server, transport, &torrents, until, &mut rt);
                samples[i].of(driver).extend(took);
            }
            let status = server.terminate(Duration::from_secs(20));
            assert!(status.success(), "{driver:?} server exited with {status}");
        }
    }
    let mut failures = Vec::new();
    for (i, transport) in TRANSPORTS.iter().enumerate() {
        let s = &samples[i];
        for (d, xs) in [("io_uring", &s.io_uring), ("epoll", &s.epoll)] {
            assert!(
                xs.len() >= SAMPLES_MIN,
                "{transport:?} on {d}: only {} fetches within the time budget",
                xs.len()
            );
        }
        let (u, e) = (median(&s.io_uring), median(&s.epoll));
        let report = format!(
            "{transport:?} at one connection: io_uring ({ring_flags}) median {u:.3} ms \
             (p90 {:.3}, n={}), epoll median {e:.3} ms (p90 {:.3}, n={}), ratio {:.2}",
            percentile(&s.io_uring, 0.9),
            s.io_uring.len(),
            percentile(&s.epoll, 0.9),
            s.epoll.len(),
            u / e
        );
        println!("{report}");
        if u > RATIO_MAX * e {
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "io_uring's median fetch time is more than {RATIO_MAX}x epoll's (a completion waiting \
         for the worker's next wake-up, as with DEFER_TASKRUN?):\n{}",
        failures.join("\n")
    );
}
