//! The index checkpoint: `D/index.ckpt`, so a restart does not re-hash every record.
//!
//! Written by `Store::checkpoint` (at a clean shutdown, and when a read-write store is
//! dropped) under every writer lock, so it is one consistent cut: the index tables as they
//! are in memory (`index::IndexSnapshot`, 8 bytes per entry), the hash key they were placed
//! with, the tombstone map, and for every segment its (shard, seq), the length it had, its
//! inode and mtime, and which index slot names it.
//!
//! What it proves: every record an entry names, below its segment's recorded length, was
//! verified (hashed against its info-hashes) when it was stored or at an earlier start. What
//! it does not prove: that the bytes are still intact. So at open (`recovery::plan`):
//! - a segment whose inode, length and mtime match, and whose mtime is older than the
//!   checkpoint by `MTIME_MARGIN` (file times are coarse: a write in the same tick as the
//!   checkpoint would leave the mtime unchanged), is taken as it is, unscanned; each of its
//!   records is verified the first time it is served (`Segment::needs_verify`);
//! - one that only grew (same inode, longer) keeps its checkpointed prefix and has the rest
//!   scanned like any segment (the appends after the checkpoint; a torn tail is cut);
//! - any other (shorter, rewritten, replaced, too recent) is scanned in full, and the
//!   checkpoint's entries for it are dropped first; a segment the checkpoint does not know
//!   is scanned in full; one it knows that is gone (evicted since) loses its entries;
//! - tombstones and blocklist entries found or added since are applied to what it restored.
//!
//! Format (little-endian): magic `MGIX`, version, then the fields in `encode` order, then
//! CRC-32 of all that. A checkpoint that does not parse, fails its CRC, or names an offset
//! past a segment's length is ignored (with a log line): the full scan is always correct.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::index::INDEX_SHARDS;

pub(crate) const CHECKPOINT_FILE: &str = "index.ckpt";
const MAGIC: [u8; 4] = *b"MGIX";
/// 2: the index hashes keys with SipHash-1-3 (1: SipHash-2-4), so version-1 tags are
/// not where version 2 looks; a version-1 checkpoint is refused (one full scan).
const VERSION: u32 = 2;

/// A segment modified this close before the checkpoint was written is scanned anyway: Linux
/// file times advance by the coarse clock (a jiffy, 1–10 ms), so a write just after the
/// checkpoint could leave the same mtime. 100 ms is ten ticks at HZ=100.
pub(crate) const MTIME_MARGIN: Duration = Duration::from_millis(100);

/// A segment as the checkpoint saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentState {
    pub shard: u32,
    pub seq: u64,
    pub len: u64,
    pub ino: u64,
    /// mtime, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Index slot naming it (0: none) and that slot's counts (`index::SlotInfo`).
    pub slot: u32,
    pub refs: u32,
    pub records: u64,
    pub bytes: u64,
}

/// (handshake key, newest tombstone's stamp) pairs.
pub(crate) type Tombstones = Vec<([u8; 20], u64)>;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// When it was written, nanoseconds since the epoch.
    pub written_ns: i64,
    pub seed: [u64; 2],
    pub segments: Vec<SegmentState>,
    pub tombstones: Tombstones,
    /// `INDEX_SHARDS` tables each.
    pub main: Vec<Vec<u64>>,
    pub req2: Vec<Vec<u64>>,
}

/// (ino, mtime ns, len) of a file.
pub(crate) fn file_identity(meta: &std::fs::Metadata) -> (u64, i64, u64) {
    (
        meta.ino(),
        meta.mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        meta.len(),
    )
}

