//! The shared tier: an S3-compatible object store (AWS S3, R2, Ceph RGW, Garage, MinIO...)
//! behind every magnetar node of a fleet. Info dicts are immutable and prove themselves
//! (the info-hash is the key), so any replica can be trusted after one hash check and a
//! write needs no coordination: no membership, no replication of our own.
//!
//! - `keys`     object names (`info/<key>`, `tomb/<key>`, `tomb-log/<time>-<key>`), the URL
//! - `uploader` write-behind: every record and delete this node makes is uploaded once,
//!   through a bounded queue, with retries; crash-safe through a durable cursor (`cursor`)
//! - `import`   `magnetar import --from s3://...`: prefill a node from the bucket
//! - `stats`    `magnetar_shared_*` metrics
//!
//! Read path (a miss on the owning shard, `upstream::shard`): local store, then
//! `SharedTier::get` (GET `info/<key>` and HEAD `tomb/<key>` at once, bounded by
//! `get-timeout-ms`), then the swarm. An object is verified against the key before it is
//! stored and served; a bad one is counted and logged, never served, and the swarm fetch
//! goes on (its result is uploaded over the bad object). A tombstone found there is applied
//! at once (delete + block) and the miss is refused.
//!
//! Deletes and blocks: `Store::delete` tells the uploader, which writes `tomb/<key>` and
//! `tomb-log/<time>-<key>` and deletes `info/<key>`. Every node lists `tomb-log/` every
//! `tombstone-poll-ms` from where it left off and applies what it has not seen, so a
//! delete reaches every node within that bound (plus one LIST); a miss checks `tomb/<key>`
//! directly, so no node fetches a deleted hash again even before its poll.
//!
//! Threads: object_store is tokio-based, so the tier runs a current-thread tokio runtime on
//! a thread of its own (`magnetar-shared`). The serving cores talk to it through flume
//! channels and never wait on it: a miss awaits its answer as it would await a fetch.
//!
//! Health: a failing operation marks the tier degraded (metric, one log line, `/readyz`
//! says so but stays 200: local hits and swarm misses go on); misses skip the tier while it
//! is degraded, but for one probe a second; the first success clears it.
//!
//! docs/scale-out.md has the topology, failure modes and measurements.

pub mod cursor;
pub mod import;
pub mod keys;
pub mod stats;
mod uploader;

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Deserialize;

use crate::store::{Origin, Store};
use keys::Layout;
use stats::SharedStats;

/// Settings of the shared tier (`[shared]` in the config file).
#[derive(clap::Args, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SharedConfig {
    /// The S3-compatible object store every node of the fleet shares: s3://BUCKET[/PREFIX].
    /// Misses try it before the swarm; everything this node stores is uploaded to it.
    /// Credentials, endpoint and region come from the usual AWS_* environment variables
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
    /// AWS_ALLOW_HTTP) unless set below. Off when unset.
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
    pub shared_store: Option<String>,

    /// S3 endpoint for stores other than AWS (e.g. http://127.0.0.1:3900 for Garage).
    #[arg(long, value_name = "URL")]
    pub shared_endpoint: Option<String>,

    /// S3 region (Garage's default is "garage").
    #[arg(long, value_name = "REGION")]
    pub shared_region: Option<String>,

    /// S3 access key id.
    #[arg(long, value_name = "ID")]
    pub shared_access_key_id: Option<String>,

    /// File holding the S3 secret access key (a flag would show in `ps`).
    #[arg(long, value_name = "FILE")]
    pub shared_secret_access_key_file: Option<PathBuf>,

    /// Allow a plain-http endpoint (a store on the same host or a private network).
    #[arg(long)]
    pub shared_allow_http: bool,

    /// How long a miss waits for the shared tier before going to the swarm.
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    pub shared_get_timeout_ms: u64,

    /// Bound on any other shared-tier operation (PUT, HEAD, DELETE, LIST page).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub shared_op_timeout_ms: u64,

    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub shared_put_concurrency: usize,

    /// Records and tombstones queued for upload; past it notifications are dropped and a
    /// catch-up walk of the store uploads them later (nothing is lost, see the cursor).
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    pub shared_put_queue_max: usize,

    /// How often the tombstones of other nodes are polled: a delete anywhere stops this
    /// node serving the hash within about this long.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub shared_tombstone_poll_ms: u64,
}

