//! The page-in pool: a few threads that read cold records into the page cache, so that a
//! worker's event loop never waits for the disk.
//!
//! A worker reads records through the store's mmap. For a record in the page cache that
//! costs nothing (zero-copy, at most a minor fault); for one that is not, the read is a
//! major fault that blocks the worker's only thread, and every connection of that core
//! with it, for as long as the disk takes. So the handshake lookup asks the store first
//! (`Store::lookup_resident`: residency bits and `mincore`, no mapping read); a `Cold`
//! answer becomes `Effect::PageIn`: the connection parks (as for `Effect::Store`), the
//! lookup and the fault run here (`Store::page_in`: MADV_WILLNEED on exactly the record's
//! pages, then a touch of each), and the connection goes on with the record, now resident,
//! still served zero-copy from the mapping.
//!
//! One pool for the process (every core's cold lookups share the disk anyway). Jobs wait
//! in a bounded queue; a full queue makes the connection's task wait for room (on its
//! core's runtime, which goes on serving), never the worker thread.
//!
//! Each core may have at most `--page-in-per-core` page-ins in flight (`PageIn::for_core`):
//! a cold fetch costs the worker more than a resident one (a `mincore`, the hand-off and
//! its wake-up, the page-in thread's own CPU on a shared core), and a flood of them would
//! take the whole core from the resident connections. Past the cap a cold connection waits
//! on its core's runtime for a permit (FIFO), so the core's resident hits go first.

use std::sync::Arc;
use std::time::Duration;

use crate::limits;
use crate::store::{RecordRef, Store};

struct Job {
    key: [u8; 20],
    reply: flume::Sender<Option<RecordRef>>,
}

pub struct PageIn {
    jobs: flume::Sender<Job>,
    /// Page-ins this handle's core may have in flight (`per_core`): one token each, taken
    /// for a page-in and given back when it ends (or its connection goes).
    permits: (flume::Sender<()>, flume::Receiver<()>),
    per_core: usize,
}

/// `n` permits in a channel: taking one is `recv`, giving it back `send`. A flume channel
/// because waiting for it is async and a waiter that goes away (its connection closed)
/// passes its turn on.
fn permits(n: usize) -> (flume::Sender<()>, flume::Receiver<()>) {
    let (give, take) = flume::bounded(n);
    for _ in 0..n {
        give.try_send(()).expect("room for every permit");
    }
    (give, take)
}

/// A taken permit; gives it back when dropped.
struct Permit<'a>(&'a flume::Sender<()>);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // Never full (at most `per_core` tokens exist) nor disconnected (the handle owns
        // the receiver and outlives this borrow).
        let _ = self.0.try_send(());
    }
}

impl PageIn {
    /// Starts `threads` page-in threads for `store` (clamped to
    /// `1..=limits::PAGE_IN_THREADS_MAX`), each `nice` levels below the calling thread's
    /// priority (`limits::PAGE_IN_NICE_DEFAULT` says why). `per_core`: page-ins one core
    /// may have in flight (at least 1; each core takes its own handle, `for_core`).
    /// `delay`: a pause before each page-in, zero but in tests that need a page-in to last
    /// (a disk slower than the test machine's). The threads end once every `PageIn` handle
    /// is dropped.
    pub fn start(
        store: Arc<Store>,
        threads: usize,
        nice: i32,
        per_core: usize,
        delay: Duration,
    ) -> std::io::Result<PageIn> {
        let per_core = per_core.max(1);
        let base = thread_nice();
        let (jobs, rx) = flume::bounded::<Job>(limits::PAGE_IN_QUEUE_MAX);
        // Weak: the pool never keeps the store open (its drop writes the checkpoint).
        let store = Arc::downgrade(&store);
        for i in 0..threads.clamp(1, limits::PAGE_IN_THREADS_MAX) {
            let (rx, store) = (rx.clone(), store.clone());
            std::thread::Builder::new()
                .name(format!("magnetar-pagein-{i}"))
                .spawn(move || {
                    set_thread_nice(base.saturating_add(nice));
                    while let Ok(job) = rx.recv() {
                        if !delay.is_zero() {
                            std::thread::sleep(delay);
                        }
                        // The connection may have gone meanwhile: nobody to tell then.
                        let record = store.upgrade().and_then(|s| s.page_in(&job.key));
                        let _ = job.reply.send(record);
                    }
                })?;
        }
        Ok(PageIn {
            jobs,
            permits: permits(per_core),
            per_core,
        })
    }

