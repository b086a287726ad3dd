//! The admin HTTP plane: one thread of its own with a small tokio current-thread runtime
//! and axum, so operators' requests never run on (or wait behind) the serving cores.
//!
//! - `GET /metrics` (Prometheus text, `metrics`), `GET /healthz`, `GET /readyz`
//! - `GET /` a status page (`page`); `GET /lookup?q=<magnet or hash>` redirects to the .torrent
//! - `GET /torrents/{hash}.torrent`, `GET /torrents/{hash}` (JSON), `GET /magnet/{hash}`
//! - `POST /torrents` (a .torrent), `DELETE /torrents/{hash}`, `POST /fetch` (a magnet):
//!   these need `Authorization: Bearer <token>`; without a configured token they are off.
//!
//! `{hash}` is 40 hex or 32 base32 (v1) or 64 hex (v2). Store writes (append with fsync,
//! delete) run on tokio's blocking pool, so a slow disk does not stall health checks.

pub mod metrics;
mod page;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::AdminConfig;
use crate::magnet::{Magnet, PeerAddr};
use crate::metainfo::{self, InfoHashes};
use crate::server::stats::CoreStats;
use crate::store::{AppendOptions, AppendOutcome, RecordRef, RecoveryReport, Store, StoreError};
use metrics::MetricsHook;

/// What `POST /fetch` calls: start (or join) an upstream fetch for the magnet, resolving
/// to the stored record or an error message. Set with `Admin::set_fetch_hook`.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<RecordRef, String>> + Send>>;
pub type FetchHook = Arc<dyn Fn(Magnet) -> FetchFuture + Send + Sync>;

/// Largest request body: the largest info dict plus room for the rest of a .torrent.
const BODY_BYTES_MAX: usize = crate::limits::METADATA_BYTES_MAX + 1024 * 1024;

/// How long `POST /fetch?wait=true` waits for the fetch before answering 202.
const FETCH_WAIT_MAX: Duration = Duration::from_secs(120);

/// Shared by every request handler.
pub struct AdminState {
    store: Arc<Store>,
    cfg: AdminConfig,
    started: Instant,
    recovery: RecoveryReport,
    /// The serving cores' counters, once the server is up.
    cores: OnceLock<Vec<Arc<CoreStats>>>,
    ready: AtomicBool,
    stopping: AtomicBool,
    hooks: Mutex<Vec<MetricsHook>>,
    fetch: OnceLock<FetchHook>,
    /// Each may add a line to `/readyz` (a degraded dependency that does not stop serving).
    readiness_notes: Mutex<Vec<ReadinessNote>>,
    counters: AdminCounters,
}

/// `Some(text)` when a dependency is degraded but serving goes on (the shared tier).
pub type ReadinessNote = Arc<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Default)]
struct AdminCounters {
    uploads_stored: AtomicU64,
    uploads_present: AtomicU64,
    uploads_rejected: AtomicU64,
    deletes: AtomicU64,
    auth_refused: AtomicU64,
    torrents_served: AtomicU64,
}

/// The running admin plane.
pub struct Admin {
    pub local_addr: SocketAddr,
    pub state: Arc<AdminState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// Bind `cfg.listen` (errors come back here, before the thread starts) and serve on a
    /// thread named `magnetar-admin`.
    pub fn start(
        cfg: AdminConfig,
        store: Arc<Store>,
        recovery: RecoveryReport,
    ) -> anyhow::Result<Admin> {
        let listener = std::net::TcpListener::bind(cfg.listen)
            .with_context(|| format!("admin: cannot listen on {}", cfg.listen))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(AdminState {
            store,
            cfg,
            started: Instant::now(),
            recovery,
            cores: OnceLock::new(),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            hooks: Mutex::new(Vec::new()),
            fetch: OnceLock::new(),
            readiness_notes: Mutex::new(Vec::new()),
            counters: AdminCounters::default(),
        });
        let app = router(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = crate::tokio_thread::spawn("magnetar-admin", move || async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("admin: listener: {e}");
                    return;
                }
            };
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = served.await {
                tracing::error!("admin: server failed: {e}");
            }
        })
        .context("spawning the admin thread")?;
        tracing::info!(addr = %local_addr, "admin plane listening");
        Ok(Admin {
            local_addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stop answering (in-flight requests finish; an upload being stored completes first),
    /// waiting at most `limit`.
    pub fn shutdown(mut self, limit: Duration) {
        self.state.stopping.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let give_up = Instant::now() + limit;
            while !t.is_finished() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("admin plane did not stop within {limit:?}; leaving it");
            }
        }
    }
}

