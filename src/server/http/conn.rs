//! One HTTP connection's I/O. Reads go through monoio (io_uring or epoll) like the
//! BitTorrent sessions'; answers go out as non-blocking syscalls made right away, and only
//! a full socket buffer waits (for writability, through the runtime).
//!
//! Why not monoio's writev: a .torrent is a ~40 KiB info dict, and a writev from the store's
//! mapping makes the kernel copy all of it into socket buffers (28 % of the server's time in
//! the profile, see BENCHMARKS.md). `sendfile(2)` from the segment file attaches the
//! page-cache pages instead, as nginx does. monoio has no sendfile operation, so the socket
//! is made non-blocking (under io_uring monoio leaves it blocking; its recv operations do
//! not depend on the flag) and the syscalls are made here: the head with `MSG_MORE` (it
//! waits in the socket for the dict's pages, so head and dict leave in one segment train),
//! then sendfile of the dict, then the closing byte. A small answer fits the socket buffer
//! almost always, so the common path is two or three syscalls and no runtime operation, no
//! timer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::pin;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{CancelableAsyncReadRent, Canceller};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::limits;
use crate::server::session::ReadOutcome;

/// A byte range of a file, sent with sendfile(2).
pub struct FileRange<'a> {
    pub file: BorrowedFd<'a>,
    pub offset: u64,
    pub len: usize,
}

pub struct Conn {
    stream: TcpStream,
    fd: RawFd,
    /// One canceller for the connection's life (see `server::tcp`): only a cancelled read
    /// replaces it.
    canceller: Canceller,
}

impl Conn {
    pub fn new(stream: TcpStream) -> io::Result<Conn> {
        let fd = stream.as_raw_fd();
        // SAFETY: fcntl on a socket we own; F_SETFL with O_NONBLOCK only changes the
        // blocking mode (a fresh accepted socket has no other status flags to keep).
        if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Conn {
            stream,
            fd,
            canceller: Canceller::new(),
        })
    }

    /// Appends received bytes to `buf` (first making `spare_min` bytes of room), or ends
    /// at `deadline`. Bytes that race with the deadline are kept.
    pub async fn read(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
    ) -> ReadOutcome {
        let mut owned = std::mem::take(buf);
        if owned.capacity() - owned.len() < spare_min {
            owned.reserve(spare_min);
        }
        let len = owned.len();
        let spare = owned.capacity() - len;
        let handle = self.canceller.handle();
        let mut read = pin!(self.stream.cancelable_read(owned.slice_mut(len..), handle));
        let first = monoio::select! {
            r = &mut read => Some(r),
            _ = monoio::time::sleep_until(deadline) => None,
        };
        // A cancelled read still completes (with its bytes, if they won the race): wait
        // for it so that the buffer comes back.
        let (cancelled, (res, slice)) = match first {
            Some(r) => (false, r),
            None => {
                let canceller = std::mem::take(&mut self.canceller);
                self.canceller = canceller.cancel();
                (true, read.await)
            }
        };
        *buf = slice.into_inner();
        match res {
            Ok(0) => ReadOutcome::Eof,
            Ok(n) => ReadOutcome::Data { filled: n == spare },
            Err(_) if cancelled => ReadOutcome::Deadline,
            Err(e) => ReadOutcome::Failed(e),
        }
    }

    /// Sends `head`, then `body` (from its file, never through user space), then `tail`;
    /// fails if the socket stays full for `HTTP_WRITE_TIMEOUT_MS`.
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
                // More follows: keep the head in the socket until the dict joins it.
                let more = if body_left + tail.len() > 0 {
                    libc::MSG_MORE
                } else {
                    0
                };
                send(self.fd, &head[head_at..], more).map(|n| head_at += n)
            } else if body_left > 0 {
                let file = body.as_ref().expect("body_left > 0 implies a body").file;
                sendfile(self.fd, file, &mut body_off, body_left).map(|n| body_left -= n)
            } else if tail_at < tail.len() {
                send(self.fd, &tail[tail_at..], 0).map(|n| tail_at += n)
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
                    let writable = monoio::select! {
                        w = self.stream.writable(false) => Some(w),
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
}

/// One non-blocking send(2); `Ok(n)` with n > 0.
fn send(fd: RawFd, bytes: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `bytes` is a live slice; MSG_NOSIGNAL: a closed peer is an EPIPE, not a
    // signal.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n > 0 => Ok(n as usize),
        0 => Err(io::ErrorKind::WriteZero.into()),
        _ => Err(io::Error::last_os_error()),
    }
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
