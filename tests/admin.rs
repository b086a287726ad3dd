//! The admin HTTP plane against a real `magnetar serve`: every endpoint, auth refused,
//! bad uploads, delete + blocklist across a restart, and the served .torrent checked by
//! libtorrent (an independent parser).

mod common;

use std::process::Command;
use std::time::Duration;

use common::http::*;
use common::*;
use magnetar::metainfo;

fn upload(s: &ServerProc, name: &str) -> Reply {
    post(&s.url("/torrents"), Some(TOKEN), &fixture(name))
}

#[test]
fn health_readiness_and_metrics_need_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    let h = get(&s.url("/healthz"));
    assert_eq!(h.status, 200, "{}", h.text());
    assert!(h.text().starts_with("ok"));
    let r = get(&s.url("/readyz"));
    assert_eq!((r.status, r.text().trim()), (200, "ready"));
    assert_eq!(upload(&s, "v1_single.torrent").status, 201);
    let m = get(&s.url("/metrics"));
    assert_eq!(m.status, 200);
    assert!(
        m.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        m.content_type
    );
    let text = m.text();
    for needle in [
        "magnetar_store_records 1\n",
        "magnetar_ready 1\n",
        "magnetar_workers 2\n",
        "magnetar_connections_refused_total{reason=\"global\"} 0\n",
        "magnetar_hits_total 0\n",
        "magnetar_core_hits_total{core=\"1\"} 0\n",
        "magnetar_recovery_records 0\n",
        "magnetar_admin_uploads_stored_total 1\n",
        "# TYPE magnetar_bytes_served_total counter\n",
        "magnetar_store_records_corrupt_on_serve_total 0\n",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // The index of one record: its tables and the fixed slot table, not nothing.
    let index_bytes: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("magnetar_store_index_bytes "))
        .expect("magnetar_store_index_bytes")
        .parse()
        .unwrap();
    assert!(index_bytes > 0.0, "{index_bytes}");
    // Well-formed exposition: every sample is `name[{labels}] number`, every name has a TYPE.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let base = name.split('{').next().unwrap();
        let base = base
            .strip_suffix("_bucket")
            .or(base.strip_suffix("_sum"))
            .or(base.strip_suffix("_count"))
            .unwrap_or(base);
        assert!(
            text.contains(&format!("# TYPE {base} ")) || text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {line}"
        );
    }
}

#[test]
fn upload_then_torrent_json_and_magnet_by_every_hash_form() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(
        &dir.path().join("d"),
        &["--public-addr", "203.0.113.5:6881"],
    );
    let (v1, v2) = fixture_hashes("hybrid_multi");
    let (v1, v2) = (v1.unwrap(), v2.unwrap());
    let r = upload(&s, "hybrid_multi.torrent");
    assert_eq!(r.status, 201, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], "stored");
    assert_eq!(j["v1"], v1.as_str());
    assert_eq!(j["v2"], v2.as_str());
    let magnet = j["magnet"].as_str().unwrap();
    assert!(magnet.contains(&format!("xt=urn:btih:{v1}")), "{magnet}");
    assert!(
        magnet.contains(&format!("xt=urn:btmh:1220{v2}")),
        "{magnet}"
    );
    assert!(magnet.contains("x.pe=203.0.113.5:6881"), "{magnet}");
    // Same dict again: 200, not a second record.
    let again = upload(&s, "hybrid_multi.torrent");
    assert_eq!(
        (again.status, again.json()["status"].as_str()),
        (200, Some("already_present"))
    );

    let original = fixture("hybrid_multi.torrent");
    let info = &original[metainfo::info_span(&original).unwrap()];
    let base32 = data_encoding::BASE32.encode(&hex::decode(&v1).unwrap());
    for h in [v1.clone(), v2.clone(), v1.to_uppercase(), base32] {
        let t = get(&s.url(&format!("/torrents/{h}.torrent")));
        assert_eq!(t.status, 200, "{h}: {}", t.text());
        assert_eq!(t.content_type, "application/x-bittorrent");
        let span = metainfo::info_span(&t.body).unwrap();
        assert_eq!(
            &t.body[span], info,
            "the served info dict is the stored bytes"
        );

        let j = get(&s.url(&format!("/torrents/{h}"))).json();
        assert_eq!(j["name"], "content");
        assert_eq!(j["files"], 3);
        assert_eq!(j["total_size"], 31605);
        assert_eq!(j["piece_length"], 16384);
        assert_eq!(j["metadata_size"], info.len());
        assert_eq!(j["v1"], v1.as_str());
        assert_eq!(j["v2"], v2.as_str());
        assert!(j["stored_at"].as_u64().unwrap() > 1_600_000_000);
        assert!(j.get("times_served").is_some());

        let m = get(&s.url(&format!("/magnet/{h}")));
        assert_eq!(m.status, 200);
        assert_eq!(m.text().trim(), magnet);
    }
    assert_eq!(
        get(&s.url(&format!("/torrents/{}.torrent", "0".repeat(40)))).status,
        404
    );
    assert_eq!(
        get(&s.url(&format!("/torrents/{}", "1".repeat(64)))).status,
        404
    );
    assert_eq!(
        get(&s.url(&format!("/magnet/{}", "2".repeat(40)))).status,
        404
    );
    assert_eq!(get(&s.url("/torrents/xyz.torrent")).status, 400);
    // The status page's form: a magnet or hash redirects to the .torrent.
    let l = get(&s.url(&format!("/lookup?q=magnet:?xt=urn:btih:{v1}")));
    assert_eq!(l.status, 303);
    let l = get(&s.url(&format!("/lookup?q={}", "3".repeat(40))));
    assert_eq!(l.status, 404);
}

