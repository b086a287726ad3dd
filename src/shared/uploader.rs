//! Write-behind to the shared tier: every record this node stores and every delete it
//! makes is uploaded once, off the serving cores, without ever blocking them.
//!
//! - The store's listener (`Queue::hook`) pushes each event into a bounded channel with
//!   `try_send` on the appending thread. A full channel drops the event and remembers the
//!   oldest dropped stamp; a catch-up walk of the store uploads it later.
//! - `run` keeps the pending uploads (at most `put-queue-max`), runs `put-concurrency` of
//!   them at once, and retries a failed one with exponential back-off (250 ms doubling to
//!   30 s) for as long as it takes: an outage of the store delays uploads, it loses none.
//! - Crash safety: the durable cursor (`cursor`) is the stamp before which everything is
//!   uploaded: the oldest stamp still pending (or still to be walked), saved every second.
//!   At start the uploader walks the store from the saved cursor (less its slack) and
//!   uploads what the bucket lacks (HEAD first). A record stored and then killed -9 before
//!   its PUT is therefore uploaded after the restart.
//! - Records and tombstones that came from the shared tier (`Origin::Shared`) are not
//!   uploaded again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use super::cursor::{Cursor, CURSOR_SLACK_SECS};
use super::Inner;
use crate::store::{Origin, RecordRef, StoreEvent};

const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the loop wakes without events (retries due, walks, the cursor).
const TICK: Duration = Duration::from_millis(100);
const CURSOR_SAVE_EVERY: Duration = Duration::from_secs(1);
/// A pending catch-up walk runs once the queue is down to 1/this of `put-queue-max`: each
/// walk goes over the whole index, so it should add many uploads at a time, not a few.
const WALK_WHEN_QUEUE_BELOW_DIVISOR: usize = 2;

/// One thing to upload.
#[derive(Clone)]
pub(crate) enum Upload {
    Record(RecordRef),
    Tombstone { key: [u8; 20], at: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum Kind {
    Record,
    Tombstone,
}

type ItemKey = (Kind, [u8; 20]);

impl Upload {
    fn key(&self) -> ItemKey {
        match self {
            Upload::Record(r) => (
                Kind::Record,
                r.hashes().primary_key().expect("a stored record has a key"),
            ),
            Upload::Tombstone { key, .. } => (Kind::Tombstone, *key),
        }
    }

    fn stamp(&self) -> u64 {
        match self {
            Upload::Record(r) => r.stored_at(),
            Upload::Tombstone { at, .. } => *at,
        }
    }
}

/// The listener's side: a bounded channel and the oldest stamp it had to drop.
pub(crate) struct Queue {
    rx: flume::Receiver<Upload>,
    dropped_from: Arc<AtomicU64>,
}

impl Queue {
    /// Installs the store listener that feeds the uploader.
    pub fn hook(inner: &Arc<Inner>) -> anyhow::Result<Queue> {
        let (tx, rx) = flume::bounded::<Upload>(inner.cfg.shared_put_queue_max);
        let dropped_from = Arc::new(AtomicU64::new(u64::MAX));
        let dropped = dropped_from.clone();
        let weak = Arc::downgrade(inner);
        let push = move |u: Upload| {
            let stamp = u.stamp();
            if let Err(flume::TrySendError::Full(_)) = tx.try_send(u) {
                dropped.fetch_min(stamp, Relaxed);
                if let Some(inner) = weak.upgrade() {
                    inner.stats.overflows.fetch_add(1, Relaxed);
                }
            }
        };
        inner
            .store
            .set_listener(Box::new(move |ev| match ev {
                StoreEvent::Stored {
                    record,
                    origin: Origin::Local,
                } => push(Upload::Record(record.clone())),
                StoreEvent::Deleted {
                    keys,
                    at,
                    origin: Origin::Local,
                } => {
                    for &key in keys {
                        push(Upload::Tombstone { key, at });
                    }
                }
                _ => {}
            }))
            .map_err(|_| anyhow::anyhow!("the store already has a listener"))?;
        Ok(Queue { rx, dropped_from })
    }
}

struct Item {
    upload: Upload,
    attempts: u32,
    /// From a catch-up walk: the bucket may have it already, so HEAD first.
    check_first: bool,
    running: bool,
}

struct State {
    inner: Arc<Inner>,
    pending: HashMap<ItemKey, Item>,
    ready: VecDeque<ItemKey>,
    delayed: BinaryHeap<Reverse<(Instant, ItemKey)>>,
    running: tokio::task::JoinSet<(ItemKey, Result<Done, String>)>,
    /// A walk of the store for stamps at or after this is due (start, or dropped events).
    walk_from: Option<u64>,
    /// Uploaded during an unfinished walk, so the next round of it skips them.
    walked: HashSet<ItemKey>,
}

enum Done {
    Uploaded {
        bytes: u64,
    },
    AlreadyThere,
    /// Blocked or deleted meanwhile: nothing to upload.
    Skipped,
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_MAX)
}

impl State {
    fn queue_max(&self) -> usize {
        self.inner.cfg.shared_put_queue_max
    }

