//! The io_uring adapter: each worker owns a ring for its TCP peers and feeds the pump
//! (`server/pump.rs`) from it (docs/io-uring.md).
//!
//! monoio's io_uring driver spends one submission per accept, per read into a buffer the
//! connection owns, per write and per close: the shape of epoll with more bookkeeping,
//! and a 4 KiB buffer plus a task per idle peer. Here the worker keeps its own ring and
//! uses what io_uring is for:
//! - accepts kept posted per listener, straight into direct (fixed) descriptors, each
//!   with its own address slot (the per-IP cap needs the peer's address at once; see the
//!   doc for why not multishot accept on this kernel);
//! - one multishot receive per connection into the core's provided buffer ring
//!   (`bufs.rs`): an idle peer holds no buffer and no task, only its `Link`;
//! - replies as one `sendmsg` (MSG_WAITALL: the kernel finishes short writes) whose
//!   iovecs point into the store's mmap, as before;
//! - close after a cancel of what is still posted, hard-linked, in the same submission;
//! - everything queued in a loop turn goes in with one `io_uring_enter`.
//!
//! Files, in the order a connection meets them: `ring.rs` (set-up, batched submission),
//! `probe.rs` (what the kernel must have), `bufs.rs` (the provided buffer rings),
//! `accept.rs`, `recv.rs` (bytes into the pump, its steps out), `send.rs` (replies and
//! closes), `link.rs` (what a connection holds), `datagrams.rs` (uTP). This file is the
//! loop: completions, the mailbox, timers.
//!
//! The ring lives inside the worker's monoio runtime as one task, so uTP, the miss path
//! and the timers stay where they are: monoio polls the ring's descriptor and
//! wakes the task. The protocol is the same pump that `session.rs` drives for byte
//! streams; only the I/O differs.

mod accept;
mod bufs;
mod datagrams;
mod link;
mod probe;
mod recv;
mod ring;
mod send;

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::server::signal::StopSignal;
use io_uring::{cqueue, opcode, squeue, types};
use monoio::time::Instant;
use slab::Slab;

use crate::server::conn::{SessionEnd, WorkerCtx};
use crate::server::deadlines::Deadlines;
use crate::server::limiter::ConnectionLimiter;
use crate::server::listener::socket_addr_of;
use crate::server::pump::{Pump, State, Step};
use crate::server::udp;
use crate::store::{RecordRef, StoreError};
use crate::upstream::shard::{FetchOutcome, Hints};
use accept::AcceptSlot;
use bufs::BufRing;
use datagrams::UdpRecv;
pub use link::LINK_BYTES_MAX;
use link::{Link, Recv, Sending};
pub use probe::CHECKS as PROBE_CHECKS;

/// Submission queue entries: a loop turn queues at most a few per event it handled;
/// a full queue is submitted early, so this bounds nothing but syscalls per turn.
const SQ_ENTRIES: u32 = 4096;

/// Completion queue entries: every connection's multishot receive may post at once.
const CQ_ENTRIES: u32 = 16 * SQ_ENTRIES;

/// Completions handled per batch before the ring is entered again.
const CQES_PER_BATCH: usize = 1024;

/// TCP receive buffers per core and their size. A buffer is lent per receive completion
/// and handed back as soon as its bytes are handled, so the pool bounds bytes in flight,
/// not connections: 1024 x 4 KiB = 4 MiB per core, populated at start. A connection
/// that finds it empty (ENOBUFS) is re-armed in the same turn, after the hand-backs.
const TCP_RECV_BUFFERS: u16 = 1024;
const RECV_BUFFER_BYTES: usize = crate::limits::READ_BUFFER_BYTES_INITIAL;
const TCP_RECV_GROUP: u16 = 0;

/// uTP datagram buffers per core, a group of their own: datagrams can be spoofed, so they
/// must never be able to take the buffers TCP peers receive into. A datagram's buffer
/// goes back as soon as the endpoint has demultiplexed it, so 512 x 4 KiB = 2 MiB per
/// core bounds the datagrams queued between two turns; ENOBUFS re-posts the receive in
/// the same turn, after the hand-backs.
const UDP_RECV_BUFFERS: u16 = 512;
const UDP_RECV_GROUP: u16 = 1;

