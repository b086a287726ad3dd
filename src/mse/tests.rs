//! Initiator <-> responder round trips, hostile peers, random input, and a golden handshake
//! computed independently (python3: `pow`, `hashlib.sha1` and a textbook RC4; the script is
//! in `golden_vectors_match_an_independent_computation`).

use super::*;
use crate::limits::{MSE_IA_BYTES_MAX, MSE_REQ1_SYNC_BYTES_MAX, MSE_VC_SYNC_BYTES_MAX};
use crate::wire::test_rng::XorShift;

const KEY: [u8; 20] = [0xab; 20];

fn handshake_ia(key: &[u8; 20]) -> Vec<u8> {
    let mut v = vec![19];
    v.extend_from_slice(b"BitTorrent protocol");
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(key);
    v.extend_from_slice(b"-MG0001-abcdefghijkl");
    v
}

fn lookup_of(keys: Vec<[u8; 20]>) -> impl FnMut(&[u8; 20]) -> Option<[u8; 20]> {
    move |req2| keys.iter().find(|k| req2_hash(k) == *req2).copied()
}

struct Outcome {
    a_crypto: Crypto,
    b_crypto: Crypto,
    info_hash: [u8; 20],
    initial_payload: Vec<u8>,
    /// What each side read as the other's stream after the handshake.
    a_got: Vec<u8>,
    b_got: Vec<u8>,
}

const A_STREAM: &[u8] = b"stream bytes from the initiator";
const B_STREAM: &[u8] = b"\x13BitTorrent protocol: the responder's stream";

/// Runs a full handshake, delivering at most `chunk` bytes per read each way. Each side
/// sends stream bytes right after its `Done` (B's arrive in the same read as step 4 when
/// `chunk` is large), and must read the other's back.
fn run(
    a_policy: CryptoPolicy,
    b_policy: CryptoPolicy,
    pads: (usize, usize),
    chunk: usize,
    known: Vec<[u8; 20]>,
) -> Result<Outcome, MseError> {
    let mut a = Initiator::new(&[7; 32], pads.0, KEY, a_policy);
    let mut b = Responder::new(&[9; 32], pads.1, b_policy);
    let mut lookup = lookup_of(known);
    let ia = handshake_ia(&KEY);
    let (mut a_to_b, mut b_to_a) = (Vec::new(), Vec::new());
    a.opening(&mut a_to_b);
    let (mut a_in, mut b_in) = (Vec::new(), Vec::new());
    let (mut a_done, mut b_done): (Option<(Crypto, Option<Rc4Pair>)>, _) = (None, None);
    let mut info = None;
    for _ in 0..100_000 {
        if a_done.is_some() && b_done.is_some() && a_to_b.is_empty() && b_to_a.is_empty() {
            break;
        }
        // A -> B
        let n = chunk.min(a_to_b.len());
        let mut fresh: Vec<u8> = a_to_b.drain(..n).collect();
        match &mut b_done {
            None => {
                b_in.append(&mut fresh);
                let mut out = Vec::new();
                match b.on_bytes(&b_in, &mut out, &mut lookup)? {
                    ResponderStep::NeedMore { consumed } => {
                        b_in.drain(..consumed);
                    }
                    ResponderStep::Done {
                        consumed,
                        info_hash,
                        crypto,
                        mut cipher,
                        initial_payload,
                    } => {
                        b_in.drain(..consumed);
                        info = Some((info_hash, initial_payload));
                        match &mut cipher {
                            Some(c) => c.encrypt_into(B_STREAM, &mut out),
                            None => out.extend_from_slice(B_STREAM),
                        }
                        b_done = Some((crypto, cipher));
                    }
                }
                b_to_a.extend_from_slice(&out);
            }
            Some(_) => b_in.append(&mut fresh),
        }
        // B -> A
        let n = chunk.min(b_to_a.len());
        let mut fresh: Vec<u8> = b_to_a.drain(..n).collect();
        match &mut a_done {
            None => {
                a_in.append(&mut fresh);
                let mut out = Vec::new();
                match a.on_bytes(&a_in, &mut out, &ia)? {
                    InitiatorStep::NeedMore { consumed } => {
                        a_in.drain(..consumed);
                    }
                    InitiatorStep::Done {
                        consumed,
                        crypto,
                        mut cipher,
                    } => {
                        a_in.drain(..consumed);
                        match &mut cipher {
                            Some(c) => c.encrypt_into(A_STREAM, &mut out),
                            None => out.extend_from_slice(A_STREAM),
                        }
                        a_done = Some((crypto, cipher));
                    }
                }
                a_to_b.extend_from_slice(&out);
            }
            Some(_) => a_in.append(&mut fresh),
        }
    }
    let (a_crypto, mut a_cipher) = a_done.expect("initiator done");
    let (b_crypto, mut b_cipher) = b_done.expect("responder done");
    if let Some(c) = &mut a_cipher {
        c.decrypt_in_place(&mut a_in);
    }
    if let Some(c) = &mut b_cipher {
        c.decrypt_in_place(&mut b_in);
    }
    let (info_hash, initial_payload) = info.unwrap();
    Ok(Outcome {
        a_crypto,
        b_crypto,
        info_hash,
        initial_payload,
        a_got: a_in,
        b_got: b_in,
    })
}

