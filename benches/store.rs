//! Criterion micro-benchmarks of the store: handshake-key lookup in a 100k-record store (alone,
//! and followed by a copy of the record's bytes, which is what serving a hit does next), and
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
    // What a worker's handshake does (`Store::lookup_resident`): the lookup plus the
    // residency check of the header and record pages (bits known resident: no mincore).
    // `now` is the worker's time of the event (both drivers read it for every event, for
    // their deadlines, before and after the residency check existed): here read once per
    // `TURN` lookups, so the bits still age (and are asked about again with `mincore`)
    // every `RESIDENCY_AGE` as in the server.
    let mut clock = Turn::default();
    g.bench_function("lookup_resident_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            match store.lookup_resident(black_box(&keys[i]), clock.now()) {
                magnetar::store::Resident::Hit(r) => r,
                other => panic!("a resident record: {other:?}"),
            }
        })
    });
    // What a hit is for: the record's bytes go out next (the kernel copies them from the
    // mapping into the socket). Measured with the lookup so that the cost of reaching the
    // record's page is counted once, wherever the index reaches it first.
    let mut out = vec![0u8; 64 * 1024];
    g.bench_function("lookup_hit_copy_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            let r = store.lookup(black_box(&keys[i])).unwrap();
            let info = r.info();
            out[..info.len()].copy_from_slice(info);
            black_box(&out[..info.len()]);
        })
    });
    // The serving path of today's worker end to end: the resident lookup of the handshake,
    // then the bytes a piece request sends from the mapping. To compare with
    // `lookup_hit_copy_100k` of a build before the compact index (whose handshake used
    // `lookup`, its keys in RAM, and first touched the mapping at the send).
    g.bench_function("lookup_resident_hit_copy_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            let r = match store.lookup_resident(black_box(&keys[i]), clock.now()) {
                magnetar::store::Resident::Hit(r) => r,
                other => panic!("a resident record: {other:?}"),
            };
            let info = r.info();
            out[..info.len()].copy_from_slice(info);
            black_box(&out[..info.len()]);
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

