//! The public, read-only HTTP listener (`--http`): `.torrent` files by info-hash for
//! browsers (CORS) and tools that turn magnets into .torrent files.
//!
//! It runs on the worker cores like the BitTorrent listener: one `SO_REUSEPORT` socket
//! per worker and address, a monoio task per connection, the record read straight from
//! the store's mmap. The body is the stored info dict byte-exactly, wrapped like the admin
//! plane's (`metainfo::build_torrent`: `announce`/`announce-list` of the configured
//! trackers, then `info`): the wrapping's bytes before and after the dict are made once
//! per worker. Each worker keeps whole answers (head, wrapping, dict, `e`) in a memfd
//! (`cache`), so the common answer is one sendfile(2) and any other one a head and a
//! sendfile: no metadata byte is copied into socket buffers (the pages are attached), and
//! the dict is copied once per hash and worker, into the cache.
//!
//! An unknown hash takes the miss path a BitTorrent handshake takes (`Upstream::submit`:
//! one fetch per hash however many wait, the per-IP and global miss budgets) and waits at
//! most `--http-miss-wait-ms` for it: 200 when it arrives, 404 when it does not, 429 with
//! `Retry-After` when a budget refused it.
//!
//! - `codec`: request heads in, answers out (no I/O)
//! - `conn`: a connection's reads and non-blocking sends (sendfile of the dict)
//! - `cache`: a worker's whole answers in a memfd, by info-hash

mod cache;
pub mod codec;
mod conn;
mod ready;

use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpListener;
use monoio::time::Instant;

use crate::limits;
use crate::server::limiter::ConnectionLimiter;
use crate::server::session::{ReadOutcome, WorkerCtx};
use crate::server::worker::{self, OpenSession};
use crate::store::RecordRef;
use crate::upstream::shard::{FetchFailure, FetchOutcome, Hints};
use cache::{AnswerCache, Entry};
use codec::{HeadError, Method, Request, Status, Target};
use conn::{Conn, FileRange};

/// What every connection of one worker shares: the .torrent wrapping and the timings.
pub struct HttpShared {
    /// The bytes of a .torrent before the info dict (`d` … `4:info`).
    prefix: Vec<u8>,
    /// A tag of the wrapping for ETags: the answer changes when the trackers do.
    wrap_tag: u32,
    miss_wait: Duration,
    request_timeout: Duration,
    /// Fired when the worker's HTTP listeners stop: idle connections close at once.
    stop: crate::server::signal::StopSignal,
    /// Whole answers by info-hash (borrowed only between awaits).
    cache: RefCell<AnswerCache>,
    /// The worker's monoio runtime is on io_uring: connections read on the readiness
    /// of this epoll set (`ready`).
    reactor: Option<Rc<ready::Reactor>>,
    /// The worker's monoio runtime is on io_uring (there monoio closes a socket with a
    /// ring operation: `conn`).
    uring: bool,
}

/// The byte after the info dict: the end of the .torrent's top-level dict.
const SUFFIX: &[u8] = b"e";

impl HttpShared {
    /// Inside the worker's runtime: under io_uring (`uring`) it spawns the readiness loop.
    pub fn new(cfg: &crate::config::ServeConfig, uring: bool) -> HttpShared {
        let reactor = if uring {
            match ready::Reactor::new() {
                Ok(r) => {
                    monoio::spawn(r.clone().run());
                    Some(r)
                }
                Err(e) => {
                    tracing::warn!("HTTP: no epoll set ({e}); reading through io_uring");
                    None
                }
            }
        } else {
            None
        };
        // `build_torrent` of an empty dict is exactly the wrapping around it.
        let mut prefix = crate::metainfo::build_torrent(b"", &cfg.torrent_trackers);
        let last = prefix.pop();
        debug_assert_eq!(last, Some(SUFFIX[0]));
        HttpShared {
            wrap_tag: crc32fast::hash(&prefix),
            prefix,
            miss_wait: cfg.http_miss_wait,
            request_timeout: cfg.http_request_timeout,
            stop: crate::server::signal::StopSignal::default(),
            cache: RefCell::new(AnswerCache::new(cfg.http_cache_bytes, Some(&cfg.data_dir))),
            reactor,
            uring,
        }
    }

