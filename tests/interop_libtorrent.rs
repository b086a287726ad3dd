//! A real libtorrent client, given only a magnet with `x.pe=<magnetar>`, receives the
//! metadata from magnetar byte-identical to the imported info dict: v1, v2 and hybrid
//! torrents, with metadata of 1 piece and of 5+ pieces, via btih, btmh and both.

mod common;

use std::process::Command;

use common::*;

#[test]
fn libtorrent_fetches_v1_v2_hybrid_metadata_from_the_store_io_uring() {
    fetch_everything_with_libtorrent("io-uring");
}

/// The epoll fallback serves the same bytes (it is what runs where io_uring is forbidden).
#[test]
fn libtorrent_fetches_v1_v2_hybrid_metadata_from_the_store_epoll() {
    fetch_everything_with_libtorrent("epoll");
}

fn fetch_everything_with_libtorrent(driver: &str) {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(&tmp.path().join("torrents"));
    assert_eq!(torrents.len(), 6);
    assert!(torrents.values().any(|t| t.metadata_pieces == 1));
    assert!(torrents.values().filter(|t| t.metadata_pieces >= 5).count() >= 3);

    let data = tmp.path().join("data");
    let mut import = Command::new(magnetar_bin());
    import
        .arg("import")
        .arg("--data-dir")
        .arg(&data)
        .arg(tmp.path().join("torrents"));
    run_ok(&mut import);

    // The CLI's own magnet, made before the server takes the store lock.
    let hybrid = &torrents["hybrid-large"];
    let out = run_ok(
        Command::new(magnetar_bin())
            .arg("magnet")
            .arg("--data-dir")
            .arg(&data)
            .arg(hybrid.v1.as_ref().unwrap())
            .args(["--public-addr", "127.0.0.1:1"]),
    );
    let cli_magnet = String::from_utf8(out.stdout).unwrap();
    assert!(
        cli_magnet.contains(&format!("xt=urn:btih:{}", hybrid.v1.as_ref().unwrap())),
        "{cli_magnet}"
    );
    assert!(
        cli_magnet.contains(&format!("xt=urn:btmh:1220{}", hybrid.v2.as_ref().unwrap())),
        "{cli_magnet}"
    );
    assert!(cli_magnet.contains("x.pe=127.0.0.1:1"), "{cli_magnet}");

    let server = ServerProc::start(&data, &["--threads", "2", "--driver", driver]);
    assert_eq!(server.driver, driver.replace('-', "_"));
    let xpe = format!("x.pe={}", server.addr);

    let mut fetched = 0;
    for (label, t) in &torrents {
        let mut magnets = Vec::new();
        if let Some(v1) = &t.v1 {
            magnets.push(format!("magnet:?xt=urn:btih:{v1}&{xpe}"));
        }
        if let Some(v2) = &t.v2 {
            magnets.push(format!("magnet:?xt=urn:btmh:1220{v2}&{xpe}"));
        }
        if let (Some(v1), Some(v2)) = (&t.v1, &t.v2) {
            magnets.push(format!(
                "magnet:?xt=urn:btih:{v1}&xt=urn:btmh:1220{v2}&{xpe}"
            ));
        }
        for (i, m) in magnets.iter().enumerate() {
            let out = tmp.path().join(format!("{label}-{i}.info"));
            let got = lt_fetch(m, &out, 30);
            assert!(got == t.info, "{}: libtorrent received {} bytes that differ from the imported {} bytes (magnet {m})", label, got.len(), t.info.len());
            fetched += 1;
        }
    }
    assert_eq!(fetched, 2 + 2 + 2 * 3);
}
