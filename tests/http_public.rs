//! The public HTTP listener (`--http`): .torrent files by info-hash over plain HTTP/1.1 on
//! loopback, checked byte-exactly, by libtorrent, and against the admin plane's copy;
//! HEAD, ETag/304, CORS preflight, real 404s and the 4xx of bad input; miss-through from a
//! loopback parent within the wait, and a miss that cannot be filled answered 404 within
//! it. Runs on either driver (MAGNETAR_DRIVER=epoll for the fallback).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::bep9::{FakeSeed, SeedBehaviour};
use common::info::{import_all, v1_info, v1_key, Torrent};
use common::{
    http, require_libtorrent, require_webtorrent, run_ok, wt_fetch, ServerProc, PYTHON, TOKEN,
};

/// A tracker URL on a closed loopback port: it goes into the served .torrent files, and
/// no test here makes the server reach it for a hit.
const TRACKER: &str = "http://127.0.0.1:9/announce";

/// One HTTP/1.1 response as read off the wire.
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive connection to the HTTP listener that reads answers by Content-Length.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect to --http");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).unwrap();
    }

    /// Reads one response; `no_body` for HEAD answers (their Content-Length is the GET's).
    fn read(&mut self, no_body: bool) -> Resp {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill("a response head");
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .map_or(0, |v| v.parse().unwrap());
        let len = if no_body || status == 304 || status == 204 {
            0
        } else {
            len
        };
        while self.buf.len() < len {
            self.fill("a response body");
        }
        let body = self.buf.drain(..len).collect();
        Resp {
            status,
            headers,
            body,
        }
    }

    fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 65536];
        let n = self
            .stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("reading {what}: {e}"));
        assert!(n > 0, "connection closed while reading {what}");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn request(&mut self, method: &str, path: &str, extra: &str) -> Resp {
        self.send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n"
        ));
        self.read(method == "HEAD")
    }

    /// Whether the server closes the connection within `within` (EOF or reset), after
    /// whatever it still sends.
    fn closed_within(&mut self, within: Duration) -> bool {
        self.stream.set_read_timeout(Some(within)).unwrap();
        let mut chunk = [0u8; 4096];
        let until = Instant::now() + within;
        while Instant::now() < until {
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) if Instant::now() < until => return true,
                Ok(_) => continue,
                _ => return false,
            }
        }
        false
    }
}

/// The `http=` address of the ready line.
fn http_addr(server: &ServerProc) -> SocketAddr {
    server
        .ready_line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("http="))
        .unwrap_or_else(|| panic!("no http= in {:?}", server.ready_line))
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    Conn::open(addr).request("GET", path, "")
}