#[test]
fn round_trips_every_policy_chunking_and_padding() {
    use CryptoPolicy::*;
    let cases = [
        (PreferPlaintext, PreferPlaintext, Crypto::Plaintext),
        (PreferPlaintext, Rc4Only, Crypto::Rc4),
        (Rc4Only, PreferPlaintext, Crypto::Rc4),
        (Rc4Only, Rc4Only, Crypto::Rc4),
    ];
    for (a_policy, b_policy, expect) in cases {
        for pads in [(0, 0), (512, 512), (0, 512), (512, 0), (17, 300)] {
            for chunk in [1, 7, 95, 97, 1 << 20] {
                let o = run(a_policy, b_policy, pads, chunk, vec![[1; 20], KEY]).unwrap();
                assert_eq!((o.a_crypto, o.b_crypto), (expect, expect));
                assert_eq!(o.info_hash, KEY);
                assert_eq!(o.initial_payload, handshake_ia(&KEY));
                assert_eq!(
                    o.a_got, B_STREAM,
                    "{a_policy:?} {b_policy:?} {pads:?} {chunk}"
                );
                assert_eq!(
                    o.b_got, A_STREAM,
                    "{a_policy:?} {b_policy:?} {pads:?} {chunk}"
                );
            }
        }
    }
}

#[test]
fn unknown_info_hash_is_its_own_error() {
    let e = run(
        CryptoPolicy::PreferPlaintext,
        CryptoPolicy::PreferPlaintext,
        (10, 10),
        1 << 20,
        vec![[1; 20]],
    )
    .err()
    .unwrap();
    assert_eq!(e, MseError::UnknownInfoHash);
    assert!(e.is_unknown_info_hash());
    assert!(!MseError::BadVc.is_unknown_info_hash());
}

#[test]
fn plaintext_detection() {
    let hs = handshake_ia(&KEY);
    for n in 1..=20 {
        assert!(is_plaintext_handshake(&hs[..n]), "{n}");
    }
    assert!(!is_plaintext_handshake(&[]));
    assert!(!is_plaintext_handshake(b"\x14BitTorrent protocol"));
    assert!(!is_plaintext_handshake(b"\x13BitTorrent_"));
    let mut ya = Vec::new();
    Initiator::new(&[3; 32], 0, KEY, CryptoPolicy::PreferPlaintext).opening(&mut ya);
    assert!(
        !is_plaintext_handshake(&ya[..20]),
        "a DH key is not a handshake"
    );
}

/// A's bytes up to and including step 3, built by hand so they can be corrupted.
struct Manual {
    s: [u8; 96],
}

impl Manual {
    /// Feeds Ya to `b`, returns B's answer and the shared secret (from A's view).
    fn start(b: &mut Responder, lookup: &mut dyn FnMut(&[u8; 20]) -> Option<[u8; 20]>) -> Self {
        let a = dh::KeyPair::new(&[5; 32]);
        let mut out = Vec::new();
        let step = b.on_bytes(&a.public, &mut out, lookup).unwrap();
        assert!(matches!(step, ResponderStep::NeedMore { consumed: 96 }));
        let s = a.shared_secret(&out[..96]).unwrap();
        Manual { s }
    }

    fn req1(&self) -> [u8; 20] {
        sha1_of(&[b"req1", &self.s])
    }

