//! The routing table of one address family (BEP 5; BEP 32 keeps IPv4 and IPv6 apart):
//! 160 buckets of at most K nodes, bucket `i` holding the nodes whose XOR distance to our id
//! has `i` leading zero bits. That is what a fully split Kademlia tree holds near our id and
//! what its far buckets hold, without the splitting.
//!
//! Only nodes that answered one of our queries go in (a node that merely queried us is
//! pinged first: the node decides that). A full bucket takes a newcomer only in place of a
//! node that has failed a query; nodes leave after [`NODE_FAILURES_MAX`] failures in a row.

use std::net::SocketAddr;
use std::time::Instant;

use crate::dht::{distance, NodeId, K, NODE_FAILURES_MAX};

#[derive(Clone, Debug)]
pub struct Entry {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub last_ok: Instant,
    pub failures: u8,
}

pub struct Table {
    own: NodeId,
    buckets: Vec<Vec<Entry>>,
}

fn bucket_index(own: &NodeId, id: &NodeId) -> usize {
    let d = distance(own, id);
    let zeros = d
        .iter()
        .position(|&b| b != 0)
        .map_or(160, |i| i * 8 + d[i].leading_zeros() as usize);
    zeros.min(159)
}

impl Table {
    pub fn new(own: NodeId) -> Table {
        Table {
            own,
            buckets: vec![Vec::new(); 160],
        }
    }

    /// Our id changed (BEP 42): every node is filed again by its distance to the new one.
    pub fn set_own(&mut self, own: NodeId) {
        let all: Vec<Entry> = self.buckets.iter_mut().flat_map(std::mem::take).collect();
        self.own = own;
        for e in all {
            let b = &mut self.buckets[bucket_index(&own, &e.id)];
            if b.len() < K {
                b.push(e);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether node `id` at `addr` is in the table.
    pub fn contains(&self, id: &NodeId, addr: &SocketAddr) -> bool {
        self.buckets[bucket_index(&self.own, id)]
            .iter()
            .any(|e| e.id == *id && e.addr == *addr)
    }

    /// Whether `id` would be taken now (not ours, its bucket has room or a failing node).
    pub fn would_take(&self, id: &NodeId) -> bool {
        if *id == self.own {
            return false;
        }
        let b = &self.buckets[bucket_index(&self.own, id)];
        b.len() < K || b.iter().any(|e| e.failures > 0 || e.id == *id)
    }

    /// Node `id` at `addr` answered us at `now`. Returns whether it is in the table.
    pub fn heard_from(&mut self, id: NodeId, addr: SocketAddr, now: Instant) -> bool {
        if id == self.own {
            return false;
        }
        let b = &mut self.buckets[bucket_index(&self.own, &id)];
        if let Some(e) = b.iter_mut().find(|e| e.id == id) {
            // A known id from a new address is taken only if the old one stopped answering:
            // otherwise anyone could move a node by claiming its id.
            if e.addr != addr && e.failures == 0 {
                return false;
            }
            e.addr = addr;
            e.last_ok = now;
            e.failures = 0;
            return true;
        }
        let entry = Entry {
            id,
            addr,
            last_ok: now,
            failures: 0,
        };
        if b.len() < K {
            b.push(entry);
            return true;
        }
        // Replace the node that failed most, if any did.
        if let Some(worst) = b
            .iter_mut()
            .filter(|e| e.failures > 0)
            .max_by_key(|e| e.failures)
        {
            *worst = entry;
            return true;
        }
        false
    }

    /// A query to `addr` timed out.
    pub fn failed(&mut self, addr: &SocketAddr) {
        for b in &mut self.buckets {
            if let Some(i) = b.iter().position(|e| e.addr == *addr) {
                b[i].failures += 1;
                if b[i].failures >= NODE_FAILURES_MAX {
                    b.swap_remove(i);
                }
                return;
            }
        }
    }

    /// Up to `n` nodes closest to `target`, closest first.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<(NodeId, SocketAddr)> {
        let mut all: Vec<(NodeId, NodeId, SocketAddr)> = self
            .buckets
            .iter()
            .flatten()
            .map(|e| (distance(&e.id, target), e.id, e.addr))
            .collect();
        // n is small (K); a partial sort would save nothing worth the code at ≤ 1 280 nodes.
        all.sort_unstable_by_key(|e| e.0);
        all.into_iter().take(n).map(|(_, id, a)| (id, a)).collect()
    }

    /// Every node (for tests and metrics).
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: u8, last: u8) -> NodeId {
        let mut i = [0u8; 20];
        i[0] = first;
        i[19] = last;
        i
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], n))
    }

    #[test]
    fn a_full_bucket_takes_a_newcomer_only_for_a_failing_node() {
        let now = Instant::now();
        let mut t = Table::new([0; 20]);
        // All in bucket 0 (top bit differs from ours).
        for i in 0..K as u8 {
            assert!(t.heard_from(id(0x80, i), addr(u16::from(i)), now));
        }
        assert!(!t.heard_from(id(0x80, 99), addr(99), now));
        assert!(!t.would_take(&id(0x80, 99)));
        t.failed(&addr(3));
        assert!(t.would_take(&id(0x80, 99)));
        assert!(t.heard_from(id(0x80, 99), addr(99), now));
        assert!(!t.contains(&id(0x80, 3), &addr(3)));
        assert_eq!(t.len(), K);
    }

    #[test]
    fn a_known_id_does_not_move_while_it_answers() {
        let now = Instant::now();
        let mut t = Table::new([0; 20]);
        assert!(t.heard_from(id(1, 1), addr(1), now));
        assert!(!t.heard_from(id(1, 1), addr(2), now));
        assert!(t.contains(&id(1, 1), &addr(1)));
        assert!(!t.heard_from([0; 20], addr(3), now), "our own id");
    }

    #[test]
    fn failing_nodes_leave_and_closest_is_by_xor() {
        let now = Instant::now();
        let mut t = Table::new([0; 20]);
        for i in 1..=5u8 {
            t.heard_from(id(i, 0), addr(u16::from(i)), now);
        }
        let c = t.closest(&id(4, 0), 2);
        assert_eq!(c, [(id(4, 0), addr(4)), (id(5, 0), addr(5))]);
        for _ in 0..NODE_FAILURES_MAX {
            t.failed(&addr(4));
        }
        assert_eq!(t.len(), 4);
        t.set_own(id(5, 0));
        assert_eq!(t.len(), 4);
    }
}
