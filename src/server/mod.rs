//! The serving side: one thread per core, each with its own monoio runtime, its own
//! `SO_REUSEPORT` listener per address (the kernel spreads connections over cores), its
//! own sessions and counters. Connections stay on the core that accepted them; every core
//! reads any record straight from the store's shared mmap.
//!
//! - `listener`: sockets (SO_REUSEPORT, v6-only, backlog) bound before workers start, or
//!   inherited from systemd (socket activation)
//! - `worker`:   the runtime (io_uring or epoll) and the accept loop
//! - `pump`:     one peer connection above any transport, sans I/O: the MSE gate, the
//!   session (`conn`) and its effects; every driver below is a thin adapter around it
//! - `conn`:     the peer protocol (handshake, BEP 10, BEP 9) as a sans-IO state machine
//! - `mse`:      MSE/PE for the pump: first bytes, the responder handshake, RC4 out
//! - `session`:  the stream adapter: a `Transport` (monoio TCP on epoll) ↔ the pump
//! - `uring`:    the io_uring adapter: TCP on the worker's own ring ↔ the pump
//! - `tcp`:      the TCP `Transport` (cancelable reads, the writev loop)
//! - `udp`:      uTP on the same port: per-core datagram demultiplexing, timers, sends
//!   (docs/transports.md)
//! - `utp_session`: the uTP adapter: each connection's pump driven in place, no task
//! - `send`:     zero-copy vectored replies (headers + mmap slices)
//! - `http`:     the public read-only HTTP listener (`--http`): .torrent by info-hash
//! - `limiter`:  global and per-IP connection caps
//! - `stats`:    per-core counters, summed by readers
//! - `lifecycle`: signals (stop, reload), the systemd watchdog

pub mod conn;
pub mod deadlines;
pub mod http;
pub mod lifecycle;
pub mod limiter;
pub mod listener;
pub mod mse;
pub mod pagein;
pub mod pump;
pub mod send;
pub mod session;
pub(crate) mod signal;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod uring;
pub(crate) mod utp_session;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::ServeConfig;
use crate::store::Store;
use crate::upstream::shard::{ShardCmd, Upstream};
use stats::{CoreStats, StatsSnapshot};

/// Runs `f`; a panic in it (a bug while handling one connection or datagram) is counted
/// in `session_panics` and logged instead of taking the core down, and gives `None`. The
/// caller closes what the panic concerned; the worker goes on.
pub(crate) fn contain_panic<R>(
    stats: &stats::CoreStats,
    what: &str,
    f: impl FnOnce() -> R,
) -> Option<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(_) => {
            stats.session_panics.inc();
            tracing::error!("{what} handling panicked; closed, the worker goes on");
            None
        }
    }
}

/// A running server: its bound addresses and per-core counters.
pub struct Server {
    pub local_addrs: Vec<SocketAddr>,
    /// The public HTTP listener's addresses (empty: off).
    pub http_addrs: Vec<SocketAddr>,
    pub stats: Vec<Arc<CoreStats>>,
    pub drivers: Vec<&'static str>,
    /// Whether the listeners came from systemd (socket activation).
    pub socket_activated: bool,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Dropping a worker's sender is its shutdown signal: every receiver (each accept loop,
    /// the drain) wakes with `Disconnected` at once, without a message per receiver.
    stop: Vec<flume::Sender<()>>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions still open when the grace time ran out, closed by force.
    pub sessions_cut: u64,
    /// Workers that had not exited within grace + a margin (they are left to die with the
    /// process).
    pub workers_stuck: usize,
    pub elapsed: Duration,
}

impl Server {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot::sum(self.stats.iter().map(|s| &**s))
    }

    /// Blocks until every worker has exited (they run until `shutdown`).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Stop accepting on every core at once, let open sessions run for the configured grace
    /// time, close what is left, and wait for the workers to exit.
    pub fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let started = Instant::now();
        let cut_before = self.snapshot().sessions_cut_at_shutdown;
        self.stop.clear();
        // Workers exit by themselves at the deadline; the margin covers closing sockets.
        let give_up = started + grace + Duration::from_secs(5);
        let mut workers_stuck = 0;
        for t in std::mem::take(&mut self.threads) {
            while !t.is_finished() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                workers_stuck += 1;
            }
        }
        ShutdownReport {
            sessions_cut: self.snapshot().sessions_cut_at_shutdown - cut_before,
            workers_stuck,
            elapsed: started.elapsed(),
        }
    }

    /// `listen=ADDR[,ADDR] driver=NAME`: the body of the `ready` line.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self.local_addrs.iter().map(|a| a.to_string()).collect();
        let mut line = format!("listen={} driver={}", addrs.join(","), self.drivers[0]);
        if !self.http_addrs.is_empty() {
            let http: Vec<String> = self.http_addrs.iter().map(|a| a.to_string()).collect();
            line.push_str(&format!(" http={}", http.join(",")));
        }
        line
    }
}