impl Default for SharedConfig {
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let cmd = SharedConfig::augment_args(clap::Command::new("shared"));
        let m = cmd
            .try_get_matches_from(["shared"])
            .expect("defaults parse");
        SharedConfig::from_arg_matches(&m).expect("defaults are valid")
    }
}

/// Upper bound on shared-tier lookups in flight (misses are already rate-limited by
/// `misses-per-second-max`; this bounds sockets if the store hangs).
const GETS_IN_FLIGHT_MAX: usize = 256;

/// A TCP connect to the store that takes longer is given up (then retried once): on a
/// working network it takes milliseconds, and a miss waits at most 2 s for the tier anyway.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(2);

/// Shortest tombstone poll interval accepted: each poll is a LIST request per node.
const TOMBSTONE_POLL_MIN: Duration = Duration::from_millis(100);

/// While degraded, one miss a second still tries the store (a probe).
const DEGRADED_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Tombstones are listed again from this long before the newest seen: nodes' clocks differ
/// and an upload can land late.
const TOMBSTONE_CLOCK_SKEW_SECS: u64 = 300;

/// What a miss learns from the shared tier.
#[derive(Debug)]
pub enum SharedGet {
    /// Verified bytes of the info dict.
    Found(bytes::Bytes),
    /// Not there (or there but corrupt, counted): go to the swarm.
    Miss,
    /// Deleted or blocked somewhere in the fleet; applied here too.
    Tombstoned,
    /// The tier did not answer in time or failed: go to the swarm.
    Unavailable,
}

impl SharedConfig {
    pub fn enabled(&self) -> bool {
        self.shared_store.is_some()
    }

    /// The bound on one store operation (`shared-op-timeout-ms`, at least 1 ms).
    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.shared_op_timeout_ms.max(1))
    }

    /// The object store client and layout for `shared_store`.
    pub fn connect(&self) -> anyhow::Result<(Arc<dyn ObjectStore>, Layout, String)> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::{ClientConfigKey, RetryConfig};
        let url = self
            .shared_store
            .as_deref()
            .context("no shared store configured")?;
        let parsed = keys::parse_url(url).map_err(anyhow::Error::msg)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&parsed.bucket);
        if let Some(e) = &self.shared_endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &self.shared_region {
            b = b.with_region(r);
        }
        if let Some(k) = &self.shared_access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(f) = &self.shared_secret_access_key_file {
            let secret = std::fs::read_to_string(f).with_context(|| {
                format!("reading shared-secret-access-key-file {}", f.display())
            })?;
            b = b.with_secret_access_key(secret.trim());
        }
        let op_timeout = self.op_timeout();
        // Set key by key: `with_client_options` would replace what from_env read
        // (AWS_ALLOW_HTTP is a client option).
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        b = b
            // Half the bound per attempt, so one retry fits: a Garage node whose peer died
            // holds a request until its next ping (15 s); a retry goes through at once.
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                ms(op_timeout / 2),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                ms(op_timeout.min(CONNECT_TIMEOUT_MAX)),
            );
        if self.shared_allow_http {
            b = b.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
                "true",
            );
        }
        // Our own loops retry (uploads) or fall back to the swarm (misses): the client's
        // default of 10 retries over 3 minutes would hold a miss far past its timeout.
        let retry = RetryConfig {
            max_retries: 1,
            retry_timeout: op_timeout,
            ..RetryConfig::default()
        };
        let os = b
            .with_retry(retry)
            .build()
            .with_context(|| format!("shared store {url}"))?;
        Ok((Arc::new(os), parsed.layout, url.to_owned()))
    }
}

/// Shared by the tier's tasks.
pub(crate) struct Inner {
    pub cfg: SharedConfig,
    pub os: Arc<dyn ObjectStore>,
    pub layout: Layout,
    pub store: Arc<Store>,
    pub stats: SharedStats,
    health: Mutex<Health>,
    /// Names this node in tombstone bodies (host and pid), for the operator reading them.
    pub node: String,
}

