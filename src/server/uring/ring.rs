//! The serving core's own io_uring: set-up, and batched submission that never spins and
//! never splits a linked chain. The host runtime (monoio) learns that completions wait by
//! polling the ring's own descriptor (docs/io-uring.md "Wake-up").

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, squeue, IoUring};

/// Which set-up flags a ring got: the best the kernel accepts, from this list, in order.
/// - `SINGLE_ISSUER`: only the worker thread submits, so the kernel skips its locking (6.0+).
/// - `COOP_TASKRUN`: completion work runs when the thread next crosses into the kernel,
///   with no inter-processor interrupt; a sleeping thread is still woken for it (5.19+).
/// - `TASKRUN_FLAG`: the kernel says in the SQ flags when such work waits, so a turn with
///   nothing to submit and no work waiting skips its system call (5.19+).
/// - `SUBMIT_ALL`: one bad SQE does not stop the rest of the batch (5.18+).
///
/// Not `DEFER_TASKRUN`: it runs completion work only when this thread enters *this* ring,
/// and the eventfd is signalled for that work only by a deferred kernel path (13-15 ms
/// later on 6.18). The worker sleeps in monoio's ring, so a lone client's every round
/// trip waited that long: p50 16 ms at one connection instead of 0.2 ms (docs/io-uring.md
/// "Wake-up" has the measurements; `tests/driver_latency.rs` guards it).
type Setup = fn(&mut io_uring::Builder);

const SETUPS: &[(&str, Setup)] = &[
    ("single-issuer,coop-taskrun,taskrun-flag,submit-all", |b| {
        b.setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_submit_all();
    }),
    ("coop-taskrun,submit-all", |b| {
        b.setup_coop_taskrun().setup_submit_all();
    }),
    ("none", |_| {}),
];

/// What the ring had to work around, for the core's counters (`Core::report_ring`).
#[derive(Default, Clone, Copy)]
pub struct RingCounts {
    /// Chains that found the submission queue full and waited in the backlog.
    pub backlogged: u64,
    /// Completions the kernel could not keep (its CQ overflow count).
    pub cqes_dropped: u64,
    /// `io_uring_enter` failures other than EINTR, EBUSY and EAGAIN.
    pub enter_errors: u64,
}

pub struct Ring {
    ring: IoUring,
    /// The set-up flags the kernel accepted (for the log and the status page).
    pub flags: &'static str,
    /// The kernel reports pending completion work in the SQ flags (`TASKRUN_FLAG`).
    taskrun_flag: bool,
    /// Chains (one entry, or a linked run) that did not fit the submission queue, in
    /// order; they go in whole at the next `submit`, before anything pushed later.
    backlog: VecDeque<Vec<squeue::Entry>>,
    counts: RingCounts,
    /// The kernel's CQ overflow count already reported.
    overflow_reported: u64,
}

