//! The tier's logic against object_store's in-memory store: uploads (each key of a hybrid,
//! nothing that came from the tier), the durable cursor's walk after a restart, tombstones
//! both ways, and what a lookup makes of good, corrupt and tombstoned objects. The real
//! store (a Garage cluster, outages, kill -9) is `tests/shared_tier.rs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::cursor::{Cursor, CURSOR_SLACK_SECS};
use super::keys::parse_url;
use super::tombstone::{self, FleetKey};
use super::{lookup, poll_tombstones, uploader, Health, Inner, SharedConfig, SharedGet};
use crate::metainfo::tests::{fixture_info, synthetic_v1};
use crate::store::{AppendOptions, Origin, Store, StoreOptions};

const URL: &str = "s3://bucket/fleet";

fn open_store(dir: &std::path::Path) -> Arc<Store> {
    let opts = StoreOptions {
        shards: 2,
        ..StoreOptions::default()
    };
    Arc::new(Store::open(dir, opts).unwrap().0)
}

fn fleet() -> FleetKey {
    FleetKey::from_text("the fleet key of these tests, long enough").unwrap()
}

fn inner(store: Arc<Store>, os: Arc<InMemory>) -> Arc<Inner> {
    inner_with(store, os, Some(fleet()), crate::limits::METADATA_BYTES_MAX)
}

