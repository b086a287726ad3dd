use std::fs::OpenOptions;
use std::io::Write;
use std::time::SystemTime;

use super::*;
use crate::metainfo::tests::{fixture_info, synthetic_v1};

fn opts(shards: usize, segment_bytes: u64) -> StoreOptions {
    StoreOptions {
        shards,
        segment_bytes,
        sync: SyncPolicy::Always,
        capacity_bytes: 0,
    }
}

fn open(dir: &Path, o: StoreOptions) -> (Store, RecoveryReport) {
    Store::open(dir, o).unwrap()
}

fn stored(outcome: AppendOutcome) -> RecordRef {
    match outcome {
        AppendOutcome::Stored(r) => r,
        AppendOutcome::AlreadyPresent(_) => panic!("expected a new record"),
    }
}

fn v1_key(info: &[u8]) -> [u8; 20] {
    validate_info(info).unwrap().hashes.v1.unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join(SEGMENTS_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn append_lookup_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..5)
        .map(|i| synthetic_v1(i, 500 + 300 * i as usize))
        .collect();
    {
        let (store, report) = open(dir.path(), opts(2, 1 << 20));
        assert_eq!(report.records, 0);
        for d in &dicts {
            let r = stored(store.append(d, AppendOptions::default()).unwrap());
            assert_eq!(r.info(), &d[..]);
            assert!(r.stored_at() > 1_600_000_000);
        }
        let again = store.append(&dicts[0], AppendOptions::default()).unwrap();
        assert!(matches!(again, AppendOutcome::AlreadyPresent(_)));
        assert_eq!(store.stats().records, 5);
        assert_eq!(
            store.stats().bytes,
            dicts.iter().map(|d| d.len() as u64).sum::<u64>()
        );
    }
    let (store, report) = open(dir.path(), opts(2, 1 << 20));
    assert_eq!(report.records, 5);
    assert_eq!(
        report.torn_tails_truncated + report.corrupt_records_skipped + report.duplicates,
        0
    );
    for d in &dicts {
        let r = store.lookup(&v1_key(d)).unwrap();
        assert_eq!(r.info(), &d[..]);
        assert!(r.has_v1() && !r.has_v2() && !r.is_private());
    }
    assert!(store.lookup(&[9; 20]).is_none());
    assert!(format!("{report}").starts_with("5 records"));
}

#[test]
fn hybrid_is_found_under_both_keys_and_v2_only_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (hybrid, h) = fixture_info("hybrid_multi");
    let (v2, h2) = fixture_info("v2_multi");
    let (private, _) = fixture_info("v1_multi");
    for reopen in [false, true] {
        let (store, _) = open(dir.path(), opts(3, 1 << 20));
        if !reopen {
            stored(store.append(&hybrid, AppendOptions::default()).unwrap());
            stored(
                store
                    .append(
                        &v2,
                        AppendOptions {
                            shard: Some(7),
                            ..Default::default()
                        },
                    )
                    .unwrap(),
            );
            stored(store.append(&private, AppendOptions::default()).unwrap());
        }
        let by_v1 = store.lookup(&h.v1.unwrap()).unwrap();
        let by_v2 = store.lookup(&v2_handshake_key(&h.v2.unwrap())).unwrap();
        assert!(by_v1.same_record(&by_v2));
        assert_eq!(by_v1.hashes(), h);
        assert!(by_v1.has_v1() && by_v1.has_v2());
        assert!(store.lookup_v2(&h.v2.unwrap()).unwrap().same_record(&by_v1));
        let mut wrong = h.v2.unwrap();
        wrong[31] ^= 1;
        assert!(
            store.lookup_v2(&wrong).is_none(),
            "prefix match alone is not enough"
        );
        let r = store.lookup_v2(&h2.v2.unwrap()).unwrap();
        assert!(!r.has_v1() && r.has_v2());
        assert_eq!(r.info(), &v2[..]);
        let p = store.lookup(&v1_key(&private)).unwrap();
        assert!(p.is_private());
        assert_eq!(store.stats().records, 3);
    }
}

#[test]
fn invalid_dicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), opts(1, 1 << 20));
    let err = store
        .append(b"d4:name1:ae", AppendOptions::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(store.stats().records, 0);
}

#[test]
fn info_points_into_the_segment_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), opts(1, 1 << 20));
    let d = synthetic_v1(42, 3000);
    let r = stored(store.append(&d, AppendOptions::default()).unwrap());
    let looked_up = store.lookup(&v1_key(&d)).unwrap();
    for rec in [&r, &looked_up] {
        let range = rec.segment().mapping_range();
        let p = rec.info().as_ptr() as usize;
        assert!(range.contains(&p) && p + rec.len() <= range.end);
    }
    assert_eq!(r.info().as_ptr(), looked_up.info().as_ptr());
}

