//! The store: verified info dicts in append-only, memory-mapped segment files, and the index
//! that finds them by info-hash.
//!
//! Layout of a data directory `D`:
//! - `D/LOCK` — flock'ed by the one process that has the store open for writing (`lock`).
//!   `Store::open_read_only` (tools run beside the server, e.g. `magnetar magnet`) takes no
//!   lock and writes nothing: it sees the records that were complete when it scanned.
//! - `D/segments/seg-<shard>-<seq>.mseg` — records, appended at the end only (`segment`,
//!   `record`). Any segment may hold any info-hash; the shard in the name only says which writer
//!   created it.
//! - `D/blocklist` — info-hashes never stored, served or fetched (`blocklist`; text, one hash a
//!   line, editable by hand, reloaded by `Store::reload_blocklist`).
//!
//! Deleting (`Store::delete`): the hash goes on the blocklist (durable first), then a tombstone
//! record is appended and synced, then the record leaves the index. Either alone keeps it
//! deleted across a restart; together, removing the hash from the blocklist later does not
//! bring the old bytes back (only storing the dict again does).
//!
//! Write path (`Store::append`): validate and hash the dict (`metainfo`), build header + payload,
//! `pwrite` it at the end of the shard's active segment, sync per `SyncPolicy`, read the header
//! back through the mapping, and only then publish it in the index. Read path
//! (`Store::lookup`): one striped read lock, a clone of a `RecordRef` whose `info()` is a slice
//! of the mapping — the bytes the server writes to sockets, never copied.
//!
//! # Durability
//! - `SyncPolicy::Always` (the server): every append is fdatasync'ed before the index publishes
//!   it, so a record a client or an admin was told about survives power loss, and no reader ever
//!   sees a record that a crash could take back.
//! - `SyncPolicy::Batch` (import): records are published as soon as they are written; data is
//!   fdatasync'ed when a writer moves to a new segment, on `Store::sync`, and when the store is
//!   dropped. A crash loses (part of) the unsynced tail, which recovery then cuts off.
//! - New segment files fsync their directory before their first record is written; a recovery
//!   truncation is fdatasync'ed before the store opens. Records larger than `segment_bytes` get
//!   a segment of their own, synced at once under either policy.
//!
//! Recovery at open (`recovery`) re-hashes every record; whatever fails is never served. A
//! read-write open cuts a torn tail off; a read-only one skips it (beside a running server it
//! is usually an append in progress) and counts it.
//!
//! # Bounded capacity: eviction
//! See `evict`: whole sealed segments, oldest first, with a CLOCK second chance for records
//! served recently.

mod blocklist;
mod checkpoint;
mod evict;
mod index;
mod lock;
mod record;
mod recovery;
mod segment;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::limits::{
    INDEX_SEGMENT_BYTES_MAX, INDEX_SEGMENT_SLOTS, METADATA_BYTES_MAX, SEGMENT_BYTES_DEFAULT,
};
use crate::metainfo::{v2_handshake_key, validate_info, verify_info, InfoHashes, MetainfoError};

use blocklist::Blocklist;
pub use blocklist::{parse_hash_key, BadLine};
use index::{Index, KeyHasher, PublishError};
use lock::DirLock;
pub use record::RecordRef;
use record::{record_bytes, Header, HEADER_BYTES};
pub use segment::Segment;
use segment::SEGMENTS_DIR;

/// Smallest segment we create: a segment must hold at least one small record, and tiny segments
/// only make sense in tests.
const SEGMENT_BYTES_MIN: u64 = 4096;

/// What `Store::lookup_resident` found.
#[derive(Debug)]
pub enum Resident {
    /// Stored, and readable without waiting for the disk.
    Hit(RecordRef),
    /// Not stored (or dropped as damaged).
    Miss,
    /// Maybe stored, but reading it now would wait for the disk: `Store::page_in` it.
    Cold,
}

#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", lock::locked_message(dir, pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error("invalid info dict: {0}")]
    Invalid(#[from] MetainfoError),
    #[error("info dict is {len} bytes, more than the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error(
        "{} offset {offset}: record format version {version}, this magnetar reads version {}; \
         refusing to open (upgrade magnetar)",
        path.display(),
        record::FORMAT_VERSION
    )]
    UnsupportedFormat {
        path: PathBuf,
        offset: u64,
        version: u8,
    },
    #[error("{} offset {offset}: record header read back differs from the one written", path.display())]
    ReadBack { path: PathBuf, offset: u64 },
    #[error("the store is open read-only; only the process holding its lock appends")]
    ReadOnly,
    #[error("info-hash {0} is on the blocklist")]
    Blocked(String),
    #[error(
        "no space left on the device holding {}: the record was not stored (serving goes on; \
         free space, or bound the store with --store-capacity)",
        path.display()
    )]
    NoSpace { path: PathBuf },
    /// The record does not fit in the capacity: it is larger than a quarter of it, or every
    /// byte left is in segments still being appended to.
    #[error(
        "store capacity of {capacity} bytes: no room for this record ({used} bytes in \
         segments that cannot be evicted, or a record over a quarter of the capacity); \
         raise --store-capacity"
    )]
    CapacityExhausted { capacity: u64, used: u64 },
    /// The index names segments in a fixed table (`limits::INDEX_SEGMENT_SLOTS`).
    #[error(
        "more than {} segments hold records: the index cannot name another (use larger \
         segments, or bound the store with --store-capacity)",
        INDEX_SEGMENT_SLOTS
    )]
    IndexFull,
    /// A record starts further into its segment than an index entry can say
    /// (`limits::INDEX_SEGMENT_BYTES_MAX`): a segment written with a larger segment size.
    #[error(
        "{} offset {offset}: record past the {} byte segment size this magnetar indexes",
        path.display(),
        INDEX_SEGMENT_BYTES_MAX
    )]
    SegmentTooLarge { path: PathBuf, offset: u64 },
}

/// How a store is opened. One open and recovery path serves both; this flag is what differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Lock the directory, create what is missing, cut torn tails, append.
    ReadWrite,
    /// No lock, no file opened for writing, nothing created, truncated or synced.
    ReadOnly,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace {
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// When appended records are made durable (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fdatasync every record before it is published. For the server.
    #[default]
    Always,
    /// fdatasync on segment switch, `Store::sync` and drop. For bulk import.
    Batch,
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Number of writers (one active segment each). The server uses one per core.
    pub shards: usize,
    /// Size a segment may grow to before its writer starts the next one.
    pub segment_bytes: u64,
    pub sync: SyncPolicy,
    /// Most bytes of segment files the store keeps (0: unbounded). Past it, appends evict
    /// whole segments, oldest first (see the module doc). With a capacity, segments are at
    /// most `capacity_bytes / (4 × shards)` so that eviction has sealed segments to choose
    /// from and frees space in small steps.
    pub capacity_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            shards: available_cores(),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            sync: SyncPolicy::Always,
            capacity_bytes: 0,
        }
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AppendOptions {
    /// Writer to use; `None` means `shard_of(primary key)`, which keeps all appends of one
    /// info-hash on one writer (so concurrent appends of the same dict write it once).
    pub shard: Option<usize>,
    /// Where the dict came from, passed on to the listener (`Store::set_listener`).
    pub origin: Origin,
}

