//! Settings of the miss path (`[upstream]` in the config file, flags on `serve`/`fetch`).
//! Every bound on upstream work is here, named with its unit, with its reason.

use std::time::Duration;

use serde::Deserialize;

/// Where the DHT node's datagrams go in and out (`--dht-socket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhtSocket {
    /// The serving UDP port, demultiplexed from uTP.
    Serving,
    /// A socket of its own on `--dht-port`.
    Own,
}

/// How misses are filled and how much upstream work they may cause.
#[derive(clap::Args, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamConfig {
    /// Tracker to ask for peers on a miss (http://, https:// is not supported, udp://); repeatable.
    #[arg(long = "tracker", value_name = "URL")]
    pub trackers: Vec<String>,

    /// Do not run a Mainline DHT node (no DHT lookups, no announces).
    #[arg(long)]
    pub no_dht: bool,

    /// DHT bootstrap node; repeatable. Default: the public routers (router.bittorrent.com:6881, ...).
    #[arg(long = "dht-bootstrap", value_name = "HOST:PORT")]
    pub dht_bootstrap: Vec<String>,

    /// Where our DHT node receives and sends: `serving` (the serving port, beside uTP, as
    /// libtorrent does: one firewall rule, one port mapping, and `implied_port` announces
    /// work behind a NAT) or `own` (a UDP port of its own, `--dht-port`). `serving` needs
    /// uTP on (without it the node falls back to `own`).
    #[arg(long, value_enum, default_value_t = DhtSocket::Serving)]
    pub dht_socket: DhtSocket,

    /// UDP port of our DHT node with `--dht-socket own` (0: any free port).
    #[arg(long, default_value_t = 0, value_name = "PORT")]
    pub dht_port: u16,

    /// Parent magnetar node asked first on a miss; repeatable.
    #[arg(long = "parent", value_name = "HOST:PORT")]
    pub parents: Vec<String>,

    /// How long a client's extension handshake is held while its miss is fetched. Crawlers
    /// (rqbit, magnetico, bitmagnet) need metadata_size in the first one and give up
    /// after ~5 s, so stay well under that.
    #[arg(long, default_value_t = 1500, value_name = "MS")]
    pub handshake_hold_ms: u64,

    /// A fetch that has not completed in this time fails.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub fetch_timeout_ms: u64,

    /// After a failed fetch, the info-hash is not fetched again for this long.
    #[arg(long, default_value_t = 600_000, value_name = "MS")]
    pub negative_cache_ms: u64,

    /// Concurrent upstream fetches per shard (core).
    #[arg(long, default_value_t = 64)]
    pub fetches_per_shard_max: usize,

    /// Peers one fetch talks to at once.
    #[arg(long, default_value_t = 8)]
    pub peers_per_fetch_max: usize,

    /// DHT lookups started per second, over all shards.
    #[arg(long, default_value_t = 20)]
    pub dht_queries_per_second_max: u32,

    /// DHT queries from one source address answered per second; more are dropped (an
    /// answer can be ~14x its query, so a spoofed source must not draw them without bound).
    #[arg(long, default_value_t = crate::dht::QUERIES_PER_IP_PER_SECOND_MAX)]
    pub dht_incoming_queries_per_ip_per_second_max: u32,

    /// DHT queries answered per second over all sources; more are dropped (bounds what a
    /// spoofer cycling through many source addresses can make the node reflect).
    #[arg(long, default_value_t = crate::dht::QUERIES_PER_SECOND_MAX)]
    pub dht_incoming_queries_per_second_max: u32,

    /// Misses (new upstream fetches) one client IP may cause per minute.
    #[arg(long, default_value_t = 30)]
    pub misses_per_ip_per_minute_max: u32,

    /// Misses (new upstream fetches) per second over all clients.
    #[arg(long, default_value_t = 100)]
    pub misses_per_second_max: u32,

    /// Largest metadata a fetch accepts (bytes); at most 64 MiB (limits::METADATA_BYTES_MAX).
    #[arg(long, default_value_t = crate::limits::METADATA_BYTES_MAX)]
    pub metadata_bytes_max: usize,

    /// Do not announce stored (non-private) info-hashes to the DHT.
    #[arg(long)]
    pub no_dht_announce: bool,

    /// DHT announces per second. Each stored hash kept findable is re-announced every
    /// 30 minutes, so this many × 1 620 hashes stay findable (the most served and the most
    /// recently stored first): 16 200 at the default. An announce costs ~60-80 datagrams
    /// (the lookup of the closest nodes and the announce to them).
    #[arg(long, default_value_t = 10)]
    pub dht_announces_per_second_max: u32,

    /// Tracker to announce the stored (non-private) info-hashes to as a seed, so every
    /// client of that tracker finds magnetar (http:// or udp://); repeatable. Also put into
    /// the magnets magnetar hands out as tr=.
    #[arg(long = "announce-tracker", value_name = "URL")]
    pub announce_trackers: Vec<String>,

    /// Announces per second to each --announce-tracker. Each hash is re-announced at the
    /// tracker's interval, so this many × 0.9 × interval hashes stay listed (8 100 at the
    /// default and a 30-minute interval), at most 100 000 a tracker.
    #[arg(long, default_value_t = 5)]
    pub tracker_announces_per_second_max: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            trackers: Vec::new(),
            no_dht: false,
            dht_bootstrap: Vec::new(),
            dht_socket: DhtSocket::Serving,
            dht_port: 0,
            parents: Vec::new(),
            handshake_hold_ms: 1500,
            fetch_timeout_ms: 60_000,
            negative_cache_ms: 600_000,
            fetches_per_shard_max: 64,
            peers_per_fetch_max: 8,
            dht_queries_per_second_max: 20,
            dht_incoming_queries_per_ip_per_second_max: crate::dht::QUERIES_PER_IP_PER_SECOND_MAX,
            dht_incoming_queries_per_second_max: crate::dht::QUERIES_PER_SECOND_MAX,
            misses_per_ip_per_minute_max: 30,
            misses_per_second_max: 100,
            metadata_bytes_max: crate::limits::METADATA_BYTES_MAX,
            no_dht_announce: false,
            dht_announces_per_second_max: 10,
            announce_trackers: Vec::new(),
            tracker_announces_per_second_max: 5,
        }
    }
}

