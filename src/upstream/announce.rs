//! Keeping the held info-hashes findable by clients that read neither `x.pe` nor `xsource`
//! (Transmission up to 4.x, aria2, rtorrent, rqbit: docs/protocol-facts.md §15): they find
//! peers only through the DHT and trackers, so magnetar announces what it holds to both.
//!
//! **Which hashes.** A store can hold millions of torrents; announces cost network work, so
//! only a budget of them is kept announced, chosen by [`rank`]: the most served first (the
//! per-core served counts, merged as the admin plane does), then the most recently stored
//! (an import or a filled miss). Private torrents are never announced (BEP 27), to the DHT or
//! to a tracker. The ranking is redone every [`RERANK_INTERVAL`], so a newly fetched or
//! suddenly popular torrent joins within a minute and one that fell out is let expire.
//!
//! **How many.** An announce is only remembered for a while: jech's dht.c (Transmission's
//! DHT) drops a peer 32 minutes after its announce (`expire_storage`), libtorrent 45 minutes
//! (`announce_interval * 3 / 2` in `dht_storage.cpp`), and the mainline crate keeps the last
//! `MAX_INFO_HASHES` = 2 000 info-hashes per node in an LRU with no time limit
//! (`rpc/server/peers.rs`), i.e. until pushed out; our own node (`crate::dht`) 45 minutes. So a hash stays findable only if it is
//! re-announced every [`DHT_REANNOUNCE_INTERVAL`] (30 minutes), and the number of hashes
//! kept announced is rate × interval, less [`SCHEDULE_SLACK_PERCENT`] headroom for retries
//! and newcomers: [`hashes_kept`]`(10, 30 min)` = 16 200 at the default 10 announces a
//! second. Trackers work the same way with the tracker's own `interval`.
//!
//! **When.** Each target (the DHT, each tracker) has a [`Schedule`]: every selected hash
//! has a due time; a tick at the target's rate takes the most overdue one. New hashes are
//! due at once, in rank order; an announced one is due again one interval later; a failed
//! one after [`ANNOUNCE_RETRY_AFTER_FAILURE`].
//!
//! All of it runs on one thread (`magnetar-announce`) with a single-threaded tokio runtime:
//! DHT announces are futures that our node resolves (many in flight, each a lookup of
//! seconds, driven by the node's own threads),
//! tracker announces are the blocking miss-path clients on tokio's blocking pool, bounded
//! per tracker. Nothing here touches a serving core.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::store::Store;
use crate::upstream::dht::DhtNode;
use crate::upstream::shard::Upstream;
use crate::upstream::tracker::{self, AnnounceEvent, AnnounceRequest};

/// How often a kept hash is announced to the DHT again: under the shortest storage time of
/// common DHT implementations (32 minutes in jech's dht.c; see the module doc).
pub const DHT_REANNOUNCE_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// How long a DHT announce counts as live for the `announced_hashes` gauge: the shortest
/// common storage time (jech's dht.c, 32 minutes).
pub const DHT_ANNOUNCE_LIFETIME: Duration = Duration::from_secs(32 * 60);

/// Share of rate × interval given to distinct hashes; the rest absorbs retries, newcomers
/// and timer jitter so that no kept hash is re-announced late.
pub const SCHEDULE_SLACK_PERCENT: u64 = 90;

/// How often the ranking of stored hashes is recomputed (a walk of the store's index).
pub const RERANK_INTERVAL: Duration = Duration::from_secs(60);

/// After a failed announce the hash is tried again this much later.
pub const ANNOUNCE_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5 * 60);

/// DHT announces in flight at once. Each is an iterative lookup plus the announce to the
/// closest nodes, ~2-10 s on the public DHT; at 10 a second about 100 run at once.
pub const DHT_ANNOUNCES_RUNNING_MAX: usize = 512;

/// `--announce-tracker`s used; the rest of the list is ignored with a warning.
pub const ANNOUNCE_TRACKERS_MAX: usize = 16;