#[test]
fn served_torrent_files_load_in_libtorrent() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(
        &dir.path().join("d"),
        &["--tracker", "udp://tracker.example:6969/announce"],
    );
    for stem in ["v1_single", "v2_multi", "hybrid_single"] {
        assert_eq!(upload(&s, &format!("{stem}.torrent")).status, 201);
        let (v1, v2) = fixture_hashes(stem);
        let h = v1.clone().or(v2.clone()).unwrap();
        let t = get(&s.url(&format!("/torrents/{h}.torrent")));
        let path = dir.path().join(format!("{stem}.torrent"));
        std::fs::write(&path, &t.body).unwrap();
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import libtorrent as lt, sys\n\
                 ti = lt.torrent_info(sys.argv[1])\n\
                 ih = ti.info_hashes()\n\
                 print(ih.v1.to_bytes().hex() if ih.has_v1() else '-')\n\
                 print(ih.v2.to_bytes().hex() if ih.has_v2() else '-')\n\
                 print(' '.join(t.url for t in ti.trackers()))",
            )
            .arg(&path)
            .output()
            .expect("python3 (run `bash scripts/test.sh`, which installs python3-libtorrent)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], v1.as_deref().unwrap_or("-"), "{stem}");
        assert_eq!(lines[1], v2.as_deref().unwrap_or("-"), "{stem}");
        assert_eq!(
            lines[2], "udp://tracker.example:6969/announce",
            "known trackers go in"
        );
    }
}

#[test]
fn mutating_endpoints_refuse_a_missing_or_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    let torrent = fixture("v1_multi.torrent");
    let (v1, _) = fixture_hashes("v1_multi");
    let v1 = v1.unwrap();
    for token in [None, Some("wrong"), Some("")] {
        let r = post(&s.url("/torrents"), token, &torrent);
        assert_eq!(r.status, 401, "{token:?}: {}", r.text());
        assert_eq!(
            delete(&s.url(&format!("/torrents/{v1}")), token).status,
            401
        );
        assert_eq!(
            post(
                &s.url("/fetch"),
                token,
                format!("magnet:?xt=urn:btih:{v1}").as_bytes()
            )
            .status,
            401
        );
    }
    assert_eq!(
        get(&s.url(&format!("/torrents/{v1}"))).status,
        404,
        "nothing was stored"
    );
    let m = get(&s.url("/metrics")).text();
    assert!(m.contains("magnetar_admin_auth_refused_total 9\n"), "{m}");

    // Without any token configured, mutations are off altogether.
    let mut cmd = Command::new(magnetar_bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-dht",
    ])
    .arg("--data-dir")
    .arg(dir.path().join("e"));
    let open = ServerProc::spawn(cmd);
    let r = post(&open.url("/torrents"), Some(TOKEN), &torrent);
    assert_eq!(r.status, 403);
    assert!(r.text().contains("no admin token"), "{}", r.text());
}

#[test]
fn bad_uploads_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    let good = fixture("v1_single.torrent");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "empty"),
        (
            "not bencode",
            b"<html>hello</html>".to_vec(),
            "not a valid .torrent",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "not a valid .torrent",
        ),
        (
            "no info",
            b"d8:announce3:urle".to_vec(),
            "not a valid .torrent",
        ),
        (
            "info without pieces",
            b"d4:infod6:lengthi5e4:name1:a12:piece lengthi16384eee".to_vec(),
            "invalid info dict",
        ),
    ];
    for (what, body, reason) in cases {
        let r = post(&s.url("/torrents"), Some(TOKEN), &body);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.text().contains(reason), "{what}: {}", r.text());
    }
    let m = get(&s.url("/metrics")).text();
    assert!(m.contains("magnetar_admin_uploads_rejected_total 5\n"));
    assert!(m.contains("magnetar_store_records 0\n"));
}