    fn req2x3(&self, key: &[u8; 20]) -> Vec<u8> {
        let r2 = req2_hash(key);
        let r3 = sha1_of(&[b"req3", &self.s]);
        r2.iter().zip(r3.iter()).map(|(a, b)| a ^ b).collect()
    }

    /// ENCRYPT(vc, provide, len(PadC), PadC, len(IA), IA) with A's key.
    fn encrypted(&self, vc: [u8; 8], provide: u32, pad_c: usize, ia_len: u16) -> Vec<u8> {
        let mut v = vc.to_vec();
        v.extend_from_slice(&provide.to_be_bytes());
        v.extend_from_slice(&(pad_c as u16).to_be_bytes());
        v.resize(v.len() + pad_c.min(600), 0x55);
        v.extend_from_slice(&ia_len.to_be_bytes());
        v.resize(v.len() + ia_len as usize, 0x66);
        rc4_for(b"keyA", &self.s, &KEY).apply_keystream(&mut v);
        v
    }
}

fn responder_error(build: impl Fn(&Manual) -> Vec<u8>, policy: CryptoPolicy) -> MseError {
    let mut b = Responder::new(&[9; 32], 0, policy);
    let mut lookup = lookup_of(vec![KEY]);
    let m = Manual::start(&mut b, &mut lookup);
    let bytes = build(&m);
    let mut out = Vec::new();
    match b.on_bytes(&bytes, &mut out, &mut lookup) {
        Err(e) => {
            // Finished for good.
            assert_eq!(
                b.on_bytes(&bytes, &mut out, &mut lookup).err(),
                Some(MseError::Finished)
            );
            e
        }
        Ok(s) => panic!("no error: {s:?}"),
    }
}

#[test]
fn hostile_initiators() {
    let pp = CryptoPolicy::PreferPlaintext;
    let good = |m: &Manual| {
        let mut v = m.req1().to_vec();
        v.extend(m.req2x3(&KEY));
        v.extend(m.encrypted(VC, 3, 0, 68));
        v
    };
    // The good one finishes.
    {
        let mut b = Responder::new(&[9; 32], 0, pp);
        let mut lookup = lookup_of(vec![KEY]);
        let m = Manual::start(&mut b, &mut lookup);
        let step = b.on_bytes(&good(&m), &mut Vec::new(), &mut lookup).unwrap();
        assert!(matches!(step, ResponderStep::Done { .. }));
    }
    // req1 never found within the window.
    let e = responder_error(|_| vec![0x42; MSE_REQ1_SYNC_BYTES_MAX], pp);
    assert_eq!(e.reason(), "sync_not_found");
    // req1 just past the window (PadA of 513).
    let e = responder_error(
        |m| {
            let mut v = vec![0x42; 513];
            v.extend(m.req1());
            v
        },
        pp,
    );
    assert_eq!(e.reason(), "sync_not_found");
    // Wrong req2: a torrent we do not hold.
    let e = responder_error(
        |m| {
            let mut v = m.req1().to_vec();
            v.extend(m.req2x3(&[0xcd; 20]));
            v
        },
        pp,
    );
    assert_eq!(e, MseError::UnknownInfoHash);
    // Bad VC.
    let e = responder_error(
        |m| {
            let mut v = m.req1().to_vec();
            v.extend(m.req2x3(&KEY));
            v.extend(m.encrypted([0, 0, 0, 0, 0, 0, 0, 1], 3, 0, 68));
            v
        },
        pp,
    );
    assert_eq!(e, MseError::BadVc);
    // PadC past the cap.
    let e = responder_error(
        |m| {
            let mut v = m.req1().to_vec();
            v.extend(m.req2x3(&KEY));
            v.extend(m.encrypted(VC, 3, 513, 68));
            v
        },
        pp,
    );
    assert_eq!(e.reason(), "pad_too_long");
    // IA past the cap.
    let e = responder_error(
        |m| {
            let mut v = m.req1().to_vec();
            v.extend(m.req2x3(&KEY));
            v.extend(m.encrypted(VC, 3, 0, (MSE_IA_BYTES_MAX + 1) as u16));
            v
        },
        pp,
    );
    assert_eq!(e.reason(), "ia_too_long");
    // crypto_provide offers nothing we accept: nothing at all, unknown bits, or plaintext
    // to an RC4-only responder.
    for (provide, policy) in [(0, pp), (0xfc, pp), (1, CryptoPolicy::Rc4Only)] {
        let e = responder_error(
            |m| {
                let mut v = m.req1().to_vec();
                v.extend(m.req2x3(&KEY));
                v.extend(m.encrypted(VC, provide, 0, 68));
                v
            },
            policy,
        );
        assert_eq!(e, MseError::CryptoNotOffered { provided: provide });
    }
    // A bad public key.
    let mut b = Responder::new(&[9; 32], 0, pp);
    let e = b.on_bytes(&[0; 96], &mut Vec::new(), &mut |_| None);
    assert_eq!(e.err(), Some(MseError::BadPublicKey));
}

