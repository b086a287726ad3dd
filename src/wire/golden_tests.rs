//! Bytes captured from libtorrent 2.0.8 by `tests/interop/capture_golden.py` (see
//! `tests/golden/README.md`), decoded with this codec: pins the wire format to a real
//! client.

use std::net::IpAddr;

use super::*;

const V1_HASH: &str = "c8295ce630f2064f08440db1534e37da6b4eabc7";
const V2_HASH: &str = "8c7bd5ac8a5a6aa8b7e0e3ad1b2ac0f1be0e3b5f2b4a6e3e1d0c9b8a79685746";
/// The ut_metadata id the capture server announced; libtorrent must use it.
const SERVER_UT_METADATA: u8 = 3;

struct Capture {
    handshake: &'static [u8],
    ext_handshake: &'static [u8],
    metadata_request: &'static [u8],
    stream: &'static [u8],
}

macro_rules! capture {
    ($prefix:literal) => {
        Capture {
            handshake: include_bytes!(concat!("../../tests/golden/", $prefix, "_handshake.bin")),
            ext_handshake: include_bytes!(concat!(
                "../../tests/golden/",
                $prefix,
                "_ext_handshake.bin"
            )),
            metadata_request: include_bytes!(concat!(
                "../../tests/golden/",
                $prefix,
                "_metadata_request.bin"
            )),
            stream: include_bytes!(concat!("../../tests/golden/", $prefix, "_stream.bin")),
        }
    };
}

const V1: Capture = capture!("libtorrent");
const V2: Capture = capture!("libtorrent_v2");
const HYBRID: Capture = capture!("libtorrent_hybrid");

fn hash20(hex_str: &str) -> [u8; 20] {
    let bytes = hex::decode(hex_str).unwrap();
    bytes[..20].try_into().unwrap()
}

fn head(c: &Capture) -> HandshakeHead {
    assert_eq!(c.handshake.len(), HANDSHAKE_LEN);
    let Ok(Decoded::Done(head, HANDSHAKE_HEAD_LEN)) = decode_handshake_head(c.handshake) else {
        panic!("libtorrent handshake did not decode")
    };
    let Decoded::Done(peer_id, 20) = decode_peer_id(&c.handshake[HANDSHAKE_HEAD_LEN..]) else {
        panic!()
    };
    assert!(peer_id.starts_with(b"-LT2080-"), "{peer_id:?}");
    head
}

#[test]
fn v1_handshake_sets_extension_fast_and_dht_bits() {
    let h = head(&V1);
    assert_eq!(h.info_hash, hash20(V1_HASH));
    // DHT is disabled in the capture session, yet libtorrent still sets the DHT bit.
    assert_eq!(h.reserved.0, [0, 0, 0, 0, 0, 0x10, 0, 0x05]);
    assert!(h.reserved.extension_protocol() && h.reserved.fast() && h.reserved.dht());
    assert!(!h.reserved.v2_upgrade());
}

#[test]
fn v2_only_handshake_sends_truncated_sha256_without_upgrade_bit() {
    let h = head(&V2);
    assert_eq!(h.info_hash, hash20(V2_HASH));
    assert!(!h.reserved.v2_upgrade());
    assert_eq!(h.reserved, Reserved::ours(true, true, false));
}

#[test]
fn hybrid_handshake_sends_v1_hash_with_upgrade_bit() {
    let h = head(&HYBRID);
    assert_eq!(h.info_hash, hash20(V1_HASH));
    assert!(h.reserved.v2_upgrade());
    assert_eq!(h.reserved, Reserved::ours(true, true, true));
}

#[test]
fn ext_handshake_fields() {
    for c in [&V1, &V2, &HYBRID] {
        let Ok(Decoded::Done(Frame::Extended { id: 0, payload }, n)) =
            decode_frame(c.ext_handshake)
        else {
            panic!("not an extension handshake")
        };
        assert_eq!(n, c.ext_handshake.len());
        let hs = ExtHandshake::decode(payload).unwrap();
        assert_eq!(hs.ut_metadata, Some(2));
        assert_eq!(hs.ut_pex, Some(1));
        assert_eq!(hs.metadata_size, None, "libtorrent has no metadata yet");
        assert!(hs.client.unwrap().starts_with(b"libtorrent/2.0.8"));
        assert_eq!(hs.reqq, Some(2000));
        assert_eq!(hs.yourip, Some(IpAddr::from([127, 0, 0, 1])));
        // libtorrent sends its listen port even on a connection it opened.
        assert!(hs.listen_port.is_some());
    }
}

#[test]
fn metadata_requests_pipeline_all_pieces_with_our_id() {
    // The server announced metadata_size 20000: two pieces, both requested at once.
    for c in [&V1, &V2, &HYBRID] {
        let mut rest = c.metadata_request;
        for expected_piece in 0..2u32 {
            let Ok(Decoded::Done(Frame::Extended { id, payload }, n)) = decode_frame(rest) else {
                panic!("not an extended frame")
            };
            assert_eq!(id, SERVER_UT_METADATA);
            assert_eq!(
                decode_metadata(payload),
                Ok((
                    MetadataMsg::Request {
                        piece: expected_piece
                    },
                    &[][..]
                ))
            );
            // Our encoder writes the same bytes.
            let mut ours = Vec::new();
            encode_metadata_request(&mut ours, SERVER_UT_METADATA, expected_piece);
            assert_eq!(&ours[..], &rest[..n]);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
    }
}

#[test]
fn stream_is_ext_handshake_then_requests_only() {
    // Without metadata libtorrent sends no bitfield / HaveNone, even with Fast on both sides.
    for c in [&V1, &V2, &HYBRID] {
        let mut rest = c.stream;
        let mut ext_ids = Vec::new();
        while !rest.is_empty() {
            let Ok(Decoded::Done(frame, n)) = decode_frame(rest) else {
                panic!()
            };
            let Frame::Extended { id, .. } = frame else {
                panic!("unexpected {frame:?}")
            };
            ext_ids.push(id);
            rest = &rest[n..];
        }
        assert_eq!(ext_ids, [0, SERVER_UT_METADATA, SERVER_UT_METADATA]);
    }
}

#[test]
fn every_prefix_of_the_captured_stream_needs_more() {
    for c in [&V1, &V2, &HYBRID] {
        for n in 0..c.handshake.len().min(HANDSHAKE_HEAD_LEN) {
            assert!(matches!(
                decode_handshake_head(&c.handshake[..n]),
                Ok(Decoded::NeedMore(_))
            ));
        }
        let Ok(Decoded::Done(_, first)) = decode_frame(c.stream) else {
            panic!()
        };
        for n in 0..first {
            assert!(matches!(
                decode_frame(&c.stream[..n]),
                Ok(Decoded::NeedMore(_))
            ));
        }
    }
}
