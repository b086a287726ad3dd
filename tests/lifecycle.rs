//! Process lifecycle: SIGTERM under load loses no acknowledged record and exits 0 within
//! the grace time, SIGHUP reloads the blocklist, systemd readiness / watchdog /
//! socket activation.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::*;
use common::info::{torrent_file, v1_info, v1_key};
use common::*;

/// A valid single-file v1 .torrent, unique per `n`, and its v1 info-hash (hex).
fn synthetic_torrent(n: u64) -> (Vec<u8>, String) {
    let info = v1_info(&format!("lifecycle-{n:08}.bin"), 1);
    (torrent_file(&info), hex::encode(v1_key(&info)))
}

/// POST without panicking on transport errors (the server goes away mid-test).
fn try_upload(url: &str, body: &[u8]) -> Option<u16> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    agent
        .post(url)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send(body)
        .ok()
        .map(|r| r.status().as_u16())
}

#[test]
fn sigterm_during_uploads_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = ServerProc::start(&data, &["--shutdown-grace-ms", "2000"]);
    let url = s.url("/torrents");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for t in 0..4u64 {
        let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
        loaders.push(std::thread::spawn(move || {
            let mut n = t;
            while !stop.load(Ordering::Relaxed) {
                let (torrent, hash) = synthetic_torrent(n);
                n += 4;
                match try_upload(&url, &torrent) {
                    Some(201) => acked.lock().unwrap().push(hash),
                    Some(other) if other < 300 => panic!("unexpected {other}"),
                    // 5xx / connection refused / reset: not acknowledged, may or may not exist.
                    _ => {}
                }
            }
        }));
    }
    // Peer connections too, so sessions are open when the signal lands.
    let peers: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    while acked.lock().unwrap().len() < 50 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = acked.lock().unwrap().len();
    assert!(before >= 50, "uploads too slow: {before}");
    let started = Instant::now();
    let status = s.terminate(Duration::from_secs(30));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    drop(peers);
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(
        took < Duration::from_secs(2 + 6),
        "shutdown took {took:?}, longer than grace + margin"
    );

    let acked = acked.lock().unwrap().clone();
    let s = ServerProc::start(&data, &[]);
    for hash in &acked {
        let t = get(&s.url(&format!("/torrents/{hash}.torrent")));
        assert_eq!(t.status, 200, "acknowledged record {hash} lost");
        let span = magnetar::metainfo::info_span(&t.body).unwrap();
        assert_eq!(&hex::encode(v1_key(&t.body[span])), hash, "record verifies");
    }
    let m = get(&s.url("/metrics")).text();
    assert!(
        m.contains("magnetar_recovery_corrupt_records_skipped 0\n"),
        "{m}"
    );
    eprintln!(
        "{} acknowledged uploads, all present after restart",
        acked.len()
    );
}

#[test]
fn sigterm_stops_accepting_and_cuts_idle_sessions_after_the_grace_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(&dir.path().join("d"), &["--shutdown-grace-ms", "700"]);
    // An idle session that never sends its handshake would hold the process for the
    // handshake timeout (10 s); the grace time bounds it.
    let mut idle = TcpStream::connect(s.addr).unwrap();
    // Make sure the worker has accepted it before the signal.
    let until = Instant::now() + Duration::from_secs(10);
    while !get(&s.url("/metrics"))
        .text()
        .contains("magnetar_connections_open 1\n")
    {
        assert!(Instant::now() < until, "connection never counted as open");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    signal(&s.child, libc::SIGTERM);
    // Readiness flips at once; new peers are refused soon after.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = TcpStream::connect_timeout(&s.addr, Duration::from_millis(200)).is_err();
        if refused {
            break;
        }
        assert!(Instant::now() < until, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = wait_timeout(&mut s.child, Duration::from_secs(10)).expect("did not exit");
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(600),
        "idle session was not given its grace: {took:?}"
    );
    assert!(took < Duration::from_secs(6), "grace not bounded: {took:?}");
    // The idle session was closed by the server.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn sighup_reloads_a_hand_edited_blocklist() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let s = ServerProc::start(&data, &[]);
    let (torrent, hash) = synthetic_torrent(42);
    assert_eq!(post(&s.url("/torrents"), Some(TOKEN), &torrent).status, 201);
    assert_eq!(get(&s.url(&format!("/torrents/{hash}"))).status, 200);
    std::fs::write(data.join("blocklist"), format!("# added by hand\n{hash}\n")).unwrap();
    signal(&s.child, libc::SIGHUP);
    let until = Instant::now() + Duration::from_secs(10);
    while get(&s.url(&format!("/torrents/{hash}"))).status != 404 {
        assert!(Instant::now() < until, "SIGHUP did not apply the blocklist");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(post(&s.url("/torrents"), Some(TOKEN), &torrent).status, 403);
    assert_eq!(
        get(&s.url("/healthz")).status,
        200,
        "still running after SIGHUP"
    );
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (sock, path)
}

fn recv_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {want}: {e}; got {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let mut cmd = ServerProc::command(&dir.path().join("d"), &[]);
    cmd.env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "600000");
    let mut s = ServerProc::spawn(cmd);
    recv_until(&sock, "READY=1");
    // Fed while every worker's heartbeat advances.
    recv_until(&sock, "WATCHDOG=1");
    recv_until(&sock, "WATCHDOG=1");
    signal(&s.child, libc::SIGTERM);
    recv_until(&sock, "STOPPING=1");
    assert!(wait_timeout(&mut s.child, Duration::from_secs(20))
        .unwrap()
        .success());
}

