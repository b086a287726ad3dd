//! Zero-copy replies: one vectored write per batch of pipelined requests.
//!
//! A batch is a list of parts in wire order. Small bytes we encode (handshake, extension
//! handshake, the 4-byte length + bencoded header of each ut_metadata data message,
//! rejects, keep-alives) go into one per-connection `head` buffer; the 16 KiB metadata
//! blocks are never copied: their iovecs point straight into the store's read-only mmap.
//! The batch holds a `RecordRef`, which keeps the segment mapping alive until the kernel
//! has taken the bytes.

use std::cell::RefCell;
use std::ops::Range;

use monoio::buf::IoVecBuf;

use crate::limits;
use crate::store::RecordRef;

/// Parts a batch makes room for at its first (see `OutBatch::reserve_parts`).
const PARTS_INITIAL: usize = 16;

enum Part {
    /// A range of `head`.
    Head(Range<usize>),
    /// A range of the record's info dict, in the mmap.
    Payload(Range<usize>),
}

/// The buffers of dropped batches, kept for the next `OutBatch::new` on this thread. A uTP
/// reply's batch is handed to its connection whole and dropped when acked, so each reply
/// took a fresh batch: about a dozen allocations as its vectors grew, per reply.
struct Spare {
    head: Vec<u8>,
    parts: Vec<Part>,
    iov: Vec<libc::iovec>,
    iov_starts: Vec<usize>,
    runs: Vec<libc::iovec>,
}

/// Spare batches kept per thread: more than the replies a core's uTP connections get
/// acked between two of its new replies in a burst.
const SPARE_BATCHES_MAX: usize = 64;

/// A dropped batch whose buffers hold more than this goes back to the allocator (a rare
/// huge reply must not pin its memory in the spares).
const SPARE_BATCH_BYTES_MAX: usize = 64 * 1024;

thread_local! {
    static SPARES: RefCell<Vec<Spare>> = const { RefCell::new(Vec::new()) };
}

/// Reused across batches of one connection, so steady-state serving allocates nothing.
pub struct OutBatch {
    head: Vec<u8>,
    /// Start of the `head` bytes not yet covered by a `Part::Head`.
    head_mark: usize,
    parts: Vec<Part>,
    iov: Vec<libc::iovec>,
    /// Byte offset of each sealed iovec in the batch (same index as `iov`), so a
    /// datagram transport finds the run that holds a byte offset (`contiguous_at`)
    /// without walking the list per packet.
    iov_starts: Vec<usize>,
    /// The sealed iovecs as they were at `seal` (`consume` moves `iov`'s cursor and
    /// bases; `contiguous_at` must not see that).
    runs: Vec<libc::iovec>,
    /// The run `contiguous_at` found last: a datagram transport asks for offsets in
    /// order, so the answer is nearly always this run or the next (no binary search per
    /// packet; it was ~2 % of a uTP fetch's server CPU).
    run_hint: std::cell::Cell<usize>,
    /// Bytes in the sealed batch.
    sealed_len: usize,
    /// iovecs before this index have been written (see `consume`).
    iov_sent: usize,
    record: Option<RecordRef>,
    blocks: usize,
    payload_bytes: usize,
}

impl Default for OutBatch {
    fn default() -> Self {
        OutBatch::new()
    }
}