impl AdminState {
    /// The serving cores' counters (call once the server has started).
    pub fn set_cores(&self, cores: Vec<Arc<CoreStats>>) {
        let _ = self.cores.set(cores);
    }

    /// `/readyz` adds what `note` says (and stays 200).
    pub fn add_readiness_note(&self, note: ReadinessNote) {
        self.readiness_notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(note);
    }

    /// What the readiness notes say now (empty when nothing is degraded).
    fn readiness_notes(&self) -> Vec<String> {
        let notes = self
            .readiness_notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        notes.iter().filter_map(|n| n()).collect()
    }

    /// `/readyz` answers 200 from now on (until `set_stopping`).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/readyz` answers 503 from now on: load balancers stop sending new work.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }

    /// Add lines to every `/metrics` scrape (e.g. the miss path's counters).
    pub fn add_metrics_hook(&self, hook: MetricsHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Make `POST /fetch` start upstream fetches (it answers 501 until this is set).
    pub fn set_fetch_hook(&self, hook: FetchHook) {
        let _ = self.fetch.set(hook);
    }

    fn cores(&self) -> &[Arc<CoreStats>] {
        self.cores.get().map_or(&[], |c| &c[..])
    }

    fn public_peer(&self) -> Option<PeerAddr> {
        self.cfg.public_addr.as_ref().and_then(|a| a.parse().ok())
    }

    fn magnet_for(&self, record: &RecordRef, name: Option<String>) -> Magnet {
        let hashes = record.hashes();
        Magnet {
            btih: hashes.v1,
            btmh: hashes.v2,
            display_name: name,
            trackers: self.cfg.trackers.clone(),
            peers: self.public_peer().into_iter().collect(),
            exact_sources: self
                .cfg
                .public_http_url
                .as_deref()
                .and_then(|base| {
                    crate::magnet::exact_source_url(base, hashes.v1.as_ref(), hashes.v2.as_ref())
                })
                .into_iter()
                .collect(),
            warnings: Vec::new(),
        }
    }

    fn metrics_text(&self) -> String {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let admin = [
            (
                "magnetar_admin_uploads_stored_total",
                "Torrents uploaded through the admin plane and stored.",
                get(&c.uploads_stored),
            ),
            (
                "magnetar_admin_uploads_already_present_total",
                "Uploads whose info dict was already stored.",
                get(&c.uploads_present),
            ),
            (
                "magnetar_admin_uploads_rejected_total",
                "Uploads refused (not a valid .torrent, blocked, too large).",
                get(&c.uploads_rejected),
            ),
            (
                "magnetar_admin_deletes_total",
                "DELETE /torrents requests carried out.",
                get(&c.deletes),
            ),
            (
                "magnetar_admin_auth_refused_total",
                "Mutating admin requests refused for a missing or wrong token.",
                get(&c.auth_refused),
            ),
            (
                "magnetar_admin_torrents_served_total",
                ".torrent files served by the admin plane.",
                get(&c.torrents_served),
            ),
        ];
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        metrics::render(&metrics::Scrape {
            cores: self.cores(),
            store: self.store.stats(),
            blocklist_entries: self.store.blocklist_len(),
            recovery: &self.recovery,
            uptime_s: self.started.elapsed().as_secs_f64(),
            ready: self.is_ready(),
            admin: &admin,
            hooks: &hooks,
        })
    }
}

fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(page::status_page))
        .route("/lookup", get(lookup))
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/torrents", post(post_torrent))
        .route("/torrents/{name}", get(get_torrent).delete(delete_torrent))
        .route("/magnet/{hash}", get(get_magnet))
        .route("/fetch", post(post_fetch))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

