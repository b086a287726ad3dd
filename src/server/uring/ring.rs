//! The serving core's own io_uring: set-up with the flags that make a thread-per-core
//! server cheap, batched submission, and the eventfd that tells the host runtime (monoio)
//! when completions wait (docs/io-uring.md).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, squeue, IoUring};

/// Which set-up flags a ring got: the best the kernel accepts, from this list, in order.
/// - `SINGLE_ISSUER`: only the worker thread submits, so the kernel skips its locking.
/// - `DEFER_TASKRUN`: completion work runs when we ask for events (once per loop turn),
///   not by interrupting the thread at any moment; needs SINGLE_ISSUER (6.1+).
/// - `COOP_TASKRUN`: no inter-processor interrupt to run task work (5.19+).
/// - `SUBMIT_ALL`: one bad SQE does not stop the rest of the batch (5.18+).
type Setup = fn(&mut io_uring::Builder);

const SETUPS: &[(&str, Setup)] = &[
    ("single-issuer,defer-taskrun,coop-taskrun,submit-all", |b| {
        b.setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_submit_all();
    }),
    ("coop-taskrun,submit-all", |b| {
        b.setup_coop_taskrun().setup_submit_all();
    }),
    ("none", |_| {}),
];

pub struct Ring {
    ring: IoUring,
    /// The set-up flags the kernel accepted (for the log and the status page).
    pub flags: &'static str,
    /// Signalled by the kernel when completion work is queued: the host runtime waits on
    /// it instead of on the ring.
    eventfd: OwnedFd,
}

impl Ring {
    /// A ring of `sq_entries` submissions and `cq_entries` completions (multishot
    /// receives post many completions per submission, so the CQ is the larger).
    pub fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        let mut last_err = None;
        for (flags, setup) in SETUPS {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq_entries);
            setup(&mut builder);
            match builder.build(sq_entries) {
                Ok(ring) => {
                    // SAFETY: eventfd(2) returns a new descriptor or -1.
                    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: `fd` is a fresh descriptor we own.
                    let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
                    ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
                    return Ok(Ring {
                        ring,
                        flags,
                        eventfd,
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

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Resets the eventfd after a wake-up (it is non-blocking: a read of zero is fine).
    pub fn clear_eventfd(&self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`.
        unsafe { libc::read(self.eventfd(), (&raw mut count).cast(), 8) };
    }

    /// Queues one submission; a full queue is submitted first.
    ///
    /// # Safety
    /// Everything the entry points at (buffers, iovecs, msghdr, sockaddr) must stay valid
    /// and unmoved until its completion arrives.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: passed on to the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            self.submit();
        }
    }

    /// Submits what is queued and runs the kernel's deferred completion work, without
    /// waiting: one system call per loop turn, whatever the number of operations.
    pub fn submit(&mut self) {
        let to_submit = self.ring.submission().len() as u32;
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
            match res {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the completion queue is full (overflowed into the kernel's
                // list); the caller drains it and the next turn submits again.
                _ => return,
            }
        }
    }

    /// Whether submissions are queued.
    pub fn has_submissions(&mut self) -> bool {
        !self.ring.submission().is_empty()
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
}
