//! Two `Connection`s over a simulated link (virtual clock, seeded loss, duplication,
//! reordering and delay), and single connections fed hand-made and hostile packets.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::*;
use crate::wire::test_rng::XorShift;

type Conn = Connection<Vec<u8>>;

const A: usize = 0;
const B: usize = 1;

/// (arrival, tie-breaker, destination, datagram), earliest first.
type Arrivals = BinaryHeap<Reverse<(Instant, u64, usize, Vec<u8>)>>;

struct Link {
    rng: XorShift,
    loss_permille: usize,
    dup_permille: usize,
    delay: Duration,
    jitter: Duration,
    queue: Arrivals,
    counter: u64,
    /// Datagram bytes handed to the link by each side.
    sent_bytes: [u64; 2],
}

impl Link {
    fn new(
        seed: u64,
        loss_permille: usize,
        dup_permille: usize,
        delay_ms: u64,
        jitter_ms: u64,
    ) -> Self {
        Link {
            rng: XorShift::new(seed),
            loss_permille,
            dup_permille,
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            queue: BinaryHeap::new(),
            counter: 0,
            sent_bytes: [0; 2],
        }
    }

    fn latency(&mut self) -> Duration {
        let j = self.jitter.as_micros() as u64;
        if j == 0 {
            return self.delay;
        }
        // Uniform in delay ± jitter: packets overtake each other (reordering).
        let off = self.rng.below(2 * j as usize + 1) as u64;
        self.delay + Duration::from_micros(off) - self.jitter
    }

    fn send(&mut self, from: usize, now: Instant, dgram: Vec<u8>) {
        self.sent_bytes[from] += dgram.len() as u64;
        if self.rng.below(1000) < self.loss_permille {
            return;
        }
        if self.rng.below(1000) < self.dup_permille {
            let at = now + self.latency();
            self.counter += 1;
            self.queue
                .push(Reverse((at, self.counter, 1 - from, dgram.clone())));
        }
        let at = now + self.latency();
        self.counter += 1;
        self.queue
            .push(Reverse((at, self.counter, 1 - from, dgram)));
    }
}

fn drain(c: &mut Conn, side: usize, link: &mut Link, now: Instant) {
    let mut n = 0;
    while let Some(t) = c.poll_transmit(now) {
        assert!(t.len() <= HEADER_BYTES_MAX + 1400);
        let v = t.to_vec();
        assert_eq!(v.len(), t.len());
        link.send(side, now, v);
        n += 1;
        assert!(n < 10_000, "poll_transmit never returns None");
    }
}

struct Transfer {
    a: Conn,
    b: Conn,
    elapsed: Duration,
}

