//! Our Mainline DHT node (BEP 5, 32, 42, 43, 51), sans-IO (docs/dht.md):
//! - `krpc`  the message codec: any-length transaction ids, tolerant of `v`/`ip` variants
//! - `table` the routing table of one address family (k-buckets by XOR distance)
//! - `node`  the node: answers queries, runs lookups and announces, stores announced peers,
//!   lists our own serving address for what we hold, samples it for BEP 51
//!
//! The sockets and threads are in `upstream::dht`, which drives a `node::Node`.
//!
//! Why our own and not a crate (measured in the issue 21 note): the `mainline` crate 8
//! drops every message whose `t` is not 4 bytes (so libtorrent's 2-byte queries go
//! unanswered), is IPv4-only and has no BEP 51; `librqbit-dht` 9 echoes any `t` and is
//! dual-stack but has no BEP 51, no hook to list our own address in `values`, and binds its
//! own socket. The KRPC layer is small; owning it gives all of that in one place.

pub mod krpc;
pub mod node;
pub mod table;

use std::net::IpAddr;
use std::time::Duration;

/// A node id or an info-hash: 160 bits in the same XOR metric.
pub type NodeId = [u8; 20];

/// Nodes per bucket, and nodes a lookup ends at (BEP 5's K).
pub const K: usize = 8;

/// Transaction ids longer than this are not echoed: no client sends more than 8 bytes, and
/// a reply must stay small whatever a query carries.
pub const TRANSACTION_ID_BYTES_MAX: usize = 32;

/// Peers taken from one response's `values`: a full answer is ~100 (libtorrent caps what it
/// sends to fit a 1 500-byte datagram); more would only be a hostile node's padding.
pub const VALUES_PER_RESPONSE_MAX: usize = 200;

/// Peers we put in one `get_peers` answer's `values`: 50 IPv6 peers (18 bytes each) plus
/// 8 nodes of each family (26 and 38 bytes) stay under a 1 500-byte datagram.
pub const VALUES_SENT_MAX: usize = 50;

/// Datagrams longer than this are dropped unread: a KRPC message fits one unfragmented
/// datagram (BEP 5 answers are well under 1 500 bytes).
pub const DATAGRAM_BYTES_MAX: usize = 2048;

/// Queries a lookup keeps in flight at once (BEP 5's alpha; libtorrent uses 3 with a
/// short timeout, we use 4 to keep the miss path's first answer early).
pub const LOOKUP_PARALLEL_QUERIES: usize = 4;

/// Candidate nodes one lookup remembers (closest first); farther ones are forgotten.
pub const LOOKUP_CANDIDATES_MAX: usize = 128;

/// A query unanswered this long has failed (mainline's and jech's 2 s).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A lookup ends this long after it started, whatever is still in flight: on the public
/// DHT a lookup converges in a few round trips of ≤ 2 s each.
pub const LOOKUP_LIFETIME_MAX: Duration = Duration::from_secs(30);

/// Queries of ours in flight at once (all lookups, pings): bounds the transaction table.
pub const INFLIGHT_QUERIES_MAX: usize = 4096;

/// How long an announced peer is listed: libtorrent's `announce_interval * 3 / 2`
/// (45 minutes); jech's dht.c keeps 32 minutes.
pub const PEER_LIFETIME: Duration = Duration::from_secs(45 * 60);

/// Info-hashes we store announced peers for, and peers per hash. A node stores only what
/// the nodes closest to it announce; libtorrent's defaults are 3 000 and 100.
pub const STORED_HASHES_MAX: usize = 3000;
pub const STORED_PEERS_PER_HASH_MAX: usize = 100;

/// Our tokens' secret changes this often; a token from the previous secret is still
/// accepted, so a token lives 5 to 10 minutes (BEP 5: "tokens up to ten minutes old").
pub const TOKEN_ROTATE_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// A node that failed this many queries in a row leaves the routing table.
pub const NODE_FAILURES_MAX: u8 = 3;

/// How often the routing table is refreshed by a lookup of our own id (and a random one),
/// and how soon a table with fewer than K nodes bootstraps again.
pub const TABLE_REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
pub const REBOOTSTRAP_INTERVAL: Duration = Duration::from_secs(30);

/// BEP 51: hashes in one `samples` answer (20 bytes each; libtorrent sends at most 20 so
/// the answer fits a datagram beside 8 nodes of each family).
pub const SAMPLES_PER_RESPONSE_MAX: usize = 20;

/// BEP 51 `interval`: seconds a crawler should wait before asking us again. Our sample is
/// redrawn this often; shorter than libtorrent's 6 hours because a cache's holdings change
/// by the minute and we want indexers to see more of them.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Queries answered per source address per second; more are dropped unanswered. An answer
/// can be ~14x its query (a 100-byte `get_peers` draws up to ~1.4 KB), so a spoofed source
/// must not draw them without bound. libtorrent blocks above 5 a second
/// (`dht_block_ratelimit`); we allow more because one NAT can hide many clients and a
/// crawler's BEP 51 sweep asks often.
pub const QUERIES_PER_IP_PER_SECOND_MAX: u32 = 100;

