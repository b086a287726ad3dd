//! Tracker announces: the request and response types shared by the HTTP (BEP 3, 23, 7) and
//! UDP (BEP 15) clients, `announce` dispatching on the URL's scheme, and `spawn_announces`,
//! which asks every tracker of a fetch at once on plain threads and streams the peers to
//! the fetch over a channel. All I/O here is blocking: it never runs on a serving core.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::upstream::{tracker_http, tracker_udp, PeerCandidate, PeerSource};

/// Largest tracker response body read. A compact response for `PEERS_PER_RESPONSE_MAX`
/// peers is ~9 KiB (IPv4) or ~18 KiB (IPv6); the non-compact form costs ~60 bytes a peer.
/// 64 KiB holds that with room to spare (~1000 non-compact peers), and keeps what a
/// tracker that ignores `numwant` makes us buffer small: at 1 MiB the hostile-input suite
/// measured ~6 MiB of memory per oversized answer, times up to 8 trackers per fetch and
/// 128 fetches. An answer past the cap is an error for that tracker only.
pub const TRACKER_RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// Peers kept from one response. A fetch talks to `peers_per_fetch_max` (8 by default)
/// peers at once; 500 is plenty to replace the dead ones and is what we ask for.
pub const PEERS_PER_RESPONSE_MAX: usize = 500;

/// Longest announce URL accepted. Real ones, passkeys included, are under 200 bytes; the
/// bound keeps a hostile magnet's `tr` from costing memory and log lines.
pub const TRACKER_URL_BYTES_MAX: usize = 1024;

/// Trackers asked for one fetch; the rest of the list is ignored. Magnets in the wild carry
/// 5–30 `tr`s, and a configured list adds a few.
pub const TRACKERS_PER_FETCH_MAX: usize = 32;

/// Announce threads running at once for one fetch. Each blocks on one tracker; a slow
/// tracker holds its thread until the deadline, so the rest of the list proceeds on the others.
pub const TRACKER_THREADS_PER_FETCH_MAX: usize = 8;

/// Longest tracker-supplied message (failure reason, UDP error) kept in an error.
pub const TRACKER_MESSAGE_BYTES_MAX: usize = 256;

/// What we tell a tracker about ourselves and the torrent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceRequest {
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
    /// The port peers can reach us on.
    pub port: u16,
    /// Bytes we still miss (trackers list leechers first to seeds).
    pub left: u64,
    /// Peers wanted; capped at `PEERS_PER_RESPONSE_MAX` on the wire.
    pub numwant: u32,
}

/// BEP 3 `event` (BEP 15 codes 2, 0, 3): `Started` on a torrent's first announce to a
/// tracker, `Regular` (no event) on the re-announces at the tracker's `interval`, `Stopped`
/// when leaving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnounceEvent {
    Started,
    Regular,
    Stopped,
}

impl AnnounceEvent {
    /// The HTTP `event` parameter's value; `None` for a regular announce (no parameter).
    pub fn http_value(self) -> Option<&'static str> {
        match self {
            AnnounceEvent::Started => Some("started"),
            AnnounceEvent::Regular => None,
            AnnounceEvent::Stopped => Some("stopped"),
        }
    }
}

/// Usable peers of one response (deduplicated, at most `PEERS_PER_RESPONSE_MAX`) and the
/// re-announce interval the tracker asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnounceResponse {
    pub peers: Vec<SocketAddr>,
    pub interval: Option<Duration>,
}