#[derive(Default)]
struct Health {
    failing: Option<(Instant, String)>,
    last_probe: Option<Instant>,
}

impl Inner {
    pub fn op_timeout(&self) -> Duration {
        self.cfg.op_timeout()
    }

    pub fn succeeded(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, _)) = h.failing.take() {
            self.stats.degraded.store(0, Relaxed);
            tracing::info!(
                after_s = since.elapsed().as_secs(),
                "shared tier answering again"
            );
        }
    }

    pub fn failed(&self, what: &str, err: &dyn std::fmt::Display) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.failing.is_none() {
            self.stats.degraded.store(1, Relaxed);
            tracing::warn!(
                "shared tier degraded: {what}: {err}; serving local hits and filling misses \
                 from the swarm, uploads wait and are retried"
            );
            h.failing = Some((Instant::now(), format!("{what}: {err}")));
        }
    }

    /// Whether a miss should skip the store now (degraded, and not this second's probe).
    fn skip_for_health(&self) -> bool {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.failing.is_none() {
            return false;
        }
        let now = Instant::now();
        if h.last_probe
            .is_some_and(|t| now - t < DEGRADED_PROBE_INTERVAL)
        {
            return true;
        }
        h.last_probe = Some(now);
        false
    }

    /// `Some(text)` while degraded, for `/readyz` and the status page.
    pub fn degraded_note(&self) -> Option<String> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.failing.as_ref().map(|(since, why)| {
            format!(
                "shared tier degraded for {} s ({why})",
                since.elapsed().as_secs()
            )
        })
    }

    /// Apply another node's tombstone: delete and block `key` here (durable, told to the
    /// listener as `Origin::Shared`, so not uploaded again). `Ok(false)` if it was blocked
    /// already; `Err` (logged) if the store could not write it.
    pub async fn apply_tombstone(self: &Arc<Self>, key: [u8; 20]) -> Result<bool, ()> {
        if self.store.is_blocked(&key) {
            return Ok(false);
        }
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || {
            store.delete_from(&key, None, "shared tombstone", Origin::Shared)
        })
        .await;
        match done {
            Ok(Ok(out)) => {
                self.stats.tombstones_applied.fetch_add(1, Relaxed);
                tracing::info!(
                    info_hash = %hex::encode(key),
                    removed = out.removed.is_some(),
                    "shared tombstone applied: deleted and blocked here"
                );
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::error!(info_hash = %hex::encode(key), "shared tombstone not applied: {e}");
                Err(())
            }
            Err(e) => {
                tracing::error!(info_hash = %hex::encode(key), "shared tombstone not applied: {e}");
                Err(())
            }
        }
    }
}

