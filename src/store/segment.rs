//! One segment file and its mapping.
//!
//! A segment is `segments/seg-<shard:03>-<seq:08>.mseg`, written only by appends at its end.
//! It is mapped once, read-only and shared, at its reserved size (the size it may grow to),
//! not its current length: Linux allows a mapping to extend past EOF, and those pages become
//! readable as the file grows (LMDB relies on the same). So the mapping never moves, and a slice
//! handed out for a published record stays valid for as long as the `Segment` lives. We never
//! touch mapped bytes past the durable, published end (that would be SIGBUS).
//!
//! With a capacity (`StoreOptions::capacity_bytes`), each segment also carries the eviction
//! policy's use counts: 2 bits per possible record start (`header offset / 80`: records are
//! at least one 80-byte header long, so no two share a slot), counted up on the hit path by
//! `RecordRef::touch` and read when the segment is evicted (see the store module doc): 2 bits
//! per 80 bytes of reservation, 0.3% of the segment size in memory. Without a capacity the
//! table is empty and marking is one bounds check.
//!
//! What the kernel cannot protect against: another process truncating or rewriting the file
//! under us. The `LOCK` file keeps other magnetar writers out; nothing keeps `truncate(1)` out.
//! A read-only store (no lock) opens its files read-only, so it cannot write either.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};

use super::record::HEADER_BYTES;
use super::Access;

pub(crate) const SEGMENTS_DIR: &str = "segments";

/// A record's use count saturates here (2 bits): served that often in one eviction round,
/// it survives up to this many rounds without another request.
pub(crate) const USES_MAX: u64 = 3;
const USES_PER_WORD: usize = 32;

pub(crate) fn segment_file_name(shard: usize, seq: u64) -> String {
    format!("seg-{shard:03}-{seq:08}.mseg")
}

/// `(shard, seq)` of a segment file name; `None` for anything else in the directory.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<(usize, u64)> {
    let rest = name.strip_prefix("seg-")?.strip_suffix(".mseg")?;
    let (shard, seq) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(shard) || !digits(seq) {
        return None;
    }
    Some((shard.parse().ok()?, seq.parse().ok()?))
}

pub struct Segment {
    path: PathBuf,
    shard: usize,
    seq: u64,
    file: File,
    map: MmapRaw,
    /// Eviction's use counts, 2 bits per `HEADER_BYTES` of reservation; empty when the store
    /// has no capacity bound.
    uses: Box<[AtomicU64]>,
    /// This segment's slot in the index's segment table (`index::SegmentSlots`), 0 while no
    /// index entry names it. Written only under the index's slot mutex.
    pub(crate) index_slot: AtomicU32,
    /// Set when the store opened this segment from a checkpoint without re-hashing it: the
    /// records below `below` are each verified the first time they are read (see
    /// `Store::lookup`), one bit per `HEADER_BYTES` slot, set once verified.
    unverified: OnceLock<Unverified>,
    /// Pages of the mapping known to be in the page cache (`Residency`): serving reads a
    /// record from the mapping on the worker thread only when they are.
    residency: Residency,
}

/// Which 4 KiB pages of a segment were seen in the page cache, one bit per page of the
/// reservation (4 KiB of bits per 128 MiB segment). A set bit lets a lookup skip the
/// `mincore` call; the bits are cleared once per `RESIDENCY_AGE` (by the first reader of a
/// new period), so a page the kernel evicted since is asked about again, and a fault on
/// the worker thread stays possible only for a page evicted within the current period.
struct Residency {
    pages: Box<[AtomicU64]>,
    /// The period (`residency_period`) the bits were last cleared in.
    period: AtomicU64,
}

/// Page size the residency bits and `mincore` count in. Linux on x86-64 and most arm64
/// kernels; a larger real page only makes a bit cover part of one page (still correct:
/// `mincore` is asked per 4 KiB address, and answers for the page holding it).
pub(crate) const PAGE_BYTES: usize = 4096;

/// How long a "resident" bit is trusted before the page is asked about again: long enough
/// that a hot record costs one `mincore` per period (not per lookup), short enough that a
/// page evicted under memory pressure is noticed before many lookups fault on it.
pub(crate) const RESIDENCY_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The kernel's page size (a power of two).
fn system_page_bytes() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *SIZE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 && (n as usize).is_power_of_two() => n as usize,
        _ => PAGE_BYTES,
    })
}