/// Why an announce produced no peers.
#[derive(thiserror::Error, Debug)]
pub enum TrackerError {
    #[error("bad tracker url: {0}")]
    BadUrl(String),
    #[error("tracker host not found: {0}")]
    HostNotFound(String),
    #[error("tracker i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("tracker did not answer in time")]
    Timeout,
    #[error("tracker answered http status {0}")]
    Http(u16),
    #[error("tracker refused: {0}")]
    Failure(String),
    #[error("malformed tracker response: {0}")]
    Malformed(&'static str),
    #[error("tracker response larger than {TRACKER_RESPONSE_BYTES_MAX} bytes")]
    TooLarge,
}

/// Announces to one tracker, blocking for at most about `timeout`. `http://` goes to the
/// BEP 3 client, `udp://` to the BEP 15 client; `https://` is refused (magnetar has no TLS
/// stack), as is anything else.
pub fn announce(
    url: &str,
    req: &AnnounceRequest,
    timeout: Duration,
) -> Result<AnnounceResponse, TrackerError> {
    announce_event(url, req, AnnounceEvent::Started, timeout)
}

/// [`announce`] with an explicit BEP 3 `event` (the miss path always says `started`).
pub fn announce_event(
    url: &str,
    req: &AnnounceRequest,
    event: AnnounceEvent,
    timeout: Duration,
) -> Result<AnnounceResponse, TrackerError> {
    if url.len() > TRACKER_URL_BYTES_MAX {
        return Err(TrackerError::BadUrl(format!(
            "longer than {TRACKER_URL_BYTES_MAX} bytes"
        )));
    }
    let scheme_end = url.find("://").unwrap_or(0);
    let scheme = url[..scheme_end].to_ascii_lowercase();
    match scheme.as_str() {
        "http" => tracker_http::announce(url, req, event, timeout),
        "udp" => tracker_udp::announce(url, req, event, timeout),
        "https" => Err(TrackerError::BadUrl(format!(
            "{url}: https trackers are not supported (magnetar has no TLS stack)"
        ))),
        _ => Err(TrackerError::BadUrl(format!(
            "{url}: scheme must be http:// or udp://"
        ))),
    }
}

/// How one tracker of `spawn_announces` went: the number of peers it sent, or why none.
#[derive(Debug)]
pub struct TrackerOutcome {
    pub url: String,
    pub result: Result<usize, TrackerError>,
}

/// Announces to every URL concurrently (at most `TRACKER_THREADS_PER_FETCH_MAX` threads, the
/// first `TRACKERS_PER_FETCH_MAX` URLs), sending each tracker's peers to `tx` as soon as it
/// answers, tagged `PeerSource::Tracker`. The returned thread ends when every tracker has
/// answered or failed, or at `timeout` from now (a tracker not yet started by then is
/// skipped), or soon after `tx`'s receiver is dropped (the fetch is over); it returns what
/// each tracker did, in the order they finished.
pub fn spawn_announces(
    mut urls: Vec<String>,
    req: AnnounceRequest,
    timeout: Duration,
    tx: flume::Sender<PeerCandidate>,
) -> std::io::Result<JoinHandle<Vec<TrackerOutcome>>> {
    let deadline = Instant::now() + timeout;
    let mut seen = HashSet::new();
    urls.retain(|u| seen.insert(u.clone()));
    urls.truncate(TRACKERS_PER_FETCH_MAX);
    std::thread::Builder::new()
        .name("tracker-announce".into())
        .spawn(move || {
            let threads = urls.len().min(TRACKER_THREADS_PER_FETCH_MAX);
            let queue = Mutex::new(urls.into_iter());
            let outcomes = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| announce_worker(&queue, &req, deadline, &tx, &outcomes));
                }
            });
            outcomes.into_inner().unwrap_or_else(|e| e.into_inner())
        })
}

