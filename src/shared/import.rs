//! `magnetar import --from s3://BUCKET[/PREFIX]`: prefill a node's store from the shared
//! tier (a new node, or one whose disk was replaced), so it serves hits at once instead of
//! through a miss each.
//!
//! Tombstones first: each one is applied (deleted and blocked here), and their objects are
//! not imported. Then every `info/<key>` object is fetched (`IMPORT_GETS_IN_FLIGHT` at
//! once), verified against its key like a miss would, and appended with the import's
//! batched sync. Objects that fail are counted and named in the log, never stored.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;

use super::keys::Layout;
use super::tombstone::FleetKey;
use super::SharedConfig;
use crate::store::{AppendOptions, AppendOutcome, Origin, Store};

/// Objects fetched at once: enough to hide a remote store's latency.
const IMPORT_GETS_IN_FLIGHT: usize = 32;

/// GETs of one object before it counts as failed.
const IMPORT_TRIES: u32 = 3;

/// Wait before the n-th retry of a GET: n times this (a replica catching up, a busy node).
const IMPORT_RETRY_STEP: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct ImportReport {
    pub objects: u64,
    pub imported: u64,
    pub already_present: u64,
    pub corrupt: u64,
    pub failed: u64,
    pub tombstones_applied: u64,
    /// Tombstones not signed with the fleet key (or none is configured): not applied.
    pub tombstones_ignored: u64,
    pub elapsed: Duration,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} objects: {} imported, {} already present, {} corrupt (not stored), {} failed; \
             {} tombstones applied, {} ignored (not signed with the fleet key); {:.1} s",
            self.objects,
            self.imported,
            self.already_present,
            self.corrupt,
            self.failed,
            self.tombstones_applied,
            self.tombstones_ignored,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Every name under `dir` (object_store pages the LIST), each page bounded by `t`.
async fn list_all(os: &dyn ObjectStore, dir: &Path, t: Duration) -> anyhow::Result<Vec<Path>> {
    let mut names = Vec::new();
    let mut list = os.list(Some(dir));
    while let Some(meta) = tokio::time::timeout(t, list.next())
        .await
        .with_context(|| format!("listing {dir}: no answer in {t:?}"))?
    {
        names.push(meta.with_context(|| format!("listing {dir}"))?.location);
    }
    Ok(names)
}

