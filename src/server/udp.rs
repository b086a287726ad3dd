//! uTP (BEP 29) on the serving port: the per-core datagram driver.
//!
//! Each worker owns one UDP socket per listen address, bound with SO_REUSEPORT on the same
//! port number as the TCP listener; the kernel picks the socket by a hash of the 4-tuple,
//! so all datagrams of one peer address reach one core, where its connection state lives
//! (docs/transports.md). On that core an `Endpoint`:
//!
//! - `recv_loop`: reads datagrams, demultiplexes them by (peer address, connection id) to
//!   a `utp::Connection` (sans-IO), and answers what the connection wants sent at once;
//!   a SYN for a new connection is admitted against the same per-IP and global budgets as
//!   TCP plus a per-core cap on connections not yet established (SYN floods);
//! - `timer_loop`: one timer for all connections of the endpoint (retransmissions,
//!   delayed acks, connect and FIN timeouts), a heap of deadlines;
//! - each established connection's session (the same BEP 3/10/9 pump as TCP) runs in place,
//!   without a task (`utp_session.rs`): the datagrams that carry a request are answered
//!   from the call that handled them, stream bytes in from the connection's reassembly,
//!   `OutBatch`es out into its send queue.
//!
//! Zero copy: a sealed `OutBatch` (headers + iovecs into the store's mmap) is handed to the
//! connection as a whole and kept until the peer acks its last byte; each DATA packet is
//! one `sendmsg` of [uTP header, slices of the batch], and a retransmission points at the
//! same slices again. No metadata byte is copied in user space.
//!
//! Sends are synchronous `sendmmsg` calls on the non-blocking socket, once per turn of
//! the runtime: receive batches, timers and session writes queue their datagrams in the
//! endpoint's `TxBatch`, and `send_loop`, woken by the first of them, sends it after the
//! tasks already woken in this turn have run (so the answers of every session a receive
//! batch woke leave together). A datagram either goes into the socket buffer at once or
//! is dropped (EAGAIN, counted), which uTP treats as loss. Nothing on this path waits
//! for the kernel. Runs of equal packets to one peer (a reply burst) go as one UDP GSO
//! send (`TxBatch`). The session answers a request before the connection's ack of it is
//! built, so the answer's first DATA packet carries the ack.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use crate::server::deadlines::Deadlines;
use crate::server::limiter::{ConnectionLimiter, ConnectionPermit};
use crate::server::send::OutBatch;
use crate::server::session::{SessionEnd, WorkerCtx};
use crate::server::utp_session::{self, OffCore, UtpSession};
use crate::server::worker::OpenSession;
use crate::utp::{self, Connection, PacketType};

/// A datagram buffer that holds any UDP datagram: a truncated one would be read as a
/// shorter payload (uTP has no length field), so never read into less.
const DATAGRAM_BYTES_MAX: usize = 64 * 1024;

/// Datagrams read per wake-up of the receive loop before the touched connections
/// transmit: bounds the latency one busy socket adds to the first datagram's answer.
const RECV_BATCH_MAX: usize = 64;

/// uTP packets queued before a `sendmmsg` (a send happens at least at every batch end):
/// a few reply bursts (a 5-piece info dict is ~60 packets).
const SEND_PACKETS_MAX: usize = 256;

/// Messages per `sendmmsg`; with GSO each carries up to `GSO_SEGMENTS_MAX` packets.
const SEND_MSGS_MAX: usize = 64;

/// Packets per GSO send: the kernel's `UDP_MAX_SEGMENTS` (64) ...
const GSO_SEGMENTS_MAX: usize = 64;

/// ... and at most this many bytes in all: the largest UDP payload over IPv6 and IPv4
/// (65 535 minus the UDP and IPv4 headers).
const GSO_BYTES_MAX: usize = 65_507;

/// A peer's address and the connection id its packets carry for us.
type ConnKey = (SocketAddr, u16);

impl utp::Chunk for OutBatch {
    fn len(&self) -> usize {
        self.sealed_len()
    }
    fn contiguous_at(&self, offset: usize) -> &[u8] {
        OutBatch::contiguous_at(self, offset)
    }
}

