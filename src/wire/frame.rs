//! Length-prefixed peer messages after the handshake: `<u32 length><u8 id><payload>`
//! (BEP 3), the Fast extension ids 13–17 (BEP 6), and the BEP 10 extended message (id 20)
//! whose payload the `extension`, `metadata` and `pex` modules decode.
//!
//! Lengths are checked as early as the bytes allow: a length over `FRAME_BYTES_MAX` is an
//! error right after the 4 length bytes, a wrong length for a fixed-size id right after
//! the id byte, so a hostile peer never makes us buffer a frame we would reject.

use super::{Decoded, WireError};
use crate::limits::FRAME_BYTES_MAX;

/// BEP 10: the message id of all extension messages.
pub const EXTENDED_ID: u8 = 20;

const CHOKE: u8 = 0;
const UNCHOKE: u8 = 1;
const INTERESTED: u8 = 2;
const NOT_INTERESTED: u8 = 3;
const HAVE: u8 = 4;
const BITFIELD: u8 = 5;
const REQUEST: u8 = 6;
const PIECE: u8 = 7;
const CANCEL: u8 = 8;
const PORT: u8 = 9;
const SUGGEST: u8 = 13;
const HAVE_ALL: u8 = 14;
const HAVE_NONE: u8 = 15;
const REJECT: u8 = 16;
const ALLOWED_FAST: u8 = 17;

/// One decoded message; slices borrow the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(&'a [u8]),
    Request {
        index: u32,
        begin: u32,
        length: u32,
    },
    Piece {
        index: u32,
        begin: u32,
        block: &'a [u8],
    },
    Cancel {
        index: u32,
        begin: u32,
        length: u32,
    },
    Port(u16),
    Suggest(u32),
    HaveAll,
    HaveNone,
    Reject {
        index: u32,
        begin: u32,
        length: u32,
    },
    AllowedFast(u32),
    /// BEP 10: `id` is the extended message id (0 = extension handshake), `payload` the
    /// bytes after it.
    Extended {
        id: u8,
        payload: &'a [u8],
    },
    /// An id we do not know (e.g. BEP 52 hash messages 21–23), consumed and skipped.
    /// `len` is the payload length after the id byte.
    Unknown {
        id: u8,
        len: usize,
    },
}

/// The frame length (id byte included) an id requires: `Exact(n)` or `AtLeast(n)`.
enum LengthRule {
    Exact(usize),
    AtLeast(usize),
}

