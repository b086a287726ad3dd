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
}

impl PageIn {
    /// Starts `threads` page-in threads for `store` (clamped to
    /// `1..=limits::PAGE_IN_THREADS_MAX`), each `nice` levels below the calling thread's
    /// priority (`limits::PAGE_IN_NICE_DEFAULT` says why). `delay`: a pause before each
    /// page-in, zero but in tests that need a page-in to last (a disk slower than the test
    /// machine's). The threads end once every `PageIn` handle is dropped.
    pub fn start(
        store: Arc<Store>,
        threads: usize,
        nice: i32,
        delay: Duration,
    ) -> std::io::Result<PageIn> {
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
        Ok(PageIn { jobs })
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
    pub async fn page_in(&self, key: [u8; 20]) -> Option<RecordRef> {
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
        let pool = PageIn::start(store.clone(), 2, 0, Duration::ZERO).unwrap();
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

    #[test]
    fn page_in_threads_run_below_the_workers_priority() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let base = thread_nice();
        let pool = PageIn::start(store, 1, 5, Duration::ZERO).unwrap();
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
