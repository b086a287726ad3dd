//! Per-core fetch tables. The shard that owns an info-hash (`store::shard_of(key,
//! workers)`) runs its one fetch, however many clients on however many cores wait for it.
//! Sessions reach the owner through its mailbox: one cross-core message per miss, one
//! back with the outcome. Everything else about a fetch (its sources, its peer
//! connections, its bookkeeping) stays on the owning core.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::store::{AppendOptions, AppendOutcome, Origin, RecordRef, Store, StoreError};
use crate::upstream::config::UpstreamConfig;
use crate::upstream::dht::DhtNode;
use crate::upstream::fill;
use crate::upstream::ratelimit::{PerKeyWindow, TokenBucket};
use crate::upstream::stats::UpstreamStats;
use crate::upstream::{PeerCandidate, PeerSource};

/// Peer candidates queued for one fetch before more are dropped: a tracker or DHT
/// answering with thousands of peers must not grow memory; the fetch only ever talks to
/// `peers_per_fetch_max` at once and dedupes.
const CANDIDATES_QUEUED_MAX: usize = 1024;

/// Distinct client IPs tracked by the per-IP miss limiter; past it the oldest are
/// forgotten (so spoofed-source floods cannot grow it without bound).
const MISS_LIMITER_IPS_MAX: usize = 65_536;

/// Negative-cache entries per shard; past it the table is swept of expired entries and,
/// if still full, new failures are not cached (the global miss rate still bounds work).
const NEGATIVE_ENTRIES_MAX: usize = 100_000;

/// Why a fetch did not produce metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchFailure {
    /// The hash failed recently; not retried until the negative cache entry expires.
    NegativeCached,
    /// A bound on upstream work refused to start a fetch (named by the string).
    Refused(&'static str),
    /// The fetch ran and ended without verified metadata.
    Failed(String),
}

/// What a waiting client learns.
#[derive(Clone, Debug)]
pub enum FetchOutcome {
    Ready(RecordRef),
    Failed(FetchFailure),
}

/// Messages to the owning shard of an info-hash.
pub enum ShardCmd {
    /// Start (or join) the fetch of `key`; the outcome is sent to `waiter`.
    Join {
        key: [u8; 20],
        hints: Hints,
        waiter: flume::Sender<FetchOutcome>,
    },
    /// More peers for a running fetch (PEX from a waiting client).
    Peers {
        key: [u8; 20],
        peers: Vec<PeerCandidate>,
    },
    /// Someone else (a client that had the metadata) stored `key`: finish its fetch.
    Stored { key: [u8; 20], record: RecordRef },
}

/// Extra peer sources that come with a request (a magnet's `x.pe` and `tr`).
#[derive(Clone, Debug, Default)]
pub struct Hints {
    pub peers: Vec<PeerCandidate>,
    pub trackers: Vec<String>,
}

/// Shared by all workers: the mailboxes of every shard and what fetches need.
pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub store: Arc<Store>,
    mailboxes: Vec<flume::Sender<ShardCmd>>,
    /// Per-shard counters; shard `i` is their only writer.
    pub stats: Vec<Arc<UpstreamStats>>,
    misses_global: TokenBucket,
    misses_per_ip: PerKeyWindow<IpAddr>,
    dht: OnceLock<Option<Arc<DhtNode>>>,
    /// The port peers reach us at (announced to trackers and the DHT).
    pub(super) listen_port: OnceLock<u16>,
    /// Where the server listens (the DHT node lists the one a query reached).
    listen_addrs: OnceLock<Vec<std::net::SocketAddr>>,
    pub(super) peer_id: [u8; 20],
    /// Connections served per handshake key, merged over the cores (set by the server).
    served: OnceLock<ServedSource>,
    /// The announcer of stored hashes (DHT, --announce-tracker), when it runs.
    announcer: OnceLock<Arc<crate::upstream::announce::AnnounceStats>>,
    /// The shared tier, asked before the swarm (`--shared-store`).
    pub(super) shared: OnceLock<Arc<crate::shared::SharedTier>>,
}

/// Merges every core's served counts into the map it is given.
pub type ServedSource = Box<dyn Fn(&mut HashMap<[u8; 20], u64>) + Send + Sync>;

