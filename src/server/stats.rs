//! Per-core counters. Each worker owns one `CoreStats` and is its only writer, so an
//! increment is a plain load + store (no locked instruction, no shared cache line on the
//! hot path); readers (logs now, the admin plane later) sum all cores at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter with exactly one writing thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: no read-modify-write race is possible, so skip `fetch_add`.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Distinct info-hashes one core counts served connections for; past it new hashes are
/// not counted (the counts are for the status page and the JSON, not for billing), so an
/// attacker cycling stored hashes cannot grow the table: ~40 B an entry, 4 MB a core.
pub const SERVED_KEYS_PER_CORE_MAX: usize = 100_000;

/// Connections served per info-hash (handshake key) on one core. Only its core writes,
/// under an uncontended lock taken once per served connection (not per block); the admin
/// plane merges the cores at read time. Per-core, so no cache line is shared between cores
/// on the hit path.
#[derive(Default, Debug)]
pub struct ServedCounts(std::sync::Mutex<std::collections::HashMap<[u8; 20], u64>>);

impl ServedCounts {
    fn table(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 20], u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bump(&self, key: &[u8; 20]) {
        let mut t = self.table();
        let full = t.len() >= SERVED_KEYS_PER_CORE_MAX;
        if let Some(c) = t.get_mut(key) {
            *c += 1;
        } else if !full {
            t.insert(*key, 1);
        }
    }

    pub fn get(&self, key: &[u8; 20]) -> u64 {
        self.table().get(key).copied().unwrap_or(0)
    }

    /// Adds this core's counts into `into`.
    pub fn merge_into(&self, into: &mut std::collections::HashMap<[u8; 20], u64>) {
        for (k, c) in self.table().iter() {
            *into.entry(*k).or_insert(0) += c;
        }
    }
}

/// Upper bounds (µs) of the uTP RTT buckets: loopback is tens of µs, a LAN a few hundred,
/// the Internet tens to hundreds of ms.
pub const RTT_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// RTT as per-bucket counts plus a sum (single writer, like `Counter`).
#[derive(Default, Debug)]
pub struct RttHistogram {
    /// `buckets[i]` counts RTTs <= RTT_BUCKETS_US[i] and above the previous bound; the
    /// last slot counts the rest.
    pub buckets: [Counter; RTT_BUCKETS_US.len() + 1],
    pub sum_us: Counter,
}

impl RttHistogram {
    pub fn record(&self, rtt: std::time::Duration) {
        let us = rtt.as_micros() as u64;
        let i = RTT_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(RTT_BUCKETS_US.len());
        self.buckets[i].inc();
        self.sum_us.add(us);
    }
}

macro_rules! core_stats {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// One worker's counters; padded so two cores never share a cache line.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct CoreStats {
            $($(#[doc = $doc])* pub $name: Counter,)*
            /// Connections served per info-hash on this core.
            pub served: ServedCounts,
            /// Smoothed RTT of uTP connections, recorded when each closes.
            pub utp_rtt: RttHistogram,
        }

        /// A plain-number sum over cores.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot { $(pub $name: u64,)* }

        impl StatsSnapshot {
            pub fn sum<'a>(cores: impl IntoIterator<Item = &'a CoreStats>) -> StatsSnapshot {
                let mut s = StatsSnapshot::default();
                for c in cores { $(s.$name += c.$name.get();)* }
                s
            }
            /// One core's figures.
            pub fn of(core: &CoreStats) -> StatsSnapshot {
                StatsSnapshot::sum(std::iter::once(core))
            }
            /// `name value` pairs in declaration order, for logs and metrics.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }

        /// `(name, doc comment)` of every counter, in declaration order: the metric help
        /// texts come from the same doc comments as the code's.
        pub const COUNTER_DOCS: &[(&str, &str)] = &[$((stringify!($name), concat!($($doc),*)),)*];
    };
}

impl StatsSnapshot {
    /// Sessions open now, over both transports (every session end counts in
    /// `connections_closed`).
    pub fn sessions_open(&self) -> u64 {
        (self.connections_accepted + self.utp_connections_established)
            .saturating_sub(self.connections_closed)
    }
}

