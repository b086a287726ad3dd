//! One upstream peer connection on the miss path: we are the client. Connect, send our
//! handshake (echoing the key) and our extension handshake in one write, read the peer's
//! handshake and wait for its extension handshake (`ut_metadata` id and `metadata_size`),
//! request the pieces pipelined, assemble and verify them (`assemble`).
//!
//! The protocol logic is the sans-IO [`Exchange`]; `fetch_from_peer` only moves bytes,
//! over TCP or uTP (`utp_stream`): TCP first, uTP when TCP is refused, has not connected
//! within `UTP_HEAD_START` (250 ms, then both race and the first connected wins), or was
//! accepted and closed before the peer said a byte (a libtorrent with incoming TCP off
//! does that; docs/protocol-facts.md §13: libtorrent itself dials uTP first). Every step has a
//! deadline: `connect_timeout` for the connect, `peer_timeout` for the whole exchange
//! (connect included). Nothing we receive can make us buffer more than
//! one frame (`limits::FRAME_BYTES_MAX`, checked by the codec) or allocate more than the
//! `metadata_size` we accepted (`metadata_bytes_max`).
//!
//! We answer nothing: no bitfield, no have, no reply to the peer's requests — a
//! metadata-only client has nothing to say, and the exchange is short (no keep-alive).
//!
//! Encryption-required peers (libtorrent with `pe_forced`, webtorrent's `secure` default)
//! read our plaintext handshake and close without a word, just as a TCP-refusing one does.
//! So a plaintext attempt closed before the peer's first byte is retried once over the same
//! transport with MSE (`crate::mse::Initiator`, offering plaintext and RC4, plaintext
//! preferred: docs/protocol-facts.md §14) before moving on: TCP plaintext, TCP MSE, uTP
//! plaintext, uTP MSE, each only while the previous one ended silent and time is left.
//! [`MseLink`] moves the bytes: the MSE handshake with our BitTorrent handshake as its
//! initial payload, then RC4 (or nothing) under the unchanged [`Exchange`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::limits::{FRAME_BYTES_MAX, REQUESTS_QUEUED_MAX};
use crate::mse::{self, CryptoPolicy, Initiator, InitiatorStep, MseError, Rc4Pair};
use crate::upstream::assemble::{AssembleError, MetadataAssembler, Progress};
use crate::upstream::utp_stream::UtpStream;
use crate::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake,
    encode_metadata_request, Decoded, ExtHandshake, Frame, MetadataMsg, Reserved, WireError,
    HANDSHAKE_LEN,
};

pub use crate::wire::OUR_UT_METADATA_ID;

use crate::wire::CLIENT_VERSION;

/// Metadata requests in flight to one peer, whatever its `reqq` says. libtorrent (most of
/// any swarm) answers a ut_metadata request at once only while its send buffer holds
/// under 160 KiB (`send_buffer_limit`, 10 pieces); later requests wait for its
/// once-a-second tick. With 8 out, at most 7 pieces sit in its buffer when a request
/// arrives (room left for what else it queues: bitfield, haves), so each is answered at
/// once. Fetching 5 dicts (1 to 20 pieces) from a libtorrent seed on loopback, both
/// drivers: 250 in flight 9.0 s; 10 in flight 1.25-1.59 s and twice 5-8 s; 8 in flight
/// 1.10-1.35 s. Past 8 pieces (128 KiB, rare for an info dict) a magnetar parent costs
/// one more round trip.
pub const METADATA_REQUESTS_IN_FLIGHT_MAX: usize = 8;

/// Each read asks for at least this much room: a 16 KiB data message plus its header.
const READ_SPARE_MIN: usize = 32 * 1024;

/// How to talk to upstream peers for one info-hash.
#[derive(Clone, Debug)]
pub struct PeerFetchConfig {
    /// The 20-byte handshake key: v1 SHA-1, or a v2 SHA-256 truncated (BEP 52).
    pub key: [u8; 20],
    pub peer_id: [u8; 20],
    /// Largest `metadata_size` accepted (capped again by `limits::METADATA_BYTES_MAX`).
    pub metadata_bytes_max: usize,
    pub connect_timeout: Duration,
    /// The whole exchange, connect included.
    pub peer_timeout: Duration,
    /// Longest silence while requests are outstanding: the connection is given up and the
    /// peer gets one fresh connection (`config::PEER_STALL_TIMEOUT`).
    pub stall_timeout: Duration,
    /// Set the BEP 52 upgrade bit in our handshake. Leave it off unless the torrent is
    /// known to be v2 or hybrid: libtorrent disconnects a peer that claims it for a v1-only
    /// torrent (docs/protocol-facts.md §1), and a v2 key is accepted without it.
    pub v2_bit: bool,
}

/// Why one peer did not give us the metadata.
#[derive(thiserror::Error, Debug)]
pub enum PeerFetchError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("handshake: {0}")]
    Handshake(&'static str),
    #[error("peer does not offer ut_metadata")]
    NoMetadataSupport,
    #[error("peer sent no metadata_size")]
    NoMetadataSize,
    /// `metadata_size` is 0 or over the cap, or changed after we began requesting, or a
    /// data message's `total_size` differs from it.
    #[error("metadata size: {0}")]
    Size(AssembleError),
    #[error("peer rejected metadata piece {piece}")]
    Rejected { piece: u32 },
    #[error("protocol: {0}")]
    Protocol(String),
    /// Every piece arrived with the right sizes, but the bytes do not hash to the key.
    #[error("metadata does not hash to the info-hash")]
    HashMismatch,
    #[error("peer timed out")]
    Timeout,
    /// Nothing arrived for `stall_timeout` while requests were outstanding, twice (a
    /// fresh connection after the first).
    #[error("peer stopped sending with requests outstanding")]
    Stalled,
    #[error("i/o: {0}")]
    Io(io::Error),
    /// The MSE handshake of an encrypted retry failed.
    #[error("mse: {0}")]
    Mse(MseError),
}

