//! BEP 9 ut_metadata: request (msg_type 0), data (1), reject (2), and the 16 KiB piece
//! arithmetic.
//!
//! The data message is written in two parts: `encode_metadata_data_header` writes the
//! frame length, ids and bencoded header into a small buffer, and the caller sends the
//! block itself straight from the store's mmap in the same vectored write (docs/architecture.md
//! "Zero-copy serving"), so no metadata byte is copied here.
//!
//! Ids: messages we send carry the *peer's* ut_metadata id, messages we receive carry
//! ours (docs/protocol-facts.md §4); any id 1–255 works.

use std::ops::Range;

use super::bencode::{self, decimal_len, push_decimal, BencodeError};
use super::frame::EXTENDED_ID;
use super::WireError;
use crate::limits::{METADATA_PIECE_BYTES, UT_METADATA_HEADER_BYTES_MAX};

const REQUEST: i64 = 0;
const DATA: i64 = 1;
const REJECT: i64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetadataMsg {
    Request {
        piece: u32,
    },
    /// The block follows the header; `decode_metadata` returns it beside this.
    Data {
        piece: u32,
        total_size: u64,
    },
    Reject {
        piece: u32,
    },
}

const fn malformed(reason: &'static str) -> WireError {
    WireError::Malformed {
        what: "ut_metadata message",
        reason,
    }
}