#[test]
fn second_open_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), opts(1, 1 << 20));
    let err = Store::open(dir.path(), opts(1, 1 << 20))
        .err()
        .expect("locked");
    assert!(
        matches!(err, StoreError::Locked { pid: Some(_), .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("another magnetar process") && text.contains("magnetar serve"),
        "{text}"
    );
    drop(store);
    open(dir.path(), opts(1, 1 << 20));
}

/// Every file under `dir` with its length, a CRC of its bytes and its modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, u32, SystemTime)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path);
            } else {
                let crc = crc32fast::hash(&std::fs::read(&path).unwrap());
                out.push((path, meta.len(), crc, meta.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn read_only_open_beside_the_lock_holder_sees_records_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..4).map(|i| synthetic_v1(200 + i, 1500)).collect();
    let (hybrid, h) = fixture_info("hybrid_multi");
    let (writer, _) = open(dir.path(), opts(2, 1 << 20));
    for d in dicts.iter().take(3).chain([&hybrid]) {
        stored(writer.append(d, AppendOptions::default()).unwrap());
    }
    // An append in progress, as a reader may catch it: the header of a record whose payload
    // is not there yet, at the end of one of the writer's segments.
    let segs = segment_files(dir.path());
    let header = std::fs::read(&segs[0]).unwrap()[..HEADER_BYTES].to_vec();
    let mut f = OpenOptions::new().append(true).open(&segs[0]).unwrap();
    f.write_all(&header).unwrap();
    drop(f);
    let before = snapshot(dir.path());
    assert!(matches!(
        Store::open(dir.path(), opts(1, 1 << 20)),
        Err(StoreError::Locked { .. })
    ));

    let (reader, report) = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.segments, segs.len());
    assert_eq!(
        (report.torn_tails_skipped, report.tail_bytes_skipped),
        (1, HEADER_BYTES as u64)
    );
    assert_eq!(
        (report.torn_tails_truncated, report.bytes_truncated),
        (0, 0)
    );
    assert!(
        report.to_string().contains("1 partial tails skipped"),
        "{report}"
    );
    for d in &dicts[..3] {
        assert_eq!(reader.lookup(&v1_key(d)).unwrap().info(), &d[..]);
    }
    assert_eq!(
        reader.lookup_v2(&h.v2.unwrap()).unwrap().info(),
        &hybrid[..]
    );
    assert!(matches!(
        reader.append(&dicts[3], AppendOptions::default()),
        Err(StoreError::ReadOnly)
    ));
    assert!(reader.lookup(&v1_key(&dicts[3])).is_none());
    // A second reader at the same time, and a sync, change nothing either.
    let (second, _) = Store::open_read_only(dir.path()).unwrap();
    reader.sync().unwrap();
    drop((reader, second));
    assert_eq!(
        snapshot(dir.path()),
        before,
        "read-only open changed a file"
    );

    // The writer is unaffected; its own recovery later cuts the tail the readers left.
    drop(writer);
    let (_, report) = open(dir.path(), opts(2, 1 << 20));
    assert_eq!(report.records, 4);
    assert_eq!(report.torn_tails_truncated, 1);
}

#[test]
fn read_only_open_skips_bad_records_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (dicts, seg, rec) = three_records(dir.path());
    flip(&seg, rec + HEADER_BYTES as u64 + 10); // the second record's payload
    std::fs::remove_file(dir.path().join(lock::LOCK_FILE)).unwrap();
    let before = snapshot(dir.path());
    let (store, report) = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.corrupt_records_skipped, 1);
    assert!(store.lookup(&v1_key(&dicts[1])).is_none());
    assert!(store.lookup(&v1_key(&dicts[2])).is_some());
    drop(store);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "no LOCK file, nothing truncated"
    );

    // Not a store: an error, and no directory is created.
    let missing = dir.path().join("typo");
    assert!(matches!(
        Store::open_read_only(&missing),
        Err(StoreError::Io { .. })
    ));
    assert!(!missing.exists());
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..4).map(|i| synthetic_v1(100 + i, 2000)).collect();
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        for d in &dicts[..3] {
            store.append(d, AppendOptions::default()).unwrap();
        }
    }
    let seg = &segment_files(dir.path())[0];
    let len = std::fs::metadata(seg).unwrap().len();
    // Cut the last record in the middle of its payload, then append junk after it.
    let cut = len - 1000;
    let f = OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(cut).unwrap();
    let mut f = OpenOptions::new().append(true).open(seg).unwrap();
    f.write_all(&[0xAB; 333]).unwrap();
    drop(f);
    let rec_len = len / 3; // synthetic dicts of one size make equal records
    {
        let (store, report) = open(dir.path(), opts(1, 1 << 20));
        assert_eq!(report.records, 2);
        assert_eq!(report.torn_tails_truncated, 1);
        assert_eq!(report.bytes_truncated, cut + 333 - 2 * rec_len);
        assert_eq!(std::fs::metadata(seg).unwrap().len(), 2 * rec_len);
        assert!(store.lookup(&v1_key(&dicts[2])).is_none());
        stored(store.append(&dicts[3], AppendOptions::default()).unwrap());
        stored(store.append(&dicts[2], AppendOptions::default()).unwrap());
    }
    let (store, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!(report.records, 4);
    assert_eq!(report.torn_tails_truncated, 0);
    for d in &dicts {
        assert_eq!(store.lookup(&v1_key(d)).unwrap().info(), &d[..]);
    }
}