/// A connects to B; each writes `data[side]` in random-sized chunks and closes; each
/// reads to EOF. Panics unless both streams arrive byte-identical and both close
/// gracefully within `limit` of virtual time.
fn transfer(
    link: &mut Link,
    cfg: Config,
    a_seq: u16,
    b_seq: u16,
    data: [Vec<u8>; 2],
    limit: Duration,
) -> Transfer {
    let t0 = Instant::now();
    let mut now = t0;
    let mut conns: [Option<Conn>; 2] = [Some(Conn::connect(cfg.clone(), 0xfffe, a_seq, now)), None];
    let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut written = [false; 2];
    let mut rng = XorShift::new(99);
    loop {
        for side in [A, B] {
            let Some(c) = conns[side].as_mut() else {
                continue;
            };
            if !written[side] && !matches!(c.state(), State::SynSent) {
                let mut pos = 0;
                let d = &data[side];
                while pos < d.len() {
                    let n = (1 + rng.below(4000)).min(d.len() - pos);
                    c.write(d[pos..pos + n].to_vec());
                    pos += n;
                }
                c.close(now);
                written[side] = true;
            }
            let r = c.readable();
            got[side].extend_from_slice(r);
            let n = r.len();
            c.consume(n);
            drain(c, side, link, now);
        }
        if let [Some(a), Some(b)] = &conns {
            if a.is_closed() && b.is_closed() {
                break;
            }
        }
        let next = [
            link.queue.peek().map(|Reverse((t, ..))| *t),
            conns[A].as_ref().and_then(|c| c.next_timeout()),
            conns[B].as_ref().and_then(|c| c.next_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("deadlock: nothing in flight and no timer");
        now = now.max(next);
        assert!(now - t0 < limit, "transfer did not finish within {limit:?}");
        while link.queue.peek().is_some_and(|Reverse((t, ..))| *t <= now) {
            let Reverse((_, _, to, dgram)) = link.queue.pop().unwrap();
            let pkt = decode(&dgram).expect("we only send valid packets");
            match conns[to].as_mut() {
                Some(c) => c.on_packet(&pkt, now),
                None => {
                    assert_eq!(pkt.header.ty, PacketType::Syn);
                    conns[to] = Some(Conn::accept(cfg.clone(), &pkt, b_seq, now));
                }
            }
        }
        for c in conns.iter_mut().flatten() {
            if c.next_timeout().is_some_and(|t| t <= now) {
                c.on_timeout(now);
            }
        }
    }
    let [Some(a), Some(b)] = conns else {
        unreachable!()
    };
    assert_eq!(a.state(), State::Closed(CloseReason::Graceful));
    assert_eq!(b.state(), State::Closed(CloseReason::Graceful));
    assert!(
        got[A] == data[B],
        "B→A stream differs ({} vs {} bytes)",
        got[A].len(),
        data[B].len()
    );
    assert!(
        got[B] == data[A],
        "A→B stream differs ({} vs {} bytes)",
        got[B].len(),
        data[A].len()
    );
    Transfer {
        a,
        b,
        elapsed: now - t0,
    }
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    XorShift::new(seed).bytes(len)
}

#[test]
fn lossy_reordering_link_moves_250k_both_ways() {
    for seed in 1..=4 {
        let mut link = Link::new(seed, 50, 10, 20, 10);
        let t = transfer(
            &mut link,
            Config::default(),
            65_500,
            65_400,
            [payload(seed, 250_000), payload(seed + 100, 250_000)],
            Duration::from_secs(120),
        );
        let (sa, sb) = (t.a.stats(), t.b.stats());
        // 5 % loss each way: retransmissions happened, and stayed proportionate.
        assert!(sa.retransmits > 0 && sb.retransmits > 0, "{sa:?} {sb:?}");
        assert!(sa.retransmits < sa.packets_sent / 4, "{sa:?}");
        assert!(sa.rtt.unwrap() >= Duration::from_millis(20), "{sa:?}");
        assert!(t.elapsed < Duration::from_secs(60), "{:?}", t.elapsed);
    }
}

#[test]
fn clean_link_is_fast_and_wraps_sequence_numbers() {
    // ~200 packets each way from 65 530: both sequence spaces wrap through 0.
    let mut link = Link::new(7, 0, 0, 10, 0);
    let t = transfer(
        &mut link,
        Config::default(),
        65_530,
        65_535,
        [payload(1, 280_000), payload(2, 280_000)],
        Duration::from_secs(30),
    );
    assert_eq!(t.a.stats().retransmits, 0);
    assert_eq!(t.b.stats().retransmits, 0);
    // Slow start then LEDBAT on a 20 ms RTT: a few seconds at most.
    assert!(t.elapsed < Duration::from_secs(5), "{:?}", t.elapsed);
}

#[test]
fn heavy_duplication_and_reordering() {
    let mut link = Link::new(11, 100, 300, 30, 25);
    transfer(
        &mut link,
        Config {
            payload_bytes_max: 300,
            ..Config::default()
        },
        1,
        40_000,
        [payload(3, 60_000), payload(4, 5)],
        Duration::from_secs(300),
    );
}

#[test]
fn small_receive_window_is_respected() {
    // A 4 KiB window: the sender never has more in flight than the window allows.
    let mut link = Link::new(5, 0, 0, 5, 2);
    let cfg = Config {
        reassembly_bytes_max: 4096,
        ..Config::default()
    };
    transfer(
        &mut link,
        cfg,
        9,
        9,
        [payload(5, 100_000), Vec::new()],
        Duration::from_secs(60),
    );
}

// ---- single connections fed by hand ----

fn t0() -> Instant {
    Instant::now()
}

fn pkt(dgram: &[u8]) -> Packet<'_> {
    decode(dgram).unwrap()
}

pub(crate) fn hdr(ty: PacketType, connection_id: u16, seq_nr: u16, ack_nr: u16) -> Header {
    Header {
        ty,
        connection_id,
        timestamp_us: 1,
        timestamp_diff_us: 0,
        wnd_size: 1 << 20,
        seq_nr,
        ack_nr,
    }
}

pub(crate) fn dgram(h: Header, sack: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; HEADER_LEN];
    h.encode(u8::from(sack.is_some()), &mut v);
    if let Some(mask) = sack {
        v.push(0);
        v.push(mask.len() as u8);
        v.extend_from_slice(mask);
    }
    v.extend_from_slice(payload);
    v
}

