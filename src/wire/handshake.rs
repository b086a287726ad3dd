//! The BitTorrent handshake (BEP 3): `<19>"BitTorrent protocol"<8 reserved><20 info-hash>
//! <20 peer id>`, and the reserved bits that announce BEP 10, BEP 6 Fast, BEP 5 DHT and
//! the BEP 52 v2 upgrade.
//!
//! The head (first 48 bytes, up to the info-hash) is decoded separately from the peer id
//! because we must answer as soon as we know the info-hash: some crawlers wait for our
//! handshake before sending their peer id (docs/protocol-facts.md §2).

use super::{Decoded, WireError};

pub const PSTR: &[u8; 19] = b"BitTorrent protocol";
/// pstrlen + pstr + reserved + info-hash.
pub const HANDSHAKE_HEAD_LEN: usize = 1 + 19 + 8 + 20;
/// Head + peer id.
pub const HANDSHAKE_LEN: usize = HANDSHAKE_HEAD_LEN + 20;

/// The 8 reserved handshake bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reserved(pub [u8; 8]);

impl Reserved {
    /// BEP 10 extension protocol: byte 5, 0x10.
    pub fn extension_protocol(&self) -> bool {
        self.0[5] & 0x10 != 0
    }

    /// BEP 6 Fast extension: byte 7, 0x04.
    pub fn fast(&self) -> bool {
        self.0[7] & 0x04 != 0
    }

    /// BEP 5 DHT: byte 7, 0x01.
    pub fn dht(&self) -> bool {
        self.0[7] & 0x01 != 0
    }

    /// BEP 52 upgrade: byte 7, 0x10. libtorrent 2.0.8 sets it only when it handshakes
    /// with the v1 hash of a hybrid torrent (golden capture), and disconnects a peer that
    /// claims it for a v1-only torrent (docs/protocol-facts.md §1).
    pub fn v2_upgrade(&self) -> bool {
        self.0[7] & 0x10 != 0
    }

    /// Our reserved bytes: BEP 10 always (it carries ut_metadata), the others as asked.
    pub fn ours(fast: bool, dht: bool, v2: bool) -> Reserved {
        let mut r = [0u8; 8];
        r[5] |= 0x10;
        if fast {
            r[7] |= 0x04;
        }
        if dht {
            r[7] |= 0x01;
        }
        if v2 {
            r[7] |= 0x10;
        }
        Reserved(r)
    }
}

/// The part of a handshake that names the torrent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeHead {
    pub reserved: Reserved,
    /// SHA-1 info-hash, or the first 20 bytes of a v2 SHA-256 one.
    pub info_hash: [u8; 20],
}

/// Decodes the first 48 bytes of a handshake. A wrong pstrlen or protocol string is
/// reported as soon as the bytes seen so far mismatch, so a non-BitTorrent connection is
/// closed without waiting for 48 bytes.
pub fn decode_handshake_head(buf: &[u8]) -> Result<Decoded<HandshakeHead>, WireError> {
    let seen = buf.len().min(1 + PSTR.len());
    for (at, &b) in buf[..seen].iter().enumerate() {
        let expected = if at == 0 {
            PSTR.len() as u8
        } else {
            PSTR[at - 1]
        };
        if b != expected {
            return Err(WireError::BadProtocol { at });
        }
    }
    let Some(head) = buf.get(..HANDSHAKE_HEAD_LEN) else {
        return Ok(Decoded::NeedMore(HANDSHAKE_HEAD_LEN - buf.len()));
    };
    let mut reserved = [0u8; 8];
    reserved.copy_from_slice(&head[20..28]);
    let mut info_hash = [0u8; 20];
    info_hash.copy_from_slice(&head[28..48]);
    Ok(Decoded::Done(
        HandshakeHead {
            reserved: Reserved(reserved),
            info_hash,
        },
        HANDSHAKE_HEAD_LEN,
    ))
}

