//! What the io_uring path needs from the kernel, checked once at start, before the worker
//! says it is ready: every opcode it submits, and the behaviours an opcode probe cannot
//! show, tried for real on a socket pair: a multishot receive into a provided buffer ring
//! on a direct descriptor (6.0), the cancel of everything on a direct descriptor (6.0),
//! and the close of one. A kernel that sets up a ring but lacks one of them would
//! otherwise close every connection with an error, or re-post a failing receive in a
//! tight loop. On any failure the worker serves through the epoll driver instead
//! (`server/worker.rs`), and the log says which check failed.
//!
//! `MAGNETAR_URING_PROBE_FAIL=<check>` fails the named check, so the fallback is tested
//! on kernels that pass them all.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, types};

use super::bufs::BufRing;
use super::ring::Ring;

/// Every check, by the name the log and `MAGNETAR_URING_PROBE_FAIL` use.
pub const CHECKS: &[&str] = &[
    "buffer-ring",
    "direct-descriptors",
    "opcodes",
    "multishot-recv",
    "cancel-by-fd",
    "close-direct",
];

/// How long a probe operation may take before the kernel is taken to lack it.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// user_data of the probe's operations (the ring serves nothing yet).
const PROBE_RECV: u64 = 1;
const PROBE_CANCEL: u64 = 2;
const PROBE_CLOSE: u64 = 3;

/// What the kernel offers beyond the must-haves.
pub struct Features {
    /// Zero-copy sendmsg (6.1+), for `--send-zc-min-bytes`.
    pub send_zc: bool,
}

/// The error for a failed check: names it, keeps the cause.
pub fn missing(check: &'static str, cause: io::Error) -> io::Error {
    io::Error::new(cause.kind(), format!("io_uring lacks {check}: {cause}"))
}

/// Fails `check` if the environment asks for it.
pub fn forced(check: &'static str) -> io::Result<()> {
    debug_assert!(CHECKS.contains(&check));
    match std::env::var("MAGNETAR_URING_PROBE_FAIL") {
        Ok(name) if !CHECKS.contains(&name.as_str()) => {
            tracing::warn!("MAGNETAR_URING_PROBE_FAIL={name} names no check (known: {CHECKS:?})");
            Ok(())
        }
        Ok(name) if name == check => Err(missing(
            check,
            io::Error::new(
                io::ErrorKind::Unsupported,
                "forced by MAGNETAR_URING_PROBE_FAIL",
            ),
        )),
        _ => Ok(()),
    }
}

/// Runs every check on `ring` (its direct-descriptor table registered, slot 0 free) with
/// buffer group `group` of `bufs`.
pub fn check(ring: &mut Ring, bufs: &BufRing, group: u16) -> io::Result<Features> {
    let send_zc = opcodes(ring)?;
    multishot_recv_cancel_close(ring, bufs, group)?;
    Ok(Features { send_zc })
}

fn opcodes(ring: &mut Ring) -> io::Result<bool> {
    forced("opcodes")?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| missing("opcodes", e))?;
    let needed = [
        ("accept", opcode::Accept::CODE),
        ("recv", opcode::Recv::CODE),
        ("recvmsg", opcode::RecvMsg::CODE),
        ("sendmsg", opcode::SendMsg::CODE),
        ("async-cancel", opcode::AsyncCancel::CODE),
        ("close", opcode::Close::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(missing(
                "opcodes",
                io::Error::new(io::ErrorKind::Unsupported, format!("no {name}")),
            ));
        }
    }
    Ok(probe.is_supported(opcode::SendMsgZc::CODE))
}

fn multishot_recv_cancel_close(ring: &mut Ring, bufs: &BufRing, group: u16) -> io::Result<()> {
    forced("multishot-recv")?;
    let [ours, theirs] = socket_pair().map_err(|e| missing("multishot-recv", e))?;
    ring.submitter()
        .register_files_update(0, &[ours.as_raw_fd()])
        .map_err(|e| missing("direct-descriptors", e))?;
    let slot = types::Fixed(0);
    let recv = opcode::RecvMulti::new(slot, group)
        .build()
        .user_data(PROBE_RECV);
    // SAFETY: the buffers come from the registered buffer ring.
    unsafe { ring.push(&recv) };
    // SAFETY: writes one byte from a live buffer.
    unsafe { libc::write(theirs.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    let got = wait(ring, 1).map_err(|e| missing("multishot-recv", e))?;
    match got.as_slice() {
        [c] if c.user_data() == PROBE_RECV && c.result() == 1 && cqueue::more(c.flags()) => {
            match cqueue::buffer_select(c.flags()) {
                Some(bid) => drop(bufs.lend(bid, 1)),
                None => return Err(unsupported("multishot-recv", "no provided buffer")),
            }
        }
        _ => return Err(unsupported("multishot-recv", &format!("got {got:?}"))),
    }

    forced("cancel-by-fd")?;
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(slot).all())
        .build()
        .user_data(PROBE_CANCEL);
    // SAFETY: no pointers.
    unsafe { ring.push(&cancel) };
    let got = wait(ring, 2).map_err(|e| missing("cancel-by-fd", e))?;
    let cancelled = got
        .iter()
        .any(|c| c.user_data() == PROBE_RECV && c.result() == -libc::ECANCELED);
    let counted = got
        .iter()
        .any(|c| c.user_data() == PROBE_CANCEL && c.result() >= 1);
    if !(cancelled && counted) {
        return Err(unsupported("cancel-by-fd", &format!("got {got:?}")));
    }

    forced("close-direct")?;
    let close = opcode::Close::new(slot).build().user_data(PROBE_CLOSE);
    // SAFETY: no pointers.
    unsafe { ring.push(&close) };
    let got = wait(ring, 1).map_err(|e| missing("close-direct", e))?;
    match got.as_slice() {
        [c] if c.user_data() == PROBE_CLOSE && c.result() == 0 => Ok(()),
        _ => Err(unsupported("close-direct", &format!("got {got:?}"))),
    }
}

fn unsupported(check: &'static str, why: &str) -> io::Error {
    missing(
        check,
        io::Error::new(io::ErrorKind::Unsupported, why.to_owned()),
    )
}

/// Submits what is queued and collects `n` completions, or fails after `PROBE_WAIT`.
fn wait(ring: &mut Ring, n: usize) -> io::Result<Vec<cqueue::Entry>> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no completion"));
        }
        ring.submit_and_wait(n - got.len(), left)?;
        let mut batch = Vec::new();
        ring.take_completions(&mut batch, n - got.len());
        got.extend(batch);
    }
    Ok(got)
}

fn socket_pair() -> io::Result<[OwnedFd; 2]> {
    let mut fds = [0; 2];
    // SAFETY: writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
}
