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
    g.bench_function("lookup_resident_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            match store.lookup_resident(black_box(&keys[i])) {
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
            let r = match store.lookup_resident(black_box(&keys[i])) {
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

criterion_group!(benches, store);
criterion_main!(benches);
