//! One uTP connection without I/O: packets in (`on_packet`), datagrams out
//! (`poll_transmit`), time in (`on_timeout`, `now` arguments), stream bytes both ways.
//!
//! Numbering, as libtorrent and libutp put it on the wire (BEP 29's diagram differs):
//! - the SYN takes a sequence number (`seq_nr` then increments);
//! - the SYN-ACK is an ST_STATE whose `seq_nr` is the acceptor's *next* number (states
//!   never take one), so the acceptor's first DATA carries the same number; the initiator
//!   sets its `ack_nr` to that number minus 1;
//! - the accepting side learns that the initiator is real (not a spoofed source) when a
//!   packet acks `syn_ack.seq_nr - 1`: until then it sends no more bytes than it received;
//! - a FIN takes a sequence number when we send it; libtorrent's own FIN may not (it sends
//!   its next number without taking it), which is the same on the wire for the receiver.
//!
//! Sent packets are kept as (sequence number, byte range of the outgoing stream); the bytes
//! stay in the caller's chunks until acked, and a retransmission points at them again.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use super::congestion::{Ledbat, RttEstimator};
use super::packet::{
    encode_sack, seq_diff, seq_less, Header, Packet, PacketType, FIRST_EXT_SACK, HEADER_LEN,
    SACK_BYTES_MAX,
};
use super::{Chunk, Transmit, HEADER_BYTES_MAX, PACKET_SLICES_MAX};

/// Out-of-order packets we keep past `ack_nr + 1`: exactly what our largest selective ACK
/// can report (bit 0 is `ack_nr + 2`). Anything further is dropped unacked; with the
/// default window (`reassembly_bytes_max` / 1400 = 187 full packets) an honest sender
/// never gets that far ahead.
pub const REORDER_PACKETS_MAX: usize = 1 + SACK_BYTES_MAX * 8;

/// Slow start begins with this many packets in the window: TCP's initial window (RFC 6928,
/// Linux's default), which our TCP answers already get. A BEP 9 piece is 16 KiB, 12
/// packets: from 10 the first piece leaves in one round trip and a 5-piece dict in three,
/// where libtorrent's one MTU (and our earlier 2) takes four and six. Measured in
/// BENCHMARKS.md "uTP cost". Anti-amplification still holds it to what the peer sent
/// until the peer proves its address.
pub const INITIAL_WINDOW_PACKETS_DEFAULT: usize = 10;

/// After our FIN is acked, the peer has this long to finish its direction (libtorrent
/// answers a FIN with its own at once) before we call the connection closed anyway.
pub const FIN_WAIT_MAX: Duration = Duration::from_secs(10);

/// BEP 29: three duplicate acks (or three later packets selectively acked) mean a packet
/// was lost.
const DUP_ACK_LIMIT: u32 = 3;

/// Settings of one connection. Every cap has its reason beside its default.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest payload in one packet (`PAYLOAD_BYTES_DEFAULT`: one Ethernet MTU).
    pub payload_bytes_max: usize,
    /// Unacked packets we keep; bounds what one connection holds (packet records, chunks
    /// pinned) and the burst after an ack. 192 stays under our own reorder window
    /// (`REORDER_PACKETS_MAX` = 225) so a magnetar receiver keeps all of them.
    pub packets_in_flight_max: usize,
    /// Received bytes the application has not read plus out-of-order bytes; we advertise
    /// what is left as `wnd_size` and drop data past it. 256 KiB: 16 metadata pieces,
    /// ~2.5 MB/s at 100 ms RTT, and a fixed per-connection ceiling against a peer that
    /// sends faster than we read.
    pub reassembly_bytes_max: usize,
    /// Consecutive retransmission timeouts (no ack in between) before `Closed(TimedOut)`.
    /// libtorrent's `utp_num_resends` is 3; one more, because a lost fetch costs a retry
    /// elsewhere: 0.5 + 1 + 2 + 4 + 8 s of back-off with the minimum RTO.
    pub retransmits_max: u32,
    /// SYN retransmissions before `Closed(TimedOut)`: libtorrent's `utp_syn_resends` (2);
    /// with a 1 s initial RTO the SYN goes at 0, 1 and 3 s and we give up at 7 s.
    pub syn_retransmits_max: u32,
    /// Accept side: the peer must ack our SYN-ACK within this, else
    /// `Closed(ConnectTimeout)`. libtorrent sends its SYN once and gives up after ~3–4 s
    /// (docs/protocol-facts.md §13), so an unconfirmed connection older than that is dead or spoofed.
    pub connect_timeout: Duration,
    /// LEDBAT target queuing delay (BEP 29, libtorrent's `utp_target_delay`): 100 ms.
    pub target_delay: Duration,
    /// Slow start's first window, in packets (`INITIAL_WINDOW_PACKETS_DEFAULT`).
    pub initial_window_packets: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            payload_bytes_max: super::PAYLOAD_BYTES_DEFAULT,
            packets_in_flight_max: 192,
            reassembly_bytes_max: 256 * 1024,
            retransmits_max: 4,
            syn_retransmits_max: 2,
            connect_timeout: Duration::from_secs(5),
            target_delay: Duration::from_millis(100),
            initial_window_packets: INITIAL_WINDOW_PACKETS_DEFAULT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Our SYN is out; no SYN-ACK yet.
    SynSent,
    /// We answered a SYN; the peer has not acked our SYN-ACK yet (not established).
    SynReceived,
    /// Established (our FIN may be out: see `is_closed` for the end).
    Connected,
    Closed(CloseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Our FIN was acked and the peer's FIN arrived (or `FIN_WAIT_MAX` passed after ours
    /// was acked).
    Graceful,
    ResetByPeer,
    /// `retransmits_max` (or `syn_retransmits_max`) timeouts in a row.
    TimedOut,
    /// Accept side: no ack of our SYN-ACK within `connect_timeout`.
    ConnectTimeout,
    /// `abort()`.
    Aborted,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Retransmitted packets (timeout and fast retransmit).
    pub retransmits: u64,
    /// Stream bytes sent (first transmissions).
    pub payload_bytes_sent: u64,
    /// Stream bytes accepted (in order or buffered out of order; duplicates not counted).
    pub payload_bytes_received: u64,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Syn,
    /// `len` stream bytes from offset `start`.
    Data {
        start: u64,
        len: u32,
    },
    Fin,
}

