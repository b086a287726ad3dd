//! In-memory index: 20-byte handshake key -> record, and `HASH('req2', key)` -> record.
//!
//! Keys are the v1 SHA-1 and/or the first 20 bytes of the v2 SHA-256 (what a peer sends in its
//! handshake); a hybrid record sits under both. Full v2 lookups go through the prefix and compare
//! the whole hash in the record header. An MSE peer names its torrent only by
//! `HASH('req2', key)` (`crate::mse`): the req2 map files every key under that hash too.
//!
//! # Layout: 8 bytes per entry, the key itself stays on disk
//! Both maps are open-addressed tables (linear probing) of one `u64` per entry:
//!
//! | bits   | field                                                              |
//! |--------|--------------------------------------------------------------------|
//! | 63..38 | tag: 26 bits of the keyed hash of the key (or of the req2 hash)    |
//! | 37..24 | segment slot (1.., `SegmentSlots`; 0 never, so an entry is never 0) |
//! | 23..0  | record header offset / 8 (records are 8-aligned)                   |
//!
//! The full key is not kept: a tag match is confirmed against the record header in the
//! mapping (the v1 hash and the v2 hash are in it), and for the req2 map by hashing the
//! header's key(s) with `req2_hash`. The tag is also what places an entry (its home slot is
//! `tag × capacity / 2^26`), so the table grows without reading a single header. A table
//! grows to a load of `LOAD_AFTER_GROW_PERCENT` when it passes `LOAD_MAX_PERCENT` (any size,
//! not powers of two), so a record with one key costs two entries, 16 bytes / load:
//! 19–27 bytes of anonymous memory, against 100–200 for the hashbrown maps this replaces
//! (`HashMap<[u8; 20], RecordRef>` and `HashMap<[u8; 20], [u8; 20]>`). Deletion shifts the
//! following entries back (no tombstones), so a table never fills with dead slots.
//!
//! The hash is SipHash-1-3 under 128 random bits per store (persisted with the index
//! checkpoint, `recovery::Checkpoint`): the keys are hashes of content an outsider chooses,
//! and unkeyed bits would let them fill one stretch of a table with crafted dicts.
//!
//! # Concurrency
//! Each map is split into `INDEX_SHARDS` tables behind their own `RwLock` (stripe = 6 bits
//! of the hash): a reader takes one read lock, probes a few adjacent words, and confirms in
//! the mapping; a writer publishing one record blocks only the readers of its stripes.
//! Lock order: main stripes in stripe order, then req2 stripes, then the slot mutex, then a
//! slot's lock.
//!
//! # Segment slots
//! An entry names its segment by a 14-bit slot in a fixed table of `Arc<Segment>`
//! (`SEGMENT_SLOTS`, 256 KiB); a slot is taken when a segment gets its first entry and freed
//! when its last entry goes (eviction, deletes), so the index, like the `RecordRef`s it
//! replaced, holds a segment mapped exactly while it names records in it.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::limits::{INDEX_SEGMENT_BYTES_MAX, INDEX_SEGMENT_SLOTS};
use crate::metainfo::InfoHashes;
use crate::mse::req2_hash;

use super::record::{Header, RecordRef, FLAG_V1, FLAG_V2, HEADER_BYTES, RECORD_ALIGN};
use super::segment::Segment;

/// Lock stripes. More than any core count we run on, so two readers rarely share a stripe with a
/// writer; few enough that the empty tables cost nothing.
pub(crate) const INDEX_SHARDS: usize = 64;
const STRIPE_BITS: u32 = 6;
const _: () = assert!(1 << STRIPE_BITS == INDEX_SHARDS);

const TAG_BITS: u32 = 26;
const SLOT_BITS: u32 = 14;
const OFFSET_BITS: u32 = 24;
const _: () = assert!(TAG_BITS + SLOT_BITS + OFFSET_BITS == 64);
const _: () = assert!(INDEX_SEGMENT_SLOTS == 1 << SLOT_BITS);
const _: () = assert!(INDEX_SEGMENT_BYTES_MAX as usize == RECORD_ALIGN << OFFSET_BITS);
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;

/// A table grows when its load passes this: linear probing's expected probes for a miss are
/// (1 + 1/(1-α)²)/2, 22 at 0.85 (three cache lines of 8-byte entries), 3.8 for a hit.
const LOAD_MAX_PERCENT: usize = 85;
/// ... to this load: 16 bytes / 0.6 = 27 bytes per one-key record right after a growth, the
/// most it ever costs (the budget is 32).
const LOAD_AFTER_GROW_PERCENT: usize = 60;
/// Smallest table that is allocated at all.
const TABLE_SLOTS_MIN: usize = 16;

/// The keyed hash of a key: stripe in the top 6 bits, tag in the low 26.
#[derive(Clone, Copy)]
pub(crate) struct KeyHasher {
    seed: [u64; 2],
}

impl KeyHasher {
    pub fn new(seed: [u64; 2]) -> Self {
        KeyHasher { seed }
    }

    pub fn random() -> Self {
        let mut b = [0u8; 16];
        // Without OS randomness the index still works; only the flooding resistance is lost.
        if getrandom::fill(&mut b).is_err() {
            tracing::warn!("no OS randomness for the index hash key; using a fixed one");
        }
        KeyHasher::new([
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        ])
    }