impl PeerFetchError {
    /// A short stable name for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerFetchError::Connect(_) => "connect",
            PeerFetchError::Handshake(_) => "handshake",
            PeerFetchError::NoMetadataSupport => "no_metadata",
            PeerFetchError::NoMetadataSize | PeerFetchError::Size(_) => "size",
            PeerFetchError::Rejected { .. } => "rejected",
            PeerFetchError::Protocol(_) => "protocol",
            PeerFetchError::HashMismatch => "hash_mismatch",
            PeerFetchError::Timeout => "timeout",
            PeerFetchError::Stalled => "stalled",
            PeerFetchError::Io(_) => "io",
            PeerFetchError::Mse(_) => "mse",
        }
    }
}

impl From<AssembleError> for PeerFetchError {
    fn from(e: AssembleError) -> Self {
        match e {
            AssembleError::HashMismatch => PeerFetchError::HashMismatch,
            AssembleError::Empty
            | AssembleError::TooLarge { .. }
            | AssembleError::SizeChanged { .. } => PeerFetchError::Size(e),
            _ => PeerFetchError::Protocol(e.to_string()),
        }
    }
}

impl From<WireError> for PeerFetchError {
    fn from(e: WireError) -> Self {
        PeerFetchError::Protocol(e.to_string())
    }
}

/// What happened so far on one connection, for progress display and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerProgress {
    /// TCP connected; handshakes sent.
    Connected,
    /// The peer's extension handshake gave its size; requests go out now.
    MetadataSize(u64),
    /// A piece arrived: `received` of `total`.
    Piece { received: usize, total: usize },
}

/// The client side of one BEP 9 exchange after the TCP connect, without I/O: feed it
/// what the peer sends (`on_bytes`), send what it appends to `out`.
pub struct Exchange {
    key: [u8; 20],
    metadata_bytes_max: usize,
    /// The peer's 68-byte handshake has been read.
    handshake_done: bool,
    /// An extension handshake has arrived (so a missing size is the peer's answer).
    ext_seen: bool,
    peer_ut_metadata: Option<u8>,
    announced_size: Option<u64>,
    /// How many requests may be in flight (the peer's `reqq`, capped).
    window: usize,
    /// Exists once requests have started: its size is then fixed.
    asm: Option<MetadataAssembler>,
    /// Pieces `0..next_piece` have been requested.
    next_piece: u32,
    in_flight: usize,
}

/// What a batch of bytes led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Bytes consumed from the front of the buffer; send `out` and read more.
    Consumed(usize),
    /// The verified info dict.
    Done(Vec<u8>),
}

impl Exchange {
    pub fn new(key: [u8; 20], metadata_bytes_max: usize) -> Self {
        Exchange {
            key,
            metadata_bytes_max,
            handshake_done: false,
            ext_seen: false,
            peer_ut_metadata: None,
            announced_size: None,
            window: METADATA_REQUESTS_IN_FLIGHT_MAX,
            asm: None,
            next_piece: 0,
            in_flight: 0,
        }
    }

    /// Our opening: handshake and extension handshake, sent together before the peer's
    /// handshake arrives (the extension handshake is the first message, docs/protocol-facts.md §3).
    pub fn opening(&self, peer_id: &[u8; 20], v2_bit: bool, out: &mut Vec<u8>) {
        encode_handshake(out, Reserved::ours(true, false, v2_bit), &self.key, peer_id);
        ExtHandshake {
            ut_metadata: Some(OUR_UT_METADATA_ID),
            client: Some(CLIENT_VERSION.as_bytes()),
            reqq: Some(REQUESTS_QUEUED_MAX as u32),
            ..ExtHandshake::default()
        }
        .encode(out);
    }

    /// Requests are out and unanswered: the peer owes us bytes now, so its silence is a
    /// stall (a magnetar parent may hold back the size while it fetches, and that wait is
    /// not one).
    pub fn awaiting_data(&self) -> bool {
        self.in_flight > 0
    }

