//! Our Mainline DHT node's I/O (the node itself is the sans-IO `crate::dht::node::Node`):
//! start-up from `UpstreamConfig` (bootstrap list, port), one UDP socket per address
//! family (IPv4, and IPv6 where the host has it, BEP 32), `get_peers` lookups that stream
//! peers to a fetch until its deadline, announces of stored info-hashes, what the store
//! holds for the node to list ([`StoreHoldings`]), and the bounds on lookups and announces
//! (per second, running at once).
//!
//! Threads: one receiving thread per socket; each handles a datagram (or a 100 ms read
//! timeout) under the node's lock, runs its timers and sends what it produced. Callers
//! start lookups under the same lock from their own thread; no thread per lookup. Nothing
//! here runs on a serving core.
//!
//! Each socket reports the address a datagram was sent to (IP_PKTINFO / IPV6_PKTINFO): a
//! `get_peers` for a hash we hold is answered with our serving port at that address, the
//! one the asker can reach us at.
//!
//! On the serving port (`--dht-socket serving`, the default with uTP on) the node has no
//! socket of its own: the serving cores hand it the datagrams that are not uTP and look
//! like KRPC ([`DhtInlet`], as libtorrent's `session_impl::on_udp_packet` demultiplexes),
//! through a bounded channel one thread reads; it answers and queries through duplicates
//! of the serving sockets' descriptors (the same sockets, not more members of their
//! SO_REUSEPORT group, which would be handed a share of the uTP datagrams), so everything
//! leaves from the serving port. Nothing DHT runs on a serving core but the hand-over.
//!
//! BEP 27: the caller never looks up or announces a private torrent here, and the node
//! never lists one ([`StoreHoldings::serving_port`]).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::dht::krpc::Want;
use crate::dht::node::{Holdings, LookupEvent, NoHoldings, Node, NodeConfig, NodeCounters};
use crate::dht::{NodeId, DATAGRAM_BYTES_MAX, LOOKUP_LIFETIME_MAX, SAMPLE_INTERVAL};
use crate::upstream::config::UpstreamConfig;
use crate::upstream::ratelimit::TokenBucket;
use crate::upstream::tracker::usable_peer;
use crate::upstream::{PeerCandidate, PeerSource};

/// Lookups in flight at once. A lookup lasts a few query timeouts of 2 s each (~10 s on the
/// public DHT, at most `LOOKUP_LIFETIME_MAX`), so at the default 20 lookups a second about
/// 200 run at once; past this many, a new one is refused.
pub const DHT_LOOKUPS_RUNNING_MAX: usize = 256;

/// Distinct peers passed on from one lookup. Each responding node returns up to ~50 peers;
/// a fetch needs a handful that answer.
pub const DHT_PEERS_PER_LOOKUP_MAX: usize = 500;

/// KRPC datagrams the serving cores may have queued for the node's thread: a core never
/// waits for the DHT, so past this many (the thread is behind by ~a second of a busy
/// node's traffic) a datagram is dropped and counted, as a full socket buffer would.
pub const DHT_INBOX_DATAGRAMS_MAX: usize = 1024;

/// Peer addresses whose route (the local address our answer leaves from) is remembered,
/// on the serving port's wildcard sockets: a query's destination address is not reported
/// there, and this is the address the asker reaches us at. Cleared when full.
const ROUTE_CACHE_ENTRIES_MAX: usize = 4096;

/// The receiving threads wake this often without traffic to run the node's timers (query
/// timeouts are 2 s; a tenth of a second of lateness is noise against them).
const TICK: Duration = Duration::from_millis(100);

/// Where a node with no `--dht-bootstrap` starts: the routers every client ships with.
pub const DEFAULT_BOOTSTRAP: [&str; 4] = [
    "router.bittorrent.com:6881",
    "dht.transmissionbt.com:6881",
    "router.utorrent.com:6881",
    "dht.libtorrent.org:25401",
];

/// Why a lookup or announce was not started.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum DhtError {
    #[error("dht rate limit reached")]
    RateLimited,
    #[error("{DHT_LOOKUPS_RUNNING_MAX} dht lookups already running")]
    Busy,
    #[error("dht announce failed: {0}")]
    Announce(String),
}

