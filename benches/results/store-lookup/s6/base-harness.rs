//! Criterion micro-benchmarks of the store: handshake-key lookup in a 100k-record store, and
//! record verification (validate + SHA-1 of an info dict, what recovery and every append do)
//! in MB/s. `cargo bench --bench store`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use magnetar::metainfo::{validate_info, verify_info};
use magnetar::store::{AppendOptions, Store, StoreOptions, SyncPolicy};

#[path = "../loadgen/src/synth.rs"]
#[allow(dead_code)]
mod synth;

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        StoreOptions {
            sync: SyncPolicy::Batch,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let n = 100_000u64;
    let keys: Vec<[u8; 20]> = (0..n)
        .map(|i| {
            let info = synth::nth_dict(1, synth::SizeMix::Fixed(300), i);
            let r = store.append(&info, AppendOptions::default()).unwrap();
            r.record().hashes().v1.unwrap()
        })
        .collect();
    if let Ok(rounds) = std::env::var("STORE_BENCH_INTERLEAVED") {
        interleaved(&store, &keys, rounds.parse().unwrap_or(200));
        return;
    }
    let mut g = c.benchmark_group("store");
    let mut i = 0usize;
    g.bench_function("lookup_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            store.lookup(black_box(&keys[i])).unwrap()
        })
    });
    g.bench_function("lookup_miss_100k", |b| {
        b.iter(|| store.lookup(black_box(&[0xA5; 20])).is_none())
    });
    g.finish();

    let mut g = c.benchmark_group("verify");
    for size in [300usize, 16 * 1024, 128 * 1024] {
        let info = synth::info_dict(3, size);
        let hashes = validate_info(&info).unwrap().hashes;
        g.throughput(Throughput::Bytes(info.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("validate_info", info.len()),
            &info,
            |b, info| b.iter(|| validate_info(black_box(info)).unwrap()),
        );
        g.bench_with_input(
            BenchmarkId::new("verify_info", info.len()),
            &info,
            |b, info| b.iter(|| verify_info(black_box(info), &hashes)),
        );
    }
    g.finish();
}


/// Session 6: the base's half of benches/store.rs's interleaved harness (same key walk,
/// batches, fence option), for same-run ratios against the compact index.
fn interleaved(store: &Store, keys: &[[u8; 20]], rounds: usize) {
    let batch: usize = std::env::var("STORE_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let fence = std::env::var_os("STORE_BENCH_FENCE").is_some();
    let mut out1 = vec![0u8; 64 * 1024];
    type Variant<'a> = (&'static str, Box<dyn FnMut(&[u8; 20]) + 'a>);
    let mut variants: Vec<Variant> = vec![
        ("base lookup", Box::new(|k: &[u8; 20]| drop(black_box(store.lookup(k).unwrap())))),
        ("base lookup + copy", Box::new(|k: &[u8; 20]| {
            let r = store.lookup(k).unwrap();
            let info = r.info();
            out1[..info.len()].copy_from_slice(info);
            black_box(&out1[..info.len()]);
        })),
    ];
    let n = variants.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    let mut at: Vec<usize> = (0..n).map(|v| v * keys.len() / n).collect();
    for round in 0..rounds {
        for k in 0..n {
            let v = (round + k) % n;
            let f = &mut variants[v].1;
            let started = std::time::Instant::now();
            for _ in 0..batch {
                at[v] = (at[v] + 7919) % keys.len();
                f(black_box(&keys[at[v]]));
                if fence {
                    unsafe { std::arch::x86_64::_mm_lfence() };
                }
            }
            times[v].push(started.elapsed().as_nanos() as f64 / batch as f64);
        }
    }
    println!("interleaved: {rounds} rounds of {batch} lookups per variant, fence: {fence}");
    for (v, t) in times.iter_mut().enumerate() {
        t.sort_by(|a, b| a.total_cmp(b));
        let q = |x: f64| t[((t.len() - 1) as f64 * x) as usize];
        println!("{:<24} median {:7.1} ns  p10 {:7.1} ns", variants[v].0, q(0.5), q(0.1));
    }
}

criterion_group!(benches, store);
criterion_main!(benches);
