//! MSE/PE (Message Stream Encryption) on the serving side, sans I/O: what the first bytes
//! of a connection say, the responder handshake with its cost cap and its counters, and
//! RC4 on the way out. `pump.rs` runs it in front of the BitTorrent stream for every
//! transport.
//!
//! The first bytes decide (docs/transports.md "Encryption"): a plaintext handshake starts
//! with `0x13 "BitTorrent protocol"`, and then MSE steps aside for good (zero copy).
//! Anything else is an MSE Diffie-Hellman key (webtorrent, Transmission, Vuze,
//! libtorrent's outgoing default): the sans-IO `mse::Responder` answers it under the
//! session's handshake deadline. The peer names its torrent only as HASH('req2',
//! info-hash), which we recognise with one store index lookup; a hash we do not hold
//! cannot be learned from it, so such a connection is closed and counted. The torrent it
//! proves binds the connection: its BitTorrent handshake must name the same torrent.
//!
//! Crypto: plaintext whenever the peer offers it (the payload is public metadata, and the
//! zero-copy path stays). RC4 only when the peer insists: incoming bytes are decrypted in
//! place; a reply batch is encrypted into the batch that goes out (one copy of each byte,
//! the price of RC4, counted in `mse_rc4_bytes_encrypted`).
//!
//! Cost bound: a DH handshake costs a modular exponentiation, so each peer address
//! (per-/64 for IPv6) may start at most `MSE_HANDSHAKES_PER_IP_PER_SECOND_MAX` a second on
//! a core, and a core at most `MSE_HANDSHAKES_PER_CORE_PER_SECOND_MAX` from all addresses
//! together; past either the connection is closed before any DH work.

use std::net::SocketAddr;

use crate::mse::{self, Crypto, CryptoPolicy, Rc4Pair, Responder, ResponderStep};
use crate::server::conn::WorkerCtx;
use crate::server::send::OutBatch;

/// Bytes that decide plaintext vs MSE: the plaintext handshake's `0x13 "BitTorrent
/// protocol"` prefix.
const PLAINTEXT_PREFIX_BYTES: usize = 20;

/// Room each read of the MSE handshake asks for: Ya (96) + PadA (≤ 512) + the 532-byte
/// sync window the responder searches, in one or two reads.
pub(crate) const READ_SPARE_BYTES: usize = 1024;

/// What a connection's first bytes say.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum FirstBytes {
    /// Fewer than tell the two apart (and a prefix of the plaintext handshake so far).
    TooFew,
    /// A plaintext BitTorrent handshake.
    Plaintext,
    /// Anything else: an MSE Diffie-Hellman key.
    Encrypted,
}

pub(crate) fn first_bytes(first: &[u8]) -> FirstBytes {
    let head = &first[..first.len().min(PLAINTEXT_PREFIX_BYTES)];
    if !head.is_empty() && !mse::is_plaintext_handshake(head) {
        FirstBytes::Encrypted
    } else if head.len() == PLAINTEXT_PREFIX_BYTES {
        FirstBytes::Plaintext
    } else {
        FirstBytes::TooFew
    }
}

/// The responder side of one connection's MSE handshake, sans I/O, shared by both
/// drivers: the per-IP cost cap, the store lookup of `req2`, and the counters.
pub(crate) struct Handshake {
    responder: Responder,
}

/// What a batch of handshake bytes led to.
pub(crate) enum HandshakeStep {
    /// Drop `consumed` bytes of the input, send what was written, and feed more.
    NeedMore { consumed: usize },
    /// Done: input bytes after `consumed` are stream bytes, to be decrypted with `rc4`
    /// if the peer insisted on it; `initial_payload` (the peer's IA, plaintext) comes
    /// before them. `proven` is the torrent key req2 named: the connection's BitTorrent
    /// handshake must name the same torrent.
    Done {
        consumed: usize,
        rc4: Option<Rc4Pair>,
        initial_payload: Vec<u8>,
        proven: [u8; 20],
    },
}

impl Handshake {
    /// Starts one for `peer`, unless its address is over the per-IP handshake rate or the
    /// core over its DH budget for all addresses (checked in that order, so one address's
    /// flood is refused without spending the budget others share).
    pub(crate) fn start(ctx: &WorkerCtx, peer: SocketAddr) -> Result<Handshake, &'static str> {
        let stats = &ctx.stats;
        if !ctx
            .mse_handshakes
            .try_hit(&crate::server::limiter::budget_key(peer.ip()))
        {
            stats.mse_refused_per_ip.inc();
            return Err("MSE handshakes per IP over the cap");
        }
        if !ctx.mse_dh_budget.try_take() {
            stats.mse_refused_core_budget.inc();
            return Err("MSE handshakes on this core over the budget");
        }
        stats.mse_handshakes_started.inc();
        let (Ok(secret), Ok(pad_len)) = (mse::random_secret(), mse::random_pad_len()) else {
            return Err("no randomness for the MSE key");
        };
        Ok(Handshake {
            responder: Responder::new(&secret, pad_len, CryptoPolicy::PreferPlaintext),
        })
    }

    /// Feeds the raw bytes received so far (minus what earlier steps consumed); our
    /// handshake bytes are appended to `out`, which must be sent even when this fails.
    pub(crate) fn on_bytes(
        &mut self,
        ctx: &WorkerCtx,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<HandshakeStep, String> {
        let stats = &ctx.stats;
        let mut lookup = |req2: &[u8; 20]| ctx.store.lookup_req2(req2);
        match self.responder.on_bytes(raw, out, &mut lookup) {
            Ok(ResponderStep::NeedMore { consumed }) => Ok(HandshakeStep::NeedMore { consumed }),
            Ok(ResponderStep::Done {
                consumed,
                info_hash,
                crypto,
                cipher,
                initial_payload,
            }) => {
                stats.mse_handshakes_done.inc();
                let rc4 = match (crypto, cipher) {
                    (Crypto::Rc4, Some(cipher)) => {
                        stats.mse_rc4_selected.inc();
                        Some(cipher)
                    }
                    _ => {
                        stats.mse_plaintext_selected.inc();
                        None
                    }
                };
                Ok(HandshakeStep::Done {
                    consumed,
                    rc4,
                    initial_payload,
                    proven: info_hash,
                })
            }
            Err(e) => {
                if e.is_unknown_info_hash() {
                    // Recognisable only: a hash we do not hold cannot be fetched.
                    stats.mse_unknown_info_hash.inc();
                } else {
                    stats.mse_handshakes_failed.inc();
                }
                Err(format!("MSE: {e}"))
            }
        }
    }
}

/// RC4 on the way out: the sealed `batch`'s bytes (headers and mmap slices) are encrypted
/// into `enc`'s head; the mmap is never written.
pub(crate) fn encrypt_batch(
    ctx: &WorkerCtx,
    cipher: &mut Rc4Pair,
    batch: &mut OutBatch,
    enc: &mut OutBatch,
) {
    batch.seal();
    let total = batch.sealed_len();
    let mut offset = 0;
    while offset < total {
        let run = batch.contiguous_at(offset);
        cipher.encrypt_into(run, enc.head());
        offset += run.len();
    }
    ctx.stats.mse_rc4_bytes_encrypted.add(total as u64);
    batch.clear();
}
