//! The TCP transport under a session: cancelable reads (bytes that race with a deadline
//! or a fetch outcome stay in the buffer) and the writev loop that resumes short writes.

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
        let mut owned = std::mem::take(buf);
        if owned.capacity() - owned.len() < spare_min {
            owned.reserve(spare_min);
        }
        let len = owned.len();
        let spare = owned.capacity() - len;
        let handle = self.canceller.handle();
        let mut read = pin!(self.stream.cancelable_read(owned.slice_mut(len..), handle));
        let fetch = async {
            match waiter {
                Some(w) => w.recv_async().await.ok(),
                None => std::future::pending().await,
            }
        };
        enum First<R> {
            Read(R),
            Deadline,
            Fetch(Option<FetchOutcome>),
        }
        let first = monoio::select! {
            r = &mut read => First::Read(r),
            _ = monoio::time::sleep_until(deadline) => First::Deadline,
            f = fetch => First::Fetch(f),
        };
        // A cancelled read still completes (with its bytes, if they won the race): wait
        // for it so that the buffer comes back.
        let (cancelled, (res, slice), fetched) = match first {
            First::Read(r) => (false, r, None),
            First::Deadline => {
                let canceller = std::mem::take(&mut self.canceller);
                self.canceller = canceller.cancel();
                (true, read.await, None)
            }
            First::Fetch(f) => {
                let canceller = std::mem::take(&mut self.canceller);
                self.canceller = canceller.cancel();
                (true, read.await, Some(f))
            }
        };
        *buf = slice.into_inner();
        let outcome = match res {
            Ok(0) => ReadOutcome::Eof,
            Ok(n) => ReadOutcome::Data { filled: n == spare },
            Err(_) if cancelled => ReadOutcome::Deadline,
            Err(e) => ReadOutcome::Failed(e),
        };
        match (fetched, outcome) {
            // Bytes (or EOF) that arrived with the fetch outcome stay in `buf` and are seen
            // on the next round; the outcome goes first.
            (Some(f), _) => Wake::Fetch(f),
            (None, o) => Wake::Read(o),
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
