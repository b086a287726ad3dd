//! uTP datagrams: one multishot recvmsg per uTP socket into the core's datagram buffer
//! ring (a group apart from TCP's), handed to the endpoint (`server/udp.rs`), which
//! answers once per batch.

use super::*;

/// A uTP socket received on this ring: its endpoint demultiplexes (`server/udp.rs`).
pub(super) struct UdpRecv {
    pub(super) ep: Rc<udp::Endpoint>,
    /// Read by the kernel for every datagram of the multishot recvmsg: the room for the
    /// source address in front of each buffer (boxed: its address must not move).
    pub(super) msg: Box<libc::msghdr>,
    pub(super) posted: bool,
    /// Datagrams were handed to the endpoint since its last `end_ring_batch`.
    pub(super) touched: bool,
}

impl UdpRecv {
    pub(super) fn new(ep: Rc<udp::Endpoint>) -> UdpRecv {
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        UdpRecv {
            ep,
            msg,
            posted: false,
            touched: false,
        }
    }
}

impl Core<'_> {
    pub(super) fn post_udp(&mut self, i: usize) {
        let u = &mut self.udp[i];
        if u.posted || self.cutting {
            return;
        }
        let entry =
            opcode::RecvMsgMulti::new(types::Fd(u.ep.raw_fd()), &raw const *u.msg, UDP_RECV_GROUP)
                .build()
                .user_data(tag(Op::UdpRecv, 0, i));
        u.posted = true;
        // SAFETY: the msghdr is boxed in `udp`, which lives as long as the core.
        unsafe { self.ring.push(&entry) };
    }

    pub(super) fn on_udp(&mut self, i: usize, res: i32, flags: u32) {
        let u = &mut self.udp[i];
        if !cqueue::more(flags) {
            u.posted = false;
        }
        let stats = &self.ctx.stats;
        match cqueue::buffer_select(flags) {
            Some(bid) => {
                // Goes back to the ring when dropped, also if handling panics.
                let mut lent = self.udp_bufs.lend(bid, res.max(0) as usize);
                if res >= 0 {
                    deliver(u, stats, lent.bytes_mut());
                }
            }
            None if res == -libc::ENOBUFS => stats.uring_recv_no_buffers.inc(),
            None if res < 0 && res != -libc::ECANCELED => {
                u.ep.on_ring_recv_error(io::Error::from_raw_os_error(-res))
            }
            None => {}
        }
        if !self.udp[i].posted {
            self.post_udp(i);
        }
    }

    /// Lets every endpoint that received datagrams answer them, a batch at a time.
    pub(super) fn end_udp_batches(&mut self) {
        for u in &mut self.udp {
            if std::mem::take(&mut u.touched) {
                let ep = &u.ep;
                crate::server::contain_panic(&self.ctx.stats, "uTP batch", || ep.end_ring_batch());
            }
        }
    }
}

/// One datagram as the multishot recvmsg laid it out in `buf` (header, source address,
/// payload), handed to the endpoint.
fn deliver(u: &mut UdpRecv, stats: &crate::server::stats::CoreStats, buf: &mut [u8]) {
    let out = match types::RecvMsgOut::parse(buf, &u.msg) {
        Ok(out) => out,
        Err(()) => return stats.utp_recv_errors.inc(),
    };
    if out.is_payload_truncated() {
        // A datagram larger than a buffer would be read as a shorter uTP packet (uTP has
        // no length field): dropped, counted.
        return stats.utp_recv_truncated.inc();
    }
    let Some(from) = name_addr(out.name_data()) else {
        return stats.utp_recv_errors.inc();
    };
    let ep = &u.ep;
    crate::server::contain_panic(stats, "uTP datagram", || {
        ep.on_ring_datagram(out.payload_data(), from)
    });
    u.touched = true;
}

/// The source address of a received datagram (the name field of a recvmsg result).
pub(super) fn name_addr(name: &[u8]) -> Option<std::net::SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage; at most its size is copied in.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = name
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `n` bytes fit both.
    unsafe {
        std::ptr::copy_nonoverlapping(name.as_ptr(), (&raw mut storage).cast::<u8>(), n);
    }
    socket_addr_of(&storage)
}
