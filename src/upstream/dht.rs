//! Our Mainline DHT node (BEP 5), a wrapper over the `mainline` crate: start-up from
//! `UpstreamConfig` (bootstrap list, port, server mode), `get_peers` lookups that stream
//! peers to a fetch until its deadline, announces of stored info-hashes, and the bounds
//! on both (lookups and announces per second, lookups running at once).
//!
//! `mainline` runs its own actor thread with the UDP socket. Its blocking API is used from
//! one short-lived thread per lookup: the async API would need a `Stream` poller, and the
//! blocking one keeps this off the serving cores without one. Those threads are bounded by
//! the rate limit and by `DHT_LOOKUPS_RUNNING_MAX`.
//!
//! BEP 27: the caller never looks up or announces a private torrent here.

// The blocking API of mainline 8 is marked deprecated in favour of the async one; it is
// the one we want (see above).
#![allow(deprecated)]

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mainline::{Dht, Id};

use crate::upstream::config::UpstreamConfig;
use crate::upstream::ratelimit::TokenBucket;
use crate::upstream::tracker::usable_peer;
use crate::upstream::{PeerCandidate, PeerSource};

/// Lookups in flight at once. A lookup lasts until mainline's iterative query ends (a few
/// request timeouts of 2 s each, ~10 s on the public DHT), so at the default 20 lookups a
/// second about 200 can be in flight; past this many, a new one is refused rather than
/// adding threads.
pub const DHT_LOOKUPS_RUNNING_MAX: usize = 256;

/// Distinct peers passed on from one lookup. Each responding node returns up to ~20 peers;
/// a fetch needs a handful that answer.
pub const DHT_PEERS_PER_LOOKUP_MAX: usize = 500;

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

/// Counters of the node; read by the metrics endpoint.
#[derive(Default, Debug)]
pub struct DhtCounters {
    pub lookups_started: AtomicU64,
    pub lookups_rate_limited: AtomicU64,
    pub lookups_refused_busy: AtomicU64,
    pub peers_found: AtomicU64,
    pub announces_started: AtomicU64,
    pub announces_rate_limited: AtomicU64,
}

pub struct DhtNode {
    dht: Dht,
    local_addr: SocketAddr,
    lookups: TokenBucket,
    announces: TokenBucket,
    lookups_running: Arc<AtomicUsize>,
    pub counters: Arc<DhtCounters>,
}

/// Starts our DHT node: server mode (we are long-running and reachable), UDP port
/// `cfg.dht_port` (0: any free port), bootstrapping from `cfg.dht_bootstrap` when given,
/// else mainline's public routers. Does not wait for the bootstrap to finish (see
/// [`DhtNode::bootstrapped`]). The caller does not start one when `cfg.no_dht` is set.
pub fn start(cfg: &UpstreamConfig) -> io::Result<DhtNode> {
    let mut builder = Dht::builder();
    builder.server_mode().port(cfg.dht_port);
    if !cfg.dht_bootstrap.is_empty() {
        // mainline silently drops names that do not resolve; an operator's list where
        // none does is a configuration error worth failing start-up for.
        let resolvable = cfg.dht_bootstrap.iter().any(|b| {
            b.to_socket_addrs()
                .is_ok_and(|mut a| a.any(|a| a.is_ipv4()))
        });
        if !resolvable {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "no dht bootstrap node resolves to an IPv4 address: {:?}",
                    cfg.dht_bootstrap
                ),
            ));
        }
        builder.bootstrap(&cfg.dht_bootstrap);
    }
    let dht = builder.build()?;
    let local_addr = SocketAddr::V4(dht.info().local_addr());
    tracing::info!(addr = %local_addr, "dht node started");
    Ok(DhtNode {
        dht,
        local_addr,
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
    })
}

/// Decrements the running-lookups count when a lookup thread ends, however it ends.
struct RunningLookup(Arc<AtomicUsize>);

impl Drop for RunningLookup {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DhtNode {
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
        let dht = self.dht.clone();
        let counters = self.counters.clone();
        let spawned = std::thread::Builder::new()
            .name("dht-lookup".into())
            .spawn(move || {
                let _running = running;
                lookup(&dht, info_hash, &tx, deadline, &counters);
            });
        if let Err(e) = spawned {
            // The closure (and with it the running count) was dropped; like being busy.
            tracing::warn!(error = %e, "cannot spawn a dht lookup thread");
            return Err(DhtError::Busy);
        }
        Ok(())
    }

    /// Starts an announce of `info_hash` on TCP `port` (mainline's async API, so many can be
    /// in flight on one thread); the future resolves when the closest nodes have been told.
    /// Refused at once with `RateLimited` when `dht_announces_per_second_max` is spent.
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
        let dht = self.dht.clone().as_async();
        Ok(async move {
            dht.announce_peer(id(info_hash), Some(port))
                .await
                .map(|_| ())
                .map_err(|e| DhtError::Announce(e.to_string()))
        })
    }

    /// Lookups whose thread is still running (for metrics).
    pub fn lookups_running(&self) -> usize {
        self.lookups_running.load(Ordering::Relaxed)
    }

    /// The UDP address our node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Blocks until the bootstrap lookup has finished; true if it found any node (the
    /// routing table is not empty). For start-up logs and tests.
    pub fn bootstrapped(&self) -> bool {
        self.dht.bootstrapped()
    }
}

fn id(info_hash: [u8; 20]) -> Id {
    Id::from_bytes(info_hash).expect("an info-hash is 20 bytes, the size of a DHT id")
}

fn lookup(
    dht: &Dht,
    info_hash: [u8; 20],
    tx: &flume::Sender<PeerCandidate>,
    deadline: Instant,
    counters: &DhtCounters,
) {
    let mut seen = HashSet::new();
    // Each item is one node's answer. `next` blocks until the next answer or the end of the
    // query, so a deadline that passes while waiting is noticed at the next answer; the
    // thread lives until then, bounded by mainline's query lifetime.
    for batch in dht.get_peers(id(info_hash)) {
        for peer in batch {
            if Instant::now() >= deadline || seen.len() >= DHT_PEERS_PER_LOOKUP_MAX {
                return;
            }
            let addr = SocketAddr::V4(peer);
            if !usable_peer(&addr) || !seen.insert(addr) {
                continue;
            }
            let candidate = PeerCandidate {
                addr,
                source: PeerSource::Dht,
            };
            counters.peers_found.fetch_add(1, Ordering::Relaxed);
            if tx.send(candidate).is_err() {
                return;
            }
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}