/// Hands `first` and then what `recv` finds without waiting to `handle`, at most
/// `RECV_BATCH_MAX` datagrams in all, and never reads one it will not hand on (what stays
/// in the socket waits for the next round). `WouldBlock` ends the batch. Returns how many
/// datagrams were handled.
fn drain_batch(
    buf: &mut Vec<u8>,
    first: io::Result<(usize, SocketAddr)>,
    mut recv: impl FnMut(&mut Vec<u8>) -> io::Result<(usize, SocketAddr)>,
    mut handle: impl FnMut(io::Result<(&[u8], SocketAddr)>),
) -> usize {
    let mut next = first;
    let mut handled = 0;
    for read in 1..=RECV_BATCH_MAX {
        match next {
            Ok((n, from)) => {
                handle(Ok((&buf[..n], from)));
                handled += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => handle(Err(e)),
        }
        if read == RECV_BATCH_MAX {
            break;
        }
        next = recv(buf);
    }
    handled
}

fn touch(sh: Rc<Shared>, touched: &mut Vec<Rc<Shared>>) {
    if !sh.touched.replace(true) {
        touched.push(sh);
    }
}

/// One datagram if the socket has one now (never waits), into `buf`'s capacity.
fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<(usize, SocketAddr)> {
    buf.clear();
    // SAFETY: an all-zero sockaddr_storage is valid; recvfrom writes at most `capacity`
    // bytes into `buf` and at most `len` bytes of address into `storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.capacity(),
            libc::MSG_DONTWAIT,
            &mut storage as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote `n` bytes (≤ capacity: a datagram never exceeds 64 KiB).
    unsafe { buf.set_len(n as usize) };
    let from = crate::server::listener::socket_addr_of(&storage)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP source"))?;
    let _ = len;
    Ok((n as usize, from))
}

/// uTP packets gathered for one `sendmmsg`: the uTP headers copied in, the payload iovecs
/// pointing into the connections' chunks (the batch's `OutBatch`es, i.e. the mmap).
/// Those stay valid until the batch is sent: a connection drops a chunk only when an
/// ack arrives (`Endpoint::on_datagram` sends a non-empty batch before it hands a packet
/// to a connection) or when the connection itself goes (`Endpoint::remove` keeps it in
/// `retired` until the batch is sent).
///
/// With UDP GSO (`gso`), consecutive packets to one peer of one size go out as one
/// message with a `UDP_SEGMENT` control message: the kernel passes the run through the
/// UDP/IP stack once and cuts it into the original datagrams (in the NIC, or just before
/// delivery on loopback), so a reply burst of 40 packets costs one trip instead of 40.
/// Each packet was admitted on its own by the connection (congestion window, peer window,
/// anti-amplification: `Connection::poll_transmit`); grouping changes nothing on the wire.
struct TxBatch {
    headers: [[u8; utp::HEADER_BYTES_MAX]; SEND_PACKETS_MAX],
    /// Every packet's iovecs, back to back: a message points at its packets' run.
    iovecs: [libc::iovec; SEND_PACKETS_MAX * (1 + utp::PACKET_SLICES_MAX)],
    msgs: [libc::mmsghdr; SEND_MSGS_MAX],
    /// Each message's `UDP_SEGMENT` control message (u64s: cmsghdr alignment).
    cmsgs: [[u64; 4]; SEND_MSGS_MAX],
    /// The open message: its peer, its segment size and packets so far (GSO only).
    open: Option<OpenMsg>,
    /// Iovecs of each packet (its header and payload slices), for `ungroup`.
    packet_iovs: [u8; SEND_PACKETS_MAX],
    /// The first packet's peer, and whether another peer's packets joined the batch.
    first_to: *const u8,
    several_peers: bool,
    packets: usize,
    iov_used: usize,
    len: usize,
    gso: bool,
}

/// The message `TxBatch::push` may still add packets to.
#[derive(Clone, Copy)]
struct OpenMsg {
    /// The peer's address, by identity: every packet to one connection names its `to`.
    to: *const u8,
    segment: usize,
    segments: usize,
    bytes: usize,
    /// Its last packet is shorter than the segment size: nothing may follow it.
    ended: bool,
}

impl TxBatch {
    fn new(gso: bool) -> Self {
        TxBatch {
            headers: [[0; utp::HEADER_BYTES_MAX]; SEND_PACKETS_MAX],
            iovecs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; SEND_PACKETS_MAX * (1 + utp::PACKET_SLICES_MAX)],
            // SAFETY: an all-zero mmsghdr is a valid empty message.
            msgs: unsafe { std::mem::zeroed() },
            cmsgs: [[0; 4]; SEND_MSGS_MAX],
            open: None,
            packet_iovs: [0; SEND_PACKETS_MAX],
            first_to: std::ptr::null(),
            several_peers: false,
            packets: 0,
            iov_used: 0,
            len: 0,
            gso,
        }
    }

    /// No room for one more packet in a new message.
    fn is_full(&self) -> bool {
        self.len == SEND_MSGS_MAX || self.packets == SEND_PACKETS_MAX
    }

    fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Whether `t` (of `bytes`) can join the open message to `to`: same peer, the open
    /// run not ended by a short packet, no longer than its segments, within the kernel's
    /// limits on segments and bytes per send.
    fn joins(&self, to: &socket2::SockAddr, bytes: usize) -> bool {
        let Some(m) = self.open else { return false };
        self.gso
            && std::ptr::eq(m.to, to.as_ptr().cast::<u8>())
            && !m.ended
            && bytes <= m.segment
            && m.segments < GSO_SEGMENTS_MAX
            && m.bytes + bytes <= GSO_BYTES_MAX
    }

    fn push(&mut self, to: &socket2::SockAddr, t: &utp::Transmit<'_>) {
        debug_assert!(!self.is_full());
        let bytes = t.len();
        let p = self.packets;
        // The whole fixed-size array: a constant-size copy the compiler inlines (a slice
        // of `header_len` bytes was a memmove call per packet).
        self.headers[p] = t.header;
        let first_iov = self.iov_used;
        self.iovecs[first_iov] = libc::iovec {
            iov_base: self.headers[p].as_mut_ptr() as *mut libc::c_void,
            iov_len: t.header_len,
        };
        for (v, s) in self.iovecs[first_iov + 1..].iter_mut().zip(t.payload()) {
            *v = libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            };
        }
        self.iov_used += 1 + t.payload_slices;
        self.packet_iovs[p] = (1 + t.payload_slices) as u8;
        let to_ptr = to.as_ptr().cast::<u8>();
        if p == 0 {
            self.first_to = to_ptr;
        } else if !std::ptr::eq(self.first_to, to_ptr) {
            self.several_peers = true;
        }
        self.packets += 1;
        if self.joins(to, bytes) {
            let m = self.open.as_mut().expect("joins checked it");
            m.segments += 1;
            m.bytes += bytes;
            m.ended = bytes < m.segment;
            let i = self.len - 1;
            self.msgs[i].msg_hdr.msg_iovlen += (1 + t.payload_slices) as libc::size_t;
            self.set_segment(i);
            return;
        }
        let i = self.len;
        self.open = Some(OpenMsg {
            to: to.as_ptr().cast::<u8>(),
            segment: bytes,
            segments: 1,
            bytes,
            ended: false,
        });
        let m = &mut self.msgs[i].msg_hdr;
        m.msg_name = to.as_ptr() as *mut libc::c_void;
        m.msg_namelen = to.len();
        m.msg_iov = self.iovecs[first_iov..].as_mut_ptr();
        m.msg_iovlen = (1 + t.payload_slices) as _;
        m.msg_control = std::ptr::null_mut();
        m.msg_controllen = 0;
        self.len += 1;
    }

    /// Marks message `i` (two or more packets) as a GSO send of its first packet's size.
    fn set_segment(&mut self, i: usize) {
        let Some(open) = self.open else { return };
        let control = &mut self.cmsgs[i];
        let m = &mut self.msgs[i].msg_hdr;
        m.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE(2) = 24 bytes fit the 32-byte, 8-aligned buffer, which
        // lives in the batch as long as the message.
        unsafe {
            m.msg_controllen = libc::CMSG_SPACE(2) as _;
            let c = libc::CMSG_FIRSTHDR(m);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, open.segment as u16);
        }
    }

    /// Packets in message `i`: its segments when GSO, else one.
    fn packets_in(&self, i: usize) -> u64 {
        let m = &self.msgs[i].msg_hdr;
        if m.msg_controllen == 0 {
            return 1;
        }
        let total: usize = (0..m.msg_iovlen)
            // SAFETY: msg_iov points at msg_iovlen iovecs of this batch.
            .map(|k| unsafe { (*m.msg_iov.add(k)).iov_len })
            .sum();
        // SAFETY: a message with control has the segment size written by `set_segment`.
        let segment = unsafe {
            std::ptr::read_unaligned(libc::CMSG_DATA(libc::CMSG_FIRSTHDR(m)) as *const u16)
        } as usize;
        total.div_ceil(segment) as u64
    }

    /// Undoes the GSO grouping of a batch that holds one peer's packets only: one message
    /// per packet again. A core with one peer's burst in a turn is not busy, and the burst
    /// as separate datagrams reaches the peer sooner: on loopback a GSO burst is delivered
    /// whole, separate datagrams one by one while the rest are sent, and one fetch alone
    /// measured ~15 % slower with GSO (BENCHMARKS.md "uTP cost"). Batches with several
    /// peers, the busy case, keep GSO and its saving per packet.
    fn ungroup_single_peer(&mut self) {
        if self.several_peers || self.len == self.packets || self.packets > SEND_MSGS_MAX {
            return;
        }
        let name = self.msgs[0].msg_hdr.msg_name;
        let namelen = self.msgs[0].msg_hdr.msg_namelen;
        let mut iov = 0;
        for p in 0..self.packets {
            let m = &mut self.msgs[p].msg_hdr;
            m.msg_name = name;
            m.msg_namelen = namelen;
            m.msg_iov = self.iovecs[iov..].as_mut_ptr();
            m.msg_iovlen = self.packet_iovs[p] as _;
            m.msg_control = std::ptr::null_mut();
            m.msg_controllen = 0;
            iov += self.packet_iovs[p] as usize;
        }
        self.len = self.packets;
    }

    /// Sends the batch (packets the kernel refuses are lost: uTP retransmits them).
    /// Returns false when the kernel refused GSO itself (EIO: a device without checksum
    /// offload, or a kernel without UDP_SEGMENT): the caller turns GSO off.
    fn send(&mut self, fd: RawFd, stats: &crate::server::stats::CoreStats) -> bool {
        self.ungroup_single_peer();
        let mut sent = 0;
        let mut gso_ok = true;
        while sent < self.len {
            // SAFETY: msgs[sent..len] describe live buffers (see the type's doc); the
            // kernel only reads them. `msg_name` points at the connection's SockAddr,
            // which lives as long as the connection.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.msgs[sent..self.len].as_mut_ptr(),
                    (self.len - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            stats.utp_send_calls.inc();
            if n <= 0 {
                // The first unsent message is refused (a full socket buffer, or an
                // error about its destination): count its packets and go on.
                let err = io::Error::last_os_error().raw_os_error();
                // EIO: no checksum offload on the device; EINVAL: a segment larger than
                // the path MTU (an operator's payload size for jumbo frames on a smaller
                // link), which without GSO IP fragmentation would carry.
                let refused = matches!(err, Some(libc::EIO) | Some(libc::EINVAL));
                if refused && self.msgs[sent].msg_hdr.msg_controllen != 0 {
                    gso_ok = false;
                }
                stats.utp_send_errors.add(self.packets_in(sent));
                sent += 1;
            } else {
                let n = n as usize;
                for i in sent..sent + n {
                    let packets = self.packets_in(i);
                    stats.utp_datagrams_sent.add(packets);
                    if packets > 1 {
                        stats.utp_gso_sends.inc();
                    }
                }
                sent += n;
            }
        }
        self.len = 0;
        self.packets = 0;
        self.iov_used = 0;
        self.open = None;
        self.several_peers = false;
        gso_ok
    }
}

