//! Settings of `magnetar serve`, their defaults, and where the data dir lives when none
//! is given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::limits;

/// Which io driver each worker runtime uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverChoice {
    /// io_uring when the kernel offers the operations monoio needs, else epoll.
    Auto,
    /// io_uring or fail at start-up.
    IoUring,
    /// The readiness-based (epoll) driver, even where io_uring works.
    Epoll,
}

/// Everything a running server needs to know; built by the CLI.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: Vec<SocketAddr>,
    /// Worker threads, one monoio runtime each.
    pub threads: usize,
    pub driver: DriverChoice,
    /// Pin worker `i` to CPU `i % cpus`.
    pub pin_cores: bool,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    /// Requests answered per connection per batch; we advertise it as `reqq`.
    pub requests_queued_max: usize,
    /// Listen backlog passed to listen(2).
    pub listen_backlog: i32,
}

impl ServeConfig {
    /// Defaults for a data dir; the CLI overrides fields from flags.
    pub fn new(data_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            data_dir,
            listen: default_listen(),
            threads: default_threads(),
            driver: DriverChoice::Auto,
            pin_cores: false,
            connections_max: limits::CONNECTIONS_MAX_DEFAULT,
            connections_per_ip_max: limits::CONNECTIONS_PER_IP_MAX_DEFAULT,
            handshake_timeout: Duration::from_millis(limits::HANDSHAKE_TIMEOUT_MS_DEFAULT),
            idle_timeout: Duration::from_millis(limits::IDLE_TIMEOUT_MS_DEFAULT),
            keepalive_interval: Duration::from_millis(limits::KEEPALIVE_INTERVAL_MS_DEFAULT),
            requests_queued_max: limits::REQUESTS_QUEUED_MAX,
            listen_backlog: 4096,
        }
    }
}

/// `0.0.0.0:6881` and `[::]:6881` (the v6 socket is v6-only, so both can bind).
pub fn default_listen() -> Vec<SocketAddr> {
    vec![
        "0.0.0.0:6881".parse().expect("literal"),
        "[::]:6881".parse().expect("literal"),
    ]
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The data dir used when `--data-dir` is not given, created on first use:
/// `$STATE_DIRECTORY` (systemd's StateDirectory=), else `$XDG_DATA_HOME/magnetar`,
/// else `$HOME/.local/share/magnetar`, else `./magnetar-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several colon-separated dirs; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("magnetar");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/magnetar");
    }
    PathBuf::from("magnetar-data")
}
