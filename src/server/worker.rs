//! One worker thread: builds its monoio runtime (io_uring, or epoll where io_uring is
//! missing or `--driver epoll`), then accepts on its listeners and runs a task per
//! session. Nothing here is shared with other workers except the store (read-only mmap
//! plus an index read lock per handshake) and the connection limiter.
//!
//! Shutdown: the server drops this worker's `stop` sender. Each accept loop waits on that
//! alongside `accept` (one future made once per loop, so an accept costs nothing extra) and
//! ends, closing its listener; the worker then waits until its open sessions have ended or
//! the grace time has passed, and returns, which drops whatever sessions are left.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use monoio::net::TcpListener;
use monoio::{FusionDriver, IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::config::{DriverChoice, ServeConfig};
use crate::server::limiter::{ConnectionLimiter, ConnectionPermit};
use crate::server::session::{self, Transport, WorkerCtx};
use crate::server::stats::CoreStats;
use crate::server::tcp::TcpTransport;
use crate::server::udp;
use crate::server::uring;
use crate::store::Store;
use crate::upstream::shard::{self, ShardCmd, Upstream};

pub struct WorkerSpec {
    pub index: usize,
    pub cfg: Arc<ServeConfig>,
    pub store: Arc<Store>,
    pub stats: Arc<CoreStats>,
    pub limiter: Arc<ConnectionLimiter>,
    pub listeners: Vec<std::net::TcpListener>,
    /// uTP sockets, one per listen address (empty with `--utp off`).
    pub udp: Vec<std::net::UdpSocket>,
    /// Public HTTP listeners, one per `--http` address (empty: off).
    pub http: Vec<std::net::TcpListener>,
    pub upstream: Arc<Upstream>,
    /// The process's page-in pool (cold records are read there, not on the worker).
    pub page_in: Arc<crate::server::pagein::PageIn>,
    /// This worker's shard of the miss path.
    pub shard_mailbox: flume::Receiver<ShardCmd>,
    /// Disconnected when the server shuts down.
    pub stop: flume::Receiver<()>,
}

type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<IoUringDriver>,
    monoio::time::TimeDriver<LegacyDriver>,
>;

/// io_uring queue depth: room for every in-flight accept, read, write and timer of a
/// busy core without the submission queue filling between polls.
const URING_ENTRIES: u32 = 4096;

fn build_runtime(choice: DriverChoice) -> anyhow::Result<(Runtime, &'static str)> {
    let rt: Runtime = match choice {
        DriverChoice::Auto => RuntimeBuilder::<FusionDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()?,
        DriverChoice::IoUring => RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()?
            .into(),
        DriverChoice::Epoll => RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()?
            .into(),
    };
    let name = match rt {
        monoio::FusionRuntime::Uring(_) => "io_uring",
        monoio::FusionRuntime::Legacy(_) => "epoll",
    };
    Ok((rt, name))
}

fn pin_to_cpu(index: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cpus, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                worker = index,
                "could not pin to a CPU: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

pub fn run(spec: WorkerSpec, ready: Sender<anyhow::Result<&'static str>>) {
    if spec.cfg.pin_cores {
        pin_to_cpu(spec.index);
    }
    let WorkerSpec {
        index,
        cfg,
        store,
        stats,
        limiter,
        listeners,
        udp,
        http,
        upstream,
        page_in,
        shard_mailbox,
        stop,
    } = spec;
    let (own_ring, listeners, runtime) = match tcp_path(&cfg, listeners, index) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (mut rt, runtime_name) = match build_runtime(runtime) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(
                e.context(format!("worker {index}: building the runtime"))
            ));
            return;
        }
    };
    // What serves TCP, for the ready line and the status page.
    let driver = if own_ring.is_some() {
        "io_uring"
    } else {
        runtime_name
    };
    tracing::debug!(
        worker = index,
        driver,
        runtime = runtime_name,
        "worker started"
    );
    rt.block_on(async move {
        let peer_id = crate::upstream::peer_id(index as u64);
        monoio::spawn(shard::run_shard(index, shard_mailbox, upstream.clone()));
        let ctx = Rc::new(WorkerCtx::new(
            store, cfg, stats, peer_id, upstream, page_in,
        ));
        let grace = ctx.cfg.shutdown_grace;
        let stats = ctx.stats.clone();
        let open = Rc::new(Cell::new(0usize));
        let uring_runtime = runtime_name == "io_uring";
        let accepts = match spawn_accept_loops(
            listeners,
            http,
            uring_runtime,
            &ctx,
            &limiter,
            &stop,
            &open,
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = ready.send(Err(e.context(format!("worker {index}"))));
                return;
            }
        };
        let endpoints =
            match start_utp(udp, index, &ctx, &limiter, &open, &stop, own_ring.is_some()) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
        let cut = Rc::new(crate::server::signal::StopSignal::default());
        let ring_task = own_ring.map(|parts| {
            monoio::spawn(uring::run(
                parts,
                endpoints,
                ctx.clone(),
                limiter.clone(),
                stop.clone(),
                open.clone(),
                cut.clone(),
            ))
        });
        monoio::spawn(heartbeat(stats.clone()));
        let _ = ready.send(Ok(driver));
        let _ = stop.recv_async().await;
        let left = drain(accepts, &open, grace).await;
        stats.sessions_cut_at_shutdown.add(left as u64);
        if let Some(task) = ring_task {
            // The ring's connections are closed and its operations drained before the
            // runtime (and the memory the kernel may still read) goes.
            cut.fire();
            task.await;
        }
        tracing::debug!(worker = index, sessions_cut = left, "worker stopped");
        // Returning drops the runtime and with it every session still open.
    });
}