impl Upstream {
    /// One mailbox per worker; each worker runs `run_shard` with its receiver.
    pub fn new(
        cfg: UpstreamConfig,
        store: Arc<Store>,
        workers: usize,
    ) -> (Arc<Upstream>, Vec<flume::Receiver<ShardCmd>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..workers.max(1)).map(|_| flume::unbounded()).unzip();
        let upstream = Upstream {
            misses_global: TokenBucket::new(
                cfg.misses_per_second_max,
                cfg.misses_per_second_max.max(1),
            ),
            misses_per_ip: PerKeyWindow::new(
                cfg.misses_per_ip_per_minute_max,
                Duration::from_secs(60),
                MISS_LIMITER_IPS_MAX,
            ),
            stats: (0..tx.len())
                .map(|_| Arc::new(UpstreamStats::default()))
                .collect(),
            cfg,
            store,
            mailboxes: tx,
            dht: OnceLock::new(),
            listen_port: OnceLock::new(),
            listen_addrs: OnceLock::new(),
            peer_id: crate::upstream::peer_id(u64::MAX),
            served: OnceLock::new(),
            announcer: OnceLock::new(),
            shared: OnceLock::new(),
        };
        (Arc::new(upstream), rx)
    }

    /// Starts the DHT node (unless disabled) and the announcer of stored info-hashes to the
    /// DHT (unless `no_dht_announce`) and to the `--announce-tracker`s (see
    /// `upstream::announce`). Called once by the server. `serving_udp`: the server serves
    /// uTP, so the node can be on the serving port (`--dht-socket serving`).
    pub fn start_dht(self: &Arc<Self>, serving_udp: bool) -> std::io::Result<()> {
        use crate::upstream::config::DhtSocket;
        if self.cfg.dht_socket == DhtSocket::Serving && self.cfg.dht_port != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "--dht-port is the port of --dht-socket own; the DHT is on the serving port \
                 by default (--dht-socket serving): drop --dht-port or add --dht-socket own",
            ));
        }
        let node = if self.cfg.no_dht {
            None
        } else {
            let node = match self.cfg.dht_socket {
                DhtSocket::Serving if serving_udp => {
                    crate::upstream::dht::start_serving(&self.cfg)?
                }
                DhtSocket::Serving => {
                    tracing::warn!(
                        "dht: --dht-socket serving needs uTP on (no UDP on the serving port); \
                         the node gets a port of its own (--dht-port)"
                    );
                    crate::upstream::dht::start(&self.cfg)?
                }
                DhtSocket::Own => crate::upstream::dht::start(&self.cfg)?,
            };
            node.set_holdings(crate::upstream::dht::StoreHoldings::start(Arc::downgrade(
                self,
            ))?);
            Some(Arc::new(node))
        };
        let _ = self.dht.set(node.clone());
        if let Some(stats) = crate::upstream::announce::start(self, node)? {
            let _ = self.announcer.set(stats);
        }
        Ok(())
    }

    /// Misses ask `tier` before the swarm from now on.
    pub fn set_shared(&self, tier: Arc<crate::shared::SharedTier>) {
        let _ = self.shared.set(tier);
    }

    /// Where the served counts come from (the server's per-core tables).
    pub fn set_served_source(&self, source: ServedSource) {
        let _ = self.served.set(source);
    }

    /// Connections served per handshake key so far, all cores merged (empty until the
    /// server set its source).
    pub fn served_counts(&self) -> HashMap<[u8; 20], u64> {
        let mut counts = HashMap::new();
        if let Some(source) = self.served.get() {
            source(&mut counts);
        }
        counts
    }

    /// The server's listening addresses (for the DHT node's self-listing); set once the
    /// server listens.
    pub fn set_listen_addrs(&self, addrs: Vec<std::net::SocketAddr>) {
        let _ = self.listen_addrs.set(addrs);
    }

    /// The port we serve on at local address `local`: the listener on that address or on
    /// every address of its family. Before the server said (or without listeners, systemd
    /// sockets aside), the announce port.
    pub fn serving_port_at(&self, local: IpAddr) -> Option<u16> {
        let Some(addrs) = self.listen_addrs.get().filter(|a| !a.is_empty()) else {
            return self.announce_port();
        };
        addrs
            .iter()
            .find(|a| {
                a.ip() == local || (a.ip().is_unspecified() && a.is_ipv4() == local.is_ipv4())
            })
            .map(|a| a.port())
    }

    /// The port we announce, once the server set it.
    pub fn announce_port(&self) -> Option<u16> {
        self.listen_port.get().copied()
    }

    /// Our BEP 20 peer id for upstream connections and announces.
    pub fn peer_id(&self) -> [u8; 20] {
        self.peer_id
    }

    pub fn dht(&self) -> Option<&Arc<DhtNode>> {
        self.dht.get().and_then(|d| d.as_ref())
    }

    /// The TCP port peers reach us at (the public address's port, else the listen port),
    /// for announces.
    pub fn set_listen_port(&self, port: u16) {
        let _ = self.listen_port.set(port);
    }

    pub fn owner(&self, key: &[u8; 20]) -> usize {
        crate::store::shard_of(key, self.mailboxes.len())
    }

    pub fn send(&self, key: &[u8; 20], cmd: ShardCmd) {
        // A closed mailbox means the worker is gone (shutdown); the waiter sees its
        // sender dropped and closes.
        let _ = self.mailboxes[self.owner(key)].send(cmd);
    }

    /// Per-IP miss budget: false when `ip` caused too many misses this minute.
    pub fn admit_miss_from(&self, ip: IpAddr) -> bool {
        self.misses_per_ip
            .try_hit(&crate::server::limiter::budget_key(ip))
    }

    /// Starts or joins the fetch of `key`; the receiver yields the outcome once.
    pub fn submit(&self, key: [u8; 20], hints: Hints) -> flume::Receiver<FetchOutcome> {
        let (tx, rx) = flume::bounded(1);
        self.send(
            &key,
            ShardCmd::Join {
                key,
                hints,
                waiter: tx,
            },
        );
        rx
    }

    /// Validates, stores and syncs `info` off the calling core (fdatasync takes
    /// milliseconds; a serving core must not sleep in it).
    pub async fn store_off_core(&self, info: Vec<u8>) -> Result<RecordRef, StoreError> {
        self.store_off_core_from(info, Origin::Local).await
    }

    /// `store_off_core`, saying where the dict came from (the shared tier's uploader does
    /// not upload again what came from it).
    pub async fn store_off_core_from(
        &self,
        info: impl AsRef<[u8]> + Send + 'static,
        origin: Origin,
    ) -> Result<RecordRef, StoreError> {
        let (tx, rx) = flume::bounded(1);
        let store = self.store.clone();
        let opts = AppendOptions {
            origin,
            ..AppendOptions::default()
        };
        std::thread::Builder::new()
            .name("magnetar-append".into())
            .spawn(move || {
                let _ = tx.send(store.append(info.as_ref(), opts));
            })
            .map_err(|e| StoreError::Io {
                path: "append thread".into(),
                source: e,
            })?;
        match rx.recv_async().await {
            Ok(Ok(AppendOutcome::Stored(r) | AppendOutcome::AlreadyPresent(r))) => Ok(r),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Io {
                path: "append thread".into(),
                source: std::io::Error::other("append thread ended without an answer"),
            }),
        }
    }
}