    /// The ETag of `record`'s .torrent, `"<hash hex>-<wrapping tag>"`, written into `buf`
    /// (no String per answer).
    fn etag<'a>(&self, hex: &str, buf: &'a mut [u8; ETAG_BYTES_MAX]) -> &'a str {
        let mut w = &mut buf[..];
        let _ = write!(w, "\"{hex}-{:08x}\"", self.wrap_tag);
        let len = ETAG_BYTES_MAX - w.len();
        std::str::from_utf8(&buf[..len]).expect("ASCII")
    }
}

/// Longest hash in hex (v2: 32 bytes).
const HASH_HEX_BYTES_MAX: usize = 64;
/// Longest ETag: quotes, the hash in hex, `-`, the wrapping tag (8 hex).
const ETAG_BYTES_MAX: usize = HASH_HEX_BYTES_MAX + 11;
/// Longest default file name: the hash in hex and `.torrent`.
const DEFAULT_NAME_BYTES_MAX: usize = HASH_HEX_BYTES_MAX + 8;

/// The record's v1 hash in hex, or its v2 hash for a v2-only torrent, written into `buf`.
fn hash_hex<'a>(record: &RecordRef, buf: &'a mut [u8; HASH_HEX_BYTES_MAX]) -> &'a str {
    let hashes = record.hashes();
    let len = match (hashes.v1, hashes.v2) {
        (Some(v1), _) => hex::encode_to_slice(v1, &mut buf[..40]).map(|()| 40),
        (None, Some(v2)) => hex::encode_to_slice(v2, &mut buf[..64]).map(|()| 64),
        (None, None) => Ok(0),
    }
    .expect("the buffer fits the hash");
    std::str::from_utf8(&buf[..len]).expect("hex is ASCII")
}

/// Accepts HTTP connections on one worker until the server stops.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Rc<WorkerCtx>,
    http: Rc<HttpShared>,
    limiter: Arc<ConnectionLimiter>,
    stop: flume::Receiver<()>,
    open: Rc<Cell<usize>>,
) {
    let mut backoff = worker::ACCEPT_BACKOFF_MIN;
    let mut stopped = pin!(stop.recv_async());
    // Our accept4 waits for readiness when the queue is empty, never in the syscall.
    if let Err(e) = set_nonblocking(listener.as_raw_fd()) {
        tracing::error!("HTTP listener: {e}; not serving HTTP on this core");
        http.stop.fire();
        return;
    }
    if let Err(e) = defer_accept(listener.as_raw_fd(), limits::HTTP_DEFER_ACCEPT_S) {
        // Still correct without it: a connection's first read may then find nothing.
        tracing::warn!("HTTP listener: TCP_DEFER_ACCEPT: {e}");
    }
    let pace = AcceptPace::new();
    while let Some((fd, peer, permit)) = worker::accept_admitted(
        &listener,
        async |l: &TcpListener| accept_nonblocking(l, &pace).await,
        &mut stopped,
        &mut backoff,
        &ctx,
        &limiter,
        "http",
    )
    .await
    {
        ctx.stats.http_connections_accepted.inc();
        let (ctx, http, open) = (ctx.clone(), http.clone(), OpenSession::new(open.clone()));
        monoio::spawn(async move {
            let _open = open;
            let _permit = permit;
            serve(fd, peer, &ctx, &http).await;
            ctx.stats.http_connections_closed.inc();
        });
    }
    // `accept_admitted` ends only at the stop.
    http.stop.fire();
}

