//! One simulated peer's side of the BEP 3 + BEP 10 + BEP 9 conversation, driven by the
//! sans-IO codec (`magnetar::wire`): what to send, and what every received byte means.
//! `Conversation` never touches a socket; `run::fetch_on` feeds it what a connection reads
//! and writes what it asks for, so the same logic runs under io_uring, epoll and unit tests.

use magnetar::metainfo::validate_info;
use magnetar::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake,
    encode_metadata_request, metadata_piece_count, metadata_piece_range, Decoded, ExtHandshake,
    Frame, MetadataMsg, Reserved, HANDSHAKE_LEN,
};

/// Our ut_metadata id in our extension handshake: peers put it in the messages they send us.
pub const OUR_UT_METADATA: u8 = 3;
/// Largest info dict we accept, as libtorrent (docs/protocol-facts.md §10).
const METADATA_BYTES_MAX: u64 = 30 * 1024 * 1024;

/// Why a fetch failed. Each kind is counted separately in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FetchError {
    Connect,
    Io,
    /// The connection closed before the fetch finished.
    Closed,
    Timeout,
    /// Bytes that are not a valid message.
    Protocol,
    /// The handshake echoed another info-hash, or lacks the BEP 10 bit.
    BadHandshake,
    /// The extension handshake has no ut_metadata, or an absurd metadata_size.
    NoMetadata,
    /// A ut_metadata reject (or libtorrent's "don't have").
    Rejected,
    /// A data message we did not ask for, or with the wrong size or total_size.
    BadData,
    /// `--verify`: the assembled dict does not hash to the info-hash.
    Verify,
}

impl FetchError {
    pub fn name(self) -> &'static str {
        match self {
            FetchError::Connect => "connect",
            FetchError::Io => "io",
            FetchError::Closed => "closed",
            FetchError::Timeout => "timeout",
            FetchError::Protocol => "protocol",
            FetchError::BadHandshake => "bad_handshake",
            FetchError::NoMetadata => "no_metadata",
            FetchError::Rejected => "rejected",
            FetchError::BadData => "bad_data",
            FetchError::Verify => "verify",
        }
    }

    pub const ALL: [FetchError; 10] = [
        FetchError::Connect,
        FetchError::Io,
        FetchError::Closed,
        FetchError::Timeout,
        FetchError::Protocol,
        FetchError::BadHandshake,
        FetchError::NoMetadata,
        FetchError::Rejected,
        FetchError::BadData,
        FetchError::Verify,
    ];
}

/// What happened to the bytes fed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing to report; read more.
    Nothing,
    /// The peer's extension handshake said `metadata_size`: requests are in the out buffer.
    Ready { metadata_size: u64 },
    /// The peer answered with an extension handshake without `metadata_size` (a cache
    /// miss that is still being fetched, or a peer without the torrent).
    NoMetadataYet,
    /// `n` data blocks arrived (the first one may be the time to first block).
    Blocks { n: u32, bytes: u64 },
    /// Every piece of the round arrived and checked out (and was hashed, with `verify`).
    RoundDone { blocks: u32, bytes: u64 },
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    ExtHandshake,
    Pieces,
    /// A round finished; `start_round` begins the next (keepalive) one.
    Idle,
}

/// The client side of one connection, for one info-hash.
pub struct Conversation {
    key: [u8; 20],
    pipeline: usize,
    verify: bool,
    phase: Phase,
    peer_ut_metadata: u8,
    size: u64,
    pieces: u32,
    next_request: u32,
    received: u32,
    /// Bit per piece of this round: requested and not yet received.
    outstanding: Vec<u64>,
    assembled: Vec<u8>,
    /// Unconsumed received bytes.
    inbuf: Vec<u8>,
    /// Bytes to send (the caller drains it).
    pub out: Vec<u8>,
}

impl Conversation {
    /// Starts the conversation: our handshake and extension handshake are in `out` at once
    /// (one write; peers accept the extension handshake before they answered).
    pub fn new(key: [u8; 20], peer_id: [u8; 20], pipeline: usize, verify: bool) -> Self {
        let mut out = Vec::with_capacity(256);
        encode_handshake(&mut out, Reserved::ours(true, false, false), &key, &peer_id);
        ExtHandshake {
            ut_metadata: Some(OUR_UT_METADATA),
            client: Some(b"magnetar-loadgen"),
            reqq: Some(250),
            ..Default::default()
        }
        .encode(&mut out);
        Conversation {
            key,
            pipeline: pipeline.max(1),
            verify,
            phase: Phase::Handshake,
            peer_ut_metadata: 0,
            size: 0,
            pieces: 0,
            next_request: 0,
            received: 0,
            outstanding: Vec::new(),
            assembled: Vec::new(),
            inbuf: Vec::with_capacity(32 * 1024),
            out,
        }
    }

    pub fn metadata_size(&self) -> u64 {
        self.size
    }

