//! Object names in the shared bucket, and the `s3://bucket/prefix` URL. Pure functions.
//!
//! Under `<prefix>/`:
//! - `info/<key>` — the raw info dict (bencoded bytes, nothing else), one object per
//!   20-byte handshake key: a v1 dict under its SHA-1, a v2 dict under the first 20 bytes of
//!   its SHA-256, a hybrid under both (two objects with the same bytes). Clients and misses
//!   only ever know the 20-byte key, and the bytes prove themselves: any node re-hashes them.
//! - `tomb/<key>` — a tombstone: the hash was deleted or blocked on some node; every node
//!   stops serving and fetching it. Found by name on a miss (one HEAD).
//! - `tomb-log/<unix seconds, 12 digits>-<key>` — the same tombstone in time order, so
//!   that nodes poll for new ones with one LIST starting after what they have seen.
//!
//! `<key>` is 40 lowercase hex digits.

use object_store::path::Path;

/// Digits of the time in `tomb-log/` names: zero-padded so that names sort by time.
const TIME_DIGITS: usize = 12;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Without leading or trailing '/'; empty for the bucket root.
    prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    pub bucket: String,
    pub layout: Layout,
}

/// Parses `s3://bucket` or `s3://bucket/some/prefix`.
pub fn parse_url(url: &str) -> Result<StoreUrl, String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("'{url}': the shared store must be an s3://BUCKET[/PREFIX] URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(format!(
            "'{url}': '{bucket}' is not an S3 bucket name (3-63 of a-z, 0-9, '-', '.')"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|seg| seg == "." || seg == "..")
        || prefix.contains("//")
        || prefix.bytes().any(|b| b.is_ascii_control())
    {
        return Err(format!(
            "'{url}': the prefix '{prefix}' is not a plain path"
        ));
    }
    Ok(StoreUrl {
        bucket: bucket.to_owned(),
        layout: Layout {
            prefix: prefix.to_owned(),
        },
    })
}

impl Layout {
    fn join(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    pub fn info(&self, key: &[u8; 20]) -> Path {
        self.join(&format!("info/{}", hex::encode(key)))
    }

    pub fn info_dir(&self) -> Path {
        self.join("info")
    }

    pub fn tomb(&self, key: &[u8; 20]) -> Path {
        self.join(&format!("tomb/{}", hex::encode(key)))
    }

    pub fn tomb_log(&self, at: u64, key: &[u8; 20]) -> Path {
        self.join(&format!(
            "tomb-log/{at:0width$}-{}",
            hex::encode(key),
            width = TIME_DIGITS
        ))
    }

    pub fn tomb_log_dir(&self) -> Path {
        self.join("tomb-log")
    }

    /// The LIST offset that yields every `tomb-log/` name stamped at or after `at`.
    pub fn tomb_log_after(&self, at: u64) -> Path {
        // Names are `<at>-<key>`: "<at - 1>." sorts after every name of the second before
        // ('.' > '-') and before every name of `at`. ('~' would be percent-encoded.)
        self.join(&format!(
            "tomb-log/{:0width$}.",
            at.saturating_sub(1),
            width = TIME_DIGITS
        ))
    }

    /// The key of an `info/<key>` name.
    pub fn parse_info(&self, path: &Path) -> Option<[u8; 20]> {
        parse_hex_key(self.strip(path)?.strip_prefix("info/")?)
    }

    /// (time, key) of a `tomb-log/<time>-<key>` name.
    pub fn parse_tomb_log(&self, path: &Path) -> Option<(u64, [u8; 20])> {
        let name = self.strip(path)?.strip_prefix("tomb-log/")?;
        let (at, key) = name.split_once('-')?;
        if at.len() != TIME_DIGITS || !at.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((at.parse().ok()?, parse_hex_key(key)?))
    }

    fn strip<'a>(&self, path: &'a Path) -> Option<&'a str> {
        let s = path.as_ref();
        if self.prefix.is_empty() {
            Some(s)
        } else {
            s.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }
}

fn parse_hex_key(s: &str) -> Option<[u8; 20]> {
    if s.len() != 40 {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_and_prefix() {
        let u = parse_url("s3://magnetar/fleet/a/").unwrap();
        assert_eq!(u.bucket, "magnetar");
        assert_eq!(
            u.layout.info(&[0xab; 20]).as_ref(),
            format!("fleet/a/info/{}", "ab".repeat(20))
        );
        let root = parse_url("s3://magnetar").unwrap();
        assert_eq!(
            root.layout.tomb(&[1; 20]).as_ref(),
            format!("tomb/{}", "01".repeat(20))
        );
        for bad in [
            "http://x/y",
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://b_b",
            "s3://bucket/../x",
            "s3://bucket/a//b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_round_trip_and_tomb_log_sorts_by_time() {
        let l = parse_url("s3://bucket/p").unwrap().layout;
        let k = [0x5a; 20];
        assert_eq!(l.parse_info(&l.info(&k)), Some(k));
        assert_eq!(
            l.parse_tomb_log(&l.tomb_log(1_790_000_000, &k)),
            Some((1_790_000_000, k))
        );
        assert_eq!(l.parse_info(&l.tomb(&k)), None);
        assert_eq!(l.parse_tomb_log(&l.info(&k)), None);
        // The LIST offset for `at` comes after every name of `at - 1` and before every
        // name of `at` (S3 lists names after the offset in byte order).
        let off = l.tomb_log_after(100);
        let earlier = l.tomb_log(99, &[0xff; 20]);
        let same = l.tomb_log(100, &[0; 20]);
        assert!(earlier.as_ref() < off.as_ref() && off.as_ref() < same.as_ref());
        let later = l.tomb_log(1_000, &[0; 20]);
        assert!(
            same.as_ref() < later.as_ref(),
            "zero padding keeps time order"
        );
    }
}
