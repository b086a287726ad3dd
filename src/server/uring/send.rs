//! Replies and ends: the zero-copy `sendmsg` (or SENDMSG_ZC) of a batch, its completion, and
//! the close of a link (cancel + close hard-linked, behind a last reply if there is one).

use super::*;

impl Core<'_> {
    /// `Step::Send`: the batch the pump sealed goes to the kernel.
    pub(super) fn send(&mut self, key: usize) {
        let link = &mut self.links[key];
        let mut out = link.out.take().expect("the pump sealed a batch to send");
        let deadline = link.pump.write_deadline(Instant::now());
        out.deadline = self.ns_of(deadline);
        let entry = self.send_entry(key, out);
        // SAFETY: see `send_entry`.
        unsafe { self.ring.push(&entry) };
    }

    /// The send of the batch's unsent iovecs, counted in flight; the link holds the batch
    /// in `sending` until the completion. The caller pushes the entry (alone, or at the
    /// head of a chain).
    fn send_entry(&mut self, key: usize, mut out: Box<Sending>) -> squeue::Entry {
        let link = &mut self.links[key];
        debug_assert!(link.sending.is_none(), "one reply in the kernel at a time");
        let unsent = out.batch.unsent_iovecs();
        out.msg.msg_iov = unsent.as_ptr() as *mut libc::iovec;
        out.msg.msg_iovlen = unsent.len();
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entry = if self.zc_min_bytes > 0 && out.batch.payload_bytes() >= self.zc_min_bytes {
            self.ctx.stats.uring_send_zc.inc();
            opcode::SendMsgZc::new(types::Fixed(link.fd), &raw const out.msg)
                .flags(flags)
                .ioprio(SEND_ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::SendMsg::new(types::Fixed(link.fd), &raw const out.msg)
                .flags(flags)
                .build()
        }
        .user_data(tag(Op::Send, link.gen, key));
        // The msghdr and the iovecs it names live in the boxed `Sending` the link holds
        // until the completion (`on_send`; a closing link is freed only after its last
        // completion), and the iovecs point into the batch's head and its record's mmap,
        // which the batch keeps alive.
        link.sending = Some(out);
        link.inflight += 1;
        entry
    }

    pub(super) fn on_send(&mut self, key: usize, mut res: i32, flags: u32) {
        let link = &mut self.links[key];
        if cqueue::notif(flags) {
            // Zero-copy: the kernel is done with the pages; the reply's result came first.
            if res as u32 & NOTIF_USAGE_ZC_COPIED != 0 {
                self.ctx.stats.uring_send_zc_copied.inc();
            }
            res = link
                .sending
                .as_mut()
                .and_then(|o| o.zc_result.take())
                .unwrap_or(0);
        } else if cqueue::more(flags) {
            // Zero-copy: the result now, and a notification once the kernel lets go of
            // the pages, which must stay until then (the batch holds the record).
            if let Some(out) = link.sending.as_mut() {
                out.zc_result = Some(res);
            }
            return;
        }
        link.inflight -= 1;
        let mut out = link.sending.take().expect("a send in flight has its batch");
        if link.closing {
            self.recycle(out);
            return;
        }
        if res < 0 {
            tracing::debug!(
                peer = %link.pump.peer(),
                "write failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            self.recycle(out);
            self.end(key, SessionEnd::IoError);
            return;
        }
        out.batch.consume(res as usize);
        if !out.batch.is_sent() {
            // MSG_WAITALL finishes short writes in the kernel; this is the fallback.
            let entry = self.send_entry(key, out);
            // SAFETY: see `send_entry`.
            unsafe { self.ring.push(&entry) };
            return;
        }
        out.batch.clear();
        // The cleared batch is the next one the pump builds in.
        let link = &mut self.links[key];
        if link.out.is_none() {
            link.out = Some(out);
        } else {
            self.recycle(out);
        }
        self.links[key].pump.on_sent(Instant::now());
        let step = self.poll_link(key);
        self.run_steps(key, step);
    }

    pub(super) fn recycle(&mut self, mut out: Box<Sending>) {
        if self.spare.len() < SPARE_SENDS_MAX {
            out.batch.clear();
            out.zc_result = None;
            self.spare.push(out);
        }
    }

    /// Ends a link after one last reply (our MSE bytes before an MSE failure): the send,
    /// the cancel of what else is posted and the close go in one submission, hard-linked
    /// in that order, so they run one after the other whatever each returns.
    pub(super) fn close_after(&mut self, key: usize, out: Box<Sending>) {
        let send = self.send_entry(key, out).flags(squeue::Flags::IO_HARDLINK);
        let [cancel, close] = self.cancel_and_close(key);
        // SAFETY: the send's memory as in `send_entry`; the others hold no pointers.
        unsafe { self.ring.push_chain(&[send, cancel, close]) };
    }

    /// Ends a link (counted by the caller): whatever is posted is cancelled and the
    /// descriptor closed in the same submission, the close hard-linked behind the cancel.
    /// The link is freed when the last completion that names it has arrived.
    pub(super) fn close_quietly(&mut self, key: usize) {
        if self.links[key].closing {
            return;
        }
        // Always the pair: a cancel that finds nothing costs one completion, and the
        // chain is the same whatever the link has posted.
        let chain = self.cancel_and_close(key);
        // SAFETY: no pointers.
        unsafe { self.ring.push_chain(&chain) };
    }

    /// Marks a link closing and builds the cancel of everything it has posted, hard-linked
    /// to the close of its descriptor (both counted in flight).
    fn cancel_and_close(&mut self, key: usize) -> [squeue::Entry; 2] {
        let link = &mut self.links[key];
        debug_assert!(!link.closing);
        link.closing = true;
        link.inflight += 2;
        let cancel =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(link.fd)).all())
                .build()
                .flags(squeue::Flags::IO_HARDLINK)
                .user_data(tag(Op::Cancel, link.gen, key));
        let close = opcode::Close::new(types::Fixed(link.fd))
            .build()
            .user_data(tag(Op::Close, link.gen, key));
        [cancel, close]
    }

    /// The worker's grace time is over: every link still open is closed (counted by the
    /// worker as cut at shutdown), and the uTP receives are cancelled.
    pub(super) fn cut_all(&mut self) {
        self.cutting = true;
        for (i, u) in self.udp.iter().enumerate() {
            if u.posted {
                let entry = opcode::AsyncCancel::new(tag(Op::UdpRecv, 0, i))
                    .build()
                    .user_data(tag(Op::CancelUdpRecv, 0, i));
                // SAFETY: no pointers.
                unsafe { self.ring.push(&entry) };
            }
        }
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_quietly(key);
            self.settle(key);
        }
    }
}