/// libtorrent parses `torrent`: its v1 info-hash (hex) and how many trackers it read.
fn libtorrent_reads(dir: &std::path::Path, torrent: &[u8]) -> (String, usize) {
    require_libtorrent();
    let file = dir.join("downloaded.torrent");
    std::fs::write(&file, torrent).unwrap();
    let out = run_ok(std::process::Command::new(PYTHON).args([
        "-c",
        "import sys, libtorrent as lt\n\
         ti = lt.torrent_info(open(sys.argv[1], 'rb').read())\n\
         print(str(ti.info_hashes().v1))\n\
         print(len(list(ti.trackers())))",
        file.to_str().unwrap(),
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let hash = lines.next().unwrap().trim().to_owned();
    let trackers = lines.next().and_then(|l| l.trim().parse().ok());
    (
        hash,
        trackers.unwrap_or_else(|| panic!("libtorrent said {text:?}")),
    )
}

struct Stored {
    _tmp: tempfile::TempDir,
    server: ServerProc,
    http: SocketAddr,
    t: Torrent,
}

impl Stored {
    /// The public path of the stored torrent.
    fn path(&self) -> String {
        format!("/torrent/{}.torrent", hex::encode(self.t.key))
    }

    /// The .torrent as a fresh connection gets it (a 200), to compare other answers with.
    fn whole(&self) -> Resp {
        let whole = get(self.http, &self.path());
        assert_eq!(whole.status, 200);
        whole
    }
}

fn stored_server(extra: &[&str]) -> Stored {
    let tmp = tempfile::tempdir().unwrap();
    let info = v1_info("film.mkv", 2000); // 3 metadata pieces: a 40 KiB+ body
    let data = import_all(tmp.path(), &[("film", &info)]);
    let mut args = vec!["--http", "127.0.0.1:0", "--tracker", TRACKER];
    if !extra.contains(&"--threads") {
        args.extend_from_slice(&["--threads", "2"]);
    }
    args.extend_from_slice(extra);
    let server = ServerProc::start(&data, &args);
    Stored {
        http: http_addr(&server),
        server,
        _tmp: tmp,
        t: Torrent::v1(info),
    }
}

/// GET by lower- and uppercase hex and base32: 200, the .torrent byte-exact (the admin
/// plane's bytes, the stored dict wrapped with the tracker), parseable by libtorrent with
/// the same info-hash, with the content type, CORS, ETag and caching headers.
#[test]
fn get_serves_the_whole_torrent_byte_exactly() {
    let s = stored_server(&[]);
    let hex = hex::encode(s.t.key);
    let expected = magnetar::metainfo::build_torrent(&s.t.info, &[TRACKER.to_owned()]);
    let admin = http::get(&s.server.url(&format!("/torrents/{hex}.torrent")));
    assert_eq!(admin.status, 200);
    assert!(admin.body == expected, "admin plane's .torrent differs");

    let r = get(s.http, &format!("/torrent/{hex}.torrent"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.body == expected,
        "public .torrent differs from the admin plane's"
    );
    assert_eq!(r.header("content-type"), "application/x-bittorrent");
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert!(r.header("cache-control").contains("max-age="));
    assert!(r.header("etag").starts_with(&format!("\"{hex}-")));
    assert!(r
        .header("content-disposition")
        .contains(&format!("filename=\"{hex}.torrent\"")));
    assert_eq!(libtorrent_reads(s._tmp.path(), &r.body), (hex.clone(), 1));

    let upper = get(s.http, &format!("/torrent/{}.torrent", hex.to_uppercase()));
    assert_eq!(upper.status, 200);
    assert!(upper.body == expected);
    let b32 = data_encoding::BASE32.encode(&s.t.key);
    let by_b32 = get(s.http, &format!("/torrent/{b32}.torrent?title=My%20Film"));
    assert_eq!(by_b32.status, 200);
    assert!(by_b32.body == expected);
    assert!(
        by_b32
            .header("content-disposition")
            .contains("filename=\"My Film.torrent\""),
        "{:?}",
        by_b32.headers
    );
}

/// One keep-alive connection: HEAD (the GET's headers, no body: the next answer parses),
/// If-None-Match → 304, a preflight allowing user-agent, a 404, then a GET.
#[test]
fn head_etag_preflight_and_keep_alive_on_one_connection() {
    let s = stored_server(&[]);
    let path = s.path();
    let mut c = Conn::open(s.http);
    let head = c.request("HEAD", &path, "");
    assert_eq!(head.status, 200);
    let len: usize = head.header("content-length").parse().unwrap();
    let expected = magnetar::metainfo::build_torrent(&s.t.info, &[TRACKER.to_owned()]);
    assert_eq!(len, expected.len());
    let etag = head.header("etag").to_owned();

    let cached = c.request("GET", &path, &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(cached.status, 304);
    assert_eq!(cached.header("etag"), etag);
    assert_eq!(cached.header("access-control-allow-origin"), "*");
    let stale = c.request("GET", &path, "If-None-Match: \"other\"\r\n");
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body.len(), len);

    let pre = c.request(
        "OPTIONS",
        &path,
        "Origin: http://page.example\r\nAccess-Control-Request-Method: GET\r\n\
         Access-Control-Request-Headers: user-agent\r\n",
    );
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), "*");
    assert!(pre.header("access-control-allow-methods").contains("GET"));
    assert!(pre
        .header("access-control-allow-headers")
        .to_ascii_lowercase()
        .contains("user-agent"));

    let unknown_path = c.request("GET", "/metrics", "");
    assert_eq!(
        unknown_path.status, 404,
        "no admin endpoint on the public listener"
    );
    assert_eq!(unknown_path.header("access-control-allow-origin"), "*");
    let admin_path = c.request(
        "GET",
        &format!("/torrents/{}.torrent", hex::encode(s.t.key)),
        "",
    );
    assert_eq!(admin_path.status, 404);
    let again = c.request("GET", &path, "");
    assert_eq!(again.status, 200);
    assert_eq!(again.body.len(), len);
}

/// A .torrent far larger than the socket buffers, to a client that does not read for a
/// while and then reads slowly, twice on one connection (the second request pipelined):
/// the server's send stops on a full socket many times (in the head, the sendfile of the
/// body, or before the closing byte) and resumes at the right byte each time; both bodies
/// arrive byte-exact and in order. Meanwhile another client on the same (only) worker is
/// answered at once: a full socket waits in the runtime, never in a blocking syscall
/// (the accepted sockets are non-blocking from accept4). Once from the answer cache (one
/// sendfile of head and body from its memfd), once with the cache off (head, dict from the
/// segment file, closing byte).
#[test]
fn large_torrent_to_a_slow_reader_resumes_at_the_right_byte() {
    slow_reader(&[]);
}

#[test]
fn large_torrent_to_a_slow_reader_without_the_answer_cache() {
    slow_reader(&["--http-cache-mib", "0"]);
}

fn slow_reader(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let info = v1_info("big.iso", 150_000); // a 3 MB dict
    let data = import_all(tmp.path(), &[("big", &info)]);
    let mut args = vec![
        "--http",
        "127.0.0.1:0",
        "--tracker",
        TRACKER,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    let server = ServerProc::start(&data, &args);
    let path = format!(
        "/torrent/{}.torrent",
        hex::encode(Torrent::v1(info.clone()).key)
    );
    let expected = magnetar::metainfo::build_torrent(&info, &[TRACKER.to_owned()]);

    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small receive window (set before connecting): the server's sends fill up early.
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&http_addr(&server).into()).unwrap();
    let mut c = Conn {
        stream: sock.into(),
        buf: Vec::new(),
    };
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    std::thread::sleep(Duration::from_millis(300));
    // The slow client's answer is stuck on its full socket; the worker serves others.
    let (other, took) = timed_get(http_addr(&server), &path);
    assert_eq!(other.status, 200);
    assert!(other.body == expected, "the other client's bytes differ");
    assert!(
        took < Duration::from_secs(3),
        "another client waited {took:?} behind a full socket"
    );
    // Slow reads for a while (small chunks), then the rest at full speed.
    let mut chunk = [0u8; 2048];
    for _ in 0..50 {
        let n = c.stream.read(&mut chunk).unwrap();
        assert!(n > 0);
        c.buf.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(2));
    }
    for round in 0..2 {
        let r = c.read(false);
        assert_eq!(r.status, 200, "answer {round}");
        assert_eq!(r.body.len(), expected.len(), "answer {round}: length");
        assert!(r.body == expected, "answer {round}: bytes differ");
    }
}

/// A request head larger than one read (a 6 KiB cookie, sent in one write): the reads
/// that fill the buffer leave bytes in the socket, and the next read must take them at
/// once (under io_uring the readiness is edge-triggered: no new edge comes for bytes
/// already queued). After a small request, so that the connection waits on readiness;
/// twice on the same connection.
#[test]
fn request_head_larger_than_one_read_is_answered() {
    let s = stored_server(&["--http-request-timeout-ms", "3000"]);
    let path = s.path();
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(6000));
    let mut c = Conn::open(s.http);
    // A small request first: the connection then waits for the next one on readiness.
    assert_eq!(c.request("GET", &path, "").status, 200);
    for round in 0..2 {
        let started = Instant::now();
        let r = c.request("GET", &path, &cookie);
        assert_eq!(r.status, 200, "round {round}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
}

/// A hash served (so in the worker's answer cache) and then deleted on the admin plane
/// (tombstone + blocklist) is a 404 on the same connection right after: the cache never
/// answers for a hash the store no longer serves. One worker, so the second request meets
/// the entry the first one made.
#[test]
fn deleted_hash_is_not_served_from_the_answer_cache() {
    let s = stored_server(&["--threads", "1"]);
    let path = s.path();
    let mut c = Conn::open(s.http);
    let first = c.request("GET", &path, "");
    assert_eq!(first.status, 200);
    let again = c.request("GET", &path, "");
    assert!(
        again.body == first.body,
        "the cached answer differs from the first"
    );
    let url = s.server.url(&format!("/torrents/{}", hex::encode(s.t.key)));
    let deleted = http::delete(&url, Some(TOKEN));
    assert!(deleted.status < 300, "admin DELETE: {}", deleted.status);
    let after = c.request("GET", &path, "");
    assert_eq!(after.status, 404, "{}", after.text());
}

/// Bad input: 400 for a hash that is not one, 405 for another method, 413 for a body,
/// 414 for a long target, 431 for a huge head (the last three close the connection), and
/// a client that never finishes its head is closed at the request timeout.
#[test]
fn bad_requests_get_their_statuses_and_slow_ones_a_timeout() {
    let s = stored_server(&["--http-request-timeout-ms", "700"]);
    let mut c = Conn::open(s.http);
    let bad = c.request("GET", "/torrent/not-a-hash.torrent", "");
    assert_eq!(bad.status, 400);
    let post = c.request("DELETE", &s.path(), "");
    assert_eq!(post.status, 405);
    assert!(post.header("allow").contains("GET"));
    // Still open after those: a 200 follows.
    assert_eq!(c.request("GET", &s.path(), "").status, 200);

    let mut c = Conn::open(s.http);
    c.send("POST /torrent/x.torrent HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.read(false).status, 413);
    assert!(c.closed_within(Duration::from_secs(3)));

    let mut c = Conn::open(s.http);
    c.send(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(3000)));
    assert_eq!(c.read(false).status, 414);

    let mut c = Conn::open(s.http);
    c.send(&format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    ));
    assert_eq!(c.read(false).status, 431);
    assert!(c.closed_within(Duration::from_secs(3)));

    let mut c = Conn::open(s.http);
    c.send("GET /torrent/");
    let started = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "slow head not closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "closed too early: {took:?}"
    );
}

