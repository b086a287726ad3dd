//! Measurement, not a pass/fail claim (run with `--ignored --nocapture`, release build):
//! handshake-path lookups from one core vs two cores at once against the shared,
//! lock-striped index. This is the cross-core read path every connection takes; it shows
//! whether reading any shard's records from any core needs a cross-core hop (it does not).
//!
//! cargo test --release --test store_scaling -- --ignored --nocapture

mod common;

use std::time::Instant;

use magnetar::store::{AppendOptions, Store, StoreOptions, SyncPolicy};

use common::info::{v1_info, v1_key};

fn info_dict(i: usize) -> Vec<u8> {
    v1_info(&format!("t{i}"), 1)
}

#[test]
#[ignore = "measurement; run explicitly"]
fn lookups_scale_across_cores() {
    const RECORDS: usize = 100_000;
    const LOOKUPS: usize = 4_000_000;
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        sync: SyncPolicy::Batch,
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(dir.path(), opts).unwrap();
    let keys: Vec<[u8; 20]> = (0..RECORDS)
        .map(|i| {
            let info = info_dict(i);
            store.append(&info, AppendOptions::default()).unwrap();
            v1_key(&info)
        })
        .collect();
    let run = |threads: usize| -> f64 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (store, keys) = (&store, &keys);
                s.spawn(move || {
                    let mut hits = 0usize;
                    for i in 0..LOOKUPS {
                        let k = &keys[(i * 7919 + t * 104_729) % RECORDS];
                        hits += store.lookup(k).map_or(0, |r| r.len().min(1));
                    }
                    assert_eq!(hits, LOOKUPS);
                });
            }
        });
        (threads * LOOKUPS) as f64 / start.elapsed().as_secs_f64()
    };
    // Baseline in the same run: the same loop over a private HashMap per thread (nothing
    // shared), i.e. how far this machine's two vCPUs scale at all.
    let private: std::collections::HashMap<[u8; 20], usize> =
        keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let baseline = |threads: usize| -> f64 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (map, keys) = (private.clone(), &keys);
                s.spawn(move || {
                    let mut hits = 0usize;
                    for i in 0..LOOKUPS {
                        let k = &keys[(i * 7919 + t * 104_729) % RECORDS];
                        hits += map.get(k).map_or(0, |_| 1);
                    }
                    assert_eq!(hits, LOOKUPS);
                });
            }
        });
        (threads * LOOKUPS) as f64 / start.elapsed().as_secs_f64()
    };
    let median = |f: &dyn Fn(usize) -> f64, threads| {
        let mut v: Vec<f64> = (0..5).map(|_| f(threads)).collect();
        v.sort_by(f64::total_cmp);
        v[2]
    };
    let (s1, s2) = (median(&run, 1), median(&run, 2));
    let (b1, b2) = (median(&baseline, 1), median(&baseline, 2));
    println!(
        "store lookups/s, median of 5: 1 thread {:.2} M/s, 2 threads {:.2} M/s, scaling {:.2}x",
        s1 / 1e6,
        s2 / 1e6,
        s2 / s1
    );
    println!(
        "private-map baseline:         1 thread {:.2} M/s, 2 threads {:.2} M/s, scaling {:.2}x ({RECORDS} records)",
        b1 / 1e6,
        b2 / 1e6,
        b2 / b1
    );
}