/// Accepts kept posted per listener, each with its own peer-address slot: the most
/// connections one listener takes per loop turn.
const ACCEPTS_POSTED_PER_LISTENER: usize = 64;

/// Bytes a connection may hold unhandled while it cannot handle them (a reply in flight
/// or a store running): one frame of the largest size plus one buffer. Past it the
/// multishot receive is cancelled until the link catches up, so a peer that sends
/// without reading is held back by TCP, as on the monoio path.
/// The cancel takes effect at the next submission; until then a multishot receive may
/// drain the whole socket into the buffer ring in one turn (up to the ring's 4 MiB): the
/// pump closes a connection past `limits::UNHANDLED_BYTES_MAX` (four times this) as a flood.
const INPUT_HELD_BYTES_MAX: usize = crate::limits::FRAME_BYTES_MAX + RECV_BUFFER_BYTES;

/// Reply batches kept for reuse per core (each holds its allocations).
const SPARE_SENDS_MAX: usize = 1024;

/// `IORING_SEND_ZC_REPORT_USAGE` (sqe ioprio of a zero-copy send) and the bit of its
/// notification's result that says the kernel copied after all (loopback always does).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// How long the worker's cut waits for the kernel to hand back what it still holds
/// before the memory it may touch is leaked instead of freed.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(2);

/// What a completion is for: the low 32 bits name the slot (a link, or an accept slot),
/// the next 24 its generation, the top 8 the operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv,
    Send,
    CancelRecv,
    Cancel,
    Close,
    /// Close of a connection refused by the limiter (it never got a link).
    CloseRefused,
    /// Cancel of a listener's posted accepts (at stop).
    CancelAccept,
    /// The multishot recvmsg of a uTP socket (slot = its index in `Core::udp`).
    UdpRecv,
    /// Cancel of a uTP socket's receive (at the cut).
    CancelUdpRecv,
}

const GEN_MASK: u32 = 0xff_ffff;

fn tag(op: Op, gen: u32, slot: usize) -> u64 {
    (op as u64) << 56 | u64::from(gen & GEN_MASK) << 32 | slot as u64
}

fn untag(user_data: u64) -> (Option<Op>, u32, usize) {
    let op = match (user_data >> 56) as u8 {
        1 => Op::Accept,
        2 => Op::Recv,
        3 => Op::Send,
        4 => Op::CancelRecv,
        5 => Op::Cancel,
        6 => Op::Close,
        7 => Op::CloseRefused,
        8 => Op::CancelAccept,
        9 => Op::UdpRecv,
        10 => Op::CancelUdpRecv,
        _ => return (None, 0, 0),
    };
    (
        op.into(),
        (user_data >> 32) as u32 & GEN_MASK,
        user_data as u32 as usize,
    )
}

/// What a task off the ring (fetch waiter, store) hands back to a link.
enum Event {
    Fetch(Option<FetchOutcome>),
    Stored(Result<RecordRef, StoreError>),
    /// The outcome of `Step::PageIn`.
    PagedIn(Option<RecordRef>),
}

/// Events from the core's helper tasks, and the waker of the ring task.
#[derive(Default)]
struct Mailbox {
    queue: RefCell<Vec<(usize, u32, Event)>>,
    waker: Cell<Option<Waker>>,
}

impl Mailbox {
    /// Runs `work` (a fetch, a store, a page-in: work off the link's path) as a task on the
    /// core's runtime and posts its event for link `key` when it ends; a stale generation
    /// is dropped on delivery, as for every event.
    fn post_when_done(
        self: &Rc<Self>,
        key: usize,
        gen: u32,
        work: impl std::future::Future<Output = Event> + 'static,
    ) {
        let mailbox = self.clone();
        monoio::spawn(async move {
            let event = work.await;
            mailbox.post(key, gen, event);
        });
    }

