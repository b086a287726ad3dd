//! One HTTP connection's I/O, as nginx does it: a non-blocking recv(2) when bytes are
//! there (the first read of a connection tries at once: the listener's TCP_DEFER_ACCEPT
//! hands a connection over with its request), answers as non-blocking syscalls made right
//! away, and only an empty socket or a full socket buffer waits. Under io_uring a read
//! waits on the worker's epoll set (`ready`), or, when it is the worker's only waiting
//! connection, on a poll of its own socket (`Reactor::claim_solo`); under epoll, through
//! monoio (`server::tcp::read_or`), which registers the socket with its poller only then:
//! a connection served without waiting costs no epoll_ctl.
//!
//! Why not monoio's writev: a .torrent is a ~40 KiB info dict, and a writev from the store's
//! mapping makes the kernel copy all of it into socket buffers (28 % of the server's time in
//! the profile, see BENCHMARKS.md). `sendfile(2)` from the segment file attaches the
//! page-cache pages instead, as nginx does. monoio has no sendfile operation, so the socket
//! is made non-blocking (under io_uring monoio leaves it blocking; its recv operations do
//! not depend on the flag) and the syscalls are made here.
//!
//! One TCP segment per answer, no cork: an answer is one sendfile(2) of a whole cached
//! answer (`cache`), or a head sent with MSG_MORE ("more follows": the kernel holds it)
//! and the body by sendfile, whose last chunk pushes head and body out together. Only an
//! answer whose .torrent is not cached (too large, cache off) has a third part, the closing
//! `e` after the dict, which leaves as a segment of its own. A connection that closes
//! after its answer ends with `close_after_answer`: the FIN leaves with the answer at the
//! close(2) (or at a shutdown(2) first when the close would wait for the ring's next enter,
//! or bytes past the request would turn the close into a reset). A small answer fits the
//! socket buffer almost always, so the common path is one or two syscalls, no runtime
//! operation, no timer.

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use crate::server::listener::set_int_option;

use monoio::io::Canceller;
use monoio::net::TcpStream;
use monoio::time::Instant;

use super::ready::{Reactor, Token};
use crate::limits;
use crate::server::session::ReadOutcome;
use crate::server::tcp::{self, ReadOr};

/// A byte range of a file, sent with sendfile(2).
pub struct FileRange<'a> {
    pub file: BorrowedFd<'a>,
    pub offset: u64,
    pub len: usize,
}

pub struct Conn {
    /// The socket while no monoio type holds it: closed by close(2) in `Drop`.
    raw: Option<OwnedFd>,
    /// The socket once a wait needed the runtime (see `stream`): monoio closes it.
    stream: Option<TcpStream>,
    fd: RawFd,
    /// One canceller for the connection's life (see `server::tcp`): only a cancelled read
    /// replaces it.
    canceller: Canceller,
    /// Under io_uring: reads are our own recv(2) on the worker's epoll readiness
    /// (`ready`), not monoio's read operation (see `read_when_ready`).
    reactor: Option<Rc<Reactor>>,
    /// The connection's place in the epoll set, taken at its first empty read (a
    /// connection whose only request was there at accept never needs one).
    token: Option<Token>,
    /// Waiting for bytes alone, on a poll operation of its own socket, outside the set
    /// (`Reactor::claim_solo`): the worker's only waiting connection.
    solo: bool,
    /// No read yet: the first one tries the socket before waiting.
    fresh: bool,
    /// The worker's runtime is on io_uring (there monoio closes a socket with a ring
    /// operation, submitted at the ring's next enter; under epoll with close(2)).
    uring: bool,
}