/// Where a connection's session is.
// The session lives inline on purpose: boxed, reaching it was a cache miss per datagram
// (BENCHMARKS.md "uTP cost", ninth pass); a connection without one wastes its size.
#[allow(clippy::large_enum_variant)]
enum Session {
    /// Not established yet (the peer has not acked our SYN-ACK): no session, no buffers.
    NotStarted,
    /// The session, in the connection's allocation: every datagram's handling looks at it.
    Running(UtpSession),
    /// The session has ended; the connection finishes its FIN exchange and goes.
    Gone,
}

impl Session {
    fn is_running(&self) -> bool {
        matches!(self, Session::Running(_))
    }
}

/// One uTP connection, shared by the endpoint's loops and its session's off-core work (all
/// on one thread; no borrow is held across an await).
struct Shared {
    key: ConnKey,
    conn: RefCell<Connection<OutBatch>>,
    /// The peer's address in the form sendmsg wants, made once.
    to: socket2::SockAddr,
    /// The deadline this connection has in the endpoint's timer heap (entries with any
    /// other deadline are stale and skipped).
    scheduled: Cell<Option<Instant>>,
    session: RefCell<Session>,
    /// In the receive loop's list of connections to let transmit after the batch.
    touched: Cell<bool>,
    /// Its slot in the global and per-IP budgets, given back when the entry goes.
    _permit: ConnectionPermit,
}

/// Wakes the timer loop when a deadline earlier than the one it sleeps on is scheduled.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn notified(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Everything uTP on one core needs besides the socket.
pub struct UtpSettings {
    pub utp: utp::Config,
    /// Connections on this core that have not finished the uTP handshake.
    pub half_open_per_core_max: usize,
    /// Send reply bursts with UDP GSO (`TxBatch`); off, or refused once by the kernel,
    /// one datagram per packet.
    pub gso: bool,
}

