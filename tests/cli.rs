//! The command line as an operator uses it: import (good, bad and duplicate files,
//! directories), the data-dir lock against a running server, magnets for v1 / v2 /
//! hybrid records, and --help.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn magnetar(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(magnetar_bin())
        .arg(args[0])
        .arg("--data-dir")
        .arg(data)
        .args(&args[1..])
        .output()
        .unwrap()
}

#[test]
fn import_reports_each_bad_file_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let bad = tmp.path().join("not-a-torrent.torrent");
    std::fs::write(&bad, b"d4:infoi42ee").unwrap();
    let out = Command::new(magnetar_bin())
        .args(["import", "--data-dir"])
        .arg(&data)
        .arg(fixture_path("v1_single.torrent"))
        .arg(&bad)
        .arg(repo_path("tests/fixtures/torrents"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains("not-a-torrent.torrent"), "{stderr}");
    // v1_single twice (file + directory): stored once.
    assert!(stderr.contains("5 imported"), "{stderr}");
    assert!(stderr.contains("1 already present"), "{stderr}");

    // Only bad input: a non-zero exit.
    let out = magnetar(&data, &["import", bad.to_str().unwrap()]);
    assert!(!out.status.success());
}

#[test]
fn import_refuses_a_data_dir_held_by_a_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    import(&data, &[&fixture_path("v1_single.torrent")]);
    let _server = ServerProc::start(&data, &["--threads", "1"]);
    let out = magnetar(
        &data,
        &["import", fixture_path("v2_multi.torrent").to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "import must fail while the server holds the lock"
    );
    assert!(
        stderr.contains("magnetar serve") || stderr.contains("lock"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "one clear line: {stderr}"
    );
}

#[test]
fn magnet_for_v1_v2_and_hybrid_records() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    import(&data, &[&repo_path("tests/fixtures/torrents")]);

    for name in ["v1_single", "v2_multi", "hybrid_single"] {
        let (v1, v2) = fixture_hashes(name);
        // Look up by every key the record has; the magnet is the same.
        let mut keys: Vec<String> = v1.iter().cloned().collect();
        keys.extend(v2.iter().cloned());
        if let Some(v1) = &v1 {
            let raw = hex::decode(v1).unwrap();
            keys.push(data_encoding::BASE32.encode(&raw).to_lowercase());
        }
        let mut seen = None;
        for key in &keys {
            let out = magnetar(&data, &["magnet", key, "--public-addr", "[::1]:6881"]);
            assert!(
                out.status.success(),
                "{name} {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let uri = String::from_utf8(out.stdout).unwrap().trim().to_string();
            let m = magnetar::magnet::Magnet::parse(&uri).unwrap();
            assert_eq!(m.btih.map(hex::encode), v1, "{uri}");
            assert_eq!(m.btmh.map(hex::encode), v2, "{uri}");
            assert!(m.display_name.is_some(), "{uri}");
            assert_eq!(m.peers.len(), 1, "{uri}");
            assert!(uri.contains("x.pe=[::1]:6881"), "{uri}");
            if let Some(prev) = &seen {
                assert_eq!(prev, &uri);
            }
            seen = Some(uri);
        }
    }

    // --public-http-url: an xs= naming the .torrent on the public HTTP listener (v1 hash
    // when there is one, else v2), and a bad URL refused.
    for name in ["hybrid_single", "v2_multi"] {
        let (v1, v2) = fixture_hashes(name);
        let key = v1.clone().or(v2.clone()).unwrap();
        let out = magnetar(
            &data,
            &[
                "magnet",
                &key,
                "--public-http-url",
                "https://cache.example.org/",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uri = String::from_utf8(out.stdout).unwrap();
        let named = v1.or(v2).unwrap().to_uppercase();
        assert!(
            uri.trim().ends_with(&format!(
                "&xs=https%3A%2F%2Fcache.example.org%2Ftorrent%2F{named}.torrent"
            )),
            "{uri}"
        );
    }
    let key = fixture_hashes("v1_single").0.unwrap();
    let out = magnetar(&data, &["magnet", &key, "--public-http-url", "ftp://x/"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("public-http-url"));

    let out = magnetar(&data, &["magnet", &"ab".repeat(20)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the store"));
    let out = magnetar(&data, &["magnet", "xyz"]);
    assert!(!out.status.success());
}

#[test]
fn help_explains_every_command() {
    let out = run_ok(Command::new(magnetar_bin()).arg("--help"));
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["serve", "import", "magnet"] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = run_ok(Command::new(magnetar_bin()).args(["serve", "--help"]));
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--data-dir",
        "--listen",
        "--threads",
        "--driver",
        "--connections-per-ip-max",
        "--idle-timeout-ms",
    ] {
        assert!(
            text.contains(flag),
            "{flag} missing from serve --help:\n{text}"
        );
    }
}