fn inner_with(
    store: Arc<Store>,
    os: Arc<InMemory>,
    fleet: Option<FleetKey>,
    metadata_bytes_max: usize,
) -> Arc<Inner> {
    let cfg = SharedConfig {
        shared_store: Some(URL.into()),
        shared_tombstone_poll_ms: 100,
        ..SharedConfig::default()
    };
    Arc::new(Inner {
        cfg,
        os,
        layout: parse_url(URL).unwrap().layout,
        store,
        stats: Default::default(),
        health: Mutex::new(Health::default()),
        node: "test/1".into(),
        fleet,
        metadata_bytes_max,
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn object(
    os: &InMemory,
    rt: &tokio::runtime::Runtime,
    path: &object_store::path::Path,
) -> Option<Vec<u8>> {
    rt.block_on(async {
        match os.get(path).await {
            Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    })
}

/// Runs the uploader on `rt` until `done` holds (bounded), then stops it.
fn upload_until(
    rt: &tokio::runtime::Runtime,
    inner: &Arc<Inner>,
    queue: uploader::Queue,
    cursor: Cursor,
    mut done: impl FnMut() -> bool,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    rt.block_on(async {
        let task = tokio::spawn(uploader::run(inner.clone(), queue, cursor, stop_rx));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "uploader did not get there in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(Instant::now() + Duration::from_secs(1));
        task.await.unwrap();
    });
}

#[test]
fn uploads_a_hybrid_under_both_keys_and_nothing_that_came_from_the_tier() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let os = Arc::new(InMemory::new());
    let inner = inner(store.clone(), os.clone());
    let queue = uploader::Queue::hook(&inner).unwrap();
    let (hybrid, h) = fixture_info("hybrid_single");
    store.append(&hybrid, AppendOptions::default()).unwrap();
    let from_tier = synthetic_v1(7, 500);
    let opts = AppendOptions {
        origin: Origin::Shared,
        ..AppendOptions::default()
    };
    let tier_rec = store.append(&from_tier, opts).unwrap().record().clone();
    let rt = rt();
    // A cursor past both records: no start-up walk, only what the listener queued.
    let cursor = Cursor::new(dir.path(), URL);
    cursor
        .save(tier_rec.stored_at() + CURSOR_SLACK_SECS + 60)
        .unwrap();
    let l = inner.layout.clone();
    let keys: Vec<[u8; 20]> = h.handshake_keys().collect();
    upload_until(&rt, &inner, queue, cursor, || {
        inner.stats.puts.load(Relaxed) >= 2 && inner.stats.backlog.load(Relaxed) == 0
    });
    for k in &keys {
        assert_eq!(object(&os, &rt, &l.info(k)).as_deref(), Some(&hybrid[..]));
    }
    let tier_key = tier_rec.hashes().primary_key().unwrap();
    assert_eq!(
        object(&os, &rt, &l.info(&tier_key)),
        None,
        "not uploaded back"
    );
    assert_eq!(inner.stats.puts.load(Relaxed), 2);
    // Nothing pending: the cursor moved back to about now.
    let saved = Cursor::new(dir.path(), URL).load();
    assert!(
        saved + 5 >= tier_rec.stored_at() && saved <= tier_rec.stored_at() + 5,
        "cursor {saved}"
    );
}

#[test]
fn after_a_restart_the_walk_uploads_what_the_cursor_says_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let early = synthetic_v1(1, 400);
    let late = synthetic_v1(2, 400);
    let present = synthetic_v1(3, 400);
    {
        // Stored with no tier running (a crash before the PUTs, or an import).
        let store = open_store(dir.path());
        for d in [&early, &late, &present] {
            store.append(d, AppendOptions::default()).unwrap();
        }
    }
    let store = open_store(dir.path());
    let inner = inner(store.clone(), os.clone());
    let l = inner.layout.clone();
    let key = |d: &[u8]| {
        crate::metainfo::validate_info(d)
            .unwrap()
            .hashes
            .primary_key()
            .unwrap()
    };
    // One of them is in the bucket already: the walk HEADs before it PUTs.
    rt.block_on(os.put(&l.info(&key(&present)), PutPayload::from(present.clone())))
        .unwrap();
    // A cursor this far ahead (beyond the slack) says everything is uploaded: nothing walks.
    let now = store.lookup(&key(&early)).unwrap().stored_at();
    let cursor = Cursor::new(dir.path(), URL);
    cursor.save(now + CURSOR_SLACK_SECS + 60).unwrap();
    let queue = uploader::Queue::hook(&inner).unwrap();
    upload_until(&rt, &inner, queue, cursor, || {
        inner.stats.cursor.load(Relaxed) > 0
    });
    assert_eq!(object(&os, &rt, &l.info(&key(&early))), None);
    assert_eq!(inner.stats.puts.load(Relaxed), 0);
    drop(inner);
    drop(store);

    // A cursor from before the records: the walk uploads the two missing ones.
    let store = open_store(dir.path());
    let inner = self::inner(store, os.clone());
    let cursor = Cursor::new(dir.path(), URL);
    cursor.save(now.saturating_sub(1)).unwrap();
    let queue = uploader::Queue::hook(&inner).unwrap();
    upload_until(&rt, &inner, queue, cursor, || {
        inner.stats.puts.load(Relaxed) + inner.stats.put_skipped_present.load(Relaxed) == 3
    });
    assert_eq!(inner.stats.puts.load(Relaxed), 2);
    assert_eq!(inner.stats.put_skipped_present.load(Relaxed), 1);
    for d in [&early, &late, &present] {
        assert_eq!(object(&os, &rt, &l.info(&key(d))).as_deref(), Some(&d[..]));
    }
}

#[test]
fn a_delete_is_published_and_another_node_applies_it() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open_store(dir_a.path()), open_store(dir_b.path()));
    let d = synthetic_v1(9, 600);
    let k = crate::metainfo::validate_info(&d)
        .unwrap()
        .hashes
        .primary_key()
        .unwrap();
    a.append(&d, AppendOptions::default()).unwrap();
    b.append(&d, AppendOptions::default()).unwrap();
    let ia = inner(a.clone(), os.clone());
    let l = ia.layout.clone();
    let queue = uploader::Queue::hook(&ia).unwrap();
    a.delete(&k, None, "test").unwrap();
    let cursor = Cursor::new(dir_a.path(), URL);
    upload_until(&rt, &ia, queue, cursor, || {
        ia.stats.tombstones_published.load(Relaxed) == 1
    });
    assert!(object(&os, &rt, &l.tomb(&k)).is_some());
    let listed = rt.block_on(async {
        use futures_util::TryStreamExt;
        os.list(Some(&l.tomb_log_dir()))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    });
    assert_eq!(listed.len(), 1);
    assert_eq!(
        l.parse_tomb_log(&listed[0].location).map(|(_, key)| key),
        Some(k)
    );
    assert_eq!(object(&os, &rt, &l.info(&k)), None, "the object is deleted");

    // Node B's poll applies it: deleted and blocked there, durable, not published again.
    let ib = inner(b.clone(), os.clone());
    // Counted once the whole batch is applied (blocked first, then removed).
    poll_until(&rt, &ib, "tombstone applied", || {
        ib.stats.tombstones_applied.load(Relaxed) > 0
    });
    assert!(b.lookup(&k).is_none());
    assert_eq!(ib.stats.tombstones_applied.load(Relaxed), 1);
}

