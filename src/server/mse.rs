//! MSE/PE (Message Stream Encryption) in front of either transport: a `Transport` that
//! wraps TCP or uTP and hands the session the plain BitTorrent byte stream.
//!
//! The first bytes decide (docs/transports.md "Encryption"): a plaintext handshake starts
//! with `0x13 "BitTorrent protocol"`, and then this layer steps aside for good (reads and
//! writes go straight to the inner transport, zero copy). Anything else is an MSE
//! Diffie-Hellman key (webtorrent, Transmission, Vuze, libtorrent's outgoing default): the
//! sans-IO `mse::Responder` runs the handshake inside the session's first read, under the
//! session's handshake deadline. The peer names its torrent only as
//! HASH('req2', info-hash), which we recognise with one store index lookup; a hash we do
//! not hold cannot be learned from it, so such a connection is closed and counted.
//!
//! Crypto: plaintext whenever the peer offers it (the payload is public metadata, and the
//! zero-copy path stays). RC4 only when the peer insists: incoming bytes are decrypted in
//! place; a reply batch is encrypted into the batch that goes out (one copy of each byte,
//! the price of RC4, counted in `mse_rc4_bytes_encrypted`).
//!
//! Cost bound: a DH handshake costs a modular exponentiation, so each peer address
//! (per-/64 for IPv6) may start at most `MSE_HANDSHAKES_PER_IP_PER_SECOND_MAX` a second on
//! a core; past that the connection is closed before any DH work.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::time::Instant;

use crate::mse::{self, Crypto, CryptoPolicy, Rc4Pair, Responder, ResponderStep};
use crate::server::conn::WorkerCtx;
use crate::server::send::OutBatch;
use crate::server::session::{ReadOutcome, Transport, Wake};
use crate::upstream::shard::FetchOutcome;

/// Bytes that decide plaintext vs MSE: the plaintext handshake's `0x13 "BitTorrent
/// protocol"` prefix.
const PLAINTEXT_PREFIX_BYTES: usize = 20;

/// Room each read of the MSE handshake asks for: Ya (96) + PadA (≤ 512) + the 532-byte
/// sync window the responder searches, in one or two reads.
const MSE_READ_SPARE_BYTES: usize = 1024;

pub(crate) enum Mode {
    /// Nothing read yet, or fewer bytes than decide.
    Undecided,
    /// A plaintext handshake: pass everything through.
    Plain,
    /// MSE done, plaintext selected: pass everything through.
    MsePlain,
    /// MSE done, RC4 selected.
    Rc4(Box<Rc4Pair>),
}

/// A transport with MSE/PE in front.
pub struct MseTransport<T: Transport> {
    inner: T,
    ctx: Rc<WorkerCtx>,
    peer: SocketAddr,
    mode: Mode,
}

impl<T: Transport> MseTransport<T> {
    pub fn new(inner: T, ctx: Rc<WorkerCtx>, peer: SocketAddr) -> Self {
        MseTransport {
            inner,
            ctx,
            peer,
            mode: Mode::Undecided,
        }
    }

    /// Reads until the first bytes decide the mode; an MSE handshake is run to its end.
    /// On success the session's `buf` holds the plaintext BitTorrent stream so far.
    async fn decide(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
    ) -> Result<(), ReadOutcome> {
        let mut raw = std::mem::take(buf);
        let plaintext = loop {
            if let Some(plaintext) = classify(&raw) {
                break plaintext;
            }
            match self
                .inner
                .read_or_wake(&mut raw, deadline, spare_min, None)
                .await
            {
                Wake::Read(ReadOutcome::Data { .. }) => {}
                Wake::Read(other) => {
                    *buf = raw;
                    return Err(other);
                }
                Wake::Fetch(_) => unreachable!("no waiter during the handshake"),
            }
        };
        if plaintext {
            self.mode = Mode::Plain;
            *buf = raw;
            return Ok(());
        }
        self.handshake(raw, buf, deadline).await
    }

