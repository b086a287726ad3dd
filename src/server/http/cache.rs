//! A worker's cache of whole .torrent answers in a file of its own, so that the common answer (a
//! keep-alive GET of a stored hash under its default file name) is ONE sendfile(2): the
//! answer's head, the wrapping, the stored info dict and the closing `e` lie back to back
//! in the file. Other answers for a cached hash (`Connection: close`, `?title=`) send
//! their own head with MSG_MORE and sendfile the body from the memfd: two syscalls, one
//! segment, no cork. Without it an answer was head send + dict sendfile (from the
//! segment file) + `e` send + a flush (TCP_NODELAY on a corked socket): four syscalls.
//!
//! Never stale: an entry is keyed by the record's full info-hashes (v1 and v2), and a
//! stored info dict is content-addressed (its bytes hash to its key), so the bytes under a
//! key never change; the wrapping (trackers) is fixed for the worker's life. Whether the
//! hash may be served (blocked, deleted) is still asked of the store on every request
//! before the cache is.
//!
//! Which file: an unnamed one (O_TMPFILE) on the data dir's filesystem, else a memfd.
//! sendfile from shmem (memfd) looks up and locks every page on its own
//! (`shmem_get_folio_gfp`, `filemap_get_entry`, `folio_unlock`: 6.8 % of the server at
//! keep-alive/64 in `perf`), from a disk filesystem's page cache it takes them in batches
//! (`filemap_get_read_batch`: 3.2 %). Entries start at `ENTRY_ALIGN`, which lets a
//! filesystem with large folios (ext4, XFS) give an entry a few folios rather than ten
//! pages (not measured on its own). The file's pages are ordinary page cache: written back
//! once, reclaimable under memory pressure, gone with the file.
//!
//! Bounded: at most `capacity` bytes per worker (`--http-cache-mib`), alignment included.
//! When the next entry does not fit, the cache starts a new generation: a new file, an
//! empty index. The old file lives on while any connection still sends from it (each send holds an `Rc` of its
//! file), then its pages go with its last descriptor. Pages already handed to sockets are
//! referenced by the socket buffers, so nothing in flight ever reads a reused byte: the
//! files are append-only within a generation. An entry larger than
//! `capacity / HTTP_CACHE_ENTRY_FRACTION` is not cached (one huge torrent does not flush
//! everything else); it is served from the segment file as before.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::limits;
use crate::metainfo::InfoHashes;

/// Where an entry may start: a multiple of 16 KiB lets the page cache hold a 40 KiB answer
/// in three or four folios rather than ten pages; larger alignment wastes more of the
/// capacity (a 40 KiB entry pads to 48 KiB here).
const ENTRY_ALIGN: u64 = 16 * 1024;

/// Where one hash's answer lies in a generation's file: `[head][body]`, the head being
/// the keep-alive answer's under the default file name.
#[derive(Clone)]
pub struct Entry {
    file: Rc<OwnedFd>,
    offset: u64,
    head_len: usize,
    body_len: usize,
}

impl Entry {
    pub fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The whole default keep-alive answer: head and body.
    pub fn answer(&self) -> (u64, usize) {
        (self.offset, self.head_len + self.body_len)
    }

    /// The body alone (the .torrent's bytes).
    pub fn body(&self) -> (u64, usize) {
        (self.offset + self.head_len as u64, self.body_len)
    }
}

pub struct AnswerCache {
    capacity: u64,
    /// The directory whose filesystem holds the files (None: memfd only).
    dir: Option<PathBuf>,
    file: Option<Rc<OwnedFd>>,
    /// Bytes written to the current generation's file.
    used: u64,
    entries: HashMap<InfoHashes, Entry>,
}

impl AnswerCache {
    /// A cache of at most `capacity` bytes (0: off), its files unnamed in `dir` (the data
    /// dir) when its filesystem has O_TMPFILE, else memfds.
    pub fn new(capacity: u64, dir: Option<&Path>) -> AnswerCache {
        AnswerCache {
            capacity,
            dir: dir.map(Path::to_owned),
            file: None,
            used: 0,
            entries: HashMap::new(),
        }
    }

    pub fn get(&self, key: &InfoHashes) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Whether an answer of `len` bytes would be cached.
    pub fn takes(&self, len: usize) -> bool {
        len as u64 <= self.capacity / limits::HTTP_CACHE_ENTRY_FRACTION
    }

    /// Writes `parts` (head first; `head_len` bytes of them are the head) as `key`'s
    /// entry; a new generation when it does not fit. `Ok(None)` when the entry is too large
    /// for the cache (`takes`).
    pub fn insert(
        &mut self,
        key: InfoHashes,
        parts: &[&[u8]],
        head_len: usize,
    ) -> io::Result<Option<Entry>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !self.takes(len) {
            return Ok(None);
        }
        let at = self.used.next_multiple_of(ENTRY_ALIGN);
        if self.file.is_none() || at + len as u64 > self.capacity {
            let file = match self.dir.as_deref().map(tmpfile) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    // Not on this filesystem (or not allowed): shmem for good.
                    tracing::debug!("HTTP answer cache: O_TMPFILE: {e}; using a memfd");
                    self.dir = None;
                    memfd()?
                }
                None => memfd()?,
            };
            self.file = Some(Rc::new(file));
            self.used = 0;
            self.entries.clear();
        }
        let at = self.used.next_multiple_of(ENTRY_ALIGN);
        let file = self.file.clone().expect("set above");
        write_all_at(file.as_raw_fd(), parts, at)?;
        let entry = Entry {
            file,
            offset: at,
            head_len,
            body_len: len - head_len,
        };
        self.used = at + len as u64;
        self.entries.insert(key, entry.clone());
        Ok(Some(entry))
    }

    /// Entries in the current generation (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// An unnamed file in `dir` (gone with its last descriptor).