/// Binds every listener (or takes the ones systemd passed: `inherited`, non-empty), starts
/// one worker per thread, and returns once all workers are accepting. The caller prints the
/// `ready` line (`Server::describe`) once the rest of the process is up too.
pub fn start(
    cfg: ServeConfig,
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    shard_mailboxes: Vec<flume::Receiver<ShardCmd>>,
    inherited: listener::Inherited,
) -> anyhow::Result<Server> {
    // `requests_queued_max` <= `limits::REQUESTS_QUEUED_MAX_LIMIT` (config refuses more),
    // and limits.rs checks at compile time that the worst-case batch fits one writev.
    debug_assert!(cfg.requests_queued_max <= crate::limits::REQUESTS_QUEUED_MAX_LIMIT);
    let cfg = Arc::new(cfg);
    let socket_activated = !inherited.peer.is_empty();
    let sockets = if socket_activated {
        listener::share_inherited(inherited.peer, cfg.threads, cfg.utp_buffers())
            .context("using the listening sockets passed by systemd")?
    } else {
        listener::bind_all(
            &cfg.listen,
            cfg.threads,
            cfg.listen_backlog,
            cfg.utp_buffers(),
        )
        .context("binding listeners")?
    };
    let local_addrs = sockets.local_addrs.clone();
    // --dht-socket serving: the DHT node sends through the serving UDP sockets (one
    // worker's per address), before any worker's uTP endpoint asks it for an inlet.
    if let (Some(dht), Some(udp)) = (upstream.dht(), sockets.udp_per_worker.first()) {
        dht.attach_serving(udp)
            .context("handing the serving UDP sockets to the DHT node")?;
    }
    // The HTTP sockets systemd passed (`magnetar-http.socket`, FileDescriptorName=http),
    // else our own SO_REUSEPORT ones for `--http`; no UDP beside them either way.
    let http_sockets = if inherited.http.is_empty() {
        listener::bind_all(&cfg.http, cfg.threads, cfg.listen_backlog, None)
            .context("binding the public HTTP listener (--http)")?
    } else {
        listener::share_inherited(inherited.http, cfg.threads, None)
            .context("using the HTTP listening sockets passed by systemd")?
    };
    let http_addrs = http_sockets.local_addrs.clone();
    let limiter = limiter::ConnectionLimiter::new(cfg.connections_max, cfg.connections_per_ip_max);

    let page_in = Arc::new(
        pagein::PageIn::start(
            store.clone(),
            cfg.page_in_threads,
            cfg.page_in_nice,
            cfg.page_in_per_core,
            pagein::PageIn::delay_from_env(),
        )
        .context("starting the page-in threads")?,
    );

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<&'static str>>();
    let mut threads = Vec::new();
    let mut stats = Vec::new();
    let mut stop = Vec::new();
    assert_eq!(
        shard_mailboxes.len(),
        sockets.per_worker.len(),
        "one shard per worker"
    );
    for (index, (((listeners, udp), http), shard_mailbox)) in sockets
        .per_worker
        .into_iter()
        .zip(sockets.udp_per_worker)
        .zip(http_sockets.per_worker)
        .zip(shard_mailboxes)
        .enumerate()
    {
        let core_stats = Arc::new(CoreStats::default());
        stats.push(core_stats.clone());
        let (stop_tx, stop_rx) = flume::bounded::<()>(1);
        stop.push(stop_tx);
        let spec = worker::WorkerSpec {
            index,
            cfg: cfg.clone(),
            store: store.clone(),
            stats: core_stats,
            limiter: limiter.clone(),
            listeners,
            udp,
            http,
            upstream: upstream.clone(),
            // Each core its own page-in permits (`--page-in-per-core`).
            page_in: Arc::new(page_in.for_core()),
            shard_mailbox,
            stop: stop_rx,
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
        socket_activated,
        records = store.stats().records,
        "serving"
    );
    if !http_addrs.is_empty() {
        let http: Vec<String> = http_addrs.iter().map(|a| a.to_string()).collect();
        tracing::info!(http = %http.join(","), "public HTTP listener");
    }
    Ok(Server {
        local_addrs,
        http_addrs,
        stats,
        drivers,
        socket_activated,
        threads,
        stop,
    })
}
