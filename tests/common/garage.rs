//! A real Garage cluster (S3-compatible object store, AGPL; run as a separate test server,
//! never linked) on loopback, for the S3 shared tier's tests. No mock S3.
//!
//! `GarageCluster::start(3)` runs three `garage server` processes on 127.0.0.1 with
//! `replication_factor = 3` (writes and reads need 2 of 3 nodes), connects them, applies a
//! one-zone layout, imports an access key and creates the bucket `magnetar` with
//! read/write/owner for it, then waits until every node's S3 API serves a real PUT and GET.
//! Everything (configs, metadata, data, one log per node) lives in a tempdir.
//!
//! The blocking helpers (`put`, `get`, ...) run object_store on a private current-thread
//! runtime: call them from a plain test thread, not from inside a tokio runtime. Each is
//! bounded by `OP_TIMEOUT`. The harness keeps its own objects under `_garage_harness/`.
//!
//! The nodes are spawned from a thread the cluster owns, with `PR_SET_PDEATHSIG = SIGKILL`:
//! they die with the test process even when it is killed (no orphaned servers), and
//! `Drop` kills them otherwise.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

/// The bucket every cluster has.
pub const BUCKET: &str = "magnetar";
/// `[s3_api] s3_region` of every node (Garage checks the region in request signatures).
pub const REGION: &str = "garage";
/// Upper bound of one blocking S3 helper call (`put`, `get`, `delete`, `list`).
pub const OP_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for a cluster (or a restarted node) to serve S3 requests.
pub const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one `garage` CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Written at start-up; a restarted node is up when it serves this object.
const PROBE_KEY: &str = "_garage_harness/probe";
const PROBE_BODY: &[u8] = b"garage harness probe";
/// In the panic message of a start that failed because a node's port was taken.
const PORT_CLASH: &str = "port clash";
/// Whole starts `start` tries when ports clash.
const START_ATTEMPTS: usize = 3;