/// A server with the HTTP listener whose only metadata source is `parent`; an HTTP miss
/// waits at most `miss_wait_ms`. `extra` arguments follow.
fn miss_server(
    tmp: &std::path::Path,
    parent: SocketAddr,
    miss_wait_ms: u64,
    extra: &[&str],
) -> ServerProc {
    let (wait, parent) = (miss_wait_ms.to_string(), parent.to_string());
    let mut args = vec![
        "--threads",
        "2",
        "--http",
        "127.0.0.1:0",
        "--http-miss-wait-ms",
        &wait,
        "--parent",
        &parent,
    ];
    args.extend_from_slice(extra);
    ServerProc::start(&tmp.join("data"), &args)
}

/// A GET on a new connection and how long its answer took.
fn timed_get(addr: SocketAddr, path: &str) -> (Resp, Duration) {
    let started = Instant::now();
    let r = get(addr, path);
    (r, started.elapsed())
}

/// A hash nobody has stored: the HTTP request starts the miss, the parent serves the
/// metadata, and the answer is the 200 within the wait; then it is stored (a hit).
#[test]
fn miss_is_filled_from_a_parent_within_the_wait() {
    let info = v1_info("fresh", 900);
    let key = v1_key(&info);
    let seed = FakeSeed::start(
        info.clone(),
        key,
        SeedBehaviour::Honest {
            delay: Duration::from_millis(300),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let server = miss_server(tmp.path(), seed.addr, 4000, &[]);
    let addr = http_addr(&server);
    let path = format!("/torrent/{}.torrent", hex::encode(key).to_uppercase());
    let (r, took) = timed_get(addr, &path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took < Duration::from_millis(4000), "took {took:?}");
    assert!(r.body == magnetar::metainfo::build_torrent(&info, &[]));
    assert_eq!(libtorrent_reads(tmp.path(), &r.body), (hex::encode(key), 0));
    let again = get(addr, &path);
    assert_eq!(again.status, 200);
    assert_eq!(seed.connections(), 1, "the second request was a hit");
}

/// A miss whose only source never answers: a 404 with a text body once the wait is over
/// (not before, not much after); with the per-IP miss budget spent, a 429 with
/// Retry-After at once.
#[test]
fn miss_that_cannot_be_filled_is_a_404_within_the_wait_and_a_refused_one_429() {
    let info = v1_info("never", 100);
    let key = v1_key(&info);
    let silent = FakeSeed::start(info, key, SeedBehaviour::Silent);
    let tmp = tempfile::tempdir().unwrap();
    let server = miss_server(
        tmp.path(),
        silent.addr,
        1500,
        &["--misses-per-ip-per-minute-max", "1"],
    );
    let addr = http_addr(&server);
    let (r, took) = timed_get(addr, &format!("/torrent/{}.torrent", hex::encode(key)));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("not found"), "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3500),
        "404 after {took:?}, want ~1.5 s"
    );
    let (refused, took) = timed_get(addr, &format!("/torrent/{}.torrent", "ab".repeat(20)));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.header("retry-after").parse::<u64>().unwrap() > 0);
    assert!(took < Duration::from_secs(1), "429 after {took:?}");
}

