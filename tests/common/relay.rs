//! A seeded lossy UDP relay: loss tests put it between a client and a uTP peer on
//! loopback (netem is not available here). It listens on 127.0.0.1:0 and forwards each
//! client (by source address) through an upstream socket of its own to the target, both
//! ways, with per-direction impairments: drop, duplicate, reorder (hold a packet, release
//! it right after the next one), delay = base ± jitter (uniform). A scheduler thread sends
//! packets when due (a binary heap of due times). Every random draw comes from a seeded
//! xorshift, four draws per packet, so a seed and a packet sequence give the same
//! decisions. Memory is bounded (queued packets and clients are capped; what does not fit
//! is shed and counted). TCP to the relay's port is refused (nothing listens there), which
//! makes libtorrent and magnetar use uTP. Everything stops when the relay is dropped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked reads look at the stop flag.
const READ_POLL: Duration = Duration::from_millis(20);
/// A packet held for reordering is let go after this long if no other packet follows it.
pub const REORDER_HOLD_MAX: Duration = Duration::from_millis(50);
/// Largest UDP payload relayed (uTP packets are at most ~1.5 KB; DHT ones smaller).
const DATAGRAM_MAX: usize = 64 * 1024;
/// Default cap on packets waiting in the scheduler (both directions together).
pub const QUEUE_MAX: usize = 4096;
/// Clients (source addresses) relayed at once; packets of further ones are shed.
pub const CLIENTS_MAX: usize = 64;

/// What one direction does to its packets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Impairment {
    /// Probability that a packet is dropped.
    pub drop: f64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Probability that a packet is held and sent right after the next one.
    pub reorder: f64,
    /// Each packet waits `delay ± jitter` (uniform), never less than zero.
    pub delay: Duration,
    pub jitter: Duration,
}

impl Impairment {
    /// No impairment at all.
    pub fn none() -> Impairment {
        Impairment::default()
    }

