//! Message Stream Encryption (MSE, also "Protocol Encryption"/PE), sans-IO: the
//! Diffie-Hellman handshake that webtorrent, Transmission, Vuze/BiglyBT and libtorrent open
//! with instead of the plaintext BitTorrent handshake (docs/protocol-facts.md §14). No
//! sockets, no clock, no RNG: the caller feeds bytes, sends what is appended to `out`, and
//! provides the random private key (`random_secret`) and padding length.
//!
//! There is no BEP. The facts come from the Vuze wiki text "Message Stream Encryption" that
//! libtorrent (`pe_crypto.cpp`, `bt_peer_connection.cpp`), Transmission and Vuze implement:
//!
//! ```text
//! 1 A->B: Ya, PadA
//! 2 B->A: Yb, PadB
//! 3 A->B: HASH('req1', S), HASH('req2', SKEY) xor HASH('req3', S),
//!         ENCRYPT(VC, crypto_provide, len(PadC), PadC, len(IA)), ENCRYPT(IA)
//! 4 B->A: ENCRYPT(VC, crypto_select, len(PadD), PadD), ENCRYPT2(payload stream)
//! 5 A->B: ENCRYPT2(payload stream)
//! ```
//!
//! - DH over the 768-bit prime `P` with generator 2; Ya, Yb and S are 96 bytes big-endian
//!   (left-padded with zeros). Our private exponent is the caller's 32 random bytes (the
//!   spec asks for at least 160 bits; libtorrent draws 768).
//! - `HASH` is SHA-1. `SKEY` is the 20-byte handshake key (v1 info-hash, or a v2 one cut to
//!   20 bytes). The initiator A encrypts with RC4 keyed `HASH('keyA', S, SKEY)`, B with
//!   `HASH('keyB', S, SKEY)`; both discard the first 1024 keystream bytes.
//! - VC is 8 zero bytes; `crypto_provide`/`crypto_select` are 32-bit big-endian bit sets,
//!   0x01 plaintext and 0x02 RC4; `len(...)` fields are 16-bit big-endian. The select has
//!   exactly one bit. PadC and IA are always RC4-encrypted (A does not know yet what B will
//!   select); ENCRYPT2 is RC4 continuing the same keystreams, or nothing for plaintext.
//! - B finds step 3 by searching for `HASH('req1', S)` within 512 + 20 bytes after Ya; A
//!   finds step 4 by searching for `ENCRYPT(VC)` (B's keystream over 8 zeros) within
//!   512 + 8 bytes after Yb. Padding over 512 bytes is an error (libtorrent:
//!   `invalid_pad_size`).
//! - libtorrent as A sends its 68-byte BitTorrent handshake as IA; as B it picks the
//!   lowest offered bit it allows (plaintext) unless `prefer_rc4`.
//! - The receiver learns the torrent only by matching `HASH('req2', SKEY)` against the keys
//!   it holds, so an encrypted connection can only be served a hit (`MseError::UnknownInfoHash`).
//!
//! We prefer plaintext whenever the peer offers it: what we carry is public metadata, and
//! RC4 is obfuscation against traffic shaping, not secrecy.
//!
//! Crates, measured (`cargo bench --bench mse`; table in [`dh`]'s doc): DH uses
//! `crypto-bigint` (fixed 768-bit, constant time, no allocation: 98 µs a modexp against
//! `num-bigint`'s 119 µs; 186 µs for a whole responder handshake); RC4 is the `rc4` crate
//! (RustCrypto, ~390 MiB/s).
//!
//! - `dh`         the prime, key generation and the shared secret
//! - `responder`  B: the incoming side (the server)
//! - `initiator`  A: the outgoing side (upstream fetches)

pub mod dh;
pub mod initiator;
pub mod responder;

#[cfg(test)]
mod tests;

use rc4::{KeyInit, Rc4, StreamCipher};
use sha1::{Digest, Sha1};

