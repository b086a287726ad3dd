//! One peer connection's protocol (BEP 3 handshake, BEP 10 extension handshake, BEP 9
//! metadata) as a sans-IO state machine: no socket, no future, no clock. The driver
//! (`session::run`, over TCP or uTP) hands it events with the time they happened and
//! carries out the effects it asks for; the twin of `upstream/peer.rs`'s `Exchange` on the
//! serving side (docs/architecture.md, "Request path").
//!
//! 1. The 48 bytes that name the info-hash are answered at once (never wait for the peer
//!    id) with our handshake echoing the peer's 20 bytes.
//! 2. Hit: the extension handshake follows as the first message (`m`, `metadata_size`,
//!    `v`, `reqq`, `yourip`), then HaveNone only when both sides set the Fast bit. No
//!    bitfield: we have no pieces.
//!    Miss: the owning shard starts (or joins) the one fetch of that info-hash
//!    (`Effect::Fetch`), and the extension handshake is held up to `handshake_hold_ms` so
//!    that it can carry `metadata_size` (crawlers need it in the first one). If the fetch
//!    is not done by then, a handshake without it goes out, and a second, full one
//!    (complete `m`) as soon as the metadata is verified. Requests that arrive meanwhile
//!    are held, never rejected. If the client's own extension handshake carries
//!    `metadata_size`, we fetch the metadata from the client over this connection
//!    (`Effect::Store` once verified). ut_pex peers go to the fetch (`Effect::Shard`).
//! 3. Requests are answered in batches: every request handled in one call becomes one
//!    vectored write of headers + mmap slices (`send.rs`). Out-of-range pieces and
//!    requests past the burst cap get a reject (msg_type 2) with the same piece number.
//! 4. Keep-alive after `keepalive_interval` of our silence; close after `idle_timeout` of
//!    the peer's (counted in whole frames: a trickle of partial frames is idle), or
//!    `handshake_timeout` before its handshake.
//!
//! Events: `on_read` (a read ended; then `on_bytes`), `on_bytes` (returns the bytes
//! consumed), `on_fetch`, `on_stored`, `on_deadline`, `on_sent`. After each, the driver
//! drains `poll_effect`, writes the batch if it is not empty, and waits until `deadline`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use monoio::time::Instant;

use crate::config::ServeConfig;
use crate::limits;
use crate::server::send::OutBatch;
use crate::server::stats::{CoreStats, Counter};
use crate::store::{RecordRef, Store, StoreError};
use crate::upstream::assemble::{MetadataAssembler, Progress};
use crate::upstream::shard::{FetchOutcome, ShardCmd, Upstream};
use crate::upstream::{PeerCandidate, PeerSource};
use crate::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake, encode_have_none,
    encode_keepalive, encode_metadata_data_header, encode_metadata_reject, encode_metadata_request,
    metadata_piece_count, metadata_piece_range, Decoded, ExtHandshake, Frame, HandshakeHead,
    MetadataMsg, Pex, Reserved, WireError, CLIENT_VERSION, HANDSHAKE_HEAD_LEN, HANDSHAKE_LEN,
    OUR_UT_METADATA_ID, OUR_UT_PEX_ID,
};

/// Peers taken from one ut_pex message (BEP 11 caps a message at 50 added peers).
const PEX_PEERS_PER_MESSAGE_MAX: usize = 50;

/// Peers taken from one connection's ut_pex messages over its life. PEX lets a client
/// choose whom magnetar connects to; a real client sends one or two messages while it
/// waits, so past this the messages are ignored (without it, one connection could point
/// a fetch at its full 4096-candidate cap).
const PEX_PEERS_PER_CONNECTION_MAX: usize = 100;

/// Free room for each ordinary read: enough for a handshake plus a few requests.
pub const READ_SPARE_MIN: usize = limits::READ_BUFFER_BYTES_INITIAL / 2;

/// The smallest ut_metadata request frame: the 4-byte length, id 20, the extension id, and
/// the shortest bencoded request (piece 0).
pub const REQUEST_FRAME_BYTES_MIN: usize = 4 + 1 + 1 + b"d8:msg_typei0e5:piecei0ee".len();

/// What every session on one worker shares.
pub struct WorkerCtx {
    pub store: Arc<Store>,
    pub cfg: Arc<ServeConfig>,
    pub stats: Arc<CoreStats>,
    pub peer_id: [u8; 20],
    pub upstream: Arc<Upstream>,
}

