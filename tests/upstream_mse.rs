//! The miss path against a real libtorrent seed that requires encryption
//! (`lt_client.py seed --encryption forced|forced-rc4`: MSE/PE only, plaintext refused):
//! `fetch_from_peer`'s plaintext attempt is closed unanswered, the MSE retry over the same
//! transport gets the metadata, byte-identical.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Seeds v1, multi-piece v1 and hybrid torrents with `seed_flags`, and fetches each.
fn fetch_all_from_a_seed_with(seed_flags: &[&str]) {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(tmp.path());
    let labels = ["v1-small", "v1-large", "hybrid-large"];
    let paths: Vec<&Path> = labels.iter().map(|l| torrents[*l].path.as_path()).collect();
    let flags: Vec<String> = seed_flags.iter().map(|s| s.to_string()).collect();
    let seed = LtSeed::start(&paths, &tmp.path().join("content"), &flags);
    // The seed really refuses a plaintext handshake: it closes without a byte.
    {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(seed.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hs = vec![19];
        hs.extend_from_slice(b"BitTorrent protocol");
        hs.extend_from_slice(&[0; 8]);
        hs.extend_from_slice(&torrents["v1-small"].key());
        hs.extend_from_slice(&[1; 20]);
        let _ = tcp.write_all(&hs);
        let mut b = [0u8; 1];
        assert_eq!(
            tcp.read(&mut b).unwrap_or(0),
            0,
            "plaintext must be refused"
        );
    }
    assert!(torrents["v1-large"].metadata_pieces >= 5);
    fetch_each_from_peer(seed.addr(), &torrents, &labels, &format!("{seed_flags:?}"));
}

#[test]
fn fetch_from_peer_gets_metadata_from_an_encryption_required_seed() {
    // libtorrent selects plaintext after the MSE handshake when we offer it.
    fetch_all_from_a_seed_with(&["--encryption", "forced"]);
}

#[test]
fn fetch_from_peer_gets_metadata_from_an_rc4_only_seed() {
    fetch_all_from_a_seed_with(&["--encryption", "forced-rc4"]);
}

#[test]
fn fetch_from_peer_gets_metadata_from_an_encrypted_utp_only_seed() {
    // TCP plaintext and TCP MSE are both closed at once; uTP plaintext is refused; uTP MSE
    // gets it.
    fetch_all_from_a_seed_with(&["--encryption", "forced-rc4", "--transport", "utp"]);
}
