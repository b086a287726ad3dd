//! The load: one monoio runtime per thread (io_uring, or epoll), each running its share of
//! the simulated peers as tasks; per-thread counters (read live by the main thread) and
//! per-thread histograms (merged at the end). Each connection is TCP or uTP (`Transport`);
//! only `Stream` knows which: the conversation and the fetch loop are the same for both.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use magnetar::upstream::utp_stream::UtpStream;

use crate::peer::{Conversation, Event, FetchError};
use crate::synth::Rng;
use crate::targets::{Pick, Picker};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Connect, fetch every piece, close; repeat.
    Churn,
    /// Connect once, then fetch every piece again and again on the same connection.
    Keepalive,
    /// Connect, handshake, then hold the connection open doing nothing (memory per
    /// connection); `--ready-file` is written once all are established.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    /// uTP (BEP 29): one UDP socket per connection, connected to the target.
    Utp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Utp => "utp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub targets: Vec<SocketAddr>,
    pub mode: Mode,
    pub transport: Transport,
    pub threads: usize,
    pub connections: usize,
    pub duration: Duration,
    pub fetches: Option<u64>,
    /// Fetches per second over all threads (open loop), or closed loop.
    pub rate: Option<f64>,
    pub pipeline: usize,
    pub verify: bool,
    pub timeout: Duration,
    /// Local addresses to bind (round robin; TCP only); empty: let the kernel choose.
    pub sources: Vec<IpAddr>,
    pub driver: Driver,
    /// The io_uring ring without COOP_TASKRUN (see `run_thread`).
    pub uring_interrupting: bool,
    pub pin: bool,
    pub seed: u64,
    pub ready_file: Option<std::path::PathBuf>,
}

/// Counters one thread writes and the main thread reads every second.
#[derive(Default)]
pub struct Live {
    pub fetches: AtomicU64,
    pub blocks: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub misses: AtomicU64,
    pub open: AtomicI64,
    pub established: AtomicU64,
}

impl Live {
    pub fn add(&self, other: &Live) -> [u64; 6] {
        [
            self.fetches.load(Relaxed) + other.fetches.load(Relaxed),
            self.blocks.load(Relaxed) + other.blocks.load(Relaxed),
            self.bytes.load(Relaxed) + other.bytes.load(Relaxed),
            self.errors.load(Relaxed) + other.errors.load(Relaxed),
            self.misses.load(Relaxed) + other.misses.load(Relaxed),
            (self.open.load(Relaxed) + other.open.load(Relaxed)).max(0) as u64,
        ]
    }
}

/// Latencies in microseconds.
pub struct Hists {
    pub connect: Histogram<u64>,
    pub first_block: Histogram<u64>,
    pub fetch: Histogram<u64>,
}

impl Hists {
    pub fn new() -> Hists {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Hists {
            connect: h(),
            first_block: h(),
            fetch: h(),
        }
    }

    pub fn merge(&mut self, other: &Hists) {
        self.connect.add(&other.connect).expect("same bounds");
        self.first_block
            .add(&other.first_block)
            .expect("same bounds");
        self.fetch.add(&other.fetch).expect("same bounds");
    }
}

impl Default for Hists {
    fn default() -> Self {
        Hists::new()
    }
}

/// What one thread measured.
pub struct ThreadResult {
    pub hists: Hists,
    pub errors: [u64; FetchError::ALL.len()],
    pub driver: &'static str,
}

/// Shared by all threads of a run.
pub struct Shared {
    pub cfg: RunConfig,
    pub picker: Picker,
    pub start: Instant,
    pub deadline: Instant,
    /// Fetches started, against `cfg.fetches`.
    pub started: AtomicU64,
    /// Idle mode: connections established so far, against `cfg.connections`.
    pub established: AtomicU64,
    pub stop: AtomicBool,
}

impl Shared {
    fn take_fetch(&self) -> bool {
        if self.stop.load(Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        match self.cfg.fetches {
            Some(max) => self.started.fetch_add(1, Relaxed) < max,
            None => true,
        }
    }
}

struct Task {
    shared: Arc<Shared>,
    live: Arc<Live>,
    local: Rc<RefCell<ThreadResult>>,
    rng: Rng,
    /// Index of this connection over all threads: picks its target and source address.
    slot: usize,
    /// Open loop: seconds between this slot's fetch starts.
    interval: Option<Duration>,
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

impl Task {
    fn target(&self) -> SocketAddr {
        let t = &self.shared.cfg.targets;
        t[self.slot % t.len()]
    }