impl Ring {
    /// A ring of `sq_entries` submissions and `cq_entries` completions (multishot
    /// receives post many completions per submission, so the CQ is the larger).
    /// `MAGNETAR_URING_SETUP=<name from SETUPS>` tries only that set-up (to compare them).
    pub fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        let only = std::env::var("MAGNETAR_URING_SETUP").ok();
        let mut last_err = None;
        let setups = SETUPS
            .iter()
            .filter(|(name, _)| only.as_deref().is_none_or(|o| o == *name));
        for (flags, setup) in setups {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq_entries);
            setup(&mut builder);
            match builder.build(sq_entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        ring,
                        flags,
                        taskrun_flag: flags.contains("taskrun-flag"),
                        backlog: VecDeque::new(),
                        counts: RingCounts::default(),
                        overflow_reported: 0,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no io_uring set-up worked")))
    }

    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }

    /// The ring's descriptor, for the host runtime to poll: it is readable while
    /// completions wait in the CQ. Unlike a registered eventfd, nothing is signalled per
    /// completion while the loop is busy, a wait after a busy spell does not return at
    /// once for completions already taken, and a wake-up costs no read(2) to reset it.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Queues one submission (see `push_chain`).
    ///
    /// # Safety
    /// Everything the entry points at (buffers, iovecs, msghdr, sockaddr) must stay valid
    /// and unmoved until its completion arrives.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: passed on to the caller.
        unsafe { self.push_chain(std::slice::from_ref(entry)) }
    }

    /// Queues entries that must reach the kernel in one submission: a linked chain (the
    /// link flag on all but the last). A submit between them would run the rest unlinked,
    /// so the chain goes into the queue whole or waits whole in the backlog. Never
    /// blocks and never spins: a queue the kernel does not empty (its CQ is full) leaves
    /// the chain in the backlog for the next turn, after the completions are drained.
    ///
    /// # Safety
    /// As for `push`, for every entry.
    pub unsafe fn push_chain(&mut self, chain: &[squeue::Entry]) {
        // A chain longer than the queue could never go in: it would wait forever.
        assert!(
            chain.len() <= self.ring.submission().capacity(),
            "chain longer than the SQ"
        );
        if self.backlog.is_empty() && self.room() < chain.len() {
            self.submit();
        }
        if self.backlog.is_empty() && self.room() >= chain.len() {
            let mut sq = self.ring.submission();
            for entry in chain {
                // SAFETY: passed on to the caller; room was checked.
                let pushed = unsafe { sq.push(entry) };
                debug_assert!(pushed.is_ok(), "room was checked");
            }
            return;
        }
        self.counts.backlogged += 1;
        self.backlog.push_back(chain.to_vec());
    }

    fn room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Moves whole chains from the backlog into the queue while they fit.
    fn flush_backlog(&mut self) {
        while let Some(len) = self.backlog.front().map(Vec::len) {
            if self.room() < len {
                return;
            }
            let chain = self.backlog.pop_front().expect("front exists");
            let mut sq = self.ring.submission();
            for entry in &chain {
                // SAFETY: the caller of `push_chain` vouched for it; room was checked.
                let pushed = unsafe { sq.push(entry) };
                debug_assert!(pushed.is_ok(), "room was checked");
            }
        }
    }

    /// Submits what is queued and lets the kernel post finished completions, without
    /// waiting: at most one system call per loop turn, whatever the number of operations,
    /// and none when there is nothing to submit and no completion work waits.
    pub fn submit(&mut self) {
        self.flush_backlog();
        let (to_submit, work_waits) = {
            let sq = self.ring.submission();
            (sq.len() as u32, !self.taskrun_flag || sq.taskrun())
        };
        if to_submit == 0 && !work_waits {
            return;
        }
        let mut dropped_reported = false;
        loop {
            // SAFETY: no argument pointer is passed.
            let res = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            match res.map_err(|e| e.raw_os_error().unwrap_or(0)) {
                Err(libc::EINTR) => continue,
                // The kernel lost completions (it could not keep an overflowed one): the
                // CQ's overflow count says how many (`take_counts`); it reports this once,
                // so the submission is tried again.
                Err(libc::EBADR) if !dropped_reported => {
                    dropped_reported = true;
                    tracing::error!(
                        "io_uring dropped completions: connections they belonged to stay open until shutdown"
                    );
                }
                // The completion queue is full (overflowed into the kernel's list): the
                // caller drains it, and the next turn submits what is still queued.
                Err(libc::EBUSY | libc::EAGAIN) => return,
                Err(e) => {
                    self.counts.enter_errors += 1;
                    tracing::warn!("io_uring_enter failed: {}", io::Error::from_raw_os_error(e));
                    return;
                }
                // Entries the kernel did not take stay queued for the next turn.
                Ok(_) => return,
            }
        }
    }

    /// Submits what is queued and waits up to `timeout` for `want` completions (start-up
    /// probes only: the serving loop never blocks in the ring).
    pub fn submit_and_wait(&mut self, want: usize, timeout: std::time::Duration) -> io::Result<()> {
        self.flush_backlog();
        let ts = io_uring::types::Timespec::from(timeout);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether completions wait to be drained.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Takes up to `max` completions (copied out: a handler may push new entries).
    pub fn take_completions(&mut self, into: &mut Vec<cqueue::Entry>, max: usize) {
        into.clear();
        into.extend(self.ring.completion().take(max));
    }

    /// What happened since the last call (the counts restart at zero).
    pub fn take_counts(&mut self) -> RingCounts {
        let overflow = u64::from(self.ring.completion().overflow());
        let mut counts = std::mem::take(&mut self.counts);
        // The kernel's count only grows; keep how much of it was reported.
        counts.cqes_dropped = overflow.saturating_sub(self.overflow_reported);
        self.overflow_reported = overflow;
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    /// A linked chain that does not fit the queue's last free slots is not split: the
    /// queue goes in first, then the chain whole. A split chain would run its second
    /// entry unlinked (a close before the cancel it was meant to follow).
    #[test]
    fn a_chain_goes_into_the_queue_whole() {
        let mut ring = Ring::new(4, 64).expect("an io_uring");
        for i in 0..3 {
            // SAFETY: no pointers.
            unsafe { ring.push(&opcode::Nop::new().build().user_data(i)) };
        }
        let chain = [
            opcode::Nop::new()
                .build()
                .flags(squeue::Flags::IO_HARDLINK)
                .user_data(10),
            opcode::Nop::new().build().user_data(11),
        ];
        // SAFETY: no pointers.
        unsafe { ring.push_chain(&chain) };
        // The three went in to make room; the chain waits in the queue, both entries
        // (split, its first entry would have gone with the three, alone).
        assert_eq!(ring.ring.submission().len(), 2, "the chain is queued whole");
        ring.submit_and_wait(5, std::time::Duration::from_secs(2))
            .expect("submitted");
        let mut got = Vec::new();
        ring.take_completions(&mut got, 16);
        let mut seen: Vec<(u64, i32)> = got.iter().map(|c| (c.user_data(), c.result())).collect();
        seen.sort();
        assert_eq!(seen, vec![(0, 0), (1, 0), (2, 0), (10, 0), (11, 0)]);
        assert_eq!(
            ring.take_counts().backlogged,
            0,
            "room was made by submitting"
        );
    }
}