#[test]
fn a_lookup_serves_verified_bytes_only_and_honours_tombstones() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let i = inner(store.clone(), os.clone());
    let l = i.layout.clone();
    let good = synthetic_v1(11, 700);
    let k = crate::metainfo::validate_info(&good)
        .unwrap()
        .hashes
        .primary_key()
        .unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 30;
    bad[at] ^= 1;
    let put = |path, bytes: &Vec<u8>| {
        rt.block_on(os.put(&path, PutPayload::from(bytes.clone())))
            .unwrap();
    };
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Miss));
    assert_eq!(i.stats.get_misses.load(Relaxed), 1);
    put(l.info(&k), &bad);
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Miss));
    assert_eq!(i.stats.get_corrupt.load(Relaxed), 1);
    // The right bytes under another key are as bad as wrong bytes.
    put(l.info(&[0x42; 20]), &good);
    assert!(matches!(
        rt.block_on(lookup(&i, [0x42; 20])),
        SharedGet::Miss
    ));
    assert_eq!(i.stats.get_corrupt.load(Relaxed), 2);
    put(l.info(&k), &good);
    match rt.block_on(lookup(&i, k)) {
        SharedGet::Found(b) => assert_eq!(b, good),
        other => panic!("{other:?}"),
    }
    // A tombstone anyone could write: ignored, counted, the object still served.
    put(l.tomb(&k), &b"gone".to_vec());
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Found(_)));
    assert_eq!(i.stats.tombstones_unauthenticated.load(Relaxed), 1);
    assert!(!store.is_blocked(&k));
    // One signed with the fleet key: honoured.
    let signed = tombstone::body(&fleet(), &k, uploader::unix_now(), "other/2");
    put(l.tomb(&k), &signed.into_bytes());
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Tombstoned));
    assert!(
        store.is_blocked(&k),
        "a tombstone found on a miss is applied here"
    );
    assert_eq!(i.stats.degraded.load(Relaxed), 0);
}

