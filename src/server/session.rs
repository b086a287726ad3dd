//! One peer connection, following DESIGN.md's protocol facts:
//!
//! 1. Read the 48 bytes that name the info-hash; answer at once (never wait for the peer
//!    id) with our handshake echoing the peer's 20 bytes.
//! 2. Hit: the extension handshake follows as the first message (`m`, `metadata_size`,
//!    `v`, `reqq`, `yourip`), then HaveNone only when both sides set the Fast bit. No
//!    bitfield: we have no pieces.
//!    Miss: the owning shard starts (or joins) the one fetch of that info-hash, and the
//!    extension handshake is held up to `handshake_hold_ms` so that it can carry
//!    `metadata_size` (crawlers need it in the first one). If the fetch is not done by
//!    then, a handshake without it goes out, and a second, full one (complete `m`) as
//!    soon as the metadata is verified. Requests that arrive meanwhile are held, never
//!    rejected. If the client's own extension handshake carries `metadata_size`, we fetch
//!    the metadata from the client over this connection. ut_pex peers go to the fetch.
//! 3. Answer ut_metadata requests in batches: every request in one read becomes one
//!    vectored write of headers + mmap slices. Out-of-range pieces and requests past the
//!    burst cap get a reject (msg_type 2) with the same piece number.
//! 4. Keep-alive after `keepalive_interval` of our silence; close after `idle_timeout` of
//!    the peer's, or `handshake_timeout` before its handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{CancelableAsyncReadRent, CancelableAsyncWriteRent, Canceller};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::config::ServeConfig;
use crate::limits;
use crate::server::send::OutBatch;
use crate::server::stats::CoreStats;
use crate::store::{RecordRef, Store};
use crate::upstream::assemble::{MetadataAssembler, Progress};
use crate::upstream::shard::{FetchOutcome, Hints, ShardCmd, Upstream};
use crate::upstream::{PeerCandidate, PeerSource};
use crate::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake, encode_have_none,
    encode_keepalive, encode_metadata_data_header, encode_metadata_reject, encode_metadata_request,
    metadata_piece_count, metadata_piece_range, Decoded, ExtHandshake, Frame, MetadataMsg, Pex,
    Reserved, WireError, CLIENT_VERSION, HANDSHAKE_HEAD_LEN, HANDSHAKE_LEN, OUR_UT_METADATA_ID,
    OUR_UT_PEX_ID,
};

/// Peers taken from one ut_pex message (BEP 11 caps a message at 50 added peers).
const PEX_PEERS_PER_MESSAGE_MAX: usize = 50;

/// Peers taken from one connection's ut_pex messages over its life. PEX lets a client
/// choose whom magnetar connects to; a real client sends one or two messages while it
/// waits, so past this the messages are ignored (without it, one connection could point
/// a fetch at its full 4096-candidate cap).
const PEX_PEERS_PER_CONNECTION_MAX: usize = 100;

/// Free room for each ordinary read: enough for a handshake plus a few requests.
const READ_SPARE_MIN: usize = limits::READ_BUFFER_BYTES_INITIAL / 2;

/// The smallest ut_metadata request frame: length (4) + id 20 + ext id +
/// `d8:msg_typei0e5:piecei0ee` (25).
const REQUEST_FRAME_BYTES_MIN: usize = 31;

/// What every session on one worker shares.
pub struct WorkerCtx {
    pub store: Arc<Store>,
    pub cfg: Arc<ServeConfig>,
    pub stats: Arc<CoreStats>,
    pub peer_id: [u8; 20],
    pub upstream: Arc<Upstream>,
}

/// Why a session ended (counted by the caller where it matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    PeerClosed,
    IoError,
    HandshakeInvalid,
    HandshakeTimeout,
    /// A miss refused before any fetch (per-IP budget).
    MissRefused,
    /// The fetch for a miss failed or was refused.
    MissFailed,
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

/// What woke a waiting session.
enum Wake {
    Read(ReadOutcome),
    /// The fetch this session waits for ended (`None`: its shard went away).
    Fetch(Option<FetchOutcome>),
}