    /// The responder side of MSE, fed from `raw` and further reads.
    async fn handshake(
        &mut self,
        mut raw: Vec<u8>,
        buf: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<(), ReadOutcome> {
        let mut handshake = Handshake::start(&self.ctx, self.peer).map_err(failed)?;
        let mut out = OutBatch::new();
        loop {
            let step = handshake.on_bytes(&self.ctx, &raw, out.head());
            if !out.is_empty() {
                let (res, batch) = self.inner.write_before(out, deadline).await;
                out = batch;
                if let Err(e) = res {
                    return Err(ReadOutcome::Failed(e));
                }
            }
            match step.map_err(|e| failed(&e))? {
                HandshakeStep::NeedMore { consumed } => {
                    raw.drain(..consumed);
                }
                HandshakeStep::Done {
                    consumed,
                    mode,
                    initial_payload,
                } => {
                    self.mode = mode;
                    *buf = initial_payload;
                    let start = buf.len();
                    buf.extend_from_slice(&raw[consumed..]);
                    if let Mode::Rc4(cipher) = &mut self.mode {
                        cipher.decrypt_in_place(&mut buf[start..]);
                    }
                    return Ok(());
                }
            }
            match self
                .inner
                .read_or_wake(&mut raw, deadline, MSE_READ_SPARE_BYTES, None)
                .await
            {
                Wake::Read(ReadOutcome::Data { .. }) => {}
                Wake::Read(other) => return Err(other),
                Wake::Fetch(_) => unreachable!("no waiter during the handshake"),
            }
        }
    }
}

/// Whether the first bytes of a connection are a plaintext handshake (`Some(true)`), an
/// MSE key (`Some(false)`), or too few to tell (`None`).
pub(crate) fn classify(first: &[u8]) -> Option<bool> {
    let head = &first[..first.len().min(PLAINTEXT_PREFIX_BYTES)];
    if !head.is_empty() && !mse::is_plaintext_handshake(head) {
        return Some(false);
    }
    (head.len() == PLAINTEXT_PREFIX_BYTES).then_some(true)
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
    /// Done: input bytes after `consumed` are stream bytes, to be decrypted if `mode` is
    /// RC4; `initial_payload` (the peer's IA, plaintext) comes before them.
    Done {
        consumed: usize,
        mode: Mode,
        initial_payload: Vec<u8>,
    },
}

impl Handshake {
    /// Starts one for `peer`, unless its address is over the per-IP handshake rate.
    pub(crate) fn start(ctx: &WorkerCtx, peer: SocketAddr) -> Result<Handshake, &'static str> {
        let stats = &ctx.stats;
        if !ctx
            .mse_handshakes
            .try_hit(&crate::server::limiter::budget_key(peer.ip()))
        {
            stats.mse_refused_per_ip.inc();
            return Err("MSE handshakes per IP over the cap");
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
                crypto,
                cipher,
                initial_payload,
                ..
            }) => {
                stats.mse_handshakes_done.inc();
                let mode = match (crypto, cipher) {
                    (Crypto::Rc4, Some(cipher)) => {
                        stats.mse_rc4_selected.inc();
                        Mode::Rc4(Box::new(cipher))
                    }
                    _ => {
                        stats.mse_plaintext_selected.inc();
                        Mode::MsePlain
                    }
                };
                Ok(HandshakeStep::Done {
                    consumed,
                    mode,
                    initial_payload,
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

fn failed(why: &str) -> ReadOutcome {
    ReadOutcome::Failed(io::Error::new(io::ErrorKind::InvalidData, why.to_owned()))
}

impl<T: Transport> Transport for MseTransport<T> {
    async fn read_or_wake(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        spare_min: usize,
        waiter: Option<&flume::Receiver<FetchOutcome>>,
    ) -> Wake {
        match &mut self.mode {
            Mode::Undecided => {
                // The session's first read: its deadline is the handshake timeout. Boxed:
                // the MSE handshake's state is large and needed once per connection, so
                // it must not size the future of every later read.
                match Box::pin(self.decide(buf, deadline, spare_min)).await {
                    Ok(()) => Wake::Read(ReadOutcome::Data { filled: false }),
                    Err(outcome) => Wake::Read(outcome),
                }
            }
            Mode::Plain | Mode::MsePlain => {
                self.inner
                    .read_or_wake(buf, deadline, spare_min, waiter)
                    .await
            }
            Mode::Rc4(_) => {
                let start = buf.len();
                let wake = self
                    .inner
                    .read_or_wake(buf, deadline, spare_min, waiter)
                    .await;
                // Bytes that arrived (with data, or racing a fetch outcome) are ciphertext.
                if let Mode::Rc4(cipher) = &mut self.mode {
                    cipher.decrypt_in_place(&mut buf[start..]);
                }
                wake
            }
        }
    }

    async fn write_before(
        &mut self,
        mut batch: OutBatch,
        deadline: Instant,
    ) -> (io::Result<()>, OutBatch) {
        let Mode::Rc4(cipher) = &mut self.mode else {
            return self.inner.write_before(batch, deadline).await;
        };
        let mut enc = OutBatch::new();
        encrypt_batch(&self.ctx, cipher, &mut batch, &mut enc);
        let (res, _) = self.inner.write_before(enc, deadline).await;
        (res, batch)
    }
}
