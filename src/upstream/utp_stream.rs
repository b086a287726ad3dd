//! An outgoing uTP connection on monoio: one UDP socket per connection (an ephemeral
//! port of the peer's family, `connect`ed to the peer, so the kernel filters other
//! sources and reports ICMP port-unreachable as `ConnectionRefused`), driving a sans-IO
//! [`Connection`]. Used by the miss path (`peer::fetch_from_peer`), the load generator and
//! tests; the server's accept side has its own per-core driver.
//!
//! Every async method services the connection while it waits: received datagrams go to
//! the connection, its retransmission timer fires, and whatever it wants sent is sent
//! (copied into one buffer: the client side is not the zero-copy path). Datagrams that
//! are already queued are read in one go and acked once, as libtorrent does. Nothing runs
//! between calls, which is fine for a client that only waits inside them.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::udp::UdpSocket;
use monoio::time::Instant;

use crate::utp::{decode, CloseReason, Config, Connection, State};

/// One datagram: the largest payload a magnetar server may be set to send
/// (`--utp-payload-bytes` up to `PAYLOAD_BYTES_MAX`, for jumbo frames and loopback) plus
/// headers; covers anything an MTU-sized peer sends (libtorrent probes up to its path
/// MTU). One such buffer per connection.
const DATAGRAM_BYTES_MAX: usize = crate::utp::PAYLOAD_BYTES_MAX + crate::utp::HEADER_BYTES_MAX;

/// Datagrams handed to the connection in one drain before its acks go out: bounds the
/// time between a datagram's arrival and its ack on a flooded socket (64 × 1.4 KB ≈ one
/// metadata piece and a half per ack at worst).
const DRAIN_DATAGRAMS_MAX: usize = 64;

/// `write_all` returns once no more than this is written but unacked: bounds the
/// memory a fast writer can pin behind a slow peer (a full receive window of ours).
pub const SEND_BACKLOG_BYTES_MAX: usize = 256 * 1024;

/// `close` waits this long for the FIN to be acked before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

pub struct UtpStream {
    sock: Rc<UdpSocket>,
    conn: Connection<Vec<u8>>,
    /// Receive buffer, when no receive holds it.
    rbuf: Vec<u8>,
    /// The receive a timer won over, still in flight: it is polled again at the next
    /// wait rather than dropped, because on io_uring a receive that completes as it is
    /// cancelled takes its datagram with it (a loss the peer must time out on).
    pending: Option<PendingRecv>,
}

type PendingRecv = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<u8>)>>>;

enum Event {
    Datagram(io::Result<usize>, Vec<u8>),
    Timer,
}

/// A random u64 from the standard library's per-process hasher keys (no RNG crate).
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

fn closed_error(reason: CloseReason) -> io::Error {
    match reason {
        CloseReason::ResetByPeer => io::ErrorKind::ConnectionReset.into(),
        CloseReason::TimedOut | CloseReason::ConnectTimeout => {
            io::Error::new(io::ErrorKind::TimedOut, "uTP peer stopped answering")
        }
        CloseReason::Aborted => io::ErrorKind::ConnectionAborted.into(),
        CloseReason::Graceful => io::ErrorKind::NotConnected.into(),
    }
}

impl UtpStream {
    /// Sends a SYN to `addr` and waits for the SYN-ACK (SYN retransmissions included).
    pub async fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<UtpStream> {
        UtpStream::connect_from(addr, None, deadline).await
    }

    /// `connect` from the local address `source` (any port) when given: a load generator
    /// spreads connections over 127.0.0.x sources, each with its own per-IP budget.
    pub async fn connect_from(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
        deadline: Instant,
    ) -> io::Result<UtpStream> {
        let local: SocketAddr = match source {
            Some(ip) => (ip, 0).into(),
            None if addr.is_ipv4() => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            None => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local)?;
        sock.connect(addr).await?;
        let r = random_u64();
        let conn = Connection::connect(
            Config::default(),
            r as u16,
            (r >> 16) as u16,
            Instant::now().into_std(),
        );
        let mut s = UtpStream {
            sock: Rc::new(sock),
            conn,
            rbuf: Vec::with_capacity(DATAGRAM_BYTES_MAX),
            pending: None,
        };
        while s.conn.state() == State::SynSent {
            s.step(deadline).await?;
        }
        if let State::Closed(reason) = s.conn.state() {
            return Err(match reason {
                CloseReason::TimedOut => io::Error::new(io::ErrorKind::TimedOut, "no uTP SYN-ACK"),
                CloseReason::ResetByPeer => io::ErrorKind::ConnectionRefused.into(),
                r => closed_error(r),
            });
        }
        Ok(s)
    }

    pub fn stats(&self) -> &crate::utp::ConnStats {
        self.conn.stats()
    }

