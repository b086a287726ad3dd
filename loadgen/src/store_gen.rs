//! `gen-store`: K synthetic info dicts (see `synth`) into a magnetar store, plus the files
//! the other contestants of `benches/compare.sh` need — the hash list, .torrent files for a
//! libtorrent seed, and the floor server's flat file. `recover`: time `Store::open`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use magnetar::metainfo::validate_info;
use magnetar::store::{AppendOptions, Store, StoreOptions, SyncPolicy};

use crate::synth::{self, SizeMix};

pub struct GenOptions {
    pub data_dir: Option<PathBuf>,
    pub count: u64,
    pub mix: SizeMix,
    pub seed: u64,
    pub hashes: Option<PathBuf>,
    pub torrents: Option<PathBuf>,
    pub floor: Option<PathBuf>,
    pub threads: usize,
}

/// Generates the dicts, in parallel; returns (records, bytes, elapsed).
pub fn gen_store(o: &GenOptions) -> anyhow::Result<(u64, u64, Duration)> {
    let started = Instant::now();
    let store = match &o.data_dir {
        Some(dir) => Some(
            Store::open(
                dir,
                StoreOptions {
                    sync: SyncPolicy::Batch,
                    ..StoreOptions::default()
                },
            )
            .with_context(|| format!("opening store {dir:?}"))?
            .0,
        ),
        None => None,
    };
    if let Some(dir) = &o.torrents {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    }
    /// One generated dict: its index, its key, and its bytes when the floor file needs them.
    type Generated = (u64, [u8; 20], Option<Vec<u8>>);
    let threads = o.threads.max(1) as u64;
    // Each thread returns its (index, key, dict?) in order; files are written afterwards so
    // their order is the index order whatever the thread timing.
    let keep_dicts = o.floor.is_some();
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.as_ref();
                scope.spawn(move || -> anyhow::Result<Vec<Generated>> {
                    let mut out = Vec::new();
                    let mut i = t;
                    while i < o.count {
                        let info = synth::nth_dict(o.seed, o.mix, i);
                        let key = match store {
                            Some(store) => {
                                let rec = store.append(&info, AppendOptions::default())?;
                                rec.record().hashes().primary_key().expect("v1 dict")
                            }
                            None => validate_info(&info)?.hashes.v1.expect("v1 dict"),
                        };
                        if let Some(dir) = &o.torrents {
                            let path = dir.join(format!("{}.torrent", hex::encode(key)));
                            std::fs::write(&path, synth::torrent_file(&info))
                                .with_context(|| format!("writing {path:?}"))?;
                        }
                        out.push((i, key, keep_dicts.then_some(info)));
                        i += threads;
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let mut all: Vec<_> = parts.into_iter().flatten().collect();
    all.sort_unstable_by_key(|(i, _, _)| *i);
    if let Some(store) = &store {
        store.sync().context("syncing the store")?;
    }
    if let Some(path) = &o.hashes {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {path:?}"))?,
        );
        for (_, key, _) in &all {
            writeln!(f, "{}", hex::encode(key))?;
        }
        f.flush()?;
    }
    let mut bytes = 0u64;
    if let Some(path) = &o.floor {
        // The floor server's input: [20-byte key][u32 LE length][info dict] per torrent.
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {path:?}"))?,
        );
        for (_, key, info) in &all {
            let info = info.as_ref().expect("kept for the floor");
            bytes += info.len() as u64;
            f.write_all(key)?;
            f.write_all(&(info.len() as u32).to_le_bytes())?;
            f.write_all(info)?;
        }
        f.flush()?;
    }
    if let Some(store) = &store {
        bytes = store.stats().bytes;
    }
    Ok((all.len() as u64, bytes, started.elapsed()))
}

/// Opens the store `runs` times as the server does (full re-verification); returns each
/// run's (records, bytes, elapsed).
pub fn recover(dir: &Path, runs: usize) -> anyhow::Result<Vec<(usize, u64, Duration)>> {
    (0..runs.max(1))
        .map(|_| {
            let started = Instant::now();
            let (store, report) = Store::open(dir, StoreOptions::default())
                .with_context(|| format!("opening store {dir:?}"))?;
            let elapsed = started.elapsed();
            drop(store);
            Ok((report.records, report.bytes, elapsed))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_store_recovers_and_lists_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let o = GenOptions {
            data_dir: Some(dir.path().join("store")),
            count: 50,
            mix: SizeMix::Real,
            seed: 9,
            hashes: Some(dir.path().join("hashes.txt")),
            torrents: Some(dir.path().join("torrents")),
            floor: Some(dir.path().join("floor.bin")),
            threads: 2,
        };
        let (n, bytes, _) = gen_store(&o).unwrap();
        assert_eq!(n, 50);
        assert!(bytes > 50 * 1024);
        let listed = crate::targets::hashes_from_file(o.hashes.as_ref().unwrap()).unwrap();
        assert_eq!(listed.len(), 50);
        let runs = recover(o.data_dir.as_ref().unwrap(), 1).unwrap();
        assert_eq!(runs[0].0, 50);
        let mut from_store =
            crate::targets::hashes_from_store(o.data_dir.as_ref().unwrap()).unwrap();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        from_store.sort_unstable();
        assert_eq!(from_store, sorted);
        let torrents = std::fs::read_dir(o.torrents.as_ref().unwrap())
            .unwrap()
            .count();
        assert_eq!(torrents, 50);
        let floor = std::fs::read(o.floor.as_ref().unwrap()).unwrap();
        assert_eq!(floor.len() as u64, bytes + 50 * 24);
    }
}
