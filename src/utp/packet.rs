//! The uTP packet (BEP 29): the 20-byte header, the extension chain after it (selective
//! ACK, type 1, decoded; every other type, e.g. libtorrent's close reason, type 3, is
//! skipped by its length), then the payload. Also the 16-bit wrapping sequence-number
//! arithmetic the connection uses.
//!
//! `decode` borrows the datagram and never panics on any input; `Header::encode` writes
//! the 20 bytes into a caller's array.

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 20;

/// Largest selective-ACK bitmask we send, in bytes (224 packets past `ack_nr + 1`). A
/// 1400-byte payload + 20-byte header + 2+28 bytes of SACK + IPv6 (40) + UDP (8) is 1498
/// bytes: a full packet with a SACK still fits a 1500-byte MTU. The mask is a multiple of
/// 4 bytes as BEP 29 requires.
pub const SACK_BYTES_MAX: usize = 28;

/// Header plus the one extension we send (SACK: 2 bytes of extension header + mask).
pub const HEADER_BYTES_MAX: usize = HEADER_LEN + 2 + SACK_BYTES_MAX;

const VERSION: u8 = 1;
const EXT_NONE: u8 = 0;
const EXT_SACK: u8 = 1;

/// `ST_*` of BEP 29, in wire order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    Data,
    Fin,
    State,
    Reset,
    Syn,
}

impl PacketType {
    pub fn to_wire(self) -> u8 {
        match self {
            PacketType::Data => 0,
            PacketType::Fin => 1,
            PacketType::State => 2,
            PacketType::Reset => 3,
            PacketType::Syn => 4,
        }
    }

    pub fn from_wire(v: u8) -> Option<Self> {
        Some(match v {
            0 => PacketType::Data,
            1 => PacketType::Fin,
            2 => PacketType::State,
            3 => PacketType::Reset,
            4 => PacketType::Syn,
            _ => return None,
        })
    }
}

/// The fixed 20-byte header (version 1; the first-extension byte is derived when encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ty: PacketType,
    pub connection_id: u16,
    pub timestamp_us: u32,
    pub timestamp_diff_us: u32,
    pub wnd_size: u32,
    pub seq_nr: u16,
    pub ack_nr: u16,
}

impl Header {
    /// Writes the header into `out[..20]`; `first_extension` is 0 or 1 (SACK follows).
    pub fn encode(&self, first_extension: u8, out: &mut [u8]) {
        out[0] = (self.ty.to_wire() << 4) | VERSION;
        out[1] = first_extension;
        out[2..4].copy_from_slice(&self.connection_id.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp_us.to_be_bytes());
        out[8..12].copy_from_slice(&self.timestamp_diff_us.to_be_bytes());
        out[12..16].copy_from_slice(&self.wnd_size.to_be_bytes());
        out[16..18].copy_from_slice(&self.seq_nr.to_be_bytes());
        out[18..20].copy_from_slice(&self.ack_nr.to_be_bytes());
    }
}

/// One decoded datagram; slices borrow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: Header,
    /// The first selective-ACK bitmask (bit 0 of byte 0 is `ack_nr + 2`), if any.
    pub sack: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

impl Packet<'_> {
    /// Bytes this packet took on the wire, not counting unknown extensions (a lower
    /// bound: what anti-amplification may count as received).
    pub fn wire_len_min(&self) -> usize {
        HEADER_LEN + self.sack.map_or(0, |s| 2 + s.len()) + self.payload.len()
    }
}

/// A datagram that is not a uTP packet. Nothing is answered to any of these (we cannot
/// trust anything in it); the caller drops the datagram.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PacketError {
    #[error("datagram of {0} bytes is shorter than the 20-byte uTP header")]
    TooShort(usize),
    #[error("uTP version {0} (only 1 exists)")]
    BadVersion(u8),
    #[error("uTP packet type {0} (0..=4 exist)")]
    BadType(u8),
    /// An extension header or its body runs past the end of the datagram.
    #[error("extension chain runs past the datagram at byte {at}")]
    TruncatedExtension { at: usize },
    /// A selective-ACK extension with no mask bytes.
    #[error("empty selective ACK")]
    EmptySack,
}

/// Decodes one datagram.
pub fn decode(datagram: &[u8]) -> Result<Packet<'_>, PacketError> {
    let Some(h) = datagram.get(..HEADER_LEN) else {
        return Err(PacketError::TooShort(datagram.len()));
    };
    if h[0] & 0x0f != VERSION {
        return Err(PacketError::BadVersion(h[0] & 0x0f));
    }
    let ty = PacketType::from_wire(h[0] >> 4).ok_or(PacketError::BadType(h[0] >> 4))?;
    let u16_at = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
    let u32_at = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let header = Header {
        ty,
        connection_id: u16_at(2),
        timestamp_us: u32_at(4),
        timestamp_diff_us: u32_at(8),
        wnd_size: u32_at(12),
        seq_nr: u16_at(16),
        ack_nr: u16_at(18),
    };
    let mut ext = h[1];
    let mut pos = HEADER_LEN;
    let mut sack = None;
    // Each extension takes at least 2 bytes, so the chain ends within the datagram.
    while ext != EXT_NONE {
        let Some(&[next, len]) = datagram.get(pos..pos + 2) else {
            return Err(PacketError::TruncatedExtension { at: pos });
        };
        let body_at = pos + 2;
        let Some(body) = datagram.get(body_at..body_at + len as usize) else {
            return Err(PacketError::TruncatedExtension { at: pos });
        };
        if ext == EXT_SACK && sack.is_none() {
            if body.is_empty() {
                return Err(PacketError::EmptySack);
            }
            sack = Some(body);
        }
        pos = body_at + len as usize;
        ext = next;
    }
    Ok(Packet {
        header,
        sack,
        payload: &datagram[pos..],
    })
}