/// Decodes a ut_metadata payload (the bytes after the extended id byte). Returns the
/// message and, for `Data`, the block after the header (empty otherwise; bytes after a
/// request or reject header are ignored). The block's length is not checked against the
/// piece here: the fetcher does that with `metadata_piece_range`.
///
/// Errors: `UnknownMetadataType` for a well-formed message of another msg_type (ignore
/// it); anything else is malformed (close). A piece out of range of the torrent is not an
/// error here: the server answers it with a reject.
pub fn decode_metadata(payload: &[u8]) -> Result<(MetadataMsg, &[u8]), WireError> {
    let head = &payload[..payload.len().min(UT_METADATA_HEADER_BYTES_MAX)];
    let (value, header_len) = match bencode::parse_prefix(head) {
        Ok(parsed) => parsed,
        Err(BencodeError::Eof { .. }) if payload.len() > UT_METADATA_HEADER_BYTES_MAX => {
            return Err(WireError::TooLong {
                what: "ut_metadata header",
                len: payload.len(),
                max: UT_METADATA_HEADER_BYTES_MAX,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let dict = value.as_dict().ok_or(malformed("not a dict"))?;
    let (mut msg_type, mut piece, mut total_size) = (None, None, None);
    for (key, value) in dict {
        match key {
            b"msg_type" => msg_type = value.as_int(),
            b"piece" => piece = value.as_int(),
            b"total_size" => total_size = value.as_int(),
            _ => {}
        }
    }
    let msg_type = msg_type
        .ok_or(malformed("no integer msg_type"))?
        .to_i64()
        .ok_or(malformed("msg_type out of range"))?;
    if ![REQUEST, DATA, REJECT].contains(&msg_type) {
        return Err(WireError::UnknownMetadataType(msg_type));
    }
    let piece = piece
        .ok_or(malformed("no integer piece"))?
        .to_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or(malformed("piece negative or over u32"))?;
    Ok(match msg_type {
        REQUEST => (MetadataMsg::Request { piece }, &[][..]),
        REJECT => (MetadataMsg::Reject { piece }, &[][..]),
        _ => {
            let total_size = total_size
                .ok_or(malformed("data without integer total_size"))?
                .to_u64()
                .ok_or(malformed("total_size negative or over u64"))?;
            (
                MetadataMsg::Data { piece, total_size },
                &payload[header_len..],
            )
        }
    })
}

const DATA_HEAD: &[u8] = b"d8:msg_typei1e5:piecei";
const DATA_MID: &[u8] = b"e10:total_sizei";
const DATA_TAIL: &[u8] = b"ee";

/// Appends the frame head of a data message: length (covering header *and* the
/// `block_len` bytes the caller sends next), id 20, `peer_ut_metadata`, and
/// `d8:msg_typei1e5:piecei<piece>e10:total_sizei<total_size>ee`. Returns the bytes
/// written (the block excluded). Hot path: one reserve, no formatting machinery.
pub fn encode_metadata_data_header(
    out: &mut Vec<u8>,
    peer_ut_metadata: u8,
    piece: u32,
    total_size: u64,
    block_len: usize,
) -> usize {
    let header_len = DATA_HEAD.len()
        + decimal_len(piece.into())
        + DATA_MID.len()
        + decimal_len(total_size)
        + DATA_TAIL.len();
    let written = 6 + header_len;
    out.reserve(written);
    out.extend_from_slice(&((2 + header_len + block_len) as u32).to_be_bytes());
    out.push(EXTENDED_ID);
    out.push(peer_ut_metadata);
    out.extend_from_slice(DATA_HEAD);
    push_decimal(out, piece.into());
    out.extend_from_slice(DATA_MID);
    push_decimal(out, total_size);
    out.extend_from_slice(DATA_TAIL);
    written
}

/// `d8:msg_typei<t>e5:piecei<piece>ee` with the frame head.
fn encode_simple(out: &mut Vec<u8>, peer_ut_metadata: u8, msg_type: u8, piece: u32) -> usize {
    const HEAD: &[u8] = b"d8:msg_typei?e5:piecei";
    let header_len = HEAD.len() + decimal_len(piece.into()) + 2;
    out.reserve(6 + header_len);
    out.extend_from_slice(&((2 + header_len) as u32).to_be_bytes());
    out.push(EXTENDED_ID);
    out.push(peer_ut_metadata);
    out.extend_from_slice(b"d8:msg_typei");
    out.push(b'0' + msg_type);
    out.extend_from_slice(b"e5:piecei");
    push_decimal(out, piece.into());
    out.extend_from_slice(b"ee");
    6 + header_len
}

/// Appends a whole reject frame (msg_type 2) for `piece`.
pub fn encode_metadata_reject(out: &mut Vec<u8>, peer_ut_metadata: u8, piece: u32) -> usize {
    encode_simple(out, peer_ut_metadata, REJECT as u8, piece)
}

/// Appends a whole request frame (msg_type 0) for `piece`.
pub fn encode_metadata_request(out: &mut Vec<u8>, peer_ut_metadata: u8, piece: u32) -> usize {
    encode_simple(out, peer_ut_metadata, REQUEST as u8, piece)
}

/// Number of 16 KiB pieces of a `total_size`-byte info dict (0 for 0).
pub fn metadata_piece_count(total_size: usize) -> usize {
    total_size.div_ceil(METADATA_PIECE_BYTES)
}

/// Byte range of `piece` within the info dict, or None past the last piece. Only the
/// last piece may be shorter than 16 KiB.
pub fn metadata_piece_range(total_size: usize, piece: u32) -> Option<Range<usize>> {
    let start = (piece as usize).checked_mul(METADATA_PIECE_BYTES)?;
    if start >= total_size {
        return None;
    }
    Some(start..total_size.min(start + METADATA_PIECE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;
    use crate::wire::{decode_frame, Decoded, Frame};

    /// Decodes a whole frame and checks it is an extended message for `ext_id`.
    fn payload_of(frame: &[u8], ext_id: u8) -> &[u8] {
        match decode_frame(frame) {
            Ok(Decoded::Done(Frame::Extended { id, payload }, n)) => {
                assert_eq!((id, n), (ext_id, frame.len()));
                payload
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_header_is_byte_exact_and_covers_the_block() {
        let block = vec![0x55u8; 16384];
        let mut out = Vec::new();
        let n = encode_metadata_data_header(&mut out, 42, 1, 34_256, block.len());
        assert_eq!(n, out.len());
        assert_eq!(
            &out[4..n],
            b"\x14\x2ad8:msg_typei1e5:piecei1e10:total_sizei34256ee"
        );
        out.extend_from_slice(&block);
        let payload = payload_of(&out, 42);
        let (msg, data) = decode_metadata(payload).unwrap();
        assert_eq!(
            msg,
            MetadataMsg::Data {
                piece: 1,
                total_size: 34_256
            }
        );
        assert_eq!(data, &block[..]);
    }

    #[test]
    fn round_trips_with_any_id() {
        for id in [1u8, 2, 3, 42, 255] {
            for piece in [0u32, 1, 9, 10, 4095, u32::MAX] {
                let mut out = Vec::new();
                let n = encode_metadata_request(&mut out, id, piece);
                assert_eq!(n, out.len());
                let got = decode_metadata(payload_of(&out, id)).unwrap();
                assert_eq!(got, (MetadataMsg::Request { piece }, &[][..]));

                let mut out = Vec::new();
                encode_metadata_reject(&mut out, id, piece);
                let got = decode_metadata(payload_of(&out, id)).unwrap();
                assert_eq!(got, (MetadataMsg::Reject { piece }, &[][..]));

                let mut out = Vec::new();
                encode_metadata_data_header(&mut out, id, piece, u64::MAX, 3);
                out.extend_from_slice(b"abc");
                let got = decode_metadata(payload_of(&out, id)).unwrap();
                assert_eq!(
                    got,
                    (
                        MetadataMsg::Data {
                            piece,
                            total_size: u64::MAX
                        },
                        &b"abc"[..]
                    )
                );
            }
        }
        let mut out = Vec::new();
        encode_metadata_request(&mut out, 3, 0);
        assert_eq!(&out[..], b"\0\0\0\x1b\x14\x03d8:msg_typei0e5:piecei0ee");
        let mut out = Vec::new();
        encode_metadata_reject(&mut out, 3, 7);
        assert_eq!(&out[6..], b"d8:msg_typei2e5:piecei7ee");
    }

    #[test]
    fn unknown_type_is_ignorable_and_malformed_closes() {
        let e = decode_metadata(b"d8:msg_typei3e5:piecei0ee").unwrap_err();
        assert_eq!(e, WireError::UnknownMetadataType(3));
        assert!(!e.closes_connection());
        assert_eq!(
            decode_metadata(b"d8:msg_typei-1ee"),
            Err(WireError::UnknownMetadataType(-1))
        );
        for bad in [
            &b""[..],
            b"le",
            b"d5:piecei0ee",
            b"d8:msg_type1:05:piecei0ee",
            b"d8:msg_typei0ee",
            b"d8:msg_typei0e5:piecei-1ee",
            b"d8:msg_typei0e5:piecei4294967296ee",
            b"d8:msg_typei0e5:piecei99999999999999999999999ee",
            b"d8:msg_typei99999999999999999999e5:piecei0ee",
            b"d8:msg_typei1e5:piecei0ee",
            b"d8:msg_typei1e5:piecei0e10:total_sizei-1ee",
            b"d8:msg_typei0e5:piecei0e",
        ] {
            let e = decode_metadata(bad).unwrap_err();
            assert!(
                e.closes_connection(),
                "{:?} -> {e:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Unsorted keys and extra keys are fine.
        assert_eq!(
            decode_metadata(b"d5:piecei4e1:xle8:msg_typei0ee")
                .unwrap()
                .0,
            MetadataMsg::Request { piece: 4 }
        );
    }

    #[test]
    fn header_cap() {
        let mut long = b"d8:msg_typei0e5:piecei0e1:x".to_vec();
        long.extend(format!("{}:", UT_METADATA_HEADER_BYTES_MAX).as_bytes());
        long.extend(vec![b'x'; UT_METADATA_HEADER_BYTES_MAX]);
        long.push(b'e');
        assert!(matches!(
            decode_metadata(&long),
            Err(WireError::TooLong { .. })
        ));
        let mut bomb = b"d8:msg_typei0e5:piecei0e1:x".to_vec();
        bomb.extend(vec![b'l'; 10_000]);
        assert!(decode_metadata(&bomb).unwrap_err().closes_connection());
        assert!(
            decode_metadata(b"d8:msg_typei1e5:piecei0e10:total_sizei1e1:x4294967295:")
                .unwrap_err()
                .closes_connection()
        );
    }

    #[test]
    fn piece_arithmetic() {
        const P: usize = METADATA_PIECE_BYTES;
        assert_eq!(metadata_piece_count(0), 0);
        assert_eq!(metadata_piece_count(1), 1);
        assert_eq!(metadata_piece_count(P), 1);
        assert_eq!(metadata_piece_count(P + 1), 2);
        assert_eq!(metadata_piece_range(0, 0), None);
        assert_eq!(metadata_piece_range(20_000, 0), Some(0..P));
        assert_eq!(metadata_piece_range(20_000, 1), Some(P..20_000));
        assert_eq!(metadata_piece_range(20_000, 2), None);
        assert_eq!(metadata_piece_range(2 * P, 1), Some(P..2 * P));
        assert_eq!(metadata_piece_range(2 * P, 2), None);
        assert_eq!(metadata_piece_range(usize::MAX, u32::MAX), {
            let s = u32::MAX as usize * P;
            Some(s..s + P)
        });
        for total in [1usize, 100, P - 1, P, P + 1, 5 * P + 7] {
            let n = metadata_piece_count(total);
            let covered: usize = (0..n as u32)
                .map(|p| metadata_piece_range(total, p).unwrap().len())
                .sum();
            assert_eq!(covered, total);
            assert_eq!(metadata_piece_range(total, n as u32), None);
        }
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift::new(0x9);
        let mut valid = Vec::new();
        encode_metadata_data_header(&mut valid, 1, 3, 70_000, 5);
        valid.extend_from_slice(b"abcde");
        let valid = &valid[6..];
        for i in 0..200_000 {
            let input = if i % 2 == 0 {
                rng.bytes_below(300)
            } else {
                rng.mutate(valid)
            };
            match decode_metadata(&input) {
                Ok((_, data)) => assert!(data.len() <= input.len()),
                Err(WireError::UnknownMetadataType(_)) => {}
                Err(e) => assert!(e.closes_connection()),
            }
        }
    }
}
