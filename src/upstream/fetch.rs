//! One fetch of one info-hash: take peer candidates as the sources find them, talk to up
//! to `peers_max` of them at once, and return the first verified info dict. Runs on the
//! current monoio runtime (the shard that owns the info-hash); each peer is a spawned task.
//!
//! Each peer fetches the whole metadata on its own instead of pieces being spread over
//! peers. Metadata is small (mostly one to a few 16 KiB pieces), so this costs little
//! bandwidth, and it makes a lie attributable: bytes that fail the hash came from exactly
//! one peer, which is banned for this fetch and reported. Spreading pieces would be faster
//! only for very large dicts, at the price of not knowing whom to blame.
//!
//! Every address is tried at most once per fetch (dedupe), so a banned peer is never
//! retried. BEP 27: a dict with `private=1` is taken only from a peer whose source allows
//! it (not the DHT, not PEX); from any other it is discarded and the fetch goes on.
//!
//! The fetch ends at `deadline` at the latest. Its peer tasks stop as soon as it returns
//! (or is dropped): each waits on a stop channel whose only sender the fetch holds, so no
//! connection outlives the fetch.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::metainfo::{self, InfoSummary};
use crate::upstream::peer::{
    fetch_from_parent_with, fetch_from_peer_with, PeerFetchConfig, PeerFetchError, PeerProgress,
};
use crate::upstream::PeerCandidate;

/// Distinct peer addresses one fetch remembers (tries or queues); later ones are dropped.
/// A DHT lookup yields a few hundred; thousands would only be a source flooding us.
pub const CANDIDATES_PER_FETCH_MAX: usize = 4096;

/// What to fetch and how hard to try.
#[derive(Clone, Debug)]
pub struct FetchSpec {
    /// The 20-byte handshake key: v1 SHA-1, or a v2 SHA-256 truncated (BEP 52).
    pub key: [u8; 20],
    pub peer_id: [u8; 20],
    pub metadata_bytes_max: usize,
    /// Peers talked to at once.
    pub peers_max: usize,
    pub connect_timeout: Duration,
    /// One peer's whole exchange, connect included.
    pub peer_timeout: Duration,
    /// Silence with requests outstanding that ends a connection (`PEER_STALL_TIMEOUT`).
    pub stall_timeout: Duration,
    /// The whole fetch (std `Instant`, so callers need no runtime to compute it).
    pub deadline: Instant,
}

#[derive(Debug)]
pub struct FetchSuccess {
    /// The verified info dict.
    pub info: Vec<u8>,
    /// `metainfo::validate_info` of it (already done here).
    pub summary: InfoSummary,
    pub from: PeerCandidate,
    /// Peers connected to (or tried), the winner included.
    pub peers_tried: usize,
    /// Peers whose bytes failed the hash.
    pub banned: Vec<SocketAddr>,
}

#[derive(thiserror::Error, Debug)]
pub enum FetchError {
    #[error("deadline passed after trying {tried} peers ({} banned)", banned.len())]
    Deadline {
        tried: usize,
        banned: Vec<SocketAddr>,
    },
    #[error("out of peers: all {tried} tried failed ({} banned)", banned.len())]
    NoPeers {
        tried: usize,
        banned: Vec<SocketAddr>,
    },
    /// The bytes hash to the key, so every honest peer has the same ones, but they are not
    /// a valid info dict: the torrent itself is broken. No other peer can do better.
    #[error("metadata from {from} matches the info-hash but is invalid: {reason}")]
    InvalidInfo { from: SocketAddr, reason: String },
}

impl FetchError {
    /// A short stable name for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Deadline { .. } => "deadline",
            FetchError::NoPeers { .. } => "no_peers",
            FetchError::InvalidInfo { .. } => "invalid_info",
        }
    }
}

/// Progress of a fetch, for `magnetar fetch` and metrics. Sent with `try_send`: a full
/// bounded channel loses events, it never slows the fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// A new (not yet seen) address.
    PeerFound(PeerCandidate),
    Connected(SocketAddr),
    MetadataSize(SocketAddr, u64),
    Piece {
        addr: SocketAddr,
        received: usize,
        total: usize,
    },
    /// `PeerFetchError::reason()`, or `private_via_dht_or_pex`.
    PeerFailed(SocketAddr, &'static str),
    /// Its bytes failed the hash; never asked again in this fetch.
    Banned(SocketAddr),
}

/// Reason for a verified private dict from a DHT or PEX peer (BEP 27).
pub const PRIVATE_VIA_DHT_OR_PEX: &str = "private_via_dht_or_pex";

type PeerResult = (PeerCandidate, Result<Vec<u8>, PeerFetchError>);