/// Runs node `inner`'s tombstone poll until `done` holds (bounded by 10 s), then stops it.
fn poll_until(
    rt: &tokio::runtime::Runtime,
    inner: &Arc<Inner>,
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    rt.block_on(async {
        let poll = tokio::spawn(poll_tombstones(inner.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        poll.abort();
    });
}

fn stored_key(store: &Store, seed: u64) -> [u8; 20] {
    let d = synthetic_v1(seed, 500);
    store.append(&d, AppendOptions::default()).unwrap();
    crate::metainfo::validate_info(&d)
        .unwrap()
        .hashes
        .primary_key()
        .unwrap()
}

/// A bucket writer without the fleet key cannot delete from the fleet: unsigned, wrongly
/// signed and renamed tombstones are ignored and counted; a node without a key applies
/// none, even a signed one.
#[test]
fn forged_tombstones_are_ignored_and_counted() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let i = inner(store.clone(), os.clone());
    let l = i.layout.clone();
    let now = uploader::unix_now();
    let [plain, other_fleet, renamed, real] = [1, 2, 3, 4].map(|seed| stored_key(&store, seed));
    let put = |path: object_store::path::Path, body: String| {
        rt.block_on(os.put(&path, PutPayload::from(body.into_bytes())))
            .unwrap();
    };
    put(
        l.tomb_log(now, &plain),
        format!(
            "magnetar tombstone\nkey={}\nat={now}\nnode=x\n",
            hex::encode(plain)
        ),
    );
    let stranger = FleetKey::from_text("another fleet's key, also long enough").unwrap();
    put(
        l.tomb_log(now, &other_fleet),
        tombstone::body(&stranger, &other_fleet, now, "x"),
    );
    // A real tombstone of `real`, copied under the name of `renamed`.
    put(
        l.tomb_log(now, &renamed),
        tombstone::body(&fleet(), &real, now, "x"),
    );
    put(
        l.tomb_log(now, &real),
        tombstone::body(&fleet(), &real, now, "x"),
    );
    poll_until(&rt, &i, "the signed tombstone applied", || {
        i.stats.tombstones_applied.load(Relaxed) >= 1
    });
    assert!(store.is_blocked(&real) && store.lookup(&real).is_none());
    for k in [plain, other_fleet, renamed] {
        assert!(
            !store.is_blocked(&k) && store.lookup(&k).is_some(),
            "{}",
            hex::encode(k)
        );
    }
    assert_eq!(i.stats.tombstones_applied.load(Relaxed), 1);
    assert_eq!(i.stats.tombstones_unauthenticated.load(Relaxed), 3);

    // No fleet key here: nothing is applied, not even a signed tombstone.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = open_store(dir2.path());
    let k2 = stored_key(&store2, 5);
    put(
        l.tomb_log(now, &k2),
        tombstone::body(&fleet(), &k2, now, "x"),
    );
    let keyless = inner_with(
        store2.clone(),
        os.clone(),
        None,
        crate::limits::METADATA_BYTES_MAX,
    );
    poll_until(&rt, &keyless, "the keyless node saw them", || {
        keyless.stats.tombstones_unauthenticated.load(Relaxed) >= 5
    });
    assert!(!store2.is_blocked(&k2) && store2.lookup(&k2).is_some());
}

/// An object named far in the future (here even signed: a node whose clock is years
/// ahead) does not move the poll's cursor, so later tombstones still reach this node; it
/// is not applied before its time and is reported in a gauge.
#[test]
fn a_tombstone_named_in_the_future_does_not_stall_the_poll() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let i = inner(store.clone(), os.clone());
    let l = i.layout.clone();
    let [future, first, later] = [1, 2, 3].map(|seed| stored_key(&store, seed));
    let put = |path: object_store::path::Path, body: String| {
        rt.block_on(os.put(&path, PutPayload::from(body.into_bytes())))
            .unwrap();
    };
    let far = 999_999_999_999;
    put(
        l.tomb_log(far, &future),
        tombstone::body(&fleet(), &future, far, "x"),
    );
    let now = uploader::unix_now();
    put(
        l.tomb_log(now, &first),
        tombstone::body(&fleet(), &first, now, "x"),
    );
    rt.block_on(async {
        let poll = tokio::spawn(poll_tombstones(i.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.is_blocked(&first) {
            assert!(Instant::now() < deadline, "first tombstone not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A few polls later, a tombstone stamped a minute ago (an upload that landed late).
        tokio::time::sleep(Duration::from_millis(350)).await;
        let late = uploader::unix_now() - 60;
        os.put(
            &l.tomb_log(late, &later),
            PutPayload::from(tombstone::body(&fleet(), &later, late, "x").into_bytes()),
        )
        .await
        .unwrap();
        while !store.is_blocked(&later) {
            assert!(
                Instant::now() < deadline,
                "a tombstone after the future one was missed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        poll.abort();
    });
    assert!(!store.is_blocked(&future), "not applied before its time");
    assert_eq!(i.stats.tombstones_future.load(Relaxed), 1);
}

/// Many tombstones at once (a new node's first listing): all applied, in one batch.
#[test]
fn a_listing_of_many_tombstones_is_applied_as_one_batch() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let i = inner(store.clone(), os.clone());
    let l = i.layout.clone();
    let now = uploader::unix_now();
    let stored: Vec<[u8; 20]> = (0..20).map(|seed| stored_key(&store, seed)).collect();
    let absent: Vec<[u8; 20]> = (0..300u32)
        .map(|n| {
            let mut k = [0xab; 20];
            k[..4].copy_from_slice(&n.to_be_bytes());
            k
        })
        .collect();
    rt.block_on(async {
        for k in stored.iter().chain(&absent) {
            let body = tombstone::body(&fleet(), k, now, "x");
            os.put(&l.tomb_log(now, k), PutPayload::from(body.into_bytes()))
                .await
                .unwrap();
        }
    });
    let blocklist = dir.path().join("blocklist");
    poll_until(&rt, &i, "all applied", || {
        i.stats.tombstones_applied.load(Relaxed) == 320
    });
    for k in stored.iter().chain(&absent) {
        assert!(store.is_blocked(k));
    }
    assert!(stored.iter().all(|k| store.lookup(k).is_none()));
    // Every key once in the file.
    let text = std::fs::read_to_string(&blocklist).unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count(),
        320
    );
}

/// `metadata-bytes-max` bounds what a lookup reads from the bucket.
#[test]
fn a_lookup_reads_no_more_than_the_metadata_limit() {
    let rt = rt();
    let os = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let good = synthetic_v1(12, 4_000);
    let k = crate::metainfo::validate_info(&good)
        .unwrap()
        .hashes
        .primary_key()
        .unwrap();
    let i = inner_with(store, os.clone(), Some(fleet()), 1_000);
    rt.block_on(os.put(&i.layout.info(&k), PutPayload::from(good.clone())))
        .unwrap();
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Miss));
    assert_eq!(i.stats.get_corrupt.load(Relaxed), 1);
    let roomy = inner_with(i.store.clone(), os, Some(fleet()), 10_000);
    assert!(matches!(
        rt.block_on(lookup(&roomy, k)),
        SharedGet::Found(_)
    ));
}