/// Where a stored dict or a delete came from: the shared tier (`crate::shared`) uploads
/// what this node learned and does not upload again what it took from the tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// This node: an upload, an import, a swarm fill, a client's fill, an admin delete.
    #[default]
    Local,
    /// The shared tier: an object or a tombstone another node wrote.
    Shared,
}

/// What the store tells its listener, after the change is durable and published.
#[derive(Debug)]
pub enum StoreEvent<'a> {
    Stored {
        record: &'a RecordRef,
        origin: Origin,
    },
    /// These handshake keys were deleted or blocked at `at` (unix seconds; a tombstone
    /// record with that stamp is on disk).
    Deleted {
        keys: &'a [[u8; 20]],
        at: u64,
        origin: Origin,
    },
}

/// Called on the appending (or deleting) thread: keep it short and non-blocking.
pub type StoreListener = Box<dyn Fn(StoreEvent<'_>) + Send + Sync>;

#[derive(Clone, Debug)]
pub enum AppendOutcome {
    Stored(RecordRef),
    AlreadyPresent(RecordRef),
}

impl AppendOutcome {
    pub fn record(&self) -> &RecordRef {
        match self {
            AppendOutcome::Stored(r) | AppendOutcome::AlreadyPresent(r) => r,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Distinct records in the index (a hybrid counts once).
    pub records: u64,
    /// Sum of their info dict sizes.
    pub bytes: u64,
    pub segments: usize,
    /// Sum of the segment files' lengths (what `capacity_bytes` bounds).
    pub disk_bytes: u64,
    /// `StoreOptions::capacity_bytes` (0: unbounded).
    pub capacity_bytes: u64,
    /// Segments deleted by eviction.
    pub segments_evicted: u64,
    /// Records served recently (use count above 0), copied out of an evicted segment.
    pub records_reappended: u64,
    /// Records evicted: taken out of the index with their segment (a later miss refetches).
    pub records_evicted: u64,
    /// Appends (and deletes) that failed writing or syncing; the record was not stored.
    pub append_errors: u64,
    /// Of those, failures for lack of space on the device (ENOSPC).
    pub append_errors_no_space: u64,
    /// Records taken from the index checkpoint that failed verification when first
    /// served (bytes damaged on disk since they were verified): dropped, never served.
    pub records_corrupt_on_serve: u64,
    /// Anonymous memory the index takes (tables at their capacity, and the fixed segment
    /// slot table): about 19–27 bytes per record with one key.
    pub index_bytes: u64,
}

/// Eviction and write-failure counters (atomics: any writer thread bumps them).
#[derive(Default)]
struct Counters {
    segments_evicted: AtomicU64,
    records_reappended: AtomicU64,
    records_evicted: AtomicU64,
    append_errors: AtomicU64,
    append_errors_no_space: AtomicU64,
    records_corrupt_on_serve: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Of those, segments whose records (all, or up to the length it saw) came from the
    /// index checkpoint without a scan.
    pub segments_from_checkpoint: usize,
    /// Records now in the index (duplicates not counted): verified now, or, in segments
    /// taken from the checkpoint, verified before and again when first served.
    pub records: usize,
    /// Info dict bytes of those records.
    pub bytes: u64,
    pub torn_tails_truncated: usize,
    pub bytes_truncated: u64,
    /// Read-only open: segments whose tail was not a verified record (damage, or an append in
    /// progress in the server), left as they are.
    pub torn_tails_skipped: usize,
    pub tail_bytes_skipped: u64,
    /// Records (or damaged stretches) between good records that failed verification.
    pub corrupt_records_skipped: usize,
    pub corrupt_bytes_skipped: u64,
    /// Verified records whose info-hash was already indexed from an earlier record.
    pub duplicates: usize,
    /// Tombstones read (deleted records).
    pub tombstones: usize,
    /// Records not indexed because a tombstone deleted them.
    pub deleted_skipped: usize,
    /// Records not indexed because their hash is on the blocklist.
    pub blocked_skipped: usize,
    /// Blocklist lines that are not info-hashes (ignored).
    pub blocklist_bad_lines: Vec<BadLine>,
    pub elapsed: Duration,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = self.bytes as f64 / 1e6;
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} records ({mb:.1} MB) in {} segments, verified in {:.0} ms ({:.0} MB/s)",
            self.records,
            self.segments,
            secs * 1e3,
            if secs > 0.0 { mb / secs } else { 0.0 }
        )?;
        if self.segments_from_checkpoint > 0 {
            write!(
                f,
                "; {} segments from the index checkpoint (each record verified when first served)",
                self.segments_from_checkpoint
            )?;
        }
        if self.torn_tails_truncated > 0 {
            write!(
                f,
                "; {} torn tails truncated ({} bytes)",
                self.torn_tails_truncated, self.bytes_truncated
            )?;
        }
        if self.torn_tails_skipped > 0 {
            write!(
                f,
                "; {} partial tails skipped, not truncated (read-only; {} bytes)",
                self.torn_tails_skipped, self.tail_bytes_skipped
            )?;
        }
        if self.corrupt_records_skipped > 0 {
            write!(
                f,
                "; {} corrupt records skipped ({} bytes)",
                self.corrupt_records_skipped, self.corrupt_bytes_skipped
            )?;
        }
        if self.duplicates > 0 {
            write!(f, "; {} duplicates", self.duplicates)?;
        }
        if self.deleted_skipped > 0 || self.tombstones > 0 {
            write!(
                f,
                "; {} tombstones, {} deleted records skipped",
                self.tombstones, self.deleted_skipped
            )?;
        }
        if self.blocked_skipped > 0 {
            write!(f, "; {} blocked records skipped", self.blocked_skipped)?;
        }
        if !self.blocklist_bad_lines.is_empty() {
            write!(
                f,
                "; {} blocklist lines ignored (not info-hashes)",
                self.blocklist_bad_lines.len()
            )?;
        }
        Ok(())
    }
}

/// The segment a writer appends to, and where its durable data ends.
struct Active {
    segment: Arc<Segment>,
    end: u64,
}

struct Writer {
    shard: usize,
    active: Option<Active>,
    /// Batch policy: the active segment has unsynced appends.
    dirty: bool,
}

/// A segment no writer appends to any more, and its final length.
struct Sealed {
    segment: Arc<Segment>,
    len: u64,
}

