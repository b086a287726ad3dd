//! The DHT node, sans-IO: datagrams in ([`Node::on_datagram`]) with the time, datagrams
//! out ([`Node::take_outbox`]), timers by [`Node::tick`]. The driver in `upstream::dht`
//! owns the sockets.
//!
//! What it does, by direction:
//! - **Answers** every well-formed query, echoing `t` whatever its length: `ping`,
//!   `find_node`, `get_peers`, `announce_peer`, `sample_infohashes` (BEP 51); unknown
//!   methods get error 204, unusable arguments error 203. `want` (BEP 32) picks the families
//!   of the nodes returned. `get_peers` for a hash we hold and serve (stored, not private,
//!   not blocked: [`Holdings::serving_port`]) lists our own serving address first in
//!   `values`, at the address the query reached us on, so a lookup that passes through our
//!   node ends at us whether or not we announce.
//! - **Asks**: iterative lookups (`find_node` for the table, `get_peers` for the miss path
//!   and for announces, then `announce_peer` to the K closest that gave a token), over both
//!   families at once. Our transaction ids are 4 bytes (the mainline crate drops other
//!   lengths, libtorrent and jech accept any).
//! - **Learns**: nodes that answer go into the routing table of their family; a node that
//!   queries us is pinged first if its bucket has room; our external address comes from the
//!   `ip` of answers (BEP 42), and our id is re-derived from it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sha1::{Digest, Sha1};

use crate::dht::krpc::{
    self, canonical, compact_nodes, push_compact_addr, Body, DecodeError, Message, OutQuery, Query,
    Response, ResponseBody, Want, NODE4_BYTES, NODE6_BYTES,
};
use crate::dht::table::Table;
use crate::dht::*;
use crate::upstream::ratelimit::PerKeyWindow;

/// What the node needs to know of the store.
pub trait Holdings: Send + Sync {
    /// Our serving (TCP/uTP) port on local address `local` if we serve `info_hash` to
    /// anyone who asks: stored, not private (BEP 27), not blocked, and the server listens
    /// on `local` (or on every address of its family).
    fn serving_port(&self, info_hash: &NodeId, local: IpAddr) -> Option<u16>;
    /// BEP 51: up to `n` of the hashes we would list (a sample redrawn every
    /// [`SAMPLE_INTERVAL`]) and how many there are in all.
    fn sample(&self, n: usize) -> (Vec<NodeId>, u64);
}

/// Holds nothing (tests, and a node before the store is attached).
pub struct NoHoldings;

impl Holdings for NoHoldings {
    fn serving_port(&self, _: &NodeId, _: IpAddr) -> Option<u16> {
        None
    }
    fn sample(&self, _: usize) -> (Vec<NodeId>, u64) {
        (Vec::new(), 0)
    }
}

/// What a lookup reports to whoever started it.
#[derive(Debug)]
pub enum LookupEvent<'a> {
    /// Peers from one node's `values`.
    Peers(&'a [SocketAddr]),
    /// The lookup ended: nodes that answered, and (for an announce) nodes that took it.
    Done { answered: usize, announced: usize },
}