fn all_out(c: &mut Conn, now: Instant) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    while let Some(t) = c.poll_transmit(now) {
        v.push(t.to_vec());
    }
    v
}

/// An accepted connection from a SYN (id 100, seq 500); our seq 7000; established by the
/// peer's ack. Returns it and the peer's next seq.
fn accepted(cfg: Config, now: Instant) -> Conn {
    let syn = dgram(hdr(PacketType::Syn, 100, 500, 0), None, &[]);
    let mut c = Conn::accept(cfg, &pkt(&syn), 7000, now);
    let out = all_out(&mut c, now);
    assert_eq!(out.len(), 1);
    let ack = dgram(hdr(PacketType::State, 101, 501, 6999), None, &[]);
    c.on_packet(&pkt(&ack), now);
    assert!(c.is_established());
    c
}

#[test]
fn handshake_numbering_as_libtorrent() {
    let now = t0();
    // Connect: the SYN goes with our receive id, takes a number, acks nothing.
    let mut a = Conn::connect(Config::default(), 0xffff, 65535, now);
    assert_eq!(a.recv_id(), 0xffff);
    let out = all_out(&mut a, now);
    assert_eq!(out.len(), 1);
    let syn = pkt(&out[0]).header;
    assert_eq!(
        (syn.ty, syn.connection_id, syn.seq_nr, syn.ack_nr),
        (PacketType::Syn, 0xffff, 65535, 0)
    );
    assert_eq!(out[0].len(), 20);

    // Accept: receive on id + 1, send with id; the SYN-ACK is a 20-byte ST_STATE carrying
    // our initial number, not taking it.
    let mut b = Conn::accept(Config::default(), &pkt(&out[0]), 12, now);
    assert_eq!(b.recv_id(), 0);
    assert_eq!(b.state(), State::SynReceived);
    let out = all_out(&mut b, now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].len(), 20);
    let sa = pkt(&out[0]).header;
    assert_eq!(
        (sa.ty, sa.connection_id, sa.seq_nr, sa.ack_nr),
        (PacketType::State, 0xffff, 12, 65535)
    );

    // The initiator takes it: ack_nr = 11, and it sends data as seq 0 (wrapped), ack 11.
    a.on_packet(&pkt(&out[0]), now);
    assert_eq!(a.state(), State::Connected);
    a.write(b"hello".to_vec());
    let out = all_out(&mut a, now);
    assert_eq!(out.len(), 1, "data carries the ack");
    let d = pkt(&out[0]);
    assert_eq!(
        (
            d.header.ty,
            d.header.connection_id,
            d.header.seq_nr,
            d.header.ack_nr
        ),
        (PacketType::Data, 0, 0, 11)
    );
    assert_eq!(d.payload, b"hello");

    // That acks the SYN-ACK: established. B's first DATA has the SYN-ACK's number, 12.
    b.on_packet(&d, now);
    assert!(b.is_established());
    assert_eq!(b.readable(), b"hello");
    b.write(b"world".to_vec());
    let out = all_out(&mut b, now);
    assert_eq!(out.len(), 1);
    let d = pkt(&out[0]);
    assert_eq!(
        (d.header.ty, d.header.seq_nr, d.header.ack_nr),
        (PacketType::Data, 12, 0)
    );
    a.on_packet(&d, now);
    assert_eq!(a.readable(), b"world");
}

