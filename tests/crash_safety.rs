//! Crash safety of the store, with the real server:
//! - SIGKILL, repeatedly, while records are inserted through the admin plane (POST /torrents)
//!   and by upstream fills (clients asking for hashes the server lacks, fetched from a
//!   `--parent` seed): after every restart each acknowledged record (a 2xx, or a client that
//!   received the metadata) is present and verifies, nothing fails its hash, and the first
//!   client is served at once;
//! - a byte flipped in the middle of a segment drops that record only;
//! - a segment cut short loses only what lay past the cut, and appends go on;
//! - a full disk (a 2 MiB tmpfs) fails inserts with a clear error and a metric while serving
//!   goes on, and inserts work again once space is freed;
//! - running out of file descriptors: accept backs off and counts, and new clients are served
//!   again once connections close.
//!
//! Figures go to stdout (`cargo test --test crash_safety -- --nocapture`).

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bep9::{fetch_metadata, FakeSeed, SeedBehaviour};
use common::http::get;
use common::info::{torrent_file, v1_info, v1_key};
use common::kit::metric;
use common::{ServerProc, TOKEN};
use magnetar::store::Store;
use sha1::{Digest, Sha1};

/// A valid single-file v1 torrent unique per (`tag`, `n`): (.torrent, info dict, info-hash).
fn torrent(tag: &str, n: u64) -> (Vec<u8>, Vec<u8>, [u8; 20]) {
    let info = v1_info(&format!("{tag}-{n:08}.bin"), 1 + n as usize % 40);
    (torrent_file(&info), info.clone(), v1_key(&info))
}

