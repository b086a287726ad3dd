//! A real libtorrent client, given only a magnet with `x.pe=<magnetar>`, receives the
//! metadata from magnetar byte-identical to the imported info dict: v1, v2 and hybrid
//! torrents, with metadata of 1 piece and of 5+ pieces, via btih, btmh and both.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

struct Torrent {
    label: String,
    info: Vec<u8>,
    v1: Option<String>,
    v2: Option<String>,
    metadata_pieces: u64,
}

fn make_torrents(dir: &std::path::Path) -> Vec<Torrent> {
    run_ok(
        Command::new(PYTHON)
            .arg(repo_path("tests/interop/lt_client.py"))
            .arg("make-torrents")
            .arg(dir),
    );
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let parsed: BTreeMap<String, serde_json::Value> = serde_json::from_str(&manifest).unwrap();
    parsed
        .into_iter()
        .map(|(label, fields)| {
            let text = |k: &str| fields.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let bytes = std::fs::read(text("torrent").unwrap()).unwrap();
            let span = magnetar::metainfo::info_span(&bytes).expect("info span");
            Torrent {
                label,
                info: bytes[span].to_vec(),
                v1: text("v1"),
                v2: text("v2"),
                metadata_pieces: fields["metadata_pieces"].as_u64().unwrap(),
            }
        })
        .collect()
}

fn lt_fetch(magnet: &str, out: &std::path::Path) -> Vec<u8> {
    run_ok(
        Command::new(PYTHON)
            .arg(repo_path("tests/interop/lt_client.py"))
            .arg("fetch")
            .arg(magnet)
            .arg(out)
            .args(["--timeout", "30"]),
    );
    std::fs::read(out).unwrap()
}

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
    let torrents = make_torrents(&tmp.path().join("torrents"));
    assert_eq!(torrents.len(), 6);
    assert!(torrents.iter().any(|t| t.metadata_pieces == 1));
    assert!(torrents.iter().filter(|t| t.metadata_pieces >= 5).count() >= 3);

    let data = tmp.path().join("data");
    let mut import = Command::new(magnetar_bin());
    import
        .arg("import")
        .arg("--data-dir")
        .arg(&data)
        .arg(tmp.path().join("torrents"));
    run_ok(&mut import);

    // The CLI's own magnet, made before the server takes the store lock.
    let hybrid = torrents.iter().find(|t| t.label == "hybrid-large").unwrap();
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
    for t in &torrents {
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
            let out = tmp.path().join(format!("{}-{i}.info", t.label));
            let got = lt_fetch(m, &out);
            assert!(got == t.info, "{}: libtorrent received {} bytes that differ from the imported {} bytes (magnet {m})", t.label, got.len(), t.info.len());
            fetched += 1;
        }
    }
    assert_eq!(fetched, 2 + 2 + 2 * 3);
}