    fn insert(&mut self, upload: Upload, check_first: bool) -> bool {
        let key = upload.key();
        if self.pending.contains_key(&key) {
            return false;
        }
        self.pending.insert(
            key,
            Item {
                upload,
                attempts: 0,
                check_first,
                running: false,
            },
        );
        self.ready.push_back(key);
        true
    }

    fn launch(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.delayed.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, key)) = self.delayed.pop().expect("peeked");
            self.ready.push_back(key);
        }
        while self.running.len() < self.inner.cfg.shared_put_concurrency {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(item) = self.pending.get_mut(&key) else {
                continue;
            };
            item.running = true;
            let (upload, check) = (item.upload.clone(), item.check_first);
            let inner = self.inner.clone();
            self.running.spawn(async move {
                let started = Instant::now();
                let r = upload_one(&inner, &upload, check).await;
                if matches!(r, Ok(Done::Uploaded { .. })) {
                    inner.stats.put_latency.record(started.elapsed());
                }
                (key, r)
            });
        }
    }

    fn finish(&mut self, key: ItemKey, result: Result<Done, String>) {
        let s = &self.inner.stats;
        match result {
            Ok(done) => {
                self.inner.succeeded();
                let item = self.pending.remove(&key);
                match done {
                    Done::Uploaded { bytes } => {
                        s.put_bytes.fetch_add(bytes, Relaxed);
                        if matches!(item.map(|i| i.upload), Some(Upload::Tombstone { .. })) {
                            s.tombstones_published.fetch_add(1, Relaxed);
                        }
                    }
                    Done::AlreadyThere => {
                        s.put_skipped_present.fetch_add(1, Relaxed);
                    }
                    Done::Skipped => {}
                }
                if self.walk_from.is_some() {
                    self.walked.insert(key);
                }
            }
            Err(e) => {
                s.put_errors.fetch_add(1, Relaxed);
                self.inner.failed("upload", &e);
                if let Some(item) = self.pending.get_mut(&key) {
                    item.running = false;
                    item.attempts += 1;
                    let at = Instant::now() + backoff(item.attempts);
                    self.delayed.push(Reverse((at, key)));
                    tracing::debug!(
                        key = %hex::encode(key.1),
                        attempts = item.attempts,
                        "shared upload failed, retrying: {e}"
                    );
                }
            }
        }
    }

    /// Everything stamped before the returned time is uploaded.
    fn cursor(&self) -> u64 {
        let mut c = unix_now();
        for item in self.pending.values() {
            c = c.min(item.upload.stamp());
        }
        if let Some(w) = self.walk_from {
            c = c.min(w);
        }
        c
    }

    /// Walk the store for records and tombstones stamped at or after `walk_from`, adding
    /// what is not pending, as far as the queue has room. The walk is over when everything
    /// it found fit.
    async fn walk(&mut self) {
        let Some(since) = self.walk_from else { return };
        let room = self.queue_max().saturating_sub(self.pending.len());
        if room == 0 {
            return;
        }
        let store = self.inner.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut records = Vec::new();
            store.for_each_record(|r| {
                if r.stored_at() >= since {
                    records.push(r.clone());
                }
            });
            (records, store.tombstones_since(since))
        })
        .await;
        let Ok((records, tombs)) = found else { return };
        let mut added = 0;
        let mut complete = true;
        let uploads = records.into_iter().map(Upload::Record).chain(
            tombs
                .into_iter()
                .map(|(key, at)| Upload::Tombstone { key, at }),
        );
        for u in uploads {
            let key = u.key();
            if self.pending.contains_key(&key) || self.walked.contains(&key) {
                continue;
            }
            if added == room {
                complete = false;
                break;
            }
            self.insert(u, true);
            added += 1;
        }
        tracing::info!(since, added, complete, "shared uploader: catch-up walk");
        if complete {
            self.walk_from = None;
            self.walked.clear();
        }
    }
}