/// The `garage` binary: `$GARAGE_BIN`, else `garage` on PATH, else `bin/garage` under
/// `$CARGO_HOME`, `~/.cargo` or /root/.cargo (where `scripts/test.sh` installs it). Fails
/// with an actionable message when there is none: these tests never skip silently.
pub fn garage_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "GARAGE_BIN={} is not a file; garage is missing: run `bash scripts/test.sh`, \
             which installs it",
            bin.display()
        );
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("garage"))
        .find(|p| p.is_file());
    // Where `cargo install` puts it, which need not be on PATH.
    let cargo_bins = [
        std::env::var_os("CARGO_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")),
        Some(PathBuf::from("/root/.cargo")),
    ];
    on_path
        .or_else(|| {
            cargo_bins
                .into_iter()
                .flatten()
                .map(|home| home.join("bin/garage"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("garage is missing: run `bash scripts/test.sh`, which installs it")
        })
}

/// An S3 helper call that did not succeed.
#[derive(Debug)]
pub enum S3Error {
    /// Garage (or the connection to it) answered with an error.
    Store(object_store::Error),
    /// No answer within the bound: a hang.
    TimedOut(Duration),
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Error::Store(e) => write!(f, "{e}"),
            S3Error::TimedOut(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

impl std::error::Error for S3Error {}

struct Node {
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// `<hex node id>@127.0.0.1:<rpc port>`, known once the node has started.
    id: String,
    /// In a mutex so that the cluster is `Sync` (a test may share one in a `OnceLock`)
    /// and `&self` waits can check that the node still runs.
    child: Mutex<Option<Child>>,
    /// The helpers' client: 3 s attempts, 3 retries.
    store: Arc<AmazonS3>,
    /// The readiness probes' client: 500 ms attempts, 10 retries, so that a probe stuck
    /// on a dead peer is retried soon.
    probe: Arc<AmazonS3>,
}

/// Spawns the nodes from one long-lived thread: `PR_SET_PDEATHSIG` fires when the thread
/// that forked the child ends, so the nodes live exactly as long as this thread, which
/// ends when the cluster is dropped or the process exits.
struct Spawner {
    tx: Option<mpsc::Sender<(Command, mpsc::Sender<io::Result<Child>>)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Spawner {
    fn new() -> Spawner {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<io::Result<Child>>)>();
        let thread = thread::Builder::new()
            .name("garage-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the garage spawner thread");
        Spawner {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn spawn(&self, mut cmd: Command) -> io::Result<Child> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("spawner alive")
            .send((cmd, reply_tx))
            .expect("garage spawner thread is gone");
        reply_rx.recv().expect("garage spawner thread is gone")
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Garage cluster of real `garage server` processes on loopback.
pub struct GarageCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    access_key: String,
    secret_key: String,
    rpc_secret: String,
    admin_token: String,
    rt: tokio::runtime::Runtime,
    spawner: Spawner,
    /// Set by `fail` when a port was taken: the failed start's tempdir is not kept.
    port_clash: AtomicBool,
    /// The locks on the nodes' ports (see `free_ports`).
    _port_locks: Vec<File>,
    // Last: removed after the nodes are killed (fields drop after `Drop::drop`).
    dir: tempfile::TempDir,
}

/// A test may keep one cluster in a `static OnceLock` (nodes then die with the process).
const _: () = {
    fn shareable<T: Send + Sync>() {}
    let _ = shareable::<GarageCluster>;
};

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("getrandom");
    hex::encode(buf)
}

/// `n` distinct free loopback ports, each one locked for the cluster's lifetime (an
/// `flock` on `$TMPDIR/garage-harness-ports/<port>`, which the kernel drops when the
/// process dies) and checked free by binding it. Random ports below the kernel's ephemeral
/// range (32768-60999 here), not the ones binding port 0 gives: those come from the
/// ephemeral range, where the test's own outgoing connections (S3 clients, every `garage`
/// CLI call) took a picked port before its node bound it. The lock keeps other clusters,
/// in this process or another, off the ports of a node that is down for a restart.
fn free_ports(n: usize) -> (Vec<u16>, Vec<File>) {
    use std::os::fd::AsRawFd;
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FLOOR: u16 = 10_000;
    assert!(
        low > FLOOR + 1000,
        "the ephemeral port range starts at {low}: no room below it for garage's ports"
    );
    let lock_dir = std::env::temp_dir().join("garage-harness-ports");
    fs::create_dir_all(&lock_dir).expect("creating the port lock directory");
    let (mut ports, mut locks) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..10_000 {
        if ports.len() == n {
            break;
        }
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("getrandom");
        let port = FLOOR + u16::from_le_bytes(r) % (low - FLOOR);
        if ports.contains(&port) {
            continue;
        }
        let Ok(lock) = File::create(lock_dir.join(port.to_string())) else {
            continue;
        };
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            locks.push(lock);
        }
    }
    assert_eq!(
        ports.len(),
        n,
        "no {n} free ports between {FLOOR} and {low}"
    );
    (ports, locks)
}

/// The payload of a caught panic, as text.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// The last `lines` lines of a log file, for panic messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a short-lived command with piped output, killed when it outlasts `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Ok(Err(e)) => Err(format!("{cmd:?}: {e}")),
        Err(_) => {
            // The waiting thread has not reaped it yet, so the pid is still this child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(format!("{cmd:?} did not finish within {limit:?}"))
        }
    }
}

/// An S3 client of one node. Short attempts (`attempt`), some retries: a request that
/// Garage routes to a peer that just died waits on a connection Garage still believes
/// open until a later send on it fails; a retried request is such a send (see
/// `GarageCluster::kill`).
fn build_store(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    attempt: Duration,
    max_retries: usize,
) -> Arc<AmazonS3> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(10),
    };
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(BUCKET)
        .with_region(REGION)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret_key)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry)
        // `with_client_options` replaces every client option, `allow_http` included.
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(attempt),
        )
        .build()
        .expect("building the S3 client");
    Arc::new(store)
}