/// Spawns an accept loop per listener left to monoio: the BitTorrent ones (`listeners`),
/// then the public HTTP ones (`http`), which share one `HttpShared`.
fn spawn_accept_loops(
    listeners: Vec<std::net::TcpListener>,
    http: Vec<std::net::TcpListener>,
    uring_runtime: bool,
    ctx: &Rc<WorkerCtx>,
    limiter: &Arc<ConnectionLimiter>,
    stop: &flume::Receiver<()>,
    open: &Rc<Cell<usize>>,
) -> anyhow::Result<Vec<monoio::task::JoinHandle<()>>> {
    let mut accepts = Vec::new();
    for l in listeners {
        let listener = TcpListener::from_std(l).context("listener")?;
        accepts.push(monoio::spawn(accept_loop(
            listener,
            ctx.clone(),
            limiter.clone(),
            stop.clone(),
            open.clone(),
        )));
    }
    if http.is_empty() {
        return Ok(accepts);
    }
    let shared = Rc::new(crate::server::http::HttpShared::new(
        &ctx.cfg,
        uring_runtime,
    ));
    for l in http {
        let listener = TcpListener::from_std(l).context("http listener")?;
        accepts.push(monoio::spawn(crate::server::http::accept_loop(
            listener,
            ctx.clone(),
            shared.clone(),
            limiter.clone(),
            stop.clone(),
            open.clone(),
        )));
    }
    Ok(accepts)
}

/// What serves TCP: the worker's own ring (`server/uring`), unless the driver is epoll or
/// the kernel lacks something the ring needs; then monoio's epoll driver, through
/// `session.rs`. Returns the ring's parts (if any), the listeners left for monoio, and
/// the runtime to build.
fn tcp_path(
    cfg: &ServeConfig,
    listeners: Vec<std::net::TcpListener>,
    index: usize,
) -> anyhow::Result<(
    Option<uring::Parts>,
    Vec<std::net::TcpListener>,
    DriverChoice,
)> {
    if cfg.driver == DriverChoice::Epoll {
        return Ok((None, listeners, DriverChoice::Epoll));
    }
    let per_core = cfg.connections_max.div_ceil(cfg.threads.max(1));
    match own_ring(&listeners, per_core) {
        Ok(parts) => {
            // The ring holds duplicates; these would keep the listening sockets (and
            // their backlogs) open after the ring's accepts stop.
            drop(listeners);
            tracing::debug!(
                worker = index,
                flags = parts.flags(),
                "own io_uring for TCP"
            );
            Ok((Some(parts), Vec::new(), DriverChoice::Auto))
        }
        Err(e) if cfg.driver == DriverChoice::Auto => {
            tracing::warn!(
                worker = index,
                "io_uring path unavailable ({e}); serving through epoll"
            );
            Ok((None, listeners, DriverChoice::Epoll))
        }
        Err(e) => Err(anyhow::anyhow!(
            "worker {index}: --driver io-uring: {e} (use --driver auto to fall back to epoll)"
        )),
    }
}

/// One uTP endpoint per socket, its loops spawned (its receive loop only without the
/// own ring, which receives its datagrams instead).
fn start_utp(
    sockets: Vec<std::net::UdpSocket>,
    index: usize,
    ctx: &Rc<WorkerCtx>,
    limiter: &Arc<ConnectionLimiter>,
    open: &Rc<Cell<usize>>,
    stop: &flume::Receiver<()>,
    on_ring: bool,
) -> anyhow::Result<Vec<Rc<udp::Endpoint>>> {
    let mut endpoints = Vec::new();
    for socket in sockets {
        let settings = udp::UtpSettings {
            utp: crate::utp::Config {
                payload_bytes_max: ctx.cfg.utp_payload_bytes,
                initial_window_packets: ctx.cfg.utp_initial_window_packets,
                ..crate::utp::Config::default()
            },
            half_open_per_core_max: ctx.cfg.utp_half_open_per_core_max,
            gso: ctx.cfg.utp_gso,
        };
        let ep = udp::Endpoint::new(socket, ctx.clone(), limiter.clone(), settings, open.clone())
            .map_err(|e| anyhow::anyhow!("worker {index}: uTP socket: {e}"))?;
        udp::spawn_endpoint(ep.clone(), stop.clone(), on_ring);
        endpoints.push(ep);
    }
    Ok(endpoints)
}

/// After the stop: the accept loops end (closing their listeners), then open sessions get
/// until `grace` to finish. Returns how many are still open.
async fn drain(
    accepts: Vec<monoio::task::JoinHandle<()>>,
    open: &Cell<usize>,
    grace: Duration,
) -> usize {
    for a in accepts {
        a.await;
    }
    let deadline = monoio::time::Instant::now() + grace;
    while open.get() > 0 && monoio::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    open.get()
}