/// `--public-http-url`: the admin plane's magnet carries `xs=` pointing at the listener,
/// and that URL serves the .torrent.
#[test]
fn admin_magnet_carries_xs_that_the_listener_serves() {
    // The base URL must name the listener's port, which the kernel chooses: take a free
    // one first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}/");
    let s = stored_server(&["--http", &listen, "--public-http-url", &base]);
    let hex = hex::encode(s.t.key);
    let magnet = http::get(&s.server.url(&format!("/magnet/{hex}"))).text();
    let xs = magnet
        .split('&')
        .find_map(|p| p.strip_prefix("xs="))
        .unwrap_or_else(|| panic!("no xs= in {magnet}"));
    let url = xs.trim().replace("%3A", ":").replace("%2F", "/");
    assert_eq!(
        url,
        format!("http://{listen}/torrent/{}.torrent", hex.to_uppercase())
    );
    let addr: SocketAddr = listen.parse().unwrap();
    let path = url.strip_prefix(&format!("http://{listen}")).unwrap();
    assert_eq!(get(addr, path).status, 200);
}

/// SIGTERM with an idle keep-alive connection open: the connection is closed at once and
/// the server exits well before the shutdown grace time (it does not wait for a client
/// that may never send another request). The counters of what was served are on /metrics.
#[test]
fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let mut s = stored_server(&["--shutdown-grace-ms", "20000"]);
    let mut c = Conn::open(s.http);
    let path = s.path();
    assert_eq!(c.request("GET", &path, "").status, 200);
    let metrics = http::get(&s.server.url("/metrics")).text();
    for (name, at_least) in [
        ("magnetar_http_requests_total", 1.0),
        ("magnetar_http_torrents_served_total", 1.0),
        ("magnetar_http_connections_accepted_total", 1.0),
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} not in /metrics"));
        assert!(value >= at_least, "{name} = {value}");
    }
    let started = Instant::now();
    let status = s.server.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(
        c.closed_within(Duration::from_secs(1)),
        "idle connection left open"
    );
}

