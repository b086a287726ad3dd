//! Info dict validation and info-hash computation (BEP 3 v1, BEP 52 v2, hybrid). No I/O.
//!
//! Owns the one question every other module asks about metadata bytes: "is this a real info
//! dict, and what are its hashes?". The hashes are always computed over the raw bytes we were
//! given; nothing here ever re-encodes an info dict, because a single changed byte changes the
//! info-hash.
//!
//! Parsing is `wire::bencode`, the depth-capped scanner that also reads peer messages, not
//! bendy: bendy refuses dicts with unsorted keys, which real .torrent files have and libtorrent
//! accepts (the info-hash is over the raw bytes, so they are valid torrents); one scanner serves
//! wire and store. What we do refuse is a key repeated in a dict we interpret (two `name`s, two
//! files of one name in a directory, two `info`s in a .torrent): which one a client would use
//! is ambiguous.

use std::fmt;
use std::ops::Range;

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::limits::METADATA_BYTES_MAX;
use crate::wire::bencode::{self, BencodeError, Cursor, Dict, Value};

/// BEP 52: v2 piece length is a power of two, at least 16 KiB.
const V2_PIECE_LENGTH_MIN: u64 = 16 * 1024;

/// The info-hashes of one info dict: SHA-1 when it has v1 fields, SHA-256 when `meta version`
/// is 2. A hybrid torrent has both and is reachable under either.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InfoHashes {
    pub v1: Option<[u8; 20]>,
    pub v2: Option<[u8; 32]>,
}

impl InfoHashes {
    /// The 20-byte keys a peer may put in its handshake for this torrent: the v1 SHA-1 and the
    /// v2 SHA-256 truncated to 20 bytes (BEP 52).
    pub fn handshake_keys(&self) -> impl Iterator<Item = [u8; 20]> {
        let (v1, v2) = (self.v1, self.v2);
        v1.into_iter().chain(v2.map(|h| v2_handshake_key(&h)))
    }

    /// The key a record is filed and sharded under: v1 if present, else the v2 prefix. Every
    /// info dict has at least one of them once validated.
    pub fn primary_key(&self) -> Option<[u8; 20]> {
        self.handshake_keys().next()
    }
}

impl fmt::Debug for InfoHashes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v1 = self.v1.map(hex::encode);
        let v2 = self.v2.map(hex::encode);
        f.debug_struct("InfoHashes")
            .field("v1", &v1)
            .field("v2", &v2)
            .finish()
    }
}

/// The 20-byte handshake key of a v2 info-hash: its first 20 bytes (BEP 52).
pub fn v2_handshake_key(v2: &[u8; 32]) -> [u8; 20] {
    let mut key = [0u8; 20];
    key.copy_from_slice(&v2[..20]);
    key
}

/// What validation learned about an info dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoSummary {
    pub hashes: InfoHashes,
    /// `name.utf-8` if present, else `name`, lossily decoded: for display only.
    pub name: String,
    /// BEP 27 `private=1`: never fetched or announced through DHT or PEX.
    pub private: bool,
    pub piece_length: u64,
    /// Sum of the real file lengths (v2 file tree if present, else the v1 list without
    /// BEP 47 pad files).
    pub total_size: u64,
    pub files: u64,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MetainfoError {
    #[error("info dict is {len} bytes, more than the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed bencode: {0}")]
    Bencode(String),
    #[error("empty input")]
    Empty,
    #[error("{0} is not a dictionary")]
    NotADict(&'static str),
    #[error("{count} trailing bytes after the dictionary")]
    TrailingBytes { count: usize },
    #[error("missing `{0}`")]
    Missing(&'static str),
    #[error("`{0}` has the wrong type")]
    WrongType(&'static str),
    #[error("`{0}` is not a valid integer here")]
    BadInteger(&'static str),
    #[error("`pieces` is {0} bytes, not a multiple of 20")]
    PiecesNotMultipleOf20(usize),
    #[error("`pieces` holds {actual} hashes, the files need {expected}")]
    PieceCountMismatch { expected: u64, actual: u64 },
    #[error("v1 info dict has both `length` and `files`")]
    LengthAndFiles,
    #[error("v1 info dict has neither `length` nor `files`")]
    NoLengthOrFiles,
    #[error("no files")]
    NoFiles,
    #[error("file sizes overflow")]
    SizeOverflow,
    #[error("v2 `piece length` {0} is not a power of two >= 16 KiB")]
    BadV2PieceLength(u64),
    #[error("unsupported `meta version` {0}")]
    UnsupportedMetaVersion(String),
    #[error("bad `file tree`: {0}")]
    BadFileTree(&'static str),
    #[error("neither v1 (`pieces`) nor v2 (`meta version` 2) fields")]
    NoVersion,
    #[error("no `info` dictionary in the .torrent")]
    NoInfo,
    #[error("`{dict}` has the key `{key}` more than once")]
    DuplicateKey { dict: &'static str, key: String },
}

impl From<BencodeError> for MetainfoError {
    fn from(e: BencodeError) -> Self {
        MetainfoError::Bencode(e.to_string())
    }
}

type Result<T> = std::result::Result<T, MetainfoError>;

/// At most this many bytes of a key or an integer are quoted in an error: the input may be
/// megabytes long, an error message need not be.
const QUOTE_BYTES_MAX: usize = 40;

fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTE_BYTES_MAX)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < bytes.len() {
        text.push('…');
    }
    text
}

fn as_bytes<'a>(value: Value<'a>, field: &'static str) -> Result<&'a [u8]> {
    value.as_bytes().ok_or(MetainfoError::WrongType(field))
}

fn as_int(value: Value<'_>, field: &'static str) -> Result<i64> {
    let int = value.as_int().ok_or(MetainfoError::WrongType(field))?;
    int.to_i64().ok_or(MetainfoError::BadInteger(field))
}

/// A non-negative integer that fits an i64 (lengths, sizes; libtorrent's are signed 64-bit).
fn as_u64(value: Value<'_>, field: &'static str) -> Result<u64> {
    let n = as_int(value, field)?;
    u64::try_from(n).map_err(|_| MetainfoError::BadInteger(field))
}

/// The keys of the dicts being read, innermost last, to refuse a key repeated in any of them.
/// A dict's keys sit above those of the dicts it is nested in, so one vector serves a whole
/// walk, however deep. Canonical bencode sorts keys, so closing a dict is almost always one
/// comparison per key; only a dict with keys out of order is sorted to find repeats. (No
/// second pass over the dict: that would scan its children again.)
#[derive(Default)]
struct KeyStack<'a> {
    keys: Vec<&'a [u8]>,
}

impl<'a> KeyStack<'a> {
    /// Starts a dict; pass the result to `close`.
    fn open(&self) -> usize {
        self.keys.len()
    }

    fn push(&mut self, key: &'a [u8]) {
        self.keys.push(key);
    }

    fn close(&mut self, opened: usize, what: &'static str) -> Result<()> {
        let keys = &mut self.keys[opened..];
        if !keys.windows(2).all(|pair| pair[0] < pair[1]) {
            keys.sort_unstable();
            if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
                return Err(MetainfoError::DuplicateKey {
                    dict: what,
                    key: quote(pair[0]),
                });
            }
        }
        self.keys.truncate(opened);
        Ok(())
    }
}

/// The value after a key the cursor just read.
fn value_of<'a>(cur: &mut Cursor<'a>, key: &[u8]) -> Result<Value<'a>> {
    // Unreachable: the scanner refuses a dict with a key but no value.
    cur.next_value()
        .ok_or_else(|| MetainfoError::Bencode(format!("no value for `{}`", quote(key))))
}