pub use dh::{DH_KEY_BYTES, PRIME_HEX};
pub use initiator::{Initiator, InitiatorStep};
pub use responder::{Responder, ResponderStep};

use crate::limits::MSE_PAD_BYTES_MAX;

/// The verification constant: 8 zero bytes.
pub const VC: [u8; 8] = [0; 8];

/// `crypto_provide`/`crypto_select` bit for plaintext after the handshake.
pub const CRYPTO_PLAINTEXT: u32 = 0x01;
/// `crypto_provide`/`crypto_select` bit for RC4 after the handshake.
pub const CRYPTO_RC4: u32 = 0x02;

/// RC4 keystream bytes thrown away after keying, by both sides.
pub const RC4_DISCARD_BYTES: usize = 1024;

/// How the stream goes on after the MSE handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crypto {
    Plaintext,
    Rc4,
}

impl Crypto {
    /// The `crypto_select` bit.
    pub fn bit(self) -> u32 {
        match self {
            Crypto::Plaintext => CRYPTO_PLAINTEXT,
            Crypto::Rc4 => CRYPTO_RC4,
        }
    }
}

/// Which stream crypto we accept. Plaintext is preferred whenever allowed and offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CryptoPolicy {
    /// Plaintext or RC4, plaintext preferred (what magnetar uses: public metadata).
    #[default]
    PreferPlaintext,
    /// RC4 only (tests; an operator who wants every encrypted connection to stay so).
    Rc4Only,
}

impl CryptoPolicy {
    /// The bits we offer (initiator) or accept (responder).
    pub fn bits(self) -> u32 {
        match self {
            CryptoPolicy::PreferPlaintext => CRYPTO_PLAINTEXT | CRYPTO_RC4,
            CryptoPolicy::Rc4Only => CRYPTO_RC4,
        }
    }

    /// Our pick among what the peer offers: plaintext first.
    pub fn select(self, provided: u32) -> Option<Crypto> {
        let both = provided & self.bits();
        if both & CRYPTO_PLAINTEXT != 0 {
            Some(Crypto::Plaintext)
        } else if both & CRYPTO_RC4 != 0 {
            Some(Crypto::Rc4)
        } else {
            None
        }
    }
}

/// Why an MSE handshake failed. Every variant closes the connection;
/// [`MseError::is_unknown_info_hash`] tells the one that is not the peer's fault.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MseError {
    /// `HASH('req2', SKEY)` names no torrent we hold. The responder can only recognise a
    /// hash, never learn it, so this is not a protocol error: count it and close.
    #[error("the peer asks for a torrent we do not hold")]
    UnknownInfoHash,
    /// The peer's DH public key is 0, 1, P-1 or not below P: a key no honest peer sends
    /// (it would fix the shared secret).
    #[error("invalid DH public key")]
    BadPublicKey,
    /// The synchronisation pattern (`req1` hash, or the encrypted VC) is not within its
    /// window after the DH key.
    #[error("{what} not found within {window} bytes")]
    SyncNotFound { what: &'static str, window: usize },
    /// The decrypted verification constant is not 8 zero bytes.
    #[error("bad verification constant")]
    BadVc,
    /// A padding length over `limits::MSE_PAD_BYTES_MAX`.
    #[error("{what} of {len} bytes exceeds the cap of {max}")]
    PadTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// `len(IA)` over `limits::MSE_IA_BYTES_MAX` (theirs, or ours when initiating).
    #[error("initial payload of {len} bytes exceeds the cap of {max}")]
    IaTooLong { len: usize, max: usize },
    /// The peer offers no crypto our policy accepts.
    #[error("crypto_provide {provided:#x} offers nothing we accept")]
    CryptoNotOffered { provided: u32 },
    /// The peer selected something we did not offer, or not exactly one method.
    #[error("crypto_select {selected:#x} is not one of the methods offered")]
    BadCryptoSelect { selected: u32 },
    /// The connection ended inside the handshake (`on_eof`).
    #[error("connection closed during the MSE handshake ({stage})")]
    Truncated { stage: &'static str },
    /// The responder closed after our req hashes, and the shared secret starts with a zero
    /// byte: libtorrent up to 2.0.11 misreads such a secret for its req3 mask and refuses
    /// the torrent (see `libtorrent_req3_masks`). A new handshake has a new secret: retry.
    #[error("connection closed after the req hashes; the DH secret starts with a zero byte, which libtorrent up to 2.0.11 misreads")]
    SecretMisreadByPeer,
    /// `on_bytes` after the handshake finished or failed.
    #[error("MSE handshake already finished")]
    Finished,
}

impl MseError {
    /// True for the one error that is not a protocol violation: a well-formed handshake
    /// for a torrent we do not hold.
    pub fn is_unknown_info_hash(&self) -> bool {
        matches!(self, MseError::UnknownInfoHash)
    }

    /// A short stable name for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            MseError::UnknownInfoHash => "unknown_info_hash",
            MseError::BadPublicKey => "bad_public_key",
            MseError::SyncNotFound { .. } => "sync_not_found",
            MseError::BadVc => "bad_vc",
            MseError::PadTooLong { .. } => "pad_too_long",
            MseError::IaTooLong { .. } => "ia_too_long",
            MseError::CryptoNotOffered { .. } => "crypto_not_offered",
            MseError::BadCryptoSelect { .. } => "bad_crypto_select",
            MseError::Truncated { .. } => "truncated",
            MseError::SecretMisreadByPeer => "secret_misread_by_peer",
            MseError::Finished => "finished",
        }
    }
}