/// Counters of the lookups and announces we start; read by the metrics endpoint. The
/// node's own figures (queries answered, ...) are [`DhtNode::node_counters`].
#[derive(Default, Debug)]
pub struct DhtCounters {
    pub lookups_started: AtomicU64,
    pub lookups_rate_limited: AtomicU64,
    pub lookups_refused_busy: AtomicU64,
    pub peers_found: AtomicU64,
    pub announces_started: AtomicU64,
    pub announces_rate_limited: AtomicU64,
    /// KRPC datagrams from the serving port dropped: the node's inbox was full.
    pub inbox_dropped: AtomicU64,
}

/// A datagram a serving core handed over: from `from`, on serving socket `via`.
struct Inbound {
    via: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// One listen address's serving UDP socket, as the node sends through it: a duplicate of
/// one worker's descriptor (the same socket; non-blocking, so a full buffer is a loss).
struct ServingSocket {
    local: SocketAddr,
    socket: UdpSocket,
}

/// Where the node's datagrams come in and go out.
enum Sockets {
    /// `--dht-socket own`: one socket per family, read by a thread each.
    Own {
        v4: Option<UdpSocket>,
        v6: Option<UdpSocket>,
    },
    /// `--dht-socket serving`: the serving sockets, once the server has bound them
    /// ([`DhtNode::attach_serving`]); datagrams in through the inbox.
    Serving {
        sockets: OnceLock<Vec<ServingSocket>>,
        inbox: flume::Sender<Inbound>,
    },
}

/// Where a serving core sends the KRPC datagrams of one serving socket
/// ([`DhtNode::inlet_for`]).
#[derive(Clone)]
pub struct DhtInlet {
    tx: flume::Sender<Inbound>,
    via: usize,
    counters: Arc<DhtCounters>,
}

/// libtorrent's test for a datagram that is not uTP (`session_impl::on_udp_packet`): a
/// bencoded dictionary starts with `d` and ends with `e`, and no KRPC message is 20
/// bytes or shorter. Asked only of datagrams uTP refused: a `d` first byte is uTP type 6,
/// which does not exist.
pub fn looks_like_krpc(datagram: &[u8]) -> bool {
    datagram.len() > 20 && datagram.first() == Some(&b'd') && datagram.last() == Some(&b'e')
}

impl DhtInlet {
    /// Hands `datagram` from `from` to the node's thread; never waits (a full inbox drops
    /// it, counted in `magnetar_dht_inbox_dropped_total`).
    pub fn deliver(&self, from: SocketAddr, datagram: &[u8]) {
        let inbound = Inbound {
            via: self.via,
            from,
            bytes: datagram.to_vec(),
        };
        if self.tx.try_send(inbound).is_err() {
            self.counters.inbox_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the threads share.
struct Shared {
    node: Mutex<Node>,
    sockets: Sockets,
    stop: AtomicBool,
    /// Set when the first bootstrap lookup has ended.
    booted: Mutex<bool>,
    booted_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what the node produced; on the serving port through serving socket `via`
    /// (the one the datagram being handled came in on, so the answer leaves from the port
    /// the asker sent to) when it is of `to`'s family, else [`pick_serving`]'s. A failed
    /// send is like a lost datagram: the query times out, an answer is asked again.
    fn flush(&self, node: &mut Node, via: Option<usize>) {
        for (to, datagram) in node.take_outbox() {
            let socket = match &self.sockets {
                Sockets::Own { v4, v6 } => {
                    if to.is_ipv4() {
                        v4.as_ref()
                    } else {
                        v6.as_ref()
                    }
                }
                Sockets::Serving { sockets, .. } => sockets
                    .get()
                    .and_then(|list| pick_serving(list, via, &to))
                    .map(|s| &s.socket),
            };
            if let Some(s) = socket {
                if let Err(e) = s.send_to(&datagram, to) {
                    tracing::trace!(%to, "dht send failed: {e}");
                }
            }
        }
    }
}

/// The serving socket a datagram to `to` leaves through: `via` when of `to`'s family; else
/// the first of the family bound to every address, or to a loopback address exactly when
/// `to` is one (a socket on 127.0.0.1 cannot reach other hosts), or any of the family.
fn pick_serving<'a>(
    list: &'a [ServingSocket],
    via: Option<usize>,
    to: &SocketAddr,
) -> Option<&'a ServingSocket> {
    let family = |s: &&ServingSocket| s.local.is_ipv4() == to.is_ipv4();
    if let Some(s) = via.and_then(|i| list.get(i)).filter(|s| family(s)) {
        return Some(s);
    }
    let fits = |s: &&ServingSocket| {
        s.local.ip().is_unspecified() || s.local.ip().is_loopback() == to.ip().is_loopback()
    };
    list.iter()
        .filter(family)
        .find(fits)
        .or_else(|| list.iter().find(family))
}

/// The local address our datagrams to a peer leave from (the kernel's route to it), for
/// the serving port's wildcard sockets, which do not report a datagram's destination.
/// A connected UDP socket per family asks the kernel (no datagram is sent).
#[derive(Default)]
struct Routes {
    cache: std::collections::HashMap<IpAddr, IpAddr>,
    probes: [Option<UdpSocket>; 2],
}

impl Routes {
    fn source_for(&mut self, peer: IpAddr) -> Option<IpAddr> {
        if let Some(&ip) = self.cache.get(&peer) {
            return Some(ip);
        }
        let slot = usize::from(peer.is_ipv6());
        if self.probes[slot].is_none() {
            let any = if peer.is_ipv6() {
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
            } else {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
            };
            self.probes[slot] = UdpSocket::bind(any).ok();
        }
        let probe = self.probes[slot].as_ref()?;
        probe.connect(SocketAddr::new(peer, 9)).ok()?;
        let ip = probe.local_addr().ok()?.ip();
        if self.cache.len() >= ROUTE_CACHE_ENTRIES_MAX {
            self.cache.clear();
        }
        self.cache.insert(peer, ip);
        Some(ip)
    }
}

pub struct DhtNode {
    shared: Arc<Shared>,
    /// Our node's UDP addresses (IPv4, IPv6): its own sockets', or on the serving port the
    /// first serving socket of each family, once attached.
    local: OnceLock<(Option<SocketAddr>, Option<SocketAddr>)>,
    lookups: TokenBucket,
    announces: TokenBucket,
    lookups_running: Arc<AtomicUsize>,
    pub counters: Arc<DhtCounters>,
    node_counters: Arc<NodeCounters>,
}

impl Drop for DhtNode {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket on `addr` that reports each datagram's destination address.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let on: libc::c_int = 1;
    let (level, name) = if addr.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    } else {
        s.set_only_v6(true)?;
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    };
    crate::server::listener::set_int_option(s.as_raw_fd(), level, name, on)?;
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(TICK))?;
    Ok(s)
}

