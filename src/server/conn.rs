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
use crate::store::{RecordRef, Resident, Store, StoreError};
use crate::upstream::assemble::{MetadataAssembler, Progress};
use crate::upstream::ratelimit::PerKeyWindow;
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

/// `limits::REQUEST_NUDGE_MS` as a duration.
const REQUEST_NUDGE: Duration = Duration::from_millis(limits::REQUEST_NUDGE_MS);

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
    /// Reads records that are not in the page cache off this core (`Effect::PageIn`).
    pub page_in: Arc<crate::server::pagein::PageIn>,
    /// MSE handshakes started per peer address (per-/64) in the last second on this core:
    /// each costs a DH modular exponentiation (`server/mse.rs`).
    pub mse_handshakes: PerKeyWindow<std::net::IpAddr>,
    /// MSE handshakes this core may still start: the budget for all addresses together.
    pub mse_dh_budget: crate::upstream::ratelimit::TokenBucket,
}

impl WorkerCtx {
    pub fn new(
        store: Arc<Store>,
        cfg: Arc<ServeConfig>,
        stats: Arc<CoreStats>,
        peer_id: [u8; 20],
        upstream: Arc<Upstream>,
        page_in: Arc<crate::server::pagein::PageIn>,
    ) -> WorkerCtx {
        let mse_handshakes = PerKeyWindow::new(
            cfg.mse_handshakes_per_ip_per_second_max,
            std::time::Duration::from_secs(1),
            crate::limits::MSE_RATE_KEYS_PER_CORE_MAX,
        );
        let per_core = cfg.mse_handshakes_per_core_per_second_max;
        WorkerCtx {
            store,
            cfg,
            stats,
            peer_id,
            upstream,
            page_in,
            mse_handshakes,
            mse_dh_budget: crate::upstream::ratelimit::TokenBucket::new(per_core, per_core),
        }
    }
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
    /// The record for this key is not in the page cache: look it up and read it in off
    /// the core (`PageIn::page_in`) and feed the result to `Conn::on_paged_in`. Nothing
    /// else is handled until then (our handshake's reserved bits depend on the record).
    PageIn([u8; 20]),
    /// Close the connection without writing what is queued.
    Close(SessionEnd),
}

