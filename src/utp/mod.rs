//! uTP (BEP 29) without I/O: the packet codec and one connection's state machine —
//! sequence/ack numbering with 16-bit wraparound, selective ACK both ways, the receive
//! window, LEDBAT congestion control with slow start, RTO with back-off, fast retransmit,
//! FIN and RESET — driven by whoever owns the UDP socket (the server's per-core driver,
//! `upstream::utp_stream` for outgoing connections). Time comes in as `Instant`
//! arguments; nothing here reads a clock or touches a socket.
//!
//! Usage: feed every datagram for a connection to [`Connection::on_packet`] (after
//! [`decode`] and demultiplexing by `connection_id`), then call
//! [`Connection::poll_transmit`] until it returns `None` and send each [`Transmit`] as
//! one datagram; arm a timer for [`Connection::next_timeout`] and call
//! [`Connection::on_timeout`] when it fires. Acks are sent on the next `poll_transmit`,
//! so feeding a whole batch of received datagrams before polling coalesces them (as
//! libtorrent defers its acks until its socket is drained).
//!
//! - `packet`     header codec, extension chain (SACK, skipping others), seq arithmetic
//! - `congestion` RTT/RTO estimator and LEDBAT window
//! - `conn`       `Connection`: handshake, reliability, windows, close

pub mod congestion;
pub mod conn;
pub mod packet;

#[cfg(test)]
pub(crate) mod sim_tests;

use std::io::IoSlice;

pub use conn::{
    CloseReason, Config, ConnStats, Connection, State, INITIAL_WINDOW_PACKETS_DEFAULT,
    REORDER_PACKETS_MAX,
};
pub use packet::{
    decode, reset_for, seq_diff, seq_less, Header, Packet, PacketError, PacketType,
    HEADER_BYTES_MAX, HEADER_LEN, SACK_BYTES_MAX,
};

/// Default payload bytes per packet: 1400 + 20 (uTP) + 30 (SACK) + 8 (UDP) + 40 (IPv6)
/// = 1498, one 1500-byte Ethernet MTU.
pub const PAYLOAD_BYTES_DEFAULT: usize = 1400;

/// Smallest payload an operator may set: below it the 20–50 header bytes dominate every
/// packet. (IPv6's minimum MTU of 1280 leaves ~1180.)
pub const PAYLOAD_BYTES_MIN: usize = 256;

/// Largest payload an operator may set: jumbo frames (9000-byte MTU) and loopback.
pub const PAYLOAD_BYTES_MAX: usize = 8 * 1024;

/// `--utp-initial-window-packets` above this is refused: 64 packets (90 KB) at once to an
/// unknown path is a burst no congestion controller would start with.
pub const INITIAL_WINDOW_PACKETS_MAX: usize = 64;

/// Payload slices in one packet; a packet ends early rather than exceed it (a `sendmsg`
/// iovec array of header + 8 stays small and on the stack).
pub const PACKET_SLICES_MAX: usize = 8;

/// A piece of the outgoing byte stream, kept until acked.
pub trait Chunk {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The longest contiguous run of bytes starting at `offset` (offset < len()).
    fn contiguous_at(&self, offset: usize) -> &[u8];
}

impl Chunk for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn contiguous_at(&self, offset: usize) -> &[u8] {
        &self[offset..]
    }
}

/// One datagram to send: header then payload slices.
pub struct Transmit<'a> {
    pub header: [u8; HEADER_BYTES_MAX],
    pub header_len: usize,
    pub payload: [IoSlice<'a>; PACKET_SLICES_MAX],
    pub payload_slices: usize,
}

impl Transmit<'_> {
    /// A header-only packet with no bytes yet, for `Connection` to build into.
    pub(crate) fn empty() -> Self {
        Transmit {
            header: [0; HEADER_BYTES_MAX],
            header_len: HEADER_LEN,
            payload: [IoSlice::new(&[]); PACKET_SLICES_MAX],
            payload_slices: 0,
        }
    }

    /// Header + payload bytes.
    pub fn len(&self) -> usize {
        self.header_len + self.payload().iter().map(|s| s.len()).sum::<usize>()
    }

    /// Never true: a datagram has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len]
    }

    pub fn payload(&self) -> &[IoSlice<'_>] {
        &self.payload[..self.payload_slices]
    }

    /// The datagram in one buffer (tests and non-vectored senders).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(self.header());
        for s in self.payload() {
            v.extend_from_slice(s);
        }
        v
    }
}
