//! A store larger than memory does not stall a core (issue 20, item 3): a record that is
//! not in the page cache is read in off the worker thread, so a hot fetch on the same core
//! completes while a cold one waits for the disk.
//!
//! The store's segment files are dropped from the page cache before the server starts
//! (opened from its checkpoint, the server reads none of them). The server has one worker,
//! so every connection shares its thread. Slow disk, made deterministic:
//! `MAGNETAR_PAGE_IN_DELAY_MS` holds each page-in for a while (the hook the server has for
//! this), and where the test runs as root with cgroup v1 blkio, the server's reads from the
//! store's disk are also throttled to a few per second (after its first fetch), so a read on the worker thread (as
//! before this change) would hold every connection of the core for that long.
//!
//! Runs on the driver `MAGNETAR_DRIVER` names (io_uring by default; `epoll` too).

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use magnetar::store::{AppendOptions, Store, StoreOptions};

use common::info::{v1_info, Torrent};
use common::kit::{get, metrics};
use common::peer::{
    ext_handshake, fetch_all, fetch_all_on, handshake, open, reserved, Peer, PROMPT,
};
use common::ServerProc;
use magnetar::wire::{ExtHandshake, Frame};

/// How long each page-in is held (the cold fetch's floor).
const PAGE_IN_DELAY: Duration = Duration::from_millis(1500);
/// A fetch of a resident record on loopback, with room for a loaded test machine; far
/// below `PAGE_IN_DELAY`, so a hot fetch held behind a cold one cannot pass.
const HOT_FETCH_MAX: Duration = Duration::from_millis(800);
/// Records between the hot and the cold one (9 KB each: ~18 MB), so that the kernel's
/// read-around of one fault (`read_ahead_kb`, 8 MB on some disks) never reads in the other.
const FILLERS: usize = 2000;
const OUR_ID: u8 = 3;

fn segment_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mseg"))
        .collect()
}

/// Pages of `file` in the page cache, and all its pages.
fn resident_pages(file: &Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return (0, 0);
    }
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of the whole file, only asked about with
    // mincore (never read), unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    (vec.iter().filter(|b| *b & 1 != 0).count(), pages)
}

/// Drops every segment file from the page cache; false if the kernel would not (tmpfs).
fn evict(data: &Path) -> bool {
    use std::os::fd::AsRawFd;
    for path in segment_files(data) {
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: fadvise on our own descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if resident_pages(&path).0 > 0 {
            return false;
        }
    }
    true
}

/// A cgroup v1 blkio group throttling the reads of `server` from the disk holding `data`,
/// removed on drop; `None` where that cannot be made (not root, no cgroup v1 blkio).
struct Throttle {
    dir: PathBuf,
    server: u32,
}

