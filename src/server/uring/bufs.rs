//! A provided buffer ring (IOU_PBUF_RING): a pool of receive buffers that the kernel picks
//! from when bytes arrive. A connection holds no read buffer while it waits; a buffer is
//! lent (`Lent`) from the completion until its bytes are handled, and goes back to the
//! kernel when the loan drops, also when handling panics (docs/io-uring.md "Memory per
//! connection").

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::ring::Ring;

/// An anonymous, page-aligned, private mapping (the ring must be page-aligned; the
/// buffers are mapped the same way so that they can be touched up front).
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    buf_bytes: usize,
    mask: u16,
    /// Our copy of the tail; published to the kernel after each hand-back.
    tail: Cell<u16>,
}

/// A buffer the kernel filled, lent until dropped: then it goes back to the ring.
pub struct Lent<'r> {
    ring: &'r BufRing,
    bid: u16,
    len: usize,
}

impl Lent<'_> {
    /// The received bytes (decrypted in place under RC4, so mutable).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let bid = usize::from(self.bid & self.ring.mask);
        // SAFETY: inside the buffer mapping; the kernel does not write to a buffer it has
        // completed with until we hand it back (on drop), and a bid is lent once at a time
        // (each completion names a distinct one).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ring.bufs.ptr.add(bid * self.ring.buf_bytes),
                self.len,
            )
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.ring.put(self.bid);
        self.ring.publish();
    }
}

impl BufRing {
    /// Registers `count` (a power of two, at most 32 768) buffers of `buf_bytes` each as
    /// buffer group `group` of `ring`. The memory is populated now: it is a fixed cost of
    /// the core, not of the connections that later borrow from it.
    pub fn new(ring: &Ring, group: u16, count: u16, buf_bytes: usize) -> io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let me = BufRing {
            ring: Mapping::new(ring_bytes)?,
            bufs: Mapping::new(usize::from(count) * buf_bytes)?,
            buf_bytes,
            mask: count - 1,
            tail: Cell::new(0),
        };
        // SAFETY: the ring mapping lives as long as `me`, which unregisters nothing but
        // is dropped only after the io_uring (the caller keeps the order: see `Core`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(me.ring.ptr as u64, count, group, 0)?;
        }
        for bid in 0..count {
            me.put(bid);
        }
        me.publish();
        Ok(me)
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// Lends buffer `bid`, which a completion says holds `len` bytes.
    pub fn lend(&self, bid: u16, len: usize) -> Lent<'_> {
        assert!(len <= self.buf_bytes);
        Lent {
            ring: self,
            bid,
            len,
        }
    }

    fn put(&self, bid: u16) {
        let tail = self.tail.get();
        let slot = usize::from(tail & self.mask);
        // SAFETY: `slot` < count entries of the ring mapping.
        let entry = unsafe { &mut *(self.ring.ptr as *mut BufRingEntry).add(slot) };
        entry.set_addr(self.bufs.ptr as u64 + (usize::from(bid) * self.buf_bytes) as u64);
        entry.set_len(self.buf_bytes as u32);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field; the kernel
        // reads it with acquire ordering, so a release store publishes the entries.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.ptr as *const BufRingEntry) as *const AtomicU16;
            (*tail).store(self.tail.get(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bug while a buffer is lent must not lose it: after 1024 such losses every
    /// receive of the core would fail with ENOBUFS.
    #[test]
    fn a_lent_buffer_goes_back_even_when_handling_panics() {
        let ring = Ring::new(8, 16).expect("an io_uring");
        let bufs = BufRing::new(&ring, 7, 4, 64).expect("a buffer ring");
        let tail = bufs.tail.get();
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut lent = bufs.lend(2, 10);
            lent.bytes_mut()[0] = 1;
            panic!("a bug while handling the bytes");
        }));
        assert!(handled.is_err());
        assert_eq!(bufs.tail.get(), tail.wrapping_add(1), "handed back");
        // SAFETY: reads the published tail, as the kernel does.
        let published = unsafe {
            (*(BufRingEntry::tail(bufs.ring.ptr as *const BufRingEntry) as *const AtomicU16))
                .load(Ordering::Acquire)
        };
        assert_eq!(published, bufs.tail.get(), "and published to the kernel");
    }
}
