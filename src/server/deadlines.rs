//! The deadlines of many connections in one heap, kept lazily: moving a deadline pushes a
//! new entry and leaves the old one, which is dropped when it comes up because its owner
//! no longer names that time. Re-arming costs a push, never a search. Used by the uTP
//! endpoint (`udp.rs`) and the io_uring path (`uring/`).

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

    /// Adds `key`'s deadline `at`; true if it is now the earliest (a sleeper on `next`
    /// must wake sooner).
    pub fn schedule(&mut self, at: T, key: K) -> bool {
        let earliest = self.next().is_none_or(|e| at < e);
        self.heap.push(Reverse((at, key)));
        earliest
    }

    /// The earliest entry's time (possibly a stale one: waking for it costs one turn).
    pub fn next(&self) -> Option<T> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Drops every stale entry (`current(key) != Some(at)`) in one pass. A caller whose
    /// owners go away long before their deadlines (a uTP connection closes in
    /// milliseconds, its 5 s connect or 10 s FIN-wait entry stays) calls this when the
    /// heap has grown well past its live owners: every push and pop is a walk of
    /// log2(len) levels, and tens of thousands of dead entries made the heap the largest
    /// user-space cost of a uTP fetch after the send path (BENCHMARKS.md "uTP cost").
    pub fn retain_current(&mut self, mut current: impl FnMut(K) -> Option<T>) {
        self.heap
            .retain(|Reverse((at, key))| current(*key) == Some(*at));
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
        assert!(d.schedule(10u64, 1u32));
        assert!(d.schedule(5, 2));
        assert!(!d.schedule(7, 1)); // key 1 moved to 7: its entry at 10 is stale
        let current = |k: u32| match k {
            1 => Some(7),
            2 => Some(5),
            _ => None,
        };
        assert_eq!(d.pop_due(4, current), None);
        assert_eq!(d.pop_due(20, current), Some(2));
        assert_eq!(d.pop_due(20, current), Some(1));
        assert_eq!(d.pop_due(20, current), None); // the stale 10 was dropped
        assert_eq!(d.next(), None);
    }

    #[test]
    fn retain_current_drops_only_stale_entries() {
        let mut d = Deadlines::with_capacity(8);
        for (at, key) in [(10u64, 1u32), (7, 1), (20, 2), (30, 3), (5, 4)] {
            d.schedule(at, key);
        }
        // key 1 now holds 7 (10 is stale), key 3 is gone, key 4 moved to 50.
        let current = |k: u32| match k {
            1 => Some(7),
            2 => Some(20),
            4 => Some(50),
            _ => None,
        };
        d.retain_current(current);
        assert_eq!(d.len(), 2);
        assert_eq!(d.pop_due(100, current), Some(1));
        assert_eq!(d.pop_due(100, current), Some(2));
        assert_eq!(d.pop_due(100, current), None);
    }
}
