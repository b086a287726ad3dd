//! Rate limits of the miss path: a token bucket for global rates (DHT lookups per second,
//! misses per second) and a per-key fixed window with a bounded key table (misses per client
//! IP per minute). Both are thread-safe and read time from `Instant`; the `*_at` variants
//! take the time from the caller so that tests need no sleeps.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sub-token resolution of [`TokenBucket`]: tokens are counted in billionths so that a rate
/// of N per second refills exactly one billionth per (1/N) ns, with integer arithmetic only.
const TOKEN_SCALE: u128 = 1_000_000_000;

/// `rate_per_sec` tokens are added per second, up to `burst`; each `try_take` spends one.
/// A rate or burst of 0 refuses everything (the bound is "none allowed", not "unbounded").
pub struct TokenBucket {
    rate_per_sec: u32,
    burst: u32,
    state: Mutex<BucketState>,
}

struct BucketState {
    /// Tokens available, times `TOKEN_SCALE`.
    scaled_tokens: u128,
    refilled_at: Instant,
}

impl TokenBucket {
    /// Starts full: a burst is allowed right after start-up.
    pub fn new(rate_per_sec: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate_per_sec,
            burst,
            state: Mutex::new(BucketState {
                scaled_tokens: u128::from(burst) * TOKEN_SCALE,
                refilled_at: Instant::now(),
            }),
        }
    }

    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    /// `try_take` at time `now`. A `now` earlier than a previous call's counts as no time
    /// passed (callers on different threads may read the clock in either order).
    pub fn try_take_at(&self, now: Instant) -> bool {
        if self.rate_per_sec == 0 || self.burst == 0 {
            return false;
        }
        let full = u128::from(self.burst) * TOKEN_SCALE;
        // A poisoned lock only means another thread panicked mid-update of two integers;
        // the state is still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.refilled_at);
        if !elapsed.is_zero() {
            // ns * tokens/s = tokens * 1e9 = scaled tokens.
            let added = elapsed.as_nanos() * u128::from(self.rate_per_sec);
            s.scaled_tokens = s.scaled_tokens.saturating_add(added).min(full);
            s.refilled_at = now;
        }
        if s.scaled_tokens >= TOKEN_SCALE {
            s.scaled_tokens -= TOKEN_SCALE;
            debug_assert!(s.scaled_tokens <= full);
            true
        } else {
            false
        }
    }
}

/// Independent locks over the key table so that concurrent misses from different clients
/// rarely contend; 16 is well above the number of serving cores that hit it at once.
const WINDOW_SHARDS: usize = 16;

/// At most `limit` hits per key in each fixed window of `window` (the window of a key starts
/// at its first hit). A fixed window lets a key hit up to 2 × `limit` across a window boundary;
/// that is accepted for a simple, allocation-bounded table.
///
/// The table holds at most `keys_max` keys (rounded up to a multiple of the shard count).
/// When a shard is full, keys whose window has expired are dropped; if it is still full, the
/// new key is refused until a window rolls over. A live key is never forgotten: forgetting
/// it would let an attacker with many source addresses reset its own windows by pushing its
/// entries out. The price, refusing new keys while the table is full of live ones, is why a
/// global limit (a [`TokenBucket`]) sits beside this one and keeps the table from filling.
pub struct PerKeyWindow<K> {
    limit: u32,
    window: Duration,
    keys_per_shard_max: usize,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, WindowEntry>>>,
}

#[derive(Clone, Copy)]
struct WindowEntry {
    started_at: Instant,
    hits: u32,
}