/// After this many connections taken one per wait, the next one is looked for in the
/// queue right away (one accept4 that may find nothing), to notice that connections come
/// faster again.
const ACCEPT_PROBE_EVERY: u32 = 16;

/// Bursts of exactly one connection in a row after which connections are taken one per
/// wait.
const ACCEPT_SINGLE_AFTER: u32 = 2;

/// How the accept loop looks for its next connection. Taking connections until accept4
/// says EAGAIN serves bursts with one wait each; but when clients come one at a time
/// (each wait finds one connection) that EAGAIN is a syscall per connection for nothing
/// (nginx takes one connection per readiness event and never sees it). So after
/// `ACCEPT_SINGLE_AFTER` bursts of one the loop waits right after each connection, and
/// every `ACCEPT_PROBE_EVERY` connections asks the queue first: a second connection
/// there means bursts again. A wait that finds the queue non-empty costs one readiness
/// check (it completes at once), so a wrong guess is cheap either way. The mode also
/// switches the listener's deferred accept (`set_mode`).
struct AcceptPace {
    mode: Cell<PaceMode>,
    /// Connections taken since the last wait.
    taken: Cell<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PaceMode {
    /// Take connections until accept4 says EAGAIN; `ones`: bursts of exactly one in a row.
    Drain { ones: u32 },
    /// Wait right after each connection; `since_probe`: connections since the queue was
    /// last asked before a wait.
    Single { since_probe: u32 },
}

impl AcceptPace {
    fn new() -> AcceptPace {
        AcceptPace {
            mode: Cell::new(PaceMode::Drain { ones: 0 }),
            taken: Cell::new(0),
        }
    }

    fn is_single(&self) -> bool {
        matches!(self.mode.get(), PaceMode::Single { .. })
    }

    /// Switches mode, and with it the listener's deferred accept. When connections come
    /// one per wait the worker is idle between them, and the request is almost always
    /// there by the time it has woken and accepted (> 99.5 % at one client; BENCHMARKS.md):
    /// deferring would only make the wake-up wait for the request instead of running
    /// alongside it (+10-20 µs per request at one client). In bursts a deferred
    /// connection saves an empty read, a registration and a wait.
    fn set_mode(&self, listener: &TcpListener, single: bool) {
        let (mode, secs) = if single {
            (PaceMode::Single { since_probe: 0 }, 0)
        } else {
            (PaceMode::Drain { ones: 0 }, limits::HTTP_DEFER_ACCEPT_S)
        };
        self.mode.set(mode);
        if let Err(e) = defer_accept(listener.as_raw_fd(), secs) {
            tracing::debug!("HTTP listener: TCP_DEFER_ACCEPT {secs}: {e}");
        }
    }
}

/// The next connection, non-blocking from birth (accept4 with SOCK_NONBLOCK): no fcntl per
/// connection (monoio's io_uring accept operation makes a blocking socket, and sendfile
/// has no per-call "don't wait" flag), and a plain descriptor that no runtime type
/// registers (`Conn`). Only an empty queue waits, for readiness (io_uring: one poll
/// operation for a burst of connections, where monoio's accept is one operation per
/// connection); `pace` says when to wait without asking the queue first.
async fn accept_nonblocking(
    listener: &TcpListener,
    pace: &AcceptPace,
) -> io::Result<(OwnedFd, SocketAddr)> {
    if let PaceMode::Single { since_probe } = pace.mode.get() {
        if pace.taken.get() > 0 {
            let since_probe = since_probe + 1;
            if since_probe < ACCEPT_PROBE_EVERY {
                pace.mode.set(PaceMode::Single { since_probe });
                wait_for_connection(listener, pace).await?;
            } else {
                // The probe: ask the queue first.
                pace.mode.set(PaceMode::Single { since_probe: 0 });
            }
        }
    }
    loop {
        // SAFETY: `try_init` hands a live storage and its length to fill; accept4 writes
        // at most that many bytes and the length it wrote.
        let accepted = unsafe {
            socket2::SockAddr::try_init(|addr, len| {
                let fd = libc::accept4(
                    listener.as_raw_fd(),
                    addr.cast(),
                    len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                );
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // A fresh descriptor that nothing else owns.
                Ok(OwnedFd::from_raw_fd(fd))
            })
        };
        let e = match accepted {
            Ok((owned, addr)) => {
                let taken = pace.taken.get();
                if pace.is_single() && taken > 0 {
                    // A second connection without a wait: they come in bursts again.
                    pace.set_mode(listener, false);
                }
                pace.taken.set(taken + 1);
                let peer = addr
                    .as_socket()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP peer"))?;
                return Ok((owned, peer));
            }
            Err(e) => e,
        };
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                if let PaceMode::Drain { ones } = pace.mode.get() {
                    // A burst ended: was it one connection?
                    let ones = if pace.taken.get() == 1 { ones + 1 } else { 0 };
                    if ones >= ACCEPT_SINGLE_AFTER {
                        pace.set_mode(listener, true);
                    } else {
                        pace.mode.set(PaceMode::Drain { ones });
                    }
                }
                wait_for_connection(listener, pace).await?
            }
            // The client gave up while queued (ECONNABORTED), or a signal: take the next.
            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {}
            _ => return Err(e),
        }
    }
}

