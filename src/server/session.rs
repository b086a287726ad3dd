//! The stream adapter: moves bytes between a `Transport` (TCP on monoio in `tcp.rs`, the
//! epoll driver's path) and the sans-IO pump (`pump.rs`: MSE gate, protocol, effects), and
//! carries out its steps (send, fetch, store, shard messages, close) by awaiting them.
//! Read → pump → step; no protocol here.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::time::Instant;

use crate::limits;
use crate::server::pump::{Pump, Step};
use crate::server::send::OutBatch;
use crate::upstream::shard::{FetchOutcome, Hints};

pub use crate::server::conn::{SessionEnd, WorkerCtx};

/// How a read ended.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Bytes arrived; `filled` = they filled all the spare room, so more may be queued
    /// (the peer's burst goes on).
    Data {
        filled: bool,
    },
    Eof,
    Deadline,
    Failed(io::Error),
}

/// What woke a waiting session.
#[derive(Debug)]
pub enum Wake {
    Read(ReadOutcome),
    /// The fetch this session waits for ended (`None`: its shard went away).
    Fetch(Option<FetchOutcome>),
}

/// A reliable byte stream to one peer (TCP; uTP drives the pump without a task instead,
/// `utp_session.rs`).
// Sessions run on one core's runtime and are never sent between threads, so the futures
// need no `Send` bound (which is what the lint warns about).
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// Appends received stream bytes to `buf` (first making at least `spare_min` bytes of
    /// room), unless `deadline` passes or `waiter` yields first. Bytes that race with the
    /// other events are kept in `buf`.
    async fn read_or_wake(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
        waiter: Option<&flume::Receiver<FetchOutcome>>,
    ) -> Wake;

    /// Sends all of `batch` (seal it first) or fails when `deadline` passes; returns a
    /// cleared batch for reuse.
    async fn write_before(
        &mut self,
        batch: OutBatch,
        deadline: Instant,
    ) -> (io::Result<()>, OutBatch);
}

/// Runs one connection to its end (the end is counted by the pump).
pub async fn run<T: Transport>(transport: T, peer: SocketAddr, ctx: Rc<WorkerCtx>) -> SessionEnd {
    drive(transport, peer, &ctx).await
}

/// The stream adapter of the pump: reads into its own buffer, hands the bytes to the
/// pump, and carries out its steps, awaiting each.
async fn drive<T: Transport>(mut io: T, peer: SocketAddr, ctx: &WorkerCtx) -> SessionEnd {
    let mut pump = Pump::new(ctx, peer, Instant::now());
    let mut rbuf: Vec<u8> = Vec::with_capacity(limits::READ_BUFFER_BYTES_INITIAL);
    let mut out = OutBatch::new();
    let mut waiter = None;
    let mut step = pump.poll(Instant::now(), &mut out);
    loop {
        match step {
            Step::Fetch(key) => waiter = Some(ctx.upstream.submit(key, Hints::default())),
            Step::Shard { key, cmd } => ctx.upstream.send(&key, cmd),
            Step::Store(info) => {
                let stored = ctx.upstream.store_off_core(info).await;
                pump.on_stored(stored);
            }
            Step::PageIn(key) => {
                // Awaited on this core's runtime: its other connections go on meanwhile.
                let record = ctx.page_in.page_in(key).await;
                pump.on_paged_in(record);
            }
            Step::Send => {
                let deadline = pump.write_deadline(Instant::now());
                let (res, batch) = io.write_before(std::mem::take(&mut out), deadline).await;
                out = batch;
                if let Err(e) = res {
                    tracing::debug!(%peer, "write failed: {e}");
                    return ended(&mut pump, SessionEnd::IoError);
                }
                pump.on_sent(Instant::now());
            }
            Step::Close { end, flush } => {
                if flush {
                    // Our last bytes tell the peer why; a failure changes nothing now.
                    let deadline = pump.write_deadline(Instant::now());
                    let _ = io.write_before(out, deadline).await;
                }
                return end;
            }
            Step::Wait => {
                if !pump.awaits_fetch() {
                    waiter = None;
                }
                let spare_min = pump.read_spare_min();
                let wake = io
                    .read_or_wake(&mut rbuf, pump.deadline(), spare_min, waiter.as_ref())
                    .await;
                // Bytes that raced with a fetch outcome or a deadline came with it.
                let outcome = match wake {
                    Wake::Read(outcome) => outcome,
                    Wake::Fetch(outcome) => {
                        pump.on_fetch(outcome);
                        ReadOutcome::Data { filled: false }
                    }
                };
                match outcome {
                    ReadOutcome::Data { filled } => {
                        step = pump.on_bytes(&mut rbuf, filled, Instant::now(), &mut out);
                        rbuf.clear();
                        continue;
                    }
                    ReadOutcome::Eof => return ended(&mut pump, SessionEnd::PeerClosed),
                    ReadOutcome::Failed(e) => {
                        tracing::debug!(%peer, "read failed: {e}");
                        return ended(&mut pump, SessionEnd::IoError);
                    }
                    ReadOutcome::Deadline => {
                        pump.on_deadline();
                        if !rbuf.is_empty() {
                            step = pump.on_bytes(&mut rbuf, false, Instant::now(), &mut out);
                            rbuf.clear();
                            continue;
                        }
                    }
                }
            }
        }
        step = pump.poll(Instant::now(), &mut out);
    }
}

fn ended(pump: &mut Pump<'_>, end: SessionEnd) -> SessionEnd {
    pump.end(end);
    end
}