/// Why a session ended; each reason has its counter (`counter`), bumped by `session::run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    PeerClosed,
    IoError,
    HandshakeInvalid,
    HandshakeTimeout,
    /// A miss refused before any fetch (per-IP budget), or a blocked info-hash.
    MissRefused,
    /// The fetch for a miss failed or was refused.
    MissFailed,
    NoExtensions,
    ProtocolError,
    IdleTimeout,
}

impl SessionEnd {
    /// The per-reason counter (`session_ends_*`) of this end on one core.
    pub fn counter(self, stats: &CoreStats) -> &Counter {
        match self {
            SessionEnd::PeerClosed => &stats.session_ends_peer_closed,
            SessionEnd::IoError => &stats.session_ends_io_error,
            SessionEnd::HandshakeInvalid => &stats.session_ends_handshake_invalid,
            SessionEnd::HandshakeTimeout => &stats.session_ends_handshake_timeout,
            SessionEnd::MissRefused => &stats.session_ends_miss_refused,
            SessionEnd::MissFailed => &stats.session_ends_miss_failed,
            SessionEnd::NoExtensions => &stats.session_ends_no_extensions,
            SessionEnd::ProtocolError => &stats.session_ends_protocol_error,
            SessionEnd::IdleTimeout => &stats.session_ends_idle_timeout,
        }
    }
}

/// What the driver must do for the connection (drained with `Conn::poll_effect`).
pub enum Effect {
    /// Start or join the owner shard's fetch of this key (`Upstream::submit`) and feed
    /// its outcome to `Conn::on_fetch`.
    Fetch([u8; 20]),
    /// Send to the key's owner shard: PEX peers for its fetch, or the record this client
    /// gave us (which ends the shard's fetch for every waiter).
    Shard(ShardCmd),
    /// The client gave us this info dict and it verified: store it off the core
    /// (`Upstream::store_off_core`) and feed the result to `Conn::on_stored`.
    Store(Vec<u8>),
    /// Close the connection without writing what is queued.
    Close(SessionEnd),
}

/// Where the connection is; each phase owns exactly the state that exists in it.
enum Phase {
    /// Waiting for the 48 bytes that name the info-hash.
    Handshake { deadline: Instant },
    /// A miss: the fetch runs.
    Waiting(Waiting),
    /// The metadata is stored: requests are answered from the mmap. Our extension
    /// handshake (with `metadata_size`) has gone out.
    Serving(RecordRef),
}

struct Waiting {
    /// Our extension handshake is held until then so that it can carry `metadata_size`;
    /// `None` once one without it went out (hold expired, or the client's own metadata is
    /// being fetched, which needs our ids).
    hold_until: Option<Instant>,
    /// Requests received meanwhile, answered once the metadata arrives (DESIGN point 6 in
    /// docs/architecture.md: never reject them for a running fetch).
    held: Vec<u32>,
    fill: Fill,
}

/// The opportunistic fill: fetching the metadata from the connected client itself.
enum Fill {
    Idle,
    Assembling(MetadataAssembler),
    /// Verified, waiting to go out as `Effect::Store`.
    Verified(Vec<u8>),
}

/// One connection's protocol state.
pub struct Conn<'a> {
    ctx: &'a WorkerCtx,
    peer: SocketAddr,
    phase: Phase,
    /// The info-hash key the peer sent (all zero before its handshake).
    key: [u8; 20],
    /// Whether both sides set the Fast bit (HaveNone allowed).
    fast: bool,
    /// Bytes of the peer id (after the handshake head) still to skip: it carries nothing
    /// we need, and we never wait for it.
    peer_id_left: usize,
    /// The peer's id for ut_metadata (from its extension handshake); None = cannot send.
    peer_ut_metadata: Option<u8>,
    /// `metadata_size` the peer announced (it has the metadata itself).
    peer_metadata_size: Option<u64>,
    /// ut_pex peers taken from this connection so far.
    pex_peers_taken: usize,
    /// The last read filled all its spare room: more may wait in the socket, the peer's
    /// pipelined burst goes on.
    burst_goes_on: bool,
    /// Requests in the peer's current pipelined burst: those of consecutive reads that
    /// each filled the read buffer, i.e. sent without waiting for our answers. Past
    /// `requests_queued_max` (our advertised reqq) they are rejected. Counting per read
    /// instead would let a burst through in buffer-sized slices and make the cap
    /// meaningless.
    burst_requests: usize,
    /// The idle clock: the last time a whole frame (or handshake bytes) arrived.
    last_rx: Instant,
    /// The keep-alive clock: the last time a write completed.
    last_tx: Instant,
    effects: VecDeque<Effect>,
    end: Option<SessionEnd>,
}