/// One running fetch on the owning shard.
pub(super) struct ActiveFetch {
    pub(super) waiters: Vec<flume::Sender<FetchOutcome>>,
    pub(super) candidates: flume::Sender<PeerCandidate>,
    /// Dropping this ends the fetch task early (the metadata arrived another way).
    _cancel: flume::Sender<()>,
}

#[derive(Default)]
pub(super) struct ShardState {
    pub(super) active: HashMap<[u8; 20], ActiveFetch>,
    negative: HashMap<[u8; 20], Instant>,
}

impl ShardState {
    pub(super) fn finish(&mut self, key: &[u8; 20], outcome: FetchOutcome) {
        if let Some(fetch) = self.active.remove(key) {
            for w in fetch.waiters {
                let _ = w.try_send(outcome.clone());
            }
        }
    }

    pub(super) fn remember_failure(&mut self, key: [u8; 20], until: Instant) {
        if self.negative.len() >= NEGATIVE_ENTRIES_MAX {
            let now = Instant::now();
            self.negative.retain(|_, t| *t > now);
        }
        if self.negative.len() < NEGATIVE_ENTRIES_MAX {
            self.negative.insert(key, until);
        }
    }
}

pub(super) fn offer(
    tx: &flume::Sender<PeerCandidate>,
    peers: impl IntoIterator<Item = PeerCandidate>,
) {
    for p in peers {
        // Full queue: drop the rest; the fetch has more than it can try already.
        if tx.try_send(p).is_err() {
            break;
        }
    }
}