/// One core's uTP endpoint on one listen address.
pub struct Endpoint {
    socket: monoio::net::udp::UdpSocket,
    fd: RawFd,
    ctx: Rc<WorkerCtx>,
    limiter: Arc<ConnectionLimiter>,
    settings: UtpSettings,
    /// Sessions open on this worker (TCP and uTP): shutdown waits for them.
    open: Rc<Cell<usize>>,
    /// Keyed by a per-process random seed (foldhash): the key is the peer's to choose.
    conns: RefCell<HashMap<ConnKey, Rc<Shared>, foldhash::fast::RandomState>>,
    tx: RefCell<TxBatch>,
    /// Stream bytes on their way from a connection to its session (`UtpSession::drive`).
    scratch: RefCell<Vec<u8>>,
    /// Wakes `send_loop`: the batch holds datagrams to send at the end of this turn.
    tx_queued: Notify,
    /// Connections removed while the batch still pointed into their chunks: kept alive
    /// until it is sent.
    retired: RefCell<Vec<Rc<Shared>>>,
    /// Connections' deadlines; the live entry of one is its `scheduled`.
    timers: RefCell<Deadlines<Instant, ConnKey>>,
    timer_changed: Notify,
    half_open: Cell<usize>,
    /// False once the server shuts down: no new connections.
    accepting: Cell<bool>,
    /// Connections touched by the datagrams of the batch the worker's ring is handing
    /// over (`on_ring_datagram` .. `end_ring_batch`).
    ring_touched: RefCell<Vec<Rc<Shared>>>,
    /// The clock read at the first datagram of that batch, for all of them.
    ring_batch_now: Cell<Option<Instant>>,
    /// Keys our initial sequence numbers (`initial_seq_nr`): SipHash with a 128-bit key
    /// that std draws from the OS's random source, never derived from time or pid.
    isn_key: RandomState,
    /// SYNs answered so far: each ISN hashes a fresh count, so none repeats a pattern.
    isn_count: Cell<u64>,
    /// Where this socket's KRPC datagrams go (`--dht-socket serving`), see `to_dht`.
    dht: Option<crate::upstream::dht::DhtInlet>,
}

impl Endpoint {
    pub fn new(
        socket: std::net::UdpSocket,
        ctx: Rc<WorkerCtx>,
        limiter: Arc<ConnectionLimiter>,
        settings: UtpSettings,
        open: Rc<Cell<usize>>,
    ) -> io::Result<Rc<Endpoint>> {
        let fd = socket.as_raw_fd();
        let dht = socket
            .local_addr()
            .ok()
            .and_then(|a| ctx.upstream.dht()?.inlet_for(a));
        let socket = monoio::net::udp::UdpSocket::from_std(socket)?;
        let gso = settings.gso;
        Ok(Rc::new(Endpoint {
            socket,
            fd,
            ctx,
            limiter,
            settings,
            open,
            conns: RefCell::new(HashMap::default()),
            tx: RefCell::new(TxBatch::new(gso)),
            scratch: RefCell::new(Vec::new()),
            tx_queued: Notify::default(),
            retired: RefCell::new(Vec::new()),
            timers: RefCell::new(Deadlines::with_capacity(0)),
            timer_changed: Notify::default(),
            half_open: Cell::new(0),
            accepting: Cell::new(true),
            ring_touched: RefCell::new(Vec::new()),
            ring_batch_now: Cell::new(None),
            isn_key: RandomState::new(),
            isn_count: Cell::new(0),
            dht,
        }))
    }

    /// Our initial sequence number for the connection a SYN opens. An off-path sender who
    /// spoofs a SYN must ack the SYN-ACK it never sees; with a sequence number it could
    /// predict (the old per-core xorshift, seeded from 10^8 possible values, fell to a
    /// search in under a second), it could complete the connection blindly and have
    /// metadata streamed at its victim. A keyed hash of a count and the connection: 16 bits
    /// an attacker can only guess (1 in 65 536, as uTP allows no more).
    fn initial_seq_nr(&self, key: &ConnKey) -> u16 {
        let count = self.isn_count.get();
        self.isn_count.set(count.wrapping_add(1));
        let mut h = self.isn_key.build_hasher();
        h.write_u64(count);
        key.hash(&mut h);
        h.finish() as u16
    }

    /// Reads datagrams for as long as the runtime runs. After each wake-up it drains what
    /// else the socket holds (up to `RECV_BATCH_MAX`, without waiting), feeds every
    /// datagram to its connection, and only then lets each touched connection transmit:
    /// one ack covers a batch of its packets (as libtorrent defers acks until its socket is
    /// drained), and the datagrams of the whole batch leave in `sendmmsg` calls.
    async fn recv_loop(self: Rc<Self>) {
        let mut buf = Vec::with_capacity(DATAGRAM_BYTES_MAX);
        let mut touched: Vec<Rc<Shared>> = Vec::new();
        loop {
            let (res, b) = self.socket.recv_from(buf).await;
            buf = b;
            let now = Instant::now();
            drain_batch(
                &mut buf,
                res,
                |b| recv_now(self.fd, b),
                |got| match got {
                    Ok((bytes, from)) => self.on_datagram(bytes, from, now, &mut touched),
                    Err(e) => {
                        // ICMP errors (ECONNREFUSED for a peer that went away) surface here on
                        // some kernels; they concern one peer, not the socket.
                        self.ctx.stats.utp_recv_errors.inc();
                        tracing::debug!("uTP recv: {e}");
                    }
                },
            );
            for sh in touched.drain(..) {
                sh.touched.set(false);
                self.after_event(&sh, now);
            }
            self.send_soon();
            buf.clear();
        }
    }

    /// The socket, for the worker's ring to receive on (`server/uring`).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// One datagram received by the worker's ring: demultiplexed as `recv_loop` does;
    /// the connections it touched transmit at `end_ring_batch`.
    pub(crate) fn on_ring_datagram(self: &Rc<Self>, bytes: &[u8], from: SocketAddr) {
        let now = match self.ring_batch_now.get() {
            Some(t) => t,
            None => {
                let t = Instant::now();
                self.ring_batch_now.set(Some(t));
                t
            }
        };
        let mut touched = std::mem::take(&mut *self.ring_touched.borrow_mut());
        self.on_datagram(bytes, from, now, &mut touched);
        let mut kept = self.ring_touched.borrow_mut();
        if kept.is_empty() {
            *kept = touched;
        } else {
            kept.append(&mut touched);
        }
    }

    /// A receive error the ring saw on this socket (ICMP errors for one peer).
    pub(crate) fn on_ring_recv_error(&self, e: io::Error) {
        self.ctx.stats.utp_recv_errors.inc();
        tracing::debug!("uTP recv: {e}");
    }

