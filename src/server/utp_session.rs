//! The uTP adapter of the pump, without a task: the endpoint (`udp.rs`) drives each
//! established connection's pump in place, from the same call that handled its datagrams,
//! its timer or the end of its off-core work. A request that arrives in a receive batch is
//! answered before the batch's datagrams are acked, so the answer's first DATA packet
//! carries the ack and every packet of the answer leaves in the batch's sends. Nothing per
//! connection is spawned, woken or polled on the runtime for a hit; only work off the core
//! (a fetch's outcome, a store, a page-in) runs as a task and posts its result back.
//!
//! Flow control is the connection's: bytes are taken out of its reassembly only while the
//! pump is `Ready`, so while a reply waits for acks (more than
//! `limits::UTP_SEND_BACKLOG_BYTES_MAX` unacked) or work runs off the core, the peer's
//! bytes stay in the connection and its receive window closes, as a stream's would.

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::time::Instant;

use crate::limits;
use crate::server::pump::{Pump, State, Step};
use crate::server::send::OutBatch;
use crate::server::session::{SessionEnd, WorkerCtx};
use crate::server::worker::OpenSession;
use crate::store::{RecordRef, StoreError};
use crate::upstream::shard::{FetchOutcome, Hints};
use crate::utp::Connection;

/// Work a session hands off the core; the endpoint runs it as a task and feeds the result
/// back (`UtpSession::on_off_core`).
pub(super) enum OffCore {
    Fetch(flume::Receiver<FetchOutcome>),
    Store(Vec<u8>),
    PageIn([u8; 20]),
}

/// What came back from `OffCore` work.
pub(super) enum Finished {
    Fetch(Option<FetchOutcome>),
    Stored(Result<RecordRef, StoreError>),
    PagedIn(Option<RecordRef>),
}

/// One established uTP connection's session.
pub(super) struct UtpSession {
    pump: Pump<'static>,
    /// The batch the pump builds its next reply in; handed to the connection's send queue
    /// whole (its iovecs point into the mmap) when the pump says `Send`.
    out: OutBatch,
    /// A reply beyond the backlog cap waits for acks until this deadline; the pump hears
    /// `on_sent` once acks bring the backlog under the cap.
    write_deadline: Option<Instant>,
    /// Counts this session open until it ends (shutdown waits for it).
    _open: OpenSession,
    /// The context `pump` borrows. Declared after it, so dropped after it.
    ctx: Rc<WorkerCtx>,
}

impl UtpSession {
    pub(super) fn new(ctx: Rc<WorkerCtx>, peer: SocketAddr, open: OpenSession) -> Self {
        // SAFETY: the pump borrows the WorkerCtx behind `ctx`, an `Rc` this struct owns and
        // drops after `pump` (field order); the reference is used only through the pump
        // and the struct, never stored elsewhere, so it cannot outlive the context.
        let borrowed: &'static WorkerCtx = unsafe { &*Rc::as_ptr(&ctx) };
        UtpSession {
            pump: Pump::new(borrowed, peer, Instant::now()),
            out: OutBatch::new(),
            write_deadline: None,
            _open: open,
            ctx,
        }
    }

    /// When the session must be looked at without an event: a reply's write deadline, or
    /// the pump's own clocks (handshake, idle, keep-alive).
    pub(super) fn deadline(&self) -> Instant {
        self.write_deadline.unwrap_or_else(|| self.pump.deadline())
    }

    /// Whether `drive` has anything to do for what the connection holds now (skips the
    /// pump for the bare acks that make up most of a fetch's datagrams).
    pub(super) fn has_news(&self, conn: &Connection<OutBatch>) -> bool {
        if conn.is_closed() {
            return true;
        }
        if self.write_deadline.is_some() {
            return conn.send_backlog_bytes() <= limits::UTP_SEND_BACKLOG_BYTES_MAX;
        }
        self.pump.state() == State::Ready && (!conn.readable().is_empty() || conn.is_read_closed())
    }

    /// `deadline()` came at `now`. False: the session ended (a reply's write deadline).
    pub(super) fn on_deadline(&mut self, now: Instant) -> bool {
        if let Some(at) = self.write_deadline {
            if now >= at {
                tracing::debug!(peer = %self.pump.peer(), "write failed: uTP write deadline");
                self.pump.end(SessionEnd::IoError);
                return false;
            }
            return true;
        }
        if now >= self.pump.deadline() {
            self.pump.on_deadline();
        }
        true
    }