/// One datagram into `buf`: its length, sender, and the local address it was sent to.
fn recv_with_dst(s: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one in6_pktinfo (the larger) with its header, 8-byte aligned.
    let mut control = [0u64; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let from = match i32::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let a: &libc::sockaddr_in =
                unsafe { &*(&from as *const _ as *const libc::sockaddr_in) };
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let a: &libc::sockaddr_in6 =
                unsafe { &*(&from as *const _ as *const libc::sockaddr_in6) };
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            )
        }
        _ => return Err(io::Error::other("datagram from an unknown address family")),
    };
    let mut dst = None;
    // SAFETY: walking the control messages the kernel wrote, with libc's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info = &*(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info = &*(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, from, dst))
}

fn receive_loop(shared: Arc<Shared>, v6: bool) {
    let Sockets::Own { v4: s4, v6: s6 } = &shared.sockets else {
        return;
    };
    let socket = if v6 { s6 } else { s4 };
    let Some(socket) = socket else { return };
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 1];
    let mut last_tick = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let got = match recv_with_dst(socket, &mut buf) {
            Ok(g) => Some(g),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                // ICMP errors of earlier sends surface here (ECONNREFUSED): not fatal.
                tracing::trace!("dht receive: {e}");
                None
            }
        };
        let now = Instant::now();
        let mut node = shared.lock();
        if let Some((n, from, dst)) = got {
            node.on_datagram(now, from, dst, &buf[..n]);
        }
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            node.tick(now);
        }
        shared.flush(&mut node, None);
    }
}

