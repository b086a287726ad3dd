//! The uploader's durable cursor: `<data dir>/shared-cursor`, one line
//! `<store URL> <unix seconds>`. Every record and tombstone stamped before that time is in
//! the bucket the URL names. After a restart (a crash included) the uploader walks the
//! store for everything stamped at or after `cursor - CURSOR_SLACK_SECS` and uploads what
//! the bucket lacks (a HEAD first, so the walk costs little when all is there).
//!
//! Why a time and not a segment offset: eviction moves records between segments and
//! deletes segments, but keeps their stamps; and the store's index can be walked by stamp
//! in memory. Why the slack: a record is stamped before it is written and synced, so its
//! notification reaches the uploader a little after its stamp; the slack (minutes) covers
//! that and clock steps, and costs only HEADs of recent records after a restart.
//!
//! Written as a temporary file, fsynced, renamed over the old one, directory fsynced: a
//! crash leaves the old cursor or the new one, never a torn one. A cursor for another URL
//! (the operator pointed the node at a new bucket) counts as none: everything is uploaded.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const CURSOR_FILE: &str = "shared-cursor";

/// Seconds before the saved cursor that a restart walks again (see the module doc).
pub const CURSOR_SLACK_SECS: u64 = 120;

pub struct Cursor {
    path: PathBuf,
    url: String,
}

impl Cursor {
    pub fn new(data_dir: &Path, url: &str) -> Cursor {
        Cursor {
            path: data_dir.join(CURSOR_FILE),
            url: url.to_owned(),
        }
    }

    /// The saved time for this URL; 0 (upload everything) when there is none, it names
    /// another URL, or it cannot be read (logged).
    pub fn load(&self) -> u64 {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "shared cursor unreadable ({e}); uploading every record");
                return 0;
            }
        };
        match text.trim_end().rsplit_once(' ') {
            Some((url, secs)) if url == self.url => secs.parse().unwrap_or(0),
            Some((url, _)) => {
                tracing::info!(old = %url, new = %self.url, "shared store changed; uploading every record");
                0
            }
            None => 0,
        }
    }

    pub fn save(&self, secs: u64) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{} {secs}", self.url)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_survives_a_reopen_and_is_per_url() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cursor::new(dir.path(), "s3://a/p");
        assert_eq!(c.load(), 0, "no file: upload everything");
        c.save(1_790_000_123).unwrap();
        assert_eq!(Cursor::new(dir.path(), "s3://a/p").load(), 1_790_000_123);
        assert_eq!(
            Cursor::new(dir.path(), "s3://b/p").load(),
            0,
            "another bucket"
        );
        fs::write(dir.path().join(CURSOR_FILE), "garbage").unwrap();
        assert_eq!(c.load(), 0);
    }
}
