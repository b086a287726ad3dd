//! The on-disk record: a fixed 80-byte header, the raw info dict, zero padding to 8 bytes; and
//! `RecordRef`, a verified record as the rest of magnetar sees it (a slice of a segment mapping).
//!
//! Header layout (little-endian):
//!
//! | offset | bytes | field                                                  |
//! |--------|-------|--------------------------------------------------------|
//! | 0      | 4     | magic `MGR1`                                           |
//! | 4      | 1     | format version (1)                                     |
//! | 5      | 1     | kind: 1 info dict, 2 tombstone (see below); others reserved |
//! | 6      | 1     | flags: bit0 v1 present, bit1 v2 present, bit2 private  |
//! | 7      | 1     | reserved, 0                                            |
//! | 8      | 4     | info_len                                               |
//! | 12     | 20    | v1 SHA-1 (zero if absent)                              |
//! | 32     | 32    | v2 SHA-256 (zero if absent)                            |
//! | 64     | 8     | stored_at, unix seconds                                |
//! | 72     | 4     | header_crc: CRC-32 of these 80 bytes with this field 0 |
//! | 76     | 4     | reserved, 0                                            |
//!
//! A tombstone (kind 2) is a header alone (`info_len` 0, no payload): the hashes of a deleted
//! record, and in `stored_at` when it was deleted. Recovery drops every info record under
//! one of those hashes whose `stored_at` is not later than the tombstone's, wherever it lies
//! (segments are not in time order across shards, and the shard count may change between
//! runs); `Store::append` stamps a record stored again after a delete later than the
//! tombstone, so it survives.
//!
//! The header CRC only tells "this is a header we wrote" (so recovery can find record
//! boundaries and resynchronise after damage); the payload is checked by re-hashing it against
//! the header's info-hashes, which is a stronger check than any CRC.

use std::fmt;
use std::sync::Arc;

use crate::limits::METADATA_BYTES_MAX;
use crate::metainfo::InfoHashes;

use super::segment::Segment;

pub(crate) const HEADER_BYTES: usize = 80;
pub(crate) const MAGIC: [u8; 4] = *b"MGR1";
pub(crate) const FORMAT_VERSION: u8 = 1;
pub(crate) const KIND_INFO: u8 = 1;
pub(crate) const KIND_TOMBSTONE: u8 = 2;
/// Records start on 8-byte boundaries, so recovery can resynchronise by probing every 8 bytes.
pub(crate) const RECORD_ALIGN: usize = 8;

pub(crate) const FLAG_V1: u8 = 1;
pub(crate) const FLAG_V2: u8 = 2;
pub(crate) const FLAG_PRIVATE: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_V1 | FLAG_V2 | FLAG_PRIVATE;

const CRC_AT: usize = 72;

/// Bytes a record with an `info_len`-byte payload takes in a segment.
pub(crate) fn record_bytes(info_len: usize) -> usize {
    HEADER_BYTES + info_len.next_multiple_of(RECORD_ALIGN)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u8,
    pub flags: u8,
    pub info_len: u32,
    pub v1: [u8; 20],
    pub v2: [u8; 32],
    pub stored_at: u64,
}

/// Why bytes are not a record header. Recovery only needs "no", the reason goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    Short,
    Magic,
    Version(u8),
    Crc,
    Fields,
}

impl Header {
    pub fn for_info(hashes: &InfoHashes, private: bool, info_len: usize, stored_at: u64) -> Self {
        assert!(info_len <= METADATA_BYTES_MAX, "caller checks the size");
        let mut flags = 0;
        if hashes.v1.is_some() {
            flags |= FLAG_V1;
        }
        if hashes.v2.is_some() {
            flags |= FLAG_V2;
        }
        if private {
            flags |= FLAG_PRIVATE;
        }
        Header {
            kind: KIND_INFO,
            flags,
            info_len: info_len as u32,
            v1: hashes.v1.unwrap_or_default(),
            v2: hashes.v2.unwrap_or_default(),
            stored_at,
        }
    }

    /// A tombstone for the record under `hashes`, deleted at `deleted_at`.
    pub fn tombstone(hashes: &InfoHashes, deleted_at: u64) -> Self {
        let mut h = Header::for_info(hashes, false, 0, deleted_at);
        h.kind = KIND_TOMBSTONE;
        h
    }