/// webtorrent 3 (node) given a magnet whose only source is `xs=` (no x.pe, no tracker, no
/// DHT) gets the metadata from the HTTP listener: the info dict it reports is the stored
/// one, and it had no peer connection when the metadata arrived.
#[test]
fn webtorrent_gets_the_metadata_from_a_magnet_with_only_xs() {
    require_webtorrent();
    let s = stored_server(&[]);
    let url =
        magnetar::magnet::exact_source_url(&format!("http://{}", s.http), Some(&s.t.key), None)
            .unwrap();
    let magnet = magnetar::magnet::Magnet {
        btih: Some(s.t.key),
        exact_sources: vec![url],
        ..Default::default()
    }
    .to_uri();
    let got = wt_fetch(&magnet, &s._tmp.path().join("wt.info"), 30);
    assert!(
        got.info == s.t.info,
        "webtorrent's info dict differs from the stored one"
    );
    assert!(
        got.wires.is_empty(),
        "metadata from peers, not xs=: {:?}",
        got.wires
    );
}

/// A page served from another origin (another loopback port) fetches the .torrent with
/// `fetch()` in a real Chromium, with a non-safelisted header so that the browser sends a
/// CORS preflight first, and reads the whole body: its SHA-1 matches the .torrent's.
#[test]
fn chromium_page_from_another_origin_fetches_the_torrent() {
    const CHROMIUM: &str = "/usr/bin/chromium";
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "chromium is missing: apt-get install chromium"
    );
    use sha1::{Digest, Sha1};
    let s = stored_server(&[]);
    let expected = magnetar::metainfo::build_torrent(&s.t.info, &[TRACKER.to_owned()]);
    let want = hex::encode(Sha1::digest(&expected));
    let url = format!(
        "http://{}/torrent/{}.torrent",
        s.http,
        hex::encode_upper(s.t.key)
    );
    let page = format!(
        "<!doctype html><html><body><pre id=out>pending</pre><script>\n\
         (async () => {{\n\
           const out = document.getElementById('out');\n\
           try {{\n\
             const r = await fetch('{url}', {{headers: {{'X-Requested-With': 'magnetar-test'}}}});\n\
             const body = await r.arrayBuffer();\n\
             const d = new Uint8Array(await crypto.subtle.digest('SHA-1', body));\n\
             const hex = Array.from(d, b => b.toString(16).padStart(2, '0')).join('');\n\
             out.textContent = 'fetched ' + r.status + ' ' + body.byteLength + ' ' + hex;\n\
           }} catch (e) {{ out.textContent = 'failed ' + e; }}\n\
         }})();\n\
         </script></body></html>"
    );
    // The page's origin: a one-page HTTP server on another port (a few connections: the
    // page, maybe a favicon).
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let page_url = format!("http://{}/page.html", origin.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in origin.incoming().take(8) {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let before = preflights(&s.server);
    let profile = s._tmp.path().join("chromium-profile");
    let out = run_ok(
        std::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--virtual-time-budget=15000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", &page_url]),
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let line = dom
        .lines()
        .find(|l| l.contains("<pre id=\"out\">"))
        .unwrap_or_else(|| panic!("no result in the page: {dom}"));
    assert!(
        line.contains(&format!("fetched 200 {} {want}", expected.len())),
        "the page said: {line}"
    );
    assert!(
        preflights(&s.server) > before,
        "Chromium sent no preflight (OPTIONS) first"
    );
}

fn preflights(server: &ServerProc) -> f64 {
    http::get(&server.url("/metrics"))
        .text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("magnetar_http_preflights_total")
                .and_then(|v| v.trim().parse().ok())
        })
        .expect("magnetar_http_preflights_total on /metrics")
}