    /// The error that explains the peer going quiet or away at this point.
    pub fn on_silence(&self, timed_out: bool) -> PeerFetchError {
        if !self.handshake_done {
            // libtorrent closes at once on an info-hash it does not have.
            if timed_out {
                PeerFetchError::Timeout
            } else {
                PeerFetchError::Handshake("closed before its handshake")
            }
        } else if self.ext_seen && self.announced_size.is_none() {
            PeerFetchError::NoMetadataSize
        } else if timed_out {
            PeerFetchError::Timeout
        } else {
            PeerFetchError::Io(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Handles every complete message at the front of `buf`; replies go to `out`.
    pub fn on_bytes(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
        progress: &mut dyn FnMut(PeerProgress),
    ) -> Result<Step, PeerFetchError> {
        let mut pos = 0;
        if !self.handshake_done {
            match decode_handshake_head(buf) {
                Ok(Decoded::Done(head, _)) => {
                    if head.info_hash != self.key {
                        return Err(PeerFetchError::Handshake("info-hash not echoed"));
                    }
                    if !head.reserved.extension_protocol() {
                        return Err(PeerFetchError::NoMetadataSupport);
                    }
                }
                Ok(Decoded::NeedMore(_)) => return Ok(Step::Consumed(0)),
                Err(_) => return Err(PeerFetchError::Handshake("not a BitTorrent handshake")),
            }
            if buf.len() < HANDSHAKE_LEN {
                return Ok(Step::Consumed(0));
            }
            self.handshake_done = true;
            pos = HANDSHAKE_LEN;
        }
        while let Decoded::Done(frame, n) = decode_frame(&buf[pos..])? {
            pos += n;
            if let Some(info) = self.on_frame(frame, progress)? {
                return Ok(Step::Done(info));
            }
        }
        self.request_more(out);
        Ok(Step::Consumed(pos))
    }

    /// The peer's `reqq`-bounded window of requests; sent after each batch of bytes.
    fn request_more(&mut self, out: &mut Vec<u8>) {
        let (Some(asm), Some(id)) = (&self.asm, self.peer_ut_metadata) else {
            return;
        };
        let count = asm.piece_count() as u32;
        while self.in_flight < self.window && self.next_piece < count {
            encode_metadata_request(out, id, self.next_piece);
            self.next_piece += 1;
            self.in_flight += 1;
        }
    }

    fn on_frame(
        &mut self,
        frame: Frame<'_>,
        progress: &mut dyn FnMut(PeerProgress),
    ) -> Result<Option<Vec<u8>>, PeerFetchError> {
        match frame {
            Frame::Extended { id: 0, payload } => {
                self.on_ext_handshake(ExtHandshake::decode(payload)?, progress)?;
                Ok(None)
            }
            Frame::Extended {
                id: OUR_UT_METADATA_ID,
                payload,
            } => match decode_metadata(payload) {
                Ok((MetadataMsg::Data { piece, total_size }, block)) => {
                    self.on_data(piece, total_size, block, progress)
                }
                Ok((MetadataMsg::Reject { piece }, _)) => Err(PeerFetchError::Rejected { piece }),
                // It asks us for metadata we do not have; we never said we had it.
                Ok((MetadataMsg::Request { .. }, _)) => Ok(None),
                Err(WireError::UnknownMetadataType(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
            // Other extensions, BEP 3 / BEP 6 messages (bitfield, have, unchoke, ...): the
            // codec has capped their size; a metadata-only client ignores them.
            _ => Ok(None),
        }
    }

    fn on_ext_handshake(
        &mut self,
        hs: ExtHandshake<'_>,
        progress: &mut dyn FnMut(PeerProgress),
    ) -> Result<(), PeerFetchError> {
        self.ext_seen = true;
        // A later handshake replaces the ids of an earlier one; 0 or absent disables.
        self.peer_ut_metadata = hs.ut_metadata.filter(|&id| id != 0);
        if self.peer_ut_metadata.is_none() {
            return Err(PeerFetchError::NoMetadataSupport);
        }
        if let Some(reqq) = hs.reqq {
            self.window = (reqq as usize).clamp(1, METADATA_REQUESTS_IN_FLIGHT_MAX);
        }
        match (&self.asm, hs.metadata_size) {
            (Some(asm), Some(size)) if size != asm.metadata_size() => {
                Err(PeerFetchError::Size(AssembleError::SizeChanged {
                    expected: asm.metadata_size(),
                    got: size,
                }))
            }
            (Some(_), _) => Ok(()),
            (None, Some(size)) => {
                // A magnetar parent holds back the size while it fetches, and sends it in
                // a second handshake (docs/protocol-facts.md §6): requests begin with the first size.
                self.announced_size = Some(size);
                self.asm = Some(MetadataAssembler::new(
                    self.key,
                    size,
                    self.metadata_bytes_max,
                )?);
                progress(PeerProgress::MetadataSize(size));
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    fn on_data(
        &mut self,
        piece: u32,
        total_size: u64,
        block: &[u8],
        progress: &mut dyn FnMut(PeerProgress),
    ) -> Result<Option<Vec<u8>>, PeerFetchError> {
        let Some(asm) = self.asm.as_mut() else {
            return Err(PeerFetchError::Protocol(format!(
                "data for piece {piece} before any request"
            )));
        };
        if piece >= self.next_piece {
            return Err(PeerFetchError::Protocol(format!(
                "piece {piece} was not requested"
            )));
        }
        let left = asm.on_data(piece, total_size, block)?;
        self.in_flight -= 1;
        let total = asm.piece_count();
        progress(PeerProgress::Piece {
            received: total - asm.missing(),
            total,
        });
        match left {
            Progress::Need(_) => Ok(None),
            Progress::Complete => {
                let asm = self.asm.take().expect("checked above");
                Ok(Some(asm.finish()?))
            }
        }
    }
}

/// Fetches the info dict of `cfg.key` from the peer at `addr`.
pub async fn fetch_from_peer(
    addr: SocketAddr,
    cfg: &PeerFetchConfig,
) -> Result<Vec<u8>, PeerFetchError> {
    fetch_from_peer_with(addr, cfg, &mut |_| {}).await
}

/// `fetch_from_peer`, reporting progress as it goes.
///
/// Transport: TCP first; uTP when TCP is refused, has not connected within
/// `UTP_HEAD_START`, or connected but the peer closed it before sending a byte (what a
/// libtorrent with incoming TCP off does: it accepts and closes at once). The first
/// transport to connect carries the exchange; the other attempt is dropped.
///
/// Encryption: an attempt closed before the peer's first byte is retried once with MSE
/// over the same transport (an encryption-required peer reads our plaintext handshake and
/// closes), so the order after a silent TCP plaintext attempt is TCP MSE, uTP plaintext,
/// uTP MSE; after a silent uTP plaintext attempt, uTP MSE. Each runs only while the one
/// before it ended silent and the deadline is not past.
pub async fn fetch_from_peer_with(
    addr: SocketAddr,
    cfg: &PeerFetchConfig,
    progress: &mut dyn FnMut(PeerProgress),
) -> Result<Vec<u8>, PeerFetchError> {
    fetch_with_retries(addr, cfg, progress, true).await
}

/// `fetch_from_peer_with` for a configured parent: a magnetar node speaks plaintext on TCP
/// and uTP and never requires encryption, so a silent close is not retried with MSE (it
/// would only double the connections to a parent that is down or refusing).
pub async fn fetch_from_parent_with(
    addr: SocketAddr,
    cfg: &PeerFetchConfig,
    progress: &mut dyn FnMut(PeerProgress),
) -> Result<Vec<u8>, PeerFetchError> {
    fetch_with_retries(addr, cfg, progress, false).await
}

async fn fetch_with_retries(
    addr: SocketAddr,
    cfg: &PeerFetchConfig,
    progress: &mut dyn FnMut(PeerProgress),
    may_require_mse: bool,
) -> Result<Vec<u8>, PeerFetchError> {
    let deadline = Instant::now() + cfg.peer_timeout;
    let connect_deadline = deadline.min(Instant::now() + cfg.connect_timeout);
    let stream = connect_any(addr, connect_deadline).await?;
    let retries: &[(Transport, bool)] = match (&stream, may_require_mse) {
        (PeerStream::Tcp(_), true) => &[
            (Transport::Tcp, true),
            (Transport::Utp, false),
            (Transport::Utp, true),
        ],
        (PeerStream::Utp(_), true) => &[(Transport::Utp, true)],
        (PeerStream::Tcp(_), false) => &[(Transport::Utp, false)],
        (PeerStream::Utp(_), false) => &[],
    };
    let mut attempt = match stream {
        PeerStream::Tcp(_) => (Transport::Tcp, false),
        PeerStream::Utp(_) => (Transport::Utp, false),
    };
    let mut result = exchange_over(stream, cfg, deadline, progress, false).await;
    for &(transport, encrypted) in retries {
        let Err(ExchangeEnd::Silent(e)) = result else {
            break;
        };
        if Instant::now() >= deadline {
            return Err(e);
        }
        attempt = (transport, encrypted);
        result = retry_over(addr, transport, encrypted, cfg, deadline, progress, e).await;
    }
    // A stalled connection gets one successor over the same transport and encryption
    // (the peer may have dropped its side without telling us); a second stall ends it.
    if let Err(ExchangeEnd::Stalled) = result {
        if Instant::now() < deadline {
            let (transport, encrypted) = attempt;
            let stalled = PeerFetchError::Stalled;
            result = retry_over(addr, transport, encrypted, cfg, deadline, progress, stalled).await;
        }
    }
    match result {
        Ok(info) => Ok(info),
        Err(ExchangeEnd::Silent(e) | ExchangeEnd::Failed(e)) => Err(e),
        Err(ExchangeEnd::Stalled) => Err(PeerFetchError::Stalled),
    }
}

/// One retry after a silent close: a new connection over `transport`, plaintext or MSE.
/// `first` (the silent close's error) stays the error if no connection comes up: a later
/// attempt over another transport may still connect.
async fn retry_over(
    addr: SocketAddr,
    transport: Transport,
    encrypted: bool,
    cfg: &PeerFetchConfig,
    deadline: Instant,
    progress: &mut dyn FnMut(PeerProgress),
    first: PeerFetchError,
) -> Result<Vec<u8>, ExchangeEnd> {
    let connect_deadline = deadline.min(Instant::now() + cfg.connect_timeout);
    let Ok(stream) = connect_one(addr, transport, connect_deadline).await else {
        return Err(ExchangeEnd::Silent(first));
    };
    let result = exchange_over(stream, cfg, deadline, progress, encrypted).await;
    // An MSE handshake an old libtorrent refused for its own misreading of our secret
    // (`MseError::SecretMisreadByPeer`, one in 256) gets one more try with a new key.
    if let Err(ExchangeEnd::Failed(PeerFetchError::Mse(MseError::SecretMisreadByPeer))) = &result {
        let connect_deadline = deadline.min(Instant::now() + cfg.connect_timeout);
        if let Ok(stream) = connect_one(addr, transport, connect_deadline).await {
            return exchange_over(stream, cfg, deadline, progress, encrypted).await;
        }
    }
    result
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Utp,
}

/// A new connection over one given transport (a retry after a silent close).
async fn connect_one(
    addr: SocketAddr,
    transport: Transport,
    deadline: Instant,
) -> Result<PeerStream, PeerFetchError> {
    match transport {
        Transport::Tcp => {
            match monoio::time::timeout_at(deadline, TcpStream::connect_addr(addr)).await {
                Ok(Ok(s)) => Ok(PeerStream::Tcp(s)),
                Ok(Err(e)) => Err(PeerFetchError::Connect(e)),
                Err(_) => Err(connect_timed_out()),
            }
        }
        Transport::Utp => UtpStream::connect(addr, deadline)
            .await
            .map(|s| PeerStream::Utp(Box::new(s)))
            .map_err(PeerFetchError::Connect),
    }
}

/// How long TCP has alone before uTP is tried alongside it: RFC 8305's connection
/// attempt delay (250 ms), longer than a TCP connect to most peers takes.
pub const UTP_HEAD_START: Duration = Duration::from_millis(250);

/// The transport a peer connection ended up on.
enum PeerStream {
    Tcp(TcpStream),
    // Boxed: a uTP connection holds its buffers inline; one per fetch attempt.
    Utp(Box<UtpStream>),
}

/// Why an exchange ended without the info dict.
enum ExchangeEnd {
    /// The peer closed (or reset) before sending a single byte.
    Silent(PeerFetchError),
    /// The peer sent nothing for `stall_timeout` while our requests were outstanding.
    Stalled,
    Failed(PeerFetchError),
}

fn connect_timed_out() -> PeerFetchError {
    PeerFetchError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
}

/// TCP and, after `UTP_HEAD_START` or a TCP failure, uTP: the first connected wins.
async fn connect_any(addr: SocketAddr, deadline: Instant) -> Result<PeerStream, PeerFetchError> {
    let tcp = monoio::time::timeout_at(deadline, TcpStream::connect_addr(addr));
    let mut tcp = std::pin::pin!(tcp);
    let head_start = deadline.min(Instant::now() + UTP_HEAD_START);
    let tcp_error = monoio::select! {
        r = &mut tcp => match r {
            Ok(Ok(s)) => return Ok(PeerStream::Tcp(s)),
            Ok(Err(e)) => Some(e),
            Err(_) => return Err(connect_timed_out()),
        },
        _ = monoio::time::sleep_until(head_start) => None,
    };
    let utp = std::pin::pin!(UtpStream::connect(addr, deadline));
    let mut utp = utp;
    let Some(tcp_error) = tcp_error else {
        // Both race.
        let first = monoio::select! {
            r = &mut tcp => Err(r),
            r = &mut utp => Ok(r),
        };
        return match first {
            Err(Ok(Ok(s))) => Ok(PeerStream::Tcp(s)),
            Ok(Ok(s)) => Ok(PeerStream::Utp(Box::new(s))),
            // One failed: the other may still connect.
            Err(_) => utp
                .await
                .map(|s| PeerStream::Utp(Box::new(s)))
                .map_err(PeerFetchError::Connect),
            Ok(Err(utp_error)) => match tcp.await {
                Ok(Ok(s)) => Ok(PeerStream::Tcp(s)),
                Ok(Err(_)) | Err(_) => Err(PeerFetchError::Connect(utp_error)),
            },
        };
    };
    utp.await
        .map(|s| PeerStream::Utp(Box::new(s)))
        .map_err(|utp_error| {
            PeerFetchError::Connect(io::Error::new(
                tcp_error.kind(),
                format!("tcp: {tcp_error}; utp: {utp_error}"),
            ))
        })
}

/// Runs the `Exchange` over a connected stream; with `encrypted`, inside MSE (`MseLink`).
async fn exchange_over(
    mut stream: PeerStream,
    cfg: &PeerFetchConfig,
    deadline: Instant,
    progress: &mut dyn FnMut(PeerProgress),
    encrypted: bool,
) -> Result<Vec<u8>, ExchangeEnd> {
    if let PeerStream::Tcp(s) = &mut stream {
        // Requests are small and answered at once; do not let Nagle hold them back.
        let _ = s.set_nodelay(true);
    }
    progress(PeerProgress::Connected);
    let mut ex = Exchange::new(cfg.key, cfg.metadata_bytes_max);
    let mut out = Vec::with_capacity(256);
    ex.opening(&cfg.peer_id, cfg.v2_bit, &mut out);
    let mut rbuf: Vec<u8> = Vec::with_capacity(READ_SPARE_MIN);
    let mut heard = false;
    let failed = ExchangeEnd::Failed;
    let mut link = MseLink::Plain;
    if encrypted {
        // Our handshake travels as MSE's initial payload; the rest of the opening after it.
        let ia: Vec<u8> = out.drain(..HANDSHAKE_LEN).collect();
        link = MseLink::handshake(&mut stream, &ia, cfg.key, deadline, &mut rbuf).await?;
        heard = true;
        // Stream bytes that came with the end of the MSE handshake (the peer's handshake,
        // typically) are already here: handle them before waiting for more.
        if !rbuf.is_empty() {
            match ex.on_bytes(&rbuf, &mut out, progress).map_err(failed)? {
                Step::Done(info) => return Ok(info),
                Step::Consumed(n) => {
                    rbuf.drain(..n);
                }
            }
        }
    }
    loop {
        if !out.is_empty() {
            link.encrypt(&mut out);
            out = write_before(&mut stream, out, deadline)
                .await
                .map_err(failed)?;
        }
        let before = rbuf.len();
        let stall_at = ex
            .awaiting_data()
            .then(|| Instant::now() + cfg.stall_timeout)
            .filter(|&t| t < deadline);
        match read_before(&mut stream, rbuf, stall_at.unwrap_or(deadline)).await {
            Ok(buf) => rbuf = buf,
            Err(ReadEnd::Eof) if !heard => return Err(ExchangeEnd::Silent(ex.on_silence(false))),
            Err(ReadEnd::Eof) => return Err(failed(ex.on_silence(false))),
            Err(ReadEnd::Deadline) if stall_at.is_some() => {
                if let PeerStream::Utp(s) = stream {
                    // A RESET, so a peer whose side still lives drops it now: the fresh
                    // connection is not refused as a duplicate of this one.
                    (*s).abort().await;
                }
                return Err(ExchangeEnd::Stalled);
            }
            Err(ReadEnd::Deadline) => return Err(failed(ex.on_silence(true))),
            Err(ReadEnd::Failed(e)) if !heard && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ExchangeEnd::Silent(PeerFetchError::Io(e)))
            }
            Err(ReadEnd::Failed(e)) => return Err(failed(PeerFetchError::Io(e))),
        }
        heard = true;
        link.decrypt(&mut rbuf[before..]);
        match ex.on_bytes(&rbuf, &mut out, progress).map_err(failed)? {
            Step::Done(info) => {
                if let PeerStream::Utp(s) = stream {
                    // FIN in the background: the caller has what it came for.
                    monoio::spawn((*s).close());
                }
                return Ok(info);
            }
            Step::Consumed(n) => {
                rbuf.drain(..n);
            }
        }
        // The codec refuses frames over FRAME_BYTES_MAX, so what is left is a partial
        // frame at most that large.
        debug_assert!(rbuf.len() <= FRAME_BYTES_MAX + 4 + READ_SPARE_MIN);
    }
}

/// What lies between the `Exchange` and the socket: nothing, or the RC4 pair of an MSE
/// connection that selected RC4. (MSE with plaintext selected is `Plain` after the
/// handshake.)
enum MseLink {
    Plain,
    Rc4(Rc4Pair),
}

impl MseLink {
    /// Runs the MSE initiator over `stream` (offering plaintext and RC4, plaintext
    /// preferred) with `ia` (our BitTorrent handshake) as the initial payload. On success
    /// `rbuf` holds the stream bytes read past the handshake, already decrypted.
    async fn handshake(
        stream: &mut PeerStream,
        ia: &[u8],
        key: [u8; 20],
        deadline: Instant,
        rbuf: &mut Vec<u8>,
    ) -> Result<MseLink, ExchangeEnd> {
        let failed = |e| ExchangeEnd::Failed(PeerFetchError::Mse(e));
        let random = |e: getrandom::Error| {
            ExchangeEnd::Failed(PeerFetchError::Io(io::Error::other(e.to_string())))
        };
        let secret = mse::random_secret().map_err(random)?;
        let pad_len = mse::random_pad_len().map_err(random)?;
        let mut init = Initiator::new(&secret, pad_len, key, CryptoPolicy::PreferPlaintext);
        let mut out = Vec::with_capacity(1024);
        init.opening(&mut out);
        let mut heard = false;
        loop {
            if !out.is_empty() {
                out = write_before(stream, out, deadline)
                    .await
                    .map_err(ExchangeEnd::Failed)?;
            }
            match read_before(stream, std::mem::take(rbuf), deadline).await {
                Ok(buf) => *rbuf = buf,
                Err(ReadEnd::Eof) if !heard => {
                    return Err(ExchangeEnd::Silent(PeerFetchError::Handshake(
                        "closed before answering MSE",
                    )))
                }
                Err(ReadEnd::Eof) => return Err(failed(init.on_eof())),
                Err(ReadEnd::Deadline) => return Err(ExchangeEnd::Failed(PeerFetchError::Timeout)),
                Err(ReadEnd::Failed(e)) if !heard && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ExchangeEnd::Silent(PeerFetchError::Io(e)))
                }
                // A peer that closes with our step 3 unread resets: the same end as a close.
                Err(ReadEnd::Failed(e))
                    if e.kind() == io::ErrorKind::ConnectionReset
                        && init.on_eof() == MseError::SecretMisreadByPeer =>
                {
                    return Err(failed(MseError::SecretMisreadByPeer))
                }
                Err(ReadEnd::Failed(e)) => return Err(ExchangeEnd::Failed(PeerFetchError::Io(e))),
            }
            heard = true;
            match init.on_bytes(rbuf, &mut out, ia).map_err(failed)? {
                InitiatorStep::NeedMore { consumed } => {
                    rbuf.drain(..consumed);
                }
                InitiatorStep::Done {
                    consumed, cipher, ..
                } => {
                    rbuf.drain(..consumed);
                    // Step 3, unless a peer answered before reading it (Yb and step 4 in
                    // one read): it must still go out, in the clear stream position.
                    if !out.is_empty() {
                        write_before(stream, out, deadline)
                            .await
                            .map_err(ExchangeEnd::Failed)?;
                    }
                    let mut link = match cipher {
                        Some(c) => MseLink::Rc4(c),
                        None => MseLink::Plain,
                    };
                    link.decrypt(rbuf);
                    return Ok(link);
                }
            }
        }
    }

    fn encrypt(&mut self, buf: &mut [u8]) {
        if let MseLink::Rc4(c) = self {
            c.encrypt_in_place(buf);
        }
    }

    fn decrypt(&mut self, buf: &mut [u8]) {
        if let MseLink::Rc4(c) = self {
            c.decrypt_in_place(buf);
        }
    }
}

enum ReadEnd {
    Eof,
    Deadline,
    Failed(io::Error),
}

/// One read into the spare room of `buf`. On the deadline the in-flight read is dropped
/// (monoio cancels it) together with its buffer: the connection is abandoned anyway.
async fn read_before(
    stream: &mut PeerStream,
    mut buf: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, ReadEnd> {
    let stream = match stream {
        PeerStream::Tcp(s) => s,
        PeerStream::Utp(s) => {
            return match s.read(&mut buf, deadline).await {
                Ok(0) => Err(ReadEnd::Eof),
                Ok(_) => Ok(buf),
                Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() >= deadline => {
                    Err(ReadEnd::Deadline)
                }
                Err(e) => Err(ReadEnd::Failed(e)),
            }
        }
    };
    if buf.capacity() - buf.len() < READ_SPARE_MIN {
        buf.reserve(READ_SPARE_MIN);
    }
    let len = buf.len();
    let read = stream.read(buf.slice_mut(len..));
    match monoio::time::timeout_at(deadline, read).await {
        Err(_) => Err(ReadEnd::Deadline),
        Ok((Ok(0), _)) => Err(ReadEnd::Eof),
        Ok((Ok(_), slice)) => Ok(slice.into_inner()),
        Ok((Err(e), _)) => Err(ReadEnd::Failed(e)),
    }
}

/// Writes all of `out` (a plain buffer: monoio's `write_all` is correct for those) and
/// returns it cleared for reuse.
async fn write_before(
    stream: &mut PeerStream,
    mut out: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, PeerFetchError> {
    let stream = match stream {
        PeerStream::Tcp(s) => s,
        PeerStream::Utp(s) => {
            let bytes = std::mem::replace(&mut out, Vec::with_capacity(256));
            return match s.write_all(bytes, deadline).await {
                Ok(()) => Ok(out),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(PeerFetchError::Timeout),
                Err(e) => Err(PeerFetchError::Io(e)),
            };
        }
    };
    match monoio::time::timeout_at(deadline, stream.write_all(out)).await {
        Err(_) => Err(PeerFetchError::Timeout),
        Ok((Err(e), _)) => Err(PeerFetchError::Io(e)),
        Ok((Ok(_), mut out)) => {
            out.clear();
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::METADATA_PIECE_BYTES;
    use crate::wire::test_rng::XorShift;
    use crate::wire::{
        encode_frame, encode_metadata_data_header, encode_metadata_reject, metadata_piece_range,
    };
    use sha1::{Digest, Sha1};

    const THEIR_ID: u8 = 42;

    fn their_handshake(key: &[u8; 20], reserved: Reserved) -> Vec<u8> {
        let mut out = Vec::new();
        encode_handshake(&mut out, reserved, key, &[5; 20]);
        out
    }

    fn ext(size: Option<u64>, id: Option<u8>, reqq: Option<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        ExtHandshake {
            ut_metadata: id,
            metadata_size: size,
            reqq,
            ..ExtHandshake::default()
        }
        .encode(&mut out);
        out
    }

    fn data(info: &[u8], piece: u32, total: u64) -> Vec<u8> {
        let range = metadata_piece_range(info.len(), piece).unwrap();
        let mut out = Vec::new();
        encode_metadata_data_header(&mut out, OUR_UT_METADATA_ID, piece, total, range.len());
        out.extend_from_slice(&info[range]);
        out
    }

    /// Pieces requested in `out` (frames addressed to the peer's id).
    fn requested(out: &[u8]) -> Vec<u32> {
        let mut pieces = Vec::new();
        let mut pos = 0;
        while let Ok(Decoded::Done(f, n)) = decode_frame(&out[pos..]) {
            pos += n;
            if let Frame::Extended { id, payload } = f {
                assert_eq!(id, THEIR_ID);
                if let Ok((MetadataMsg::Request { piece }, _)) = decode_metadata(payload) {
                    pieces.push(piece);
                }
            }
        }
        assert_eq!(pos, out.len());
        pieces
    }

    fn run(ex: &mut Exchange, bytes: &[u8], out: &mut Vec<u8>) -> Result<Step, PeerFetchError> {
        ex.on_bytes(bytes, out, &mut |_| {})
    }

    fn setup(info: &[u8]) -> (Exchange, [u8; 20]) {
        let key: [u8; 20] = Sha1::digest(info).into();
        (Exchange::new(key, 1 << 20), key)
    }

    #[test]
    fn opening_is_handshake_then_ext_handshake_without_size() {
        let ex = Exchange::new([3; 20], 1000);
        let mut out = Vec::new();
        ex.opening(&[4; 20], false, &mut out);
        let Ok(Decoded::Done(head, _)) = decode_handshake_head(&out) else {
            panic!()
        };
        assert_eq!(head.info_hash, [3; 20]);
        assert!(head.reserved.fast() && head.reserved.extension_protocol());
        assert!(!head.reserved.v2_upgrade() && !head.reserved.dht());
        let Ok(Decoded::Done(Frame::Extended { id: 0, payload }, n)) =
            decode_frame(&out[HANDSHAKE_LEN..])
        else {
            panic!()
        };
        assert_eq!(HANDSHAKE_LEN + n, out.len());
        let hs = ExtHandshake::decode(payload).unwrap();
        assert_eq!(hs.ut_metadata, Some(OUR_UT_METADATA_ID));
        assert_eq!(hs.metadata_size, None);
        assert!(hs.client.is_some() && hs.reqq.is_some());
    }

    /// A peer advertising a deep queue (libtorrent: 250) still gets at most
    /// `METADATA_REQUESTS_IN_FLIGHT_MAX` requests, and each answer lets one more out.
    #[test]
    fn requests_in_flight_are_capped_below_a_large_reqq() {
        let info = XorShift::new(6).bytes(20 * METADATA_PIECE_BYTES);
        let total = info.len() as u64;
        let (mut ex, key) = setup(&info);
        let mut stream = their_handshake(&key, Reserved::ours(true, true, false));
        stream.extend_from_slice(&ext(Some(total), Some(THEIR_ID), Some(250)));
        let mut out = Vec::new();
        run(&mut ex, &stream, &mut out).unwrap();
        let cap = METADATA_REQUESTS_IN_FLIGHT_MAX as u32;
        assert_eq!(requested(&out), (0..cap).collect::<Vec<_>>());
        assert!(ex.awaiting_data());
        out.clear();
        run(&mut ex, &data(&info, 0, total), &mut out).unwrap();
        assert_eq!(requested(&out), vec![cap]);
    }

    #[test]
    fn whole_exchange_byte_by_byte_and_at_once() {
        let mut rng = XorShift::new(5);
        let info = rng.bytes(3 * METADATA_PIECE_BYTES + 100);
        let total = info.len() as u64;
        for at_once in [true, false] {
            let (mut ex, key) = setup(&info);
            let mut stream = their_handshake(&key, Reserved::ours(true, true, false));
            let mut noise = Vec::new();
            encode_frame(&mut noise, &Frame::Bitfield(&[0xff; 30]));
            encode_frame(&mut noise, &Frame::Unchoke);
            encode_frame(&mut noise, &Frame::HaveAll);
            stream.extend_from_slice(&noise);
            stream.extend_from_slice(&ext(Some(total), Some(THEIR_ID), Some(2)));
            let mut out = Vec::new();
            let mut buf = Vec::new();
            let mut fed = 0;
            // Feed the opening until requests go out.
            while out.is_empty() {
                let step = if at_once { stream.len() } else { 1 };
                buf.extend_from_slice(&stream[fed..fed + step]);
                fed += step;
                let Step::Consumed(n) = run(&mut ex, &buf, &mut out).unwrap() else {
                    panic!()
                };
                buf.drain(..n);
            }
            assert_eq!(fed, stream.len());
            assert_eq!(requested(&out), vec![0, 1], "reqq 2 bounds the window");
            // Answer in reverse order within the window; the window slides.
            let mut got = None;
            for answer in [1u32, 0, 3, 2] {
                out.clear();
                let msg = data(&info, answer, total);
                let chunks: Vec<&[u8]> = if at_once {
                    vec![&msg]
                } else {
                    msg.chunks(1000).collect()
                };
                for c in chunks {
                    buf.extend_from_slice(c);
                    match run(&mut ex, &buf, &mut out).unwrap() {
                        Step::Consumed(n) => {
                            buf.drain(..n);
                        }
                        Step::Done(v) => got = Some(v),
                    }
                }
                // Each answer frees a slot in the window: the next piece goes out.
                match answer {
                    1 => assert_eq!(requested(&out), vec![2]),
                    0 => assert_eq!(requested(&out), vec![3]),
                    _ => assert!(out.is_empty()),
                }
            }
            assert_eq!(got.unwrap(), info);
        }
    }

    #[test]
    fn hostile_peers() {
        let info = vec![b'i'; 2 * METADATA_PIECE_BYTES];
        let total = info.len() as u64;
        let (_, key) = setup(&info);
        let good_hs = their_handshake(&key, Reserved::ours(true, false, false));
        let opening = |extra: &[&[u8]]| {
            let mut v = good_hs.clone();
            for e in extra {
                v.extend_from_slice(e);
            }
            v
        };
        // Feeds each batch as one read; the last must fail.
        let reason = |batches: &[&[u8]]| {
            let (mut ex, _) = setup(&info);
            let mut out = Vec::new();
            let mut buf = Vec::new();
            for b in batches {
                buf.extend_from_slice(b);
                match run(&mut ex, &buf, &mut out) {
                    Err(e) => return e.reason(),
                    Ok(Step::Consumed(n)) => {
                        buf.drain(..n);
                    }
                    Ok(Step::Done(_)) => panic!("done"),
                }
            }
            panic!("no error")
        };
        let wrong_key = their_handshake(&[0; 20], Reserved::ours(true, false, false));
        assert_eq!(reason(&[&wrong_key]), "handshake");
        assert_eq!(reason(&[b"GET / HTTP/1.1\r\n\r\n"]), "handshake");
        assert_eq!(
            reason(&[&their_handshake(&key, Reserved([0; 8]))]),
            "no_metadata"
        );
        assert_eq!(
            reason(&[&good_hs, &ext(Some(total), None, None)]),
            "no_metadata"
        );
        assert_eq!(
            reason(&[&good_hs, &ext(Some(total), Some(0), None)]),
            "no_metadata"
        );
        assert_eq!(
            reason(&[&good_hs, &ext(Some(0), Some(THEIR_ID), None)]),
            "size"
        );
        let huge = ext(Some(4 << 30), Some(THEIR_ID), None);
        assert_eq!(reason(&[&good_hs, &huge]), "size");
        let ok_ext = opening(&[&ext(Some(total), Some(THEIR_ID), None)]);
        // Size changes in a later handshake, after requests began.
        let changed = ext(Some(total + 1), Some(THEIR_ID), None);
        assert_eq!(reason(&[&ok_ext, &changed]), "size");
        // A later handshake that drops ut_metadata.
        assert_eq!(reason(&[&ok_ext, &ext(None, None, None)]), "no_metadata");
        // Data the peer was not asked for: before any request (even in the same read as
        // its handshake: it cannot have seen our requests), and past the window.
        assert_eq!(reason(&[&good_hs, &data(&info, 0, total)]), "protocol");
        let same_read = opening(&[
            &ext(Some(total), Some(THEIR_ID), None),
            &data(&info, 0, total),
        ]);
        assert_eq!(reason(&[&same_read]), "protocol");
        let narrow = opening(&[&ext(Some(total), Some(THEIR_ID), Some(1))]);
        assert_eq!(reason(&[&narrow, &data(&info, 1, total)]), "protocol");
        // Duplicate piece.
        let dup = data(&info, 0, total);
        assert_eq!(reason(&[&ok_ext, &dup, &dup]), "protocol");
        // Wrong piece size: a short block.
        let mut short = Vec::new();
        encode_metadata_data_header(&mut short, OUR_UT_METADATA_ID, 0, total, 10);
        short.extend_from_slice(&[0; 10]);
        assert_eq!(reason(&[&ok_ext, &short]), "protocol");
        // total_size lies mid-way.
        assert_eq!(reason(&[&ok_ext, &dup, &data(&info, 1, total + 5)]), "size");
        // Reject.
        let mut reject = Vec::new();
        encode_metadata_reject(&mut reject, OUR_UT_METADATA_ID, 0);
        assert_eq!(reason(&[&ok_ext, &reject]), "rejected");
        // Oversized frame.
        assert_eq!(reason(&[&good_hs, &u32::MAX.to_be_bytes()]), "protocol");
        // Wrong bytes of the right sizes.
        let lie = vec![b'j'; info.len()];
        let lies = [data(&lie, 0, total), data(&lie, 1, total)].concat();
        assert_eq!(reason(&[&ok_ext, &lies]), "hash_mismatch");
    }

    #[test]
    fn size_may_come_in_a_later_handshake_and_silence_is_explained() {
        let info = b"d4:name1:xe".to_vec();
        let total = info.len() as u64;
        let (mut ex, key) = setup(&info);
        let mut out = Vec::new();
        assert_eq!(ex.on_silence(false).reason(), "handshake");
        assert_eq!(ex.on_silence(true).reason(), "timeout");
        let mut bytes = their_handshake(&key, Reserved::ours(false, false, false));
        bytes.extend_from_slice(&ext(None, Some(THEIR_ID), None));
        assert_eq!(
            run(&mut ex, &bytes, &mut out).unwrap(),
            Step::Consumed(bytes.len())
        );
        assert!(out.is_empty());
        assert_eq!(ex.on_silence(true).reason(), "size");
        let later = ext(Some(total), Some(7), None);
        run(&mut ex, &later, &mut out).unwrap();
        let mut pos = 0;
        let Ok(Decoded::Done(Frame::Extended { id: 7, .. }, n)) = decode_frame(&out[pos..]) else {
            panic!("request goes to the id of the later handshake")
        };
        pos += n;
        assert_eq!(pos, out.len());
        assert_eq!(ex.on_silence(true).reason(), "timeout");
        let step = run(&mut ex, &data(&info, 0, total), &mut out).unwrap();
        assert_eq!(step, Step::Done(info));
    }

    #[test]
    fn random_inputs_never_panic() {
        let info = vec![b'q'; METADATA_PIECE_BYTES + 3];
        let total = info.len() as u64;
        let (_, key) = setup(&info);
        let mut valid = their_handshake(&key, Reserved::ours(true, false, false));
        valid.extend_from_slice(&ext(Some(total), Some(THEIR_ID), None));
        valid.extend_from_slice(&data(&info, 0, total));
        valid.extend_from_slice(&data(&info, 1, total));
        let mut rng = XorShift::new(77);
        for i in 0..3_000 {
            let input = if i % 3 == 0 {
                rng.bytes_below(300)
            } else {
                rng.mutate(&valid)
            };
            let (mut ex, _) = setup(&info);
            let mut out = Vec::new();
            if let Ok(Step::Consumed(n)) = run(&mut ex, &input, &mut out) {
                assert!(n <= input.len());
            }
        }
    }
}
