//! The TCP transport under a session: cancelable reads (bytes that race with a deadline
//! or a fetch outcome stay in the buffer) and the writev loop that resumes short writes.

use std::future::Future;
use std::io;
use std::pin::pin;

use monoio::buf::IoBufMut;
use monoio::io::{CancelableAsyncReadRent, CancelableAsyncWriteRent, Canceller};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::server::send::OutBatch;
use crate::server::session::{ReadOutcome, Transport, Wake};
use crate::upstream::shard::FetchOutcome;

/// One accepted TCP connection.
pub struct TcpTransport {
    stream: TcpStream,
    /// One canceller for the connection's whole life: reads and writes register with it
    /// and deregister when they complete, so no allocation per read or write; only a
    /// cancelled one (deadline, fetch outcome) is replaced.
    canceller: Canceller,
}

impl TcpTransport {
    pub fn new(stream: TcpStream) -> TcpTransport {
        TcpTransport {
            stream,
            canceller: Canceller::new(),
        }
    }
}

impl Transport for TcpTransport {
    async fn read_or_wake(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
        waiter: Option<&flume::Receiver<FetchOutcome>>,
    ) -> Wake {
        let fetch = async {
            match waiter {
                Some(w) => w.recv_async().await.ok(),
                None => std::future::pending().await,
            }
        };
        let woke = read_or(
            &mut self.stream,
            &mut self.canceller,
            buf,
            deadline,
            spare_min,
            fetch,
        )
        .await;
        match woke {
            ReadOr::Read(o) => Wake::Read(o),
            // Bytes (or EOF) that arrived with the fetch outcome stay in `buf` and are seen
            // on the next round; the outcome goes first.
            ReadOr::Other(f) => Wake::Fetch(f),
        }
    }

    async fn write_before(
        &mut self,
        mut batch: OutBatch,
        deadline: Instant,
    ) -> (io::Result<()>, OutBatch) {
        batch.seal();
        while !batch.is_sent() {
            let handle = self.canceller.handle();
            let mut write = pin!(self.stream.cancelable_writev(batch, handle));
            let first = monoio::select! {
                r = &mut write => Some(r),
                _ = monoio::time::sleep_until(deadline) => None,
            };
            let (res, b) = match first {
                Some(r) => r,
                None => {
                    let canceller = std::mem::take(&mut self.canceller);
                    self.canceller = canceller.cancel();
                    let (_, b) = write.await;
                    let timed_out = io::Error::new(io::ErrorKind::TimedOut, "write deadline");
                    (Err(timed_out), b)
                }
            };
            batch = b;
            match res {
                Ok(0) => {
                    batch.clear();
                    return (Err(io::ErrorKind::WriteZero.into()), batch);
                }
                // Short write: resume at the first unwritten byte.
                Ok(n) => batch.consume(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    batch.clear();
                    return (Err(e), batch);
                }
            }
        }
        batch.clear();
        (Ok(()), batch)
    }
}

/// What ended a `read_or`.
pub(crate) enum ReadOr<T> {
    /// The read ended (with bytes, EOF, an error) or the deadline passed first.
    Read(ReadOutcome),
    /// The other future finished first; bytes that raced with it are in the buffer.
    Other(T),
}

/// Appends received bytes to `buf` (first making `spare_min` bytes of room), unless
/// `deadline` passes or `other` finishes first: then the read is cancelled, and bytes
/// that won the race with the cancellation are kept in `buf` (nothing is lost). Shared by
/// the peer sessions (`other`: the fetch they wait for) and the HTTP connections (`other`:
/// never, `pending()`). `canceller` lives as long as the connection: a read
/// registers with it and deregisters when it completes (no allocation per read); only a
/// cancelled one replaces it.
pub(crate) async fn read_or<F: Future>(
    stream: &mut TcpStream,
    canceller: &mut Canceller,
    buf: &mut Vec<u8>,
    deadline: Instant,
    spare_min: usize,
    other: F,
) -> ReadOr<F::Output> {
    let mut owned = std::mem::take(buf);
    if owned.capacity() - owned.len() < spare_min {
        owned.reserve(spare_min);
    }
    let len = owned.len();
    let spare = owned.capacity() - len;
    let handle = canceller.handle();
    let mut read = pin!(stream.cancelable_read(owned.slice_mut(len..), handle));
    enum First<R, T> {
        Read(R),
        Deadline,
        Other(T),
    }
    let first = monoio::select! {
        r = &mut read => First::Read(r),
        _ = monoio::time::sleep_until(deadline) => First::Deadline,
        o = other => First::Other(o),
    };
    // A cancelled read still completes (with its bytes, if they won the race): wait for it
    // so that the buffer comes back.
    let (cancelled, (res, slice), other) = match first {
        First::Read(r) => (false, r, None),
        First::Deadline => {
            *canceller = std::mem::take(canceller).cancel();
            (true, read.await, None)
        }
        First::Other(o) => {
            *canceller = std::mem::take(canceller).cancel();
            (true, read.await, Some(o))
        }
    };
    *buf = slice.into_inner();
    if let Some(o) = other {
        return ReadOr::Other(o);
    }
    ReadOr::Read(match res {
        Ok(0) => ReadOutcome::Eof,
        Ok(n) => ReadOutcome::Data { filled: n == spare },
        Err(_) if cancelled => ReadOutcome::Deadline,
        Err(e) => ReadOutcome::Failed(e),
    })
}
