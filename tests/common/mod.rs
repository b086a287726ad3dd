//! Shared by integration tests: run the real `magnetar` binary and real clients.
#![allow(dead_code)]

pub mod bep9;
pub mod garage;
pub mod http;
pub mod info;
pub mod kit;
pub mod peer;
pub mod relay;
pub mod tracker;
pub mod transmission;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Debian's python has python3-libtorrent; the pyenv one on PATH does not.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn magnetar_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magnetar"))
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Fails with an actionable message when libtorrent is not installed: these tests are
/// the point of the suite, so they never skip silently.
pub fn require_libtorrent() {
    let ok = Command::new(PYTHON)
        .args(["-c", "import libtorrent"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3-libtorrent is missing: run `bash scripts/test.sh`, which installs it"
    );
}

/// `run_ok`, but a client process killed by a signal (python3-libtorrent 2.0.8 crashes with
/// SIGSEGV now and then, in its own code) is run once more: the crash is the client's, not
/// what the test measures. A second crash, or any other failure, fails as `run_ok` does.
pub fn run_ok_unless_crashed(make: impl Fn() -> Command) -> Output {
    use std::os::unix::process::ExitStatusExt;
    let first = make()
        .output()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", make()));
    if let Some(sig) = first.status.signal() {
        eprintln!("{:?} died of signal {sig}; running it once more", make());
        return run_ok(&mut make());
    }
    run_ok_checked(&make(), first)
}

/// `run_ok`, but a failed client run is repeated once (webtorrent and a libtorrent seed on
/// loopback very rarely miss each other for a whole fetch timeout); a second failure fails.
pub fn run_ok_once_more(make: impl Fn() -> Command) -> Output {
    let first = make()
        .output()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", make()));
    if first.status.success() {
        return first;
    }
    eprintln!(
        "{:?} failed ({}): {}; running it once more",
        make(),
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    run_ok(&mut make())
}

fn run_ok_checked(cmd: &Command, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The admin token `ServerProc::start` writes to its token file.
pub const TOKEN: &str = "test-token-4f1c";

/// A `magnetar serve` child process, killed on drop.
pub struct ServerProc {
    pub child: Child,
    /// The first listen address of the ready line.
    pub addr: SocketAddr,
    /// Every listen address of the ready line (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    pub driver: String,
    /// The admin plane's address, from the ready line.
    pub admin: SocketAddr,
    pub ready_line: String,
}

impl ServerProc {
    /// Starts `magnetar serve` on 127.0.0.1:0 and waits for its `ready` line (no sleeps).
    /// Unless `extra` says otherwise: no DHT (tests never reach the public one), the admin
    /// plane on 127.0.0.1:0, two threads, and a token file holding `TOKEN` (beside
    /// `data_dir`).
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProc {
        Self::spawn(Self::command(data_dir, extra))
    }

    /// The command `start` runs, for a test to add to (environment, pre_exec) before
    /// `spawn`.
    pub fn command(data_dir: &Path, extra: &[&str]) -> Command {
        let has = |flag: &str| extra.contains(&flag);
        let mut cmd = Command::new(magnetar_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"]);
        if !has("--dht-bootstrap") {
            cmd.arg("--no-dht");
        }
        // Many servers run at once: the admin plane on a port of the OS's choosing.
        if !has("--admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        if !has("--threads") {
            cmd.args(["--threads", "2"]);
        }
        if !has("--admin-token-file") {
            let token_file = data_dir.with_extension("token");
            std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
            cmd.arg("--admin-token-file").arg(&token_file);
        }
        cmd.args(extra);
        cmd
    }

    /// Runs a `magnetar serve` command of the test's own making (no environment token) and
    /// waits for its `ready` line.
    pub fn spawn(cmd: Command) -> ServerProc {
        Self::spawn_with_stderr(cmd, Stdio::inherit())
    }

    /// `spawn`, with the server's stderr (its log) sent to `stderr` instead of the test's:
    /// for a test that reads the log (a file it then opens).
    pub fn spawn_with_stderr(mut cmd: Command, stderr: Stdio) -> ServerProc {
        let mut child = cmd
            .env_remove("MAGNETAR_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning magnetar serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("magnetar serve printed no ready line within 60 s (exit: {status:?})");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} missing in {line:?}"))
        };
        let addrs: Vec<SocketAddr> = field("listen=")
            .split(',')
            .map(|a| a.parse().expect("listen addr"))
            .collect();
        ServerProc {
            addr: *addrs.first().expect("listen= in ready line"),
            addrs,
            driver: field("driver=").to_string(),
            admin: field("admin=").parse().expect("admin addr"),
            ready_line: line.clone(),
            child,
        }
    }

    /// `http://ADMIN{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// SIGTERM, then the exit status (waits at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_timeout(&mut self.child, limit).expect("magnetar did not exit after SIGTERM")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if std::time::Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `magnetar import --data-dir DATA FILES...`, which must succeed.
pub fn import(data: &Path, torrents: &[&Path]) {
    run_ok(
        Command::new(magnetar_bin())
            .args(["import", "--data-dir"])
            .arg(data)
            .args(torrents),
    );
}

/// A file of tests/fixtures/torrents.
pub fn fixture_path(name: &str) -> PathBuf {
    repo_path("tests/fixtures/torrents").join(name)
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap()
}

/// `(v1 hex or None, v2 hex or None)` of a fixture, from its `.hashes` file (written by
/// libtorrent).
pub fn fixture_hashes(stem: &str) -> (Option<String>, Option<String>) {
    let text = String::from_utf8(fixture(&format!("{stem}.hashes"))).unwrap();
    let mut parts = text
        .split_whitespace()
        .map(|s| (s != "-").then(|| s.to_string()));
    (parts.next().flatten(), parts.next().flatten())
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's opentracker on 127.0.0.1, tracking only the whitelisted hashes (Debian's
/// build tracks nothing else); killed on drop.
pub struct Opentracker {
    child: Child,
    pub http: SocketAddr,
    pub udp: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Opentracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Opentracker {
    pub fn http_url(&self) -> String {
        format!("http://{}/announce", self.http)
    }

    pub fn udp_url(&self) -> String {
        format!("udp://{}/announce", self.udp)
    }
}

/// Added to every whitelist: announcing it tells when opentracker has loaded its list.
pub const OPENTRACKER_PROBE: [u8; 20] = *b"magnetar-probe-hash!";

/// Starts opentracker on loopback and waits until it is ready: its TCP port accepts, and
/// its whitelist is loaded (a thread of its own loads it after start-up; until then every
/// hash is "not authorized").
pub fn opentracker(whitelist: &[[u8; 20]]) -> Opentracker {
    opentracker_on(std::net::Ipv4Addr::LOCALHOST, whitelist)
}

/// A libtorrent seed (tests/interop/lt_client.py seed) on 127.0.0.1; killed on drop.
pub struct LtSeed {
    child: Child,
    pub port: u16,
}

impl LtSeed {
    /// Seeds every torrent in `torrents` (content under `content`); `extra` are
    /// lt_client.py seed flags (--tracker, --connect-peer, ...).
    pub fn start(torrents: &[&Path], content: &Path, extra: &[String]) -> LtSeed {
        let mut args: Vec<std::ffi::OsString> = vec!["seed".into()];
        args.extend(torrents.iter().map(|t| t.as_os_str().to_owned()));
        args.push(content.as_os_str().to_owned());
        args.extend(extra.iter().map(Into::into));
        LtSeed::spawn(&args)
    }

    /// A libtorrent DHT node only (`lt_client.py dht-node`), bootstrapping from
    /// `bootstrap` (none for the first node of a testnet).
    pub fn dht_node(bootstrap: &[SocketAddr]) -> LtSeed {
        let list: Vec<String> = bootstrap.iter().map(|a| a.to_string()).collect();
        let mut args: Vec<std::ffi::OsString> = vec!["dht-node".into()];
        if !list.is_empty() {
            args.push("--dht-bootstrap".into());
            args.push(list.join(",").into());
        }
        LtSeed::spawn(&args)
    }

    /// Runs `lt_client.py ARGS` and waits for its `listening PORT` line. A start killed by a
    /// signal (python3-libtorrent 2.0.8's own SIGSEGV, as in `run_ok_unless_crashed`) is
    /// tried once more; a second crash, or any other failure, fails the test.
    fn spawn(args: &[std::ffi::OsString]) -> LtSeed {
        use std::os::unix::process::ExitStatusExt;
        match LtSeed::try_spawn(args) {
            Ok(seed) => seed,
            Err(status) if status.signal().is_some() => {
                eprintln!("lt_client.py died of {status} before listening; starting it once more");
                LtSeed::try_spawn(args).unwrap_or_else(|status| {
                    panic!("lt_client.py exited before listening, twice: {status}")
                })
            }
            Err(status) => panic!("lt_client.py exited before listening: {status}"),
        }
    }

    /// One start of `lt_client.py ARGS`: the seed once it listens, or how it exited before.
    fn try_spawn(args: &[std::ffi::OsString]) -> Result<LtSeed, std::process::ExitStatus> {
        let mut child = Command::new(PYTHON)
            .arg(repo_path("tests/interop/lt_client.py"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning lt_client.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(p) = line.strip_prefix("listening ") {
                    let _ = tx.send(p.trim().parse::<u16>().unwrap());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => Ok(LtSeed { child, port }),
            // Its stdout closed: it exited (a native crash prints nothing on stderr).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(child.wait().expect("waiting for lt_client.py"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("lt_client.py did not start listening within 30 s")
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for LtSeed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Torrents made by libtorrent (lt_client.py make-torrents): label -> (torrent path, raw
/// info dict, v1 hex, v2 hex). Content files are in `dir/content`.
pub struct LtTorrent {
    pub path: PathBuf,
    pub info: Vec<u8>,
    pub v1: Option<String>,
    pub v2: Option<String>,
    pub metadata_pieces: u64,
}

impl LtTorrent {
    /// The v1 info-hash as a handshake key.
    pub fn v1_key(&self) -> Option<[u8; 20]> {
        self.v1
            .as_ref()
            .map(|h| hex::decode(h).unwrap().try_into().unwrap())
    }

    /// The v2 info-hash truncated to the 20-byte handshake key.
    pub fn v2_key(&self) -> Option<[u8; 20]> {
        self.v2
            .as_ref()
            .map(|h| hex::decode(&h[..40]).unwrap().try_into().unwrap())
    }

    /// The 20 bytes a client puts in its handshake.
    pub fn key(&self) -> [u8; 20] {
        let hex = self
            .v1
            .clone()
            .unwrap_or_else(|| self.v2.clone().unwrap()[..40].to_string());
        hex::decode(hex).unwrap().try_into().unwrap()
    }

    pub fn magnet(&self, xpe: SocketAddr) -> String {
        match (&self.v1, &self.v2) {
            (Some(v1), _) => format!("magnet:?xt=urn:btih:{v1}&x.pe={xpe}"),
            (None, Some(v2)) => format!("magnet:?xt=urn:btmh:1220{v2}&x.pe={xpe}"),
            _ => unreachable!(),
        }
    }
}

pub fn make_lt_torrents(dir: &Path) -> std::collections::BTreeMap<String, LtTorrent> {
    run_ok(
        Command::new(PYTHON)
            .arg(repo_path("tests/interop/lt_client.py"))
            .arg("make-torrents")
            .arg(dir),
    );
    read_lt_manifest(dir)
}

/// One v1 torrent (label `v1-pN`) whose info dict is exactly `pieces` metadata pieces long;
/// content in `dir/content`.
pub fn make_lt_torrent_with_metadata_pieces(dir: &Path, pieces: u32) -> LtTorrent {
    run_ok(
        Command::new(PYTHON)
            .arg(repo_path("tests/interop/lt_client.py"))
            .arg("make-torrents")
            .arg(dir)
            .args(["--v1-metadata-pieces", &pieces.to_string()]),
    );
    let t = read_lt_manifest(dir)
        .remove(&format!("v1-p{pieces}"))
        .expect("the torrent in the manifest");
    assert_eq!(t.metadata_pieces, u64::from(pieces));
    t
}

fn read_lt_manifest(dir: &Path) -> std::collections::BTreeMap<String, LtTorrent> {
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let parsed: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&manifest).unwrap();
    parsed
        .into_iter()
        .map(|(label, f)| {
            let text = |k: &str| f.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let path = PathBuf::from(text("torrent").unwrap());
            let bytes = std::fs::read(&path).unwrap();
            let span = magnetar::metainfo::info_span(&bytes).unwrap();
            let t = LtTorrent {
                path,
                info: bytes[span].to_vec(),
                v1: text("v1"),
                v2: text("v2"),
                metadata_pieces: f["metadata_pieces"].as_u64().unwrap(),
            };
            (label, t)
        })
        .collect()
}

/// Which transports a libtorrent process may use (lt_client.py --transport).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// libtorrent's defaults: uTP and TCP, uTP dialled first.
    Default,
    /// uTP off both ways.
    Tcp,
    /// TCP off both ways.
    Utp,
}

impl Transport {
    pub fn arg(self) -> &'static str {
        match self {
            Transport::Default => "default",
            Transport::Tcp => "tcp",
            Transport::Utp => "utp",
        }
    }
}

/// What one libtorrent fetch reported.
#[derive(Debug)]
pub struct LtFetch {
    /// The raw info dict libtorrent received.
    pub info: Vec<u8>,
    /// From add_torrent to metadata_received_alert.
    pub seconds: f64,
    /// The peers it was connected to when the metadata arrived, with their transport
    /// ("utp" or "tcp").
    pub peers: Vec<(SocketAddr, String)>,
}

impl LtFetch {
    /// The transport of the connection to `addr`, if libtorrent had one.
    pub fn transport_to(&self, addr: SocketAddr) -> Option<&str> {
        self.peers
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, t)| t.as_str())
    }
}

/// libtorrent as a client (a fresh process) on `transport`: fetch `magnet`'s metadata into
/// `out`; the report has the info dict, the seconds from add_torrent to metadata, and the
/// transport of each connection.
pub fn lt_fetch_with(magnet: &str, out: &Path, timeout_s: u32, transport: Transport) -> LtFetch {
    lt_fetch_args(magnet, out, timeout_s, &["--transport", transport.arg()])
}

/// `lt_client.py fetch MAGNET OUT --timeout T EXTRA...`, its JSON report read back.
pub fn lt_fetch_args(magnet: &str, out: &Path, timeout_s: u32, extra: &[&str]) -> LtFetch {
    lt_fetch_report(
        run_ok_unless_crashed(lt_fetch_command(magnet, out, timeout_s, extra)),
        out,
    )
}

/// `lt_fetch_with`, but a fetch that fails is run once more (`run_ok_once_more`), for
/// tests whose both ends are libtorrent: what such a failure shows is libtorrent's, not
/// ours (see the caller's comment); a second failure in a row fails.
pub fn lt_fetch_once_more(
    magnet: &str,
    out: &Path,
    timeout_s: u32,
    transport: Transport,
) -> LtFetch {
    let extra = ["--transport", transport.arg()];
    lt_fetch_report(
        run_ok_once_more(lt_fetch_command(magnet, out, timeout_s, &extra)),
        out,
    )
}

fn lt_fetch_command<'a>(
    magnet: &'a str,
    out: &'a Path,
    timeout_s: u32,
    extra: &'a [&'a str],
) -> impl Fn() -> Command + 'a {
    move || {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(repo_path("tests/interop/lt_client.py"))
            .arg("fetch")
            .arg(magnet)
            .arg(out)
            .args(["--timeout", &timeout_s.to_string()])
            .args(extra);
        cmd
    }
}

/// The JSON report of a successful `lt_client.py fetch`, and the info dict it wrote.
fn lt_fetch_report(res: Output, out: &Path) -> LtFetch {
    let stdout = String::from_utf8_lossy(&res.stdout);
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line from lt_client.py fetch: {stdout}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let peers = v["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let addr = p["addr"].as_str().unwrap().parse().unwrap();
                    (addr, p["transport"].as_str().unwrap().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    LtFetch {
        info: std::fs::read(out).unwrap(),
        seconds: v["seconds"].as_f64().expect("seconds in the fetch report"),
        peers,
    }
}

/// libtorrent as a client on its default settings: fetch `magnet`'s metadata, return the
/// raw info dict.
pub fn lt_fetch(magnet: &str, out: &Path, timeout_s: u32) -> Vec<u8> {
    lt_fetch_with(magnet, out, timeout_s, Transport::Default).info
}

/// The median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `f`'s future on io_uring (when the kernel allows it) and on the epoll fallback.
pub fn on_both_drivers<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if monoio::utils::detect_uring() {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f());
    }
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f());
}

/// libtorrent's torrents (`make_lt_torrents` in `tmp/torrents`), imported into `tmp/data`
/// for magnetar: (torrents by label, data dir).
pub fn imported_lt_torrents(
    tmp: &Path,
) -> (std::collections::BTreeMap<String, LtTorrent>, PathBuf) {
    let tdir = tmp.join("torrents");
    let torrents = make_lt_torrents(&tdir);
    let data = tmp.join("data");
    run_ok(
        Command::new(magnetar_bin())
            .args(["import", "--data-dir"])
            .arg(&data)
            .arg(&tdir),
    );
    (torrents, data)
}

/// One webtorrent fetch (tests/interop/webtorrent/fetch.mjs, webtorrent 3 on its defaults:
/// MSE first, TCP and uTP): the info dict it received and its time to metadata.
pub struct WtFetch {
    pub info: Vec<u8>,
    pub seconds: f64,
    /// The wires it had when the metadata arrived: (address, type such as "utpOutgoing").
    pub wires: Vec<(String, String)>,
}

/// Fails with an actionable message when webtorrent is not installed.
pub fn require_webtorrent() {
    assert!(
        repo_path("tests/interop/webtorrent/node_modules/webtorrent").is_dir(),
        "webtorrent is missing: run `bash scripts/test.sh`, which installs it (npm ci)"
    );
}

/// A webtorrent fetch from magnetar: one try.
pub fn wt_fetch(magnet: &str, out: &Path, timeout_s: u32) -> WtFetch {
    wt_fetch_with(magnet, out, timeout_s, false)
}

/// A webtorrent fetch from the baseline (a libtorrent seed): a failed run is repeated once
/// (the two very rarely miss each other on loopback), so the baseline's flakiness does not
/// fail a test about magnetar.
pub fn wt_fetch_baseline(magnet: &str, out: &Path, timeout_s: u32) -> WtFetch {
    wt_fetch_with(magnet, out, timeout_s, true)
}

fn wt_fetch_with(magnet: &str, out: &Path, timeout_s: u32, once_more: bool) -> WtFetch {
    let fetch = || {
        let mut cmd = Command::new("node");
        cmd.current_dir(repo_path("tests/interop/webtorrent"))
            .arg("fetch.mjs")
            .arg(magnet)
            .arg(out)
            .arg(timeout_s.to_string());
        cmd
    };
    let res = if once_more {
        run_ok_once_more(fetch)
    } else {
        run_ok(&mut fetch())
    };
    let line = String::from_utf8_lossy(&res.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("webtorrent printed no JSON ({e}): {line}"));
    let wires = v["wires"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| {
                    (
                        w["addr"].as_str().unwrap_or("").to_owned(),
                        w["type"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    WtFetch {
        info: std::fs::read(out).expect("webtorrent wrote the info dict"),
        seconds: v["seconds"].as_f64().expect("seconds"),
        wires,
    }
}

/// `lt_fetch` with encryption required by libtorrent (`--encryption forced`: MSE on every
/// connection, plaintext or RC4 offered; `forced-rc4`: RC4 only). Not a default: these are
/// the tests of peers that insist on encryption.
pub fn lt_fetch_encrypted_with(magnet: &str, out: &Path, timeout_s: u32, level: &str) -> LtFetch {
    lt_fetch_args(magnet, out, timeout_s, &["--encryption", level])
}

pub fn lt_fetch_encrypted(magnet: &str, out: &Path, timeout_s: u32) -> LtFetch {
    lt_fetch_encrypted_with(magnet, out, timeout_s, "forced")
}

/// A network namespace of the test's own, joined to the root namespace by a veth pair:
/// `host_ip/24` on the host side (root namespace), `peer_ip/24` inside the namespace (with
/// `lo` up too). For clients that refuse loopback peers (Transmission treats 127.0.0.0/8
/// as martian): they run inside (`exec`) and reach servers bound to `host_ip`. Nothing is
/// routed beyond the pair. Deleted on drop, panics included.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: std::net::Ipv4Addr,
    pub peer_ip: std::net::Ipv4Addr,
}

impl Netns {
    /// A fresh namespace named after this process (and a counter), on the first free
    /// `10.77.X.0/24` from a pid-derived X (an X in use on a host interface is skipped).
    pub fn create() -> Netns {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("running ip {args:?}: {e} (iproute2 is needed)"))
        };
        Self::remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are at most 15 bytes: "mg" + up to 7 pid digits + counter + h/p.
        let tag = format!("mg{pid}x{n}");
        let name = format!("magnetar-{tag}");
        let host_if = format!("{tag}h");
        let peer_if = format!("{tag}p");
        assert!(host_if.len() <= 15, "interface name {host_if} too long");
        let in_use =
            String::from_utf8_lossy(&ip(&["-4", "-o", "addr", "show"]).stdout).into_owned();
        let start = (pid.wrapping_mul(7) + n * 31) % 250;
        let x = (0..250)
            .map(|i| 1 + (start + i) % 250)
            .find(|x| !in_use.contains(&format!(" 10.77.{x}.")))
            .expect("a free 10.77.X.0/24");
        let host_ip = std::net::Ipv4Addr::new(10, 77, x as u8, 1);
        let peer_ip = std::net::Ipv4Addr::new(10, 77, x as u8, 2);
        // From here on, drop cleans up whatever was made.
        let ns = Netns {
            name,
            host_if,
            host_ip,
            peer_ip,
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                ns.host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer_if.clone(),
                "netns".into(),
                ns.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/24"),
                "dev".into(),
                ns.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns.host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.name.clone(),
                "addr".into(),
                "add".into(),
                format!("{peer_ip}/24"),
                "dev".into(),
                peer_if.clone(),
            ],
            vec![
                "-n".into(),
                ns.name.clone(),
                "link".into(),
                "set".into(),
                peer_if,
                "up".into(),
            ],
            vec![
                "-n".into(),
                ns.name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            let out = ip(&args);
            assert!(
                out.status.success(),
                "ip {args:?} failed (these tests need root, or CAP_NET_ADMIN and CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The host side answers once it is up; wait for it (bounded) from inside.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = ip(&["-o", "link", "show", "dev", &ns.host_if]);
            if String::from_utf8_lossy(&state.stdout).contains("LOWER_UP") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "veth {} never came up",
                ns.host_if
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ns
    }

    /// Deletes the namespaces (and host-side veths) of test processes that are gone
    /// (killed before their drop ran).
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(tag) = name.strip_prefix("magnetar-") else {
                continue;
            };
            let Some(pid) = tag.strip_prefix("mg").and_then(|t| t.split('x').next()) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                drop(Netns {
                    name: name.to_string(),
                    host_if: format!("{tag}h"),
                    host_ip: std::net::Ipv4Addr::UNSPECIFIED,
                    peer_ip: std::net::Ipv4Addr::UNSPECIFIED,
                });
            }
        }
    }

    /// `program` run inside the namespace (`ip netns exec NAME program`: the same process,
    /// so killing the child kills `program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its end of the pair, and with it the host end;
        // the explicit delete covers a namespace that was never made.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// `opentracker`, bound to `ip` (for clients in a `Netns`, which reach `host_ip`) instead
/// of 127.0.0.1; ready when it answers an announce there.
pub fn opentracker_on(ip: std::net::Ipv4Addr, whitelist: &[[u8; 20]]) -> Opentracker {
    use magnetar::upstream::tracker::{announce, AnnounceRequest};
    let bin = Path::new("/usr/bin/opentracker");
    assert!(
        bin.exists(),
        "opentracker is not installed (scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let list: String = whitelist
        .iter()
        .chain([&OPENTRACKER_PROBE])
        .map(|h| hex::encode(h) + "\n")
        .collect();
    std::fs::write(dir.path().join("whitelist"), list).unwrap();
    // When run as root, opentracker chroots into -d and drops to user nobody, and reads
    // the whitelist after the chroot: its path must be relative to that directory.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for _ in 0..5 {
        let tcp = std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let udp = std::net::UdpSocket::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(bin)
            .current_dir(dir.path())
            .args(["-i", &ip.to_string(), "-p", &tcp.to_string()])
            .args(["-P", &udp.to_string()])
            .args(["-w", "whitelist", "-d"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn opentracker");
        let http = SocketAddr::from((ip, tcp));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if std::net::TcpStream::connect_timeout(&http, Duration::from_millis(100)).is_ok() {
                let probe = AnnounceRequest {
                    info_hash: OPENTRACKER_PROBE,
                    peer_id: *b"-PR0001-probeprobepr",
                    port: 1,
                    left: 1,
                    numwant: 1,
                };
                let url = format!("http://{http}/announce");
                if announce(&url, &probe, Duration::from_secs(1)).is_ok() {
                    return Opentracker {
                        child,
                        http,
                        udp: SocketAddr::from((ip, udp)),
                        _dir: dir,
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("opentracker did not start on {ip}");
}

/// What the upstream tests fetch with: the crate's defaults for one peer.
pub fn upstream_peer_cfg(key: [u8; 20]) -> magnetar::upstream::peer::PeerFetchConfig {
    magnetar::upstream::peer::PeerFetchConfig {
        key,
        peer_id: *b"-MX0100-upstreamtest",
        metadata_bytes_max: magnetar::limits::METADATA_BYTES_MAX,
        connect_timeout: Duration::from_secs(5),
        peer_timeout: Duration::from_secs(20),
        stall_timeout: magnetar::upstream::config::PEER_STALL_TIMEOUT,
        v2_bit: false,
    }
}

/// `fetch_from_peer` for each of `labels` from `seed`, on io_uring and on epoll: the bytes
/// must be the torrent's and each fetch well under the peer timeout (10 s). `what` names
/// the case in failures.
pub fn fetch_each_from_peer(
    seed: SocketAddr,
    torrents: &std::collections::BTreeMap<String, LtTorrent>,
    labels: &[&str],
    what: &str,
) {
    on_both_drivers(|| async {
        for label in labels {
            let t = &torrents[*label];
            let started = std::time::Instant::now();
            let info = magnetar::upstream::peer::fetch_from_peer(seed, &upstream_peer_cfg(t.key()))
                .await
                .unwrap_or_else(|e| panic!("{label} ({what}): {e}"));
            assert!(info == t.info, "{label} ({what}): bytes differ");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{label} ({what}): {:?}",
                started.elapsed()
            );
        }
    });
}