/// Hashes kept announced to one tracker, whatever its interval and the rate: bounds the
/// schedule's memory and the load magnetar puts on one tracker.
pub const TRACKER_HASHES_KEPT_MAX: usize = 100_000;

/// Blocking announces to one tracker in flight at once.
pub const TRACKER_ANNOUNCES_RUNNING_MAX: usize = 16;

/// The re-announce interval assumed until a tracker names its own (BEP 3 trackers commonly
/// answer 30 minutes; opentracker does).
pub const TRACKER_INTERVAL_DEFAULT: Duration = Duration::from_secs(30 * 60);

/// A tracker's `interval` is clamped to this range: shorter would let one tracker take
/// the whole rate for few hashes, longer would outlive its own peer timeout in practice.
pub const TRACKER_INTERVAL_MIN: Duration = Duration::from_secs(5 * 60);
pub const TRACKER_INTERVAL_MAX: Duration = Duration::from_secs(2 * 60 * 60);

/// One tracker announce may take this long (BEP 15 retries included).
pub const TRACKER_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(15);

/// How many distinct hashes `rate` announces a second keep announced when each must be
/// re-announced every `interval`.
pub fn hashes_kept(rate: u32, interval: Duration) -> usize {
    (u64::from(rate) * interval.as_secs() * SCHEDULE_SLACK_PERCENT / 100) as usize
}

/// One announcable key with what ranks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    /// Connections served this torrent since start (all its keys, all cores).
    pub served: u64,
    /// When it was stored (unix seconds): imports and filled misses.
    pub stored_at: u64,
    pub key: [u8; 20],
}

/// The best `n` candidates, best first: most served, then most recently stored (the key
/// breaks ties, so the order is total). Memory is O(n) however many candidates there are.
pub fn rank(candidates: impl IntoIterator<Item = Candidate>, n: usize) -> Vec<[u8; 20]> {
    if n == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Reverse<Candidate>> = BinaryHeap::with_capacity(n + 1);
    for c in candidates {
        if heap.len() < n {
            heap.push(Reverse(c));
        } else if heap.peek().is_some_and(|Reverse(worst)| c > *worst) {
            heap.pop();
            heap.push(Reverse(c));
        }
    }
    let mut best: Vec<Candidate> = heap.into_iter().map(|Reverse(c)| c).collect();
    best.sort_unstable_by(|a, b| b.cmp(a));
    best.into_iter().map(|c| c.key).collect()
}

/// Every announcable key of the store: non-private records (BEP 27), each of their handshake
/// keys (v1, and the v2 prefix of a v2 or hybrid torrent: BEP 52) that is not blocked, with
/// the record's served count summed over its keys.
pub fn candidates(store: &Store, served: &HashMap<[u8; 20], u64>) -> Vec<Candidate> {
    let mut out = Vec::new();
    store.for_each_record(|r| {
        if r.is_private() {
            return;
        }
        let keys: Vec<[u8; 20]> = r.hashes().handshake_keys().collect();
        let count = keys
            .iter()
            .map(|k| served.get(k).copied().unwrap_or(0))
            .sum();
        for key in keys {
            out.push(Candidate {
                served: count,
                stored_at: r.stored_at(),
                key,
            });
        }
    });
    out.retain(|c| !store.is_blocked(&c.key));
    out
}

struct Entry {
    /// Matches the heap item that is this key's current due time; older items are stale.
    generation: u64,
    /// Last successful announce.
    last_ok: Option<Instant>,
    /// The tracker has had our `started` announce for this key.
    started: bool,
}

/// When each selected key is due (sans-IO; see the module doc).
#[derive(Default)]
pub struct Schedule {
    entries: HashMap<[u8; 20], Entry>,
    due: BinaryHeap<Reverse<(Instant, u64, [u8; 20])>>,
    next_generation: u64,
}