#[test]
fn accept_side_never_amplifies() {
    let now = t0();
    let syn = dgram(hdr(PacketType::Syn, 100, 500, 0), None, &[]);
    let mut c = Conn::accept(Config::default(), &pkt(&syn), 7000, now);
    let mut received = syn.len();
    let mut sent = 0;
    // The application writes at once (it must not leak before the peer is confirmed).
    c.write(vec![7u8; 50_000]);
    let mut rng = XorShift::new(3);
    for i in 0..2000 {
        for d in all_out(&mut c, now) {
            sent += d.len();
        }
        assert!(sent <= received, "sent {sent} > received {received} at {i}");
        // Spoofed SYN retransmits, and packets with ack_nr guesses that are not 6999.
        let input = match i % 3 {
            0 => syn.clone(),
            1 => {
                let mut ack = rng.next_u64() as u16;
                if ack == 6999 || ack == 7000 {
                    ack = 1;
                }
                dgram(hdr(PacketType::Data, 101, 501, ack), None, b"x")
            }
            _ => dgram(hdr(PacketType::State, 101, 501, 6990), None, &[]),
        };
        received += input.len();
        c.on_packet(&pkt(&input), now);
    }
    assert!(!c.is_established());
    assert_eq!(
        c.readable(),
        b"",
        "data from an unconfirmed source is not taken"
    );
    // Only SYN-ACKs went out: 20 bytes, one per SYN.
    assert_eq!(sent, 20 * (1 + 667));
    // Unconfirmed until the connect timeout.
    let deadline = c.next_timeout().unwrap();
    assert_eq!(deadline, now + Config::default().connect_timeout);
    c.on_timeout(deadline);
    assert_eq!(c.state(), State::Closed(CloseReason::ConnectTimeout));
    assert!(all_out(&mut c, deadline).is_empty());
}

#[test]
fn peer_that_never_acks_times_out_after_bounded_retransmits() {
    let start = t0();
    let mut now = start;
    let cfg = Config::default();
    let mut c = accepted(cfg.clone(), now);
    c.write(vec![1u8; 100_000]);
    let first = all_out(&mut c, now);
    assert_eq!(
        first.len(),
        cfg.initial_window_packets,
        "the initial window, then nothing until an ack or a timeout"
    );
    let mut timeouts = 0;
    let mut datagrams = first.len();
    while let Some(t) = c.next_timeout() {
        assert!(t > now);
        now = t;
        c.on_timeout(now);
        timeouts += 1;
        datagrams += all_out(&mut c, now).len();
        assert!(timeouts <= 10);
    }
    assert_eq!(c.state(), State::Closed(CloseReason::TimedOut));
    assert_eq!(timeouts, cfg.retransmits_max + 1);
    // One packet per timeout (the window is one packet after a timeout).
    assert_eq!(c.stats().retransmits, u64::from(cfg.retransmits_max));
    assert_eq!(
        datagrams,
        cfg.initial_window_packets + cfg.retransmits_max as usize
    );
    // Back-off from 1 s (no RTT sample yet), doubling: 1 + 2 + 4 + 8 + 16.
    assert_eq!(now - start, Duration::from_secs(31));
}

#[test]
fn unanswered_syn_is_retried_then_times_out() {
    let start = t0();
    let mut now = start;
    let cfg = Config::default();
    let mut c = Conn::connect(cfg.clone(), 5, 5, now);
    let mut syns = all_out(&mut c, now).len();
    while let Some(t) = c.next_timeout() {
        now = t;
        c.on_timeout(now);
        for d in all_out(&mut c, now) {
            assert_eq!(pkt(&d).header.ty, PacketType::Syn);
            syns += 1;
        }
    }
    assert_eq!(c.state(), State::Closed(CloseReason::TimedOut));
    assert_eq!(syns, 1 + cfg.syn_retransmits_max as usize);
    // 1 s, then 2 s, then 4 s.
    assert_eq!(now - start, Duration::from_secs(7));
}

