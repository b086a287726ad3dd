//! `D/blocklist`: info-hashes that are never stored, served or fetched.
//!
//! A text file an operator may also edit by hand (then SIGHUP, or restart): one info-hash a
//! line, 40 hex (v1, or a v2 hash's 20-byte handshake prefix) or 64 hex (v2), `#` starts a
//! comment. In memory it is the set of 20-byte handshake keys, the form every lookup already
//! has. Consulted on the miss path and on append, never on a hit: a blocked record is taken
//! out of the index when it is blocked (and at recovery), so a hit cannot be blocked.
//!
//! Writes replace the file atomically (temporary file, fsync, rename, fsync of the
//! directory) before the caller is told the hash is blocked.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use crate::metainfo::v2_handshake_key;

pub(crate) const BLOCKLIST_FILE: &str = "blocklist";

/// A line that is not an info-hash, reported with its number so a hand edit can be fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub text: String,
}

pub(crate) struct Blocklist {
    path: PathBuf,
    keys: RwLock<HashSet<[u8; 20]>>,
    /// `keys.len()`, kept beside the set (written under its write lock) so that `contains`
    /// on an empty blocklist, the common case, takes no lock: every handshake asks, and a
    /// read lock is a shared cache line written by every core.
    len: AtomicUsize,
    /// Serialises read-modify-write of the file (two deletes at once must both land).
    file: Mutex<()>,
}

/// The 20-byte handshake key of a 40- or 64-hex info-hash; `None` for anything else.
pub fn parse_hash_key(text: &str) -> Option<[u8; 20]> {
    match text.len() {
        40 => hex::decode(text).ok()?.try_into().ok(),
        64 => {
            let full: [u8; 32] = hex::decode(text).ok()?.try_into().ok()?;
            Some(v2_handshake_key(&full))
        }
        _ => None,
    }
}

/// Keys in `text`, and the lines that are not info-hashes (skipped, not fatal: one typo must
/// not unblock everything else).
fn parse(text: &str) -> (HashSet<[u8; 20]>, Vec<BadLine>) {
    let mut keys = HashSet::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match parse_hash_key(entry) {
            Some(k) => {
                keys.insert(k);
            }
            None => bad.push(BadLine {
                line: i + 1,
                text: entry.to_owned(),
            }),
        }
    }
    (keys, bad)
}

fn read_text(path: &Path) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

impl Blocklist {
    pub fn load(dir: &Path) -> io::Result<(Blocklist, Vec<BadLine>)> {
        let path = dir.join(BLOCKLIST_FILE);
        let (keys, bad) = parse(&read_text(&path)?);
        Ok((
            Blocklist {
                path,
                len: AtomicUsize::new(keys.len()),
                keys: RwLock::new(keys),
                file: Mutex::new(()),
            },
            bad,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &[u8; 20]) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Every blocked key (a copy).
    pub fn keys(&self) -> Vec<[u8; 20]> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Re-read the file (after a hand edit). Returns the lines that were skipped.
    pub fn reload(&self) -> io::Result<Vec<BadLine>> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (keys, bad) = parse(&read_text(&self.path)?);
        let mut set = self.keys.write().unwrap_or_else(|p| p.into_inner());
        *set = keys;
        self.len.store(set.len(), Ordering::Release);
        Ok(bad)
    }

    /// Append `entries` (hex info-hashes, each with its key) to the file, durably, then to
    /// the set. `comment` goes on the same lines (why, when).
    pub fn add(&self, entries: &[(String, [u8; 20])], comment: &str) -> io::Result<()> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = read_text(&self.path)?;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for (hex, _) in entries {
            text.push_str(hex);
            if !comment.is_empty() {
                text.push_str("  # ");
                text.push_str(&comment.replace('\n', " "));
            }
            text.push('\n');
        }
        self.write_file(&text)?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.extend(entries.iter().map(|(_, k)| *k));
        self.len.store(keys.len(), Ordering::Release);
        Ok(())
    }

    /// Remove every line naming one of `keys` from the file, durably, then from the set.
    pub fn remove(&self, keys: &[[u8; 20]]) -> io::Result<usize> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let text = read_text(&self.path)?;
        let mut kept = String::with_capacity(text.len());
        let mut removed = 0;
        for line in text.lines() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if parse_hash_key(entry).is_some_and(|k| keys.contains(&k)) {
                removed += 1;
                continue;
            }
            kept.push_str(line);
            kept.push('\n');
        }
        self.write_file(&kept)?;
        let mut set = self.keys.write().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            set.remove(k);
        }
        self.len.store(set.len(), Ordering::Release);
        Ok(removed)
    }

    fn write_file(&self, text: &str) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hashes_comments_and_reports_bad_lines() {
        let v1 = "aa".repeat(20);
        let v2 = "bb".repeat(32);
        let text = format!("# header\n{v1}  # spam\n\n{v2}\nnot-a-hash\n");
        let (keys, bad) = parse(&text);
        assert!(keys.contains(&[0xaa; 20]));
        assert!(keys.contains(&[0xbb; 20]));
        assert_eq!(keys.len(), 2);
        assert_eq!(
            bad,
            vec![BadLine {
                line: 5,
                text: "not-a-hash".into()
            }]
        );
    }

    #[test]
    fn add_remove_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (bl, _) = Blocklist::load(dir.path()).unwrap();
        assert!(!bl.contains(&[1; 20]));
        bl.add(&[(hex::encode([1u8; 20]), [1; 20])], "test")
            .unwrap();
        assert!(bl.contains(&[1; 20]));
        let (again, bad) = Blocklist::load(dir.path()).unwrap();
        assert!(again.contains(&[1; 20]) && bad.is_empty());
        assert_eq!(again.remove(&[[1; 20]]).unwrap(), 1);
        assert!(!again.contains(&[1; 20]));
        bl.reload().unwrap();
        assert!(!bl.contains(&[1; 20]));
    }
}
