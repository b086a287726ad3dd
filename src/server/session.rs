//! The driver of one peer connection: moves bytes between a `Transport` (TCP in `tcp.rs`,
//! uTP in `udp.rs`) and the sans-IO protocol state machine (`conn.rs`), and carries out
//! its effects (fetch, store, shard messages). Read → conn → write; no protocol here.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::time::Instant;

use crate::limits;
use crate::server::conn::{Conn, Effect};
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

/// A reliable byte stream to one peer (TCP, or uTP over the worker's UDP socket).
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

/// Runs one connection to its end, and counts the end by reason.
pub async fn run<T: Transport>(transport: T, peer: SocketAddr, ctx: Rc<WorkerCtx>) -> SessionEnd {
    let end = drive(transport, peer, &ctx).await;
    end.counter(&ctx.stats).inc();
    tracing::debug!(%peer, ?end, "session ended");
    end
}

async fn drive<T: Transport>(mut io: T, peer: SocketAddr, ctx: &WorkerCtx) -> SessionEnd {
    let mut conn = Conn::new(ctx, peer, Instant::now());
    let mut rbuf: Vec<u8> = Vec::with_capacity(limits::READ_BUFFER_BYTES_INITIAL);
    let mut out = OutBatch::new();
    let mut waiter = None;
    loop {
        // Handle, act, write until the buffer yields nothing more (the handshake head is
        // handled alone, so our handshake goes out before the frames behind it).
        loop {
            let consumed = conn.on_bytes(&rbuf, Instant::now(), &mut out);
            rbuf.drain(..consumed);
            while let Some(effect) = conn.poll_effect() {
                match effect {
                    Effect::Fetch(key) => waiter = Some(ctx.upstream.submit(key, Hints::default())),
                    Effect::Shard(cmd) => ctx.upstream.send(conn.key(), cmd),
                    Effect::Store(info) => {
                        let stored = ctx.upstream.store_off_core(info).await;
                        conn.on_stored(stored, &mut out);
                    }
                    Effect::Close(end) => return end,
                }
            }
            if !conn.awaits_fetch() {
                waiter = None;
            }
            if !out.is_empty() {
                let (blocks, bytes) = (out.blocks(), out.payload_bytes());
                let deadline = conn.write_deadline(Instant::now());
                let (res, batch) = io.write_before(out, deadline).await;
                out = batch;
                if let Err(e) = res {
                    tracing::debug!(%peer, "write failed: {e}");
                    return SessionEnd::IoError;
                }
                conn.on_sent(Instant::now(), blocks, bytes);
            }
            if consumed == 0 {
                break;
            }
        }
        // Wait for bytes, the fetch, or the next deadline (hold, keep-alive, idle).
        let spare_min = conn.read_spare_min();
        match io
            .read_or_wake(&mut rbuf, conn.deadline(), spare_min, waiter.as_ref())
            .await
        {
            Wake::Read(ReadOutcome::Data { filled }) => conn.on_read(filled),
            Wake::Read(ReadOutcome::Eof) => return SessionEnd::PeerClosed,
            Wake::Read(ReadOutcome::Failed(e)) => {
                tracing::debug!(%peer, "read failed: {e}");
                return SessionEnd::IoError;
            }
            Wake::Read(ReadOutcome::Deadline) => conn.on_deadline(Instant::now(), &mut out),
            Wake::Fetch(outcome) => conn.on_fetch(outcome, &mut out),
        }
    }
}