#[test]
fn header_only_tail_and_partial_header_are_torn() {
    let dir = tempfile::tempdir().unwrap();
    let d = synthetic_v1(7, 1500);
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        store.append(&d, AppendOptions::default()).unwrap();
    }
    let seg = &segment_files(dir.path())[0];
    let len = std::fs::metadata(seg).unwrap().len();
    for extra in [40u64, 80, 200] {
        // A copy of the header (valid CRC) with the payload missing or partial.
        let bytes = std::fs::read(seg).unwrap();
        let mut f = OpenOptions::new().append(true).open(seg).unwrap();
        f.write_all(&bytes[..extra as usize]).unwrap();
        drop(f);
        let (store, report) = open(dir.path(), opts(1, 1 << 20));
        assert_eq!(
            (report.records, report.torn_tails_truncated),
            (1, 1),
            "extra {extra}"
        );
        assert_eq!(report.bytes_truncated, extra);
        assert_eq!(std::fs::metadata(seg).unwrap().len(), len);
        drop(store);
    }
}

fn three_records(dir: &Path) -> (Vec<Vec<u8>>, PathBuf, u64) {
    let dicts: Vec<_> = (0..3).map(|i| synthetic_v1(200 + i, 4000)).collect();
    let (store, _) = open(dir, opts(1, 1 << 20));
    for d in &dicts {
        store.append(d, AppendOptions::default()).unwrap();
    }
    drop(store);
    let seg = segment_files(dir).remove(0);
    let rec = std::fs::metadata(&seg).unwrap().len() / 3;
    (dicts, seg, rec)
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flipped_payload_byte_drops_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let (dicts, seg, rec) = three_records(dir.path());
    flip(&seg, rec + HEADER_BYTES as u64 + 100);
    for _ in 0..2 {
        let (store, report) = open(dir.path(), opts(1, 1 << 20));
        assert_eq!(report.records, 2);
        assert_eq!(report.corrupt_records_skipped, 1);
        assert_eq!(report.corrupt_bytes_skipped, rec);
        assert_eq!(report.torn_tails_truncated, 0);
        assert!(store.lookup(&v1_key(&dicts[0])).is_some());
        assert!(
            store.lookup(&v1_key(&dicts[1])).is_none(),
            "never serve a failed record"
        );
        assert!(store.lookup(&v1_key(&dicts[2])).is_some());
    }
    // The bad bytes stay on disk (not truncated) but the writer appends after them.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 3 * rec);
}

#[test]
fn flipped_header_byte_resynchronises_at_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let (dicts, seg, rec) = three_records(dir.path());
    flip(&seg, rec + 9); // info_len of the middle record
    let (store, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!(report.records, 2);
    assert_eq!(report.corrupt_records_skipped, 1);
    assert_eq!(report.corrupt_bytes_skipped, rec);
    assert!(store.lookup(&v1_key(&dicts[0])).is_some());
    assert!(store.lookup(&v1_key(&dicts[1])).is_none());
    assert!(store.lookup(&v1_key(&dicts[2])).is_some());
    drop(store);
    // Now also damage the last record's header: nothing valid follows the first record, so
    // both bad records are the torn tail.
    flip(&seg, 2 * rec + 1);
    let (_, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!(report.records, 1);
    assert_eq!(report.corrupt_records_skipped, 0);
    assert_eq!(
        (report.torn_tails_truncated, report.bytes_truncated),
        (1, 2 * rec)
    );
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), rec);
}

#[test]
fn newer_format_version_is_refused_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (_, seg, rec) = three_records(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = 2 * rec as usize;
    let mut h: [u8; HEADER_BYTES] = bytes[at..at + HEADER_BYTES].try_into().unwrap();
    h[4] = 2;
    h[72..76].fill(0);
    let crc = crc32fast::hash(&h);
    h[72..76].copy_from_slice(&crc.to_le_bytes());
    bytes[at..at + HEADER_BYTES].copy_from_slice(&h);
    std::fs::write(&seg, &bytes).unwrap();
    let err = Store::open(dir.path(), opts(1, 1 << 20)).err().unwrap();
    assert!(
        matches!(err, StoreError::UnsupportedFormat { version: 2, .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn parallel_recovery_over_many_segments_rebuilds_the_same_index() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..300u64)
        .map(|i| synthetic_v1(1000 + i, 300 + (i as usize * 37) % 5000))
        .collect();
    let big = synthetic_v1(99_999, 40_000); // larger than a segment: gets its own
    let mut sync = opts(4, 16 * 1024);
    sync.sync = SyncPolicy::Batch;
    {
        let (store, _) = open(dir.path(), sync.clone());
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = &store;
                let dicts = &dicts;
                s.spawn(move || {
                    for d in dicts.iter().skip(t).step_by(4) {
                        stored(store.append(d, AppendOptions::default()).unwrap());
                    }
                });
            }
        });
        let r = stored(
            store
                .append(
                    &big,
                    AppendOptions {
                        shard: Some(1),
                        ..Default::default()
                    },
                )
                .unwrap(),
        );
        assert_eq!(r.segment().reserved_bytes(), record_bytes(big.len()));
        store.sync().unwrap();
        assert!(store.stats().segments > 8);
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 8, "{}", files.len());
    let (store, report) = open(dir.path(), sync.clone());
    assert_eq!(report.segments, files.len());
    assert_eq!(report.records, 301);
    assert_eq!(
        report.torn_tails_truncated + report.corrupt_records_skipped + report.duplicates,
        0
    );
    for d in dicts.iter().chain([&big]) {
        assert_eq!(store.lookup(&v1_key(d)).unwrap().info(), &d[..]);
    }
    drop(store);
    // A copy of a segment under a new name: every record in it is a duplicate, first wins.
    let copy = dir.path().join(SEGMENTS_DIR).join("seg-999-00000000.mseg");
    std::fs::copy(&files[0], &copy).unwrap();
    let (store, report2) = open(dir.path(), sync);
    assert_eq!(report2.records, 301);
    assert!(report2.duplicates > 0);
    let first = store.lookup(&v1_key(&dicts[0])).unwrap();
    assert_ne!(first.segment().path(), copy.as_path());
}

