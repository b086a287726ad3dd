//! Encrypted peers (MSE/PE, docs/protocol-facts.md §14) with real clients on their default
//! settings: webtorrent 3 (npm; `secure: 1`, it opens every connection with the MSE
//! Diffie-Hellman handshake) fetches v1 and hybrid metadata from magnetar via `x.pe`,
//! byte-identical, and its time to metadata is measured next to a libtorrent seed of the
//! same torrent in the same test. libtorrent with encryption forced is served too.

mod common;

use std::net::SocketAddr;

use common::kit::{get, metrics};
use common::*;

/// Seconds one fetch may take.
const FETCH_TIMEOUT_S: u32 = 30;
/// Fetches from each side in a time-to-metadata comparison.
const TTM_ROUNDS: usize = 3;
/// magnetar's median may be at most this many times the libtorrent seed's, plus the
/// slack (both are fractions of a second on loopback; the goal is "no slower").
const TTM_RATIO_MAX: f64 = 1.2;
const TTM_SLACK_S: f64 = 0.1;

fn btih_magnet(t: &LtTorrent, xpe: SocketAddr) -> String {
    format!(
        "magnet:?xt=urn:btih:{}&x.pe={xpe}",
        t.v1.as_ref().expect("a v1 or hybrid torrent")
    )
}

#[test]
fn webtorrent_fetches_v1_and_hybrid_encrypted_as_fast_as_from_a_libtorrent_seed() {
    require_libtorrent();
    require_webtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (torrents, data) = imported_lt_torrents(tmp.path());
    let server = ServerProc::start(&data, &["--threads", "2"]);
    for label in ["v1-large", "hybrid-large"] {
        let t = &torrents[label];
        let seed = LtSeed::start(&[&t.path], &tmp.path().join("torrents/content"), &[]);
        let (mut from_magnetar, mut from_seed) = (Vec::new(), Vec::new());
        for round in 0..TTM_ROUNDS {
            let out = tmp.path().join(format!("{label}-m{round}.info"));
            let m = wt_fetch(&btih_magnet(t, server.addr), &out, FETCH_TIMEOUT_S);
            assert!(
                m.info == t.info,
                "{label}: webtorrent received {} bytes that differ from the {} imported",
                m.info.len(),
                t.info.len()
            );
            let out = tmp.path().join(format!("{label}-s{round}.info"));
            let s = wt_fetch_baseline(&btih_magnet(t, seed.addr()), &out, FETCH_TIMEOUT_S);
            println!(
                "{label} round {round}: magnetar {:.3} s {:?}, libtorrent seed {:.3} s {:?}",
                m.seconds, m.wires, s.seconds, s.wires
            );
            from_magnetar.push(m.seconds);
            from_seed.push(s.seconds);
        }
        let (m, s) = (median(&from_magnetar), median(&from_seed));
        println!(
            "webtorrent {label}, median of {TTM_ROUNDS}: magnetar {m:.3} s, libtorrent seed {s:.3} s, ratio {:.2}",
            m / s
        );
        assert!(
            m <= TTM_RATIO_MAX * s + TTM_SLACK_S,
            "{label}: webtorrent took {m:.3} s from magnetar against {s:.3} s from a libtorrent seed"
        );
    }
    // They came encrypted: every one of those connections ran the MSE handshake.
    let m = metrics(&server);
    assert!(
        get(&m, "magnetar_mse_handshakes_done_total") >= 2 * TTM_ROUNDS as u64,
        "webtorrent's connections were MSE handshakes"
    );
}

#[test]
fn libtorrent_with_encryption_forced_is_served() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (torrents, data) = imported_lt_torrents(tmp.path());
    let server = ServerProc::start(&data, &["--threads", "2"]);
    for label in ["v1-large", "v2-large", "hybrid-large"] {
        let t = &torrents[label];
        let out = tmp.path().join(format!("{label}.info"));
        let got = lt_fetch_encrypted(&t.magnet(server.addr), &out, FETCH_TIMEOUT_S);
        assert!(
            got.info == t.info,
            "{label}: libtorrent (encryption forced) received {} bytes that differ from the {} imported",
            got.info.len(),
            t.info.len()
        );
        println!("{label}: {:.3} s, encryption forced", got.seconds);
    }
    let m = metrics(&server);
    assert!(get(&m, "magnetar_mse_handshakes_done_total") >= 3);
    // Offered plaintext and RC4, magnetar chose plaintext (the zero-copy path).
    assert_eq!(get(&m, "magnetar_mse_rc4_bytes_encrypted_total"), 0);
}

/// A peer that insists on RC4 (libtorrent `allowed_enc_level` RC4 only) gets it; the cost
/// of encrypting each reply is measured by the metrics (bytes encrypted per fetch).
#[test]
fn libtorrent_insisting_on_rc4_is_served_encrypted() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let (torrents, data) = imported_lt_torrents(tmp.path());
    let server = ServerProc::start(&data, &["--threads", "2"]);
    let t = &torrents["hybrid-large"];
    let out = tmp.path().join("rc4.info");
    let got = lt_fetch_encrypted_with(&t.magnet(server.addr), &out, FETCH_TIMEOUT_S, "forced-rc4");
    assert!(got.info == t.info, "RC4 fetch: bytes differ");
    let m = metrics(&server);
    assert!(get(&m, "magnetar_mse_rc4_selected_total") >= 1);
    let encrypted = get(&m, "magnetar_mse_rc4_bytes_encrypted_total");
    assert!(
        encrypted >= t.info.len() as u64,
        "the whole reply went through RC4"
    );
    println!(
        "RC4: {:.3} s for {} bytes of metadata; {encrypted} bytes encrypted",
        got.seconds,
        t.info.len()
    );
}