/// The own ring's parts for `listeners` (duplicates of them), or why the kernel cannot.
fn own_ring(
    listeners: &[std::net::TcpListener],
    connections_per_core: usize,
) -> std::io::Result<uring::Parts> {
    let fds = listeners
        .iter()
        .map(|l| l.try_clone())
        .collect::<std::io::Result<Vec<_>>>()?;
    uring::Parts::new(fds, connections_per_core)
}

/// Proof of life for the systemd watchdog: a worker whose runtime is stuck stops ticking.
async fn heartbeat(stats: Arc<CoreStats>) {
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        stats.heartbeats.inc();
    }
}

/// Counts a session as open while it lives (also when its task is dropped at shutdown).
pub(crate) struct OpenSession(Rc<Cell<usize>>);

impl OpenSession {
    pub(crate) fn new(open: Rc<Cell<usize>>) -> Self {
        open.set(open.get() + 1);
        OpenSession(open)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Rc<WorkerCtx>,
    limiter: Arc<ConnectionLimiter>,
    stop: flume::Receiver<()>,
    open: Rc<Cell<usize>>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut stopped = pin!(stop.recv_async());
    // None: shutdown; the listener closes here.
    while let Some((stream, peer, permit)) = accept_admitted(
        &listener,
        async |l: &TcpListener| l.accept().await,
        &mut stopped,
        &mut backoff,
        &ctx,
        &limiter,
        "peer",
    )
    .await
    {
        ctx.stats.connections_accepted.inc();
        let _ = stream.set_nodelay(true);
        spawn_session(
            TcpTransport::new(stream),
            peer,
            ctx.clone(),
            OpenSession::new(open.clone()),
            permit,
        );
    }
}

/// First wait after a failed accept; it doubles up to `ACCEPT_BACKOFF_MAX`.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between accepts that fail.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The next connection that `accept` takes from `listener` and the connection caps admit
/// (refusals are counted and closed), or `None` once `stopped` resolves. Shared by the BitTorrent and the HTTP
/// listeners: one budget per IP over both.
///
/// When accept fails (EMFILE, ENFILE, ENOBUFS) it backs off instead of retrying at once,
/// which would spin the core while nothing frees up; `backoff` doubles from
/// `ACCEPT_BACKOFF_MIN` up to 1 s and is reset by the next success.
pub(crate) async fn accept_admitted<C, S: Future + Unpin>(
    listener: &TcpListener,
    accept: impl AsyncFn(&TcpListener) -> io::Result<(C, SocketAddr)>,
    stopped: &mut S,
    backoff: &mut Duration,
    ctx: &WorkerCtx,
    limiter: &Arc<ConnectionLimiter>,
    what: &str,
) -> Option<(C, SocketAddr, ConnectionPermit)> {
    loop {
        let accepted = monoio::select! {
            r = accept(listener) => r,
            _ = &mut *stopped => return None,
        };
        let (stream, peer) = match accepted {
            Ok(s) => {
                *backoff = ACCEPT_BACKOFF_MIN;
                s
            }
            Err(e) => {
                ctx.stats.accept_errors.inc();
                tracing::warn!("{what} accept failed: {e}; retrying in {backoff:?}");
                monoio::select! {
                    _ = monoio::time::sleep(*backoff) => {},
                    _ = &mut *stopped => return None,
                }
                *backoff = (*backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        match limiter.try_admit(peer.ip()) {
            Ok(permit) => return Some((stream, peer, permit)),
            Err(refusal) => refusal.counter(&ctx.stats).inc(),
        }
    }
}

/// Runs one session (either transport) as a task of its own. `guard` lives as long as the
/// session (TCP: its connection permit; uTP keeps the permit with the connection entry,
/// which outlives the session by its FIN exchange).
pub(crate) fn spawn_session<T: Transport + 'static, G: 'static>(
    transport: T,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    open: OpenSession,
    guard: G,
) {
    monoio::spawn(async move {
        let _open = open;
        // A bug in one session must not take the core down with it: catch the panic,
        // count it, and close only that connection (the transport drops with the future).
        // The end reason is counted by `session::run` (`session_ends_*`).
        let session = session::run(transport, peer, ctx.clone());
        // The panic is counted and logged by `contain_panic`.
        let _ = CatchUnwind(session, &ctx.stats).await;
        ctx.stats.connections_closed.inc();
        drop(guard);
    });
}

/// Polls a future inside `contain_panic`; a panic ends the future with `Err`.
struct CatchUnwind<'s, F>(F, &'s CoreStats);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the future; it is never moved out.
        let this = unsafe { self.get_unchecked_mut() };
        let stats = this.1;
        // SAFETY: as above.
        let inner = unsafe { Pin::new_unchecked(&mut this.0) };
        match crate::server::contain_panic(stats, "session", || inner.poll(cx)) {
            Some(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Some(Poll::Pending) => Poll::Pending,
            None => Poll::Ready(Err(())),
        }
    }
}