/// True if `first` (the first 1..=20 bytes of a new connection) is the start of a plaintext
/// BitTorrent handshake: byte 0 is 19 (the length of "BitTorrent protocol") and every
/// further byte given matches that string. False means "treat as MSE" (and for an empty
/// slice: nothing to decide on).
///
/// One byte is decisive in practice: an MSE connection starts with Ya, which begins with
/// 0x13 for about 1 in 256 connections, and each further byte given cuts that by 256 again
/// (a first read carries 96+ bytes from MSE peers and 68 from plaintext ones, so pass what
/// you have, up to 20).
pub fn is_plaintext_handshake(first: &[u8]) -> bool {
    const PSTR: &[u8; 19] = b"BitTorrent protocol";
    match first.split_first() {
        Some((&19, rest)) => rest.iter().zip(PSTR.iter()).all(|(a, b)| a == b),
        _ => false,
    }
}

/// `HASH('req2', key)`: what an MSE initiator sends (xor `HASH('req3', S)`) to name the
/// torrent without revealing it. The store indexes records by it (`Store::lookup_req2`).
pub fn req2_hash(key: &[u8; 20]) -> [u8; 20] {
    sha1_of(&[b"req2", key])
}

/// The req3 masks an old libtorrent may have used for the shared secret `s`.
///
/// libtorrent up to 2.0.11 (Debian's 2.0.8 included) hashes req3 over S exported with
/// `export_bits` into an uninitialised 96-byte array (`pe_crypto.cpp`
/// `dh_key_exchange::compute_secret`; fixed upstream in "fix dh shared secret padding"):
/// when S starts with one zero byte (one handshake in 256) the hashed bytes are S[1..]
/// followed by one byte of stale stack, so its mask is SHA1("req3", S[1..], x) for an
/// unknown x. Its req1 hash and RC4 keys use the padded S and are right. Empty unless S
/// has exactly one leading zero byte (two, one in 65 536, would be 65 536 candidates:
/// left to the peer's reconnect).
pub(crate) fn libtorrent_req3_masks(s: &[u8; DH_KEY_BYTES]) -> impl Iterator<Item = [u8; 20]> + '_ {
    let candidates: u16 = if s[0] == 0 && s[1] != 0 { 256 } else { 0 };
    (0..candidates).map(move |x| sha1_of(&[b"req3", &s[1..], &[x as u8]]))
}

