//! One peer connection on the hit path, following DESIGN.md's protocol facts:
//!
//! 1. Read the 48 bytes that name the info-hash; answer at once (never wait for the peer
//!    id): our handshake echoing the peer's 20 bytes, then the extension handshake as the
//!    first message (`m`, `metadata_size`, `v`, `reqq`, `yourip`), then HaveNone only when
//!    both sides set the Fast bit. No bitfield: we have no pieces.
//! 2. Answer ut_metadata requests in batches: every request in one read becomes one
//!    vectored write of headers + mmap slices. Out-of-range pieces and requests past the
//!    per-batch cap get a reject (msg_type 2) with the same piece number.
//! 3. Keep-alive after `keepalive_interval` of our silence; close after `idle_timeout` of
//!    the peer's, or `handshake_timeout` before its handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;

use monoio::buf::IoBufMut;
use monoio::io::{CancelableAsyncReadRent, CancelableAsyncWriteRent, Canceller};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::config::ServeConfig;
use crate::limits;
use crate::server::send::OutBatch;
use crate::server::stats::CoreStats;
use crate::store::{RecordRef, Store};
use crate::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake, encode_have_none,
    encode_keepalive, encode_metadata_data_header, encode_metadata_reject, metadata_piece_range,
    Decoded, ExtHandshake, Frame, MetadataMsg, Reserved, WireError, HANDSHAKE_HEAD_LEN,
    HANDSHAKE_LEN,
};

/// The id peers must use for ut_metadata messages they send us (the same as libtorrent's).
pub const OUR_UT_METADATA_ID: u8 = 2;

/// Free room for each ordinary read: enough for a handshake plus a few requests.
const READ_SPARE_MIN: usize = limits::READ_BUFFER_BYTES_INITIAL / 2;

/// The smallest ut_metadata request frame: length (4) + id 20 + ext id +
/// `d8:msg_typei0e5:piecei0ee` (25).
const REQUEST_FRAME_BYTES_MIN: usize = 31;

/// `v` in our extension handshake.
pub const CLIENT_VERSION: &str = concat!("magnetar ", env!("CARGO_PKG_VERSION"));

/// What every session on one worker shares.
pub struct WorkerCtx {
    pub store: Arc<Store>,
    pub cfg: Arc<ServeConfig>,
    pub stats: Arc<CoreStats>,
    pub peer_id: [u8; 20],
    pub upstream: Arc<crate::upstream::shard::Upstream>,
}

/// Why a session ended (counted by the caller where it matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    PeerClosed,
    IoError,
    HandshakeInvalid,
    HandshakeTimeout,
    Miss,
    NoExtensions,
    ProtocolError,
    IdleTimeout,
}

enum ReadOutcome {
    /// Bytes arrived; `filled` = they filled all the spare room, so more may be queued in
    /// the socket (the peer's burst goes on).
    Data {
        filled: bool,
    },
    Eof,
    Deadline,
    Failed,
}

/// Reads more bytes into the spare capacity of `buf` unless `deadline` passes first.
/// Uses a cancelable read so that bytes which race with the deadline are kept, never lost.
async fn read_before(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    spare_min: usize,
) -> ReadOutcome {
    let mut owned = std::mem::take(buf);
    if owned.capacity() - owned.len() < spare_min {
        owned.reserve(spare_min);
    }
    let len = owned.len();
    let spare = owned.capacity() - len;
    let canceller = Canceller::new();
    let mut read = pin!(stream.cancelable_read(owned.slice_mut(len..), canceller.handle()));
    let first = monoio::select! {
        r = &mut read => Some(r),
        _ = monoio::time::sleep_until(deadline) => None,
    };
    let (timed_out, (res, slice)) = match first {
        Some(r) => (false, r),
        None => {
            let _ = canceller.cancel();
            (true, read.await)
        }
    };
    *buf = slice.into_inner();
    match res {
        Ok(0) => ReadOutcome::Eof,
        Ok(n) => ReadOutcome::Data { filled: n == spare },
        Err(_) if timed_out => ReadOutcome::Deadline,
        Err(_) => ReadOutcome::Failed,
    }
}

/// Writes the whole batch unless `deadline` passes first (a peer that stops reading
/// cannot hold the session forever). Short writes resume where they stopped. Returns the
/// batch, cleared, for reuse.
async fn write_before(
    stream: &mut TcpStream,
    mut batch: OutBatch,
    deadline: Instant,
) -> (io::Result<()>, OutBatch) {
    batch.seal();
    while !batch.is_sent() {
        let canceller = Canceller::new();
        let mut write = pin!(stream.cancelable_writev(batch, canceller.handle()));
        let first = monoio::select! {
            r = &mut write => Some(r),
            _ = monoio::time::sleep_until(deadline) => None,
        };
        let (res, b) = match first {
            Some(r) => r,
            None => {
                let _ = canceller.cancel();
                let (_, b) = write.await;
                (
                    Err(io::Error::new(io::ErrorKind::TimedOut, "write deadline")),
                    b,
                )
            }
        };
        batch = b;
        match res {
            Ok(0) => {
                batch.clear();
                return (Err(io::ErrorKind::WriteZero.into()), batch);
            }
            Ok(n) => batch.consume(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                batch.clear();
                return (Err(e), batch);
            }
        }
    }
    batch.clear();
    (Ok(()), batch)
}

