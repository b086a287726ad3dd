//! The byte path: a receive completion lends its buffer to the pump (`server/pump.rs`),
//! and the pump's steps are carried out until it waits.

use super::*;

impl<'c> Core<'c> {
    pub(super) fn on_recv(&mut self, key: usize, res: i32, flags: u32) {
        let link = &mut self.links[key];
        if !cqueue::more(flags) {
            link.inflight -= 1;
            link.recv = Recv::Idle;
        }
        let handled = 'lent: {
            let bufs = &self.tcp_bufs;
            // Goes back to the ring when dropped, whatever happens below (a panic too).
            let lent = cqueue::buffer_select(flags).map(|bid| bufs.lend(bid, res.max(0) as usize));
            if link.closing {
                return;
            }
            let Some(mut lent) = lent.filter(|_| res > 0) else {
                break 'lent None;
            };
            // The burst goes on if the buffer filled or the socket holds more.
            let more_waits = res as usize == bufs.buf_bytes() || cqueue::sock_nonempty(flags);
            let out = lend_out(&mut link.out, &mut self.spare);
            let step =
                link.pump
                    .on_bytes(lent.bytes_mut(), more_waits, Instant::now(), &mut out.batch);
            drop(lent);
            Some(step)
        };
        if let Some(step) = handled {
            self.run_steps(key, step);
            return;
        }
        let link = &mut self.links[key];
        match res {
            0 => self.end(key, SessionEnd::PeerClosed),
            r if r > 0 => {
                // Bytes without a buffer: the kernel broke the contract.
                self.end(key, SessionEnd::IoError)
            }
            r if r == -libc::ENOBUFS => {
                // The pool ran dry this turn; `settle` posts the receive again, after
                // this turn's hand-backs.
                self.ctx.stats.uring_recv_no_buffers.inc();
            }
            r if r == -libc::ECANCELED && link.recv == Recv::Idle => {}
            r => {
                tracing::debug!(
                    peer = %link.pump.peer(),
                    "receive failed: {}",
                    io::Error::from_raw_os_error(-r)
                );
                self.end(key, SessionEnd::IoError);
            }
        }
    }

    /// Asks the pump what to do next, lending it the link's reply batch (only while it
    /// can take events: a batch in the kernel is never lent).
    pub(super) fn poll_link(&mut self, key: usize) -> Step {
        let link = &mut self.links[key];
        if link.closing || link.pump.state() != State::Ready {
            return Step::Wait;
        }
        let out = lend_out(&mut link.out, &mut self.spare);
        link.pump.poll(Instant::now(), &mut out.batch)
    }

    /// Carries out the pump's steps for a link until it waits: the ring's side of the
    /// contract that `session::drive` keeps for byte streams.
    pub(super) fn run_steps(&mut self, key: usize, mut step: Step) {
        let ctx = self.ctx;
        loop {
            let link = &mut self.links[key];
            match step {
                Step::Wait => {
                    if link.out.as_ref().is_some_and(|o| o.batch.is_empty()) {
                        // Nothing built: the batch goes back to the pool.
                        let out = link.out.take().expect("checked");
                        self.recycle(out);
                    }
                    return;
                }
                Step::Send => return self.send(key),
                Step::Close { end: _, flush } => {
                    ctx.stats.connections_closed.inc();
                    match link.out.take().filter(|_| flush) {
                        Some(out) => self.close_after(key, out),
                        None => self.close_quietly(key),
                    }
                    return;
                }
                Step::Fetch(info_hash) => {
                    let waiter = ctx.upstream.submit(info_hash, Hints::default());
                    self.mailbox.post_when_done(key, link.gen, async move {
                        Event::Fetch(waiter.recv_async().await.ok())
                    });
                }
                Step::Shard {
                    key: info_hash,
                    cmd,
                } => ctx.upstream.send(&info_hash, cmd),
                Step::Store(info) => {
                    let upstream = ctx.upstream.clone();
                    self.mailbox.post_when_done(key, link.gen, async move {
                        Event::Stored(upstream.store_off_core(info).await)
                    });
                }
                Step::PageIn(info_hash) => {
                    let page_in = ctx.page_in.clone();
                    self.mailbox.post_when_done(key, link.gen, async move {
                        Event::PagedIn(page_in.page_in(info_hash).await)
                    });
                }
            }
            step = self.poll_link(key);
        }
    }

    /// The transport ended the link (EOF, an error, a write deadline): counted once by
    /// the pump, then closed.
    pub(super) fn end(&mut self, key: usize, end: SessionEnd) {
        if self.links[key].pump.end(end) {
            self.ctx.stats.connections_closed.inc();
        }
        self.close_quietly(key);
    }
}

/// The batch a link builds its next reply in: the one it holds, else one from the pool.
// Boxed for the same reason as `Core::spare`.
#[allow(clippy::vec_box)]
pub(super) fn lend_out<'o>(
    held: &'o mut Option<Box<Sending>>,
    spare: &mut Vec<Box<Sending>>,
) -> &'o mut Sending {
    held.get_or_insert_with(|| spare.pop().unwrap_or_else(Sending::new))
}