/// A RESET answering `pkt`, a packet for a connection we do not know (20 bytes).
///
/// The peer matches a RESET by its receive id. For a SYN that is the SYN's own id. For
/// any other packet we assume the peer initiated the connection (on a listening socket
/// that is the only way it can know us), so it receives on the id it sends with minus 1
/// (libtorrent: `recv_id = send_id - 1` for outgoing connections). `ack_nr` names the
/// last packet the peer sent (an ST_STATE's `seq_nr` is its *next* number, so one less:
/// libtorrent ignores a RESET acking a number it has not sent); `seq_nr` is the one
/// after the last the peer had from us, inside libtorrent's reorder window (it drops a
/// RESET whose `seq_nr` is far ahead).
pub fn reset_for(pkt: &Header, out: &mut [u8; 20]) {
    let connection_id = if pkt.ty == PacketType::Syn {
        pkt.connection_id
    } else {
        pkt.connection_id.wrapping_sub(1)
    };
    Header {
        ty: PacketType::Reset,
        connection_id,
        timestamp_us: 0,
        timestamp_diff_us: 0,
        wnd_size: 0,
        seq_nr: pkt.ack_nr.wrapping_add(1),
        ack_nr: if pkt.ty == PacketType::State {
            pkt.seq_nr.wrapping_sub(1)
        } else {
            pkt.seq_nr
        },
    }
    .encode(EXT_NONE, out);
}

/// Writes a selective-ACK extension (`next` = 0, `mask`) at `out[..2 + mask.len()]`.
pub(crate) fn encode_sack(mask: &[u8], out: &mut [u8]) -> usize {
    out[0] = EXT_NONE;
    out[1] = mask.len() as u8;
    out[2..2 + mask.len()].copy_from_slice(mask);
    2 + mask.len()
}

pub(crate) const FIRST_EXT_SACK: u8 = EXT_SACK;

/// `a - b` on the 16-bit sequence circle, as a signed distance: positive when `a` is
/// after `b` (by less than half the circle).
pub fn seq_diff(a: u16, b: u16) -> i16 {
    a.wrapping_sub(b) as i16
}