#[test]
fn fetch_is_501_until_the_miss_path_is_wired_and_checks_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    let r = post(&s.url("/fetch"), Some(TOKEN), b"not a magnet");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = post(
        &s.url("/fetch"),
        Some(TOKEN),
        format!("magnet:?xt=urn:btih:{}", "ab".repeat(20)).as_bytes(),
    );
    assert!(
        r.status == 501 || r.status == 202,
        "{} {}",
        r.status,
        r.text()
    );
    // A stored hash needs no fetch.
    assert_eq!(upload(&s, "v1_single.torrent").status, 201);
    let (v1, _) = fixture_hashes("v1_single");
    let r = post(
        &s.url("/fetch"),
        Some(TOKEN),
        format!("magnet:?xt=urn:btih:{}", v1.unwrap()).as_bytes(),
    );
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("already_present"))
    );
}

#[test]
fn delete_removes_and_blocks_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let (v1, v2) = fixture_hashes("hybrid_single");
    let (v1, v2) = (v1.unwrap(), v2.unwrap());
    {
        let mut s = ServerProc::start(&data, &[]);
        assert_eq!(upload(&s, "hybrid_single.torrent").status, 201);
        assert_eq!(upload(&s, "v1_single.torrent").status, 201);
        // Deleting by the v2 hash removes the hybrid record under both keys.
        let r = delete(&s.url(&format!("/torrents/{v2}")), Some(TOKEN));
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["removed"], true);
        assert_eq!(j["v1"], v1.as_str());
        assert_eq!(j["blocked"].as_array().unwrap().len(), 2);
        for h in [&v1, &v2] {
            assert_eq!(get(&s.url(&format!("/torrents/{h}.torrent"))).status, 404);
        }
        let again = upload(&s, "hybrid_single.torrent");
        assert_eq!(
            again.status,
            403,
            "a blocked hash is not stored again: {}",
            again.text()
        );
        // Deleting a hash that was never stored still blocks it.
        let never = "cd".repeat(20);
        let r = delete(&s.url(&format!("/torrents/{never}")), Some(TOKEN));
        assert_eq!(
            (r.status, r.json()["removed"].as_bool()),
            (200, Some(false))
        );
        let r = post(
            &s.url("/fetch"),
            Some(TOKEN),
            format!("magnet:?xt=urn:btih:{never}").as_bytes(),
        );
        assert_eq!(
            r.status,
            403,
            "a blocked hash is never fetched: {}",
            r.text()
        );
        assert!(s.terminate(Duration::from_secs(20)).success());
    }
    let blocklist = std::fs::read_to_string(data.join("blocklist")).unwrap();
    assert!(
        blocklist.contains(&v1) && blocklist.contains(&v2),
        "{blocklist}"
    );
    let s = ServerProc::start(&data, &[]);
    assert_eq!(get(&s.url(&format!("/torrents/{v1}.torrent"))).status, 404);
    assert_eq!(upload(&s, "hybrid_single.torrent").status, 403);
    let (other, _) = fixture_hashes("v1_single");
    assert_eq!(
        get(&s.url(&format!("/torrents/{}", other.unwrap()))).status,
        200
    );
    let m = get(&s.url("/metrics")).text();
    // One for the deleted record, one for the hash blocked without a record (so the shared
    // tier's uploader finds that block after a crash too).
    assert!(m.contains("magnetar_recovery_tombstones 2\n"), "{m}");
    assert!(m.contains("magnetar_blocklist_entries 3\n"), "{m}");
}

/// Times served: every connection handed a record counts once, under whichever key the
/// client used (a hybrid's v1 and v2 keys add up), summed over cores; the status page
/// lists the most served.
#[test]
fn times_served_counts_connections_per_torrent() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("d"), &[]);
    assert_eq!(upload(&s, "hybrid_single.torrent").status, 201);
    let (v1, v2) = fixture_hashes("hybrid_single");
    let (v1, v2) = (v1.unwrap(), v2.unwrap());
    let key1: [u8; 20] = hex::decode(&v1).unwrap().try_into().unwrap();
    let key2: [u8; 20] = hex::decode(&v2[..40]).unwrap().try_into().unwrap();
    for key in [key1, key1, key2] {
        common::bep9::fetch_metadata(s.addr, &key, Duration::from_secs(10)).unwrap();
    }
    let j = get(&s.url(&format!("/torrents/{v2}"))).json();
    assert_eq!(j["times_served"], 3, "{j}");
    let page = get(&s.url("/")).text();
    let top = &page[page.find("id=\"top\"").expect("top served table")..];
    let top = &top[..top.find("</table>").unwrap()];
    assert!(top.contains(&v1) && top.contains("<td>3</td>"), "{top}");
}
