//! A one-shot signal on one core: a flag and the wakers of the tasks waiting for it. The
//! worker's shutdown as its idle HTTP connections see it, and the cut that tells the own
//! ring to close what is left (a plain flag there was missed by a ring parked in its wait:
//! the worker then hung until the process gave up on it).
//!
//! Every keep-alive connection waits for its next request and for the shutdown at once.
//! Awaiting the server's flume stop channel there registered a hook (an `Arc`, the channel's
//! lock) per wait and removed it on drop by a scan of every hook waiting on that channel:
//! 4 % of the server's time under wrk at 64 connections, growing with the connection count.
//! Here a wait is a slab slot on this core: O(1) in and out, no lock, no allocation once the
//! slab has grown.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct StopSignal {
    stopped: Cell<bool>,
    waiting: RefCell<slab::Slab<Waker>>,
}

impl StopSignal {
    /// Ends every wait, now and later.
    pub fn fire(&self) {
        self.stopped.set(true);
        for waker in self.waiting.borrow_mut().drain() {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.stopped.get()
    }

    /// Resolves once `fire` has been called.
    pub fn stopped(&self) -> Stopped<'_> {
        Stopped {
            signal: self,
            slot: None,
        }
    }
}

pub struct Stopped<'a> {
    signal: &'a StopSignal,
    slot: Option<usize>,
}

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.stopped.get() {
            self.slot = None; // `fire` drained the slab
            return Poll::Ready(());
        }
        let mut waiting = self.signal.waiting.borrow_mut();
        match self.slot {
            Some(slot) => {
                let waker = &mut waiting[slot];
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                let slot = waiting.insert(cx.waker().clone());
                drop(waiting);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if !self.signal.stopped.get() {
                self.signal.waiting.borrow_mut().remove(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait dropped before the stop frees its slot; a wait pending at the stop is woken
    /// and resolves; a wait started after it resolves at once.
    #[test]
    fn waits_resolve_at_the_stop_and_free_their_slots() {
        let signal = StopSignal::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        {
            let mut early = std::pin::pin!(signal.stopped());
            assert!(early.as_mut().poll(&mut cx).is_pending());
            assert_eq!(signal.waiting.borrow().len(), 1);
        }
        assert_eq!(
            signal.waiting.borrow().len(),
            0,
            "dropped wait keeps its slot"
        );
        let mut pending = std::pin::pin!(signal.stopped());
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        signal.fire();
        assert!(pending.as_mut().poll(&mut cx).is_ready());
        let mut late = std::pin::pin!(signal.stopped());
        assert!(late.as_mut().poll(&mut cx).is_ready());
        assert_eq!(signal.waiting.borrow().len(), 0);
    }
}