#[test]
fn fast_retransmit_after_three_duplicate_acks() {
    let now = t0();
    let mut c = accepted(Config::default(), now);
    c.write(vec![9u8; 2800]);
    let out = all_out(&mut c, now);
    assert_eq!(out.len(), 2);
    assert_eq!(pkt(&out[0]).header.seq_nr, 7000);
    let later = now + Duration::from_millis(50);
    // Two duplicates: nothing yet.
    let dup = dgram(hdr(PacketType::State, 101, 501, 6999), None, &[]);
    for _ in 0..2 {
        c.on_packet(&pkt(&dup), later);
        assert!(all_out(&mut c, later).is_empty());
    }
    // The third: 7000 goes again at once, long before its 1 s timeout.
    c.on_packet(&pkt(&dup), later);
    let out = all_out(&mut c, later);
    assert_eq!(out.len(), 1);
    assert_eq!(pkt(&out[0]).header.seq_nr, 7000);
    assert_eq!(c.stats().retransmits, 1);
    // More duplicates do not resend it again (it waits for its timeout now).
    for _ in 0..5 {
        c.on_packet(&pkt(&dup), later);
    }
    assert!(all_out(&mut c, later).is_empty());
}

#[test]
fn sack_marks_loss_and_is_honoured() {
    let now = t0();
    // A small first window, so four rounds of acks leave packets to send after them.
    let cfg = Config {
        payload_bytes_max: 100,
        initial_window_packets: 2,
        ..Config::default()
    };
    let mut c = accepted(cfg, now);
    // Grow the window: ack packets one by one.
    c.write(vec![1u8; 100 * 40]);
    let mut acked = 6999u16;
    let mut t = now;
    for _ in 0..4 {
        let n = all_out(&mut c, t).len() as u16;
        t += Duration::from_millis(10);
        acked = acked.wrapping_add(n);
        c.on_packet(
            &pkt(&dgram(hdr(PacketType::State, 101, 501, acked), None, &[])),
            t,
        );
    }
    let out = all_out(&mut c, t);
    assert!(out.len() >= 5, "{}", out.len());
    let first = pkt(&out[0]).header.seq_nr;
    assert_eq!(first, acked.wrapping_add(1));
    // Bit 0 is ack_nr + 2 = first + 1. SACK of first+2..=first+4 (bits 1..3): `first`
    // and `first+1` have 3 later packets acked: lost, resent at once. The SACKed ones are
    // not resent.
    let sack = [0b0000_1110, 0, 0, 0];
    let state = dgram(hdr(PacketType::State, 101, 501, acked), Some(&sack), &[]);
    c.on_packet(&pkt(&state), t);
    let resent: Vec<u16> = all_out(&mut c, t)
        .iter()
        .map(|d| pkt(d).header.seq_nr)
        .filter(|s| seq_less(*s, first.wrapping_add(5)))
        .collect();
    assert_eq!(resent, vec![first, first.wrapping_add(1)]);
    // On a timeout, SACKed packets are still not resent.
    let t2 = c.next_timeout().unwrap();
    c.on_timeout(t2);
    let mut seqs = Vec::new();
    for _ in 0..3 {
        for d in all_out(&mut c, t2) {
            seqs.push(pkt(&d).header.seq_nr);
        }
    }
    assert!(
        !seqs
            .iter()
            .any(|s| (2..=4).contains(&s.wrapping_sub(first))),
        "{seqs:?}"
    );
}

