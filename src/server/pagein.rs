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
    /// Page-ins this handle's core may have in flight (`per_core`): a permit each, held
    /// for a page-in and given back when it ends (or its connection goes). tokio's
    /// semaphore (runtime-agnostic) because it queues waiters FIFO and hands a released
    /// permit to the oldest one. A flume channel of tokens did not: with more waiters than
    /// tokens, a waiter woken for a token that a newer arrival took wakes itself again on
    /// every poll and re-queues its hook each time (flume 0.12, zesterer/flume#182) — a
    /// core spinning and growing without bound under 64 cold fetches at once.
    permits: tokio::sync::Semaphore,
    per_core: usize,
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
            permits: tokio::sync::Semaphore::new(per_core),
            per_core,
        })
    }

    /// A handle for one core: the same pool, with that core's own `per_core` permits.
    pub fn for_core(&self) -> PageIn {
        PageIn {
            jobs: self.jobs.clone(),
            permits: tokio::sync::Semaphore::new(self.per_core),
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
        // Never closed: nothing calls `close` on it.
        let _permit = self.permits.acquire().await.ok()?;
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

    /// Wake-ups of one future, counted over every waker it was polled with.
    type Wakes = Arc<std::sync::atomic::AtomicUsize>;

    /// A waker that adds to its `Wakes`.
    struct Wake(Wakes);

    impl std::task::Wake for Wake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn count(wakes: &Wakes) -> usize {
        wakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Polls `f` once with a new waker that counts into `wakes`: a new one each time, as
    /// an executor may pass (monoio's task wakers compare unequal between polls).
    fn poll_once<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
        wakes: &Wakes,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::from(Arc::new(Wake(wakes.clone())));
        f.poll(&mut std::task::Context::from_waker(&waker))
    }

    /// More cold connections than permits on one core (the scale run's 64 cold fetches at
    /// once): a waiter woken by a released permit that a newer page-in reaches first must
    /// sleep on, not wake itself. With flume's token channel it woke itself on every poll
    /// and queued its hook again each time: a core spinning and memory growing without
    /// bound (zesterer/flume#182). Driven by hand, poll by poll, so the order is exact.
    #[test]
    fn a_page_in_waiting_for_a_permit_never_wakes_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        // Each page-in takes a second: no answer arrives while w's polls are checked, even
        // on a loaded machine.
        let pool = PageIn::start(Arc::new(store), 2, 0, 1, Duration::from_secs(1)).unwrap();
        // Only w's wake-ups are checked; a and n share one count.
        let (ww, others) = (Wakes::default(), Wakes::default());
        let (wa, wn) = (&others, &others);
        let mut a = std::pin::pin!(pool.page_in([1; 20]));
        let mut w = std::pin::pin!(pool.page_in([2; 20]));
        let mut n = std::pin::pin!(pool.page_in([3; 20]));
        assert!(poll_once(a.as_mut(), wa).is_pending(), "a holds the permit");
        assert!(poll_once(w.as_mut(), &ww).is_pending(), "w waits for it");
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        while poll_once(a.as_mut(), wa).is_pending() {
            assert!(
                std::time::Instant::now() < give_up,
                "a's page-in never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // a gave the permit back, which woke w; n comes before w runs.
        assert!(count(&ww) >= 1, "the released permit woke w");
        assert!(poll_once(n.as_mut(), wn).is_pending());
        for _ in 0..3 {
            let before = count(&ww);
            assert!(
                poll_once(w.as_mut(), &ww).is_pending(),
                "w's page-in takes a second"
            );
            assert_eq!(
                count(&ww),
                before,
                "the waiting page-in woke itself: it spins"
            );
        }
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
        // Pool threads of tests running beside this one (cargo test runs them in one
        // process) are named alike: only threads started from here on are looked at.
        let before = page_in_threads();
        let pool = PageIn::start(store, 1, 5, 4, Duration::ZERO).unwrap();
        // One page-in: the thread has set its priority before taking its first job.
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(pool.page_in([7; 20]));
        let niced: Vec<i32> = page_in_threads()
            .into_iter()
            .filter(|tid| !before.contains(tid))
            // SAFETY: a plain syscall; the thread is alive while `pool` is.
            .map(|tid| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) })
            .collect();
        assert!(
            niced.contains(&(base + 5).min(limits::PAGE_IN_NICE_MAX)),
            "no new page-in thread at nice {}: {niced:?}",
            base + 5
        );
        assert_eq!(
            thread_nice(),
            base,
            "the caller's own priority is left alone"
        );
    }

    /// The thread ids of this process's page-in threads.
    fn page_in_threads() -> Vec<libc::id_t> {
        let mut tids = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.starts_with("magnetar-pagein") {
                tids.push(task.file_name().unwrap().to_str().unwrap().parse().unwrap());
            }
        }
        tids
    }
}
