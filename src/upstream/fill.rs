//! One miss, filled on its owning shard: the shared tier first (a verified object ends it,
//! a tombstone refuses it), then the swarm: parents, trackers and the DHT started at once,
//! streaming peers into the fetch (`upstream::fetch`), whose verified dict is stored and
//! handed to every waiter. The table of running fetches is `upstream::shard`'s.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shared::SharedGet;
use crate::store::Origin;
use crate::upstream::fetch::{self, FetchEvent};
use crate::upstream::shard::{offer, FetchFailure, FetchOutcome, ShardState, Upstream};
use crate::upstream::stats::UpstreamStats;
use crate::upstream::tracker::{self, AnnounceRequest};
use crate::upstream::{PeerCandidate, PeerSource};

fn announce_request(upstream: &Upstream, key: [u8; 20]) -> AnnounceRequest {
    AnnounceRequest {
        info_hash: key,
        peer_id: upstream.peer_id,
        port: upstream.listen_port.get().copied().unwrap_or(6881),
        // We have nothing yet; `left` > 0 makes trackers return seeds.
        left: 1,
        numwant: 50,
    }
}

pub(super) fn spawn_trackers(
    upstream: &Arc<Upstream>,
    key: [u8; 20],
    urls: Vec<String>,
    tx: flume::Sender<PeerCandidate>,
) {
    if urls.is_empty() {
        return;
    }
    let timeout = upstream.cfg.tracker_timeout();
    let stats = upstream.stats[upstream.owner(&key)].clone();
    stats.tracker_announces.add(urls.len() as u64);
    if let Err(e) = tracker::spawn_announces(urls, announce_request(upstream, key), timeout, tx) {
        tracing::warn!("tracker announces not started: {e}");
    }
}

/// Parents, trackers and the DHT, all at once; each streams peers into `tx`.
fn start_sources(
    upstream: &Arc<Upstream>,
    key: [u8; 20],
    extra_trackers: Vec<String>,
    tx: flume::Sender<PeerCandidate>,
) {
    let mut parents = Vec::new();
    for p in &upstream.cfg.parents {
        match std::net::ToSocketAddrs::to_socket_addrs(p.as_str()) {
            Ok(addrs) => parents.extend(addrs.map(|addr| PeerCandidate {
                addr,
                source: PeerSource::Parent,
            })),
            Err(e) => tracing::warn!(parent = %p, "cannot resolve parent node: {e}"),
        }
    }
    offer(&tx, parents);

    let mut urls = upstream.cfg.trackers.clone();
    for t in extra_trackers {
        if !urls.contains(&t) {
            urls.push(t);
        }
    }
    spawn_trackers(upstream, key, urls, tx.clone());

    if let Some(dht) = upstream.dht() {
        let stats = &upstream.stats[upstream.owner(&key)];
        let deadline = Instant::now() + Duration::from_millis(upstream.cfg.fetch_timeout_ms);
        match dht.get_peers(key, tx, deadline) {
            Ok(()) => stats.dht_lookups.inc(),
            Err(_) => stats.dht_lookups_refused.inc(),
        }
    }
}

/// What the shared tier said about a miss, as far as the fetch cares.
enum TierAnswer {
    Filled(FetchOutcome),
    /// Not there, not verifiable, or not answering: the swarm it is.
    GoToSwarm,
}

/// The shared tier's part of a miss: its verified object, stored here, ends the fetch; a
/// tombstone refuses it; anything else leaves it to the swarm.
async fn ask_shared_tier(upstream: &Upstream, key: [u8; 20], stats: &UpstreamStats) -> TierAnswer {
    let Some(tier) = upstream.shared.get() else {
        return TierAnswer::GoToSwarm;
    };
    let started = Instant::now();
    match tier.get(key).recv_async().await {
        Ok(SharedGet::Found(info)) => {
            match upstream.store_off_core_from(info, Origin::Shared).await {
                Ok(record) => {
                    stats.fetches_succeeded.inc();
                    stats.fetch_latency.record(started.elapsed());
                    tracing::info!(
                        info_hash = %hex::encode(key),
                        ms = started.elapsed().as_millis() as u64,
                        "miss filled from the shared tier"
                    );
                    TierAnswer::Filled(FetchOutcome::Ready(record))
                }
                Err(e) => {
                    tracing::warn!(info_hash = %hex::encode(key), "shared-tier metadata not stored: {e}");
                    TierAnswer::GoToSwarm
                }
            }
        }
        Ok(SharedGet::Tombstoned) => {
            TierAnswer::Filled(FetchOutcome::Failed(FetchFailure::Refused("blocked")))
        }
        Ok(SharedGet::Miss | SharedGet::Unavailable) | Err(_) => TierAnswer::GoToSwarm,
    }
}

/// While the swarm fetch runs, ask the tier again and again (`shared-recheck-max-ms`): a
/// node that stored the dict since our first look (a publisher's upload, another node's
/// swarm fill) has it in the bucket, and every client waiting here is served within
/// seconds instead of at the end of the swarm fetch. Never ends without an answer.
async fn recheck_shared_tier(
    upstream: &Upstream,
    key: [u8; 20],
    stats: &UpstreamStats,
) -> FetchOutcome {
    let mut attempt = 0;
    loop {
        let wait = upstream.shared.get().and_then(|t| t.recheck_after(attempt));
        let Some(wait) = wait else {
            return std::future::pending().await;
        };
        monoio::time::sleep(wait).await;
        attempt += 1;
        stats.shared_rechecks.inc();
        if let TierAnswer::Filled(outcome) = ask_shared_tier(upstream, key, stats).await {
            return outcome;
        }
    }
}

