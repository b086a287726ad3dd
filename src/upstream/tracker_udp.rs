//! UDP tracker client (BEP 15) over `aquatic_udp_protocol`'s codec: connect for a connection
//! id (cached per tracker address for a minute, process-wide), then announce. Every exchange
//! retransmits on its own schedule, bounded by the caller's deadline.
//!
//! Retransmission: BEP 15 waits 15 · 2ⁿ s before the n-th retransmission, which would spend
//! the whole of a fetch's budget on one lost datagram. We wait `first · 2ⁿ` instead, where
//! `first` is 2 s, or a quarter of the overall timeout when that is shorter (at least 100 ms),
//! and never past the deadline: with a 10 s timeout a silent tracker gets sends at 0, 2, 6 s
//! and a `Timeout` at 10 s; with 1 s, sends at 0, 250, 750 ms. Since `first ≤ 15 s`, we
//! never wait longer than BEP 15 would.
//!
//! Replies are matched on their transaction id (random per request); one with another id is
//! ignored (a late answer to an earlier retransmission, or spoofing), as is a datagram that
//! does not parse and does not carry our transaction id (a deadline reached after such
//! datagrams reports `Malformed` rather than `Timeout`). One that carries it but does not
//! parse ends the announce at once (see `unparsable_reply`). The socket is connected to the tracker, so the kernel drops
//! datagrams from anyone else.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::num::NonZeroU16;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aquatic_udp_protocol as proto;

use crate::upstream::tracker::{
    random_u64, tracker_message, AnnounceEvent, AnnounceRequest, AnnounceResponse, PeerCollector,
    TrackerError, PEERS_PER_RESPONSE_MAX,
};

/// Longest wait before the first retransmission (see module doc).
pub const UDP_FIRST_WAIT_MS_MAX: u64 = 2_000;

/// Shortest wait before the first retransmission: below a loopback/LAN round trip plus
/// scheduling noise, retransmitting only adds load.
pub const UDP_FIRST_WAIT_MS_MIN: u64 = 100;

/// How long a connection id is reused. BEP 15: a client may use one for a minute, a tracker
/// accepts it for two.
pub const CONNECTION_ID_LIFETIME: Duration = Duration::from_secs(60);

/// Tracker addresses whose connection id is remembered. One entry is ~40 bytes; trackers
/// come from configuration and magnets, so the table is bounded against magnets that each
/// name new trackers.
pub const CONNECTION_IDS_CACHED_MAX: usize = 4096;

/// Largest datagram read: the UDP maximum. An announce reply for `PEERS_PER_RESPONSE_MAX`
/// IPv6 peers is ~9 KiB, but a tracker may send more peers than asked and the datagram must
/// be read whole to be parsed at all.
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// Size of an announce request (BEP 15): 98 bytes.
const ANNOUNCE_REQUEST_BYTES: usize = 98;

/// Announces over UDP, within `timeout` (DNS resolution of the tracker's name excepted: it
/// uses the system resolver, which has its own timeout).
pub fn announce(
    url: &str,
    req: &AnnounceRequest,
    event: AnnounceEvent,
    timeout: Duration,
) -> Result<AnnounceResponse, TrackerError> {
    let deadline = Instant::now() + timeout;
    let (host, port) = parse_url(url)?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|_| TrackerError::HostNotFound(host.to_string()))?
        .next()
        .ok_or_else(|| TrackerError::HostNotFound(host.to_string()))?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(addr)?;
    let t = Exchange {
        sock,
        ipv4: addr.is_ipv4(),
        deadline,
        first_wait: first_wait(timeout),
        buf: vec![0; DATAGRAM_BYTES_MAX],
    };
    let mut t = t;

    let (mut connection_id, mut from_cache) = match cached_connection_id(addr) {
        Some(id) => (id, true),
        None => (t.connect(addr)?, false),
    };
    loop {
        match t.announce(connection_id, req, event) {
            // An error reply to a remembered id most likely means the tracker no longer
            // accepts it (restart, shorter lifetime): get a fresh one, once.
            Err(TrackerError::Failure(m)) if from_cache => {
                tracing::debug!(tracker = %addr, message = %m, "udp tracker refused cached connection id");
                forget_connection_id(addr);
                connection_id = t.connect(addr)?;
                from_cache = false;
            }
            other => return other,
        }
    }
}

