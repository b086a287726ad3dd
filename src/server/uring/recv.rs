//! The byte path: a receive completion, the MSE gate, the protocol (`Conn`) and its effects,
//! up to the next reply.

use super::*;

impl Core<'_> {
    pub(super) fn on_recv(&mut self, key: usize, res: i32, flags: u32) {
        let link = &mut self.links[key];
        if !cqueue::more(flags) {
            link.inflight -= 1;
            link.recv = Recv::Idle;
        }
        let bid = cqueue::buffer_select(flags);
        if link.closing {
            if let Some(bid) = bid {
                self.bufs.give_back(bid);
            }
            return;
        }
        if res > 0 {
            let Some(bid) = bid else {
                self.close(key, SessionEnd::IoError);
                return;
            };
            let len = res as usize;
            // What `Conn::on_read` is told before these bytes are handled: the burst goes
            // on if the buffer filled, the socket holds more, or the peer sent them while
            // our reply was still in flight (it did not wait for our answers).
            let burst =
                len == self.bufs.buf_bytes() || cqueue::sock_nonempty(flags) || link.blocked();
            link.news = Some(link.news.unwrap_or(false) || burst);
            // The buffer is ours until handed back; `drive` copies what it does not use.
            let data: &mut [u8] = self.bufs.get_mut(bid, len);
            // SAFETY: `data` points into the buffer mapping, not into `self`'s fields
            // that `drive` touches; the buffer is handed back only after `drive`.
            let data: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr(), len) };
            if let Gate::Rc4(cipher) = &mut link.gate {
                cipher.decrypt_in_place(data);
            }
            self.drive(key, data);
            self.bufs.give_back(bid);
            return;
        }
        match res {
            0 => self.close(key, SessionEnd::PeerClosed),
            r if r == -libc::ENOBUFS => {
                // The pool ran dry this turn; `settle` posts the receive again, after
                // this turn's hand-backs.
                self.ctx.stats.uring_recv_no_buffers.inc();
            }
            r if r == -libc::ECANCELED && link.recv == Recv::Idle => {}
            r => {
                tracing::debug!(
                    peer = %link.conn.peer(),
                    "receive failed: {}",
                    io::Error::from_raw_os_error(-r)
                );
                self.close(key, SessionEnd::IoError);
            }
        }
    }

    /// Moves a link as far as it can go: the MSE gate, then the protocol, effects, and
    /// the next reply. `fresh` are newly received bytes (already decrypted): handled in
    /// place when nothing is queued before them, the rest kept in `input`.
    pub(super) fn drive(&mut self, key: usize, mut fresh: &mut [u8]) {
        let ctx = self.ctx;
        let link = &mut self.links[key];
        if matches!(link.gate, Gate::Deciding) && link.input.is_empty() {
            // The common first read: a whole plaintext handshake prefix decides at once,
            // and the bytes are handled in place (no copy, no allocation per connection).
            if mse::classify(fresh) == Some(true) {
                link.gate = Gate::Plain;
            }
        }
        if !fresh.is_empty() && (link.blocked() || !link.input.is_empty() || !link.gate.is_open()) {
            if link.input.len() + fresh.len() > INPUT_HELD_BYTES_CLOSE {
                ctx.stats.protocol_errors.inc();
                tracing::debug!(peer = %link.conn.peer(), "closed: sends without reading");
                self.close(key, SessionEnd::ProtocolError);
                return;
            }
            link.input.extend_from_slice(fresh);
            fresh = &mut [];
        }
        if link.blocked() {
            return;
        }
        let mut out = take_out(&mut link.out, &mut self.spare);
        // Effects of what happened before (a deadline, a fetch outcome) come first.
        let mut idle = false;
        loop {
            match self.effects(key) {
                Flow::Closed => {
                    self.recycle(out);
                    return;
                }
                Flow::Storing => {
                    // Nothing is handled or sent until the store answers (`on_event`).
                    let link = &mut self.links[key];
                    link.input.extend_from_slice(fresh);
                    link.out = Some(out);
                    return;
                }
                Flow::Go => {}
            }
            let link = &mut self.links[key];
            if !out.batch.is_empty() {
                link.input.extend_from_slice(fresh);
                link.out = Some(out);
                self.send(key, true);
                return;
            }
            if idle {
                break;
            }
            // The gate: plaintext or MSE (on `input` only: `fresh` went there above).
            match &mut link.gate {
                Gate::Deciding => match mse::classify(&link.input) {
                    None => break,
                    Some(true) => link.gate = Gate::Plain,
                    Some(false) => match Handshake::start(ctx, link.conn.peer()) {
                        Ok(h) => link.gate = Gate::Mse(Box::new(h)),
                        Err(why) => {
                            tracing::debug!(peer = %link.conn.peer(), "read failed: {why}");
                            self.recycle(out);
                            self.close(key, SessionEnd::IoError);
                            return;
                        }
                    },
                },
                Gate::Mse(handshake) => {
                    let step = handshake.on_bytes(ctx, &link.input, out.batch.head());
                    match step {
                        Err(why) => {
                            // What we wrote (our key, say) goes out before the close, as
                            // the monoio path writes it before it fails the read.
                            tracing::debug!(peer = %link.conn.peer(), "read failed: {why}");
                            self.close_after(key, out, SessionEnd::IoError);
                            return;
                        }
                        Ok(HandshakeStep::NeedMore { consumed }) => {
                            link.input.drain(..consumed);
                            if out.batch.is_empty() {
                                break;
                            }
                        }
                        Ok(HandshakeStep::Done {
                            consumed,
                            mode,
                            initial_payload,
                        }) => {
                            let mut rest = link.input.split_off(consumed);
                            link.gate = match mode {
                                mse::Mode::Rc4(mut cipher) => {
                                    cipher.decrypt_in_place(&mut rest);
                                    Gate::Rc4(cipher)
                                }
                                _ => Gate::Plain,
                            };
                            link.input = initial_payload;
                            link.input.extend_from_slice(&rest);
                            if !out.batch.is_empty() {
                                // Our last handshake bytes, encrypted by the responder
                                // already: they go out as they are, before the stream.
                                link.out = Some(out);
                                self.send(key, false);
                                return;
                            }
                        }
                    }
                    // Our MSE bytes (if any) go out before anything else (next round).
                    continue;
                }
                Gate::Plain | Gate::Rc4(_) => {}
            }
            if !link.gate.is_open() {
                // Just decided on MSE: run the handshake.
                continue;
            }
            // The protocol: on whatever comes first, `input` or (if that is empty) `fresh`.
            let from_fresh = link.input.is_empty() && !fresh.is_empty();
            let buf: &[u8] = if from_fresh { fresh } else { &link.input };
            if let Some(burst) = link.news.take() {
                link.conn.on_read(burst);
            }
            let consumed = link.conn.on_bytes(buf, Instant::now(), &mut out.batch);
            if from_fresh {
                fresh = &mut std::mem::take(&mut fresh)[consumed..];
            } else {
                link.input.drain(..consumed);
            }
            if consumed == 0 {
                // Nothing more to handle; its effects (a close, say) still run, and
                // what it wrote goes out, at the top of the loop.
                idle = true;
            }
        }
        self.links[key].input.extend_from_slice(fresh);
        self.recycle(out);
    }

    /// Carries out what the protocol asked for since the last call.
    pub(super) fn effects(&mut self, key: usize) -> Flow {
        let ctx = self.ctx;
        let link = &mut self.links[key];
        while let Some(effect) = link.conn.poll_effect() {
            match effect {
                Effect::Fetch(info_hash) => {
                    let waiter = ctx.upstream.submit(info_hash, Hints::default());
                    let (mailbox, gen) = (self.mailbox.clone(), link.gen);
                    monoio::spawn(async move {
                        let outcome = waiter.recv_async().await.ok();
                        mailbox.post(key, gen, Event::Fetch(outcome));
                    });
                }
                Effect::Shard(cmd) => ctx.upstream.send(link.conn.key(), cmd),
                Effect::Store(info) => {
                    link.storing = true;
                    let (mailbox, gen, upstream) =
                        (self.mailbox.clone(), link.gen, ctx.upstream.clone());
                    monoio::spawn(async move {
                        let stored = upstream.store_off_core(info).await;
                        mailbox.post(key, gen, Event::Stored(stored));
                    });
                    return Flow::Storing;
                }
                Effect::Close(end) => {
                    self.close(key, end);
                    return Flow::Closed;
                }
            }
        }
        Flow::Go
    }
}