/// Parse, check and hash a raw bencoded info dict. The bytes must be exactly one dictionary.
pub fn validate_info(info: &[u8]) -> Result<InfoSummary> {
    if info.len() > METADATA_BYTES_MAX {
        return Err(MetainfoError::TooLarge {
            len: info.len(),
            max: METADATA_BYTES_MAX,
        });
    }
    if info.is_empty() {
        return Err(MetainfoError::Empty);
    }
    // Validates all of it (syntax, depth cap, string lengths) before anything is read.
    let (value, len) = bencode::parse_prefix(info)?;
    let dict = value.as_dict().ok_or(MetainfoError::NotADict("info"))?;
    // Anything after the dict is not part of it and would make "the bytes we hash" differ
    // from "the dict we parsed".
    if len < info.len() {
        return Err(MetainfoError::TrailingBytes {
            count: info.len() - len,
        });
    }
    read_info_fields(&mut dict.cursor(), &mut KeyStack::default())?.into_summary(info)
}

#[derive(Default)]
struct InfoFields<'a> {
    name: Option<&'a [u8]>,
    name_utf8: Option<&'a [u8]>,
    piece_length: Option<i64>,
    pieces: Option<&'a [u8]>,
    length: Option<u64>,
    /// (total incl. pad files, total without pad files, real file count)
    files: Option<(u64, u64, u64)>,
    meta_version: Option<i64>,
    /// (total, file count)
    file_tree: Option<(u64, u64)>,
    private: bool,
}

/// Reads the info dict the cursor is in, to its end. `files` and `file tree` are stepped into
/// rather than taken whole, so each byte is read once however deep the tree.
fn read_info_fields<'a>(cur: &mut Cursor<'a>, keys: &mut KeyStack<'a>) -> Result<InfoFields<'a>> {
    let mut f = InfoFields::default();
    let opened = keys.open();
    while let Some(key) = cur.next_key() {
        keys.push(key);
        match key {
            b"files" => {
                if !cur.enter_list() {
                    return Err(MetainfoError::WrongType("files"));
                }
                f.files = Some(read_v1_files(cur, keys)?);
                continue;
            }
            b"file tree" => {
                if !cur.enter_dict() {
                    return Err(MetainfoError::WrongType("file tree"));
                }
                let mut acc = (0u64, 0u64);
                walk_file_tree(cur, keys, &mut acc, true)?;
                f.file_tree = Some(acc);
                continue;
            }
            _ => {}
        }
        let value = value_of(cur, key)?;
        match key {
            b"name" => f.name = Some(as_bytes(value, "name")?),
            b"name.utf-8" => f.name_utf8 = Some(as_bytes(value, "name.utf-8")?),
            b"piece length" => f.piece_length = Some(as_int(value, "piece length")?),
            b"pieces" => f.pieces = Some(as_bytes(value, "pieces")?),
            b"length" => f.length = Some(as_u64(value, "length")?),
            b"meta version" => {
                let int = value
                    .as_int()
                    .ok_or(MetainfoError::WrongType("meta version"))?;
                let version = int
                    .to_i64()
                    .ok_or_else(|| MetainfoError::UnsupportedMetaVersion(quote(int.digits())))?;
                f.meta_version = Some(version);
            }
            // Anything other than the integer 1 is "not private" (BEP 27 only defines 1).
            b"private" => f.private = value.as_int().and_then(|i| i.to_i64()) == Some(1),
            // Unknown keys are part of the hashed bytes; the scanner has already checked their
            // structure and depth.
            _ => {}
        }
    }
    // Any repeated key, known to us or not: some client would use the other value.
    keys.close(opened, "info")?;
    Ok(f)
}

