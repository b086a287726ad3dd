//! `magnetar print-config` and `serve --config`: defaults round-trip, unknown keys are
//! refused by name, flags override the file, the admin plane stays on loopback.

mod common;

use std::process::Command;

use common::http::*;
use common::*;

fn print_config() -> String {
    let out = Command::new(magnetar_bin())
        .arg("print-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn print_config_documents_every_setting_and_parses_back() {
    let text = print_config();
    let parsed = magnetar::config::ServeSettings::from_toml(&text).unwrap();
    assert_eq!(
        parsed.connections_max,
        magnetar::limits::CONNECTIONS_MAX_DEFAULT
    );
    assert_eq!(parsed.admin, "127.0.0.1:7881");
    // Every serve flag is a key (or a commented-out key) with its doc comment.
    let help = Command::new(magnetar_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in help.split_whitespace().filter_map(|w| w.strip_prefix("--")) {
        let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
        if ["help", "version", "config", "log"].contains(&flag) || flag.is_empty() {
            continue;
        }
        assert!(
            text.contains(&format!("Flag: --{flag}")),
            "--{flag} not in print-config:\n{text}"
        );
    }
    assert!(text.contains("[upstream]\n"));
    assert!(text.contains("# Most open peer connections over all workers\n# Flag: --connections-max <N>\nconnections-max = 100000\n"));
}

#[test]
fn serve_runs_from_the_printed_config_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    // The printed defaults, with a few values changed as an operator would.
    let text = print_config()
        .replace(
            "listen = [\"0.0.0.0:6881\", \"[::]:6881\"]",
            "listen = [\"127.0.0.1:0\"]",
        )
        .replace("admin = \"127.0.0.1:7881\"", "admin = \"off\"")
        .replace("# admin-token = <TOKEN>", "admin-token = \"from-the-file\"")
        .replace("no-dht = false", "no-dht = true")
        .replace("# threads = <N>", "threads = 1");
    assert!(text.contains("admin-token = \"from-the-file\""), "{text}");
    let cfg = dir.path().join("magnetar.toml");
    std::fs::write(&cfg, &text).unwrap();
    let mut cmd = Command::new(magnetar_bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        // The file turns the admin plane off; the flag turns it back on.
        .args(["--admin", "127.0.0.1:0"]);
    let s = ServerProc::spawn(cmd);
    let torrent = fixture("v1_single.torrent");
    assert_eq!(post(&s.url("/torrents"), Some(TOKEN), &torrent).status, 401);
    let r = post(&s.url("/torrents"), Some("from-the-file"), &torrent);
    assert_eq!(r.status, 201, "the file's token is in force: {}", r.text());
    assert!(
        get(&s.url("/metrics"))
            .text()
            .contains("magnetar_workers 1\n"),
        "threads = 1 from the file"
    );
}

fn serve_fails(args: &[&str], config: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(magnetar_bin());
    cmd.arg("serve").arg("--data-dir").arg(dir.path().join("d"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    if let Some(text) = config {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    let out = cmd.args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "should fail: {args:?} {config:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_keys_and_bad_values_are_errors_naming_them() {
    let err = serve_fails(
        &[],
        Some("connections-max = 10\nconections-per-ip-max = 3\n"),
    );
    assert!(err.contains("conections-per-ip-max"), "{err}");
    let err = serve_fails(&[], Some("[upstream]\nfetch-timeout = 5\n"));
    assert!(err.contains("fetch-timeout"), "{err}");
    let err = serve_fails(&[], Some("[nonsense]\n"));
    assert!(err.contains("nonsense"), "{err}");
    let err = serve_fails(&[], Some("connections-max = \"many\"\n"));
    assert!(err.contains("connections-max"), "{err}");
    let err = serve_fails(&["--config", "/nonexistent/magnetar.toml"], None);
    assert!(err.contains("/nonexistent/magnetar.toml"), "{err}");
}

#[test]
fn admin_stays_on_loopback_unless_allowed() {
    let err = serve_fails(&["--admin", "0.0.0.0:0"], None);
    assert!(err.contains("admin-allow-remote"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(magnetar_bin());
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "0.0.0.0:0",
            "--admin-allow-remote",
            "--no-dht",
        ]);
    let s = ServerProc::spawn(cmd);
    assert!(s.ready_line.contains("admin=0.0.0.0:"), "{}", s.ready_line);
}
