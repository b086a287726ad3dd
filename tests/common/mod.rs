//! Shared by integration tests: run the real `magnetar` binary and real clients.
#![allow(dead_code)]

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

/// A `magnetar serve` child process, killed on drop.
pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub driver: String,
}

impl ServerProc {
    /// Starts `magnetar serve` on 127.0.0.1:0 and waits for its `ready` line (no sleeps).
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProc {
        let mut child = Command::new(magnetar_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("magnetar serve did not print its ready line within 60 s");
        let mut addr = None;
        let mut driver = String::new();
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("listen=") {
                addr = Some(v.split(',').next().unwrap().parse().expect("listen addr"));
            }
            if let Some(v) = field.strip_prefix("driver=") {
                driver = v.to_string();
            }
        }
        ServerProc {
            child,
            addr: addr.expect("listen= in ready line"),
            driver,
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
