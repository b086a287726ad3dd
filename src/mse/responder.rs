//! MSE responder (B, the side that accepted the connection): reads Ya + PadA, answers Yb +
//! PadB, syncs on `HASH('req1', S)`, recognises the torrent by `HASH('req2', SKEY)`, reads
//! VC, crypto_provide, PadC and IA, and answers VC, crypto_select, PadD.

use rc4::{Rc4, StreamCipher};

use super::dh::{KeyPair, DH_KEY_BYTES};
use super::{
    be_u16, be_u32, find, push_padding, rc4_for, read_pad_len, sha1_of, Crypto, CryptoPolicy,
    MseError, Rc4Pair, VC,
};
use crate::limits::{
    MSE_HANDSHAKE_BYTES_MAX, MSE_IA_BYTES_MAX, MSE_PAD_BYTES_MAX, MSE_REQ1_SYNC_BYTES_MAX,
};

/// What a batch of bytes led to.
#[derive(Debug)]
pub enum ResponderStep {
    /// Drop `consumed` bytes from the front of the input, send `out`, read more and feed
    /// the rest again with what arrives.
    NeedMore { consumed: usize },
    /// Handshake done; `out` holds our last handshake bytes. Bytes of the input after
    /// `consumed` are stream bytes (RC4-encrypted if `crypto == Rc4`: decrypt them with
    /// `cipher`). `initial_payload` is the peer's IA, decrypted (normally its BitTorrent
    /// handshake), to be handled before those stream bytes.
    Done {
        consumed: usize,
        info_hash: [u8; 20],
        crypto: Crypto,
        cipher: Option<Rc4Pair>,
        initial_payload: Vec<u8>,
    },
}

enum State {
    /// Waiting for the peer's 96-byte Ya.
    Ya,
    /// Searching for `HASH('req1', S)` after Ya.
    Req1 { s: Box<[u8; DH_KEY_BYTES]> },
    /// Reading `HASH('req2', SKEY) xor HASH('req3', S)`.
    Req2 { s: Box<[u8; DH_KEY_BYTES]> },
    /// Reading ENCRYPT(VC, crypto_provide, len(PadC)).
    Provide(Box<Keyed>),
    /// Reading ENCRYPT(PadC, len(IA)).
    PadC(Box<Keyed>, Crypto, usize),
    /// Reading ENCRYPT(IA).
    Ia(Box<Keyed>, Crypto, usize),
    /// Done or failed.
    Finished,
}

/// The torrent and the two ciphers, once the peer has named the torrent.
struct Keyed {
    info_hash: [u8; 20],
    /// Decrypts what A sends (keyA).
    incoming: Rc4,
    /// Encrypts what we send (keyB).
    outgoing: Rc4,
}

/// The incoming side of one MSE handshake.
pub struct Responder {
    secret: [u8; 32],
    pad_len: usize,
    policy: CryptoPolicy,
    state: State,
    /// Bytes consumed by earlier calls (checked against `MSE_HANDSHAKE_BYTES_MAX`).
    consumed_total: usize,
}

impl Responder {
    /// `secret`: 32+ random bytes for our DH private key (the caller provides randomness,
    /// e.g. `mse::random_secret`); `pad_len`: the length of PadB, 0..=512 (more is capped);
    /// `policy`: which crypto we accept (plaintext is preferred when the peer offers it).
    /// Cheap: the DH work happens when Ya has arrived.
    pub fn new(secret: &[u8; 32], pad_len: usize, policy: CryptoPolicy) -> Responder {
        Responder {
            secret: *secret,
            pad_len: pad_len.min(MSE_PAD_BYTES_MAX),
            policy,
            state: State::Ya,
            consumed_total: 0,
        }
    }

    /// Feed what arrived (the caller keeps the unconsumed bytes and feeds them again with
    /// more); our replies (Yb + PadB, then the encrypted VC, crypto_select, PadD) are
    /// appended to `out`. `lookup` maps `HASH('req2', SKEY)` to the 20-byte key when we
    /// hold that torrent (`Store::lookup_req2`); it is called once per candidate: the
    /// right mask's req2, then (1 handshake in 256) old libtorrent's 256 variants
    /// (`libtorrent_req3_masks`).
    ///
    /// After `Done` or an error, further calls return `MseError::Finished`.
    pub fn on_bytes(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        lookup: &mut dyn FnMut(&[u8; 20]) -> Option<[u8; 20]>,
    ) -> Result<ResponderStep, MseError> {
        let r = self.step(input, out, lookup);
        match &r {
            Ok(ResponderStep::NeedMore { consumed }) => self.consumed_total += consumed,
            _ => self.state = State::Finished,
        }
        debug_assert!(self.consumed_total <= MSE_HANDSHAKE_BYTES_MAX);
        r
    }

