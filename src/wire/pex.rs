//! BEP 11 ut_pex: peers a connected client tells us about, as compact addresses
//! (`added`: 6 bytes IPv4 + port, `added6`: 18 bytes IPv6 + port; `dropped`, `dropped6`
//! likewise), a source of peers on the metadata miss path (docs/architecture.md "Request path (miss)").
//!
//! Decoding keeps borrowed slices and hands out iterators: nothing is allocated per
//! message. A compact string whose length is not a multiple of the entry size has its
//! partial tail ignored; entries with port 0 are skipped (nobody listens there).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::bencode;
use super::WireError;
use crate::limits::UT_PEX_BYTES_MAX;

/// BEP 11 flag bits of `added.f` / `added6.f`.
pub const PEX_FLAG_ENCRYPTION: u8 = 0x01;
pub const PEX_FLAG_SEED: u8 = 0x02;
pub const PEX_FLAG_UTP: u8 = 0x04;
pub const PEX_FLAG_HOLEPUNCH: u8 = 0x08;
pub const PEX_FLAG_REACHABLE: u8 = 0x10;

/// A decoded ut_pex message (the raw compact strings; iterate with the methods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pex<'a> {
    pub added: &'a [u8],
    pub added_flags: &'a [u8],
    pub added6: &'a [u8],
    pub added6_flags: &'a [u8],
    pub dropped: &'a [u8],
    pub dropped6: &'a [u8],
}

impl<'a> Pex<'a> {
    /// Decodes the payload after the extended id byte. Keys of the wrong type are read as
    /// absent; only a payload that is not a bencoded dict or is over `UT_PEX_BYTES_MAX`
    /// is an error.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        if payload.len() > UT_PEX_BYTES_MAX {
            return Err(WireError::TooLong {
                what: "ut_pex message",
                len: payload.len(),
                max: UT_PEX_BYTES_MAX,
            });
        }
        let (value, _) = bencode::parse_prefix(payload)?;
        let dict = value.as_dict().ok_or(WireError::Malformed {
            what: "ut_pex message",
            reason: "not a dict",
        })?;
        let mut pex = Pex::default();
        for (key, value) in dict {
            let Some(bytes) = value.as_bytes() else {
                continue;
            };
            match key {
                b"added" => pex.added = bytes,
                b"added.f" => pex.added_flags = bytes,
                b"added6" => pex.added6 = bytes,
                b"added6.f" => pex.added6_flags = bytes,
                b"dropped" => pex.dropped = bytes,
                b"dropped6" => pex.dropped6 = bytes,
                _ => {}
            }
        }
        Ok(pex)
    }

    /// Added peers, IPv4 then IPv6, with their BEP 11 flags (0 where none were sent).
    pub fn added(&self) -> impl Iterator<Item = (SocketAddr, u8)> + 'a {
        let flags4 = self.added_flags;
        let flags6 = self.added6_flags;
        let v4 = compact_v4(self.added)
            .enumerate()
            .map(move |(i, a)| (a, flags4.get(i).copied().unwrap_or(0)));
        let v6 = compact_v6(self.added6)
            .enumerate()
            .map(move |(i, a)| (a, flags6.get(i).copied().unwrap_or(0)));
        v4.chain(v6).filter(|(a, _)| a.port() != 0)
    }

    /// Dropped peers, IPv4 then IPv6.
    pub fn dropped(&self) -> impl Iterator<Item = SocketAddr> + 'a {
        compact_v4(self.dropped)
            .chain(compact_v6(self.dropped6))
            .filter(|a| a.port() != 0)
    }
}

fn compact_v4(bytes: &[u8]) -> impl Iterator<Item = SocketAddr> + '_ {
    bytes.chunks_exact(6).map(|c| {
        let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
        SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]])))
    })
}

fn compact_v6(bytes: &[u8]) -> impl Iterator<Item = SocketAddr> + '_ {
    bytes.chunks_exact(18).map(|c| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&c[..16]);
        let port = u16::from_be_bytes([c[16], c[17]]);
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::bencode::push_bytes;
    use crate::wire::test_rng::XorShift;

    fn message() -> Vec<u8> {
        let mut out = b"d5:added".to_vec();
        push_bytes(
            &mut out,
            b"\x7f\0\0\x01\x1a\xe1\x0a\0\0\x02\0\0\x0a\0\0\x03\x1a\xe2\xff",
        );
        out.extend_from_slice(b"7:added.f");
        push_bytes(&mut out, b"\x02");
        out.extend_from_slice(b"6:added6");
        let mut v6 = [0u8; 18];
        v6[15] = 1;
        v6[16..].copy_from_slice(&6881u16.to_be_bytes());
        push_bytes(&mut out, &v6);
        out.extend_from_slice(b"7:dropped");
        push_bytes(&mut out, b"\x01\x02\x03\x04\x00\x50");
        out.extend_from_slice(b"1:xi1ee");
        out
    }

    #[test]
    fn decodes_compact_peers() {
        let msg = message();
        let pex = Pex::decode(&msg).unwrap();
        let added: Vec<_> = pex.added().collect();
        assert_eq!(
            added,
            vec![
                ("127.0.0.1:6881".parse().unwrap(), PEX_FLAG_SEED),
                // 10.0.0.2:0 skipped, partial tail ignored
                ("10.0.0.3:6882".parse().unwrap(), 0),
                ("[::1]:6881".parse().unwrap(), 0),
            ]
        );
        let dropped: Vec<_> = pex.dropped().collect();
        assert_eq!(dropped, vec!["1.2.3.4:80".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn rejects_garbage_and_oversize() {
        assert!(Pex::decode(b"").is_err());
        assert!(Pex::decode(b"li1ee").is_err());
        let mut big = b"d5:added".to_vec();
        push_bytes(&mut big, &vec![1u8; UT_PEX_BYTES_MAX]);
        big.push(b'e');
        assert!(matches!(Pex::decode(&big), Err(WireError::TooLong { .. })));
        assert_eq!(Pex::decode(b"d5:addedi5ee"), Ok(Pex::default()));
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift::new(0x11);
        let valid = message();
        for i in 0..100_000 {
            let input = if i % 2 == 0 {
                rng.bytes_below(300)
            } else {
                rng.mutate(&valid)
            };
            if let Ok(pex) = Pex::decode(&input) {
                assert!(pex.added().count() <= input.len() / 6);
                assert!(pex.dropped().count() <= input.len() / 6);
            }
        }
    }
}