#[test]
fn shard_of_is_the_first_eight_bytes() {
    let mut key = [0u8; 20];
    key[0] = 5;
    assert_eq!(shard_of(&key, 4), 1);
    assert_eq!(shard_of(&key, 1), 0);
    assert_eq!(shard_of(&key, 0), 0);
}

#[test]
fn delete_writes_a_tombstone_and_blocks_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (hybrid, hashes) = fixture_info("hybrid_single");
    let keep = synthetic_v1(1, 600);
    {
        let (store, _) = open(dir.path(), opts(2, 1 << 20));
        stored(store.append(&hybrid, AppendOptions::default()).unwrap());
        stored(store.append(&keep, AppendOptions::default()).unwrap());
        let v2_key = v2_handshake_key(&hashes.v2.unwrap());
        let out = store.delete(&v2_key, None, "test").unwrap();
        assert_eq!(out.removed, Some(hashes));
        assert_eq!(out.blocked.len(), 2, "both hashes of a hybrid are blocked");
        assert!(store.lookup(&hashes.v1.unwrap()).is_none());
        assert!(store.lookup(&v2_key).is_none());
        assert!(store.is_blocked(&hashes.v1.unwrap()) && store.is_blocked(&v2_key));
        assert_eq!(store.stats().records, 1);
        assert!(matches!(
            store.append(&hybrid, AppendOptions::default()),
            Err(StoreError::Blocked(_))
        ));
        let mut seen = 0;
        store.for_each_record(|_| seen += 1);
        assert_eq!(seen, 1);
    }
    // The tombstone alone keeps it deleted: drop the blocklist file too.
    std::fs::remove_file(dir.path().join("blocklist")).unwrap();
    let (store, report) = open(dir.path(), opts(3, 1 << 20));
    assert_eq!(report.tombstones, 1);
    assert_eq!(report.deleted_skipped, 1);
    assert_eq!(report.records, 1);
    assert!(store.lookup(&hashes.v1.unwrap()).is_none());
    assert!(store.lookup(&v1_key(&keep)).is_some());
    // Stored again after the delete (same second, even): stamped after the tombstone, so
    // it survives the next restart.
    stored(store.append(&hybrid, AppendOptions::default()).unwrap());
    drop(store);
    let (store, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!(report.records, 2);
    assert!(store.lookup(&hashes.v1.unwrap()).is_some());
}

#[test]
fn blocklist_edit_and_reload_unpublishes_and_recovery_skips() {
    let dir = tempfile::tempdir().unwrap();
    let a = synthetic_v1(7, 700);
    let key = v1_key(&a);
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        stored(store.append(&a, AppendOptions::default()).unwrap());
        std::fs::write(
            dir.path().join("blocklist"),
            format!("# by hand\n{}\nnonsense\n", hex::encode(key)),
        )
        .unwrap();
        let r = store.reload_blocklist().unwrap();
        assert_eq!((r.entries, r.unpublished, r.bad_lines.len()), (1, 1, 1));
        assert!(store.lookup(&key).is_none());
        assert_eq!(store.stats().records, 0);
    }
    let (store, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!((report.records, report.blocked_skipped), (0, 1));
    // Unblocked (not deleted): the record comes back at the next start.
    assert_eq!(store.unblock(&[key]).unwrap(), 1);
    drop(store);
    let (store, _) = open(dir.path(), opts(1, 1 << 20));
    assert!(store.lookup(&key).is_some());
}

