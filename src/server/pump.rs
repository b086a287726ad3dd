//! One peer connection above any transport, as one sans-IO state machine: the gate that
//! tells a plaintext handshake from an MSE key (and runs MSE), the BitTorrent session
//! (`conn.rs`) and the effects it asks for. Every driver is a thin adapter around it:
//! - `session.rs` for monoio byte streams (TCP on the epoll driver; uTP on both),
//! - `uring/` for TCP on the worker's own ring.
//!
//! An adapter feeds it what happened (`on_bytes`, `on_fetch`, `on_stored`, `on_deadline`,
//! `on_sent`, `end`) and then carries out the `Step`s that `poll` hands back until it
//! says `Wait`. Replies are built in a batch the adapter lends to `on_bytes`/`poll`: on
//! `Step::Send` that batch is sealed (and RC4-encrypted where the peer insisted) and the
//! adapter sends it as it is; nothing is handled until `on_sent`. Bytes that arrive in the
//! meantime are kept (the io_uring path keeps receiving), and so are fetch outcomes.
//!
//! Where a connection is, is `State`; which bytes it reads, is `Gate`. No flag beside them.

use std::net::SocketAddr;

use monoio::time::Instant;

use crate::limits;
use crate::server::conn::{Conn, Effect, SessionEnd, WorkerCtx};
use crate::server::mse::{self, FirstBytes, Handshake, HandshakeStep};
use crate::server::send::OutBatch;
use crate::store::{RecordRef, StoreError};
use crate::upstream::shard::{FetchOutcome, ShardCmd};

/// What came back from work done off the core.
enum OffCore {
    Stored(Result<RecordRef, StoreError>),
    PagedIn(Option<RecordRef>),
}

/// What the adapter must do next.
pub enum Step {
    /// Send the lent batch as it is (sealed); call `on_sent` once all of it is written.
    Send,
    /// Start or join the owner shard's fetch of this key (`Upstream::submit`); feed the
    /// outcome to `on_fetch`.
    Fetch([u8; 20]),
    /// Hand `cmd` to the owner shard of `key` (`Upstream::send`).
    Shard { key: [u8; 20], cmd: ShardCmd },
    /// Store this verified info dict off the core (`Upstream::store_off_core`); feed the
    /// result to `on_stored`. Nothing is handled until then.
    Store(Vec<u8>),
    /// Read the record of this key into the page cache off the core (`PageIn::page_in`);
    /// feed the result to `on_paged_in`. Nothing is handled until then.
    PageIn([u8; 20]),
    /// Close the connection; with `flush`, after sending the lent batch (our last MSE
    /// bytes, which tell the peer why). Counted already.
    Close { end: SessionEnd, flush: bool },
    /// Nothing to do until an event: bytes, `deadline()`, a fetch outcome.
    Wait,
}

/// Where the connection is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    /// Events and bytes are handled as they come.
    Ready,
    /// A reply is with the transport (`Step::Send`) until `on_sent`: bytes and events wait.
    /// (Counts as u32: a batch is at most 2 x reqq blocks of 16 KiB; keeps `Link` small.)
    Sending { blocks: u32, payload_bytes: u32 },
    /// A store runs off the core (`Step::Store`) until `on_stored`: bytes and events wait.
    Storing,
    /// A cold record is read in off the core (`Step::PageIn`) until `on_paged_in`: bytes
    /// and events wait.
    PagingIn,
    /// Ended (counted once); the adapter closes and frees.
    Closed,
}

/// Which bytes the connection is reading.
enum Gate {
    /// Too few bytes yet to tell a plaintext handshake from an MSE key.
    Opening,
    /// An MSE handshake runs (boxed: large, and needed once).
    Mse(Box<Handshake>),
    /// The BitTorrent stream in the clear (a plaintext handshake, or MSE that chose it).
    Plain,
    /// The BitTorrent stream under RC4: received bytes are decrypted in place, replies
    /// encrypted into `scratch` on their way out.
    Rc4(Box<Rc4Stream>),
}