/// SHA-1 of the concatenation of `parts`.
pub(crate) fn sha1_of(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// RC4 keyed `HASH(label, S, SKEY)` with the first 1024 bytes discarded.
pub(crate) fn rc4_for(label: &[u8; 4], s: &[u8; DH_KEY_BYTES], skey: &[u8; 20]) -> Rc4 {
    let key = sha1_of(&[label, s, skey]);
    let mut rc4 = Rc4::new_from_slice(&key).expect("20-byte RC4 key");
    let mut discard = [0u8; RC4_DISCARD_BYTES];
    rc4.apply_keystream(&mut discard);
    rc4
}

/// Appends `len` padding bytes. The spec asks for random bytes; the sans-IO layer has no
/// RNG, so they are an RC4 keystream keyed by a hash of the caller's secret under a label
/// of its own: unpredictable to the peer, and revealing nothing of the DH exponent.
pub(crate) fn push_padding(out: &mut Vec<u8>, secret: &[u8; 32], label: &[u8], len: usize) {
    debug_assert!(len <= MSE_PAD_BYTES_MAX);
    let key = sha1_of(&[b"magnetar mse padding", label, secret]);
    let mut rc4 = Rc4::new_from_slice(&key).expect("20-byte RC4 key");
    let start = out.len();
    out.resize(start + len, 0);
    rc4.apply_keystream(&mut out[start..]);
}

/// The two RC4 states of an RC4-selected connection after the handshake, each with its
/// first 1024 bytes discarded and advanced past the handshake: decrypt what the peer sends
/// with its key, encrypt what we send with ours. One allocation of ~520 bytes (two
/// 256-byte RC4 states), so the handle itself is a pointer.
pub struct Rc4Pair {
    /// (incoming, outgoing)
    states: Box<(Rc4, Rc4)>,
}

impl Rc4Pair {
    pub(crate) fn new(incoming: Rc4, outgoing: Rc4) -> Self {
        Rc4Pair {
            states: Box::new((incoming, outgoing)),
        }
    }

    /// Decrypts bytes received from the peer, in order, exactly once each.
    pub fn decrypt_in_place(&mut self, buf: &mut [u8]) {
        self.states.0.apply_keystream(buf);
    }

    /// Appends `src` encrypted to `dst`.
    pub fn encrypt_into(&mut self, src: &[u8], dst: &mut Vec<u8>) {
        let start = dst.len();
        dst.extend_from_slice(src);
        self.states.1.apply_keystream(&mut dst[start..]);
    }

    /// Encrypts bytes to send, in order, exactly once each.
    pub fn encrypt_in_place(&mut self, buf: &mut [u8]) {
        self.states.1.apply_keystream(buf);
    }
}

impl std::fmt::Debug for Rc4Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rc4Pair { .. }")
    }
}

/// 32 bytes from the operating system's CSPRNG, for a DH private key (one per connection).
pub fn random_secret() -> Result<[u8; 32], getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    Ok(secret)
}

/// A padding length uniform in `0..=MSE_PAD_BYTES_MAX` from the OS CSPRNG (libtorrent draws
/// its pads the same way).
pub fn random_pad_len() -> Result<usize, getrandom::Error> {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b)?;
    Ok(u16::from_le_bytes(b) as usize % (MSE_PAD_BYTES_MAX + 1))
}

/// Reads a big-endian u16 / u32 from the front of `b` (length checked by the caller).
pub(crate) fn be_u16(b: &[u8]) -> usize {
    u16::from_be_bytes([b[0], b[1]]) as usize
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A padding length (`what`: "PadC", "PadD"): the big-endian u16 at the front of `b`,
/// refused past `MSE_PAD_BYTES_MAX` (BEP 8's 512).
pub(crate) fn read_pad_len(what: &'static str, b: &[u8]) -> Result<usize, MseError> {
    let len = be_u16(b);
    if len > MSE_PAD_BYTES_MAX {
        return Err(MseError::PadTooLong {
            what,
            len,
            max: MSE_PAD_BYTES_MAX,
        });
    }
    Ok(len)
}

/// Position of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
