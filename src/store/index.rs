//! In-memory index: 20-byte handshake key -> record.
//!
//! Keys are the v1 SHA-1 and/or the first 20 bytes of the v2 SHA-256 (what a peer sends in its
//! handshake); a hybrid record sits under both. Full v2 lookups go through the prefix and compare
//! the whole hash in the record header. The map is split into `INDEX_SHARDS` locks by key, so a
//! writer publishing one record blocks only the readers of its one or two shards.
//!
//! Beside it, `HASH('req2', key) -> key` for every key (MSE, `crate::mse`): an encrypted
//! peer names its torrent only by that hash, so the server finds the key with one lookup
//! here and the record with one more. It is maintained by the same calls (`publish`,
//! `remove`; `replace` keeps the keys) under the key's stripe lock, so the two maps never
//! disagree for longer than a lookup between them. Cost: a `([u8; 20], [u8; 20])` slot,
//! 40 bytes + 1 control byte, at hashbrown's load of 7/16..7/8: 47–94 bytes per key (a
//! hybrid record has two), against 49–112 bytes per key for the main map's
//! `([u8; 20], RecordRef)` slots (48 + 1).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::metainfo::InfoHashes;
use crate::mse::req2_hash;

use super::record::RecordRef;

/// Lock stripes. More than any core count we run on, so two readers rarely share a stripe with a
/// writer; few enough that the empty maps cost nothing.
const INDEX_SHARDS: usize = 64;

type Stripe = RwLock<HashMap<[u8; 20], RecordRef>>;
type Req2Stripe = RwLock<HashMap<[u8; 20], [u8; 20]>>;

pub(crate) struct Index {
    shards: Box<[Stripe]>,
    /// `HASH('req2', key) -> key`, striped by the req2 hash. Lock order: a main stripe
    /// before a req2 stripe.
    req2: Box<[Req2Stripe]>,
}

/// The stripe of a key. Uses bytes 8..16, not the 0..8 that `Store::shard_of` uses, so the
/// stripes a writer shard touches are spread over all of them.
fn stripe_of(key: &[u8; 20]) -> usize {
    let word = u64::from_le_bytes(key[8..16].try_into().expect("8 bytes"));
    (word % INDEX_SHARDS as u64) as usize
}

impl Index {
    pub fn new() -> Self {
        Index {
            shards: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
            req2: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
        }
    }

    /// The handshake key whose `HASH('req2', key)` is `req2`.
    pub fn get_req2(&self, req2: &[u8; 20]) -> Option<[u8; 20]> {
        self.req2[stripe_of(req2)]
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(req2)
            .copied()
    }

    /// Entries in the req2 map (one per key in the main map, tests check).
    #[cfg(test)]
    pub fn req2_len(&self) -> usize {
        self.req2
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Files `key` under its req2 hash; the caller holds `key`'s main stripe write lock.
    fn insert_req2(&self, key: &[u8; 20]) {
        let h = req2_hash(key);
        self.req2[stripe_of(&h)]
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(h, *key);
    }

    /// Takes `key`'s req2 entry out; the caller holds `key`'s main stripe write lock.
    fn remove_req2(&self, key: &[u8; 20]) {
        let h = req2_hash(key);
        self.req2[stripe_of(&h)]
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&h);
    }

    pub fn get(&self, key: &[u8; 20]) -> Option<RecordRef> {
        let shard = self.shards[stripe_of(key)]
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shard.get(key).cloned()
    }

    /// The record already filed under any of these hashes' keys.
    pub fn get_any(&self, hashes: &InfoHashes) -> Option<RecordRef> {
        hashes.handshake_keys().find_map(|k| self.get(&k))
    }

    /// File `record` under all its keys, unless one of them is taken: then nothing is filed and
    /// the holder is returned (first wins). All affected stripes are locked together, in stripe
    /// order, so a hybrid record is never visible under one key only.
    pub fn publish(&self, hashes: &InfoHashes, record: &RecordRef) -> Result<(), RecordRef> {
        let mut keys: Vec<[u8; 20]> = hashes.handshake_keys().collect();
        debug_assert!(!keys.is_empty());
        keys.sort_by_key(stripe_of);
        let mut stripes: Vec<usize> = keys.iter().map(stripe_of).collect();
        stripes.dedup();
        let mut guards: Vec<_> = stripes
            .iter()
            .map(|&s| {
                (
                    s,
                    self.shards[s]
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                )
            })
            .collect();
        let guard_of = |guards: &[(usize, _)], s: usize| {
            guards.iter().position(|(g, _)| *g == s).expect("locked")
        };
        for key in &keys {
            let i = guard_of(&guards, stripe_of(key));
            if let Some(existing) = guards[i].1.get(key) {
                return Err(existing.clone());
            }
        }
        for key in &keys {
            let i = guard_of(&guards, stripe_of(key));
            guards[i].1.insert(*key, record.clone());
            self.insert_req2(key);
        }
        Ok(())
    }

    /// Refile `new` (a copy of `old` that eviction moved to another segment) under every key
    /// of `hashes` still naming `old`, all stripes locked together like `publish`. Returns
    /// false, and changes nothing, when no key names `old` any more (deleted or blocked
    /// meanwhile).
    pub fn replace(&self, hashes: &InfoHashes, old: &RecordRef, new: &RecordRef) -> bool {
        let mut keys: Vec<[u8; 20]> = hashes.handshake_keys().collect();
        keys.sort_by_key(stripe_of);
        let mut stripes: Vec<usize> = keys.iter().map(stripe_of).collect();
        stripes.dedup();
        let mut guards: Vec<_> = stripes
            .iter()
            .map(|&s| {
                (
                    s,
                    self.shards[s]
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                )
            })
            .collect();
        let mut replaced = false;
        for key in &keys {
            let s = stripe_of(key);
            let (_, guard) = guards.iter_mut().find(|(g, _)| *g == s).expect("locked");
            if let Some(slot) = guard.get_mut(key) {
                if slot.same_record(old) {
                    *slot = new.clone();
                    replaced = true;
                }
            }
        }
        replaced
    }

    /// Take every key of `hashes` out of the index where it still names `record` (a key
    /// refiled since names another record and stays). Returns whether anything was removed.
    pub fn remove(&self, hashes: &InfoHashes, record: &RecordRef) -> bool {
        let mut removed = false;
        for key in hashes.handshake_keys() {
            let mut stripe = self.shards[stripe_of(&key)]
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if stripe.get(&key).is_some_and(|r| r.same_record(record)) {
                stripe.remove(&key);
                self.remove_req2(&key);
                removed = true;
            }
        }
        removed
    }

    /// Calls `f` once per (key, record) pair, one stripe at a time (a stripe's read lock is
    /// held while `f` runs on its entries, so keep `f` short). A hybrid record is seen under
    /// both its keys.
    pub fn for_each(&self, mut f: impl FnMut(&[u8; 20], &RecordRef)) {
        for stripe in self.shards.iter() {
            let stripe = stripe
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (k, r) in stripe.iter() {
                f(k, r);
            }
        }
    }
}