struct Rc4Stream {
    cipher: crate::mse::Rc4Pair,
    scratch: OutBatch,
}

impl Gate {
    fn is_open(&self) -> bool {
        matches!(self, Gate::Plain | Gate::Rc4(_))
    }
}

/// What the reads since the last handling said about the peer's burst (`Conn::on_read`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadNews {
    Nothing,
    /// The peer's bytes so far were all there was: it waits for our answers.
    Drained,
    /// More was on its way: the peer's pipelined burst goes on.
    BurstGoesOn,
}

/// How one pass over the input went.
enum Handled {
    Progress,
    Idle,
    Stop(Step),
}

pub struct Pump<'a> {
    conn: Conn<'a>,
    gate: Gate,
    state: State,
    /// Received bytes not handled yet: raw before the gate opens, plaintext after. Empty
    /// (no allocation) when idle.
    input: Vec<u8>,
    news: ReadNews,
    /// The lent batch holds our MSE bytes, which go out as they are (never re-encrypted).
    reply_is_handshake: bool,
    /// Events that came while the connection could not take them, applied in order once
    /// it is `Ready` (a fetch outcome while a reply was out, a due deadline).
    parked_fetch: Option<Box<Option<FetchOutcome>>>,
    /// The result of `Step::Store` or `Step::PageIn` (one field: one at a time, and the
    /// size of every connection stays as it was).
    finished: Option<Box<OffCore>>,
    deadline_due: bool,
}