type St = State<Arc<AdminState>>;

/// An error answer: status + a one-line text body.
fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut body = msg.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// An info-hash from a URL: 40 hex / 32 base32 (v1) or 64 hex (v2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashQuery {
    /// The 20-byte handshake key (v1, or the v2 prefix).
    pub key: [u8; 20],
    /// The full v2 hash when one was given.
    pub v2: Option<[u8; 32]>,
}

pub fn parse_hash(s: &str) -> Option<HashQuery> {
    match s.len() {
        40 => Some(HashQuery {
            key: hex::decode(s).ok()?.try_into().ok()?,
            v2: None,
        }),
        32 => Some(HashQuery {
            key: data_encoding::BASE32
                .decode(s.to_ascii_uppercase().as_bytes())
                .ok()?
                .try_into()
                .ok()?,
            v2: None,
        }),
        64 => {
            let v2: [u8; 32] = hex::decode(s).ok()?.try_into().ok()?;
            Some(HashQuery {
                key: metainfo::v2_handshake_key(&v2),
                v2: Some(v2),
            })
        }
        _ => None,
    }
}

fn bad_hash(s: &str) -> Response {
    text(
        StatusCode::BAD_REQUEST,
        format!("'{s}' is not an info-hash (40 hex or 32 base32 for v1, 64 hex for v2)"),
    )
}

fn find(store: &Store, q: &HashQuery) -> Option<RecordRef> {
    match &q.v2 {
        Some(v2) => store.lookup_v2(v2),
        None => store.lookup(&q.key),
    }
}

/// Refuses the request unless it carries the configured bearer token.
#[allow(clippy::result_large_err)] // the error is the response, built once per refusal
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &state.cfg.token else {
        return Err(text(
            StatusCode::FORBIDDEN,
            "mutating admin endpoints are disabled: no admin token is configured \
             (admin-token-file)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => {
            state.counters.auth_refused.fetch_add(1, Ordering::Relaxed);
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs `Authorization: Bearer <admin token>`",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"magnetar\""),
            );
            Err(r)
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn get_metrics(State(state): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics_text(),
    )
        .into_response()
}

async fn healthz(State(state): St) -> Response {
    text(
        StatusCode::OK,
        format!("ok uptime_s={}", state.started.elapsed().as_secs()),
    )
}

async fn readyz(State(state): St) -> Response {
    if state.stopping.load(Ordering::Relaxed) {
        text(StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if state.ready.load(Ordering::Relaxed) {
        let mut body = String::from("ready");
        for note in state.readiness_notes() {
            body.push_str("; ");
            body.push_str(&note);
        }
        text(StatusCode::OK, body)
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

fn hashes_json(h: &InfoHashes) -> (serde_json::Value, serde_json::Value) {
    (
        h.v1.map_or(serde_json::Value::Null, |v| hex::encode(v).into()),
        h.v2.map_or(serde_json::Value::Null, |v| hex::encode(v).into()),
    )
}

fn torrent_json(state: &AdminState, record: &RecordRef) -> serde_json::Value {
    let summary = metainfo::validate_info(record.info());
    let hashes = record.hashes();
    let times_served: u64 = hashes
        .handshake_keys()
        .map(|k| state.cores().iter().map(|c| c.served.get(&k)).sum::<u64>())
        .sum();
    let (v1, v2) = hashes_json(&hashes);
    let (name, total, files, piece_length, private) = match &summary {
        Ok(s) => (
            Some(s.name.clone()),
            s.total_size,
            s.files,
            s.piece_length,
            s.private,
        ),
        Err(_) => (None, 0, 0, 0, record.is_private()),
    };
    let magnet = state.magnet_for(record, name.clone()).to_uri();
    serde_json::json!({
        "name": name,
        "v1": v1,
        "v2": v2,
        "total_size": total,
        "files": files,
        "piece_length": piece_length,
        "private": private,
        "metadata_size": record.len(),
        "stored_at": record.stored_at(),
        // Connections that were handed this record, summed over cores and over its keys.
        "times_served": times_served,
        "magnet": magnet,
    })
}

async fn get_torrent(State(state): St, Path(name): Path<String>) -> Response {
    let (hash, as_file) = match name.strip_suffix(".torrent") {
        Some(h) => (h, true),
        None => (name.as_str(), false),
    };
    let Some(q) = parse_hash(hash) else {
        return bad_hash(hash);
    };
    let Some(record) = find(&state.store, &q) else {
        return text(StatusCode::NOT_FOUND, format!("{hash} is not stored"));
    };
    if !as_file {
        return Json(torrent_json(&state, &record)).into_response();
    }
    state
        .counters
        .torrents_served
        .fetch_add(1, Ordering::Relaxed);
    let body = metainfo::build_torrent(record.info(), &state.cfg.trackers);
    let file_name = metainfo::validate_info(record.info())
        .map(|s| s.name)
        .unwrap_or_default();
    let file_name: String = file_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || " ._-()[]".contains(*c))
        .take(120)
        .collect();
    let file_name = if file_name.trim().is_empty() {
        format!("{}.torrent", hex::encode(q.key))
    } else {
        format!("{}.torrent", file_name.trim())
    };
    let disposition = format!("attachment; filename=\"{file_name}\"");
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-bittorrent"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or(HeaderValue::from_static("attachment")),
            ),
        ],
        body,
    )
        .into_response()
}

