//! Shared-tier numbers on a real three-node Garage cluster on loopback (slow; not in the
//! default suite):
//!
//! ```sh
//! cargo test --release --test shared_tier_bench -- --ignored --nocapture
//! ```
//!
//! 1. Time to serve a miss from the shared tier, next to a local hit and a swarm fill
//!    through a loopback tracker (opentracker + a seed), p50 / p99 over the same hashes,
//!    in one run.
//! 2. Upload throughput: a node whose store holds 100 000 records (an import) starts with
//!    `--shared-store`; time until every record is in the bucket.
//! 3. A cold node serves its first 10 000 distinct hashes through the tier (32 clients at
//!    once).
//! 4. Whether a fleet-wide fetch lease would pay: two nodes missing the same hashes at the
//!    same moment (how many swarm fetches happen), and what a conditional PUT
//!    (`If-None-Match: *`, the lease's primitive) costs on this store.
//!
//! Client-side timings (a TCP connect, the BEP 3/10/9 exchange and the reply), so they
//! include what a client sees. The machine is shared and noisy: read the ratios.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bep9::{fetch_metadata, FakeSeed, SeedBehaviour};
use common::garage::GarageCluster;
use common::info::{v1_info, Torrent};
use common::kit::metric;
use common::*;
use magnetar::store::{Store, StoreOptions, SyncPolicy};
use object_store::ObjectStore;

/// Limits a benchmark must lift: the defaults protect a public server from one client.
const UNTHROTTLED: [&str; 8] = [
    "--misses-per-second-max",
    "100000",
    "--misses-per-ip-per-minute-max",
    "10000000",
    "--fetches-per-shard-max",
    "4096",
    "--connections-per-ip-max",
    "4096",
];