    /// The session ends for a reason the adapter saw (counted once, by the pump).
    pub(super) fn end(&mut self, end: SessionEnd) {
        self.pump.end(end);
    }

    /// The result of work handed off the core.
    pub(super) fn on_off_core(&mut self, finished: Finished) {
        match finished {
            Finished::Fetch(outcome) => self.pump.on_fetch(outcome),
            Finished::Stored(stored) => self.pump.on_stored(stored),
            Finished::PagedIn(record) => self.pump.on_paged_in(record),
        }
    }

    /// Runs the pump as far as it goes: replies into the connection's send queue, the
    /// connection's stream bytes into the pump while it is `Ready` (through `scratch`,
    /// the endpoint's: RC4 decrypts them in place), work off the core to `off_core`.
    /// False when the session has ended (counted by the pump); the caller closes the
    /// connection.
    pub(super) fn drive(
        &mut self,
        conn: &mut Connection<OutBatch>,
        scratch: &mut Vec<u8>,
        now: Instant,
        mut off_core: impl FnMut(OffCore),
    ) -> bool {
        if conn.is_closed() {
            // Reset by the peer, or its retransmissions ran out.
            tracing::debug!(peer = %self.pump.peer(), state = ?conn.state(), "uTP connection closed");
            self.pump.end(SessionEnd::IoError);
            return false;
        }
        if self.write_deadline.is_some() {
            if conn.send_backlog_bytes() > limits::UTP_SEND_BACKLOG_BYTES_MAX {
                return true;
            }
            self.write_deadline = None;
            self.pump.on_sent(now);
        }
        let mut step = self.pump.poll(now, &mut self.out);
        loop {
            match step {
                Step::Wait => {
                    if self.pump.state() != State::Ready {
                        return true;
                    }
                    let avail = conn.readable();
                    if avail.is_empty() {
                        if conn.is_read_closed() {
                            self.pump.end(SessionEnd::PeerClosed);
                            return false;
                        }
                        return true;
                    }
                    // All the connection holds at once: its reassembly is bounded by the
                    // receive window, and the pump caps what it keeps unhandled.
                    scratch.clear();
                    scratch.extend_from_slice(avail);
                    conn.consume(scratch.len());
                    step = self.pump.on_bytes(scratch, false, now, &mut self.out);
                    continue;
                }
                Step::Send => {
                    if !self.write(conn) {
                        self.pump.end(SessionEnd::IoError);
                        return false;
                    }
                    if conn.send_backlog_bytes() > limits::UTP_SEND_BACKLOG_BYTES_MAX {
                        self.write_deadline = Some(self.pump.write_deadline(now));
                        return true;
                    }
                    self.pump.on_sent(now);
                }
                Step::Fetch(key) => off_core(OffCore::Fetch(
                    self.ctx.upstream.submit(key, Hints::default()),
                )),
                Step::Shard { key, cmd } => self.ctx.upstream.send(&key, cmd),
                Step::Store(info) => off_core(OffCore::Store(info)),
                Step::PageIn(key) => off_core(OffCore::PageIn(key)),
                Step::Close { end: _, flush } => {
                    // Our last bytes tell the peer why (MSE); the FIN follows them.
                    if flush {
                        self.write(conn);
                    }
                    return false;
                }
            }
            step = self.pump.poll(now, &mut self.out);
        }
    }

    /// Hands the sealed reply to the connection's send queue as it is (kept until acked;
    /// a fresh batch for the next reply). False if the connection is closed.
    fn write(&mut self, conn: &mut Connection<OutBatch>) -> bool {
        self.out.seal();
        if self.out.sealed_len() == 0 {
            self.out.clear();
            return true;
        }
        if conn.is_closed() {
            self.out.clear();
            return false;
        }
        conn.write(std::mem::take(&mut self.out));
        true
    }
}