impl<'a> Conn<'a> {
    /// A connection accepted at `now`.
    pub fn new(ctx: &'a WorkerCtx, peer: SocketAddr, now: Instant) -> Conn<'a> {
        Conn {
            ctx,
            peer,
            phase: Phase::Handshake {
                deadline: now + ctx.cfg.handshake_timeout,
            },
            key: [0; 20],
            fast: false,
            peer_id_left: HANDSHAKE_LEN - HANDSHAKE_HEAD_LEN,
            peer_ut_metadata: None,
            peer_metadata_size: None,
            pex_peers_taken: 0,
            burst_goes_on: false,
            burst_requests: 0,
            last_rx: now,
            last_tx: now,
            effects: VecDeque::new(),
            end: None,
        }
    }

    /// The info-hash key the peer asked for (all zero before its handshake).
    pub fn key(&self) -> &[u8; 20] {
        &self.key
    }

    /// Whether a fetch outcome is still wanted (the driver drops its waiter otherwise).
    pub fn awaits_fetch(&self) -> bool {
        matches!(self.phase, Phase::Waiting(_))
    }

    /// When `on_deadline` is due: the handshake timeout before the handshake; then the
    /// earliest of the idle close, the keep-alive and (while held) the hold deadline.
    pub fn deadline(&self) -> Instant {
        let cfg = &self.ctx.cfg;
        match &self.phase {
            Phase::Handshake { deadline } => *deadline,
            phase => {
                let mut deadline =
                    (self.last_rx + cfg.idle_timeout).min(self.last_tx + cfg.keepalive_interval);
                if let Phase::Waiting(Waiting {
                    hold_until: Some(hold),
                    ..
                }) = phase
                {
                    deadline = deadline.min(*hold);
                }
                deadline
            }
        }
    }

    /// Until when a write started at `now` may take: a peer that stops reading cannot
    /// hold the session longer than an idle one.
    pub fn write_deadline(&self, now: Instant) -> Instant {
        now + self.ctx.cfg.idle_timeout
    }

    /// Room the next read should have. While a burst goes on, room for a whole reqq of
    /// requests at once, so the cap sees the burst in as few reads as the socket allows.
    pub fn read_spare_min(&self) -> usize {
        if self.burst_goes_on {
            (self.ctx.cfg.requests_queued_max + 1) * REQUEST_FRAME_BYTES_MIN
        } else {
            READ_SPARE_MIN
        }
    }

    /// The next thing the driver must do, in order; `Close` ends the connection.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        if let Some(end) = self.end {
            return Some(Effect::Close(end));
        }
        match &mut self.phase {
            Phase::Waiting(w) if matches!(w.fill, Fill::Verified(_)) => {
                match std::mem::replace(&mut w.fill, Fill::Idle) {
                    Fill::Verified(info) => Some(Effect::Store(info)),
                    _ => unreachable!("matched above"),
                }
            }
            _ => None,
        }
    }

    /// A read ended with new bytes; `filled`: they filled all the spare room. Call
    /// `on_bytes` next.
    pub fn on_read(&mut self, filled: bool) {
        if matches!(self.phase, Phase::Handshake { .. }) {
            // Bursts are counted from the first frame after the handshake.
            return;
        }
        self.burst_goes_on = filled;
        if !filled {
            // The socket was drained: the peer waits for our answers, a new burst begins.
            self.burst_requests = 0;
        }
    }

    /// Handles what the front of `buf` holds at `now`: the handshake head, or every whole
    /// frame. Returns the bytes consumed. Consuming nothing changes nothing, so the driver
    /// calls it until it returns 0 (the handshake head is consumed alone, so that our
    /// handshake is written even if a frame behind it closes the connection).
    pub fn on_bytes(&mut self, buf: &[u8], now: Instant, out: &mut OutBatch) -> usize {
        if self.end.is_some() {
            return 0;
        }
        if let Phase::Handshake { .. } = self.phase {
            return match decode_handshake_head(buf) {
                Ok(Decoded::Done(head, _)) => {
                    self.on_handshake(head, now, out);
                    HANDSHAKE_HEAD_LEN
                }
                Ok(Decoded::NeedMore(_)) => 0,
                Err(_) => {
                    self.ctx.stats.handshakes_invalid.inc();
                    self.close(SessionEnd::HandshakeInvalid);
                    0
                }
            };
        }
        let skip = self.peer_id_left.min(buf.len());
        self.peer_id_left -= skip;
        let consumed = skip + self.on_frames(&buf[skip..], out);
        if consumed > 0 {
            // Only whole frames move the idle clock: a peer trickling one byte of a frame
            // per idle period is idle (slowloris).
            self.last_rx = now;
        }
        consumed
    }

    /// The fetch this connection waits for ended (`None`: its shard went away). Bytes
    /// that arrived with the outcome are still in the driver's buffer: call `on_bytes`.
    pub fn on_fetch(&mut self, outcome: Option<FetchOutcome>, out: &mut OutBatch) {
        if self.end.is_some() || !self.awaits_fetch() {
            return;
        }
        match outcome {
            Some(FetchOutcome::Ready(record)) => {
                // Held requests are answered with the handshake, in the same batch as the
                // requests that came with the outcome (the worst case `limits` sizes).
                self.become_ready(record, out);
                if !self.burst_goes_on {
                    self.burst_requests = 0;
                }
            }
            outcome => {
                // Failed, refused, or the shard went away: nothing to serve.
                if let Some(FetchOutcome::Failed(_)) = outcome {
                    self.ctx.stats.misses_failed.inc();
                }
                self.close(SessionEnd::MissFailed);
            }
        }
    }

    /// The result of `Effect::Store`.
    pub fn on_stored(&mut self, stored: Result<RecordRef, StoreError>, out: &mut OutBatch) {
        match stored {
            Ok(record) if self.awaits_fetch() && self.end.is_none() => {
                // Finish the shard's fetch for everyone else, and serve it here.
                self.ctx.stats.client_fills_stored.inc();
                self.effects.push_back(Effect::Shard(ShardCmd::Stored {
                    key: self.key,
                    record: record.clone(),
                }));
                self.become_ready(record, out);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(peer = %self.peer, "metadata from the client not stored: {e}")
            }
        }
    }

    /// `deadline()` came (the driver read nothing before it). `now` is the current time.
    pub fn on_deadline(&mut self, now: Instant, out: &mut OutBatch) {
        if self.end.is_some() {
            return;
        }
        let ctx = self.ctx;
        let (stats, cfg) = (&ctx.stats, &ctx.cfg);
        if let Phase::Handshake { deadline } = self.phase {
            if now >= deadline {
                stats.timeouts_handshake.inc();
                self.close(SessionEnd::HandshakeTimeout);
            }
            return;
        }
        if now >= self.last_rx + cfg.idle_timeout {
            stats.timeouts_idle.inc();
            self.close(SessionEnd::IdleTimeout);
            return;
        }
        if let Phase::Waiting(Waiting {
            hold_until: Some(hold),
            ..
        }) = self.phase
        {
            if now >= hold {
                // Held long enough: a handshake without metadata_size now, the full one
                // when the fetch completes.
                stats.ext_handshakes_held_out.inc();
                self.send_ext_handshake(out);
            }
        }
        if now >= self.last_tx + cfg.keepalive_interval && out.is_empty() {
            encode_keepalive(out.head());
            stats.keepalives_sent.inc();
        }
    }

    /// The batch went out completely at `now`; it carried `blocks` data messages of
    /// `payload_bytes` (read from the batch before the write, which clears it).
    pub fn on_sent(&mut self, now: Instant, blocks: usize, payload_bytes: usize) {
        self.last_tx = now;
        if blocks > 0 {
            let ctx = self.ctx;
            let stats = &ctx.stats;
            stats.blocks_served.add(blocks as u64);
            stats.bytes_served.add(payload_bytes as u64);
            stats.block_writes.inc();
        }
    }

    fn close(&mut self, end: SessionEnd) {
        self.end.get_or_insert(end);
    }

    fn ext_sent(&self) -> bool {
        match &self.phase {
            Phase::Handshake { .. } => false,
            Phase::Waiting(w) => w.hold_until.is_none(),
            Phase::Serving(_) => true,
        }
    }

    /// The head names the info-hash: answer it now, look it up, start the miss path.
    fn on_handshake(&mut self, head: HandshakeHead, now: Instant, out: &mut OutBatch) {
        let ctx = self.ctx;
        let stats = &ctx.stats;
        stats.handshakes.inc();
        if !head.reserved.extension_protocol() {
            // Without BEP 10 the peer cannot ask for metadata: do not start a fetch for it.
            stats.peers_without_extensions.inc();
            return self.close(SessionEnd::NoExtensions);
        }
        self.key = head.info_hash;
        if ctx.store.is_blocked(&self.key) {
            // Deleted by an operator: never served, never fetched.
            stats.blocked.inc();
            return self.close(SessionEnd::MissRefused);
        }
        let record = ctx.store.lookup(&self.key);
        match &record {
            Some(_) => stats.hits.inc(),
            None => {
                stats.misses.inc();
                if !ctx.upstream.admit_miss_from(self.peer.ip()) {
                    stats.misses_refused_per_ip.inc();
                    return self.close(SessionEnd::MissRefused);
                }
                self.effects.push_back(Effect::Fetch(self.key));
            }
        }
        // Our handshake at once; on a hit the extension handshake (and HaveNone) with it.
        let v2 = record.as_ref().is_some_and(|r| r.has_v2());
        let ours = Reserved::ours(true, false, v2);
        encode_handshake(out.head(), ours, &self.key, &ctx.peer_id);
        self.fast = head.reserved.fast() && ours.fast();
        self.last_rx = now;
        let hold = Duration::from_millis(ctx.upstream.cfg.handshake_hold_ms);
        self.phase = Phase::Waiting(Waiting {
            hold_until: Some(now + hold),
            held: Vec::new(),
            fill: Fill::Idle,
        });
        if let Some(record) = record {
            self.become_ready(record, out);
        }
    }

    /// Our extension handshake: `first` (with HaveNone if both sides are Fast) or a later,
    /// full one; with `metadata_size` once `record` is here.
    fn our_ext_handshake(&self, record: Option<&RecordRef>, first: bool, out: &mut OutBatch) {
        // On the miss path we also offer ut_pex (peers for the fetch), and every later
        // handshake repeats the full `m` (libtorrent drops extensions a later one omits).
        let miss_path = record.is_none() || !first;
        ExtHandshake {
            ut_metadata: Some(OUR_UT_METADATA_ID),
            ut_pex: miss_path.then_some(OUR_UT_PEX_ID),
            metadata_size: record.map(|r| r.len() as u64),
            client: Some(CLIENT_VERSION.as_bytes()),
            reqq: Some(self.ctx.cfg.requests_queued_max as u32),
            yourip: Some(self.peer.ip()),
            listen_port: None,
        }
        .encode(out.head());
        if first && self.fast {
            // BEP 6: HaveNone in place of a bitfield, right after the handshakes.
            encode_have_none(out.head());
        }
        self.ctx.stats.ext_handshakes_sent.inc();
    }

    /// Sends our first extension handshake now (without `metadata_size`: a miss).
    fn send_ext_handshake(&mut self, out: &mut OutBatch) {
        if let Phase::Waiting(Waiting {
            hold_until: hold @ Some(_),
            ..
        }) = &mut self.phase
        {
            *hold = None;
            self.our_ext_handshake(None, true, out);
        }
    }

    /// The metadata is here: announce it (first or second extension handshake) and
    /// answer every held request.
    fn become_ready(&mut self, record: RecordRef, out: &mut OutBatch) {
        let first = !self.ext_sent();
        let held = match std::mem::replace(&mut self.phase, Phase::Serving(record.clone())) {
            Phase::Waiting(w) => w.held,
            _ => Vec::new(),
        };
        self.ctx.stats.served.bump(&self.key);
        self.our_ext_handshake(Some(&record), first, out);
        if !first {
            self.ctx.stats.second_ext_handshakes.inc();
        }
        for piece in held {
            self.answer_request(piece, out);
        }
    }

    /// Handles every whole frame in `buf`, appending replies to `out`. Returns bytes
    /// consumed (up to a protocol error, which closes).
    fn on_frames(&mut self, buf: &[u8], out: &mut OutBatch) -> usize {
        let ctx = self.ctx;
        let stats = &ctx.stats;
        let mut pos = 0;
        while self.end.is_none() {
            let (frame, n) = match decode_frame(&buf[pos..]) {
                Ok(Decoded::Done(frame, n)) => (frame, n),
                Ok(Decoded::NeedMore(_)) => break,
                Err(_) => {
                    stats.protocol_errors.inc();
                    self.close(SessionEnd::ProtocolError);
                    break;
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
                        self.close(SessionEnd::ProtocolError);
                    }
                },
                Frame::Extended {
                    id: OUR_UT_METADATA_ID,
                    payload,
                } => match decode_metadata(payload) {
                    Ok((MetadataMsg::Request { piece }, _)) => {
                        self.burst_requests += 1;
                        self.answer_request(piece, out);
                    }
                    Ok((MetadataMsg::Data { piece, total_size }, data)) => {
                        self.on_peer_data(piece, total_size, data);
                    }
                    Ok((MetadataMsg::Reject { .. }, _)) => {
                        // The peer will not give us its metadata after all.
                        if let Phase::Waiting(w) = &mut self.phase {
                            if let Fill::Assembling(_) = w.fill {
                                w.fill = Fill::Idle;
                            }
                        }
                    }
                    Err(WireError::UnknownMetadataType(_)) => {}
                    Err(_) => {
                        stats.protocol_errors.inc();
                        self.close(SessionEnd::ProtocolError);
                    }
                },
                Frame::Extended {
                    id: OUR_UT_PEX_ID,
                    payload,
                } if self.ext_sent() => self.on_pex(payload),
                // Extensions we did not offer (lt_donthave, ...) and every BEP 3 / BEP 6
                // message: a metadata-only peer has nothing to say to them.
                _ => {}
            }
        }
        pos
    }

    /// Starts fetching from the connected peer itself when it announced the metadata
    /// and we still lack it (opportunistic fill).
    fn maybe_fetch_from_peer(&mut self, out: &mut OutBatch) {
        let Phase::Waiting(Waiting {
            fill: Fill::Idle, ..
        }) = self.phase
        else {
            return;
        };
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
        if let Phase::Waiting(w) = &mut self.phase {
            w.fill = Fill::Assembling(assembler);
        }
        self.ctx.stats.client_fills_started.inc();
    }

    fn on_peer_data(&mut self, piece: u32, total_size: u64, data: &[u8]) {
        let Phase::Waiting(Waiting {
            fill: fill @ Fill::Assembling(_),
            ..
        }) = &mut self.phase
        else {
            // Data we did not ask for: anacrolix and rqbit treat it as a protocol error;
            // we just ignore it.
            return;
        };
        let Fill::Assembling(assembler) = fill else {
            unreachable!("matched above")
        };
        let ctx = self.ctx;
        let stats = &ctx.stats;
        match assembler.on_data(piece, total_size, data) {
            Ok(Progress::Need(_)) => {}
            Ok(Progress::Complete) => {
                let Fill::Assembling(assembler) = std::mem::replace(fill, Fill::Idle) else {
                    unreachable!("matched above")
                };
                match assembler.finish() {
                    Ok(info) => *fill = Fill::Verified(info),
                    Err(_) => stats.client_fills_failed.inc(),
                }
            }
            Err(_) => {
                // Wrong size, duplicate or out-of-range piece: stop trusting this peer's
                // metadata, keep serving it.
                *fill = Fill::Idle;
                stats.client_fills_failed.inc();
            }
        }
    }

    fn on_pex(&mut self, payload: &[u8]) {
        let budget = PEX_PEERS_PER_CONNECTION_MAX.saturating_sub(self.pex_peers_taken);
        if !self.awaits_fetch() || budget == 0 {
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
            self.effects.push_back(Effect::Shard(ShardCmd::Peers {
                key: self.key,
                peers,
            }));
        }
    }

    fn answer_request(&mut self, piece: u32, out: &mut OutBatch) {
        let ctx = self.ctx;
        let stats = &ctx.stats;
        let reqq = ctx.cfg.requests_queued_max;
        let Some(peer_id) = self.peer_ut_metadata else {
            // We cannot address a reply without the peer's id; it broke BEP 10 ordering.
            stats.requests_without_peer_id.inc();
            return;
        };
        if self.burst_requests > reqq {
            stats.rejects_flood.inc();
            encode_metadata_reject(out.head(), peer_id, piece);
            return;
        }
        let record = match &mut self.phase {
            Phase::Serving(record) => record,
            Phase::Waiting(w) => {
                // Fetch still running: hold the request (never reject it for that).
                if w.held.len() < reqq {
                    w.held.push(piece);
                } else {
                    stats.rejects_flood.inc();
                    encode_metadata_reject(out.head(), peer_id, piece);
                }
                return;
            }
            Phase::Handshake { .. } => return,
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