pub struct Store {
    segments_dir: PathBuf,
    opts: StoreOptions,
    index: Index,
    writers: Box<[Mutex<Writer>]>,
    records: AtomicU64,
    bytes: AtomicU64,
    segments: AtomicUsize,
    /// Sum of segment file lengths (durable appends included, evicted segments not).
    disk_bytes: AtomicU64,
    /// Sequence number of the next new segment, over all shards, so that (seq, shard) orders
    /// segments by creation: eviction's FIFO order, which survives a restart.
    next_seq: AtomicU64,
    /// Sealed segments by (seq, shard): the eviction queue, oldest first.
    sealed: Mutex<BTreeMap<(u64, usize), Sealed>>,
    /// One eviction at a time (taken while holding the evicting writer's lock, never the
    /// other way round).
    evicting: Mutex<()>,
    counters: Counters,
    access: Access,
    blocklist: Blocklist,
    /// Handshake key -> `stored_at` of its newest tombstone: a dict stored again is stamped
    /// later than that, so recovery keeps it.
    tombstones: Mutex<HashMap<[u8; 20], u64>>,
    /// Told of every stored record and delete (the shared tier's uploader), once set.
    listener: std::sync::OnceLock<StoreListener>,
    /// `None` when read-only.
    _lock: Option<DirLock>,
}

/// What `Store::delete` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The hashes of the record taken out of the store; `None` if none was stored.
    pub removed: Option<InfoHashes>,
    /// The blocklist entries written (hex).
    pub blocked: Vec<String>,
}

/// What a blocklist reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlocklistReload {
    pub entries: usize,
    /// Stored records that the new list blocks, taken out of the index.
    pub unpublished: usize,
    pub bad_lines: Vec<BadLine>,
}

/// The writer shard of an info-hash key: its first 8 bytes mod `shards` (an info-hash is
/// already uniformly distributed, so no further hashing is needed).
pub fn shard_of(key: &[u8; 20], shards: usize) -> usize {
    let word = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    (word % shards.max(1) as u64) as usize
}

/// A checkpoint whose tables were read and checked against the plan (`read_checkpoint`).
struct CheckpointRead {
    ckpt: checkpoint::Checkpoint,
    /// Bytes of each slot's segment the plan takes from the checkpoint (0: none).
    trusted: Box<index::TrustedLens>,
    tallies: Vec<index::TableTally>,
}

/// Read the checkpoint's tables, checking each entry against `planned` as it is read (one
/// pass over the tables: count, which to drop, none past its segment's trusted length),
/// then its CRC. Done before any segment is scanned: the plan comes from the checkpoint's
/// head, and a scan truncates torn tails, so only a checkpoint whose CRC held may steer it.
fn read_checkpoint(
    pending: checkpoint::Pending,
    planned: &[(recovery::SegmentFile, recovery::ScanFrom)],
) -> Result<CheckpointRead, String> {
    let from: HashMap<(usize, u64), u64> = planned
        .iter()
        .filter_map(|((shard, seq, _), from)| match *from {
            recovery::ScanFrom::Trusted(n) | recovery::ScanFrom::After(n) => {
                Some(((*shard, *seq), n))
            }
            recovery::ScanFrom::Start => None,
        })
        .collect();
    let mut trusted: Box<index::TrustedLens> = vec![0u32; INDEX_SEGMENT_SLOTS]
        .into_boxed_slice()
        .try_into()
        .expect("INDEX_SEGMENT_SLOTS entries");
    for c in pending.head.segments.iter().filter(|c| c.slot != 0) {
        let Some(&n) = from.get(&(c.shard as usize, c.seq)) else {
            continue;
        };
        let Some(t) = trusted.get_mut(c.slot as usize) else {
            return Err("bad segment slot".into());
        };
        // Offsets in the index are below INDEX_SEGMENT_BYTES_MAX, so capping at u32::MAX
        // lets through no entry that the full length would refuse.
        *t = u32::try_from(n).unwrap_or(u32::MAX);
    }
    let mut tallies = vec![index::TableTally::default(); 2 * index::INDEX_SHARDS];
    let ckpt = pending.read_tables(|table, entries| {
        if index::tally_entries(entries, &trusted, &mut tallies[table]) {
            Ok(())
        } else {
            Err("an entry points past its segment")
        }
    })?;
    Ok(CheckpointRead {
        ckpt,
        trusted,
        tallies,
    })
}