impl Checkpoint {
    /// The whole checkpoint in memory (tests; `write` streams it).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.encode_to(&mut b).expect("writing to a Vec");
        b
    }

    /// Write the checkpoint to `out`, its CRC last (tests; the store writes a
    /// `CheckpointRef`).
    #[cfg(test)]
    pub fn encode_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        self.borrowed().encode_to(out)
    }

    /// The same checkpoint, its tables borrowed.
    #[cfg(test)]
    pub fn borrowed(&self) -> CheckpointRef<'_> {
        CheckpointRef {
            written_ns: self.written_ns,
            seed: self.seed,
            segments: &self.segments,
            tombstones: &self.tombstones,
            tables: self.main.iter().chain(&self.req2).map(|t| &t[..]).collect(),
        }
    }
}

/// A checkpoint whose tables are borrowed: what `Store::checkpoint` writes straight from
/// the index's locked tables (`Index::with_tables`), so a clean stop does not need a second
/// copy of the index in memory (at 30M records the copy alone is 629 MB).
pub(crate) struct CheckpointRef<'a> {
    pub written_ns: i64,
    pub seed: [u64; 2],
    pub segments: &'a [SegmentState],
    pub tombstones: &'a Tombstones,
    /// `INDEX_SHARDS` main tables, then as many req2 tables.
    pub tables: Vec<&'a [u64]>,
}

impl CheckpointRef<'_> {
    /// Write the checkpoint to `out`, its CRC last.
    pub fn encode_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut w = CrcWriter {
            out,
            crc: crc32fast::Hasher::new(),
        };
        let mut b = Vec::with_capacity(64 + self.segments.len() * 64 + self.tombstones.len() * 28);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.written_ns.to_le_bytes());
        b.extend_from_slice(&self.seed[0].to_le_bytes());
        b.extend_from_slice(&self.seed[1].to_le_bytes());
        b.extend_from_slice(&(self.segments.len() as u64).to_le_bytes());
        for s in self.segments {
            b.extend_from_slice(&s.shard.to_le_bytes());
            b.extend_from_slice(&s.seq.to_le_bytes());
            b.extend_from_slice(&s.len.to_le_bytes());
            b.extend_from_slice(&s.ino.to_le_bytes());
            b.extend_from_slice(&s.mtime_ns.to_le_bytes());
            b.extend_from_slice(&s.slot.to_le_bytes());
            b.extend_from_slice(&s.refs.to_le_bytes());
            b.extend_from_slice(&s.records.to_le_bytes());
            b.extend_from_slice(&s.bytes.to_le_bytes());
        }
        b.extend_from_slice(&(self.tombstones.len() as u64).to_le_bytes());
        for (k, t) in self.tombstones {
            b.extend_from_slice(k);
            b.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&b)?;
        for &t in &self.tables {
            w.write_all(&(t.len() as u64).to_le_bytes())?;
            if cfg!(target_endian = "little") {
                // SAFETY: the same memory as bytes (u8: alignment 1, no invalid values).
                w.write_all(unsafe {
                    std::slice::from_raw_parts(t.as_ptr().cast::<u8>(), std::mem::size_of_val(t))
                })?;
            } else {
                for part in t.chunks(8192) {
                    b.clear();
                    for x in part {
                        b.extend_from_slice(&x.to_le_bytes());
                    }
                    w.write_all(&b)?;
                }
            }
        }
        let crc = w.crc.finalize();
        w.out.write_all(&crc.to_le_bytes())
    }
}

/// Passes bytes on, CRC-ing them.
struct CrcWriter<'a, W: Write> {
    out: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<'_, W> {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.out.write_all(b)
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("truncated");
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// How many table entries are read (and CRC'd and tallied) at a time: 256 KiB, so each run
/// is still in the CPU's cache when it is checked. One pass over the tables' memory in all.
const TABLE_READ_ENTRIES: usize = 32 * 1024;

/// A checkpoint read up to its tables: what planning needs (`head`: everything but the
/// tables, which are left empty), and the open file, positioned at the tables, which
/// `read_tables` reads, checks and CRCs in one pass.
pub(crate) struct Pending {
    pub head: Checkpoint,
    input: Input,
}