/// Reads more bytes into the spare capacity of `buf` unless `deadline` passes or the
/// fetch `waiter` (if any) yields first. Uses a cancelable read so bytes that race with
/// the other events are kept in `buf`, never lost.
async fn read_or_wake(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    spare_min: usize,
    waiter: Option<&flume::Receiver<FetchOutcome>>,
    canceller: &mut Canceller,
) -> Wake {
    let mut owned = std::mem::take(buf);
    if owned.capacity() - owned.len() < spare_min {
        owned.reserve(spare_min);
    }
    let len = owned.len();
    let spare = owned.capacity() - len;
    let mut read = pin!(stream.cancelable_read(owned.slice_mut(len..), canceller.handle()));
    let fetch = async {
        match waiter {
            Some(w) => w.recv_async().await.ok(),
            None => std::future::pending().await,
        }
    };
    enum First<R> {
        Read(R),
        Deadline,
        Fetch(Option<FetchOutcome>),
    }
    let first = monoio::select! {
        r = &mut read => First::Read(r),
        _ = monoio::time::sleep_until(deadline) => First::Deadline,
        f = fetch => First::Fetch(f),
    };
    let (cancelled, (res, slice), fetched) = match first {
        First::Read(r) => (false, r, None),
        First::Deadline => {
            *canceller = std::mem::take(canceller).cancel();
            (true, read.await, None)
        }
        First::Fetch(f) => {
            *canceller = std::mem::take(canceller).cancel();
            (true, read.await, Some(f))
        }
    };
    *buf = slice.into_inner();
    let outcome = match res {
        Ok(0) => ReadOutcome::Eof,
        Ok(n) => ReadOutcome::Data { filled: n == spare },
        Err(_) if cancelled => ReadOutcome::Deadline,
        Err(_) => ReadOutcome::Failed,
    };
    match (fetched, outcome) {
        // Bytes (or EOF) that arrived with the fetch outcome stay in `buf` and are seen on
        // the next round; the outcome goes first.
        (Some(f), _) => Wake::Fetch(f),
        (None, o) => Wake::Read(o),
    }
}

