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

enum Mode {
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
            let head = &raw[..raw.len().min(PLAINTEXT_PREFIX_BYTES)];
            if !head.is_empty() && !mse::is_plaintext_handshake(head) {
                break false;
            }
            if head.len() == PLAINTEXT_PREFIX_BYTES {
                break true;
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
        let stats = &self.ctx.stats;
        if !self
            .ctx
            .mse_handshakes
            .try_hit(&crate::server::limiter::budget_key(self.peer.ip()))
        {
            stats.mse_refused_per_ip.inc();
            return Err(failed("MSE handshakes per IP over the cap"));
        }
        stats.mse_handshakes_started.inc();
        let (Ok(secret), Ok(pad_len)) = (mse::random_secret(), mse::random_pad_len()) else {
            return Err(failed("no randomness for the MSE key"));
        };
        let mut responder = Responder::new(&secret, pad_len, CryptoPolicy::PreferPlaintext);
        let store = self.ctx.store.clone();
        let mut lookup = |req2: &[u8; 20]| store.lookup_req2(req2);
        let mut out = OutBatch::new();
        loop {
            let step = responder.on_bytes(&raw, out.head(), &mut lookup);
            if !out.is_empty() {
                let (res, batch) = self.inner.write_before(out, deadline).await;
                out = batch;
                if let Err(e) = res {
                    return Err(ReadOutcome::Failed(e));
                }
            }
            match step {
                Ok(ResponderStep::NeedMore { consumed }) => {
                    raw.drain(..consumed);
                }
                Ok(ResponderStep::Done {
                    consumed,
                    crypto,
                    cipher,
                    initial_payload,
                    ..
                }) => {
                    stats.mse_handshakes_done.inc();
                    let mut rest = raw.split_off(consumed);
                    buf.clear();
                    buf.extend_from_slice(&initial_payload);
                    match (crypto, cipher) {
                        (Crypto::Rc4, Some(mut cipher)) => {
                            stats.mse_rc4_selected.inc();
                            cipher.decrypt_in_place(&mut rest);
                            self.mode = Mode::Rc4(Box::new(cipher));
                        }
                        _ => {
                            stats.mse_plaintext_selected.inc();
                            self.mode = Mode::MsePlain;
                        }
                    }
                    buf.extend_from_slice(&rest);
                    return Ok(());
                }
                Err(e) => {
                    if e.is_unknown_info_hash() {
                        // Recognisable only: a hash we do not hold cannot be fetched.
                        stats.mse_unknown_info_hash.inc();
                    } else {
                        stats.mse_handshakes_failed.inc();
                    }
                    return Err(failed(&format!("MSE: {e}")));
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
        // RC4: the batch's bytes (headers and mmap slices) are encrypted into a fresh
        // batch's head; the mmap is never written.
        batch.seal();
        let total = batch.sealed_len();
        let mut enc = OutBatch::new();
        let mut offset = 0;
        while offset < total {
            let run = batch.contiguous_at(offset);
            cipher.encrypt_into(run, enc.head());
            offset += run.len();
        }
        self.ctx.stats.mse_rc4_bytes_encrypted.add(total as u64);
        batch.clear();
        let (res, _) = self.inner.write_before(enc, deadline).await;
        (res, batch)
    }
}