/// How much of the miss path a fetch may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reach {
    /// The shared tier, then the swarm.
    Everything,
    /// The shared tier only: the hash failed in the swarm recently (negative cache), but
    /// the fleet may have it since.
    SharedTierOnly,
}

/// One fetch as the shard starts it.
pub(super) struct FetchTask {
    pub key: [u8; 20],
    pub reach: Reach,
    /// Peers for the fetch: the sender is shared with the shard's table (`ShardCmd::Peers`).
    pub candidates: (flume::Sender<PeerCandidate>, flume::Receiver<PeerCandidate>),
    /// Trackers of the magnet besides the configured ones.
    pub extra_trackers: Vec<String>,
    /// Yields when the metadata came another way (the shard dropped the sender).
    pub cancel: flume::Receiver<()>,
}

pub(super) async fn run_fetch(
    task: FetchTask,
    upstream: Arc<Upstream>,
    state: Rc<RefCell<ShardState>>,
    stats: Arc<UpstreamStats>,
) {
    let FetchTask {
        key,
        reach,
        candidates: (cand_tx, candidates),
        extra_trackers,
        cancel,
    } = task;
    // Local store (checked on Join), then the shared tier, then the swarm: a tier hit
    // costs no tracker or DHT traffic.
    let tier = monoio::select! {
        a = ask_shared_tier(&upstream, key, &stats) => Some(a),
        _ = cancel.recv_async() => None,
    };
    match tier {
        // The metadata came another way meanwhile (`ShardCmd::Stored`).
        None => return,
        Some(TierAnswer::Filled(outcome)) => {
            if state.borrow().active.contains_key(&key) {
                state.borrow_mut().finish(&key, outcome);
            }
            return;
        }
        Some(TierAnswer::GoToSwarm) if reach == Reach::SharedTierOnly => {
            stats.refused_negative_cache.inc();
            let failed = FetchOutcome::Failed(FetchFailure::NegativeCached);
            if state.borrow().active.contains_key(&key) {
                state.borrow_mut().finish(&key, failed);
            }
            return;
        }
        Some(TierAnswer::GoToSwarm) => {}
    }
    start_sources(&upstream, key, extra_trackers, cand_tx);
    let started = Instant::now();
    let cfg = &upstream.cfg;
    let deadline = started + Duration::from_millis(cfg.fetch_timeout_ms);
    let spec = cfg.fetch_spec(key, upstream.peer_id, deadline);
    let (events_tx, events_rx) = flume::unbounded::<FetchEvent>();
    // Count upstream connections and bans as they happen (for metrics and the note).
    let event_stats = stats.clone();
    monoio::spawn(async move {
        while let Ok(ev) = events_rx.recv_async().await {
            match ev {
                FetchEvent::Connected(_) => event_stats.peer_connections.inc(),
                FetchEvent::Banned(_) => event_stats.peers_banned.inc(),
                _ => {}
            }
        }
    });
    let fetch = fetch::fetch(spec, candidates, Some(events_tx));
    let result = monoio::select! {
        r = fetch => Some(r),
        outcome = recheck_shared_tier(&upstream, key, &stats) => {
            // The fleet had it: the swarm fetch is dropped here, its peers with it.
            if state.borrow().active.contains_key(&key) {
                state.borrow_mut().finish(&key, outcome);
            }
            return;
        }
        _ = cancel.recv_async() => None,
    };
    // Ended because the metadata came another way (`ShardCmd::Stored` answered the
    // waiters and dropped the fetch's channels): nothing to record.
    let Some(result) = result.filter(|_| state.borrow().active.contains_key(&key)) else {
        return;
    };
    let outcome = match result {
        Ok(success) => match upstream.store_off_core(success.info).await {
            Ok(record) => {
                stats.fetches_succeeded.inc();
                stats.fetch_latency.record(started.elapsed());
                tracing::info!(
                    info_hash = %hex::encode(key),
                    from = %success.from.addr,
                    source = success.from.source.name(),
                    ms = started.elapsed().as_millis() as u64,
                    "miss filled"
                );
                FetchOutcome::Ready(record)
            }
            Err(e) => {
                stats.fetches_failed_store.inc();
                tracing::warn!(info_hash = %hex::encode(key), "fetched metadata not stored: {e}");
                FetchOutcome::Failed(FetchFailure::Failed(format!("store: {e}")))
            }
        },
        Err(e) => {
            stats.count_failure(&e);
            tracing::info!(info_hash = %hex::encode(key), "miss not filled: {e}");
            FetchOutcome::Failed(FetchFailure::Failed(e.to_string()))
        }
    };
    let mut st = state.borrow_mut();
    if let FetchOutcome::Failed(FetchFailure::Failed(_)) = &outcome {
        st.remember_failure(
            key,
            Instant::now() + Duration::from_millis(upstream.cfg.negative_cache_ms),
        );
    }
    st.finish(&key, outcome);
}