/// Per-connection protocol state after the handshake.
struct Conn<'a> {
    ctx: &'a WorkerCtx,
    record: RecordRef,
    /// The peer's id for ut_metadata (from its extension handshake); None = cannot send.
    peer_ut_metadata: Option<u8>,
    /// Requests in the peer's current pipelined burst: the requests of consecutive reads
    /// that each filled the read buffer (more was waiting in the socket), i.e. sent
    /// without waiting for our answers. Past `requests_queued_max` (our advertised reqq)
    /// they are rejected. Counting per read instead would let a burst through in
    /// buffer-sized slices and make the cap meaningless.
    burst_requests: usize,
}

impl Conn<'_> {
    /// Handles every complete frame in `buf`, appending replies to `out`. Returns bytes
    /// consumed, or the end reason.
    fn handle_frames(&mut self, buf: &[u8], out: &mut OutBatch) -> Result<usize, SessionEnd> {
        let stats = &self.ctx.stats;
        let mut pos = 0;
        loop {
            let (frame, n) = match decode_frame(&buf[pos..]) {
                Ok(Decoded::Done(frame, n)) => (frame, n),
                Ok(Decoded::NeedMore(_)) => return Ok(pos),
                Err(_) => {
                    stats.protocol_errors.inc();
                    return Err(SessionEnd::ProtocolError);
                }
            };
            pos += n;
            match frame {
                Frame::Extended { id: 0, payload } => match ExtHandshake::decode(payload) {
                    // A later handshake replaces the earlier one's ids (BEP 10); 0 disables.
                    Ok(hs) => self.peer_ut_metadata = hs.ut_metadata.filter(|&id| id != 0),
                    Err(_) => {
                        stats.protocol_errors.inc();
                        return Err(SessionEnd::ProtocolError);
                    }
                },
                Frame::Extended {
                    id: OUR_UT_METADATA_ID,
                    payload,
                } => {
                    match decode_metadata(payload) {
                        Ok((MetadataMsg::Request { piece }, _)) => {
                            self.burst_requests += 1;
                            self.answer_request(piece, out);
                        }
                        // Data or reject sent to a seeder-only peer: nothing to do.
                        Ok(_) => {}
                        Err(WireError::UnknownMetadataType(_)) => {}
                        Err(_) => {
                            stats.protocol_errors.inc();
                            return Err(SessionEnd::ProtocolError);
                        }
                    }
                }
                // Extensions we did not offer (ut_pex, lt_donthave, ...) and every BEP 3 /
                // BEP 6 message: a metadata-only peer has nothing to say to them.
                _ => {}
            }
        }
    }

    fn answer_request(&mut self, piece: u32, out: &mut OutBatch) {
        let stats = &self.ctx.stats;
        let Some(peer_id) = self.peer_ut_metadata else {
            // We cannot address a reply without the peer's id; it broke BEP 10 ordering.
            stats.requests_without_peer_id.inc();
            return;
        };
        let total = self.record.len();
        if self.burst_requests > self.ctx.cfg.requests_queued_max {
            stats.rejects_flood.inc();
            encode_metadata_reject(out.head(), peer_id, piece);
            return;
        }
        match metadata_piece_range(total, piece) {
            Some(range) => {
                encode_metadata_data_header(out.head(), peer_id, piece, total as u64, range.len());
                out.push_payload(&self.record, range);
            }
            None => {
                stats.rejects_out_of_range.inc();
                encode_metadata_reject(out.head(), peer_id, piece);
            }
        }
    }
}