    pub fn is_tombstone(&self) -> bool {
        self.kind == KIND_TOMBSTONE
    }

    pub fn hashes(&self) -> InfoHashes {
        InfoHashes {
            v1: (self.flags & FLAG_V1 != 0).then_some(self.v1),
            v2: (self.flags & FLAG_V2 != 0).then_some(self.v2),
        }
    }

    pub fn record_bytes(&self) -> usize {
        record_bytes(self.info_len as usize)
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = FORMAT_VERSION;
        b[5] = self.kind;
        b[6] = self.flags;
        b[8..12].copy_from_slice(&self.info_len.to_le_bytes());
        b[12..32].copy_from_slice(&self.v1);
        b[32..64].copy_from_slice(&self.v2);
        b[64..72].copy_from_slice(&self.stored_at.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check everything a header alone can prove: magic, version, CRC, known kind
    /// and flags, absent hashes zeroed, size within the limit.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let b: &[u8; HEADER_BYTES] = bytes
            .get(..HEADER_BYTES)
            .and_then(|b| b.try_into().ok())
            .ok_or(HeaderError::Short)?;
        if b[0..4] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let stored_crc = u32::from_le_bytes(b[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        let mut zeroed = *b;
        zeroed[CRC_AT..CRC_AT + 4].fill(0);
        if crc32fast::hash(&zeroed) != stored_crc {
            return Err(HeaderError::Crc);
        }
        // Checked after the CRC: a `Version` error means an intact header from another format
        // version (a newer magnetar), not damage; recovery refuses to truncate such data.
        if b[4] != FORMAT_VERSION {
            return Err(HeaderError::Version(b[4]));
        }
        let h = Header {
            kind: b[5],
            flags: b[6],
            info_len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            v1: b[12..32].try_into().expect("20 bytes"),
            v2: b[32..64].try_into().expect("32 bytes"),
            stored_at: u64::from_le_bytes(b[64..72].try_into().expect("8 bytes")),
        };
        let kind_ok = h.kind == KIND_INFO || (h.kind == KIND_TOMBSTONE && h.info_len == 0);
        let fields_ok = kind_ok
            && h.flags & !FLAGS_KNOWN == 0
            && h.flags & (FLAG_V1 | FLAG_V2) != 0
            && (h.flags & FLAG_V1 != 0 || h.v1 == [0; 20])
            && (h.flags & FLAG_V2 != 0 || h.v2 == [0; 32])
            && b[7] == 0
            && b[76..80] == [0; 4]
            && (h.info_len as usize) <= METADATA_BYTES_MAX;
        if !fields_ok {
            return Err(HeaderError::Fields);
        }
        Ok(h)
    }
}

/// A verified, published record: the info dict bytes live in a segment's shared mapping, which
/// stays mapped while any `RecordRef` holds the segment. Cloning is one atomic increment.
#[derive(Clone)]
pub struct RecordRef {
    segment: Arc<Segment>,
    /// Offset of the payload (not the header) in the segment.
    offset: usize,
    len: u32,
    flags: u8,
}

impl RecordRef {
    /// Only for records whose header at `offset - HEADER_BYTES` has been decoded and whose
    /// payload has been verified and made durable per the sync policy.
    pub(crate) fn new(segment: Arc<Segment>, offset: usize, header: &Header) -> Self {
        debug_assert!(offset >= HEADER_BYTES);
        debug_assert!(offset + header.info_len as usize <= segment.reserved_bytes());
        RecordRef {
            segment,
            offset,
            len: header.info_len,
            flags: header.flags,
        }
    }

    /// The record whose header is at `header_at`, from the raw header: for the index, whose
    /// entries name only records that were decoded and verified when filed (and published
    /// bytes never change), so the CRC is not checked again on every lookup.
    pub(crate) fn from_header_at(segment: Arc<Segment>, header_at: usize) -> Self {
        let b = segment.bytes(header_at, HEADER_BYTES);
        let (len, flags) = (
            u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            b[6],
        );
        RecordRef {
            segment,
            offset: header_at + HEADER_BYTES,
            len,
            flags,
        }
    }

    /// `from_header_at` with the header bytes already in hand (`b`: the 80 bytes at
    /// `header_at` of `segment`).
    #[inline]
    pub(crate) fn from_header(segment: Arc<Segment>, header_at: usize, b: &[u8]) -> Self {
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let flags = b[6];
        RecordRef {
            segment,
            offset: header_at + HEADER_BYTES,
            len,
            flags,
        }
    }

    /// The raw info dict, straight from the segment mapping: the zero-copy source for serving.
    pub fn info(&self) -> &[u8] {
        self.segment.bytes(self.offset, self.len as usize)
    }

    /// Where the info dict lies in its segment file: the file and the dict's byte offset.
    /// For `sendfile(2)`: the kernel sends the page-cache pages that `info` maps, without
    /// copying them into socket buffers (a writev from the mapping copies). Published bytes
    /// never change, so the file range holds exactly `info()`.
    pub fn info_in_file(&self) -> (std::os::fd::BorrowedFd<'_>, u64) {
        use std::os::fd::AsFd;
        (self.segment.file().as_fd(), self.offset as u64)
    }

    /// Length of the info dict in bytes (BEP 9 `metadata_size`).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn header(&self) -> Header {
        let bytes = self.segment.bytes(self.offset - HEADER_BYTES, HEADER_BYTES);
        // The header was decoded before this RecordRef existed and the mapping is immutable
        // below the published end, so this cannot fail short of memory corruption.
        Header::decode(bytes).expect("published record header is valid")
    }

    pub fn hashes(&self) -> InfoHashes {
        self.header().hashes()
    }

    pub fn has_v1(&self) -> bool {
        self.flags & FLAG_V1 != 0
    }

    pub fn has_v2(&self) -> bool {
        self.flags & FLAG_V2 != 0
    }

    /// BEP 27 private torrent: never to be fetched or announced via DHT or PEX.
    pub fn is_private(&self) -> bool {
        self.flags & FLAG_PRIVATE != 0
    }

    /// When the record was written, unix seconds.
    pub fn stored_at(&self) -> u64 {
        self.header().stored_at
    }

    /// Note that this record was served, for the eviction policy (its CLOCK use count;
    /// see `Segment::mark_referenced` for why this is cheap enough for every hit).
    /// `Store::lookup` calls it.
    #[inline]
    pub fn touch(&self) {
        self.segment.mark_referenced(self.header_offset());
    }

    /// Offset of the record's header in its segment.
    pub(crate) fn header_offset(&self) -> usize {
        self.offset - HEADER_BYTES
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    /// Whether two refs name the same stored bytes.
    pub fn same_record(&self, other: &RecordRef) -> bool {
        Arc::ptr_eq(&self.segment, &other.segment) && self.offset == other.offset
    }
}

impl fmt::Debug for RecordRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordRef")
            .field("segment", &self.segment.path())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("hashes", &self.hashes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let hashes = InfoHashes {
            v1: Some([1; 20]),
            v2: Some([2; 32]),
        };
        let h = Header::for_info(&hashes, true, 1234, 1_700_000_000);
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        assert_eq!(h.hashes(), hashes);
        assert_eq!(h.record_bytes(), 80 + 1240);
        for i in 0..HEADER_BYTES {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(Header::decode(&bad).is_err(), "flip at {i}");
        }
        assert_eq!(Header::decode(&b[..79]), Err(HeaderError::Short));
        let v2_only = Header::for_info(
            &InfoHashes {
                v1: None,
                v2: Some([3; 32]),
            },
            false,
            0,
            0,
        );
        assert_eq!(Header::decode(&v2_only.encode()).unwrap().hashes().v1, None);
        let tomb = Header::tombstone(&hashes, 1_700_000_001);
        let decoded = Header::decode(&tomb.encode()).unwrap();
        assert!(decoded.is_tombstone());
        assert_eq!(decoded.hashes(), hashes);
        assert_eq!(decoded.record_bytes(), HEADER_BYTES);
        // A tombstone never carries a payload.
        let mut bad = tomb;
        bad.info_len = 8;
        assert_eq!(Header::decode(&bad.encode()), Err(HeaderError::Fields));
    }
}