/// A client that sends more after a `Connection: close` request (a pipelined request with
/// a head larger than one read, so bytes stay unread in the server's socket) still gets
/// the whole first answer, then the close: the FIN goes out with the answer before the
/// close, which (with unread bytes) resets the connection and would drop an answer still
/// held by the cork.
#[test]
fn answer_before_close_survives_bytes_sent_after_the_close_request() {
    let s = stored_server(&["--threads", "1"]);
    let path = s.path();
    let whole = s.whole();
    for round in 0..3 {
        let mut c = Conn::open(s.http);
        let cookie = "x".repeat(16 * 1024);
        c.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\
             GET {path} HTTP/1.1\r\nHost: x\r\nCookie: c={cookie}\r\n\r\n"
        ));
        let r = c.read(false);
        assert_eq!(r.status, 200, "round {round}");
        assert!(
            r.body == whole.body,
            "round {round}: the answer's body differs"
        );
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "round {round}: not closed"
        );
    }
}

/// A `Connection: close` request that is not whole when the connection is handed over
/// (the listener defers accept to the first bytes; the rest comes in pieces), and one
/// whose client stays silent past the defer time (handed over with nothing to read): both
/// are answered in full and closed. The first read finds the socket empty or the head
/// incomplete, so the connection waits for readiness (under epoll: registered with the
/// runtime only then). One worker, so every round meets the same loop.
#[test]
fn close_request_in_pieces_or_after_silence_is_answered() {
    let s = stored_server(&["--threads", "1", "--http-request-timeout-ms", "5000"]);
    let whole = s.whole();
    let pieces = [
        "GET /torrent/".to_owned(),
        format!("{}.torrent HTTP/1.1\r\nHost: x\r\n", hex::encode(s.t.key)),
        "Connection: close\r\n\r\n".to_owned(),
    ];
    for silence_ms in [0, 1500] {
        let mut c = Conn::open(s.http);
        std::thread::sleep(Duration::from_millis(silence_ms));
        for piece in &pieces {
            c.send(piece);
            std::thread::sleep(Duration::from_millis(150));
        }
        let r = c.read(false);
        assert_eq!(r.status, 200, "after {silence_ms} ms of silence");
        assert_eq!(r.header("connection"), "close");
        assert!(
            r.body == whole.body,
            "after {silence_ms} ms: the body differs"
        );
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "after {silence_ms} ms: not closed"
        );
    }
}