impl Schedule {
    fn push(&mut self, key: [u8; 20], at: Instant) {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.generation = generation;
        }
        self.due.push(Reverse((at, generation, key)));
    }

    /// Makes `keys` (best first) the selected set: new keys are due at `now`, in this
    /// order; kept keys keep their due time; the others are dropped.
    pub fn set_selection(&mut self, keys: &[[u8; 20]], now: Instant) {
        let selected: std::collections::HashSet<&[u8; 20]> = keys.iter().collect();
        self.entries.retain(|k, _| selected.contains(k));
        for key in keys {
            if !self.entries.contains_key(key) {
                self.entries.insert(
                    *key,
                    Entry {
                        generation: 0,
                        last_ok: None,
                        started: false,
                    },
                );
                self.push(*key, now);
            }
        }
        // Stale heap items are skipped when popped; rebuild when they dominate.
        if self.due.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.due
                .retain(|Reverse((_, g, k))| entries.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// The most overdue selected key, if one is due at `now`; it is not due again until
    /// [`Schedule::done`] or [`Schedule::retry_at`] says when.
    pub fn next_due(&mut self, now: Instant) -> Option<[u8; 20]> {
        while let Some(Reverse((at, generation, key))) = self.due.peek().copied() {
            if at > now {
                return None;
            }
            self.due.pop();
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.generation == generation)
            {
                return Some(key);
            }
        }
        None
    }

    /// Whether `key` still needs its `started` announce (trackers).
    pub fn needs_start(&self, key: &[u8; 20]) -> bool {
        self.entries.get(key).is_some_and(|e| !e.started)
    }

    /// The announce of `key` ended at `now`: on success it is due again `again` later,
    /// else after [`ANNOUNCE_RETRY_AFTER_FAILURE`]. A key dropped meanwhile stays dropped.
    pub fn done(&mut self, key: [u8; 20], now: Instant, ok: bool, again: Duration) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        if ok {
            e.last_ok = Some(now);
            e.started = true;
        }
        let wait = if ok {
            again
        } else {
            ANNOUNCE_RETRY_AFTER_FAILURE
        };
        self.push(key, now + wait);
    }

    /// Makes `key` due again at `at` without an announce (refused by the rate limit, or no
    /// slot free).
    pub fn retry_at(&mut self, key: [u8; 20], at: Instant) {
        if self.entries.contains_key(&key) {
            self.push(key, at);
        }
    }

    /// Selected keys whose last successful announce is younger than `lifetime`.
    pub fn live(&self, now: Instant, lifetime: Duration) -> usize {
        self.entries
            .values()
            .filter(|e| e.last_ok.is_some_and(|t| now.duration_since(t) < lifetime))
            .count()
    }

    pub fn selected(&self) -> usize {
        self.entries.len()
    }
}

/// Figures of one announce target, for /metrics.
#[derive(Default, Debug)]
pub struct TargetStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Hashes whose last announce is still live (gauge).
    pub live: AtomicU64,
    /// Hashes selected to be kept announced: rate × interval × slack (gauge).
    pub budget: AtomicU64,
}

/// Figures of one `--announce-tracker`.
#[derive(Debug)]
pub struct TrackerTarget {
    pub url: String,
    pub stats: TargetStats,
    /// The tracker's last `interval` (clamped), seconds.
    interval_s: AtomicU64,
}

/// Everything the announcer reports.
#[derive(Debug, Default)]
pub struct AnnounceStats {
    pub dht: Option<TargetStats>,
    pub trackers: Vec<TrackerTarget>,
}