/// Fetches the info dict of `spec.key` from the peers `candidates` yields, until one
/// gives verified bytes, the deadline passes, or the channel is closed and every peer
/// has failed.
pub async fn fetch(
    spec: FetchSpec,
    candidates: flume::Receiver<PeerCandidate>,
    events: Option<flume::Sender<FetchEvent>>,
) -> Result<FetchSuccess, FetchError> {
    let deadline = monoio::time::Instant::from_std(spec.deadline);
    let peers_max = spec.peers_max.max(1);
    let cfg = Rc::new(PeerFetchConfig {
        key: spec.key,
        peer_id: spec.peer_id,
        metadata_bytes_max: spec.metadata_bytes_max,
        connect_timeout: spec.connect_timeout,
        peer_timeout: spec.peer_timeout,
        stall_timeout: spec.stall_timeout,
        v2_bit: false,
    });
    let emit = |ev: FetchEvent| {
        if let Some(tx) = &events {
            let _ = tx.try_send(ev);
        }
    };
    // Never sent on: dropping `_stop_tx` (when this future returns or is dropped) ends
    // every peer task.
    let (_stop_tx, stop_rx) = flume::bounded::<()>(1);
    let (done_tx, done_rx) = flume::unbounded::<PeerResult>();
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut queue: VecDeque<PeerCandidate> = VecDeque::new();
    let mut running = 0usize;
    let mut tried = 0usize;
    let mut banned = Vec::new();
    let mut candidates_open = true;
    // Once a verified dict turned out private, DHT and PEX peers are not worth a connect.
    let mut private = false;

    enum Wake {
        Candidate(Option<PeerCandidate>),
        Done(PeerResult),
        Deadline,
    }

    loop {
        while running < peers_max {
            let Some(c) = queue.pop_front() else { break };
            if private && !c.source.allowed_for_private() {
                emit(FetchEvent::PeerFailed(c.addr, PRIVATE_VIA_DHT_OR_PEX));
                continue;
            }
            spawn_peer(
                c,
                cfg.clone(),
                stop_rx.clone(),
                done_tx.clone(),
                events.clone(),
            );
            running += 1;
            tried += 1;
        }
        if !candidates_open && running == 0 {
            return Err(FetchError::NoPeers { tried, banned });
        }
        let wake = monoio::select! {
            c = candidates.recv_async(), if candidates_open => Wake::Candidate(c.ok()),
            r = done_rx.recv_async() => Wake::Done(r.expect("the fetch holds a sender")),
            _ = monoio::time::sleep_until(deadline) => Wake::Deadline,
        };
        match wake {
            Wake::Deadline => return Err(FetchError::Deadline { tried, banned }),
            Wake::Candidate(None) => candidates_open = false,
            Wake::Candidate(Some(c)) => {
                if seen.len() < CANDIDATES_PER_FETCH_MAX && seen.insert(c.addr) {
                    emit(FetchEvent::PeerFound(c));
                    queue.push_back(c);
                }
            }
            Wake::Done((c, Err(e))) => {
                running -= 1;
                if matches!(e, PeerFetchError::HashMismatch) {
                    tracing::debug!(peer = %c.addr, "banned: metadata fails the hash");
                    banned.push(c.addr);
                    emit(FetchEvent::Banned(c.addr));
                } else {
                    tracing::trace!(peer = %c.addr, "peer failed: {e}");
                    emit(FetchEvent::PeerFailed(c.addr, e.reason()));
                }
            }
            Wake::Done((c, Ok(info))) => {
                running -= 1;
                let summary =
                    metainfo::validate_info(&info).map_err(|e| FetchError::InvalidInfo {
                        from: c.addr,
                        reason: e.to_string(),
                    })?;
                if !summary.hashes.handshake_keys().any(|k| k == spec.key) {
                    // Possible only if the key is the SHA-256 prefix of a dict without
                    // `meta version 2`: not a torrent anyone can have announced.
                    return Err(FetchError::InvalidInfo {
                        from: c.addr,
                        reason: "the info-hash is neither its v1 nor its v2 hash".into(),
                    });
                }
                if summary.private && !c.source.allowed_for_private() {
                    private = true;
                    emit(FetchEvent::PeerFailed(c.addr, PRIVATE_VIA_DHT_OR_PEX));
                    continue;
                }
                return Ok(FetchSuccess {
                    info,
                    summary,
                    from: c,
                    peers_tried: tried,
                    banned,
                });
            }
        }
    }
}

fn spawn_peer(
    c: PeerCandidate,
    cfg: Rc<PeerFetchConfig>,
    stop: flume::Receiver<()>,
    done: flume::Sender<PeerResult>,
    events: Option<flume::Sender<FetchEvent>>,
) {
    monoio::spawn(async move {
        let addr = c.addr;
        let mut progress = |p: PeerProgress| {
            let Some(tx) = &events else { return };
            let _ = tx.try_send(match p {
                PeerProgress::Connected => FetchEvent::Connected(addr),
                PeerProgress::MetadataSize(size) => FetchEvent::MetadataSize(addr, size),
                PeerProgress::Piece { received, total } => FetchEvent::Piece {
                    addr,
                    received,
                    total,
                },
            });
        };
        let exchange = async {
            if c.source == crate::upstream::PeerSource::Parent {
                fetch_from_parent_with(addr, &cfg, &mut progress).await
            } else {
                fetch_from_peer_with(addr, &cfg, &mut progress).await
            }
        };
        let result = monoio::select! {
            r = exchange => Some(r),
            _ = stop.recv_async() => None,
        };
        if let Some(r) = result {
            // The fetch may have returned meanwhile; then nobody needs the result.
            let _ = done.send((c, r));
        }
    });
}