/// Waits until the listener has a connection queued (under epoll monoio checks with a
/// poll(2) first, and clears its readiness when there is none).
async fn wait_for_connection(listener: &TcpListener, pace: &AcceptPace) -> io::Result<()> {
    pace.taken.set(0);
    listener.readable(false).await
}

/// Sets TCP_DEFER_ACCEPT on the listener to `secs` (0: off).
fn defer_accept(fd: std::os::fd::RawFd, secs: u32) -> io::Result<()> {
    let secs = secs.min(i32::MAX as u32) as libc::c_int;
    crate::server::listener::set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; only O_NONBLOCK is added to its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One connection: request heads, answers, until the client closes, asks to close, or
/// stalls past a deadline. At shutdown (`http.stop` fired) a connection waiting for its
/// next request closes at once; one in the middle of a request finishes it first (within
/// the shutdown grace time).
async fn serve(fd: OwnedFd, peer: SocketAddr, ctx: &WorkerCtx, http: &HttpShared) {
    let mut io = Conn::new(fd, http.reactor.as_ref(), http.uring);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    // The answer's head (and the .torrent's bytes before the dict); reused.
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut served: u32 = 0;
    // When the head being read started (accept, or its first byte): slowloris bound.
    let mut head_since = Some(Instant::now());
    loop {
        let parsed = codec::parse_head(&buf);
        let (req, used) = match parsed {
            Ok(Some(r)) => r,
            Ok(None) => {
                let deadline = match head_since {
                    Some(t) => t + http.request_timeout,
                    None => Instant::now() + Duration::from_millis(limits::HTTP_KEEPALIVE_IDLE_MS),
                };
                // No byte of a request yet: between requests, or right after accept.
                let idle = buf.is_empty();
                let read = io.read(&mut buf, deadline, 1024);
                let woke = if idle {
                    // Idle: the stop may end the wait. The read is dropped, not cancelled
                    // and awaited (`read_or` with the stop as its other future): under
                    // io_uring that cancellation did not complete during the shutdown
                    // drain (the test below held the exit for the whole grace time), and
                    // the connection closes anyway.
                    monoio::select! {
                        w = read => Some(w),
                        _ = http.stop.stopped() => None,
                    }
                } else {
                    Some(read.await)
                };
                let Some(woke) = woke else {
                    return;
                };
                match woke {
                    ReadOutcome::Data { .. } => {
                        head_since.get_or_insert_with(Instant::now);
                        continue;
                    }
                    ReadOutcome::Deadline => {
                        if head_since.is_some() && !buf.is_empty() {
                            ctx.stats.http_request_timeouts.inc();
                        }
                        return;
                    }
                    _ => return, // EOF, a read error
                }
            }
            Err(e) => {
                ctx.stats.http_bad_requests.inc();
                out.clear();
                codec::text(&mut out, e.status(), false, head_error_text(e), false, None);
                // The answer and the FIN go out together; then the client's rest is read
                // until it closes too.
                if io.send(&out, None, b"").await.is_ok() && io.finish().is_ok() {
                    linger(&mut io, &mut buf).await;
                }
                return;
            }
        };
        buf.drain(..used);
        served += 1;
        ctx.stats.http_requests.inc();
        let keep_alive = req.keep_alive && served < limits::HTTP_REQUESTS_PER_CONNECTION_MAX;
        out.clear();
        let body = answer(&req, keep_alive, peer, ctx, http, &mut out).await;
        if !keep_alive && !matches!(body, Body::None) && io.cork().is_err() {
            return;
        }
        let sent = match &body {
            Body::None => io.send(&out, None, b"").await,
            Body::Cached(entry, range) => {
                let (offset, len) = *range;
                let whole = FileRange {
                    file: entry.file(),
                    offset,
                    len,
                };
                io.send(&out, Some(whole), b"").await
            }
            Body::Dict(record) => {
                let (file, offset) = record.info_in_file();
                let dict = FileRange {
                    file,
                    offset,
                    len: record.len(),
                };
                io.send(&out, Some(dict), SUFFIX).await
            }
        };
        if sent.is_err() {
            return;
        }
        if !keep_alive {
            // The FIN right behind the answer (corked: in its last segment). Bytes read
            // past the request mean the client sent more.
            io.close_after_answer(!buf.is_empty());
            return;
        }
        head_since = (!buf.is_empty()).then(Instant::now);
    }
}

/// Reads and drops what the client still sends (the rest of a refused request) until it
/// closes, or for `HTTP_LINGER_MS` / `HTTP_LINGER_BYTES_MAX`, so that our close does not
/// reset the connection before the client has read the answer.
async fn linger(io: &mut Conn, buf: &mut Vec<u8>) {
    let deadline = Instant::now() + Duration::from_millis(limits::HTTP_LINGER_MS);
    let mut dropped = 0;
    while dropped < limits::HTTP_LINGER_BYTES_MAX {
        buf.clear();
        match io.read(buf, deadline, 4096).await {
            ReadOutcome::Data { .. } => dropped += buf.len(),
            _ => return,
        }
    }
}

fn head_error_text(e: HeadError) -> &'static str {
    match e {
        HeadError::Malformed => "bad request",
        HeadError::HeadTooLarge => "request head too large",
        HeadError::TargetTooLong => "request target too long",
        HeadError::Body => "this server takes no request bodies",
    }
}

