//! One connection of the io_uring serving path: what it holds between events. This is the
//! per-connection cost of an idle peer, so every field is sized on purpose and the total
//! is asserted (`LINK_BYTES_MAX`). Buffers live elsewhere and only while needed: received
//! bytes are lent from the core's buffer ring, a reply batch from the core's pool.
//!
//! Where the protocol is, is the pump's `State`; what the kernel holds of the link is
//! `recv`, `sending`, `closing` and the count `inflight` (the link is freed at zero).

use crate::server::limiter::ConnectionPermit;
use crate::server::pump::Pump;
use crate::server::send::OutBatch;

/// The ceiling on a connection's own state (docs/io-uring.md "Memory per connection"):
/// with the kernel's socket memory apart, an idle peer costs this plus a timer entry.
pub const LINK_BYTES_MAX: usize = 512;

const _: () = assert!(std::mem::size_of::<Link<'static>>() <= LINK_BYTES_MAX);

/// A reply batch and the `msghdr` the kernel reads its iovecs through. Pooled per core; a
/// connection holds one only while it builds or sends a reply.
pub struct Sending {
    pub batch: OutBatch,
    pub msg: libc::msghdr,
    /// Write deadline (core clock, ns).
    pub deadline: u64,
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
    /// The connection's protocol (gate, session, effects).
    pub pump: Pump<'c>,
    /// The batch the pump builds its next reply in (lent from the core's pool).
    pub out: Option<Box<Sending>>,
    /// The reply in the kernel: its msghdr and iovecs must stay put until it completes.
    pub sending: Option<Box<Sending>>,
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
    /// Its cancel + close are submitted: nothing else is posted for it.
    pub closing: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/io-uring.md quotes the size of a `Link` (the cost of an idle connection): a
    /// change that grows it must say so there. (The ceiling is a compile-time assertion.)
    #[test]
    fn docs_quote_the_link_size() {
        let size = std::mem::size_of::<Link<'static>>();
        let doc = include_str!("../../../docs/io-uring.md");
        assert!(
            doc.contains(&format!("**`Link`:** {size} bytes")),
            "docs/io-uring.md does not quote the Link size ({size} bytes; Pump {} B, Sending {} B)",
            std::mem::size_of::<Pump<'static>>(),
            std::mem::size_of::<Sending>()
        );
    }
}