fn tmpfile(dir: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the data dir"))?;
    // SAFETY: `path` is NUL-terminated; O_TMPFILE needs O_RDWR and a mode.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn memfd() -> io::Result<OwnedFd> {
    const NAME: &CStr = c"magnetar-http-answers";
    // SAFETY: NAME is a NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pwritev(2) of all of `parts` at `offset`, resuming short writes.
fn write_all_at(fd: libc::c_int, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice of `parts`; the kernel only reads.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, offset as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        let mut n = n as usize;
        while n > 0 {
            let first = parts[0].len().min(n);
            parts[0] = &parts[0][first..];
            n -= first;
            if parts[0].is_empty() {
                parts.remove(0);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> InfoHashes {
        InfoHashes {
            v1: Some([b; 20]),
            v2: None,
        }
    }

    fn read_at(e: &Entry, (off, len): (u64, usize)) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: `out` is a live buffer of `len` bytes.
        let n = unsafe {
            libc::pread(
                e.file().as_raw_fd(),
                out.as_mut_ptr().cast(),
                len,
                off as i64,
            )
        };
        assert_eq!(n as usize, len);
        out
    }

    #[test]
    fn an_entry_is_its_head_then_its_body() {
        let mut c = AnswerCache::new(1 << 20, None);
        let e = c
            .insert(key(1), &[b"HEAD\r\n", b"d4:info", b"d1:ai1ee", b"e"], 6)
            .unwrap()
            .unwrap();
        assert_eq!(read_at(&e, e.answer()), b"HEAD\r\nd4:infod1:ai1eee");
        assert_eq!(read_at(&e, e.body()), b"d4:infod1:ai1eee");
        assert!(c.get(&key(1)).is_some());
        assert!(c.get(&key(2)).is_none());
        // The v2 half is part of the key.
        let hybrid = InfoHashes {
            v1: Some([1; 20]),
            v2: Some([9; 32]),
        };
        assert!(c.get(&hybrid).is_none());
    }

    #[test]
    fn a_full_cache_starts_a_new_file_and_old_entries_stay_readable() {
        // 64 KiB: entries up to 64 KiB / fraction.
        let cap = 64 * 1024;
        let mut c = AnswerCache::new(cap, None);
        let big = vec![b'x'; (cap / limits::HTTP_CACHE_ENTRY_FRACTION) as usize - 1];
        let first = c.insert(key(1), &[b"h", &big], 1).unwrap().unwrap();
        let mut n = 1u8;
        // Fill until a new generation drops key 1.
        while c.get(&key(1)).is_some() {
            n += 1;
            assert!(n < 200, "the cache never rotated");
            c.insert(key(n), &[b"h", &big], 1).unwrap().unwrap();
        }
        assert_eq!(
            c.len(),
            1,
            "a new generation holds only the entry that started it"
        );
        assert!(!Rc::ptr_eq(&first.file, &c.get(&key(n)).unwrap().file));
        // A send still holding the old entry reads its bytes unchanged.
        let (_, len) = first.answer();
        assert_eq!(read_at(&first, first.answer()).len(), len);
        assert!(read_at(&first, first.body()).iter().all(|&b| b == b'x'));
    }

    #[test]
    fn entries_live_in_an_unnamed_file_of_the_dir_at_aligned_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = AnswerCache::new(1 << 20, Some(dir.path()));
        let a = c.insert(key(1), &[b"H1", b"body-one"], 2).unwrap().unwrap();
        let b = c.insert(key(2), &[b"H2", b"body-two"], 2).unwrap().unwrap();
        assert_eq!(read_at(&a, a.answer()), b"H1body-one");
        assert_eq!(read_at(&b, b.body()), b"body-two");
        assert_eq!(b.answer().0 % ENTRY_ALIGN, 0, "entry not aligned");
        assert_ne!(a.answer().0, b.answer().0);
        // On the dir's filesystem (not shmem), and unnamed: nothing left in the dir.
        // SAFETY: fstatfs fills a plain struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(a.file().as_raw_fd(), &mut st) }, 0);
        let mut dir_st: libc::statfs = unsafe { std::mem::zeroed() };
        let p = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(p.as_ptr(), &mut dir_st) }, 0);
        assert_eq!(st.f_type, dir_st.f_type);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn too_large_or_off_is_not_cached() {
        let mut c = AnswerCache::new(64 * 1024, None);
        let big = vec![0u8; (64 * 1024 / limits::HTTP_CACHE_ENTRY_FRACTION) as usize + 1];
        assert!(c.insert(key(1), &[&big], 0).unwrap().is_none());
        let mut off = AnswerCache::new(0, None);
        assert!(off.insert(key(1), &[b"h", b"b"], 1).unwrap().is_none());
        assert!(off.get(&key(1)).is_none());
    }
}
