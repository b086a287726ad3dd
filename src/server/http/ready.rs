//! Readiness of a worker's HTTP connections when its monoio runtime is on io_uring: one
//! epoll instance per worker (edge-triggered, each connection added once at accept), and
//! the runtime waits on the epoll descriptor itself: one poll operation per burst of ready
//! connections, where a read operation per connection and request (monoio's recv, or a
//! poll operation per wait) arms the socket's wait queue, completes as task work and is
//! re-armed for every request. This is nginx's loop (`epoll_wait`, then `recv` of the
//! ready sockets) inside the io_uring runtime; the answers were already plain syscalls.
//! A lone waiter is the exception (`Reactor::claim_solo`): with nobody else waiting there
//! is no burst to share, and a poll of its own socket wakes the worker one level sooner.
//!
//! A connection's slot says whether an edge came since its last recv; the task that reads
//! clears it before its recv, so an edge that lands after an EAGAIN is never lost. Slots
//! carry a generation: an event for a closed connection whose slot was reused (the close
//! is asynchronous under io_uring, and epoll forgets the socket only then) is dropped.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Events taken per epoll_wait; a longer burst takes more calls.
const EVENTS_PER_WAIT: usize = 256;

#[derive(Default)]
struct Slot {
    generation: u32,
    ready: bool,
    waker: Option<Waker>,
}

pub struct Reactor {
    epoll: OwnedFd,
    /// One connection may wait alone, outside the set, on a poll operation of its own
    /// socket (`claim_solo`): true while one does.
    solo: Cell<bool>,
    /// Connections in the set.
    registered: Cell<usize>,
    /// A duplicate of `epoll` that monoio polls (a std type as a holder, as for the own
    /// ring's descriptor: monoio's poll operation only needs a descriptor).
    waitable: monoio::net::UnixStream,
    slots: RefCell<Slots>,
}

#[derive(Default)]
struct Slots {
    all: Vec<Slot>,
    free: Vec<u32>,
}

/// A connection's place in the reactor; removing it is `Reactor::remove`.
pub struct Token {
    index: u32,
    generation: u32,
}

impl Reactor {
    pub fn new() -> io::Result<Rc<Reactor>> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: dup returns a fresh descriptor (or -1, checked) that monoio then owns.
        let dup = unsafe { libc::dup(epoll.as_raw_fd()) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is ours; the holder closes it.
        let holder = unsafe { std::os::unix::net::UnixStream::from_raw_fd(dup) };
        Ok(Rc::new(Reactor {
            epoll,
            solo: Cell::new(false),
            registered: Cell::new(0),
            waitable: monoio::net::UnixStream::from_std(holder)?,
            slots: RefCell::new(Slots::default()),
        }))
    }

    /// Watches `fd` for bytes (and the peer's close) from now on.
    pub fn add(&self, fd: RawFd) -> io::Result<Token> {
        let mut slots = self.slots.borrow_mut();
        let index = match slots.free.pop() {
            Some(i) => i,
            None => {
                slots.all.push(Slot::default());
                (slots.all.len() - 1) as u32
            }
        };
        let slot = &mut slots.all[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.ready = false;
        slot.waker = None;
        let token = Token {
            index,
            generation: slot.generation,
        };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: u64::from(token.generation) << 32 | u64::from(index),
        };
        // SAFETY: `event` is a live epoll_event; both descriptors are open.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) }
            < 0
        {
            let e = io::Error::last_os_error();
            slots.free.push(index);
            return Err(e);
        }
        self.registered.set(self.registered.get() + 1);
        Ok(token)
    }

    /// Frees `token`'s slot (the socket leaves the epoll set when it closes).
    pub fn remove(&self, token: &Token) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots.all[token.index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.waker = None;
        slots.free.push(token.index);
        self.registered.set(self.registered.get() - 1);
    }

