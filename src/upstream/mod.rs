//! The miss path: find peers for an unknown info-hash (the connecting client, PEX,
//! trackers, the DHT, magnet hints, parent nodes), fetch the metadata from several of them
//! at once over BEP 9, verify it against the info-hash, store it, wake the waiting clients.
//!
//! - `config`   every knob and bound of the miss path
//! - `ratelimit` token bucket and bounded per-key windows (DHT lookups/s, misses per IP)
//! - `shard`    per-core fetch table: one fetch per info-hash in its owning shard, waiters
//! - `fill`     one miss: the shared tier, then the swarm's sources and the fetch
//! - `tracker`  announce types, dispatch by scheme, all trackers of a fetch at once
//! - `tracker_http` BEP 3/23/7 HTTP announce (ureq) and response parsing
//! - `tracker_udp`  BEP 15 UDP announce: connect, connection-id cache, retransmission
//! - `dht`      Mainline DHT node (BEP 5): rate-limited get_peers lookups, announces
//! - `announce` which stored hashes to keep announced (DHT, --announce-tracker), and when
//! - `cli`      `magnetar fetch <magnet>`
//! - `fetch`    one fetch: up to N peers at once, first verified dict wins, liars banned
//! - `peer`     one upstream peer connection: handshakes, pipelined BEP 9 requests
//! - `utp_stream` an outgoing uTP connection (monoio UDP socket + `utp::Connection`)
//! - `assemble` sans-IO: pieces from one peer into the info dict, checked against the key

pub mod announce;
pub mod assemble;
pub mod cli;
pub mod config;
pub mod dht;
pub mod fetch;
pub mod fill;
pub mod peer;
pub mod ratelimit;
pub mod shard;
pub mod stats;
pub mod tracker;
pub mod tracker_http;
pub mod tracker_udp;
pub mod utp_stream;

use std::net::SocketAddr;

/// Where a peer address came from. BEP 27: a private torrent's metadata is never taken
/// from peers found through the DHT or PEX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerSource {
    /// The client connected to us (its own connection, or its listen port).
    Client,
    /// A ut_pex message from a connected client.
    Pex,
    /// A tracker's announce response.
    Tracker,
    /// A Mainline DHT get_peers lookup.
    Dht,
    /// `x.pe` of a submitted magnet.
    Magnet,
    /// A configured parent magnetar node.
    Parent,
}

impl PeerSource {
    /// May metadata of a private torrent come from a peer found this way (BEP 27)?
    pub fn allowed_for_private(self) -> bool {
        !matches!(self, PeerSource::Pex | PeerSource::Dht)
    }

    pub fn name(self) -> &'static str {
        match self {
            PeerSource::Client => "client",
            PeerSource::Pex => "pex",
            PeerSource::Tracker => "tracker",
            PeerSource::Dht => "dht",
            PeerSource::Magnet => "magnet",
            PeerSource::Parent => "parent",
        }
    }
}

/// A BEP 20 peer id, `-MX0100-` and 12 digits that differ per process and per `salt`
/// (`MX`: magnetar's own client code; `MG` is MediaGet's, and clients showed us as that)
/// (a worker index): peers only compare ids for equality, so they need not be random.
pub fn peer_id(salt: u64) -> [u8; 20] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed =
        nanos ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut id = *b"-MX0100-000000000000";
    for (i, b) in id[8..].iter_mut().enumerate() {
        *b = b'0' + ((seed >> (i * 5)) % 10) as u8;
    }
    id
}

/// A peer worth trying for a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCandidate {
    pub addr: SocketAddr,
    pub source: PeerSource,
}
