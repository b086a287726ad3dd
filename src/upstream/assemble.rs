//! Sans-IO assembly of one info dict from BEP 9 data messages sent by one peer, and its
//! verification against the 20-byte handshake key. No I/O, no async: `peer` feeds it.
//!
//! Every check that can pin a lie on the peer is here: a `total_size` other than the
//! `metadata_size` it announced, a piece out of range or sent twice, a piece of the wrong
//! length, and finally bytes whose hash is not the key. Memory never exceeds the announced
//! size, which `new` has already held against the caps.

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::limits::METADATA_BYTES_MAX;
use crate::wire::{metadata_piece_count, metadata_piece_range};

/// Why the pieces a peer sent cannot become the info dict.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AssembleError {
    #[error("metadata_size 0")]
    Empty,
    #[error("metadata_size {size} exceeds the cap of {max} bytes")]
    TooLarge { size: u64, max: usize },
    /// A data message's `total_size` differs from the size the peer announced.
    #[error("total_size {got} differs from the announced metadata_size {expected}")]
    SizeChanged { expected: u64, got: u64 },
    #[error("piece {piece} out of range (the metadata has {count})")]
    OutOfRange { piece: u32, count: usize },
    /// A piece that was already received: we request each piece once.
    #[error("piece {piece} was not requested (already received)")]
    Unrequested { piece: u32 },
    #[error("piece {piece} is {got} bytes, expected {expected}")]
    WrongLength {
        piece: u32,
        expected: usize,
        got: usize,
    },
    #[error("{missing} pieces still missing")]
    Incomplete { missing: usize },
    /// All pieces arrived but their hash is not the key: the peer lied.
    #[error("the metadata does not hash to the info-hash")]
    HashMismatch,
}

/// What `on_data` leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// This many pieces are still missing.
    Need(usize),
    /// Every piece has arrived: call `finish`.
    Complete,
}

/// Collects the ut_metadata pieces of one info-hash from one peer.
#[derive(Debug)]
pub struct MetadataAssembler {
    key: [u8; 20],
    metadata_size: usize,
    /// Grows as pieces arrive (geometrically, capped at `metadata_size`), so a peer that
    /// announces a large size and sends little costs little.
    buf: Vec<u8>,
    received: Vec<bool>,
    missing: usize,
}

impl MetadataAssembler {
    /// `metadata_size` as announced by the peer; refused when 0 or over
    /// `min(metadata_bytes_max, limits::METADATA_BYTES_MAX)`.
    pub fn new(
        key: [u8; 20],
        metadata_size: u64,
        metadata_bytes_max: usize,
    ) -> Result<Self, AssembleError> {
        let max = metadata_bytes_max.min(METADATA_BYTES_MAX);
        if metadata_size == 0 {
            return Err(AssembleError::Empty);
        }
        let size = usize::try_from(metadata_size)
            .ok()
            .filter(|&s| s <= max)
            .ok_or(AssembleError::TooLarge {
                size: metadata_size,
                max,
            })?;
        let count = metadata_piece_count(size);
        Ok(MetadataAssembler {
            key,
            metadata_size: size,
            buf: Vec::new(),
            received: vec![false; count],
            missing: count,
        })
    }

    pub fn piece_count(&self) -> usize {
        self.received.len()
    }

    pub fn metadata_size(&self) -> u64 {
        self.metadata_size as u64
    }

    /// Pieces not yet received.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Whether `piece` has arrived (false out of range).
    pub fn has(&self, piece: u32) -> bool {
        self.received.get(piece as usize).copied().unwrap_or(false)
    }

    /// Takes one data message: `total_size` from its header, `data` the block after it.
    /// Nothing is stored unless every check passes.
    pub fn on_data(
        &mut self,
        piece: u32,
        total_size: u64,
        data: &[u8],
    ) -> Result<Progress, AssembleError> {
        if total_size != self.metadata_size as u64 {
            return Err(AssembleError::SizeChanged {
                expected: self.metadata_size as u64,
                got: total_size,
            });
        }
        let count = self.received.len();
        let range = metadata_piece_range(self.metadata_size, piece)
            .ok_or(AssembleError::OutOfRange { piece, count })?;
        if self.received[piece as usize] {
            return Err(AssembleError::Unrequested { piece });
        }
        if data.len() != range.len() {
            return Err(AssembleError::WrongLength {
                piece,
                expected: range.len(),
                got: data.len(),
            });
        }
        if self.buf.len() < range.end {
            let want = range
                .end
                .max((self.buf.capacity() * 2).min(self.metadata_size));
            self.buf.reserve_exact(want - self.buf.len());
            self.buf.resize(range.end, 0);
        }
        debug_assert!(self.buf.capacity() <= self.metadata_size);
        self.buf[range].copy_from_slice(data);
        self.received[piece as usize] = true;
        self.missing -= 1;
        Ok(match self.missing {
            0 => Progress::Complete,
            n => Progress::Need(n),
        })
    }

