//! The shared tier against a real three-node Garage cluster (replication factor 3) on
//! loopback: two magnetar nodes share one bucket. No mock S3.
//!
//! - a swarm fill on node A is served by node B (empty disk, no tracker, no DHT, no seed)
//!   byte-identically, under each of a hybrid's hashes; `import --from` prefills a node;
//! - one Garage node down: reads and writes go on (quorum 2 of 3);
//! - every Garage node down: both nodes serve local hits and swarm misses, say so in a
//!   metric and `/readyz`; the backlog, including a record whose node was killed -9 before
//!   its PUT, reaches the bucket when Garage is back;
//! - a flipped byte in an object is rejected by hash, counted, and the swarm fills the miss
//!   (and the good bytes replace the bad object);
//! - DELETE on node A: node B stops serving the hash within the poll bound, and a new node
//!   never fetches it; tombstones written into the bucket without the fleet key are
//!   ignored and counted.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bep9::{fetch_metadata, FakeSeed, SeedBehaviour};
use common::garage::GarageCluster;
use common::info::{hybrid_info, torrent_file, v1_info, Torrent};
use common::kit::metric;
use common::tracker::wait_listed;
use common::*;

/// Tombstone poll of the test nodes: the bound a delete reaches other nodes within.
const POLL_MS: u64 = 500;

/// A magnetar node on the shared store `prefix` of `cluster`, talking to Garage node `via`.
fn node(
    cluster: &GarageCluster,
    via: usize,
    data: &Path,
    prefix: &str,
    extra: &[&str],
) -> ServerProc {
    let url = cluster.url(prefix);
    let poll = POLL_MS.to_string();
    let mut args = vec![
        "--shared-store",
        url.as_str(),
        "--shared-tombstone-poll-ms",
        poll.as_str(),
        // Quick to give up on a dead Garage, so misses fall through to the swarm fast.
        "--shared-get-timeout-ms",
        "1000",
        "--shared-op-timeout-ms",
        "2000",
    ];
    args.extend_from_slice(extra);
    let mut cmd = ServerProc::command(data, &args);
    for (k, v) in cluster.env(via) {
        cmd.env(k, v);
    }
    // The fleet's tombstone key, from the environment (the other way is a key file).
    cmd.env("MAGNETAR_SHARED_FLEET_KEY", FLEET_KEY);
    ServerProc::spawn(cmd)
}

/// The secret the test fleet signs its tombstones with; never in the bucket.
const FLEET_KEY: &str = "4f1d0c9a7e2b58a3c6d1e0f9b2a7c4d8e5f6a1b2c3d4e5f6";

/// Polls `cond` every 100 ms until it holds, for at most `limit`; the time it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

fn object(prefix: &str, key: &[u8; 20]) -> String {
    format!("{prefix}/info/{}", hex::encode(key))
}

fn upload(server: &ServerProc, info: &[u8]) {
    let reply = http::post(&server.url("/torrents"), Some(TOKEN), &torrent_file(info));
    assert!(
        reply.status == 200 || reply.status == 201,
        "upload: {}",
        reply.text()
    );
}

fn fetch(server: &ServerProc, key: &[u8; 20]) -> Result<Vec<u8>, String> {
    fetch_metadata(server.addr, key, Duration::from_secs(10))
}