/// Import every object of the shared store `cfg.shared_store` into `store`.
pub fn import_from(cfg: &SharedConfig, store: Arc<Store>) -> anyhow::Result<ImportReport> {
    let (os, layout, _) = cfg.connect()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the import runtime")?;
    let started = Instant::now();
    let op_timeout = cfg.op_timeout();
    let mut report = rt.block_on(async {
        let mut report = ImportReport::default();
        let fleet = cfg.fleet_key()?;
        let tombstoned = apply_tombstones(
            &os,
            &layout,
            fleet.as_ref(),
            &store,
            op_timeout,
            &mut report,
        )
        .await?;
        let keys =
            missing_objects(&*os, &layout, &tombstoned, &store, op_timeout, &mut report).await?;
        import_objects(&os, &layout, keys, &store, op_timeout, &mut report).await;
        anyhow::Ok(report)
    })?;
    store.sync().context("syncing the store")?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Tombstones: only those signed with the fleet key count, applied in one batch (deleted
/// and blocked here). Returns every tombstoned key, so that its object is not imported.
async fn apply_tombstones(
    os: &Arc<dyn ObjectStore>,
    layout: &Layout,
    fleet: Option<&FleetKey>,
    store: &Arc<Store>,
    op_timeout: Duration,
    report: &mut ImportReport,
) -> anyhow::Result<HashSet<[u8; 20]>> {
    let mut names: Vec<(u64, [u8; 20], Path)> = Vec::new();
    for name in list_all(&**os, &layout.tomb_log_dir(), op_timeout).await? {
        if let Some((at, key)) = layout.parse_tomb_log(&name) {
            names.push((at, key, name));
        }
    }
    let mut checks = futures_util::stream::iter(names)
        .map(|(at, key, path)| {
            let os = os.clone();
            async move {
                let got = tokio::time::timeout(
                    op_timeout,
                    super::get_bounded(&*os, &path, super::tombstone::TOMBSTONE_BYTES_MAX),
                )
                .await;
                (at, key, path, got)
            }
        })
        .buffer_unordered(IMPORT_GETS_IN_FLIGHT);
    let mut tombstoned = HashSet::new();
    while let Some((at, key, path, got)) = checks.next().await {
        let body = match got {
            Ok(Ok(super::Bounded::Body(body))) => body,
            Ok(Ok(super::Bounded::TooLarge(_))) => bytes::Bytes::new(),
            Ok(Err(object_store::Error::NotFound { .. })) => continue,
            Ok(Err(e)) => anyhow::bail!("reading {path}: {}", super::error_chain(&e)),
            Err(_) => anyhow::bail!("reading {path}: no answer in {op_timeout:?}"),
        };
        match super::tombstone::verify(fleet, &body, &key, Some(at)) {
            Ok(_) => {
                tombstoned.insert(key);
            }
            Err(why) => {
                tracing::warn!(object = %path, "tombstone ignored: {}", why.as_str());
                report.tombstones_ignored += 1;
            }
        }
    }
    let apply: Vec<[u8; 20]> = tombstoned
        .iter()
        .filter(|k| !store.is_blocked(k))
        .copied()
        .collect();
    if !apply.is_empty() {
        report.tombstones_applied = apply.len() as u64;
        let s = store.clone();
        tokio::task::spawn_blocking(move || {
            s.delete_batch_from(&apply, "shared tombstone (import)", Origin::Shared)
        })
        .await??;
    }
    Ok(tombstoned)
}

/// The keys of the tier's `info/` objects this store lacks (tombstoned ones left out);
/// counts every object and those already present.
async fn missing_objects(
    os: &dyn ObjectStore,
    layout: &Layout,
    tombstoned: &HashSet<[u8; 20]>,
    store: &Store,
    op_timeout: Duration,
    report: &mut ImportReport,
) -> anyhow::Result<Vec<[u8; 20]>> {
    let mut keys = Vec::new();
    for name in list_all(os, &layout.info_dir(), op_timeout).await? {
        let Some(key) = layout.parse_info(&name) else {
            continue;
        };
        report.objects += 1;
        if tombstoned.contains(&key) {
            continue;
        }
        if store.lookup(&key).is_some() {
            report.already_present += 1;
        } else {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Fetches `keys` (`IMPORT_GETS_IN_FLIGHT` at once, `IMPORT_TRIES` tries each), verifies
/// each dict against its key and appends it. Failures are counted and logged, never stored.
async fn import_objects(
    os: &Arc<dyn ObjectStore>,
    layout: &Layout,
    keys: Vec<[u8; 20]>,
    store: &Store,
    op_timeout: Duration,
    report: &mut ImportReport,
) {
    let fetches = futures_util::stream::iter(keys)
        .map(|key| {
            let (os, path) = (os.clone(), layout.info(&key));
            async move {
                // A few tries: one failed GET should not leave a hole in a prefill.
                let mut tries = 0;
                loop {
                    tries += 1;
                    let got = tokio::time::timeout(
                        op_timeout,
                        super::get_bounded(&*os, &path, crate::limits::METADATA_BYTES_MAX),
                    )
                    .await;
                    if matches!(got, Ok(Ok(_))) || tries == IMPORT_TRIES {
                        return (key, path, got);
                    }
                    tokio::time::sleep(IMPORT_RETRY_STEP * tries).await;
                }
            }
        })
        .buffer_unordered(IMPORT_GETS_IN_FLIGHT);
    futures_util::pin_mut!(fetches);
    while let Some((key, path, got)) = fetches.next().await {
        let bytes = match got {
            Ok(Ok(super::Bounded::Body(b))) => b,
            Ok(Ok(super::Bounded::TooLarge(size))) => {
                tracing::warn!(object = %path, size, "not imported: larger than the metadata limit");
                report.corrupt += 1;
                continue;
            }
            // Listed but gone: deleted meanwhile (or a replica's stale listing).
            Ok(Err(object_store::Error::NotFound { .. })) => continue,
            Ok(Err(e)) => {
                tracing::warn!(object = %path, "not imported: {}", super::error_chain(&e));
                report.failed += 1;
                continue;
            }
            Err(_) => {
                tracing::warn!(object = %path, "not imported: no answer in {op_timeout:?}");
                report.failed += 1;
                continue;
            }
        };
        match crate::metainfo::validate_info(&bytes) {
            Ok(sum) if sum.hashes.handshake_keys().any(|k| k == key) => {}
            _ => {
                tracing::warn!(object = %path, "not imported: does not hash to its key");
                report.corrupt += 1;
                continue;
            }
        }
        // Hashing again inside append costs what the network saved; it keeps one
        // validated write path.
        let opts = AppendOptions {
            origin: Origin::Shared,
            ..AppendOptions::default()
        };
        match store.append(&bytes, opts) {
            Ok(AppendOutcome::Stored(_)) => report.imported += 1,
            Ok(AppendOutcome::AlreadyPresent(_)) => report.already_present += 1,
            Err(e) => {
                tracing::warn!(object = %path, "not imported: {e}");
                report.failed += 1;
            }
        }
    }
}