/// POST a .torrent; `None` when the server went away (killed mid-request).
fn try_upload(served_admin: SocketAddr, body: &[u8]) -> Option<(u16, String)> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let r = agent
        .post(format!("http://{served_admin}/torrents"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send(body)
        .ok()?;
    let status = r.status().as_u16();
    let text = r.into_body().read_to_string().unwrap_or_default();
    Some((status, text))
}

/// Every acknowledged record on disk and verified, per an in-process read-only open of the
/// data dir (the server is dead): returns how many are missing or wrong.
fn check_on_disk(data: &Path, acked: &HashMap<[u8; 20], Vec<u8>>) -> (usize, usize) {
    let (store, report) = Store::open_read_only(data).unwrap();
    assert_eq!(
        report.corrupt_records_skipped, 0,
        "a record failed its hash: {report}"
    );
    let mut lost = 0;
    for (key, info) in acked {
        match store.lookup(key) {
            Some(r) if r.info() == &info[..] && Sha1::digest(r.info())[..] == key[..] => {}
            _ => lost += 1,
        }
    }
    (lost, report.torn_tails_skipped)
}

// ---------------------------------------------------------------------------------------------
// kill -9 under inserts.

/// splitmix64, for kill times.
fn next_rand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An acknowledged insert: info-hash, info dict, and whether it was an upload (else a fill).
type Acked = ([u8; 20], Vec<u8>, bool);

const KILL_CYCLES: usize = 10;
const UPLOADERS: u64 = 2;
const FILLERS: usize = 2;
/// Upstream dicts available to fill (more than the fillers can ask for in the test).
const SEED_DICTS: u64 = 20_000;

fn server_args(seed: SocketAddr) -> Vec<String> {
    [
        "--parent",
        &seed.to_string(),
        "--misses-per-ip-per-minute-max",
        "1000000",
        "--misses-per-second-max",
        "100000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn sigkill_during_uploads_and_fills_loses_no_acknowledged_record() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let seed_dicts: Vec<(Vec<u8>, [u8; 20])> = (0..SEED_DICTS)
        .map(|n| {
            let (_, info, key) = torrent("fill", n);
            (info, key)
        })
        .collect();
    let seed = FakeSeed::serving(
        Arc::new(seed_dicts.iter().map(|(i, k)| (*k, i.clone())).collect()),
        SeedBehaviour::HONEST,
    );
    let seed_dicts = Arc::new(seed_dicts);
    let next_fill = Arc::new(AtomicUsize::new(0));
    let args = server_args(seed.addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut acked: HashMap<[u8; 20], Vec<u8>> = HashMap::new();
    let mut rng = started.elapsed().as_nanos() as u64 ^ 0x5eed;
    println!("kill -9 test seed {rng}");
    let (mut uploads_acked, mut fills_acked, mut lost_total, mut torn_total) = (0, 0, 0, 0);
    let mut first_served_ms = Vec::new();
    let mut upload_n = 0u64;
    for cycle in 0..=KILL_CYCLES {
        let spawned = Instant::now();
        let mut s = ServerProc::start(&data, &args);
        // Serves right after recovery: the first client after the ready line gets a record.
        if let Some((key, info)) = acked.iter().next() {
            let got = fetch_metadata(s.addr, key, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("cycle {cycle}: first fetch after restart: {e}"));
            assert_eq!(&got, info);
            first_served_ms.push(spawned.elapsed().as_millis());
        }
        assert_eq!(
            metric(&s, "magnetar_recovery_corrupt_records_skipped"),
            0.0,
            "cycle {cycle}: a record failed verification at recovery"
        );
        torn_total += metric(&s, "magnetar_recovery_torn_tails_truncated") as usize;
        assert!(metric(&s, "magnetar_store_records") as usize >= acked.len());
        if cycle == KILL_CYCLES {
            // The last start only checks; then a clean stop.
            let status = s.terminate(Duration::from_secs(10));
            assert!(status.success(), "{status:?}");
            break;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let got: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let mut threads = Vec::new();
        for u in 0..UPLOADERS {
            let (stop, got, admin) = (stop.clone(), got.clone(), s.admin);
            let base = upload_n + u * 1_000_000;
            threads.push(std::thread::spawn(move || {
                for n in base.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (t, info, key) = torrent("upload", n);
                    match try_upload(admin, &t) {
                        Some((200 | 201, _)) => got.lock().unwrap().push((key, info, true)),
                        Some((status, body)) => panic!("upload refused: {status} {body}"),
                        None => break, // killed
                    }
                }
            }));
        }
        upload_n += 10_000_000;
        for _ in 0..FILLERS {
            let (stop, got, listen) = (stop.clone(), got.clone(), s.addr);
            let (dicts, next) = (seed_dicts.clone(), next_fill.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((info, key)) = dicts.get(i) else {
                        break;
                    };
                    match fetch_metadata(listen, key, Duration::from_secs(10)) {
                        Ok(bytes) => {
                            assert_eq!(&bytes, info, "a fill served wrong bytes");
                            got.lock().unwrap().push((*key, bytes, false));
                        }
                        Err(_) => break, // killed
                    }
                }
            }));
        }
        // Kill at a random point 200..700 ms into the load.
        let kill_at = Duration::from_millis(200 + next_rand(&mut rng) % 500);
        std::thread::sleep(kill_at);
        s.child.kill().unwrap(); // SIGKILL
        s.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let got = std::mem::take(&mut *got.lock().unwrap());
        let this_cycle = got.len();
        for (key, info, upload) in got {
            if upload {
                uploads_acked += 1;
            } else {
                fills_acked += 1;
            }
            acked.insert(key, info);
        }
        let (lost, _) = check_on_disk(&data, &acked);
        lost_total += lost;
        assert_eq!(lost, 0, "cycle {cycle}: acknowledged records lost");
        println!(
            "cycle {cycle}: killed after {kill_at:?}, {this_cycle} inserts acknowledged, \
             {} in total, all present and verified",
            acked.len()
        );
        drop(s);
    }
    println!(
        "kill -9: {KILL_CYCLES} cycles survived, {} acknowledged records ({uploads_acked} \
         uploads, {fills_acked} upstream fills), {lost_total} lost, {torn_total} torn tails \
         truncated at restart, first client served {:?} ms after spawn, {:.1} s in all",
        acked.len(),
        first_served_ms,
        started.elapsed().as_secs_f64()
    );
    assert!(
        uploads_acked > 0 && fills_acked > 0,
        "both insert paths ran"
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged segments.

fn segment_files(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Uploads `n` records, stops the server cleanly; returns (torrent, info, key) of each.
fn stored_records(data: &Path, n: u64) -> Vec<(Vec<u8>, [u8; 20])> {
    let mut s = ServerProc::start(data, &[]);
    let out = (0..n)
        .map(|i| {
            let (t, info, key) = torrent("damage", i);
            let (status, body) = try_upload(s.admin, &t).unwrap();
            assert_eq!(status, 201, "{body}");
            (info, key)
        })
        .collect();
    assert!(s.terminate(Duration::from_secs(10)).success());
    out
}

fn assert_served(s: &ServerProc, info: &[u8], key: &[u8; 20]) {
    let got = fetch_metadata(s.addr, key, Duration::from_secs(10)).unwrap();
    assert_eq!(got, info);
}

#[test]
fn a_flipped_byte_mid_segment_drops_only_that_record() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let records = stored_records(&data, 30);
    // Record 15's payload, in whichever segment holds it: flip a byte in its middle.
    let (victim_info, victim_key) = &records[15];
    let (file, at) = segment_files(&data)
        .into_iter()
        .find_map(|f| find(&std::fs::read(&f).unwrap(), victim_info).map(|at| (f, at)))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(
        at > 0 && at + victim_info.len() < bytes.len(),
        "mid-segment"
    );
    bytes[at + victim_info.len() / 2] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let s = ServerProc::start(&data, &[]);
    assert_eq!(metric(&s, "magnetar_recovery_corrupt_records_skipped"), 1.0);
    assert_eq!(metric(&s, "magnetar_store_records"), 29.0);
    for (i, (info, key)) in records.iter().enumerate() {
        let status = get(&s.url(&format!("/torrents/{}", hex::encode(key)))).status;
        if i == 15 {
            assert_eq!(status, 404, "the damaged record is never served");
        } else {
            assert_eq!(status, 200);
            assert_served(&s, info, key);
        }
    }
    // A peer asking for it gets nothing (no parent to refetch from): never the damaged bytes.
    assert!(fetch_metadata(s.addr, victim_key, Duration::from_secs(3)).is_err());
}

#[test]
fn a_truncated_segment_loses_only_the_cut_records_and_appends_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let records = stored_records(&data, 30);
    // Cut the first segment in the middle of its third-to-last record's payload.
    let file = &segment_files(&data)[0];
    let bytes = std::fs::read(file).unwrap();
    let mut in_file: Vec<(usize, usize)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, (info, _))| find(&bytes, info).map(|at| (at, i)))
        .collect();
    in_file.sort();
    assert!(in_file.len() >= 4, "records spread over the segments");
    let (cut_at, cut_rec) = in_file[in_file.len() - 3];
    let cut_len = cut_at + records[cut_rec].0.len() / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(cut_len as u64)
        .unwrap();
    let gone: Vec<usize> = in_file[in_file.len() - 3..].iter().map(|r| r.1).collect();

    let s = ServerProc::start(&data, &[]);
    assert_eq!(metric(&s, "magnetar_recovery_torn_tails_truncated"), 1.0);
    assert_eq!(metric(&s, "magnetar_recovery_corrupt_records_skipped"), 0.0);
    for (i, (info, key)) in records.iter().enumerate() {
        let status = get(&s.url(&format!("/torrents/{}", hex::encode(key)))).status;
        if gone.contains(&i) {
            assert_eq!(status, 404);
        } else {
            assert_eq!(status, 200, "record {i}");
            assert_served(&s, info, key);
        }
    }
    // Appends after the cut (re-uploading what was lost lands on the truncated segment's
    // shard for some of them), then a restart: all there, nothing damaged.
    for &i in &gone {
        let (t, _, _) = torrent("damage", i as u64);
        assert_eq!(try_upload(s.admin, &t).unwrap().0, 201);
    }
    let mut s = s;
    assert!(s.terminate(Duration::from_secs(10)).success());
    let s = ServerProc::start(&data, &[]);
    assert_eq!(metric(&s, "magnetar_recovery_torn_tails_truncated"), 0.0);
    assert_eq!(metric(&s, "magnetar_recovery_corrupt_records_skipped"), 0.0);
    assert_eq!(metric(&s, "magnetar_store_records"), 30.0);
    for (info, key) in &records {
        assert_served(&s, info, key);
    }
}