fn capped(shards: usize, capacity_bytes: u64) -> StoreOptions {
    StoreOptions {
        capacity_bytes,
        ..opts(shards, SEGMENT_BYTES_DEFAULT)
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn capacity_sizes_segments_and_eviction_keeps_what_was_served() {
    const CAP: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..200).map(|i| synthetic_v1(i, 900)).collect();
    let (store, _) = open(dir.path(), capped(1, CAP));
    assert_eq!(
        store.options().segment_bytes,
        CAP / 4,
        "a quarter of the cap per shard"
    );
    for d in &dicts[..20] {
        stored(store.append(d, AppendOptions::default()).unwrap());
    }
    // Served: records 0..5. Held across eviction: record 10 (an in-flight session).
    for d in &dicts[..5] {
        store.lookup(&v1_key(d)).unwrap();
    }
    let held = store.index.get(&v1_key(&dicts[10])).unwrap();
    let first_segment = held.segment().path().to_path_buf();
    for d in &dicts[20..] {
        stored(store.append(d, AppendOptions::default()).unwrap());
        // Keep 0..5 hot, as clients asking for them would.
        for hot in &dicts[..5] {
            store.lookup(&v1_key(hot)).unwrap();
        }
        assert!(store.stats().disk_bytes <= CAP);
        assert_eq!(store.stats().disk_bytes, dir_bytes(dir.path()));
    }
    let st = store.stats();
    assert!(st.segments_evicted >= 5, "{st:?}");
    assert!(
        st.records_reappended >= 5 && st.records_evicted > 0,
        "{st:?}"
    );
    assert!(!first_segment.exists(), "the first segment was evicted");
    for d in &dicts[..5] {
        let r = store.lookup(&v1_key(d)).expect("served records stay");
        assert_eq!(r.info(), &d[..]);
    }
    assert!(
        store.lookup(&v1_key(&dicts[10])).is_none(),
        "never served: evicted"
    );
    // Its segment is unlinked but still mapped for whoever holds a ref.
    assert_eq!(held.info(), &dicts[10][..]);
    assert_eq!(
        st.records as usize,
        (0..200)
            .filter(|&i| store.lookup(&v1_key(&dicts[i])).is_some())
            .count()
    );
    let present: Vec<usize> = (0..200)
        .filter(|&i| store.index.get(&v1_key(&dicts[i])).is_some())
        .collect();
    drop(store);
    drop(held);

    // A restart sees exactly what was indexed, within the cap, nothing damaged or doubled.
    let (store, report) = open(dir.path(), capped(1, CAP));
    assert_eq!(report.records, present.len());
    assert_eq!(
        report.corrupt_records_skipped + report.torn_tails_truncated + report.duplicates,
        0,
        "{report}"
    );
    assert!(dir_bytes(dir.path()) <= CAP);
    for i in present {
        assert_eq!(
            store.lookup(&v1_key(&dicts[i])).unwrap().info(),
            &dicts[i][..]
        );
    }
}

/// Capacity of the tombstone-eviction scenario: a few 900-byte records per segment.
const TOMBSTONE_SCENARIO_CAP: u64 = 32 * 1024;

/// A capped store in `dir` where a record is kept served through several evictions, then
/// deleted, and the tombstone's own segment is evicted in turn. Returns the store (still
/// open) and the deleted key.
fn delete_then_evict_the_tombstone(dir: &Path) -> (Store, [u8; 20]) {
    let victim = synthetic_v1(1000, 900);
    let key = v1_key(&victim);
    let (store, _) = open(dir, capped(1, TOMBSTONE_SCENARIO_CAP));
    stored(store.append(&victim, AppendOptions::default()).unwrap());
    // Kept served, so its record outlives several evictions...
    for i in 0..40 {
        store.lookup(&key).unwrap();
        stored(
            store
                .append(&synthetic_v1(i, 900), AppendOptions::default())
                .unwrap(),
        );
    }
    // ...then deleted; the tombstone's segment is evicted in turn.
    store.delete(&key, None, "test").unwrap();
    let evicted = store.stats().segments_evicted;
    for i in 40..120 {
        stored(
            store
                .append(&synthetic_v1(i, 900), AppendOptions::default())
                .unwrap(),
        );
    }
    assert!(store.stats().segments_evicted >= evicted + 4);
    assert!(store.lookup(&key).is_none());
    (store, key)
}

#[test]
fn a_tombstone_outlives_the_eviction_of_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = delete_then_evict_the_tombstone(dir.path());
    drop(store);
    // What is on disk alone must keep it deleted: no blocklist, and no index checkpoint
    // (whose tombstone map would, and whose segments the reopen does not scan: with it,
    // whether the tombstone's segment is scanned depends on how long ago it was written,
    // the checkpoint's mtime margin; that made this test fail under load, when it counted
    // scanned tombstones with the checkpoint in place).
    std::fs::remove_file(dir.path().join("blocklist")).unwrap();
    std::fs::remove_file(dir.path().join(checkpoint::CHECKPOINT_FILE)).unwrap();
    let (store, report) = open(dir.path(), capped(1, TOMBSTONE_SCENARIO_CAP));
    assert_eq!(report.segments_from_checkpoint, 0, "{report}");
    assert!(report.tombstones >= 1, "the tombstone is on disk: {report}");
    assert!(store.lookup(&key).is_none(), "deleted stays deleted");
    assert!(
        store.tombstones_since(0).iter().any(|(k, _)| *k == key),
        "the shared tier's uploader still finds the delete"
    );
}