    /// Loss and delay, as the loss tests use them.
    pub fn lossy(drop: f64, delay: Duration, jitter: Duration) -> Impairment {
        Impairment {
            drop,
            delay,
            jitter,
            ..Impairment::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Client -> target.
    pub to_target: Impairment,
    /// Target -> client.
    pub to_client: Impairment,
    pub seed: u64,
    /// Packets waiting in the scheduler (both directions); beyond it they are shed.
    pub queue_max: usize,
}

impl RelayConfig {
    /// The same impairment both ways.
    pub fn symmetric(imp: Impairment, seed: u64) -> RelayConfig {
        RelayConfig {
            to_target: imp,
            to_client: imp,
            seed,
            queue_max: QUEUE_MAX,
        }
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Packets that came in.
    pub received: u64,
    /// Packets sent on (a duplicate counts twice).
    pub forwarded: u64,
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Packets held back and sent after a later one.
    pub reordered: u64,
    /// Packets thrown away because the queue (or the client table) was full.
    pub shed: u64,
}

impl DirStats {
    /// Packets taken in but not yet sent (nor dropped, nor shed).
    pub fn in_flight(&self) -> u64 {
        // Copies to send are received - dropped - shed + duplicated; none is sent twice.
        self.received + self.duplicated - self.dropped - self.shed - self.forwarded
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub to_target: DirStats,
    pub to_client: DirStats,
}

/// xorshift64*: small, seedable, good enough for impairment decisions.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Any seed (0 too) gives a non-zero state.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    ToTarget = 0,
    ToClient = 1,
}

struct Packet {
    bytes: Vec<u8>,
    via: Arc<UdpSocket>,
    to: SocketAddr,
    dir: Dir,
}

struct Queued {
    due: Instant,
    seq: u64,
    packet: Packet,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

struct Held {
    packet: Packet,
    copies: u32,
    due: Instant,
    until: Instant,
}

struct Direction {
    imp: Impairment,
    rng: XorShift,
    /// The packet held for reordering, its copies, its own due time, and when it must go
    /// anyway.
    held: Option<Held>,
    stats: DirStats,
}

impl Direction {
    fn delay(&self, draw: f64) -> Duration {
        let base = self.imp.delay.as_secs_f64();
        let jitter = self.imp.jitter.as_secs_f64() * (2.0 * draw - 1.0);
        Duration::from_secs_f64((base + jitter).max(0.0))
    }
}

struct State {
    heap: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    dirs: [Direction; 2],
    queue_max: usize,
}

impl State {
    fn push(&mut self, due: Instant, packet: Packet) {
        self.seq += 1;
        let seq = self.seq;
        self.heap.push(Reverse(Queued { due, seq, packet }));
    }

    /// Queues `copies` of the packet at `due` (a duplicate right behind the original).
    fn schedule(&mut self, due: Instant, packet: Packet, copies: u32) {
        if copies == 2 {
            let copy = Packet {
                bytes: packet.bytes.clone(),
                via: packet.via.clone(),
                to: packet.to,
                dir: packet.dir,
            };
            self.push(due, packet);
            self.push(due, copy);
        } else {
            self.push(due, packet);
        }
    }

    fn queued(&self) -> usize {
        self.heap.len() + self.dirs.iter().filter(|d| d.held.is_some()).count()
    }

    /// One packet in: the impairments decide its fate.
    fn offer(&mut self, packet: Packet, now: Instant) {
        let d = packet.dir as usize;
        let dir = &mut self.dirs[d];
        dir.stats.received += 1;
        // Four draws per packet whatever happens to it: decisions depend on the seed and
        // the packet's position in its direction only.
        let (p_drop, p_dup, p_reorder, p_delay) = (
            dir.rng.unit(),
            dir.rng.unit(),
            dir.rng.unit(),
            dir.rng.unit(),
        );
        if p_drop < dir.imp.drop {
            dir.stats.dropped += 1;
            return;
        }
        let copies = if p_dup < dir.imp.duplicate { 2 } else { 1 };
        let due = now + dir.delay(p_delay);
        let hold = p_reorder < dir.imp.reorder && dir.held.is_none();
        if self.queued() + copies as usize > self.queue_max {
            self.dirs[d].stats.shed += 1;
            return;
        }
        let dir = &mut self.dirs[d];
        dir.stats.duplicated += (copies - 1) as u64;
        if hold {
            dir.stats.reordered += 1;
            dir.held = Some(Held {
                packet,
                copies,
                due,
                until: now + REORDER_HOLD_MAX,
            });
            return;
        }
        let held = dir.held.take();
        self.schedule(due, packet, copies);
        if let Some(h) = held {
            // Same due time, later sequence number: right after this one.
            self.schedule(due, h.packet, h.copies);
        }
    }

    /// Held packets whose wait is over go into the queue.
    fn release_expired_holds(&mut self, now: Instant) {
        for d in 0..2 {
            if self.dirs[d].held.as_ref().is_some_and(|h| h.until <= now) {
                let h = self.dirs[d].held.take().unwrap();
                self.schedule(h.due.max(now), h.packet, h.copies);
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let heap = self.heap.peek().map(|Reverse(q)| q.due);
        let holds = self
            .dirs
            .iter()
            .filter_map(|d| d.held.as_ref().map(|h| h.until));
        heap.into_iter().chain(holds).min()
    }

    fn stats(&self) -> RelayStats {
        RelayStats {
            to_target: self.dirs[0].stats,
            to_client: self.dirs[1].stats,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// New work for the scheduler (or stop).
    wake: Condvar,
    /// A counter moved (for `wait_until`).
    progress: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offer(&self, packet: Packet) {
        self.lock().offer(packet, Instant::now());
        self.wake.notify_one();
        self.progress.notify_all();
    }

    fn shed(&self, dir: Dir) {
        let mut st = self.lock();
        st.dirs[dir as usize].stats.received += 1;
        st.dirs[dir as usize].stats.shed += 1;
        drop(st);
        self.progress.notify_all();
    }
}

/// The relay; stops (and joins its threads) when dropped.
pub struct LossyRelay {
    /// Where clients send (127.0.0.1, UDP).
    pub addr: SocketAddr,
    pub target: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    upstream_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl LossyRelay {
    pub fn start(target: SocketAddr, cfg: RelayConfig) -> LossyRelay {
        let listener = UdpSocket::bind("127.0.0.1:0").expect("relay: bind");
        listener.set_read_timeout(Some(READ_POLL)).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Arc::new(listener);
        // One seed, two independent streams.
        let dir = |imp: Impairment, salt: u64| Direction {
            imp,
            rng: XorShift::new(cfg.seed ^ salt),
            held: None,
            stats: DirStats::default(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                seq: 0,
                dirs: [
                    dir(cfg.to_target, 0x7461_7267_6574),
                    dir(cfg.to_client, 0x636c_6965_6e74),
                ],
                queue_max: cfg.queue_max,
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let upstream_threads = Arc::new(Mutex::new(Vec::new()));
        let scheduler = {
            let shared = shared.clone();
            std::thread::spawn(move || scheduler(&shared))
        };
        let front = {
            let (shared, ups) = (shared.clone(), upstream_threads.clone());
            std::thread::spawn(move || front(&shared, &listener, target, &ups))
        };
        LossyRelay {
            addr,
            target,
            shared,
            threads: vec![scheduler, front],
            upstream_threads,
        }
    }

    pub fn stats(&self) -> RelayStats {
        self.shared.lock().stats()
    }

    /// Waits (at most `timeout`) until `pred` holds for the counters; returns whether it did.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&RelayStats) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if pred(&st.stats()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .progress
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed fetch through the relay: what the relay saw tells loss from a stall.
            eprintln!(
                "relay {} -> {} at the failure: {:?}",
                self.addr,
                self.target,
                self.stats()
            );
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The front thread has stopped: no new upstream threads after this.
        let ups = std::mem::take(&mut *self.upstream_threads.lock().unwrap());
        for t in ups {
            let _ = t.join();
        }
    }
}

/// Client-facing socket: each new source address gets an upstream socket (and a thread
/// reading the target's answers on it).
fn front(
    shared: &Arc<Shared>,
    listener: &Arc<UdpSocket>,
    target: SocketAddr,
    upstream_threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; DATAGRAM_MAX];
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, from) = match listener.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue, // timeout (look at the stop flag) or a transient error
        };
        if !clients.contains_key(&from) {
            if clients.len() >= CLIENTS_MAX {
                shared.shed(Dir::ToTarget);
                continue;
            }
            let up = UdpSocket::bind("127.0.0.1:0").expect("relay: bind upstream");
            up.set_read_timeout(Some(READ_POLL)).unwrap();
            let up = Arc::new(up);
            let t = {
                let (shared, up, listener) = (shared.clone(), up.clone(), listener.clone());
                std::thread::spawn(move || back(&shared, &up, target, &listener, from))
            };
            upstream_threads.lock().unwrap().push(t);
            clients.insert(from, up);
        }
        shared.offer(Packet {
            bytes: buf[..n].to_vec(),
            via: clients[&from].clone(),
            to: target,
            dir: Dir::ToTarget,
        });
    }
}

/// One client's upstream socket: what the target sends goes back to that client.
fn back(
    shared: &Shared,
    up: &UdpSocket,
    target: SocketAddr,
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
) {
    let mut buf = vec![0u8; DATAGRAM_MAX];
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, from) = match up.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        if from != target {
            continue; // not the target's: not ours to relay
        }
        shared.offer(Packet {
            bytes: buf[..n].to_vec(),
            via: listener.clone(),
            to: client,
            dir: Dir::ToClient,
        });
    }
}

/// Sends each queued packet when it is due.
fn scheduler(shared: &Shared) {
    let mut due_now = Vec::new();
    let mut st = shared.lock();
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        st.release_expired_holds(now);
        while st.heap.peek().is_some_and(|Reverse(q)| q.due <= now) {
            due_now.push(st.heap.pop().unwrap().0.packet);
        }
        if !due_now.is_empty() {
            drop(st);
            let mut sent = [0u64; 2];
            for p in due_now.drain(..) {
                // A send error (the target gone) counts as sent: the relay did its part.
                let _ = p.via.send_to(&p.bytes, p.to);
                sent[p.dir as usize] += 1;
            }
            st = shared.lock();
            st.dirs[0].stats.forwarded += sent[0];
            st.dirs[1].stats.forwarded += sent[1];
            shared.progress.notify_all();
            continue;
        }
        // Nothing due: sleep until the next due time, a new packet, or stop (bounded so a
        // lost wake-up costs at most one poll interval).
        let wait = st
            .next_wake()
            .map_or(READ_POLL, |t| t.saturating_duration_since(now))
            .min(READ_POLL);
        st = shared
            .wake
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