/// A packet we sent (or are about to) and that is not cumulatively acked.
#[derive(Clone, Copy, Debug)]
struct Outgoing {
    kind: Kind,
    /// 0 = not sent yet (a queued SYN or FIN).
    transmissions: u32,
    sent_at: Instant,
    /// Acked by a selective ACK: not resent, not in flight.
    sacked: bool,
    /// Declared lost: resend when the window allows; not in flight meanwhile.
    need_resend: bool,
    /// Lost by fast retransmit: goes out ahead of the window, once.
    resend_now: bool,
    /// Fast-retransmitted already since its last timeout: no second fast retransmit.
    fast_resent: bool,
}

impl Outgoing {
    fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Data { len, .. } => len as usize,
            Kind::Syn | Kind::Fin => 0,
        }
    }

    fn in_flight(&self) -> bool {
        self.transmissions > 0 && !self.sacked && !self.need_resend
    }
}

/// What one incoming ack acknowledged, gathered while the send queue is walked and applied
/// at the end (`Connection::settle_ack`).
#[derive(Default)]
struct AckTally {
    /// Bytes in flight before the ack (the congestion controller's view of the window).
    in_flight_before: usize,
    /// Payload bytes newly acked, cumulatively or selectively.
    acked_bytes: usize,
    /// The smallest RTT sample of the ack (packets sent once only: Karn's rule).
    min_rtt: Option<Duration>,
    /// Something was acked: the retransmission timer restarts.
    progress: bool,
    fin_acked: bool,
}