/// Node A fills a miss from a libtorrent seed found through opentracker; node B, with an
/// empty disk and no tracker, DHT or seed, serves the same hash to a libtorrent client,
/// byte-identical. A hybrid dict is in the bucket under both of its hashes, and B serves
/// it under the v2 one. `import --from` prefills a third data dir.
#[test]
fn node_b_serves_what_node_a_fetched_from_the_swarm() {
    require_libtorrent();
    let cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let tdir = tmp.path().join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let (t, hy) = (&torrents["v1-large"], &torrents["hybrid-large"]);
    let tracker = opentracker(&[t.key(), hy.v1_key().unwrap()]);
    let seed = LtSeed::start(
        &[&t.path, &hy.path],
        &tdir.join("content"),
        &["--tracker".into(), tracker.http_url()],
    );
    wait_listed(&tracker.http_url(), t.key(), seed.port);
    wait_listed(&tracker.http_url(), hy.v1_key().unwrap(), seed.port);

    let a = node(
        &cluster,
        0,
        &tmp.path().join("a"),
        "fleet",
        &["--tracker", &tracker.http_url()],
    );
    for (label, torrent) in [("v1", t), ("hybrid", hy)] {
        let got = lt_fetch(
            &torrent.magnet(a.addr),
            &tmp.path().join(format!("a-{label}.info")),
            30,
        );
        assert!(got == torrent.info, "{label}: node A served wrong bytes");
    }
    // Write-behind: the objects appear shortly after.
    let keys = [t.key(), hy.v1_key().unwrap(), hy.v2_key().unwrap()];
    within(Duration::from_secs(20), "A's uploads", || {
        keys.iter()
            .all(|k| cluster.get(1, &object("fleet", k)).is_some())
    });
    assert_eq!(cluster.get(2, &object("fleet", &t.key())).unwrap(), t.info);
    assert_eq!(
        cluster.get(2, &object("fleet", &hy.v1_key().unwrap())),
        cluster.get(2, &object("fleet", &hy.v2_key().unwrap())),
        "a hybrid is stored under both hashes, same bytes"
    );
    drop(seed);
    drop(tracker);

    // Node B: nothing but the shared tier (through another Garage node).
    let b = node(&cluster, 1, &tmp.path().join("b"), "fleet", &[]);
    let started = Instant::now();
    let got = lt_fetch(&t.magnet(b.addr), &tmp.path().join("b-v1.info"), 30);
    eprintln!(
        "node B served from the shared tier in {:?} (libtorrent, process start included)",
        started.elapsed()
    );
    assert!(got == t.info, "node B served wrong bytes");
    let v2_magnet = format!(
        "magnet:?xt=urn:btmh:1220{}&x.pe={}",
        hy.v2.as_ref().unwrap(),
        b.addr
    );
    let got = lt_fetch(&v2_magnet, &tmp.path().join("b-v2.info"), 30);
    assert!(got == hy.info, "node B served wrong bytes for the v2 hash");
    assert_eq!(metric(&b, "magnetar_shared_get_hits_total"), 2.0);
    assert_eq!(metric(&b, "magnetar_shared_get_corrupt_total"), 0.0);
    // What B took from the tier is not uploaded again.
    assert_eq!(metric(&b, "magnetar_shared_puts_total"), 0.0);

    // import --from: a third node's disk, prefilled, serves without any upstream.
    let c_dir = tmp.path().join("c");
    let mut import = std::process::Command::new(magnetar_bin());
    import
        .args(["import", "--data-dir"])
        .arg(&c_dir)
        .args(["--from", &cluster.url("fleet")]);
    for (k, v) in cluster.env(2) {
        import.env(k, v);
    }
    let out = run_ok(&mut import);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("2 imported"), "import --from: {report}");
    let c = ServerProc::start(&c_dir, &[]);
    assert_eq!(fetch(&c, &t.key()).unwrap(), t.info);
    assert_eq!(fetch(&c, &hy.v2_key().unwrap()).unwrap(), hy.info);
}

/// Garage node 2 killed: node A (via Garage 0) stores and uploads, node B (via Garage 1)
/// reads it back: two of three replicas are a quorum.
#[test]
fn one_garage_node_down_reads_and_writes_go_on() {
    let mut cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let a = node(&cluster, 0, &tmp.path().join("a"), "quorum", &[]);
    let b = node(&cluster, 1, &tmp.path().join("b"), "quorum", &[]);
    cluster.kill(2);
    let t = Torrent::v1(v1_info("quorum.bin", 40));
    upload(&a, &t.info);
    within(Duration::from_secs(20), "upload with a node down", || {
        cluster.get(0, &object("quorum", &t.key)).is_some()
    });
    assert_eq!(
        fetch(&b, &t.key).unwrap(),
        t.info,
        "B reads through Garage 1"
    );
    assert_eq!(metric(&b, "magnetar_shared_get_hits_total"), 1.0);
    assert_eq!(metric(&a, "magnetar_shared_degraded"), 0.0);
    // The dead node catches up when it returns.
    cluster.restart(2);
    within(
        Duration::from_secs(30),
        "GET through the restarted node",
        || cluster.get(2, &object("quorum", &t.key)).as_deref() == Some(&t.info[..]),
    );
}