impl<'a> Pump<'a> {
    /// A connection from `peer`, opened at `now`.
    pub fn new(ctx: &'a WorkerCtx, peer: SocketAddr, now: Instant) -> Pump<'a> {
        Pump {
            conn: Conn::new(ctx, peer, now),
            gate: Gate::Opening,
            state: State::Ready,
            input: Vec::new(),
            news: ReadNews::Nothing,
            reply_is_handshake: false,
            parked_fetch: None,
            finished: None,
            deadline_due: false,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.conn.peer()
    }

    /// What every session on this worker shares.
    pub fn ctx(&self) -> &'a WorkerCtx {
        self.conn.ctx()
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes received and not handled yet.
    pub fn unhandled_bytes(&self) -> usize {
        self.input.len()
    }

    /// Whether a fetch outcome is still wanted (the adapter may drop its waiter otherwise).
    pub fn awaits_fetch(&self) -> bool {
        self.conn.awaits_fetch()
    }

    /// When `on_deadline` is due while `Ready` (the handshake, idle, keep-alive and hold
    /// clocks); far away otherwise: a reply has its write deadline, a store its own end.
    pub fn deadline(&self) -> Instant {
        match self.state {
            State::Ready => self.conn.deadline(),
            _ => far_future(),
        }
    }

    /// Until when a reply sent at `now` may take.
    pub fn write_deadline(&self, now: Instant) -> Instant {
        self.conn.write_deadline(now)
    }

    /// Room the next read should have (a stream adapter reads into its own buffer).
    pub fn read_spare_min(&self) -> usize {
        match self.gate {
            Gate::Opening | Gate::Mse(_) => mse::READ_SPARE_BYTES,
            _ => self.conn.read_spare_min(),
        }
    }

    /// Bytes received: raw from the transport (RC4 is undone here). `more_waits`: the read
    /// filled its buffer or the socket holds more, so the peer's burst goes on. Handled
    /// in place as far as they go, the rest kept; then as `poll`.
    pub fn on_bytes(
        &mut self,
        fresh: &mut [u8],
        more_waits: bool,
        now: Instant,
        out: &mut OutBatch,
    ) -> Step {
        if self.state == State::Closed || fresh.is_empty() {
            return self.poll(now, out);
        }
        if self.input.len() + fresh.len() > limits::UNHANDLED_BYTES_MAX {
            self.conn.ctx().stats.protocol_errors.inc();
            tracing::debug!(peer = %self.peer(), "closed: sends without reading");
            return self.close(SessionEnd::ProtocolError, false);
        }
        if let Gate::Rc4(rc4) = &mut self.gate {
            rc4.cipher.decrypt_in_place(fresh);
        }
        // Bytes sent while our reply was out: the peer did not wait for our answers.
        let goes_on = more_waits || self.state != State::Ready;
        self.news = match (self.news, goes_on) {
            (ReadNews::BurstGoesOn, _) | (_, true) => ReadNews::BurstGoesOn,
            _ => ReadNews::Drained,
        };
        if matches!(self.gate, Gate::Opening)
            && self.input.is_empty()
            && mse::first_bytes(fresh) == FirstBytes::Plaintext
        {
            // The common first read: a whole plaintext prefix decides at once.
            self.gate = Gate::Plain;
        }
        let mut rest: &[u8] = fresh;
        if self.can_handle_in_place(out) {
            // Nothing waits before these bytes: handle them where they lie, and keep only
            // what is left (a partial frame, or what follows our handshake's reply).
            self.tell_news();
            let consumed = self.conn.on_bytes(rest, now, out);
            rest = &rest[consumed..];
        }
        self.input.extend_from_slice(rest);
        self.poll(now, out)
    }

    fn can_handle_in_place(&self, out: &OutBatch) -> bool {
        self.state == State::Ready
            && self.gate.is_open()
            && self.input.is_empty()
            && out.is_empty()
            && self.parked_fetch.is_none()
            && self.finished.is_none()
            && !self.deadline_due
    }

    /// The fetch this connection waits for ended (`None`: its shard went away).
    pub fn on_fetch(&mut self, outcome: Option<FetchOutcome>) {
        if self.state != State::Closed {
            self.parked_fetch = Some(Box::new(outcome));
        }
    }

    /// The result of `Step::Store`.
    pub fn on_stored(&mut self, stored: Result<RecordRef, StoreError>) {
        if self.state == State::Storing {
            self.state = State::Ready;
            self.finished = Some(Box::new(OffCore::Stored(stored)));
        }
    }

    /// The result of `Step::PageIn` (`None`: not stored after all).
    pub fn on_paged_in(&mut self, record: Option<RecordRef>) {
        if self.state == State::PagingIn {
            self.state = State::Ready;
            self.finished = Some(Box::new(OffCore::PagedIn(record)));
        }
    }

    /// `deadline()` came.
    pub fn on_deadline(&mut self) {
        if self.state == State::Ready {
            self.deadline_due = true;
        }
    }

    /// The batch of `Step::Send` is all written, at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        if let State::Sending {
            blocks,
            payload_bytes,
        } = self.state
        {
            self.conn
                .on_sent(now, blocks as usize, payload_bytes as usize);
            self.state = State::Ready;
        }
    }

    /// The transport ended the connection (EOF, an I/O error, a write deadline). Counted
    /// once: false if it had ended already.
    pub fn end(&mut self, end: SessionEnd) -> bool {
        if self.state == State::Closed {
            return false;
        }
        self.state = State::Closed;
        self.count(end);
        true
    }