/// The checkpoint in `dir`, read up to its tables, if there is one that parses so far.
/// Nothing in it is trusted before `Pending::read_tables` has checked the CRC.
pub(crate) fn read(dir: &Path) -> Option<Pending> {
    let path = dir.join(CHECKPOINT_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), "index checkpoint unreadable, full scan: {e}");
            return None;
        }
    };
    match read_head(file) {
        Ok(c) => Some(c),
        Err(why) => {
            tracing::warn!(file = %path.display(), "index checkpoint ignored ({why}); full scan");
            None
        }
    }
}

/// Decode a checkpoint's head (all but the tables) from a file, CRC-ing as it goes.
fn read_head(file: std::fs::File) -> Result<Pending, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut f = Input {
        // Small: the tables are read in runs larger than this, which then bypass it.
        f: std::io::BufReader::with_capacity(64 << 10, file),
        crc: crc32fast::Hasher::new(),
        left: len.checked_sub(4).ok_or("shorter than its CRC")?,
    };
    let mut head = [0u8; 40];
    f.take(&mut head)?;
    let mut r = Reader { b: &head[..] };
    if r.take(4)? != MAGIC {
        return Err("not a checkpoint (magic)".into());
    }
    if r.u32()? != VERSION {
        return Err("another checkpoint version".into());
    }
    let written_ns = r.u64()? as i64;
    let seed = [r.u64()?, r.u64()?];
    let n = r.u64()?;
    const SEGMENT_BYTES: u64 = 4 + 8 * 4 + 4 + 4 + 8 * 2;
    let mut segs = vec![
        0u8;
        usize::try_from(n.saturating_mul(SEGMENT_BYTES).min(f.left))
            .map_err(|_| "size")?
    ];
    f.take(&mut segs)?;
    if segs.len() as u64 != n * SEGMENT_BYTES {
        return Err("count past the end".into());
    }
    let mut r = Reader { b: &segs[..] };
    let mut segments = Vec::with_capacity(n as usize);
    for _ in 0..n {
        segments.push(SegmentState {
            shard: r.u32()?,
            seq: r.u64()?,
            len: r.u64()?,
            ino: r.u64()?,
            mtime_ns: r.u64()? as i64,
            slot: r.u32()?,
            refs: r.u32()?,
            records: r.u64()?,
            bytes: r.u64()?,
        });
    }
    let mut word = [0u8; 8];
    f.take(&mut word)?;
    let n = u64::from_le_bytes(word);
    let mut tombs =
        vec![0u8; usize::try_from(n.saturating_mul(28).min(f.left)).map_err(|_| "size")?];
    f.take(&mut tombs)?;
    if tombs.len() as u64 != n * 28 {
        return Err("count past the end".into());
    }
    let tombstones = tombs
        .chunks_exact(28)
        .map(|c| {
            let k: [u8; 20] = c[..20].try_into().expect("20 bytes");
            (k, u64::from_le_bytes(c[20..].try_into().expect("8 bytes")))
        })
        .collect();
    Ok(Pending {
        head: Checkpoint {
            written_ns,
            seed,
            segments,
            tombstones,
            main: Vec::new(),
            req2: Vec::new(),
        },
        input: f,
    })
}