/// The owning side of one shard; runs on worker `index`'s runtime until its mailbox
/// closes.
pub async fn run_shard(index: usize, rx: flume::Receiver<ShardCmd>, upstream: Arc<Upstream>) {
    let state = Rc::new(RefCell::new(ShardState::default()));
    let stats = upstream.stats[index].clone();
    while let Ok(cmd) = rx.recv_async().await {
        match cmd {
            ShardCmd::Join { key, hints, waiter } => {
                if upstream.store.is_blocked(&key) {
                    let blocked = FetchFailure::Refused("blocked");
                    let _ = waiter.try_send(FetchOutcome::Failed(blocked));
                    continue;
                }
                if let Some(record) = upstream.store.lookup(&key) {
                    let _ = waiter.try_send(FetchOutcome::Ready(record));
                    continue;
                }
                let mut st = state.borrow_mut();
                if let Some(fetch) = st.active.get_mut(&key) {
                    stats.joins.inc();
                    offer(&fetch.candidates, hints.peers);
                    fetch.waiters.push(waiter);
                    // Extra trackers of a later magnet: announce to them too.
                    if !hints.trackers.is_empty() {
                        fill::spawn_trackers(
                            &upstream,
                            key,
                            hints.trackers,
                            fetch.candidates.clone(),
                        );
                    }
                    continue;
                }
                let mut reach = fill::Reach::Everything;
                if let Some(&until) = st.negative.get(&key) {
                    if until <= Instant::now() {
                        st.negative.remove(&key);
                    } else if upstream.shared.get().is_some() {
                        // Not the swarm again, but the fleet may have stored it since: a
                        // negative entry must not hide a tier hit.
                        reach = fill::Reach::SharedTierOnly;
                    } else {
                        stats.refused_negative_cache.inc();
                        let _ = waiter.try_send(FetchOutcome::Failed(FetchFailure::NegativeCached));
                        continue;
                    }
                }
                if st.active.len() >= upstream.cfg.fetches_per_shard_max {
                    stats.refused_fetches_per_shard.inc();
                    let _ = waiter.try_send(FetchOutcome::Failed(FetchFailure::Refused(
                        "fetches_per_shard_max",
                    )));
                    continue;
                }
                if !upstream.misses_global.try_take() {
                    stats.refused_misses_per_second.inc();
                    let _ = waiter.try_send(FetchOutcome::Failed(FetchFailure::Refused(
                        "misses_per_second_max",
                    )));
                    continue;
                }
                let (cand_tx, cand_rx) = flume::bounded(CANDIDATES_QUEUED_MAX);
                let (cancel_tx, cancel_rx) = flume::bounded::<()>(1);
                offer(&cand_tx, hints.peers);
                st.active.insert(
                    key,
                    ActiveFetch {
                        waiters: vec![waiter],
                        candidates: cand_tx.clone(),
                        _cancel: cancel_tx,
                    },
                );
                drop(st);
                stats.fetches_started.inc();
                let task = fill::FetchTask {
                    key,
                    reach,
                    candidates: (cand_tx, cand_rx),
                    extra_trackers: hints.trackers,
                    cancel: cancel_rx,
                };
                monoio::spawn(fill::run_fetch(
                    task,
                    upstream.clone(),
                    state.clone(),
                    stats.clone(),
                ));
            }
            ShardCmd::Peers { key, peers } => {
                if let Some(fetch) = state.borrow().active.get(&key) {
                    offer(&fetch.candidates, peers);
                }
            }
            ShardCmd::Stored { key, record } => {
                if state.borrow().active.contains_key(&key) {
                    stats.fetches_filled_by_client.inc();
                }
                state.borrow_mut().finish(&key, FetchOutcome::Ready(record));
            }
        }
    }
}