#[test]
fn truncated_handshakes_are_explained() {
    let mut b = Responder::new(&[9; 32], 0, CryptoPolicy::PreferPlaintext);
    let mut out = Vec::new();
    let step = b.on_bytes(&[1; 95], &mut out, &mut |_| None).unwrap();
    assert!(matches!(step, ResponderStep::NeedMore { consumed: 0 }));
    assert!(out.is_empty());
    assert_eq!(b.on_eof(), MseError::Truncated { stage: "Ya" });
    let mut lookup = lookup_of(vec![KEY]);
    let mut b = Responder::new(&[9; 32], 0, CryptoPolicy::PreferPlaintext);
    let m = Manual::start(&mut b, &mut lookup);
    let mut partial = vec![0x11; 100];
    partial.extend_from_slice(&m.req1()[..19]);
    let step = b.on_bytes(&partial, &mut out, &mut lookup).unwrap();
    assert!(matches!(step, ResponderStep::NeedMore { consumed: 0 }));
    assert_eq!(b.on_eof().reason(), "truncated");

    let mut a = Initiator::new(&[3; 32], 0, KEY, CryptoPolicy::PreferPlaintext);
    assert_eq!(a.on_eof(), MseError::Truncated { stage: "Yb" });
    let step = a.on_bytes(&[1; 50], &mut out, b"").unwrap();
    assert!(matches!(step, InitiatorStep::NeedMore { consumed: 0 }));
}

/// B's side built by hand: Yb, then `after` (PadB, ENCRYPT(VC ...)) from B's key.
fn initiator_error(after: impl Fn(&[u8; 96]) -> Vec<u8>, policy: CryptoPolicy) -> MseError {
    let mut a = Initiator::new(&[3; 32], 0, KEY, policy);
    let mut opening = Vec::new();
    a.opening(&mut opening);
    let b = dh::KeyPair::new(&[4; 32]);
    let s = b.shared_secret(&opening[..96]).unwrap();
    let mut bytes = b.public.to_vec();
    bytes.extend(after(&s));
    let mut out = Vec::new();
    match a.on_bytes(&bytes, &mut out, &handshake_ia(&KEY)) {
        Err(e) => e,
        Ok(s) => panic!("no error: {s:?}"),
    }
}

fn b_encrypted(s: &[u8; 96], select: u32, pad_d: usize) -> Vec<u8> {
    let mut v = VC.to_vec();
    v.extend_from_slice(&select.to_be_bytes());
    v.extend_from_slice(&(pad_d as u16).to_be_bytes());
    v.resize(v.len() + pad_d.min(600), 0);
    rc4_for(b"keyB", s, &KEY).apply_keystream(&mut v);
    v
}