/// Uploads until stopped; on stop, keeps going until the queue is empty or the deadline.
pub(crate) async fn run(
    inner: Arc<Inner>,
    queue: Queue,
    cursor: Cursor,
    mut stop: tokio::sync::oneshot::Receiver<Instant>,
) {
    let saved = cursor.load();
    let mut st = State {
        inner: inner.clone(),
        pending: HashMap::new(),
        ready: VecDeque::new(),
        delayed: BinaryHeap::new(),
        running: tokio::task::JoinSet::new(),
        walk_from: Some(saved.saturating_sub(CURSOR_SLACK_SECS)),
        walked: HashSet::new(),
    };
    let mut last_saved = saved;
    let mut next_save = Instant::now();
    let mut deadline: Option<Instant> = None;
    loop {
        let room = st.pending.len() < st.queue_max();
        tokio::select! {
            m = queue.rx.recv_async(), if room => {
                if let Ok(u) = m {
                    st.insert(u, false);
                }
            }
            Some(j) = st.running.join_next(), if !st.running.is_empty() => {
                match j {
                    Ok((key, r)) => st.finish(key, r),
                    Err(e) => tracing::error!("shared upload task failed: {e}"),
                }
            }
            d = &mut stop, if deadline.is_none() => {
                deadline = Some(d.unwrap_or_else(|_| Instant::now()));
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        // Drain what else is queued without waiting (up to the room there is).
        while st.pending.len() < st.queue_max() {
            match queue.rx.try_recv() {
                Ok(u) => {
                    st.insert(u, false);
                }
                Err(_) => break,
            }
        }
        let dropped = queue.dropped_from.swap(u64::MAX, Relaxed);
        if dropped != u64::MAX {
            st.walk_from = Some(st.walk_from.map_or(dropped, |w| w.min(dropped)));
        }
        if st.walk_from.is_some()
            && st.pending.len() <= st.queue_max() / WALK_WHEN_QUEUE_BELOW_DIVISOR
        {
            st.walk().await;
        }
        st.launch();
        let backlog = st.pending.len() as u64;
        inner.stats.backlog.store(backlog, Relaxed);
        let now = Instant::now();
        let idle = st.pending.is_empty() && st.walk_from.is_none() && queue.rx.is_empty();
        let stopping = deadline.is_some_and(|d| idle || now >= d);
        if now >= next_save || stopping {
            let c = st.cursor();
            inner.stats.cursor.store(c, Relaxed);
            if c != last_saved {
                match cursor.save(c) {
                    Ok(()) => last_saved = c,
                    Err(e) => tracing::error!("shared cursor not saved: {e}"),
                }
            }
            next_save = now + CURSOR_SAVE_EVERY;
        }
        if stopping {
            if !idle {
                tracing::warn!(
                    backlog,
                    "shared uploader stopped with uploads pending; they go up after the next start"
                );
            }
            return;
        }
    }
}

/// The bytes of a record, straight from the mapping: `Bytes::from_owner` keeps the
/// segment mapped until the upload is done, so nothing is copied.
struct RecordBytes(RecordRef);

impl AsRef<[u8]> for RecordBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.info()
    }
}