/// What follows the bytes an answer put into `out`.
enum Body {
    None,
    /// This byte range of a cache entry's file (`out` is empty for a whole cached answer).
    Cached(Entry, (u64, usize)),
    /// The record's info dict from its segment file, then `SUFFIX` (`out` ends with the
    /// .torrent's bytes before the dict): an answer the cache does not take.
    Dict(RecordRef),
}

/// Puts the answer to `req` into `out`; returns what follows it.
async fn answer(
    req: &Request,
    keep_alive: bool,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    http: &HttpShared,
    out: &mut Vec<u8>,
) -> Body {
    let head_only = req.method == Method::Head;
    let text = |out: &mut Vec<u8>, status, body: &str| {
        codec::text(out, status, keep_alive, body, head_only, None);
        Body::None
    };
    match req.method {
        Method::Options => {
            ctx.stats.http_preflights.inc();
            codec::preflight(out, keep_alive, req.preflight_headers.as_deref());
            return Body::None;
        }
        Method::Other => {
            ctx.stats.http_bad_requests.inc();
            return text(out, Status::MethodNotAllowed, "only GET, HEAD and OPTIONS");
        }
        Method::Get | Method::Head => {}
    }
    let (hash, title) = match &req.target {
        Target::Torrent { hash, title } => (hash, title),
        Target::BadHash => {
            ctx.stats.http_bad_requests.inc();
            return text(
                out,
                Status::BadRequest,
                "not an info-hash: want 40 hex or 32 base32 (v1), or 64 hex (v2)",
            );
        }
        Target::Unknown => {
            ctx.stats.http_not_found.inc();
            return text(
                out,
                Status::NotFound,
                "not found: GET /torrent/<info-hash>.torrent",
            );
        }
    };
    let record = match find(ctx, hash) {
        Found::Record(r) => r,
        Found::Blocked => {
            ctx.stats.http_not_found.inc();
            return text(out, Status::NotFound, "not available");
        }
        Found::Missing => match miss(ctx, http, hash, peer).await {
            Ok(r) => r,
            Err(MissEnd::NotFound(why)) => {
                ctx.stats.http_not_found.inc();
                return text(out, Status::NotFound, why);
            }
            Err(MissEnd::Refused) => {
                ctx.stats.http_misses_refused.inc();
                codec::text(
                    out,
                    Status::TooManyRequests,
                    keep_alive,
                    "too many unknown info-hashes asked for; retry later",
                    head_only,
                    Some(limits::HTTP_RETRY_AFTER_S),
                );
                return Body::None;
            }
            Err(MissEnd::ShuttingDown) => {
                return text(out, Status::ServiceUnavailable, "shutting down");
            }
        },
    };
    put_torrent(req, keep_alive, record, title.as_deref(), ctx, http, out)
}

