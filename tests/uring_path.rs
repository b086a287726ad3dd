//! What the io_uring serving path (docs/io-uring.md) adds: zero-copy send, and the pause
//! of a peer's receive while its replies cannot go out. Both hold on the epoll path too
//! (scripts/test.sh runs these again with MAGNETAR_DRIVER=epoll), where the first is a
//! no-op and the second is the monoio session's read-after-write.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::kit::*;
use common::peer::*;
use common::ServerProc;

#[test]
fn zero_copy_sends_carry_the_same_bytes() {
    let fx = fixture();
    let mut server = serve(&fx, &["--send-zc-min-bytes", "1"]);
    let before = metrics(&server);
    let t = &fx.normal;
    let mut o = open(server.addr, &t.key, 4);
    // Two batches on one connection: every piece, then the last one again.
    let blocks = fetch(&mut o, t, 4, &[0, 1, 2]);
    assert!(blocks.concat() == t.info, "the blocks make the info dict");
    fetch(&mut o, t, 4, &[2]);
    let m = metrics(&server);
    let (zc, copied) = (
        get(&m, "magnetar_uring_send_zc_total"),
        get(&m, "magnetar_uring_send_zc_copied_total"),
    );
    println!(
        "driver {}: {zc} zero-copy sends, {copied} copied by the kernel",
        server.driver
    );
    if server.driver == "io_uring" {
        assert!(zc >= 2, "both batches went out zero-copy ({zc})");
        // `copied` is printed, not asserted: on loopback the kernel copies, and reported
        // it for 1 of these 2 sends here.
    }
    // On epoll there is no zero-copy send to count: the test checks the bytes only.
    assert_healthy(&mut server, &before, t, "zero-copy sends");
}

/// A peer that writes requests and never reads its answers: once our replies fill the
/// socket, the server stops taking its bytes (TCP holds the rest back in the peer's
/// buffers), keeps its own memory flat, and closes it at the write deadline.
#[test]
fn a_peer_that_never_reads_is_held_back_by_tcp_and_closed_at_the_write_deadline() {
    const IDLE_MS: u64 = 3000;
    /// Far above what the kernel buffers on loopback (send + receive buffer autotuning,
    /// a few MB each): a server that kept taking bytes would let the peer write it all,
    /// and its memory would grow by as much.
    const WRITE_BOUND: usize = 64 << 20;
    let fx = fixture();
    let idle = IDLE_MS.to_string();
    let mut server = serve(&fx, &["--idle-timeout-ms", &idle]);
    let before = metrics(&server);
    let rss_before = rss_kib(&server);
    let t = &fx.normal;
    let mut o = open(server.addr, &t.key, 4);
    // Bursts of requests for the 3-piece dict: answered (data, rejects past reqq) until
    // our replies have nowhere to go.
    let chunk = requests(o.server_id, std::iter::repeat_n(2u32, 1000));
    o.peer
        .s
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut written = 0usize;
    // How the writes ended: blocked for 500 ms (the server stopped reading: held back by
    // TCP), or failed (the server closed the connection).
    let mut held_back = false;
    let start = Instant::now();
    // Where the next write starts in `chunk`: a write the kernel takes only in part must
    // go on from there, or the stream would break mid-frame (a protocol error of ours).
    let mut at = 0;
    while written < WRITE_BOUND && start.elapsed() < Duration::from_secs(20) {
        match o.peer.s.write(&chunk[at..]) {
            Ok(n) => {
                written += n;
                at = (at + n) % chunk.len();
            }
            Err(e) => {
                use std::io::ErrorKind::{TimedOut, WouldBlock};
                held_back = matches!(e.kind(), WouldBlock | TimedOut);
                break;
            }
        }
    }
    let blocked_after = start.elapsed();
    let rss_growth = rss_kib(&server).saturating_sub(rss_before);
    println!(
        "driver {}: the peer could write {:.1} MB before it was held back ({blocked_after:?}); \
         server RSS +{rss_growth} KiB",
        server.driver,
        written as f64 / 1e6
    );
    assert!(
        written < WRITE_BOUND,
        "the server kept taking bytes: {written}"
    );
    // Bounded, and far below what the peer wrote: the held bytes are capped per
    // connection (docs/io-uring.md "Backpressure"); what remains is the allocator's
    // one-time growth on the worker's first large buffers (~10 MB on io_uring, measured
    // flat over repeated floods).
    assert!(
        rss_growth < 32 * 1024,
        "server memory grew {rss_growth} KiB"
    );
    // The write deadline (the idle timeout) ends it, or the flood cap
    // (`limits::UNHANDLED_BYTES_MAX`, reachable on io_uring, whose multishot receive may
    // take a socket's worth in one turn) already has.
    let (_, waited) = o
        .peer
        .closed_within(Duration::from_millis(IDLE_MS * 3))
        .expect("not closed at the write deadline");
    let floods = get(&metrics(&server), "magnetar_protocol_errors_total")
        - get(&before, "magnetar_protocol_errors_total");
    println!("held back: {held_back}; closed {waited:?} after that; flood closes: {floods}");
    if held_back && floods == 0 {
        // Held back, not closed: open until the write deadline, an idle timeout after
        // its last reply began (early in the flood).
        assert!(
            blocked_after + waited >= Duration::from_millis(IDLE_MS / 2),
            "closed {:?} into the flood, long before the write deadline",
            blocked_after + waited
        );
    } else {
        // Closed before the deadline: only as a counted flood or protocol error.
        assert!(
            floods >= 1,
            "closed early (held back: {held_back}), but the server counted no flood close"
        );
    }
    assert_healthy(&mut server, &before, t, "peer that never reads");
}

/// A kernel that sets up a ring but lacks an operation the path uses (multishot receive,
/// cancel or close by direct descriptor: 6.0+) must not close every connection with an
/// error: the probe at start finds it, and `--driver auto` serves through epoll instead.
/// Each check is made to fail in turn (`MAGNETAR_URING_PROBE_FAIL`); an unknown name
/// fails none. Under `MAGNETAR_DRIVER=epoll` (the suite's second pass) the server never
/// probes, which the ready line shows too.
#[test]
fn a_kernel_missing_an_operation_falls_back_to_epoll_and_serves() {
    let fx = fixture();
    let t = &fx.normal;
    let forced_epoll = std::env::var("MAGNETAR_DRIVER").is_ok_and(|d| d == "epoll");
    let checks = magnetar::server::uring::PROBE_CHECKS.iter().copied();
    for check in checks.chain(["no-such-check"]) {
        let mut cmd = ServerProc::command(&fx.data, &["--log", "warn", "--threads", "2"]);
        cmd.env("MAGNETAR_URING_PROBE_FAIL", check);
        let mut server = ServerProc::spawn(cmd);
        let expected = if forced_epoll || check != "no-such-check" {
            "epoll"
        } else {
            "io_uring"
        };
        assert_eq!(
            server.driver, expected,
            "with {check} failing: {}",
            server.ready_line
        );
        let before = metrics(&server);
        assert_healthy(&mut server, &before, t, check);
    }
}

/// `--driver io-uring` is a promise: without the ring the server refuses to start, and
/// says which check failed.
#[test]
fn driver_io_uring_without_the_ring_refuses_to_start() {
    let fx = fixture();
    let mut cmd = ServerProc::command(&fx.data, &["--driver", "io-uring", "--threads", "1"]);
    cmd.env("MAGNETAR_URING_PROBE_FAIL", "multishot-recv")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = cmd.output().expect("run magnetar serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains("multishot-recv"),
        "the error names the failed check: {stderr}"
    );
}
