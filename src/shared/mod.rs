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
pub mod tombstone;
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

    /// File holding the fleet key: the secret every node of the fleet is given to sign and
    /// check tombstones (the deletes and blocks that reach every node). It never goes into
    /// the bucket, so write access to the bucket alone cannot delete from the fleet.
    /// MAGNETAR_SHARED_FLEET_KEY (the key itself) is read when no file is set. Without a
    /// key this node neither publishes tombstones nor applies any.
    #[arg(long, value_name = "FILE")]
    pub shared_fleet_key_file: Option<PathBuf>,

    /// A pending miss asks the shared tier again after 0.5 s, then at doubling intervals
    /// up to this one, until the swarm fills it: an upload to any node of the fleet is
    /// served by every node within about this long. 0: ask once.
    #[arg(long, default_value_t = 4_000, value_name = "MS")]
    pub shared_recheck_max_ms: u64,
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

/// The environment variable holding the fleet key when no key file is configured.
pub const FLEET_KEY_ENV: &str = "MAGNETAR_SHARED_FLEET_KEY";

/// First re-check of the tier by a pending miss: an upload elsewhere usually lands within
/// a second of our first look.
const RECHECK_FIRST: Duration = Duration::from_millis(500);

/// Tombstone bodies fetched at once while checking a listing.
const TOMBSTONE_GETS_IN_FLIGHT: usize = 16;

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

    /// The fleet key: from `shared-fleet-key-file`, else MAGNETAR_SHARED_FLEET_KEY, else none.
    pub fn fleet_key(&self) -> anyhow::Result<Option<tombstone::FleetKey>> {
        let text = match &self.shared_fleet_key_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading shared-fleet-key-file {}", f.display()))?,
            None => match std::env::var(FLEET_KEY_ENV) {
                Ok(text) => text,
                Err(_) => return Ok(None),
            },
        };
        tombstone::FleetKey::from_text(&text)
            .map(Some)
            .map_err(anyhow::Error::msg)
    }

    /// When a pending miss asks the tier again (`attempt` from 0), or `None` if it does not.
    pub fn recheck_after(&self, attempt: u32) -> Option<Duration> {
        if self.shared_recheck_max_ms == 0 {
            return None;
        }
        let max = Duration::from_millis(self.shared_recheck_max_ms);
        Some((RECHECK_FIRST * 2u32.saturating_pow(attempt.min(16))).min(max))
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
    /// Signs the tombstones we publish and checks those we read; none: neither.
    pub fleet: Option<tombstone::FleetKey>,
    /// Largest info dict read from the bucket (`metadata-bytes-max`): an object's reported
    /// size is checked first and the bytes that actually stream in again.
    pub metadata_bytes_max: usize,
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

    /// Apply other nodes' tombstones: delete and block each key here (durable, told to the
    /// listener as `Origin::Shared`, so not uploaded again), with one write of the
    /// blocklist for the lot. The keys newly blocked; `Err` (logged) if the store could not
    /// write them.
    pub async fn apply_tombstones(
        self: &Arc<Self>,
        keys: Vec<[u8; 20]>,
    ) -> Result<Vec<[u8; 20]>, ()> {
        let mut keys: Vec<[u8; 20]> = keys
            .into_iter()
            .filter(|k| !self.store.is_blocked(k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(keys);
        }
        let store = self.store.clone();
        let batch = keys.clone();
        let done = tokio::task::spawn_blocking(move || {
            store.delete_batch_from(&batch, "shared tombstone", Origin::Shared)
        })
        .await;
        let err = match done {
            Ok(Ok(())) => {
                self.stats
                    .tombstones_applied
                    .fetch_add(keys.len() as u64, Relaxed);
                for key in &keys {
                    tracing::info!(
                        info_hash = %hex::encode(key),
                        "shared tombstone applied: deleted and blocked here"
                    );
                }
                return Ok(keys);
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(count = keys.len(), "shared tombstones not applied: {err}");
        Err(())
    }

    /// Whether the tombstone object `body`, named for `key` (and `at` for a `tomb-log/`
    /// name), is one the fleet wrote; a rejected one is counted and logged.
    fn trusted_tombstone(&self, body: &[u8], key: &[u8; 20], at: Option<u64>) -> Option<u64> {
        match tombstone::verify(self.fleet.as_ref(), body, key, at) {
            Ok(at) => Some(at),
            Err(why) => {
                self.untrusted_tombstone(key, why.as_str());
                None
            }
        }
    }

    fn untrusted_tombstone(&self, key: &[u8; 20], why: &str) {
        self.stats.tombstones_unauthenticated.fetch_add(1, Relaxed);
        tracing::warn!(
            info_hash = %hex::encode(key),
            "shared tombstone ignored: {why} (a delete is applied only when signed with the \
             fleet key)"
        );
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
        metadata_bytes_max: usize,
    ) -> anyhow::Result<Arc<SharedTier>> {
        if cfg.shared_put_concurrency == 0 || cfg.shared_put_queue_max == 0 {
            anyhow::bail!("shared-put-concurrency and shared-put-queue-max must be at least 1");
        }
        let fleet = cfg.fleet_key()?;
        if fleet.is_none() {
            tracing::warn!(
                "shared tier without a fleet key (shared-fleet-key-file or {FLEET_KEY_ENV}): \
                 deletes and blocks made here are not published to the fleet, and tombstones \
                 found in the bucket are not applied"
            );
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
            fleet,
            metadata_bytes_max: metadata_bytes_max.min(crate::limits::METADATA_BYTES_MAX),
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

    /// When a pending miss asks again (`shared-recheck-max-ms`).
    pub fn recheck_after(&self, attempt: u32) -> Option<Duration> {
        self.inner.cfg.recheck_after(attempt)
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

/// GET `info/<key>` and `tomb/<key>` at once; verify what comes back.
async fn lookup(inner: &Arc<Inner>, key: [u8; 20]) -> SharedGet {
    let s = &inner.stats;
    if inner.skip_for_health() {
        s.get_skipped_degraded.fetch_add(1, Relaxed);
        return SharedGet::Unavailable;
    }
    let started = Instant::now();
    let info_path = inner.layout.info(&key);
    let tomb_path = inner.layout.tomb(&key);
    let limit = inner.metadata_bytes_max;
    let both = async {
        tokio::join!(
            get_bounded(&*inner.os, &info_path, limit),
            get_bounded(&*inner.os, &tomb_path, tombstone::TOMBSTONE_BYTES_MAX)
        )
    };
    let timeout = Duration::from_millis(inner.cfg.shared_get_timeout_ms.max(1));
    let Ok((got, tomb)) = tokio::time::timeout(timeout, both).await else {
        s.get_errors.fetch_add(1, Relaxed);
        inner.failed("lookup", &format_args!("no answer in {timeout:?}"));
        return SharedGet::Unavailable;
    };
    s.get_latency.record(started.elapsed());
    let hex_key = hex::encode(key);
    match tomb {
        Ok(Bounded::Body(body)) => {
            inner.succeeded();
            if inner.trusted_tombstone(&body, &key, None).is_some() {
                s.get_tombstoned.fetch_add(1, Relaxed);
                // Refused either way; a failed local write is logged, and the poll retries it.
                let _ = inner.apply_tombstones(vec![key]).await;
                return SharedGet::Tombstoned;
            }
        }
        Ok(Bounded::TooLarge(size)) => {
            inner.succeeded();
            inner.untrusted_tombstone(&key, &format!("{size} bytes, not a tombstone we write"));
        }
        Err(object_store::Error::NotFound { .. }) => {}
        // The object can still be used; the tombstone poll catches up with deletes. Not
        // marked degraded here: a GET of the object that worked says the store answers (a
        // policy that denies reading `tomb/` would otherwise flip the state on every miss).
        Err(e) => {
            tracing::debug!(info_hash = %hex_key, "GET tombstone failed: {}", error_chain(&e))
        }
    }
    match got {
        Ok(Bounded::Body(bytes)) => {
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
        Ok(Bounded::TooLarge(size)) => {
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

/// An object read with a bound on its size.
pub(crate) enum Bounded {
    Body(bytes::Bytes),
    /// Larger than the bound (the size reported, or the bytes that came before it was
    /// passed): not read further.
    TooLarge(u64),
}

/// GET `path`, reading at most `limit` bytes: the reported size is checked first, and the
/// bytes that stream in again (a store, or whoever answers for it, can send more than it
/// reported).
pub(crate) async fn get_bounded(
    os: &dyn ObjectStore,
    path: &object_store::path::Path,
    limit: usize,
) -> object_store::Result<Bounded> {
    use futures_util::StreamExt;
    let r = os.get(path).await?;
    if r.meta.size > limit as u64 {
        return Ok(Bounded::TooLarge(r.meta.size));
    }
    let mut body = bytes::BytesMut::with_capacity(r.meta.size as usize);
    let mut stream = r.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(Bounded::TooLarge((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bounded::Body(body.freeze()))
}

/// Lists `tomb-log/` every poll interval from where the last poll left off (less the clock
/// skew allowance), checks each new tombstone's signature and applies the trusted ones in
/// one batch.
async fn poll_tombstones(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.cfg.shared_tombstone_poll_ms).max(TOMBSTONE_POLL_MIN);
    // Nothing seen yet: the first poll lists them all (a node that was down catches up).
    let mut newest: Option<u64> = None;
    // Tombstones this node has handled (applied or rejected), within the window the LIST
    // goes over again.
    let mut handled: std::collections::HashSet<(u64, [u8; 20])> = Default::default();
    loop {
        match poll_tombstones_once(&inner, newest, &mut handled).await {
            Ok(seen) => {
                inner.succeeded();
                newest = Some(seen);
                // Older ones are not listed again (the next LIST starts at `seen` − skew).
                handled.retain(|(at, _)| at + TOMBSTONE_CLOCK_SKEW_SECS >= seen);
            }
            Err(()) => {
                inner.stats.list_errors.fetch_add(1, Relaxed);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// One poll: the newest time the next one can list from. Only a trusted tombstone moves
/// it, and never past now + skew, so an object named far in the future (or a node whose
/// clock runs ahead) cannot make the fleet skip real tombstones.
async fn poll_tombstones_once(
    inner: &Arc<Inner>,
    newest: Option<u64>,
    handled: &mut std::collections::HashSet<(u64, [u8; 20])>,
) -> Result<u64, ()> {
    use futures_util::StreamExt;
    let dir = inner.layout.tomb_log_dir();
    let mut listing = match newest {
        None => inner.os.list(Some(&dir)),
        Some(t) => {
            let from = inner
                .layout
                .tomb_log_after(t.saturating_sub(TOMBSTONE_CLOCK_SKEW_SECS));
            inner.os.list_with_offset(Some(&dir), &from)
        }
    };
    let horizon = uploader::unix_now() + TOMBSTONE_CLOCK_SKEW_SECS;
    let mut names = Vec::new();
    let mut future = 0u64;
    loop {
        let meta = match tokio::time::timeout(inner.op_timeout(), listing.next()).await {
            Ok(None) => break,
            Ok(Some(Ok(meta))) => meta,
            Ok(Some(Err(e))) => {
                inner.failed("LIST tombstones", &e);
                return Err(());
            }
            Err(_) => {
                inner.failed("LIST tombstones", &"timed out");
                return Err(());
            }
        };
        let Some((at, key)) = inner.layout.parse_tomb_log(&meta.location) else {
            continue;
        };
        if at > horizon {
            // Not yet: listed again each poll until its time is within the skew allowance.
            future += 1;
            continue;
        }
        if !handled.contains(&(at, key)) {
            names.push((at, key, meta.location));
        }
    }
    inner.stats.tombstones_future.store(future, Relaxed);
    drop(listing);
    // Read and check the new ones, a few at a time.
    let checks = futures_util::stream::iter(names)
        .map(|(at, key, path)| async move {
            let got = tokio::time::timeout(
                inner.op_timeout(),
                get_bounded(&*inner.os, &path, tombstone::TOMBSTONE_BYTES_MAX),
            )
            .await;
            (at, key, got)
        })
        .buffer_unordered(TOMBSTONE_GETS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut seen = newest.unwrap_or(0);
    let mut trusted = Vec::new();
    let mut failed = false;
    for (at, key, got) in checks {
        match got {
            Ok(Ok(Bounded::Body(body))) => {
                if inner.trusted_tombstone(&body, &key, Some(at)).is_some() {
                    seen = seen.max(at);
                    trusted.push((at, key));
                } else {
                    // Rejected for good: not read again while it is in the window.
                    handled.insert((at, key));
                }
            }
            Ok(Ok(Bounded::TooLarge(size))) => {
                inner.untrusted_tombstone(&key, &format!("{size} bytes, not a tombstone we write"));
                handled.insert((at, key));
            }
            // Listed, then gone: nothing to apply.
            Ok(Err(object_store::Error::NotFound { .. })) => {
                handled.insert((at, key));
            }
            Ok(Err(e)) => {
                tracing::debug!(
                    "reading tombstone {}: {}",
                    hex::encode(key),
                    error_chain(&e)
                );
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    let keys: Vec<[u8; 20]> = trusted.iter().map(|&(_, k)| k).collect();
    let applied = inner.apply_tombstones(keys).await;
    if let Ok(applied) = &applied {
        handled.extend(trusted.iter().copied());
        // The deleting node removed the object, but an upload racing the delete (this
        // node's, or another's still unaware of it) may have put it back. Delete it once
        // more for a new or recent tombstone; misses check `tomb/` anyway, so this only
        // keeps the bucket clean.
        let now = uploader::unix_now();
        for (at, key) in &trusted {
            if applied.contains(key) || at + TOMBSTONE_CLOCK_SKEW_SECS >= now {
                if let Err(e) = uploader::delete(inner, &inner.layout.info(key)).await {
                    tracing::debug!("tidying a deleted object: {e}");
                }
            }
        }
    }
    // A tombstone not read or not applied is listed and tried again next poll, from the
    // same place.
    if failed || applied.is_err() {
        return Err(());
    }
    Ok(seen)
}

#[cfg(test)]
mod tests;
