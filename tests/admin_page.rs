//! The status page at `/`, loaded in headless Chromium (Debian `chromium`, installed by
//! `scripts/test.sh`): the DOM Chromium builds must show uptime, hit rate, store size, the
//! stored torrent and the lookup form.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::http::*;
use common::*;

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is missing: run `bash scripts/test.sh`, which installs it");
}

/// `chromium --headless --dump-dom URL`: the DOM after parsing (a separate, throwaway profile).
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    let status = wait_timeout(&mut child, Duration::from_secs(90));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromium did not finish within 90 s");
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.unwrap().success(), "chromium failed; output: {out}");
    out
}

#[test]
fn status_page_renders_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    assert_eq!(
        post(
            &s.url("/torrents"),
            Some(TOKEN),
            &fixture("hybrid_multi.torrent")
        )
        .status,
        201
    );
    let (v1, _) = fixture_hashes("hybrid_multi");
    let dom = dump_dom(&s.url("/"));
    for needle in [
        "<title>magnetar status</title>",
        "id=\"uptime\"",
        "id=\"hit-rate\">n/a (no lookups yet)<",
        "id=\"store-records\">1<",
        "id=\"store-size\">661 B in",
        "Ready",
        "<form id=\"lookup\" action=\"/lookup\" method=\"get\">",
        "name=\"q\"",
        ">content</a>",
    ] {
        assert!(
            dom.contains(needle),
            "{needle:?} missing from the DOM:\n{dom}"
        );
    }
    assert!(
        dom.contains(&format!("href=\"/torrents/{}.torrent\"", v1.unwrap())),
        "{dom}"
    );
    // The form's target for an unknown hash: a page Chromium renders with the message.
    let dom = dump_dom(&s.url(&format!("/lookup?q={}", "ef".repeat(20))));
    assert!(dom.contains("is not stored here."), "{dom}");
}
