//! uTP under loss: 5 % loss and 20 ± 10 ms delay each way (a seeded lossy UDP relay on
//! loopback, tests/common/relay.rs; netem is not available), and a 15-piece metadata
//! (14 × 16 KiB + more) must complete both ways:
//!   (a) magnetar serving: libtorrent on its defaults, x.pe = the relay, relay -> magnetar;
//!   (b) magnetar fetching: `magnetar fetch` with x.pe = the relay, relay -> a libtorrent
//!       seed on its defaults.
//! TCP to the relay's port is refused (nothing listens there), so only uTP can carry these.
//! Also here: the relay's own tests, and the relay between two libtorrents (proof that it
//! carries real uTP).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::relay::{Impairment, LossyRelay, RelayConfig, RelayStats};
use common::*;

/// The relay of the loss tests: 5 % loss and 20 ± 10 ms delay, each way, plus 1 %
/// duplicated and 2 % reordered packets, in front of `target` (a uTP peer: UDP on its TCP
/// port number).
fn lossy_relay_to(target: SocketAddr) -> LossyRelay {
    let imp = Impairment {
        duplicate: 0.01,
        reorder: 0.02,
        ..Impairment::lossy(0.05, Duration::from_millis(20), Duration::from_millis(10))
    };
    LossyRelay::start(target, RelayConfig::symmetric(imp, LOSS_SEED))
}

/// The 15-metadata-piece torrent, in `tmp/t` (content in `tmp/t/content`).
fn fifteen_piece_torrent(tmp: &Path) -> LtTorrent {
    make_lt_torrent_with_metadata_pieces(&tmp.join("t"), METADATA_PIECES)
}

const LOSS_SEED: u64 = 29; // BEP 29
const METADATA_PIECES: u32 = 15;
/// Each end-to-end fetch through the relay must finish within this.
const FETCH_TIMEOUT_S: u32 = 30;

// ---------------------------------------------------------------------------------------
// The relay itself, in front of a UDP echo target.

/// A UDP echo on 127.0.0.1; stops when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.take().unwrap().join();
    }
}

/// Copies the client should see in the end, by what the relay has decided so far: each
/// packet taken towards the echo comes back once, unless dropped or shed, plus duplicates.
fn expected_arrivals(s: &RelayStats) -> u64 {
    let (t, c) = (&s.to_target, &s.to_client);
    (t.received + t.duplicated + c.duplicated) - (t.dropped + t.shed + c.dropped + c.shed)
}

/// Sends `n` numbered datagrams through the relay to the echo and back, with at most
/// `window` of them anywhere on the way (so no socket buffer on the path overflows: what
/// is lost is lost by the relay's choice only), waits until every one is accounted for,
/// and returns the numbers that came back, in order.
fn echo_through(relay: &LossyRelay, n: u32, window: u64) -> Vec<u32> {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let reader = client.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !flag.load(Ordering::SeqCst) {
            if let Ok(4) = reader.recv(&mut buf) {
                let _ = tx.send(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
        }
    });
    let mut got = Vec::new();
    // Takes arrivals until `enough` says stop; bounded in time.
    let collect = |got: &mut Vec<u32>, enough: &dyn Fn(&[u32]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !enough(got) {
            assert!(
                Instant::now() < deadline,
                "stuck: {} arrived, relay {:?}",
                got.len(),
                relay.stats()
            );
            if let Ok(id) = rx.recv_timeout(Duration::from_millis(20)) {
                got.push(id);
            }
        }
    };
    for i in 0..n {
        collect(&mut got, &|got| {
            let s = relay.stats();
            let on_the_way = u64::from(i) - s.to_target.received + expected_arrivals(&s);
            on_the_way - (got.len() as u64) < window
        });
        client.send_to(&i.to_be_bytes(), relay.addr).unwrap();
    }
    let settled = relay.wait_until(Duration::from_secs(10), |s| {
        s.to_target.received == u64::from(n)
            && s.to_target.in_flight() == 0
            // Every datagram the echo got came back into the relay and was dealt with.
            && s.to_client.received == s.to_target.forwarded
            && s.to_client.in_flight() == 0
    });
    assert!(settled, "the relay did not settle: {:?}", relay.stats());
    let total = expected_arrivals(&relay.stats());
    collect(&mut got, &|got| got.len() as u64 == total);
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    got
}

#[test]
fn relay_without_impairment_delivers_everything_in_order() {
    let echo = Echo::start();
    let relay = LossyRelay::start(echo.addr, RelayConfig::symmetric(Impairment::none(), 1));
    let got = echo_through(&relay, 500, 32);
    assert_eq!(got, (0..500).collect::<Vec<_>>());
    let s = relay.stats();
    assert_eq!((s.to_target.forwarded, s.to_client.forwarded), (500, 500));
    assert_eq!(s.to_target.dropped + s.to_client.dropped, 0);
}