/// Queries answered per second over all sources; more are dropped unanswered. The
/// per-address budget alone lets a spoofer who cycles through many source addresses draw
/// 100 answers a second from each (up to ~1.4 KB per ~100-byte query): this bounds what
/// our node can be made to reflect in all, to ~1.4 MB/s at the default. A busy node on the
/// public DHT receives tens to a few hundred queries a second, so real traffic stays well
/// under it; an operator with a node that many more clients use can raise it
/// (`--dht-incoming-queries-per-second-max`).
pub const QUERIES_PER_SECOND_MAX: u32 = 1000;

/// Source addresses the per-address query budget tracks at once (bounded memory; see
/// `upstream::ratelimit::PerKeyWindow` for what happens when it is full of live ones).
pub const QUERY_LIMITER_IPS_MAX: usize = 65_536;

/// BEP 42: responses whose `ip` must agree before we take it as our external address and
/// derive our id from it; distinct voters, so one node cannot move us.
pub const EXTERNAL_IP_VOTES_NEEDED: usize = 3;

/// The distance between two ids (XOR), compared as big-endian numbers.
pub fn distance(a: &NodeId, b: &NodeId) -> NodeId {
    let mut d = [0u8; 20];
    for i in 0..20 {
        d[i] = a[i] ^ b[i];
    }
    d
}

/// CRC-32C (Castagnoli), the checksum BEP 42 derives node ids with. Bitwise: it runs once
/// per external-address change and once per id check.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The 21 id bits BEP 42 fixes for `ip` and the random byte `r` (of which 3 bits count).
fn bep42_prefix(ip: IpAddr, r: u8) -> u32 {
    let mut buf = [0u8; 8];
    let n = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let mask = [0x03, 0x0f, 0x3f, 0xff];
            for i in 0..4 {
                buf[i] = o[i] & mask[i];
            }
            4
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mask = [0x01, 0x03, 0x07, 0x0f, 0x1f, 0x3f, 0x7f, 0xff];
            for i in 0..8 {
                buf[i] = o[i] & mask[i];
            }
            8
        }
    };
    buf[0] |= (r & 0x7) << 5;
    crc32c(&buf[..n])
}

/// A BEP 42 node id for external address `ip`: the first 21 bits from the CRC of the
/// masked address and `random[19] & 7`; the rest from `random`.
pub fn bep42_id(ip: IpAddr, random: [u8; 20]) -> NodeId {
    let crc = bep42_prefix(ip, random[19]);
    let mut id = random;
    id[0] = (crc >> 24) as u8;
    id[1] = (crc >> 16) as u8;
    id[2] = ((crc >> 8) as u8 & 0xf8) | (random[2] & 0x7);
    id
}

/// Whether `id` is a valid BEP 42 id for `ip`. Local and loopback addresses are exempt, as
/// BEP 42 says.
pub fn bep42_valid(id: &NodeId, ip: IpAddr) -> bool {
    if is_local(ip) {
        return true;
    }
    let crc = bep42_prefix(ip, id[19]);
    id[0] == (crc >> 24) as u8
        && id[1] == (crc >> 16) as u8
        && id[2] & 0xf8 == (crc >> 8) as u8 & 0xf8
}

/// Addresses BEP 42 exempts: loopback, private, link-local, unique-local.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_local(IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// The table of BEP 42 (ip, rand, id prefix).
    #[test]
    fn bep42_test_vectors() {
        let cases = [
            ("124.31.75.21", 1u8, [0x5f, 0xbf, 0xbf]),
            ("21.75.31.124", 86, [0x5a, 0x3c, 0xe9]),
            ("65.23.51.170", 22, [0xa5, 0xd4, 0x32]),
            ("84.124.73.14", 65, [0x1b, 0x03, 0x21]),
            ("43.213.53.83", 90, [0xe5, 0x6f, 0x6c]),
        ];
        for (ip, r, prefix) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            let mut random = [0u8; 20];
            random[19] = r;
            // The vectors' third byte keeps its random low bits from the example ids.
            random[2] = prefix[2] & 7;
            let id = bep42_id(ip, random);
            assert_eq!(&id[..3], &prefix, "{ip}");
            assert_eq!(id[19], r);
            assert!(bep42_valid(&id, ip));
            let mut other = id;
            other[0] ^= 0x80;
            assert!(!bep42_valid(&other, ip));
        }
        assert!(bep42_valid(&[0; 20], "127.0.0.1".parse().unwrap()));
    }
}