    /// The end of a batch of ring datagrams: every touched connection answers at once,
    /// one ack per batch of its packets, and the datagrams leave in `sendmmsg` calls.
    pub(crate) fn end_ring_batch(self: &Rc<Self>) {
        let batch_now = self.ring_batch_now.take();
        let touched = std::mem::take(&mut *self.ring_touched.borrow_mut());
        if touched.is_empty() {
            return;
        }
        let now = batch_now.unwrap_or_else(Instant::now);
        for sh in &touched {
            sh.touched.set(false);
            self.after_event(sh, now);
        }
        self.send_soon();
    }

    /// Sends the batch whenever `send_soon` asked for it: once per turn of the runtime,
    /// after the tasks woken before it (the sessions a receive batch woke) have queued
    /// their answers too.
    async fn send_loop(self: Rc<Self>) {
        loop {
            self.tx_queued.notified().await;
            self.send_now();
        }
    }

    /// Services connection timers for as long as the runtime runs.
    async fn timer_loop(self: Rc<Self>) {
        loop {
            let now = Instant::now();
            let due = {
                let conns = self.conns.borrow();
                self.timers
                    .borrow_mut()
                    .pop_due(now, |key| conns.get(&key).and_then(|sh| sh.scheduled.get()))
            };
            if let Some(key) = due {
                let shared = self.conns.borrow().get(&key).cloned();
                if let Some(sh) = shared {
                    sh.scheduled.set(None);
                    // The connection's own deadline may have moved later since this
                    // entry was pushed (an ack re-armed the RTO).
                    let due = sh.conn.borrow().next_timeout().is_some_and(|d| d <= now);
                    if due {
                        sh.conn.borrow_mut().on_timeout(now);
                    }
                    // So may the session's (a request moved its idle clock): it looks.
                    self.drive_session(&sh, now, |s, at| s.on_deadline(at));
                    self.after_event(&sh, now);
                    // Every timer due now queues its datagrams; one send takes them all.
                    self.send_soon();
                }
                continue;
            }
            let next = self.timers.borrow().next();
            match next {
                Some(t) => {
                    let sleep = monoio::time::sleep_until(monoio::time::Instant::from_std(t));
                    monoio::select! {
                        _ = sleep => {},
                        _ = self.timer_changed.notified() => {},
                    }
                }
                None => self.timer_changed.notified().await,
            }
        }
    }

    /// `now`: when the batch the datagram came in was read (one clock read per batch; the
    /// datagrams of a batch were all waiting in the socket by then).
    fn on_datagram(
        self: &Rc<Self>,
        bytes: &[u8],
        mut from: SocketAddr,
        now: Instant,
        touched: &mut Vec<Rc<Shared>>,
    ) {
        let stats = &self.ctx.stats;
        if let SocketAddr::V6(v6) = &mut from {
            // The flow label is not part of who the peer is (it may differ per packet).
            v6.set_flowinfo(0);
        }
        stats.utp_datagrams_received.inc();
        let pkt = match utp::decode(bytes) {
            Ok(p) => p,
            Err(_) => {
                if self.to_dht(bytes, from) {
                    return;
                }
                // Not uTP (noise, a DHT query with the DHT elsewhere): ignore silently.
                stats.utp_datagrams_invalid.inc();
                return;
            }
        };
        // A packet may ack, and so free, chunks the queued batch points into.
        self.send_queued();
        let id = pkt.header.connection_id;
        let existing = self.conns.borrow().get(&(from, id)).cloned();
        if let Some(sh) = existing {
            sh.conn.borrow_mut().on_packet(&pkt, now);
            touch(sh, touched);
            return;
        }
        match pkt.header.ty {
            PacketType::Syn => {
                // A retransmitted SYN for a connection we have (our SYN-ACK was lost) is
                // filed under the id we receive on: the SYN's id + 1.
                let key = (from, id.wrapping_add(1));
                let existing = self.conns.borrow().get(&key).cloned();
                match existing {
                    Some(sh) => {
                        sh.conn.borrow_mut().on_packet(&pkt, now);
                        touch(sh, touched);
                    }
                    None => {
                        if let Some(sh) = self.accept(&pkt, key, now) {
                            touch(sh, touched);
                        }
                    }
                }
            }
            // Nothing to reset.
            PacketType::Reset => {}
            _ => {
                // A packet for a connection we do not know (we restarted, or it timed
                // out): a RESET tells the peer at once instead of after its timeouts. It
                // is 20 bytes, never more than the packet that asked for it.
                stats.utp_resets_sent.inc();
                let mut reset = [0u8; 20];
                utp::reset_for(&pkt.header, &mut reset);
                self.send_bytes(&socket2::SockAddr::from(from), &reset);
            }
        }
    }

    /// The DHT on the serving port, demultiplexed as libtorrent's `on_udp_packet` does:
    /// only a datagram uTP refused, and only one that looks like KRPC, goes to the DHT
    /// node's thread (a copy into its inbox; never waits). True when handed over.
    fn to_dht(&self, bytes: &[u8], from: SocketAddr) -> bool {
        match &self.dht {
            Some(inlet) if crate::upstream::dht::looks_like_krpc(bytes) => {
                inlet.deliver(from, bytes);
                true
            }
            _ => false,
        }
    }

    /// A new connection from a SYN, or None when it is refused.
    fn accept(
        self: &Rc<Self>,
        syn: &utp::Packet<'_>,
        key: ConnKey,
        now: Instant,
    ) -> Option<Rc<Shared>> {
        let stats = &self.ctx.stats;
        if !self.accepting.get() {
            return None; // shutting down
        }
        if self.half_open.get() >= self.settings.half_open_per_core_max {
            // A SYN flood (likely spoofed): no answer at all, so nothing is reflected.
            stats.utp_syns_refused_half_open.inc();
            return None;
        }
        let permit = match self.limiter.try_admit(key.0.ip()) {
            Ok(p) => p,
            Err(refusal) => {
                refusal.counter(stats).inc();
                let mut reset = [0u8; 20];
                utp::reset_for(&syn.header, &mut reset);
                self.send_bytes(&socket2::SockAddr::from(key.0), &reset);
                return None;
            }
        };
        let isn = self.initial_seq_nr(&key);
        let conn = Connection::accept(self.settings.utp.clone(), syn, isn, now);
        debug_assert_eq!(conn.recv_id(), key.1);
        let sh = Rc::new(Shared {
            key,
            conn: RefCell::new(conn),
            to: socket2::SockAddr::from(key.0),
            scheduled: Cell::new(None),
            session: RefCell::new(Session::NotStarted),
            touched: Cell::new(false),
            _permit: permit,
        });
        self.conns.borrow_mut().insert(key, sh.clone());
        self.half_open.set(self.half_open.get() + 1);
        stats.utp_syns_accepted.inc();
        Some(sh)
    }