impl AckTally {
    /// `o` is newly acked: its bytes count, and its RTT if it was sent once.
    fn acked(&mut self, o: &Outgoing, rtt: &mut RttEstimator, now: Instant) {
        self.acked_bytes += o.payload_len();
        if o.transmissions == 1 {
            let r = now.saturating_duration_since(o.sent_at);
            rtt.on_sample(r);
            self.min_rtt = Some(self.min_rtt.map_or(r, |m| m.min(r)));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Connect,
    Accept { syn_ack_seq: u16 },
}

/// What `poll_transmit` decided to send.
enum Emit {
    Reset,
    State,
    SynAck,
    Tracked(usize),
}

pub struct Connection<C: Chunk> {
    cfg: Config,
    state: State,
    side: Side,
    established: bool,
    recv_id: u16,
    send_id: u16,
    epoch: Instant,
    created: Instant,
    /// The last clock reading turned into a timestamp, and the timestamp: a burst's packets
    /// share one `now`, so each packet after the first skips the conversion.
    clock: (Instant, u32),

    // Send side.
    /// Next sequence number to assign.
    seq_nr: u16,
    /// Every packet up to this one is acked.
    acked_seq_nr: u16,
    /// `out[i]` has sequence number `acked_seq_nr + 1 + i`.
    out: VecDeque<Outgoing>,
    /// Every `out[i]` with `i` below this is sent and not declared lost: `next_send`
    /// looks for queued or lost packets from here, not from the front (a burst of n
    /// packets would otherwise scan n²/2 entries). Lowered wherever a packet is queued
    /// unsent or declared lost, shifted when the front is acked.
    unsent_or_lost_from: usize,
    in_flight_bytes: usize,
    /// Written chunks with the stream offset of their first byte; dropped once acked.
    chunks: VecDeque<(u64, C)>,
    /// Stream bytes written so far.
    written: u64,
    /// First stream byte not yet put in a packet.
    next_unsent: u64,
    /// Every stream byte before this is acked.
    acked_offset: u64,
    fin_requested: bool,
    fin_queued: bool,
    /// When our FIN was acked (we wait for the peer's until `FIN_WAIT_MAX` after).
    fin_acked_at: Option<Instant>,
    dup_acks: u32,
    /// Packets in `out` selectively acked: below `DUP_ACK_LIMIT`, no packet can count as
    /// lost by SACK, and an ack skips the walk over the send queue (`detect_loss`).
    sacked_packets: u32,
    /// A loss of a packet up to this number does not cut the window again.
    loss_seq: u16,
    peer_wnd: usize,
    cc: Ledbat,
    rtt: RttEstimator,
    rto_deadline: Option<Instant>,
    consecutive_timeouts: u32,
    /// After a timeout: one packet may go regardless of the windows.
    probe_allowed: bool,

    // Receive side.
    /// Last in-order sequence number received.
    ack_nr: u16,
    recv_buf: Vec<u8>,
    recv_read: usize,
    /// `ooo[i]` holds sequence number `ack_nr + 2 + i` (SACK bit i).
    ooo: VecDeque<Option<Vec<u8>>>,
    ooo_bytes: usize,
    eof_seq: Option<u16>,
    read_closed: bool,
    /// Our clock minus the peer's timestamp of its last packet (BEP 29 `reply_micro`).
    reply_micro: u32,
    ack_pending: bool,
    syn_ack_pending: bool,
    reset_pending: bool,
    last_wnd_sent: u32,

    /// Anti-amplification: bytes the peer sent us and we sent it.
    bytes_in: u64,
    bytes_out: u64,
    stats: ConnStats,
}

impl<C: Chunk> Connection<C> {
    fn new(cfg: Config, side: Side, recv_id: u16, send_id: u16, seq_nr: u16, now: Instant) -> Self {
        let cc = Ledbat::new(
            cfg.payload_bytes_max,
            cfg.initial_window_packets
                .clamp(1, cfg.packets_in_flight_max.max(1)),
            cfg.packets_in_flight_max * cfg.payload_bytes_max,
            cfg.target_delay,
        );
        Connection {
            state: State::SynSent,
            side,
            established: false,
            recv_id,
            send_id,
            epoch: now,
            // `now` is the epoch: timestamp 1 (0 would mean "none").
            clock: (now, 1),
            created: now,
            seq_nr,
            acked_seq_nr: seq_nr.wrapping_sub(1),
            out: VecDeque::new(),
            unsent_or_lost_from: 0,
            in_flight_bytes: 0,
            chunks: VecDeque::new(),
            written: 0,
            next_unsent: 0,
            acked_offset: 0,
            fin_requested: false,
            fin_queued: false,
            fin_acked_at: None,
            dup_acks: 0,
            sacked_packets: 0,
            loss_seq: seq_nr.wrapping_sub(1),
            // Unknown until the peer's first packet after its SYN (libtorrent's SYN says
            // 0): the congestion window bounds us meanwhile.
            peer_wnd: usize::MAX,
            cc,
            rtt: RttEstimator::default(),
            rto_deadline: None,
            consecutive_timeouts: 0,
            probe_allowed: false,
            ack_nr: 0,
            recv_buf: Vec::new(),
            recv_read: 0,
            ooo: VecDeque::new(),
            ooo_bytes: 0,
            eof_seq: None,
            read_closed: false,
            reply_micro: 0,
            ack_pending: false,
            syn_ack_pending: false,
            reset_pending: false,
            last_wnd_sent: 0,
            bytes_in: 0,
            bytes_out: 0,
            stats: ConnStats::default(),
            cfg,
        }
    }

    /// Outgoing: first transmit is the SYN (we receive on recv_id, send with recv_id + 1).
    pub fn connect(cfg: Config, recv_id: u16, seq_nr: u16, now: Instant) -> Self {
        let mut c = Self::new(
            cfg,
            Side::Connect,
            recv_id,
            recv_id.wrapping_add(1),
            seq_nr,
            now,
        );
        c.out.push_back(Outgoing {
            kind: Kind::Syn,
            transmissions: 0,
            sent_at: now,
            sacked: false,
            need_resend: false,
            resend_now: false,
            fast_resent: false,
        });
        c.seq_nr = seq_nr.wrapping_add(1);
        c
    }

    /// Incoming, from a SYN (we receive on syn.connection_id + 1, send with
    /// syn.connection_id); queues the SYN-ACK (ST_STATE).
    pub fn accept(cfg: Config, syn: &Packet<'_>, seq_nr: u16, now: Instant) -> Self {
        let id = syn.header.connection_id;
        let mut c = Self::new(
            cfg,
            Side::Accept {
                syn_ack_seq: seq_nr,
            },
            id.wrapping_add(1),
            id,
            seq_nr,
            now,
        );
        c.state = State::SynReceived;
        c.ack_nr = syn.header.seq_nr;
        c.bytes_in = syn.wire_len_min() as u64;
        c.syn_ack_pending = true;
        c.note_timestamp(&syn.header, now);
        c.stats.packets_received = 1;
        c
    }

    pub fn recv_id(&self) -> u16 {
        self.recv_id
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Established: for an accepted connection, the peer has acked our SYN-ACK.
    pub fn is_established(&self) -> bool {
        self.established
    }

    pub fn stats(&self) -> &ConnStats {
        &self.stats
    }

    /// In-order received stream bytes not consumed yet.
    pub fn readable(&self) -> &[u8] {
        &self.recv_buf[self.recv_read..]
    }

    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.recv_buf.len() - self.recv_read);
        self.recv_read += n;
        if self.recv_read == self.recv_buf.len() {
            self.recv_buf.clear();
            self.recv_read = 0;
        } else if self.recv_read >= 64 * 1024 && self.recv_read * 2 >= self.recv_buf.len() {
            self.recv_buf.drain(..self.recv_read);
            self.recv_read = 0;
        }
        // The window reopened from under one packet: tell the sender, or it waits for its
        // timeout to probe.
        let mss = self.cfg.payload_bytes_max as u32;
        if self.last_wnd_sent < mss && self.wnd_free() >= mss && !self.is_closed() {
            self.ack_pending = true;
        }
    }

    /// The peer sent FIN and every byte before it is in `readable` (or consumed).
    pub fn is_read_closed(&self) -> bool {
        self.read_closed
    }

    /// Appends a chunk to the outgoing stream; it is kept (and retransmissions point at it
    /// again) until acked. Ignored after `close` or once closed.
    pub fn write(&mut self, chunk: C) {
        if self.fin_requested || self.is_closed() || chunk.is_empty() {
            return;
        }
        let len = chunk.len() as u64;
        self.chunks.push_back((self.written, chunk));
        self.written += len;
    }

    /// Our FIN was acked: the peer has everything we wrote.
    pub fn is_fin_acked(&self) -> bool {
        self.fin_acked_at.is_some()
    }

    /// Written bytes not yet acked.
    pub fn send_backlog_bytes(&self) -> usize {
        (self.written - self.acked_offset) as usize
    }

    /// FIN after everything written.
    pub fn close(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        if self.state == State::SynSent && self.out.front().is_some_and(|o| o.transmissions == 0) {
            // Nothing ever left: nothing to tell the peer.
            self.state = State::Closed(CloseReason::Graceful);
            return;
        }
        self.fin_requested = true;
    }

    /// Queue a RESET and become Closed(Aborted) once it is transmitted.
    pub fn abort(&mut self) {
        if !self.is_closed() {
            self.reset_pending = true;
        }
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let connect = match self.side {
            Side::Accept { .. } if !self.established => {
                Some(self.created + self.cfg.connect_timeout)
            }
            _ => None,
        };
        let fin_wait = self.fin_acked_at.map(|t| t + FIN_WAIT_MAX);
        [self.rto_deadline, connect, fin_wait]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn on_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if matches!(self.side, Side::Accept { .. })
            && !self.established
            && now >= self.created + self.cfg.connect_timeout
        {
            self.close_with(CloseReason::ConnectTimeout);
            return;
        }
        if self.fin_acked_at.is_some_and(|t| now >= t + FIN_WAIT_MAX) {
            self.close_with(CloseReason::Graceful);
            return;
        }
        let Some(deadline) = self.rto_deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.rto_deadline = None;
        if !self.out.iter().any(|o| o.transmissions > 0 && !o.sacked) {
            // Nothing outstanding: the timer was held for a peer window too small for our
            // next packet. Probe with one packet.
            self.probe_allowed = true;
            return;
        }
        self.consecutive_timeouts += 1;
        let limit = if self.state == State::SynSent {
            self.cfg.syn_retransmits_max
        } else {
            self.cfg.retransmits_max
        };
        if self.consecutive_timeouts > limit {
            self.close_with(CloseReason::TimedOut);
            return;
        }
        self.cc.on_timeout();
        // Packets sent before now were all lost with this timeout: no further cuts for them.
        self.loss_seq = self.seq_nr.wrapping_sub(1);
        self.unsent_or_lost_from = 0;
        for o in self.out.iter_mut() {
            if o.transmissions > 0 && !o.sacked {
                o.need_resend = true;
                o.resend_now = false;
                o.fast_resent = false;
            }
        }
        self.in_flight_bytes = 0;
        self.probe_allowed = true;
        self.dup_acks = 0;
        self.rto_deadline = Some(now + self.rtt.rto(self.consecutive_timeouts));
    }

    fn close_with(&mut self, reason: CloseReason) {
        self.state = State::Closed(reason);
        self.rto_deadline = None;
        self.syn_ack_pending = false;
        if reason != CloseReason::Graceful {
            self.ack_pending = false;
        }
    }

    fn now_us(&mut self, now: Instant) -> u32 {
        let (at, us) = self.clock;
        if at == now {
            return us;
        }
        // 0 means "no timestamp" to libtorrent.
        let us = (now.saturating_duration_since(self.epoch).as_micros() as u32).max(1);
        self.clock = (now, us);
        us
    }

    fn note_timestamp(&mut self, h: &Header, now: Instant) {
        if h.timestamp_us != 0 {
            self.reply_micro = self.now_us(now).wrapping_sub(h.timestamp_us);
        }
    }

    fn wnd_free(&self) -> u32 {
        let used = self.recv_buf.len() - self.recv_read + self.ooo_bytes;
        self.cfg.reassembly_bytes_max.saturating_sub(used) as u32
    }

    /// A packet the caller demultiplexed to this connection (its connection_id == recv_id;
    /// a retransmitted SYN (connection_id == recv_id - 1) re-queues the SYN-ACK).
    pub fn on_packet(&mut self, pkt: &Packet<'_>, now: Instant) {
        if self.is_closed() {
            return;
        }
        let h = pkt.header;
        if h.ty == PacketType::Syn {
            // The initiator did not get our SYN-ACK: answer again (one per SYN received,
            // so the budget below stays even).
            if self.state == State::SynReceived
                && h.connection_id == self.send_id
                && h.seq_nr == self.ack_nr
            {
                self.bytes_in += pkt.wire_len_min() as u64;
                self.syn_ack_pending = true;
            }
            return;
        }
        if h.connection_id != self.recv_id {
            return;
        }
        let mut ack_nr = h.ack_nr;
        let last_sent = self.seq_nr.wrapping_sub(1);
        if h.ty == PacketType::Reset && ack_nr == self.seq_nr && self.state != State::SynSent {
            // A RESET answering one of our ST_STATEs acks its `seq_nr`, our next number.
            ack_nr = last_sent;
        }
        if let Side::Accept { syn_ack_seq } = self.side {
            if !self.established {
                // BEP 29's diagram has the initiator ack the SYN-ACK's own number; libtorrent
                // and libutp ack one less. Take both.
                if ack_nr == syn_ack_seq && self.seq_nr == syn_ack_seq {
                    ack_nr = last_sent;
                }
                if seq_less(ack_nr, syn_ack_seq.wrapping_sub(1)) || seq_less(last_sent, ack_nr) {
                    return; // not from whoever got our SYN-ACK
                }
            }
        }
        // Acks of packets we never sent are forged or broken; so are acks from far
        // behind what the peer already acked.
        let ack_behind_max = (2 * self.cfg.packets_in_flight_max).min(16 * 1024) as i32;
        if seq_less(last_sent, ack_nr)
            || i32::from(seq_diff(self.acked_seq_nr, ack_nr)) > ack_behind_max
        {
            return;
        }
        if self.state == State::SynSent {
            // Only the ack of our SYN opens the connection.
            if ack_nr != self.acked_seq_nr.wrapping_add(1) {
                return;
            }
            if h.ty == PacketType::Reset {
                self.close_with(CloseReason::ResetByPeer);
                return;
            }
            self.state = State::Connected;
            self.established = true;
            // The SYN-ACK carries the number of the peer's first DATA.
            self.ack_nr = h.seq_nr.wrapping_sub(1);
            // Ack it even with nothing to say: an anti-amplifying acceptor waits for it.
            self.ack_pending = true;
        }
        if h.ty == PacketType::Reset {
            self.close_with(CloseReason::ResetByPeer);
            return;
        }
        if self.state == State::SynReceived {
            self.state = State::Connected;
            self.established = true;
            self.syn_ack_pending = false;
        }
        self.bytes_in += pkt.wire_len_min() as u64;
        self.stats.packets_received += 1;
        self.note_timestamp(&h, now);
        // libtorrent works around uTorrent sending INT_MAX for "no sample".
        if h.timestamp_diff_us != i32::MAX as u32 {
            self.cc.on_delay_sample(h.timestamp_diff_us, now);
        }
        self.peer_wnd = h.wnd_size as usize;
        self.on_ack(ack_nr, h.ty, pkt.sack, now);
        if self.is_closed() {
            return;
        }
        match h.ty {
            PacketType::Data => self.on_data(h.seq_nr, pkt.payload, false),
            PacketType::Fin => self.on_data(h.seq_nr, pkt.payload, true),
            _ => {}
        }
        self.maybe_closed_gracefully();
    }

    fn mark_lost(&mut self, idx: usize, now_fast: bool) {
        self.unsent_or_lost_from = self.unsent_or_lost_from.min(idx);
        let o = &mut self.out[idx];
        if o.in_flight() {
            self.in_flight_bytes -= o.payload_len();
        }
        o.need_resend = true;
        if now_fast {
            o.resend_now = true;
            o.fast_resent = true;
        }
    }

    fn on_ack(&mut self, ack_nr: u16, ty: PacketType, sack: Option<&[u8]>, now: Instant) {
        let mut tally = AckTally {
            in_flight_before: self.in_flight_bytes,
            ..AckTally::default()
        };
        let newly = seq_diff(ack_nr, self.acked_seq_nr);
        if newly > 0 {
            self.take_cumulative_ack(ack_nr, newly as u16, &mut tally, now);
        } else if newly == 0 && ty == PacketType::State && self.out.iter().any(Outgoing::in_flight)
        {
            self.dup_acks += 1;
        }
        if let (Some(mask), true) = (sack, newly >= 0) {
            self.take_selective_ack(mask, &mut tally, now);
        }
        self.detect_loss(now);
        self.settle_ack(tally, now);
    }

    /// Every packet up to `ack_nr` (`newly` of them) is acked: off the send queue.
    fn take_cumulative_ack(&mut self, ack_nr: u16, newly: u16, tally: &mut AckTally, now: Instant) {
        for _ in 0..newly {
            let o = self.out.pop_front().expect("ack_nr checked against seq_nr");
            if o.in_flight() {
                self.in_flight_bytes -= o.payload_len();
            }
            if o.sacked {
                self.sacked_packets -= 1;
            } else {
                tally.acked(&o, &mut self.rtt, now);
            }
            tally.fin_acked |= o.kind == Kind::Fin;
        }
        self.unsent_or_lost_from = self.unsent_or_lost_from.saturating_sub(newly as usize);
        self.acked_seq_nr = ack_nr;
        self.dup_acks = 0;
        tally.progress = true;
        if seq_less(self.loss_seq, self.acked_seq_nr) {
            self.loss_seq = self.acked_seq_nr;
        }
        self.release_acked_chunks();
    }

    /// The selective ack's bits: bit i acks `ack_nr + 2 + i`, which is `out[i + 1]`. Bits
    /// past what we sent are ignored.
    fn take_selective_ack(&mut self, mask: &[u8], tally: &mut AckTally, now: Instant) {
        let bits = (mask.len() * 8).min(self.out.len().saturating_sub(1));
        for i in 0..bits {
            if mask[i / 8] & (1 << (i % 8)) == 0 {
                continue;
            }
            let o = &mut self.out[i + 1];
            if o.sacked || o.transmissions == 0 {
                continue;
            }
            if o.in_flight() {
                self.in_flight_bytes -= o.payload_len();
            }
            o.sacked = true;
            self.sacked_packets += 1;
            o.need_resend = false;
            o.resend_now = false;
            let o = *o;
            tally.acked(&o, &mut self.rtt, now);
            tally.progress = true;
        }
    }

    /// Loss: a packet with DUP_ACK_LIMIT later packets selectively acked, or the oldest
    /// after DUP_ACK_LIMIT duplicate acks. The window is cut once per window: only a packet
    /// sent after the last cut cuts again.
    fn detect_loss(&mut self, now: Instant) {
        let mut lost_first: Option<u16> = None;
        debug_assert_eq!(
            self.sacked_packets as usize,
            self.out.iter().filter(|o| o.sacked).count()
        );
        if self.sacked_packets >= DUP_ACK_LIMIT {
            let mut later = 0;
            for idx in (0..self.out.len()).rev() {
                let o = &self.out[idx];
                if o.sacked {
                    later += 1;
                } else if later >= DUP_ACK_LIMIT && o.in_flight() && !o.fast_resent {
                    self.mark_lost(idx, true);
                    lost_first = Some(self.acked_seq_nr.wrapping_add(1 + idx as u16));
                }
            }
        }
        if self.dup_acks >= DUP_ACK_LIMIT {
            if let Some(o) = self.out.front() {
                if o.in_flight() && !o.fast_resent {
                    self.mark_lost(0, true);
                    lost_first = Some(self.acked_seq_nr.wrapping_add(1));
                }
            }
            self.dup_acks = 0;
        }
        if let Some(seq) = lost_first {
            if seq_less(self.loss_seq, seq) && self.cc.on_loss(now) {
                self.loss_seq = self.seq_nr.wrapping_sub(1);
            }
        }
    }

    /// What an ack that moved something changes: the retransmission timer, the congestion
    /// window, a graceful close.
    fn settle_ack(&mut self, tally: AckTally, now: Instant) {
        if tally.progress {
            self.consecutive_timeouts = 0;
            self.stats.rtt = self.rtt.smoothed();
            self.rto_deadline = self
                .out
                .iter()
                .any(|o| o.transmissions > 0 && !o.sacked)
                .then(|| now + self.rtt.rto(0));
        }
        if tally.acked_bytes > 0 {
            self.cc.on_ack(
                tally.acked_bytes,
                tally.in_flight_before,
                self.in_flight_bytes,
                tally.min_rtt,
            );
        }
        if tally.fin_acked {
            self.fin_acked_at = Some(now);
        }
        self.maybe_closed_gracefully();
    }

    /// Both directions are done: our FIN is acked and the peer's arrived.
    fn maybe_closed_gracefully(&mut self) {
        if self.fin_acked_at.is_some() && self.read_closed && !self.is_closed() {
            self.close_with(CloseReason::Graceful);
        }
    }

    /// Drops chunks every byte of which is acked.
    fn release_acked_chunks(&mut self) {
        self.acked_offset = self
            .out
            .iter()
            .find_map(|o| match o.kind {
                Kind::Data { start, .. } => Some(start),
                _ => None,
            })
            .unwrap_or(self.next_unsent);
        while let Some((start, c)) = self.chunks.front() {
            if start + c.len() as u64 > self.acked_offset {
                break;
            }
            self.chunks.pop_front();
        }
    }

    fn on_data(&mut self, seq: u16, payload: &[u8], fin: bool) {
        // Every DATA or FIN is answered, duplicates included (our last ack may be lost).
        self.ack_pending = true;
        if self.read_closed {
            return;
        }
        if let Some(eof) = self.eof_seq {
            if seq_less(eof, seq) || (seq == eof && !fin) {
                return;
            }
        }
        let d = seq_diff(seq, self.ack_nr);
        if d <= 0 || d as usize > REORDER_PACKETS_MAX {
            return; // already have it, or too far ahead to keep
        }
        if payload.len() > self.wnd_free() as usize {
            return; // past our window: the sender retransmits when we have room
        }
        if fin {
            self.eof_seq = Some(seq);
        }
        if d == 1 {
            self.stats.payload_bytes_received += payload.len() as u64;
            self.deliver(seq, payload);
            while !self.read_closed {
                match self.ooo.pop_front() {
                    Some(Some(p)) => {
                        self.ooo_bytes -= p.len();
                        let next = self.ack_nr.wrapping_add(1);
                        self.deliver(next, &p);
                    }
                    _ => break,
                }
            }
        } else {
            let idx = d as usize - 2;
            if self.ooo.len() <= idx {
                self.ooo.resize(idx + 1, None);
            }
            if self.ooo[idx].is_none() {
                self.ooo_bytes += payload.len();
                self.stats.payload_bytes_received += payload.len() as u64;
                self.ooo[idx] = Some(payload.to_vec());
            }
        }
    }

    /// `seq` is `ack_nr + 1`: its payload joins the readable stream.
    fn deliver(&mut self, seq: u16, payload: &[u8]) {
        self.recv_buf.extend_from_slice(payload);
        self.ack_nr = seq;
        if self.eof_seq == Some(seq) {
            self.read_closed = true;
            self.ooo.clear();
            self.ooo_bytes = 0;
        }
    }

    fn sack_mask(&self, mask: &mut [u8; SACK_BYTES_MAX]) -> usize {
        if !self.ooo.iter().any(Option::is_some) {
            return 0;
        }
        let bits = self.ooo.len().min(SACK_BYTES_MAX * 8);
        let bytes = bits.div_ceil(32) * 4;
        mask[..bytes].fill(0);
        for (i, slot) in self.ooo.iter().take(bits).enumerate() {
            if slot.is_some() {
                mask[i / 8] |= 1 << (i % 8);
            }
        }
        bytes
    }

    /// Bytes of the next new DATA packet from `next_unsent`: at most `payload_bytes_max`
    /// and `PACKET_SLICES_MAX` contiguous runs.
    fn next_data_len(&self) -> usize {
        let max = (self.written - self.next_unsent).min(self.cfg.payload_bytes_max as u64) as usize;
        let mut slices = [IoSlice::new(&[]); PACKET_SLICES_MAX];
        let (_, len) = self.fill_slices(self.next_unsent, max, &mut slices);
        len
    }

    /// Points `slices` at the stream bytes `[start, start + max)`, stopping early after
    /// `PACKET_SLICES_MAX` runs. Returns (slices used, bytes).
    fn fill_slices<'a>(
        &'a self,
        start: u64,
        max: usize,
        slices: &mut [IoSlice<'a>; PACKET_SLICES_MAX],
    ) -> (usize, usize) {
        let mut idx = self
            .chunks
            .partition_point(|(s, c)| s + c.len() as u64 <= start);
        let mut pos = start;
        let mut n = 0;
        let mut total = 0;
        while total < max && n < PACKET_SLICES_MAX {
            let Some((s, c)) = self.chunks.get(idx) else {
                break;
            };
            let off = (pos - s) as usize;
            let run = c.contiguous_at(off);
            if run.is_empty() {
                debug_assert!(false, "Chunk::contiguous_at returned nothing");
                break;
            }
            let take = run.len().min(max - total).min(c.len() - off);
            slices[n] = IoSlice::new(&run[..take]);
            n += 1;
            total += take;
            pos += take as u64;
            if off + take == c.len() {
                idx += 1;
            }
        }
        (n, total)
    }

    fn may_send(&self, bytes: usize) -> bool {
        match self.side {
            Side::Accept { .. } if !self.established => {
                self.bytes_out + bytes as u64 <= self.bytes_in
            }
            _ => true,
        }
    }

    fn window(&self) -> usize {
        self.cc.window().min(self.peer_wnd)
    }

    /// The next datagram to send, if any (call until None after every input). Payload
    /// slices point into the chunks (no copy).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<'_>> {
        let send = self.next_send(now)?;
        Some(self.build(send, now))
    }