/// `STORE_BENCH_INTERLEAVED=<rounds>`: the hit path's variants in batches of
/// `STORE_BENCH_BATCH` lookups (default 10 000), one batch of each per round in a rotating
/// order, so that a change in machine load (other jobs on a shared machine) hits every
/// variant alike, where criterion measures one benchmark for seconds after another. Prints
/// each variant's median and 10th percentile of ns per lookup over the rounds, and its
/// median over `lookup`'s. `STORE_BENCH_FIXED_NOW=1`: the resident lookups get one fixed
/// `now`, so the residency bits never age (no `mincore` after the first pass).
///
/// `STORE_BENCH_FENCE=1` (x86-64): an `lfence` after every lookup, so a lookup starts only
/// when the previous one is done. Without it the core overlaps the next lookup's cache
/// misses (key, hash, table entry) with the current one's (the header in the mapping), and
/// the fewer instructions a variant runs per lookup, the more it overlaps: issue 20's
/// session 6 found that this overlap, not the residency check, is what made
/// `lookup_resident` 1.3× `lookup` here (fenced: 1.00–1.03×). A server never does two
/// lookups back to back (a whole event's work lies between them), so the fenced numbers
/// are the ones that model its hit path. `STORE_BENCH_SHIFT=k`: variant v starts at the
/// key-cycle place of variant v + k (checks that where a variant walks does not matter).
fn interleaved(store: &Store, keys: &[[u8; 20]], rounds: usize) {
    use magnetar::store::Resident;
    let batch: usize = std::env::var("STORE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let fixed = std::env::var_os("STORE_BENCH_FIXED_NOW").is_some();
    let fence = std::env::var_os("STORE_BENCH_FENCE").is_some();
    let hit = |r: Resident| match r {
        Resident::Hit(r) => r,
        other => panic!("a resident record: {other:?}"),
    };
    // One send buffer for both copy variants: a buffer of its own each was one more
    // difference between them (where the copy writes).
    let out = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
    // One clock for both resident variants: each `now` they pass is a real time.
    let clock = std::cell::RefCell::new(Turn::default());
    let start = std::time::Instant::now();
    let now = || {
        if fixed {
            start
        } else {
            clock.borrow_mut().now()
        }
    };
    type Variant<'a> = (&'static str, Box<dyn FnMut(&[u8; 20]) + 'a>);
    let mut variants: Vec<Variant> = vec![
        (
            "lookup",
            Box::new(|k: &[u8; 20]| drop(black_box(store.lookup(k).unwrap()))),
        ),
        (
            "lookup_resident",
            Box::new(|k: &[u8; 20]| drop(black_box(hit(store.lookup_resident(k, now()))))),
        ),
        (
            // A control: the harness's clock alone (what the resident variants add to
            // `lookup` outside the store).
            "lookup + now()",
            Box::new(|k: &[u8; 20]| {
                black_box(now());
                drop(black_box(store.lookup(k).unwrap()))
            }),
        ),
        (
            "lookup + copy",
            Box::new(|k: &[u8; 20]| {
                let r = store.lookup(k).unwrap();
                let info = r.info();
                let mut out = out.borrow_mut();
                out[..info.len()].copy_from_slice(info);
                black_box(&out[..info.len()]);
            }),
        ),
        (
            "lookup_resident + copy",
            Box::new(|k: &[u8; 20]| {
                let r = hit(store.lookup_resident(k, now()));
                let info = r.info();
                let mut out = out.borrow_mut();
                out[..info.len()].copy_from_slice(info);
                black_box(&out[..info.len()]);
            }),
        ),
    ];
    let n = variants.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    // Each variant starts at its own place in the key cycle: variants that walked the
    // same keys in turn would find the records the previous batch read still in cache.
    let shift: usize = std::env::var("STORE_BENCH_SHIFT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut at: Vec<usize> = (0..n).map(|v| ((v + shift) % n) * keys.len() / n).collect();
    for round in 0..rounds {
        for k in 0..n {
            let v = (round + k) % n;
            let f = &mut variants[v].1;
            let started = std::time::Instant::now();
            for _ in 0..batch {
                at[v] = (at[v] + 7919) % keys.len();
                f(black_box(&keys[at[v]]));
                if fence {
                    serialize();
                }
            }
            times[v].push(started.elapsed().as_nanos() as f64 / batch as f64);
        }
    }
    let quantile = |t: &mut Vec<f64>, q: f64| {
        t.sort_by(|a, b| a.total_cmp(b));
        t[((t.len() - 1) as f64 * q) as usize]
    };
    let base = quantile(&mut times[0], 0.5);
    println!("interleaved: {rounds} rounds of {batch} lookups per variant, fixed now: {fixed}");
    for (v, t) in times.iter_mut().enumerate() {
        let (p10, p50) = (quantile(t, 0.1), quantile(t, 0.5));
        println!(
            "{:<24} median {p50:7.1} ns  p10 {p10:7.1} ns  median/lookup {:.2}",
            variants[v].0,
            p50 / base
        );
    }
}

/// Wait until every earlier instruction is done before starting the next
/// (`STORE_BENCH_FENCE`).
#[inline(always)]
fn serialize() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: lfence has no preconditions (SSE2 is part of x86-64).
    unsafe {
        std::arch::x86_64::_mm_lfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    panic!("STORE_BENCH_FENCE is implemented for x86-64 only");
}

/// A worker's clock: read once per `TURN` calls (a turn of its event loop serves many).
#[derive(Default)]
struct Turn {
    now: Option<std::time::Instant>,
    calls: u32,
}

const TURN: u32 = 64;

impl Turn {
    #[inline]
    fn now(&mut self) -> std::time::Instant {
        self.calls += 1;
        if self.calls == TURN || self.now.is_none() {
            self.calls = 0;
            self.now = Some(std::time::Instant::now());
        }
        self.now.expect("set")
    }
}

criterion_group!(benches, store);
criterion_main!(benches);
