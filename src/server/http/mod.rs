//! The public, read-only HTTP listener (`--http`): `.torrent` files by info-hash for
//! browsers (CORS) and tools that turn magnets into .torrent files.
//!
//! It runs on the worker cores like the BitTorrent listener: one `SO_REUSEPORT` socket
//! per worker and address, a monoio task per connection, the record read straight from
//! the store's mmap. The body is the stored info dict byte-exactly, wrapped like the admin
//! plane's (`metainfo::build_torrent`: `announce`/`announce-list` of the configured
//! trackers, then `info`): the wrapping's bytes before and after the dict are made once
//! per worker, and a response goes out as head + wrapper (one send), the dict by
//! sendfile(2) from the segment file, and the closing `e` (`conn`): no metadata byte is
//! copied, in user space or into socket buffers.
//!
//! An unknown hash takes the miss path a BitTorrent handshake takes (`Upstream::submit`:
//! one fetch per hash however many wait, the per-IP and global miss budgets) and waits at
//! most `--http-miss-wait-ms` for it: 200 when it arrives, 404 when it does not, 429 with
//! `Retry-After` when a budget refused it.
//!
//! - `codec`: request heads in, answers out (no I/O)
//! - `conn`: a connection's reads and non-blocking sends (sendfile of the dict)

pub mod codec;
mod conn;
mod stop;

use std::cell::Cell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};
use monoio::time::Instant;

use crate::limits;
use crate::server::limiter::ConnectionLimiter;
use crate::server::session::{ReadOutcome, WorkerCtx};
use crate::server::worker::{self, OpenSession};
use crate::store::RecordRef;
use crate::upstream::shard::{FetchFailure, FetchOutcome, Hints};
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
    stop: stop::StopSignal,
}

/// The byte after the info dict: the end of the .torrent's top-level dict.
const SUFFIX: &[u8] = b"e";

impl HttpShared {
    pub fn new(cfg: &crate::config::ServeConfig) -> HttpShared {
        // `build_torrent` of an empty dict is exactly the wrapping around it.
        let mut prefix = crate::metainfo::build_torrent(b"", &cfg.torrent_trackers);
        let last = prefix.pop();
        debug_assert_eq!(last, Some(SUFFIX[0]));
        HttpShared {
            wrap_tag: crc32fast::hash(&prefix),
            prefix,
            miss_wait: cfg.http_miss_wait,
            request_timeout: cfg.http_request_timeout,
            stop: stop::StopSignal::default(),
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
    while let Some((stream, peer, permit)) = worker::accept_admitted(
        &listener,
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
            serve(stream, peer, &ctx, &http).await;
            ctx.stats.http_connections_closed.inc();
        });
    }
    // `accept_admitted` ends only at the stop.
    http.stop.fire();
}

/// One connection: request heads, answers, until the client closes, asks to close, or
/// stalls past a deadline. At shutdown (`http.stop` fired) a connection waiting for its
/// next request closes at once; one in the middle of a request finishes it first (within
/// the shutdown grace time).
async fn serve(stream: TcpStream, peer: SocketAddr, ctx: &WorkerCtx, http: &HttpShared) {
    let Ok(mut io) = Conn::new(stream) else {
        return;
    };
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
        let sent = match &body {
            Some(record) => {
                let (file, offset) = record.info_in_file();
                let dict = FileRange {
                    file,
                    offset,
                    len: record.len(),
                };
                io.send(&out, Some(dict), SUFFIX).await
            }
            None => io.send(&out, None, b"").await,
        };
        if sent.is_err() {
            return;
        }
        if !keep_alive {
            // The answer and the FIN in one segment.
            let _ = io.finish();
            return;
        }
        if io.flush().is_err() {
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

/// Puts the answer to `req` into `out`; returns the record whose info dict follows it
/// (then `out` ends with the .torrent's bytes before the dict, and `SUFFIX` follows it).
async fn answer(
    req: &Request,
    keep_alive: bool,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    http: &HttpShared,
    out: &mut Vec<u8>,
) -> Option<RecordRef> {
    let head_only = req.method == Method::Head;
    let text = |out: &mut Vec<u8>, status, body: &str| {
        codec::text(out, status, keep_alive, body, head_only, None);
        None
    };
    match req.method {
        Method::Options => {
            ctx.stats.http_preflights.inc();
            codec::preflight(out, keep_alive, req.preflight_headers.as_deref());
            return None;
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
                return None;
            }
            Err(MissEnd::ShuttingDown) => {
                return text(out, Status::ServiceUnavailable, "shutting down");
            }
        },
    };
    put_torrent(req, keep_alive, record, title.as_deref(), ctx, http, out)
}

/// The .torrent of `record` (or a 304 when the client's copy is current) into `out`;
/// returns the record when its dict is to follow.
fn put_torrent(
    req: &Request,
    keep_alive: bool,
    record: RecordRef,
    title: Option<&str>,
    ctx: &WorkerCtx,
    http: &HttpShared,
    out: &mut Vec<u8>,
) -> Option<RecordRef> {
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
        return None;
    }
    let mut name_buf = [0u8; DEFAULT_NAME_BYTES_MAX];
    let file_name = match title {
        Some(t) => t,
        None => {
            name_buf[..hex.len()].copy_from_slice(hex.as_bytes());
            name_buf[hex.len()..hex.len() + 8].copy_from_slice(b".torrent");
            std::str::from_utf8(&name_buf[..hex.len() + 8]).expect("ASCII")
        }
    };
    let body_len = http.prefix.len() + record.len() + SUFFIX.len();
    codec::torrent_head(out, keep_alive, etag, file_name, body_len);
    ctx.stats.http_torrents_served.inc();
    if req.method == Method::Head {
        return None;
    }
    // Head + wrapper here; the dict goes from the segment file (sendfile), then SUFFIX.
    out.extend_from_slice(&http.prefix);
    Some(record)
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