/// Where the connection is; each phase owns exactly the state that exists in it.
enum Phase {
    /// Waiting for the 48 bytes that name the info-hash.
    Handshake { deadline: Instant },
    /// The handshake named a record that is not in the page cache: it is read in off the
    /// core (`Effect::PageIn`) before we answer. `fast`: the peer set the Fast bit;
    /// `since`: when the page-in began.
    PagingIn { fast: bool, since: Instant },
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
    /// Requests received meanwhile, answered once the metadata arrives. Never rejected
    /// for a running fetch: after a reject libtorrent waits a minute, crawlers give up and
    /// anacrolix never asks that connection again.
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
    /// Our extension handshake with `metadata_size` went out and no request has come yet:
    /// one keep-alive goes `limits::REQUEST_NUDGE_MS` after our last write (see there).
    nudge_pending: bool,
    effects: VecDeque<Effect>,
    /// The torrent an MSE handshake proved (req2): the BitTorrent handshake must name it.
    bound_to: Option<[u8; 20]>,
    /// Set once; every event after it is ignored.
    end: Option<SessionEnd>,
    /// `Effect::Close` has been handed out (once).
    end_polled: bool,
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
            nudge_pending: false,
            effects: VecDeque::new(),
            bound_to: None,
            end: None,
            end_polled: false,
        }
    }

    /// What every session on this worker shares.
    pub fn ctx(&self) -> &'a WorkerCtx {
        self.ctx
    }

    /// An MSE handshake proved the torrent `key` (HASH('req2', key) matched): the
    /// BitTorrent handshake that follows must name the same torrent, or the connection
    /// is closed before anything is looked up or fetched (docs/protocol-facts.md).
    pub fn bind_to(&mut self, key: [u8; 20]) {
        self.bound_to = Some(key);
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
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
                if self.nudge_pending {
                    deadline = deadline.min(self.last_tx + REQUEST_NUDGE);
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

    /// The next thing the driver must do, in order; `Close` (handed out once) ends the
    /// connection, and nothing follows it.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        if let Some(end) = self.end {
            if self.end_polled {
                return None;
            }
            self.end_polled = true;
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
        if let Phase::PagingIn { .. } = self.phase {
            // Kept by the driver until the record is here (`on_paged_in`).
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
            Some(FetchOutcome::Ready(record))
                if !record.hashes().handshake_keys().any(|k| k == self.key) =>
            {
                // Not the torrent this connection asked for: a driver handed it the
                // outcome of another connection's fetch. Never serve it; keep waiting.
                tracing::error!(peer = %self.peer, "fetch outcome for another torrent ignored");
            }
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
        if self.nudge_pending && now >= self.last_tx + REQUEST_NUDGE && out.is_empty() {
            self.nudge_pending = false;
            encode_keepalive(out.head());
            stats.keepalives_nudge.inc();
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
            Phase::Handshake { .. } | Phase::PagingIn { .. } => false,
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
        if let Some(proven) = self.bound_to {
            if !self.same_torrent(&proven, &head.info_hash) {
                // A peer proves one torrent and names another: neither served nor fetched.
                stats.mse_torrent_mismatch.inc();
                return self.close(SessionEnd::HandshakeInvalid);
            }
        }
        self.key = head.info_hash;
        if ctx.store.is_blocked(&self.key) {
            // Deleted by an operator: never served, never fetched.
            stats.blocked.inc();
            return self.close(SessionEnd::MissRefused);
        }
        let record = match ctx.store.lookup_resident(&self.key, now.into_std()) {
            Resident::Hit(record) => Some(record),
            Resident::Miss => None,
            Resident::Cold => {
                // Reading it here would stall every connection of this core on the disk.
                stats.cold_lookups.inc();
                self.phase = Phase::PagingIn {
                    fast: head.reserved.fast(),
                    since: now,
                };
                self.effects.push_back(Effect::PageIn(self.key));
                return;
            }
        };
        self.answer_handshake(record, head.reserved.fast(), now, out);
    }

    /// The record of a cold handshake is in the page cache now (`None`: it is not
    /// stored, deleted meanwhile say): the handshake is answered as a hit or a miss.
    pub fn on_paged_in(&mut self, record: Option<RecordRef>, now: Instant, out: &mut OutBatch) {
        let Phase::PagingIn { fast, since } = self.phase else {
            return;
        };
        let stats = &self.ctx.stats;
        stats.page_ins.inc();
        let waited = now.saturating_duration_since(since);
        stats.page_in_wait_us.add(waited.as_micros() as u64);
        if self.end.is_some() {
            return;
        }
        self.answer_handshake(record, fast, now, out);
    }

    /// Our handshake for the looked-up `record` (a hit) or none (a miss: the fetch
    /// starts). `peer_fast`: the peer set the Fast bit.
    fn answer_handshake(
        &mut self,
        record: Option<RecordRef>,
        peer_fast: bool,
        now: Instant,
        out: &mut OutBatch,
    ) {
        let ctx = self.ctx;
        let stats = &ctx.stats;
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
        self.fast = peer_fast && ours.fast();
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

    /// Whether `named` is a handshake key of the torrent `proven` is a key of (a hybrid
    /// torrent has two: v1 and the truncated v2).
    fn same_torrent(&self, proven: &[u8; 20], named: &[u8; 20]) -> bool {
        proven == named
            || self
                .ctx
                .store
                .lookup(proven)
                .is_some_and(|r| r.hashes().handshake_keys().any(|k| &k == named))
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
        self.nudge_pending = true;
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
                        self.nudge_pending = false;
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
            Phase::Handshake { .. } | Phase::PagingIn { .. } => return,
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

#[cfg(test)]
pub(crate) mod tests {
    //! The protocol without sockets: each test feeds a `Conn` what a client would send
    //! and reads the batch it fills, byte for byte where the wire format is pinned.

    use super::*;
    use crate::store::{AppendOptions, StoreOptions};
    use crate::upstream::config::UpstreamConfig;
    use crate::upstream::shard::FetchFailure;

    pub(crate) const PEER_ID: [u8; 20] = *b"-MX0001-unittestpeer";
    /// The client's ut_metadata id: what our messages must carry (any 1–255 works).
    pub(crate) const CLIENT_UT: u8 = 42;
    pub(crate) const PEER: &str = "192.0.2.7:51413";

    pub(crate) struct Kit {
        pub(crate) ctx: WorkerCtx,
        _mailboxes: Vec<flume::Receiver<ShardCmd>>,
        _dir: tempfile::TempDir,
    }

    pub(crate) fn kit(reqq: usize, hold_ms: u64) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let mut cfg = ServeConfig::new(dir.path().to_path_buf());
        cfg.requests_queued_max = reqq;
        cfg.handshake_timeout = Duration::from_secs(10);
        cfg.idle_timeout = Duration::from_secs(120);
        cfg.keepalive_interval = Duration::from_secs(30);
        let upstream_cfg = UpstreamConfig {
            handshake_hold_ms: hold_ms,
            ..UpstreamConfig::default()
        };
        let (upstream, mailboxes) = Upstream::new(upstream_cfg, store.clone(), 1);
        let page_in = Arc::new(
            crate::server::pagein::PageIn::start(store.clone(), 1, 0, 1, Duration::ZERO).unwrap(),
        );
        let ctx = WorkerCtx::new(
            store,
            Arc::new(cfg),
            Arc::new(CoreStats::default()),
            PEER_ID,
            upstream,
            page_in,
        );
        Kit {
            ctx,
            _mailboxes: mailboxes,
            _dir: dir,
        }
    }

    impl Kit {
        /// The context on its own, for an adapter that owns it, and what must outlive it.
        pub(crate) fn into_parts(self) -> (WorkerCtx, impl Sized) {
            (self.ctx, (self._mailboxes, self._dir))
        }
    }

    pub(crate) fn store(kit: &Kit, info: &[u8]) -> RecordRef {
        let appended = kit.ctx.store.append(info, AppendOptions::default());
        appended.unwrap().record().clone()
    }

    pub(crate) fn key_of(info: &[u8]) -> [u8; 20] {
        use sha1::{Digest, Sha1};
        Sha1::digest(info).into()
    }

    pub(crate) fn client_handshake(key: &[u8; 20], reserved: Reserved) -> Vec<u8> {
        let mut v = Vec::new();
        encode_handshake(&mut v, reserved, key, b"-XX0001-clientpeerid");
        v
    }

    pub(crate) fn client_ext(ut_metadata: u8, metadata_size: Option<u64>) -> Vec<u8> {
        let mut v = Vec::new();
        ExtHandshake {
            ut_metadata: Some(ut_metadata),
            metadata_size,
            ..ExtHandshake::default()
        }
        .encode(&mut v);
        v
    }

    /// What a client sends first: handshake, extension handshake, and requests.
    pub(crate) fn opening(key: &[u8; 20], pieces: impl IntoIterator<Item = u32>) -> Vec<u8> {
        let mut v = client_handshake(key, Reserved::ours(false, false, false));
        v.extend(client_ext(CLIENT_UT, None));
        v.extend(requests(pieces));
        v
    }

    pub(crate) fn requests(pieces: impl IntoIterator<Item = u32>) -> Vec<u8> {
        let mut v = Vec::new();
        for piece in pieces {
            encode_metadata_request(&mut v, OUR_UT_METADATA_ID, piece);
        }
        v
    }

    fn extended(id: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
        v.extend([20, id]);
        v.extend_from_slice(payload);
        v
    }

    /// What the driver does with a buffer: hand it in until nothing more is consumed.
    fn pump(conn: &mut Conn<'_>, buf: &[u8], now: Instant, out: &mut OutBatch) -> usize {
        let mut pos = 0;
        loop {
            let n = conn.on_bytes(&buf[pos..], now, out);
            pos += n;
            if n == 0 {
                return pos;
            }
        }
    }

    fn effects(conn: &mut Conn<'_>) -> Vec<Effect> {
        std::iter::from_fn(|| conn.poll_effect()).collect()
    }

    /// The sealed batch as the peer would receive it; the batch is cleared for reuse.
    pub(crate) fn wire(out: &mut OutBatch) -> Vec<u8> {
        out.seal();
        let mut bytes = Vec::new();
        while bytes.len() < out.sealed_len() {
            bytes.extend_from_slice(out.contiguous_at(bytes.len()));
        }
        out.clear();
        bytes
    }

    /// Our messages, decoded.
    #[derive(Debug, PartialEq)]
    pub(crate) enum Msg {
        KeepAlive,
        HaveNone,
        Ext {
            ut_metadata: Option<u8>,
            ut_pex: Option<u8>,
            metadata_size: Option<u64>,
            reqq: Option<u32>,
        },
        /// ut_metadata data (the block is checked against the dict).
        Data(u32),
        Reject(u32),
        Request(u32),
    }

    pub(crate) fn messages(mut bytes: &[u8], info: Option<&[u8]>) -> Vec<Msg> {
        let mut msgs = Vec::new();
        while !bytes.is_empty() {
            let Ok(Decoded::Done(frame, n)) = decode_frame(bytes) else {
                panic!("not whole frames: {bytes:?}");
            };
            msgs.push(match frame {
                Frame::KeepAlive => Msg::KeepAlive,
                Frame::HaveNone => Msg::HaveNone,
                Frame::Extended { id: 0, payload } => {
                    let hs = ExtHandshake::decode(payload).unwrap();
                    Msg::Ext {
                        ut_metadata: hs.ut_metadata,
                        ut_pex: hs.ut_pex,
                        metadata_size: hs.metadata_size,
                        reqq: hs.reqq,
                    }
                }
                Frame::Extended { id, payload } => {
                    assert_eq!(id, CLIENT_UT, "messages we send carry the client's id");
                    match decode_metadata(payload).unwrap() {
                        (MetadataMsg::Data { piece, total_size }, block) => {
                            let info = info.expect("data only with a dict");
                            assert_eq!(total_size, info.len() as u64);
                            let range = metadata_piece_range(info.len(), piece).unwrap();
                            assert!(block == &info[range], "piece {piece} bytes");
                            Msg::Data(piece)
                        }
                        (MetadataMsg::Reject { piece }, _) => Msg::Reject(piece),
                        (MetadataMsg::Request { piece }, _) => Msg::Request(piece),
                    }
                }
                other => panic!("unexpected {other:?}"),
            });
            bytes = &bytes[n..];
        }
        msgs
    }

    /// Hands in the handshake and checks the 68-byte answer; returns the rest of the batch.
    fn open(conn: &mut Conn<'_>, key: &[u8; 20], fast: bool, now: Instant) -> Vec<u8> {
        let mut out = OutBatch::new();
        let hs = client_handshake(key, Reserved::ours(fast, false, false));
        assert_eq!(pump(conn, &hs[..HANDSHAKE_HEAD_LEN], now, &mut out), 48);
        let got = wire(&mut out);
        let mut ours = Vec::new();
        encode_handshake(&mut ours, Reserved::ours(true, false, false), key, &PEER_ID);
        assert_eq!(
            &got[..HANDSHAKE_LEN],
            &ours[..],
            "our handshake echoes the key"
        );
        // The peer id comes later, in any split; it is skipped, never waited for.
        assert_eq!(pump(conn, &hs[HANDSHAKE_HEAD_LEN..], now, &mut out), 20);
        assert!(out.is_empty());
        got[HANDSHAKE_LEN..].to_vec()
    }

    pub(crate) fn ext(ut_pex: bool, metadata_size: Option<usize>, reqq: usize) -> Msg {
        Msg::Ext {
            ut_metadata: Some(OUR_UT_METADATA_ID),
            ut_pex: ut_pex.then_some(OUR_UT_PEX_ID),
            metadata_size: metadata_size.map(|s| s as u64),
            reqq: Some(reqq as u32),
        }
    }

    #[test]
    fn request_frame_bytes_min_is_the_encoded_request_for_piece_zero() {
        assert_eq!(requests([0]).len(), REQUEST_FRAME_BYTES_MIN);
        assert_eq!(REQUEST_FRAME_BYTES_MIN, 31);
    }

    #[test]
    fn hit_echoes_the_key_sends_the_extension_handshake_first_and_have_none_only_with_fast() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        store(&kit, &info);
        let key = key_of(&info);
        for fast in [true, false] {
            let now = Instant::now();
            let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
            let rest = open(&mut conn, &key, fast, now);
            let mut expected = vec![ext(false, Some(info.len()), 250)];
            if fast {
                expected.push(Msg::HaveNone);
            }
            assert_eq!(messages(&rest, None), expected, "fast {fast}");
            assert!(effects(&mut conn).is_empty(), "a hit fetches nothing");
            assert!(!conn.awaits_fetch());

            let mut out = OutBatch::new();
            let mut wire_in = client_ext(CLIENT_UT, None);
            wire_in.extend(requests([2, 0, 9, 1]));
            assert_eq!(pump(&mut conn, &wire_in, now, &mut out), wire_in.len());
            assert_eq!(out.blocks(), 3);
            let got = messages(&wire(&mut out), Some(&info));
            use Msg::{Data, Reject};
            assert_eq!(got, [Data(2), Data(0), Reject(9), Data(1)]);
        }
        assert_eq!(kit.ctx.stats.hits.get(), 2);
        assert_eq!(kit.ctx.stats.rejects_out_of_range.get(), 2);
    }

    /// A driver that hands a connection another connection's fetch outcome (a slot reused,
    /// a generation that wrapped) must not make it serve the wrong torrent.
    #[test]
    fn a_fetch_outcome_for_another_torrent_is_never_served() {
        let kit = kit(250, 0);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let other = crate::metainfo::synthetic_v1_info(2001);
        let key = key_of(&info);
        let t0 = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        open(&mut conn, &key, false, t0);
        assert!(matches!(effects(&mut conn)[..], [Effect::Fetch(k)] if k == key));
        let mut out = OutBatch::new();
        let mut wire_in = client_ext(CLIENT_UT, None);
        wire_in.extend(requests([0]));
        pump(&mut conn, &wire_in, t0, &mut out);
        wire(&mut out);
        let wrong = store(&kit, &other);
        conn.on_fetch(Some(FetchOutcome::Ready(wrong)), &mut out);
        assert!(out.is_empty(), "nothing of the other torrent is sent");
        assert!(conn.awaits_fetch(), "still waiting for its own");
        let right = store(&kit, &info);
        conn.on_fetch(Some(FetchOutcome::Ready(right)), &mut out);
        assert_eq!(
            messages(&wire(&mut out), Some(&info)),
            [ext(false, Some(info.len()), 250), Msg::Data(0)]
        );
    }

    #[test]
    fn miss_hold_expires_then_a_second_full_handshake_answers_the_held_requests() {
        let kit = kit(250, 200);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let key = key_of(&info);
        let t0 = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        // A miss: our handshake alone, the fetch starts, the extension handshake is held.
        assert!(open(&mut conn, &key, true, t0).is_empty());
        let effects_now = effects(&mut conn);
        assert!(matches!(effects_now[..], [Effect::Fetch(k)] if k == key));
        conn.on_sent(t0, 0, 0);
        assert_eq!(
            conn.deadline(),
            t0 + Duration::from_millis(200),
            "hold first"
        );

        // Requests meanwhile are held: no reject, no answer.
        let mut out = OutBatch::new();
        let mut wire_in = client_ext(CLIENT_UT, None);
        wire_in.extend(requests([1, 0]));
        conn.on_read(false);
        assert_eq!(pump(&mut conn, &wire_in, t0, &mut out), wire_in.len());
        assert!(out.is_empty());

        // The hold passes: a handshake without metadata_size (ut_pex offered), HaveNone.
        let t1 = t0 + Duration::from_millis(200);
        conn.on_deadline(t1, &mut out);
        assert_eq!(
            messages(&wire(&mut out), None),
            [ext(true, None, 250), Msg::HaveNone]
        );
        conn.on_sent(t1, 0, 0);
        assert_eq!(kit.ctx.stats.ext_handshakes_held_out.get(), 1);
        assert_eq!(
            conn.deadline(),
            t1 + Duration::from_secs(30),
            "keep-alive next"
        );

        // The fetch lands: a second, full handshake (the whole `m` again, now with the
        // size; no second HaveNone), then the held requests in their order.
        let record = store(&kit, &info);
        conn.on_fetch(Some(FetchOutcome::Ready(record)), &mut out);
        assert_eq!(
            messages(&wire(&mut out), Some(&info)),
            [ext(true, Some(info.len()), 250), Msg::Data(1), Msg::Data(0)]
        );
        assert!(!conn.awaits_fetch());
        assert_eq!(kit.ctx.stats.second_ext_handshakes.get(), 1);
        assert!(effects(&mut conn).is_empty());
    }

    #[test]
    fn miss_filled_within_the_hold_sends_one_handshake_with_the_size() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let key = key_of(&info);
        let t0 = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        assert!(open(&mut conn, &key, false, t0).is_empty());
        let mut out = OutBatch::new();
        let mut wire_in = client_ext(CLIENT_UT, None);
        wire_in.extend(requests([2]));
        pump(&mut conn, &wire_in, t0, &mut out);
        assert!(out.is_empty());
        conn.on_fetch(Some(FetchOutcome::Ready(store(&kit, &info))), &mut out);
        assert_eq!(
            messages(&wire(&mut out), Some(&info)),
            [ext(false, Some(info.len()), 250), Msg::Data(2)]
        );
        assert_eq!(kit.ctx.stats.second_ext_handshakes.get(), 0);
    }

    #[test]
    fn failed_or_lost_fetch_closes() {
        let kit = kit(250, 1500);
        let failures = [
            Some(FetchOutcome::Failed(FetchFailure::NegativeCached)),
            None,
        ];
        for (i, outcome) in failures.into_iter().enumerate() {
            let now = Instant::now();
            let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
            open(&mut conn, &[i as u8 + 1; 20], true, now);
            effects(&mut conn);
            let mut out = OutBatch::new();
            conn.on_fetch(outcome, &mut out);
            assert!(matches!(
                effects(&mut conn)[..],
                [Effect::Close(SessionEnd::MissFailed)]
            ));
        }
        assert_eq!(kit.ctx.stats.misses_failed.get(), 1, "only a real failure");
    }

    #[test]
    fn burst_cap_rejects_past_reqq_within_a_burst_and_resets_after_a_read_that_did_not_fill() {
        let reqq = 4;
        let kit = kit(reqq, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        store(&kit, &info);
        let now = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        open(&mut conn, &key_of(&info), false, now);
        let mut out = OutBatch::new();
        pump(&mut conn, &client_ext(CLIENT_UT, None), now, &mut out);
        wire(&mut out);
        use Msg::{Data, Reject};

        // A read that filled the buffer: 6 requests, the first reqq answered.
        conn.on_read(true);
        assert_eq!(conn.read_spare_min(), (reqq + 1) * REQUEST_FRAME_BYTES_MIN);
        pump(&mut conn, &requests([0, 1, 2, 0, 1, 2]), now, &mut out);
        let got = messages(&wire(&mut out), Some(&info));
        assert_eq!(
            got,
            [Data(0), Data(1), Data(2), Data(0), Reject(1), Reject(2)]
        );
        // The burst goes on (that read filled too): still past the cap.
        conn.on_read(true);
        pump(&mut conn, &requests([0]), now, &mut out);
        assert_eq!(messages(&wire(&mut out), Some(&info)), [Reject(0)]);
        // A read that did not fill: the peer waited for us, a new burst begins.
        conn.on_read(false);
        assert_eq!(conn.read_spare_min(), READ_SPARE_MIN);
        pump(&mut conn, &requests([2, 1]), now, &mut out);
        assert_eq!(messages(&wire(&mut out), Some(&info)), [Data(2), Data(1)]);
        assert_eq!(kit.ctx.stats.rejects_flood.get(), 3);
    }

    /// The worst case `limits::REQUESTS_QUEUED_MAX_LIMIT` is sized for, at the largest
    /// allowed reqq: a full set of held requests answered in the same batch as a full
    /// burst that came with the fetch outcome, plus a trailing reject. One writev.
    #[test]
    fn held_requests_and_a_full_burst_fit_one_writev_at_the_largest_reqq() {
        let reqq = limits::REQUESTS_QUEUED_MAX_LIMIT;
        let kit = kit(reqq, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let now = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        open(&mut conn, &key_of(&info), false, now);
        effects(&mut conn);
        let mut out = OutBatch::new();
        pump(&mut conn, &client_ext(CLIENT_UT, None), now, &mut out);
        let all_pieces = (0..3u32).cycle();

        // reqq requests held while the fetch runs.
        conn.on_read(false);
        pump(
            &mut conn,
            &requests(all_pieces.clone().take(reqq)),
            now,
            &mut out,
        );
        assert!(out.is_empty());
        // The outcome lands with another full burst (and one request too many) behind it.
        let burst = requests(all_pieces.take(reqq + 1));
        conn.on_fetch(Some(FetchOutcome::Ready(store(&kit, &info))), &mut out);
        assert_eq!(pump(&mut conn, &burst, now, &mut out), burst.len());

        assert_eq!(out.blocks(), 2 * reqq);
        out.seal();
        let iovecs = out.iovecs().len();
        assert_eq!(
            iovecs,
            2 * reqq * limits::IOVECS_PER_DATA_MESSAGE + limits::IOVECS_PER_BATCH_FIXED
        );
        assert!(iovecs <= limits::IOVECS_PER_WRITE_MAX, "{iovecs} iovecs");
        let got = messages(&wire(&mut out), Some(&info));
        assert_eq!(got.len(), 1 + 2 * reqq + 1);
        assert_eq!(got.last(), Some(&Msg::Reject(reqq as u32 % 3)));
    }

    #[test]
    fn protocol_errors_close_without_the_replies_decided_before() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        store(&kit, &info);
        let cases: [(&str, Vec<u8>); 3] = [
            ("huge length prefix", u32::MAX.to_be_bytes().to_vec()),
            ("bad extension handshake", extended(0, b"d1:md")),
            (
                "bad ut_metadata message",
                extended(OUR_UT_METADATA_ID, b"i1e"),
            ),
        ];
        for (what, bad) in cases {
            let now = Instant::now();
            let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
            open(&mut conn, &key_of(&info), false, now);
            let mut out = OutBatch::new();
            let mut wire_in = client_ext(CLIENT_UT, None);
            wire_in.extend(requests([0]));
            wire_in.extend(bad);
            wire_in.extend(requests([1]));
            pump(&mut conn, &wire_in, now, &mut out);
            assert!(
                matches!(
                    effects(&mut conn)[..],
                    [Effect::Close(SessionEnd::ProtocolError)]
                ),
                "{what}"
            );
            assert_eq!(
                out.blocks(),
                1,
                "{what}: nothing answered after the bad frame"
            );
            // Closed: nothing more is handled.
            assert_eq!(conn.on_bytes(&requests([0]), now, &mut out), 0, "{what}");
        }
        assert_eq!(kit.ctx.stats.protocol_errors.get(), 3);
    }

    #[test]
    fn bad_handshakes_close_at_once() {
        let kit = kit(250, 1500);
        let now = Instant::now();
        let mut out = OutBatch::new();

        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        pump(
            &mut conn,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            now,
            &mut out,
        );
        assert!(matches!(
            effects(&mut conn)[..],
            [Effect::Close(SessionEnd::HandshakeInvalid)]
        ));

        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        let no_bep10 = client_handshake(&[7; 20], Reserved([0; 8]));
        pump(&mut conn, &no_bep10, now, &mut out);
        assert!(matches!(
            effects(&mut conn)[..],
            [Effect::Close(SessionEnd::NoExtensions)]
        ));
        assert!(out.is_empty(), "no handshake for a peer that cannot ask");
    }

    #[test]
    fn handshake_timeout_idle_close_and_keepalives_follow_the_clock() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        store(&kit, &info);
        let key = key_of(&info);
        let s = Duration::from_secs;
        let t0 = Instant::now();

        // No handshake within the timeout.
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        let mut out = OutBatch::new();
        pump(
            &mut conn,
            &client_handshake(&key, Reserved::ours(false, false, false))[..47],
            t0,
            &mut out,
        );
        assert_eq!(conn.deadline(), t0 + s(10));
        conn.on_deadline(t0 + s(10), &mut out);
        assert!(matches!(
            effects(&mut conn)[..],
            [Effect::Close(SessionEnd::HandshakeTimeout)]
        ));

        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        open(&mut conn, &key, false, t0);
        conn.on_sent(t0, 0, 0);
        // The client asks at once (no nudge then, see the next test).
        pump(&mut conn, &requests([0]), t0, &mut out);
        wire(&mut out);
        conn.on_sent(t0, 1, 0);
        // Our silence: a keep-alive every keepalive_interval.
        assert_eq!(conn.deadline(), t0 + s(30));
        conn.on_deadline(t0 + s(30), &mut out);
        assert_eq!(messages(&wire(&mut out), None), [Msg::KeepAlive]);
        conn.on_sent(t0 + s(30), 0, 0);
        assert_eq!(conn.deadline(), t0 + s(60));

        // A partial frame is not a frame: the idle clock stands still (slowloris).
        let req = requests([0]);
        assert_eq!(pump(&mut conn, &req[..10], t0 + s(50), &mut out), 0);
        conn.on_sent(t0 + s(100), 0, 0);
        assert_eq!(conn.deadline(), t0 + s(120), "idle close first");
        // A whole frame moves it.
        let mut whole = client_ext(CLIENT_UT, None);
        whole.extend(&req[..10]);
        assert_eq!(
            pump(&mut conn, &whole, t0 + s(110), &mut out),
            whole.len() - 10
        );
        assert_eq!(conn.deadline(), t0 + s(130), "keep-alive first again");
        conn.on_deadline(t0 + s(130), &mut out);
        assert_eq!(messages(&wire(&mut out), None), [Msg::KeepAlive]);
        conn.on_sent(t0 + s(130), 0, 0);
        assert_eq!(conn.deadline(), t0 + s(160));
        conn.on_sent(t0 + s(225), 0, 0);
        assert_eq!(conn.deadline(), t0 + s(230));
        conn.on_deadline(t0 + s(230), &mut out);
        assert!(matches!(
            effects(&mut conn)[..],
            [Effect::Close(SessionEnd::IdleTimeout)]
        ));
        assert_eq!(kit.ctx.stats.timeouts_idle.get(), 1);
        assert_eq!(kit.ctx.stats.keepalives_sent.get(), 2);
        assert_eq!(kit.ctx.stats.keepalives_nudge.get(), 0);
    }

    /// A client that has not asked for a piece `REQUEST_NUDGE` after our extension
    /// handshake gets one keep-alive (Transmission 3 leaves the handshake unread until
    /// more bytes come); one that asks never does, and the nudge comes only once.
    #[test]
    fn a_client_silent_after_our_extension_handshake_is_nudged_once() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        store(&kit, &info);
        let key = key_of(&info);
        let t0 = Instant::now();
        let mut out = OutBatch::new();

        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        open(&mut conn, &key, false, t0);
        conn.on_sent(t0, 0, 0);
        assert_eq!(conn.deadline(), t0 + REQUEST_NUDGE);
        conn.on_deadline(t0 + REQUEST_NUDGE, &mut out);
        assert_eq!(messages(&wire(&mut out), None), [Msg::KeepAlive]);
        conn.on_sent(t0 + REQUEST_NUDGE, 0, 0);
        // Once: then the ordinary keep-alive schedule.
        let next = conn.deadline();
        assert_eq!(next, t0 + REQUEST_NUDGE + kit.ctx.cfg.keepalive_interval);
        assert_eq!(kit.ctx.stats.keepalives_nudge.get(), 1);

        // A client that asks at once is not nudged.
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), t0);
        open(&mut conn, &key, false, t0);
        pump(&mut conn, &requests([0]), t0, &mut out);
        wire(&mut out);
        conn.on_sent(t0, 1, 0);
        assert_eq!(conn.deadline(), t0 + kit.ctx.cfg.keepalive_interval);
        assert_eq!(kit.ctx.stats.keepalives_nudge.get(), 1);
    }

    #[test]
    fn metadata_from_the_client_is_fetched_stored_and_then_served() {
        let kit = kit(250, 1500);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let key = key_of(&info);
        let now = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        open(&mut conn, &key, false, now);
        effects(&mut conn);

        // The client announces the size: our handshake goes out at once (it needs our
        // id), without the size, followed by a request for every piece.
        let mut out = OutBatch::new();
        pump(
            &mut conn,
            &client_ext(CLIENT_UT, Some(info.len() as u64)),
            now,
            &mut out,
        );
        use Msg::Request;
        assert_eq!(
            messages(&wire(&mut out), None),
            [ext(true, None, 250), Request(0), Request(1), Request(2)]
        );
        let mut data = requests([1]); // the client asks too: held
        for piece in 0..3 {
            let range = metadata_piece_range(info.len(), piece).unwrap();
            let mut msg = Vec::new();
            encode_metadata_data_header(
                &mut msg,
                OUR_UT_METADATA_ID,
                piece,
                info.len() as u64,
                range.len(),
            );
            msg.extend_from_slice(&info[range]);
            data.extend(msg);
        }
        pump(&mut conn, &data, now, &mut out);
        assert!(out.is_empty());
        let Some(Effect::Store(got)) = conn.poll_effect() else {
            panic!("the verified dict goes to the store");
        };
        assert_eq!(got, info);
        assert!(conn.poll_effect().is_none());

        let record = kit
            .ctx
            .store
            .append(&got, AppendOptions::default())
            .map(|a| a.record().clone());
        conn.on_stored(record, &mut out);
        assert!(matches!(
            effects(&mut conn)[..],
            [Effect::Shard(ShardCmd::Stored { key: k, .. })] if k == key
        ));
        assert_eq!(
            messages(&wire(&mut out), Some(&info)),
            [ext(true, Some(info.len()), 250), Msg::Data(1)]
        );
        assert_eq!(kit.ctx.stats.client_fills_stored.get(), 1);
    }

    #[test]
    fn pex_from_a_waiting_client_goes_to_the_fetch_within_its_caps() {
        let kit = kit(250, 0);
        let now = Instant::now();
        let mut conn = Conn::new(&kit.ctx, PEER.parse().unwrap(), now);
        open(&mut conn, &[9; 20], false, now);
        effects(&mut conn);
        let mut out = OutBatch::new();
        let mut added = Vec::new();
        for i in 0..60u8 {
            added.extend([10, 0, 0, i, 0x1a, 0xe1]);
        }
        let mut payload = format!("d5:added{}:", added.len()).into_bytes();
        payload.extend(&added);
        payload.push(b'e');
        let pex = extended(OUR_UT_PEX_ID, &payload);

        // Before our extension handshake offered ut_pex, PEX is ignored.
        pump(&mut conn, &pex, now, &mut out);
        assert!(effects(&mut conn).is_empty());
        conn.on_deadline(now, &mut out); // hold 0: the handshake without size goes out
        let mut taken = Vec::new();
        for _ in 0..3 {
            pump(&mut conn, &pex, now, &mut out);
            for effect in effects(&mut conn) {
                match effect {
                    Effect::Shard(ShardCmd::Peers { key, peers }) => {
                        assert_eq!(key, [9; 20]);
                        taken.push(peers.len());
                    }
                    _ => panic!("only PEX peers"),
                }
            }
        }
        assert_eq!(
            taken,
            [PEX_PEERS_PER_MESSAGE_MAX, PEX_PEERS_PER_CONNECTION_MAX - 50]
        );
    }
}
