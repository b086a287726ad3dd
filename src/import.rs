//! `magnetar import`: .torrent files into the store.
//!
//! Owns finding the files (explicit paths of any name, `*.torrent` inside directories,
//! recursively), cutting the raw `info` dict out of each (never re-encoding it), and appending
//! it. Files are processed on one thread per core: each append hashes its dict outside any lock,
//! and appends of different info-hashes go to different writers. One bad file costs one line on
//! stderr and nothing else.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::limits::METADATA_BYTES_MAX;
use crate::metainfo::info_span;
use crate::store::{AppendOptions, AppendOutcome, Store};

/// Largest .torrent file we read: the biggest info dict plus 1 MiB for the rest (trackers,
/// comments, and v2 `piece layers`, which can be large but are not part of the info dict).
const TORRENT_FILE_BYTES_MAX: u64 = METADATA_BYTES_MAX as u64 + 1024 * 1024;

/// Below this many files a run is short enough that progress lines are noise.
const PROGRESS_FILES_MIN: usize = 1000;
const PROGRESS_INTERVAL_MS: u64 = 1000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub files_seen: u64,
    pub imported: u64,
    pub already_present: u64,
    pub failed: u64,
    /// Info dict bytes newly stored.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.files_seen as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "import: {} files, {} imported ({:.1} MB), {} already present, {} failed in {:.2} s ({rate:.0} files/s)",
            self.files_seen,
            self.imported,
            self.bytes as f64 / 1e6,
            self.already_present,
            self.failed,
            secs
        )
    }
}

/// Import every file named in `paths` (directories: their `*.torrent` files, recursively).
/// The store should be opened with `SyncPolicy::Batch`; this syncs it at the end.
pub fn import_paths(store: &Store, paths: &[PathBuf], progress: bool) -> ImportReport {
    let started = Instant::now();
    let mut files = Vec::new();
    let mut failed = 0u64;
    for path in paths {
        if let Err(e) = collect(path, true, &mut files) {
            eprintln!("error: {}: {e}", path.display());
            failed += 1;
        }
    }

    let counters = Counters::default();
    let next = AtomicUsize::new(0);
    let last_progress_ms = AtomicU64::new(0);
    let show_progress = progress && files.len() > PROGRESS_FILES_MIN;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = files.get(i) else { break };
                match import_file(store, path) {
                    Ok((AppendOutcome::Stored(_), len)) => {
                        counters.imported.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    Ok((AppendOutcome::AlreadyPresent(_), _)) => {
                        counters.already_present.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(reason) => {
                        eprintln!("error: {}: {reason}", path.display());
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let done = counters.done.fetch_add(1, Ordering::Relaxed) + 1;
                if show_progress {
                    report_progress(&last_progress_ms, started, done, files.len());
                }
            });
        }
    });
    if let Err(e) = store.sync() {
        // Every record is already published; what failed is making the batch durable.
        eprintln!("error: syncing the store: {e}");
        failed += 1;
    }
    ImportReport {
        files_seen: files.len() as u64,
        imported: counters.imported.into_inner(),
        already_present: counters.already_present.into_inner(),
        failed: failed + counters.failed.into_inner(),
        bytes: counters.bytes.into_inner(),
        elapsed: started.elapsed(),
    }
}

#[derive(Default)]
struct Counters {
    imported: AtomicU64,
    already_present: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    done: AtomicUsize,
}

/// One progress line per interval, printed by whichever worker first notices it is due.
fn report_progress(last_ms: &AtomicU64, started: Instant, done: usize, total: usize) {
    let now_ms = started.elapsed().as_millis() as u64;
    let last = last_ms.load(Ordering::Relaxed);
    if now_ms < last + PROGRESS_INTERVAL_MS
        || last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprintln!("imported {done}/{total} ({rate:.0} files/s)");
}

/// Add `path` to `out`: a file always when named explicitly, only `*.torrent` inside a
/// directory. Symlinks to files are followed; symlinks to directories are not (no loops).
fn collect(path: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        if explicit || path.extension().is_some_and(|e| e == "torrent") {
            out.push(path.to_path_buf());
        }
        return Ok(());
    }
    if !meta.is_dir() {
        return if explicit {
            Err(std::io::Error::other("not a file or directory"))
        } else {
            Ok(())
        };
    }
    if !explicit && std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        if let Err(e) = collect(&entry, false, out) {
            eprintln!("error: {}: {e}", entry.display());
        }
    }
    Ok(())
}