// ---------------------------------------------------------------------------------------------
// Full disk.

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if out.status.success() {
            Some(Tmpfs(dir.to_path_buf()))
        } else if std::env::var("MAGNETAR_TEST_SKIP_TMPFS").is_ok_and(|v| v == "1") {
            // Asked for: a machine where tests may not mount (not CI, which runs as root).
            eprintln!("MAGNETAR_TEST_SKIP_TMPFS=1: the full-disk test is not run");
            None
        } else {
            // A skip that passes would hide that the full-disk path went untested.
            panic!(
                "cannot mount a tmpfs (needs root): {}; set MAGNETAR_TEST_SKIP_TMPFS=1 to skip knowingly",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs into a zeroed struct we own, with a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_inserts_clearly_and_serving_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&tmp.path().join("mnt"), "2m") else {
        return;
    };
    let data = fs.0.join("d");
    let mut s = ServerProc::start(&data, &[]);
    let mut acked = HashMap::new();
    for n in 0..10 {
        let (t, info, key) = torrent("full", n);
        assert_eq!(try_upload(s.admin, &t).unwrap().0, 201);
        acked.insert(key, info);
    }
    // Leave ~100 KB: a few dozen more records fit, then the disk is full.
    let filler = fs.0.join("filler");
    let free = fs.free_bytes();
    std::fs::write(&filler, vec![1u8; (free - 100 * 1024) as usize]).unwrap();
    let mut refusal = None;
    for n in 10..2000 {
        let (t, info, key) = torrent("full", n);
        match try_upload(s.admin, &t).unwrap() {
            (201, _) => {
                acked.insert(key, info);
            }
            (status, body) => {
                refusal = Some((n, status, body));
                break;
            }
        }
    }
    let (full_at, status, body) = refusal.expect("the disk never filled");
    println!("full disk: upload {full_at} refused: {status} {body}");
    assert_eq!(status, 500);
    assert!(body.contains("no space left"), "{body}");
    // The same upload is refused again, cleanly, while the disk is full; both are counted.
    let (t, info, key) = torrent("full", full_at);
    assert_eq!(try_upload(s.admin, &t).unwrap().0, 500);
    assert!(metric(&s, "magnetar_store_append_errors_no_space_total") >= 2.0);
    // Serving goes on: every stored record, to a peer, and the admin plane.
    for (key, info) in &acked {
        assert_served(&s, info, key);
    }
    assert_eq!(get(&s.url("/healthz")).status, 200);
    // Space back: the refused upload goes through.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(try_upload(s.admin, &t).unwrap().0, 201);
    acked.insert(key, info);
    assert!(s.terminate(Duration::from_secs(10)).success());
    // Nothing half-written survived the refusals.
    let s = ServerProc::start(&data, &[]);
    assert_eq!(metric(&s, "magnetar_recovery_corrupt_records_skipped"), 0.0);
    assert_eq!(metric(&s, "magnetar_recovery_torn_tails_truncated"), 0.0);
    assert_eq!(metric(&s, "magnetar_store_records"), acked.len() as f64);
    drop(s);
    drop(fs);
}