/// Starts the announcer thread when there is anything to announce to (the DHT unless
/// `no_dht_announce`, and the `--announce-tracker`s). Returns its figures.
pub fn start(
    upstream: &Arc<Upstream>,
    dht: Option<Arc<DhtNode>>,
) -> std::io::Result<Option<Arc<AnnounceStats>>> {
    let cfg = &upstream.cfg;
    let dht = dht.filter(|_| !cfg.no_dht_announce);
    let mut urls = Vec::new();
    for url in &cfg.announce_trackers {
        if urls.contains(url) {
            continue;
        }
        if urls.len() == ANNOUNCE_TRACKERS_MAX {
            tracing::warn!(url = %url, "more than {ANNOUNCE_TRACKERS_MAX} announce trackers: ignored");
            continue;
        }
        urls.push(url.clone());
    }
    if dht.is_none() && urls.is_empty() {
        return Ok(None);
    }
    let stats = Arc::new(AnnounceStats {
        dht: dht.as_ref().map(|_| TargetStats::default()),
        trackers: urls
            .into_iter()
            .map(|url| TrackerTarget {
                url,
                stats: TargetStats::default(),
                interval_s: AtomicU64::new(TRACKER_INTERVAL_DEFAULT.as_secs()),
            })
            .collect(),
    });
    let (weak, st) = (Arc::downgrade(upstream), stats.clone());
    std::thread::Builder::new()
        .name("magnetar-announce".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("announcer runtime not started: {e}");
                    return;
                }
            };
            rt.block_on(run(weak, dht, st));
        })?;
    Ok(Some(stats))
}

