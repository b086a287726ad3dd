//! Start-up recovery: scan every segment, re-verify every record, cut torn tails; or, with a
//! valid index checkpoint (`checkpoint`), only the segments and tails it does not vouch for
//! (`plan`).
//!
//! Segments are scanned in parallel (one thread per core, each taking whole segments from a
//! shared counter, so one huge segment does not hold up the rest), and merged into the index in
//! (shard, seq) order so "first wins" for duplicates is deterministic.
//!
//! Per segment, walking records from offset 0:
//! - valid header, payload hashes to the header's info-hashes, zero padding: keep it (a
//!   tombstone has no payload: its header CRC is all there is to check);
//! - valid header, payload fails: skip that one record (the header CRC vouches for its length);
//! - invalid header: probe every 8 bytes for the next valid header and resume there;
//! - whatever follows the last good record (a torn append: partial header, partial payload, a
//!   payload never written, garbage) is truncated away, so the next append starts clean; a
//!   read-only open (`Access::ReadOnly`) leaves it, since beside a running server it is
//!   usually an append in progress, and opens no file for writing.
//!
//! Bad stretches between good records are left on disk and counted again at every start,
//! until eviction (with a capacity set) deletes their segment.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::metainfo::verify_info;

use super::record::{Header, HeaderError, HEADER_BYTES, MAGIC, RECORD_ALIGN};
use super::segment::{parse_segment_file_name, Segment};
use super::{Access, StoreError};

pub(crate) struct ScannedSegment {
    pub segment: Arc<Segment>,
    /// (payload offset, header) of every verified record and tombstone, in file order.
    pub records: Vec<(usize, Header)>,
    /// End of the last good record: the file length after a read-write recovery.
    pub end: u64,
    /// Bytes at the start taken from the checkpoint, not scanned (0: scanned in full).
    pub trusted_below: u64,
    /// Bytes after the last good record: truncated by a read-write open, skipped by a
    /// read-only one.
    pub tail_bytes: u64,
    pub corrupt_records: usize,
    pub corrupt_bytes: u64,
}

/// Where to start scanning a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanFrom {
    /// Scan it all.
    Start,
    /// The first `n` bytes are vouched for by the checkpoint; scan what follows.
    After(u64),
    /// All `n` bytes (the whole file) are vouched for: open it, scan nothing.
    Trusted(u64),
}

pub(crate) type SegmentFile = (usize, u64, PathBuf);

/// How to open each segment file given the checkpoint (see the `checkpoint` module doc).
pub(crate) fn plan(
    files: Vec<SegmentFile>,
    ckpt: Option<&super::checkpoint::Checkpoint>,
) -> Vec<(SegmentFile, ScanFrom)> {
    use super::checkpoint::{file_identity, MTIME_MARGIN};
    let Some(ckpt) = ckpt else {
        return files.into_iter().map(|f| (f, ScanFrom::Start)).collect();
    };
    let known: std::collections::HashMap<(usize, u64), &super::checkpoint::SegmentState> = ckpt
        .segments
        .iter()
        .map(|s| ((s.shard as usize, s.seq), s))
        .collect();
    let recent_after = ckpt.written_ns - MTIME_MARGIN.as_nanos() as i64;
    files
        .into_iter()
        .map(|f| {
            let from = match (known.get(&(f.0, f.1)), std::fs::metadata(&f.2)) {
                (Some(ck), Ok(meta)) => {
                    let (ino, mtime_ns, len) = file_identity(&meta);
                    if ino != ck.ino || ck.mtime_ns >= recent_after || len < ck.len {
                        ScanFrom::Start
                    } else if len == ck.len && mtime_ns == ck.mtime_ns {
                        ScanFrom::Trusted(len)
                    } else if len > ck.len {
                        ScanFrom::After(ck.len)
                    } else {
                        ScanFrom::Start // same length, written since: rewritten in place
                    }
                }
                _ => ScanFrom::Start,
            };
            (f, from)
        })
        .collect()
}

/// The segment files in `dir`, sorted by (shard, seq).
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(usize, u64, PathBuf)>, StoreError> {
    let io_err = |source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_file_name) {
            Some((shard, seq)) => found.push((shard, seq, entry.path())),
            None => tracing::warn!(file = %entry.path().display(), "not a segment file; ignored"),
        }
    }
    found.sort();
    Ok(found)
}

/// Open and scan the planned segments on up to `threads` threads. `reserved` is the mapping
/// size for segments that may still grow.
pub(crate) fn scan_all(
    files: &[(SegmentFile, ScanFrom)],
    reserved: usize,
    threads: usize,
    access: Access,
    track_refs: bool,
) -> Result<Vec<ScannedSegment>, StoreError> {
    let threads = threads.clamp(1, files.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<ScannedSegment, StoreError>)>> =
        Mutex::new(Vec::with_capacity(files.len()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(((shard, seq, path), from)) = files.get(i) else {
                    break;
                };
                let scanned = scan_file(
                    path.clone(),
                    *shard,
                    *seq,
                    *from,
                    reserved,
                    access,
                    track_refs,
                );
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i, scanned));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results
        .into_iter()
        .filter_map(|(_, r)| match r {
            // Read-only beside a server whose eviction deleted the segment after we listed
            // the directory: its records are gone (or copied into a newer segment) anyway.
            Err(StoreError::Io { source, path })
                if access == Access::ReadOnly && source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::info!(file = %path.display(), "segment deleted while scanning; skipped");
                None
            }
            r => Some(r),
        })
        .collect()
}