/// One store operation on `path`, bounded by the op timeout: `Some` on success, `None` when
/// the object does not exist, the error as text naming the operation and object otherwise.
async fn bounded<T>(
    inner: &Inner,
    what: &str,
    path: &Path,
    op: impl Future<Output = object_store::Result<T>>,
) -> Result<Option<T>, String> {
    let t = inner.op_timeout();
    match tokio::time::timeout(t, op).await {
        Err(_) => Err(format!("{what} {path}: no answer in {t:?}")),
        Ok(Ok(v)) => Ok(Some(v)),
        Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
        Ok(Err(e)) => Err(format!("{what} {path}: {}", super::error_chain(&e))),
    }
}

async fn put(inner: &Inner, path: &Path, body: &Bytes) -> Result<(), String> {
    bounded(
        inner,
        "PUT",
        path,
        inner.os.put(path, PutPayload::from(body.clone())),
    )
    .await?;
    inner.stats.puts.fetch_add(1, Relaxed);
    Ok(())
}

/// DELETE; an object already gone is fine.
pub(super) async fn delete(inner: &Inner, path: &Path) -> Result<(), String> {
    bounded(inner, "DELETE", path, inner.os.delete(path))
        .await
        .map(drop)
}

async fn upload_one(inner: &Inner, upload: &Upload, check_first: bool) -> Result<Done, String> {
    match upload {
        Upload::Record(record) => {
            let keys: Vec<[u8; 20]> = record.hashes().handshake_keys().collect();
            if keys.iter().any(|k| inner.store.is_blocked(k)) {
                return Ok(Done::Skipped);
            }
            let body = Bytes::from_owner(RecordBytes(record.clone()));
            let mut bytes = 0;
            for key in &keys {
                let path = inner.layout.info(key);
                if check_first {
                    let there = bounded(inner, "HEAD", &path, inner.os.head(&path)).await?;
                    if there.is_some_and(|meta| meta.size == body.len() as u64) {
                        continue;
                    }
                }
                put(inner, &path, &body).await?;
                bytes += body.len() as u64;
            }
            // Deleted while we uploaded: the tombstone's DELETE may have run before our
            // PUT landed. Take the objects back out (misses check `tomb/` anyway; this
            // keeps the bucket clean).
            if keys.iter().any(|k| inner.store.is_blocked(k)) {
                for key in &keys {
                    delete(inner, &inner.layout.info(key)).await?;
                }
                return Ok(Done::Skipped);
            }
            Ok(if bytes == 0 {
                Done::AlreadyThere
            } else {
                Done::Uploaded { bytes }
            })
        }
        Upload::Tombstone { key, at } => {
            let tomb = inner.layout.tomb(key);
            // There already only if it is one the fleet trusts: an object a bucket writer
            // put there must not stop the real tombstone being published.
            if check_first {
                let limit = super::tombstone::TOMBSTONE_BYTES_MAX;
                let there = bounded(
                    inner,
                    "GET",
                    &tomb,
                    super::get_bounded(&*inner.os, &tomb, limit),
                );
                if let Some(super::Bounded::Body(body)) = there.await? {
                    if super::tombstone::verify(inner.fleet.as_ref(), &body, key, None).is_ok() {
                        return Ok(Done::AlreadyThere);
                    }
                }
            }
            // Without the fleet key no node would trust it: the delete stays on this node
            // (its object is still taken out of the bucket).
            if let Some(fleet) = &inner.fleet {
                let body = Bytes::from(super::tombstone::body(fleet, key, *at, &inner.node));
                put(inner, &tomb, &body).await?;
                put(inner, &inner.layout.tomb_log(*at, key), &body).await?;
            }
            delete(inner, &inner.layout.info(key)).await?;
            Ok(Done::Uploaded { bytes: 0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_250ms_to_30s() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(10), RETRY_MAX);
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }
}