    /// After anything happened to a connection: start its session once established, let
    /// the session handle what arrived (its answer goes into the send queue before the
    /// ack of the request is built, so the answer carries it), queue what the connection
    /// wants sent, re-arm its timer, or let it go. Datagrams go into the endpoint's send
    /// batch; the caller sends it (`send_soon`).
    fn after_event(self: &Rc<Self>, sh: &Rc<Shared>, now: Instant) {
        if matches!(*sh.session.borrow(), Session::NotStarted) {
            let ready = {
                let c = sh.conn.borrow();
                c.is_established() && !c.is_closed()
            };
            if ready {
                self.start_session(sh);
            }
        }
        let news = match &*sh.session.borrow() {
            Session::Running(s) => s.has_news(&sh.conn.borrow()),
            _ => false,
        };
        if news {
            self.drive_session(sh, now, |_, _| true);
        }
        self.flush(sh, now);
        let (closed, mut next) = {
            let c = sh.conn.borrow();
            (c.is_closed(), c.next_timeout())
        };
        if closed && !sh.session.borrow().is_running() {
            self.remove(sh);
            return;
        }
        if let Session::Running(s) = &*sh.session.borrow() {
            let at = s.deadline().into_std();
            next = Some(next.map_or(at, |t| t.min(at)));
        }
        if let Some(t) = next {
            if sh.scheduled.get().is_none_or(|s| t < s) {
                sh.scheduled.set(Some(t));
                let conns = self.conns.borrow();
                let earliest = self
                    .timers
                    .borrow_mut()
                    .schedule(t, sh.key, conns.len(), |key| {
                        conns.get(&key).and_then(|c| c.scheduled.get())
                    });
                if earliest {
                    self.timer_changed.notify();
                }
            }
        }
    }

    /// The peer acked our SYN-ACK: the connection leaves the half-open count and gets its
    /// session.
    fn start_session(&self, sh: &Shared) {
        self.half_open.set(self.half_open.get() - 1);
        self.ctx.stats.utp_connections_established.inc();
        let open = OpenSession::new(self.open.clone());
        *sh.session.borrow_mut() =
            Session::Running(UtpSession::new(self.ctx.clone(), sh.key.0, open));
    }

    /// Applies `event` to the connection's session and drives it (`UtpSession::drive`). A
    /// session that ends (or panics: a bug, counted, that closes this connection only) is
    /// dropped and the connection closed: our FIN follows whatever is still queued, and the
    /// endpoint keeps the connection until the FIN is acked or its retransmissions run out.
    fn drive_session(
        self: &Rc<Self>,
        sh: &Rc<Shared>,
        now: Instant,
        event: impl FnOnce(&mut UtpSession, monoio::time::Instant) -> bool,
    ) {
        let mut slot = sh.session.borrow_mut();
        let Session::Running(session) = &mut *slot else {
            return;
        };
        let mut conn = sh.conn.borrow_mut();
        let at = monoio::time::Instant::from_std(now);
        let stats = &self.ctx.stats;
        let mut scratch = self.scratch.borrow_mut();
        let running = crate::server::contain_panic(stats, "session", || {
            event(session, at)
                && session.drive(&mut conn, &mut scratch, at, |work| self.off_core(sh, work))
        });
        if running == Some(true) {
            return;
        }
        if running.is_none() {
            session.end(SessionEnd::ProtocolError);
        }
        *slot = Session::Gone;
        stats.connections_closed.inc();
        conn.close(now);
    }

    /// Runs a session's work off the core as a task; its result drives the session again.
    fn off_core(self: &Rc<Self>, sh: &Rc<Shared>, work: OffCore) {
        let ep = self.clone();
        let sh = sh.clone();
        monoio::spawn(async move {
            let finished = utp_session::run_off_core(&ep.ctx, work).await;
            if !sh.session.borrow().is_running() {
                return; // ended meanwhile
            }
            let now = Instant::now();
            ep.drive_session(&sh, now, |s, _| {
                s.on_off_core(finished);
                true
            });
            ep.after_event(&sh, now);
            ep.send_soon();
        });
    }

    fn remove(&self, sh: &Rc<Shared>) {
        if self.conns.borrow_mut().remove(&sh.key).is_none() {
            return;
        }
        // Queued datagrams may point into this connection's chunks and address, which go
        // with it: it lives until they are sent.
        if !self.tx.borrow().is_empty() {
            self.retired.borrow_mut().push(sh.clone());
        }
        if matches!(*sh.session.borrow(), Session::NotStarted) {
            self.half_open.set(self.half_open.get() - 1);
            self.ctx.stats.utp_connect_timeouts.inc();
        }
        let c = sh.conn.borrow();
        let s = c.stats();
        let stats = &self.ctx.stats;
        stats.utp_packets_sent.add(s.packets_sent);
        stats.utp_packets_received.add(s.packets_received);
        stats.utp_retransmits.add(s.retransmits);
        stats.utp_payload_bytes_sent.add(s.payload_bytes_sent);
        stats
            .utp_payload_bytes_received
            .add(s.payload_bytes_received);
        if let Some(rtt) = s.rtt {
            stats.utp_rtt.record(rtt);
        }
        stats.utp_connections_closed.inc();
        // Its timer-heap entries are stale now and skipped when they come up.
    }