type Shared = Arc<Mutex<Schedule>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Schedule> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run(upstream: Weak<Upstream>, dht: Option<Arc<DhtNode>>, stats: Arc<AnnounceStats>) {
    // Announces carry our port: wait until the server has one.
    let (port, dht_rate, tracker_rate, peer_id) = loop {
        let Some(u) = upstream.upgrade() else { return };
        if let Some(p) = u.announce_port() {
            break (
                p,
                u.cfg.dht_announces_per_second_max,
                u.cfg.tracker_announces_per_second_max,
                u.peer_id(),
            );
        }
        drop(u);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dht_schedule: Option<Shared> = dht.as_ref().map(|_| Shared::default());
    let tracker_schedules: Vec<Shared> = stats.trackers.iter().map(|_| Shared::default()).collect();

    if let (Some(node), Some(sched)) = (dht.clone(), dht_schedule.clone()) {
        if dht_rate > 0 {
            let st = stats.clone();
            tokio::spawn(dht_loop(upstream.clone(), node, sched, st, port, dht_rate));
        }
    }
    if tracker_rate > 0 {
        for (i, sched) in tracker_schedules.iter().enumerate() {
            let ctx = TrackerCtx {
                upstream: upstream.clone(),
                stats: stats.clone(),
                index: i,
                sched: sched.clone(),
                req: AnnounceRequest {
                    info_hash: [0; 20],
                    peer_id,
                    port,
                    // A seed: trackers hand seeds to the leechers that ask.
                    left: 0,
                    numwant: 0,
                },
                rate: tracker_rate,
            };
            tokio::spawn(tracker_loop(ctx));
        }
    }

    let mut last_rank: Option<Instant> = None;
    loop {
        let Some(u) = upstream.upgrade() else { return };
        let now = Instant::now();
        if last_rank.is_none_or(|t| now.duration_since(t) >= RERANK_INTERVAL) {
            last_rank = Some(now);
            let dht_budget = if dht_schedule.is_some() {
                hashes_kept(dht_rate, DHT_REANNOUNCE_INTERVAL)
            } else {
                0
            };
            let tracker_budgets: Vec<usize> = stats
                .trackers
                .iter()
                .map(|t| {
                    let interval = Duration::from_secs(t.interval_s.load(Ordering::Relaxed));
                    hashes_kept(tracker_rate, interval).min(TRACKER_HASHES_KEPT_MAX)
                })
                .collect();
            let most = tracker_budgets.iter().copied().fold(dht_budget, usize::max);
            let (store, served) = (u.store.clone(), u.served_counts());
            drop(u);
            let ranked =
                tokio::task::spawn_blocking(move || rank(candidates(&store, &served), most))
                    .await
                    .unwrap_or_default();
            let now = Instant::now();
            if let (Some(s), Some(ds)) = (&dht_schedule, &stats.dht) {
                let n = dht_budget.min(ranked.len());
                lock(s).set_selection(&ranked[..n], now);
                ds.budget.store(dht_budget as u64, Ordering::Relaxed);
            }
            for ((s, t), budget) in tracker_schedules
                .iter()
                .zip(&stats.trackers)
                .zip(tracker_budgets)
            {
                lock(s).set_selection(&ranked[..budget.min(ranked.len())], now);
                t.stats.budget.store(budget as u64, Ordering::Relaxed);
            }
        } else {
            drop(u);
        }
        // The gauges of live announces.
        let now = Instant::now();
        if let (Some(s), Some(ds)) = (&dht_schedule, &stats.dht) {
            let live = lock(s).live(now, DHT_ANNOUNCE_LIFETIME);
            ds.live.store(live as u64, Ordering::Relaxed);
        }
        for (s, t) in tracker_schedules.iter().zip(&stats.trackers) {
            let interval = Duration::from_secs(t.interval_s.load(Ordering::Relaxed));
            let live = lock(s).live(now, interval * 3 / 2);
            t.stats.live.store(live as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn ticker(rate: u32) -> tokio::time::Interval {
    let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

async fn dht_loop(
    upstream: Weak<Upstream>,
    node: Arc<DhtNode>,
    sched: Shared,
    stats: Arc<AnnounceStats>,
    port: u16,
    rate: u32,
) {
    // An announce before the routing table has nodes fails: wait for the bootstrap.
    let n = node.clone();
    if !tokio::task::spawn_blocking(move || n.bootstrapped())
        .await
        .unwrap_or(false)
    {
        tracing::warn!("dht bootstrap found no node; announcing anyway");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(DHT_ANNOUNCES_RUNNING_MAX));
    let mut tick = ticker(rate);
    loop {
        tick.tick().await;
        if upstream.strong_count() == 0 {
            return;
        }
        let now = Instant::now();
        let Some(key) = lock(&sched).next_due(now) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            lock(&sched).retry_at(key, now + Duration::from_secs(1));
            continue;
        };
        let announce = match node.announce_async(key, port) {
            Ok(f) => f,
            Err(_) => {
                // The node's own bucket said no (timer jitter): the next tick takes it.
                lock(&sched).retry_at(key, now);
                continue;
            }
        };
        let (sched, stats) = (sched.clone(), stats.clone());
        tokio::spawn(async move {
            let result = announce.await;
            let ds = stats.dht.as_ref().expect("dht stats exist with a dht loop");
            ds.sent.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &result {
                ds.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(info_hash = %hex::encode(key), "dht announce failed: {e}");
            }
            lock(&sched).done(key, Instant::now(), result.is_ok(), DHT_REANNOUNCE_INTERVAL);
            drop(slot);
        });
    }
}

struct TrackerCtx {
    upstream: Weak<Upstream>,
    stats: Arc<AnnounceStats>,
    index: usize,
    sched: Shared,
    req: AnnounceRequest,
    rate: u32,
}

async fn tracker_loop(ctx: TrackerCtx) {
    let slots = Arc::new(tokio::sync::Semaphore::new(TRACKER_ANNOUNCES_RUNNING_MAX));
    let mut tick = ticker(ctx.rate);
    loop {
        tick.tick().await;
        if ctx.upstream.strong_count() == 0 {
            return;
        }
        let now = Instant::now();
        let (key, event) = {
            let mut s = lock(&ctx.sched);
            let Some(key) = s.next_due(now) else { continue };
            let event = if s.needs_start(&key) {
                AnnounceEvent::Started
            } else {
                AnnounceEvent::Regular
            };
            (key, event)
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            lock(&ctx.sched).retry_at(key, now + Duration::from_secs(1));
            continue;
        };
        let target = &ctx.stats.trackers[ctx.index];
        let url = target.url.clone();
        let req = AnnounceRequest {
            info_hash: key,
            ..ctx.req.clone()
        };
        let (sched, stats, index) = (ctx.sched.clone(), ctx.stats.clone(), ctx.index);
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                tracker::announce_event(&url, &req, event, TRACKER_ANNOUNCE_TIMEOUT)
            })
            .await;
            let t = &stats.trackers[index];
            t.stats.sent.fetch_add(1, Ordering::Relaxed);
            let interval = match result {
                Ok(Ok(resp)) => {
                    let i = resp
                        .interval
                        .unwrap_or(TRACKER_INTERVAL_DEFAULT)
                        .clamp(TRACKER_INTERVAL_MIN, TRACKER_INTERVAL_MAX);
                    t.interval_s.store(i.as_secs(), Ordering::Relaxed);
                    Some(i)
                }
                Ok(Err(e)) => {
                    tracing::debug!(tracker = %t.url, info_hash = %hex::encode(key), "announce failed: {e}");
                    None
                }
                Err(e) => {
                    tracing::warn!(tracker = %t.url, "announce thread failed: {e}");
                    None
                }
            };
            if interval.is_none() {
                t.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            lock(&sched).done(
                key,
                Instant::now(),
                interval.is_some(),
                interval.unwrap_or(ANNOUNCE_RETRY_AFTER_FAILURE),
            );
            drop(slot);
        });
    }
}

/// Prometheus text for the announcer.
pub fn write_metrics(stats: &AnnounceStats, out: &mut String) {
    use crate::admin::metrics::{write_counter, write_gauge, write_help_type};
    use std::fmt::Write;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    if let Some(d) = &stats.dht {
        write_counter(
            out,
            "magnetar_dht_announces_sent_total",
            "DHT announces of stored info-hashes that ran to the end (success or failure).",
            get(&d.sent),
        );
        write_counter(
            out,
            "magnetar_dht_announces_failed_total",
            "DHT announces that reached no node.",
            get(&d.failed),
        );
        write_gauge(
            out,
            "magnetar_dht_announced_hashes",
            "Info-hashes whose last DHT announce is younger than 32 minutes (still findable).",
            get(&d.live) as f64,
        );
        write_gauge(
            out,
            "magnetar_dht_announce_budget_hashes",
            "Info-hashes selected to be kept announced to the DHT (rate x 30 min x 0.9).",
            get(&d.budget) as f64,
        );
    }
    if stats.trackers.is_empty() {
        return;
    }
    let label = |url: &str| {
        url.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    type Pick = fn(&TargetStats) -> &AtomicU64;
    let families: [(&str, &str, &str, Pick); 4] = [
        (
            "magnetar_tracker_announces_total",
            "counter",
            "Announces of stored info-hashes to an --announce-tracker.",
            |s| &s.sent,
        ),
        (
            "magnetar_tracker_announce_failures_total",
            "counter",
            "Announces to an --announce-tracker that failed (error, refusal, timeout).",
            |s| &s.failed,
        ),
        (
            "magnetar_tracker_announced_hashes",
            "gauge",
            "Info-hashes whose last announce to the tracker is younger than 1.5 intervals.",
            |s| &s.live,
        ),
        (
            "magnetar_tracker_announce_budget_hashes",
            "gauge",
            "Info-hashes selected to be kept announced to the tracker.",
            |s| &s.budget,
        ),
    ];
    for (name, kind, help, pick) in families {
        write_help_type(out, name, kind, help);
        for t in &stats.trackers {
            let _ = writeln!(
                out,
                "{name}{{tracker=\"{}\"}} {}",
                label(&t.url),
                get(pick(&t.stats))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> [u8; 20] {
        [n; 20]
    }

    fn c(n: u8, served: u64, stored_at: u64) -> Candidate {
        Candidate {
            served,
            stored_at,
            key: key(n),
        }
    }

    #[test]
    fn budget_at_the_defaults() {
        assert_eq!(hashes_kept(10, DHT_REANNOUNCE_INTERVAL), 16_200);
        assert_eq!(hashes_kept(2, DHT_REANNOUNCE_INTERVAL), 3_240);
        assert_eq!(hashes_kept(5, TRACKER_INTERVAL_DEFAULT), 8_100);
        assert_eq!(hashes_kept(0, DHT_REANNOUNCE_INTERVAL), 0);
    }

    #[test]
    fn rank_puts_served_first_then_recent() {
        let all = [
            c(1, 0, 100),
            c(2, 5, 10),
            c(3, 0, 300),
            c(4, 50, 1),
            c(5, 0, 200),
            c(6, 5, 20),
        ];
        assert_eq!(
            rank(all, 10),
            [key(4), key(6), key(2), key(3), key(5), key(1)]
        );
        assert_eq!(rank(all, 3), [key(4), key(6), key(2)]);
        assert!(rank(all, 0).is_empty());
    }

    #[test]
    fn rank_keeps_only_n_of_a_million() {
        let many = (0..1_000_000u32).map(|i| {
            let mut k = [0u8; 20];
            k[..4].copy_from_slice(&i.to_be_bytes());
            Candidate {
                served: u64::from(i % 1000 == 7),
                stored_at: u64::from(i),
                key: k,
            }
        });
        let top = rank(many, 2000);
        assert_eq!(top.len(), 2000);
        // The 1 000 served ones first (newest first), then the newest unserved.
        let id = |k: &[u8; 20]| u32::from_be_bytes(k[..4].try_into().unwrap());
        assert_eq!(id(&top[0]), 999_007);
        assert!(top[..1000].iter().all(|k| id(k) % 1000 == 7));
        assert_eq!(id(&top[1000]), 999_999);
    }

    #[test]
    fn schedule_announces_new_keys_in_rank_order_then_on_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.set_selection(&[key(3), key(1), key(2)], t0);
        assert_eq!(s.next_due(t0), Some(key(3)));
        assert_eq!(s.next_due(t0), Some(key(1)));
        assert!(s.needs_start(&key(1)));
        s.done(key(3), t0, true, Duration::from_secs(60));
        s.done(key(1), t0, false, Duration::from_secs(60));
        assert!(s.needs_start(&key(1)));
        assert!(!s.needs_start(&key(3)));
        assert_eq!(s.next_due(t0), Some(key(2)));
        assert_eq!(s.next_due(t0), None, "key 2 is out until done");
        s.done(key(2), t0, true, Duration::from_secs(60));
        assert_eq!(s.next_due(t0 + Duration::from_secs(59)), None);
        let t1 = t0 + Duration::from_secs(60);
        let mut due = vec![s.next_due(t1).unwrap(), s.next_due(t1).unwrap()];
        due.sort();
        assert_eq!(due, [key(2), key(3)]);
        assert_eq!(s.next_due(t1), None, "the failed key waits for its retry");
        assert_eq!(s.next_due(t0 + ANNOUNCE_RETRY_AFTER_FAILURE), Some(key(1)));
        assert_eq!(
            s.live(t0 + Duration::from_secs(1), Duration::from_secs(30)),
            2
        );
        assert_eq!(
            s.live(t0 + Duration::from_secs(31), Duration::from_secs(30)),
            0
        );
    }

    #[test]
    fn schedule_drops_unselected_keys_and_keeps_due_times_of_kept_ones() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.set_selection(&[key(1), key(2)], t0);
        assert_eq!(s.next_due(t0), Some(key(1)));
        s.done(key(1), t0, true, Duration::from_secs(600));
        // Key 2 falls out before its turn; key 9 comes in; key 1 keeps its due time.
        s.set_selection(&[key(9), key(1)], t0);
        assert_eq!(s.selected(), 2);
        assert_eq!(s.next_due(t0), Some(key(9)));
        assert_eq!(s.next_due(t0), None);
        // A result for a dropped key is ignored.
        s.done(key(2), t0, true, Duration::from_secs(1));
        assert_eq!(s.next_due(t0 + Duration::from_secs(5)), None);
        assert_eq!(s.next_due(t0 + Duration::from_secs(600)), Some(key(1)));
        // Many reselections do not grow the heap without bound.
        for i in 0..10_000u32 {
            let k = [(i % 251) as u8; 20];
            s.set_selection(&[k], t0);
        }
        assert!(s.due.len() <= 2 * s.entries.len() + 1025, "{}", s.due.len());
    }
}