#[test]
fn sack_bits_past_what_we_sent_are_ignored() {
    let now = t0();
    let mut c = accepted(Config::default(), now);
    c.write(vec![1u8; 2000]);
    assert_eq!(all_out(&mut c, now).len(), 2); // 7000, 7001
                                               // A SACK claiming 224 packets: only bit 0 (7001) names a packet we sent.
    let sack = [0xffu8; SACK_BYTES_MAX];
    c.on_packet(
        &pkt(&dgram(
            hdr(PacketType::State, 101, 501, 6999),
            Some(&sack),
            &[],
        )),
        now,
    );
    assert_eq!(c.send_backlog_bytes(), 2000);
    // New data goes out as 7002..; nothing of it counts as acked, so the cumulative ack
    // of 7000 frees only what 7000 and 7001 carried.
    c.write(vec![2u8; 3000]);
    let out = all_out(&mut c, now);
    assert!(!out.is_empty());
    assert_eq!(pkt(&out[0]).header.seq_nr, 7002);
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::State, 101, 501, 7001), None, &[])),
        now,
    );
    assert_eq!(c.send_backlog_bytes(), 3000);
}

#[test]
fn acks_and_sequence_numbers_outside_the_window_are_ignored() {
    let now = t0();
    let cfg = Config::default();
    let mut c = accepted(cfg.clone(), now);
    c.write(vec![1u8; 1000]);
    all_out(&mut c, now);
    // An ack of a packet we never sent: dropped whole (its data too).
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Data, 101, 502, 9000), None, b"abc")),
        now,
    );
    assert_eq!(c.send_backlog_bytes(), 1000);
    assert_eq!(c.readable(), b"");
    // Data far ahead of the reorder window: dropped, no allocation.
    for far in [502 + REORDER_PACKETS_MAX as u16, 30_000, 40_000] {
        c.on_packet(
            &pkt(&dgram(hdr(PacketType::Data, 101, far, 6999), None, b"zz")),
            now,
        );
    }
    assert_eq!(c.readable(), b"");
    // Old data (the SYN's number, acked already): acked again, not delivered.
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Data, 101, 500, 6999), None, b"old")),
        now,
    );
    assert_eq!(c.readable(), b"");
    let out = all_out(&mut c, now);
    assert_eq!(out.len(), 1);
    assert_eq!(pkt(&out[0]).header.ack_nr, 500);
    // Past the reassembly cap: dropped. Fill the window out of order with 1400-byte packets.
    let mut seq = 502u16;
    let mut taken = 0;
    while seq != 502 + 220 {
        c.on_packet(
            &pkt(&dgram(
                hdr(PacketType::Data, 101, seq, 6999),
                None,
                &[5u8; 1400],
            )),
            now,
        );
        seq += 1;
        taken += 1;
    }
    assert!(taken * 1400 > cfg.reassembly_bytes_max);
    let out = all_out(&mut c, now);
    let wnd = pkt(&out[0]).header.wnd_size as usize;
    assert!(wnd < 1400, "window nearly closed: {wnd}");
    // The missing 501 arrives: everything kept becomes readable, within the cap.
    c.on_packet(
        &pkt(&dgram(
            hdr(PacketType::Data, 101, 501, 6999),
            None,
            &[4u8; 100],
        )),
        now,
    );
    let n = c.readable().len();
    assert!(
        n <= cfg.reassembly_bytes_max && n > cfg.reassembly_bytes_max - 1500,
        "{n}"
    );
}