/// The index a checkpoint describes, restricted to the segments `scanned` took from it
/// (the rest lose their entries and were scanned in full), and its tombstone map.
fn restore_checkpoint(
    read: CheckpointRead,
    scanned: &[recovery::ScannedSegment],
) -> Result<(Index, checkpoint::Tombstones), &'static str> {
    let CheckpointRead {
        ckpt,
        trusted,
        tallies,
    } = read;
    let by_name: HashMap<(usize, u64), &recovery::ScannedSegment> = scanned
        .iter()
        .filter(|s| s.trusted_below > 0)
        .map(|s| ((s.segment.shard(), s.segment.seq()), s))
        .collect();
    let mut slots = Vec::new();
    for c in ckpt.segments.iter().filter(|c| c.slot != 0) {
        let want = trusted.get(c.slot as usize).copied().unwrap_or(0);
        if want == 0 {
            continue;
        }
        // The scan opened it with the length the plan vouched for (less only if the file
        // shrank between the plan's stat and the open).
        let Some(s) = by_name.get(&(c.shard as usize, c.seq)) else {
            return Err("a segment changed while opening");
        };
        if s.trusted_below.min(u32::MAX as u64) != want as u64 {
            return Err("a segment changed while opening");
        }
        slots.push(index::SlotInfo {
            slot: c.slot as usize,
            segment: s.segment.clone(),
            refs: c.refs,
            records: c.records,
            bytes: c.bytes,
        });
    }
    let mut snapshot = index::IndexSnapshot {
        seed: ckpt.seed,
        main: ckpt.main,
        req2: ckpt.req2,
        tallies,
        slots,
    };
    if snapshot.main.len() != index::INDEX_SHARDS || snapshot.req2.len() != index::INDEX_SHARDS {
        return Err("table count differs");
    }
    let dropped = snapshot.drop_untrusted(&trusted);
    if dropped > 0 {
        tracing::info!(
            entries = dropped,
            "checkpoint entries of segments changed or gone since dropped"
        );
    }
    let index = Index::restore(snapshot).map_err(|_| "bad segment slot")?;
    Ok((index, ckpt.tombstones))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Open (creating if needed) the store in `dir`: lock it, recover every segment in parallel,
    /// build the index.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Store, RecoveryReport), StoreError> {
        Self::open_with(dir, opts, Access::ReadWrite)
    }

    /// Open the existing store in `dir` for lookups only, beside the process that holds its
    /// lock (or none): no lock is taken and nothing is written, created or truncated. Records
    /// are verified as by `open`; a torn tail or bad record is skipped and counted. It sees the
    /// records that were complete when it scanned, not later appends. `append` returns
    /// `StoreError::ReadOnly`.
    ///
    /// The writer never changes bytes below a record it has finished writing, with one
    /// exception: when writing or syncing a record fails, it cuts that record off again. A
    /// reader that verified the record in between would fault (SIGBUS) reading it, so keep
    /// read-only stores short-lived (a CLI command), not open for the life of a process.
    pub fn open_read_only(dir: &Path) -> Result<(Store, RecoveryReport), StoreError> {
        Self::open_with(dir, StoreOptions::default(), Access::ReadOnly)
    }

    fn open_with(
        dir: &Path,
        opts: StoreOptions,
        access: Access,
    ) -> Result<(Store, RecoveryReport), StoreError> {
        let started = Instant::now();
        let shards = opts.shards.max(1);
        let mut segment_bytes = opts.segment_bytes;
        if opts.capacity_bytes > 0 {
            // Active segments (one per shard) cannot be evicted: keep them to a quarter of the
            // capacity, so most of it is always in sealed segments eviction can choose from.
            segment_bytes = segment_bytes.min(opts.capacity_bytes / (4 * shards as u64));
        }
        let opts = StoreOptions {
            shards,
            segment_bytes: segment_bytes.clamp(SEGMENT_BYTES_MIN, INDEX_SEGMENT_BYTES_MAX),
            sync: opts.sync,
            capacity_bytes: opts.capacity_bytes,
        };
        let track_refs = opts.capacity_bytes > 0 && access == Access::ReadWrite;
        let segments_dir = dir.join(SEGMENTS_DIR);
        let (lock, reserved) = match access {
            Access::ReadWrite => {
                std::fs::create_dir_all(dir).map_err(io_at(dir))?;
                let lock = lock::lock_dir(dir)?;
                if !segments_dir.is_dir() {
                    std::fs::create_dir_all(&segments_dir).map_err(io_at(&segments_dir))?;
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io_at(dir))?;
                }
                let reserved = usize::try_from(opts.segment_bytes).unwrap_or(usize::MAX);
                (Some(lock), reserved)
            }
            // Nothing will be appended, so each segment is mapped at its current length. A
            // missing `segments` directory is an error (reading it), not an empty store: it is
            // more likely a wrong --data-dir than a store that never stored anything.
            Access::ReadOnly => (None, 0),
        };
        let (blocklist, bad_lines) = Blocklist::load(dir).map_err(io_at(dir))?;
        for b in &bad_lines {
            tracing::warn!(line = b.line, text = %b.text, "blocklist line is not an info-hash; ignored");
        }
        let files = recovery::list_segments(&segments_dir)?;
        let mut ckpt = checkpoint::read(dir);
        let (scanned, index, restored) = loop {
            let planned = recovery::plan(files.clone(), ckpt.as_ref().map(|p| &p.head));
            let from_ckpt = match ckpt.take().map(|p| read_checkpoint(p, &planned)) {
                None => None,
                Some(Ok(read)) => Some(read),
                Some(Err(why)) => {
                    tracing::warn!("index checkpoint ignored ({why}); full scan");
                    continue;
                }
            };
            let scanned =
                recovery::scan_all(&planned, reserved, available_cores(), access, track_refs)?;
            match from_ckpt {
                None => break (scanned, Index::new(KeyHasher::random()), None),
                Some(read) => match restore_checkpoint(read, &scanned) {
                    Ok((index, tombs)) => break (scanned, index, Some(tombs)),
                    Err(why) => {
                        tracing::warn!("index checkpoint not usable ({why}); full scan");
                    }
                },
            }
        };
        let mut report = RecoveryReport {
            segments: scanned.len(),
            segments_from_checkpoint: scanned.iter().filter(|s| s.trusted_below > 0).count(),
            blocklist_bad_lines: bad_lines,
            ..RecoveryReport::default()
        };
        // Tombstones first: they may lie in any segment, before or after what they delete.
        // The checkpoint's were applied to its index when they were written.
        let mut tombstones: HashMap<[u8; 20], u64> = HashMap::new();
        let mut new_tombstones: Vec<([u8; 20], u64)> = Vec::new();
        for s in &scanned {
            for (_, header) in s.records.iter().filter(|(_, h)| h.is_tombstone()) {
                report.tombstones += 1;
                for key in header.hashes().handshake_keys() {
                    let t = tombstones.entry(key).or_insert(0);
                    *t = (*t).max(header.stored_at);
                    new_tombstones.push((key, header.stored_at));
                }
            }
        }
        if let Some(tombs) = &restored {
            for (key, at) in tombs {
                let t = tombstones.entry(*key).or_insert(0);
                *t = (*t).max(*at);
            }
        }
        let mut writers: Vec<Writer> = (0..opts.shards)
            .map(|shard| Writer {
                shard,
                active: None,
                dirty: false,
            })
            .collect();
        let mut sealed = BTreeMap::new();
        let mut disk_bytes = 0;
        let mut next_seq = 0;
        for s in &scanned {
            disk_bytes += s.end;
            next_seq = next_seq.max(s.segment.seq() + 1);
            if s.tail_bytes > 0 {
                match access {
                    Access::ReadWrite => {
                        report.torn_tails_truncated += 1;
                        report.bytes_truncated += s.tail_bytes;
                    }
                    Access::ReadOnly => {
                        report.torn_tails_skipped += 1;
                        report.tail_bytes_skipped += s.tail_bytes;
                    }
                }
            }
            report.corrupt_records_skipped += s.corrupt_records;
            report.corrupt_bytes_skipped += s.corrupt_bytes;
            for (offset, header) in &s.records {
                if header.is_tombstone() {
                    continue;
                }
                let hashes = header.hashes();
                let deleted = hashes
                    .handshake_keys()
                    .any(|k| tombstones.get(&k).is_some_and(|&t| t >= header.stored_at));
                if deleted {
                    report.deleted_skipped += 1;
                    continue;
                }
                if hashes.handshake_keys().any(|k| blocklist.contains(&k)) {
                    report.blocked_skipped += 1;
                    continue;
                }
                if *offset - HEADER_BYTES >= INDEX_SEGMENT_BYTES_MAX as usize {
                    return Err(StoreError::SegmentTooLarge {
                        path: s.segment.path().to_path_buf(),
                        offset: (*offset - HEADER_BYTES) as u64,
                    });
                }
                let record = RecordRef::new(s.segment.clone(), *offset, header);
                match index.publish(&header.hashes(), &record) {
                    Ok(()) => {}
                    Err(PublishError::Taken(_)) => report.duplicates += 1,
                    Err(PublishError::SlotsFull) => return Err(StoreError::IndexFull),
                }
            }
            // Sorted by (shard, seq): the last segment seen for a shard is its newest, where
            // that shard's writer resumes; the ones before it are sealed. (A shard beyond
            // today's shard count has no writer: all its segments are sealed.)
            let seal = |seg: &Arc<Segment>, len: u64, sealed: &mut BTreeMap<_, _>| {
                let segment = seg.clone();
                sealed.insert((seg.seq(), seg.shard()), Sealed { segment, len });
            };
            match writers.get_mut(s.segment.shard()) {
                Some(w) => {
                    let resumed = Active {
                        segment: s.segment.clone(),
                        end: s.end,
                    };
                    if let Some(prev) = w.active.replace(resumed) {
                        seal(&prev.segment, prev.end, &mut sealed);
                    }
                }
                None => seal(&s.segment, s.end, &mut sealed),
            }
        }
        if restored.is_some() {
            // What the checkpoint restored has not seen the tombstones scanned now (written
            // after it) nor today's blocklist.
            for (key, at) in &new_tombstones {
                if let Some(r) = index.get(key).filter(|r| r.stored_at() <= *at) {
                    if index.remove(&r.hashes(), &r) {
                        report.deleted_skipped += 1;
                    }
                }
            }
            for key in blocklist.keys() {
                if let Some(r) = index.get(&key) {
                    if index.remove(&r.hashes(), &r) {
                        report.blocked_skipped += 1;
                    }
                }
            }
        }
        (report.records, report.bytes) = {
            let (records, bytes) = index.totals();
            (records as usize, bytes)
        };
        report.elapsed = started.elapsed();
        let store = Store {
            segments_dir,
            opts,
            index,
            writers: writers.into_iter().map(Mutex::new).collect(),
            records: AtomicU64::new(report.records as u64),
            bytes: AtomicU64::new(report.bytes),
            segments: AtomicUsize::new(report.segments),
            disk_bytes: AtomicU64::new(disk_bytes),
            next_seq: AtomicU64::new(next_seq),
            sealed: Mutex::new(sealed),
            evicting: Mutex::new(()),
            counters: Counters::default(),
            access,
            blocklist,
            tombstones: Mutex::new(tombstones),
            listener: std::sync::OnceLock::new(),
            _lock: lock,
        };
        Ok((store, report))
    }

    /// The record for a 20-byte handshake key (v1 info-hash, or a v2 info-hash's first 20 bytes).
    /// Marks the record referenced for the eviction policy (a relaxed load, usually).
    pub fn lookup(&self, key: &[u8; 20]) -> Option<RecordRef> {
        let record = self.checked(self.index.get(key)?)?;
        record.touch();
        Some(record)
    }

    /// `lookup` for a thread that must not wait for the disk (a worker's event loop): the
    /// record only if its header and bytes are in the page cache (`Segment::is_resident`:
    /// an atomic load per page, `mincore` for pages not seen this period), `Cold` if
    /// reading it would fault to the disk: then `page_in` it off the thread and look again.
    /// Headers of other candidates (a false tag match) are checked the same way first.
    /// `now`: the caller's current time (a worker's time of its turn), which ages the
    /// residency bits (`RESIDENCY_AGE`): a page seen resident is asked about again once
    /// `now` has moved into a new period.
    pub fn lookup_resident(&self, key: &[u8; 20], now: Instant) -> Resident {
        let period = segment::residency_period(now);
        let found = self
            .index
            .get_if(key, |seg, at| seg.is_resident(at, HEADER_BYTES, period));
        let record = match found {
            Ok(Some(record)) => record,
            Ok(None) => return Resident::Miss,
            Err(_) => return Resident::Cold,
        };
        let (seg, at) = (record.segment(), record.header_offset());
        // The padding too: a record restored from a checkpoint is verified (padding
        // included) on first serve, and sends read the payload.
        if !seg.is_resident(at, record_bytes(record.len()), period) {
            return Resident::Cold;
        }
        match self.checked(record) {
            Some(record) => {
                record.touch();
                Resident::Hit(record)
            }
            None => Resident::Miss,
        }
    }

    /// Reads the record for `key` into the page cache and returns it, as `lookup`
    /// (blocking on the disk: for a page-in thread, after `lookup_resident` said `Cold`).
    pub fn page_in(&self, key: &[u8; 20]) -> Option<RecordRef> {
        // Each candidate's header page is read in exactly (no fault read-around, which
        // can be megabytes: `read_ahead_kb`) before the lookup reads the header.
        let record = self
            .index
            .get_if(key, |seg, at| {
                seg.page_in(at, HEADER_BYTES);
                true
            })
            .ok()??;
        let (seg, at) = (record.segment(), record.header_offset());
        seg.page_in(at, record_bytes(record.len()));
        let record = self.checked(record)?;
        record.touch();
        Some(record)
    }

    /// `record`, unless it came from the index checkpoint, has not been verified since the
    /// store opened, and fails now: then it leaves the index and is never served. One
    /// atomic load for every other record.
    fn checked(&self, record: RecordRef) -> Option<RecordRef> {
        let (segment, at) = (record.segment(), record.header_offset());
        if !segment.needs_verify(at) {
            return Some(record);
        }
        let header = Header::decode(segment.bytes(at, HEADER_BYTES)).ok()?;
        let info_len = header.info_len as usize;
        let padding = segment.bytes(
            at + HEADER_BYTES + info_len,
            header.record_bytes() - HEADER_BYTES - info_len,
        );
        if padding.iter().all(|&b| b == 0) && verify_info(record.info(), &header.hashes()) {
            segment.mark_verified(at);
            return Some(record);
        }
        tracing::warn!(
            file = %segment.path().display(),
            offset = at,
            "record damaged on disk since it was verified: dropped, not served"
        );
        self.counters
            .records_corrupt_on_serve
            .fetch_add(1, Ordering::Relaxed);
        if self.index.remove(&header.hashes(), &record) {
            self.records.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(record.len() as u64, Ordering::Relaxed);
        }
        None
    }

    /// The handshake key (v1 info-hash or v2 prefix) of a stored record whose
    /// `HASH('req2', key)` is `req2`: how an MSE responder finds the torrent an encrypted
    /// peer asks for (`crate::mse::Responder`). One read-locked map lookup; does not mark the
    /// record referenced (the `lookup` that follows does).
    pub fn lookup_req2(&self, req2: &[u8; 20]) -> Option<[u8; 20]> {
        self.index.get_req2(req2)
    }

    /// The record for a full v2 info-hash.
    pub fn lookup_v2(&self, key: &[u8; 32]) -> Option<RecordRef> {
        let record = self
            .index
            .get(&v2_handshake_key(key))
            .filter(|r| r.hashes().v2.as_ref() == Some(key))?;
        let record = self.checked(record)?;
        record.touch();
        Some(record)
    }

    /// The record filed under any of these hashes.
    pub fn lookup_hashes(&self, hashes: &InfoHashes) -> Option<RecordRef> {
        hashes
            .handshake_keys()
            .find_map(|k| self.index.get(&k).and_then(|r| self.checked(r)))
    }

    /// Validate `info` (computing its hashes ourselves), and store it unless one of its keys is
    /// already present. The returned record is durable per the sync policy and published.
    pub fn append(&self, info: &[u8], opts: AppendOptions) -> Result<AppendOutcome, StoreError> {
        if self.access == Access::ReadOnly {
            return Err(StoreError::ReadOnly);
        }
        if info.len() > METADATA_BYTES_MAX {
            return Err(StoreError::TooLarge {
                len: info.len(),
                max: METADATA_BYTES_MAX,
            });
        }
        // Hashing is the expensive part; it runs before any lock is taken.
        let summary = validate_info(info)?;
        let hashes = summary.hashes;
        if let Some(key) = hashes.handshake_keys().find(|k| self.blocklist.contains(k)) {
            return Err(StoreError::Blocked(hex::encode(key)));
        }
        if let Some(existing) = self.lookup_hashes(&hashes) {
            return Ok(AppendOutcome::AlreadyPresent(existing));
        }
        let key = hashes.primary_key().expect("a validated dict has v1 or v2");
        let shard = opts
            .shard
            .unwrap_or_else(|| shard_of(&key, self.opts.shards))
            % self.opts.shards;

        let header = Header::for_info(
            &hashes,
            summary.private,
            info.len(),
            self.stamp_after_tombstones(&hashes),
        );
        let mut buf = Vec::with_capacity(header.record_bytes());
        buf.extend_from_slice(&header.encode());
        buf.extend_from_slice(info);
        buf.resize(header.record_bytes(), 0);
        debug_assert!(crate::metainfo::verify_info(
            &buf[HEADER_BYTES..][..info.len()],
            &hashes
        ));

        let mut writer = self.writer(shard);
        // A racing append of the same dict on this writer may have won while we hashed.
        if let Some(existing) = self.index.get_any(&hashes) {
            return Ok(AppendOutcome::AlreadyPresent(existing));
        }
        self.make_room(&mut writer, buf.len() as u64)?;
        let (segment, at) = self.write_record(&mut writer, &buf, self.opts.sync)?;
        // Paired assertion: what the mapping now shows is the header we meant to write.
        let payload_at = at + HEADER_BYTES;
        if Header::decode(segment.bytes(at, HEADER_BYTES)) != Ok(header) {
            return Err(StoreError::ReadBack {
                path: segment.path().to_path_buf(),
                offset: at as u64,
            });
        }
        let record = RecordRef::new(segment, payload_at, &header);
        match self.index.publish(&hashes, &record) {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(info.len() as u64, Ordering::Relaxed);
                self.notify(StoreEvent::Stored {
                    record: &record,
                    origin: opts.origin,
                });
                Ok(AppendOutcome::Stored(record))
            }
            // Another writer (caller-chosen shard) published the same dict first; ours stays on
            // disk as a duplicate that recovery will count and skip.
            Err(PublishError::Taken(existing)) => Ok(AppendOutcome::AlreadyPresent(existing)),
            Err(PublishError::SlotsFull) => Err(StoreError::IndexFull),
        }
    }

    /// Now, or just after the newest tombstone of these hashes if that is later (the clock may
    /// have gone back, or the delete was this second): recovery keeps only records stored
    /// after their tombstone.
    fn stamp_after_tombstones(&self, hashes: &InfoHashes) -> u64 {
        let tombs = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
        hashes
            .handshake_keys()
            .filter_map(|k| tombs.get(&k).map(|t| t.saturating_add(1)))
            .fold(unix_now(), u64::max)
    }

    /// Whether a 20-byte handshake key (v1 info-hash or v2 prefix) is blocked: never to be
    /// fetched, stored or served. No lock while the blocklist is empty (an atomic length);
    /// otherwise a read lock on the hash set.
    pub fn is_blocked(&self, key: &[u8; 20]) -> bool {
        self.blocklist.contains(key)
    }

    /// Entries on the blocklist.
    pub fn blocklist_len(&self) -> usize {
        self.blocklist.len()
    }

    /// Delete the record under `key` (a handshake key) if there is one, and block `key` and
    /// the record's other hashes. Durable when it returns: blocklist file and tombstone are
    /// both synced. `v2_full` is the full v2 hash when the caller knows it (written to the
    /// blocklist in place of the prefix, for the operator reading the file).
    pub fn delete(
        &self,
        key: &[u8; 20],
        v2_full: Option<&[u8; 32]>,
        reason: &str,
    ) -> Result<DeleteOutcome, StoreError> {
        self.delete_from(key, v2_full, reason, Origin::Local)
    }

    /// `delete`, saying where the delete came from (the listener is told).
    ///
    /// A tombstone record is written whenever something changes: the record's hashes when
    /// one is stored, else the newly blocked key (as v1, or the full v2 when given). So a
    /// block of a hash never stored is on disk with a time too, and the shared tier's
    /// uploader finds it after a crash (`tombstones_since`).
    pub fn delete_from(
        &self,
        key: &[u8; 20],
        v2_full: Option<&[u8; 32]>,
        reason: &str,
        origin: Origin,
    ) -> Result<DeleteOutcome, StoreError> {
        if self.access == Access::ReadOnly {
            return Err(StoreError::ReadOnly);
        }
        let record = self.index.get(key);
        let hashes = record.as_ref().map(|r| r.hashes());
        let entries = self.blocklist_entries(hashes.as_ref(), key, v2_full);
        self.block(&entries, reason)?;
        let blocked: Vec<String> = entries.iter().map(|(hex, _)| hex.clone()).collect();
        // What the tombstone names: the stored record's hashes, else the key just blocked.
        let tomb_hashes = match (&hashes, entries.is_empty()) {
            (Some(h), _) => *h,
            (None, true) => {
                return Ok(DeleteOutcome {
                    removed: None,
                    blocked,
                })
            }
            (None, false) => match v2_full {
                Some(v2) => InfoHashes {
                    v1: None,
                    v2: Some(*v2),
                },
                None => InfoHashes {
                    v1: Some(*key),
                    v2: None,
                },
            },
        };
        let deleted_at = unix_now().max(record.as_ref().map_or(0, |r| r.stored_at()));
        let tomb = Header::tombstone(&tomb_hashes, deleted_at);
        let primary = tomb_hashes.primary_key().expect("a tombstone has a key");
        let mut writer = self.writer(shard_of(&primary, self.opts.shards));
        self.make_room(&mut writer, HEADER_BYTES as u64)?;
        let (segment, at) = self.write_record(&mut writer, &tomb.encode(), self.opts.sync)?;
        if self.opts.sync == SyncPolicy::Batch {
            // A delete is acknowledged to an operator: durable now whatever the policy.
            segment.sync_data().map_err(io_at(segment.path()))?;
            writer.dirty = false;
        }
        if Header::decode(segment.bytes(at, HEADER_BYTES)) != Ok(tomb) {
            return Err(StoreError::ReadBack {
                path: segment.path().to_path_buf(),
                offset: at as u64,
            });
        }
        // The writer stays held until the index and the tombstone map agree with the
        // tombstone on disk: a checkpoint (taken under every writer) never sees one without
        // the others.
        let keys: Vec<[u8; 20]> = tomb_hashes.handshake_keys().collect();
        {
            let mut tombs = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
            for k in &keys {
                let t = tombs.entry(*k).or_insert(0);
                *t = (*t).max(deleted_at);
            }
        }
        if let Some(record) = &record {
            if self.index.remove(&tomb_hashes, record) {
                self.records.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(record.len() as u64, Ordering::Relaxed);
            }
        }
        drop(writer);
        self.notify(StoreEvent::Deleted {
            keys: &keys,
            at: deleted_at,
            origin,
        });
        Ok(DeleteOutcome {
            removed: hashes,
            blocked,
        })
    }

    /// The blocklist lines a delete of `key` adds: every hash of its record if stored
    /// (`hashes`), else the key itself; those already blocked left out.
    fn blocklist_entries(
        &self,
        hashes: Option<&InfoHashes>,
        key: &[u8; 20],
        v2_full: Option<&[u8; 32]>,
    ) -> Vec<(String, [u8; 20])> {
        let mut entries: Vec<(String, [u8; 20])> = Vec::new();
        match hashes {
            Some(h) => {
                if let Some(v1) = h.v1 {
                    entries.push((hex::encode(v1), v1));
                }
                if let Some(v2) = h.v2 {
                    entries.push((hex::encode(v2), v2_handshake_key(&v2)));
                }
            }
            None => match v2_full {
                Some(v2) => entries.push((hex::encode(v2), *key)),
                None => entries.push((hex::encode(key), *key)),
            },
        }
        entries.retain(|(_, k)| !self.blocklist.contains(k));
        entries
    }

    /// Adds `entries` to the blocklist durably (one rewrite of the file), commented with
    /// `reason` and the time; nothing to do for none.
    fn block(&self, entries: &[(String, [u8; 20])], reason: &str) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let comment = format!("{reason} at unix {}", unix_now());
        self.blocklist
            .add(entries, comment.trim())
            .map_err(io_at(self.blocklist.path()))
    }

    /// `delete_from` for many keys (another node's tombstones), with one durable write of
    /// the blocklist for all of them: the file is rewritten whole on each write, so one
    /// per key made a new node's first pass over n tombstones O(n²).
    pub fn delete_batch_from(
        &self,
        keys: &[[u8; 20]],
        reason: &str,
        origin: Origin,
    ) -> Result<(), StoreError> {
        if self.access == Access::ReadOnly {
            return Err(StoreError::ReadOnly);
        }
        let mut entries: Vec<(String, [u8; 20])> = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for key in keys {
            let hashes = self.index.get(key).map(|r| r.hashes());
            let new = self.blocklist_entries(hashes.as_ref(), key, None);
            entries.extend(new.into_iter().filter(|(_, k)| listed.insert(*k)));
        }
        self.block(&entries, reason)?;
        // Each key is blocked now, so these only write the tombstone records of what was
        // stored, remove it and tell the listener.
        for key in keys {
            self.delete_from(key, None, reason, origin)?;
        }
        Ok(())
    }

    /// Set the one listener told of every stored record and delete from now on (the
    /// shared tier's uploader). A second call is refused.
    pub fn set_listener(&self, listener: StoreListener) -> Result<(), StoreListener> {
        self.listener.set(listener)
    }

    fn notify(&self, event: StoreEvent<'_>) {
        if let Some(l) = self.listener.get() {
            l(event);
        }
    }

    /// Handshake keys whose newest tombstone is stamped at or after `since` (unix seconds),
    /// with that stamp.
    pub fn tombstones_since(&self, since: u64) -> Vec<([u8; 20], u64)> {
        let tombs = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
        tombs
            .iter()
            .filter(|(_, &t)| t >= since)
            .map(|(k, &t)| (*k, t))
            .collect()
    }

    /// Take `keys` off the blocklist (the hashes may then be fetched and stored again; a
    /// deleted record's old bytes stay deleted).
    pub fn unblock(&self, keys: &[[u8; 20]]) -> Result<usize, StoreError> {
        let path = self.blocklist.path().to_path_buf();
        self.blocklist.remove(keys).map_err(io_at(&path))
    }

    /// Re-read the blocklist file (after a hand edit) and take every stored record it now
    /// blocks out of the index (not deleted: unblocking and restarting brings it back).
    pub fn reload_blocklist(&self) -> Result<BlocklistReload, StoreError> {
        let path = self.blocklist.path().to_path_buf();
        let bad_lines = self.blocklist.reload().map_err(io_at(&path))?;
        let mut blocked = Vec::new();
        self.index.for_each(|k, r| {
            if self.blocklist.contains(k) {
                blocked.push(r.clone());
            }
        });
        let mut unpublished = 0;
        for r in blocked {
            if self.index.remove(&r.hashes(), &r) {
                unpublished += 1;
                self.records.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(r.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(BlocklistReload {
            entries: self.blocklist.len(),
            unpublished,
            bad_lines,
        })
    }

    /// Every stored record once (a hybrid is filed under two keys but visited once), in no
    /// particular order. Walks the whole index: for the admin plane, not the serving path.
    pub fn for_each_record(&self, mut f: impl FnMut(&RecordRef)) {
        self.index.for_each(|k, r| {
            // Visit a record under its primary key only: v1 if present, else the v2 prefix.
            let primary = if r.has_v1() {
                k == &r.hashes().v1.unwrap_or_default()
            } else {
                true
            };
            if primary {
                f(r);
            }
        });
    }

    fn writer(&self, shard: usize) -> MutexGuard<'_, Writer> {
        // A panic mid-append leaves `end` at the last completed record; the next append
        // overwrites whatever was partially written, so the state is still usable.
        self.writers[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Write one encoded record for `w`'s shard; returns its segment and header offset.
    /// `sync`: `Always` fdatasyncs it before returning; `Batch` leaves the writer dirty (a
    /// roll to a new segment, `Store::sync` or an eviction pass syncs it).
    fn write_record(
        &self,
        w: &mut Writer,
        buf: &[u8],
        sync: SyncPolicy,
    ) -> Result<(Arc<Segment>, usize), StoreError> {
        let result = self.write_record_inner(w, buf, sync);
        if let Err(e) = &result {
            self.counters.append_errors.fetch_add(1, Ordering::Relaxed);
            if matches!(e, StoreError::NoSpace { .. }) {
                self.counters
                    .append_errors_no_space
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    fn write_record_inner(
        &self,
        w: &mut Writer,
        buf: &[u8],
        sync: SyncPolicy,
    ) -> Result<(Arc<Segment>, usize), StoreError> {
        let need = buf.len() as u64;
        debug_assert_eq!(buf.len(), record_bytes(buf.len() - HEADER_BYTES));
        if need > self.opts.segment_bytes {
            // A segment of its own, synced now: it never becomes anyone's active segment.
            let segment = self.new_segment(w, buf.len())?;
            let written = segment
                .write_all_at(buf, 0)
                .and_then(|()| segment.sync_data());
            if let Err(e) = written {
                let _ = std::fs::remove_file(segment.path());
                self.segments.fetch_sub(1, Ordering::Relaxed);
                return Err(io_at(segment.path())(e));
            }
            self.disk_bytes.fetch_add(need, Ordering::Relaxed);
            self.seal(&segment, need);
            return Ok((segment, 0));
        }
        let has_room = w
            .active
            .as_ref()
            .is_some_and(|a| a.end + need <= a.segment.reserved_bytes() as u64);
        if !has_room {
            if let Some(old) = &w.active {
                if w.dirty {
                    old.segment.sync_data().map_err(io_at(old.segment.path()))?;
                    w.dirty = false;
                }
            }
            let reserved = usize::try_from(self.opts.segment_bytes).unwrap_or(usize::MAX);
            let segment = self.new_segment(w, reserved)?;
            if let Some(old) = w.active.replace(Active { segment, end: 0 }) {
                self.seal(&old.segment, old.end);
            }
        }
        let active = w.active.as_mut().expect("rolled above");
        let at = active.end;
        if let Err(e) = active.segment.write_all_at(buf, at) {
            // Do not leave a partial record for the next append to sit behind.
            let _ = active.segment.set_len(at);
            return Err(io_at(active.segment.path())(e));
        }
        match sync {
            SyncPolicy::Always => {
                if let Err(e) = active.segment.sync_data() {
                    // The bytes may or may not be durable; do not publish them, and cut them so
                    // the next append does not land behind an unacknowledged record.
                    let _ = active.segment.set_len(at);
                    return Err(io_at(active.segment.path())(e));
                }
            }
            SyncPolicy::Batch => w.dirty = true,
        }
        active.end = at + need;
        self.disk_bytes.fetch_add(need, Ordering::Relaxed);
        Ok((active.segment.clone(), at as usize))
    }

    fn new_segment(&self, w: &mut Writer, reserved: usize) -> Result<Arc<Segment>, StoreError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let track_refs = self.opts.capacity_bytes > 0;
        let segment = Segment::create(&self.segments_dir, w.shard, seq, reserved, track_refs)
            .map_err(io_at(&self.segments_dir))?;
        self.segments.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(segment))
    }

    /// Queue a segment no writer will append to again for eviction.
    fn seal(&self, segment: &Arc<Segment>, len: u64) {
        let mut sealed = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        sealed.insert(
            (segment.seq(), segment.shard()),
            Sealed {
                segment: segment.clone(),
                len,
            },
        );
    }

    /// Make every appended record durable (a no-op under `SyncPolicy::Always`).
    pub fn sync(&self) -> Result<(), StoreError> {
        for shard in 0..self.writers.len() {
            let mut w = self.writer(shard);
            if w.dirty {
                if let Some(a) = &w.active {
                    a.segment.sync_data().map_err(io_at(a.segment.path()))?;
                }
                w.dirty = false;
            }
        }
        Ok(())
    }

    /// Write the index checkpoint (`checkpoint` module): with every writer held, sync what
    /// is unsynced, copy the index tables, the tombstone map and each segment's length and
    /// identity; then write the file durably, writers released. The next open takes every
    /// segment it describes without re-hashing. Called at a clean shutdown and on drop.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        if self.access == Access::ReadOnly {
            return Err(StoreError::ReadOnly);
        }
        let dir = self
            .segments_dir
            .parent()
            .expect("segments dir is in the data dir")
            .to_path_buf();
        let mut writers: Vec<_> = (0..self.writers.len()).map(|s| self.writer(s)).collect();
        let mut segments: Vec<(Arc<Segment>, u64)> = Vec::new();
        for w in writers.iter_mut() {
            let dirty = w.dirty;
            if let Some(a) = &w.active {
                if dirty {
                    a.segment.sync_data().map_err(io_at(a.segment.path()))?;
                }
                segments.push((a.segment.clone(), a.end));
            }
            w.dirty = false;
        }
        segments.extend(
            self.sealed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|s| (s.segment.clone(), s.len)),
        );
        let written_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let tombstones: Vec<([u8; 20], u64)> = self
            .tombstones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, t)| (*k, *t))
            .collect();
        // Written from the index's tables in place, under their read locks and with the
        // writers held (appends wait for the write and its fsync; lookups do not): a copy
        // of the tables, to write after releasing the writers, would need a second index's
        // worth of memory at every stop.
        let written = self.index.with_tables(|seed, slots, tables| {
            let mut states = Vec::with_capacity(segments.len());
            for (segment, len) in &segments {
                let meta = std::fs::metadata(segment.path()).map_err(io_at(segment.path()))?;
                let (ino, mtime_ns, _) = checkpoint::file_identity(&meta);
                let slot = slots.iter().find(|s| Arc::ptr_eq(&s.segment, segment));
                states.push(checkpoint::SegmentState {
                    shard: segment.shard() as u32,
                    seq: segment.seq(),
                    len: *len,
                    ino,
                    mtime_ns,
                    slot: slot.map_or(0, |s| s.slot as u32),
                    refs: slot.map_or(0, |s| s.refs),
                    records: slot.map_or(0, |s| s.records),
                    bytes: slot.map_or(0, |s| s.bytes),
                });
            }
            let ckpt = checkpoint::CheckpointRef {
                written_ns,
                seed,
                segments: &states,
                tombstones: &tombstones,
                tables,
            };
            checkpoint::write(&dir, &ckpt).map_err(io_at(&dir))
        });
        drop(writers);
        written
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            records: get(&self.records),
            bytes: get(&self.bytes),
            segments: self.segments.load(Ordering::Relaxed),
            disk_bytes: get(&self.disk_bytes),
            capacity_bytes: self.opts.capacity_bytes,
            segments_evicted: get(&c.segments_evicted),
            records_reappended: get(&c.records_reappended),
            records_evicted: get(&c.records_evicted),
            append_errors: get(&c.append_errors),
            append_errors_no_space: get(&c.append_errors_no_space),
            records_corrupt_on_serve: get(&c.records_corrupt_on_serve),
            index_bytes: self.index.memory_bytes() as u64,
        }
    }

    /// Same as the free function `shard_of`, for callers that think of it as the store's rule.
    pub fn shard_of(key: &[u8; 20], shards: usize) -> usize {
        shard_of(key, shards)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.access == Access::ReadOnly {
            return;
        }
        // `checkpoint` syncs first.
        if let Err(e) = self.checkpoint() {
            tracing::warn!("store checkpoint at close failed: {e}");
            if let Err(e) = self.sync() {
                tracing::warn!("store sync at close failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