fn announce_worker(
    queue: &Mutex<std::vec::IntoIter<String>>,
    req: &AnnounceRequest,
    deadline: Instant,
    tx: &flume::Sender<PeerCandidate>,
    outcomes: &Mutex<Vec<TrackerOutcome>>,
) {
    loop {
        let Some(url) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else {
            return;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tx.is_disconnected() {
            return;
        }
        let result = announce(&url, req, left).map(|resp| {
            let mut sent = 0;
            for addr in resp.peers {
                let peer = PeerCandidate {
                    addr,
                    source: PeerSource::Tracker,
                };
                if tx.send(peer).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        });
        match &result {
            Ok(n) => tracing::debug!(url = %url, peers = n, "tracker answered"),
            Err(e) => tracing::debug!(url = %url, error = %e, "tracker failed"),
        }
        outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(TrackerOutcome { url, result });
    }
}

/// May a peer address from a tracker be dialled? Port 0 and the unspecified, broadcast and
/// multicast addresses cannot be.
pub fn usable_peer(addr: &SocketAddr) -> bool {
    addr.port() != 0
        && match addr.ip() {
            IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
            IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
        }
}

/// Collects the peers of one response: drops unusable and repeated ones, stops at
/// `PEERS_PER_RESPONSE_MAX`.
#[derive(Default)]
pub(crate) struct PeerCollector {
    peers: Vec<SocketAddr>,
    seen: HashSet<SocketAddr>,
}

impl PeerCollector {
    pub(crate) fn push(&mut self, addr: SocketAddr) {
        if self.peers.len() < PEERS_PER_RESPONSE_MAX && usable_peer(&addr) && self.seen.insert(addr)
        {
            self.peers.push(addr);
        }
    }

    pub(crate) fn into_peers(self) -> Vec<SocketAddr> {
        debug_assert!(self.peers.len() <= PEERS_PER_RESPONSE_MAX);
        self.peers
    }
}

/// A tracker's message as text, cut to `TRACKER_MESSAGE_BYTES_MAX`.
pub(crate) fn tracker_message(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(TRACKER_MESSAGE_BYTES_MAX)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Unpredictable 64 bits for transaction ids and keys (BEP 15 uses them to reject spoofed
/// replies). The std hasher is keyed from the OS's randomness once per process; a counter
/// and the clock make each call differ.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> AnnounceRequest {
        AnnounceRequest {
            info_hash: [1; 20],
            peer_id: [2; 20],
            port: 6881,
            left: 1,
            numwant: 50,
        }
    }

    #[test]
    fn https_and_unknown_schemes_are_bad_urls() {
        let t = Duration::from_millis(100);
        match announce("https://tracker.example/announce", &req(), t) {
            Err(TrackerError::BadUrl(m)) => assert!(m.contains("TLS"), "{m}"),
            other => panic!("{other:?}"),
        }
        for url in ["wss://x/announce", "tracker.example:80", "", "ftp://x"] {
            assert!(
                matches!(announce(url, &req(), t), Err(TrackerError::BadUrl(_))),
                "{url}"
            );
        }
        let long = format!("http://x/{}", "a".repeat(TRACKER_URL_BYTES_MAX));
        assert!(matches!(
            announce(&long, &req(), t),
            Err(TrackerError::BadUrl(_))
        ));
    }

    #[test]
    fn collector_drops_unusable_repeated_and_excess_peers() {
        let mut c = PeerCollector::default();
        c.push("0.0.0.0:80".parse().unwrap());
        c.push("1.2.3.4:0".parse().unwrap());
        c.push("255.255.255.255:80".parse().unwrap());
        c.push("[::]:80".parse().unwrap());
        c.push("224.0.0.1:80".parse().unwrap());
        c.push("1.2.3.4:80".parse().unwrap());
        c.push("1.2.3.4:80".parse().unwrap());
        c.push("[2001:db8::1]:80".parse().unwrap());
        assert_eq!(
            c.into_peers(),
            vec![
                "1.2.3.4:80".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:80".parse().unwrap()
            ]
        );
        let mut c = PeerCollector::default();
        for port in 1..=2000u16 {
            c.push(SocketAddr::from(([10, 0, 0, 1], port)));
        }
        assert_eq!(c.into_peers().len(), PEERS_PER_RESPONSE_MAX);
    }

    #[test]
    fn random_ids_differ() {
        let a: HashSet<u64> = (0..1000).map(|_| random_u64()).collect();
        assert_eq!(a.len(), 1000);
    }

    #[test]
    fn tracker_messages_are_cut() {
        assert_eq!(tracker_message(b"nope"), "nope");
        assert_eq!(
            tracker_message(&[b'x'; 1000]).len(),
            TRACKER_MESSAGE_BYTES_MAX
        );
    }
}