#[test]
fn hostile_responders() {
    let pp = CryptoPolicy::PreferPlaintext;
    let e = initiator_error(|_| vec![0x42; MSE_VC_SYNC_BYTES_MAX], pp);
    assert_eq!(e.reason(), "sync_not_found");
    let e = initiator_error(
        |s| {
            let mut v = vec![0x42; 513];
            v.extend(b_encrypted(s, 1, 0));
            v
        },
        pp,
    );
    assert_eq!(e.reason(), "sync_not_found");
    for (select, policy) in [(0, pp), (3, pp), (4, pp), (1, CryptoPolicy::Rc4Only)] {
        let e = initiator_error(|s| b_encrypted(s, select, 0), policy);
        assert_eq!(e, MseError::BadCryptoSelect { selected: select });
    }
    let e = initiator_error(|s| b_encrypted(s, 2, 513), pp);
    assert_eq!(e.reason(), "pad_too_long");
    // PadB of 512 and a PadD of 512 are fine.
    let mut a = Initiator::new(&[3; 32], 0, KEY, pp);
    let mut opening = Vec::new();
    a.opening(&mut opening);
    let b = dh::KeyPair::new(&[4; 32]);
    let s = b.shared_secret(&opening[..96]).unwrap();
    let mut bytes = b.public.to_vec();
    bytes.extend([0x42; 512]);
    bytes.extend(b_encrypted(&s, 2, 512));
    let step = a.on_bytes(&bytes, &mut Vec::new(), b"ia").unwrap();
    assert!(
        matches!(step, InitiatorStep::Done { consumed, crypto: Crypto::Rc4, .. } if consumed == bytes.len())
    );
    // Our own IA over the cap.
    let mut a = Initiator::new(&[3; 32], 0, KEY, pp);
    let e = a.on_bytes(&b.public, &mut Vec::new(), &vec![0; MSE_IA_BYTES_MAX + 1]);
    assert_eq!(e.err().map(|e| e.reason()), Some("ia_too_long"));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift::new(11);
    // A valid A-side transcript to mutate: Ya, PadA, step 3.
    let mut a = Initiator::new(&[7; 32], 30, KEY, CryptoPolicy::PreferPlaintext);
    let mut valid = Vec::new();
    a.opening(&mut valid);
    let mut b = Responder::new(&[9; 32], 0, CryptoPolicy::PreferPlaintext);
    let mut b_out = Vec::new();
    let mut lookup = lookup_of(vec![KEY]);
    b.on_bytes(&valid, &mut b_out, &mut lookup).unwrap();
    a.on_bytes(&b_out, &mut valid, &handshake_ia(&KEY)).unwrap();
    for i in 0..300 {
        let input = if i % 3 == 0 {
            rng.bytes_below(2000)
        } else {
            rng.mutate(&valid)
        };
        let mut b = Responder::new(&[9; 32], 0, CryptoPolicy::PreferPlaintext);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(1 + rng.below(200)) {
            buf.extend_from_slice(piece);
            match b.on_bytes(&buf, &mut out, &mut lookup) {
                Ok(ResponderStep::NeedMore { consumed }) => {
                    assert!(consumed <= buf.len());
                    buf.drain(..consumed);
                }
                Ok(ResponderStep::Done { consumed, .. }) => {
                    assert!(consumed <= buf.len());
                    break;
                }
                Err(_) => break,
            }
        }
        let mut a = Initiator::new(&[7; 32], 0, KEY, CryptoPolicy::PreferPlaintext);
        let mut buf = Vec::new();
        for piece in input.chunks(1 + rng.below(200)) {
            buf.extend_from_slice(piece);
            match a.on_bytes(&buf, &mut out, b"ia") {
                Ok(InitiatorStep::NeedMore { consumed }) => {
                    buf.drain(..consumed);
                }
                Ok(InitiatorStep::Done { .. }) | Err(_) => break,
            }
        }
    }
}