impl<K: Hash + Eq + Clone> PerKeyWindow<K> {
    pub fn new(limit: u32, window: Duration, keys_max: usize) -> PerKeyWindow<K> {
        let keys_per_shard_max = keys_max.div_ceil(WINDOW_SHARDS).max(1);
        PerKeyWindow {
            limit,
            window,
            keys_per_shard_max,
            hasher: RandomState::new(),
            shards: (0..WINDOW_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    pub fn try_hit(&self, key: &K) -> bool {
        self.try_hit_at(key, Instant::now())
    }

    /// `try_hit` at time `now`.
    pub fn try_hit_at(&self, key: &K, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        let shard = (self.hasher.hash_one(key) % WINDOW_SHARDS as u64) as usize;
        let mut map = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(key) {
            if now.saturating_duration_since(e.started_at) < self.window {
                if e.hits >= self.limit {
                    return false;
                }
                e.hits += 1;
            } else {
                *e = WindowEntry {
                    started_at: now,
                    hits: 1,
                };
            }
            return true;
        }
        if map.len() >= self.keys_per_shard_max {
            let window = self.window;
            map.retain(|_, e| now.saturating_duration_since(e.started_at) < window);
            if map.len() >= self.keys_per_shard_max {
                return false;
            }
        }
        map.insert(
            key.clone(),
            WindowEntry {
                started_at: now,
                hits: 1,
            },
        );
        debug_assert!(map.len() <= self.keys_per_shard_max);
        true
    }

    /// Keys tracked now (expired ones included until they are dropped).
    pub fn keys_len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Most keys the table will ever hold.
    pub fn keys_capacity(&self) -> usize {
        self.keys_per_shard_max * WINDOW_SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let b = TokenBucket::new(10, 3);
        let t0 = Instant::now();
        assert!(b.try_take_at(t0));
        assert!(b.try_take_at(t0));
        assert!(b.try_take_at(t0));
        assert!(!b.try_take_at(t0));
        // 10/s: one token per 100 ms.
        assert!(!b.try_take_at(t0 + Duration::from_millis(99)));
        assert!(b.try_take_at(t0 + Duration::from_millis(100)));
        assert!(!b.try_take_at(t0 + Duration::from_millis(150)));
        // A long pause refills only up to the burst.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.try_take_at(t1));
        }
        assert!(!b.try_take_at(t1));
    }

    #[test]
    fn bucket_ignores_time_going_backwards() {
        let b = TokenBucket::new(1, 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(b.try_take_at(t0));
        assert!(!b.try_take_at(t0 - Duration::from_secs(5)));
        assert!(!b.try_take_at(t0));
        assert!(b.try_take_at(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn bucket_with_zero_rate_or_burst_refuses() {
        assert!(!TokenBucket::new(0, 10).try_take());
        assert!(!TokenBucket::new(10, 0).try_take());
    }

    #[test]
    fn bucket_is_shared_between_threads() {
        let b = std::sync::Arc::new(TokenBucket::new(1, 100));
        let taken: usize = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..100).filter(|_| b.try_take()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        // 100 of burst, plus at most a token or two refilled while the threads ran.
        assert!((100..=102).contains(&taken), "{taken}");
    }

    #[test]
    fn window_limits_each_key_and_resets() {
        let w = PerKeyWindow::new(2, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert!(w.try_hit_at(&1u32, t0));
        assert!(w.try_hit_at(&1, t0 + Duration::from_secs(1)));
        assert!(!w.try_hit_at(&1, t0 + Duration::from_secs(2)));
        assert!(w.try_hit_at(&2, t0 + Duration::from_secs(2)));
        assert!(!w.try_hit_at(&1, t0 + Duration::from_millis(59_999)));
        assert!(w.try_hit_at(&1, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn window_with_zero_limit_refuses() {
        let w = PerKeyWindow::new(0, Duration::from_secs(1), 10);
        assert!(!w.try_hit(&"a"));
    }

    #[test]
    fn window_table_stays_bounded_and_never_forgets_a_live_key() {
        let w = PerKeyWindow::new(1, Duration::from_secs(60), 64);
        let t0 = Instant::now();
        let admitted: Vec<u32> = (0..100_000u32)
            .filter(|k| w.try_hit_at(k, t0 + Duration::from_micros(u64::from(*k))))
            .collect();
        assert!(w.keys_len() <= w.keys_capacity());
        assert_eq!(w.keys_capacity(), 64);
        assert!(admitted.len() <= 64, "past the table, new keys are refused");
        // Every admitted key is still remembered and limited: a flood of other keys cannot
        // push it out and reset its window.
        for k in &admitted {
            assert!(
                !w.try_hit_at(k, t0 + Duration::from_secs(1)),
                "key {k} forgotten"
            );
        }
        // Once the window rolls over, new keys come in again.
        assert!(w.try_hit_at(&200_000, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn window_drops_expired_keys_before_live_ones() {
        // 100 keys per shard. Fill every shard past capacity with keys that then expire;
        // a live key must survive later inserts (expired keys go first), as long as its
        // shard does not fill with live keys (200 live keys over 16 shards: ~12 each).
        let w = PerKeyWindow::new(1, Duration::from_millis(10), 1600);
        let t0 = Instant::now();
        for k in 0..5000u32 {
            w.try_hit_at(&k, t0);
        }
        let t1 = t0 + Duration::from_millis(20);
        assert!(w.try_hit_at(&10_000, t1));
        for k in 20_000..20_200u32 {
            assert!(w.try_hit_at(&k, t1 + Duration::from_millis(1)));
        }
        assert!(!w.try_hit_at(&10_000, t1 + Duration::from_millis(2)));
        assert!(w.keys_len() <= w.keys_capacity());
    }
}
