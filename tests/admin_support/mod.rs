//! Shared by the admin, config and lifecycle tests: a `magnetar serve` child with its admin
//! plane on an OS-chosen port, found through the `ready ... admin=ADDR` line, and a small
//! HTTP client (ureq) that returns every status instead of failing on non-2xx.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const TOKEN: &str = "test-token-4f1c";

pub fn magnetar_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magnetar"))
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torrents")
            .join(name),
    )
    .unwrap()
}

/// `(v1 hex or None, v2 hex or None)` of a fixture, from its `.hashes` file.
pub fn fixture_hashes(stem: &str) -> (Option<String>, Option<String>) {
    let text = String::from_utf8(fixture(&format!("{stem}.hashes"))).unwrap();
    let mut parts = text
        .split_whitespace()
        .map(|s| (s != "-").then(|| s.to_string()));
    (parts.next().flatten(), parts.next().flatten())
}

pub struct Served {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub ready_line: String,
}

impl Served {
    /// `magnetar serve` on 127.0.0.1:0 with the admin plane on 127.0.0.1:0, a token file
    /// holding `TOKEN` (in `data_dir`'s parent), no DHT; waits for the ready line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Served {
        let token_file = data_dir.with_extension("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let mut cmd = Command::new(magnetar_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--no-dht",
            ])
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(["--threads", "2"])
            .args(extra);
        Self::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> Served {
        let mut child = cmd
            .env_remove("MAGNETAR_ADMIN_TOKEN")
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
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("magnetar serve printed no ready line (exit: {status:?})");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} missing in {line:?}"))
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Served {
            listen: field("listen="),
            admin: field("admin="),
            child,
            ready_line: line,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// SIGTERM, then the exit status (waits at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_timeout(&mut self.child, limit).expect("magnetar did not exit after SIGTERM")
    }
}

impl Drop for Served {
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

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let r = r.expect("HTTP request");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r
        .into_body()
        .with_config()
        .limit(100 << 20)
        .read_to_vec()
        .unwrap();
    Reply {
        status,
        content_type,
        body,
    }
}

pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

/// `token`: `Some` adds `Authorization: Bearer <token>`.
pub fn post(url: &str, token: Option<&str>, body: &[u8]) -> Reply {
    let mut req = agent().post(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    reply(req.send(body))
}

pub fn delete(url: &str, token: Option<&str>) -> Reply {
    let mut req = agent().delete(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    reply(req.call())
}