#[test]
fn fin_and_reset() {
    let now = t0();
    let mut c = accepted(Config::default(), now);
    // FIN before the data it follows: read side closes when the gap fills.
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Fin, 101, 502, 6999), None, &[])),
        now,
    );
    assert!(!c.is_read_closed());
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Data, 101, 501, 6999), None, b"hi")),
        now,
    );
    assert!(c.is_read_closed());
    assert_eq!(c.readable(), b"hi");
    let out = all_out(&mut c, now);
    assert_eq!(pkt(&out[0]).header.ack_nr, 502, "the FIN is acked");
    // Data after the FIN is ignored.
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Data, 101, 503, 6999), None, b"more")),
        now,
    );
    assert_eq!(c.readable(), b"hi");
    // Our FIN after our data; the ack of both closes gracefully.
    c.write(b"bye".to_vec());
    c.close(now);
    let out = all_out(&mut c, now);
    let types: Vec<_> = out.iter().map(|d| pkt(d).header.ty).collect();
    assert_eq!(types, vec![PacketType::Data, PacketType::Fin]);
    assert_eq!(pkt(&out[1]).header.seq_nr, 7001);
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::State, 101, 503, 7001), None, &[])),
        now,
    );
    assert_eq!(c.state(), State::Closed(CloseReason::Graceful));

    // RESET from the peer, acking our last packet or the `seq_nr` of our last STATE.
    for ack in [6999, 7000] {
        let mut c = accepted(Config::default(), now);
        c.on_packet(
            &pkt(&dgram(hdr(PacketType::Reset, 101, 501, ack), None, &[])),
            now,
        );
        assert_eq!(c.state(), State::Closed(CloseReason::ResetByPeer));
    }
    // A RESET acking what we never sent is forged.
    let mut c = accepted(Config::default(), now);
    c.on_packet(
        &pkt(&dgram(hdr(PacketType::Reset, 101, 501, 7100), None, &[])),
        now,
    );
    assert_eq!(c.state(), State::Connected);
    // abort(): one RESET, then closed.
    let mut c = accepted(Config::default(), now);
    c.abort();
    let out = all_out(&mut c, now);
    assert_eq!(out.len(), 1);
    let r = pkt(&out[0]).header;
    assert_eq!((r.ty, r.connection_id), (PacketType::Reset, 100));
    assert_eq!(c.state(), State::Closed(CloseReason::Aborted));
}

#[test]
fn random_packets_on_a_live_connection_never_panic() {
    let now = t0();
    let cfg = Config::default();
    let mut rng = XorShift::new(2029);
    let templates = [
        dgram(hdr(PacketType::Data, 101, 502, 6999), None, b"data"),
        dgram(
            hdr(PacketType::State, 101, 502, 7001),
            Some(&[0xff; 4]),
            &[],
        ),
        dgram(hdr(PacketType::Fin, 101, 503, 7000), None, &[]),
        dgram(hdr(PacketType::Syn, 100, 500, 0), None, &[]),
    ];
    for round in 0..300 {
        let mut c = accepted(cfg.clone(), now);
        c.write(vec![3u8; 20_000]);
        let mut t = now;
        for i in 0..200 {
            let input = match i % 3 {
                0 => rng.bytes_below(60),
                _ => {
                    let which = rng.below(templates.len());
                    let mut v = rng.mutate(&templates[which]);
                    // Keep the connection id often enough to reach the state machine.
                    if v.len() >= 4 && rng.below(2) == 0 {
                        v[2..4].copy_from_slice(&101u16.to_be_bytes());
                    }
                    v
                }
            };
            if let Ok(p) = decode(&input) {
                c.on_packet(&p, t);
            }
            for d in all_out(&mut c, t) {
                assert!(d.len() <= HEADER_BYTES_MAX + cfg.payload_bytes_max);
            }
            assert!(c.readable().len() <= cfg.reassembly_bytes_max);
            if i % 50 == 0 {
                if let Some(n) = c.next_timeout() {
                    t = t.max(n);
                    c.on_timeout(t);
                }
            }
            let n = c.readable().len().min(round % 7);
            c.consume(n);
        }
    }
}

#[test]
fn accepts_libtorrents_captured_syn_and_first_data() {
    use super::packet::tests::{LIBTORRENT_FIRST_DATA_HEADER, LIBTORRENT_SYN};
    let now = t0();
    let mut c = Conn::accept(Config::default(), &pkt(&LIBTORRENT_SYN), 0x1092, now);
    assert_eq!(c.recv_id(), 0x2117);
    let out = all_out(&mut c, now);
    assert_eq!(out.len(), 1);
    let sa = pkt(&out[0]).header;
    assert_eq!(
        (sa.ty, sa.connection_id, sa.seq_nr, sa.ack_nr),
        (PacketType::State, 0x2116, 0x1092, 0x6fe9)
    );
    let mut data = LIBTORRENT_FIRST_DATA_HEADER.to_vec();
    data.extend_from_slice(&[0xd0; 505]);
    c.on_packet(&pkt(&data), now);
    assert!(c.is_established());
    assert_eq!(c.readable().len(), 505);
    let out = all_out(&mut c, now);
    assert_eq!(pkt(&out[0]).header.ack_nr, 0x6fea);
}