impl GarageCluster {
    /// Writes node `i`'s garage.toml; `bootstrap_peers` are `<hex id>@<addr>` of the others.
    fn write_config(&self, i: usize, bootstrap_peers: &[String]) {
        let node = &self.nodes[i];
        let peers: Vec<String> = bootstrap_peers.iter().map(|p| format!("{p:?}")).collect();
        let config = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = {replication}

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"
bootstrap_peers = [{peers}]

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{admin_token}"
"#,
            meta = node.dir.join("meta").display(),
            data = node.dir.join("data").display(),
            replication = self.nodes.len().min(3),
            rpc_port = node.rpc_port,
            rpc_secret = self.rpc_secret,
            peers = peers.join(", "),
            s3_port = node.s3_port,
            admin_port = node.admin_port,
            admin_token = self.admin_token,
        );
        fs::write(&node.conf, config).expect("writing garage.toml");
    }

    /// Starts `n` nodes (3 for the shared-tier tests) and waits until every one serves
    /// S3 PUT and GET; panics, with the log tail of what did not come up, after
    /// `UP_TIMEOUT`. A start whose ports were taken by someone else before its nodes bound
    /// them is retried from scratch with other ports (up to `START_ATTEMPTS` in all).
    pub fn start(n: usize) -> GarageCluster {
        assert!(n >= 1, "a cluster needs a node");
        for attempt in 1.. {
            match panic::catch_unwind(AssertUnwindSafe(|| Self::start_once(n))) {
                Ok(cluster) => return cluster,
                Err(payload)
                    if attempt < START_ATTEMPTS
                        && panic_text(payload.as_ref()).contains(PORT_CLASH) =>
                {
                    eprintln!("garage cluster start {attempt}: a port was taken; again");
                }
                Err(payload) => panic::resume_unwind(payload),
            }
        }
        unreachable!()
    }

    fn start_once(n: usize) -> GarageCluster {
        let bin = garage_bin();
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("garage-cluster-")
            .tempdir()
            .expect("creating the cluster tempdir");
        let rpc_secret = random_hex(32);
        let admin_token = random_hex(16);
        // Garage key ids are `GK` + 24 hex digits; `key import` takes ours.
        let access_key = format!("GK{}", random_hex(12));
        let secret_key = random_hex(32);
        let (ports, port_locks) = free_ports(3 * n);

        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node_dir = dir.path().join(format!("node{i}"));
            fs::create_dir_all(node_dir.join("meta")).unwrap();
            fs::create_dir_all(node_dir.join("data")).unwrap();
            let (rpc_port, s3_port, admin_port) =
                (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
            let conf = node_dir.join("garage.toml");
            let endpoint = format!("http://127.0.0.1:{s3_port}");
            nodes.push(Node {
                log: node_dir.join("garage.log"),
                dir: node_dir,
                conf,
                rpc_port,
                s3_port,
                admin_port,
                id: String::new(),
                child: Mutex::new(None),
                store: build_store(
                    &endpoint,
                    &access_key,
                    &secret_key,
                    Duration::from_secs(3),
                    3,
                ),
                probe: build_store(
                    &endpoint,
                    &access_key,
                    &secret_key,
                    Duration::from_millis(500),
                    10,
                ),
            });
        }

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the harness runtime");
        let mut cluster = GarageCluster {
            bin,
            nodes,
            access_key,
            secret_key,
            rpc_secret,
            admin_token,
            rt,
            spawner: Spawner::new(),
            port_clash: AtomicBool::new(false),
            _port_locks: port_locks,
            dir,
        };
        let deadline = t0 + UP_TIMEOUT;
        for i in 0..n {
            cluster.write_config(i, &[]);
            cluster.spawn_node(i);
        }
        for i in 0..n {
            let id = cluster.wait_for(i, deadline, "RPC did not come up", || {
                cluster.cli(i, &["status"])?;
                cluster.cli(i, &["node", "id", "-q"])
            });
            cluster.nodes[i].id = id.trim().to_string();
        }
        cluster.connect_mesh(deadline);
        let t_connected = t0.elapsed();
        // For restarts: Garage saves the peers it is connected to only once a minute, so a
        // node restarted soon after `node connect` would know no one. As on a real
        // cluster, every node gets the others as bootstrap peers (read at its next start).
        for i in 0..n {
            let others: Vec<String> = (0..n)
                .filter(|&j| j != i)
                .map(|j| cluster.nodes[j].id.clone())
                .collect();
            cluster.write_config(i, &others);
        }

        let hex_ids: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| node.id.split('@').next().unwrap().to_string())
            .collect();
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(hex_ids.iter().map(String::as_str));
        cluster.wait_for(0, deadline, "layout assign failed", || {
            cluster.cli(0, &assign)
        });
        cluster
            .cli(0, &["layout", "apply", "--version", "1"])
            .unwrap_or_else(|e| cluster.fail(0, &format!("layout apply failed: {e}")));
        let t_applied = t0.elapsed();
        let (key, secret) = (cluster.access_key.clone(), cluster.secret_key.clone());
        let import = ["key", "import", "--yes", "-n", "magnetar", &key, &secret];
        cluster.wait_for(0, deadline, "key import failed", || cluster.cli(0, &import));
        let create = ["bucket", "create", BUCKET];
        cluster.wait_for(0, deadline, "bucket create failed", || {
            cluster.cli(0, &create)
        });
        let allow = [
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &key,
        ];
        cluster.wait_for(0, deadline, "bucket allow failed", || {
            cluster.cli(0, &allow)
        });

        // Every node must serve a real PUT and GET (the layout takes effect on each node
        // on its own schedule).
        for i in 0..n {
            let key = format!("_garage_harness/ready-{i}");
            let body = format!("node {i} is up").into_bytes();
            cluster.wait_for(i, deadline, "S3 API did not serve PUT/GET", || {
                cluster.try_put(i, &key, &body).map_err(|e| e.to_string())?;
                match cluster.try_get(i, &key).map_err(|e| e.to_string())? {
                    Some(got) if got == body => Ok(()),
                    other => Err(format!("GET after PUT returned {other:?}")),
                }
            });
        }
        if let Err(e) = cluster.try_put(0, PROBE_KEY, PROBE_BODY) {
            cluster.fail(0, &format!("PUT of the probe failed: {e}"));
        }
        eprintln!(
            "garage cluster of {n} up in {:.1?} (connected {t_connected:.1?}, layout applied \
             {t_applied:.1?}) in {}",
            t0.elapsed(),
            cluster.dir.path().display()
        );
        cluster
    }

    /// Panics naming node `i` and `what`, with the tail of node `i`'s log; says
    /// `PORT_CLASH` when a node's log shows that one of its ports was taken.
    fn fail(&self, i: usize, what: &str) -> ! {
        let clash = self.nodes.iter().position(|node| {
            fs::read_to_string(&node.log)
                .map(|log| log.contains("Address already in use"))
                .unwrap_or(false)
        });
        if let Some(j) = clash {
            self.port_clash.store(true, Ordering::Relaxed);
            let node = &self.nodes[j];
            panic!(
                "garage node {j}: {PORT_CLASH}: one of its ports (rpc {}, s3 {}, admin {}) \
                 was taken by another process (node {i}: {what})\n--- {} (last lines) ---\n{}",
                node.rpc_port,
                node.s3_port,
                node.admin_port,
                node.log.display(),
                log_tail(&node.log, 40)
            );
        }
        let node = &self.nodes[i];
        panic!(
            "garage node {i} (rpc {}, s3 {}, admin {}): {what}\n--- {} (last lines) ---\n{}",
            node.rpc_port,
            node.s3_port,
            node.admin_port,
            node.log.display(),
            log_tail(&node.log, 40)
        );
    }

    /// Fails at once when a node that should run has exited, or one's port was taken.
    fn check_nodes(&self) {
        for (j, node) in self.nodes.iter().enumerate() {
            let exited = match node.child.lock().unwrap().as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.fail(j, &format!("garage server exited ({status})"));
            }
            let clash = fs::read_to_string(&node.log)
                .map(|log| log.contains("Address already in use"))
                .unwrap_or(false);
            if clash {
                self.fail(j, "its log says `Address already in use`");
            }
        }
    }

    /// `f` until it succeeds, every 200 ms; fails naming node `i` and `what` at
    /// `deadline`, and at once when a node died or lost a port.
    fn wait_for<T>(
        &self,
        i: usize,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut() -> Result<T, String>,
    ) -> T {
        loop {
            match f() {
                Ok(v) => return v,
                Err(e) if Instant::now() >= deadline => {
                    self.fail(i, &format!("{what} within {UP_TIMEOUT:?}: {e}"))
                }
                Err(_) => {
                    self.check_nodes();
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn command(&self, i: usize) -> Command {
        let mut cmd = Command::new(&self.bin);
        for var in [
            "GARAGE_CONFIG_FILE",
            "GARAGE_RPC_HOST",
            "GARAGE_RPC_SECRET",
            "GARAGE_RPC_SECRET_FILE",
            "GARAGE_ADMIN_TOKEN",
            "GARAGE_ADMIN_TOKEN_FILE",
            "GARAGE_METRICS_TOKEN",
            "GARAGE_METRICS_TOKEN_FILE",
            "GARAGE_LOG_TO_SYSLOG",
            "GARAGE_LOG_TO_JOURNALD",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("-c").arg(&self.nodes[i].conf);
        cmd
    }

    /// `garage -c <node i's config> ARGS`: its stdout, or the error with its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        run_bounded(self.command(i).args(args), CLI_TIMEOUT)
    }

    fn spawn_node(&mut self, i: usize) {
        assert!(!self.is_running(i), "garage node {i} is running");
        let node = &self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("opening the node log");
        let mut cmd = self.command(i);
        cmd.arg("server")
            .env("RUST_LOG", "netapp=info,garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = self
            .spawner
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("spawning garage node {i} ({}): {e}", self.bin.display()));
        *self.nodes[i].child.lock().unwrap() = Some(child);
    }

    /// Waits until node `i`'s RPC port accepts connections (its `garage server` is
    /// listening), so that nodes started after it reach it on their first try.
    fn wait_rpc(&self, i: usize, deadline: Instant) {
        let addr = ([127, 0, 0, 1], self.nodes[i].rpc_port).into();
        self.wait_for(i, deadline, "RPC port did not open", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    /// Connects every running node to every other (`node connect`), then waits until each
    /// one reports all the others up. Garage forms the full mesh by itself only in its own
    /// time (node 1 learns of node 2 from node 0, and a failed attempt is retried after
    /// 30 s); until then a write via node 1 reaches its quorum on nodes 0 and 1 and node 2
    /// misses it until the next anti-entropy sync (every 10 min): a missed delete then
    /// shows up in LISTs, which filter each replica's answer before merging them.
    fn connect_mesh(&self, deadline: Instant) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.is_running(j))
            .collect();
        for (a, &i) in running.iter().enumerate() {
            for &j in &running[a + 1..] {
                let peer = self.nodes[j].id.clone();
                let what = format!("node {i} could not connect to it");
                self.wait_for(j, deadline, &what, || {
                    self.cli(i, &["node", "connect", &peer])
                });
            }
        }
        for &i in &running {
            let others: Vec<&str> = running
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| self.nodes[j].id.split('@').next().unwrap())
                .collect();
            self.wait_for(i, deadline, "cluster mesh incomplete", || {
                let out = self.cli(i, &["json-api", "GetClusterStatus"])?;
                let status: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
                let up: Vec<&str> = status["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["isUp"].as_bool() == Some(true))
                    .filter_map(|n| n["id"].as_str())
                    .collect();
                match others.iter().find(|id| !up.contains(id)) {
                    None => Ok(()),
                    Some(id) => Err(format!("{id} is not up in its cluster status: {out}")),
                }
            });
        }
    }

    /// Waits until node `i` serves the start-up probe object over S3 (a real GET, which
    /// needs a read quorum: 2 of 3 nodes up).
    fn wait_s3(&self, i: usize, deadline: Instant) {
        self.wait_for(i, deadline, "S3 API did not serve GET", || {
            match self.get_via(self.nodes[i].probe.clone(), PROBE_KEY) {
                Ok(Some(b)) if b == PROBE_BODY => Ok(()),
                Ok(other) => Err(format!("probe GET returned {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        });
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s S3 API, `http://127.0.0.1:PORT`.
    pub fn s3_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// Node `i`'s admin API, `http://127.0.0.1:PORT` (bearer `admin_token()`).
    pub fn admin_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].admin_port)
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Node `i`'s log file (stdout and stderr of every run of it).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Node `i`'s directory (config, `meta/`, `data/`, log).
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.lock().unwrap().is_some()
    }

    /// SIGKILLs node `i`, reaps it, and, while a quorum of nodes is left, returns once
    /// every surviving node serves reads again.
    ///
    /// Why the wait: Garage (2.5) notices a SIGKILLed peer only when a send on the dead
    /// connection fails. A read goes to the node itself and its lowest-latency peer; when
    /// that peer is the dead one, the read waits until some later send to it (the next
    /// ping, every 15 s; 8.8 s observed) fails with EPIPE. A retried request is such a
    /// send, so the wait is one probe GET per survivor, retried after 500 ms.
    pub fn kill(&mut self, i: usize) {
        self.kill_process(i);
        let running = (0..self.nodes.len())
            .filter(|&j| self.is_running(j))
            .count();
        let quorum = self.nodes.len().min(3) / 2 + 1;
        if running >= quorum {
            let deadline = Instant::now() + UP_TIMEOUT;
            for j in 0..self.nodes.len() {
                if self.is_running(j) {
                    self.wait_s3(j, deadline);
                }
            }
        }
    }

    fn kill_process(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i].child.lock().unwrap().take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts node `i` again (same config, directories and ports) and waits until its S3
    /// API serves a GET again (which needs a read quorum: 2 of 3 nodes up).
    pub fn restart(&mut self, i: usize) {
        let deadline = Instant::now() + UP_TIMEOUT;
        self.kill_process(i);
        self.spawn_node(i);
        self.wait_rpc(i, deadline);
        self.connect_mesh(deadline);
        self.wait_s3(i, deadline);
    }

    /// SIGKILLs every node.
    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_process(i);
        }
    }

    /// Starts every node that is not running, one after the other (each one's RPC port
    /// open before the next starts, so the later ones reach it through their bootstrap
    /// peers at once), connects them all, then waits until each serves a GET again.
    pub fn restart_all(&mut self) {
        let deadline = Instant::now() + UP_TIMEOUT;
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                self.spawn_node(i);
                self.wait_rpc(i, deadline);
            }
        }
        self.connect_mesh(deadline);
        for i in 0..self.nodes.len() {
            self.wait_s3(i, deadline);
        }
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The environment under which a process reaches node `i` through object_store's
    /// `AmazonS3Builder::from_env()` (0.14 reads `AWS_ENDPOINT_URL` and `AWS_ENDPOINT`
    /// alike, `AWS_REGION` and `AWS_DEFAULT_REGION`; path-style requests are its default,
    /// set explicitly here). An inherited `AWS_ENDPOINT_URL_S3` would take precedence over
    /// the endpoint: clear it in the child.
    pub fn env(&self, i: usize) -> Vec<(String, String)> {
        let endpoint = self.s3_endpoint(i);
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// `s3://magnetar/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{}", prefix.trim_start_matches('/'))
    }

    /// The object_store client of node `i` (explicit endpoint and keys, path-style, HTTP,
    /// short timeouts and few retries), for what the helpers do not cover; run its
    /// futures with `block_on`.
    pub fn store(&self, i: usize) -> Arc<AmazonS3> {
        self.nodes[i].store.clone()
    }

    /// Runs `fut` on the harness runtime, bounded by `OP_TIMEOUT`.
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> Result<T, S3Error> {
        self.rt
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, fut).await })
            .map_err(|_| S3Error::TimedOut(OP_TIMEOUT))
    }

    fn run<T>(&self, fut: impl Future<Output = object_store::Result<T>>) -> Result<T, S3Error> {
        self.block_on(fut)?.map_err(S3Error::Store)
    }

    pub fn try_put(&self, i: usize, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        let store = self.store(i);
        let payload = PutPayload::from(bytes.to_vec());
        self.run(async move { store.put(&ObjectPath::from(key), payload).await })
            .map(drop)
    }

    /// `Ok(None)` when the object does not exist.
    pub fn try_get(&self, i: usize, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        self.get_via(self.store(i), key)
    }

    fn get_via(&self, store: Arc<AmazonS3>, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let got = self.run(async move {
            match store.get(&ObjectPath::from(key)).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        Ok(got)
    }

    pub fn try_delete(&self, i: usize, key: &str) -> Result<(), S3Error> {
        let store = self.store(i);
        self.run(async move { store.delete(&ObjectPath::from(key)).await })
    }

    /// Keys under `prefix` (object_store's prefix: whole path segments), sorted.
    pub fn try_list(&self, i: usize, prefix: &str) -> Result<Vec<String>, S3Error> {
        let store = self.store(i);
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let mut keys = self.run(async move {
            store
                .list(prefix.as_ref())
                .map_ok(|meta| meta.location.to_string())
                .try_collect::<Vec<String>>()
                .await
        })?;
        keys.sort();
        Ok(keys)
    }

    /// PUT via node `i`; panics on failure.
    pub fn put(&self, i: usize, key: &str, bytes: &[u8]) {
        self.try_put(i, key, bytes)
            .unwrap_or_else(|e| panic!("PUT {key} via garage node {i}: {e}"));
    }

    /// GET via node `i` (`None`: no such object); panics on failure.
    pub fn get(&self, i: usize, key: &str) -> Option<Vec<u8>> {
        self.try_get(i, key)
            .unwrap_or_else(|e| panic!("GET {key} via garage node {i}: {e}"))
    }

    /// DELETE via node `i`; panics on failure.
    pub fn delete(&self, i: usize, key: &str) {
        self.try_delete(i, key)
            .unwrap_or_else(|e| panic!("DELETE {key} via garage node {i}: {e}"));
    }

    /// LIST via node `i`; panics on failure.
    pub fn list(&self, i: usize, prefix: &str) -> Vec<String> {
        self.try_list(i, prefix)
            .unwrap_or_else(|e| panic!("LIST {prefix} via garage node {i}: {e}"))
    }
}

impl Drop for GarageCluster {
    /// Kills every node. The tempdir (configs, logs, data) is removed, unless the test is
    /// failing or `GARAGE_KEEP_DIR` is set: then it stays, for the logs.
    fn drop(&mut self) {
        self.kill_all();
        let failed = thread::panicking() && !self.port_clash.load(Ordering::Relaxed);
        if failed || std::env::var_os("GARAGE_KEEP_DIR").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("garage cluster files kept in {}", self.dir.path().display());
        }
    }
}
