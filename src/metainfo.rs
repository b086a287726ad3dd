//! Info dict validation and info-hash computation (BEP 3 v1, BEP 52 v2, hybrid). No I/O.
//!
//! Owns the one question every other module asks about metadata bytes: "is this a real info
//! dict, and what are its hashes?". The hashes are always computed over the raw bytes we were
//! given; nothing here ever re-encodes an info dict, because a single changed byte changes the
//! info-hash.
//!
//! Parsing is bendy's strict decoder with our depth cap. bendy insists on canonical bencode:
//! dict keys sorted and unique, no leading zeros. Every torrent maker we know of emits that, and
//! a dict that is not canonical is ambiguous (two `name` keys) or was hand-edited; we refuse it.

use std::fmt;
use std::ops::Range;

use bendy::decoding::{Decoder, DictDecoder, ListDecoder, Object};
use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::limits::{BENCODE_DEPTH_MAX, METADATA_BYTES_MAX};

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
}

impl From<bendy::decoding::Error> for MetainfoError {
    fn from(e: bendy::decoding::Error) -> Self {
        // bendy's Display may add a multi-line context; one line is enough for a log or a reply.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("");
        MetainfoError::Bencode(first.to_owned())
    }
}

type Result<T> = std::result::Result<T, MetainfoError>;

fn decoder(bytes: &[u8]) -> Decoder<'_> {
    Decoder::new(bytes).with_max_depth(BENCODE_DEPTH_MAX)
}

fn as_bytes<'ser>(obj: Object<'_, 'ser>, field: &'static str) -> Result<&'ser [u8]> {
    match obj {
        Object::Bytes(b) => Ok(b),
        _ => Err(MetainfoError::WrongType(field)),
    }
}

fn as_int(obj: Object<'_, '_>, field: &'static str) -> Result<i64> {
    match obj {
        Object::Integer(s) => s.parse().map_err(|_| MetainfoError::BadInteger(field)),
        _ => Err(MetainfoError::WrongType(field)),
    }
}

/// A non-negative integer (lengths, sizes).
fn as_u64(obj: Object<'_, '_>, field: &'static str) -> Result<u64> {
    let n = as_int(obj, field)?;
    u64::try_from(n).map_err(|_| MetainfoError::BadInteger(field))
}

/// Parse, check and hash a raw bencoded info dict. The bytes must be exactly one dictionary.
pub fn validate_info(info: &[u8]) -> Result<InfoSummary> {
    if info.len() > METADATA_BYTES_MAX {
        return Err(MetainfoError::TooLarge {
            len: info.len(),
            max: METADATA_BYTES_MAX,
        });
    }
    let mut dec = decoder(info);
    let fields = {
        let dict = match dec.next_object()? {
            None => return Err(MetainfoError::Empty),
            Some(Object::Dict(d)) => d,
            Some(_) => return Err(MetainfoError::NotADict("info")),
        };
        read_info_fields(dict)?
    };
    // The dict consumed its closing `e`; anything after it is not part of the info dict and
    // would make "the bytes we hash" differ from "the dict we parsed".
    let consumed = match dec.next_object() {
        Ok(None) => None,
        // `Ok(Some(_))` or an error both mean more bytes; report how many.
        _ => Some(()),
    };
    if consumed.is_some() {
        let end = dict_end(info)?;
        return Err(MetainfoError::TrailingBytes {
            count: info.len() - end,
        });
    }
    fields.into_summary(info)
}

