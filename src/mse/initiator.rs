//! MSE initiator (A, the side that connected): sends Ya + PadA, reads Yb, sends the req
//! hashes with ENCRYPT(VC, crypto_provide, len(PadC) = 0, len(IA), IA), syncs on
//! ENCRYPT(VC) and reads crypto_select and PadD.

use rc4::{Rc4, StreamCipher};

use super::dh::{KeyPair, DH_KEY_BYTES};
use super::{
    be_u32, find, push_padding, rc4_for, read_pad_len, req2_hash, sha1_of, Crypto, CryptoPolicy,
    MseError, Rc4Pair, CRYPTO_PLAINTEXT, CRYPTO_RC4, VC,
};
use crate::limits::{MSE_IA_BYTES_MAX, MSE_PAD_BYTES_MAX, MSE_VC_SYNC_BYTES_MAX};

/// What a batch of bytes led to.
#[derive(Debug)]
pub enum InitiatorStep {
    /// Drop `consumed` bytes from the front of the input, send `out`, read more and feed
    /// the rest again with what arrives.
    NeedMore { consumed: usize },
    /// Handshake done: bytes of the input after `consumed` are the peer's stream (decrypt
    /// them with `cipher` when `crypto == Rc4`; our IA has been sent already).
    Done {
        consumed: usize,
        crypto: Crypto,
        cipher: Option<Rc4Pair>,
    },
}

enum State {
    /// Waiting for Yb (our Ya + PadA may or may not have been taken by `opening`).
    Yb,
    /// Searching for ENCRYPT(VC) after Yb.
    SyncVc(Box<Keyed>),
    /// Reading ENCRYPT(crypto_select, len(PadD)).
    Select(Box<Keyed>),
    /// Reading ENCRYPT(PadD).
    PadD(Box<Keyed>, Crypto, usize),
    Finished,
}

struct Keyed {
    /// B's keystream over 8 zero bytes: what ENCRYPT(VC) looks like on the wire.
    vc_pattern: [u8; 8],
    /// Decrypts what B sends (keyB).
    incoming: Rc4,
    /// Encrypts what we send (keyA).
    outgoing: Rc4,
}

/// The outgoing side of one MSE handshake.
pub struct Initiator {
    secret: [u8; 32],
    pad_len: usize,
    info_hash: [u8; 20],
    policy: CryptoPolicy,
    keys: KeyPair,
    state: State,
    /// The shared secret starts with a zero byte (`MseError::SecretMisreadByPeer`).
    secret_leading_zero: bool,
}

impl Initiator {
    /// `secret`: 32 random bytes for our DH private key; `pad_len`: the length of PadA
    /// (0..=512, more is capped); `info_hash`: the 20-byte handshake key (SKEY); `policy`:
    /// what we offer in crypto_provide. Computes Ya (one modexp).
    pub fn new(
        secret: &[u8; 32],
        pad_len: usize,
        info_hash: [u8; 20],
        policy: CryptoPolicy,
    ) -> Initiator {
        Initiator {
            secret: *secret,
            pad_len: pad_len.min(MSE_PAD_BYTES_MAX),
            info_hash,
            policy,
            keys: KeyPair::new(secret),
            state: State::Yb,
            secret_leading_zero: false,
        }
    }