/// Time to establish a TCP connection to an upstream peer: loopback and LAN peers answer in
/// milliseconds, distant ones in hundreds; a peer that takes longer is not worth waiting
/// for while other candidates queue.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream peer's whole exchange (connect, handshakes, every piece). Metadata is a few
/// hundred KiB at most in practice; a peer slower than this is dropped for the next one.
pub const PEER_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest a peer may send nothing while our metadata requests are outstanding before the
/// connection is given up and the peer gets one fresh connection. libtorrent's uTP ends a
/// connection silently (no RESET) once one packet has gone out `utp_num_resends` = 3 times
/// unacked; on a path with 5 % loss that ends about one exchange in 25, and without this
/// the exchange would wait for `PEER_EXCHANGE_TIMEOUT`. A live libtorrent answers a request
/// at once or at its next one-second tick, and its retransmissions (RTO ≥ 500 ms, then
/// +1 s, +2 s) all fall well inside this.
pub const PEER_STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a tracker announce may take within a fetch (BEP 15's retry schedule reaches
/// 15 s after 3 sends); never longer than the fetch itself.
pub const TRACKER_ANNOUNCE_TIMEOUT_MAX: Duration = Duration::from_secs(15);

impl UpstreamConfig {
    /// The fetch of `key` these settings describe, ending at `deadline`.
    pub fn fetch_spec(
        &self,
        key: [u8; 20],
        peer_id: [u8; 20],
        deadline: std::time::Instant,
    ) -> crate::upstream::fetch::FetchSpec {
        crate::upstream::fetch::FetchSpec {
            key,
            peer_id,
            metadata_bytes_max: self
                .metadata_bytes_max
                .min(crate::limits::METADATA_BYTES_MAX),
            peers_max: self.peers_per_fetch_max.max(1),
            connect_timeout: PEER_CONNECT_TIMEOUT,
            peer_timeout: PEER_EXCHANGE_TIMEOUT,
            stall_timeout: PEER_STALL_TIMEOUT,
            deadline,
        }
    }

    /// How long one tracker announce may take.
    pub fn tracker_timeout(&self) -> Duration {
        Duration::from_millis(self.fetch_timeout_ms).min(TRACKER_ANNOUNCE_TIMEOUT_MAX)
    }
}
