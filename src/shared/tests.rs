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

fn inner(store: Arc<Store>, os: Arc<InMemory>) -> Arc<Inner> {
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
    rt.block_on(async {
        let poll = tokio::spawn(poll_tombstones(ib.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.is_blocked(&k) {
            assert!(Instant::now() < deadline, "tombstone not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        poll.abort();
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
    put(l.tomb(&k), &b"gone".to_vec());
    assert!(matches!(rt.block_on(lookup(&i, k)), SharedGet::Tombstoned));
    assert!(
        store.is_blocked(&k),
        "a tombstone found on a miss is applied here"
    );
    assert_eq!(i.stats.degraded.load(Relaxed), 0);
}