    /// Appends what arrived to `buf`; 0 = the peer closed its side (FIN).
    pub async fn read(&mut self, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
        loop {
            let r = self.conn.readable();
            if !r.is_empty() {
                buf.extend_from_slice(r);
                let n = r.len();
                self.conn.consume(n);
                // Consuming may reopen our window: say so now.
                self.flush().await?;
                return Ok(n);
            }
            if self.conn.is_read_closed() {
                return Ok(0);
            }
            if let State::Closed(reason) = self.conn.state() {
                return Err(closed_error(reason));
            }
            self.step(deadline).await?;
        }
    }

    /// Queues `bytes`; returns once at most `SEND_BACKLOG_BYTES_MAX` is unacked.
    pub async fn write_all(&mut self, bytes: Vec<u8>, deadline: Instant) -> io::Result<()> {
        if let State::Closed(reason) = self.conn.state() {
            return Err(closed_error(reason));
        }
        self.conn.write(bytes);
        self.flush().await?;
        while self.conn.send_backlog_bytes() > SEND_BACKLOG_BYTES_MAX {
            if let State::Closed(reason) = self.conn.state() {
                return Err(closed_error(reason));
            }
            self.step(deadline).await?;
        }
        Ok(())
    }

    /// FIN after everything written; waits up to `CLOSE_LINGER` for it to be acked and for
    /// the peer's FIN (acked in turn). Leaving as soon as our FIN is acked would leave the
    /// peer's FIN unacked: it retransmits to a closed port and holds the connection until
    /// its own FIN wait runs out (a magnetar server: `utp::FIN_WAIT_MAX`).
    pub async fn close(mut self) {
        self.conn.close(Instant::now().into_std());
        let linger = Instant::now() + CLOSE_LINGER;
        while !self.conn.is_closed() {
            if self.step(linger).await.is_err() {
                break;
            }
        }
        let _ = self.flush().await;
    }

    /// Ends the connection at once with a RESET (one datagram, not waited on): for a peer
    /// we give up on, whose side may still be open.
    pub async fn abort(mut self) {
        self.conn.abort();
        let _ = self.flush().await;
    }

    /// Sends everything the connection has to send: a plain non-blocking `send` per
    /// datagram (a UDP send does not wait for the peer; a ring round trip per ack costs more
    /// than the syscall it replaces).
    async fn flush(&mut self) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        loop {
            let now = Instant::now().into_std();
            let Some(t) = self.conn.poll_transmit(now) else {
                return Ok(());
            };
            let dgram = t.to_vec();
            // SAFETY: `dgram` is a live buffer of its length; `fd` is our connected socket.
            let n =
                unsafe { libc::send(fd, dgram.as_ptr().cast(), dgram.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    // The kernel's send buffer is full: the datagram is lost, which the
                    // connection recovers from like any loss.
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
    }

    /// Hands every datagram already queued on the socket to the connection without
    /// waiting, at most `DRAIN_DATAGRAMS_MAX`. The acks they call for go out once, after
    /// the drain, as libtorrent does (`utp_socket_manager::socket_drained`: "to avoid
    /// sending an ack for every single packet").
    fn drain(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        for _ in 0..DRAIN_DATAGRAMS_MAX {
            // SAFETY: `buf` has `capacity()` writable bytes; `fd` is our socket.
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.capacity(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(e),
                };
            }
            let n = n as usize;
            // SAFETY: the kernel wrote `n` ≤ capacity bytes.
            unsafe { buf.set_len(n) };
            if let Ok(pkt) = decode(&buf[..n]) {
                self.conn.on_packet(&pkt, Instant::now().into_std());
            }
        }
        Ok(())
    }

    /// Sends what is due, then waits for one datagram or the next timer (or `deadline`).
    async fn step(&mut self, deadline: Instant) -> io::Result<()> {
        self.flush().await?;
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "uTP deadline"));
        }
        let wake = match self.conn.next_timeout() {
            Some(t) => Instant::from_std(t).min(deadline),
            None => deadline,
        };
        let recv = self.pending.get_or_insert_with(|| {
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.clear();
            if buf.capacity() < DATAGRAM_BYTES_MAX {
                buf.reserve(DATAGRAM_BYTES_MAX);
            }
            let sock = self.sock.clone();
            Box::pin(async move { sock.recv(buf).await })
        });
        let event = monoio::select! {
            (res, buf) = recv.as_mut() => Event::Datagram(res, buf),
            _ = monoio::time::sleep_until(wake) => Event::Timer,
        };
        let now = Instant::now().into_std();
        match event {
            Event::Datagram(res, buf) => {
                self.pending = None;
                let n = res?;
                if let Ok(pkt) = decode(&buf[..n]) {
                    self.conn.on_packet(&pkt, now);
                }
                let mut buf = buf;
                let drained = self.drain(&mut buf);
                self.rbuf = buf;
                drained?;
            }
            // The receive stays in flight (`pending`).
            Event::Timer => self.conn.on_timeout(now),
        }
        self.flush().await
    }
}