    /// Queues every datagram the connection has ready in the endpoint's send batch (sent
    /// when full, and by whoever handled the event, at its end).
    fn flush(&self, sh: &Shared, now: Instant) {
        let mut conn = sh.conn.borrow_mut();
        let mut tx = self.tx.borrow_mut();
        while conn
            .poll_transmit_with(now, |t| {
                if tx.is_full() {
                    self.send_batch(&mut tx);
                }
                tx.push(&sh.to, t);
            })
            .is_some()
        {}
    }

    /// Sends the queued datagrams now.
    fn send_now(&self) {
        self.send_batch(&mut self.tx.borrow_mut());
    }

    /// Sends the queued datagrams, if any, now.
    fn send_queued(&self) {
        let queued = !self.tx.borrow().is_empty();
        if queued {
            self.send_now();
        }
    }

    /// Sends the queued datagrams at the end of this turn (`send_loop`).
    fn send_soon(&self) {
        if !self.tx.borrow().is_empty() {
            self.tx_queued.notify();
        }
    }

    fn send_batch(&self, tx: &mut TxBatch) {
        if !tx.send(self.fd, &self.ctx.stats) {
            tx.gso = false;
            tracing::warn!(
                "uTP: the kernel refused a UDP GSO send (no checksum offload, or a payload \
                 larger than the path MTU); sending one datagram per packet from now on"
            );
        }
        // Nothing points into the removed connections any more.
        let retired = std::mem::take(&mut *self.retired.borrow_mut());
        drop(retired);
    }

    fn send_bytes(&self, to: &socket2::SockAddr, bytes: &[u8]) {
        let iov = [libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        }];
        self.sendmsg(to, &iov);
    }

    /// One datagram, gathered from `iov`. Failures are counted and the datagram is lost
    /// (uTP retransmits); the socket is non-blocking, so this never waits.
    fn sendmsg(&self, to: &socket2::SockAddr, iov: &[libc::iovec]) {
        // SAFETY: an all-zero msghdr is a valid empty one; every pointer set below stays
        // valid for the duration of the call (borrowed from `to` and `iov`).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` describes live buffers; the kernel only reads them.
        let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            self.ctx.stats.utp_send_errors.inc();
            tracing::trace!("uTP sendmsg: {}", io::Error::last_os_error());
        } else {
            self.ctx.stats.utp_datagrams_sent.inc();
        }
    }
}