/// Expected values from this python3 script (no code shared with ours):
///
/// ```python
/// import hashlib
/// P = int("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
///         "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A63A362"
///         "10000000000090563", 16)
/// def rc4(key):
///     S = list(range(256)); j = 0
///     for i in range(256):
///         j = (j + S[i] + key[i % len(key)]) & 255; S[i], S[j] = S[j], S[i]
///     i = j = 0
///     while True:
///         i = (i + 1) & 255; j = (j + S[i]) & 255; S[i], S[j] = S[j], S[i]
///         yield S[(S[i] + S[j]) & 255]
/// enc = lambda ks, data: bytes(b ^ next(ks) for b in data)
/// sha = lambda *p: hashlib.sha1(b"".join(p)).digest()
/// xa = bytes(range(1, 33)); xb = bytes(range(101, 133)); skey = bytes(range(200, 220))
/// ya = pow(2, int.from_bytes(xa, 'big'), P).to_bytes(96, 'big')
/// yb = pow(2, int.from_bytes(xb, 'big'), P).to_bytes(96, 'big')
/// s = pow(int.from_bytes(yb, 'big'), int.from_bytes(xa, 'big'), P).to_bytes(96, 'big')
/// ka = rc4(sha(b"keyA", s, skey)); kb = rc4(sha(b"keyB", s, skey))
/// for _ in range(1024): next(ka); next(kb)
/// ia = b"\x13BitTorrent protocol" + bytes(8) + skey + b"-MG0001-abcdefghijkl"
/// step3 = sha(b"req1", s) + bytes(a ^ b for a, b in zip(sha(b"req2", skey), sha(b"req3", s))) \
///     + enc(ka, bytes(8) + (3).to_bytes(4, 'big') + bytes(2) + len(ia).to_bytes(2, 'big') + ia)
/// step4 = enc(kb, bytes(8) + (1).to_bytes(4, 'big') + bytes(2))
/// print(sha(ya).hex(), sha(yb).hex(), sha(s).hex(), step3.hex(), step4.hex())
/// ```
#[test]
fn golden_vectors_match_an_independent_computation() {
    let xa: [u8; 32] = std::array::from_fn(|i| 1 + i as u8);
    let xb: [u8; 32] = std::array::from_fn(|i| 101 + i as u8);
    let skey: [u8; 20] = std::array::from_fn(|i| 200 + i as u8);
    let hex_sha1 = |b: &[u8]| hex::encode(sha1_of(&[b]));

    let mut a = Initiator::new(&xa, 0, skey, CryptoPolicy::PreferPlaintext);
    let mut ya = Vec::new();
    a.opening(&mut ya);
    assert_eq!(hex_sha1(&ya), "a6dd7fda3b243123a6f255d1b849ec39f37d3e26");
    let kb = dh::KeyPair::new(&xb);
    assert_eq!(
        hex_sha1(&kb.public),
        "6b7efe0180df5c21ff3b72794fed5eab649cbb27"
    );
    let s = kb.shared_secret(&ya).unwrap();
    assert_eq!(hex_sha1(&s), "d5448649a83b366d4ebfa799947ddecf2250a388");
    assert_eq!(
        hex::encode(req2_hash(&skey)),
        "5be9e663c6249c5ced743091d427ba5661ab4fcf"
    );

    // Step 3 from our initiator, byte for byte.
    let ia = handshake_ia(&skey);
    let mut step3 = Vec::new();
    let r = a.on_bytes(&kb.public, &mut step3, &ia).unwrap();
    assert!(matches!(r, InitiatorStep::NeedMore { consumed: 96 }));
    assert_eq!(
        hex::encode(&step3),
        "738d9ac29d9d4107075c45936560e4b0d25dffa4802b61f058306d68e578d461467e9033744e329b\
         ac6b010861b1d61d1d443d5fd075e0d1b6af767b65849bcb0afc2990027bc59050e31bc9283b44b4\
         8ad4375d1aa35d0f9541e87dc9a74f654fb3f21df2ec5671048051473021112f92bc0189eead6fbf\
         bbdba01b"
    );

    // Step 4 from our responder (PadB 0), given the same Ya and step 3.
    let mut b = Responder::new(&xb, 0, CryptoPolicy::PreferPlaintext);
    let mut out = Vec::new();
    let mut input = ya.clone();
    input.extend_from_slice(&step3);
    let r = b
        .on_bytes(&input, &mut out, &mut lookup_of(vec![skey]))
        .unwrap();
    let ResponderStep::Done {
        consumed,
        info_hash,
        crypto,
        cipher,
        initial_payload,
    } = r
    else {
        panic!("not done")
    };
    assert_eq!(consumed, input.len());
    assert_eq!(info_hash, skey);
    assert_eq!(crypto, Crypto::Plaintext);
    assert!(cipher.is_none());
    assert_eq!(initial_payload, ia);
    assert_eq!(&out[..96], &kb.public[..]);
    assert_eq!(hex::encode(&out[96..]), "65d691d039d7a4282d71cc474244");
}

#[test]
fn rc4_crate_matches_the_classic_test_vector() {
    // Key "Key", plaintext "Plaintext" (the widely published RC4 vector).
    let mut rc4 = rc4::Rc4::new_from_slice(b"Key").unwrap();
    let mut buf = *b"Plaintext";
    rc4.apply_keystream(&mut buf);
    assert_eq!(hex::encode(buf), "bbf316e8d940af0ad3");
}