/// The node's thread on the serving port: what the cores handed over, and the timers.
fn inbox_loop(shared: Arc<Shared>, inbox: flume::Receiver<Inbound>) {
    let mut routes = Routes::default();
    let mut last_tick = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let got = inbox.recv_timeout(TICK).ok();
        let now = Instant::now();
        // The address the datagram reached: its socket's, or for a wildcard socket the
        // one our answer leaves from (looked up before the lock).
        let local = got.as_ref().and_then(|g| {
            let Sockets::Serving { sockets, .. } = &shared.sockets else {
                return None;
            };
            let ip = sockets.get()?.get(g.via)?.local.ip();
            if ip.is_unspecified() {
                routes.source_for(g.from.ip())
            } else {
                Some(ip)
            }
        });
        let mut node = shared.lock();
        if let Some(g) = &got {
            node.on_datagram(now, g.from, local, &g.bytes);
            shared.flush(&mut node, Some(g.via));
        }
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            node.tick(now);
        }
        shared.flush(&mut node, None);
    }
}

/// Resolves `names` to the addresses of the families we have sockets for.
fn resolve(names: &[impl AsRef<str>], families: Want) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for name in names {
        match name.as_ref().to_socket_addrs() {
            Ok(addrs) => out.extend(addrs.filter(|a| {
                if a.is_ipv4() {
                    families.v4
                } else {
                    families.v6
                }
            })),
            Err(e) => tracing::warn!(node = name.as_ref(), "dht bootstrap does not resolve: {e}"),
        }
    }
    out.dedup();
    out
}

/// Starts our DHT node on UDP port `cfg.dht_port` (0: any free port) of every address, one
/// socket for IPv4 and one for IPv6 (on the IPv4 socket's port when free), bootstrapping
/// from `cfg.dht_bootstrap` when given, else the public routers. Does not wait for the
/// bootstrap to finish (see [`DhtNode::bootstrapped`]). The caller does not start one when
/// `cfg.no_dht` is set.
pub fn start(cfg: &UpstreamConfig) -> io::Result<DhtNode> {
    let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.dht_port)));
    let v4 = match v4 {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("dht: no IPv4 socket: {e}");
            None
        }
    };
    let port = v4
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .map_or(cfg.dht_port, |a| a.port());
    let v6 = bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.dht_port))));
    let v6 = match v6 {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!("dht: no IPv6 socket (IPv4 only): {e}");
            None
        }
    };
    if v4.is_none() && v6.is_none() {
        return Err(io::Error::other("dht: no UDP socket could be bound"));
    }
    let families = Want {
        v4: v4.is_some(),
        v6: v6.is_some(),
    };
    let bootstrap = configured_bootstrap(cfg, families)?;
    let local_v4 = v4.as_ref().and_then(|s| s.local_addr().ok());
    let local_v6 = v6.as_ref().and_then(|s| s.local_addr().ok());
    let node = new_node(cfg, families, bootstrap.clone().unwrap_or_default());
    let shared = shared_of(node, Sockets::Own { v4, v6 });
    for v6 in [false, true] {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(if v6 { "dht-recv6" } else { "dht-recv4" }.into())
            .spawn(move || receive_loop(sh, v6))?;
    }
    spawn_bootstrap(&shared, bootstrap.is_some(), families)?;
    tracing::info!(v4 = ?local_v4, v6 = ?local_v6, "dht node started");
    Ok(dht_node(cfg, shared, local_v4, local_v6))
}

/// Starts our DHT node on the serving port (`--dht-socket serving`): no socket of its
/// own; it talks once the server hands it its sockets ([`DhtNode::attach_serving`]), and
/// the serving cores hand it the KRPC datagrams they receive ([`DhtNode::inlet_for`]).
/// Fails like [`start`] on a bootstrap list where nothing resolves.
pub fn start_serving(cfg: &UpstreamConfig) -> io::Result<DhtNode> {
    // The families are the serving sockets', known at attach time; until then both.
    let both = Want { v4: true, v6: true };
    let bootstrap = configured_bootstrap(cfg, both)?;
    let node = new_node(cfg, both, bootstrap.unwrap_or_default());
    let (tx, rx) = flume::bounded(DHT_INBOX_DATAGRAMS_MAX);
    let shared = shared_of(
        node,
        Sockets::Serving {
            sockets: OnceLock::new(),
            inbox: tx,
        },
    );
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("dht-inbox".into())
        .spawn(move || inbox_loop(sh, rx))?;
    Ok(dht_node(cfg, shared, None, None))
}