    /// A handle for one core: the same pool, with that core's own `per_core` permits.
    pub fn for_core(&self) -> PageIn {
        PageIn {
            jobs: self.jobs.clone(),
            permits: permits(self.per_core),
            per_core: self.per_core,
        }
    }

    /// The pause `MAGNETAR_PAGE_IN_DELAY_MS` asks for before each page-in: a test hook
    /// (a disk slower than the test machine's), zero when unset.
    pub fn delay_from_env() -> Duration {
        std::env::var("MAGNETAR_PAGE_IN_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis)
    }

    /// The record for `key`, read into the page cache off the calling thread (`None`: not
    /// stored, or no page-in thread is left, which only happens at shutdown).
    /// Waits for one of this core's permits first (`--page-in-per-core`).
    pub async fn page_in(&self, key: [u8; 20]) -> Option<RecordRef> {
        // Never disconnected: `self` holds the sender.
        self.permits.1.recv_async().await.ok()?;
        let _permit = Permit(&self.permits.0);
        let (reply, answer) = flume::bounded(1);
        self.jobs.send_async(Job { key, reply }).await.ok()?;
        answer.recv_async().await.ok().flatten()
    }
}

/// The calling thread's nice value (Linux keeps one per thread; 0 if it cannot be read).
fn thread_nice() -> i32 {
    // SAFETY: plain syscalls about the calling thread; errno is reset first because -1 is
    // also a valid priority.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// Sets the calling thread's nice value (clamped to 19). Best effort: a thread left at its
/// priority still pages in, only without yielding to the workers first.
fn set_thread_nice(n: i32) {
    // SAFETY: a plain syscall about the calling thread.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, n.min(limits::PAGE_IN_NICE_MAX)) } != 0 {
        tracing::debug!(
            "page-in thread priority not lowered: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppendOptions, StoreOptions};

    #[test]
    fn pages_in_a_stored_record_and_misses_an_unknown_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let info = crate::metainfo::synthetic_v1_info(3000);
        let record = store.append(&info, AppendOptions::default()).unwrap();
        let key = record.record().hashes().v1.unwrap();
        let pool = PageIn::start(store.clone(), 2, 0, 4, Duration::ZERO).unwrap();
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(async {
                (
                    pool.page_in(key).await.map(|r| r.info().to_vec()),
                    pool.page_in([7; 20]).await.is_none(),
                )
            });
        assert_eq!(rt, (Some(info), true));
    }

    /// A core with `per_core` 1 runs its second page-in only after its first, while
    /// another core's page-in runs beside it: three threads, so without the cap all three
    /// would run at once and the second finish after one delay.
    #[test]
    fn a_core_has_at_most_per_core_page_ins_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let delay = Duration::from_millis(300);
        let pool = PageIn::start(store, 3, 0, 1, delay).unwrap();
        let (a, b) = (pool.for_core(), pool.for_core());
        let started = std::time::Instant::now();
        let done = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(async {
                let when = |p: &'static PageIn, key| async move {
                    p.page_in(key).await;
                    started.elapsed()
                };
                // 'static borrows for the spawned tasks: the handles live to the end.
                let (a, b): (&'static PageIn, &'static PageIn) =
                    (Box::leak(Box::new(a)), Box::leak(Box::new(b)));
                let a1 = monoio::spawn(when(a, [1; 20]));
                let a2 = monoio::spawn(when(a, [2; 20]));
                let b1 = monoio::spawn(when(b, [3; 20]));
                (a1.await, a2.await, b1.await)
            });
        let (a1, a2, b1) = done;
        assert!(a1 >= delay && b1 >= delay, "{a1:?} {b1:?}");
        assert!(
            a2 >= 2 * delay,
            "core a's second page-in ran beside its first: done after {a2:?}"
        );
        assert!(
            b1 < a2,
            "core b waited for core a's cap: b {b1:?}, a's second {a2:?}"
        );
    }

    #[test]
    fn page_in_threads_run_below_the_workers_priority() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let base = thread_nice();
        let pool = PageIn::start(store, 1, 5, 4, Duration::ZERO).unwrap();
        // One page-in: the thread has set its priority before taking its first job.
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(pool.page_in([7; 20]));
        let mut niced = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.starts_with("magnetar-pagein") {
                let tid: libc::id_t = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
                // SAFETY: a plain syscall; the thread is alive while `pool` is.
                niced.push(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) });
            }
        }
        assert_eq!(niced, vec![(base + 5).min(limits::PAGE_IN_NICE_MAX)]);
        assert_eq!(
            thread_nice(),
            base,
            "the caller's own priority is left alone"
        );
    }
}
