//! Taking connections: accepts kept posted per listener into direct descriptors, the
//! per-IP and global caps, and the descriptor table that is never overfilled.

use super::*;

/// One posted accept: its listener and where the kernel writes the peer's address.
pub(super) struct AcceptSlot {
    pub(super) listener: usize,
    pub(super) addr: libc::sockaddr_storage,
    pub(super) addr_len: libc::socklen_t,
    pub(super) posted: bool,
}

impl Core<'_> {
    pub(super) fn post_accepts(&mut self) {
        if !self.accepting {
            return;
        }
        for i in 0..self.accepts.len() {
            self.post_accept(i);
        }
    }

    pub(super) fn post_accept(&mut self, i: usize) {
        if self.links.len() + self.refused_closing + self.accepts_posted >= self.table {
            if !self.table_full {
                self.table_full = true;
                self.ctx.stats.accept_errors.inc();
                tracing::warn!(
                    table = self.table,
                    "descriptor table full; accepts wait until connections close (raise LimitNOFILE / ulimit -n)"
                );
            }
            return;
        }
        let slot = &mut self.accepts[i];
        if slot.posted || !self.accepting || self.accept_resume_at.is_some() {
            return;
        }
        slot.addr_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let fd = self.listeners[slot.listener].as_raw_fd();
        let entry = opcode::Accept::new(
            types::Fd(fd),
            (&raw mut slot.addr).cast(),
            &raw mut slot.addr_len,
        )
        .file_index(Some(types::DestinationSlot::auto_target()))
        .build()
        .user_data(tag(Op::Accept, 0, i));
        slot.posted = true;
        self.accepts_posted += 1;
        // SAFETY: the slot's address fields live in `accepts`, a boxed slice that is
        // neither moved nor freed while the core runs (the ring is dropped first).
        unsafe { self.ring.push(&entry) };
    }

    /// A descriptor came free: post the accepts a full table held back.
    pub(super) fn resume_accepts(&mut self) {
        if self.table_full {
            self.table_full = false;
            self.post_accepts();
        }
    }

    pub(super) fn stop_accepting(&mut self) {
        self.accepting = false;
        self.accept_resume_at = None;
        for l in &self.listeners {
            let entry =
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(l.as_raw_fd())).all())
                    .build()
                    .user_data(tag(Op::CancelAccept, 0, 0));
            // SAFETY: no pointers.
            unsafe { self.ring.push(&entry) };
        }
    }

    pub(super) fn on_accept(&mut self, i: usize, res: i32) {
        let slot = &mut self.accepts[i];
        slot.posted = false;
        self.accepts_posted -= 1;
        let stats = &self.ctx.stats;
        if res < 0 {
            if res == -libc::ECANCELED {
                return;
            }
            stats.accept_errors.inc();
            let e = io::Error::from_raw_os_error(-res);
            tracing::warn!("accept failed: {e}; retrying in {:?}", self.accept_backoff);
            self.accept_resume_at = Some(self.now_ns() + self.accept_backoff.as_nanos() as u64);
            self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
            return;
        }
        self.accept_backoff = ACCEPT_BACKOFF_MIN;
        let fd = res as u32;
        let admitted = match socket_addr_of(&slot.addr) {
            Some(peer) => match self.limiter.try_admit(peer.ip()) {
                Ok(permit) => Some((peer, permit)),
                Err(refusal) => {
                    refusal.counter(stats).inc();
                    None
                }
            },
            None => {
                // An address family we do not serve: the kernel's doing, not a cap.
                stats.accept_errors.inc();
                None
            }
        };
        let (peer, permit) = match admitted {
            Some(a) => a,
            None => {
                self.refused_closing += 1;
                let entry = opcode::Close::new(types::Fixed(fd)).build().user_data(tag(
                    Op::CloseRefused,
                    0,
                    0,
                ));
                // SAFETY: no pointers.
                unsafe { self.ring.push(&entry) };
                self.post_accept(i);
                return;
            }
        };
        stats.connections_accepted.inc();
        self.next_gen = self.next_gen.wrapping_add(1) & GEN_MASK;
        let link = Link {
            pump: Pump::new(self.ctx, peer, Instant::now()),
            out: None,
            sending: None,
            _permit: permit,
            timer_at: u64::MAX,
            fd,
            gen: self.next_gen,
            inflight: 0,
            recv: Recv::Idle,
            closing: false,
        };
        let key = self.links.insert(link);
        self.open.set(self.open.get() + 1);
        // Posted again only now: the new connection counts against the table.
        self.post_accept(i);
        self.settle(key);
    }
}