/// Every Garage node down: both nodes serve local hits and fill swarm misses, with the
/// degraded metric and `/readyz` saying so. Node A is killed -9 after storing a record
/// whose PUT could not happen. Garage returns, A restarts: everything reaches the bucket.
#[test]
fn garage_down_serving_goes_on_and_the_backlog_survives_kill_9() {
    let mut cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let local = Torrent::v1(v1_info("local.bin", 30));
    let missed = Torrent::v1(v1_info("missed.bin", 30));
    let killed = Torrent::v1(v1_info("killed.bin", 30));
    let seed = FakeSeed::serving(
        Arc::new(HashMap::from([
            (missed.key, missed.info.clone()),
            (killed.key, killed.info.clone()),
        ])),
        SeedBehaviour::HONEST,
    );
    let parent = seed.addr.to_string();
    let a_dir = tmp.path().join("a");
    let mut a = node(&cluster, 0, &a_dir, "down", &["--parent", &parent]);
    let b = node(
        &cluster,
        1,
        &tmp.path().join("b"),
        "down",
        &["--parent", &parent],
    );
    upload(&a, &local.info);
    within(Duration::from_secs(20), "first upload", || {
        cluster.get(0, &object("down", &local.key)).is_some()
    });

    cluster.kill_all();
    // A local hit, and a miss the swarm (the parent seed) fills, on both nodes.
    for n in [&a, &b] {
        let started = Instant::now();
        assert_eq!(fetch(n, &missed.key).unwrap(), missed.info);
        eprintln!("miss with Garage down filled in {:?}", started.elapsed());
    }
    assert_eq!(fetch(&a, &local.key).unwrap(), local.info);
    within(Duration::from_secs(10), "degraded metric", || {
        metric(&a, "magnetar_shared_degraded") == 1.0
    });
    let ready = http::get(&a.url("/readyz"));
    assert_eq!(ready.status, 200, "local serving goes on: still ready");
    assert!(
        ready.text().contains("shared tier degraded"),
        "{}",
        ready.text()
    );
    let page = http::get(&a.url("/")).text();
    assert!(
        page.contains("shared tier degraded"),
        "the status page says so too"
    );

    // SIGTERM with uploads pending and the store unreachable: the uploader gets the
    // shutdown grace, then the node exits cleanly (the cursor keeps what is left).
    let mut c = node(
        &cluster,
        2,
        &tmp.path().join("c"),
        "down",
        &["--shutdown-grace-ms", "1000"],
    );
    upload(&c, &v1_info("stopped.bin", 20));
    within(Duration::from_secs(10), "C's backlog", || {
        metric(&c, "magnetar_shared_backlog") >= 1.0
    });
    let started = Instant::now();
    assert!(c.terminate(Duration::from_secs(20)).success());
    eprintln!(
        "SIGTERM with the store down and uploads pending: exited in {:?}",
        started.elapsed()
    );

    // A stores one more (through the parent), cannot upload it, and is killed -9.
    assert_eq!(fetch(&a, &killed.key).unwrap(), killed.info);
    within(Duration::from_secs(10), "A's backlog", || {
        metric(&a, "magnetar_shared_backlog") >= 1.0
    });
    a.child.kill().unwrap();
    a.child.wait().unwrap();

    cluster.restart_all();
    // B's backlog goes up by itself.
    within(
        Duration::from_secs(60),
        "B's backlog after Garage returned",
        || {
            cluster.get(1, &object("down", &missed.key)).is_some()
                && metric(&b, "magnetar_shared_degraded") == 0.0
        },
    );
    // A, restarted on its disk, uploads what it stored before the kill.
    let a = node(&cluster, 0, &a_dir, "down", &[]);
    let took = within(
        Duration::from_secs(60),
        "A's record after kill -9 and restart",
        || cluster.get(0, &object("down", &killed.key)).as_deref() == Some(&killed.info[..]),
    );
    eprintln!("record stored before kill -9 reached the bucket {took:?} after the restart");
    assert_eq!(metric(&a, "magnetar_shared_backlog"), 0.0);
}

/// A flipped byte in the bucket: node B rejects the object by hash, counts it, fills the
/// miss from the swarm, and its upload replaces the bad object with the good bytes.
#[test]
fn a_flipped_byte_is_rejected_and_the_swarm_fills_the_miss() {
    let cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let t = Torrent::v1(v1_info("flipped.bin", 50));
    let mut bad = t.info.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    cluster.put(0, &object("flip", &t.key), &bad);
    let seed = FakeSeed::start(t.info.clone(), t.key, SeedBehaviour::HONEST);
    let b = node(
        &cluster,
        1,
        &tmp.path().join("b"),
        "flip",
        &["--parent", &seed.addr.to_string()],
    );
    assert_eq!(
        fetch(&b, &t.key).unwrap(),
        t.info,
        "served the swarm's bytes"
    );
    assert_eq!(metric(&b, "magnetar_shared_get_corrupt_total"), 1.0);
    assert_eq!(metric(&b, "magnetar_shared_get_hits_total"), 0.0);
    assert!(seed.connections() >= 1, "the swarm filled it");
    within(
        Duration::from_secs(20),
        "the good bytes over the bad object",
        || cluster.get(2, &object("flip", &t.key)).as_deref() == Some(&t.info[..]),
    );
}