#[test]
fn a_record_over_a_quarter_of_the_capacity_is_refused_not_evicting_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), capped(1, 64 * 1024));
    for i in 0..40 {
        stored(
            store
                .append(&synthetic_v1(i, 900), AppendOptions::default())
                .unwrap(),
        );
    }
    let before = store.stats();
    let big = synthetic_v1(99, 20_000);
    assert!(matches!(
        store.append(&big, AppendOptions::default()),
        Err(StoreError::CapacityExhausted { .. })
    ));
    assert_eq!(store.stats().records, before.records);
}

/// Every key in the main index, and the req2 map holds exactly those keys.
fn assert_req2_matches_index(store: &Store) -> usize {
    let mut keys = 0;
    store.index.for_each(|k, _| {
        keys += 1;
        assert_eq!(
            store.lookup_req2(&crate::mse::req2_hash(k)),
            Some(*k),
            "{}",
            hex::encode(k)
        );
    });
    assert_eq!(store.index.req2_len(), keys);
    keys
}

#[test]
fn req2_index_follows_insert_recovery_delete_and_blocklist() {
    use crate::mse::req2_hash;
    let dir = tempfile::tempdir().unwrap();
    let (hybrid, h) = fixture_info("hybrid_multi");
    let (v2, h2) = fixture_info("v2_multi");
    let plain = synthetic_v1(3, 700);
    let blocked = synthetic_v1(4, 700);
    let v2_key = v2_handshake_key(&h.v2.unwrap());
    {
        let (store, _) = open(dir.path(), opts(2, 1 << 20));
        for d in [&hybrid, &v2, &plain, &blocked] {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
        // A hybrid under both keys, a v2-only one under its prefix.
        assert_eq!(assert_req2_matches_index(&store), 5);
        assert_eq!(store.lookup_req2(&req2_hash(&v2_key)), Some(v2_key));
        let v2_only = v2_handshake_key(&h2.v2.unwrap());
        assert_eq!(store.lookup_req2(&req2_hash(&v2_only)), Some(v2_only));
        // A key itself (or any hash but req2's) finds nothing.
        assert_eq!(store.lookup_req2(&h.v1.unwrap()), None);
        assert_eq!(store.lookup_req2(&[0; 20]), None);
        // A duplicate append changes nothing.
        store.append(&plain, AppendOptions::default()).unwrap();
        assert_eq!(assert_req2_matches_index(&store), 5);
    }
    // Recovery rebuilds it.
    let (store, _) = open(dir.path(), opts(3, 1 << 20));
    assert_eq!(assert_req2_matches_index(&store), 5);
    // Delete takes both keys of the hybrid out.
    store.delete(&v2_key, None, "test").unwrap();
    assert_eq!(store.lookup_req2(&req2_hash(&h.v1.unwrap())), None);
    assert_eq!(store.lookup_req2(&req2_hash(&v2_key)), None);
    assert_eq!(assert_req2_matches_index(&store), 3);
    // A blocklist reload unpublishes.
    let bkey = v1_key(&blocked);
    std::fs::write(dir.path().join("blocklist"), hex::encode(bkey)).unwrap();
    store.reload_blocklist().unwrap();
    assert_eq!(store.lookup_req2(&req2_hash(&bkey)), None);
    assert_eq!(assert_req2_matches_index(&store), 2);
    assert_eq!(
        store.lookup_req2(&req2_hash(&v1_key(&plain))),
        Some(v1_key(&plain))
    );
}

#[test]
fn req2_index_follows_eviction_and_reappend() {
    const CAP: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..120).map(|i| synthetic_v1(5000 + i, 900)).collect();
    let (store, _) = open(dir.path(), capped(1, CAP));
    for (i, d) in dicts.iter().enumerate() {
        stored(store.append(d, AppendOptions::default()).unwrap());
        // Keep the first few served: eviction re-appends them (`Index::replace`).
        for hot in &dicts[..3.min(i + 1)] {
            store.lookup(&v1_key(hot)).unwrap();
        }
    }
    let st = store.stats();
    assert!(
        st.records_evicted > 0 && st.records_reappended > 0,
        "{st:?}"
    );
    let kept = assert_req2_matches_index(&store);
    assert_eq!(kept as u64, st.records);
    for d in &dicts[..3] {
        let k = v1_key(d);
        assert_eq!(store.lookup_req2(&crate::mse::req2_hash(&k)), Some(k));
    }
    let gone = dicts
        .iter()
        .filter(|d| store.lookup(&v1_key(d)).is_none())
        .count();
    assert!(gone > 0);
}

/// Set a file's mtime back to what it was (a bit flip on disk that no write made: rot).
fn set_mtime(path: &Path, mtime: SystemTime) {
    let d = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    let times = [ts, ts];
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat(2) takes.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
}