impl Conn {
    /// `fd` must be a non-blocking socket (`accept_nonblocking`): sendfile has no per-call
    /// "don't wait" flag. It stays a plain descriptor until a read or a send has to wait:
    /// a connection whose request is there at accept and whose answer fits the socket
    /// buffer is served with syscalls alone, never registered with the runtime (under
    /// epoll monoio registers every socket it holds: an epoll_ctl ADD, and a DEL before
    /// the close).
    pub fn new(fd: OwnedFd, reactor: Option<&Rc<Reactor>>, uring: bool) -> Conn {
        Conn {
            fd: fd.as_raw_fd(),
            raw: Some(fd),
            stream: None,
            canceller: Canceller::new(),
            reactor: reactor.cloned(),
            token: None,
            solo: false,
            fresh: true,
            uring,
        }
    }

    /// The socket as monoio's, for a wait through the runtime: made at the first such
    /// wait (under epoll that registers it with the runtime's poller).
    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let Some(fd) = self.raw.take() else {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the socket was closed by a failed registration",
                ));
            };
            match TcpStream::from_std(std::net::TcpStream::from(fd)) {
                Ok(stream) => self.stream = Some(stream),
                Err(e) => {
                    // monoio dropped (closed) the socket: its number may be reused by the
                    // next accept, so no later syscall of this connection may name it.
                    self.fd = -1;
                    return Err(e);
                }
            }
        }
        Ok(self.stream.as_mut().expect("set above"))
    }

    /// Appends received bytes to `buf` (first making `spare_min` bytes of room), or ends
    /// at `deadline`. Bytes that race with the deadline are kept (`tcp::read_or`).
    pub async fn read(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
    ) -> ReadOutcome {
        if buf.capacity() - buf.len() < spare_min {
            buf.reserve(spare_min);
        }
        if self.reactor.is_some() {
            return self.read_when_ready(buf, deadline).await;
        }
        if std::mem::take(&mut self.fresh) && self.stream.is_none() {
            // Under epoll: the request is usually there at accept; only an empty socket
            // is registered with the runtime and waited for.
            if let Ok(outcome) = try_recv(self.fd, buf) {
                return outcome;
            }
        }
        if let Err(e) = self.stream() {
            return ReadOutcome::Failed(e);
        }
        // Borrowed again beside the canceller (`stream()` borrows all of `self`).
        let stream = self.stream.as_mut().expect("made above");
        let never = std::future::pending::<Infallible>();
        let read = tcp::read_or(stream, &mut self.canceller, buf, deadline, spare_min, never);
        match read.await {
            ReadOr::Read(o) => o,
            ReadOr::Other(never) => match never {},
        }
    }

    /// Sends `head` (held back by MSG_MORE when more follows), then `body` (from its file,
    /// never through user space), then `tail`; fails if the socket stays full for
    /// `HTTP_WRITE_TIMEOUT_MS`.
    pub async fn send(
        &mut self,
        head: &[u8],
        body: Option<FileRange<'_>>,
        tail: &[u8],
    ) -> io::Result<()> {
        let (mut head_at, mut tail_at) = (0, 0);
        let (mut body_off, mut body_left) = body.as_ref().map_or((0, 0), |b| (b.offset, b.len));
        // Set at the first full socket buffer: the common path needs no timer.
        let mut deadline = None;
        loop {
            let step = if head_at < head.len() {
                let more = body_left > 0 || !tail.is_empty();
                send(self.fd, &head[head_at..], more).map(|n| head_at += n)
            } else if body_left > 0 {
                let file = body.as_ref().expect("body_left > 0 implies a body").file;
                sendfile(self.fd, file, &mut body_off, body_left).map(|n| body_left -= n)
            } else if tail_at < tail.len() {
                send(self.fd, &tail[tail_at..], false).map(|n| tail_at += n)
            } else {
                return Ok(());
            };
            match step {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let deadline = *deadline.get_or_insert_with(|| {
                        Instant::now() + Duration::from_millis(limits::HTTP_WRITE_TIMEOUT_MS)
                    });
                    let stream = self.stream()?;
                    let writable = monoio::select! {
                        w = stream.writable(false) => Some(w),
                        _ = monoio::time::sleep_until(deadline) => None,
                    };
                    match writable {
                        Some(Ok(())) => {}
                        Some(Err(e)) => return Err(e),
                        None => {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "write deadline"))
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A read for io_uring: recv(2) here when the worker's epoll said bytes came (or the
    /// connection is fresh), else wait for that edge.
    ///
    /// Why not monoio's recv operation: its completion runs as task work the moment the
    /// client's bytes land, inside whatever syscall the worker is in (monoio's ring has no
    /// DEFER_TASKRUN), and locks the socket while the client's CPU is still in the receive
    /// path for it: 15-17 % of the server spun in `__pv_queued_spin_lock_slowpath` under
    /// `io_req_task_submit` at c=64 (perf, BENCHMARKS.md). And a poll operation per wait
    /// still arms and completes once per request; the epoll set is armed once per
    /// connection (`ready`). The first read of a connection tries the socket first: the
    /// request is usually there by the time we accept it (a client sends it right behind
    /// its handshake). Bytes that race with the deadline stay in the socket; the
    /// connection closes at a deadline anyway.
    async fn read_when_ready(&mut self, buf: &mut Vec<u8>, deadline: Instant) -> ReadOutcome {
        let reactor = self.reactor.clone().expect("called with a reactor");
        let mut try_now = std::mem::take(&mut self.fresh);
        loop {
            if self.solo && reactor.solo_has_company() {
                // Others wait in the set now: join them (bytes that came meanwhile are
                // reported at the add).
                reactor.release_solo();
                self.solo = false;
                match reactor.add(self.fd) {
                    Ok(t) => self.token = Some(t),
                    Err(e) => return ReadOutcome::Failed(e),
                }
            }
            if self.solo && !try_now {
                // A poll armed on a socket with bytes completes at once.
                let stream = match self.stream() {
                    Ok(s) => s,
                    Err(e) => return ReadOutcome::Failed(e),
                };
                monoio::select! {
                    r = stream.readable(false) => {
                        if let Err(e) = r {
                            return ReadOutcome::Failed(e);
                        }
                    },
                    _ = monoio::time::sleep_until(deadline) => return ReadOutcome::Deadline,
                }
                try_now = true;
                continue;
            }
            // Taken before the recv: an edge after an EAGAIN is kept for the wait. Not in
            // the set yet: try the socket.
            let ready = self.solo || self.token.as_ref().is_none_or(|t| reactor.take_ready(t));
            if !ready && !try_now {
                let token = self.token.as_ref().expect("not ready implies a token");
                monoio::select! {
                    _ = reactor.ready(token) => {},
                    _ = monoio::time::sleep_until(deadline) => return ReadOutcome::Deadline,
                }
                continue;
            }
            try_now = false;
            match try_recv(self.fd, buf) {
                Ok(outcome) => {
                    if let (ReadOutcome::Data { filled: true }, Some(t)) = (&outcome, &self.token) {
                        // More may be queued: the next read tries at once.
                        reactor.set_ready(t);
                    }
                    return outcome;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.solo => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.token.is_none() => {
                    if reactor.claim_solo() {
                        self.solo = true;
                        continue;
                    }
                    // Into the set now; bytes that came since are reported at once
                    // (epoll checks a socket's readiness when it is added).
                    match reactor.add(self.fd) {
                        Ok(t) => self.token = Some(t),
                        Err(e) => return ReadOutcome::Failed(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EINTR, the only other `Err` of `try_recv`.
                Err(_) => try_now = true,
            }
        }
    }

    /// Holds what is sent next until `finish`, so that the last answer and the FIN leave in
    /// one segment (TCP_CORK; without it the body's sendfile pushes the answer out and the
    /// FIN follows alone, one more segment and one more ACK per connection).
    pub fn cork(&self) -> io::Result<()> {
        set_int_option(self.fd, libc::IPPROTO_TCP, libc::TCP_CORK, 1)
    }

    /// Ends the connection after its last answer (sent corked): the answer and the FIN
    /// leave together. When the close is a close(2) right here (`Drop`) that close sends
    /// them, as nginx's close does: no shutdown(2). With `pipelined` (the client sent bytes
    /// after the request it asked to close with) the FIN is sent first by shutdown: a
    /// close with unread bytes in the socket resets the connection and drops what the cork
    /// still holds, the answer with it. When the close is monoio's ring operation it is
    /// sent first too: the ring's next enter can be later.
    pub fn close_after_answer(self, pipelined: bool) {
        let closes_now = !self.uring || self.stream.is_none();
        if pipelined || !closes_now {
            let _ = self.finish();
        }
    }

    /// Sends the FIN now: the client sees the end before the connection's close is even
    /// submitted.
    pub fn finish(&self) -> io::Result<()> {
        // SAFETY: shutdown of a socket we own; reading stays open (a lingering read may
        // follow).
        if unsafe { libc::shutdown(self.fd, libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One non-blocking send(2), with MSG_MORE when `more` follows; `Ok(n)` with n > 0.
fn send(fd: RawFd, bytes: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: `bytes` is a live slice; MSG_NOSIGNAL: a closed peer is an EPIPE, not a
    // signal.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) };
    match n {
        n if n > 0 => Ok(n as usize),
        0 => Err(io::ErrorKind::WriteZero.into()),
        _ => Err(io::Error::last_os_error()),
    }
}

impl Drop for Conn {
    /// A socket that no monoio type ever held (`raw`) is closed here by close(2): under
    /// io_uring monoio's close operation completes at once inside the ring's next enter,
    /// which then returns for that completion alone and enters again to wait (two
    /// io_uring_enter per `Connection: close` request where one wait is needed; strace,
    /// BENCHMARKS.md); under epoll monoio deregisters first (epoll_ctl DEL). Once monoio
    /// holds it (`stream`) monoio closes it: a dropped unfinished operation still holds
    /// the descriptor until it completes.
    fn drop(&mut self) {
        if let (Some(reactor), Some(token)) = (&self.reactor, &self.token) {
            reactor.remove(token);
        }
        if self.solo {
            if let Some(reactor) = &self.reactor {
                reactor.release_solo();
            }
        }
        // The field that is set closes the socket when dropped.
        drop(self.stream.take());
        drop(self.raw.take());
    }
}

/// One non-blocking recv(2) into `buf`'s spare room, as a read's outcome (`filled`: no room
/// left, more may be queued); `Err` only when the socket has nothing now (EAGAIN) or a
/// signal came (EINTR): the caller waits or tries again.
fn try_recv(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<ReadOutcome> {
    match recv_now(fd, buf) {
        Ok(0) => Ok(ReadOutcome::Eof),
        Ok(_) => Ok(ReadOutcome::Data {
            filled: buf.len() == buf.capacity(),
        }),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Err(e)
        }
        Err(e) => Ok(ReadOutcome::Failed(e)),
    }
}

/// One non-blocking recv(2) into `buf`'s spare capacity, which it extends by what came.
fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most `spare.len()` bytes into the spare capacity.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One non-blocking sendfile(2) of at most `len` bytes from `*offset`, which it advances.
fn sendfile(fd: RawFd, file: BorrowedFd<'_>, offset: &mut u64, len: usize) -> io::Result<usize> {
    let mut off = *offset as libc::off_t;
    // SAFETY: both descriptors are open (the socket is ours, `file` is borrowed); the
    // kernel writes only `off`.
    let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut off, len) };
    match n {
        n if n > 0 => {
            *offset = off as u64;
            Ok(n as usize)
        }
        // The file ends before the range: the segment was cut under us.
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "segment file shorter than the record",
        )),
        _ => Err(io::Error::last_os_error()),
    }
}