fn half_loss(seed: u64) -> (Vec<u32>, RelayStats) {
    let echo = Echo::start();
    let cfg = RelayConfig {
        to_target: Impairment::lossy(0.5, Duration::ZERO, Duration::ZERO),
        to_client: Impairment::none(),
        seed,
        queue_max: common::relay::QUEUE_MAX,
    };
    let relay = LossyRelay::start(echo.addr, cfg);
    let got = echo_through(&relay, 400, 32);
    (got, relay.stats())
}

#[test]
fn relay_half_loss_is_plausible_and_the_same_for_a_seed() {
    let (a, stats) = half_loss(7);
    // 400 trials at p = 0.5: mean 200, sd 10; 150..250 is five sd either way.
    assert!(
        (150..=250).contains(&a.len()),
        "{} of 400 arrived at 50 % loss",
        a.len()
    );
    assert_eq!(stats.to_target.dropped, 400 - a.len() as u64);
    assert_eq!(stats.to_client.dropped, 0);
    let (b, _) = half_loss(7);
    assert_eq!(a, b, "the same seed drops the same packets");
    let (c, _) = half_loss(8);
    assert_ne!(a, c, "another seed drops other packets");
}

#[test]
fn relay_delay_is_applied_both_ways() {
    let echo = Echo::start();
    let (base, jitter) = (Duration::from_millis(30), Duration::from_millis(10));
    let imp = Impairment::lossy(0.0, base, jitter);
    let relay = LossyRelay::start(echo.addr, RelayConfig::symmetric(imp, 3));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut rtts = Vec::new();
    for i in 0u32..20 {
        let t0 = Instant::now();
        client.send_to(&i.to_be_bytes(), relay.addr).unwrap();
        let mut buf = [0u8; 4];
        let n = client.recv(&mut buf).expect("the echo comes back");
        assert_eq!((n, u32::from_be_bytes(buf)), (4, i));
        rtts.push(t0.elapsed().as_secs_f64());
    }
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
    println!(
        "relay round trips: min {min:.4} s, mean {mean:.4} s (base 2 × 30 ms, ± 10 ms each way)"
    );
    // Each way waits base ± jitter: no round trip is shorter than 2 × (base − jitter).
    assert!(min >= 2.0 * (base - jitter).as_secs_f64(), "min {min}");
    // On average the jitter cancels out: mean ≥ 2 × base − jitter (sd of the mean ≈ 2 ms).
    assert!(mean >= (2 * base - jitter).as_secs_f64(), "mean {mean}");
    assert!(
        mean < (2 * base + jitter).as_secs_f64() + 0.05,
        "mean {mean}"
    );
}

fn relay_with(to_target: Impairment, to_client: Impairment, echo: &Echo) -> LossyRelay {
    let cfg = RelayConfig {
        to_target,
        to_client,
        seed: 5,
        queue_max: common::relay::QUEUE_MAX,
    };
    LossyRelay::start(echo.addr, cfg)
}

#[test]
fn relay_duplicates() {
    let echo = Echo::start();
    let always = Impairment {
        duplicate: 1.0,
        ..Impairment::none()
    };
    let relay = relay_with(always, Impairment::none(), &echo);
    let got = echo_through(&relay, 50, 8);
    let s = relay.stats();
    assert_eq!((s.to_target.duplicated, s.to_target.forwarded), (50, 100));
    let twice: Vec<u32> = (0..50).flat_map(|i| [i, i]).collect();
    assert_eq!(got, twice);
}

#[test]
fn relay_reorders() {
    let echo = Echo::start();
    let always = Impairment {
        reorder: 1.0,
        ..Impairment::none()
    };
    let relay = relay_with(Impairment::none(), always, &echo);
    let got = echo_through(&relay, 50, 8);
    let s = relay.stats().to_client;
    assert_eq!(s.forwarded, 50);
    assert!(s.reordered >= 20, "{s:?}");
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    // A held packet goes right after the next one: later numbers overtake earlier ones.
    let overtaken = got.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(overtaken >= 10, "{got:?}");
}

#[test]
fn relay_memory_is_bounded_and_shedding_is_counted() {
    let echo = Echo::start();
    let cfg = RelayConfig {
        to_target: Impairment::lossy(0.0, Duration::from_millis(300), Duration::ZERO),
        to_client: Impairment::none(),
        seed: 9,
        queue_max: 10,
    };
    let relay = LossyRelay::start(echo.addr, cfg);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0u32..40 {
        client.send_to(&i.to_be_bytes(), relay.addr).unwrap();
    }
    assert!(relay.wait_until(Duration::from_secs(10), |s| {
        s.to_target.received == 40 && s.to_target.in_flight() == 0
    }));
    let s = relay.stats().to_target;
    assert!(s.shed >= 30, "{s:?}");
    assert_eq!(s.forwarded + s.shed, 40, "{s:?}");
}