/// Length of the first complete dict in `bytes` (used only to word a trailing-bytes error).
fn dict_end(bytes: &[u8]) -> Result<usize> {
    let mut dec = decoder(bytes);
    let len = match dec.next_object()? {
        Some(Object::Dict(d)) => d.into_raw()?.len(),
        _ => return Err(MetainfoError::NotADict("info")),
    };
    Ok(len)
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

fn read_info_fields<'ser>(mut dict: DictDecoder<'_, 'ser>) -> Result<InfoFields<'ser>> {
    let mut f = InfoFields::default();
    while let Some((key, value)) = dict.next_pair()? {
        match key {
            b"name" => f.name = Some(as_bytes(value, "name")?),
            b"name.utf-8" => f.name_utf8 = Some(as_bytes(value, "name.utf-8")?),
            b"piece length" => f.piece_length = Some(as_int(value, "piece length")?),
            b"pieces" => f.pieces = Some(as_bytes(value, "pieces")?),
            b"length" => f.length = Some(as_u64(value, "length")?),
            b"files" => match value {
                Object::List(list) => f.files = Some(read_v1_files(list)?),
                _ => return Err(MetainfoError::WrongType("files")),
            },
            b"meta version" => {
                f.meta_version = Some(match value {
                    Object::Integer(s) => s
                        .parse()
                        .map_err(|_| MetainfoError::UnsupportedMetaVersion(s.to_owned()))?,
                    _ => return Err(MetainfoError::WrongType("meta version")),
                })
            }
            b"file tree" => match value {
                Object::Dict(tree) => {
                    let mut acc = (0u64, 0u64);
                    walk_file_tree(tree, &mut acc, true)?;
                    f.file_tree = Some(acc);
                }
                _ => return Err(MetainfoError::WrongType("file tree")),
            },
            // Anything other than the integer 1 is "not private" (BEP 27 only defines 1).
            b"private" => f.private = matches!(value, Object::Integer("1")),
            // Unknown keys are part of the hashed bytes; dropping the value skips it (bendy
            // still checks its structure and depth).
            _ => {}
        }
    }
    Ok(f)
}

/// BEP 3 `files`: a list of `{length, path: [bytes...]}`. BEP 47 pad files (`attr` containing
/// `p`) count towards the piece layout but are not content.
fn read_v1_files(mut list: ListDecoder<'_, '_>) -> Result<(u64, u64, u64)> {
    let (mut total, mut real_total, mut real_files, mut entries) = (0u64, 0u64, 0u64, 0u64);
    while let Some(item) = list.next_object()? {
        let mut entry = match item {
            Object::Dict(d) => d,
            _ => return Err(MetainfoError::NotADict("files entry")),
        };
        let (mut length, mut has_path, mut pad) = (None, false, false);
        while let Some((key, value)) = entry.next_pair()? {
            match key {
                b"length" => length = Some(as_u64(value, "files.length")?),
                b"path" => {
                    let mut path = match value {
                        Object::List(p) => p,
                        _ => return Err(MetainfoError::WrongType("files.path")),
                    };
                    while let Some(component) = path.next_object()? {
                        as_bytes(component, "files.path")?;
                    }
                    has_path = true;
                }
                b"attr" => pad = as_bytes(value, "files.attr")?.contains(&b'p'),
                _ => {}
            }
        }
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

/// BEP 52 `file tree`: a node is a dict; a file node's only key is "" mapping to
/// `{length, pieces root}`, any other node is a directory of name -> node. Keys are sorted, so
/// a file's "" key is always the first. Recursion is bounded by the decoder's depth cap.
fn walk_file_tree(mut node: DictDecoder<'_, '_>, acc: &mut (u64, u64), root: bool) -> Result<()> {
    let mut children = 0usize;
    loop {
        let file_length = {
            let Some((name, value)) = node.next_pair()? else {
                break;
            };
            let Object::Dict(value) = value else {
                return Err(MetainfoError::BadFileTree("node is not a dictionary"));
            };
            if name.is_empty() {
                if root {
                    return Err(MetainfoError::BadFileTree("file at the root"));
                }
                debug_assert_eq!(children, 0, "sorted keys put \"\" first");
                read_v2_file(value)?
            } else {
                walk_file_tree(value, acc, false)?;
                children += 1;
                continue;
            }
        };
        if node.next_pair()?.is_some() {
            return Err(MetainfoError::BadFileTree("file node has other keys"));
        }
        acc.0 = acc
            .0
            .checked_add(file_length)
            .ok_or(MetainfoError::SizeOverflow)?;
        acc.1 += 1;
        return Ok(());
    }
    if children == 0 {
        return Err(MetainfoError::BadFileTree("empty directory"));
    }
    Ok(())
}

fn read_v2_file(mut props: DictDecoder<'_, '_>) -> Result<u64> {
    let (mut length, mut root) = (None, None);
    while let Some((key, value)) = props.next_pair()? {
        match key {
            b"length" => length = Some(as_u64(value, "file tree length")?),
            b"pieces root" => root = Some(as_bytes(value, "pieces root")?),
            _ => {}
        }
    }
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
/// found by the decoder's own span, so the bytes are exactly what was hashed by the torrent's
/// creator. Keys after `info` are not looked at (they do not affect the info-hash).
pub fn info_span(torrent: &[u8]) -> Result<Range<usize>> {
    let mut dec = decoder(torrent);
    let mut top = match dec.next_object()? {
        Some(Object::Dict(d)) => d,
        None => return Err(MetainfoError::Empty),
        Some(_) => return Err(MetainfoError::NotADict("torrent")),
    };
    while let Some((key, value)) = top.next_pair()? {
        if key == b"info" {
            let Object::Dict(info) = value else {
                return Err(MetainfoError::NotADict("info"));
            };
            let raw = info.into_raw()?;
            // `raw` is a subslice of `torrent`; its offset is the pointer difference.
            let start = raw.as_ptr() as usize - torrent.as_ptr() as usize;
            return Ok(start..start + raw.len());
        }
    }
    Err(MetainfoError::NoInfo)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
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
        // Canonical (bendy is strict about sorted keys), and the info bytes are untouched.
        let span = info_span(&t).unwrap();
        assert_eq!(&t[span.clone()], &info[..]);
        assert_eq!(validate_info(&t[span]).unwrap().hashes, h);
        let mut d = decoder(&t);
        let Some(Object::Dict(top)) = d.next_object().unwrap() else {
            panic!()
        };
        assert_eq!(top.into_raw().unwrap().len(), t.len());
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
        // Unsorted keys are not canonical bencode: refused (see module doc).
        let unsorted =
            b"d4:name1:a6:lengthi5e12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert!(validate_info(unsorted).is_err());
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
            assert!(validate_info(&bomb).is_err());
            assert!(info_span(&bomb).is_err());
        }
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
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (rnd() % 300) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let _ = validate_info(&bytes);
            let _ = info_span(&bytes);
            // Mutations of real input reach deeper into the parser than noise does.
            for base in [&info, &torrent] {
                let mut m = base.to_vec();
                for _ in 0..1 + rnd() % 4 {
                    let i = (rnd() as usize) % m.len();
                    m[i] = rnd() as u8;
                }
                if rnd() % 4 == 0 {
                    m.truncate((rnd() as usize) % m.len());
                }
                if validate_info(&m).is_ok() {
                    let _ = verify_info(&m, &InfoHashes::default());
                }
                if let Ok(r) = info_span(&m) {
                    let _ = validate_info(&m[r]);
                }
            }
        }
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

    /// `cargo test --release --lib -- --ignored --nocapture validate_info_speed`: median of 5
    /// runs. A rough number for a before/after comparison, not a benchmark.
    #[test]
    #[ignore]
    fn validate_info_speed() {
        let v1 = synthetic_v1(7, 50_000 * 20 + 80);
        let v2 = synthetic_v2(1500);
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
        for (what, dict, files) in [("v1 50k pieces", &v1, 1), ("v2 1500 files", &v2, 1500)] {
            let s = validate_info(dict).unwrap();
            assert_eq!(s.files, files);
            let total = median_of_5(&|| {
                std::hint::black_box(validate_info(std::hint::black_box(dict)).unwrap());
            });
            // Baseline in the same run: the hashing every version of the parser has to do.
            let hashing = median_of_5(&|| {
                std::hint::black_box(verify_info(std::hint::black_box(dict), &s.hashes));
            });
            eprintln!(
                "{what}: {} bytes, validate_info median {total:?}, of which hashing {hashing:?}",
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
