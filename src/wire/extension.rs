//! The BEP 10 extension handshake (extended message id 0): which extension ids a peer
//! uses (`m`), its metadata size, client name, request queue depth, the address it sees
//! us at, its listen port.
//!
//! Decoding is lenient on purpose: unknown keys, unknown `m` entries, known keys with a
//! wrong type or an out-of-range value are ignored (read as absent) instead of closing
//! the connection, like libtorrent does; only a payload that is not a bencoded dict, or is
//! over `EXT_HANDSHAKE_BYTES_MAX`, is an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::bencode::{self, push_bytes, push_int};
use super::frame::EXTENDED_ID;
use super::WireError;
use crate::limits::EXT_HANDSHAKE_BYTES_MAX;

/// Extended message id of the extension handshake itself.
pub const EXT_HANDSHAKE_ID: u8 = 0;

/// The id magnetar asks peers to use for ut_metadata messages they send it, as server and
/// as fetcher (the same as libtorrent's; any 1–255 works, docs/protocol-facts.md §4).
pub const OUR_UT_METADATA_ID: u8 = 2;

/// The id magnetar asks peers to use for ut_pex; offered only while a miss is fetched.
pub const OUR_UT_PEX_ID: u8 = 1;

/// `v` in every extension handshake magnetar sends.
pub const CLIENT_VERSION: &str = concat!("magnetar ", env!("CARGO_PKG_VERSION"));

/// The fields of an extension handshake that magnetar uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtHandshake<'a> {
    /// The peer's id for ut_metadata messages we send it: None if absent from `m`,
    /// Some(0) if the peer disabled it.
    pub ut_metadata: Option<u8>,
    /// Same for ut_pex.
    pub ut_pex: Option<u8>,
    /// `metadata_size`: size of the info dict the peer has. Not capped here: callers
    /// compare it with `limits::METADATA_BYTES_MAX`.
    pub metadata_size: Option<u64>,
    /// `v`: client name and version, raw bytes (usually UTF-8).
    pub client: Option<&'a [u8]>,
    /// `reqq`: how many requests the peer queues.
    pub reqq: Option<u32>,
    /// `yourip`: our address as the peer sees it (4 or 16 raw bytes on the wire).
    pub yourip: Option<IpAddr>,
    /// `p`: the peer's listen port (None for 0, which is not a port one can connect to).
    pub listen_port: Option<u16>,
}