    fn post(&self, key: usize, gen: u32, event: Event) {
        self.queue.borrow_mut().push((key, gen, event));
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.queue.borrow().is_empty() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// The parts that can fail, made before the worker says it is ready.
pub struct Parts {
    ring: ring::Ring,
    tcp_bufs: BufRing,
    udp_bufs: BufRing,
    listeners: Vec<std::net::TcpListener>,
    /// Direct descriptors, so the most connections the core can hold.
    table: u32,
    /// The kernel has zero-copy sendmsg (6.1+).
    send_zc: bool,
}

impl Parts {
    /// The ring, its buffer rings and its direct-descriptor table (room for
    /// `connections_max` of this core, within RLIMIT_NOFILE, which caps the table), after
    /// checking that the kernel has every operation the path uses (`probe.rs`). An error
    /// says what is missing; the worker then serves through the epoll driver.
    pub fn new(listeners: Vec<std::net::TcpListener>, connections_max: usize) -> io::Result<Parts> {
        let mut ring = ring::Ring::new(SQ_ENTRIES, CQ_ENTRIES)?;
        probe::forced("buffer-ring")?;
        let tcp_bufs = BufRing::new(&ring, TCP_RECV_GROUP, TCP_RECV_BUFFERS, RECV_BUFFER_BYTES)
            .map_err(|e| probe::missing("buffer-ring", e))?;
        let udp_bufs = BufRing::new(&ring, UDP_RECV_GROUP, UDP_RECV_BUFFERS, RECV_BUFFER_BYTES)
            .map_err(|e| probe::missing("buffer-ring", e))?;
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: writes the limit into `nofile`.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
        let table = (connections_max as u64)
            .min(nofile.rlim_cur)
            .clamp(64, 1 << 20) as u32;
        probe::forced("direct-descriptors")?;
        ring.submitter()
            .register_files_sparse(table)
            .map_err(|e| probe::missing("direct-descriptors", e))?;
        let features = probe::check(&mut ring, &tcp_bufs, TCP_RECV_GROUP)?;
        Ok(Parts {
            ring,
            tcp_bufs,
            udp_bufs,
            listeners,
            table,
            send_zc: features.send_zc,
        })
    }

    /// The set-up flags the kernel accepted.
    pub fn flags(&self) -> &'static str {
        self.ring.flags
    }
}

struct Core<'c> {
    // Dropped by hand (`Drop for Core`): the ring first, so the kernel lets go of the
    // buffer rings before they are unmapped, and none of them if the kernel may still
    // write into them at exit (`leak_on_drop`).
    ring: ManuallyDrop<ring::Ring>,
    tcp_bufs: ManuallyDrop<BufRing>,
    udp_bufs: ManuallyDrop<BufRing>,
    listeners: Vec<std::net::TcpListener>,
    ctx: &'c WorkerCtx,
    links: Slab<Link<'c>>,
    accepts: Box<[AcceptSlot]>,
    accepts_posted: usize,
    /// Direct descriptors in the table: links, plus refused connections whose close is
    /// on its way, plus posted accepts may never exceed it. A full table would make the
    /// kernel take a connection off the backlog and drop it; short of it, connections
    /// wait in the backlog as they do when epoll runs out of descriptors.
    table: usize,
    refused_closing: usize,
    /// Accepts are held back because the table is full (counted once per episode).
    table_full: bool,
    accepting: bool,
    /// After an accept error: when the idle accept slots are posted again, and the back-off.
    accept_resume_at: Option<u64>,
    accept_backoff: Duration,
    /// Links' deadlines (core clock, ns; keyed by slot and generation): the live entry
    /// of a link is the one at its `timer_at`.
    timers: Deadlines<u64, (u32, u32)>,
    mailbox: Rc<Mailbox>,
    // Boxed: a `Sending` in flight is read by the kernel through its msghdr, so it must
    // not move; the pool hands out the same boxes.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Sending>>,
    cqes: Vec<cqueue::Entry>,
    limiter: Arc<ConnectionLimiter>,
    open: Rc<Cell<usize>>,
    epoch: Instant,
    next_gen: u32,
    udp: Vec<UdpRecv>,
    /// The worker's grace time is over: nothing is posted again.
    cutting: bool,
    /// `--send-zc-min-bytes`: replies with this many payload bytes go zero-copy (0: none).
    zc_min_bytes: usize,
    /// The drain at exit timed out: the ring and the memory it may write stay allocated.
    leak_on_drop: bool,
}

