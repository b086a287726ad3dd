//! The miss path over uTP against a real libtorrent that takes uTP only (incoming TCP
//! off: it accepts TCP and closes at once), and `UtpStream` on its own.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use magnetar::upstream::utp_stream::UtpStream;
use magnetar::wire::{decode_handshake_head, encode_handshake, Decoded, Reserved, HANDSHAKE_LEN};
use monoio::time::Instant;

#[test]
fn fetch_from_peer_gets_metadata_from_a_utp_only_libtorrent_seed() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(tmp.path());
    let labels = ["v1-small", "v1-large", "hybrid-large"];
    let paths: Vec<&Path> = labels.iter().map(|l| torrents[*l].path.as_path()).collect();
    let seed = LtSeed::start(
        &paths,
        &tmp.path().join("content"),
        &["--transport".to_string(), "utp".to_string()],
    );
    // The seed really refuses TCP peers: it accepts and closes without a byte.
    {
        use std::io::Read;
        let mut tcp = std::net::TcpStream::connect(seed.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            tcp.read(&mut b).unwrap_or(0),
            0,
            "TCP must be closed by the seed"
        );
    }
    assert!(torrents["v1-large"].metadata_pieces >= 5);
    fetch_each_from_peer(seed.addr(), &torrents, &labels, "uTP-only seed");
}

#[test]
fn utp_stream_carries_a_handshake_both_ways_with_libtorrent() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(tmp.path());
    let t = &torrents["v1-small"];
    let seed = LtSeed::start(
        &[t.path.as_path()],
        &tmp.path().join("content"),
        &["--transport".to_string(), "utp".to_string()],
    );
    let key = t.key();
    on_both_drivers(|| async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = UtpStream::connect(seed.addr(), deadline)
            .await
            .expect("uTP connect");
        let mut hs = Vec::new();
        encode_handshake(
            &mut hs,
            Reserved::ours(true, false, false),
            &key,
            b"-MX0100-utpstreamtst",
        );
        s.write_all(hs, deadline).await.unwrap();
        let mut got = Vec::new();
        while got.len() < HANDSHAKE_LEN {
            let n = s.read(&mut got, deadline).await.unwrap();
            assert!(n > 0, "EOF before the handshake");
        }
        let Ok(Decoded::Done(head, _)) = decode_handshake_head(&got) else {
            panic!("not a handshake: {got:?}")
        };
        assert_eq!(head.info_hash, key);
        assert!(s.stats().rtt.is_some());
        assert_eq!(s.stats().retransmits, 0);
        s.close().await;
    });
}

#[test]
fn utp_connect_to_a_closed_port_fails_fast() {
    // No one on the port: ICMP port unreachable comes back as an error, not a 7 s wait.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    on_both_drivers(|| async move {
        let started = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = UtpStream::connect(([127, 0, 0, 1], port).into(), deadline).await;
        assert!(r.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    });
}