/// Receives a lookup's events; returning false ends the lookup (nobody listens any more).
pub type Sink = Box<dyn FnMut(LookupEvent<'_>) -> bool + Send>;

/// Figures of the node, for /metrics.
#[derive(Default, Debug)]
pub struct NodeCounters {
    pub queries_received: AtomicU64,
    pub responses_sent: AtomicU64,
    pub errors_sent: AtomicU64,
    /// Datagrams that were not KRPC, or answers nobody asked for.
    pub datagrams_dropped: AtomicU64,
    /// `get_peers` answers that listed our own serving address.
    pub self_listed: AtomicU64,
    pub samples_answered: AtomicU64,
    pub announces_stored: AtomicU64,
    /// Queries dropped: their source spent `QUERIES_PER_IP_PER_SECOND_MAX`.
    pub queries_rate_limited: AtomicU64,
    /// Queries dropped: all sources together spent `QUERIES_PER_SECOND_MAX`.
    pub queries_rate_limited_global: AtomicU64,
    pub queries_sent: AtomicU64,
    pub queries_timed_out: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub struct NodeConfig {
    /// Families we have a socket for.
    pub families: Want,
    /// Where a node with an (almost) empty table starts.
    pub bootstrap: Vec<SocketAddr>,
    /// Queries answered per source address per second (`QUERIES_PER_IP_PER_SECOND_MAX`
    /// says why a budget; `--dht-incoming-queries-per-ip-per-second-max` sets it).
    pub queries_per_ip_per_second_max: u32,
    /// Queries answered per second over all sources (`QUERIES_PER_SECOND_MAX` says why;
    /// `--dht-incoming-queries-per-second-max` sets it).
    pub queries_per_second_max: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CandState {
    Fresh,
    Asked,
    Answered(Vec<u8>),
    Failed,
}

struct Cand {
    /// None for a bootstrap address whose id we learn from its answer.
    id: Option<NodeId>,
    addr: SocketAddr,
    state: CandState,
}

enum Phase {
    Searching,
    Announcing { pending: usize, ok: usize },
}

struct Lookup {
    target: NodeId,
    get_peers: bool,
    announce_port: Option<u16>,
    cands: Vec<Cand>,
    inflight: usize,
    answered: usize,
    deadline: Instant,
    phase: Phase,
    sink: Sink,
}

#[derive(Clone, Copy)]
enum Purpose {
    Ping,
    Lookup(u64),
    Announce(u64),
}

struct Inflight {
    addr: SocketAddr,
    sent: Instant,
    purpose: Purpose,
}

pub struct Node {
    id: NodeId,
    cfg: NodeConfig,
    v4: Table,
    v6: Table,
    holdings: Arc<dyn Holdings>,
    inflight: HashMap<u32, Inflight>,
    next_t: u32,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    /// Token secrets: current and previous.
    secrets: [[u8; 16]; 2],
    secrets_rotated: Instant,
    peers: HashMap<NodeId, Vec<(SocketAddr, Instant)>>,
    peers_swept: Instant,
    /// BEP 42 votes: claimed external address -> who said so.
    votes: HashMap<IpAddr, HashSet<IpAddr>>,
    /// Our external address per family (IPv4, IPv6), as BEP 42 votes settled it.
    external: [Option<IpAddr>; 2],
    last_refresh: Option<Instant>,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// The port our queries leave from when it is also the port we announce (the DHT on
    /// the serving port): announces of it say `implied_port`, so a node behind a NAT is
    /// stored at the port its NAT maps, which is where peers reach it.
    implied_port: Option<u16>,
    /// Answers per source address per second.
    queries_per_ip: PerKeyWindow<IpAddr>,
    /// Answers over all sources in the current one-second window: (its start, count).
    queries_window: (Instant, u32),
    pub counters: Arc<NodeCounters>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // No OS randomness is a broken host; a fixed value still gives a working node.
    let _ = getrandom::fill(&mut b);
    b
}

impl Node {
    pub fn new(cfg: NodeConfig, holdings: Arc<dyn Holdings>, now: Instant) -> Node {
        let id = random::<20>();
        let queries_per_ip = cfg.queries_per_ip_per_second_max.max(1);
        Node {
            id,
            cfg,
            v4: Table::new(id),
            v6: Table::new(id),
            holdings,
            inflight: HashMap::new(),
            next_t: u32::from_be_bytes(random::<4>()),
            lookups: HashMap::new(),
            next_lookup: 0,
            secrets: [random(), random()],
            secrets_rotated: now,
            peers: HashMap::new(),
            peers_swept: now,
            votes: HashMap::new(),
            external: [None, None],
            // The driver starts the first refresh (the bootstrap) itself, with a sink.
            last_refresh: Some(now),
            outbox: Vec::new(),
            implied_port: None,
            queries_per_ip: PerKeyWindow::new(
                queries_per_ip,
                std::time::Duration::from_secs(1),
                QUERY_LIMITER_IPS_MAX,
            ),
            queries_window: (now, 0),
            counters: Arc::default(),
        }
    }

    /// Whether a query from `ip` may be answered now: within its source's budget
    /// (`QUERIES_PER_IP_PER_SECOND_MAX`), then within everyone's (`QUERIES_PER_SECOND_MAX`,
    /// a fixed one-second window). A refusal is counted under the budget that refused.
    fn admit_query(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.queries_per_ip.try_hit_at(&ip, now) {
            bump(&self.counters.queries_rate_limited);
            return false;
        }
        let (start, count) = &mut self.queries_window;
        if now.saturating_duration_since(*start) >= std::time::Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        if *count >= self.cfg.queries_per_second_max.max(1) {
            bump(&self.counters.queries_rate_limited_global);
            return false;
        }
        *count += 1;
        true
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Nodes in the routing table of each family.
    pub fn table_len(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    /// The external address of `v6`'s family that BEP 42 votes settled on, if any.
    pub fn external_ip(&self, v6: bool) -> Option<IpAddr> {
        self.external[usize::from(v6)]
    }

    /// What the node lists as ours from now on.
    pub fn set_holdings(&mut self, holdings: Arc<dyn Holdings>) {
        self.holdings = holdings;
    }

    /// Where lookups start when the table is (almost) empty.
    /// The families we have sockets for, once known (the DHT on the serving port learns them
    /// when the server has bound its sockets, after the node was made).
    pub fn set_families(&mut self, families: Want) {
        self.cfg.families = families;
    }

    /// Announces of `port` are sent with `implied_port` = 1 from now on: `port` is the one
    /// our queries leave from (see the field).
    pub fn set_implied_port(&mut self, port: Option<u16>) {
        self.implied_port = port;
    }

    pub fn bootstrap(&self) -> &[SocketAddr] {
        &self.cfg.bootstrap
    }

    pub fn set_bootstrap(&mut self, bootstrap: Vec<SocketAddr>) {
        self.cfg.bootstrap = bootstrap;
    }

    /// Lookups still running.
    pub fn lookups(&self) -> usize {
        self.lookups.len()
    }

    /// The datagrams to send, in order.
    pub fn take_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    fn table(&mut self, addr: &SocketAddr) -> &mut Table {
        if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        }
    }

    fn has_family(&self, addr: &SocketAddr) -> bool {
        if addr.is_ipv4() {
            self.cfg.families.v4
        } else {
            self.cfg.families.v6
        }
    }

    /// Starts a lookup of `target`: `get_peers` (peers go to `sink`), or `find_node`; with
    /// `announce_port`, an announce of that port to the K closest nodes at its end. It is
    /// seeded from both tables and, when they hold fewer than K nodes, the bootstrap list.
    pub fn start_lookup(
        &mut self,
        target: NodeId,
        get_peers: bool,
        announce_port: Option<u16>,
        deadline: Instant,
        sink: Sink,
        now: Instant,
    ) -> u64 {
        let lid = self.next_lookup;
        self.next_lookup += 1;
        let mut cands: Vec<Cand> = Vec::new();
        let seeds = self
            .v4
            .closest(&target, 2 * K)
            .into_iter()
            .chain(self.v6.closest(&target, 2 * K));
        for (id, addr) in seeds {
            cands.push(Cand {
                id: Some(id),
                addr,
                state: CandState::Fresh,
            });
        }
        if cands.len() < K {
            for addr in &self.cfg.bootstrap {
                let addr = canonical(*addr);
                if self.has_family(&addr) && !cands.iter().any(|c| c.addr == addr) {
                    cands.push(Cand {
                        id: None,
                        addr,
                        state: CandState::Fresh,
                    });
                }
            }
        }
        let mut lookup = Lookup {
            target,
            get_peers,
            announce_port,
            cands,
            inflight: 0,
            answered: 0,
            deadline: deadline.min(now + LOOKUP_LIFETIME_MAX),
            phase: Phase::Searching,
            sink,
        };
        sort_cands(&mut lookup.cands, &target);
        self.lookups.insert(lid, lookup);
        self.step(lid, now);
        lid
    }

    /// One datagram from `from`, which reached us at `local` (our address it was sent to,
    /// when the socket could tell).
    pub fn on_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) {
        let from = canonical(from);
        if datagram.len() > DATAGRAM_BYTES_MAX {
            bump(&self.counters.datagrams_dropped);
            return;
        }
        let msg = match krpc::decode(datagram) {
            Ok(m) => m,
            Err(DecodeError::BadQuery { .. }) if !self.admit_query(from.ip(), now) => return,
            Err(DecodeError::BadQuery { t, reason }) => {
                bump(&self.counters.queries_received);
                self.send_error(&from, &t, krpc::ERROR_PROTOCOL, reason);
                return;
            }
            Err(_) => {
                bump(&self.counters.datagrams_dropped);
                return;
            }
        };
        match msg.body {
            Body::Query {
                id,
                read_only,
                query,
            } => self.on_query(now, from, local, msg.t, id, read_only, query),
            Body::Response(ref r) => self.on_reply(now, from, &msg, Some(r)),
            Body::Error { .. } => self.on_reply(now, from, &msg, None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_query(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        t: &[u8],
        id: NodeId,
        read_only: bool,
        query: Query<'_>,
    ) {
        if !self.admit_query(from.ip(), now) {
            return;
        }
        bump(&self.counters.queries_received);
        self.consider(now, id, from, read_only);
        let mut nodes4 = Vec::new();
        let mut nodes6 = Vec::new();
        let mut token = None;
        let mut values = Vec::new();
        let mut samples = None;
        let mut sample_bytes = Vec::new();
        let mut fill_nodes = |node: &Node, target: &NodeId, want: Want| {
            let want = want.resolve(&from);
            if want.v4 {
                for (id, a) in node.v4.closest(target, K) {
                    nodes4.extend_from_slice(&id);
                    push_compact_addr(&mut nodes4, &a);
                }
            }
            if want.v6 {
                for (id, a) in node.v6.closest(target, K) {
                    nodes6.extend_from_slice(&id);
                    push_compact_addr(&mut nodes6, &a);
                }
            }
            want
        };
        let want = match query {
            Query::Ping => Want::default(),
            Query::FindNode { target, want } => fill_nodes(self, &target, want),
            Query::GetPeers { info_hash, want } => {
                token = Some(self.token(from.ip(), 0));
                values = self.values_for(&info_hash, &from, local);
                fill_nodes(self, &info_hash, want)
            }
            Query::AnnouncePeer {
                info_hash,
                port,
                implied_port,
                token: tok,
            } => {
                if tok != self.token(from.ip(), 0) && tok != self.token(from.ip(), 1) {
                    self.send_error(&from, t, krpc::ERROR_PROTOCOL, "bad token");
                    return;
                }
                let port = if implied_port { from.port() } else { port };
                self.store_peer(info_hash, SocketAddr::new(from.ip(), port), now);
                Want::default()
            }
            Query::SampleInfohashes { target, want } => {
                let (keys, num) = self.holdings.sample(SAMPLES_PER_RESPONSE_MAX);
                for k in keys.iter().take(SAMPLES_PER_RESPONSE_MAX) {
                    sample_bytes.extend_from_slice(k);
                }
                samples = Some((SAMPLE_INTERVAL.as_secs(), num));
                bump(&self.counters.samples_answered);
                fill_nodes(self, &target, want)
            }
            Query::Unknown(_) => {
                self.send_error(&from, t, krpc::ERROR_METHOD_UNKNOWN, "Method Unknown");
                return;
            }
        };
        // BEP 32: a `nodes6` key only when asked for (an IPv4-only client ignores it, but
        // an empty `nodes` is what a node with nothing to say sends).
        let wants_nodes = !matches!(query, Query::Ping | Query::AnnouncePeer { .. });
        let body = ResponseBody {
            nodes: (wants_nodes && want.v4).then_some(&nodes4[..]),
            nodes6: (wants_nodes && want.v6).then_some(&nodes6[..]),
            token: token.as_ref().map(|t| &t[..]),
            values: &values,
            samples: samples.map(|(i, n)| (i, n, &sample_bytes[..])),
        };
        let mut out = Vec::with_capacity(256);
        krpc::write_response(&mut out, t, &self.id, &from, &body);
        bump(&self.counters.responses_sent);
        self.outbox.push((from, out));
    }

    /// A node that queried us goes into the table once it answers a ping of ours, if its
    /// bucket has room (it may be behind a NAT that only lets answers through).
    fn consider(&mut self, now: Instant, id: NodeId, from: SocketAddr, read_only: bool) {
        if read_only || id == self.id || !self.has_family(&from) {
            return;
        }
        let table = self.table(&from);
        if table.contains(&id, &from) || !table.would_take(&id) {
            return;
        }
        if self.inflight.values().any(|q| q.addr == from) {
            return;
        }
        self.send_query(now, from, &OutQuery::Ping, Purpose::Ping);
    }

    /// `values` for a `get_peers` from `from`: our own serving address first when we hold
    /// the hash, then peers announced to us, of the requester's family.
    fn values_for(
        &self,
        info_hash: &NodeId,
        from: &SocketAddr,
        local: Option<IpAddr>,
    ) -> Vec<SocketAddr> {
        let mut values = Vec::new();
        let port = local.and_then(|ip| self.holdings.serving_port(info_hash, ip));
        // Behind a NAT the query reached a private address of ours; the asker, outside,
        // reaches us at the external one.
        let listed = local.map(|ip| match self.external_ip(ip.is_ipv6()) {
            Some(ext) if is_local(ip) && !is_local(from.ip()) => ext,
            _ => ip,
        });
        if let (Some(port), Some(ip)) = (port, listed) {
            let ours = canonical(SocketAddr::new(ip, port));
            if ours.is_ipv4() == from.is_ipv4() && !ip.is_unspecified() {
                values.push(ours);
                bump(&self.counters.self_listed);
            }
        }
        for (peer, _) in self.peers.get(info_hash).into_iter().flatten() {
            if values.len() >= VALUES_SENT_MAX {
                break;
            }
            if peer.is_ipv4() == from.is_ipv4() && !values.contains(peer) {
                values.push(*peer);
            }
        }
        values
    }

    fn store_peer(&mut self, info_hash: NodeId, peer: SocketAddr, now: Instant) {
        if !self.peers.contains_key(&info_hash) && self.peers.len() >= STORED_HASHES_MAX {
            return;
        }
        let list = self.peers.entry(info_hash).or_default();
        if let Some(e) = list.iter_mut().find(|(a, _)| *a == peer) {
            e.1 = now;
        } else if list.len() < STORED_PEERS_PER_HASH_MAX {
            list.push((peer, now));
        } else {
            return;
        }
        bump(&self.counters.announces_stored);
    }

    /// Our token for `ip` under secret `which` (0 current, 1 previous).
    fn token(&self, ip: IpAddr, which: usize) -> Vec<u8> {
        let mut h = Sha1::new();
        h.update(self.secrets[which]);
        match ip {
            IpAddr::V4(a) => h.update(a.octets()),
            IpAddr::V6(a) => h.update(a.octets()),
        }
        h.finalize()[..8].to_vec()
    }

    fn send_error(&mut self, to: &SocketAddr, t: &[u8], code: i64, message: &str) {
        let mut out = Vec::with_capacity(64);
        krpc::write_error(&mut out, t, code, message);
        bump(&self.counters.errors_sent);
        self.outbox.push((*to, out));
    }

    /// Sends `q` to `to`; false when the transaction table is full or the family has no
    /// socket.
    fn send_query(
        &mut self,
        now: Instant,
        to: SocketAddr,
        q: &OutQuery<'_>,
        purpose: Purpose,
    ) -> bool {
        if self.inflight.len() >= INFLIGHT_QUERIES_MAX || !self.has_family(&to) {
            return false;
        }
        let mut t = self.next_t;
        while self.inflight.contains_key(&t) {
            t = t.wrapping_add(1);
        }
        self.next_t = t.wrapping_add(1);
        let mut out = Vec::with_capacity(128);
        krpc::write_query(&mut out, &t.to_be_bytes(), &self.id, q);
        self.inflight.insert(
            t,
            Inflight {
                addr: to,
                sent: now,
                purpose,
            },
        );
        bump(&self.counters.queries_sent);
        self.outbox.push((to, out));
        true
    }

    fn on_reply(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        response: Option<&Response<'_>>,
    ) {
        let Some(t) = <[u8; 4]>::try_from(msg.t).ok().map(u32::from_be_bytes) else {
            bump(&self.counters.datagrams_dropped);
            return;
        };
        // Only the node we asked may answer (else anyone could inject nodes and peers).
        if self.inflight.get(&t).is_none_or(|q| q.addr != from) {
            bump(&self.counters.datagrams_dropped);
            return;
        }
        let q = self.inflight.remove(&t).expect("checked above");
        if let Some(r) = response {
            self.table(&from).heard_from(r.id, from, now);
            if let Some(ip) = msg.ip {
                self.vote(from.ip(), ip.ip());
            }
        }
        match q.purpose {
            Purpose::Ping => {}
            Purpose::Lookup(lid) => self.lookup_reply(lid, from, response, now),
            Purpose::Announce(lid) => self.announce_reply(lid, response.is_some()),
        }
    }

    fn lookup_reply(
        &mut self,
        lid: u64,
        from: SocketAddr,
        response: Option<&Response<'_>>,
        now: Instant,
    ) {
        let own = self.id;
        let (v4, v6) = (self.cfg.families.v4, self.cfg.families.v6);
        let Some(l) = self.lookups.get_mut(&lid) else {
            return;
        };
        l.inflight = l.inflight.saturating_sub(1);
        let Some(c) = l.cands.iter_mut().find(|c| c.addr == from) else {
            self.step(lid, now);
            return;
        };
        let Some(r) = response else {
            c.state = CandState::Failed;
            self.step(lid, now);
            return;
        };
        c.id = Some(r.id);
        c.state = CandState::Answered(r.token.unwrap_or_default().to_vec());
        l.answered += 1;
        let learned = compact_nodes(r.nodes, NODE4_BYTES)
            .filter(|_| v4)
            .chain(compact_nodes(r.nodes6, NODE6_BYTES).filter(|_| v6));
        for (id, addr) in learned {
            let addr = canonical(addr);
            if id == own || addr.port() == 0 || l.cands.iter().any(|c| c.addr == addr) {
                continue;
            }
            l.cands.push(Cand {
                id: Some(id),
                addr,
                state: CandState::Fresh,
            });
        }
        let target = l.target;
        sort_cands(&mut l.cands, &target);
        if l.cands.len() > LOOKUP_CANDIDATES_MAX {
            l.cands.truncate(LOOKUP_CANDIDATES_MAX);
        }
        if !r.values.is_empty() && l.get_peers && !(l.sink)(LookupEvent::Peers(&r.values)) {
            self.lookups.remove(&lid);
            return;
        }
        self.step(lid, now);
    }

    fn announce_reply(&mut self, lid: u64, ok: bool) {
        let Some(l) = self.lookups.get_mut(&lid) else {
            return;
        };
        if let Phase::Announcing {
            pending,
            ok: ref mut oks,
        } = &mut l.phase
        {
            *pending -= 1;
            *oks += usize::from(ok);
            if *pending == 0 {
                self.finish(lid);
            }
        }
    }

    /// Sends what the lookup may send now; moves it to announcing or ends it when no
    /// closer node is left to ask.
    fn step(&mut self, lid: u64, now: Instant) {
        let want = self.cfg.families;
        let Some(l) = self.lookups.get_mut(&lid) else {
            return;
        };
        if !matches!(l.phase, Phase::Searching) {
            return;
        }
        let mut to_ask = Vec::new();
        let mut answered_closer = 0;
        let mut slots = LOOKUP_PARALLEL_QUERIES.saturating_sub(l.inflight);
        for c in &mut l.cands {
            if answered_closer >= K {
                break;
            }
            match c.state {
                CandState::Answered(_) => answered_closer += 1,
                CandState::Fresh if slots > 0 => {
                    c.state = CandState::Asked;
                    slots -= 1;
                    to_ask.push(c.addr);
                }
                _ => {}
            }
        }
        let (target, get_peers) = (l.target, l.get_peers);
        let q = if get_peers {
            OutQuery::GetPeers {
                info_hash: &target,
                want,
            }
        } else {
            OutQuery::FindNode {
                target: &target,
                want,
            }
        };
        for addr in to_ask {
            let sent = self.send_query(now, addr, &q, Purpose::Lookup(lid));
            let l = self.lookups.get_mut(&lid).expect("present above");
            if sent {
                l.inflight += 1;
            } else if let Some(c) = l.cands.iter_mut().find(|c| c.addr == addr) {
                c.state = CandState::Failed;
            }
        }
        let l = self.lookups.get_mut(&lid).expect("present above");
        let fresh_left = l
            .cands
            .iter()
            .scan(0, |answered, c| {
                let before = *answered;
                if matches!(c.state, CandState::Answered(_)) {
                    *answered += 1;
                }
                Some((before, c))
            })
            .any(|(before, c)| before < K && c.state == CandState::Fresh);
        if l.inflight == 0 && !fresh_left {
            self.searched(lid, now);
        }
    }

    /// The search part ended: announce, or report.
    fn searched(&mut self, lid: u64, now: Instant) {
        let Some(l) = self.lookups.get_mut(&lid) else {
            return;
        };
        let Some(port) = l.announce_port else {
            self.finish(lid);
            return;
        };
        let targets: Vec<(SocketAddr, Vec<u8>)> = l
            .cands
            .iter()
            .filter_map(|c| match &c.state {
                CandState::Answered(tok) if !tok.is_empty() => Some((c.addr, tok.clone())),
                _ => None,
            })
            .take(K)
            .collect();
        let info_hash = l.target;
        l.phase = Phase::Announcing { pending: 0, ok: 0 };
        let implied_port = self.implied_port == Some(port);
        let mut sent = 0;
        for (addr, token) in targets {
            let q = OutQuery::AnnouncePeer {
                info_hash: &info_hash,
                port,
                implied_port,
                token: &token,
            };
            if self.send_query(now, addr, &q, Purpose::Announce(lid)) {
                sent += 1;
            }
        }
        let l = self.lookups.get_mut(&lid).expect("present above");
        l.phase = Phase::Announcing {
            pending: sent,
            ok: 0,
        };
        if sent == 0 {
            self.finish(lid);
        }
    }

    fn finish(&mut self, lid: u64) {
        if let Some(mut l) = self.lookups.remove(&lid) {
            let announced = match l.phase {
                Phase::Announcing { ok, .. } => ok,
                Phase::Searching => 0,
            };
            (l.sink)(LookupEvent::Done {
                answered: l.answered,
                announced,
            });
        }
    }

    /// BEP 42: `voter` says we are at `claimed`. Enough distinct voters settle it; a new
    /// external address gives us a new id derived from it.
    fn vote(&mut self, voter: IpAddr, claimed: IpAddr) {
        let family = usize::from(claimed.is_ipv6());
        if claimed.is_unspecified() || Some(claimed) == self.external[family] {
            return;
        }
        // Bounded: a flood of distinct claims resets the count instead of growing it.
        if self.votes.len() >= 64 {
            self.votes.clear();
        }
        let voters = self.votes.entry(claimed).or_default();
        voters.insert(voter);
        if voters.len() < EXTERNAL_IP_VOTES_NEEDED {
            return;
        }
        self.votes.retain(|ip, _| ip.is_ipv6() != claimed.is_ipv6());
        self.external[family] = Some(claimed);
        // The id follows the IPv4 address when there is one (most of the DHT is IPv4).
        let follows = claimed.is_ipv4() || self.external[0].is_none();
        if follows && !bep42_valid(&self.id, claimed) {
            let id = bep42_id(claimed, random());
            tracing::info!(external = %claimed, id = %hex::encode(id), "dht node id from the external address (BEP 42)");
            self.set_id(id);
        }
    }

    fn set_id(&mut self, id: NodeId) {
        self.id = id;
        self.v4.set_own(id);
        self.v6.set_own(id);
    }

    /// Timers: query timeouts, lookup deadlines, token rotation, expiry of stored peers,
    /// table refresh.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, q)| now.duration_since(q.sent) >= QUERY_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            let q = self.inflight.remove(&t).expect("listed above");
            bump(&self.counters.queries_timed_out);
            self.table(&q.addr).failed(&q.addr);
            match q.purpose {
                Purpose::Ping => {}
                Purpose::Lookup(lid) => self.lookup_reply(lid, q.addr, None, now),
                Purpose::Announce(lid) => self.announce_reply(lid, false),
            }
        }
        let late: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| now >= l.deadline)
            .map(|(id, _)| *id)
            .collect();
        for lid in late {
            self.finish(lid);
        }
        if now.duration_since(self.secrets_rotated) >= TOKEN_ROTATE_INTERVAL {
            self.secrets = [random(), self.secrets[0]];
            self.secrets_rotated = now;
        }
        if now.duration_since(self.peers_swept) >= std::time::Duration::from_secs(60) {
            self.peers_swept = now;
            self.peers.retain(|_, list| {
                list.retain(|(_, at)| now.duration_since(*at) < PEER_LIFETIME);
                !list.is_empty()
            });
        }
        let (n4, n6) = self.table_len();
        let due = match self.last_refresh {
            None => true,
            Some(t) if n4 + n6 < K => now.duration_since(t) >= REBOOTSTRAP_INTERVAL,
            Some(t) => now.duration_since(t) >= TABLE_REFRESH_INTERVAL,
        };
        if due {
            self.refresh(now);
        }
    }

    /// A `find_node` of our own id (fills the buckets near us, and bootstraps an empty
    /// table). Returns the lookup's id; `sink` hears when it ends.
    pub fn refresh_with(&mut self, now: Instant, sink: Sink) -> u64 {
        self.last_refresh = Some(now);
        let id = self.id;
        self.start_lookup(id, false, None, now + LOOKUP_LIFETIME_MAX, sink, now)
    }

    fn refresh(&mut self, now: Instant) {
        self.refresh_with(now, Box::new(|_| true));
    }
}

fn sort_cands(cands: &mut [Cand], target: &NodeId) {
    // Bootstrap addresses (no id yet) first: they are where a cold lookup starts.
    cands.sort_by_key(|c| c.id.map(|id| distance(&id, target)).unwrap_or([0; 20]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Holding {
        key: NodeId,
        port: u16,
    }

    impl Holdings for Holding {
        fn serving_port(&self, k: &NodeId, _: IpAddr) -> Option<u16> {
            (*k == self.key).then_some(self.port)
        }
        fn sample(&self, _: usize) -> (Vec<NodeId>, u64) {
            (vec![self.key], 1)
        }
    }

    fn node(holdings: Arc<dyn Holdings>) -> Node {
        Node::new(
            NodeConfig {
                families: Want { v4: true, v6: true },
                bootstrap: Vec::new(),
                queries_per_ip_per_second_max: QUERIES_PER_IP_PER_SECOND_MAX,
                queries_per_second_max: QUERIES_PER_SECOND_MAX,
            },
            holdings,
            Instant::now(),
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Sends `q` (a raw datagram) from `from` and returns the one reply to `from`.
    fn ask(n: &mut Node, from: &str, local: &str, q: &[u8]) -> Vec<u8> {
        let from = addr(from);
        n.on_datagram(Instant::now(), from, Some(local.parse().unwrap()), q);
        let out = n.take_outbox();
        let replies: Vec<_> = out
            .into_iter()
            .filter(|(to, d)| *to == from && d.windows(5).any(|w| w == b"1:y1:"))
            .filter(|(_, d)| !d.ends_with(b"1:y1:qe"))
            .collect();
        assert_eq!(replies.len(), 1, "one reply");
        replies.into_iter().next().unwrap().1
    }

    #[test]
    fn answers_every_transaction_id_length_and_lists_itself_for_what_it_holds() {
        let key = [0x42; 20];
        let mut n = node(Arc::new(Holding { key, port: 7000 }));
        for t in [&b"x"[..], b"ab", b"abcd", b"abcdefgh"] {
            let mut q = Vec::new();
            krpc::write_query(
                &mut q,
                t,
                &[1; 20],
                &OutQuery::GetPeers {
                    info_hash: &key,
                    want: Want::default(),
                },
            );
            let r = ask(&mut n, "127.0.0.2:4000", "127.0.0.1", &q);
            let m = krpc::decode(&r).unwrap();
            assert_eq!(m.t, t);
            let Body::Response(resp) = m.body else {
                panic!("{m:?}")
            };
            assert_eq!(resp.values, [addr("127.0.0.1:7000")]);
            assert!(resp.token.is_some());
        }
        // Not held: a token and nodes, no values.
        let mut q = Vec::new();
        krpc::write_query(
            &mut q,
            b"zz",
            &[1; 20],
            &OutQuery::GetPeers {
                info_hash: &[9; 20],
                want: Want::default(),
            },
        );
        let m = ask(&mut n, "127.0.0.2:4000", "127.0.0.1", &q);
        let Body::Response(resp) = krpc::decode(&m).unwrap().body else {
            panic!()
        };
        assert!(resp.values.is_empty());
        // IPv6 asker, IPv6 address listed.
        let mut q = Vec::new();
        krpc::write_query(
            &mut q,
            b"6",
            &[1; 20],
            &OutQuery::GetPeers {
                info_hash: &key,
                want: Want::default(),
            },
        );
        let m = ask(&mut n, "[::1]:4000", "::1", &q);
        let Body::Response(resp) = krpc::decode(&m).unwrap().body else {
            panic!()
        };
        assert_eq!(resp.values, [addr("[::1]:7000")]);
    }

    #[test]
    fn announce_needs_our_token_and_is_then_listed() {
        let mut n = node(Arc::new(NoHoldings));
        let ih = [5; 20];
        let mut q = Vec::new();
        krpc::write_query(
            &mut q,
            b"a",
            &[1; 20],
            &OutQuery::AnnouncePeer {
                info_hash: &ih,
                port: 1234,
                implied_port: false,
                token: b"forged",
            },
        );
        let r = ask(&mut n, "10.1.1.1:99", "10.0.0.1", &q);
        assert_eq!(
            krpc::decode(&r).unwrap().body,
            Body::Error {
                code: krpc::ERROR_PROTOCOL
            }
        );
        let token = n.token("10.1.1.1".parse().unwrap(), 0);
        let mut q = Vec::new();
        krpc::write_query(
            &mut q,
            b"a",
            &[1; 20],
            &OutQuery::AnnouncePeer {
                info_hash: &ih,
                port: 1234,
                implied_port: false,
                token: &token,
            },
        );
        let r = ask(&mut n, "10.1.1.1:99", "10.0.0.1", &q);
        assert!(matches!(krpc::decode(&r).unwrap().body, Body::Response(_)));
        assert_eq!(
            n.values_for(&ih, &addr("10.2.2.2:1"), None),
            [addr("10.1.1.1:1234")]
        );
    }

    #[test]
    fn unknown_methods_and_samples() {
        let mut n = node(Arc::new(Holding {
            key: [7; 20],
            port: 1,
        }));
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q3:foo1:t1:q1:y1:qe";
        let r = ask(&mut n, "10.1.1.1:99", "10.0.0.1", q);
        assert_eq!(krpc::decode(&r).unwrap().body, Body::Error { code: 204 });
        let q = b"d1:ad2:id20:abcdefghij01234567896:target20:abcdefghij0123456789e\
                  1:q17:sample_infohashes1:t2:si1:y1:qe";
        let r = ask(&mut n, "10.1.1.1:99", "10.0.0.1", q);
        let text = String::from_utf8_lossy(&r);
        assert!(text.contains("8:intervali300e"), "{text}");
        assert!(text.contains("3:numi1e7:samples20:"), "{text}");
        assert!(r.windows(20).any(|w| w == [7; 20]));
    }

    /// Two nodes wired to each other: a lookup, an announce and the peer found again.
    #[test]
    fn lookup_and_announce_between_two_nodes() {
        // With a DHT port of its own, the announced port is said outright.
        announce_between_two_nodes(None, "10.0.0.1:6881");
        // On the serving port (6881 = the port our queries leave from, as seen through a
        // NAT as port 1): implied_port, and b stores the port it saw.
        announce_between_two_nodes(Some(6881), "10.0.0.1:1");
    }

    fn announce_between_two_nodes(implied_port: Option<u16>, stored: &str) {
        let (a_addr, b_addr) = (addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        let mut a = node(Arc::new(NoHoldings));
        let mut b = node(Arc::new(NoHoldings));
        a.set_implied_port(implied_port);
        a.cfg.bootstrap = vec![b_addr];
        let now = Instant::now();
        let done = Arc::new(Mutex::new(None));
        let d = done.clone();
        let ih = [3; 20];
        a.start_lookup(
            ih,
            true,
            Some(6881),
            now + LOOKUP_LIFETIME_MAX,
            Box::new(move |e| {
                if let LookupEvent::Done { announced, .. } = e {
                    *d.lock().unwrap() = Some(announced);
                }
                true
            }),
            now,
        );
        // Shuttle datagrams until both are quiet.
        for _ in 0..20 {
            let (oa, ob) = (a.take_outbox(), b.take_outbox());
            if oa.is_empty() && ob.is_empty() {
                break;
            }
            for (to, d) in oa {
                assert_eq!(to, b_addr);
                b.on_datagram(now, a_addr, Some(b_addr.ip()), &d);
            }
            for (to, d) in ob {
                assert_eq!(to, a_addr);
                a.on_datagram(now, b_addr, Some(a_addr.ip()), &d);
            }
        }
        assert_eq!(*done.lock().unwrap(), Some(1));
        assert_eq!(a.table_len(), (1, 0));
        assert_eq!(b.table_len(), (1, 0), "b pinged a back and took it");
        assert_eq!(b.values_for(&ih, &addr("10.9.9.9:1"), None), [addr(stored)]);
    }

    /// A querier is pinged before it enters the table, unless it is read-only (BEP 43); an
    /// answer from an address we did not ask is dropped, not learnt from.
    #[test]
    fn queriers_are_verified_and_unasked_answers_dropped() {
        let mut n = node(Arc::new(NoHoldings));
        let now = Instant::now();
        let ro = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:roi1e1:t1:a1:y1:qe";
        n.on_datagram(now, addr("10.0.0.9:1"), None, ro);
        assert_eq!(n.take_outbox().len(), 1, "the answer only, no ping");
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t1:a1:y1:qe";
        n.on_datagram(now, addr("10.0.0.9:1"), None, q);
        let out = n.take_outbox();
        assert_eq!(out.len(), 2, "the answer and our ping");
        let ping = out
            .iter()
            .map(|(_, d)| krpc::decode(d).unwrap())
            .find(|m| matches!(m.body, Body::Query { .. }))
            .unwrap();
        let mut reply = Vec::new();
        krpc::write_response(
            &mut reply,
            ping.t,
            b"abcdefghij0123456789",
            &addr("10.0.0.1:1"),
            &ResponseBody::default(),
        );
        // The same transaction answered from elsewhere: dropped.
        n.on_datagram(now, addr("10.0.0.8:1"), None, &reply);
        assert_eq!(n.table_len(), (0, 0));
        assert_eq!(n.counters.datagrams_dropped.load(Ordering::Relaxed), 1);
        n.on_datagram(now, addr("10.0.0.9:1"), None, &reply);
        assert_eq!(n.table_len(), (1, 0));
    }

    #[test]
    fn queries_beyond_the_per_address_budget_are_dropped() {
        let mut n = node(Arc::new(NoHoldings));
        let now = Instant::now();
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:roi1e1:t1:a1:y1:qe";
        for _ in 0..QUERIES_PER_IP_PER_SECOND_MAX + 10 {
            n.on_datagram(now, addr("10.0.0.9:1"), None, q);
        }
        assert_eq!(
            n.take_outbox().len(),
            QUERIES_PER_IP_PER_SECOND_MAX as usize
        );
        assert_eq!(n.counters.queries_rate_limited.load(Ordering::Relaxed), 10);
        // Another address, and the same one a second later, are answered.
        n.on_datagram(now, addr("10.0.0.8:1"), None, q);
        n.on_datagram(
            now + std::time::Duration::from_secs(1),
            addr("10.0.0.9:1"),
            None,
            q,
        );
        assert_eq!(n.take_outbox().len(), 2);
    }

    /// Many sources, each within its own budget: past `queries_per_second_max` in all, the
    /// rest of the second is dropped (and counted apart); the next second is answered.
    #[test]
    fn queries_beyond_the_global_budget_are_dropped() {
        let mut n = node(Arc::new(NoHoldings));
        n.cfg.queries_per_second_max = 50;
        let now = Instant::now();
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:roi1e1:t1:a1:y1:qe";
        for i in 0..80u8 {
            n.on_datagram(now, addr(&format!("10.0.{i}.1:1")), None, q);
        }
        assert_eq!(n.take_outbox().len(), 50);
        let c = &n.counters;
        assert_eq!(c.queries_rate_limited_global.load(Ordering::Relaxed), 30);
        assert_eq!(c.queries_rate_limited.load(Ordering::Relaxed), 0);
        let later = now + std::time::Duration::from_secs(1);
        n.on_datagram(later, addr("10.0.200.1:1"), None, q);
        assert_eq!(n.take_outbox().len(), 1);
    }

    #[test]
    fn external_address_votes_give_a_bep42_id() {
        let mut n = node(Arc::new(NoHoldings));
        let ext: IpAddr = "124.31.75.21".parse().unwrap();
        n.vote("1.1.1.1".parse().unwrap(), ext);
        n.vote("1.1.1.1".parse().unwrap(), ext);
        n.vote("2.2.2.2".parse().unwrap(), ext);
        assert_eq!(
            n.external_ip(false),
            None,
            "two distinct voters are not enough"
        );
        n.vote("3.3.3.3".parse().unwrap(), ext);
        assert_eq!(n.external_ip(false), Some(ext));
        assert!(bep42_valid(&n.id(), ext));
        // Behind a NAT: a query that reached 10.0.0.1 from outside lists the external address.
        let key = [4; 20];
        n.set_holdings(Arc::new(Holding { key, port: 6000 }));
        assert_eq!(
            n.values_for(&key, &addr("8.8.8.8:1"), Some("10.0.0.1".parse().unwrap())),
            [addr("124.31.75.21:6000")]
        );
        assert_eq!(
            n.values_for(&key, &addr("10.0.0.2:1"), Some("10.0.0.1".parse().unwrap())),
            [addr("10.0.0.1:6000")]
        );
    }
}