/// The .torrent of `record` (or a 304 when the client's copy is current): its head into
/// `out` (none for a whole cached answer) and what follows.
fn put_torrent(
    req: &Request,
    keep_alive: bool,
    record: RecordRef,
    title: Option<&str>,
    ctx: &WorkerCtx,
    http: &HttpShared,
    out: &mut Vec<u8>,
) -> Body {
    let mut hex_buf = [0u8; HASH_HEX_BYTES_MAX];
    let hex = hash_hex(&record, &mut hex_buf);
    let mut etag_buf = [0u8; ETAG_BYTES_MAX];
    let etag = http.etag(hex, &mut etag_buf);
    if req
        .if_none_match
        .as_deref()
        .is_some_and(|v| codec::etag_matches(v, etag))
    {
        ctx.stats.http_not_modified.inc();
        codec::not_modified_head(out, keep_alive, etag);
        return Body::None;
    }
    ctx.stats.http_torrents_served.inc();
    let body_len = http.prefix.len() + record.len() + SUFFIX.len();
    let mut name_buf = [0u8; DEFAULT_NAME_BYTES_MAX];
    let default_name = default_name(hex, &mut name_buf);
    let entry = match req.method {
        Method::Head => None,
        _ => cached(http, &record, etag, default_name, body_len),
    };
    let name = title.unwrap_or(default_name);
    let head = |out: &mut Vec<u8>| codec::torrent_head(out, keep_alive, etag, name, body_len);
    match (req.method, entry) {
        (Method::Head, _) => {
            head(out);
            Body::None
        }
        // The common answer, head and all, is the cache entry itself.
        (_, Some(entry)) if keep_alive && title.is_none() => {
            let whole = entry.answer();
            Body::Cached(entry, whole)
        }
        (_, Some(entry)) => {
            head(out);
            let body = entry.body();
            Body::Cached(entry, body)
        }
        (_, None) => {
            head(out);
            // The wrapping here; the dict goes from the segment file (sendfile), then SUFFIX.
            out.extend_from_slice(&http.prefix);
            Body::Dict(record)
        }
    }
}