/// The resolved `--dht-bootstrap` list (None when not given: the public routers, resolved
/// later); a list where none resolves to a family we have fails start-up, as an
/// operator's configuration error.
fn configured_bootstrap(
    cfg: &UpstreamConfig,
    families: Want,
) -> io::Result<Option<Vec<SocketAddr>>> {
    if cfg.dht_bootstrap.is_empty() {
        return Ok(None);
    }
    let addrs = resolve(&cfg.dht_bootstrap, families);
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "no dht bootstrap node resolves to an address of a family we have \
                 (IPv4 {}, IPv6 {}): {:?}",
                families.v4, families.v6, cfg.dht_bootstrap
            ),
        ));
    }
    Ok(Some(addrs))
}

fn new_node(cfg: &UpstreamConfig, families: Want, bootstrap: Vec<SocketAddr>) -> Node {
    Node::new(
        NodeConfig {
            families,
            bootstrap,
            queries_per_ip_per_second_max: cfg.dht_incoming_queries_per_ip_per_second_max,
            queries_per_second_max: cfg.dht_incoming_queries_per_second_max,
        },
        Arc::new(NoHoldings),
        Instant::now(),
    )
}

fn shared_of(node: Node, sockets: Sockets) -> Arc<Shared> {
    Arc::new(Shared {
        node: Mutex::new(node),
        sockets,
        stop: AtomicBool::new(false),
        booted: Mutex::new(false),
        booted_cv: Condvar::new(),
    })
}

/// The bootstrap lookup, on a thread of its own: resolving the public routers (when no
/// `--dht-bootstrap` was `configured`) may wait on DNS, so not on the caller.
fn spawn_bootstrap(shared: &Arc<Shared>, configured: bool, families: Want) -> io::Result<()> {
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("dht-bootstrap".into())
        .spawn(move || {
            if !configured {
                let addrs = resolve(&DEFAULT_BOOTSTRAP, families);
                sh.lock().set_bootstrap(addrs);
            }
            let weak = Arc::downgrade(&sh);
            let mut node = sh.lock();
            node.refresh_with(
                Instant::now(),
                Box::new(move |e| {
                    if let (LookupEvent::Done { .. }, Some(sh)) = (e, weak.upgrade()) {
                        *sh.booted.lock().unwrap_or_else(|p| p.into_inner()) = true;
                        sh.booted_cv.notify_all();
                    }
                    true
                }),
            );
            sh.flush(&mut node, None);
        })?;
    Ok(())
}

fn dht_node(
    cfg: &UpstreamConfig,
    shared: Arc<Shared>,
    local_v4: Option<SocketAddr>,
    local_v6: Option<SocketAddr>,
) -> DhtNode {
    let node_counters = shared.lock().counters.clone();
    DhtNode {
        shared,
        local: OnceLock::new(),
        lookups: TokenBucket::new(
            cfg.dht_queries_per_second_max,
            cfg.dht_queries_per_second_max,
        ),
        announces: TokenBucket::new(
            cfg.dht_announces_per_second_max,
            cfg.dht_announces_per_second_max,
        ),
        lookups_running: Arc::new(AtomicUsize::new(0)),
        counters: Arc::new(DhtCounters::default()),
        node_counters,
    }
    .with_local(local_v4, local_v6)
}

/// Decrements the running-lookups count when a lookup ends, however it ends (its sink is
/// dropped with it).
struct RunningLookup(Arc<AtomicUsize>);

impl Drop for RunningLookup {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DhtNode {
    fn with_local(self, v4: Option<SocketAddr>, v6: Option<SocketAddr>) -> DhtNode {
        if v4.is_some() || v6.is_some() {
            let _ = self.local.set((v4, v6));
        }
        self
    }

