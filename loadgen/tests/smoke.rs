//! The loadgen against a real `magnetar serve`: a few hundred verified fetches in churn and
//! keepalive mode, over TCP and over uTP, so CI proves the load generator works (the real measurements are in
//! `benches/compare.sh`, never in the test suite).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn loadgen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magnetar-loadgen"))
}

/// The server binary of the same build: `cargo nextest run --workspace` (CI) builds it
/// beside ours; a lone `cargo test -p magnetar-loadgen` builds it here.
fn magnetar() -> PathBuf {
    let dir = loadgen().parent().expect("bin dir").to_path_buf();
    let bin = dir.join("magnetar");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = dir.ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "magnetar", "--bin", "magnetar"]);
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo build").success());
    }
    bin
}

/// The server, its listen address (TCP and uTP) and its admin address.
struct Server(Child, SocketAddr, SocketAddr);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data_dir: &Path) -> Server {
    let mut child = Command::new(magnetar())
        .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--connections-per-ip-max", "1000"])
        // Tests run in parallel: no fixed admin port, and no DHT traffic.
        .args(["--admin", "127.0.0.1:0", "--no-dht"])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning magnetar serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("magnetar serve printed no ready line");
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.split(',').next())
            .unwrap_or_else(|| panic!("{name} in {line}"))
            .parse()
            .expect("address")
    };
    Server(child, field("listen="), field("admin="))
}

/// One counter from the admin plane's /metrics (plain HTTP/1.0 over a std socket).
fn metric(admin: SocketAddr, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn gen_store(dir: &Path, count: &str) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    let hashes = dir.join("hashes.txt");
    let status = Command::new(loadgen())
        .args(["gen-store", "--count", count])
        .arg("--data-dir")
        .arg(&store)
        .arg("--hashes")
        .arg(&hashes)
        .status()
        .unwrap();
    assert!(status.success());
    (store, hashes)
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(loadgen())
        .args(args)
        .arg("--json")
        .output()
        .expect("running the loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

#[test]
fn fetches_from_a_real_magnetar() {
    let dir = tempfile::tempdir().unwrap();
    let (store, hashes) = gen_store(dir.path(), "40");
    let server = serve(&store);
    let target = server.1.to_string();
    let hashes = hashes.to_str().unwrap();

    let churn = run_json(&[
        "--target",
        &target,
        "--hashes",
        hashes,
        "--connections",
        "8",
        "--fetches",
        "300",
        "--duration",
        "20",
        "--verify",
        "--zipf",
        "1.0",
    ]);
    assert_eq!(churn["fetches"], 300, "{churn}");
    assert_eq!(churn["errors"], 0, "{churn}");
    assert!(churn["blocks"].as_u64().unwrap() >= 300);

    let keepalive = run_json(&[
        "--target",
        &target,
        "--from-store",
        store.to_str().unwrap(),
        "--mode",
        "keepalive",
        "--connections",
        "4",
        "--fetches",
        "200",
        "--duration",
        "20",
        "--verify",
    ]);
    assert!(keepalive["fetches"].as_u64().unwrap() >= 200, "{keepalive}");
    assert_eq!(keepalive["errors"], 0, "{keepalive}");

    // Unknown hashes are misses, not errors.
    let misses = run_json(&[
        "--target",
        &target,
        "--hashes",
        hashes,
        "--connections",
        "4",
        "--fetches",
        "40",
        "--duration",
        "20",
        "--miss-ratio",
        "0.5",
        "--timeout",
        "5",
    ]);
    assert_eq!(misses["errors"], 0, "{misses}");
    assert!(misses["misses"].as_u64().unwrap() > 0, "{misses}");
}

#[test]
fn fetches_over_utp_from_a_real_magnetar() {
    let dir = tempfile::tempdir().unwrap();
    let (store, hashes) = gen_store(dir.path(), "40");
    let server = serve(&store);
    let target = server.1.to_string();
    let hashes = hashes.to_str().unwrap();
    for mode in ["churn", "keepalive"] {
        let r = run_json(&[
            "--target",
            &target,
            "--hashes",
            hashes,
            "--transport",
            "utp",
            "--mode",
            mode,
            "--connections",
            "8",
            "--duration",
            "1s",
            "--verify",
        ]);
        assert_eq!(r["transport"], "utp", "{r}");
        assert!(r["fetches"].as_u64().unwrap() > 0, "{mode}: {r}");
        assert_eq!(r["errors"], 0, "{mode}: {r}");
    }
    // The fetches really were uTP: the server established them on its UDP side.
    let established = metric(server.2, "magnetar_utp_connections_established_total");
    assert!(
        established >= 9,
        "uTP connections established: {established}"
    );
    assert_eq!(metric(server.2, "magnetar_connections_accepted_total"), 0);
}