    /// The error that explains the connection ending now (EOF before `Done`).
    pub fn on_eof(&self) -> MseError {
        let stage = match self.state {
            State::Ya => "Ya",
            State::Req1 { .. } => "req1 sync",
            State::Req2 { .. } => "req2",
            State::Provide(_) => "crypto_provide",
            State::PadC(..) => "PadC",
            State::Ia(..) => "IA",
            State::Finished => return MseError::Finished,
        };
        MseError::Truncated { stage }
    }

    /// Applies the state's step to the input, state after state, until one needs more
    /// bytes, fails or finishes the handshake.
    fn step(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        lookup: &mut dyn FnMut(&[u8; 20]) -> Option<[u8; 20]>,
    ) -> Result<ResponderStep, MseError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let progress = match std::mem::replace(&mut self.state, State::Finished) {
                State::Finished => return Err(MseError::Finished),
                State::Ya => self.on_ya(rest, out)?,
                State::Req1 { s } => on_req1(s, rest)?,
                State::Req2 { s } => on_req2(s, rest, lookup)?,
                State::Provide(k) => self.on_provide(k, rest)?,
                State::PadC(k, crypto, pad_c) => on_pad_c(k, crypto, pad_c, rest)?,
                State::Ia(k, crypto, ia_len) => on_ia(k, crypto, ia_len, rest, out),
            };
            match progress {
                Progress::NeedMore(state) => {
                    self.state = state;
                    return Ok(ResponderStep::NeedMore { consumed: pos });
                }
                Progress::Next(used, state) => {
                    pos += used;
                    self.state = state;
                }
                Progress::Done {
                    used,
                    keyed,
                    crypto,
                    initial_payload,
                } => {
                    let Keyed {
                        info_hash,
                        incoming,
                        outgoing,
                    } = *keyed;
                    return Ok(ResponderStep::Done {
                        consumed: pos + used,
                        info_hash,
                        crypto,
                        cipher: (crypto == Crypto::Rc4).then(|| Rc4Pair::new(incoming, outgoing)),
                        initial_payload,
                    });
                }
            }
        }
    }

    /// Ya: our half of the key exchange (Yb + PadB) goes out.
    fn on_ya(&self, rest: &[u8], out: &mut Vec<u8>) -> Result<Progress, MseError> {
        let Some(ya) = rest.get(..DH_KEY_BYTES) else {
            return Ok(Progress::NeedMore(State::Ya));
        };
        let keys = KeyPair::new(&self.secret);
        let s = Box::new(keys.shared_secret(ya)?);
        out.extend_from_slice(&keys.public);
        push_padding(out, &self.secret, b"PadB", self.pad_len);
        Ok(Progress::Next(DH_KEY_BYTES, State::Req1 { s }))
    }

    /// ENCRYPT(VC, crypto_provide, len(PadC)): which crypto we select.
    fn on_provide(&self, mut k: Box<Keyed>, rest: &[u8]) -> Result<Progress, MseError> {
        let Some(enc) = rest.get(..14) else {
            return Ok(Progress::NeedMore(State::Provide(k)));
        };
        let mut head = [0u8; 14];
        head.copy_from_slice(enc);
        k.incoming.apply_keystream(&mut head);
        if head[..8] != VC {
            return Err(MseError::BadVc);
        }
        let provided = be_u32(&head[8..12]);
        let crypto = self
            .policy
            .select(provided)
            .ok_or(MseError::CryptoNotOffered { provided })?;
        let pad_c = read_pad_len("PadC", &head[12..14])?;
        Ok(Progress::Next(14, State::PadC(k, crypto, pad_c)))
    }
}

/// What one state's step did with the bytes it was given.
enum Progress {
    /// Not enough bytes: wait in this state (nothing consumed).
    NeedMore(State),
    /// Consumed this many bytes; go on in the next state.
    Next(usize, State),
    /// Consumed `used` bytes and finished: the torrent, its ciphers, the crypto selected
    /// and the peer's IA.
    Done {
        used: usize,
        keyed: Box<Keyed>,
        crypto: Crypto,
        initial_payload: Vec<u8>,
    },
}

