//! Synthetic info dicts, bencoded by hand (keys sorted), and what tests derive from them:
//! the one builder every test uses for a torrent it makes up (`v1_info`), its v2 and
//! hybrid siblings, the .torrent around one, and the handshake keys.
//!
//! (`magnetar::metainfo`'s `synthetic_v1_info` is crate-private, and the loadgen's
//! `synth::info_dict` lives in another package that this one does not depend on.)

use magnetar::wire::metadata_piece_count;
use sha1::{Digest, Sha1};
use sha2::Sha256;

/// An info dict and the 20 bytes a client puts in its handshake for it (SHA-1, or
/// SHA-256 truncated).
#[derive(Clone)]
pub struct Torrent {
    pub info: Vec<u8>,
    pub key: [u8; 20],
}

impl Torrent {
    /// A v1 (or hybrid) torrent, keyed by its v1 info-hash.
    pub fn v1(info: Vec<u8>) -> Torrent {
        Torrent {
            key: v1_key(&info),
            info,
        }
    }

    /// Keyed by its truncated v2 info-hash.
    pub fn v2(info: Vec<u8>) -> Torrent {
        Torrent {
            key: v2_key(&info),
            info,
        }
    }

    /// How many BEP 9 metadata pieces the info dict takes.
    pub fn pieces(&self) -> usize {
        metadata_piece_count(self.info.len())
    }
}

/// SHA-1 of the info dict: the v1 info-hash.
pub fn v1_key(info: &[u8]) -> [u8; 20] {
    Sha1::digest(info).into()
}

/// SHA-256 of the info dict truncated to 20 bytes: the v2 handshake key.
pub fn v2_key(info: &[u8]) -> [u8; 20] {
    magnetar::metainfo::v2_handshake_key(&Sha256::digest(info).into())
}

/// `pieces` piece hashes for `name`: the SHA-1 of `name/p` for each piece `p`.
pub fn piece_hashes(name: &str, pieces: usize) -> Vec<u8> {
    (0..pieces)
        .flat_map(|p| Sha1::digest(format!("{name}/{p}").as_bytes()))
        .collect()
}

fn bstr(s: &str) -> String {
    format!("{}:{}", s.len(), s)
}

/// A valid single-file v1 info dict named `name` with `pieces` piece hashes (unique to
/// `name`) and a length of `pieces` × 16 KiB: about `20 * pieces + 60 + name.len()`
/// bytes, so 2000 pieces make 3 metadata pieces and 4000 make 5.
pub fn v1_info(name: &str, pieces: usize) -> Vec<u8> {
    v1_info_with(name, pieces, false)
}

/// `v1_info`, with `private = 1` when `private`.
pub fn v1_info_with(name: &str, pieces: usize, private: bool) -> Vec<u8> {
    let mut v = format!(
        "d6:lengthi{}e4:name{}12:piece lengthi16384e6:pieces{}:",
        pieces * 16384,
        bstr(name),
        pieces * 20
    )
    .into_bytes();
    v.extend(piece_hashes(name, pieces));
    if private {
        v.extend_from_slice(b"7:privatei1e");
    }
    v.push(b'e');
    v
}

/// A v2 `file tree` with one file of `len` bytes.
fn file_tree(name: &str, len: u64) -> Vec<u8> {
    let mut v = format!(
        "9:file treed{}d0:d6:lengthi{len}e11:pieces root32:",
        bstr(name)
    )
    .into_bytes();
    v.extend_from_slice(&Sha256::digest(name.as_bytes()));
    v.extend_from_slice(b"eee");
    v
}

/// A v2-only single-file info dict.
pub fn v2_info(name: &str) -> Vec<u8> {
    let mut v = b"d".to_vec();
    v.extend(file_tree(name, 1_000_000));
    v.extend(
        format!(
            "12:meta versioni2e4:name{}12:piece lengthi16384ee",
            bstr(name)
        )
        .bytes(),
    );
    v
}

/// A hybrid (v1 + v2) single-file info dict of three pieces.
pub fn hybrid_info(name: &str) -> Vec<u8> {
    let len = 3 * 16384u64;
    let mut v = b"d".to_vec();
    v.extend(file_tree(name, len));
    v.extend(
        format!(
            "6:lengthi{len}e12:meta versioni2e4:name{}12:piece lengthi16384e6:pieces60:",
            bstr(name)
        )
        .bytes(),
    );
    v.extend(piece_hashes(name, 3));
    v.push(b'e');
    v
}

/// The .torrent around an info dict, without trackers (`d4:info<dict>e`).
pub fn torrent_file(info: &[u8]) -> Vec<u8> {
    magnetar::metainfo::build_torrent(info, &[])
}

/// Writes `NAME.torrent` for each `(name, info)` into a new `torrents` directory under
/// `dir` and imports them with `magnetar import` into `dir/data`; returns the data dir.
pub fn import_all(dir: &std::path::Path, infos: &[(&str, &[u8])]) -> std::path::PathBuf {
    let torrents = dir.join("torrents");
    std::fs::create_dir_all(&torrents).unwrap();
    for (name, info) in infos {
        std::fs::write(torrents.join(format!("{name}.torrent")), torrent_file(info)).unwrap();
    }
    let data = dir.join("data");
    super::run_ok(
        std::process::Command::new(super::magnetar_bin())
            .args(["--log", "warn", "import", "--data-dir"])
            .arg(&data)
            .arg(&torrents),
    );
    data
}