fn scan_file(
    path: PathBuf,
    shard: usize,
    seq: u64,
    from: ScanFrom,
    reserved: usize,
    access: Access,
    track_refs: bool,
) -> Result<ScannedSegment, StoreError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let (segment, file_len) = Segment::open(path.clone(), shard, seq, reserved, access, track_refs)
        .map_err(io_err(&path))?;
    let start = match from {
        ScanFrom::Start => 0,
        ScanFrom::After(n) => n,
        // Trusted: the length was checked when planning; if the file changed since, scan
        // what is past the vouched-for length like appends.
        ScanFrom::Trusted(n) => n,
    }
    .min(file_len);
    if start > 0 {
        segment.set_unverified_below(start as usize);
    }
    if start < file_len {
        segment.advise_sequential_read(file_len as usize);
    }
    let mut scanned = scan_segment(Arc::new(segment), file_len, start as usize)?;
    if start < file_len {
        scanned.segment.advise_random_access();
    }
    if scanned.tail_bytes > 0 {
        let seg = &scanned.segment;
        match access {
            Access::ReadWrite => {
                tracing::warn!(
                    file = %path.display(),
                    offset = scanned.end,
                    bytes_dropped = scanned.tail_bytes,
                    "torn or unverifiable tail truncated"
                );
                seg.set_len(scanned.end).map_err(io_err(&path))?;
                seg.sync_data().map_err(io_err(&path))?;
            }
            Access::ReadOnly => tracing::info!(
                file = %path.display(),
                offset = scanned.end,
                bytes_skipped = scanned.tail_bytes,
                "partial or unverifiable tail skipped (read-only; maybe an append in progress)"
            ),
        }
    }
    scanned.records.shrink_to_fit();
    Ok(scanned)
}

/// Walk one segment of `file_len` bytes. Does not modify the file: a read-write caller
/// truncates to `end` when `tail_bytes > 0`.
pub(crate) fn scan_segment(
    segment: Arc<Segment>,
    file_len: u64,
    start: usize,
) -> Result<ScannedSegment, StoreError> {
    let len = usize::try_from(file_len).expect("segment length was mapped, so it fits");
    assert!(len <= segment.reserved_bytes() && start <= len);
    let mut records = Vec::new();
    let (mut pos, mut good_end) = (start, start);
    let (mut corrupt_records, mut corrupt_bytes) = (0usize, 0u64);
    // Bad records since the last good one: corrupt if a good one follows, torn tail otherwise.
    let (mut pending_records, mut pending_bytes) = (0usize, 0u64);
    while len - pos >= HEADER_BYTES {
        match Header::decode(segment.bytes(pos, HEADER_BYTES)) {
            Ok(header) => {
                let end = pos + header.record_bytes();
                if end > len {
                    break; // payload cut short: a torn append
                }
                let payload_at = pos + HEADER_BYTES;
                let info_len = header.info_len as usize;
                let payload = segment.bytes(payload_at, info_len);
                let padding = segment.bytes(payload_at + info_len, end - payload_at - info_len);
                let payload_ok = header.is_tombstone() || verify_info(payload, &header.hashes());
                if padding.iter().all(|&b| b == 0) && payload_ok {
                    records.push((payload_at, header));
                    corrupt_records += pending_records;
                    corrupt_bytes += pending_bytes;
                    (pending_records, pending_bytes) = (0, 0);
                    good_end = end;
                } else {
                    tracing::warn!(
                        file = %segment.path().display(),
                        offset = pos,
                        "record payload does not match its info-hash; skipped"
                    );
                    pending_records += 1;
                    pending_bytes += (end - pos) as u64;
                }
                pos = end;
            }
            Err(HeaderError::Version(v)) => {
                return Err(StoreError::UnsupportedFormat {
                    path: segment.path().to_path_buf(),
                    offset: pos as u64,
                    version: v,
                });
            }
            Err(_) => match find_next_header(&segment, pos + RECORD_ALIGN, len) {
                Some(next) => {
                    tracing::warn!(
                        file = %segment.path().display(),
                        offset = pos,
                        bytes_skipped = next - pos,
                        "damaged record header; resynchronised at the next valid header"
                    );
                    pending_records += 1;
                    pending_bytes += (next - pos) as u64;
                    pos = next;
                }
                None => break,
            },
        }
    }
    Ok(ScannedSegment {
        segment,
        records,
        end: good_end as u64,
        trusted_below: start as u64,
        tail_bytes: (len - good_end) as u64,
        corrupt_records,
        corrupt_bytes,
    })
}

/// First offset >= `from` (8-aligned) holding a valid header, if any.
pub(crate) fn find_next_header(segment: &Segment, from: usize, len: usize) -> Option<usize> {
    debug_assert_eq!(from % RECORD_ALIGN, 0);
    let mut p = from;
    while len.saturating_sub(p) >= HEADER_BYTES {
        let bytes = segment.bytes(p, HEADER_BYTES);
        if bytes[..4] == MAGIC && Header::decode(bytes).is_ok() {
            return Some(p);
        }
        p += RECORD_ALIGN;
    }
    None
}