impl<'a> ExtHandshake<'a> {
    /// Decodes the payload after the extended id byte. Bytes after the dict are ignored.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        if payload.len() > EXT_HANDSHAKE_BYTES_MAX {
            return Err(WireError::TooLong {
                what: "extension handshake",
                len: payload.len(),
                max: EXT_HANDSHAKE_BYTES_MAX,
            });
        }
        let (value, _) = bencode::parse_prefix(payload)?;
        let dict = value.as_dict().ok_or(WireError::Malformed {
            what: "extension handshake",
            reason: "not a dict",
        })?;
        let mut hs = ExtHandshake::default();
        for (key, value) in dict {
            let int = value.as_int();
            match key {
                b"m" => {
                    for (name, id) in value.as_dict().into_iter().flatten() {
                        let id = id
                            .as_int()
                            .and_then(|i| i.to_u64())
                            .and_then(|i| u8::try_from(i).ok());
                        match name {
                            b"ut_metadata" => hs.ut_metadata = id.or(hs.ut_metadata),
                            b"ut_pex" => hs.ut_pex = id.or(hs.ut_pex),
                            _ => {}
                        }
                    }
                }
                b"metadata_size" => hs.metadata_size = int.and_then(|i| i.to_u64()),
                b"v" => hs.client = value.as_bytes(),
                b"reqq" => {
                    hs.reqq = int
                        .and_then(|i| i.to_u64())
                        .and_then(|i| u32::try_from(i).ok())
                }
                b"p" => {
                    hs.listen_port = int
                        .and_then(|i| i.to_u64())
                        .and_then(|i| u16::try_from(i).ok())
                        .filter(|&p| p != 0)
                }
                b"yourip" => {
                    hs.yourip = match value.as_bytes() {
                        Some(&[a, b, c, d]) => Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
                        Some(b) if b.len() == 16 => {
                            let mut octets = [0u8; 16];
                            octets.copy_from_slice(b);
                            Some(IpAddr::V6(Ipv6Addr::from(octets)))
                        }
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        Ok(hs)
    }

    /// Appends the whole frame: length, id 20, extended id 0, and the dict with sorted
    /// keys: `m` (always present, with `ut_metadata` / `ut_pex` when Some), then
    /// `metadata_size`, `p`, `reqq`, `v`, `yourip` when Some. A later handshake must
    /// repeat the full `m` (docs/protocol-facts.md §5), so callers always pass all of it.
    pub fn encode(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, EXTENDED_ID, EXT_HANDSHAKE_ID]);
        out.extend_from_slice(b"d1:md");
        if let Some(id) = self.ut_metadata {
            out.extend_from_slice(b"11:ut_metadata");
            push_int(out, id.into());
        }
        if let Some(id) = self.ut_pex {
            out.extend_from_slice(b"6:ut_pex");
            push_int(out, id.into());
        }
        out.push(b'e');
        if let Some(size) = self.metadata_size {
            out.extend_from_slice(b"13:metadata_size");
            push_int(out, size);
        }
        if let Some(port) = self.listen_port {
            out.extend_from_slice(b"1:p");
            push_int(out, port.into());
        }
        if let Some(reqq) = self.reqq {
            out.extend_from_slice(b"4:reqq");
            push_int(out, reqq.into());
        }
        if let Some(client) = self.client {
            out.extend_from_slice(b"1:v");
            push_bytes(out, client);
        }
        match self.yourip {
            Some(IpAddr::V4(ip)) => {
                out.extend_from_slice(b"6:yourip");
                push_bytes(out, &ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                out.extend_from_slice(b"6:yourip");
                push_bytes(out, &ip.octets());
            }
            None => {}
        }
        out.push(b'e');
        let written = out.len() - start;
        let len = (written - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;
    use crate::wire::{decode_frame, Decoded, Frame};

    fn full() -> ExtHandshake<'static> {
        ExtHandshake {
            ut_metadata: Some(3),
            ut_pex: Some(1),
            metadata_size: Some(20_000),
            client: Some(b"magnetar 0.1.0"),
            reqq: Some(250),
            yourip: Some("127.0.0.1".parse().unwrap()),
            listen_port: Some(6881),
        }
    }

    fn payload_of(frame: &[u8]) -> &[u8] {
        match decode_frame(frame) {
            Ok(Decoded::Done(Frame::Extended { id: 0, payload }, n)) => {
                assert_eq!(n, frame.len());
                payload
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encodes_sorted_keys() {
        let mut out = Vec::new();
        let n = full().encode(&mut out);
        assert_eq!(n, out.len());
        assert_eq!(
            payload_of(&out),
            &b"d1:md11:ut_metadatai3e6:ut_pexi1ee13:metadata_sizei20000e1:pi6881e\
               4:reqqi250e1:v14:magnetar 0.1.06:yourip4:\x7f\0\0\x01e"[..]
        );
        let mut out = Vec::new();
        ExtHandshake::default().encode(&mut out);
        assert_eq!(payload_of(&out), b"d1:mdee");
    }

    #[test]
    fn round_trips() {
        let v6 = ExtHandshake {
            yourip: Some("2001:db8::1".parse().unwrap()),
            ut_pex: None,
            ..full()
        };
        let disabled = ExtHandshake {
            ut_metadata: Some(0),
            ..Default::default()
        };
        for hs in [full(), v6, disabled, ExtHandshake::default()] {
            let mut out = vec![1, 2, 3];
            hs.encode(&mut out);
            assert_eq!(ExtHandshake::decode(payload_of(&out[3..])), Ok(hs));
        }
    }

    #[test]
    fn any_ext_id_works() {
        for id in [1u8, 2, 3, 42, 255] {
            let hs = ExtHandshake {
                ut_metadata: Some(id),
                ut_pex: Some(id),
                ..Default::default()
            };
            let mut out = Vec::new();
            hs.encode(&mut out);
            let got = ExtHandshake::decode(payload_of(&out)).unwrap();
            assert_eq!((got.ut_metadata, got.ut_pex), (Some(id), Some(id)));
        }
    }

    #[test]
    fn tolerates_odd_fields() {
        let hs = ExtHandshake::decode(
            b"d1:md11:ut_metadatai256e6:ut_pexi-1e6:lt_fooi5ee\
              13:metadata_sizei-5e1:pi70000e4:reqq3:abc6:yourip3:abc1:v2:xx5:extrali1eee",
        )
        .unwrap();
        assert_eq!(
            hs,
            ExtHandshake {
                client: Some(b"xx"),
                ..Default::default()
            }
        );
        // Unsorted keys, m not a dict, port 0, 16-byte yourip.
        let hs = ExtHandshake::decode(
            b"d1:pi0e1:mi5e6:yourip16:\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x0113:metadata_sizei1ee",
        )
        .unwrap();
        assert_eq!(hs.listen_port, None);
        assert_eq!(hs.ut_metadata, None);
        assert_eq!(hs.yourip, Some("::1".parse().unwrap()));
        assert_eq!(hs.metadata_size, Some(1));
    }

    #[test]
    fn rejects_non_dicts_bombs_and_oversize() {
        for bad in [&b""[..], b"le", b"i1e", b"d1:m", b"d1:md11:ut_metadatai3e"] {
            let e = ExtHandshake::decode(bad).unwrap_err();
            assert!(e.closes_connection(), "{bad:?}");
        }
        let mut deep = b"d1:m".to_vec();
        deep.extend(vec![b'l'; 10_000]);
        assert!(matches!(
            ExtHandshake::decode(&deep),
            Err(WireError::Bencode(
                crate::wire::BencodeError::TooDeep { .. }
            ))
        ));
        let mut big = b"d1:v".to_vec();
        big.extend(format!("{}:", EXT_HANDSHAKE_BYTES_MAX).as_bytes());
        big.extend(vec![b'x'; EXT_HANDSHAKE_BYTES_MAX]);
        big.push(b'e');
        assert!(matches!(
            ExtHandshake::decode(&big),
            Err(WireError::TooLong { .. })
        ));
        assert!(ExtHandshake::decode(b"d1:v4294967295:xe").is_err());
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift::new(0xe10);
        let mut valid = Vec::new();
        full().encode(&mut valid);
        let valid = &valid[6..];
        for i in 0..100_000 {
            let input = if i % 2 == 0 {
                rng.bytes_below(300)
            } else {
                rng.mutate(valid)
            };
            if let Err(e) = ExtHandshake::decode(&input) {
                assert!(e.closes_connection());
            }
        }
    }
}