    pub fn seed(&self) -> [u64; 2] {
        self.seed
    }

    fn hash(&self, key: &[u8; 20]) -> u64 {
        siphash_20::<1, 3>(self.seed, key)
    }
}

/// SipHash-c-d of exactly 20 bytes (a handshake key or a req2 hash), unrolled: std's
/// `SipHasher` is 2-4 and goes through the generic byte-stream `Hasher::write`; the index
/// hashes once per lookup, so it uses SipHash-1-3 (what std's `HashMap` uses, and what the
/// hashbrown maps this index replaced used) on the fixed-size key. The `<2, 4>` instance
/// is checked against std's `SipHasher` in the tests.
#[inline]
fn siphash_20<const C: usize, const D: usize>(seed: [u64; 2], key: &[u8; 20]) -> u64 {
    let [k0, k1] = seed;
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let word = |i: usize| u64::from_le_bytes(key[i..i + 8].try_into().expect("8 bytes"));
    // The last block: the 4 remaining bytes, and the message length (20) in the top byte.
    let tail = u64::from(u32::from_le_bytes(key[16..20].try_into().expect("4 bytes"))) | (20 << 56);
    for m in [word(0), word(8), tail] {
        v[3] ^= m;
        for _ in 0..C {
            round(&mut v);
        }
        v[0] ^= m;
    }
    v[2] ^= 0xff;
    for _ in 0..D {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn stripe_of(h: u64) -> usize {
    (h >> (64 - STRIPE_BITS)) as usize
}

fn tag_of(h: u64) -> u64 {
    h & TAG_MASK
}

fn entry_tag(e: u64) -> u64 {
    e >> (SLOT_BITS + OFFSET_BITS)
}

/// Where an entry's record is: (segment slot, header offset).
fn entry_location(e: u64) -> (usize, usize) {
    (
        ((e >> OFFSET_BITS) & SLOT_MASK) as usize,
        ((e & OFFSET_MASK) as usize) * RECORD_ALIGN,
    )
}

fn make_entry(tag: u64, slot: usize, header_at: usize) -> u64 {
    debug_assert!(slot > 0 && (slot as u64) <= SLOT_MASK);
    debug_assert!(header_at % RECORD_ALIGN == 0 && header_at < INDEX_SEGMENT_BYTES_MAX as usize);
    (tag << (SLOT_BITS + OFFSET_BITS))
        | ((slot as u64) << OFFSET_BITS)
        | (header_at / RECORD_ALIGN) as u64
}

/// One open-addressed table: linear probing, entries placed by their tag.
#[derive(Default, Clone)]
pub(crate) struct Table {
    slots: Vec<u64>,
    len: usize,
}

impl Table {
    /// A table restored from a checkpoint: `len` is its count of entries, tallied as the
    /// entries were read (`tally_entries`), so restoring makes no pass of its own.
    fn with_slots(slots: Vec<u64>, len: usize) -> Self {
        Table { slots, len }
    }

    fn home(&self, tag: u64) -> usize {
        ((tag * self.slots.len() as u64) >> TAG_BITS) as usize
    }

    /// Index of the first entry with `tag` that `confirm` accepts.
    fn find(&self, tag: u64, mut confirm: impl FnMut(u64) -> bool) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let mut i = self.home(tag);
        // Bounded: the load is below 1, so an empty slot comes within `n` steps.
        for _ in 0..n {
            let e = self.slots[i];
            if e == 0 {
                return None;
            }
            if entry_tag(e) == tag && confirm(e) {
                return Some(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        None
    }

    fn grow_for(&mut self, more: usize) {
        let want = self.len + more;
        if want * 100 <= self.slots.len() * LOAD_MAX_PERCENT {
            return;
        }
        let cap = (want * 100 / LOAD_AFTER_GROW_PERCENT).max(TABLE_SLOTS_MIN);
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        self.len = 0;
        for e in old.into_iter().filter(|&e| e != 0) {
            self.place(e);
        }
    }

    /// Put `e` in its first free slot from its home; the caller made room.
    fn place(&mut self, e: u64) {
        let n = self.slots.len();
        let mut i = self.home(entry_tag(e));
        while self.slots[i] != 0 {
            i += 1;
            if i == n {
                i = 0;
            }
        }
        self.slots[i] = e;
        self.len += 1;
    }

    fn insert(&mut self, e: u64) {
        self.grow_for(1);
        self.place(e);
    }

    /// Remove the entry at `i`, shifting back the entries after it that probed past it.
    fn remove_at(&mut self, mut i: usize) {
        let n = self.slots.len();
        self.slots[i] = 0;
        self.len -= 1;
        let mut j = i;
        loop {
            j += 1;
            if j == n {
                j = 0;
            }
            let e = self.slots[j];
            if e == 0 {
                return;
            }
            let home = self.home(entry_tag(e));
            // `e` may move back to `i` unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = e;
                self.slots[j] = 0;
                i = j;
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

/// The segments index entries name, by slot. Slot 0 is never used.
///
/// Readers take no lock here and touch no reference count until they return a record: a
/// slot holds `Arc::into_raw` of its segment (null when free), and a reader only looks up a
/// slot named by an entry it found in a table it holds locked (a stripe read lock). That
/// entry is counted in the slot's `refs`, and the slot is freed only when the last entry
/// naming it is removed, which takes that stripe's write lock and releases the slot before
/// unlocking. So for as long as the reader holds its stripe lock, the slot keeps its
/// segment and the pointer stays valid (the rule every `segment_named` call site states).
struct SegmentSlots {
    segments: Box<[AtomicPtr<Segment>]>,
    state: Mutex<SlotState>,
}

struct SlotState {
    /// Entries (both maps) naming each slot.
    refs: Vec<u32>,
    /// Records (a hybrid once) and their info dict bytes in each slot's segment: the
    /// store's totals, kept per segment so a checkpoint can drop a segment's share.
    records: Vec<u64>,
    bytes: Vec<u64>,
    free: Vec<usize>,
    /// Next never-used slot.
    next: usize,
}

/// Every `INDEX_SEGMENT_SLOTS` slot is taken: more segments hold indexed records than an
/// entry can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotsFull;

impl SegmentSlots {
    fn new() -> Self {
        SegmentSlots {
            segments: (0..INDEX_SEGMENT_SLOTS)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            state: Mutex::new(SlotState {
                refs: vec![0; INDEX_SEGMENT_SLOTS],
                records: vec![0; INDEX_SEGMENT_SLOTS],
                bytes: vec![0; INDEX_SEGMENT_SLOTS],
                free: Vec::new(),
                next: 1,
            }),
        }
    }

    /// The segment in `slot`, borrowed (no reference count touched).
    ///
    /// # Safety
    /// The caller holds locked a table with an entry naming `slot` (or the slot mutex while
    /// `refs[slot] > 0`) for as long as it uses the result: see the type's doc.
    unsafe fn segment_named(&self, slot: usize) -> Option<ManuallyDrop<Arc<Segment>>> {
        let p = self.segments.get(slot)?.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` came from `Arc::into_raw` in `set` and, per the caller's lock, the
        // slot still owns that reference; `ManuallyDrop` keeps us from releasing it.
        Some(ManuallyDrop::new(unsafe { Arc::from_raw(p) }))
    }

    /// Put `segment` in the free `slot` (slot mutex held).
    fn set(&self, slot: usize, segment: &Arc<Segment>) {
        let old =
            self.segments[slot].swap(Arc::into_raw(segment.clone()).cast_mut(), Ordering::Release);
        debug_assert!(old.is_null(), "slot {slot} taken twice");
        segment.index_slot.store(slot as u32, Ordering::Relaxed);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `segment`'s slot, taking a free one if it has none; counts `n` more entries on it.
    fn acquire(
        &self,
        st: &mut SlotState,
        segment: &Arc<Segment>,
        n: u32,
    ) -> Result<usize, SlotsFull> {
        let mut slot = segment.index_slot.load(Ordering::Relaxed) as usize;
        if slot == 0 {
            slot = match st.free.pop() {
                Some(s) => s,
                None if st.next < INDEX_SEGMENT_SLOTS => {
                    st.next += 1;
                    st.next - 1
                }
                None => return Err(SlotsFull),
            };
            self.set(slot, segment);
        }
        st.refs[slot] += n;
        Ok(slot)
    }

    /// One entry fewer names `slot`; the last one frees it (and drops the index's hold on
    /// the mapping). The caller holds the write lock of the table the entry left.
    fn release(&self, st: &mut SlotState, slot: usize) {
        st.refs[slot] -= 1;
        if st.refs[slot] == 0 {
            let p = self.segments[slot].swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: the slot owned this reference (`set`); no reader can be using it:
                // readers only use a slot while holding a table with an entry naming it,
                // and the last such entry was just removed under its table's write lock.
                let seg = unsafe { Arc::from_raw(p) };
                seg.index_slot.store(0, Ordering::Relaxed);
            }
            st.free.push(slot);
        }
    }
}

impl Drop for SegmentSlots {
    fn drop(&mut self) {
        for p in self.segments.iter_mut() {
            let p = std::mem::replace(p.get_mut(), std::ptr::null_mut());
            if !p.is_null() {
                // SAFETY: the slot's own reference from `set`; `&mut self`: no reader left.
                let seg = unsafe { Arc::from_raw(p) };
                seg.index_slot.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Why `publish` filed nothing.
#[derive(Debug)]
pub(crate) enum PublishError {
    /// A key is taken (first wins): its holder.
    Taken(RecordRef),
    /// `SlotsFull`.
    SlotsFull,
}

type Stripe = RwLock<Table>;

pub(crate) struct Index {
    hasher: KeyHasher,
    shards: Box<[Stripe]>,
    /// `HASH('req2', key)` -> the record of `key`. Lock order: main stripes before req2 ones.
    req2: Box<[Stripe]>,
    segments: SegmentSlots,
}

fn read(s: &Stripe) -> std::sync::RwLockReadGuard<'_, Table> {
    s.read().unwrap_or_else(|p| p.into_inner())
}

fn write(s: &Stripe) -> std::sync::RwLockWriteGuard<'_, Table> {
    s.write().unwrap_or_else(|p| p.into_inner())
}

/// The handshake keys in the raw header at `header`, without decoding it (it was decoded and
/// its record verified before its entry was made, and published bytes never change).
fn header_keys(header: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    let flags = header[6];
    (
        (flags & FLAG_V1 != 0).then(|| &header[12..32]),
        (flags & FLAG_V2 != 0).then(|| &header[32..52]),
    )
}

/// A lookup stopped before reading a record header the caller could not read without
/// waiting (`Index::get_if`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReadable;

impl Index {
    pub fn new(hasher: KeyHasher) -> Self {
        Index {
            hasher,
            shards: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(Table::default()))
                .collect(),
            req2: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(Table::default()))
                .collect(),
            segments: SegmentSlots::new(),
        }
    }

    /// The record an entry names, if its header carries a key `accept` takes. The caller
    /// holds locked the table `e` is in (`segment_named`'s rule).
    fn resolve(&self, e: u64, accept: impl Fn(&[u8]) -> bool) -> Option<RecordRef> {
        let (slot, at) = entry_location(e);
        // SAFETY: `e` is in a table the caller holds locked.
        let segment = unsafe { self.segments.segment_named(slot) }?;
        let header = segment.bytes(at, HEADER_BYTES);
        // Trusted from a checkpoint and not read since: the bytes may have rotted on disk
        // since they were verified. The header CRC first (the payload is re-hashed by the
        // store before it is served, `Store::lookup`).
        if segment.needs_verify(at) && Header::decode(header).is_err() {
            return None;
        }
        let (v1, v2) = header_keys(header);
        if v1.is_some_and(&accept) || v2.is_some_and(&accept) {
            // The one reference count a hit costs: the record holds its segment mapped.
            Some(RecordRef::from_header(Arc::clone(&segment), at, header))
        } else {
            None
        }
    }

    /// The handshake key whose `HASH('req2', key)` is `req2`.
    pub fn get_req2(&self, req2: &[u8; 20]) -> Option<[u8; 20]> {
        let h = self.hasher.hash(req2);
        let table = read(&self.req2[stripe_of(h)]);
        let mut found = None;
        table.find(tag_of(h), |e| {
            let (slot, at) = entry_location(e);
            // SAFETY: `e` is in `table`, which we hold read-locked.
            let Some(segment) = (unsafe { self.segments.segment_named(slot) }) else {
                return false;
            };
            let (v1, v2) = header_keys(segment.bytes(at, HEADER_BYTES));
            found = [v1, v2].into_iter().flatten().find_map(|k| {
                let k: [u8; 20] = k.try_into().expect("20 bytes");
                (req2_hash(&k) == *req2).then_some(k)
            });
            found.is_some()
        })?;
        found
    }

    /// Entries in the req2 map (one per key in the main map, tests check).
    #[cfg(test)]
    pub fn req2_len(&self) -> usize {
        self.req2.iter().map(|s| read(s).len()).sum()
    }

    /// Bytes the tables and the slot table take (capacity, not load): what the index costs
    /// in anonymous memory, for the report.
    pub fn memory_bytes(&self) -> usize {
        let tables: usize = self
            .shards
            .iter()
            .chain(self.req2.iter())
            .map(|s| read(s).slots.capacity() * 8)
            .sum();
        tables + INDEX_SEGMENT_SLOTS * (std::mem::size_of::<AtomicPtr<Segment>>() + 4 + 8 + 8)
        // refs, records, bytes
    }

    pub fn get(&self, key: &[u8; 20]) -> Option<RecordRef> {
        let h = self.hasher.hash(key);
        let table = read(&self.shards[stripe_of(h)]);
        let mut found = None;
        table.find(tag_of(h), |e| {
            found = self.resolve(e, |k| k == key);
            found.is_some()
        })?;
        found
    }

    /// `get`, but a candidate whose header page `readable` refuses (not in the page cache)
    /// is not read: `Err(NotReadable)` instead, before the mapping is touched. So a lookup
    /// on a worker thread never waits for the disk (`Store::lookup_resident`).
    pub fn get_if(
        &self,
        key: &[u8; 20],
        mut readable: impl FnMut(&Segment, usize) -> bool,
    ) -> Result<Option<RecordRef>, NotReadable> {
        let h = self.hasher.hash(key);
        let table = read(&self.shards[stripe_of(h)]);
        let mut found = None;
        let mut refused = false;
        table.find(tag_of(h), |e| {
            let (slot, at) = entry_location(e);
            // SAFETY: `e` is in `table`, which we hold read-locked.
            let Some(segment) = (unsafe { self.segments.segment_named(slot) }) else {
                return false;
            };
            if !readable(&segment, at) {
                refused = true;
                return true;
            }
            found = self.resolve(e, |k| k == key);
            found.is_some()
        });
        if refused {
            Err(NotReadable)
        } else {
            Ok(found)
        }
    }

    /// The record already filed under any of these hashes' keys.
    pub fn get_any(&self, hashes: &InfoHashes) -> Option<RecordRef> {
        hashes.handshake_keys().find_map(|k| self.get(&k))
    }

    /// Index of the entry for `key` naming exactly (slot, at), in a locked table.
    fn find_exact(table: &Table, tag: u64, slot: usize, at: usize) -> Option<usize> {
        table.find(tag, |e| entry_location(e) == (slot, at))
    }

    /// File `record` under all its keys, unless one of them is taken: then nothing is filed and
    /// the holder is returned (first wins). All affected stripes are locked together, in stripe
    /// order, so a hybrid record is never visible under one key only.
    pub fn publish(&self, hashes: &InfoHashes, record: &RecordRef) -> Result<(), PublishError> {
        let keys: Vec<(u64, [u8; 20])> = hashes
            .handshake_keys()
            .map(|k| (self.hasher.hash(&k), k))
            .collect();
        debug_assert!(!keys.is_empty());
        let mut stripes: Vec<usize> = keys.iter().map(|(h, _)| stripe_of(*h)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards: Vec<_> = stripes
            .iter()
            .map(|&s| (s, write(&self.shards[s])))
            .collect();
        let pos = |s: usize| stripes.iter().position(|&g| g == s).expect("locked");
        for (h, key) in &keys {
            let table = &guards[pos(stripe_of(*h))].1;
            let mut holder = None;
            if table
                .find(tag_of(*h), |e| {
                    holder = self.resolve(e, |k| k == key);
                    holder.is_some()
                })
                .is_some()
            {
                return Err(PublishError::Taken(holder.expect("found")));
            }
        }
        let at = record.header_offset();
        let mut st = self.segments.state();
        let slot = self
            .segments
            .acquire(&mut st, record.segment(), 2 * keys.len() as u32)
            .map_err(|SlotsFull| PublishError::SlotsFull)?;
        st.records[slot] += 1;
        st.bytes[slot] += record.len() as u64;
        drop(st);
        for (h, key) in &keys {
            let i = pos(stripe_of(*h));
            guards[i].1.insert(make_entry(tag_of(*h), slot, at));
            let r2 = self.hasher.hash(&req2_hash(key));
            write(&self.req2[stripe_of(r2)]).insert(make_entry(tag_of(r2), slot, at));
        }
        Ok(())
    }

    /// Refile `new` (a copy of `old` that eviction moved to another segment) under every key
    /// of `hashes` still naming `old`, all stripes locked together like `publish`. Returns
    /// false, and changes nothing, when no key names `old` any more (deleted or blocked
    /// meanwhile), or when `new`'s segment cannot get a slot.
    pub fn replace(&self, hashes: &InfoHashes, old: &RecordRef, new: &RecordRef) -> bool {
        let old_slot = old.segment().index_slot.load(Ordering::Relaxed) as usize;
        if old_slot == 0 {
            return false;
        }
        let (old_at, new_at) = (old.header_offset(), new.header_offset());
        let keys: Vec<(u64, [u8; 20])> = hashes
            .handshake_keys()
            .map(|k| (self.hasher.hash(&k), k))
            .collect();
        let mut stripes: Vec<usize> = keys.iter().map(|(h, _)| stripe_of(*h)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards: Vec<_> = stripes
            .iter()
            .map(|&s| (s, write(&self.shards[s])))
            .collect();
        let pos = |s: usize| stripes.iter().position(|&g| g == s).expect("locked");
        // (stripe guard index, table index, key) of every key still naming `old`.
        let naming: Vec<(usize, usize, u64, [u8; 20])> = keys
            .iter()
            .filter_map(|(h, key)| {
                let g = pos(stripe_of(*h));
                Self::find_exact(&guards[g].1, tag_of(*h), old_slot, old_at)
                    .map(|i| (g, i, *h, *key))
            })
            .collect();
        if naming.is_empty() {
            return false;
        }
        let new_slot = {
            let mut st = self.segments.state();
            match self
                .segments
                .acquire(&mut st, new.segment(), 2 * naming.len() as u32)
            {
                Ok(slot) => slot,
                Err(SlotsFull) => return false,
            }
        };
        {
            let mut st = self.segments.state();
            st.records[new_slot] += 1;
            st.bytes[new_slot] += new.len() as u64;
            st.records[old_slot] -= 1;
            st.bytes[old_slot] -= old.len() as u64;
        }
        for (g, i, h, key) in naming {
            guards[g].1.slots[i] = make_entry(tag_of(h), new_slot, new_at);
            let r2 = self.hasher.hash(&req2_hash(&key));
            let mut req2 = write(&self.req2[stripe_of(r2)]);
            let moved = Self::find_exact(&req2, tag_of(r2), old_slot, old_at)
                .map(|j| req2.slots[j] = make_entry(tag_of(r2), new_slot, new_at))
                .is_some();
            if !moved {
                // Never happens (the maps move together); keep the counts honest if it does.
                req2.insert(make_entry(tag_of(r2), new_slot, new_at));
            }
            let mut st = self.segments.state();
            self.segments.release(&mut st, old_slot);
            if moved {
                self.segments.release(&mut st, old_slot);
            }
        }
        true
    }

    /// Take every key of `hashes` out of the index where it still names `record` (a key
    /// refiled since names another record and stays). Returns whether anything was removed.
    pub fn remove(&self, hashes: &InfoHashes, record: &RecordRef) -> bool {
        let slot = record.segment().index_slot.load(Ordering::Relaxed) as usize;
        if slot == 0 {
            return false;
        }
        let at = record.header_offset();
        let mut removed = false;
        for key in hashes.handshake_keys() {
            let h = self.hasher.hash(&key);
            let mut table = write(&self.shards[stripe_of(h)]);
            let Some(i) = Self::find_exact(&table, tag_of(h), slot, at) else {
                continue;
            };
            table.remove_at(i);
            let r2 = self.hasher.hash(&req2_hash(&key));
            let mut req2 = write(&self.req2[stripe_of(r2)]);
            let mut st = self.segments.state();
            if let Some(j) = Self::find_exact(&req2, tag_of(r2), slot, at) {
                req2.remove_at(j);
                self.segments.release(&mut st, slot);
            }
            if !removed {
                st.records[slot] -= 1;
                st.bytes[slot] -= record.len() as u64;
            }
            self.segments.release(&mut st, slot);
            removed = true;
        }
        removed
    }

    /// (records, info dict bytes) in the index, a hybrid record once.
    pub fn totals(&self) -> (u64, u64) {
        let st = self.segments.state();
        (st.records.iter().sum(), st.bytes.iter().sum())
    }

    /// Calls `f` once per (key, record) pair, one stripe at a time (a stripe's read lock is
    /// held while `f` runs on its entries, so keep `f` short). A hybrid record is seen under
    /// both its keys. Reads every record header: for the admin plane, not the serving path.
    pub fn for_each(&self, mut f: impl FnMut(&[u8; 20], &RecordRef)) {
        for (s, stripe) in self.shards.iter().enumerate() {
            let table = read(stripe);
            for &e in table.slots.iter().filter(|&&e| e != 0) {
                let (slot, at) = entry_location(e);
                // SAFETY: `e` is in `table`, which we hold read-locked.
                let Some(segment) = (unsafe { self.segments.segment_named(slot) }) else {
                    continue;
                };
                let (v1, v2) = header_keys(segment.bytes(at, HEADER_BYTES));
                // Which of the record's keys this entry files it under: the one whose hash
                // lands in this stripe with this tag.
                let key = [v1, v2].into_iter().flatten().find_map(|k| {
                    let k: [u8; 20] = k.try_into().expect("20 bytes");
                    let h = self.hasher.hash(&k);
                    (stripe_of(h) == s && tag_of(h) == entry_tag(e)).then_some(k)
                });
                if let Some(key) = key {
                    f(&key, &RecordRef::from_header_at(Arc::clone(&segment), at));
                }
            }
        }
    }

    /// Calls `f` with the checkpoint's content: the hash seed, the segment of each slot in
    /// use, and every table (main, then req2), under all stripe read locks. The tables are
    /// lent, not copied, so the checkpoint is written from them in place: a copy was a
    /// second index's worth of memory at every clean stop (629 MB at 30M records, which a
    /// 1 GiB cgroup did not survive). Lookups go on while `f` runs; publishes and removals
    /// wait for it. The caller keeps writers out (so segment lengths match the tables).
    pub fn with_tables<R>(&self, f: impl FnOnce([u64; 2], &[SlotInfo], Vec<&[u64]>) -> R) -> R {
        let main: Vec<_> = self.shards.iter().map(read).collect();
        let req2: Vec<_> = self.req2.iter().map(read).collect();
        let slots: Vec<SlotInfo> = {
            let st = self.segments.state();
            (1..st.next)
                .filter(|&s| st.refs[s] > 0)
                .filter_map(|s| {
                    Some(SlotInfo {
                        slot: s,
                        // SAFETY: the slot mutex is held and `refs[s] > 0`.
                        segment: Arc::clone(&*unsafe { self.segments.segment_named(s) }?),
                        refs: st.refs[s],
                        records: st.records[s],
                        bytes: st.bytes[s],
                    })
                })
                .collect()
        };
        let tables = main.iter().chain(&req2).map(|t| &t.slots[..]).collect();
        f(self.hasher.seed(), &slots, tables)
    }

    /// The index a checkpoint describes: `tables` as saved, `slots` naming the segments
    /// opened again (a slot whose segment is gone must have been dropped from the tables by
    /// the caller, `IndexSnapshot::drop_untrusted`), each table's entry count from `tallies`.
    pub fn restore(snapshot: IndexSnapshot) -> Result<Index, SlotsFull> {
        if snapshot.tallies.len() != 2 * INDEX_SHARDS
            || snapshot.tallies.iter().any(|t| t.dropped > 0)
        {
            return Err(SlotsFull);
        }
        let index = Index::new(KeyHasher::new(snapshot.seed));
        {
            let mut st = index.segments.state();
            for s in &snapshot.slots {
                if s.slot == 0 || s.slot >= INDEX_SEGMENT_SLOTS {
                    return Err(SlotsFull);
                }
                if !index.segments.segments[s.slot]
                    .load(Ordering::Relaxed)
                    .is_null()
                {
                    // Two segments in one slot: not a checkpoint we wrote.
                    return Err(SlotsFull);
                }
                index.segments.set(s.slot, &s.segment);
                st.refs[s.slot] = s.refs;
                st.records[s.slot] = s.records;
                st.bytes[s.slot] = s.bytes;
                st.next = st.next.max(s.slot + 1);
            }
            st.free = (1..st.next).filter(|&s| st.refs[s] == 0).collect();
        }
        let stripes = index.shards.iter().chain(index.req2.iter());
        let tables = snapshot.main.into_iter().chain(snapshot.req2);
        for ((stripe, slots), tally) in stripes.zip(tables).zip(&snapshot.tallies) {
            *write(stripe) = Table::with_slots(slots, tally.kept);
        }
        Ok(index)
    }
}

/// The tables of an index as plain data: a checkpoint's, to restore (`Index::restore`).
pub(crate) struct IndexSnapshot {
    pub seed: [u64; 2],
    /// `INDEX_SHARDS` tables each.
    pub main: Vec<Vec<u64>>,
    pub req2: Vec<Vec<u64>>,
    /// Each table's entries (main, then req2), as `tally_entries` counted them.
    pub tallies: Vec<TableTally>,
    pub slots: Vec<SlotInfo>,
}

/// A slot in use, in a snapshot or a checkpoint being written (`Index::with_tables`).
pub(crate) struct SlotInfo {
    pub slot: usize,
    pub segment: Arc<Segment>,
    /// Entries naming it.
    pub refs: u32,
    pub records: u64,
    pub bytes: u64,
}

/// What one pass over a checkpoint table's entries found (`tally_entries`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableTally {
    /// Entries naming a segment taken from the checkpoint.
    pub kept: usize,
    /// Entries naming a segment that is not (changed or gone since): dropped at restore.
    pub dropped: usize,
}

/// For each segment slot, how many bytes of its segment the checkpoint vouches for (0: the
/// slot's segment is not taken from the checkpoint).
pub(crate) type TrustedLens = [u32; INDEX_SEGMENT_SLOTS];

/// Tally a run of a checkpoint table's entries, as they are read (so a restore touches each
/// entry once, while it is in cache). False when an entry's header lies past the length
/// `trusted` gives its segment: a checkpoint that passes never makes the index read past the
/// end of a file (which would be SIGBUS through the mapping).
pub(crate) fn tally_entries(
    entries: &[u64],
    trusted: &TrustedLens,
    tally: &mut TableTally,
) -> bool {
    for &e in entries {
        if e == 0 {
            continue;
        }
        let (slot, at) = entry_location(e);
        // In bounds: `slot` has SLOT_BITS bits and `trusted` INDEX_SEGMENT_SLOTS entries.
        let len = trusted[slot] as usize;
        if len == 0 {
            tally.dropped += 1;
        } else if at + HEADER_BYTES <= len {
            tally.kept += 1;
        } else {
            return false;
        }
    }
    true
}

impl IndexSnapshot {
    /// Drop the entries naming a segment `trusted` does not vouch for (gone or changed
    /// since the checkpoint): only the tables whose tally counted some are rebuilt. Returns
    /// the entries dropped.
    pub fn drop_untrusted(&mut self, trusted: &TrustedLens) -> usize {
        let mut dropped = 0;
        let tables = self.main.iter_mut().chain(self.req2.iter_mut());
        for (slots, tally) in tables.zip(self.tallies.iter_mut()) {
            if tally.dropped == 0 {
                continue;
            }
            let mut table = Table {
                slots: vec![0; slots.len()],
                len: 0,
            };
            for &e in slots.iter().filter(|&&e| e != 0) {
                if trusted[entry_location(e).0] != 0 {
                    table.place(e);
                }
            }
            dropped += tally.dropped;
            *tally = TableTally {
                kept: table.len,
                dropped: 0,
            };
            *slots = table.slots;
        }
        self.slots
            .retain(|s| trusted.get(s.slot).is_some_and(|&n| n != 0));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(tags: &[u64]) -> Table {
        let mut t = Table::default();
        for (i, &tag) in tags.iter().enumerate() {
            t.insert(make_entry(tag, 1, i * 8));
        }
        t
    }

    fn offsets_of(t: &Table, tag: u64) -> Vec<usize> {
        let mut v: Vec<usize> = t
            .slots
            .iter()
            .filter(|&&e| e != 0 && entry_tag(e) == tag)
            .map(|&e| entry_location(e).1)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn siphash_20_is_siphash() {
        use std::hash::Hasher;
        for (seed, key) in [
            ([0, 0], [0u8; 20]),
            ([1, 2], [0xA5; 20]),
            (
                [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908],
                std::array::from_fn(|i| i as u8),
            ),
        ] {
            #[allow(deprecated)]
            let mut std24 = std::hash::SipHasher::new_with_keys(seed[0], seed[1]);
            std24.write(&key);
            assert_eq!(siphash_20::<2, 4>(seed, &key), std24.finish());
        }
        // The 1-3 variant differs from 2-4 and depends on every byte and the key.
        let key = [7u8; 20];
        let h = siphash_20::<1, 3>([1, 2], &key);
        assert_ne!(h, siphash_20::<2, 4>([1, 2], &key));
        assert_ne!(h, siphash_20::<1, 3>([1, 3], &key));
        for i in 0..20 {
            let mut k = key;
            k[i] ^= 1;
            assert_ne!(h, siphash_20::<1, 3>([1, 2], &k), "byte {i}");
        }
    }

    #[test]
    fn entries_round_trip_their_fields() {
        let e = make_entry(
            TAG_MASK,
            SLOT_MASK as usize,
            INDEX_SEGMENT_BYTES_MAX as usize - 8,
        );
        assert_eq!(entry_tag(e), TAG_MASK);
        assert_eq!(
            entry_location(e),
            (SLOT_MASK as usize, INDEX_SEGMENT_BYTES_MAX as usize - 8)
        );
        assert_ne!(make_entry(0, 1, 0), 0, "an entry is never the empty slot");
    }

    #[test]
    fn table_finds_every_entry_after_growth_and_back_shift_deletion() {
        // Many equal and neighbouring tags: long clusters, wrap-around at the end.
        let tags: Vec<u64> = (0..5000u64)
            .map(|i| ((i * 7919) % 97 + (TAG_MASK - 50) * (i % 2)).min(TAG_MASK))
            .collect();
        let mut t = table_with(&tags);
        assert_eq!(t.len(), tags.len());
        assert!(t.len() * 100 <= t.slots.len() * LOAD_MAX_PERCENT);
        for (i, &tag) in tags.iter().enumerate() {
            assert!(
                t.find(tag, |e| entry_location(e).1 == i * 8).is_some(),
                "{i}"
            );
        }
        // Remove every third; the rest must still be found, the removed not.
        for (i, &tag) in tags.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            let at = t.find(tag, |e| entry_location(e).1 == i * 8).unwrap();
            t.remove_at(at);
        }
        for (i, &tag) in tags.iter().enumerate() {
            let found = t.find(tag, |e| entry_location(e).1 == i * 8).is_some();
            assert_eq!(found, i % 3 != 0, "{i}");
        }
        let expect: Vec<usize> = (0..tags.len())
            .filter(|i| i % 3 != 0 && tags[*i] == tags[1])
            .map(|i| i * 8)
            .collect();
        assert_eq!(offsets_of(&t, tags[1]), expect);
    }

    #[test]
    fn a_table_stays_between_its_loads() {
        let mut t = Table::default();
        for i in 0..100_000u64 {
            t.insert(make_entry((i * 2654435761) & TAG_MASK, 1, 0));
            let load = t.len() * 100 / t.slots.len();
            assert!(load <= LOAD_MAX_PERCENT, "{load}");
        }
        // Right after the last growth the load was LOAD_AFTER_GROW_PERCENT; never below.
        assert!(t.len() * 100 / t.slots.len() >= LOAD_AFTER_GROW_PERCENT - 1);
    }

    #[test]
    fn restore_tallies_in_one_pass_and_rebuilds_only_tables_with_dropped_entries() {
        let mut trusted: Box<TrustedLens> = vec![0u32; INDEX_SEGMENT_SLOTS]
            .into_boxed_slice()
            .try_into()
            .unwrap();
        trusted[1] = 4096; // taken from the checkpoint, 4096 bytes vouched for
        trusted[2] = 0; // changed or gone since
                        // Entries of slot 1 (kept) and 2 (dropped), mixed in one table.
        let t = table_with(&[5, 6, 7]);
        let mut other = t.clone();
        other.insert(make_entry(9, 2, 64));
        let mixed = other.slots.clone();
        let mut tally = TableTally::default();
        // Fed in runs, as the checkpoint reader does.
        for run in mixed.chunks(3) {
            assert!(tally_entries(run, &trusted, &mut tally));
        }
        assert_eq!(
            tally,
            TableTally {
                kept: 3,
                dropped: 1
            }
        );
        let mut clean = TableTally::default();
        assert!(tally_entries(&t.slots, &trusted, &mut clean));
        assert_eq!(
            clean,
            TableTally {
                kept: 3,
                dropped: 0
            }
        );
        // A header past the vouched-for length refuses the whole checkpoint.
        let past = [make_entry(3, 1, 4096 - HEADER_BYTES + RECORD_ALIGN)];
        assert!(!tally_entries(&past, &trusted, &mut TableTally::default()));
        let at_end = [make_entry(3, 1, 4096 - HEADER_BYTES)];
        assert!(tally_entries(&at_end, &trusted, &mut TableTally::default()));

        let mut snap = IndexSnapshot {
            seed: [1, 2],
            main: vec![mixed.clone(), t.slots.clone()],
            req2: Vec::new(),
            tallies: vec![tally, clean],
            slots: Vec::new(),
        };
        assert_eq!(snap.drop_untrusted(&trusted), 1);
        assert_eq!(
            snap.tallies,
            vec![
                TableTally {
                    kept: 3,
                    dropped: 0
                };
                2
            ]
        );
        // The clean table is left as it was; the other lost only slot 2's entry, and what
        // is left is still found from its home.
        assert_eq!(snap.main[1], t.slots);
        let rebuilt = Table::with_slots(snap.main[0].clone(), 3);
        assert!(rebuilt
            .slots
            .iter()
            .all(|&e| e == 0 || entry_location(e).0 == 1));
        for tag in [5, 6, 7] {
            assert!(rebuilt.find(tag, |_| true).is_some(), "tag {tag}");
        }
        assert!(rebuilt.find(9, |_| true).is_none());
    }
}