    /// On the serving port: the server's UDP sockets, one per listen address (one worker's;
    /// every worker's socket of an address has the same port). The node sends through
    /// duplicates of them from now on and bootstraps. Once; a node with sockets of its
    /// own ignores it. Without any socket the node stays silent (said in the log).
    pub fn attach_serving(&self, sockets: &[UdpSocket]) -> io::Result<()> {
        let Sockets::Serving { sockets: slot, .. } = &self.shared.sockets else {
            return Ok(());
        };
        let mut list = Vec::with_capacity(sockets.len());
        for s in sockets {
            list.push(ServingSocket {
                local: s.local_addr()?,
                socket: s.try_clone()?,
            });
        }
        if list.is_empty() {
            tracing::warn!("dht: no serving UDP socket (uTP off?): the node stays silent");
        }
        let first = |v4: bool| list.iter().map(|s| s.local).find(|a| a.is_ipv4() == v4);
        let (v4, v6) = (first(true), first(false));
        let families = Want {
            v4: v4.is_some(),
            v6: v6.is_some(),
        };
        if slot.set(list).is_err() {
            return Ok(()); // attached before
        }
        let _ = self.local.set((v4, v6));
        let configured = {
            let mut node = self.shared.lock();
            node.set_families(families);
            // Our queries leave from the serving port, which is the port we announce
            // unless --public-addr says otherwise (then the announce names its port).
            // Only when every serving socket has that port: an announce may leave from
            // any of them.
            let port = v4.or(v6).map(|a| a.port());
            let one_port = slot
                .get()
                .into_iter()
                .flatten()
                .all(|s| Some(s.local.port()) == port);
            node.set_implied_port(port.filter(|_| one_port));
            let bootstrap: Vec<SocketAddr> = node
                .bootstrap()
                .iter()
                .copied()
                .filter(|a| {
                    if a.is_ipv4() {
                        families.v4
                    } else {
                        families.v6
                    }
                })
                .collect();
            let configured = !bootstrap.is_empty();
            node.set_bootstrap(bootstrap);
            configured
        };
        spawn_bootstrap(&self.shared, configured, families)?;
        tracing::info!(v4 = ?v4, v6 = ?v6, "dht node started on the serving port");
        Ok(())
    }

    /// Where a serving core hands the KRPC datagrams its socket on `local` receives; None
    /// when the node has sockets of its own, or none on that address.
    pub fn inlet_for(&self, local: SocketAddr) -> Option<DhtInlet> {
        let Sockets::Serving { sockets, inbox } = &self.shared.sockets else {
            return None;
        };
        let via = sockets.get()?.iter().position(|s| s.local == local)?;
        Some(DhtInlet {
            tx: inbox.clone(),
            via,
            counters: self.counters.clone(),
        })
    }

    /// Starts a `get_peers` lookup of `info_hash` and returns at once. Peers are sent to
    /// `tx` as nodes answer (usable, deduplicated, at most `DHT_PEERS_PER_LOOKUP_MAX`),
    /// tagged `PeerSource::Dht`, until the lookup ends, `deadline` passes or `tx`'s receiver
    /// is dropped. Refused with `RateLimited` when `dht_queries_per_second_max` is spent, or
    /// `Busy` when `DHT_LOOKUPS_RUNNING_MAX` lookups are running.
    pub fn get_peers(
        &self,
        info_hash: [u8; 20],
        tx: flume::Sender<PeerCandidate>,
        deadline: Instant,
    ) -> Result<(), DhtError> {
        // Counted before the check so that concurrent callers cannot overshoot the bound.
        let running = RunningLookup(self.lookups_running.clone());
        if self.lookups_running.fetch_add(1, Ordering::Relaxed) >= DHT_LOOKUPS_RUNNING_MAX {
            self.counters
                .lookups_refused_busy
                .fetch_add(1, Ordering::Relaxed);
            return Err(DhtError::Busy);
        }
        if !self.lookups.try_take() {
            self.counters
                .lookups_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return Err(DhtError::RateLimited);
        }
        self.counters
            .lookups_started
            .fetch_add(1, Ordering::Relaxed);
        let counters = self.counters.clone();
        let mut seen = HashSet::new();
        let sink = Box::new(move |e: LookupEvent<'_>| {
            let _running = &running;
            let LookupEvent::Peers(peers) = e else {
                return false;
            };
            for &addr in peers {
                if Instant::now() >= deadline || seen.len() >= DHT_PEERS_PER_LOOKUP_MAX {
                    return false;
                }
                if !usable_peer(&addr) || !seen.insert(addr) {
                    continue;
                }
                counters.peers_found.fetch_add(1, Ordering::Relaxed);
                let candidate = PeerCandidate {
                    addr,
                    source: PeerSource::Dht,
                };
                if tx.send(candidate).is_err() {
                    return false;
                }
            }
            true
        });
        let now = Instant::now();
        let mut node = self.shared.lock();
        node.start_lookup(info_hash, true, None, deadline, sink, now);
        self.shared.flush(&mut node, None);
        Ok(())
    }