/// BEP 3 `files` (the cursor is in the list): `{length, path: [bytes...]}` entries. BEP 47
/// pad files (`attr` containing `p`) count towards the piece layout but are not content.
fn read_v1_files<'a>(cur: &mut Cursor<'a>, keys: &mut KeyStack<'a>) -> Result<(u64, u64, u64)> {
    let (mut total, mut real_total, mut real_files, mut entries) = (0u64, 0u64, 0u64, 0u64);
    // An entry is small and flat, so it is read as a view: that scans it a fixed number of
    // times, not once per level of anything.
    while let Some(item) = cur.next_value() {
        let entry = item
            .as_dict()
            .ok_or(MetainfoError::NotADict("files entry"))?;
        let (mut length, mut has_path, mut pad) = (None, false, false);
        let opened = keys.open();
        for (key, value) in entry {
            keys.push(key);
            match key {
                b"length" => length = Some(as_u64(value, "files.length")?),
                b"path" => {
                    let path = value
                        .as_list()
                        .ok_or(MetainfoError::WrongType("files.path"))?;
                    for component in path {
                        as_bytes(component, "files.path")?;
                    }
                    has_path = true;
                }
                b"attr" => pad = as_bytes(value, "files.attr")?.contains(&b'p'),
                _ => {}
            }
        }
        keys.close(opened, "files entry")?;
        let length = length.ok_or(MetainfoError::Missing("files.length"))?;
        if !has_path {
            return Err(MetainfoError::Missing("files.path"));
        }
        entries += 1;
        total = total
            .checked_add(length)
            .ok_or(MetainfoError::SizeOverflow)?;
        if !pad {
            real_files += 1;
            real_total = real_total
                .checked_add(length)
                .ok_or(MetainfoError::SizeOverflow)?;
        }
    }
    if entries == 0 {
        return Err(MetainfoError::NoFiles);
    }
    Ok((total, real_total, real_files))
}

/// BEP 52 `file tree` (the cursor is in a node): a node is a dict; a file node's only key is
/// "" mapping to `{length, pieces root}`, any other node is a directory of name -> node. Keys
/// may come in any order, so "" is not necessarily first. Recursion is bounded by the
/// scanner's depth cap, which `validate_info` checked before any walk starts.
fn walk_file_tree<'a>(
    cur: &mut Cursor<'a>,
    keys: &mut KeyStack<'a>,
    acc: &mut (u64, u64),
    root: bool,
) -> Result<()> {
    let (mut file, mut children) = (None, 0usize);
    let opened = keys.open();
    while let Some(name) = cur.next_key() {
        keys.push(name);
        if name.is_empty() {
            if root {
                return Err(MetainfoError::BadFileTree("file at the root"));
            }
            if children > 0 {
                return Err(MetainfoError::BadFileTree("file node has other keys"));
            }
            let props = value_of(cur, name)?
                .as_dict()
                .ok_or(MetainfoError::BadFileTree("node is not a dictionary"))?;
            file = Some(props);
        } else {
            if file.is_some() {
                return Err(MetainfoError::BadFileTree("file node has other keys"));
            }
            if !cur.enter_dict() {
                return Err(MetainfoError::BadFileTree("node is not a dictionary"));
            }
            walk_file_tree(cur, keys, acc, false)?;
            children += 1;
        }
    }
    // Two files or directories of one name: clients would disagree on the file list.
    keys.close(opened, "file tree")?;
    match file {
        Some(props) => {
            let length = read_v2_file(props, keys)?;
            acc.0 = acc
                .0
                .checked_add(length)
                .ok_or(MetainfoError::SizeOverflow)?;
            acc.1 += 1;
            Ok(())
        }
        None if children == 0 => Err(MetainfoError::BadFileTree("empty directory")),
        None => Ok(()),
    }
}

fn read_v2_file<'a>(props: Dict<'a>, keys: &mut KeyStack<'a>) -> Result<u64> {
    let (mut length, mut root) = (None, None);
    let opened = keys.open();
    for (key, value) in props {
        keys.push(key);
        match key {
            b"length" => length = Some(as_u64(value, "file tree length")?),
            b"pieces root" => root = Some(as_bytes(value, "pieces root")?),
            _ => {}
        }
    }
    keys.close(opened, "file tree file")?;
    let length = length.ok_or(MetainfoError::BadFileTree("file without length"))?;
    match root {
        Some(r) if r.len() != 32 => Err(MetainfoError::BadFileTree("pieces root is not 32 bytes")),
        None if length > 0 => Err(MetainfoError::BadFileTree("file without pieces root")),
        _ => Ok(length),
    }
}

impl InfoFields<'_> {
    fn into_summary(self, info: &[u8]) -> Result<InfoSummary> {
        let name = self.name.ok_or(MetainfoError::Missing("name"))?;
        let piece_length = match self.piece_length {
            None => return Err(MetainfoError::Missing("piece length")),
            Some(n) if n > 0 => n as u64,
            Some(_) => return Err(MetainfoError::BadInteger("piece length")),
        };

        let v2 = match self.meta_version {
            None => false,
            Some(2) => true,
            Some(other) => return Err(MetainfoError::UnsupportedMetaVersion(other.to_string())),
        };
        let mut summary_size = None;
        if v2 {
            if !piece_length.is_power_of_two() || piece_length < V2_PIECE_LENGTH_MIN {
                return Err(MetainfoError::BadV2PieceLength(piece_length));
            }
            let (total, files) = self.file_tree.ok_or(MetainfoError::Missing("file tree"))?;
            if files == 0 {
                return Err(MetainfoError::NoFiles);
            }
            summary_size = Some((total, files));
        }

        let v1 = match self.pieces {
            None if !v2 && (self.length.is_some() || self.files.is_some()) => {
                return Err(MetainfoError::Missing("pieces"))
            }
            None => false,
            Some(pieces) => {
                if pieces.len() % 20 != 0 {
                    return Err(MetainfoError::PiecesNotMultipleOf20(pieces.len()));
                }
                let (layout_total, real_total, real_files) = match (self.length, self.files) {
                    (Some(_), Some(_)) => return Err(MetainfoError::LengthAndFiles),
                    (None, None) => return Err(MetainfoError::NoLengthOrFiles),
                    (Some(len), None) => (len, len, 1),
                    (None, Some(files)) => files,
                };
                // libtorrent refuses a torrent whose hash count does not match its size.
                let expected = layout_total.div_ceil(piece_length);
                let actual = (pieces.len() / 20) as u64;
                if expected != actual {
                    return Err(MetainfoError::PieceCountMismatch { expected, actual });
                }
                summary_size.get_or_insert((real_total, real_files));
                true
            }
        };
        if !v1 && !v2 {
            return Err(MetainfoError::NoVersion);
        }
        let (total_size, files) = summary_size.unwrap_or((0, 0));
        let display = self.name_utf8.unwrap_or(name);
        Ok(InfoSummary {
            hashes: InfoHashes {
                v1: v1.then(|| sha1_of(info)),
                v2: v2.then(|| sha256_of(info)),
            },
            name: String::from_utf8_lossy(display).into_owned(),
            private: self.private,
            piece_length,
            total_size,
            files,
        })
    }
}

