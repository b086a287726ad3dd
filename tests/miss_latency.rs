//! Measurement, not a pass/fail claim: miss latency through a tracker and through a
//! local DHT, against two baselines from the same run (a direct fetch from the seed, and
//! a hit from the store), plus upstream connections per miss.
//!
//!     cargo test --release --test miss_latency -- --ignored --nocapture
//!
//! Seeds are `FakeSeed`s (an honest BEP 9 peer per torrent, answering at once) so the
//! figures are magnetar's own work: handshake, owner-shard hop, source lookup, upstream
//! connect + fetch, verify, fdatasync, wake-up of the waiting client.

#![allow(deprecated)] // mainline's blocking API is deprecated in favour of async; fine in tests.

mod common;

use std::time::{Duration, Instant};

use common::bep9::{fetch_metadata, FakeSeed, SeedBehaviour};
use common::info::v1_info;
use common::*;
use sha1::{Digest, Sha1};

const MISSES: usize = 40;

/// 4 KB .. 22 KB: 1-2 metadata pieces.
fn info(i: usize) -> Vec<u8> {
    v1_info(&format!("latency-{i}"), 200 + i * 37 % 900)
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    v.sort();
    let at = |q: f64| {
        v[((v.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(v.len() - 1)]
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        max: *v.last().unwrap(),
    }
}

fn report(what: &str, v: Vec<Duration>) -> Percentiles {
    let p = percentiles(v);
    println!(
        "{what:<34} p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
        p.p50, p.p99, p.max
    );
    p
}

fn run(source: &str) {
    let torrents: Vec<(Vec<u8>, [u8; 20])> = (0..MISSES)
        .map(|i| {
            let info = info(i);
            let key: [u8; 20] = Sha1::digest(&info).into();
            (info, key)
        })
        .collect();
    let seeds: Vec<FakeSeed> = torrents
        .iter()
        .map(|(info, key)| {
            FakeSeed::start(
                info.clone(),
                *key,
                SeedBehaviour::Honest {
                    delay: Duration::ZERO,
                },
            )
        })
        .collect();

    // Baseline: the same fetch straight from the seed, no magnetar in between.
    let direct: Vec<Duration> = torrents
        .iter()
        .zip(&seeds)
        .map(|((info, key), seed)| {
            let t = Instant::now();
            assert!(fetch_metadata(seed.addr, key, Duration::from_secs(10)).unwrap() == *info);
            t.elapsed()
        })
        .collect();
    let direct_connections: usize = seeds.iter().map(|s| s.connections()).sum();

    let tmp = tempfile::tempdir().unwrap();
    let keys: Vec<[u8; 20]> = torrents.iter().map(|t| t.1).collect();
    let _tracker;
    let _testnet;
    let mut flags: Vec<String> = [
        "--threads",
        "2",
        "--log",
        "warn",
        "--misses-per-ip-per-minute-max",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    match source {
        "tracker" => {
            let tracker = opentracker(&keys);
            use magnetar::upstream::tracker::{announce, AnnounceRequest};
            for (key, seed) in keys.iter().zip(&seeds) {
                let req = AnnounceRequest {
                    info_hash: *key,
                    peer_id: *b"-TS0001-latencyseed0",
                    port: seed.addr.port(),
                    left: 0,
                    numwant: 0,
                };
                announce(&tracker.http_url(), &req, Duration::from_secs(5)).unwrap();
            }
            flags.extend(["--tracker".into(), tracker.http_url()]);
            _tracker = Some(tracker);
        }
        "dht" => {
            let testnet = mainline::Testnet::builder(8).build().unwrap();
            let announcer = mainline::Dht::builder()
                .bootstrap(&testnet.bootstrap)
                .build()
                .unwrap();
            for (key, seed) in keys.iter().zip(&seeds) {
                announcer
                    .announce_peer(
                        mainline::Id::from_bytes(key).unwrap(),
                        Some(seed.addr.port()),
                    )
                    .unwrap();
            }
            for b in &testnet.bootstrap {
                flags.extend(["--dht-bootstrap".into(), b.clone()]);
            }
            flags.extend(["--dht-queries-per-second-max".into(), "1000".into()]);
            _testnet = Some((testnet, announcer));
        }
        _ => unreachable!(),
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = ServerProc::start(&tmp.path().join("data"), &flags);

    let misses: Vec<Duration> = torrents
        .iter()
        .map(|(info, key)| {
            let t = Instant::now();
            let got = fetch_metadata(server.addr, key, Duration::from_secs(30)).expect("miss");
            assert!(got == *info);
            t.elapsed()
        })
        .collect();
    let upstream_connections: usize =
        seeds.iter().map(|s| s.connections()).sum::<usize>() - direct_connections;
    let hits: Vec<Duration> = torrents
        .iter()
        .map(|(_, key)| {
            let t = Instant::now();
            fetch_metadata(server.addr, key, Duration::from_secs(10)).expect("hit");
            t.elapsed()
        })
        .collect();

    println!("--- {MISSES} misses via {source} (sequential, loopback, FakeSeed peers) ---");
    let d = report("direct from the seed (baseline)", direct);
    let h = report("hit through magnetar", hits);
    let m = report(&format!("miss through magnetar via {source}"), misses);
    println!(
        "miss/direct p50 ratio {:.1}x, miss/hit p50 ratio {:.1}x; upstream connections per miss: {:.2}",
        m.p50.as_secs_f64() / d.p50.as_secs_f64(),
        m.p50.as_secs_f64() / h.p50.as_secs_f64(),
        upstream_connections as f64 / MISSES as f64
    );
}

#[test]
#[ignore = "measurement; run explicitly"]
fn miss_latency_via_tracker() {
    run("tracker");
}

#[test]
#[ignore = "measurement; run explicitly"]
fn miss_latency_via_dht() {
    run("dht");
}