    /// Starts an announce of `info_hash` on TCP `port`: a `get_peers` lookup, then
    /// `announce_peer` to the closest nodes that gave a token; the future resolves when they
    /// have answered or timed out, with an error if none took it. Refused at once with
    /// `RateLimited` when `dht_announces_per_second_max` is spent.
    pub fn announce_async(
        &self,
        info_hash: [u8; 20],
        port: u16,
    ) -> Result<impl std::future::Future<Output = Result<(), DhtError>> + Send + 'static, DhtError>
    {
        if !self.announces.try_take() {
            self.counters
                .announces_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return Err(DhtError::RateLimited);
        }
        self.counters
            .announces_started
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let sink = Box::new(move |e: LookupEvent<'_>| {
            if let LookupEvent::Done { announced, .. } = e {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(announced);
                }
            }
            true
        });
        let now = Instant::now();
        let mut node = self.shared.lock();
        node.start_lookup(
            info_hash,
            true,
            Some(port),
            now + LOOKUP_LIFETIME_MAX,
            sink,
            now,
        );
        self.shared.flush(&mut node, None);
        drop(node);
        Ok(async move {
            match rx.await {
                Ok(0) => Err(DhtError::Announce("no node took the announce".into())),
                Ok(_) => Ok(()),
                Err(_) => Err(DhtError::Announce("the dht node stopped".into())),
            }
        })
    }

    /// Lookups still running (for metrics).
    pub fn lookups_running(&self) -> usize {
        self.lookups_running.load(Ordering::Relaxed)
    }

    /// The UDP address our node listens on: the IPv4 socket's, else the IPv6 one's
    /// (0.0.0.0:0 on the serving port before the server attached its sockets).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
            .get()
            .and_then(|(v4, v6)| v4.or(*v6))
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    }

    /// The IPv6 socket's address, when the host has IPv6.
    pub fn local_addr_v6(&self) -> Option<SocketAddr> {
        self.local.get().and_then(|l| l.1)
    }

    /// Our node id (BEP 42 once the external address is known).
    pub fn id(&self) -> NodeId {
        self.shared.lock().id()
    }

    /// Nodes in the IPv4 and IPv6 routing tables.
    pub fn table_len(&self) -> (usize, usize) {
        self.shared.lock().table_len()
    }

    /// The node's own figures (queries answered, errors, ...).
    pub fn node_counters(&self) -> &NodeCounters {
        &self.node_counters
    }

    /// What the node lists as ours from now on.
    pub fn set_holdings(&self, holdings: Arc<dyn Holdings>) {
        self.shared.lock().set_holdings(holdings);
    }

    /// Blocks until the bootstrap lookup has ended (at most `LOOKUP_LIFETIME_MAX` and a
    /// little); true if the routing table has any node. For start-up logs and tests.
    pub fn bootstrapped(&self) -> bool {
        let give_up = Instant::now() + LOOKUP_LIFETIME_MAX + Duration::from_secs(5);
        let mut booted = self.shared.booted.lock().unwrap_or_else(|p| p.into_inner());
        while !*booted {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            booted = self
                .shared
                .booted_cv
                .wait_timeout(booted, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(booted);
        let (n4, n6) = self.table_len();
        n4 + n6 > 0
    }
}

/// What the store holds, as the DHT node lists it: a stored, non-private, non-blocked hash
/// is served at our port; BEP 51 samples are drawn from those hashes.
pub struct StoreHoldings {
    upstream: Weak<crate::upstream::shard::Upstream>,
    sample: Mutex<(Vec<NodeId>, u64)>,
}

impl StoreHoldings {
    /// Holdings of `upstream`'s store; a thread redraws the BEP 51 sample every
    /// [`SAMPLE_INTERVAL`] (a walk of the store's index, which must not hold up the node)
    /// until the upstream is gone.
    pub fn start(
        upstream: Weak<crate::upstream::shard::Upstream>,
    ) -> io::Result<Arc<StoreHoldings>> {
        let h = Arc::new(StoreHoldings {
            upstream,
            sample: Mutex::default(),
        });
        let weak = Arc::downgrade(&h);
        std::thread::Builder::new()
            .name("dht-sample".into())
            .spawn(move || loop {
                let Some(h) = weak.upgrade() else { return };
                let Some(u) = h.upstream.upgrade() else {
                    return;
                };
                let drawn = draw_sample(&u.store, crate::dht::SAMPLES_PER_RESPONSE_MAX);
                drop(u);
                *h.sample.lock().unwrap_or_else(|p| p.into_inner()) = drawn;
                drop(h);
                let next = Instant::now() + SAMPLE_INTERVAL;
                while Instant::now() < next {
                    if weak.strong_count() == 0 {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })?;
        Ok(h)
    }
}

/// A uniform sample of `n` listable keys (reservoir sampling) and how many there are.
pub fn draw_sample(store: &crate::store::Store, n: usize) -> (Vec<NodeId>, u64) {
    let mut rng = u64::from_le_bytes({
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        b
    }) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut keys = Vec::with_capacity(n);
    let mut num = 0u64;
    store.for_each_record(|r| {
        if r.is_private() {
            return;
        }
        for key in r.hashes().handshake_keys() {
            if store.is_blocked(&key) {
                continue;
            }
            num += 1;
            if keys.len() < n {
                keys.push(key);
            } else {
                let j = next() % num;
                if (j as usize) < n {
                    keys[j as usize] = key;
                }
            }
        }
    });
    (keys, num)
}

impl Holdings for StoreHoldings {
    fn serving_port(&self, info_hash: &NodeId, local: IpAddr) -> Option<u16> {
        let u = self.upstream.upgrade()?;
        let port = u.serving_port_at(local)?;
        // Marks the record referenced (eviction keeps what is asked for), as a peer's
        // handshake does.
        let record = u.store.lookup(info_hash)?;
        (!record.is_private() && !u.store.is_blocked(info_hash)).then_some(port)
    }

    fn sample(&self, n: usize) -> (Vec<NodeId>, u64) {
        let s = self.sample.lock().unwrap_or_else(|p| p.into_inner());
        (s.0.iter().take(n).copied().collect(), s.1)
    }
}

/// Prometheus text for the node's own figures.
pub fn write_node_metrics(dht: &DhtNode, out: &mut String) {
    use crate::admin::metrics::{write_counter, write_gauge};
    let c = dht.node_counters();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "queries_received",
            "KRPC queries other nodes sent us.",
            &c.queries_received,
        ),
        (
            "responses_sent",
            "KRPC queries we answered.",
            &c.responses_sent,
        ),
        (
            "errors_sent",
            "KRPC queries answered with an error (bad token, unknown method, bad arguments).",
            &c.errors_sent,
        ),
        (
            "datagrams_dropped",
            "DHT datagrams dropped: not KRPC, or answers nobody asked for.",
            &c.datagrams_dropped,
        ),
        (
            "self_listed",
            "get_peers answers that listed our own serving address.",
            &c.self_listed,
        ),
        (
            "samples_answered",
            "BEP 51 sample_infohashes queries answered.",
            &c.samples_answered,
        ),
        (
            "announces_stored",
            "announce_peer queries whose peer we stored.",
            &c.announces_stored,
        ),
        (
            "queries_rate_limited",
            "KRPC queries dropped: their source address spent its budget per second.",
            &c.queries_rate_limited,
        ),
        (
            "queries_rate_limited_global",
            "KRPC queries dropped: all sources together spent the node's budget per second.",
            &c.queries_rate_limited_global,
        ),
        ("queries_sent", "KRPC queries we sent.", &c.queries_sent),
        (
            "queries_timed_out",
            "KRPC queries of ours that got no answer in time.",
            &c.queries_timed_out,
        ),
    ] {
        write_counter(
            out,
            &format!("magnetar_dht_node_{name}_total"),
            help,
            get(v),
        );
    }
    write_counter(
        out,
        "magnetar_dht_inbox_dropped_total",
        "KRPC datagrams from the serving port dropped: the DHT node's inbox was full.",
        get(&dht.counters.inbox_dropped),
    );
    let (n4, n6) = dht.table_len();
    write_gauge(
        out,
        "magnetar_dht_nodes_ipv4",
        "Nodes in the IPv4 routing table.",
        n4 as f64,
    );
    write_gauge(
        out,
        "magnetar_dht_nodes_ipv6",
        "Nodes in the IPv6 routing table.",
        n6 as f64,
    );
}