/// DELETE on node A: node B, which served the hash from the tier, stops serving it within
/// the poll bound; a new node never fetches it (the tombstone is checked on a miss), and
/// the object is gone from the bucket.
#[test]
fn delete_on_a_stops_b_within_the_poll_bound() {
    let cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let t = Torrent::v1(hybrid_info("deleted"));
    let v2 = common::info::v2_key(&t.info);
    let seed = FakeSeed::serving(
        Arc::new(HashMap::from([
            (t.key, t.info.clone()),
            (v2, t.info.clone()),
        ])),
        SeedBehaviour::HONEST,
    );
    let a = node(&cluster, 0, &tmp.path().join("a"), "del", &[]);
    let b = node(&cluster, 1, &tmp.path().join("b"), "del", &[]);
    upload(&a, &t.info);
    within(Duration::from_secs(20), "upload", || {
        cluster.get(1, &object("del", &t.key)).is_some()
    });
    assert_eq!(fetch(&b, &t.key).unwrap(), t.info, "B has it from the tier");

    // Someone with write access to the bucket but not the fleet key writes tombstones
    // that look like ours: both nodes ignore them, count them, and go on serving.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged = format!(
        "magnetar tombstone\nkey={}\nat={now}\nnode=attacker\nmac={}\n",
        hex::encode(t.key),
        "00".repeat(32)
    );
    cluster.put(
        0,
        &format!("del/tomb/{}", hex::encode(t.key)),
        forged.as_bytes(),
    );
    cluster.put(
        0,
        &format!("del/tomb-log/{now:012}-{}", hex::encode(t.key)),
        forged.as_bytes(),
    );
    within(
        Duration::from_secs(10),
        "the forgery seen by B's poll",
        || metric(&b, "magnetar_shared_tombstones_unauthenticated_total") >= 1.0,
    );
    std::thread::sleep(Duration::from_millis(POLL_MS * 2));
    assert_eq!(
        fetch(&b, &t.key).unwrap(),
        t.info,
        "a forged tombstone deletes nothing"
    );
    assert_eq!(metric(&b, "magnetar_shared_tombstones_applied_total"), 0.0);

    let reply = http::delete(
        &a.url(&format!("/torrents/{}", hex::encode(t.key))),
        Some(TOKEN),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let took = within(Duration::from_secs(10), "B stops serving", || {
        fetch(&b, &t.key).is_err()
    });
    eprintln!("B stopped serving {took:?} after the DELETE on A (poll {POLL_MS} ms)");
    assert!(
        took <= Duration::from_millis(POLL_MS * 2 + 3000),
        "bound: poll interval + upload + LIST, took {took:?}"
    );
    assert!(fetch(&b, &v2).is_err(), "the v2 hash of the hybrid too");
    // One tombstone deletes the record and blocks both of its hashes; the second is moot.
    assert!(metric(&b, "magnetar_shared_tombstones_applied_total") >= 1.0);
    let left = || {
        [t.key, v2]
            .iter()
            .filter(|k| (0..3).any(|i| cluster.get(i, &object("del", k)).is_some()))
            .map(hex::encode)
            .collect::<Vec<_>>()
    };
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        left().is_empty()
    });
    assert!(
        gone,
        "objects left after 10 s: {:?} (v1 {}, v2 {})",
        left(),
        hex::encode(t.key),
        hex::encode(v2)
    );

    // A new node with a seed that has it: the tombstone is found on the miss, no fetch.
    let c = node(
        &cluster,
        2,
        &tmp.path().join("c"),
        "del",
        &["--parent", &seed.addr.to_string()],
    );
    assert!(
        fetch(&c, &t.key).is_err(),
        "a deleted hash is never fetched again"
    );
    assert_eq!(seed.connections(), 0, "the swarm was never asked");

    // `import --from` into a new disk applies the fleet's tombstones (the signed ones; the
    // forgery is counted as ignored): the hash is blocked there before the node ever runs,
    // so a seed that has it is never asked either.
    let d_dir = tmp.path().join("d");
    let mut import = std::process::Command::new(magnetar_bin());
    import
        .args(["import", "--data-dir"])
        .arg(&d_dir)
        .args(["--from", &cluster.url("del")])
        .env("MAGNETAR_SHARED_FLEET_KEY", FLEET_KEY);
    for (k, v) in cluster.env(2) {
        import.env(k, v);
    }
    let report = String::from_utf8_lossy(&run_ok(&mut import).stderr).into_owned();
    let count = |what: &str| -> u64 {
        let at = report
            .find(what)
            .unwrap_or_else(|| panic!("no '{what}' in the import report: {report}"));
        let before = report[..at].trim_end();
        before[before
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1)..]
            .parse()
            .unwrap_or_else(|_| panic!("no count before '{what}': {report}"))
    };
    assert!(count("tombstones applied") >= 1, "import --from: {report}");
    assert!(count("ignored (not signed") >= 1, "the forgery: {report}");
    let seed_asked = seed.connections();
    let d = ServerProc::start(&d_dir, &["--parent", &seed.addr.to_string()]);
    assert!(
        fetch(&d, &t.key).is_err() && fetch(&d, &v2).is_err(),
        "imported tombstones block both hashes"
    );
    assert_eq!(seed.connections(), seed_asked, "the swarm was never asked");
}