core_stats! {
    /// TCP connections accepted and admitted (uTP: `utp_connections_established`).
    connections_accepted,
    /// Connections closed because `connections_max` was reached.
    connections_refused_global,
    /// Connections closed because one IP had `connections_per_ip_max` open.
    connections_refused_per_ip,
    /// accept(2) failures (EMFILE, ENOBUFS, ...), each followed by a back-off.
    accept_errors,
    /// Connections whose session has ended, for any reason.
    connections_closed,
    /// Valid BitTorrent handshakes received.
    handshakes,
    /// Bytes that were not a BitTorrent handshake.
    handshakes_invalid,
    /// Handshakes for an info-hash in the store.
    hits,
    /// Handshakes for an unknown info-hash (closed until the miss path exists).
    misses,
    /// Handshake lookups that would have read a record (or a candidate header) not in the
    /// page cache: looked up on a page-in thread instead of the worker (`server/pagein.rs`).
    cold_lookups,
    /// Page-ins done for them (the connection went on; hit or, if deleted meanwhile, miss).
    page_ins,
    /// Microseconds connections waited for their page-ins, summed (mean = this / page_ins).
    page_in_wait_us,
    /// Peers without the BEP 10 bit: they cannot ask for metadata, so we close.
    peers_without_extensions,
    /// ut_metadata data messages sent.
    blocks_served,
    /// Metadata payload bytes sent (from the mmap).
    bytes_served,
    /// Reject messages for pieces out of range.
    rejects_out_of_range,
    /// Reject messages for requests past `requests_queued_max` in one batch.
    rejects_flood,
    /// ut_metadata requests that arrived before the peer told us its id.
    requests_without_peer_id,
    /// Frames or extension messages that broke the protocol (connection closed).
    protocol_errors,
    /// Sessions closed by the handshake timeout.
    timeouts_handshake,
    /// Sessions closed by the idle timeout.
    timeouts_idle,
    /// Keep-alives we sent.
    keepalives_sent,
    /// Keep-alives sent because no request followed our extension handshake within
    /// `REQUEST_NUDGE_MS` (wakes clients that left it unread, Transmission 3).
    keepalives_nudge,
    /// writev batches that carried blocks (one per pipelined batch).
    block_writes,
    /// Sessions that panicked (a bug): closed, the worker goes on.
    session_panics,
    /// io_uring receives that found the core's buffer ring empty (ENOBUFS), each posted
    /// again in the same turn; many mean the pool is too small for the load.
    uring_recv_no_buffers,
    /// io_uring submissions (a single entry or a linked chain) that found the submission
    /// queue full and waited in the core's backlog for the next turn.
    uring_sq_backlogged,
    /// io_uring completions the kernel dropped (its CQ overflowed and it could not keep
    /// the rest): the connections they named stay open until shutdown. Should stay 0.
    uring_cqes_dropped,
    /// io_uring_enter failures other than EINTR/EBUSY/EAGAIN.
    uring_enter_errors,
    /// Replies sent with zero-copy send (`--send-zc-min-bytes`).
    uring_send_zc,
    /// Of those, the ones the kernel copied after all (loopback, a NIC without
    /// scatter-gather): zero-copy buys nothing there.
    uring_send_zc_copied,
    /// uTP datagrams larger than a receive buffer of the io_uring path (4 KiB), dropped:
    /// uTP packets fit a path MTU, so only a broken or hostile sender sends one.
    utp_recv_truncated,
    /// Misses closed at once: the client IP used up `misses_per_ip_per_minute_max`.
    misses_refused_per_ip,
    /// Waiting clients closed because their fetch failed or was refused.
    misses_failed,
    /// Extension handshakes we sent (first or later).
    ext_handshakes_sent,
    /// Misses whose hold expired: a handshake without metadata_size went out first.
    ext_handshakes_held_out,
    /// Second, full extension handshakes sent once a miss was filled.
    second_ext_handshakes,
    /// Fetches from the connecting client itself (it announced metadata_size).
    client_fills_started,
    /// Client-announced metadata refused before fetching (size over the cap).
    client_fills_refused,
    /// Client fetches that failed (bad piece, wrong hash).
    client_fills_failed,
    /// Client fetches verified and stored.
    client_fills_stored,
    /// Peers received in ut_pex messages from waiting clients.
    pex_peers_received,
    /// Handshakes for a blocked (operator-deleted) info-hash: closed, never fetched.
    blocked,
    /// Sessions that ended because the peer closed the connection (after a fetch: success).
    session_ends_peer_closed,
    /// Sessions that ended on a read or write error, or a write past its deadline.
    session_ends_io_error,
    /// Sessions that ended because the first bytes were not a BitTorrent handshake.
    session_ends_handshake_invalid,
    /// Sessions that ended without a handshake within the handshake timeout.
    session_ends_handshake_timeout,
    /// Sessions that ended at the handshake: per-IP miss budget used up, or a blocked key.
    session_ends_miss_refused,
    /// Sessions that ended because the fetch of their miss failed or was refused.
    session_ends_miss_failed,
    /// Sessions that ended because the peer lacks the BEP 10 extension protocol.
    session_ends_no_extensions,
    /// Sessions that ended on a frame or message that broke the protocol.
    session_ends_protocol_error,
    /// Sessions that ended after the idle timeout without a whole frame from the peer.
    session_ends_idle_timeout,
    /// Connections still open when the shutdown grace time ran out (closed by force).
    sessions_cut_at_shutdown,
    /// Ticks of the worker's 1 s heartbeat timer; the systemd watchdog is only fed while
    /// every worker's heartbeat advances.
    heartbeats,
    /// MSE: encrypted handshakes begun (the first bytes were not a plaintext handshake).
    mse_handshakes_started,
    /// MSE: handshakes completed.
    mse_handshakes_done,
    /// MSE: handshakes that broke the protocol (bad key, padding, sync or VC).
    mse_handshakes_failed,
    /// MSE: handshakes naming an info-hash we do not hold (it can be recognised, not
    /// learned, so it cannot be fetched): closed.
    mse_unknown_info_hash,
    /// MSE handshakes that proved one torrent (req2) followed by a BitTorrent handshake
    /// for another: closed, nothing looked up or fetched.
    mse_torrent_mismatch,
    /// MSE: connections closed before DH because their address started
    /// `mse_handshakes_per_ip_per_second_max` handshakes this second on the core.
    mse_refused_per_ip,
    /// MSE: connections closed before DH because this core spent its
    /// `mse_handshakes_per_core_per_second_max` budget (many addresses at once).
    mse_refused_core_budget,
    /// MSE: handshakes that settled on plaintext (zero-copy serving).
    mse_plaintext_selected,
    /// MSE: handshakes that settled on RC4 (the peer insisted).
    mse_rc4_selected,
    /// MSE: bytes encrypted with RC4 on the way out.
    mse_rc4_bytes_encrypted,
    /// uTP: datagrams received on the serving port.
    utp_datagrams_received,
    /// uTP: datagrams that were not uTP (ignored).
    utp_datagrams_invalid,
    /// uTP: datagrams sent.
    utp_datagrams_sent,
    /// uTP: UDP GSO sends (each carried two or more of `utp_datagrams_sent`).
    utp_gso_sends,
    /// uTP: `sendmmsg` calls of the endpoints' send batches (datagrams sent per call shows
    /// how well a turn's answers are gathered: one call per turn of a busy core).
    utp_send_calls,
    /// uTP: sendmsg failures (socket buffer full: the datagram is lost and retransmitted).
    utp_send_errors,
    /// uTP: recvfrom failures.
    utp_recv_errors,
    /// uTP: SYNs that opened a connection.
    utp_syns_accepted,
    /// uTP: SYNs dropped unanswered because `utp_half_open_per_core_max` connections were
    /// half-open on the core (SYN flood).
    utp_syns_refused_half_open,
    /// uTP: connections whose peer acked our SYN-ACK (a session started).
    utp_connections_established,
    /// uTP: connections that never finished the uTP handshake.
    utp_connect_timeouts,
    /// uTP: connections gone from the table (any reason).
    utp_connections_closed,
    /// uTP: RESETs sent for packets of unknown connections and refused SYNs.
    utp_resets_sent,
    /// uTP: packets sent by closed connections (DATA, STATE, FIN, retransmissions).
    utp_packets_sent,
    /// uTP: packets received by closed connections.
    utp_packets_received,
    /// uTP: packets sent again after a timeout or loss (closed connections).
    utp_retransmits,
    /// uTP: payload bytes sent, retransmissions included (closed connections).
    utp_payload_bytes_sent,
    /// uTP: payload bytes received (closed connections).
    utp_payload_bytes_received,
    /// Public HTTP (`--http`): connections accepted.
    http_connections_accepted,
    /// Public HTTP: connections closed (any reason).
    http_connections_closed,
    /// Public HTTP: request heads parsed and answered.
    http_requests,
    /// Public HTTP: .torrent answers (200, GET or HEAD).
    http_torrents_served,
    /// Public HTTP: 304 answers (If-None-Match matched the ETag).
    http_not_modified,
    /// Public HTTP: 404 answers (unknown path, blocked hash, miss not filled in time).
    http_not_found,
    /// Public HTTP: 400/405/413/414/431 answers.
    http_bad_requests,
    /// Public HTTP: connections closed because a request head did not arrive in time.
    http_request_timeouts,
    /// Public HTTP: CORS preflights (OPTIONS) answered.
    http_preflights,
    /// Public HTTP: requests for an unknown hash (each starts or joins a miss).
    http_misses,
    /// Public HTTP: of those, filled within `http-miss-wait-ms` (answered 200).
    http_misses_filled,
    /// Public HTTP: of those, refused by a miss budget (answered 429).
    http_misses_refused,
}