    /// Whether a connection with nothing to read may wait alone on a poll operation of its
    /// own socket instead of joining the set: only while no other connection is waiting
    /// (none in the set, none alone). One connection (a lone keep-alive client) then sleeps
    /// on its socket directly: the client's bytes wake the worker through one poll, where
    /// the set adds a second level (the socket wakes the epoll instance, whose poll
    /// operation wakes the worker, which then asks the set with epoll_wait): one syscall
    /// and one wake-up callback fewer per request. With company the set is cheaper (one
    /// poll for a burst of connections, none re-armed per request). `release_solo` gives
    /// the place back.
    pub fn claim_solo(&self) -> bool {
        if self.solo.get() || self.registered.get() > 0 {
            return false;
        }
        self.solo.set(true);
        true
    }

    /// Whether the connection waiting alone should join the set now: another connection
    /// is in it (the company the set is for).
    pub fn solo_has_company(&self) -> bool {
        self.registered.get() > 0
    }

    /// The connection that waited alone (`claim_solo`) no longer does.
    pub fn release_solo(&self) {
        self.solo.set(false);
    }

    /// Takes the slot's edge: true when bytes (or the close) may have come since the last
    /// call. The caller reads next; an edge after this call sets it again.
    pub fn take_ready(&self, token: &Token) -> bool {
        let mut slots = self.slots.borrow_mut();
        std::mem::take(&mut slots.all[token.index as usize].ready)
    }

    /// Marks the slot ready again (the reader left bytes in the socket).
    pub fn set_ready(&self, token: &Token) {
        self.slots.borrow_mut().all[token.index as usize].ready = true;
    }

    /// Resolves at the slot's next edge.
    pub async fn ready(&self, token: &Token) {
        std::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots.all[token.index as usize];
            if slot.ready {
                Poll::Ready(())
            } else {
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        })
        .await
    }

    /// The worker's loop: wait for the epoll descriptor, take its events, wake the
    /// connections. Runs as long as the worker's runtime.
    pub async fn run(self: Rc<Self>) {
        let mut events: Vec<libc::epoll_event> =
            vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        loop {
            if let Err(e) = self.waitable.readable(false).await {
                tracing::error!("HTTP readiness: waiting on epoll: {e}");
                return;
            }
            loop {
                // SAFETY: `events` has room for EVENTS_PER_WAIT entries; timeout 0.
                let n = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        EVENTS_PER_WAIT as libc::c_int,
                        0,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    tracing::error!("HTTP readiness: epoll_wait: {e}");
                    return;
                }
                let mut slots = self.slots.borrow_mut();
                for ev in &events[..n as usize] {
                    let (index, generation) = (ev.u64 as u32, (ev.u64 >> 32) as u32);
                    let Some(slot) = slots.all.get_mut(index as usize) else {
                        continue;
                    };
                    if slot.generation != generation {
                        continue; // a closed connection's late event
                    }
                    slot.ready = true;
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                }
                if (n as usize) < EVENTS_PER_WAIT {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The place to wait alone goes to one connection at a time, and only while the set
    /// is empty; a connection joining the set is company for it, and the place frees up
    /// again once the set is empty and the lone one left.
    #[test]
    fn one_connection_waits_alone_only_while_no_other_waits() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime")
            .block_on(async {
                let reactor = Reactor::new().expect("reactor");
                let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
                assert!(reactor.claim_solo(), "an idle worker's first waiter");
                assert!(!reactor.claim_solo(), "a second lone waiter");
                assert!(!reactor.solo_has_company());
                let token = reactor.add(a.as_raw_fd()).expect("add");
                assert!(reactor.solo_has_company(), "a connection joined the set");
                reactor.release_solo();
                assert!(!reactor.claim_solo(), "the set is not empty");
                reactor.remove(&token);
                assert!(!reactor.solo_has_company());
                assert!(reactor.claim_solo(), "set empty, nobody alone");
            });
    }
}
