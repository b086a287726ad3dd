//! One connection of the io_uring serving path: what it holds between events. This is the
//! per-connection cost of an idle peer, so every field is sized on purpose and the total
//! is asserted (`LINK_BYTES_MAX`). Buffers live elsewhere and only while needed: received
//! bytes are lent from the core's buffer ring, a reply batch from the core's pool.

use crate::mse::Rc4Pair;
use crate::server::conn::Conn;
use crate::server::limiter::ConnectionPermit;
use crate::server::mse::Handshake;
use crate::server::send::OutBatch;
use crate::upstream::shard::FetchOutcome;

/// The ceiling on a connection's own state (docs/io-uring.md "Memory per connection"):
/// with the kernel's socket memory apart, an idle peer costs this plus a timer entry.
pub const LINK_BYTES_MAX: usize = 512;

const _: () = assert!(std::mem::size_of::<Link<'static>>() <= LINK_BYTES_MAX);

/// What the first bytes decided (`server/mse.rs`).
pub enum Gate {
    /// Fewer bytes than decide plaintext vs MSE.
    Deciding,
    /// An MSE handshake runs (boxed: large, and needed once).
    Mse(Box<Handshake>),
    /// The BitTorrent stream in the clear (a plaintext handshake, or MSE that chose it).
    Plain,
    /// MSE with RC4: received bytes are decrypted in place, replies encrypted on the way.
    Rc4(Box<Rc4Pair>),
}

impl Gate {
    /// Whether received bytes go to the protocol (after decryption).
    pub fn is_open(&self) -> bool {
        matches!(self, Gate::Plain | Gate::Rc4(_))
    }
}

/// A reply on its way: the batch, the `msghdr` the kernel reads its iovecs through, and
/// when it must be done. Pooled per core; a connection holds one only while it has
/// output.
pub struct Sending {
    pub batch: OutBatch,
    pub msg: libc::msghdr,
    /// Write deadline (core clock, ns).
    pub deadline: u64,
    /// Data messages and payload bytes in the batch, for `Conn::on_sent`.
    pub blocks: usize,
    pub payload_bytes: usize,
    /// A zero-copy send's result, held until its notification says the pages are free.
    pub zc_result: Option<i32>,
}

impl Sending {
    pub fn new() -> Box<Sending> {
        Box::new(Sending {
            batch: OutBatch::new(),
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: unsafe { std::mem::zeroed() },
            deadline: 0,
            blocks: 0,
            payload_bytes: 0,
            zc_result: None,
        })
    }
}

/// The multishot receive's state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recv {
    /// None in the kernel: arm one when the link may receive.
    Idle,
    /// Posted; completions come until one without `F_MORE`.
    Armed,
    /// A cancel is on its way (the link holds too many unhandled bytes).
    Cancelling,
}

pub struct Link<'c> {
    pub conn: Conn<'c>,
    pub gate: Gate,
    /// Received bytes not handled yet: a partial frame, bytes that arrived while a reply
    /// was in flight, or the raw bytes of an undecided/MSE start. Empty (no allocation)
    /// when idle.
    pub input: Vec<u8>,
    /// The reply being built, held (while a store completes) or in flight.
    pub out: Option<Box<Sending>>,
    /// A fetch outcome that arrived while a reply was in flight, applied after it.
    pub parked: Option<Box<Option<FetchOutcome>>>,
    /// Released when the link is freed (after its close completes).
    pub _permit: ConnectionPermit,
    /// The deadline a timer entry is armed for (core clock, ns); `u64::MAX`: none.
    pub timer_at: u64,
    /// The direct (fixed) descriptor.
    pub fd: u32,
    /// Tells this link's completions from those of an earlier one in the same slot.
    pub gen: u32,
    /// Operations in the kernel that name this link; it is freed at zero once closing.
    pub inflight: u16,
    pub recv: Recv,
    pub send_in_flight: bool,
    /// `Effect::Store` runs off the core; nothing is handled until it answers.
    pub storing: bool,
    pub closing: bool,
    /// Bytes arrived that the protocol has not been told of (`Conn::on_read`, before
    /// they are handled): `Some(true)` if the peer's pipelined burst goes on.
    pub news: Option<bool>,
}

impl Link<'_> {
    /// Whether received bytes must wait (a reply in flight or held, a store running).
    pub fn blocked(&self) -> bool {
        self.send_in_flight || self.storing || self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes docs/io-uring.md quotes; a change that grows them shows up here.
    #[test]
    fn link_sizes() {
        let link = std::mem::size_of::<Link<'static>>();
        let conn = std::mem::size_of::<Conn<'static>>();
        println!(
            "Link {link} B, Conn {conn} B, Sending {} B",
            std::mem::size_of::<Sending>()
        );
        assert!(link <= LINK_BYTES_MAX);
    }
}