impl OutBatch {
    pub fn new() -> OutBatch {
        let spare = SPARES
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Spare {
                head: Vec::with_capacity(512),
                parts: Vec::new(),
                iov: Vec::new(),
                iov_starts: Vec::new(),
                runs: Vec::new(),
            });
        OutBatch {
            head: spare.head,
            head_mark: 0,
            parts: spare.parts,
            iov: spare.iov,
            iov_starts: spare.iov_starts,
            runs: spare.runs,
            run_hint: std::cell::Cell::new(0),
            sealed_len: 0,
            iov_sent: 0,
            record: None,
            blocks: 0,
            payload_bytes: 0,
        }
    }

    /// The buffer for small encoded messages; whatever is appended is sent in order with
    /// the payloads pushed around it.
    pub fn head(&mut self) -> &mut Vec<u8> {
        self.unseal();
        &mut self.head
    }

    /// A batch written to after `seal` is unsealed: its runs may point into a `head` that
    /// is about to move, so `contiguous_at` sees nothing until the next `seal`.
    fn unseal(&mut self) {
        if !self.runs.is_empty() {
            self.runs.clear();
            self.iov_starts.clear();
            self.sealed_len = 0;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.head.len() == self.head_mark && self.parts.is_empty()
    }

    /// Data blocks in this batch.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    fn close_head(&mut self) {
        if self.head.len() > self.head_mark {
            self.reserve_parts();
            self.parts.push(Part::Head(self.head_mark..self.head.len()));
            self.head_mark = self.head.len();
        }
    }

    /// Queue `record.info()[range]` to follow the head bytes written so far. No byte of
    /// the payload is touched here.
    pub fn push_payload(&mut self, record: &RecordRef, range: Range<usize>) {
        debug_assert!(range.end <= record.info().len());
        self.unseal();
        self.close_head();
        match &self.record {
            Some(r) => debug_assert!(std::ptr::eq(r.info().as_ptr(), record.info().as_ptr())),
            None => self.record = Some(record.clone()),
        }
        self.blocks += 1;
        self.payload_bytes += range.len();
        self.reserve_parts();
        self.parts.push(Part::Payload(range));
    }

    /// A typical answer's parts at once (a fetch's opening answer is ~12: handshakes and
    /// a header + block per piece): growing 4 → 8 → 16 was two reallocations per list
    /// per batch, and a uTP session makes a fresh batch per write.
    fn reserve_parts(&mut self) {
        if self.parts.capacity() == 0 {
            self.parts.reserve(PARTS_INITIAL);
        }
    }

    /// Builds the iovec array; after this the batch is handed to the kernel as is.
    pub fn seal(&mut self) {
        self.close_head();
        self.iov.clear();
        self.iov_starts.clear();
        self.iov_sent = 0;
        self.sealed_len = 0;
        self.run_hint.set(0);
        self.iov.reserve(self.parts.len());
        self.iov_starts.reserve(self.parts.len());
        for part in &self.parts {
            let bytes = part_bytes(&self.head, self.record.as_ref(), part);
            if bytes.is_empty() {
                // An empty iovec would make two parts start at one offset.
                continue;
            }
            self.iov_starts.push(self.sealed_len);
            self.sealed_len += bytes.len();
            self.iov.push(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            });
        }
        self.runs.clear();
        self.runs.extend_from_slice(&self.iov);
        assert!(
            self.iov.len() <= limits::IOVECS_PER_WRITE_MAX,
            "batch exceeds IOV_MAX"
        );
    }

    /// Bytes in the batch as sealed (what `len` was right after `seal`).
    pub fn sealed_len(&self) -> usize {
        self.sealed_len
    }

    /// The longest run of the sealed batch that is contiguous in memory and starts at byte
    /// `offset`: the rest of the part (head bytes or mmap block) holding that byte; empty
    /// at or past the end. A datagram transport points packets into it without copying.
    /// Independent of `consume`, which only moves the writev cursor.
    pub fn contiguous_at(&self, offset: usize) -> &[u8] {
        if offset >= self.sealed_len {
            return &[];
        }
        let starts = &self.iov_starts;
        let holds = |i: usize| {
            i < starts.len() && starts[i] <= offset && starts.get(i + 1).is_none_or(|&e| offset < e)
        };
        let hint = self.run_hint.get();
        let i = if holds(hint) {
            hint
        } else if holds(hint + 1) {
            hint + 1
        } else {
            // The last run starting at or before `offset`; run 0 starts at 0 <= offset.
            starts.partition_point(|&start| start <= offset) - 1
        };
        self.run_hint.set(i);
        let run = &self.runs[i];
        // SAFETY: `runs` are the iovecs `seal` made from `head` and the record's mmap,
        // both owned by the batch and unchanged since (`head` needs `&mut self`, and a
        // sealed batch is only read); the offset is inside run `i`.
        let bytes = unsafe { std::slice::from_raw_parts(run.iov_base as *const u8, run.iov_len) };
        &bytes[offset - starts[i]..]
    }

    /// Bytes of the sealed batch not written yet.
    pub fn len(&self) -> usize {
        self.iov[self.iov_sent..].iter().map(|v| v.iov_len).sum()
    }

    /// True once every sealed byte has been written.
    pub fn is_sent(&self) -> bool {
        self.iov_sent == self.iov.len()
    }

    /// Marks `n` more bytes as written after a short writev: whole iovecs are skipped and
    /// a partly written one is advanced in place. (monoio 0.2.4's own
    /// `write_vectored_all` computes the advanced pointer but never stores it, so a short
    /// write would resend bytes and then panic; we keep our own loop.)
    pub fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let v = &mut self.iov[self.iov_sent];
            if n < v.iov_len {
                // SAFETY: n < iov_len, so the new base stays inside the same buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                return;
            }
            n -= v.iov_len;
            self.iov_sent += 1;
        }
    }

    /// The iovecs not written yet (after `consume`), as the kernel should see them next.
    pub fn unsent_iovecs(&self) -> &[libc::iovec] {
        &self.iov[self.iov_sent..]
    }

    /// The sealed iovecs (tests check where they point).
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.head.clear();
        self.head_mark = 0;
        self.parts.clear();
        self.iov.clear();
        self.iov_starts.clear();
        self.runs.clear();
        self.sealed_len = 0;
        self.iov_sent = 0;
        self.record = None;
        self.blocks = 0;
        self.payload_bytes = 0;
    }
}

