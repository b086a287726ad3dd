//! Miss-path counters, one set per shard. Fetches run on their owning shard's core, so
//! each set has one writer (the same single-writer `Counter` as the serving counters);
//! readers sum the shards.

use std::time::Duration;

pub use crate::server::stats::Counter;

/// Upper bounds (ms) of the fetch latency buckets, Prometheus-style (cumulative when
/// exported). A miss filled from a loopback seed takes milliseconds; one from the public
/// DHT tens of seconds.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000,
];

/// Fetch latency as bucket counts plus a sum.
#[derive(Default, Debug)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts fetches with latency <= LATENCY_BUCKETS_MS[i] and above the
    /// previous bound; the last slot counts the rest.
    pub buckets: [Counter; LATENCY_BUCKETS_MS.len() + 1],
    pub sum_ms: Counter,
    pub count: Counter,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].inc();
        self.sum_ms.add(ms);
        self.count.inc();
    }
}

macro_rules! upstream_stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct UpstreamStats {
            $($(#[$doc])* pub $name: Counter,)*
            /// Time from the first miss to verified, stored metadata.
            pub fetch_latency: LatencyHistogram,
        }

        impl UpstreamStats {
            /// `name value` pairs summed over shards, for logs and metrics.
            pub fn sum_fields<'a>(shards: impl IntoIterator<Item = &'a UpstreamStats> + Clone) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), shards.clone().into_iter().map(|s| s.$name.get()).sum()),)*]
            }
        }
    };
}

upstream_stats! {
    /// New upstream fetches started.
    fetches_started,
    /// Misses that joined a fetch already running.
    joins,
    /// Fetches that ended with verified metadata stored.
    fetches_succeeded,
    /// Fetches finished by a connecting client that had the metadata itself.
    fetches_filled_by_client,
    /// Fetches that ran out of time.
    fetches_failed_deadline,
    /// Fetches whose peer sources ran dry with every peer failed.
    fetches_failed_no_peers,
    /// Fetches that failed for another reason.
    fetches_failed_other,
    /// Fetched, verified metadata that could not be stored (disk full, I/O error).
    fetches_failed_store,
    /// Misses refused: the hash is in the negative cache.
    refused_negative_cache,
    /// Misses refused: `fetches_per_shard_max` fetches were running.
    refused_fetches_per_shard,
    /// Misses refused: `misses_per_second_max` reached.
    refused_misses_per_second,
    /// Upstream peer connections established.
    peer_connections,
    /// Peers banned for serving bytes that failed the hash.
    peers_banned,
    /// Tracker announces sent.
    tracker_announces,
    /// DHT lookups started.
    dht_lookups,
    /// DHT lookups refused by `dht_queries_per_second_max`.
    dht_lookups_refused,
    /// Shared-tier lookups made again by a pending miss (`shared-recheck-max-ms`).
    shared_rechecks,
}

impl UpstreamStats {
    /// Counts a failed fetch under its reason.
    pub fn count_failure(&self, e: &crate::upstream::fetch::FetchError) {
        use crate::upstream::fetch::FetchError;
        match e {
            FetchError::Deadline { .. } => self.fetches_failed_deadline.inc(),
            FetchError::NoPeers { .. } => self.fetches_failed_no_peers.inc(),
            _ => self.fetches_failed_other.inc(),
        }
    }
}