/// The residency period of `now`: whole `RESIDENCY_AGE`s since the first segment was
/// mapped. `now` is the caller's reading of the clock: a worker reads it per event anyway
/// (its deadlines), so the hit path needs no clock read of its own. That read (the coarse
/// clock) cost ~5 ns. The residency check's apparent ~60–100 ns in `cargo bench --bench
/// store` is lost overlap between back-to-back lookups, not this code: one lookup at a
/// time (`STORE_BENCH_FENCE=1`) it costs 0–4 % (BENCHMARKS.md, issue 20 session 6).
pub(crate) fn residency_period(now: Instant) -> u64 {
    let since = now.saturating_duration_since(residency_epoch());
    // u64 arithmetic (`as_millis` is u128, a division by a library call).
    (since.as_secs() * 1000 + u64::from(since.subsec_millis())) / RESIDENCY_AGE_MS
}

/// Where periods count from: the first segment mapped in this process (`Segment::map`
/// sets it), so it lies before any `now` a lookup of a record can bring (a `now` before it
/// would count as period 0 until a whole `RESIDENCY_AGE` after the epoch).
fn residency_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

const RESIDENCY_AGE_MS: u64 = RESIDENCY_AGE.as_millis() as u64;
const _: () = assert!(RESIDENCY_AGE_MS > 0);

struct Unverified {
    below: usize,
    verified: Box<[AtomicU64]>,
}