/// Decodes the 20-byte peer id that follows the head (any bytes are valid).
pub fn decode_peer_id(buf: &[u8]) -> Decoded<[u8; 20]> {
    match buf.get(..20) {
        Some(id) => {
            let mut peer_id = [0u8; 20];
            peer_id.copy_from_slice(id);
            Decoded::Done(peer_id, 20)
        }
        None => Decoded::NeedMore(20 - buf.len()),
    }
}

/// Appends a full 68-byte handshake.
pub fn encode_handshake(
    out: &mut Vec<u8>,
    reserved: Reserved,
    info_hash: &[u8; 20],
    peer_id: &[u8; 20],
) -> usize {
    out.reserve(HANDSHAKE_LEN);
    out.push(PSTR.len() as u8);
    out.extend_from_slice(PSTR);
    out.extend_from_slice(&reserved.0);
    out.extend_from_slice(info_hash);
    out.extend_from_slice(peer_id);
    HANDSHAKE_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let n = encode_handshake(
            &mut out,
            Reserved::ours(true, false, false),
            &[7; 20],
            &[9; 20],
        );
        assert_eq!(n, HANDSHAKE_LEN);
        assert_eq!(out.len(), HANDSHAKE_LEN);
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let Ok(Decoded::Done(head, used)) = decode_handshake_head(&bytes) else {
            panic!("decode failed")
        };
        assert_eq!(used, HANDSHAKE_HEAD_LEN);
        assert_eq!(head.info_hash, [7; 20]);
        assert!(head.reserved.extension_protocol());
        assert!(head.reserved.fast());
        assert!(!head.reserved.dht());
        assert!(!head.reserved.v2_upgrade());
        assert_eq!(decode_peer_id(&bytes[used..]), Decoded::Done([9; 20], 20));
    }

    #[test]
    fn reserved_bits() {
        let r = Reserved::ours(false, false, false);
        assert_eq!(r.0, [0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert!(r.extension_protocol() && !r.fast() && !r.dht() && !r.v2_upgrade());
        let r = Reserved::ours(true, true, true);
        assert_eq!(r.0, [0, 0, 0, 0, 0, 0x10, 0, 0x15]);
        assert!(r.extension_protocol() && r.fast() && r.dht() && r.v2_upgrade());
    }

    #[test]
    fn every_prefix_needs_more() {
        let bytes = sample();
        for n in 0..HANDSHAKE_HEAD_LEN {
            assert_eq!(
                decode_handshake_head(&bytes[..n]),
                Ok(Decoded::NeedMore(HANDSHAKE_HEAD_LEN - n))
            );
        }
        for n in 0..20 {
            assert_eq!(
                decode_peer_id(&bytes[48..48 + n]),
                Decoded::NeedMore(20 - n)
            );
        }
    }

    #[test]
    fn mismatch_is_reported_at_once() {
        assert_eq!(
            decode_handshake_head(b"G"),
            Err(WireError::BadProtocol { at: 0 })
        );
        assert_eq!(
            decode_handshake_head(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadProtocol { at: 0 })
        );
        assert_eq!(
            decode_handshake_head(b"\x13BitTorrent_"),
            Err(WireError::BadProtocol { at: 11 })
        );
        let mut bytes = sample();
        bytes[19] = b'L';
        assert_eq!(
            decode_handshake_head(&bytes),
            Err(WireError::BadProtocol { at: 19 })
        );
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift::new(1);
        let valid = sample();
        for i in 0..200_000 {
            let input = if i % 2 == 0 {
                rng.bytes_below(100)
            } else {
                rng.mutate(&valid)
            };
            match decode_handshake_head(&input) {
                Ok(Decoded::Done(_, n)) => assert_eq!(n, HANDSHAKE_HEAD_LEN),
                Ok(Decoded::NeedMore(n)) => assert!(n > 0 && input.len() + n <= HANDSHAKE_HEAD_LEN),
                Err(e) => assert!(e.closes_connection()),
            }
        }
    }
}
