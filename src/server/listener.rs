//! Listening sockets, bound on the main thread before any worker starts so that a bad
//! address fails start-up with a clear error, and `:0` resolves to one port shared by
//! all workers.
//!
//! Socket activation (`LISTEN_FDS`, e.g. `magnetar.socket`): systemd binds each address
//! once, so there is one socket and one accept queue per address, not one per worker. Each
//! worker gets a `dup` of it (a runtime registers its own fd) and all accept loops share the
//! queue: whichever core is free takes the next connection. That loses SO_REUSEPORT's
//! hashing of connections over cores (and, under epoll, every idle worker wakes per
//! connection), which is why binding our own sockets stays the default; socket activation
//! buys binding privileged ports without privileges and restarts that keep the queue.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};

use socket2::{Domain, Protocol, Socket, Type};

pub struct BoundSockets {
    /// The addresses actually bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    /// For each worker, one listener per address.
    pub per_worker: Vec<Vec<std::net::TcpListener>>,
    /// For each worker, one uTP (UDP) socket per address, on the same port number as the
    /// TCP listener (clients dial uTP and TCP at the same `x.pe` address); empty with
    /// `--utp off`.
    pub udp_per_worker: Vec<Vec<std::net::UdpSocket>>,
}

/// How often `bind_all` picks a new port for a `:0` address whose TCP port turned out to be
/// taken for UDP (the kernel chose the TCP port without looking at UDP).
const EPHEMERAL_PORT_ATTEMPTS_MAX: usize = 16;

/// One worker's UDP socket for uTP. SO_REUSEPORT on a datagram socket: the kernel picks
/// the socket by a hash of the 4-tuple, so every datagram of one peer address reaches the
/// same worker, and a uTP connection never moves between cores (docs/transports.md).
fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    set_udp_buffers(&socket, buffer_bytes);
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One UDP socket per worker on exactly `addr` (its port already chosen).
fn bind_udp_group(
    addr: SocketAddr,
    workers: usize,
    buffer_bytes: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    (0..workers).map(|_| bind_udp(addr, buffer_bytes)).collect()
}

/// Receive and send buffers of a uTP socket. One socket carries every uTP peer of its
/// core, so the kernel's default (net.core.rmem_default, ~208 KiB: a few hundred small
/// datagrams) overflows under a burst of acks and requests from many peers, and every
/// overflow is a loss that costs a retransmission timeout. The kernel caps SO_RCVBUF at
/// net.core.rmem_max; with CAP_NET_ADMIN the FORCE variants pass the cap, otherwise we
/// keep what the kernel allows and say how to raise it (tuning/99-magnetar.conf).
fn set_udp_buffers(socket: &Socket, bytes: usize) {
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
    // Linux reports twice what was granted (its bookkeeping overhead).
    let short = |got: io::Result<usize>| got.map_or(true, |g| g / 2 < bytes);
    let force = |opt: libc::c_int| {
        let v = bytes.min(i32::MAX as usize) as libc::c_int;
        // Without CAP_NET_ADMIN this fails; what the kernel granted is checked below.
        let _ = set_int_option(socket.as_raw_fd(), libc::SOL_SOCKET, opt, v);
    };
    if short(socket.recv_buffer_size()) {
        force(libc::SO_RCVBUFFORCE);
    }
    if short(socket.send_buffer_size()) {
        force(libc::SO_SNDBUFFORCE);
    }
    if short(socket.recv_buffer_size()) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                wanted = bytes,
                got = socket.recv_buffer_size().unwrap_or(0) / 2,
                "uTP socket receive buffer capped by net.core.rmem_max; raise it (tuning/99-magnetar.conf) or datagrams are dropped under load"
            )
        });
    }
}