/// A peer address as an x.pe / parent hint.
pub fn hint(addr: SocketAddr, source: PeerSource) -> PeerCandidate {
    PeerCandidate { addr, source }
}

impl Upstream {
    /// The admin plane's `POST /fetch`: start (or join) the fetch of a magnet's torrent
    /// with its `x.pe` and `tr` as extra sources; resolves when it is stored or failed.
    pub fn fetch_magnet(
        self: &Arc<Self>,
        magnet: &crate::magnet::Magnet,
    ) -> impl std::future::Future<Output = Result<RecordRef, String>> + Send + 'static {
        let hints = Hints {
            peers: crate::upstream::cli::magnet_peers(magnet),
            trackers: magnet.trackers.clone(),
        };
        let rx = self.submit(magnet.handshake_key(), hints);
        async move {
            match rx.recv_async().await {
                Ok(FetchOutcome::Ready(record)) => Ok(record),
                Ok(FetchOutcome::Failed(FetchFailure::NegativeCached)) => {
                    Err("this info-hash failed recently; not retried until its negative cache entry expires".into())
                }
                Ok(FetchOutcome::Failed(FetchFailure::Refused(limit))) => {
                    Err(format!("refused by the upstream limit {limit}"))
                }
                Ok(FetchOutcome::Failed(FetchFailure::Failed(why))) => Err(why),
                Err(_) => Err("the server is shutting down".into()),
            }
        }
    }

    /// Prometheus text for the miss path: per-shard counters summed, the fetch latency
    /// histogram, DHT figures.
    pub fn write_metrics(&self, out: &mut String) {
        use crate::admin::metrics::{write_counter, write_gauge, write_histogram};
        for (name, value) in UpstreamStats::sum_fields(self.stats.iter().map(|s| &**s)) {
            write_counter(out, &format!("magnetar_upstream_{name}_total"), name, value);
        }
        let mut buckets = vec![0u64; crate::upstream::stats::LATENCY_BUCKETS_MS.len() + 1];
        let mut sum_ms = 0u64;
        for s in &self.stats {
            for (b, c) in buckets.iter_mut().zip(&s.fetch_latency.buckets) {
                *b += c.get();
            }
            sum_ms += s.fetch_latency.sum_ms.get();
        }
        let bounds: Vec<f64> = crate::upstream::stats::LATENCY_BUCKETS_MS
            .iter()
            .map(|&ms| ms as f64 / 1000.0)
            .collect();
        write_histogram(
            out,
            "magnetar_upstream_fetch_seconds",
            "Time from a miss to verified, stored metadata.",
            &bounds,
            &buckets,
            sum_ms as f64 / 1000.0,
        );
        if let Some(dht) = self.dht() {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &dht.counters;
            for (name, help, v) in [
                (
                    "lookups_started",
                    "DHT get_peers lookups started.",
                    &c.lookups_started,
                ),
                (
                    "lookups_rate_limited",
                    "DHT lookups refused by dht_queries_per_second_max.",
                    &c.lookups_rate_limited,
                ),
                (
                    "lookups_refused_busy",
                    "DHT lookups refused: too many running.",
                    &c.lookups_refused_busy,
                ),
                ("peers_found", "Peers the DHT returned.", &c.peers_found),
                (
                    "announces_started",
                    "announce_peer calls for stored info-hashes.",
                    &c.announces_started,
                ),
                (
                    "announces_rate_limited",
                    "Announces refused by dht_announces_per_second_max.",
                    &c.announces_rate_limited,
                ),
            ] {
                write_counter(
                    out,
                    &format!("magnetar_dht_{name}_total"),
                    help,
                    v.load(Relaxed),
                );
            }
            write_gauge(
                out,
                "magnetar_dht_lookups_running",
                "DHT lookups still running.",
                dht.lookups_running() as f64,
            );
            crate::upstream::dht::write_node_metrics(dht, out);
        }
        if let Some(a) = self.announcer.get() {
            crate::upstream::announce::write_metrics(a, out);
        }
    }
}