/// `a` comes before `b` on the sequence circle.
pub fn seq_less(a: u16, b: u16) -> bool {
    seq_diff(a, b) < 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;

    /// A SYN captured from libtorrent 2.0.8 (`connect_peer` to a UDP socket of ours):
    /// type 4 version 1, no extension, `connection_id` = its receive id (0x2116), a
    /// timestamp, `timestamp_difference` 0 (no sample yet), `wnd_size` 0, a random
    /// `seq_nr` (0x6fe9), `ack_nr` 0.
    pub(crate) const LIBTORRENT_SYN: [u8; 20] = [
        0x41, 0x00, 0x21, 0x16, 0xe1, 0x13, 0xc9, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x6f, 0xe9, 0x00, 0x00,
    ];

    /// The header of libtorrent 2.0.8's first DATA after our SYN-ACK (ST_STATE, seq_nr
    /// 4242 = 0x1092): it sends with id + 1 (0x2117), its SYN's number + 1 (0x6fea), acks
    /// 0x1091 = the SYN-ACK's number - 1, and advertises a 1 MiB window. (Its payload was
    /// 505 bytes of an MSE handshake.)
    pub(crate) const LIBTORRENT_FIRST_DATA_HEADER: [u8; 20] = [
        0x01, 0x00, 0x21, 0x17, 0xe1, 0x13, 0xcf, 0xf0, 0xe1, 0x13, 0xc8, 0xc9, 0x00, 0x10, 0x00,
        0x00, 0x6f, 0xea, 0x10, 0x91,
    ];

    #[test]
    fn libtorrent_syn_golden() {
        let p = decode(&LIBTORRENT_SYN).unwrap();
        assert_eq!(
            p.header,
            Header {
                ty: PacketType::Syn,
                connection_id: 0x2116,
                timestamp_us: 0xe113_c903,
                timestamp_diff_us: 0,
                wnd_size: 0,
                seq_nr: 0x6fe9,
                ack_nr: 0,
            }
        );
        assert!(p.sack.is_none() && p.payload.is_empty());
        let mut out = [0u8; 20];
        p.header.encode(0, &mut out);
        assert_eq!(out, LIBTORRENT_SYN);
        let d = decode(&LIBTORRENT_FIRST_DATA_HEADER).unwrap().header;
        assert_eq!(
            (d.ty, d.connection_id, d.seq_nr, d.ack_nr, d.wnd_size),
            (PacketType::Data, 0x2117, 0x6fea, 0x1091, 1 << 20)
        );
    }

    #[test]
    fn reset_answers_to_the_peers_receive_id() {
        let syn = decode(&LIBTORRENT_SYN).unwrap().header;
        let mut out = [0u8; 20];
        reset_for(&syn, &mut out);
        let r = decode(&out).unwrap().header;
        assert_eq!(r.ty, PacketType::Reset);
        assert_eq!(r.connection_id, 0x2116);
        assert_eq!(r.ack_nr, 0x6fe9);
        let data = Header {
            ty: PacketType::Data,
            connection_id: 0x2117,
            seq_nr: 7,
            ack_nr: 0xffff,
            ..syn
        };
        reset_for(&data, &mut out);
        let r = decode(&out).unwrap().header;
        assert_eq!((r.connection_id, r.ack_nr, r.seq_nr), (0x2116, 7, 0));
        let state = Header {
            ty: PacketType::State,
            ..data
        };
        reset_for(&state, &mut out);
        assert_eq!(decode(&out).unwrap().header.ack_nr, 6);
    }

    #[test]
    fn round_trip_with_sack_and_skipped_extensions() {
        let header = Header {
            ty: PacketType::State,
            connection_id: 65535,
            timestamp_us: u32::MAX,
            timestamp_diff_us: 12345,
            wnd_size: 1 << 20,
            seq_nr: 65535,
            ack_nr: 1,
        };
        let mut buf = [0u8; 64];
        header.encode(FIRST_EXT_SACK, &mut buf);
        let n = HEADER_LEN + encode_sack(&[0b101, 0, 0, 0x80], &mut buf[HEADER_LEN..]);
        let mut dgram = buf[..n].to_vec();
        dgram.extend_from_slice(b"payload");
        let p = decode(&dgram).unwrap();
        assert_eq!(p.header, header);
        assert_eq!(p.sack, Some(&[0b101, 0, 0, 0x80][..]));
        assert_eq!(p.payload, b"payload");
        assert_eq!(p.wire_len_min(), dgram.len());

        // libtorrent's close reason (type 3, 4 bytes) before and after a SACK is skipped.
        let mut v = buf[..HEADER_LEN].to_vec();
        v[1] = 3;
        v.extend_from_slice(&[1, 4, 0, 0, 0, 7]); // close reason, next = SACK
        v.extend_from_slice(&[3, 4, 0xff, 0, 0, 0]); // SACK, next = close reason
        v.extend_from_slice(&[0, 4, 0, 0, 0, 9]); // close reason, end
        v.extend_from_slice(b"x");
        let p = decode(&v).unwrap();
        assert_eq!(p.sack, Some(&[0xff, 0, 0, 0][..]));
        assert_eq!(p.payload, b"x");
    }

    #[test]
    fn malformed() {
        assert_eq!(decode(&[]), Err(PacketError::TooShort(0)));
        assert_eq!(decode(&[0x41; 19]), Err(PacketError::TooShort(19)));
        let mut v = LIBTORRENT_SYN.to_vec();
        v[0] = 0x42;
        assert_eq!(decode(&v), Err(PacketError::BadVersion(2)));
        v[0] = 0x51;
        assert_eq!(decode(&v), Err(PacketError::BadType(5)));
        v[0] = 0x21;
        v[1] = 1;
        assert_eq!(decode(&v), Err(PacketError::TruncatedExtension { at: 20 }));
        v.extend_from_slice(&[0, 8, 1, 2, 3]);
        assert_eq!(decode(&v), Err(PacketError::TruncatedExtension { at: 20 }));
        v.truncate(20);
        v.extend_from_slice(&[0, 0]);
        assert_eq!(decode(&v), Err(PacketError::EmptySack));
        // DHT messages share libtorrent's port: a bencoded dict is never a uTP packet.
        assert!(decode(b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe").is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift::new(29);
        let mut valid = LIBTORRENT_SYN.to_vec();
        valid[1] = 1;
        valid.extend_from_slice(&[3, 4, 1, 2, 3, 4, 0, 4, 0, 0, 0, 1, 9, 9]);
        assert!(decode(&valid).is_ok());
        for i in 0..20_000 {
            let input = if i % 2 == 0 {
                rng.bytes_below(80)
            } else {
                rng.mutate(&valid)
            };
            if let Ok(p) = decode(&input) {
                assert!(p.wire_len_min() <= input.len());
            }
        }
    }

    #[test]
    fn sequence_arithmetic_wraps() {
        assert!(seq_less(65535, 0));
        assert!(seq_less(65000, 10));
        assert!(!seq_less(10, 65000));
        assert_eq!(seq_diff(2, 65534), 4);
        assert_eq!(seq_diff(65534, 2), -4);
        assert!(!seq_less(5, 5));
    }
}