    /// The next thing to do. `out` is the batch replies are built in; the adapter keeps
    /// lending the same one until it is sent.
    pub fn poll(&mut self, now: Instant, out: &mut OutBatch) -> Step {
        let mut idle = false;
        loop {
            if self.state != State::Ready {
                return Step::Wait;
            }
            // 1. What the protocol asked for, in order.
            if let Some(effect) = self.conn.poll_effect() {
                return match effect {
                    Effect::Fetch(key) => Step::Fetch(key),
                    Effect::Shard(cmd) => Step::Shard {
                        key: *self.conn.key(),
                        cmd,
                    },
                    Effect::Store(info) => {
                        self.state = State::Storing;
                        Step::Store(info)
                    }
                    Effect::PageIn(key) => {
                        self.state = State::PagingIn;
                        Step::PageIn(key)
                    }
                    Effect::Close(end) => self.close(end, false),
                };
            }
            // 2. Events that waited for `Ready`.
            if let Some(finished) = self.finished.take() {
                match *finished {
                    OffCore::Stored(stored) => self.conn.on_stored(stored, out),
                    OffCore::PagedIn(record) => self.conn.on_paged_in(record, now, out),
                }
                idle = false;
                continue;
            }
            if let Some(outcome) = self.parked_fetch.take() {
                self.conn.on_fetch(*outcome, out);
                idle = false;
                continue;
            }
            if std::mem::take(&mut self.deadline_due) {
                self.conn.on_deadline(now, out);
                idle = false;
                continue;
            }
            // 3. A reply goes out before anything else is handled.
            if !out.is_empty() {
                return self.send(out);
            }
            if idle {
                if self.input.is_empty() && self.input.capacity() > 0 {
                    // An idle connection keeps no allocation.
                    self.input = Vec::new();
                }
                return Step::Wait;
            }
            // 4. The input: through the gate, then the protocol.
            match self.handle_input(now, out) {
                Handled::Progress => {}
                // Once more round: its effects (a close, say) run and its reply goes out.
                Handled::Idle => idle = true,
                Handled::Stop(step) => return step,
            }
        }
    }

    fn handle_input(&mut self, now: Instant, out: &mut OutBatch) -> Handled {
        let ctx = self.conn.ctx();
        match &mut self.gate {
            Gate::Opening => match mse::first_bytes(&self.input) {
                FirstBytes::TooFew => Handled::Idle,
                FirstBytes::Plaintext => {
                    self.gate = Gate::Plain;
                    Handled::Progress
                }
                FirstBytes::Encrypted => match Handshake::start(ctx, self.conn.peer()) {
                    Ok(h) => {
                        self.gate = Gate::Mse(Box::new(h));
                        Handled::Progress
                    }
                    Err(why) => {
                        tracing::debug!(peer = %self.peer(), "MSE refused: {why}");
                        Handled::Stop(self.close(SessionEnd::IoError, false))
                    }
                },
            },
            Gate::Mse(handshake) => {
                let step = handshake.on_bytes(ctx, &self.input, out.head());
                self.reply_is_handshake = !out.is_empty();
                match step {
                    Err(why) => {
                        // What we wrote (our key, say) goes out before the close.
                        tracing::debug!(peer = %self.peer(), "{why}");
                        let flush = !out.is_empty();
                        if flush {
                            out.seal();
                        }
                        Handled::Stop(self.close(SessionEnd::IoError, flush))
                    }
                    Ok(HandshakeStep::NeedMore { consumed }) => {
                        self.input.drain(..consumed);
                        if consumed > 0 || !out.is_empty() {
                            Handled::Progress
                        } else {
                            Handled::Idle
                        }
                    }
                    Ok(HandshakeStep::Done {
                        consumed,
                        rc4,
                        initial_payload,
                        proven,
                    }) => {
                        let mut rest = self.input.split_off(consumed);
                        self.gate = match rc4 {
                            Some(mut cipher) => {
                                cipher.decrypt_in_place(&mut rest);
                                Gate::Rc4(Box::new(Rc4Stream {
                                    cipher,
                                    scratch: OutBatch::new(),
                                }))
                            }
                            None => Gate::Plain,
                        };
                        self.input = initial_payload;
                        self.input.extend_from_slice(&rest);
                        // The BitTorrent handshake must name the torrent req2 proved.
                        self.conn.bind_to(proven);
                        Handled::Progress
                    }
                }
            }
            Gate::Plain | Gate::Rc4(_) => {
                if self.input.is_empty() {
                    return Handled::Idle;
                }
                self.tell_news();
                let consumed = self.conn.on_bytes(&self.input, now, out);
                self.input.drain(..consumed);
                if consumed == 0 {
                    Handled::Idle
                } else {
                    Handled::Progress
                }
            }
        }
    }

    fn tell_news(&mut self) {
        match std::mem::replace(&mut self.news, ReadNews::Nothing) {
            ReadNews::Nothing => {}
            ReadNews::Drained => self.conn.on_read(false),
            ReadNews::BurstGoesOn => self.conn.on_read(true),
        }
    }