/// Runs `work` to its end (awaited on the core's runtime: the core's other connections go
/// on meanwhile).
pub(super) async fn run_off_core(ctx: &WorkerCtx, work: OffCore) -> Finished {
    match work {
        OffCore::Fetch(waiter) => Finished::Fetch(waiter.recv_async().await.ok()),
        OffCore::Store(info) => Finished::Stored(ctx.upstream.store_off_core(info).await),
        OffCore::PageIn(key) => Finished::PagedIn(ctx.page_in.page_in(key).await),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::server::conn::tests::*;
    use crate::utp::sim_tests::{dgram, hdr};
    use crate::utp::{self, PacketType};
    use crate::wire::HANDSHAKE_LEN;

    /// What left the connection: each datagram's (type, seq, ack), and the stream bytes
    /// of its DATA packets in order.
    fn sent(
        conn: &mut Connection<OutBatch>,
        now: std::time::Instant,
    ) -> (Vec<(PacketType, u16, u16)>, Vec<u8>) {
        let (mut heads, mut stream) = (Vec::new(), Vec::new());
        while let Some(t) = conn.poll_transmit(now) {
            let mut d = t.header[..t.header_len].to_vec();
            for s in t.payload() {
                d.extend_from_slice(s);
            }
            let p = utp::decode(&d).unwrap();
            heads.push((p.header.ty, p.header.seq_nr, p.header.ack_nr));
            stream.extend_from_slice(p.payload);
        }
        (heads, stream)
    }

    /// The peer acks up to `seq`, and then each burst that follows, until nothing more
    /// leaves; returns the stream bytes of those bursts.
    fn ack_all(conn: &mut Connection<OutBatch>, mut seq: u16, now: std::time::Instant) -> Vec<u8> {
        let mut stream = Vec::new();
        for _ in 0..100 {
            let ack = dgram(hdr(PacketType::State, 101, 502, seq), None, &[]);
            conn.on_packet(&utp::decode(&ack).unwrap(), now);
            let (heads, bytes) = sent(conn, now);
            let Some(&(_, last, _)) = heads.last() else {
                return stream;
            };
            stream.extend(bytes);
            seq = last;
        }
        panic!("the answer never ended");
    }

    /// A connection accepted from a SYN (id 100, seq 500, our seq 7000) whose peer's first
    /// DATA packet (seq 501) acks our SYN-ACK and carries `opening`.
    fn opened(opening: &[u8], now: std::time::Instant) -> Connection<OutBatch> {
        let syn = dgram(hdr(PacketType::Syn, 100, 500, 0), None, &[]);
        let syn = utp::decode(&syn).unwrap();
        let mut conn = Connection::<OutBatch>::accept(utp::Config::default(), &syn, 7000, now);
        while conn.poll_transmit(now).is_some() {}
        let request = dgram(hdr(PacketType::Data, 101, 501, 7000), None, opening);
        conn.on_packet(&utp::decode(&request).unwrap(), now);
        assert!(conn.is_established());
        conn
    }

    /// No task between the request and the answer: the call that hands the session its
    /// request leaves the whole answer (handshake, extension handshake, the piece) in the
    /// connection's queue before the connection builds a packet, so the first datagram out
    /// is DATA that acks the request, not a lone ST_STATE. The peer's FIN ends the session,
    /// and the session counts itself open until it is dropped.
    #[test]
    fn a_request_is_answered_in_place_and_the_answer_carries_its_ack() {
        let kit = kit(250, 0);
        let info = crate::metainfo::synthetic_v1_info(2000); // 3 metadata pieces
        let key = key_of(&info);
        store(&kit, &info);
        let (ctx, _keep) = kit.into_parts();
        let open = Rc::new(Cell::new(0));
        let now = std::time::Instant::now();
        let at = Instant::from_std(now);
        let mut conn = opened(&opening(&key, [1]), now);

        let peer = PEER.parse().unwrap();
        let mut session = UtpSession::new(Rc::new(ctx), peer, OpenSession::new(open.clone()));
        assert_eq!(open.get(), 1);
        assert!(session.has_news(&conn));
        let running = session.drive(&mut conn, &mut Vec::new(), at, |_| {
            panic!("a hit needs nothing off the core")
        });
        assert!(running);
        assert!(conn.readable().is_empty(), "the opening was taken whole");
        assert!(!session.has_news(&conn), "nothing left for the session");

        // The first window's worth: DATA only, the first acking the request.
        let (heads, mut stream) = sent(&mut conn, now);
        let (ty, _, ack) = heads[0];
        assert_eq!(
            (ty, ack),
            (PacketType::Data, 501),
            "the answer acks the request"
        );
        assert!(heads.iter().all(|h| h.0 == PacketType::Data), "{heads:?}");
        let last = heads.last().unwrap().1;
        stream.extend(ack_all(&mut conn, last, now));
        assert_eq!(&stream[28..48], &key);
        let msgs = messages(&stream[HANDSHAKE_LEN..], Some(&info));
        assert_eq!(msgs.last(), Some(&Msg::Data(1)), "{msgs:?}");

        // The peer closes: the session ends (the endpoint then sends our FIN).
        let fin = dgram(hdr(PacketType::Fin, 101, 502, 7000), None, &[]);
        conn.on_packet(&utp::decode(&fin).unwrap(), now);
        assert!(session.has_news(&conn));
        assert!(!session.drive(&mut conn, &mut Vec::new(), at, |_| panic!(
            "nothing off the core"
        )));
        drop(session);
        assert_eq!(open.get(), 0);
    }

    /// A miss goes off the core: the session hands over the fetch's waiter, and only our
    /// handshake leaves now (carrying the ack); the rest waits for the fetch.
    #[test]
    fn a_miss_hands_its_fetch_off_the_core() {
        let kit = kit(250, 0);
        let key = key_of(b"d4:name1:xe"); // not stored
        let (ctx, _keep) = kit.into_parts();
        let open = Rc::new(Cell::new(0));
        let now = std::time::Instant::now();
        let mut conn = opened(&opening(&key, []), now);

        let peer = PEER.parse().unwrap();
        let mut session = UtpSession::new(Rc::new(ctx), peer, OpenSession::new(open.clone()));
        let mut handed = Vec::new();
        assert!(
            session.drive(&mut conn, &mut Vec::new(), Instant::from_std(now), |w| {
                handed.push(w)
            })
        );
        assert!(
            matches!(handed.as_slice(), [OffCore::Fetch(_)]),
            "one fetch"
        );
        let (heads, stream) = sent(&mut conn, now);
        let kinds: Vec<_> = heads.iter().map(|&(ty, _, ack)| (ty, ack)).collect();
        assert_eq!(
            kinds,
            [(PacketType::Data, 501)],
            "our handshake, acking theirs"
        );
        assert_eq!(stream.len(), HANDSHAKE_LEN);
        assert!(!session.has_news(&conn));
    }

    /// A reply past `UTP_SEND_BACKLOG_BYTES_MAX` waits in the connection for acks: the pump
    /// hears `on_sent` once acks bring the backlog under the cap. With no acks, the write
    /// deadline ends the session.
    #[test]
    fn a_reply_past_the_backlog_cap_waits_for_acks_or_its_write_deadline() {
        let kit = kit(250, 0);
        // 400 metadata pieces: 250 requests are 4 096 000 bytes of blocks plus headers.
        let info = crate::metainfo::synthetic_v1_info(400 * 16384 / 20);
        let key = key_of(&info);
        store(&kit, &info);
        let (ctx, _keep) = kit.into_parts();
        let ctx = Rc::new(ctx);
        let open = Rc::new(Cell::new(0));
        let now = std::time::Instant::now();
        let at = Instant::from_std(now);
        let first = opening(&key, 0..250);
        let peer = PEER.parse().unwrap();

        for acked in [true, false] {
            let mut conn = opened(&first, now);
            let mut session = UtpSession::new(ctx.clone(), peer, OpenSession::new(open.clone()));
            assert!(session.drive(&mut conn, &mut Vec::new(), at, |_| panic!("a hit")));
            assert!(conn.send_backlog_bytes() > limits::UTP_SEND_BACKLOG_BYTES_MAX);
            assert!(!session.has_news(&conn), "waiting for acks");
            let write_deadline = session.deadline();
            assert!(write_deadline > at);
            if acked {
                let (heads, _) = sent(&mut conn, now);
                ack_all(&mut conn, heads.last().unwrap().1, now);
                assert!(conn.send_backlog_bytes() <= limits::UTP_SEND_BACKLOG_BYTES_MAX);
                assert!(session.has_news(&conn), "acked: the reply counts as sent");
                assert!(session.drive(&mut conn, &mut Vec::new(), at, |_| panic!("a hit")));
                assert!(!session.has_news(&conn));
                assert!(
                    session.deadline() != write_deadline,
                    "the pump's clocks again"
                );
            } else {
                assert!(session.on_deadline(write_deadline - std::time::Duration::from_millis(1)));
                assert!(
                    !session.on_deadline(write_deadline),
                    "ended at its write deadline"
                );
            }
        }
    }
}