fn import_file(store: &Store, path: &Path) -> Result<(AppendOutcome, u64), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    // `take` bounds the read even if the file grows or lies about its size.
    file.take(TORRENT_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > TORRENT_FILE_BYTES_MAX {
        return Err(format!(
            "larger than {TORRENT_FILE_BYTES_MAX} bytes; not a .torrent"
        ));
    }
    let span = info_span(&bytes).map_err(|e| format!("not a .torrent: {e}"))?;
    let info = &bytes[span];
    let outcome = store
        .append(info, AppendOptions::default())
        .map_err(|e| e.to_string())?;
    Ok((outcome, info.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metainfo::build_torrent;
    use crate::metainfo::tests::synthetic_v1;
    use crate::store::{StoreOptions, SyncPolicy};

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torrents")
    }

    #[test]
    fn imports_good_skips_bad_counts_duplicates() {
        let data = tempfile::tempdir().unwrap();
        let input = tempfile::tempdir().unwrap();
        let sub = input.path().join("nested/deeper");
        std::fs::create_dir_all(&sub).unwrap();
        for entry in std::fs::read_dir(fixture_dir()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "torrent") {
                std::fs::copy(&p, sub.join(p.file_name().unwrap())).unwrap();
            }
        }
        // A duplicate under another name, a broken file, a non-.torrent file that is skipped
        // inside a directory, and one given explicitly under an odd name.
        std::fs::copy(
            fixture_dir().join("v1_single.torrent"),
            input.path().join("copy.torrent"),
        )
        .unwrap();
        std::fs::write(input.path().join("bad.torrent"), b"d4:infod4:name").unwrap();
        std::fs::write(input.path().join("notes.txt"), b"not a torrent").unwrap();
        let odd = input.path().join("synthetic.bin");
        std::fs::write(&odd, build_torrent(&synthetic_v1(5, 800), &[])).unwrap();

        let opts = StoreOptions {
            shards: 2,
            segment_bytes: 1 << 20,
            sync: SyncPolicy::Batch,
            ..StoreOptions::default()
        };
        let (store, _) = Store::open(data.path(), opts.clone()).unwrap();
        let paths = vec![
            input.path().to_path_buf(),
            odd.clone(),
            input.path().join("missing"),
        ];
        let report = import_paths(&store, &paths, false);
        assert_eq!(report.files_seen, 5 + 1 + 1 + 1, "{report}");
        assert_eq!(report.imported, 6, "{report}");
        assert_eq!(report.already_present, 1, "{report}");
        assert_eq!(report.failed, 2, "{report}"); // bad.torrent, missing
        assert!(report.bytes > 0);
        assert!(report.to_string().contains("6 imported"));
        drop(store);
        let (store, recovery) = Store::open(data.path(), opts).unwrap();
        assert_eq!(recovery.records, 6);
        let again = import_paths(&store, &[input.path().to_path_buf()], false);
        assert_eq!(
            (again.imported, again.already_present, again.failed),
            (0, 6, 1)
        );
    }
}

/// Throughput check, not a unit test: `cargo test --release --lib recovery_10k_records --
/// --ignored --nocapture`. Imports 10k synthetic v1 dicts of 1–20 KB from .torrent files, then
/// reopens (full recovery: re-hash everything); prints the median of 3 runs of each.
#[cfg(test)]
mod speed {
    use super::*;
    use crate::metainfo::build_torrent;
    use crate::metainfo::tests::synthetic_v1;
    use crate::store::{StoreOptions, SyncPolicy};

    #[test]
    #[ignore = "timing; run in release with --ignored --nocapture"]
    fn recovery_10k_records() {
        const N: u64 = 10_000;
        let input = tempfile::tempdir().unwrap();
        for i in 0..N {
            let size = 1000 + (i as usize * 7919) % 19_000;
            let t = build_torrent(&synthetic_v1(i, size), &["http://t/a".to_owned()]);
            std::fs::write(input.path().join(format!("{i}.torrent")), t).unwrap();
        }
        let opts = StoreOptions {
            sync: SyncPolicy::Batch,
            ..StoreOptions::default()
        };
        let (mut imports, mut recoveries) = (Vec::new(), Vec::new());
        let mut mb = 0.0;
        for _ in 0..3 {
            let data = tempfile::tempdir().unwrap();
            let (store, _) = Store::open(data.path(), opts.clone()).unwrap();
            let report = import_paths(&store, &[input.path().to_path_buf()], false);
            assert_eq!(report.imported, N, "{report}");
            mb = report.bytes as f64 / 1e6;
            imports.push(report.elapsed);
            drop(store);
            let (_, recovery) = Store::open(data.path(), opts.clone()).unwrap();
            assert_eq!(recovery.records as u64, N);
            recoveries.push(recovery.elapsed);
            println!("{report}\nrecovery: {recovery}");
        }
        imports.sort();
        recoveries.sort();
        let (i, r) = (imports[1].as_secs_f64(), recoveries[1].as_secs_f64());
        println!(
            "median of 3: import {:.0} ms ({:.0} files/s, {:.0} MB/s); recovery {:.0} ms ({:.0} records/s, {:.0} MB/s); {mb:.1} MB, {} threads",
            i * 1e3,
            N as f64 / i,
            mb / i,
            r * 1e3,
            N as f64 / r,
            mb / r,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