impl Drop for OutBatch {
    /// Keeps the buffers for the next batch on this thread (`SPARES`).
    fn drop(&mut self) {
        let bytes = self.head.capacity()
            + self.parts.capacity() * std::mem::size_of::<Part>()
            + (self.iov.capacity() + self.runs.capacity()) * std::mem::size_of::<libc::iovec>()
            + self.iov_starts.capacity() * std::mem::size_of::<usize>();
        if bytes > SPARE_BATCH_BYTES_MAX {
            return;
        }
        self.clear();
        let spare = Spare {
            head: std::mem::take(&mut self.head),
            parts: std::mem::take(&mut self.parts),
            iov: std::mem::take(&mut self.iov),
            iov_starts: std::mem::take(&mut self.iov_starts),
            runs: std::mem::take(&mut self.runs),
        };
        // After the thread's spares are gone (thread exit), the buffers are just freed.
        let _ = SPARES.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_BATCHES_MAX {
                s.push(spare);
            }
        });
    }
}

fn part_bytes<'a>(head: &'a [u8], record: Option<&'a RecordRef>, part: &Part) -> &'a [u8] {
    match part {
        Part::Head(r) => &head[r.clone()],
        Part::Payload(r) => &record.expect("payload part implies a record").info()[r.clone()],
    }
}