async fn get_magnet(State(state): St, Path(hash): Path<String>) -> Response {
    let Some(q) = parse_hash(&hash) else {
        return bad_hash(&hash);
    };
    let Some(record) = find(&state.store, &q) else {
        return text(StatusCode::NOT_FOUND, format!("{hash} is not stored"));
    };
    let name = metainfo::validate_info(record.info()).ok().map(|s| s.name);
    text(StatusCode::OK, state.magnet_for(&record, name).to_uri())
}

async fn post_torrent(State(state): St, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let reject = |status, msg: String| {
        state
            .counters
            .uploads_rejected
            .fetch_add(1, Ordering::Relaxed);
        text(status, msg)
    };
    let span = match metainfo::info_span(&body) {
        Ok(s) => s,
        Err(e) => {
            return reject(
                StatusCode::BAD_REQUEST,
                format!("not a valid .torrent: {e}"),
            )
        }
    };
    let store = state.store.clone();
    let stored =
        tokio::task::spawn_blocking(move || store.append(&body[span], AppendOptions::default()))
            .await;
    let outcome = match stored {
        Ok(Ok(o)) => o,
        Ok(Err(StoreError::Invalid(e))) => {
            return reject(StatusCode::BAD_REQUEST, format!("invalid info dict: {e}"))
        }
        Ok(Err(e @ StoreError::TooLarge { .. })) => {
            return reject(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Ok(Err(e @ StoreError::Blocked(_))) => return reject(StatusCode::FORBIDDEN, e.to_string()),
        Ok(Err(e)) => {
            tracing::error!("admin upload: storing failed: {e}");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing failed: {e}"),
            );
        }
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing failed: {e}"),
            )
        }
    };
    // Under SyncPolicy::Always (the server's) `append` returned after fdatasync: the record
    // is durable before this 2xx leaves.
    let (status, label) = match &outcome {
        AppendOutcome::Stored(_) => {
            state
                .counters
                .uploads_stored
                .fetch_add(1, Ordering::Relaxed);
            (StatusCode::CREATED, "stored")
        }
        AppendOutcome::AlreadyPresent(_) => {
            state
                .counters
                .uploads_present
                .fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, "already_present")
        }
    };
    let mut json = torrent_json(&state, outcome.record());
    json["status"] = label.into();
    if state.cfg.public_addr.is_none() {
        json["note"] =
            "no public-addr is configured, so the magnet has no x.pe pointing at this server"
                .into();
    }
    (status, Json(json)).into_response()
}