/// Runs the core until the worker stops it (`stop`, then `cut`).
pub async fn run(
    parts: Parts,
    endpoints: Vec<Rc<udp::Endpoint>>,
    ctx: Rc<WorkerCtx>,
    limiter: Arc<ConnectionLimiter>,
    stop: flume::Receiver<()>,
    open: Rc<Cell<usize>>,
    cut: Rc<StopSignal>,
) {
    let mut core = Core::new(parts, endpoints, &ctx, limiter, open);
    core.serve(stop, cut).await;
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl<'c> Core<'c> {
    fn new(
        parts: Parts,
        endpoints: Vec<Rc<udp::Endpoint>>,
        ctx: &'c WorkerCtx,
        limiter: Arc<ConnectionLimiter>,
        open: Rc<Cell<usize>>,
    ) -> Core<'c> {
        let Parts {
            ring,
            tcp_bufs,
            udp_bufs,
            listeners,
            table,
            send_zc,
        } = parts;
        let mut zc_min_bytes = ctx.cfg.send_zc_min_bytes;
        if zc_min_bytes > 0 && !send_zc {
            tracing::warn!("--send-zc-min-bytes is set but this kernel has no zero-copy sendmsg (6.1+); sending as usual");
            zc_min_bytes = 0;
        }
        let accepts = listeners
            .iter()
            .enumerate()
            .flat_map(|(l, _)| std::iter::repeat_n(l, ACCEPTS_POSTED_PER_LISTENER))
            .map(|listener| AcceptSlot {
                listener,
                // SAFETY: all-zero is a valid sockaddr_storage.
                addr: unsafe { std::mem::zeroed() },
                addr_len: 0,
                posted: false,
            })
            .collect();
        Core {
            ring: ManuallyDrop::new(ring),
            tcp_bufs: ManuallyDrop::new(tcp_bufs),
            udp_bufs: ManuallyDrop::new(udp_bufs),
            listeners,
            ctx,
            // Reserved, not touched: pages become resident as links fill them, and the
            // slab never moves (a doubling copy would leave the old pages resident in the
            // allocator, twice the memory per connection).
            links: Slab::with_capacity(table as usize),
            accepts,
            accepts_posted: 0,
            table: table as usize,
            refused_closing: 0,
            table_full: false,
            accepting: true,
            accept_resume_at: None,
            accept_backoff: ACCEPT_BACKOFF_MIN,
            timers: Deadlines::with_capacity(2 * table as usize),
            mailbox: Rc::default(),
            spare: Vec::new(),
            cqes: Vec::with_capacity(CQES_PER_BATCH),
            limiter,
            open,
            epoch: Instant::now(),
            next_gen: 0,
            udp: endpoints.into_iter().map(UdpRecv::new).collect(),
            cutting: false,
            zc_min_bytes,
            leak_on_drop: false,
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn ns_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// The loop: a turn (submit, completions, mailbox, timers), then either another turn
    /// (after letting the runtime's other tasks run) or a wait for the next event.
    async fn serve(&mut self, stop: flume::Receiver<()>, cut: Rc<StopSignal>) {
        // The ring itself, waited on through monoio (a PollAdd on monoio's ring): readable
        // while completions wait. The std type is only a holder for a duplicate of the
        // descriptor, which monoio closes (the ring lives on in `self.ring`).
        // SAFETY: `dup` returns a fresh descriptor that nothing else owns.
        let ring_fd = monoio::net::UnixStream::from_std(unsafe {
            <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(
                self.ring.fd(),
            ))
        })
        .expect("registering the ring's descriptor with monoio");
        let mut stop = pin!(stop.recv_async());
        let mut stopping = false;
        self.post_accepts();
        for i in 0..self.udp.len() {
            self.post_udp(i);
        }
        let mut cut_at = None;
        loop {
            let mut progress = self.turn();
            if cut.is_fired() && cut_at.is_none() {
                cut_at = Some(std::time::Instant::now());
                self.cut_all();
                progress = true;
            }
            if stopping && self.accepts_posted == 0 && !self.listeners.is_empty() {
                // Every accept has come back: the listeners can close.
                self.listeners.clear();
            }
            if let Some(at) = cut_at {
                if self.drained() {
                    return;
                }
                if at.elapsed() > DRAIN_AT_EXIT {
                    self.leak_what_the_kernel_holds();
                    return;
                }
            }
            // Timers and accept retries queue work too: it goes in before any wait.
            self.ring.submit();
            if progress || self.ring.has_completions() {
                // Let the runtime's other tasks (uTP, the shard, fetch waiters) run
                // between busy turns.
                yield_now().await;
                continue;
            }
            // After the cut, wake in time to give up on what the kernel still holds.
            let next = match cut_at {
                Some(at) => self.next_wake().min(Instant::from_std(at + DRAIN_AT_EXIT)),
                None => self.next_wake(),
            };
            monoio::select! {
                _ = ring_fd.readable(true) => {}
                _ = self.mailbox.wait() => {}
                _ = monoio::time::sleep_until(next) => {}
                // The worker's cut wakes the loop wherever it waits.
                _ = cut.stopped(), if cut_at.is_none() => {}
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    self.stop_accepting();
                }
            }
        }
    }

    /// One turn: submits what is queued, handles completions, the mailbox and due timers.
    /// True if anything happened.
    fn turn(&mut self) -> bool {
        self.ring.submit();
        let mut progress = self.drain_completions();
        self.report_ring();
        progress |= self.drain_mailbox();
        self.fire_timers();
        if let Some(at) = self.accept_resume_at {
            if self.now_ns() >= at {
                self.accept_resume_at = None;
                self.post_accepts();
            }
        }
        progress
    }

    /// Nothing of the core's is left in the kernel.
    fn drained(&self) -> bool {
        self.links.is_empty() && self.accepts_posted == 0 && self.udp.iter().all(|u| !u.posted)
    }

    /// The drain at exit timed out: operations are still in the kernel, which may write
    /// into the buffer rings, the accept address slots, the uTP msghdrs and the links'
    /// batches until they end. All of it is leaked with the ring (its descriptor stays
    /// open, so the kernel does not tear it down under that memory); the process is on
    /// its way out.
    fn leak_what_the_kernel_holds(&mut self) {
        tracing::warn!(
            links = self.links.len(),
            accepts = self.accepts_posted,
            "io_uring: operations still in the kernel at exit; their memory is leaked"
        );
        std::mem::forget(std::mem::take(&mut self.links));
        std::mem::forget(std::mem::take(&mut self.accepts));
        std::mem::forget(std::mem::take(&mut self.udp));
        self.leak_on_drop = true;
    }

    /// Adds what the ring worked around since the last turn to the core's counters.
    fn report_ring(&mut self) {
        let counts = self.ring.take_counts();
        let stats = &self.ctx.stats;
        stats.uring_sq_backlogged.add(counts.backlogged);
        stats.uring_cqes_dropped.add(counts.cqes_dropped);
        stats.uring_enter_errors.add(counts.enter_errors);
    }

    /// When the loop must look again without an event: the next timer or accept retry.
    fn next_wake(&self) -> Instant {
        let mut at = self.timers.next().unwrap_or(u64::MAX);
        if let Some(t) = self.accept_resume_at {
            at = at.min(t);
        }
        // A day is "never" for a sleep.
        let at = at.min(self.now_ns() + 86_400_000_000_000);
        self.epoch + Duration::from_nanos(at)
    }

    // ---- completions ----

    /// Handles what the ring has completed; true if there was anything.
    fn drain_completions(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut cqes = std::mem::take(&mut self.cqes);
            self.ring.take_completions(&mut cqes, CQES_PER_BATCH);
            if cqes.is_empty() {
                self.cqes = cqes;
                return any;
            }
            any = true;
            for cqe in &cqes {
                self.on_completion(cqe);
            }
            self.cqes = cqes;
            self.end_udp_batches();
        }
    }

    fn on_completion(&mut self, cqe: &cqueue::Entry) {
        let (op, gen, key) = untag(cqe.user_data());
        let (res, flags) = (cqe.result(), cqe.flags());
        match op {
            Some(Op::Accept) => self.on_accept(key, res),
            Some(Op::CloseRefused) => {
                self.refused_closing -= 1;
                self.resume_accepts();
            }
            Some(Op::UdpRecv) => self.on_udp(key, res, flags),
            Some(Op::CancelAccept | Op::CancelUdpRecv) | None => {}
            Some(Op::Recv) => self.for_link(key, gen, |core| core.on_recv(key, res, flags)),
            Some(Op::Send) => self.for_link(key, gen, |core| core.on_send(key, res, flags)),
            Some(Op::CancelRecv | Op::Cancel | Op::Close) => {
                self.for_link(key, gen, |core| core.links[key].inflight -= 1)
            }
        }
    }

    /// Runs `f` for link `key` if it is still the link of generation `gen`, then settles
    /// it. A panic in `f` (a bug) closes that connection only, counted; the core goes on.
    fn for_link(&mut self, key: usize, gen: u32, f: impl FnOnce(&mut Self)) {
        if self.links.get(key).is_none_or(|l| l.gen != gen) {
            return;
        }
        let ctx = self.ctx;
        let stats = &ctx.stats;
        if crate::server::contain_panic(stats, "session", || f(self)).is_none() {
            if let Some(link) = self.links.get_mut(key) {
                if link.pump.end(SessionEnd::ProtocolError) {
                    stats.connections_closed.inc();
                }
                self.close_quietly(key);
            }
        }
        self.settle(key);
    }

    fn drain_mailbox(&mut self) -> bool {
        let events = std::mem::take(&mut *self.mailbox.queue.borrow_mut());
        let any = !events.is_empty();
        for (key, gen, event) in events {
            self.for_link(key, gen, |core| {
                let link = &mut core.links[key];
                match event {
                    Event::Fetch(outcome) => link.pump.on_fetch(outcome),
                    Event::Stored(stored) => link.pump.on_stored(stored),
                    Event::PagedIn(record) => link.pump.on_paged_in(record),
                }
                let step = core.poll_link(key);
                core.run_steps(key, step);
            });
        }
        any
    }

    fn fire_timers(&mut self) {
        let now = self.now_ns();
        loop {
            let links = &self.links;
            let due = self.timers.pop_due(now, |k| timer_of(links, k));
            let Some((key, gen)) = due else {
                return;
            };
            let key = key as usize;
            self.links[key].timer_at = u64::MAX;
            self.for_link(key, gen, |core| core.on_timer(key, now));
        }
    }

    fn on_timer(&mut self, key: usize, now_ns: u64) {
        let link = &mut self.links[key];
        if link.closing {
            return;
        }
        if let Some(sending) = &link.sending {
            if now_ns >= sending.deadline {
                tracing::debug!(peer = %link.pump.peer(), "write failed: write deadline");
                self.end(key, SessionEnd::IoError);
            }
            return;
        }
        if Instant::now() >= link.pump.deadline() {
            link.pump.on_deadline();
            let step = self.poll_link(key);
            self.run_steps(key, step);
        }
    }

    /// After any event on a link: free it once closed and quiet, or post its receive
    /// and arm its timer as its state asks.
    fn settle(&mut self, key: usize) {
        let Some(link) = self.links.get_mut(key) else {
            return;
        };
        if link.closing {
            if link.inflight == 0 {
                let link = self.links.remove(key);
                for out in [link.out, link.sending].into_iter().flatten() {
                    self.recycle(out);
                }
                self.open.set(self.open.get() - 1);
                self.resume_accepts();
            }
            return;
        }
        // Bytes wait while the pump cannot take them; past a frame's worth, stop
        // receiving until it catches up (TCP's window then holds the peer back).
        let held_too_much = link.pump.state() != State::Ready
            && link.pump.unhandled_bytes() >= INPUT_HELD_BYTES_MAX;
        match link.recv {
            Recv::Idle if !held_too_much => {
                let entry = opcode::RecvMulti::new(types::Fixed(link.fd), TCP_RECV_GROUP)
                    .build()
                    .user_data(tag(Op::Recv, link.gen, key));
                link.recv = Recv::Armed;
                link.inflight += 1;
                // SAFETY: buffers come from the registered buffer ring.
                unsafe { self.ring.push(&entry) };
            }
            Recv::Armed if held_too_much => {
                let entry = opcode::AsyncCancel::new(tag(Op::Recv, link.gen, key))
                    .build()
                    .user_data(tag(Op::CancelRecv, link.gen, key));
                link.recv = Recv::Cancelling;
                link.inflight += 1;
                // SAFETY: no pointers.
                unsafe { self.ring.push(&entry) };
            }
            _ => {}
        }
        let link = &self.links[key];
        let want = match &link.sending {
            Some(sending) => sending.deadline,
            None => self.ns_of(link.pump.deadline()),
        };
        let link = &mut self.links[key];
        if want < link.timer_at {
            link.timer_at = want;
            let gen = link.gen;
            let links = &self.links;
            self.timers
                .schedule(want, (key as u32, gen), links.len(), |k| timer_of(links, k));
        }
    }
}