/// Read-your-writes across the fleet. A client waits on node B for a hash nobody has yet:
/// B's miss found nothing in the bucket and waits on a swarm that never answers. The
/// publisher then uploads the torrent to node A. B serves the waiting client within
/// seconds of the object landing (it asks the bucket again, 0.5/1/2/4 s apart), not at the
/// end of its swarm fetch. Node C, whose earlier miss for another hash failed (negative
/// cache), serves that hash as soon as A has it too.
#[test]
fn an_upload_to_a_reaches_clients_already_waiting_on_b() {
    let cluster = GarageCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let pending = Torrent::v1(v1_info("waited-for", 900));
    let failed = Torrent::v1(v1_info("failed-before", 900));
    let a = node(&cluster, 0, &tmp.path().join("a"), "ryw", &[]);
    // No sources at all: B's fetch waits out its deadline, C's fails after 1.5 s.
    let b = node(
        &cluster,
        1,
        &tmp.path().join("b"),
        "ryw",
        &["--fetch-timeout-ms", "60000"],
    );
    let c = node(
        &cluster,
        2,
        &tmp.path().join("c"),
        "ryw",
        &["--fetch-timeout-ms", "1500"],
    );

    assert!(fetch(&c, &failed.key).is_err(), "nobody has it yet");
    within(Duration::from_secs(10), "C's fetch failed", || {
        metric(&c, "magnetar_upstream_fetches_failed_deadline_total") >= 1.0
    });

    let (b_addr, key) = (b.addr, pending.key);
    let waiting = std::thread::spawn(move || {
        let got = fetch_metadata(b_addr, &key, Duration::from_secs(45));
        (got, Instant::now())
    });
    within(Duration::from_secs(10), "B's miss started", || {
        metric(&b, "magnetar_upstream_fetches_started_total") >= 1.0
    });
    // Past B's first look at the bucket (a 404 on loopback takes milliseconds).
    std::thread::sleep(Duration::from_millis(1500));

    upload(&a, &pending.info);
    upload(&a, &failed.info);
    within(Duration::from_secs(20), "A's uploads landed", || {
        [pending.key, failed.key]
            .iter()
            .all(|k| cluster.get(1, &object("ryw", k)).is_some())
    });
    let landed = Instant::now();
    let (got, served_at) = waiting.join().unwrap();
    assert_eq!(got.expect("the waiting client is served"), pending.info);
    let after = served_at.saturating_duration_since(landed);
    eprintln!("B served its waiting client {after:?} after A's upload landed");
    assert!(
        after <= Duration::from_secs(8),
        "served {after:?} after the upload landed: the re-check is 4 s apart at most"
    );
    assert!(metric(&b, "magnetar_upstream_shared_rechecks_total") >= 1.0);

    // C's negative-cache entry for `failed` does not hide the bucket's copy.
    assert_eq!(fetch(&c, &failed.key).unwrap(), failed.info);
}