    /// Seals the batch (encrypting it under RC4 unless it is our MSE handshake) and hands
    /// it to the adapter.
    fn send(&mut self, out: &mut OutBatch) -> Step {
        let (blocks, payload_bytes) = (out.blocks() as u32, out.payload_bytes() as u32);
        let raw = std::mem::take(&mut self.reply_is_handshake);
        if let (Gate::Rc4(rc4), false) = (&mut self.gate, raw) {
            mse::encrypt_batch(self.conn.ctx(), &mut rc4.cipher, out, &mut rc4.scratch);
            std::mem::swap(out, &mut rc4.scratch);
        }
        out.seal();
        self.state = State::Sending {
            blocks,
            payload_bytes,
        };
        Step::Send
    }

    fn close(&mut self, end: SessionEnd, flush: bool) -> Step {
        self.state = State::Closed;
        self.count(end);
        self.input = Vec::new();
        self.reply_is_handshake = false;
        Step::Close { end, flush }
    }

    fn count(&self, end: SessionEnd) {
        let stats = &self.conn.ctx().stats;
        end.counter(stats).inc();
        tracing::debug!(peer = %self.peer(), ?end, "session ended");
    }
}

/// "Never" for a deadline (a day: sleeps and timer heaps take it as is).
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    //! The pump without a transport: bytes in, steps out, as an adapter would see them.

    use super::*;
    use crate::server::conn::tests::*;
    use crate::wire::HANDSHAKE_LEN;

    fn peer() -> SocketAddr {
        PEER.parse().unwrap()
    }

    /// The batch of a `Step::Send` as the peer receives it, then `on_sent`.
    fn sent(pump: &mut Pump<'_>, out: &mut OutBatch, now: Instant) -> Vec<u8> {
        assert!(matches!(pump.state(), State::Sending { .. }));
        let bytes = wire(out);
        pump.on_sent(now);
        bytes
    }

    #[test]
    fn a_hit_is_answered_and_bytes_that_come_while_a_reply_is_out_wait_for_it() {
        let kit = kit(250, 0);
        let info = crate::metainfo::synthetic_v1_info(2000); // 3 metadata pieces
        let key = key_of(&info);
        store(&kit, &info);
        let now = Instant::now();
        let mut pump = Pump::new(&kit.ctx, peer(), now);
        let mut out = OutBatch::new();
        let mut first = opening(&key, [0]);
        // Our handshake goes out first, with the extension handshake (a hit).
        assert!(matches!(
            pump.on_bytes(&mut first, false, now, &mut out),
            Step::Send
        ));
        let bytes = sent(&mut pump, &mut out, now);
        assert_eq!(&bytes[28..48], &key, "the handshake echoes the key");
        assert_eq!(
            messages(&bytes[HANDSHAKE_LEN..], Some(&info)),
            [ext(false, Some(info.len()), 250)]
        );
        // Request 0 was kept; the next reply carries it.
        assert!(matches!(pump.poll(now, &mut out), Step::Send));
        // While that reply is out, more requests arrive: kept, not handled.
        let mut more = requests([1, 2]);
        assert!(matches!(
            pump.on_bytes(&mut more, false, now, &mut out),
            Step::Wait
        ));
        assert_eq!(pump.unhandled_bytes(), more.len());
        assert_eq!(
            messages(&sent(&mut pump, &mut out, now), Some(&info)),
            [Msg::Data(0)]
        );
        assert!(matches!(pump.poll(now, &mut out), Step::Send));
        assert_eq!(
            messages(&sent(&mut pump, &mut out, now), Some(&info)),
            [Msg::Data(1), Msg::Data(2)]
        );
        assert!(matches!(pump.poll(now, &mut out), Step::Wait));
        assert_eq!(pump.unhandled_bytes(), 0);
    }

    #[test]
    fn a_fetch_outcome_that_comes_while_a_reply_is_out_is_applied_after_it() {
        let kit = kit(250, 0);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let key = key_of(&info);
        let now = Instant::now();
        let mut pump = Pump::new(&kit.ctx, peer(), now);
        let mut out = OutBatch::new();
        let mut first = opening(&key, [0]);
        assert!(
            matches!(pump.on_bytes(&mut first, false, now, &mut out), Step::Fetch(k) if k == key)
        );
        assert!(
            matches!(pump.poll(now, &mut out), Step::Send),
            "our handshake"
        );
        assert!(pump.awaits_fetch());
        // The metadata lands while our handshake is still with the transport.
        let record = store(&kit, &info);
        pump.on_fetch(Some(FetchOutcome::Ready(record)));
        assert!(
            matches!(pump.poll(now, &mut out), Step::Wait),
            "not while sending"
        );
        sent(&mut pump, &mut out, now);
        assert!(matches!(pump.poll(now, &mut out), Step::Send));
        assert_eq!(
            messages(&sent(&mut pump, &mut out, now), Some(&info)),
            [ext(false, Some(info.len()), 250)],
            "the outcome first: the (held) extension handshake with the size"
        );
        // Then the request that waited in the input behind our handshake.
        assert!(matches!(pump.poll(now, &mut out), Step::Send));
        assert_eq!(
            messages(&sent(&mut pump, &mut out, now), Some(&info)),
            [Msg::Data(0)]
        );
        assert!(matches!(pump.poll(now, &mut out), Step::Wait));
    }

    #[test]
    fn an_mse_peer_that_breaks_the_handshake_gets_our_key_then_a_close() {
        let kit = kit(250, 0);
        let now = Instant::now();
        let mut pump = Pump::new(&kit.ctx, peer(), now);
        let mut out = OutBatch::new();
        // A DH key, then more noise than the responder searches for its sync marker.
        let mut noise: Vec<u8> = (0..96 + 700u32).map(|i| (i * 7 + 1) as u8).collect();
        let mut step = pump.on_bytes(&mut noise, false, now, &mut out);
        let mut ours = 0;
        loop {
            match step {
                Step::Send => ours += sent(&mut pump, &mut out, now).len(),
                Step::Close { end, flush } => {
                    if flush {
                        ours += wire(&mut out).len();
                    }
                    assert_eq!(end, SessionEnd::IoError);
                    break;
                }
                _ => panic!("an MSE failure sends our key and closes"),
            }
            step = pump.poll(now, &mut out);
        }
        assert!(
            ours >= 96,
            "our DH key went out before the close ({ours} bytes)"
        );
        assert_eq!(pump.state(), State::Closed);
        assert_eq!(kit.ctx.stats.mse_handshakes_failed.get(), 1);
        assert_eq!(kit.ctx.stats.session_ends_io_error.get(), 1, "counted once");
    }

    #[test]
    fn a_peer_that_sends_without_reading_is_closed_as_a_flood() {
        let kit = kit(250, 0);
        let info = crate::metainfo::synthetic_v1_info(2000);
        let key = key_of(&info);
        store(&kit, &info);
        let now = Instant::now();
        let mut pump = Pump::new(&kit.ctx, peer(), now);
        let mut out = OutBatch::new();
        let mut first = opening(&key, []);
        assert!(matches!(
            pump.on_bytes(&mut first, false, now, &mut out),
            Step::Send
        ));
        // Our reply never completes; the peer keeps sending.
        let mut chunk = requests(std::iter::repeat_n(0, 4096));
        let mut closed = None;
        for _ in 0..crate::limits::UNHANDLED_BYTES_MAX / chunk.len() + 2 {
            if let Step::Close { end, .. } = pump.on_bytes(&mut chunk, true, now, &mut out) {
                closed = Some(end);
                break;
            }
        }
        assert_eq!(closed, Some(SessionEnd::ProtocolError));
        assert!(pump.unhandled_bytes() == 0, "its input is freed");
        assert_eq!(kit.ctx.stats.session_ends_protocol_error.get(), 1);
    }
}