    fn source(&self) -> Option<IpAddr> {
        let s = &self.shared.cfg.sources;
        (!s.is_empty()).then(|| s[(self.slot / self.shared.cfg.targets.len()) % s.len()])
    }

    fn error(&self, e: FetchError, pick: Option<Pick>) {
        if pick.is_some_and(|p| p.miss) && e != FetchError::Connect {
            // A miss answered by a close or a handshake without metadata: expected.
            self.live.misses.fetch_add(1, Relaxed);
            return;
        }
        self.live.errors.fetch_add(1, Relaxed);
        self.local.borrow_mut().errors[e as usize] += 1;
    }

    fn peer_id(&mut self) -> [u8; 20] {
        let mut id = *b"-ML0001-000000000000";
        self.rng.fill(&mut id[8..]);
        id
    }

    async fn connect(&self) -> Result<Stream, FetchError> {
        let started = Instant::now();
        let stream = match self.shared.cfg.transport {
            Transport::Tcp => {
                let s = connect_from(self.target(), self.source())
                    .await
                    .map_err(|_| FetchError::Connect)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Transport::Utp => {
                // The caller's timeout bounds the handshake; this deadline only backs it up.
                let deadline = monoio::time::Instant::now() + self.shared.cfg.timeout;
                let s = UtpStream::connect_from(self.target(), self.source(), deadline)
                    .await
                    .map_err(|_| FetchError::Connect)?;
                Stream::Utp(Box::new(s))
            }
        };
        self.local
            .borrow_mut()
            .hists
            .connect
            .saturating_record(micros(started.elapsed()));
        Ok(stream)
    }

    async fn run(mut self) {
        let mut next_start = Instant::now();
        loop {
            if self.interval.is_some() {
                // Open loop: latency counts from the scheduled start, so a slow server
                // cannot hide its queueing (no coordinated omission).
                let now = Instant::now();
                if next_start > now {
                    monoio::time::sleep(next_start - now).await;
                }
            } else {
                next_start = Instant::now();
            }
            if !self.shared.take_fetch() {
                break;
            }
            let scheduled = next_start;
            if let Some(interval) = self.interval {
                next_start += interval;
            }
            let pick = self.shared.picker.pick(&mut self.rng);
            match self.shared.cfg.mode {
                Mode::Churn => self.churn_once(pick, scheduled).await,
                Mode::Keepalive => self.keepalive(pick).await,
                Mode::Idle => {
                    self.idle(pick).await;
                    break;
                }
            }
        }
    }

    async fn churn_once(&mut self, pick: Pick, scheduled: Instant) {
        let timeout = self.shared.cfg.timeout;
        // The stream outlives the timed future, so that even a timed-out fetch closes it.
        let mut stream = None;
        let fetch = self.fetch_new(pick, scheduled, &mut stream);
        let result = monoio::time::timeout(timeout, fetch).await;
        if let Some(s) = stream {
            s.close();
        }
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.error(e, Some(pick)),
            Err(_) => self.error(FetchError::Timeout, Some(pick)),
        }
    }

    /// Connect, handshake, fetch every piece once, close.
    async fn fetch_new(
        &mut self,
        pick: Pick,
        scheduled: Instant,
        slot: &mut Option<Stream>,
    ) -> Result<(), FetchError> {
        let stream = slot.insert(self.connect().await?);
        self.live.open.fetch_add(1, Relaxed);
        let conv = Conversation::new(
            pick.key,
            self.peer_id(),
            self.shared.cfg.pipeline,
            self.shared.cfg.verify,
        );
        let result = self.drive(stream, conv, pick, scheduled, false).await;
        self.live.open.fetch_sub(1, Relaxed);
        result.map(|_| ())
    }

