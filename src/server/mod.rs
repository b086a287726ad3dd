//! The serving side: one thread per core, each with its own monoio runtime, its own
//! `SO_REUSEPORT` listener per address (the kernel spreads connections over cores), its
//! own sessions and counters. Connections stay on the core that accepted them; every core
//! reads any record straight from the store's shared mmap.
//!
//! - `listener`: sockets (SO_REUSEPORT, v6-only, backlog) bound before workers start
//! - `worker`:   the runtime (io_uring or epoll) and the accept loop
//! - `session`:  one peer connection, handshake to close
//! - `send`:     zero-copy vectored replies (headers + mmap slices)
//! - `limiter`:  global and per-IP connection caps
//! - `stats`:    per-core counters, summed by readers

pub mod limiter;
pub mod listener;
pub mod send;
pub mod session;
pub mod stats;
pub mod worker;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::ServeConfig;
use crate::store::Store;
use crate::upstream::shard::{ShardCmd, Upstream};
use stats::{CoreStats, StatsSnapshot};

/// A running server: its bound addresses and per-core counters.
pub struct Server {
    pub local_addrs: Vec<SocketAddr>,
    pub stats: Vec<Arc<CoreStats>>,
    pub drivers: Vec<&'static str>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot::sum(self.stats.iter().map(|s| &**s))
    }

    /// Blocks until every worker has exited (they run until the process ends).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds every listener, starts one worker per thread, and returns once all workers are
/// accepting. Prints `ready listen=ADDR[,ADDR] driver=NAME` on stdout as the readiness
/// signal tests and scripts wait on.
pub fn start(
    cfg: ServeConfig,
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    shard_mailboxes: Vec<flume::Receiver<ShardCmd>>,
) -> anyhow::Result<Server> {
    let cfg = Arc::new(cfg);
    assert!(
        cfg.requests_queued_max * 2 + 4 <= crate::limits::IOVECS_PER_WRITE_MAX,
        "requests_queued_max too large for one writev"
    );
    let sockets = listener::bind_all(&cfg.listen, cfg.threads, cfg.listen_backlog)
        .context("binding listeners")?;
    let local_addrs = sockets.local_addrs.clone();
    let limiter = limiter::ConnectionLimiter::new(cfg.connections_max, cfg.connections_per_ip_max);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<&'static str>>();
    let mut threads = Vec::new();
    let mut stats = Vec::new();
    assert_eq!(
        shard_mailboxes.len(),
        sockets.per_worker.len(),
        "one shard per worker"
    );
    for (index, (listeners, shard_mailbox)) in sockets
        .per_worker
        .into_iter()
        .zip(shard_mailboxes)
        .enumerate()
    {
        let core_stats = Arc::new(CoreStats::default());
        stats.push(core_stats.clone());
        let spec = worker::WorkerSpec {
            index,
            cfg: cfg.clone(),
            store: store.clone(),
            stats: core_stats,
            limiter: limiter.clone(),
            listeners,
            upstream: upstream.clone(),
            shard_mailbox,
        };
        let ready = ready_tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("magnetar-w{index}"))
                .spawn(move || worker::run(spec, ready))
                .context("spawning worker thread")?,
        );
    }
    drop(ready_tx);
    let mut drivers = Vec::new();
    for _ in 0..threads.len() {
        let driver = ready_rx
            .recv()
            .context("a worker exited before it was ready")??;
        drivers.push(driver);
    }
    let addrs: Vec<String> = local_addrs.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        listen = %addrs.join(","),
        workers = threads.len(),
        driver = drivers[0],
        records = store.stats().records,
        "serving"
    );
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "ready listen={} driver={}",
        addrs.join(","),
        drivers[0]
    );
    let _ = stdout.flush();
    Ok(Server {
        local_addrs,
        stats,
        drivers,
        threads,
    })
}