/// `<hash hex>.torrent`, written into `buf`.
fn default_name<'a>(hex: &str, buf: &'a mut [u8; DEFAULT_NAME_BYTES_MAX]) -> &'a str {
    buf[..hex.len()].copy_from_slice(hex.as_bytes());
    buf[hex.len()..hex.len() + 8].copy_from_slice(b".torrent");
    std::str::from_utf8(&buf[..hex.len() + 8]).expect("ASCII")
}

/// `record`'s cache entry, made now if it has none (the keep-alive head under the default
/// name, then the body of `body_len` bytes); `None` when the cache does not take it.
fn cached(
    http: &HttpShared,
    record: &RecordRef,
    etag: &str,
    default_name: &str,
    body_len: usize,
) -> Option<Entry> {
    let key = record.hashes();
    let mut cache = http.cache.borrow_mut();
    if let Some(entry) = cache.get(&key) {
        return Some(entry.clone());
    }
    if !cache.takes(body_len) {
        return None;
    }
    let mut head = Vec::with_capacity(512);
    codec::torrent_head(&mut head, true, etag, default_name, body_len);
    let parts: [&[u8]; 4] = [&head, &http.prefix, record.info(), SUFFIX];
    match cache.insert(key, &parts, head.len()) {
        Ok(entry) => entry,
        Err(e) => {
            // No memory for the memfd: served from the segment file instead.
            tracing::debug!("HTTP answer cache: {e}");
            None
        }
    }
}

enum Found {
    Record(RecordRef),
    Blocked,
    Missing,
}

fn find(ctx: &WorkerCtx, hash: &crate::admin::HashQuery) -> Found {
    if ctx.store.is_blocked(&hash.key) {
        return Found::Blocked;
    }
    let record = match &hash.v2 {
        Some(v2) => ctx.store.lookup_v2(v2),
        None => ctx.store.lookup(&hash.key),
    };
    match record {
        Some(r) => Found::Record(r),
        None => Found::Missing,
    }
}

enum MissEnd {
    NotFound(&'static str),
    Refused,
    ShuttingDown,
}

/// Runs (or joins) the miss of `hash` and waits for it at most `miss_wait`.
async fn miss(
    ctx: &WorkerCtx,
    http: &HttpShared,
    hash: &crate::admin::HashQuery,
    peer: SocketAddr,
) -> Result<RecordRef, MissEnd> {
    ctx.stats.http_misses.inc();
    if !ctx.upstream.admit_miss_from(peer.ip()) {
        return Err(MissEnd::Refused);
    }
    let waiter = ctx.upstream.submit(hash.key, Hints::default());
    let outcome = monoio::select! {
        o = waiter.recv_async() => Some(o),
        _ = monoio::time::sleep(http.miss_wait) => None,
    };
    let not_found =
        "not found: the swarm did not give its metadata in time (the fetch may go on; retry later)";
    match outcome {
        // The fetch goes on without us; a later request may find it stored.
        None => Err(MissEnd::NotFound(not_found)),
        Some(Err(_)) => Err(MissEnd::ShuttingDown),
        Some(Ok(FetchOutcome::Ready(record))) => {
            // A v2 request is keyed by the hash's first 20 bytes: check the rest.
            if hash.v2.is_some() && record.hashes().v2 != hash.v2 {
                return Err(MissEnd::NotFound("not found"));
            }
            ctx.stats.http_misses_filled.inc();
            Ok(record)
        }
        Some(Ok(FetchOutcome::Failed(FetchFailure::Refused("blocked")))) => {
            Err(MissEnd::NotFound("not available"))
        }
        Some(Ok(FetchOutcome::Failed(FetchFailure::Refused(_)))) => Err(MissEnd::Refused),
        Some(Ok(FetchOutcome::Failed(FetchFailure::NegativeCached))) => Err(MissEnd::NotFound(
            "not found: a recent fetch of this info-hash failed",
        )),
        Some(Ok(FetchOutcome::Failed(FetchFailure::Failed(_)))) => Err(MissEnd::NotFound(
            "not found: the swarm did not give its metadata",
        )),
    }
}