fn sha1_of(bytes: &[u8]) -> [u8; 20] {
    Sha1::digest(bytes).into()
}

fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Recompute whichever hashes `expected` holds and compare. `false` if it holds none.
pub fn verify_info(info: &[u8], expected: &InfoHashes) -> bool {
    if expected.v1.is_none() && expected.v2.is_none() {
        return false;
    }
    expected.v1.is_none_or(|h| sha1_of(info) == h)
        && expected.v2.is_none_or(|h| sha256_of(info) == h)
}

/// Byte range of the raw `info` value inside a .torrent file (a top-level dict). The range is
/// the scanner's own span of the value, so the bytes are exactly what the torrent's creator
/// hashed, whatever the key order. The whole .torrent is validated (a truncated file is
/// refused, as libtorrent does); bytes after the top-level dict are ignored. Two `info` keys
/// are refused: which one is the torrent would be ambiguous.
pub fn info_span(torrent: &[u8]) -> Result<Range<usize>> {
    if torrent.is_empty() {
        return Err(MetainfoError::Empty);
    }
    let (top, _) = bencode::parse_prefix(torrent)?;
    let top = top.as_dict().ok_or(MetainfoError::NotADict("torrent"))?;
    let mut info = None;
    for (key, value) in top {
        if key == b"info" {
            let dict = value.as_dict().ok_or(MetainfoError::NotADict("info"))?;
            if info.replace(dict.raw()).is_some() {
                return Err(MetainfoError::DuplicateKey {
                    dict: "torrent",
                    key: "info".to_owned(),
                });
            }
        }
    }
    let raw = info.ok_or(MetainfoError::NoInfo)?;
    // `raw` is a subslice of `torrent`; its offset is the pointer difference.
    let start = raw.as_ptr() as usize - torrent.as_ptr() as usize;
    debug_assert!(start + raw.len() <= torrent.len());
    Ok(start..start + raw.len())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

/// A .torrent around a raw info dict: `announce` (first tracker) and `announce-list` (one tier
/// per tracker, BEP 12) when trackers are given, then `info` verbatim. Keys are in sorted order.
pub fn build_torrent(info: &[u8], trackers: &[String]) -> Vec<u8> {
    let trackers_len: usize = trackers.iter().map(|t| 2 * t.len() + 32).sum();
    let mut out = Vec::with_capacity(info.len() + trackers_len + 64);
    out.push(b'd');
    if let Some(first) = trackers.first() {
        put_bytes(&mut out, b"announce");
        put_bytes(&mut out, first.as_bytes());
        put_bytes(&mut out, b"announce-list");
        out.push(b'l');
        for t in trackers {
            out.push(b'l');
            put_bytes(&mut out, t.as_bytes());
            out.push(b'e');
        }
        out.push(b'e');
    }
    put_bytes(&mut out, b"info");
    out.extend_from_slice(info);
    out.push(b'e');
    out
}

/// A valid single-file v1 info dict with `pieces` piece hashes (`pieces * 20` bytes of
/// `pieces`): the unit tests' stand-in for a real torrent (2000 pieces: 3 metadata pieces).
#[cfg(test)]
pub(crate) fn synthetic_v1_info(pieces: usize) -> Vec<u8> {
    let mut v = format!(
        "d6:lengthi{}e4:name4:test12:piece lengthi16384e6:pieces",
        pieces * 16384
    )
    .into_bytes();
    v.extend_from_slice(format!("{}:", pieces * 20).as_bytes());
    v.extend((0..pieces * 20).map(|i| (i * 7 % 251) as u8));
    v.push(b'e');
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::limits::BENCODE_DEPTH_MAX;
    use crate::wire::test_rng::XorShift;
    use std::path::PathBuf;

    fn fixture(name: &str) -> (Vec<u8>, InfoHashes) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torrents");
        let torrent = std::fs::read(dir.join(format!("{name}.torrent"))).unwrap();
        let hashes = std::fs::read_to_string(dir.join(format!("{name}.hashes"))).unwrap();
        let mut parts = hashes.split_whitespace();
        let parse = |s: &str| (s != "-").then(|| hex::decode(s).unwrap());
        let v1 = parse(parts.next().unwrap()).map(|v| v.try_into().unwrap());
        let v2 = parse(parts.next().unwrap()).map(|v| v.try_into().unwrap());
        (torrent, InfoHashes { v1, v2 })
    }

    pub(crate) fn fixture_info(name: &str) -> (Vec<u8>, InfoHashes) {
        let (torrent, hashes) = fixture(name);
        let span = info_span(&torrent).unwrap();
        (torrent[span].to_vec(), hashes)
    }

    /// A synthetic valid v1 single-file info dict of roughly `size` bytes (for store tests and
    /// benchmarks). `seed` makes it unique.
    pub(crate) fn synthetic_v1(seed: u64, size: usize) -> Vec<u8> {
        let pieces_n = size.saturating_sub(80).max(20) / 20;
        let piece_length = 16 * 1024u64;
        let length = pieces_n as u64 * piece_length;
        let mut pieces = Vec::with_capacity(pieces_n * 20);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        while pieces.len() < pieces_n * 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pieces.extend_from_slice(&x.to_le_bytes());
        }
        pieces.truncate(pieces_n * 20);
        let mut out = Vec::with_capacity(pieces.len() + 100);
        out.extend_from_slice(format!("d6:lengthi{length}e4:name").as_bytes());
        put_bytes(&mut out, format!("synthetic-{seed}").as_bytes());
        out.extend_from_slice(format!("12:piece lengthi{piece_length}e6:pieces").as_bytes());
        put_bytes(&mut out, &pieces);
        out.push(b'e');
        out
    }

    #[test]
    fn libtorrent_fixtures_hash_like_libtorrent() {
        for (name, v1, v2, files) in [
            ("v1_single", true, false, 1),
            ("v1_multi", true, false, 3),
            ("v2_multi", false, true, 3),
            ("hybrid_multi", true, true, 3),
            ("hybrid_single", true, true, 1),
        ] {
            let (info, expected) = fixture_info(name);
            let s = validate_info(&info).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.hashes, expected, "{name}");
            assert_eq!(s.hashes.v1.is_some(), v1, "{name}");
            assert_eq!(s.hashes.v2.is_some(), v2, "{name}");
            assert_eq!(s.files, files, "{name}");
            assert_eq!(s.name, "content", "{name}");
            assert_eq!(s.piece_length, 16 * 1024);
            assert!(verify_info(&info, &expected));
        }
        let (info, _) = fixture_info("v1_multi");
        let s = validate_info(&info).unwrap();
        assert!(s.private);
        assert_eq!(s.total_size, 6000 + 25600 + 5);
        let (info, _) = fixture_info("hybrid_multi");
        // Pad files are in the v1 list but not in the size.
        assert_eq!(validate_info(&info).unwrap().total_size, 6000 + 25600 + 5);
        let (info, _) = fixture_info("v1_single");
        let s = validate_info(&info).unwrap();
        assert!(!s.private);
        assert_eq!(s.total_size, 45000);
    }

    #[test]
    fn handshake_keys_are_v1_then_v2_prefix() {
        let (info, h) = fixture_info("hybrid_multi");
        let keys: Vec<_> = validate_info(&info)
            .unwrap()
            .hashes
            .handshake_keys()
            .collect();
        assert_eq!(keys, vec![h.v1.unwrap(), v2_handshake_key(&h.v2.unwrap())]);
        let (info, h) = fixture_info("v2_multi");
        let s = validate_info(&info).unwrap();
        assert_eq!(
            s.hashes.primary_key(),
            Some(v2_handshake_key(&h.v2.unwrap()))
        );
    }

    #[test]
    fn verify_rejects_wrong_hashes() {
        let (info, mut h) = fixture_info("hybrid_single");
        assert!(verify_info(&info, &h));
        h.v2.as_mut().unwrap()[31] ^= 1;
        assert!(!verify_info(&info, &h));
        assert!(!verify_info(&info, &InfoHashes::default()));
        let only_v1 = InfoHashes { v1: h.v1, v2: None };
        assert!(verify_info(&info, &only_v1));
    }

    #[test]
    fn build_torrent_round_trips_through_info_span() {
        let (info, h) = fixture_info("hybrid_multi");
        let trackers = vec!["http://a/announce".to_owned(), "udp://b:1".to_owned()];
        let t = build_torrent(&info, &trackers);
        // One value, keys in canonical order, and the info bytes are untouched.
        let span = info_span(&t).unwrap();
        assert_eq!(&t[span.clone()], &info[..]);
        assert_eq!(validate_info(&t[span]).unwrap().hashes, h);
        let (top, len) = bencode::parse_prefix(&t).unwrap();
        assert_eq!(len, t.len());
        let keys: Vec<_> = top.as_dict().unwrap().map(|(k, _)| k).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert!(t.starts_with(b"d8:announce17:http://a/announce13:announce-listll17:http"));
        let bare = build_torrent(&info, &[]);
        assert_eq!(info_span(&bare).unwrap(), 7..7 + info.len());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (info, _) = fixture_info("v1_single");
        // Truncated anywhere.
        for cut in [0, 1, info.len() / 2, info.len() - 1] {
            assert!(validate_info(&info[..cut]).is_err(), "cut {cut}");
        }
        // Trailing bytes.
        let mut trailing = info.clone();
        trailing.extend_from_slice(b"i1e");
        assert_eq!(
            validate_info(&trailing),
            Err(MetainfoError::TrailingBytes { count: 3 })
        );
        let mut trailing_e = info.clone();
        trailing_e.push(b'e');
        assert!(validate_info(&trailing_e).is_err());

        let h = |pieces: &[u8]| {
            let mut v = b"d6:lengthi5e4:name1:a12:piece lengthi16384e6:pieces".to_vec();
            put_bytes(&mut v, pieces);
            v.push(b'e');
            v
        };
        assert!(validate_info(&h(&[7; 20])).is_ok());
        assert_eq!(
            validate_info(&h(&[7; 7])),
            Err(MetainfoError::PiecesNotMultipleOf20(7))
        );
        assert_eq!(
            validate_info(&h(&[7; 40])),
            Err(MetainfoError::PieceCountMismatch {
                expected: 1,
                actual: 2
            })
        );
        let no_name = b"d6:lengthi5e12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert_eq!(validate_info(no_name), Err(MetainfoError::Missing("name")));
        let zero_pl = b"d6:lengthi5e4:name1:a12:piece lengthi0e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert!(validate_info(zero_pl).is_err());
        let both =
            b"d5:filesle6:lengthi5e4:name1:a12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert!(validate_info(both).is_err());
        assert_eq!(
            validate_info(b"d4:name1:ae"),
            Err(MetainfoError::Missing("piece length"))
        );
        assert_eq!(
            validate_info(b"d4:name1:a12:piece lengthi16384ee"),
            Err(MetainfoError::NoVersion)
        );
        assert!(validate_info(b"le").is_err());
        assert!(validate_info(b"").is_err());
        // Unsorted keys are accepted (see module doc); repeated ones are not.
        let unsorted =
            b"d4:name1:a6:lengthi5e12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert!(validate_info(unsorted).is_ok());
        // v2 without a pieces root for a non-empty file.
        let v2 =
            b"d9:file treed1:ad0:d6:lengthi5eeee12:meta versioni2e4:name1:a12:piece lengthi16384ee";
        assert!(matches!(
            validate_info(v2),
            Err(MetainfoError::BadFileTree(_))
        ));
        let v2_empty_file =
            b"d9:file treed1:ad0:d6:lengthi0eeee12:meta versioni2e4:name1:a12:piece lengthi16384ee";
        assert!(validate_info(v2_empty_file).is_ok());
        let v3 =
            b"d9:file treed1:ad0:d6:lengthi0eeee12:meta versioni3e4:name1:a12:piece lengthi16384ee";
        assert!(validate_info(v3).is_err());
    }

    #[test]
    fn nesting_bomb_is_an_error_not_a_crash() {
        for depth in [BENCODE_DEPTH_MAX + 1, 100_000] {
            let mut bomb = b"d4:name1:a1:x".to_vec();
            bomb.extend(std::iter::repeat_n(b'l', depth));
            bomb.extend(std::iter::repeat_n(b'e', depth));
            bomb.push(b'e');
            let too_deep =
                |r: Result<_>| matches!(r, Err(MetainfoError::Bencode(m)) if m.contains("deeper"));
            assert!(too_deep(validate_info(&bomb).map(|_| ())), "{depth}");
            let mut torrent = b"d4:info".to_vec();
            torrent.extend_from_slice(&bomb);
            torrent.push(b'e');
            assert!(too_deep(info_span(&torrent).map(|_| ())), "{depth}");
        }
        // Exactly at the cap (the info dict is level 1): accepted as an unknown key.
        let mut at_cap = b"d1:x".to_vec();
        at_cap.extend(std::iter::repeat_n(b'l', BENCODE_DEPTH_MAX - 1));
        at_cap.extend(std::iter::repeat_n(b'e', BENCODE_DEPTH_MAX - 1));
        at_cap.extend_from_slice(b"6:lengthi5e4:name1:a12:piece lengthi16384e6:pieces20:");
        at_cap.extend_from_slice(&[0; 20]);
        at_cap.push(b'e');
        assert!(validate_info(&at_cap).is_ok());
        // A deep but legal v2 directory tree is fine.
        let mut deep = b"d9:file tree".to_vec();
        let levels = 20;
        for _ in 0..levels {
            deep.extend_from_slice(b"d1:a");
        }
        deep.extend_from_slice(b"d0:d6:lengthi0eee");
        deep.extend(std::iter::repeat_n(b'e', levels));
        deep.extend_from_slice(b"12:meta versioni2e4:name1:a12:piece lengthi16384ee");
        assert_eq!(validate_info(&deep).unwrap().files, 1);
    }

    #[test]
    fn info_span_errors() {
        assert_eq!(
            info_span(b"d4:infoi1ee"),
            Err(MetainfoError::NotADict("info"))
        );
        assert_eq!(info_span(b"d1:ai1ee"), Err(MetainfoError::NoInfo));
        assert!(info_span(b"d4:infod").is_err());
        assert!(info_span(b"li1ee").is_err());
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let (info, _) = fixture_info("hybrid_multi");
        let (torrent, _) = fixture("hybrid_multi");
        let unsorted = reversed_keys(&info);
        let mut rng = XorShift::new(0x03e7_a1f0);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let bytes = rng.bytes_below(300);
            let _ = validate_info(&bytes);
            let _ = info_span(&bytes);
            // Mutations of real input reach deeper into the parser than noise does.
            for base in [&info, &unsorted, &torrent] {
                let m = rng.mutate(base);
                if let Ok(s) = validate_info(&m) {
                    // Whatever is accepted is hashed over exactly the bytes given.
                    assert!(verify_info(&m, &s.hashes));
                    accepted += 1;
                }
                if let Ok(r) = info_span(&m) {
                    assert!(r.end <= m.len() && m[r.start] == b'd' && m[r.end - 1] == b'e');
                    let _ = validate_info(&m[r]);
                }
            }
        }
        assert!(
            accepted > 100,
            "mutations should sometimes stay valid: {accepted}"
        );
    }

    /// The raw `key value` entries of a dict, in wire order.
    fn raw_entries(dict: &[u8]) -> Vec<&[u8]> {
        assert_eq!(dict[0], b'd');
        let (mut entries, mut pos) = (Vec::new(), 1);
        while dict[pos] != b'e' {
            let key = bencode::value_len(&dict[pos..]).unwrap();
            let value = bencode::value_len(&dict[pos + key..]).unwrap();
            entries.push(&dict[pos..pos + key + value]);
            pos += key + value;
        }
        entries
    }

    /// The same dict with its top-level entries in reverse order.
    fn reversed_keys(dict: &[u8]) -> Vec<u8> {
        let mut out = b"d".to_vec();
        for entry in raw_entries(dict).into_iter().rev() {
            out.extend_from_slice(entry);
        }
        out.push(b'e');
        assert_eq!(out.len(), dict.len());
        out
    }

    #[test]
    fn unsorted_info_dict_validates_and_hashes_the_raw_bytes() {
        for name in ["v1_multi", "v2_multi", "hybrid_multi"] {
            let (info, _) = fixture_info(name);
            let unsorted = reversed_keys(&info);
            assert_ne!(unsorted, info);
            let sorted = validate_info(&info).unwrap();
            let s = validate_info(&unsorted).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The hash is over the bytes as given, not over a re-sorted encoding.
            assert_eq!(s.hashes.v1.is_some(), sorted.hashes.v1.is_some(), "{name}");
            assert_eq!(s.hashes.v2.is_some(), sorted.hashes.v2.is_some(), "{name}");
            assert!(
                s.hashes.v1.is_none_or(|h| h == sha1_of(&unsorted)),
                "{name}"
            );
            assert!(
                s.hashes.v2.is_none_or(|h| h == sha256_of(&unsorted)),
                "{name}"
            );
            assert_ne!(s.hashes, sorted.hashes, "{name}");
            let same_but_hashes = InfoSummary {
                hashes: sorted.hashes,
                ..s
            };
            assert_eq!(same_but_hashes, sorted, "{name}");
        }
        // Unsorted inside: a directory listed b before a, a file's properties reversed, and a
        // file node whose "" key is not the first key of its directory's entry.
        let v2 = b"d9:file treed1:bd0:d11:pieces root32:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\
            6:lengthi7eee1:ad0:d6:lengthi0eeee12:meta versioni2e4:name1:x12:piece lengthi16384ee";
        let s = validate_info(v2).unwrap();
        assert_eq!((s.files, s.total_size), (2, 7));
        assert_eq!(s.hashes.v2, Some(sha256_of(v2)));
        // v1 `files` entries with `path` before `length`.
        let v1 = b"d5:filesld4:pathl1:ae6:lengthi3eed4:pathl1:be6:lengthi4eee\
            4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        let s = validate_info(v1).unwrap();
        assert_eq!((s.files, s.total_size), (2, 7));
    }

    #[test]
    fn repeated_keys_are_refused() {
        let dup = |dict: &'static str, key: &str| {
            Err(MetainfoError::DuplicateKey {
                dict,
                key: key.to_owned(),
            })
        };
        let pieces = "6:pieces20:aaaaaaaaaaaaaaaaaaaa";
        let v1 = |keys: &str| format!("d{keys}12:piece lengthi16384e{pieces}e").into_bytes();
        // Adjacent (sorted order otherwise) and apart (unsorted), known keys and unknown ones.
        for (keys, key) in [
            ("6:lengthi5e4:name1:a4:name1:b", "name"),
            ("4:name1:a6:lengthi5e4:name1:a", "name"),
            ("4:name1:a6:lengthi5e6:lengthi5e", "length"),
            ("1:xi1e6:lengthi5e4:name1:a1:xi2e", "x"),
        ] {
            assert_eq!(
                validate_info(&v1(keys)).map(|_| ()),
                dup("info", key),
                "{keys}"
            );
        }
        let files = v1("5:filesld6:lengthi3e4:pathl1:ae6:lengthi9eee4:name1:a");
        assert_eq!(
            validate_info(&files).map(|_| ()),
            dup("files entry", "length")
        );
        let tree = |inner: &str| {
            format!("d9:file treed{inner}e12:meta versioni2e4:name1:x12:piece lengthi16384ee")
                .into_bytes()
        };
        let empty_file = "d0:d6:lengthi0eee";
        for (inner, dict, key) in [
            (
                format!("1:b{empty_file}1:a{empty_file}1:b{empty_file}"),
                "file tree",
                "b",
            ),
            (format!("1:a{empty_file}1:a{empty_file}"), "file tree", "a"),
            (
                "1:ad0:d6:lengthi0e6:lengthi0eee".to_owned(),
                "file tree file",
                "length",
            ),
        ] {
            assert_eq!(
                validate_info(&tree(&inner)).map(|_| ()),
                dup(dict, key),
                "{inner}"
            );
        }
        // "" twice in one node is a file node with another key.
        assert!(validate_info(&tree("1:ad0:d6:lengthi0ee0:d6:lengthi0eee")).is_err());
        // A file node with a directory beside it, whichever comes first.
        for inner in [
            "1:ad0:d6:lengthi0ee1:bd0:d6:lengthi0eeee",
            "1:ad1:bd0:d6:lengthi0eee0:d6:lengthi0eee",
        ] {
            assert_eq!(
                validate_info(&tree(inner)).map(|_| ()),
                Err(MetainfoError::BadFileTree("file node has other keys")),
                "{inner}"
            );
        }
        // A long repeated key is quoted, not copied whole, into the error.
        let long = "k".repeat(1000);
        let long_dup = v1(&format!("1000:{long}i1e6:lengthi5e4:name1:a1000:{long}i1e"));
        let Err(MetainfoError::DuplicateKey { key, .. }) = validate_info(&long_dup) else {
            panic!()
        };
        assert!(key.len() < 50 && key.ends_with('…'), "{key}");

        // Two `info` dicts in one .torrent, in either order.
        let (info, _) = fixture_info("v1_single");
        let mut two = b"d4:info".to_vec();
        two.extend_from_slice(&info);
        two.extend_from_slice(b"8:announce3:x:14:info");
        two.extend_from_slice(&info);
        two.push(b'e');
        assert_eq!(info_span(&two).map(|_| ()), dup("torrent", "info"));
    }

    #[test]
    fn info_span_of_a_torrent_with_unsorted_keys() {
        let (info, h) = fixture_info("hybrid_multi");
        let unsorted_info = reversed_keys(&info);
        // `info` first, then keys that sort before it, one with an unsorted dict inside.
        let mut t = b"d4:info".to_vec();
        t.extend_from_slice(&unsorted_info);
        let after = b"8:announce9:udp://x:113:creation datei1e7:commentd1:zi1e1:ai2eee";
        t.extend_from_slice(after);
        let span = info_span(&t).unwrap();
        assert_eq!(span, 7..7 + unsorted_info.len());
        assert_eq!(&t[span.clone()], &unsorted_info[..]);
        let s = validate_info(&t[span]).unwrap();
        assert_eq!(s.hashes.v1, Some(sha1_of(&unsorted_info)));
        assert_ne!(s.hashes, h);
        // `info` last, after keys that sort after it.
        let mut t = b"d7:privatei1e4:name1:x4:info".to_vec();
        t.extend_from_slice(&info);
        t.push(b'e');
        let span = info_span(&t).unwrap();
        assert_eq!(&t[span.clone()], &info[..]);
        assert_eq!(validate_info(&t[span]).unwrap().hashes, h);
    }

    #[test]
    fn huge_string_lengths_are_errors() {
        for len in [
            "99999999999",
            "18446744073709551615",
            "999999999999999999999999999",
        ] {
            let info = format!("d4:name{len}:abce");
            assert!(
                matches!(
                    validate_info(info.as_bytes()),
                    Err(MetainfoError::Bencode(_))
                ),
                "{len}"
            );
            let torrent = format!("d4:infod4:name{len}:abcee");
            assert!(
                matches!(
                    info_span(torrent.as_bytes()),
                    Err(MetainfoError::Bencode(_))
                ),
                "{len}"
            );
        }
        // The declared length of `pieces` must be there, not promised.
        let (info, _) = fixture_info("v1_single");
        let at = info.windows(7).position(|w| w == b"pieces6").unwrap() + 6;
        let mut lying = info[..at].to_vec();
        lying.extend_from_slice(b"9999999");
        lying.extend_from_slice(&info[info[at..].iter().position(|&b| b == b':').unwrap() + at..]);
        assert!(matches!(
            validate_info(&lying),
            Err(MetainfoError::Bencode(_))
        ));
    }

    /// A v2 info dict with `files` files spread over directories of 100, keys in sorted order
    /// (so every decoder accepts it).
    fn synthetic_v2(files: usize) -> Vec<u8> {
        let mut out = b"d9:file treed".to_vec();
        for dir in 0..files.div_ceil(100) {
            put_bytes(&mut out, format!("dir{dir:04}").as_bytes());
            out.push(b'd');
            for f in dir * 100..files.min(dir * 100 + 100) {
                put_bytes(&mut out, format!("file{f:06}.bin").as_bytes());
                out.extend_from_slice(b"d0:d6:lengthi");
                out.extend_from_slice((100_000 + f).to_string().as_bytes());
                out.extend_from_slice(b"e11:pieces root32:");
                out.extend_from_slice(&[f as u8; 32]);
                out.extend_from_slice(b"ee");
            }
            out.push(b'e');
        }
        out.extend_from_slice(b"e12:meta versioni2e4:name2:v212:piece lengthi16384ee");
        out
    }

    /// A v2 info dict whose files all sit `depth` directories down: the shape that made
    /// nested views scan the same bytes once per level.
    fn deep_v2(depth: usize, files: usize) -> Vec<u8> {
        let mut out = b"d9:file treed".to_vec();
        for _ in 0..depth {
            out.extend_from_slice(b"1:ad");
        }
        for f in 0..files {
            put_bytes(&mut out, format!("{f:06}").as_bytes());
            out.extend_from_slice(b"d0:d6:lengthi0eee");
        }
        out.extend(std::iter::repeat_n(b'e', depth));
        out.extend_from_slice(b"e12:meta versioni2e4:name1:x12:piece lengthi16384ee");
        out
    }

    /// `cargo test --release --lib -- --ignored --nocapture validate_info_speed`: median of 5
    /// runs, with two baselines from the same run: the hashing every parser has to do, and
    /// one validating scan (`value_len`). A rough number for a before/after comparison.
    #[test]
    #[ignore]
    fn validate_info_speed() {
        let v1 = synthetic_v1(7, 50_000 * 20 + 80);
        let v2 = synthetic_v2(1500);
        let deep = deep_v2(BENCODE_DEPTH_MAX - 4, 20_000);
        let median_of_5 = |f: &dyn Fn()| {
            let mut times: Vec<_> = (0..5)
                .map(|_| {
                    let started = std::time::Instant::now();
                    f();
                    started.elapsed()
                })
                .collect();
            times.sort();
            times[2]
        };
        for (what, dict, files) in [
            ("v1 50k pieces", &v1, 1),
            ("v2 1500 files", &v2, 1500),
            ("v2 20k files 60 dirs deep", &deep, 20_000),
        ] {
            let s = validate_info(dict).unwrap();
            assert_eq!(s.files, files);
            let total = median_of_5(&|| {
                std::hint::black_box(validate_info(std::hint::black_box(dict)).unwrap());
            });
            let hashing = median_of_5(&|| {
                std::hint::black_box(verify_info(std::hint::black_box(dict), &s.hashes));
            });
            let scan = median_of_5(&|| {
                std::hint::black_box(bencode::value_len(std::hint::black_box(dict)).unwrap());
            });
            eprintln!(
                "{what}: {} bytes, validate_info median {total:?} \
                 (hashing {hashing:?}, one scan {scan:?})",
                dict.len()
            );
        }
    }

    #[test]
    fn synthetic_dicts_are_valid() {
        for (seed, size) in [(1, 1000), (2, 20_000), (3, 10)] {
            let d = synthetic_v1(seed, size);
            let s = validate_info(&d).unwrap();
            assert!(s.hashes.v1.is_some() && s.hashes.v2.is_none());
        }
    }
}