async fn delete_torrent(
    State(state): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let hash = name.strip_suffix(".torrent").unwrap_or(&name).to_owned();
    let Some(q) = parse_hash(&hash) else {
        return bad_hash(&hash);
    };
    let store = state.store.clone();
    let done =
        tokio::task::spawn_blocking(move || store.delete(&q.key, q.v2.as_ref(), "admin DELETE"))
            .await;
    match done {
        Ok(Ok(out)) => {
            state.counters.deletes.fetch_add(1, Ordering::Relaxed);
            let (v1, v2) = out
                .removed
                .as_ref()
                .map(hashes_json)
                .unwrap_or((serde_json::Value::Null, serde_json::Value::Null));
            Json(serde_json::json!({
                "removed": out.removed.is_some(),
                "v1": v1,
                "v2": v2,
                "blocked": out.blocked,
            }))
            .into_response()
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("delete failed: {e}"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("delete failed: {e}"),
        ),
    }
}

#[derive(Deserialize)]
struct FetchParams {
    /// Wait for the fetch to finish (up to FETCH_WAIT_MAX) and answer with the record.
    #[serde(default)]
    wait: bool,
}

async fn post_fetch(
    State(state): St,
    headers: HeaderMap,
    Query(params): Query<FetchParams>,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let text_body = String::from_utf8_lossy(&body);
    let magnet = match Magnet::parse(text_body.trim()) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a magnet link: {e}")),
    };
    let key = magnet.handshake_key();
    if magnet
        .btmh
        .map(|v2| metainfo::v2_handshake_key(&v2))
        .into_iter()
        .chain(magnet.btih)
        .any(|k| state.store.is_blocked(&k))
    {
        return text(StatusCode::FORBIDDEN, "this info-hash is on the blocklist");
    }
    if let Some(record) = state.store.lookup(&key) {
        let mut json = torrent_json(&state, &record);
        json["status"] = "already_present".into();
        return Json(json).into_response();
    }
    let Some(hook) = state.fetch.get().cloned() else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "upstream fetching is not available in this build yet (the miss path is not wired \
             to the admin plane); upload the .torrent with POST /torrents instead",
        );
    };
    let fetch = tokio::spawn(hook(magnet));
    if !params.wait {
        return (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "started", "key": hex::encode(key)})),
        )
            .into_response();
    }
    match tokio::time::timeout(FETCH_WAIT_MAX, fetch).await {
        Ok(Ok(Ok(record))) => {
            let mut json = torrent_json(&state, &record);
            json["status"] = "fetched".into();
            Json(json).into_response()
        }
        Ok(Ok(Err(msg))) => text(StatusCode::BAD_GATEWAY, format!("fetch failed: {msg}")),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("fetch failed: {e}"),
        ),
        Err(_) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "still_running", "key": hex::encode(key)})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct LookupParams {
    #[serde(default)]
    q: String,
}

/// The status page's form: a magnet or an info-hash, redirected to the stored .torrent.
async fn lookup(State(state): St, Query(p): Query<LookupParams>) -> Response {
    let q = p.q.trim();
    let query = if q.to_ascii_lowercase().starts_with("magnet:") {
        match Magnet::parse(q) {
            Ok(m) => Some(HashQuery {
                key: m.handshake_key(),
                v2: if m.btih.is_none() { m.btmh } else { None },
            }),
            Err(e) => {
                return page::message_page(
                    StatusCode::BAD_REQUEST,
                    &format!("Not a magnet link: {e}"),
                )
            }
        }
    } else {
        parse_hash(q)
    };
    let Some(query) = query else {
        return page::message_page(
            StatusCode::BAD_REQUEST,
            "Paste a magnet link or an info-hash (40 hex, 32 base32 or 64 hex).",
        );
    };
    match find(&state.store, &query) {
        Some(record) => {
            let hashes = record.hashes();
            let hex = hashes
                .v1
                .map(hex::encode)
                .or(hashes.v2.map(hex::encode))
                .unwrap_or_default();
            Redirect::to(&format!("/torrents/{hex}.torrent")).into_response()
        }
        None => page::message_page(
            StatusCode::NOT_FOUND,
            &format!("{} is not stored here.", hex::encode(query.key)),
        ),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
