//! Listening sockets, bound on the main thread before any worker starts so that a bad
//! address fails start-up with a clear error, and `:0` resolves to one port shared by
//! all workers.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

pub struct BoundSockets {
    /// The addresses actually bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    /// For each worker, one listener per address.
    pub per_worker: Vec<Vec<std::net::TcpListener>>,
}

fn bind_one(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Every worker binds the same address; the kernel balances accepts across them.
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` on the same port must not collide.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

pub fn bind_all(addrs: &[SocketAddr], workers: usize, backlog: i32) -> io::Result<BoundSockets> {
    let workers = workers.max(1);
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for &addr in addrs {
        let first = bind_one(addr, backlog)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let bound = first.local_addr()?;
        local_addrs.push(bound);
        per_worker[0].push(first);
        for listeners in per_worker.iter_mut().skip(1) {
            listeners.push(
                bind_one(bound, backlog).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {bound}: {e}"))
                })?,
            );
        }
    }
    Ok(BoundSockets {
        local_addrs,
        per_worker,
    })
}