/// Wait out the checkpoint's mtime margin, so the segments count as older than it.
fn age_segments(dir: &Path) {
    let old = SystemTime::now() - Duration::from_secs(5);
    for f in segment_files(dir) {
        set_mtime(&f, old);
    }
}

#[test]
fn a_restart_takes_the_checkpoint_without_rescanning_and_serves_the_same() {
    use crate::mse::req2_hash;
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..300)
        .map(|i| synthetic_v1(i, 300 + i as usize))
        .collect();
    let (hybrid, h) = fixture_info("hybrid_multi");
    {
        let (store, _) = open(dir.path(), opts(2, 16 * 1024));
        for d in dicts.iter().chain([&hybrid]) {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
        store.delete(&v1_key(&dicts[7]), None, "test").unwrap();
    }
    age_segments(dir.path());
    // The checkpoint was written at drop, before the segments were aged: write it again.
    {
        let (store, report) = open(dir.path(), opts(2, 16 * 1024));
        assert_eq!(report.records, 300);
        store.checkpoint().unwrap();
    }
    let (store, report) = open(dir.path(), opts(2, 16 * 1024));
    assert_eq!(report.segments_from_checkpoint, report.segments, "{report}");
    assert!(report.segments > 10);
    assert_eq!(report.records, 300, "{report}");
    assert_eq!(store.stats().records, 300);
    for (i, d) in dicts.iter().enumerate() {
        let got = store.lookup(&v1_key(d));
        if i == 7 {
            assert!(got.is_none(), "deleted stays deleted");
        } else {
            assert_eq!(got.expect("restored").info(), &d[..]);
        }
    }
    let v2_key = v2_handshake_key(&h.v2.unwrap());
    assert_eq!(store.lookup(&v2_key).unwrap().info(), &hybrid[..]);
    assert_eq!(store.lookup_req2(&req2_hash(&v2_key)), Some(v2_key));
    assert_eq!(assert_req2_matches_index(&store), 301);
    assert_eq!(store.stats().records_corrupt_on_serve, 0);
}

#[test]
fn a_byte_rotted_after_the_checkpoint_is_caught_when_first_served() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..40).map(|i| synthetic_v1(i, 700)).collect();
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        for d in &dicts {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
    }
    age_segments(dir.path());
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        store.checkpoint().unwrap();
    }
    // Flip a payload byte of record 20 and put the mtime back: rot, not a write.
    let file = &segment_files(dir.path())[0];
    let mtime = std::fs::metadata(file).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes
        .windows(dicts[20].len())
        .position(|w| w == &dicts[20][..])
        .unwrap();
    bytes[at + 350] ^= 0x01;
    std::fs::write(file, &bytes).unwrap();
    set_mtime(file, mtime);

    let (store, report) = open(dir.path(), opts(1, 1 << 20));
    assert_eq!(report.segments_from_checkpoint, 1, "{report}");
    assert!(store.lookup(&v1_key(&dicts[20])).is_none(), "never served");
    assert_eq!(store.stats().records_corrupt_on_serve, 1);
    assert_eq!(store.stats().records, 39);
    for (i, d) in dicts.iter().enumerate().filter(|(i, _)| *i != 20) {
        assert_eq!(store.lookup(&v1_key(d)).unwrap().info(), &d[..], "{i}");
    }
    // Verified once: the second lookup does not count it again.
    assert!(store.lookup(&v1_key(&dicts[20])).is_none());
    assert_eq!(store.stats().records_corrupt_on_serve, 1);
}

#[test]
fn after_a_crash_past_the_checkpoint_appends_deletes_and_evictions_are_found() {
    const CAP: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..200).map(|i| synthetic_v1(i, 900)).collect();
    let ckpt_path = dir.path().join(checkpoint::CHECKPOINT_FILE);
    let old_ckpt;
    let present: Vec<usize>;
    {
        let (store, _) = open(dir.path(), capped(1, CAP));
        for d in &dicts[..40] {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
        store.checkpoint().unwrap();
        old_ckpt = std::fs::read(&ckpt_path).unwrap();
        // After the checkpoint: more records (evicting the oldest segments), a delete.
        for d in &dicts[40..] {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
        assert!(store.stats().segments_evicted > 0);
        store.delete(&v1_key(&dicts[150]), None, "test").unwrap();
        present = (0..200)
            .filter(|&i| store.lookup(&v1_key(&dicts[i])).is_some())
            .collect();
    }
    // The crash: the checkpoint on disk is the old one.
    std::fs::write(&ckpt_path, &old_ckpt).unwrap();
    std::fs::remove_file(dir.path().join("blocklist")).unwrap();
    let (store, report) = open(dir.path(), capped(1, CAP));
    assert_eq!(report.records, present.len(), "{report}");
    for (i, d) in dicts.iter().enumerate() {
        let got = store.lookup(&v1_key(d));
        assert_eq!(got.is_some(), present.contains(&i), "{i}");
        if let Some(r) = got {
            assert_eq!(r.info(), &d[..]);
        }
    }
    assert!(store.lookup(&v1_key(&dicts[150])).is_none());
}

#[test]
fn a_damaged_checkpoint_means_a_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let dicts: Vec<_> = (0..50).map(|i| synthetic_v1(i, 500)).collect();
    {
        let (store, _) = open(dir.path(), opts(2, 8 * 1024));
        for d in &dicts {
            stored(store.append(d, AppendOptions::default()).unwrap());
        }
    }
    age_segments(dir.path());
    {
        let (store, _) = open(dir.path(), opts(2, 8 * 1024));
        store.checkpoint().unwrap();
    }
    let path = dir.path().join(checkpoint::CHECKPOINT_FILE);
    let mut b = std::fs::read(&path).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(&path, &b).unwrap();
    let (store, report) = open(dir.path(), opts(2, 8 * 1024));
    assert_eq!(report.segments_from_checkpoint, 0, "{report}");
    assert_eq!(report.records, 50);
    for d in &dicts {
        assert_eq!(store.lookup(&v1_key(d)).unwrap().info(), &d[..]);
    }
}