    /// Runs the conversation until a round is done (or, with `stop_at_ext`, until the
    /// extension handshake arrived). Returns the conversation for keepalive rounds.
    async fn drive(
        &self,
        stream: &mut Stream,
        mut conv: Conversation,
        pick: Pick,
        started: Instant,
        stop_at_ext: bool,
    ) -> Result<Conversation, FetchError> {
        stream.write(&mut conv.out).await?;
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut first_block = true;
        loop {
            buf.clear();
            let (res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) => return Err(FetchError::Closed),
                Ok(_) => {}
                Err(_) => return Err(FetchError::Io),
            }
            let mut input: &[u8] = &buf;
            loop {
                let event = conv.feed(input)?;
                input = &[];
                match event {
                    Event::Nothing => break,
                    Event::NoMetadataYet => {
                        if pick.miss || stop_at_ext {
                            return Err(FetchError::NoMetadata);
                        }
                    }
                    Event::Ready { .. } => {
                        if stop_at_ext {
                            return Ok(conv);
                        }
                    }
                    Event::Blocks { n, bytes } => {
                        self.count_blocks(n, bytes, &mut first_block, started);
                        break;
                    }
                    Event::RoundDone { blocks, bytes } => {
                        self.count_blocks(blocks, bytes, &mut first_block, started);
                        self.live.fetches.fetch_add(1, Relaxed);
                        self.local
                            .borrow_mut()
                            .hists
                            .fetch
                            .saturating_record(micros(started.elapsed()));
                        return Ok(conv);
                    }
                }
                if !conv.has_buffered() {
                    break;
                }
            }
            if !conv.out.is_empty() {
                stream.write(&mut conv.out).await?;
            }
        }
    }

    fn count_blocks(&self, n: u32, bytes: u64, first: &mut bool, started: Instant) {
        if std::mem::take(first) {
            self.local
                .borrow_mut()
                .hists
                .first_block
                .saturating_record(micros(started.elapsed()));
        }
        self.live.blocks.fetch_add(n.into(), Relaxed);
        self.live.bytes.fetch_add(bytes, Relaxed);
    }

    /// One connection, many rounds, until the run ends; reconnects after an error.
    async fn keepalive(&mut self, pick: Pick) {
        let timeout = self.shared.cfg.timeout;
        let mut stream = match monoio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.error(e, Some(pick)),
            Err(_) => return self.error(FetchError::Timeout, Some(pick)),
        };
        self.live.open.fetch_add(1, Relaxed);
        let conv = Conversation::new(
            pick.key,
            self.peer_id(),
            self.shared.cfg.pipeline,
            self.shared.cfg.verify,
        );
        let first = self.drive(&mut stream, conv, pick, Instant::now(), false);
        let mut conv = match monoio::time::timeout(timeout, first).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.live.open.fetch_sub(1, Relaxed);
                stream.close();
                return self.error(e, Some(pick));
            }
            Err(_) => {
                self.live.open.fetch_sub(1, Relaxed);
                stream.close();
                return self.error(FetchError::Timeout, Some(pick));
            }
        };
        while self.shared.take_fetch() {
            conv.start_round();
            let round = self.drive(&mut stream, conv, pick, Instant::now(), false);
            conv = match monoio::time::timeout(timeout, round).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.error(e, Some(pick));
                    break;
                }
                Err(_) => {
                    self.error(FetchError::Timeout, Some(pick));
                    break;
                }
            };
        }
        self.live.open.fetch_sub(1, Relaxed);
        stream.close();
    }

    /// Connect and handshake, then sit on the connection until the deadline.
    async fn idle(&mut self, pick: Pick) {
        let timeout = self.shared.cfg.timeout;
        let mut stream = match monoio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.error(e, Some(pick)),
            Err(_) => return self.error(FetchError::Timeout, Some(pick)),
        };
        let conv = Conversation::new(pick.key, self.peer_id(), 1, false);
        let hs = self.drive(&mut stream, conv, pick, Instant::now(), true);
        let hs = match monoio::time::timeout(timeout, hs).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FetchError::Timeout),
        };
        if let Err(e) = hs {
            stream.close();
            return self.error(e, Some(pick));
        }
        self.live.open.fetch_add(1, Relaxed);
        self.live.established.fetch_add(1, Relaxed);
        let all = self.shared.established.fetch_add(1, Relaxed) + 1;
        if all == self.shared.cfg.connections as u64 {
            if let Some(path) = &self.shared.cfg.ready_file {
                let _ = std::fs::write(path, format!("{all}\n"));
            }
        }
        // Read (and drop) keep-alives until the run ends or the peer closes.
        let mut buf = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            if now >= self.shared.deadline || self.shared.stop.load(Relaxed) {
                break;
            }
            let left = (self.shared.deadline - now).min(Duration::from_millis(500));
            buf.clear();
            let read = stream.read(buf);
            match monoio::time::timeout(left, read).await {
                Ok((Ok(n), b)) if n > 0 => buf = b,
                Ok(_) => {
                    self.error(FetchError::Closed, None);
                    break;
                }
                Err(_) => buf = Vec::with_capacity(256),
            }
        }
        self.live.open.fetch_sub(1, Relaxed);
        stream.close();
    }
}