fn node(
    cluster: &GarageCluster,
    via: usize,
    data: &Path,
    prefix: Option<&str>,
    extra: &[&str],
) -> ServerProc {
    let mut args: Vec<String> = vec!["--log".into(), "warn".into()];
    args.extend(UNTHROTTLED.iter().map(|s| s.to_string()));
    if let Some(p) = prefix {
        args.push("--shared-store".into());
        args.push(cluster.url(p));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = ServerProc::command(data, &args);
    for (k, v) in cluster.env(via) {
        cmd.env(k, v);
    }
    ServerProc::spawn(cmd)
}

fn torrents(n: usize, tag: &str) -> Vec<Torrent> {
    (0..n)
        .map(|i| Torrent::v1(v1_info(&format!("{tag}-{i:07}.bin"), 1 + i % 4)))
        .collect()
}

fn store_all(dir: &Path, ts: &[Torrent]) {
    let opts = StoreOptions {
        sync: SyncPolicy::Batch,
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(dir, opts).unwrap();
    for t in ts {
        store.append(&t.info, Default::default()).unwrap();
    }
    store.sync().unwrap();
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn timed_fetches(server: &ServerProc, ts: &[Torrent]) -> Vec<f64> {
    ts.iter()
        .map(|t| {
            let started = Instant::now();
            let got = fetch_metadata(server.addr, &t.key, Duration::from_secs(30)).unwrap();
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            assert!(got == t.info);
            ms
        })
        .collect()
}

fn wait_metric(server: &ServerProc, name: &str, value: f64, limit: Duration) -> Duration {
    let started = Instant::now();
    while metric(server, name) < value {
        assert!(
            started.elapsed() < limit,
            "{name} did not reach {value} in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
#[ignore]
fn shared_tier_numbers() {
    let cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();

    // 1. Miss latency: tier vs local hit vs swarm.
    let n = 300;
    let ts = torrents(n, "lat");
    let a_dir = tmp.path().join("a");
    store_all(&a_dir, &ts);
    let a = node(&cluster, 0, &a_dir, Some("lat"), &[]);
    wait_metric(
        &a,
        "magnetar_shared_puts_total",
        n as f64,
        Duration::from_secs(120),
    );

    let keys: Vec<[u8; 20]> = ts.iter().map(|t| t.key).collect();
    let tracker = opentracker(&keys);
    let dicts: HashMap<[u8; 20], Vec<u8>> = ts.iter().map(|t| (t.key, t.info.clone())).collect();
    let seed = FakeSeed::serving(Arc::new(dicts), SeedBehaviour::HONEST);
    for k in &keys {
        let req = magnetar::upstream::tracker::AnnounceRequest {
            info_hash: *k,
            peer_id: *b"-TS0001-benchseed000",
            port: seed.addr.port(),
            left: 0,
            numwant: 0,
        };
        magnetar::upstream::tracker::announce(&tracker.http_url(), &req, Duration::from_secs(5))
            .unwrap();
    }
    let swarm = node(
        &cluster,
        2,
        &tmp.path().join("swarm"),
        None,
        &["--tracker", &tracker.http_url()],
    );
    let b = node(&cluster, 1, &tmp.path().join("b"), Some("lat"), &[]);
    let mut swarm_ms = timed_fetches(&swarm, &ts);
    let mut tier_ms = timed_fetches(&b, &ts);
    let mut hit_ms = timed_fetches(&b, &ts);
    assert_eq!(metric(&b, "magnetar_shared_get_hits_total"), n as f64);
    let (h50, h99) = (pct(&mut hit_ms, 0.5), pct(&mut hit_ms, 0.99));
    let (t50, t99) = (pct(&mut tier_ms, 0.5), pct(&mut tier_ms, 0.99));
    let (s50, s99) = (pct(&mut swarm_ms, 0.5), pct(&mut swarm_ms, 0.99));
    eprintln!("miss latency over {n} hashes, client side, ms (p50 / p99):");
    eprintln!("  local hit             {h50:8.2} / {h99:8.2}");
    eprintln!(
        "  shared tier (Garage)  {t50:8.2} / {t99:8.2}   p50 {:.1}x a hit",
        t50 / h50
    );
    eprintln!(
        "  swarm via tracker     {s50:8.2} / {s99:8.2}   p50 {:.1}x the tier",
        s50 / t50
    );
    drop((a, b, swarm, seed, tracker));

    // 4. Simultaneous misses on two nodes, and the price of a lease.
    let m = 100;
    let ts4 = torrents(m, "both");
    let dicts: HashMap<[u8; 20], Vec<u8>> = ts4.iter().map(|t| (t.key, t.info.clone())).collect();
    let seed = FakeSeed::serving(Arc::new(dicts), SeedBehaviour::HONEST);
    let parent = seed.addr.to_string();
    let f = node(
        &cluster,
        0,
        &tmp.path().join("f"),
        Some("both"),
        &["--parent", &parent],
    );
    let g = node(
        &cluster,
        1,
        &tmp.path().join("g"),
        Some("both"),
        &["--parent", &parent],
    );
    let mut both_ms = Vec::new();
    for t in &ts4 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for n in [&f, &g] {
                s.spawn(|| {
                    assert!(
                        fetch_metadata(n.addr, &t.key, Duration::from_secs(30)).unwrap() == t.info
                    )
                });
            }
        });
        both_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let swarm_fetches = seed.connections();
    let store = cluster.store(0);
    let mut create_ms = Vec::new();
    let mut refused = 0;
    for i in 0..m {
        let path = object_store::path::Path::from(format!("lease-probe/{i}"));
        let opts = object_store::PutOptions::from(object_store::PutMode::Create);
        let started = Instant::now();
        let first = cluster
            .block_on(store.put_opts(
                &path,
                object_store::PutPayload::from_static(b"lease"),
                opts.clone(),
            ))
            .unwrap();
        create_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        first.unwrap();
        let second = cluster
            .block_on(store.put_opts(&path, object_store::PutPayload::from_static(b"lease"), opts))
            .unwrap();
        if second.is_err() {
            refused += 1;
        }
    }
    eprintln!(
        "simultaneous misses: {m} hashes asked of two nodes at once -> {swarm_fetches} swarm fetches \
         ({:.2} per hash); both answered in p50 {:.1} ms",
        swarm_fetches as f64 / m as f64,
        pct(&mut both_ms, 0.5)
    );
    eprintln!(
        "conditional PUT (If-None-Match: *): p50 {:.2} ms, p99 {:.2} ms; a second create of the same name refused {refused}/{m} times",
        pct(&mut create_ms, 0.5),
        pct(&mut create_ms, 0.99)
    );
    drop((f, g, seed));

    // 2. Upload throughput of a 100k-record store.
    let big = 100_000;
    let ts = torrents(big, "put");
    let d_dir = tmp.path().join("d");
    let started = Instant::now();
    store_all(&d_dir, &ts);
    eprintln!(
        "stored {big} records locally in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let d = node(
        &cluster,
        0,
        &d_dir,
        Some("put"),
        &["--shared-put-concurrency", "64"],
    );
    let took = wait_metric(
        &d,
        "magnetar_shared_puts_total",
        big as f64,
        Duration::from_secs(1800),
    )
    .max(started.elapsed());
    eprintln!(
        "uploaded {big} records in {:.1} s: {:.0} records/s (64 in flight, 3 Garage nodes, RF 3)",
        took.as_secs_f64(),
        big as f64 / took.as_secs_f64()
    );
    drop(d);

    // 3. A cold node serves its first 10k distinct hashes through the tier.
    let first = 10_000;
    let e = node(&cluster, 1, &tmp.path().join("e"), Some("put"), &[]);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let lat: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= first {
                            return mine;
                        }
                        let t = &ts[i];
                        let t0 = Instant::now();
                        let got = fetch_metadata(e.addr, &t.key, Duration::from_secs(30)).unwrap();
                        assert!(got == t.info);
                        mine.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = started.elapsed();
    let mut lat = lat;
    eprintln!(
        "cold node: first {first} distinct hashes through the tier in {:.1} s ({:.0}/s, 32 clients); per fetch p50 {:.1} ms, p99 {:.1} ms",
        total.as_secs_f64(),
        first as f64 / total.as_secs_f64(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    assert_eq!(metric(&e, "magnetar_shared_get_hits_total"), first as f64);
}