/// Writes the whole batch unless `deadline` passes first (a peer that stops reading
/// cannot hold the session forever). Short writes resume where they stopped. Returns the
/// batch, cleared, for reuse.
async fn write_before(
    stream: &mut TcpStream,
    mut batch: OutBatch,
    deadline: Instant,
    canceller: &mut Canceller,
) -> (io::Result<()>, OutBatch) {
    batch.seal();
    while !batch.is_sent() {
        let mut write = pin!(stream.cancelable_writev(batch, canceller.handle()));
        let first = monoio::select! {
            r = &mut write => Some(r),
            _ = monoio::time::sleep_until(deadline) => None,
        };
        let (res, b) = match first {
            Some(r) => r,
            None => {
                *canceller = std::mem::take(canceller).cancel();
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
    peer: SocketAddr,
    key: [u8; 20],
    /// Whether both sides set the Fast bit (HaveNone allowed).
    fast: bool,
    /// The stored metadata; None while a miss is being fetched.
    record: Option<RecordRef>,
    /// Our extension handshake has gone out (with or without `metadata_size`).
    ext_sent: bool,
    /// The peer's id for ut_metadata (from its extension handshake); None = cannot send.
    peer_ut_metadata: Option<u8>,
    /// `metadata_size` the peer announced (it has the metadata itself).
    peer_metadata_size: Option<u64>,
    /// Requests in the peer's current pipelined burst: the requests of consecutive reads
    /// that each filled the read buffer (more was waiting in the socket), i.e. sent
    /// without waiting for our answers. Past `requests_queued_max` (our advertised reqq)
    /// they are rejected. Counting per read instead would let a burst through in
    /// buffer-sized slices and make the cap meaningless.
    burst_requests: usize,
    /// Requests received while the metadata is being fetched, answered once it arrives.
    held: Vec<u32>,
    /// Fetching the metadata from this peer itself (it announced `metadata_size`).
    assembler: Option<MetadataAssembler>,
    /// Metadata assembled from this peer and verified, waiting to be stored.
    assembled: Option<Vec<u8>>,
    /// ut_pex peers taken from this connection so far.
    pex_peers_taken: usize,
}

impl Conn<'_> {
    fn our_ext_handshake(&self, out: &mut OutBatch) {
        // On the miss path we also offer ut_pex (peers for the fetch), and every later
        // handshake repeats the full `m` (libtorrent drops extensions a later one omits).
        let miss_path = self.record.is_none() || self.ext_sent;
        ExtHandshake {
            ut_metadata: Some(OUR_UT_METADATA_ID),
            ut_pex: miss_path.then_some(OUR_UT_PEX_ID),
            metadata_size: self.record.as_ref().map(|r| r.len() as u64),
            client: Some(CLIENT_VERSION.as_bytes()),
            reqq: Some(self.ctx.cfg.requests_queued_max as u32),
            yourip: Some(self.peer.ip()),
            listen_port: None,
        }
        .encode(out.head());
        if !self.ext_sent && self.fast {
            // BEP 6: HaveNone in place of a bitfield, right after the handshakes.
            encode_have_none(out.head());
        }
        self.ctx.stats.ext_handshakes_sent.inc();
    }

    /// Sends our first extension handshake now (without `metadata_size` on a miss).
    fn send_ext_handshake(&mut self, out: &mut OutBatch) {
        if !self.ext_sent {
            self.our_ext_handshake(out);
            self.ext_sent = true;
        }
    }

    /// The metadata is here: announce it (first or second extension handshake) and
    /// answer every held request.
    fn become_ready(&mut self, record: RecordRef, out: &mut OutBatch) {
        self.ctx.stats.served.bump(&self.key);
        self.record = Some(record);
        self.assembler = None;
        let first = !self.ext_sent;
        self.our_ext_handshake(out);
        self.ext_sent = true;
        if !first {
            self.ctx.stats.second_ext_handshakes.inc();
        }
        for piece in std::mem::take(&mut self.held) {
            self.answer_request(piece, out);
        }
    }

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
                    Ok(hs) => {
                        self.peer_ut_metadata = hs.ut_metadata.filter(|&id| id != 0);
                        if hs.metadata_size.is_some() {
                            self.peer_metadata_size = hs.metadata_size;
                        }
                        self.maybe_fetch_from_peer(out);
                    }
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
                        Ok((MetadataMsg::Data { piece, total_size }, data)) => {
                            self.on_peer_data(piece, total_size, data)?;
                        }
                        Ok((MetadataMsg::Reject { .. }, _)) => {
                            // The peer will not give us its metadata after all.
                            self.assembler = None;
                        }
                        Err(WireError::UnknownMetadataType(_)) => {}
                        Err(_) => {
                            stats.protocol_errors.inc();
                            return Err(SessionEnd::ProtocolError);
                        }
                    }
                }
                Frame::Extended {
                    id: OUR_UT_PEX_ID,
                    payload,
                } if self.ext_sent => {
                    self.on_pex(payload);
                }
                // Extensions we did not offer (lt_donthave, ...) and every BEP 3 / BEP 6
                // message: a metadata-only peer has nothing to say to them.
                _ => {}
            }
        }
    }

    /// Starts fetching from the connected peer itself when it announced the metadata
    /// and we still lack it (opportunistic fill).
    fn maybe_fetch_from_peer(&mut self, out: &mut OutBatch) {
        if self.record.is_some() || self.assembler.is_some() || self.assembled.is_some() {
            return;
        }
        let (Some(size), Some(peer_id)) = (self.peer_metadata_size, self.peer_ut_metadata) else {
            return;
        };
        let max = self.ctx.upstream.cfg.metadata_bytes_max;
        let Ok(assembler) = MetadataAssembler::new(self.key, size, max) else {
            self.ctx.stats.client_fills_refused.inc();
            return;
        };
        // The peer addresses data messages with our id, so it must have our handshake.
        self.send_ext_handshake(out);
        for piece in 0..metadata_piece_count(size as usize) as u32 {
            encode_metadata_request(out.head(), peer_id, piece);
        }
        self.assembler = Some(assembler);
        self.ctx.stats.client_fills_started.inc();
    }

    fn on_peer_data(&mut self, piece: u32, total_size: u64, data: &[u8]) -> Result<(), SessionEnd> {
        let Some(assembler) = self.assembler.as_mut() else {
            // Data we did not ask for: anacrolix and rqbit treat it as a protocol error;
            // we just ignore it.
            return Ok(());
        };
        match assembler.on_data(piece, total_size, data) {
            Ok(Progress::Need(_)) => Ok(()),
            Ok(Progress::Complete) => {
                let assembler = self.assembler.take().expect("checked above");
                match assembler.finish() {
                    Ok(info) => self.assembled = Some(info),
                    Err(_) => self.ctx.stats.client_fills_failed.inc(),
                }
                Ok(())
            }
            Err(_) => {
                // Wrong size, duplicate or out-of-range piece: stop trusting this peer's
                // metadata, keep serving it.
                self.assembler = None;
                self.ctx.stats.client_fills_failed.inc();
                Ok(())
            }
        }
    }

    fn on_pex(&mut self, payload: &[u8]) {
        let budget = PEX_PEERS_PER_CONNECTION_MAX.saturating_sub(self.pex_peers_taken);
        if self.record.is_some() || budget == 0 {
            return;
        }
        let Ok(pex) = Pex::decode(payload) else {
            return;
        };
        let peers: Vec<PeerCandidate> = pex
            .added()
            .take(PEX_PEERS_PER_MESSAGE_MAX.min(budget))
            .map(|(addr, _flags)| PeerCandidate {
                addr,
                source: PeerSource::Pex,
            })
            .collect();
        if !peers.is_empty() {
            self.pex_peers_taken += peers.len();
            self.ctx.stats.pex_peers_received.add(peers.len() as u64);
            self.ctx.upstream.send(
                &self.key,
                ShardCmd::Peers {
                    key: self.key,
                    peers,
                },
            );
        }
    }

    fn answer_request(&mut self, piece: u32, out: &mut OutBatch) {
        let stats = &self.ctx.stats;
        let Some(peer_id) = self.peer_ut_metadata else {
            // We cannot address a reply without the peer's id; it broke BEP 10 ordering.
            stats.requests_without_peer_id.inc();
            return;
        };
        if self.burst_requests > self.ctx.cfg.requests_queued_max {
            stats.rejects_flood.inc();
            encode_metadata_reject(out.head(), peer_id, piece);
            return;
        }
        let Some(record) = &self.record else {
            // Fetch still running: hold the request (DESIGN.md point 6: never reject it).
            if self.held.len() < self.ctx.cfg.requests_queued_max {
                self.held.push(piece);
            } else {
                stats.rejects_flood.inc();
                encode_metadata_reject(out.head(), peer_id, piece);
            }
            return;
        };
        let total = record.len();
        match metadata_piece_range(total, piece) {
            Some(range) => {
                encode_metadata_data_header(out.head(), peer_id, piece, total as u64, range.len());
                // No refcount traffic per block: the batch clones the RecordRef once.
                out.push_payload(record, range);
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
    // One canceller for the session's whole life: reads and writes register with it and
    // deregister when they complete, so no allocation per read; only a cancelled one
    // (deadline, fetch outcome) is replaced.
    let mut canceller = Canceller::new();

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
        match read_or_wake(
            &mut stream,
            &mut rbuf,
            handshake_deadline,
            READ_SPARE_MIN,
            None,
            &mut canceller,
        )
        .await
        {
            Wake::Read(ReadOutcome::Data { .. }) => {}
            Wake::Read(ReadOutcome::Eof) => return SessionEnd::PeerClosed,
            Wake::Read(ReadOutcome::Failed) | Wake::Fetch(_) => return SessionEnd::IoError,
            Wake::Read(ReadOutcome::Deadline) => {
                stats.timeouts_handshake.inc();
                return SessionEnd::HandshakeTimeout;
            }
        }
    };
    stats.handshakes.inc();
    if !head.reserved.extension_protocol() {
        // Without BEP 10 the peer cannot ask for metadata: do not start a fetch for it.
        stats.peers_without_extensions.inc();
        return SessionEnd::NoExtensions;
    }

    let key = head.info_hash;
    if ctx.store.is_blocked(&key) {
        // Deleted by an operator: never served, never fetched.
        stats.blocked.inc();
        return SessionEnd::MissRefused;
    }
    let record = ctx.store.lookup(&key);
    let mut waiter = None;
    match &record {
        Some(_) => stats.hits.inc(),
        None => {
            stats.misses.inc();
            if !ctx.upstream.admit_miss_from(peer.ip()) {
                stats.misses_refused_per_ip.inc();
                return SessionEnd::MissRefused;
            }
            waiter = Some(ctx.upstream.submit(key, Hints::default()));
        }
    }

    // Phase 2: our handshake at once; on a hit the extension handshake (and HaveNone) in
    // the same write.
    let mut out = OutBatch::new();
    let v2 = record.as_ref().is_some_and(|r| r.has_v2());
    let ours = Reserved::ours(true, false, v2);
    encode_handshake(out.head(), ours, &key, &ctx.peer_id);
    let mut conn = Conn {
        ctx: &ctx,
        peer,
        key,
        fast: head.reserved.fast() && ours.fast(),
        record: None,
        ext_sent: false,
        peer_ut_metadata: None,
        peer_metadata_size: None,
        burst_requests: 0,
        held: Vec::new(),
        assembler: None,
        assembled: None,
        pex_peers_taken: 0,
    };
    if let Some(record) = record {
        conn.become_ready(record, &mut out);
    }
    let (res, batch) = write_before(
        &mut stream,
        out,
        Instant::now() + cfg.idle_timeout,
        &mut canceller,
    )
    .await;
    out = batch;
    if res.is_err() {
        return SessionEnd::IoError;
    }
    let mut last_tx = Instant::now();
    let mut last_rx = last_tx;
    let hold_deadline = last_tx + Duration::from_millis(ctx.upstream.cfg.handshake_hold_ms);

    // The peer id (20 bytes after the head) carries nothing we need; skip it as it comes.
    let mut peer_id_left = HANDSHAKE_LEN - HANDSHAKE_HEAD_LEN;
    rbuf.drain(..HANDSHAKE_HEAD_LEN);

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
            // Replies already decided are dropped: the connection is going away.
            Err(end) => return end,
        };
        rbuf.drain(..consumed);
        if consumed > 0 {
            last_rx = Instant::now();
        }

        if let Some(info) = conn.assembled.take() {
            // The client gave us the metadata and it verified: store it (off this core),
            // finish the shard's fetch for everyone else, and serve it here.
            match ctx.upstream.store_off_core(info).await {
                Ok(record) => {
                    stats.client_fills_stored.inc();
                    ctx.upstream.send(
                        &key,
                        ShardCmd::Stored {
                            key,
                            record: record.clone(),
                        },
                    );
                    conn.become_ready(record, &mut out);
                    waiter = None;
                }
                Err(e) => tracing::warn!(%peer, "metadata from the client not stored: {e}"),
            }
        }

        if !out.is_empty() {
            let blocks = out.blocks();
            let bytes = out.payload_bytes();
            let (res, batch) = write_before(
                &mut stream,
                out,
                Instant::now() + cfg.idle_timeout,
                &mut canceller,
            )
            .await;
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

        // Wait for bytes, the fetch, the hold deadline, the keep-alive or the idle close,
        // whichever comes first.
        loop {
            let idle_deadline = last_rx + cfg.idle_timeout;
            let keepalive_deadline = last_tx + cfg.keepalive_interval;
            let mut deadline = idle_deadline.min(keepalive_deadline);
            if !conn.ext_sent {
                deadline = deadline.min(hold_deadline);
            }
            // While a burst goes on, make room for a whole reqq of requests at once, so
            // the cap sees the burst in as few reads as the socket allows.
            let spare_min = if burst_goes_on {
                burst_spare
            } else {
                READ_SPARE_MIN
            };
            let wake = read_or_wake(
                &mut stream,
                &mut rbuf,
                deadline,
                spare_min,
                waiter.as_ref(),
                &mut canceller,
            )
            .await;
            match wake {
                Wake::Read(ReadOutcome::Data { filled }) => {
                    // `last_rx` moves only when a whole frame arrives (above): a peer
                    // trickling one byte of a frame per idle period is idle.
                    burst_goes_on = filled;
                    break;
                }
                Wake::Read(ReadOutcome::Eof) => return SessionEnd::PeerClosed,
                Wake::Read(ReadOutcome::Failed) => return SessionEnd::IoError,
                Wake::Fetch(Some(FetchOutcome::Ready(record))) => {
                    waiter = None;
                    conn.become_ready(record, &mut out);
                    // Held requests are answered with the handshake; bytes that came with
                    // the outcome are in `rbuf`.
                    break;
                }
                Wake::Fetch(outcome) => {
                    // Failed, refused, or the shard went away: nothing to serve.
                    if let Some(FetchOutcome::Failed(_)) = outcome {
                        stats.misses_failed.inc();
                    }
                    return SessionEnd::MissFailed;
                }
                Wake::Read(ReadOutcome::Deadline) => {
                    let now = Instant::now();
                    if now >= idle_deadline {
                        stats.timeouts_idle.inc();
                        return SessionEnd::IdleTimeout;
                    }
                    if !conn.ext_sent && now >= hold_deadline {
                        // Held long enough: a handshake without metadata_size now, the
                        // full one when the fetch completes.
                        stats.ext_handshakes_held_out.inc();
                        conn.send_ext_handshake(&mut out);
                    }
                    if now >= keepalive_deadline && out.is_empty() {
                        encode_keepalive(out.head());
                        stats.keepalives_sent.inc();
                    }
                    if !out.is_empty() {
                        let (res, batch) =
                            write_before(&mut stream, out, now + cfg.idle_timeout, &mut canceller)
                                .await;
                        out = batch;
                        if res.is_err() {
                            return SessionEnd::IoError;
                        }
                        last_tx = Instant::now();
                    }
                }
            }
        }
    }
}