// ---------------------------------------------------------------------------------------------
// Out of file descriptors.

/// Open files the server may have: ~16 at idle (listeners, io_uring, eventfds, admin, LOCK,
/// a segment per shard), so a few dozen connections exhaust it.
const FD_LIMIT: u64 = 64;

#[test]
fn out_of_file_descriptors_accept_backs_off_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    // The per-IP cap (64 by default) must not refuse these connections before the
    // descriptors run out.
    let mut cmd = ServerProc::command(
        &data,
        &[
            "--handshake-timeout-ms",
            "60000",
            "--connections-per-ip-max",
            "1000",
        ],
    );
    // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: FD_LIMIT,
                rlim_max: FD_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut s = ServerProc::spawn(cmd);
    let (t, info, key) = torrent("fds", 1);
    assert_eq!(try_upload(s.admin, &t).unwrap().0, 201);

    // Hold more connections than the server has descriptors. The kernel completes every TCP
    // handshake into the listen backlog; the server's accept fails once it is out of fds
    // (epoll), or its direct-descriptor table, sized by the same limit, is full
    // (io_uring: one table of FD_LIMIT per core, so three times the limit fills both).
    let conns: Vec<TcpStream> = (0..FD_LIMIT * 3)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    // While exhausted a new client is not served.
    assert!(
        fetch_metadata(s.addr, &key, Duration::from_secs(2)).is_err(),
        "served although out of descriptors"
    );
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the server died out of descriptors"
    );
    drop(conns);
    // Descriptors free up as the server sees those close; accept retries after its back-off
    // (at most 1 s) and drains the backlog. A new client is served again.
    let freed = Instant::now();
    let deadline = freed + Duration::from_secs(20);
    loop {
        match fetch_metadata(s.addr, &key, Duration::from_secs(3)) {
            Ok(got) => {
                assert_eq!(got, info);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e}"),
        }
    }
    let errors = metric(&s, "magnetar_accept_errors_total");
    println!(
        "fd exhaustion (RLIMIT_NOFILE {FD_LIMIT}): {errors} accept errors counted, served again \
         {} ms after the connections closed",
        freed.elapsed().as_millis()
    );
    assert!(errors >= 1.0, "accept errors not counted");
    assert_eq!(get(&s.url("/healthz")).status, 200);
}