/// Spawns the endpoint's loops on the current runtime. They run as long as the runtime:
/// during the shutdown grace time open connections still need their acks and
/// retransmissions; `stop` only ends the admission of new connections. With
/// `on_ring`, the worker's ring receives the datagrams instead of `recv_loop`.
pub fn spawn_endpoint(ep: Rc<Endpoint>, stop: flume::Receiver<()>, on_ring: bool) {
    if !on_ring {
        monoio::spawn(ep.clone().recv_loop());
    }
    monoio::spawn(ep.clone().timer_loop());
    monoio::spawn(ep.clone().send_loop());
    monoio::spawn(async move {
        let _ = stop.recv_async().await;
        ep.accepting.set(false);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppendOptions, Store, StoreOptions, SyncPolicy};
    use crate::utp::Packet;
    use crate::wire::{encode_metadata_data_header, metadata_piece_count, metadata_piece_range};

    fn datagram(ty: PacketType, connection_id: u16, seq_nr: u16, ack_nr: u16) -> Vec<u8> {
        use crate::utp::sim_tests::{dgram, hdr};
        dgram(hdr(ty, connection_id, seq_nr, ack_nr), None, &[])
    }

    /// Accepted from a SYN (id 100, seq 500) with our seq 7000, and acked as libtorrent
    /// does (ack = our SYN-ACK's seq - 1).
    fn established(now: Instant) -> Connection<OutBatch> {
        let syn = datagram(PacketType::Syn, 100, 500, 0);
        let syn: Packet<'_> = utp::decode(&syn).unwrap();
        let mut c = Connection::accept(utp::Config::default(), &syn, 7000, now);
        while c.poll_transmit(now).is_some() {}
        let ack = datagram(PacketType::State, 101, 501, 6999);
        c.on_packet(&utp::decode(&ack).unwrap(), now);
        assert!(c.is_established());
        c
    }

    /// The receive loop's batches: at most `RECV_BATCH_MAX` a round, every datagram read is
    /// handed on (one dropped at the batch edge cost a client a 500 ms RTO), and what is
    /// left stays queued for the next round.
    #[test]
    fn drain_batch_hands_on_every_datagram_it_reads() {
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut queue: std::collections::VecDeque<u8> = (0..=199).collect();
        let mut seen = Vec::new();
        let mut buf = Vec::with_capacity(16);
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            let mut recv = |b: &mut Vec<u8>| match queue.pop_front() {
                Some(v) => {
                    b.clear();
                    b.push(v);
                    Ok((1, from))
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
            let first = recv(&mut buf);
            let handled = drain_batch(&mut buf, first, recv, |got| {
                seen.push(got.unwrap().0[0]);
            });
            assert!(handled <= RECV_BATCH_MAX);
        }
        assert_eq!(seen, (0..=199).collect::<Vec<u8>>(), "none lost, in order");
        assert_eq!(rounds, 200_usize.div_ceil(RECV_BATCH_MAX));
    }

    /// A `Transmit` of `payload` bytes (a 20-byte header numbered `seq`).
    fn transmit(seq: u16, payload: &[u8]) -> utp::Transmit<'_> {
        let mut t = utp::Transmit {
            header: [0; utp::HEADER_BYTES_MAX],
            header_len: utp::HEADER_LEN,
            payload: [std::io::IoSlice::new(&[]); utp::PACKET_SLICES_MAX],
            payload_slices: 1,
        };
        t.header[..2].copy_from_slice(&seq.to_be_bytes());
        t.payload[0] = std::io::IoSlice::new(payload);
        t
    }

    /// Sizes of each message's packets, as the kernel will cut them.
    fn message_shapes(tx: &TxBatch) -> Vec<(usize, u64)> {
        (0..tx.len)
            .map(|i| {
                let m = &tx.msgs[i].msg_hdr;
                let total: usize = (0..m.msg_iovlen)
                    .map(|k| unsafe { (*m.msg_iov.add(k)).iov_len })
                    .sum();
                (total, tx.packets_in(i))
            })
            .collect()
    }

    /// GSO runs: equal packets to one peer share a message, a shorter one ends it, a
    /// longer one or another peer starts the next, and no message passes the kernel's
    /// 64 segments or 65 507 bytes. Without GSO every packet is a message.
    #[test]
    fn gso_groups_equal_packets_to_one_peer_and_ends_a_run_at_a_short_one() {
        let a = socket2::SockAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap());
        let b = socket2::SockAddr::from("127.0.0.1:2".parse::<SocketAddr>().unwrap());
        let full = vec![7u8; 1400];
        let mut tx = TxBatch::new(true);
        for seq in 0..50 {
            tx.push(&a, &transmit(seq, &full));
        }
        tx.push(&a, &transmit(50, &full[..300])); // the burst's short tail
        tx.push(&a, &transmit(51, &full[..300])); // may not follow a short one
        tx.push(&b, &transmit(0, &full)); // another peer
        tx.push(&b, &transmit(1, &[])); // an ack after data: shorter, joins as the tail
        tx.push(&b, &transmit(2, &full)); // longer than the run's tail: a new message
                                          // 65 507 / 1420 = 46 packets fit; the 47th starts a message.
        assert_eq!(
            message_shapes(&tx),
            vec![
                (46 * 1420, 46),
                (4 * 1420 + 320, 5),
                (320, 1),
                (1420 + 20, 2),
                (1420, 1)
            ]
        );
        assert_eq!(tx.packets, 55);

        let mut plain = TxBatch::new(false);
        for seq in 0..3 {
            plain.push(&a, &transmit(seq, &full));
        }
        assert_eq!(message_shapes(&plain), vec![(1420, 1); 3]);
        assert!((0..plain.len).all(|i| plain.msgs[i].msg_hdr.msg_controllen == 0));
    }

    /// On a real socket: a GSO send of a burst arrives as the original datagrams, each
    /// with its own header and payload, in order; counted as packets, and as one GSO send.
    #[test]
    fn a_gso_burst_arrives_as_its_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let tx_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket2::SockAddr::from(rx.local_addr().unwrap());
        let payloads: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; if i == 9 { 100 } else { 1400 }])
            .collect();
        // A second peer in the batch: the core is busy, the burst keeps GSO.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        other
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to_other = socket2::SockAddr::from(other.local_addr().unwrap());
        for several_peers in [true, false] {
            let mut tx = TxBatch::new(true);
            for (i, p) in payloads.iter().enumerate() {
                tx.push(&to, &transmit(i as u16, p));
            }
            assert_eq!(tx.len, 1, "one GSO message");
            if several_peers {
                tx.push(&to_other, &transmit(77, &payloads[0]));
            }
            let stats = crate::server::stats::CoreStats::default();
            assert!(tx.send(tx_sock.as_raw_fd(), &stats), "the kernel took GSO");
            assert_eq!(
                stats.utp_datagrams_sent.get(),
                10 + u64::from(several_peers)
            );
            // One peer's burst alone goes as separate datagrams (`ungroup_single_peer`).
            assert_eq!(stats.utp_gso_sends.get(), u64::from(several_peers));
            let mut buf = [0u8; 4096];
            for (i, p) in payloads.iter().enumerate() {
                let n = rx.recv(&mut buf).expect("each packet arrives on its own");
                assert_eq!(n, utp::HEADER_LEN + p.len(), "datagram {i}");
                assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), i as u16);
                assert!(buf[utp::HEADER_LEN..n].iter().all(|&b| b == i as u8));
            }
            if several_peers {
                let n = other.recv(&mut buf).unwrap();
                assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), 77);
                assert_eq!(n, utp::HEADER_LEN + 1400);
            }
        }
    }

    /// The zero-copy claim over uTP: a DATA packet's payload slices point into the
    /// segment's mapping (the BEP 9 header is the only user-space byte range), and the
    /// retransmission after a timeout points at exactly the same bytes again.
    #[test]
    fn utp_packets_point_into_the_mmap_and_retransmissions_point_there_again() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            sync: SyncPolicy::Batch,
            ..StoreOptions::default()
        };
        let (store, _) = Store::open(dir.path(), opts).unwrap();
        let info = crate::metainfo::synthetic_v1_info(2000);
        let record = store
            .append(&info, AppendOptions::default())
            .unwrap()
            .record()
            .clone();
        let mapping = record.segment().mapping_range();
        let mut batch = OutBatch::new();
        for piece in 0..metadata_piece_count(record.len()) as u32 {
            let range = metadata_piece_range(record.len(), piece).unwrap();
            encode_metadata_data_header(batch.head(), 3, piece, record.len() as u64, range.len());
            batch.push_payload(&record, range);
        }
        batch.seal();
        let total = batch.sealed_len();

        let now = Instant::now();
        let mut c = established(now);
        c.write(batch);
        let mut first = Vec::new();
        let mut in_mmap = 0usize;
        while let Some(t) = c.poll_transmit(now) {
            let seq = u16::from_be_bytes([t.header[16], t.header[17]]);
            let slices: Vec<(usize, usize)> = t
                .payload()
                .iter()
                .map(|s| (s.as_ptr() as usize, s.len()))
                .collect();
            for &(base, len) in &slices {
                if mapping.contains(&base) {
                    assert!(base + len <= mapping.end);
                    in_mmap += len;
                } else {
                    assert!(len < 64, "only BEP 9 headers live outside the mmap");
                }
            }
            first.push((seq, slices));
        }
        assert!(!first.is_empty() && in_mmap > 0);
        assert!(in_mmap <= info.len() && total > info.len());

        // No ack: the first packet goes again after the RTO, from the same addresses.
        let later = c.next_timeout().expect("an RTO is armed");
        c.on_timeout(later);
        let t = c.poll_transmit(later).expect("a retransmission");
        let seq = u16::from_be_bytes([t.header[16], t.header[17]]);
        let slices: Vec<(usize, usize)> = t
            .payload()
            .iter()
            .map(|s| (s.as_ptr() as usize, s.len()))
            .collect();
        let original = first
            .iter()
            .find(|(s, _)| *s == seq)
            .expect("the retransmission repeats a sent packet");
        assert_eq!(
            &original.1, &slices,
            "same iovecs as the first transmission"
        );
        assert!(c.stats().retransmits >= 1);
    }
}