/// A client that connects and never sends a byte is still closed by the request timeout
/// (the listener's deferred accept hands it over after `HTTP_DEFER_ACCEPT_S`; the timeout
/// runs from then), not kept forever.
#[test]
fn silent_connection_is_closed_at_the_request_timeout() {
    let s = stored_server(&["--http-request-timeout-ms", "700"]);
    let mut c = Conn::open(s.http);
    let started = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(8)),
        "silent connection not closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "closed too early: {took:?}"
    );
}

/// One worker, keep-alive connections that wait between requests: the first to wait waits
/// alone (io_uring: a poll of its own socket), the second joins the worker's epoll set,
/// and the first joins it too at its next wait; then the set empties and a new lone
/// waiter takes the place. Every request on every connection is answered, byte-exact, in
/// each of those states (under epoll the same requests go through monoio's poller).
#[test]
fn keep_alive_connections_moving_between_lone_wait_and_the_set_are_answered() {
    let s = stored_server(&["--threads", "1"]);
    let path = s.path();
    let whole = s.whole();
    let check = |c: &mut Conn, what: &str| {
        let r = c.request("GET", &path, "");
        assert_eq!(r.status, 200, "{what}");
        assert!(r.body == whole.body, "{what}: the body differs");
    };
    let settle = || std::thread::sleep(Duration::from_millis(100));
    let mut a = Conn::open(s.http);
    check(&mut a, "a, first request");
    settle(); // a waits alone
    let mut b = Conn::open(s.http);
    check(&mut b, "b, first request");
    settle(); // b waits in the set
    check(&mut a, "a, woken from its lone wait");
    settle(); // a waits in the set now
    check(&mut b, "b, from the set");
    check(&mut a, "a, from the set");
    drop(b);
    drop(a);
    settle();
    let mut c = Conn::open(s.http);
    for i in 0..3 {
        check(&mut c, &format!("c, request {i} after the others left"));
        settle();
    }
}