/// A record whose pages left the page cache is `Cold` for `lookup_resident` (which reads
/// nothing of it), and a hit again once `page_in` read it in.
#[test]
fn cold_records_are_reported_cold_until_paged_in() {
    let dir = tempfile::tempdir().unwrap();
    // Two records of several pages each, so they share no page.
    let (other, cold) = (synthetic_v1(1, 9000), synthetic_v1(2, 9000));
    {
        let (store, _) = open(dir.path(), opts(1, 1 << 20));
        for info in [&other, &cold] {
            stored(store.append(info, AppendOptions::default()).unwrap());
        }
    }
    let (store, _) = open(dir.path(), opts(1, 1 << 20));
    let record = store.lookup(&v1_key(&other)).unwrap();
    // Drops the whole file from the page cache (the open may have read it).
    if !record.segment().evict_for_test() {
        eprintln!("the page cache cannot be dropped here (tmpfs?): skipped");
        return;
    }
    drop(record);
    let now = std::time::Instant::now();
    assert!(matches!(
        store.lookup_resident(&v1_key(&cold), now),
        Resident::Cold
    ));
    assert!(matches!(
        store.lookup_resident(&[9; 20], now),
        Resident::Miss
    ));
    // The page-in thread's side: reads it in, returns the record.
    let paged = store.page_in(&v1_key(&cold)).expect("stored");
    assert_eq!(paged.info(), &cold[..]);
    match store.lookup_resident(&v1_key(&cold), now) {
        Resident::Hit(r) => {
            assert!(r.same_record(&paged));
            drop(r);
        }
        other => panic!("paged in, yet {other:?}"),
    }
    assert!(store.page_in(&[9; 20]).is_none());
    // Evicted again: within the period of `now` the bits still say resident (the window
    // the aging bounds; that read faults the pages back in), and once the caller's clock
    // is a `RESIDENCY_AGE` later the record is asked about again and found cold.
    let segment = paged.segment().clone();
    drop(paged);
    assert!(segment.evict_for_test());
    assert!(matches!(
        store.lookup_resident(&v1_key(&cold), now),
        Resident::Hit(_)
    ));
    assert!(segment.evict_for_test());
    assert!(matches!(
        store.lookup_resident(&v1_key(&cold), now + segment::RESIDENCY_AGE),
        Resident::Cold
    ));
}

/// `a_tombstone_outlives_the_eviction_of_its_segment` with the reopen taking every mix of
/// trusted and rescanned segments: the oldest ones aged past the checkpoint's mtime margin
/// (as on a slow machine), the newest `keep_recent` rescanned. A deleted key stays deleted
/// whichever segments the checkpoint vouches for.
#[test]
fn a_tombstone_holds_whichever_segments_the_checkpoint_vouches_for() {
    for keep_recent in 0..12usize {
        let dir = tempfile::tempdir().unwrap();
        let (store, key) = delete_then_evict_the_tombstone(dir.path());
        let mut files = segment_files(dir.path());
        files.sort();
        let old = SystemTime::now() - Duration::from_secs(5);
        for f in files.iter().take(files.len().saturating_sub(keep_recent)) {
            set_mtime(f, old);
        }
        // The checkpoint written at this drop records the aged mtimes.
        drop(store);
        std::fs::remove_file(dir.path().join("blocklist")).unwrap();
        let (store, report) = open(dir.path(), capped(1, TOMBSTONE_SCENARIO_CAP));
        assert!(
            store.lookup(&key).is_none(),
            "keep_recent {keep_recent}: deleted key served after reopen; {report}"
        );
        // Scanned or not, the tombstone is known (the checkpoint's map holds those of the
        // segments it vouches for): the shared tier's uploader still finds the delete.
        assert!(
            store.tombstones_since(0).iter().any(|(k, _)| *k == key),
            "keep_recent {keep_recent}: tombstone lost; {report}"
        );
        if keep_recent == 0 {
            assert!(report.segments_from_checkpoint > 0, "{report}");
        }
    }
}