    /// `poll_transmit` for a caller that only reads the datagram (copies its header,
    /// points at its slices): `f` gets it where it was built. Returning the ~200-byte
    /// `Transmit` by value was a memmove per packet on the server's send path.
    #[inline]
    pub fn poll_transmit_with<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&Transmit<'_>) -> R,
    ) -> Option<R> {
        let send = self.next_send(now)?;
        let mut t = Transmit::empty();
        self.build_into(send, now, &mut t);
        Some(f(&t))
    }

    fn next_send(&mut self, now: Instant) -> Option<Emit> {
        if self.reset_pending {
            self.reset_pending = false;
            self.close_with(CloseReason::Aborted);
            return Some(Emit::Reset);
        }
        if let State::Closed(reason) = self.state {
            // A last ack (e.g. of the peer's FIN) after our FIN was acked.
            return (reason == CloseReason::Graceful && self.ack_pending).then_some(Emit::State);
        }
        let sack_len = if self.ooo.is_empty() {
            0
        } else {
            2 + SACK_BYTES_MAX
        };
        if self.syn_ack_pending {
            if !self.may_send(HEADER_LEN) {
                return None;
            }
            self.syn_ack_pending = false;
            return Some(Emit::SynAck);
        }
        if self.state == State::SynReceived {
            return None; // nothing but SYN-ACKs before the peer proves its address
        }
        // Queued SYN/FIN and lost packets, oldest first.
        let wnd = self.window();
        let from = self.unsent_or_lost_from.min(self.out.len());
        debug_assert!(self
            .out
            .range(..from)
            .all(|o| o.transmissions > 0 && !o.need_resend));
        let found = self
            .out
            .range(from..)
            .position(|o| o.transmissions == 0 || o.need_resend)
            .map(|p| from + p);
        self.unsent_or_lost_from = found.unwrap_or(self.out.len());
        if let Some(idx) = found {
            let o = self.out[idx];
            let len = o.payload_len();
            let fits = o.transmissions == 0
                || o.resend_now
                || self.probe_allowed
                || self.in_flight_bytes == 0
                || self.in_flight_bytes + len <= wnd;
            if fits && self.may_send(HEADER_LEN + sack_len + len) {
                self.probe_allowed = false;
                return Some(Emit::Tracked(idx));
            }
            if !fits && !o.resend_now {
                return self.ack_only();
            }
        }
        if self.state == State::SynSent {
            return None;
        }
        // New data.
        if self.next_unsent < self.written && self.out.len() < self.cfg.packets_in_flight_max {
            let mut len = self.next_data_len();
            let room = wnd.saturating_sub(self.in_flight_bytes);
            let fits = if self.probe_allowed {
                true
            } else if self.in_flight_bytes == 0 && room > 0 {
                // Nothing in flight and a peer window smaller than a packet: fill it.
                len = len.min(room);
                true
            } else {
                len <= room
            };
            if fits && self.may_send(HEADER_LEN + sack_len + len) {
                self.probe_allowed = false;
                let start = self.next_unsent;
                self.next_unsent += len as u64;
                self.stats.payload_bytes_sent += len as u64;
                self.push_out(Kind::Data {
                    start,
                    len: len as u32,
                });
                return Some(Emit::Tracked(self.out.len() - 1));
            }
            if self.in_flight_bytes == 0 && self.rto_deadline.is_none() {
                // Zero peer window: probe after a timeout.
                self.rto_deadline = Some(now + self.rtt.rto(self.consecutive_timeouts));
            }
        }
        if self.fin_requested
            && !self.fin_queued
            && self.next_unsent == self.written
            && self.out.len() < self.cfg.packets_in_flight_max
        {
            self.fin_queued = true;
            self.push_out(Kind::Fin);
            return Some(Emit::Tracked(self.out.len() - 1));
        }
        self.ack_only()
    }

    fn ack_only(&mut self) -> Option<Emit> {
        let sack_len = if self.ooo.is_empty() {
            0
        } else {
            2 + SACK_BYTES_MAX
        };
        (self.ack_pending && self.may_send(HEADER_LEN + sack_len)).then_some(Emit::State)
    }

    fn push_out(&mut self, kind: Kind) {
        self.unsent_or_lost_from = self.unsent_or_lost_from.min(self.out.len());
        self.out.push_back(Outgoing {
            kind,
            transmissions: 0,
            sent_at: self.created,
            sacked: false,
            need_resend: false,
            resend_now: false,
            fast_resent: false,
        });
        self.seq_nr = self.seq_nr.wrapping_add(1);
    }

    fn build(&mut self, send: Emit, now: Instant) -> Transmit<'_> {
        let mut t = Transmit::empty();
        self.build_into(send, now, &mut t);
        t
    }

    /// Builds the packet in `t` (where its reader will look at it): the header and its
    /// bookkeeping, then the payload slices pointed at the stream bytes (no copy).
    #[inline]
    fn build_into<'a>(&'a mut self, send: Emit, now: Instant, t: &mut Transmit<'a>) {
        let data = self.build_header(send, now, &mut t.header, &mut t.header_len);
        if let Some((start, len)) = data {
            let this = &*self;
            let (n, got) = this.fill_slices(start, len, &mut t.payload);
            debug_assert_eq!(got, len, "a packet's bytes stay pinned until acked");
            t.payload_slices = n;
        }
    }

    /// Everything of a packet but its payload slices: the header (into `out`, its length
    /// into `out_len`) and the bookkeeping of sending it. Returns the stream range of
    /// its payload, if it carries data.
    fn build_header(
        &mut self,
        send: Emit,
        now: Instant,
        out: &mut [u8; HEADER_BYTES_MAX],
        out_len: &mut usize,
    ) -> Option<(u64, usize)> {
        let wnd = self.wnd_free();
        let mut header = Header {
            ty: PacketType::State,
            connection_id: self.send_id,
            timestamp_us: self.now_us(now),
            timestamp_diff_us: self.reply_micro,
            wnd_size: wnd,
            seq_nr: self.seq_nr,
            ack_nr: self.ack_nr,
        };
        let mut data: Option<(u64, usize)> = None;
        let mut with_sack = true;
        match send {
            Emit::Reset => {
                header.ty = PacketType::Reset;
                with_sack = false;
            }
            Emit::State => {}
            Emit::SynAck => {
                // The SYN-ACK is exactly 20 bytes (anti-amplification counts on it).
                with_sack = false;
            }
            Emit::Tracked(idx) => {
                let seq = self.acked_seq_nr.wrapping_add(1 + idx as u16);
                let o = &mut self.out[idx];
                header.seq_nr = seq;
                header.ty = match o.kind {
                    Kind::Syn => {
                        with_sack = false;
                        // Sent with the id we expect answers on (BEP 29).
                        header.connection_id = self.recv_id;
                        header.ack_nr = 0;
                        PacketType::Syn
                    }
                    Kind::Data { start, len } => {
                        data = Some((start, len as usize));
                        PacketType::Data
                    }
                    Kind::Fin => PacketType::Fin,
                };
                if o.transmissions > 0 {
                    self.stats.retransmits += 1;
                }
                o.transmissions += 1;
                o.sent_at = now;
                let was_lost = o.need_resend;
                o.need_resend = false;
                o.resend_now = false;
                let len = o.payload_len();
                if was_lost || o.transmissions == 1 {
                    self.in_flight_bytes += len;
                }
                if self.rto_deadline.is_none() {
                    self.rto_deadline = Some(now + self.rtt.rto(self.consecutive_timeouts));
                }
            }
        }
        *out_len = HEADER_LEN;
        let mut mask = [0u8; SACK_BYTES_MAX];
        let sack = if with_sack {
            self.sack_mask(&mut mask)
        } else {
            0
        };
        if sack > 0 {
            header.encode(FIRST_EXT_SACK, out);
            *out_len += encode_sack(&mask[..sack], &mut out[HEADER_LEN..]);
        } else {
            header.encode(0, out);
        }
        if header.ty != PacketType::Syn && header.ty != PacketType::Reset {
            self.ack_pending = false;
            self.last_wnd_sent = wnd;
        }
        let payload_len = data.map_or(0, |(_, len)| len);
        self.bytes_out += (*out_len + payload_len) as u64;
        self.stats.packets_sent += 1;
        data
    }
}