/// One connection's byte stream: all the fetch loop needs of a transport.
enum Stream {
    Tcp(TcpStream),
    /// Boxed: the connection state is several hundred bytes.
    Utp(Box<UtpStream>),
}

/// uTP operations are bounded by the callers' timeouts (per fetch, per idle read); the
/// stream's own deadline is only a backstop.
fn utp_deadline() -> monoio::time::Instant {
    monoio::time::Instant::now() + Duration::from_secs(3600)
}

impl Stream {
    /// Reads what arrived into `buf` (cleared by the caller), as `AsyncReadRent::read`
    /// does: `Ok(0)` = the peer closed.
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Utp(s) => {
                let res = s.read(&mut buf, utp_deadline()).await;
                (res, buf)
            }
        }
    }

    /// Writes all of `out` as one contiguous buffer (monoio 0.2.4's `write_vectored_all`
    /// does not advance past a short write), then clears it for reuse.
    async fn write(&mut self, out: &mut Vec<u8>) -> Result<(), FetchError> {
        let buf = std::mem::take(out);
        match self {
            Stream::Tcp(s) => {
                let (res, mut buf) = s.write_all(buf).await;
                buf.clear();
                *out = buf;
                res.map(|_| ()).map_err(|_| FetchError::Io)
            }
            // The connection keeps the buffer until it is acked.
            Stream::Utp(s) => s
                .write_all(buf, utp_deadline())
                .await
                .map_err(|_| FetchError::Io),
        }
    }

    /// Closes without waiting: TCP's FIN is the kernel's business; uTP's FIN (and its
    /// retransmissions until acked, at most `CLOSE_LINGER`) is sent by a detached task,
    /// so a churning connection starts its next fetch at once, as with TCP. The thread
    /// waits for those tasks before its runtime ends (`wait_closing`).
    fn close(self) {
        match self {
            Stream::Tcp(s) => drop(s),
            Stream::Utp(s) => {
                CLOSING.with(|c| c.set(c.get() + 1));
                drop(monoio::spawn(async move {
                    s.close().await;
                    CLOSING.with(|c| c.set(c.get() - 1));
                }));
            }
        }
    }
}

thread_local! {
    /// uTP closes still sending their FIN on this thread.
    static CLOSING: Cell<usize> = const { Cell::new(0) };
}