    /// The verified info dict: SHA-1 of it is the key (v1), or the first 20 bytes of its
    /// SHA-256 are (v2, BEP 52) — a 20-byte handshake key can be either.
    pub fn finish(self) -> Result<Vec<u8>, AssembleError> {
        if self.missing > 0 {
            return Err(AssembleError::Incomplete {
                missing: self.missing,
            });
        }
        assert_eq!(self.buf.len(), self.metadata_size);
        if hashes_to_key(&self.buf, &self.key) {
            Ok(self.buf)
        } else {
            Err(AssembleError::HashMismatch)
        }
    }
}

/// True if `info` is the info dict of the 20-byte handshake `key` (v1 or truncated v2).
pub fn hashes_to_key(info: &[u8], key: &[u8; 20]) -> bool {
    Sha1::digest(info).as_slice() == key || Sha256::digest(info)[..20] == key[..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::METADATA_PIECE_BYTES;
    use crate::wire::test_rng::XorShift;

    const PIECE: usize = METADATA_PIECE_BYTES;

    fn v1_key(info: &[u8]) -> [u8; 20] {
        Sha1::digest(info).into()
    }

    fn v2_key(info: &[u8]) -> [u8; 20] {
        let mut k = [0u8; 20];
        k.copy_from_slice(&Sha256::digest(info)[..20]);
        k
    }

    fn pieces(info: &[u8]) -> Vec<&[u8]> {
        info.chunks(PIECE).collect()
    }

    fn feed_all(asm: &mut MetadataAssembler, info: &[u8], order: &[usize]) {
        let total = info.len() as u64;
        let ps = pieces(info);
        for (i, &p) in order.iter().enumerate() {
            let left = order.len() - i - 1;
            let expected = if left == 0 {
                Progress::Complete
            } else {
                Progress::Need(left)
            };
            assert_eq!(asm.on_data(p as u32, total, ps[p]), Ok(expected));
        }
    }

    #[test]
    fn round_trip_v1_and_v2_keys() {
        let mut rng = XorShift::new(7);
        for len in [
            1,
            100,
            PIECE - 1,
            PIECE,
            PIECE + 1,
            3 * PIECE,
            5 * PIECE + 17,
        ] {
            let info = rng.bytes(len);
            for key in [v1_key(&info), v2_key(&info)] {
                let mut asm = MetadataAssembler::new(key, len as u64, METADATA_BYTES_MAX).unwrap();
                assert_eq!(asm.piece_count(), len.div_ceil(PIECE));
                let order: Vec<usize> = (0..asm.piece_count()).collect();
                feed_all(&mut asm, &info, &order);
                assert_eq!(asm.finish().unwrap(), info);
            }
        }
    }

    #[test]
    fn random_piece_order() {
        let mut rng = XorShift::new(11);
        for round in 0..50 {
            let len = 1 + rng.below(20 * PIECE);
            let info = rng.bytes(len);
            let mut asm =
                MetadataAssembler::new(v1_key(&info), len as u64, METADATA_BYTES_MAX).unwrap();
            let mut order: Vec<usize> = (0..asm.piece_count()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            feed_all(&mut asm, &info, &order);
            assert!(asm.buf.capacity() <= len, "round {round}");
            assert_eq!(asm.finish().unwrap(), info);
        }
    }

    #[test]
    fn size_limits() {
        assert_eq!(
            MetadataAssembler::new([0; 20], 0, 1000).unwrap_err(),
            AssembleError::Empty
        );
        assert_eq!(
            MetadataAssembler::new([0; 20], 1001, 1000).unwrap_err(),
            AssembleError::TooLarge {
                size: 1001,
                max: 1000
            }
        );
        assert!(MetadataAssembler::new([0; 20], 1000, 1000).is_ok());
        // The operator's max cannot lift the codec cap.
        let over = METADATA_BYTES_MAX as u64 + 1;
        assert!(matches!(
            MetadataAssembler::new([0; 20], over, usize::MAX),
            Err(AssembleError::TooLarge { .. })
        ));
        // 4 GiB and u64::MAX announced: refused without allocating.
        for size in [4u64 << 30, u64::MAX] {
            assert!(matches!(
                MetadataAssembler::new([0; 20], size, METADATA_BYTES_MAX),
                Err(AssembleError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn every_piece_error() {
        let mut rng = XorShift::new(3);
        let info = rng.bytes(2 * PIECE + 10);
        let total = info.len() as u64;
        let ps = pieces(&info);
        let mut asm = MetadataAssembler::new(v1_key(&info), total, METADATA_BYTES_MAX).unwrap();
        assert_eq!(
            asm.on_data(0, total + 1, ps[0]),
            Err(AssembleError::SizeChanged {
                expected: total,
                got: total + 1
            })
        );
        assert_eq!(
            asm.on_data(3, total, ps[0]),
            Err(AssembleError::OutOfRange { piece: 3, count: 3 })
        );
        assert_eq!(
            asm.on_data(u32::MAX, total, ps[0]),
            Err(AssembleError::OutOfRange {
                piece: u32::MAX,
                count: 3
            })
        );
        assert_eq!(
            asm.on_data(0, total, &ps[0][1..]),
            Err(AssembleError::WrongLength {
                piece: 0,
                expected: PIECE,
                got: PIECE - 1
            })
        );
        // The last piece is short; a full-size one is wrong.
        assert_eq!(
            asm.on_data(2, total, ps[0]),
            Err(AssembleError::WrongLength {
                piece: 2,
                expected: 10,
                got: PIECE
            })
        );
        // Errors stored nothing.
        assert_eq!(asm.missing(), 3);
        assert!(asm.buf.is_empty());
        assert_eq!(asm.on_data(1, total, ps[1]), Ok(Progress::Need(2)));
        assert_eq!(
            asm.on_data(1, total, ps[1]),
            Err(AssembleError::Unrequested { piece: 1 })
        );
        assert!(asm.has(1) && !asm.has(0) && !asm.has(99));
        assert_eq!(asm.on_data(2, total, ps[2]), Ok(Progress::Need(1)));
        let incomplete = MetadataAssembler {
            key: asm.key,
            metadata_size: asm.metadata_size,
            buf: asm.buf.clone(),
            received: asm.received.clone(),
            missing: asm.missing,
        };
        assert_eq!(
            incomplete.finish(),
            Err(AssembleError::Incomplete { missing: 1 })
        );
        assert_eq!(asm.on_data(0, total, ps[0]), Ok(Progress::Complete));
        assert_eq!(asm.finish().unwrap(), info);
    }

    #[test]
    fn wrong_bytes_of_the_right_size_are_a_hash_mismatch() {
        let info = vec![b'x'; PIECE + 5];
        let mut lie = info.clone();
        lie[PIECE + 2] ^= 1;
        for key in [v1_key(&info), v2_key(&info)] {
            let mut asm = MetadataAssembler::new(key, lie.len() as u64, 1 << 20).unwrap();
            feed_all(&mut asm, &lie, &[1, 0]);
            assert_eq!(asm.finish(), Err(AssembleError::HashMismatch));
        }
    }

    /// A peer announces one size, then its data messages claim another part-way through.
    #[test]
    fn peer_that_changes_its_size_mid_way() {
        let info = vec![7u8; 3 * PIECE];
        let total = info.len() as u64;
        let mut asm = MetadataAssembler::new(v1_key(&info), total, METADATA_BYTES_MAX).unwrap();
        assert_eq!(asm.on_data(0, total, &info[..PIECE]), Ok(Progress::Need(2)));
        let bigger = total + PIECE as u64;
        assert!(matches!(
            asm.on_data(1, bigger, &info[PIECE..2 * PIECE]),
            Err(AssembleError::SizeChanged { .. })
        ));
        let smaller = 2 * PIECE as u64;
        assert!(matches!(
            asm.on_data(1, smaller, &info[PIECE..2 * PIECE]),
            Err(AssembleError::SizeChanged { .. })
        ));
        assert_eq!(asm.missing(), 2);
    }

    #[test]
    fn random_inputs_never_panic_and_memory_stays_bounded() {
        let mut rng = XorShift::new(99);
        for _ in 0..2_000 {
            let size = match rng.below(4) {
                0 => rng.next_u64(),
                1 => rng.below(8 * PIECE) as u64,
                _ => 1 + rng.below(4 * PIECE) as u64,
            };
            let max = rng.below(6 * PIECE);
            let Ok(mut asm) = MetadataAssembler::new([1; 20], size, max) else {
                continue;
            };
            assert!(size as usize <= max && size > 0);
            for _ in 0..rng.below(12) {
                let piece = match rng.below(3) {
                    0 => rng.next_u64() as u32,
                    _ => rng.below(asm.piece_count() + 2) as u32,
                };
                let total = if rng.below(5) == 0 {
                    rng.next_u64()
                } else {
                    size
                };
                let len = match rng.below(3) {
                    0 => rng.below(2 * PIECE),
                    _ => metadata_piece_range(size as usize, piece).map_or(0, |r| r.len()),
                };
                let data = vec![0u8; len];
                let before = asm.missing();
                match asm.on_data(piece, total, &data) {
                    Ok(Progress::Complete) => assert_eq!(asm.missing(), 0),
                    Ok(Progress::Need(n)) => assert_eq!((n, n + 1), (asm.missing(), before)),
                    Err(_) => assert_eq!(asm.missing(), before),
                }
                assert!(asm.buf.capacity() <= size as usize);
            }
            let _ = asm.finish();
        }
    }
}
