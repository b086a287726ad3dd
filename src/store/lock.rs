//! `D/LOCK`: one magnetar process per data directory.
//!
//! flock(2) rather than a pid file: the kernel drops the lock when the process dies, however it
//! dies, so there is no stale lock to clean up. The pid written into the file is only a hint for
//! the error message.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::StoreError;

pub(crate) const LOCK_FILE: &str = "LOCK";

/// Held for the life of the `Store`; closing the file releases the lock.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

pub(crate) fn lock_dir(dir: &Path) -> Result<DirLock, StoreError> {
    let path = dir.join(LOCK_FILE);
    let io_err = |source: io::Error| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        return Err(io_err(err));
    }
    let write_pid = |f: &mut File| -> io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())
    };
    write_pid(&mut file).map_err(io_err)?;
    Ok(DirLock { _file: file })
}

pub(crate) fn locked_message(dir: &Path, pid: &Option<u32>) -> String {
    let who = match pid {
        Some(pid) => format!("another magnetar process (pid {pid})"),
        None => "another magnetar process".to_owned(),
    };
    format!(
        "{who} holds the store in {} (`magnetar serve` is probably running; stop it or use another --data-dir)",
        dir.display()
    )
}