impl Throttle {
    fn new(server: u32, data: &Path) -> Option<Throttle> {
        use std::os::unix::fs::MetadataExt;
        let root = Path::new("/sys/fs/cgroup/blkio");
        if !root.join("blkio.throttle.read_iops_device").exists() {
            return None;
        }
        let dev = std::fs::metadata(data).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let dir = root.join(format!("magnetar-cold-reads-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let t = Throttle { dir, server };
        // Four reads a second: a fault on the worker would hold it ~0.25 s per read (and
        // a fault's read-around is several reads).
        std::fs::write(
            t.dir.join("blkio.throttle.read_iops_device"),
            format!("{major}:{minor} 4"),
        )
        .ok()?;
        std::fs::write(t.dir.join("cgroup.procs"), server.to_string()).ok()?;
        Some(t)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // The server back to the root group (it may still run: a failed assertion drops
        // this first), then the group, now empty, goes.
        let root = self.dir.parent().expect("under the blkio root");
        let _ = std::fs::write(root.join("cgroup.procs"), self.server.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `fetch_all` of `t`, waiting up to `answer_within` for the server's first answer (a
/// cold record's page-in on a throttled disk takes longer than `PROMPT`).
fn fetch_waiting(addr: std::net::SocketAddr, t: &Torrent, answer_within: Duration) {
    let mut peer = Peer::connect(addr);
    let mut first = handshake(reserved(false), &t.key);
    first.extend(ext_handshake(Some(OUR_ID)));
    peer.send(&first);
    assert_eq!(
        peer.fill(Instant::now() + answer_within),
        Ok(true),
        "the server answered the handshake"
    );
    let _ = peer.read_exact(68, PROMPT, "server handshake");
    let m = peer.msg("extension handshake");
    let Frame::Extended { id: 0, payload } = m.frame() else {
        panic!("the extension handshake first, got {m:?}");
    };
    let server_id = ExtHandshake::decode(payload)
        .expect("extension handshake")
        .ut_metadata
        .expect("ut_metadata");
    fetch_all_on(&mut peer, server_id, t, OUR_ID);
}

#[test]
fn a_hot_fetch_completes_while_a_cold_one_on_the_same_core_waits_for_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("store");
    let hot = Torrent::v1(v1_info("hot.bin", 450));
    let cold = Torrent::v1(v1_info("cold.bin", 450));
    {
        let (store, _) = Store::open(&data, StoreOptions::default()).unwrap();
        store.append(&hot.info, AppendOptions::default()).unwrap();
        for i in 0..FILLERS {
            let filler = v1_info(&format!("filler-{i:05}.bin"), 450);
            store.append(&filler, AppendOptions::default()).unwrap();
        }
        store.append(&cold.info, AppendOptions::default()).unwrap();
    }
    // Once more, so the checkpoint is clearly younger than the segments: the server then
    // maps them without reading them (store/recovery.rs).
    std::thread::sleep(Duration::from_millis(300));
    drop(Store::open(&data, StoreOptions::default()).unwrap());
    if !evict(&data) {
        eprintln!(
            "the page cache of {} cannot be dropped: skipped",
            data.display()
        );
        return;
    }

    let mut cmd = ServerProc::command(&data, &["--threads", "1", "--log", "warn"]);
    cmd.env(
        "MAGNETAR_PAGE_IN_DELAY_MS",
        PAGE_IN_DELAY.as_millis().to_string(),
    );
    let server = ServerProc::spawn(cmd);
    let (resident, pages) = segment_files(&data)
        .iter()
        .map(|p| resident_pages(p))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert!(
        resident * 10 < pages,
        "the server's open read the segments ({resident} of {pages} pages resident)"
    );

    // The hot record's first fetch is cold too: paged in, then served.
    let t = Instant::now();
    fetch_waiting(server.addr, &hot, Duration::from_secs(30));
    let first_took = t.elapsed();
    // From here on the disk is slow for the server (its code paths for this have run, so
    // the reads throttled are the store's).
    let throttle = Throttle::new(server.child.id(), &data);
    eprintln!(
        "driver {}, blkio read throttle: {}",
        server.driver,
        if throttle.is_some() {
            "on"
        } else {
            "off (not root or no cgroup v1 blkio)"
        }
    );

    // The cold fetch starts, and waits for its page-in...
    let (done_tx, done_rx) = mpsc::channel();
    let (addr, cold_torrent) = (server.addr, cold.clone());
    let cold_fetch = std::thread::spawn(move || {
        let t = Instant::now();
        fetch_waiting(addr, &cold_torrent, Duration::from_secs(30));
        let _ = done_tx.send(());
        t.elapsed()
    });
    let until = Instant::now() + Duration::from_secs(5);
    while get(&metrics(&server), "magnetar_handshakes_total") < 2 {
        assert!(
            Instant::now() < until,
            "the cold fetch never reached the server"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...while the hot one, on the same core, is served at once.
    let t = Instant::now();
    fetch_all(&mut open(server.addr, &hot.key, OUR_ID), &hot, OUR_ID);
    let hot_took = t.elapsed();
    let cold_pending = done_rx.try_recv().is_err();
    let cold_took = cold_fetch.join().expect("the cold fetch succeeds");
    eprintln!("hot fetch {hot_took:?} while the cold one took {cold_took:?}");
    assert!(
        hot_took < HOT_FETCH_MAX,
        "a hot fetch took {hot_took:?} behind a cold one"
    );
    assert!(
        cold_pending,
        "the cold fetch was still waiting for the disk"
    );
    assert!(cold_took >= PAGE_IN_DELAY);
    assert!(first_took >= PAGE_IN_DELAY, "the first fetch was paged in");

    let m = metrics(&server);
    assert_eq!(
        get(&m, "magnetar_cold_lookups_total"),
        2,
        "the hot set stayed hot"
    );
    assert_eq!(get(&m, "magnetar_page_ins_total"), 2);
    assert_eq!(get(&m, "magnetar_hits_total"), 3);
    drop(server);
    drop(throttle);
}