fn length_rule(id: u8) -> LengthRule {
    match id {
        CHOKE | UNCHOKE | INTERESTED | NOT_INTERESTED | HAVE_ALL | HAVE_NONE => {
            LengthRule::Exact(1)
        }
        HAVE | SUGGEST | ALLOWED_FAST => LengthRule::Exact(5),
        REQUEST | CANCEL | REJECT => LengthRule::Exact(13),
        PORT => LengthRule::Exact(3),
        PIECE => LengthRule::AtLeast(9),
        EXTENDED_ID => LengthRule::AtLeast(2),
        _ => LengthRule::AtLeast(1),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one frame from the front of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<Decoded<Frame<'_>>, WireError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(Decoded::NeedMore(4 - buf.len()));
    };
    let len = u32_at(prefix, 0) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(WireError::TooLong {
            what: "frame",
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    if len == 0 {
        return Ok(Decoded::Done(Frame::KeepAlive, 4));
    }
    let Some(&id) = buf.get(4) else {
        return Ok(Decoded::NeedMore(len));
    };
    let length_ok = match length_rule(id) {
        LengthRule::Exact(n) => len == n,
        LengthRule::AtLeast(n) => len >= n,
    };
    if !length_ok {
        return Err(WireError::BadLength { id, len });
    }
    let total = 4 + len;
    let Some(frame) = buf.get(..total) else {
        return Ok(Decoded::NeedMore(total - buf.len()));
    };
    let body = &frame[5..];
    let triple = || (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8));
    let decoded = match id {
        CHOKE => Frame::Choke,
        UNCHOKE => Frame::Unchoke,
        INTERESTED => Frame::Interested,
        NOT_INTERESTED => Frame::NotInterested,
        HAVE => Frame::Have(u32_at(body, 0)),
        BITFIELD => Frame::Bitfield(body),
        REQUEST => {
            let (index, begin, length) = triple();
            Frame::Request {
                index,
                begin,
                length,
            }
        }
        PIECE => Frame::Piece {
            index: u32_at(body, 0),
            begin: u32_at(body, 4),
            block: &body[8..],
        },
        CANCEL => {
            let (index, begin, length) = triple();
            Frame::Cancel {
                index,
                begin,
                length,
            }
        }
        PORT => Frame::Port(u16::from_be_bytes([body[0], body[1]])),
        SUGGEST => Frame::Suggest(u32_at(body, 0)),
        HAVE_ALL => Frame::HaveAll,
        HAVE_NONE => Frame::HaveNone,
        REJECT => {
            let (index, begin, length) = triple();
            Frame::Reject {
                index,
                begin,
                length,
            }
        }
        ALLOWED_FAST => Frame::AllowedFast(u32_at(body, 0)),
        EXTENDED_ID => Frame::Extended {
            id: body[0],
            payload: &body[1..],
        },
        _ => Frame::Unknown {
            id,
            len: body.len(),
        },
    };
    Ok(Decoded::Done(decoded, total))
}

/// Appends the 4-byte length and the id of a frame whose payload is `payload_len` bytes.
fn push_head(out: &mut Vec<u8>, id: u8, payload_len: usize) {
    out.reserve(5 + payload_len);
    out.extend_from_slice(&(payload_len as u32 + 1).to_be_bytes());
    out.push(id);
}

fn encode_bare(out: &mut Vec<u8>, id: u8) -> usize {
    push_head(out, id, 0);
    5
}

fn encode_u32(out: &mut Vec<u8>, id: u8, n: u32) -> usize {
    push_head(out, id, 4);
    out.extend_from_slice(&n.to_be_bytes());
    9
}

fn encode_triple(out: &mut Vec<u8>, id: u8, index: u32, begin: u32, length: u32) -> usize {
    push_head(out, id, 12);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&begin.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    17
}

pub fn encode_keepalive(out: &mut Vec<u8>) -> usize {
    out.extend_from_slice(&[0; 4]);
    4
}

pub fn encode_choke(out: &mut Vec<u8>) -> usize {
    encode_bare(out, CHOKE)
}

pub fn encode_unchoke(out: &mut Vec<u8>) -> usize {
    encode_bare(out, UNCHOKE)
}

pub fn encode_interested(out: &mut Vec<u8>) -> usize {
    encode_bare(out, INTERESTED)
}

pub fn encode_not_interested(out: &mut Vec<u8>) -> usize {
    encode_bare(out, NOT_INTERESTED)
}

/// BEP 6: only when both handshakes set the Fast bit (docs/protocol-facts.md §8).
pub fn encode_have_all(out: &mut Vec<u8>) -> usize {
    encode_bare(out, HAVE_ALL)
}

/// BEP 6: only when both handshakes set the Fast bit; libtorrent disconnects otherwise
/// (docs/protocol-facts.md §8).
pub fn encode_have_none(out: &mut Vec<u8>) -> usize {
    encode_bare(out, HAVE_NONE)
}

pub fn encode_have(out: &mut Vec<u8>, index: u32) -> usize {
    encode_u32(out, HAVE, index)
}

pub fn encode_request(out: &mut Vec<u8>, index: u32, begin: u32, length: u32) -> usize {
    encode_triple(out, REQUEST, index, begin, length)
}

pub fn encode_cancel(out: &mut Vec<u8>, index: u32, begin: u32, length: u32) -> usize {
    encode_triple(out, CANCEL, index, begin, length)
}

/// BEP 6 reject request.
pub fn encode_reject(out: &mut Vec<u8>, index: u32, begin: u32, length: u32) -> usize {
    encode_triple(out, REJECT, index, begin, length)
}

/// BEP 5: our DHT port.
pub fn encode_port(out: &mut Vec<u8>, port: u16) -> usize {
    push_head(out, PORT, 2);
    out.extend_from_slice(&port.to_be_bytes());
    7
}

/// Appends the head of an extended message — length (covering `payload_len`), id 20 and
/// `ext_id` — for a caller that appends or sends the payload itself. Returns 6.
pub fn encode_extended_header(out: &mut Vec<u8>, ext_id: u8, payload_len: usize) -> usize {
    push_head(out, EXTENDED_ID, 1 + payload_len);
    out.push(ext_id);
    6
}

/// Appends any frame. `Unknown { len }` is written with `len` zero bytes of payload, since
/// the decoder does not keep unknown payloads.
pub fn encode_frame(out: &mut Vec<u8>, frame: &Frame<'_>) -> usize {
    let with_body = |out: &mut Vec<u8>, id: u8, parts: &[&[u8]]| {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        push_head(out, id, len);
        for p in parts {
            out.extend_from_slice(p);
        }
        5 + len
    };
    match *frame {
        Frame::KeepAlive => encode_keepalive(out),
        Frame::Choke => encode_choke(out),
        Frame::Unchoke => encode_unchoke(out),
        Frame::Interested => encode_interested(out),
        Frame::NotInterested => encode_not_interested(out),
        Frame::Have(i) => encode_have(out, i),
        Frame::Bitfield(bits) => with_body(out, BITFIELD, &[bits]),
        Frame::Request {
            index,
            begin,
            length,
        } => encode_request(out, index, begin, length),
        Frame::Piece {
            index,
            begin,
            block,
        } => with_body(
            out,
            PIECE,
            &[&index.to_be_bytes(), &begin.to_be_bytes(), block],
        ),
        Frame::Cancel {
            index,
            begin,
            length,
        } => encode_cancel(out, index, begin, length),
        Frame::Port(p) => encode_port(out, p),
        Frame::Suggest(i) => encode_u32(out, SUGGEST, i),
        Frame::HaveAll => encode_have_all(out),
        Frame::HaveNone => encode_have_none(out),
        Frame::Reject {
            index,
            begin,
            length,
        } => encode_reject(out, index, begin, length),
        Frame::AllowedFast(i) => encode_u32(out, ALLOWED_FAST, i),
        Frame::Extended { id, payload } => {
            encode_extended_header(out, id, payload.len());
            out.extend_from_slice(payload);
            6 + payload.len()
        }
        Frame::Unknown { id, len } => {
            push_head(out, id, len);
            out.resize(out.len() + len, 0);
            5 + len
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;

    fn samples() -> Vec<Frame<'static>> {
        vec![
            Frame::KeepAlive,
            Frame::Choke,
            Frame::Unchoke,
            Frame::Interested,
            Frame::NotInterested,
            Frame::Have(0xdead_beef),
            Frame::Bitfield(b""),
            Frame::Bitfield(b"\xff\x80"),
            Frame::Request {
                index: 1,
                begin: 16384,
                length: 16384,
            },
            Frame::Piece {
                index: 2,
                begin: 0,
                block: b"block bytes",
            },
            Frame::Piece {
                index: 2,
                begin: 0,
                block: b"",
            },
            Frame::Cancel {
                index: 3,
                begin: 4,
                length: 5,
            },
            Frame::Port(6881),
            Frame::Suggest(7),
            Frame::HaveAll,
            Frame::HaveNone,
            Frame::Reject {
                index: u32::MAX,
                begin: 0,
                length: 1,
            },
            Frame::AllowedFast(9),
            Frame::Extended {
                id: 0,
                payload: b"d1:md11:ut_metadatai3eee",
            },
            Frame::Extended {
                id: 1,
                payload: b"",
            },
            Frame::Extended {
                id: 2,
                payload: b"x",
            },
            Frame::Extended {
                id: 3,
                payload: b"d8:msg_typei0e5:piecei0ee",
            },
            Frame::Extended {
                id: 42,
                payload: b"y",
            },
            Frame::Extended {
                id: 255,
                payload: b"z",
            },
            Frame::Unknown { id: 21, len: 0 },
            Frame::Unknown { id: 200, len: 3 },
        ]
    }

    #[test]
    fn round_trip_every_frame() {
        for frame in samples() {
            let mut out = vec![0xAA]; // encoders append
            let n = encode_frame(&mut out, &frame);
            assert_eq!(n, out.len() - 1, "{frame:?}");
            assert_eq!(
                decode_frame(&out[1..]),
                Ok(Decoded::Done(frame, n)),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn specific_encoders_match_the_wire() {
        let mut out = Vec::new();
        assert_eq!(encode_keepalive(&mut out), 4);
        assert_eq!(encode_have_none(&mut out), 5);
        assert_eq!(encode_have_all(&mut out), 5);
        assert_eq!(encode_interested(&mut out), 5);
        assert_eq!(encode_request(&mut out, 1, 2, 3), 17);
        assert_eq!(
            out,
            b"\0\0\0\0\0\0\0\x01\x0f\0\0\0\x01\x0e\0\0\0\x01\x02\
              \0\0\0\x0d\x06\0\0\0\x01\0\0\0\x02\0\0\0\x03"
        );
    }

    #[test]
    fn every_prefix_needs_more() {
        for frame in samples() {
            let mut out = Vec::new();
            encode_frame(&mut out, &frame);
            for n in 0..out.len() {
                match decode_frame(&out[..n]) {
                    Ok(Decoded::NeedMore(more)) => {
                        assert!(more > 0 && n + more <= out.len(), "{frame:?} at {n}")
                    }
                    other => panic!("{frame:?} prefix {n}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn stream_of_frames_decodes_in_order() {
        let mut out = Vec::new();
        for frame in samples() {
            encode_frame(&mut out, &frame);
        }
        let mut rest = &out[..];
        for frame in samples() {
            let Ok(Decoded::Done(got, n)) = decode_frame(rest) else {
                panic!()
            };
            assert_eq!(got, frame);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn oversized_frame_is_rejected_after_the_length() {
        let len = (FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
        assert!(matches!(decode_frame(&len), Err(WireError::TooLong { .. })));
        assert!(matches!(
            decode_frame(&u32::MAX.to_be_bytes()),
            Err(WireError::TooLong { .. })
        ));
        let mut max = (FRAME_BYTES_MAX as u32).to_be_bytes().to_vec();
        max.push(5);
        assert_eq!(
            decode_frame(&max),
            Ok(Decoded::NeedMore(FRAME_BYTES_MAX - 1))
        );
    }

    #[test]
    fn fixed_sizes_are_enforced_at_the_id_byte() {
        for (len, id) in [
            (2u32, CHOKE),
            (5, HAVE_NONE),
            (4, HAVE),
            (6, HAVE),
            (12, REQUEST),
            (14, REJECT),
            (2, PORT),
            (8, PIECE),
            (1, EXTENDED_ID),
            (1, SUGGEST),
        ] {
            let mut buf = len.to_be_bytes().to_vec();
            buf.push(id);
            assert_eq!(
                decode_frame(&buf),
                Err(WireError::BadLength {
                    id,
                    len: len as usize
                })
            );
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = XorShift::new(0x5eed);
        let mut valid = Vec::new();
        for frame in samples() {
            let mut out = Vec::new();
            encode_frame(&mut out, &frame);
            valid.push(out);
        }
        for i in 0..200_000 {
            let input = match i % 3 {
                0 => rng.bytes_below(300),
                1 => {
                    // Plausible length prefix, random body.
                    let len = rng.below(40) as u32;
                    let mut v = len.to_be_bytes().to_vec();
                    v.extend(rng.bytes_below(50));
                    v
                }
                _ => {
                    let pick = rng.below(valid.len());
                    rng.mutate(&valid[pick])
                }
            };
            match decode_frame(&input) {
                Ok(Decoded::Done(_, n)) => assert!(n >= 4 && n <= input.len()),
                Ok(Decoded::NeedMore(n)) => assert!(n > 0),
                Err(e) => assert!(e.closes_connection()),
            }
        }
    }
}