    /// Appends our first message: Ya and PadA.
    pub fn opening(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.keys.public);
        push_padding(out, &self.secret, b"PadA", self.pad_len);
    }

    /// Feed what arrived (the caller keeps the unconsumed bytes and feeds them again with
    /// more). Once Yb is in, step 3 goes to `out`: the req hashes and ENCRYPT(VC,
    /// crypto_provide, len(PadC), len(IA), IA), with `ia` our BitTorrent handshake bytes
    /// (at most `limits::MSE_IA_BYTES_MAX`; only read on that call).
    pub fn on_bytes(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        ia: &[u8],
    ) -> Result<InitiatorStep, MseError> {
        let r = self.step(input, out, ia);
        if !matches!(r, Ok(InitiatorStep::NeedMore { .. })) {
            self.state = State::Finished;
        }
        r
    }

    /// The error that explains the connection ending now (EOF before `Done`).
    pub fn on_eof(&self) -> MseError {
        let stage = match self.state {
            State::Yb => "Yb",
            // An old libtorrent responder refuses our req2 hash when the secret starts with
            // a zero byte (`super::libtorrent_req3_masks`): the close comes right here.
            State::SyncVc(_) if self.secret_leading_zero => return MseError::SecretMisreadByPeer,
            State::SyncVc(_) => "VC sync",
            State::Select(_) => "crypto_select",
            State::PadD(..) => "PadD",
            State::Finished => return MseError::Finished,
        };
        MseError::Truncated { stage }
    }

    fn step(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        ia: &[u8],
    ) -> Result<InitiatorStep, MseError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let need_more = Ok(InitiatorStep::NeedMore { consumed: pos });
            match std::mem::replace(&mut self.state, State::Finished) {
                State::Finished => return Err(MseError::Finished),
                State::Yb => {
                    let Some(yb) = rest.get(..DH_KEY_BYTES) else {
                        self.state = State::Yb;
                        return need_more;
                    };
                    if ia.len() > MSE_IA_BYTES_MAX {
                        return Err(MseError::IaTooLong {
                            len: ia.len(),
                            max: MSE_IA_BYTES_MAX,
                        });
                    }
                    let s = self.keys.shared_secret(yb)?;
                    self.secret_leading_zero = s[0] == 0;
                    pos += DH_KEY_BYTES;
                    out.extend_from_slice(&sha1_of(&[b"req1", &s]));
                    let req2 = req2_hash(&self.info_hash);
                    let req3 = sha1_of(&[b"req3", &s]);
                    out.extend(req2.iter().zip(req3.iter()).map(|(a, b)| a ^ b));
                    let mut outgoing = rc4_for(b"keyA", &s, &self.info_hash);
                    let incoming = rc4_for(b"keyB", &s, &self.info_hash);
                    let mut vc_pattern = VC;
                    rc4_for(b"keyB", &s, &self.info_hash).apply_keystream(&mut vc_pattern);
                    let start = out.len();
                    out.extend_from_slice(&VC);
                    out.extend_from_slice(&self.policy.bits().to_be_bytes());
                    out.extend_from_slice(&0u16.to_be_bytes()); // len(PadC)
                    out.extend_from_slice(&(ia.len() as u16).to_be_bytes());
                    out.extend_from_slice(ia);
                    outgoing.apply_keystream(&mut out[start..]);
                    self.state = State::SyncVc(Box::new(Keyed {
                        vc_pattern,
                        incoming,
                        outgoing,
                    }));
                }
                State::SyncVc(mut k) => {
                    let window = &rest[..rest.len().min(MSE_VC_SYNC_BYTES_MAX)];
                    match find(window, &k.vc_pattern) {
                        Some(at) => {
                            let mut vc = k.vc_pattern;
                            k.incoming.apply_keystream(&mut vc);
                            debug_assert_eq!(vc, VC);
                            pos += at + VC.len();
                            self.state = State::Select(k);
                        }
                        None if rest.len() >= MSE_VC_SYNC_BYTES_MAX => {
                            return Err(MseError::SyncNotFound {
                                what: "ENCRYPT(VC)",
                                window: MSE_VC_SYNC_BYTES_MAX,
                            })
                        }
                        None => {
                            self.state = State::SyncVc(k);
                            return need_more;
                        }
                    }
                }
                State::Select(mut k) => {
                    let Some(enc) = rest.get(..6) else {
                        self.state = State::Select(k);
                        return need_more;
                    };
                    let mut head = [0u8; 6];
                    head.copy_from_slice(enc);
                    k.incoming.apply_keystream(&mut head);
                    pos += 6;
                    let selected = be_u32(&head[..4]);
                    let crypto = match selected {
                        CRYPTO_PLAINTEXT => Crypto::Plaintext,
                        CRYPTO_RC4 => Crypto::Rc4,
                        _ => return Err(MseError::BadCryptoSelect { selected }),
                    };
                    if selected & self.policy.bits() == 0 {
                        return Err(MseError::BadCryptoSelect { selected });
                    }
                    let pad_d = read_pad_len("PadD", &head[4..])?;
                    self.state = State::PadD(k, crypto, pad_d);
                }
                State::PadD(mut k, crypto, pad_d) => {
                    let Some(enc) = rest.get(..pad_d) else {
                        self.state = State::PadD(k, crypto, pad_d);
                        return need_more;
                    };
                    let mut buf = [0u8; MSE_PAD_BYTES_MAX];
                    let buf = &mut buf[..pad_d];
                    buf.copy_from_slice(enc);
                    k.incoming.apply_keystream(buf);
                    pos += pad_d;
                    let Keyed {
                        incoming, outgoing, ..
                    } = *k;
                    return Ok(InitiatorStep::Done {
                        consumed: pos,
                        crypto,
                        cipher: (crypto == Crypto::Rc4).then(|| Rc4Pair::new(incoming, outgoing)),
                    });
                }
            }
        }
    }
}