impl Segment {
    /// Create a new, empty segment file (fails if it exists) and fsync its directory so the
    /// file itself survives a crash.
    pub(crate) fn create(
        dir: &Path,
        shard: usize,
        seq: u64,
        reserved: usize,
        track_refs: bool,
    ) -> io::Result<Self> {
        let path = dir.join(segment_file_name(shard, seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        File::open(dir)?.sync_all()?;
        Self::map(path, shard, seq, file, reserved, track_refs)
    }

    /// Open an existing segment for recovery and, read-write, further appends. Returns it with
    /// its current file length; the mapping reserves at least `reserved` and at least the file
    /// length. Read-only, the file is opened without write access, so no path can write to it.
    pub(crate) fn open(
        path: PathBuf,
        shard: usize,
        seq: u64,
        reserved: usize,
        access: Access,
        track_refs: bool,
    ) -> io::Result<(Self, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(&path)?;
        let len = file.metadata()?.len();
        let len_usize = usize::try_from(len).map_err(|_| io::Error::other("segment too large"))?;
        let seg = Self::map(path, shard, seq, file, reserved.max(len_usize), track_refs)?;
        Ok((seg, len))
    }

    fn map(
        path: PathBuf,
        shard: usize,
        seq: u64,
        file: File,
        reserved: usize,
        track_refs: bool,
    ) -> io::Result<Self> {
        // A zero-length mapping is an error; a segment always reserves room for something.
        let reserved = reserved.max(1);
        residency_epoch();
        let map = MmapOptions::new().len(reserved).map_raw_read_only(&file)?;
        let words = if track_refs {
            (reserved / HEADER_BYTES).div_ceil(USES_PER_WORD)
        } else {
            0
        };
        Ok(Segment {
            path,
            shard,
            seq,
            file,
            map,
            uses: (0..words).map(|_| AtomicU64::new(0)).collect(),
            index_slot: AtomicU32::new(0),
            unverified: OnceLock::new(),
            residency: Residency {
                pages: (0..reserved.div_ceil(PAGE_BYTES).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                period: AtomicU64::new(0),
            },
        })
    }

    /// Note that the record whose header is at `header_at` was served: its 2-bit use count
    /// goes up by one, saturating at `USES_MAX`.
    ///
    /// On the hit path, so: a relaxed load first, and an atomic compare-exchange only while
    /// the count is below the maximum. A hot record's count is almost always saturated, so
    /// its cache line stays shared and read-only across cores (no ping-pong); the RMW runs at
    /// most `USES_MAX` times per record per eviction round. Relaxed is enough: the count is a
    /// hint that orders nothing else, and the evictor reading a stale value costs at worst
    /// one record refetched later, or kept one round longer.
    #[inline]
    pub(crate) fn mark_referenced(&self, header_at: usize) {
        let slot = header_at / HEADER_BYTES;
        let Some(word) = self.uses.get(slot / USES_PER_WORD) else {
            return;
        };
        let shift = (slot % USES_PER_WORD) * 2;
        let mut cur = word.load(Ordering::Relaxed);
        while (cur >> shift) & 3 < USES_MAX {
            match word.compare_exchange_weak(
                cur,
                cur + (1 << shift),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// The records below `len` were not verified at this start (trusted from a checkpoint):
    /// each must be verified before it is first served. Called once, at open.
    pub(crate) fn set_unverified_below(&self, len: usize) {
        let words = (len / HEADER_BYTES).div_ceil(64);
        let _ = self.unverified.set(Unverified {
            below: len,
            verified: (0..words).map(|_| AtomicU64::new(0)).collect(),
        });
    }

    /// Whether the record at `header_at` has not been verified since the store opened.
    /// One atomic load for a segment opened from a checkpoint, none otherwise.
    #[inline]
    pub(crate) fn needs_verify(&self, header_at: usize) -> bool {
        let Some(u) = self.unverified.get() else {
            return false;
        };
        if header_at >= u.below {
            return false;
        }
        let slot = header_at / HEADER_BYTES;
        u.verified[slot / 64].load(Ordering::Acquire) & (1 << (slot % 64)) == 0
    }

    /// The record at `header_at` verified: serve it without checking again.
    pub(crate) fn mark_verified(&self, header_at: usize) {
        if let Some(u) = self.unverified.get() {
            let slot = header_at / HEADER_BYTES;
            if let Some(w) = u.verified.get(slot / 64) {
                w.fetch_or(1 << (slot % 64), Ordering::Release);
            }
        }
    }

    /// The use count of the record at `header_at` (0 ..= `USES_MAX`).
    pub(crate) fn uses(&self, header_at: usize) -> u8 {
        let slot = header_at / HEADER_BYTES;
        self.uses.get(slot / USES_PER_WORD).map_or(0, |w| {
            ((w.load(Ordering::Relaxed) >> ((slot % USES_PER_WORD) * 2)) & 3) as u8
        })
    }

    /// Start the record at `header_at` (a copy, not yet published) with `n` uses.
    pub(crate) fn set_uses(&self, header_at: usize, n: u8) {
        let slot = header_at / HEADER_BYTES;
        if let Some(word) = self.uses.get(slot / USES_PER_WORD) {
            let shift = (slot % USES_PER_WORD) * 2;
            let n = u64::from(n.min(USES_MAX as u8));
            // Other slots of the word may be marked concurrently: only OR into our (zero) bits.
            word.fetch_and(!(3 << shift), Ordering::Relaxed);
            word.fetch_or(n << shift, Ordering::Relaxed);
        }
    }

    /// Whether every page holding `[offset, offset + len)` is in the page cache, so that
    /// reading it through the mapping costs at most a minor fault (no disk). Known pages
    /// cost one atomic load each; unknown ones one `mincore` for the whole range. `period`
    /// is `residency_period(now)` (a parameter so tests can age the bits).
    pub(crate) fn is_resident(&self, offset: usize, len: usize, period: u64) -> bool {
        let r = &self.residency;
        let seen = r.period.load(Ordering::Relaxed);
        if seen != period
            && r.period
                .compare_exchange(seen, period, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A new period: forget what was seen, so evicted pages are asked about again.
            for w in r.pages.iter() {
                w.store(0, Ordering::Relaxed);
            }
        }
        let Some(pages) = self.page_range(offset, len) else {
            return false;
        };
        let known = pages
            .clone()
            .all(|p| r.pages[p / 64].load(Ordering::Relaxed) & (1 << (p % 64)) != 0);
        if known {
            return true;
        }
        if !self.mincore(pages.clone()) {
            return false;
        }
        self.mark_pages_resident(pages);
        true
    }

    /// Brings `[offset, offset + len)` into the page cache (blocking: a page-in thread,
    /// never a worker): asks the kernel to read exactly those pages (one request for the
    /// range, no read-around of a fault), then reads one byte of each, which waits for the
    /// reads. The pages are then known resident.
    pub(crate) fn page_in(&self, offset: usize, len: usize) {
        let Some(pages) = self.page_range(offset, len) else {
            return;
        };
        let (from, to) = (pages.start * PAGE_BYTES, pages.end * PAGE_BYTES);
        // Only a hint: the touch below reads the pages either way.
        let _ = self
            .map
            .advise_range(memmap2::Advice::WillNeed, from, to - from);
        for p in pages.clone() {
            // SAFETY: the page lies in our mapping (page_range checked the reservation) and
            // holds bytes of a published record (the caller's range), so it is backed by
            // the file. A volatile read so the touch is not optimised away.
            unsafe { std::ptr::read_volatile(self.map.as_ptr().add(p * PAGE_BYTES)) };
        }
        self.mark_pages_resident(pages);
    }

    /// The pages holding `[offset, offset + len)`, if inside the reservation.
    fn page_range(&self, offset: usize, len: usize) -> Option<Range<usize>> {
        let end = offset.checked_add(len.max(1))?;
        (end <= self.map.len()).then(|| offset / PAGE_BYTES..end.div_ceil(PAGE_BYTES))
    }

    fn mark_pages_resident(&self, pages: Range<usize>) {
        for p in pages {
            let w = &self.residency.pages[p / 64];
            if w.load(Ordering::Relaxed) & (1 << (p % 64)) == 0 {
                w.fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }

    /// `mincore(2)` of these pages: all in the page cache? An error (none expected for a
    /// range inside our mapping) counts as not resident: the page-in path is always safe.
    fn mincore(&self, pages: Range<usize>) -> bool {
        // The kernel's page may be larger than ours (arm64 with 16/64 KiB pages): align to it.
        let sys = system_page_bytes();
        let base = self.map.as_ptr() as usize;
        let mut at = (base + pages.start * PAGE_BYTES) & !(sys - 1);
        let end = base + pages.end * PAGE_BYTES;
        // A record is at most METADATA_BYTES_MAX + header: a few hundred pages at most;
        // look at them in chunks of a stack buffer.
        let mut vec = [0u8; 64];
        while at < end {
            let n = (end - at).div_ceil(sys).min(vec.len());
            // SAFETY: `at` is aligned to the system page and lies inside our mapping (or in
            // its first page, which the mapping starts at); `vec` has room for one byte per
            // page asked about.
            let rc = unsafe { libc::mincore(at as *mut libc::c_void, n * sys, vec.as_mut_ptr()) };
            if rc != 0 || vec[..n].iter().any(|b| b & 1 == 0) {
                return false;
            }
            at += n * sys;
        }
        true
    }

    /// Drops the pages of this segment's file from the page cache (our mapping's page-table
    /// entries first: a mapped page is not dropped). True if the kernel did (not on tmpfs).
    #[cfg(test)]
    pub(crate) fn evict_for_test(&self) -> bool {
        use std::os::fd::AsRawFd;
        self.sync_data().unwrap();
        // SAFETY: our own mapping; MADV_DONTNEED on a shared file mapping only drops the
        // page-table entries (the bytes stay in the file and the page cache).
        unsafe {
            libc::madvise(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                libc::MADV_DONTNEED,
            );
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        !self.mincore(0..1)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes of address space reserved for this segment: the most it may ever hold.
    pub fn reserved_bytes(&self) -> usize {
        self.map.len()
    }

    /// Address range of the mapping (base..base+reserved), e.g. for a test to prove that the
    /// bytes a connection sends come from here and were not copied.
    pub fn mapping_range(&self) -> Range<usize> {
        let base = self.map.as_ptr() as usize;
        base..base + self.map.len()
    }

    /// `len` bytes at `offset` of the mapping. Callers only ask for bytes below the durable,
    /// published end (recovery: below the file length it saw).
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(end <= self.map.len(), "read past the segment reservation");
        // SAFETY: the range lies inside our mapping, which lives as long as `self`. Bytes below
        // the published end are never written again (append-only), so no `&mut` aliasing
        // exists; they are backed by the file, which is at least that long.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    /// Hint that `[0, len)` is about to be read front to back (recovery): the kernel reads
    /// ahead and maps in large batches instead of faulting page by page.
    pub(crate) fn advise_sequential_read(&self, len: usize) {
        let len = len.min(self.map.len());
        if len > 0 {
            // Only a hint: failure changes speed, not results.
            let _ = self.map.advise_range(memmap2::Advice::Sequential, 0, len);
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, 0, len);
        }
    }

    /// Back to the default access pattern after recovery: serving reads are random, and
    /// `Sequential` would let the kernel drop pages right behind a read.
    pub(crate) fn advise_random_access(&self) {
        let _ = self.map.advise(memmap2::Advice::Normal);
    }

    /// The segment file, for `RecordRef::info_in_file` (sendfile of a record's bytes).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// fdatasync: the data and the file length, not the timestamps.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(3, 42), "seg-003-00000042.mseg");
        assert_eq!(
            parse_segment_file_name("seg-003-00000042.mseg"),
            Some((3, 42))
        );
        assert_eq!(
            parse_segment_file_name("seg-1234-123456789.mseg"),
            Some((1234, 123456789))
        );
        for bad in [
            "seg-003-x.mseg",
            "seg--1.mseg",
            "seg-1-2.tmp",
            "LOCK",
            "seg-+1-2.mseg",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn mapping_past_eof_sees_appends() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 0, 0, 1 << 20, false).unwrap();
        assert_eq!(seg.reserved_bytes(), 1 << 20);
        seg.write_all_at(b"hello", 0).unwrap();
        assert_eq!(seg.bytes(0, 5), b"hello");
        seg.write_all_at(b"world", 8192).unwrap();
        assert_eq!(seg.bytes(8192, 5), b"world");
    }

    #[test]
    fn residency_bits_skip_mincore_age_out_and_page_in_reads_the_pages() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 0, 0, 1 << 20, false).unwrap();
        seg.write_all_at(&[7u8; 3 * PAGE_BYTES], 0).unwrap();
        // Just written: in the page cache; the bits of pages 0 and 1 are set by the check.
        assert!(seg.is_resident(100, PAGE_BYTES, 1));
        assert!(seg.residency.pages[0].load(Ordering::Relaxed) & 0b11 == 0b11);
        if !seg.evict_for_test() {
            eprintln!(
                "the page cache of {} cannot be dropped (tmpfs?): skipped",
                dir.path().display()
            );
            return;
        }
        // Same period: the bits are trusted (no mincore), by design.
        assert!(seg.is_resident(100, PAGE_BYTES, 1));
        // Page 2 was never seen: asked about, and gone.
        assert!(!seg.is_resident(2 * PAGE_BYTES, 10, 1));
        // A new period forgets the bits: the evicted pages are seen as cold.
        assert!(!seg.is_resident(100, 10, 2));
        assert_eq!(seg.residency.pages[0].load(Ordering::Relaxed), 0);
        // A page-in reads exactly the record's pages and marks them.
        seg.page_in(100, PAGE_BYTES);
        assert!(seg.mincore(0..2), "the kernel holds pages 0 and 1 again");
        assert!(seg.is_resident(100, PAGE_BYTES, 2));
        // And they stay resident for a fresh period's mincore.
        assert!(seg.is_resident(100, PAGE_BYTES, 3));
        // Outside the reservation: never resident, never touched.
        assert!(!seg.is_resident((1 << 20) - 10, 20, 3));
        seg.page_in((1 << 20) - 10, 20);
    }

    #[test]
    fn use_counts_are_per_record_slot_and_saturate() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 0, 0, 1 << 16, true).unwrap();
        // Records at 0, 80 and 5200 (all possible starts: >= 80 bytes apart).
        for at in [0, 80, 5200] {
            assert_eq!(seg.uses(at), 0);
        }
        for _ in 0..10 {
            seg.mark_referenced(80);
        }
        seg.mark_referenced(5200);
        assert_eq!(seg.uses(80), USES_MAX as u8);
        assert_eq!((seg.uses(0), seg.uses(160), seg.uses(5200)), (0, 0, 1));
        seg.set_uses(0, 2);
        assert_eq!((seg.uses(0), seg.uses(80)), (2, 3));
        // Untracked segments ignore marks.
        let plain = Segment::create(dir.path(), 0, 1, 1 << 16, false).unwrap();
        plain.mark_referenced(80);
        assert_eq!(plain.uses(80), 0);
    }
}
