//! Counters of the shared tier, exported as `magnetar_shared_*`. Written from the tier's
//! thread and (the overflow counter) from appending threads, so plain atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::admin::metrics::{write_counter, write_gauge, write_histogram};

/// Upper bounds (ms) of the GET/PUT latency buckets: a loopback store answers in about a
/// millisecond, a remote region in tens, a sick one in seconds.
pub const OP_BUCKETS_MS: [u64; 13] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000];

#[derive(Default)]
pub struct OpHistogram {
    buckets: [AtomicU64; OP_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl OpHistogram {
    pub fn record(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = OP_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b as f64)
            .unwrap_or(OP_BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let bounds: Vec<f64> = OP_BUCKETS_MS.iter().map(|&ms| ms as f64 / 1000.0).collect();
        let counts: Vec<u64> = self.buckets.iter().map(|c| c.load(Relaxed)).collect();
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        write_histogram(out, name, help, &bounds, &counts, sum);
    }
}

macro_rules! shared_counters {
    ($($name:ident: $help:literal,)*) => {
        #[derive(Default)]
        pub struct SharedStats {
            $(pub $name: AtomicU64,)*
            pub get_latency: OpHistogram,
            pub put_latency: OpHistogram,
            /// Records and tombstones waiting to be uploaded (gauge).
            pub backlog: AtomicU64,
            /// 1 while the store's last operation failed (gauge).
            pub degraded: AtomicU64,
            /// Unix seconds the uploader's durable cursor stands at (gauge).
            pub cursor: AtomicU64,
            /// `tomb-log/` names stamped beyond now + clock skew in the last poll (gauge).
            pub tombstones_future: AtomicU64,
        }

        impl SharedStats {
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Relaxed)),)*]
            }
        }
    };
}

shared_counters! {
    get_hits: "Misses served from the shared tier (object found and verified).",
    get_misses: "Misses the shared tier did not have (404): filled from the swarm.",
    get_corrupt: "Objects that failed verification against their info-hash: not served, the swarm filled the miss.",
    get_tombstoned: "Misses refused because the shared tier holds a tombstone for the hash.",
    get_errors: "GETs that failed or timed out (the swarm filled the miss).",
    get_skipped_degraded: "GETs not tried because the shared tier was failing (the swarm filled the miss).",
    puts: "Objects written (info dicts and tombstones).",
    put_bytes: "Bytes of info dicts written.",
    put_errors: "Failed writes (each is retried with back-off until it succeeds).",
    put_skipped_present: "Uploads skipped by the catch-up walk: the object was already there.",
    tombstones_published: "Deletes and blocks of this node written to the shared tier.",
    tombstones_applied: "Tombstones of other nodes applied here (record deleted and hash blocked).",
    tombstones_unauthenticated: "Tombstones in the bucket ignored: not signed with this node's fleet key (or no key is configured).",
    overflows: "Store notifications dropped because the upload queue was full (a catch-up walk uploads them).",
    list_errors: "Failed tombstone polls.",
}

impl SharedStats {
    pub fn write(&self, out: &mut String) {
        for (name, help, v) in self.fields() {
            write_counter(out, &format!("magnetar_shared_{name}_total"), help, v);
        }
        self.get_latency.write(
            out,
            "magnetar_shared_get_seconds",
            "Time of a shared-tier lookup on a miss (GET of the object and HEAD of its tombstone).",
        );
        self.put_latency.write(
            out,
            "magnetar_shared_put_seconds",
            "Time of one upload to the shared tier (all objects of one record or tombstone).",
        );
        for (name, help, v) in [
            (
                "backlog",
                "Records and tombstones waiting to be uploaded.",
                &self.backlog,
            ),
            (
                "degraded",
                "1 while the shared tier's last operation failed.",
                &self.degraded,
            ),
            (
                "tombstones_future",
                "Tombstones in the bucket stamped further ahead than the clock skew allowance: not applied until their time (a clock far ahead, or a forged name).",
                &self.tombstones_future,
            ),
            (
                "cursor_unix_seconds",
                "Everything stored before this time is in the shared tier (durable cursor).",
                &self.cursor,
            ),
        ] {
            write_gauge(
                out,
                &format!("magnetar_shared_{name}"),
                help,
                v.load(Relaxed) as f64,
            );
        }
    }
}