// ---------------------------------------------------------------------------------------------
// kill -9 while eviction runs.

#[test]
fn sigkill_during_eviction_leaves_a_verified_store_within_the_cap() {
    const CAP: u64 = 64 * 1024;
    const CYCLES: usize = 5;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let cap = CAP.to_string();
    let args = ["--store-capacity", cap.as_str()];
    let mut rng = 0x0e71c7u64;
    let mut n = 0u64;
    let mut evicted = 0.0;
    for cycle in 0..=CYCLES {
        let s = ServerProc::start(&data, &args);
        assert_eq!(metric(&s, "magnetar_recovery_corrupt_records_skipped"), 0.0);
        // A crash between writing an eviction's copies and unlinking its victim leaves at
        // most one segment (cap / (4 × 2 threads)) over the cap; the next append evicts it.
        let files: u64 = segment_files(&data)
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(files <= CAP + CAP / 8, "cycle {cycle}: {files} B on disk");
        if cycle == CYCLES {
            break;
        }
        // Upload, and keep asking for every 4th record so eviction has copies to make.
        let stop = Arc::new(AtomicBool::new(false));
        let (admin, listen, stop2) = (s.admin, s.addr, stop.clone());
        let base = n;
        let loader = std::thread::spawn(move || {
            let mut hot: Vec<[u8; 20]> = Vec::new();
            for i in base.. {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let (t, _, key) = torrent("evict", i);
                match try_upload(admin, &t) {
                    Some((201 | 200, _)) => {}
                    Some((status, body)) => panic!("upload refused: {status} {body}"),
                    None => break,
                }
                if i % 4 == 0 {
                    hot.push(key);
                }
                if let Some(k) = hot.get(i as usize % hot.len().max(1)) {
                    let _ = fetch_metadata(listen, k, Duration::from_secs(5));
                }
            }
        });
        // However fast this machine uploads: first the load fills the store past the cap
        // (this server evicts), then the kill comes at a random moment while it goes on.
        let filling = Instant::now();
        while metric(&s, "magnetar_store_segments_evicted_total") == 0.0 {
            if loader.is_finished() {
                loader.join().unwrap();
                panic!("cycle {cycle}: the loader stopped before the store reached the cap");
            }
            assert!(
                filling.elapsed() < Duration::from_secs(60),
                "cycle {cycle}: the load did not fill the store past the cap within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300 + next_rand(&mut rng) % 400));
        evicted += metric(&s, "magnetar_store_segments_evicted_total");
        let mut s = s;
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        loader.join().unwrap();
        n += 1_000_000;
    }
    println!("kill -9 with --store-capacity {CAP}: {CYCLES} cycles, {evicted} segments evicted");
    assert!(evicted > 0.0, "the load never overflowed the cap");
}