#[test]
fn socket_activation_serves_on_the_inherited_socket() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    // sd_listen_fds(3): the socket is fd 3, LISTEN_PID is the service's own pid; `sh -c
    // 'exec'` keeps the pid, so `$$` is it.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(magnetar_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .args(["--admin", "127.0.0.1:0", "--no-dht", "--threads", "2"])
        // Ignored under socket activation.
        .args(["--listen", "127.0.0.1:1"])
        .arg("--admin-token-file")
        .arg(&token_file);
    // SAFETY: dup2 and fcntl are async-signal-safe; runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set: clear it instead.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let s = ServerProc::spawn(cmd);
    drop(listener);
    assert_eq!(s.addr, addr, "{}", s.ready_line);
    let (torrent, hash) = synthetic_torrent(7);
    assert_eq!(post(&s.url("/torrents"), Some(TOKEN), &torrent).status, 201);
    // A BitTorrent handshake on the inherited socket gets the info-hash echoed.
    for _ in 0..4 {
        assert_handshake_echoed(addr, &hash);
    }
}

/// A BitTorrent handshake for `hash` (hex) sent to `addr` is answered with one naming it.
fn assert_handshake_echoed(addr: std::net::SocketAddr, hash: &str) {
    let key = hex::decode(hash).unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hs = vec![19u8];
    hs.extend_from_slice(b"BitTorrent protocol");
    hs.extend_from_slice(&[0, 0, 0, 0, 0, 0x10, 0, 0]);
    hs.extend_from_slice(&key);
    hs.extend_from_slice(b"-TT0001-abcdefghijkl");
    c.write_all(&hs).unwrap();
    let mut reply = [0u8; 68];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[28..48], &key[..]);
}

/// Two sockets from systemd, named as the units name them (`LISTEN_FDNAMES=peer:http`,
/// magnetar.socket and magnetar-http.socket): BitTorrent is served on the first, the
/// public HTTP listener on the second (the ready line says so), and `--listen`/`--http`
/// are ignored.
#[test]
fn socket_activation_passes_the_http_socket_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (peer_addr, http_addr) = (peer.local_addr().unwrap(), http.local_addr().unwrap());
    let fds = [
        std::os::fd::AsRawFd::as_raw_fd(&peer),
        std::os::fd::AsRawFd::as_raw_fd(&http),
    ];
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_FDS=2 LISTEN_FDNAMES=peer:http LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(magnetar_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .args(["--admin", "127.0.0.1:0", "--no-dht", "--threads", "2"])
        // Both ignored under socket activation.
        .args(["--listen", "127.0.0.1:1", "--http", "127.0.0.1:1"])
        .arg("--admin-token-file")
        .arg(&token_file);
    // SAFETY: dup2 is async-signal-safe; runs in the forked child before exec. Out of the
    // way first (100, 101), so that placing one on 3 or 4 cannot close the other.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.into_iter().enumerate() {
                if libc::dup2(fd, 100 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..2 {
                if libc::dup2(100 + i, 3 + i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(100 + i);
            }
            Ok(())
        });
    }
    let s = ServerProc::spawn(cmd);
    drop((peer, http));
    assert_eq!(s.addr, peer_addr, "{}", s.ready_line);
    assert!(
        s.ready_line.contains(&format!("http={http_addr}")),
        "{}",
        s.ready_line
    );
    let (torrent, hash) = synthetic_torrent(9);
    assert_eq!(post(&s.url("/torrents"), Some(TOKEN), &torrent).status, 201);
    let url = format!("http://{http_addr}/torrent/{hash}.torrent");
    let reply = get(&url);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_handshake_echoed(peer_addr, &hash);
}