fn bind_one(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Every worker binds the same address; the kernel balances accepts across them.
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` on the same port must not collide.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux): a reply batch is
    // one write, and Nagle would hold a small one back behind an unacknowledged one. The
    // io_uring path needs it here: its sockets are direct descriptors, which setsockopt(2)
    // cannot reach.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// uTP sockets: `None` with `--utp off`, else the buffer bytes each socket asks for.
pub type UdpBuffers = Option<usize>;

pub fn bind_all(
    addrs: &[SocketAddr],
    workers: usize,
    backlog: i32,
    utp: UdpBuffers,
) -> io::Result<BoundSockets> {
    let workers = workers.max(1);
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut udp_per_worker: Vec<Vec<std::net::UdpSocket>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for &addr in addrs {
        let cannot =
            |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
        let mut attempts = 0;
        let (first, udp) = loop {
            let first = bind_one(addr, backlog).map_err(cannot)?;
            let Some(buffer_bytes) = utp else {
                break (first, Vec::new());
            };
            let bound = first.local_addr()?;
            match bind_udp_group(bound, workers, buffer_bytes) {
                Ok(udp) => break (first, udp),
                // `:0`: the port the kernel gave TCP is taken for UDP; try another.
                Err(e) if addr.port() == 0 && attempts < EPHEMERAL_PORT_ATTEMPTS_MAX => {
                    attempts += 1;
                    tracing::debug!(%bound, "UDP port taken ({e}); choosing another port");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot listen for uTP on udp {bound}: {e} (--utp off serves TCP only)"
                        ),
                    ))
                }
            }
        };
        let bound = first.local_addr()?;
        local_addrs.push(bound);
        per_worker[0].push(first);
        for (worker, socket) in udp.into_iter().enumerate() {
            udp_per_worker[worker].push(socket);
        }
        for listeners in per_worker.iter_mut().skip(1) {
            listeners.push(
                bind_one(bound, backlog).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {bound}: {e}"))
                })?,
            );
        }
    }
    Ok(BoundSockets {
        local_addrs,
        per_worker,
        udp_per_worker,
    })
}

/// The `FileDescriptorName=` of the public HTTP listener's socket unit
/// (`magnetar-http.socket`); every other name (or none) is a BitTorrent peer socket.
pub const HTTP_FD_NAME: &str = "http";

/// The listening sockets systemd passed, by what they serve.
#[derive(Default)]
pub struct Inherited {
    /// BitTorrent peers (`magnetar.socket`).
    pub peer: Vec<std::net::TcpListener>,
    /// The public HTTP listener (`magnetar-http.socket`, named `HTTP_FD_NAME`).
    pub http: Vec<std::net::TcpListener>,
}

/// The listening sockets systemd passed (`LISTEN_FDS`, checked against `LISTEN_PID`, sorted
/// by `LISTEN_FDNAMES`), or none. Call once, before threads start: the descriptors are taken
/// over (and set close-on-exec).
pub fn inherited_from_systemd() -> io::Result<Inherited> {
    let mut out = Inherited::default();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: systemd hands these descriptors to this process (LISTEN_PID matched) and
        // nothing else in the process owns them; we take ownership exactly once.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        let is_tcp_listener = socket.r#type().ok() == Some(Type::STREAM)
            && socket.is_listener().unwrap_or(false)
            && socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some();
        if !is_tcp_listener {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} from systemd is not a listening TCP socket (check ListenStream= in magnetar.socket)"),
            ));
        }
        socket.set_nonblocking(true)?;
        if name == HTTP_FD_NAME {
            out.http.push(socket.into());
        } else {
            out.peer.push(socket.into());
        }
    }
    Ok(out)
}

/// One `dup` of every inherited listener per worker (see the module doc for why shared).
///
/// uTP: the UDP sockets are bound here on the same addresses, one per worker with
/// SO_REUSEPORT as without socket activation. A UDP socket from systemd (`ListenDatagram=`)
/// would be one socket shared by all workers, and a uTP connection's datagrams would land
/// on any core; its state lives on one. A privileged port needs CAP_NET_BIND_SERVICE for
/// our own bind, or `--utp off`.
pub fn share_inherited(
    listeners: Vec<std::net::TcpListener>,
    workers: usize,
    utp: UdpBuffers,
) -> io::Result<BoundSockets> {
    let workers = workers.max(1);
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut udp_per_worker: Vec<Vec<std::net::UdpSocket>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for l in listeners {
        let addr = l.local_addr()?;
        local_addrs.push(addr);
        // See `bind_one`: accepted sockets inherit it.
        socket2::SockRef::from(&l).set_tcp_nodelay(true)?;
        if let Some(buffer_bytes) = utp {
            let udp = bind_udp_group(addr, workers, buffer_bytes).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen for uTP on udp {addr}: {e} (--utp off serves TCP only)"),
                )
            })?;
            for (worker, socket) in udp.into_iter().enumerate() {
                udp_per_worker[worker].push(socket);
            }
        }
        for listeners in per_worker.iter_mut().skip(1) {
            listeners.push(l.try_clone()?);
        }
        per_worker[0].push(l);
    }
    Ok(BoundSockets {
        local_addrs,
        per_worker,
        udp_per_worker,
    })
}

/// setsockopt(2) of one `int` option on `fd` (the options socket2 has no setter for,
/// and the FORCE variants of the buffer sizes).
pub(crate) fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The IPv4 or IPv6 address the kernel wrote into a `sockaddr_storage` (accept, recvfrom,
/// recvmsg); `None` for another family.
pub(crate) fn socket_addr_of(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let (port, flow) = (u16::from_be(a.sin6_port), u32::from_be(a.sin6_flowinfo));
            Some(SocketAddrV6::new(ip, port, flow, a.sin6_scope_id).into())
        }
        _ => None,
    }
}