/// Lets the detached uTP closes finish (each is bounded by `CLOSE_LINGER`), so the peer
/// is not left holding connections whose FIN was never sent.
async fn wait_closing() {
    while CLOSING.with(Cell::get) > 0 {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects from `source` (any port), or from wherever the kernel picks.
async fn connect_from(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect_addr(target).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nonblocking(true)?;
    // Choose the port at connect time, from the whole 4-tuple space: one source address
    // then reaches ~28k connections per target rather than ~28k in total.
    let one: libc::c_int = 1;
    // SAFETY: plain setsockopt on a socket we own, with a c_int argument.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the fd comes from `into_raw_fd` of a socket we own; ownership moves over.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let stream = TcpStream::from_std(std_stream)?;
    stream.writable(false).await?;
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR into a c_int of the given length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(stream)
}

/// CPUs this process may run on (what `taskset` allowed).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: as above; pins the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs one thread's share: `slots` are the connection indexes it owns.
fn thread_main(
    shared: Arc<Shared>,
    live: Arc<Live>,
    thread: usize,
    slots: Vec<usize>,
) -> io::Result<ThreadResult> {
    if shared.cfg.pin {
        let cpus = allowed_cpus();
        if !cpus.is_empty() {
            pin_to(cpus[thread % cpus.len()]);
        }
    }
    // One io_uring entry per connection's pending op, plus timers; capped by the kernel.
    let entries = (slots.len() * 2).clamp(256, 32_768) as u32;
    let body = {
        let shared = shared.clone();
        move |driver: &'static str| {
            let local = Rc::new(RefCell::new(ThreadResult {
                hists: Hists::new(),
                errors: [0; FetchError::ALL.len()],
                driver,
            }));
            let result = local.clone();
            let fut = async move {
                let per_slot = shared
                    .cfg
                    .rate
                    .map(|r| Duration::from_secs_f64(shared.cfg.connections as f64 / r.max(1e-3)));
                let mut handles = Vec::with_capacity(slots.len());
                for &slot in &slots {
                    let task = Task {
                        shared: shared.clone(),
                        live: live.clone(),
                        local: local.clone(),
                        rng: Rng::new(shared.cfg.seed ^ ((slot as u64 + 1) << 20)),
                        slot,
                        interval: per_slot,
                    };
                    handles.push(monoio::spawn(task.run()));
                }
                for h in handles {
                    h.await;
                }
                wait_closing().await;
            };
            (fut, result)
        }
    };
    let use_uring = match shared.cfg.driver {
        Driver::Epoll => false,
        Driver::IoUring => true,
        Driver::Auto => monoio::utils::detect_uring(),
    };
    let local = if use_uring {
        let (fut, local) = body("io_uring");
        // COOP_TASKRUN: a datagram or segment for this thread, arriving while it runs, is
        // queued for its next entry into the kernel instead of interrupting it (an IPI
        // per arrival otherwise; a thread asleep in the ring is woken as before). On
        // loopback that interrupt is sent from inside the server's send: the server under
        // test paid for interrupting its load generator, ~10 us per uTP fetch at 64
        // connections (BENCHMARKS.md "uTP cost", sixth pass), which no remote client costs it.
        let mut urb = monoio_io_uring::IoUring::builder();
        if !shared.cfg.uring_interrupting {
            urb.setup_coop_taskrun();
        }
        RuntimeBuilder::<IoUringDriver>::new()
            .uring_builder(urb)
            .with_entries(entries)
            .enable_timer()
            .build()?
            .block_on(fut);
        local
    } else {
        let (fut, local) = body("epoll");
        RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(fut);
        local
    };
    Ok(Rc::try_unwrap(local)
        .ok()
        .expect("all tasks finished")
        .into_inner())
}

/// The merged result of a run.
pub struct RunResult {
    pub elapsed: Duration,
    pub fetches: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub misses: u64,
    pub established: u64,
    pub hists: Hists,
    pub errors: [u64; FetchError::ALL.len()],
    pub driver: &'static str,
}

impl RunResult {
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// Runs the load; `progress` gets the live totals each second
/// (`[fetches, blocks, bytes, errors, misses, open]`).
pub fn run(
    cfg: RunConfig,
    picker: Picker,
    mut progress: impl FnMut(Duration, [u64; 6]),
) -> anyhow::Result<RunResult> {
    let threads = cfg.threads.max(1);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: start + cfg.duration,
        cfg,
        picker,
        start,
        started: AtomicU64::new(0),
        established: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let lives: Vec<Arc<Live>> = (0..threads).map(|_| Arc::new(Live::default())).collect();
    let mut handles = Vec::new();
    for (t, live) in lives.iter().enumerate() {
        let slots: Vec<usize> = (t..shared.cfg.connections).step_by(threads).collect();
        let (shared, live) = (shared.clone(), live.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || thread_main(shared, live, t, slots))?,
        );
    }
    let sum = |lives: &[Arc<Live>]| {
        lives.iter().fold([0u64; 6], |acc, l| {
            let v = l.add(&Live::default());
            std::array::from_fn(|i| acc[i] + v[i])
        })
    };
    let mut next_tick = start + Duration::from_secs(1);
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next_tick {
            progress(start.elapsed(), sum(&lives));
            next_tick += Duration::from_secs(1);
        }
        // Whatever is still running well past its bound is stuck: let it go.
        if Instant::now() > shared.deadline + shared.cfg.timeout * 2 {
            shared.stop.store(true, Relaxed);
        }
    }
    let elapsed = start.elapsed();
    let mut merged = RunResult {
        elapsed,
        fetches: 0,
        blocks: 0,
        bytes: 0,
        misses: 0,
        established: shared.established.load(Relaxed),
        hists: Hists::new(),
        errors: [0; FetchError::ALL.len()],
        driver: "epoll",
    };
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a loadgen thread panicked"))??;
        merged.hists.merge(&r.hists);
        for (a, b) in merged.errors.iter_mut().zip(r.errors) {
            *a += b;
        }
        merged.driver = r.driver;
    }
    let totals = sum(&lives);
    merged.fetches = totals[0];
    merged.blocks = totals[1];
    merged.bytes = totals[2];
    merged.misses = totals[4];
    Ok(merged)
}