/// Runs one connection to its end.
pub async fn run(mut stream: TcpStream, peer: SocketAddr, ctx: Rc<WorkerCtx>) -> SessionEnd {
    let cfg = &ctx.cfg;
    let stats = &ctx.stats;
    let mut rbuf: Vec<u8> = Vec::with_capacity(limits::READ_BUFFER_BYTES_INITIAL);

    // Phase 1: the 48 bytes that name the info-hash.
    let handshake_deadline = Instant::now() + cfg.handshake_timeout;
    let head = loop {
        match decode_handshake_head(&rbuf) {
            Ok(Decoded::Done(head, _)) => break head,
            Ok(Decoded::NeedMore(_)) => {}
            Err(_) => {
                stats.handshakes_invalid.inc();
                return SessionEnd::HandshakeInvalid;
            }
        }
        match read_before(&mut stream, &mut rbuf, handshake_deadline, READ_SPARE_MIN).await {
            ReadOutcome::Data { .. } => {}
            ReadOutcome::Eof => return SessionEnd::PeerClosed,
            ReadOutcome::Failed => return SessionEnd::IoError,
            ReadOutcome::Deadline => {
                stats.timeouts_handshake.inc();
                return SessionEnd::HandshakeTimeout;
            }
        }
    };
    stats.handshakes.inc();

    let Some(record) = ctx.store.lookup(&head.info_hash) else {
        stats.misses.inc();
        return SessionEnd::Miss;
    };
    stats.hits.inc();
    if !head.reserved.extension_protocol() {
        stats.peers_without_extensions.inc();
        return SessionEnd::NoExtensions;
    }

    // Phase 2: answer in one write: handshake, extension handshake, HaveNone.
    let mut out = OutBatch::new();
    let ours = Reserved::ours(true, false, record.has_v2());
    encode_handshake(out.head(), ours, &head.info_hash, &ctx.peer_id);
    ExtHandshake {
        ut_metadata: Some(OUR_UT_METADATA_ID),
        ut_pex: None,
        metadata_size: Some(record.len() as u64),
        client: Some(CLIENT_VERSION.as_bytes()),
        reqq: Some(cfg.requests_queued_max as u32),
        yourip: Some(peer.ip()),
        listen_port: None,
    }
    .encode(out.head());
    if head.reserved.fast() && ours.fast() {
        encode_have_none(out.head());
    }
    let (res, batch) = write_before(&mut stream, out, Instant::now() + cfg.idle_timeout).await;
    out = batch;
    if res.is_err() {
        return SessionEnd::IoError;
    }
    let mut last_tx = Instant::now();
    let mut last_rx = last_tx;

    // The peer id (20 bytes after the head) carries nothing we need; skip it as it comes.
    let mut peer_id_left = HANDSHAKE_LEN - HANDSHAKE_HEAD_LEN;
    rbuf.drain(..HANDSHAKE_HEAD_LEN);

    let mut conn = Conn {
        ctx: &ctx,
        record,
        peer_ut_metadata: None,
        burst_requests: 0,
    };
    // Whether the last read filled the buffer (the peer's burst may go on).
    let mut burst_goes_on = false;
    let burst_spare = (cfg.requests_queued_max + 1) * REQUEST_FRAME_BYTES_MIN;
    loop {
        if !burst_goes_on {
            conn.burst_requests = 0;
        }
        let skip = peer_id_left.min(rbuf.len());
        peer_id_left -= skip;
        let consumed = match conn.handle_frames(&rbuf[skip..], &mut out) {
            Ok(n) => skip + n,
            Err(end) => {
                // Replies already decided (e.g. blocks before a bad frame) are dropped:
                // the connection is going away.
                return end;
            }
        };
        rbuf.drain(..consumed);

        if !out.is_empty() {
            let blocks = out.blocks();
            let bytes = out.payload_bytes();
            let (res, batch) =
                write_before(&mut stream, out, Instant::now() + cfg.idle_timeout).await;
            out = batch;
            if res.is_err() {
                return SessionEnd::IoError;
            }
            if blocks > 0 {
                stats.blocks_served.add(blocks as u64);
                stats.bytes_served.add(bytes as u64);
                stats.block_writes.inc();
            }
            last_tx = Instant::now();
        }

        // Wait for more, waking for the keep-alive or the idle close, whichever is first.
        loop {
            let idle_deadline = last_rx + cfg.idle_timeout;
            let keepalive_deadline = last_tx + cfg.keepalive_interval;
            // While a burst goes on, make room for a whole reqq of requests at once, so
            // the cap sees the burst in as few reads as the socket allows.
            let spare_min = if burst_goes_on {
                burst_spare
            } else {
                READ_SPARE_MIN
            };
            let deadline = idle_deadline.min(keepalive_deadline);
            match read_before(&mut stream, &mut rbuf, deadline, spare_min).await {
                ReadOutcome::Data { filled } => {
                    last_rx = Instant::now();
                    burst_goes_on = filled;
                    break;
                }
                ReadOutcome::Eof => return SessionEnd::PeerClosed,
                ReadOutcome::Failed => return SessionEnd::IoError,
                ReadOutcome::Deadline => {
                    let now = Instant::now();
                    if now >= idle_deadline {
                        stats.timeouts_idle.inc();
                        return SessionEnd::IdleTimeout;
                    }
                    encode_keepalive(out.head());
                    let (res, batch) = write_before(&mut stream, out, now + cfg.idle_timeout).await;
                    out = batch;
                    if res.is_err() {
                        return SessionEnd::IoError;
                    }
                    stats.keepalives_sent.inc();
                    last_tx = Instant::now();
                }
            }
        }
    }
}
