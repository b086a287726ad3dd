//! Sans-IO peer wire codec: bytes in, messages out, and back. Owns the BitTorrent
//! handshake (BEP 3, reserved bits of BEP 6/10/52), the length-prefixed frames (BEP 3,
//! BEP 6 Fast, BEP 10 extended), the BEP 10 extension handshake, BEP 9 ut_metadata,
//! BEP 11 ut_pex, and the bencode those carry, each capped by `crate::limits`.
//! It never touches a socket: the server, the upstream fetcher and the load generator all
//! drive it.
//!
//! Decoders take the bytes received so far and return [`Decoded::Done`] with the number
//! of bytes consumed, [`Decoded::NeedMore`] (a normal result: a prefix of a valid message
//! is never an error), or a [`WireError`]. Encoders append to a caller's `Vec` and return
//! the number of bytes written; they allocate nothing else.
//!
//! - `handshake`  the 68-byte handshake; `Reserved` bits
//! - `frame`      length-prefixed messages; encoders for the ones we send
//! - `extension`  BEP 10 extension handshake (extended message id 0)
//! - `metadata`   BEP 9 ut_metadata request / data / reject; piece arithmetic
//! - `pex`        BEP 11 ut_pex: compact peers added / dropped
//! - `bencode`    allocation-free validating scanner with the depth cap; integer writer

pub mod bencode;
pub mod extension;
pub mod frame;
pub mod handshake;
pub mod metadata;
pub mod pex;

#[cfg(test)]
mod golden_tests;

pub use bencode::BencodeError;
pub use extension::{ExtHandshake, CLIENT_VERSION, OUR_UT_METADATA_ID, OUR_UT_PEX_ID};
pub use frame::{
    decode_frame, encode_cancel, encode_choke, encode_extended_header, encode_frame, encode_have,
    encode_have_all, encode_have_none, encode_interested, encode_keepalive, encode_not_interested,
    encode_port, encode_reject, encode_request, encode_unchoke, Frame, EXTENDED_ID,
};
pub use handshake::{
    decode_handshake_head, decode_peer_id, encode_handshake, HandshakeHead, Reserved,
    HANDSHAKE_HEAD_LEN, HANDSHAKE_LEN, PSTR,
};
pub use metadata::{
    decode_metadata, encode_metadata_data_header, encode_metadata_reject, encode_metadata_request,
    metadata_piece_count, metadata_piece_range, MetadataMsg,
};
pub use pex::Pex;

/// Result of decoding from a buffer that may hold only part of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The message and the number of bytes it took from the front of the buffer.
    Done(T, usize),
    /// The buffer is a valid prefix; at least this many more bytes are needed.
    NeedMore(usize),
}

/// A peer sent something that is not a valid message.
///
/// What to do about it, decided by [`WireError::closes_connection`]: every error except
/// `UnknownMetadataType` means the byte stream cannot be trusted (or the peer is hostile)
/// and the connection is closed without a reply. `UnknownMetadataType` is a well-formed
/// ut_metadata message of a type newer than BEP 9: BEP 9 says to ignore it, so the server
/// drops that one message and keeps the connection.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// First byte is not 19 or the protocol string is not "BitTorrent protocol"
    /// (e.g. an encrypted (MSE) or HTTP connection).
    #[error("not a BitTorrent handshake (mismatch at byte {at})")]
    BadProtocol { at: usize },
    /// A frame, or a message inside one, is larger than its cap in `crate::limits`.
    #[error("{what} of {len} bytes exceeds the cap of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A message whose size is fixed by its id (or has a minimum) has another length.
    /// `len` is the frame length (id byte included).
    #[error("message id {id} with invalid length {len}")]
    BadLength { id: u8, len: usize },
    #[error("malformed bencode: {0}")]
    Bencode(#[from] BencodeError),
    /// Valid bencode, but not the message it should be (wrong type, missing key, value
    /// out of range).
    #[error("malformed {what}: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    /// A ut_metadata message with a msg_type other than 0, 1, 2: ignore the message.
    #[error("unknown ut_metadata msg_type {0}")]
    UnknownMetadataType(i64),
}

impl WireError {
    /// True if the connection must be closed; false if only the message is ignored
    /// (see the type's doc).
    pub fn closes_connection(&self) -> bool {
        !matches!(self, WireError::UnknownMetadataType(_))
    }
}

/// Deterministic inputs for the never-panics tests (no dev-dependency needed).
#[cfg(test)]
pub(crate) mod test_rng {
    pub struct XorShift(u64);

    impl XorShift {
        pub fn new(seed: u64) -> Self {
            XorShift(seed | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform-enough in `0..n` (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }

        /// Random bytes, random length in `0..max_len`.
        pub fn bytes_below(&mut self, max_len: usize) -> Vec<u8> {
            let len = self.below(max_len);
            self.bytes(len)
        }

        /// Flips, replaces, inserts or removes a few bytes of `input`.
        pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
            let mut v = input.to_vec();
            for _ in 0..1 + self.below(4) {
                let at = if v.is_empty() { 0 } else { self.below(v.len()) };
                match self.below(5) {
                    0 if !v.is_empty() => v[at] ^= 1 << self.below(8),
                    1 if !v.is_empty() => v[at] = self.next_u64() as u8,
                    2 => v.insert(at, self.next_u64() as u8),
                    3 if !v.is_empty() => {
                        v.remove(at);
                    }
                    _ => v.truncate(at),
                }
            }
            v
        }
    }
}