/// Searching for `HASH('req1', S)`, within `MSE_REQ1_SYNC_BYTES_MAX` bytes after Ya.
fn on_req1(s: Box<[u8; DH_KEY_BYTES]>, rest: &[u8]) -> Result<Progress, MseError> {
    let req1 = sha1_of(&[b"req1", &s[..]]);
    let window = &rest[..rest.len().min(MSE_REQ1_SYNC_BYTES_MAX)];
    match find(window, &req1) {
        Some(at) => Ok(Progress::Next(at + req1.len(), State::Req2 { s })),
        None if rest.len() >= MSE_REQ1_SYNC_BYTES_MAX => Err(MseError::SyncNotFound {
            what: "HASH('req1', S)",
            window: MSE_REQ1_SYNC_BYTES_MAX,
        }),
        None => Ok(Progress::NeedMore(State::Req1 { s })),
    }
}

/// `HASH('req2', SKEY) xor HASH('req3', S)`: which torrent, and so the RC4 keys.
fn on_req2(
    s: Box<[u8; DH_KEY_BYTES]>,
    rest: &[u8],
    lookup: &mut dyn FnMut(&[u8; 20]) -> Option<[u8; 20]>,
) -> Result<Progress, MseError> {
    let Some(obfuscated) = rest.get(..20) else {
        return Ok(Progress::NeedMore(State::Req2 { s }));
    };
    let unmask = |mask: [u8; 20]| {
        let mut req2 = [0u8; 20];
        for (i, b) in req2.iter_mut().enumerate() {
            *b = obfuscated[i] ^ mask[i];
        }
        req2
    };
    // The right mask first; then the ones an old libtorrent initiator computes from a
    // secret with a leading zero byte (1 in 256 of its handshakes), which it would
    // otherwise retry without encryption.
    let info_hash = std::iter::once(sha1_of(&[b"req3", &s[..]]))
        .chain(super::libtorrent_req3_masks(&s))
        .find_map(|mask| lookup(&unmask(mask)))
        .ok_or(MseError::UnknownInfoHash)?;
    let keyed = Box::new(Keyed {
        info_hash,
        incoming: rc4_for(b"keyA", &s, &info_hash),
        outgoing: rc4_for(b"keyB", &s, &info_hash),
    });
    Ok(Progress::Next(20, State::Provide(keyed)))
}

/// ENCRYPT(PadC, len(IA)).
fn on_pad_c(
    mut k: Box<Keyed>,
    crypto: Crypto,
    pad_c: usize,
    rest: &[u8],
) -> Result<Progress, MseError> {
    let Some(enc) = rest.get(..pad_c + 2) else {
        return Ok(Progress::NeedMore(State::PadC(k, crypto, pad_c)));
    };
    let mut buf = [0u8; MSE_PAD_BYTES_MAX + 2];
    let buf = &mut buf[..pad_c + 2];
    buf.copy_from_slice(enc);
    k.incoming.apply_keystream(buf);
    let ia_len = be_u16(&buf[pad_c..]);
    if ia_len > MSE_IA_BYTES_MAX {
        return Err(MseError::IaTooLong {
            len: ia_len,
            max: MSE_IA_BYTES_MAX,
        });
    }
    Ok(Progress::Next(pad_c + 2, State::Ia(k, crypto, ia_len)))
}

/// ENCRYPT(IA): the peer's first payload; we answer ENCRYPT(VC, crypto_select, len(PadD)).
fn on_ia(
    mut k: Box<Keyed>,
    crypto: Crypto,
    ia_len: usize,
    rest: &[u8],
    out: &mut Vec<u8>,
) -> Progress {
    let Some(enc) = rest.get(..ia_len) else {
        return Progress::NeedMore(State::Ia(k, crypto, ia_len));
    };
    let mut initial_payload = enc.to_vec();
    k.incoming.apply_keystream(&mut initial_payload);
    // ENCRYPT(VC, crypto_select, len(PadD) = 0): no PadD, B's stream may start right away
    // (libtorrent sends a random PadD; any length is valid).
    let start = out.len();
    out.extend_from_slice(&VC);
    out.extend_from_slice(&crypto.bit().to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    k.outgoing.apply_keystream(&mut out[start..]);
    Progress::Done {
        used: ia_len,
        keyed: k,
        crypto,
        initial_payload,
    }
}