    /// Keepalive mode: ask for every piece again on the same connection.
    pub fn start_round(&mut self) {
        debug_assert_eq!(self.phase, Phase::Idle);
        self.phase = Phase::Pieces;
        self.next_request = 0;
        self.received = 0;
        self.assembled.clear();
        self.request_more();
    }

    fn request_more(&mut self) {
        while self.next_request < self.pieces
            && (self.next_request - self.received) < self.pipeline as u32
        {
            let p = self.next_request;
            encode_metadata_request(&mut self.out, self.peer_ut_metadata, p);
            self.outstanding[p as usize / 64] |= 1 << (p % 64);
            self.next_request += 1;
        }
    }

    /// Feeds received bytes; returns what they completed. Call again with `&[]` after
    /// `Ready`/`Blocks` events to drain frames that arrived in the same read.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Event, FetchError> {
        self.inbuf.extend_from_slice(bytes);
        let mut used = 0;
        let mut blocks = 0u32;
        let mut block_bytes = 0u64;
        let result = loop {
            let buf = &self.inbuf[used..];
            if self.phase == Phase::Handshake {
                match decode_handshake_head(buf) {
                    Ok(Decoded::Done(head, _)) => {
                        if buf.len() < HANDSHAKE_LEN {
                            break Ok(Event::Nothing);
                        }
                        if head.info_hash != self.key || !head.reserved.extension_protocol() {
                            break Err(FetchError::BadHandshake);
                        }
                        used += HANDSHAKE_LEN;
                        self.phase = Phase::ExtHandshake;
                        continue;
                    }
                    Ok(Decoded::NeedMore(_)) => break Ok(Event::Nothing),
                    Err(_) => break Err(FetchError::BadHandshake),
                }
            }
            let (frame, n) = match decode_frame(buf) {
                Ok(Decoded::Done(f, n)) => (f, n),
                Ok(Decoded::NeedMore(_)) => break Ok(Event::Nothing),
                Err(_) => break Err(FetchError::Protocol),
            };
            used += n;
            let Frame::Extended { id, payload } = frame else {
                continue; // bitfield, have-all/none, unchoke, keep-alive, ...
            };
            if id == 0 {
                let Ok(hs) = ExtHandshake::decode(payload) else {
                    break Err(FetchError::Protocol);
                };
                if self.phase != Phase::ExtHandshake {
                    continue; // a later handshake (e.g. upload_only): nothing we need
                }
                let Some(ut) = hs.ut_metadata.filter(|&i| i != 0) else {
                    break Err(FetchError::NoMetadata);
                };
                let Some(size) = hs.metadata_size else {
                    break Ok(Event::NoMetadataYet);
                };
                if size == 0 || size > METADATA_BYTES_MAX {
                    break Err(FetchError::NoMetadata);
                }
                self.peer_ut_metadata = ut;
                self.size = size;
                self.pieces = metadata_piece_count(size as usize) as u32;
                self.outstanding = vec![0; (self.pieces as usize).div_ceil(64)];
                self.phase = Phase::Pieces;
                self.request_more();
                break Ok(Event::Ready {
                    metadata_size: size,
                });
            }
            if id != OUR_UT_METADATA || self.phase != Phase::Pieces {
                continue; // ut_pex and friends
            }
            let (msg, block) = match decode_metadata(payload) {
                Ok(m) => m,
                Err(e) if !e.closes_connection() => continue,
                Err(_) => break Err(FetchError::Protocol),
            };
            match msg {
                MetadataMsg::Request { .. } => continue, // we have nothing to give
                MetadataMsg::Reject { .. } => break Err(FetchError::Rejected),
                MetadataMsg::Data { piece, total_size } => {
                    let range = metadata_piece_range(self.size as usize, piece);
                    let word = piece as usize / 64;
                    let bit = 1u64 << (piece % 64);
                    let asked = self.outstanding.get(word).is_some_and(|w| w & bit != 0);
                    if !asked
                        || total_size != self.size
                        || range.as_ref().map(|r| r.len()) != Some(block.len())
                    {
                        break Err(FetchError::BadData);
                    }
                    self.outstanding[word] &= !bit;
                    if self.verify {
                        let range = range.expect("checked above");
                        if self.assembled.len() < self.size as usize {
                            self.assembled.resize(self.size as usize, 0);
                        }
                        self.assembled[range].copy_from_slice(block);
                    }
                    self.received += 1;
                    blocks += 1;
                    block_bytes += block.len() as u64;
                    if self.received == self.pieces {
                        if self.verify && !self.assembled_matches() {
                            break Err(FetchError::Verify);
                        }
                        self.phase = Phase::Idle;
                        break Ok(Event::RoundDone {
                            blocks,
                            bytes: block_bytes,
                        });
                    }
                    self.request_more();
                }
            }
        };
        self.inbuf.drain(..used);
        match result {
            Ok(Event::Nothing) if blocks > 0 => Ok(Event::Blocks {
                n: blocks,
                bytes: block_bytes,
            }),
            other => other,
        }
    }

    fn assembled_matches(&self) -> bool {
        validate_info(&self.assembled)
            .map(|s| s.hashes.handshake_keys().any(|k| k == self.key))
            .unwrap_or(false)
    }

    /// Unconsumed bytes are waiting (call `feed(&[])` to process them).
    pub fn has_buffered(&self) -> bool {
        !self.inbuf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use magnetar::metainfo::validate_info;
    use magnetar::wire::{encode_handshake, encode_have_none, encode_metadata_data_header};

    /// The peer's answer to our opening: handshake, (HaveNone), extension handshake.
    fn opening(key: [u8; 20], size: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_handshake(&mut out, Reserved::ours(true, false, false), &key, &[1; 20]);
        encode_have_none(&mut out);
        ExtHandshake {
            ut_metadata: Some(42),
            metadata_size: size,
            ..Default::default()
        }
        .encode(&mut out);
        out
    }

    fn data(info: &[u8], piece: u32) -> Vec<u8> {
        let r = metadata_piece_range(info.len(), piece).unwrap();
        let mut out = Vec::new();
        encode_metadata_data_header(&mut out, OUR_UT_METADATA, piece, info.len() as u64, r.len());
        out.extend_from_slice(&info[r]);
        out
    }

    fn setup(size: usize, pipeline: usize) -> (Vec<u8>, [u8; 20], Conversation) {
        let info = synth::info_dict(3, size);
        let key = validate_info(&info).unwrap().hashes.v1.unwrap();
        (info, key, Conversation::new(key, [9; 20], pipeline, true))
    }

    #[test]
    fn fetches_and_verifies_byte_by_byte() {
        let (info, key, mut c) = setup(40_000, 8);
        let opening_len = c.out.len();
        assert!(opening_len > HANDSHAKE_LEN);
        c.out.clear();
        let mut stream = opening(key, Some(info.len() as u64));
        for p in 0..3 {
            stream.extend(data(&info, p));
        }
        let mut events = Vec::new();
        for b in &stream {
            let e = c.feed(std::slice::from_ref(b)).unwrap();
            if e != Event::Nothing {
                events.push(e);
            }
        }
        assert_eq!(
            events[0],
            Event::Ready {
                metadata_size: info.len() as u64
            }
        );
        assert!(matches!(events.last(), Some(Event::RoundDone { .. })));
        // Three requests, for the peer's id 42.
        assert_eq!(c.out.iter().filter(|&&b| b == 42).count(), 3);
        // Keepalive: again, all in one read this time.
        c.out.clear();
        c.start_round();
        let mut again = Vec::new();
        for p in [2, 0, 1] {
            again.extend(data(&info, p));
        }
        assert_eq!(
            c.feed(&again),
            Ok(Event::RoundDone {
                blocks: 3,
                bytes: info.len() as u64
            })
        );
    }

    #[test]
    fn pipeline_limits_outstanding_requests() {
        let (info, key, mut c) = setup(100_000, 2);
        c.out.clear();
        c.feed(&opening(key, Some(info.len() as u64))).unwrap();
        let requests = |c: &Conversation| c.out.windows(9).filter(|w| w == b"msg_typei").count();
        assert_eq!(requests(&c), 2);
        c.feed(&data(&info, 0)).unwrap();
        assert_eq!(requests(&c), 3);
    }

    #[test]
    fn wrong_answers_are_errors() {
        let (info, key, mut c) = setup(20_000, 8);
        assert_eq!(
            c.feed(&opening([0; 20], None)),
            Err(FetchError::BadHandshake)
        );

        let (_, _, mut c) = setup(20_000, 8);
        assert_eq!(c.feed(&opening(key, None)), Ok(Event::NoMetadataYet));

        let (_, _, mut c) = setup(20_000, 8);
        c.feed(&opening(key, Some(info.len() as u64))).unwrap();
        let mut unasked = data(&info, 0);
        unasked.extend(data(&info, 0));
        assert_eq!(c.feed(&unasked), Err(FetchError::BadData));

        let (_, _, mut c) = setup(20_000, 8);
        c.feed(&opening(key, Some(info.len() as u64))).unwrap();
        let mut corrupt = data(&info, 1);
        let n = corrupt.len();
        corrupt[n - 1] ^= 1;
        c.feed(&data(&info, 0)).unwrap();
        assert_eq!(c.feed(&corrupt), Err(FetchError::Verify));

        let (_, _, mut c) = setup(20_000, 8);
        c.feed(&opening(key, Some(info.len() as u64))).unwrap();
        let mut reject = Vec::new();
        magnetar::wire::encode_metadata_reject(&mut reject, OUR_UT_METADATA, 0);
        assert_eq!(c.feed(&reject), Err(FetchError::Rejected));
    }
}