impl Pending {
    /// Read the tables straight into their vectors (the checkpoint's bytes are never held
    /// twice: a 10M-record store's tables are ~210 MB), `TABLE_READ_ENTRIES` at a time,
    /// each run CRC'd and handed to `check(table, entries)` while it is in cache (table:
    /// 0..INDEX_SHARDS main, then req2). The first error of `check` stops the read. Then
    /// the CRC is checked: only then is anything read trusted.
    pub fn read_tables(
        self,
        mut check: impl FnMut(usize, &[u64]) -> Result<(), &'static str>,
    ) -> Result<Checkpoint, String> {
        use std::io::Read;
        let Pending {
            mut head,
            input: mut f,
        } = self;
        let mut word = [0u8; 8];
        let mut tables = Vec::with_capacity(2 * INDEX_SHARDS);
        for i in 0..2 * INDEX_SHARDS {
            f.take(&mut word)?;
            let n = u64::from_le_bytes(word);
            if n.saturating_mul(8) > f.left {
                return Err("count past the end".into());
            }
            let mut t = vec![0u64; n as usize];
            for run in t.chunks_mut(TABLE_READ_ENTRIES) {
                f.take(u64s_as_bytes(run))?;
                if cfg!(target_endian = "big") {
                    for x in run.iter_mut() {
                        *x = u64::from_le(*x);
                    }
                }
                check(i, run)?;
            }
            tables.push(t);
        }
        if f.left != 0 {
            return Err("trailing bytes".into());
        }
        let mut stored = [0u8; 4];
        f.f.read_exact(&mut stored).map_err(|e| e.to_string())?;
        if f.crc.finalize() != u32::from_le_bytes(stored) {
            return Err("CRC mismatch".into());
        }
        head.req2 = tables.split_off(INDEX_SHARDS);
        head.main = tables;
        Ok(head)
    }
}

/// The bytes of `v`, to read a table straight into (the tables are most of the file).
fn u64s_as_bytes(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: any byte pattern is a valid u64, u8 has alignment 1, and the length is the
    // same memory; the borrow of `v` is held for the lifetime of the result.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The checkpoint file being read: bytes left before the CRC, and the CRC so far.
struct Input {
    f: std::io::BufReader<std::fs::File>,
    crc: crc32fast::Hasher,
    left: u64,
}

impl Input {
    fn take(&mut self, buf: &mut [u8]) -> Result<(), String> {
        use std::io::Read;
        if (buf.len() as u64) > self.left {
            return Err("truncated".into());
        }
        self.f.read_exact(buf).map_err(|e| e.to_string())?;
        self.crc.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }
}

/// Write `ckpt` durably: a temporary file, fsync'ed, renamed over the old one, the
/// directory fsync'ed. A crash at any point leaves the old checkpoint or the new one.
pub(crate) fn write(dir: &Path, ckpt: &CheckpointRef<'_>) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        ckpt.encode_to(&mut f)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            written_ns: 1_700_000_000_123_456_789,
            seed: [7, 9],
            segments: vec![SegmentState {
                shard: 1,
                seq: 42,
                len: 4096,
                ino: 77,
                mtime_ns: 1_700_000_000_000_000_001,
                slot: 3,
                refs: 10,
                records: 5,
                bytes: 1500,
            }],
            tombstones: vec![([4; 20], 1_700_000_000)],
            main: (0..INDEX_SHARDS as u64)
                .map(|i| vec![i, 0, i << 40])
                .collect(),
            req2: (0..INDEX_SHARDS as u64)
                .map(|i| vec![0; i as usize])
                .collect(),
        }
    }

    fn decode(dir: &Path, bytes: &[u8]) -> Result<Checkpoint, String> {
        let path = dir.join("c");
        std::fs::write(&path, bytes).unwrap();
        read_head(std::fs::File::open(&path).unwrap())?.read_tables(|_, _| Ok(()))
    }

    #[test]
    fn round_trips_and_refuses_any_damage() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample();
        let b = c.encode();
        assert_eq!(decode(dir.path(), &b).unwrap(), c);
        write(dir.path(), &c.borrowed()).unwrap();
        let read_back = read(dir.path())
            .unwrap()
            .read_tables(|_, _| Ok(()))
            .unwrap();
        assert_eq!(read_back, c);
        for i in (0..b.len()).step_by(7) {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(decode(dir.path(), &bad).is_err(), "flip at {i}");
        }
        for cut in [0, 3, 4, b.len() / 2, b.len() - 1] {
            assert!(decode(dir.path(), &b[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(decode(dir.path(), &longer).is_err());
    }
}