/// `host` and `port` of `udp://host:port[/path]`; the path (BEP 41 URL data) is not sent.
fn parse_url(url: &str) -> Result<(&str, u16), TrackerError> {
    let bad = |why: &str| TrackerError::BadUrl(format!("{url}: {why}"));
    let rest = url
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case("udp://"))
        .map(|_| &url[6..])
        .ok_or_else(|| bad("not udp://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (host, after.strip_prefix(':').ok_or_else(|| bad("no port"))?)
    } else {
        authority.rsplit_once(':').ok_or_else(|| bad("no port"))?
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok((host, port))
}

/// Wait before the first retransmission for an announce with this overall timeout.
pub fn first_wait(timeout: Duration) -> Duration {
    (timeout / 4).clamp(
        Duration::from_millis(UDP_FIRST_WAIT_MS_MIN),
        Duration::from_millis(UDP_FIRST_WAIT_MS_MAX),
    )
}

struct Exchange {
    sock: UdpSocket,
    ipv4: bool,
    deadline: Instant,
    first_wait: Duration,
    buf: Vec<u8>,
}

impl Exchange {
    fn connect(&mut self, addr: SocketAddr) -> Result<i64, TrackerError> {
        let tid = random_u64() as i32;
        let mut packet = Vec::with_capacity(16);
        proto::ConnectRequest {
            transaction_id: proto::TransactionId::new(tid),
        }
        .write_bytes(&mut packet)?;
        match self.request(&packet, tid)? {
            proto::Response::Connect(r) => {
                let id = { r.connection_id }.0.get();
                remember_connection_id(addr, id);
                Ok(id)
            }
            proto::Response::Error(e) => {
                Err(TrackerError::Failure(tracker_message(e.message.as_bytes())))
            }
            _ => Err(TrackerError::Malformed(
                "connect answered with another action",
            )),
        }
    }

    fn announce(
        &mut self,
        connection_id: i64,
        req: &AnnounceRequest,
        event: AnnounceEvent,
    ) -> Result<AnnounceResponse, TrackerError> {
        let tid = random_u64() as i32;
        let numwant = req.numwant.min(PEERS_PER_RESPONSE_MAX as u32) as i32;
        let mut packet = Vec::with_capacity(ANNOUNCE_REQUEST_BYTES);
        proto::AnnounceRequest {
            connection_id: proto::ConnectionId::new(connection_id),
            action_placeholder: Default::default(),
            transaction_id: proto::TransactionId::new(tid),
            info_hash: proto::InfoHash(req.info_hash),
            peer_id: proto::PeerId(req.peer_id),
            bytes_downloaded: proto::NumberOfBytes::new(0),
            bytes_left: proto::NumberOfBytes::new(i64::try_from(req.left).unwrap_or(i64::MAX)),
            bytes_uploaded: proto::NumberOfBytes::new(0),
            event: match event {
                AnnounceEvent::Started => proto::AnnounceEvent::Started,
                AnnounceEvent::Regular => proto::AnnounceEvent::None,
                AnnounceEvent::Stopped => proto::AnnounceEvent::Stopped,
            }
            .into(),
            ip_address: proto::Ipv4AddrBytes([0; 4]),
            key: proto::PeerKey::new(random_u64() as i32),
            peers_wanted: proto::NumberOfPeers::new(numwant),
            port: proto::Port::new(NonZeroU16::MIN),
        }
        .write_bytes(&mut packet)?;
        // The codec's `Port` only holds non-zero ports, but 0 ("not listening") is a valid
        // announce: write the last field, the port, ourselves.
        assert_eq!(packet.len(), ANNOUNCE_REQUEST_BYTES);
        packet[ANNOUNCE_REQUEST_BYTES - 2..].copy_from_slice(&req.port.to_be_bytes());

        let mut peers = PeerCollector::default();
        let interval = match self.request(&packet, tid)? {
            proto::Response::AnnounceIpv4(r) => {
                for p in r.peers.iter().take(PEERS_PER_RESPONSE_MAX) {
                    let (ip, port) = ({ p.ip_address }, { p.port });
                    peers.push(SocketAddr::new(IpAddr::V4(ip.into()), port.0.get()));
                }
                { r.fixed.announce_interval }.0.get()
            }
            proto::Response::AnnounceIpv6(r) => {
                for p in r.peers.iter().take(PEERS_PER_RESPONSE_MAX) {
                    let (ip, port) = ({ p.ip_address }, { p.port });
                    peers.push(SocketAddr::new(IpAddr::V6(ip.into()), port.0.get()));
                }
                { r.fixed.announce_interval }.0.get()
            }
            proto::Response::Error(e) => {
                return Err(TrackerError::Failure(tracker_message(e.message.as_bytes())))
            }
            _ => {
                return Err(TrackerError::Malformed(
                    "announce answered with another action",
                ))
            }
        };
        Ok(AnnounceResponse {
            peers: peers.into_peers(),
            interval: u64::try_from(interval)
                .ok()
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
        })
    }

    /// Sends `packet` and retransmits it (module doc) until a reply with transaction id
    /// `tid` arrives or the deadline passes.
    fn request(&mut self, packet: &[u8], tid: i32) -> Result<proto::Response, TrackerError> {
        let mut wait = self.first_wait;
        let mut saw_malformed = false;
        loop {
            let sent_at = Instant::now();
            if sent_at >= self.deadline {
                return Err(if saw_malformed {
                    TrackerError::Malformed("only unparsable datagrams before the deadline")
                } else {
                    TrackerError::Timeout
                });
            }
            self.sock.send(packet)?;
            let window_end = (sent_at + wait).min(self.deadline);
            loop {
                let left = window_end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.sock.set_read_timeout(Some(left))?;
                let n = match self.sock.recv(&mut self.buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    // E.g. ConnectionRefused: an ICMP port unreachable for our last send.
                    Err(e) => return Err(TrackerError::Io(e)),
                };
                let datagram = &self.buf[..n];
                match proto::Response::parse_bytes(datagram, self.ipv4) {
                    Ok(r) if transaction_id(&r) == tid => return Ok(r),
                    Ok(_) => tracing::trace!("udp tracker reply with another transaction id"),
                    Err(_) if n >= 8 && datagram[4..8] == tid.to_be_bytes() => {
                        return Err(unparsable_reply(datagram))
                    }
                    Err(_) => saw_malformed = true,
                }
            }
            wait = wait.saturating_mul(2);
        }
    }
}

/// What a reply to our request (its transaction id matches) that does not parse means.
/// opentracker answers an announce for a hash it does not track (not whitelisted) with the
/// 8-byte header alone: action announce, our transaction id, no interval, no peers.
fn unparsable_reply(datagram: &[u8]) -> TrackerError {
    const ACTION_ANNOUNCE: [u8; 4] = 1i32.to_be_bytes();
    if datagram.len() == 8 && datagram[..4] == ACTION_ANNOUNCE {
        TrackerError::Failure("announce refused (reply without interval or peers)".into())
    } else {
        TrackerError::Malformed("unparsable reply")
    }
}

fn transaction_id(r: &proto::Response) -> i32 {
    let t = match r {
        proto::Response::Connect(r) => r.transaction_id,
        proto::Response::AnnounceIpv4(r) => r.fixed.transaction_id,
        proto::Response::AnnounceIpv6(r) => r.fixed.transaction_id,
        proto::Response::Scrape(r) => r.transaction_id,
        proto::Response::Error(r) => r.transaction_id,
    };
    t.0.get()
}

fn connection_ids() -> &'static Mutex<HashMap<SocketAddr, (i64, Instant)>> {
    static IDS: OnceLock<Mutex<HashMap<SocketAddr, (i64, Instant)>>> = OnceLock::new();
    IDS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cached_connection_id(addr: SocketAddr) -> Option<i64> {
    let ids = connection_ids().lock().unwrap_or_else(|e| e.into_inner());
    ids.get(&addr)
        .filter(|(_, at)| at.elapsed() < CONNECTION_ID_LIFETIME)
        .map(|&(id, _)| id)
}

fn remember_connection_id(addr: SocketAddr, id: i64) {
    let mut ids = connection_ids().lock().unwrap_or_else(|e| e.into_inner());
    if ids.len() >= CONNECTION_IDS_CACHED_MAX && !ids.contains_key(&addr) {
        ids.retain(|_, (_, at)| at.elapsed() < CONNECTION_ID_LIFETIME);
        if ids.len() >= CONNECTION_IDS_CACHED_MAX {
            // Every entry is fresh: a flood of new trackers. Losing the cache only costs
            // one connect round trip per tracker.
            ids.clear();
        }
    }
    ids.insert(addr, (id, Instant::now()));
    debug_assert!(ids.len() <= CONNECTION_IDS_CACHED_MAX);
}

fn forget_connection_id(addr: SocketAddr) {
    connection_ids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("udp://tracker.example:6969/announce").unwrap(),
            ("tracker.example", 6969)
        );
        assert_eq!(parse_url("UDP://1.2.3.4:80").unwrap(), ("1.2.3.4", 80));
        assert_eq!(parse_url("udp://[::1]:6969/a?b").unwrap(), ("::1", 6969));
        for bad in [
            "udp://host",
            "udp://host:0",
            "udp://host:99999",
            "udp://:80",
            "udp://[::1/x",
            "http://host:80",
            "udp:/",
        ] {
            assert!(
                matches!(parse_url(bad), Err(TrackerError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn retransmission_schedule() {
        assert_eq!(first_wait(Duration::from_secs(60)), Duration::from_secs(2));
        assert_eq!(
            first_wait(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(
            first_wait(Duration::from_millis(50)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn connection_id_cache_is_bounded() {
        for i in 0..(CONNECTION_IDS_CACHED_MAX + 10) {
            let addr =
                SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 7000 + (i >> 16) as u16));
            remember_connection_id(addr, i as i64);
        }
        assert!(connection_ids().lock().unwrap().len() <= CONNECTION_IDS_CACHED_MAX);
        let addr = SocketAddr::from(([10, 2, 0, 1], 1));
        remember_connection_id(addr, 42);
        assert_eq!(cached_connection_id(addr), Some(42));
        forget_connection_id(addr);
        assert_eq!(cached_connection_id(addr), None);
    }
}