// SAFETY: `seal` builds `iov` from `head` (a Vec we do not touch while the runtime owns
// the batch) and from the record's mmap (kept mapped by the `RecordRef` we hold). Neither
// moves while the batch is owned by the write operation.
unsafe impl IoVecBuf for OutBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.iov_sent..].as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.iov_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppendOptions, Store, StoreOptions, SyncPolicy};
    use crate::wire::{encode_metadata_data_header, metadata_piece_count, metadata_piece_range};

    /// The zero-copy claim, checked on the iovecs handed to writev: every payload iovec
    /// points into the segment's mapping at the record's own bytes (so the kernel reads
    /// the block from the mmap), and the only user-space bytes are the small headers.
    #[test]
    fn block_payloads_are_iovecs_into_the_mmap() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            sync: SyncPolicy::Batch,
            ..StoreOptions::default()
        };
        let (store, _) = Store::open(dir.path(), opts).unwrap();
        let info = crate::metainfo::synthetic_v1_info(4000); // 80 KB: 5 metadata pieces
        let record = store
            .append(&info, AppendOptions::default())
            .unwrap()
            .record()
            .clone();
        let pieces = metadata_piece_count(record.len());
        assert_eq!(pieces, 5);

        let mut batch = OutBatch::new();
        for piece in 0..pieces as u32 {
            let range = metadata_piece_range(record.len(), piece).unwrap();
            encode_metadata_data_header(batch.head(), 3, piece, record.len() as u64, range.len());
            batch.push_payload(&record, range);
        }
        batch.seal();
        let iov = batch.iovecs();
        assert_eq!(iov.len(), 2 * pieces, "header, block, header, block, ...");

        let mapping = record.segment().mapping_range();
        let info_start = record.info().as_ptr() as usize;
        let mut payload_bytes = 0;
        for (i, v) in iov.iter().enumerate() {
            let base = v.iov_base as usize;
            if i % 2 == 1 {
                let piece = i / 2;
                assert!(mapping.contains(&base) && base + v.iov_len <= mapping.end);
                assert_eq!(base, info_start + piece * limits::METADATA_PIECE_BYTES);
                payload_bytes += v.iov_len;
            } else {
                // Headers live in the batch's own small buffer, outside the mapping.
                assert!(!mapping.contains(&base));
                assert!(v.iov_len < 64, "a data header is ~50 bytes");
            }
        }
        assert_eq!(payload_bytes, info.len());
        assert_eq!(batch.payload_bytes(), info.len());
        assert_eq!(batch.blocks(), pieces);

        // What the kernel would send is exactly the protocol bytes: reassemble and compare.
        let mut wire = Vec::new();
        for v in iov {
            // SAFETY: the iovecs point at live memory owned by `batch` and `record`.
            wire.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        assert_eq!(wire.len(), batch.len());
        let mut rebuilt = Vec::new();
        let mut pos = 0;
        while pos < wire.len() {
            match crate::wire::decode_frame(&wire[pos..]).unwrap() {
                crate::wire::Decoded::Done(crate::wire::Frame::Extended { id: 3, payload }, n) => {
                    let (_, data) = crate::wire::decode_metadata(payload).unwrap();
                    rebuilt.extend_from_slice(data);
                    pos += n;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rebuilt, info);

        // A short write resumes at the right byte, across and inside iovecs.
        let total = batch.len();
        let mut resumed = Vec::new();
        let mut step = 1;
        while !batch.is_sent() {
            let v = batch.iovecs()[batch.iov_sent];
            let n = step.min(v.iov_len);
            // SAFETY: as above.
            resumed.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, n)
            });
            batch.consume(n);
            step = step * 3 % 20_011 + 1;
        }
        assert_eq!(resumed.len(), total);
        assert_eq!(resumed, wire);

        batch.clear();
        assert!(batch.is_empty());
    }

    /// A dropped batch's buffers serve the next `OutBatch::new` on the thread, which starts
    /// as empty as a fresh batch: no head bytes, parts, iovecs, record or sealed view of
    /// the last reply (a stale one would send the last torrent's bytes to the next peer). A
    /// batch past `SPARE_BATCH_BYTES_MAX` is freed, and at most `SPARE_BATCHES_MAX` wait.
    #[test]
    fn a_dropped_batch_is_reused_empty_and_the_spares_are_bounded() {
        let spares = || SPARES.with(|s| s.borrow().len());
        SPARES.with(|s| s.borrow_mut().clear());
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let info = crate::metainfo::synthetic_v1_info(2000);
        let record = store
            .append(&info, AppendOptions::default())
            .unwrap()
            .record()
            .clone();
        let mut batch = OutBatch::new();
        batch.head().extend_from_slice(b"the last reply");
        let range = metadata_piece_range(record.len(), 0).unwrap();
        encode_metadata_data_header(batch.head(), 7, 0, record.len() as u64, range.len());
        batch.push_payload(&record, range);
        batch.seal();
        let head = batch.head().as_ptr();
        drop(batch);
        assert_eq!(spares(), 1);

        let mut reused = OutBatch::new();
        assert_eq!(spares(), 0);
        assert_eq!(reused.head().as_ptr(), head, "the dropped batch's buffer");
        assert!(reused.is_empty() && reused.head().is_empty());
        assert!(reused.record.is_none(), "no record kept alive");
        assert_eq!((reused.len(), reused.sealed_len()), (0, 0));
        reused.seal();
        assert_eq!(reused.iovecs().len(), 0);
        assert!(reused.contiguous_at(0).is_empty());

        reused
            .head()
            .extend(std::iter::repeat_n(0u8, SPARE_BATCH_BYTES_MAX + 1));
        drop(reused);
        assert_eq!(spares(), 0, "a huge batch goes back to the allocator");

        let many: Vec<OutBatch> = (0..SPARE_BATCHES_MAX + 10)
            .map(|_| OutBatch::new())
            .collect();
        drop(many);
        assert_eq!(spares(), SPARE_BATCHES_MAX);
    }

    /// `contiguous_at` walks the sealed batch like a datagram transport would: from any
    /// offset, runs that end where a part ends, that together are the flattened bytes, and
    /// that point into the mmap for blocks (no copy).
    #[test]
    fn contiguous_at_yields_the_flattened_bytes_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let info = crate::metainfo::synthetic_v1_info(2000); // 40 KB: 3 pieces, the last one short
        let record = store
            .append(&info, AppendOptions::default())
            .unwrap()
            .record()
            .clone();
        let mut batch = OutBatch::new();
        batch.head().extend_from_slice(b"handshake and friends");
        for piece in [0u32, 2, 1] {
            let range = metadata_piece_range(record.len(), piece).unwrap();
            encode_metadata_data_header(batch.head(), 7, piece, record.len() as u64, range.len());
            batch.push_payload(&record, range);
        }
        batch.head().extend_from_slice(b"trailing reject");
        batch.seal();

        let mut flat = Vec::new();
        for v in batch.iovecs() {
            // SAFETY: the iovecs point at live memory owned by `batch` and `record`.
            flat.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        assert_eq!(batch.sealed_len(), flat.len());
        assert_eq!(batch.sealed_len(), batch.len());

        // Every offset: the run is a prefix of the rest, and ends at a part boundary.
        let ends: Vec<usize> = batch
            .iovecs()
            .iter()
            .scan(0, |end, v| {
                *end += v.iov_len;
                Some(*end)
            })
            .collect();
        for offset in 0..flat.len() {
            let run = batch.contiguous_at(offset);
            assert!(!run.is_empty(), "offset {offset}");
            assert_eq!(run, &flat[offset..offset + run.len()], "offset {offset}");
            assert!(ends.contains(&(offset + run.len())), "offset {offset}");
        }
        assert!(batch.contiguous_at(flat.len()).is_empty());
        assert!(batch.contiguous_at(flat.len() + 100).is_empty());

        // Walking run by run rebuilds the batch; blocks come straight from the mmap.
        let mapping = record.segment().mapping_range();
        let (mut offset, mut walked, mut from_mmap) = (0, Vec::new(), 0);
        while offset < batch.sealed_len() {
            let run = batch.contiguous_at(offset);
            if mapping.contains(&(run.as_ptr() as usize)) {
                from_mmap += run.len();
            }
            walked.extend_from_slice(run);
            offset += run.len();
        }
        assert_eq!(walked, flat);
        assert_eq!(from_mmap, info.len());

        // Offsets out of order (a retransmission goes back; the lookup hint must not
        // answer for the wrong run): every answer is still the rest of its part.
        for offset in (0..flat.len())
            .rev()
            .step_by(7)
            .chain((0..flat.len()).step_by(13))
        {
            let run = batch.contiguous_at(offset);
            let end = *ends.iter().find(|&&e| e > offset).unwrap();
            assert_eq!(run, &flat[offset..end], "offset {offset}");
        }

        // A short writev moves the write cursor, not the sealed view.
        batch.consume(5);
        assert_eq!(batch.contiguous_at(0), &flat[..ends[0]]);
        assert_eq!(batch.sealed_len(), flat.len());
        assert_eq!(batch.len(), flat.len() - 5);

        // Written to after seal: unsealed until the next seal (its runs may point into a
        // head that moves), never a stale view.
        batch.head().extend_from_slice(&[b'x'; 4096]);
        assert_eq!(batch.sealed_len(), 0);
        assert!(batch.contiguous_at(0).is_empty());
        batch.seal();
        assert_eq!(batch.sealed_len(), flat.len() + 4096);
        let (mut offset, mut walked) = (0, Vec::new());
        while offset < batch.sealed_len() {
            let run = batch.contiguous_at(offset);
            walked.extend_from_slice(run);
            offset += run.len();
        }
        assert_eq!(&walked[..flat.len()], &flat[..]);
        assert!(walked[flat.len()..].iter().all(|&b| b == b'x'));

        batch.clear();
        assert_eq!(batch.sealed_len(), 0);
        assert!(batch.contiguous_at(0).is_empty());
    }
}
