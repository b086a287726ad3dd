//! Replies and ends: the zero-copy `sendmsg` (or SENDMSG_ZC) of a batch, its completion, and
//! the close of a link (cancel + close hard-linked).

use super::*;

impl Core<'_> {
    /// Sends the link's built batch (encrypted first under RC4 if `encrypt`).
    pub(super) fn send(&mut self, key: usize, encrypt: bool) {
        let ctx = self.ctx;
        let link = &mut self.links[key];
        let mut out = link.out.take().expect("a batch to send");
        out.blocks = out.batch.blocks();
        out.payload_bytes = out.batch.payload_bytes();
        if let (Gate::Rc4(cipher), true) = (&mut link.gate, encrypt) {
            let mut enc = self.spare.pop().unwrap_or_else(Sending::new);
            mse::encrypt_batch(ctx, cipher, &mut out.batch, &mut enc.batch);
            std::mem::swap(&mut out.batch, &mut enc.batch);
            self.recycle(enc);
        }
        out.deadline = self.ns_of(self.links[key].conn.write_deadline(Instant::now()));
        out.batch.seal();
        self.post_send(key, out);
    }

    /// Posts the batch's unsent iovecs.
    pub(super) fn post_send(&mut self, key: usize, out: Box<Sending>) {
        let entry = self.send_entry(key, out);
        // SAFETY: see `send_entry`.
        unsafe { self.ring.push(&entry) };
    }

    /// The send of the batch's unsent iovecs, counted in flight; the link holds the batch.
    /// The caller pushes the entry (alone, or at the head of a chain).
    fn send_entry(&mut self, key: usize, mut out: Box<Sending>) -> squeue::Entry {
        let link = &mut self.links[key];
        let unsent = out.batch.unsent_iovecs();
        out.msg.msg_iov = unsent.as_ptr() as *mut libc::iovec;
        out.msg.msg_iovlen = unsent.len();
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entry = if self.zc_min_bytes > 0 && out.payload_bytes >= self.zc_min_bytes {
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
        link.out = Some(out);
        link.send_in_flight = true;
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
                .out
                .as_mut()
                .and_then(|o| o.zc_result.take())
                .unwrap_or(0);
        } else if cqueue::more(flags) {
            // Zero-copy: the result now, and a notification once the kernel lets go of
            // the pages, which must stay until then (the batch holds the record).
            if let Some(out) = link.out.as_mut() {
                out.zc_result = Some(res);
            }
            return;
        }
        link.inflight -= 1;
        link.send_in_flight = false;
        if link.closing {
            return;
        }
        let mut out = link.out.take().expect("a send in flight has its batch");
        if res < 0 {
            tracing::debug!(
                peer = %link.conn.peer(),
                "write failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            self.recycle(out);
            self.close(key, SessionEnd::IoError);
            return;
        }
        out.batch.consume(res as usize);
        if !out.batch.is_sent() {
            // MSG_WAITALL finishes short writes in the kernel; this is the fallback.
            self.post_send(key, out);
            return;
        }
        link.conn
            .on_sent(Instant::now(), out.blocks, out.payload_bytes);
        let parked = link.parked.take();
        out.batch.clear();
        if let Some(parked) = parked {
            // The fetch outcome that waited for this reply, into the (cleared) batch.
            link.conn.on_fetch(*parked, &mut out.batch);
            link.out = Some(out);
        } else {
            self.recycle(out);
        }
        self.drive(key, &mut []);
    }

    pub(super) fn recycle(&mut self, mut out: Box<Sending>) {
        if self.spare.len() < SPARE_SENDS_MAX {
            out.batch.clear();
            self.spare.push(out);
        }
    }

    /// Ends a link: counted once; whatever is posted is cancelled and the descriptor
    /// closed in the same submission (the close hard-linked behind the cancel). The
    /// link is freed when the last completion that names it has arrived.
    pub(super) fn close(&mut self, key: usize, end: SessionEnd) {
        self.count_end(key, end);
        self.close_quietly(key);
    }

    fn count_end(&self, key: usize, end: SessionEnd) {
        let stats = &self.ctx.stats;
        end.counter(stats).inc();
        stats.connections_closed.inc();
        tracing::debug!(peer = %self.links[key].conn.peer(), ?end, "session ended");
    }

    /// Ends a link after one last reply: the send, the cancel of what else is posted and
    /// the close go in one submission, hard-linked in that order, so they run one after
    /// the other whatever each returns.
    pub(super) fn close_after(&mut self, key: usize, mut out: Box<Sending>, end: SessionEnd) {
        if out.batch.is_empty() {
            self.recycle(out);
            self.close(key, end);
            return;
        }
        out.batch.seal();
        let send = self.send_entry(key, out).flags(squeue::Flags::IO_HARDLINK);
        self.count_end(key, end);
        let [cancel, close] = self.cancel_and_close(key);
        // SAFETY: the send's memory as in `send_entry`; the others hold no pointers.
        unsafe { self.ring.push_chain(&[send, cancel, close]) };
    }

    /// Marks a link closing and builds the cancel of everything it has posted, hard-linked
    /// to the close of its descriptor (both counted in flight).
    fn cancel_and_close(&mut self, key: usize) -> [squeue::Entry; 2] {
        let link = &mut self.links[key];
        debug_assert!(!link.closing);
        link.closing = true;
        link.input = Vec::new();
        link.parked = None;
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

    /// The worker's grace time is over: every link still open is closed (counted by the
    /// worker as cut at shutdown).
    pub(super) fn cut_all(&mut self) {
        self.cutting = true;
        for (i, u) in self.udp.iter().enumerate() {
            if u.posted {
                let entry = opcode::AsyncCancel::new(tag(Op::UdpRecv, 0, i))
                    .build()
                    .user_data(tag(Op::CancelAccept, 0, 0));
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