// ---------------------------------------------------------------------------------------
// Real uTP through the relay.

/// The harness itself, with no magnetar in it: a libtorrent seed (defaults) behind the
/// lossy relay, a libtorrent fetcher (defaults) given x.pe = the relay. Only uTP can pass
/// (TCP to the relay's port is refused), and it must get through the loss.
///
/// A failed fetch is run once more (a fresh client through the same relay): two
/// libtorrents (2.0.8) miss the 30 s by themselves in about 3 of 100 runs on a loaded
/// 2-core machine (3 of 110 here, two loops at once beside the suite). Their peer logs
/// (`LT_PEER_LOG=1`) show two ways: the seed's uTP times out in the middle of the answer
/// while the client, with nothing of its own in flight, waits on (its peer timeout is
/// 120 s); or the seed goes silent after the handshakes, the client's uTP times out and
/// libtorrent's reconnect delay outlasts the fetch. Each time the relay had forwarded every
/// packet it did not drop on purpose (nothing in flight, nothing shed; it prints its
/// counters when a test fails). With magnetar at one end, the same loops passed 128 of 128
/// fetches from a libtorrent seed and 40 of 40 by a libtorrent client.
#[test]
fn lossy_relay_carries_utp_between_two_libtorrents() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let t = fifteen_piece_torrent(tmp.path());
    let seed = LtSeed::start(&[&t.path], &tmp.path().join("t/content"), &[]);
    let relay = lossy_relay_to(seed.addr());
    let got = lt_fetch_once_more(
        &t.magnet(relay.addr),
        &tmp.path().join("got.info"),
        FETCH_TIMEOUT_S,
        Transport::Default,
    );
    let stats = relay.stats();
    println!(
        "libtorrent -> lossy relay -> libtorrent seed: {} metadata pieces in {:.3} s; relay {stats:?}",
        t.metadata_pieces, got.seconds
    );
    assert!(got.info == t.info, "wrong bytes through the relay");
    assert_eq!(got.transport_to(relay.addr), Some("utp"), "{:?}", got.peers);
    assert!(
        stats.to_target.dropped + stats.to_client.dropped > 0,
        "no packet was lost: the test did not test loss ({stats:?})"
    );
}

/// (a) magnetar serving a 15-piece metadata over uTP through loss. Fails until magnetar
/// listens on UDP (uTP).
#[test]
fn magnetar_serves_15_pieces_over_lossy_utp() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let t = fifteen_piece_torrent(tmp.path());
    let data = tmp.path().join("data");
    import(&data, &[&t.path]);
    let server = ServerProc::start(&data, &["--threads", "2"]);
    // uTP shares the TCP port number.
    let relay = lossy_relay_to(server.addr);
    let got = lt_fetch_with(
        &t.magnet(relay.addr),
        &tmp.path().join("got.info"),
        FETCH_TIMEOUT_S,
        Transport::Default,
    );
    println!(
        "libtorrent -> lossy relay -> magnetar: {} metadata pieces in {:.3} s; relay {:?}",
        t.metadata_pieces,
        got.seconds,
        relay.stats()
    );
    assert!(got.info == t.info, "wrong bytes from magnetar over uTP");
    assert_eq!(got.transport_to(relay.addr), Some("utp"), "{:?}", got.peers);
}

/// (b) magnetar fetching a 15-piece metadata upstream over uTP through loss: `magnetar
/// fetch` with x.pe = the relay, in front of a libtorrent seed on its defaults. Fails until
/// magnetar's fetcher dials uTP.
#[test]
fn magnetar_fetches_15_pieces_over_lossy_utp() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let t = fifteen_piece_torrent(tmp.path());
    let seed = LtSeed::start(&[&t.path], &tmp.path().join("t/content"), &[]);
    let relay = lossy_relay_to(seed.addr());
    let out = tmp.path().join("got.torrent");
    let started = Instant::now();
    let res = Command::new(magnetar_bin())
        .arg("fetch")
        .arg(t.magnet(relay.addr))
        .args(["--no-dht", "--fetch-timeout-ms"])
        .arg((u64::from(FETCH_TIMEOUT_S) * 1000).to_string())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("spawning magnetar fetch");
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "magnetar fetch -> lossy relay -> libtorrent seed: {} metadata pieces, exit {} after {seconds:.3} s; relay {:?}",
        t.metadata_pieces,
        res.status,
        relay.stats()
    );
    assert!(
        res.status.success(),
        "magnetar fetch failed through the lossy relay:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let torrent = std::fs::read(&out).unwrap();
    let span = magnetar::metainfo::info_span(&torrent).unwrap();
    assert!(
        torrent[span] == t.info[..],
        "wrong bytes from magnetar fetch"
    );
}