/// An error with its sources, `: `-separated (object_store's Display stops at the first).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The running shared tier.
pub struct SharedTier {
    inner: Arc<Inner>,
    gets: flume::Sender<([u8; 20], flume::Sender<SharedGet>)>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<Instant>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SharedTier {
    /// Connect, hook the store's listener (so no record stored from now on is missed) and
    /// start the `magnetar-shared` thread: lookups, the uploader (which first walks what the
    /// durable cursor says may be missing) and the tombstone poll.
    pub fn start(
        cfg: SharedConfig,
        store: Arc<Store>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Arc<SharedTier>> {
        if cfg.shared_put_concurrency == 0 || cfg.shared_put_queue_max == 0 {
            anyhow::bail!("shared-put-concurrency and shared-put-queue-max must be at least 1");
        }
        let (os, layout, url) = cfg.connect()?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            cfg,
            os,
            layout,
            store,
            stats: SharedStats::default(),
            health: Mutex::new(Health::default()),
            node: format!("{host}/{}", std::process::id()),
        });
        let queue = uploader::Queue::hook(&inner)?;
        let cursor = cursor::Cursor::new(data_dir, &url);
        let (gets_tx, gets_rx) = flume::unbounded();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let run = inner.clone();
        let thread = crate::tokio_thread::spawn("magnetar-shared", move || async move {
            tokio::spawn(serve_gets(run.clone(), gets_rx));
            tokio::spawn(poll_tombstones(run.clone()));
            uploader::run(run, queue, cursor, stop_rx).await;
        })
        .context("spawning the shared tier thread")?;
        tracing::info!(store = %url, "shared tier on");
        Ok(Arc::new(SharedTier {
            inner,
            gets: gets_tx,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Look `key` up in the shared tier; the receiver yields the answer once. Any runtime
    /// can await it (`recv_async`).
    pub fn get(&self, key: [u8; 20]) -> flume::Receiver<SharedGet> {
        let (tx, rx) = flume::bounded(1);
        // If the tier has stopped, the dropped sender reads as "no answer" to the caller,
        // which goes to the swarm.
        let _ = self.gets.send((key, tx));
        rx
    }

    pub fn degraded_note(&self) -> Option<String> {
        self.inner.degraded_note()
    }

    pub fn write_metrics(&self, out: &mut String) {
        self.inner.stats.write(out);
    }

    /// Stop: the uploader gets until `grace` to empty its queue (what it cannot upload is
    /// found again through the cursor at the next start), then the thread ends.
    pub fn shutdown(&self, grace: Duration) {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Instant::now() + grace);
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Answers lookups, each in a task of its own, at most `GETS_IN_FLIGHT_MAX` at once.
async fn serve_gets(inner: Arc<Inner>, rx: flume::Receiver<([u8; 20], flume::Sender<SharedGet>)>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(GETS_IN_FLIGHT_MAX));
    while let Ok((key, reply)) = rx.recv_async().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let answer = lookup(&inner, key).await;
            let _ = reply.send(answer);
            drop(permit);
        });
    }
}

/// GET `info/<key>` and HEAD `tomb/<key>` at once; verify what comes back.
async fn lookup(inner: &Arc<Inner>, key: [u8; 20]) -> SharedGet {
    let s = &inner.stats;
    if inner.skip_for_health() {
        s.get_skipped_degraded.fetch_add(1, Relaxed);
        return SharedGet::Unavailable;
    }
    let started = Instant::now();
    let info_path = inner.layout.info(&key);
    let tomb_path = inner.layout.tomb(&key);
    let limit = crate::limits::METADATA_BYTES_MAX;
    let get = async {
        let r = inner.os.get(&info_path).await?;
        if r.meta.size > limit as u64 {
            return Ok(Err(r.meta.size));
        }
        r.bytes().await.map(Ok)
    };
    let both = async { tokio::join!(get, inner.os.head(&tomb_path)) };
    let timeout = Duration::from_millis(inner.cfg.shared_get_timeout_ms.max(1));
    let Ok((got, tomb)) = tokio::time::timeout(timeout, both).await else {
        s.get_errors.fetch_add(1, Relaxed);
        inner.failed("lookup", &format_args!("no answer in {timeout:?}"));
        return SharedGet::Unavailable;
    };
    s.get_latency.record(started.elapsed());
    let hex_key = hex::encode(key);
    match tomb {
        Ok(_) => {
            inner.succeeded();
            s.get_tombstoned.fetch_add(1, Relaxed);
            // Refused either way; a failed local write is logged, and the poll retries it.
            let _ = inner.apply_tombstone(key).await;
            return SharedGet::Tombstoned;
        }
        Err(object_store::Error::NotFound { .. }) => {}
        // The object can still be used; the tombstone poll catches up with deletes. Not
        // marked degraded here: a GET that worked says the store answers (a policy that
        // denies HEAD on `tomb/` would otherwise flip the state on every miss).
        Err(e) => {
            tracing::debug!(info_hash = %hex::encode(key), "HEAD tombstone failed: {}", error_chain(&e))
        }
    }
    match got {
        Ok(Ok(bytes)) => {
            inner.succeeded();
            match crate::metainfo::validate_info(&bytes) {
                Ok(sum) if sum.hashes.handshake_keys().any(|k| k == key) => {
                    s.get_hits.fetch_add(1, Relaxed);
                    SharedGet::Found(bytes)
                }
                Ok(_) => {
                    s.get_corrupt.fetch_add(1, Relaxed);
                    tracing::warn!(info_hash = %hex_key, object = %info_path, "shared object does not hash to its key: not served; filling from the swarm");
                    SharedGet::Miss
                }
                Err(e) => {
                    s.get_corrupt.fetch_add(1, Relaxed);
                    tracing::warn!(info_hash = %hex_key, object = %info_path, "shared object is not a valid info dict ({e}): not served; filling from the swarm");
                    SharedGet::Miss
                }
            }
        }
        Ok(Err(size)) => {
            inner.succeeded();
            s.get_corrupt.fetch_add(1, Relaxed);
            tracing::warn!(info_hash = %hex_key, size, limit, "shared object larger than the metadata limit: not fetched");
            SharedGet::Miss
        }
        Err(object_store::Error::NotFound { .. }) => {
            inner.succeeded();
            s.get_misses.fetch_add(1, Relaxed);
            SharedGet::Miss
        }
        Err(e) => {
            s.get_errors.fetch_add(1, Relaxed);
            inner.failed("GET", &e);
            SharedGet::Unavailable
        }
    }
}

/// Lists `tomb-log/` every poll interval from where the last poll left off (less the clock
/// skew allowance) and applies every tombstone not applied yet.
async fn poll_tombstones(inner: Arc<Inner>) {
    use futures_util::StreamExt;
    let every = Duration::from_millis(inner.cfg.shared_tombstone_poll_ms).max(TOMBSTONE_POLL_MIN);
    let dir = inner.layout.tomb_log_dir();
    // Nothing seen yet: the first poll lists them all (a node that was down catches up).
    let mut newest: Option<u64> = None;
    // Tombstones this node has handled, within the window the LIST goes over again.
    let mut handled: std::collections::HashSet<(u64, [u8; 20])> = Default::default();
    loop {
        let mut listing = match newest {
            None => inner.os.list(Some(&dir)),
            Some(t) => {
                let from = inner
                    .layout
                    .tomb_log_after(t.saturating_sub(TOMBSTONE_CLOCK_SKEW_SECS));
                inner.os.list_with_offset(Some(&dir), &from)
            }
        };
        let mut failed = false;
        let mut seen = newest.unwrap_or(0);
        loop {
            let item = tokio::time::timeout(inner.op_timeout(), listing.next()).await;
            let meta = match item {
                Ok(None) => break,
                Ok(Some(Ok(meta))) => meta,
                Ok(Some(Err(e))) => {
                    inner.failed("LIST tombstones", &e);
                    failed = true;
                    break;
                }
                Err(_) => {
                    inner.failed("LIST tombstones", &"timed out");
                    failed = true;
                    break;
                }
            };
            let Some((at, key)) = inner.layout.parse_tomb_log(&meta.location) else {
                continue;
            };
            seen = seen.max(at);
            if !handled.insert((at, key)) {
                continue;
            }
            let Ok(applied) = inner.apply_tombstone(key).await else {
                // Not written here (logged): the next poll tries again.
                handled.remove(&(at, key));
                continue;
            };
            // The deleting node removed the object, but an upload racing the delete (this
            // node's, or another's still unaware of it) may have put it back. Delete it
            // once more for a recent tombstone; misses check `tomb/` anyway, so this only
            // keeps the bucket clean.
            if applied || at + TOMBSTONE_CLOCK_SKEW_SECS >= uploader::unix_now() {
                if let Err(e) = uploader::delete(&inner, &inner.layout.info(&key)).await {
                    tracing::debug!("tidying a deleted object: {e}");
                }
            }
        }
        if failed {
            inner.stats.list_errors.fetch_add(1, Relaxed);
        } else {
            inner.succeeded();
            newest = Some(seen);
            // Older ones are not listed again (the next LIST starts at `seen` − skew).
            handled.retain(|(at, _)| at + TOMBSTONE_CLOCK_SKEW_SECS >= seen);
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests;