/// DH secrets (initiator's, responder's) whose shared secret starts with exactly one zero
/// byte, and that secret: the first of a fixed search, so every run uses the same pair.
fn secrets_with_one_leading_zero() -> ([u8; 32], [u8; 32], [u8; 96]) {
    let a_secret = [5u8; 32];
    let a = dh::KeyPair::new(&a_secret);
    for i in 0u16..8192 {
        let mut b_secret = [9u8; 32];
        b_secret[..2].copy_from_slice(&i.to_le_bytes());
        let s = a
            .shared_secret(&dh::KeyPair::new(&b_secret).public)
            .unwrap();
        if s[0] == 0 && s[1] != 0 {
            return (a_secret, b_secret, s);
        }
    }
    unreachable!("one secret in 256 starts with a zero byte")
}

/// What libtorrent up to 2.0.11 sends as HASH('req2', SKEY) xor HASH('req3', S) when S
/// starts with a zero byte: its mask hashes S[1..] and one byte of stale stack, `stale`.
fn old_libtorrent_req2x3(s: &[u8; 96], key: &[u8; 20], stale: u8) -> Vec<u8> {
    let r3 = sha1_of(&[b"req3", &s[1..], &[stale]]);
    req2_hash(key)
        .iter()
        .zip(r3.iter())
        .map(|(a, b)| a ^ b)
        .collect()
}

#[test]
fn an_old_libtorrent_initiator_with_a_leading_zero_secret_is_understood() {
    let (a_secret, b_secret, s) = secrets_with_one_leading_zero();
    for stale in [0u8, 0x7f, 0xff] {
        let mut b = Responder::new(&b_secret, 0, CryptoPolicy::PreferPlaintext);
        let mut lookup = lookup_of(vec![[0x11; 20], KEY]);
        let a = dh::KeyPair::new(&a_secret);
        let mut out = Vec::new();
        b.on_bytes(&a.public, &mut out, &mut lookup).unwrap();
        assert_eq!(a.shared_secret(&out[..96]).unwrap(), s);
        let m = Manual { s };
        let mut bytes = m.req1().to_vec();
        bytes.extend(old_libtorrent_req2x3(&s, &KEY, stale));
        bytes.extend(m.encrypted(VC, 3, 0, 0));
        let step = b.on_bytes(&bytes, &mut out, &mut lookup).unwrap();
        assert!(
            matches!(step, ResponderStep::Done { info_hash, .. } if info_hash == KEY),
            "stale byte {stale:#x}: {step:?}"
        );
    }
    // The same mask over a secret without a leading zero is what it looks like: unknown.
    let m = Manual::start(
        &mut Responder::new(&[9; 32], 0, CryptoPolicy::PreferPlaintext),
        &mut lookup_of(vec![KEY]),
    );
    assert_ne!(m.s[0], 0);
    let e = responder_error(
        |m| {
            let mut v = m.req1().to_vec();
            v.extend(old_libtorrent_req2x3(&m.s, &KEY, 0));
            v.extend(m.encrypted(VC, 1, 0, 0));
            v
        },
        CryptoPolicy::PreferPlaintext,
    );
    assert_eq!(e, MseError::UnknownInfoHash);
}

#[test]
fn a_close_after_step_3_with_a_leading_zero_secret_says_retry() {
    let (a_secret, b_secret, s) = secrets_with_one_leading_zero();
    let mut a = Initiator::new(&a_secret, 0, KEY, CryptoPolicy::PreferPlaintext);
    let mut opening = Vec::new();
    a.opening(&mut opening);
    let b = dh::KeyPair::new(&b_secret);
    assert_eq!(b.shared_secret(&opening[..96]).unwrap(), s);
    let mut out = Vec::new();
    let step = a
        .on_bytes(&b.public, &mut out, &handshake_ia(&KEY))
        .unwrap();
    assert!(matches!(step, InitiatorStep::NeedMore { consumed: 96 }));
    assert_eq!(a.on_eof(), MseError::SecretMisreadByPeer);

    // Any other secret: an ordinary truncation.
    let mut a = Initiator::new(&[3; 32], 0, KEY, CryptoPolicy::PreferPlaintext);
    let mut opening = Vec::new();
    a.opening(&mut opening);
    let b = dh::KeyPair::new(&[4; 32]);
    assert_ne!(b.shared_secret(&opening[..96]).unwrap()[0], 0);
    a.on_bytes(&b.public, &mut out, &handshake_ia(&KEY))
        .unwrap();
    assert_eq!(a.on_eof(), MseError::Truncated { stage: "VC sync" });
}
