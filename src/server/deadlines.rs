//! The deadlines of many connections in one heap, kept lazily: moving a deadline pushes a
//! new entry and leaves the old one, which is dropped when it comes up because its owner
//! no longer names that time. Re-arming costs a push, never a search. Used by the uTP
//! endpoint (`udp.rs`) and the io_uring path (`uring/`).
//!
//! An owner that goes away long before its deadline (a uTP connection closes in
//! milliseconds, its 5 s connect or 10 s FIN-wait entry stays; a TCP link's idle deadline
//! outlives the link) would leave its entries until they come due: tens of thousands at a
//! few thousand connections per second, every push and pop walking them (~2 % of a uTP
//! fetch's server CPU, BENCHMARKS.md "uTP cost", fifth pass). So `schedule` sweeps the
//! stale entries once they outnumber the live owners' (amortised O(1) per push).

/// Entries allowed beyond two per live owner before `schedule` sweeps the stale ones: the
/// heap stays a few levels deep, and a core with few connections never sweeps.
pub const STALE_ENTRIES_SLACK: usize = 256;

use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub struct Deadlines<T, K> {
    heap: BinaryHeap<Reverse<(T, K)>>,
}

impl<T: Ord + Copy, K: Ord + Copy> Deadlines<T, K> {
    /// Room for `n` entries up front (the io_uring path reserves its whole table, so the
    /// heap never grows by copying).
    pub fn with_capacity(n: usize) -> Self {
        Deadlines {
            heap: BinaryHeap::with_capacity(n),
        }
    }

    /// Adds `key`'s deadline `at` (its owner already holds `at`); true if it is now the
    /// earliest (a sleeper on `next` must wake sooner). `live` owners exist now and
    /// `current` names each one's deadline (as for `pop_due`): when the heap holds more
    /// than `2 * live + STALE_ENTRIES_SLACK` entries, the stale ones are dropped first;
    /// at least half go each time.
    pub fn schedule(
        &mut self,
        at: T,
        key: K,
        live: usize,
        mut current: impl FnMut(K) -> Option<T>,
    ) -> bool {
        if self.heap.len() >= 2 * live + STALE_ENTRIES_SLACK {
            self.heap
                .retain(|Reverse((at, key))| current(*key) == Some(*at));
        }
        let earliest = self.next().is_none_or(|e| at < e);
        self.heap.push(Reverse((at, key)));
        earliest
    }

    /// The earliest entry's time (possibly a stale one: waking for it costs one turn).
    pub fn next(&self) -> Option<T> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next entry due by `now` whose deadline is still the one its owner holds
    /// (`current(key) == Some(at)`); stale entries before it are dropped.
    pub fn pop_due(&mut self, now: T, mut current: impl FnMut(K) -> Option<T>) -> Option<K> {
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if current(key) == Some(at) {
                return Some(key);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_entries_are_skipped_and_due_ones_come_in_order() {
        let mut d = Deadlines::with_capacity(4);
        let current = |k: u32| match k {
            1 => Some(7),
            2 => Some(5),
            _ => None,
        };
        assert!(d.schedule(10u64, 1u32, 2, current));
        assert!(d.schedule(5, 2, 2, current));
        assert!(!d.schedule(7, 1, 2, current)); // key 1 moved to 7: its entry at 10 is stale
        assert_eq!(d.pop_due(4, current), None);
        assert_eq!(d.pop_due(20, current), Some(2));
        assert_eq!(d.pop_due(20, current), Some(1));
        assert_eq!(d.pop_due(20, current), None); // the stale 10 was dropped
        assert_eq!(d.next(), None);
    }

    /// Owners that come and go far faster than their deadlines: the heap stays within
    /// the bound instead of holding every entry until it is due.
    #[test]
    fn entries_of_owners_long_gone_are_swept_on_schedule() {
        let mut d = Deadlines::with_capacity(0);
        let live = 4u32;
        for n in 0..10_000u32 {
            // Owners n-3 ..= n exist, each holding its deadline 1 000 000 + itself.
            let current = |k: u32| (k + live > n && k <= n).then_some(1_000_000 + u64::from(k));
            d.schedule(1_000_000 + u64::from(n), n, live as usize, current);
            assert!(
                d.heap.len() <= 2 * live as usize + STALE_ENTRIES_SLACK + 1,
                "at {n}"
            );
        }
        // The live owners' entries are all still there, in order.
        let current = |k: u32| (k >= 10_000 - live).then_some(1_000_000 + u64::from(k));
        let due: Vec<u32> = std::iter::from_fn(|| d.pop_due(u64::MAX, current)).collect();
        assert_eq!(due, (10_000 - live..10_000).collect::<Vec<_>>());
    }
}