/// The deadline the link `(key, gen)` holds now; None once it is gone (its timer entries
/// are stale).
fn timer_of(links: &Slab<Link<'_>>, (key, gen): (u32, u32)) -> Option<u64> {
    links
        .get(key as usize)
        .filter(|l| l.gen == gen)
        .map(|l| l.timer_at)
}

impl Drop for Core<'_> {
    fn drop(&mut self) {
        if self.leak_on_drop {
            // See `leak_what_the_kernel_holds`: the ring and the buffer rings stay.
            return;
        }
        // SAFETY: each is dropped once, here. The ring goes first, so the kernel lets go
        // of the buffer rings before they are unmapped.
        unsafe {
            ManuallyDrop::drop(&mut self.ring);
            ManuallyDrop::drop(&mut self.tcp_bufs);
            ManuallyDrop::drop(&mut self.udp_bufs);
        }
    }
}

/// Yields to every task already queued on the runtime, then resumes.
///
/// A task that wakes itself while it is being polled is put back at the FRONT of
/// monoio's run queue (its harness treats that as a `yield_now`), so the obvious
/// `wake_by_ref(); Pending` would run the ring again before anything else: while
/// completions kept coming, uTP sessions, their sends, fetch waiters and HTTP tasks
/// would wait for the ring to run dry. A wake from another task queues it at the back: a
/// one-shot task, itself queued behind everything ready now, wakes the ring.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            let waker = cx.waker().clone();
            monoio::spawn(async move { waker.wake() });
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    /// A busy ring yields to what is queued: a task woken before the ring's yield runs
    /// before the ring's next turn (with a self-wake it ran only after every turn).
    #[test]
    fn yield_now_lets_every_queued_task_run_first() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a monoio runtime");
        let order = rt.block_on(async {
            let log = Rc::new(std::cell::RefCell::new(Vec::new()));
            let other_ran = Rc::new(Cell::new(false));
            let (l, o) = (log.clone(), other_ran.clone());
            let ring = monoio::spawn(async move {
                for turn in 0..3 {
                    l.borrow_mut().push(format!("turn {turn}"));
                    super::yield_now().await;
                }
            });
            let l = log.clone();
            let other = monoio::spawn(async move {
                l.borrow_mut().push("other".to_string());
                o.set(true);
            });
            ring.await;
            other.await;
            assert!(other_ran.get());
            let order = log.borrow().clone();
            order
        });
        assert_eq!(order, ["turn 0", "other", "turn 1", "turn 2"]);
    }
}
