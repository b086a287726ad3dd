//! Settings of `magnetar serve`: one definition for flags, config file, defaults and docs.
//!
//! `ServeSettings` is both a clap `Args` and a serde `Deserialize` struct, so every setting is
//! a flag (`--connections-max`) and a TOML key (`connections-max`) with the same name, and
//! `[upstream]` is the miss path's `UpstreamConfig` (same scheme). The clap attributes are the
//! single source of truth: `ServeSettings::default()` parses an empty command line, and
//! `print-config` writes every key with its flag's doc comment and default.
//!
//! Precedence: explicit flags (and their environment variables) > config file > defaults.
//! To know which flags were given explicitly, the command line is parsed a second time by a
//! copy of the command without defaults (`explicit_only`); only what that parse finds
//! overwrites the file's values.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Args, FromArgMatches};
use serde::Deserialize;

use crate::limits;
use crate::shared::SharedConfig;
use crate::upstream::config::UpstreamConfig;

/// Which io driver each worker runtime uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverChoice {
    /// io_uring when the kernel offers the operations monoio needs, else epoll.
    Auto,
    /// io_uring or fail at start-up.
    IoUring,
    /// The readiness-based (epoll) driver, even where io_uring works.
    Epoll,
}

/// A feature that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Switch {
    On,
    Off,
}

/// The default admin address: loopback only.
pub const ADMIN_DEFAULT: &str = "127.0.0.1:7881";

/// Every setting of `magnetar serve`, as flags and as the config file's keys.
#[derive(Args, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeSettings {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list
    /// (e.g. "info,magnetar::upstream=debug"). The flag is `--log` (env MAGNETAR_LOG);
    /// SIGHUP re-reads it from the config file.
    #[arg(skip)]
    pub log: Option<String>,

    /// Where the store lives; created if missing. Default: $STATE_DIRECTORY, else
    /// $XDG_DATA_HOME/magnetar, else ~/.local/share/magnetar.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address to accept peers on; repeat for several. Ignored when systemd passes listening
    /// sockets (socket activation, LISTEN_FDS).
    #[arg(long, value_name = "ADDR:PORT", default_values = ["0.0.0.0:6881", "[::]:6881"])]
    pub listen: Vec<SocketAddr>,

    /// Listen backlog passed to listen(2) (the kernel caps it at net.core.somaxconn).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub listen_backlog: i32,

    /// Serve uTP (BEP 29) on UDP at the same port numbers as TCP: on or off. libtorrent
    /// (qBittorrent, Deluge) dials uTP first and waits ~4 s before trying TCP, so turn it
    /// off only where UDP must stay closed.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub utp: Switch,

    /// uTP payload bytes per packet (MTU-sized: 1400 fits a 1500-byte MTU with IPv6, UDP
    /// and uTP headers).
    #[arg(long, default_value_t = crate::utp::PAYLOAD_BYTES_DEFAULT, value_name = "BYTES")]
    pub utp_payload_bytes: usize,

    /// uTP slow start's first window, in packets: 10 is TCP's (RFC 6928) and sends a 16 KiB
    /// metadata piece in one round trip; libtorrent starts at 1.
    #[arg(long, default_value_t = crate::utp::INITIAL_WINDOW_PACKETS_DEFAULT, value_name = "PACKETS")]
    pub utp_initial_window_packets: usize,

    /// Receive and send buffer of each uTP socket (one per core and address, shared by all
    /// its peers). The kernel caps it at net.core.rmem_max / wmem_max unless magnetar has
    /// CAP_NET_ADMIN; tuning/99-magnetar.conf raises those.
    #[arg(long, default_value_t = limits::UTP_SOCKET_BUFFER_BYTES_DEFAULT, value_name = "BYTES")]
    pub utp_socket_buffer_bytes: usize,

    /// Send uTP reply bursts with UDP GSO (UDP_SEGMENT, Linux 4.18+): one pass through the
    /// stack for up to 64 packets; falls back by itself if the kernel refuses it. Only a
    /// send batch holding several peers' packets (a busy core) is grouped; one peer's
    /// burst alone goes as separate datagrams, which reach it sooner. Measured on
    /// loopback: 1.2-1.5x the fetches per CPU-second at 64 connections, the same latency
    /// at one (BENCHMARKS.md "uTP cost").
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub utp_gso: Switch,

    /// MSE (encrypted) handshakes one address (IPv6: one /64) may start per second on a
    /// core; each costs a Diffie-Hellman exponentiation. Past it the connection is closed.
    #[arg(long, default_value_t = limits::MSE_HANDSHAKES_PER_IP_PER_SECOND_MAX_DEFAULT, value_name = "N")]
    pub mse_handshakes_per_ip_per_second_max: u32,

    /// MSE (encrypted) handshakes one core may start per second from all addresses
    /// together (each costs a Diffie-Hellman exponentiation, ~0.2 ms); past it the
    /// connection is closed before any DH work.
    #[arg(long, default_value_t = limits::MSE_HANDSHAKES_PER_CORE_PER_SECOND_MAX_DEFAULT, value_name = "N")]
    pub mse_handshakes_per_core_per_second_max: u32,

    /// uTP connections per core that have not finished the uTP handshake; SYNs past it are
    /// dropped unanswered (SYN floods).
    #[arg(long, default_value_t = limits::UTP_HALF_OPEN_PER_CORE_MAX_DEFAULT, value_name = "N")]
    pub utp_half_open_per_core_max: usize,

    /// io_uring path: replies carrying at least this many metadata bytes go out with
    /// zero-copy send (SENDMSG_ZC); 0 = never (the default). Pays off for large replies
    /// on real NICs only: on loopback the kernel copies anyway (counted in
    /// `uring_send_zc_copied`). docs/io-uring.md.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub send_zc_min_bytes: usize,

    /// Threads that read records not in the page cache (a store larger than memory) off
    /// the workers, so a cold read never stalls a core's other connections. Each waits on
    /// one disk read at a time: more keep more reads in flight. At most 256.
    #[arg(long, default_value_t = limits::PAGE_IN_THREADS_DEFAULT, value_name = "N")]
    pub page_in_threads: usize,

    /// Nice levels below the workers that the page-in threads run at (0 = the same), so
    /// the CPU they spend for cold records yields to the workers' resident connections.
    #[arg(long, default_value_t = limits::PAGE_IN_NICE_DEFAULT, value_name = "N")]
    pub page_in_nice: i32,

    /// Page-ins one core may have in flight; its further cold connections wait for one to
    /// end, so a flood of cold fetches cannot take the core from its resident ones.
    #[arg(long, default_value_t = limits::PAGE_IN_PER_CORE_DEFAULT, value_name = "N")]
    pub page_in_per_core: usize,

    /// Worker threads (one io runtime each). Default: one per CPU.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// io driver: auto (io_uring if the kernel allows it, else epoll), io-uring, epoll.
    /// io_uring serves TCP from the worker's own ring (docs/io-uring.md).
    #[arg(long, value_enum, default_value = "auto", env = "MAGNETAR_DRIVER")]
    pub driver: DriverChoice,

    /// Pin worker i to CPU i.
    #[arg(long)]
    pub pin_cores: bool,

    /// Most open peer connections over all workers.
    #[arg(long, default_value_t = limits::CONNECTIONS_MAX_DEFAULT, value_name = "N")]
    pub connections_max: usize,

    /// Most open connections from one IP address.
    #[arg(long, default_value_t = limits::CONNECTIONS_PER_IP_MAX_DEFAULT, value_name = "N")]
    pub connections_per_ip_max: usize,

    /// Time a new connection has to send its handshake.
    #[arg(long, default_value_t = limits::HANDSHAKE_TIMEOUT_MS_DEFAULT, value_name = "MS")]
    pub handshake_timeout_ms: u64,

    /// Close a connection after this long without a byte from the peer.
    #[arg(long, default_value_t = limits::IDLE_TIMEOUT_MS_DEFAULT, value_name = "MS")]
    pub idle_timeout_ms: u64,

    /// Send a keep-alive after this long without sending anything.
    #[arg(long, default_value_t = limits::KEEPALIVE_INTERVAL_MS_DEFAULT, value_name = "MS")]
    pub keepalive_interval_ms: u64,

    /// Requests answered per connection per burst (advertised as reqq); more are rejected.
    /// At most 255: held requests and a full burst must fit one writev (1024 iovecs).
    #[arg(long, default_value_t = limits::REQUESTS_QUEUED_MAX, value_name = "N")]
    pub requests_queued_max: usize,

    /// On SIGTERM/SIGINT: stop accepting, then give open sessions this long to finish
    /// before closing them and exiting.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub shutdown_grace_ms: u64,

    /// Log the summed per-core counters this often (0: never).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub stats_interval_s: u64,

    /// Admin HTTP address (metrics, health, .torrent in/out, delete), or "off".
    /// Loopback only unless admin-allow-remote is set.
    #[arg(long, default_value = ADMIN_DEFAULT, value_name = "ADDR:PORT|off")]
    pub admin: String,

    /// Allow the admin plane on a non-loopback address (put it behind TLS and a firewall).
    #[arg(long)]
    pub admin_allow_remote: bool,

    /// File holding the bearer token that mutating admin requests (upload, delete, fetch)
    /// must present. Without a token, mutating endpoints are disabled.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The bearer token itself (prefer admin-token-file: a flag shows in `ps`).
    #[arg(
        long,
        env = "MAGNETAR_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,

    /// The address clients reach this server at (e.g. 203.0.113.5:6881), put into the
    /// magnets the admin plane hands out as x.pe.
    #[arg(long, value_name = "HOST:PORT")]
    pub public_addr: Option<String>,

    /// Public read-only HTTP listener: `GET /torrent/<hash>.torrent` for browsers and tools
    /// (CORS, ETag, miss-through); repeat for several addresses. Off unless given. It
    /// serves no admin endpoint. Put TLS in front of it (a reverse proxy) for https.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Vec<SocketAddr>,

    /// How long an HTTP request for an unknown info-hash waits for the miss path before
    /// answering 404 (the fetch goes on; a retry may find it). Tools give a .torrent
    /// mirror ~5 s.
    #[arg(long, default_value_t = limits::HTTP_MISS_WAIT_MS_DEFAULT, value_name = "MS")]
    pub http_miss_wait_ms: u64,

    /// Time an HTTP client has to send a whole request head (from its first byte, or from
    /// accept); slower ones are closed (slowloris).
    #[arg(long, default_value_t = limits::HTTP_REQUEST_TIMEOUT_MS_DEFAULT, value_name = "MS")]
    pub http_request_timeout_ms: u64,

    /// Bytes (MiB) each worker core keeps whole .torrent answers of the public HTTP listener
    /// in (an unnamed file on the data dir's filesystem, else a memfd; an answer is then one
    /// sendfile). 0: off.
    #[arg(long, default_value_t = limits::HTTP_CACHE_MIB_DEFAULT, value_name = "MIB")]
    pub http_cache_mib: u64,

    /// The URL the public HTTP listener is reached at (e.g. https://cache.example.org/);
    /// magnets from `magnetar magnet` and the admin plane then carry
    /// `xs=<url>/torrent/<HEX>.torrent` (webtorrent and BiglyBT fetch it).
    #[arg(long, value_name = "URL")]
    pub public_http_url: Option<String>,

    /// Most bytes the store's segment files may take (0: unbounded). Past it, an append
    /// evicts the oldest segment first, copying out the records served recently
    /// (CLOCK); evicted records are fetched again on their next miss. Segments are
    /// sized to at most 1/(4 × threads) of it.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub store_capacity: u64,

    /// The miss path (`[upstream]` in the config file).
    #[command(flatten)]
    pub upstream: UpstreamConfig,

    /// The shared tier (`[shared]` in the config file).
    #[command(flatten)]
    pub shared: SharedConfig,
}

impl Default for ServeSettings {
    /// The clap defaults: the one place defaults are written down.
    fn default() -> Self {
        let cmd = ServeSettings::augment_args(clap::Command::new("serve"));
        let matches = cmd.try_get_matches_from(["serve"]).expect("defaults parse");
        let mut s = ServeSettings::from_arg_matches(&matches).expect("defaults are valid");
        // An environment variable is not a default.
        s.admin_token = None;
        s
    }
}

/// Admin plane settings, resolved.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `None`: mutating endpoints answer 403.
    pub token: Option<String>,
    pub public_addr: Option<String>,
    /// Put into served .torrent files as announce-list and into magnets as `tr`: the
    /// `--announce-tracker`s first, then the miss path's `--tracker`s.
    pub trackers: Vec<String>,
    /// `--public-http-url` without its trailing `/`: magnets get `xs=` pointing at it.
    pub public_http_url: Option<String>,
}

impl ServeSettings {
    /// Read a config file: TOML, unknown keys are an error naming the key.
    pub fn from_file(path: &Path) -> anyhow::Result<ServeSettings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<ServeSettings> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    /// Overwrite with what `matches` (from `explicit_only`) holds: flags given on the command
    /// line or through their environment variables.
    pub fn apply_explicit(&mut self, matches: &clap::ArgMatches) -> anyhow::Result<()> {
        self.update_from_arg_matches(matches)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    pub fn log_filter(&self) -> &str {
        self.log.as_deref().unwrap_or("info")
    }

    /// The server's settings, checked.
    pub fn serve_config(&self) -> anyhow::Result<ServeConfig> {
        let mut cfg = ServeConfig::new(self.data_dir());
        cfg.listen = self.listen.clone();
        if let Some(t) = self.threads {
            if t == 0 {
                bail!("threads must be at least 1");
            }
            cfg.threads = t;
        }
        cfg.driver = self.driver;
        cfg.pin_cores = self.pin_cores;
        cfg.connections_max = self.connections_max;
        cfg.connections_per_ip_max = self.connections_per_ip_max;
        cfg.handshake_timeout = Duration::from_millis(self.handshake_timeout_ms);
        cfg.idle_timeout = Duration::from_millis(self.idle_timeout_ms);
        cfg.keepalive_interval = Duration::from_millis(self.keepalive_interval_ms);
        let reqq_max = limits::REQUESTS_QUEUED_MAX_LIMIT;
        if self.requests_queued_max == 0 || self.requests_queued_max > reqq_max {
            bail!(
                "requests-queued-max must be between 1 and {reqq_max}: held requests and a \
                 full burst are answered in one writev of at most {} iovecs",
                limits::IOVECS_PER_WRITE_MAX
            );
        }
        cfg.requests_queued_max = self.requests_queued_max;
        if self.listen_backlog < 1 {
            bail!("listen-backlog must be at least 1");
        }
        cfg.listen_backlog = self.listen_backlog;
        cfg.utp = self.utp == Switch::On;
        let payload = crate::utp::PAYLOAD_BYTES_MIN..=crate::utp::PAYLOAD_BYTES_MAX;
        if !payload.contains(&self.utp_payload_bytes) {
            bail!(
                "utp-payload-bytes must be between {} and {}",
                payload.start(),
                payload.end()
            );
        }
        cfg.utp_payload_bytes = self.utp_payload_bytes;
        if !(1..=crate::utp::INITIAL_WINDOW_PACKETS_MAX).contains(&self.utp_initial_window_packets)
        {
            bail!(
                "utp-initial-window-packets must be between 1 and {}",
                crate::utp::INITIAL_WINDOW_PACKETS_MAX
            );
        }
        cfg.utp_initial_window_packets = self.utp_initial_window_packets;
        if self.utp_socket_buffer_bytes < 64 * 1024 {
            bail!("utp-socket-buffer-bytes must be at least 65536 (one datagram of any size)");
        }
        cfg.utp_socket_buffer_bytes = self.utp_socket_buffer_bytes;
        cfg.utp_gso = self.utp_gso == Switch::On;
        if self.utp_half_open_per_core_max == 0 {
            bail!("utp-half-open-per-core-max must be at least 1");
        }
        cfg.utp_half_open_per_core_max = self.utp_half_open_per_core_max;
        cfg.send_zc_min_bytes = self.send_zc_min_bytes;
        if self.page_in_threads == 0 || self.page_in_threads > limits::PAGE_IN_THREADS_MAX {
            bail!(
                "page-in-threads must be between 1 and {}",
                limits::PAGE_IN_THREADS_MAX
            );
        }
        cfg.page_in_threads = self.page_in_threads;
        if !(0..=limits::PAGE_IN_NICE_MAX).contains(&self.page_in_nice) {
            bail!(
                "page-in-nice must be between 0 and {}",
                limits::PAGE_IN_NICE_MAX
            );
        }
        cfg.page_in_nice = self.page_in_nice;
        if self.page_in_per_core == 0 || self.page_in_per_core > limits::PAGE_IN_PER_CORE_MAX {
            bail!(
                "page-in-per-core must be between 1 and {}",
                limits::PAGE_IN_PER_CORE_MAX
            );
        }
        cfg.page_in_per_core = self.page_in_per_core;
        cfg.mse_handshakes_per_ip_per_second_max = self.mse_handshakes_per_ip_per_second_max;
        cfg.mse_handshakes_per_core_per_second_max = self.mse_handshakes_per_core_per_second_max;
        cfg.shutdown_grace = Duration::from_millis(self.shutdown_grace_ms);
        cfg.http = self.http.clone();
        self.public_http_url()?;
        if self.http_request_timeout_ms == 0 {
            bail!("http-request-timeout-ms must be at least 1");
        }
        cfg.http_miss_wait = Duration::from_millis(self.http_miss_wait_ms);
        cfg.http_request_timeout = Duration::from_millis(self.http_request_timeout_ms);
        cfg.http_cache_bytes = self.http_cache_mib.saturating_mul(1 << 20);
        cfg.torrent_trackers = self.torrent_trackers();
        Ok(cfg)
    }

    /// The admin plane's settings, or `None` when it is off. Reads the token file.
    pub fn admin_config(&self) -> anyhow::Result<Option<AdminConfig>> {
        if self.admin.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let listen: SocketAddr = self
            .admin
            .parse()
            .map_err(|e| anyhow::anyhow!("admin '{}': {e} (want ADDR:PORT or off)", self.admin))?;
        if !is_loopback(listen.ip()) && !self.admin_allow_remote {
            bail!(
                "admin {listen} is not a loopback address; set admin-allow-remote to expose the \
                 admin plane beyond this host"
            );
        }
        let token = match (&self.admin_token_file, &self.admin_token) {
            (Some(path), _) => {
                let t = std::fs::read_to_string(path)
                    .with_context(|| format!("reading admin-token-file {}", path.display()))?;
                Some(t.trim().to_owned())
            }
            (None, Some(t)) => Some(t.trim().to_owned()),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            bail!("the admin token is empty");
        }
        if let Some(addr) = &self.public_addr {
            addr.parse::<crate::magnet::PeerAddr>()
                .map_err(|e| anyhow::anyhow!("public-addr '{addr}': {e}"))?;
        }
        Ok(Some(AdminConfig {
            listen,
            token,
            public_addr: self.public_addr.clone(),
            trackers: self.torrent_trackers(),
            public_http_url: self.public_http_url()?,
        }))
    }

    /// The trackers put into served .torrent files (admin plane and public HTTP) and
    /// magnets: the ones magnetar announces itself to first (their swarms include it),
    /// then the miss path's.
    pub fn torrent_trackers(&self) -> Vec<String> {
        let mut t = self.upstream.announce_trackers.clone();
        for u in &self.upstream.trackers {
            if !t.contains(u) {
                t.push(u.clone());
            }
        }
        t
    }

    /// `--public-http-url`, checked (http or https, no query) and without a trailing `/`.
    pub fn public_http_url(&self) -> anyhow::Result<Option<String>> {
        let Some(url) = &self.public_http_url else {
            return Ok(None);
        };
        check_public_http_url(url).map(Some)
    }
}

/// A base URL for `xs=`: `http://` or `https://`, a host, no query or fragment (the
/// path `/torrent/<HEX>.torrent` is appended). Returned without its trailing `/`.
pub fn check_public_http_url(url: &str) -> anyhow::Result<String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let ok = rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && !url.contains(['?', '#', '&', ' '])
        && url.is_ascii();
    if !ok {
        bail!("public-http-url '{url}': want http(s)://HOST[:PORT][/PATH], without query");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A copy of `cmd` whose arguments have no defaults, so that parsing with it yields only what
/// the user gave (flags and environment variables). Boolean switches get a "set to true when
/// present" action in place of SetTrue (which always holds a value, false by default).
pub fn explicit_only(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        let a = a.default_value(None::<&'static str>);
        if matches!(a.get_action(), ArgAction::SetTrue) {
            a.action(ArgAction::Set)
                .num_args(0)
                .default_missing_value("true")
                .value_parser(clap::value_parser!(bool))
        } else {
            a
        }
    })
}

/// `explicit_only` applied to subcommand `name` of `cmd`.
pub fn explicit_only_subcommand(cmd: clap::Command, name: &str) -> clap::Command {
    cmd.mut_subcommand(name, explicit_only)
}

/// The default config, as TOML: every key with its doc comment and default value. Keys
/// without a default are written commented out.
pub fn default_config_toml() -> String {
    let serve = ServeSettings::augment_args(clap::Command::new("serve"));
    let ids = |cmd: clap::Command| -> Vec<String> {
        cmd.get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    };
    // The tables of the file: `[upstream]` and `[shared]`, each a flattened struct.
    let tables: [(&str, Vec<String>); 2] = [
        (
            "upstream",
            ids(UpstreamConfig::augment_args(clap::Command::new("u"))),
        ),
        (
            "shared",
            ids(SharedConfig::augment_args(clap::Command::new("s"))),
        ),
    ];
    let mut top = String::new();
    let mut sections = vec![String::new(); tables.len()];
    top.push_str(
        "# magnetar configuration (TOML), as written by `magnetar print-config`.\n\
         # Use it with `magnetar serve --config FILE`. Every key is also a flag of `serve`\n\
         # (key `connections-max` is `--connections-max`); flags override this file.\n\
         # Unknown keys are an error.\n\n",
    );
    // `log` is a global flag, not one of serve's, but a key of the file all the same.
    let log_help = "Log filter: error, warn, info, debug, trace, or a tracing directive list\n\
                    (e.g. \"info,magnetar::upstream=debug\"). Flag: --log (env MAGNETAR_LOG).\n\
                    SIGHUP re-reads it from this file.";
    push_comment(&mut top, log_help);
    top.push_str("log = \"info\"\n\n");
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || tables.iter().any(|(t, _)| *t == id) {
            continue;
        }
        let key = id.replace('_', "-");
        let table = tables
            .iter()
            .position(|(_, ids)| ids.iter().any(|u| u == id));
        let out = match table {
            Some(t) => &mut sections[t],
            None => &mut top,
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        push_comment(out, &help);
        let flag = match (arg.get_long(), arg.get_value_names()) {
            (Some(l), Some(names)) if arg.get_action().takes_values() => {
                format!("--{l} <{}>", names[0])
            }
            (Some(l), _) => format!("--{l}"),
            _ => String::new(),
        };
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# Flag: {flag} (env {})\n", env.to_string_lossy()));
        } else {
            out.push_str(&format!("# Flag: {flag}\n"));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let value = if matches!(arg.get_action(), ArgAction::SetTrue) {
            Some("false".to_owned())
        } else if matches!(arg.get_action(), ArgAction::Append) {
            let items: Vec<String> = defaults.iter().map(|d| toml_scalar(d)).collect();
            Some(format!("[{}]", items.join(", ")))
        } else {
            defaults.first().map(|d| {
                let typed = d.parse::<i64>().is_ok() && {
                    let probe = match table {
                        Some(t) => format!("[{}]\n{key} = {d}\n", tables[t].0),
                        None => format!("{key} = {d}\n"),
                    };
                    ServeSettings::from_toml(&probe).is_ok()
                };
                if typed {
                    d.clone()
                } else {
                    toml_scalar(d)
                }
            })
        };
        match value {
            Some(v) => out.push_str(&format!("{key} = {v}\n\n")),
            None => {
                let name = arg
                    .get_value_names()
                    .and_then(|n| n.first())
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "VALUE".into());
                out.push_str(&format!("# Unset by default:\n# {key} = <{name}>\n\n"));
            }
        }
    }
    for ((name, _), body) in tables.iter().zip(&sections) {
        top = top.trim_end().to_owned() + "\n\n";
        top.push_str(&format!("[{name}]\n"));
        top.push_str(body);
    }
    top.trim_end().to_owned() + "\n"
}

/// A default value as TOML: numbers stay numbers only where the key takes a number, which
/// the caller decides; this quotes strings.
fn toml_scalar(s: &str) -> String {
    if s.parse::<i64>().is_ok() {
        return s.to_owned();
    }
    toml::Value::String(s.to_owned()).to_string()
}

fn push_comment(out: &mut String, text: &str) {
    for para in text.trim().lines() {
        if para.trim().is_empty() {
            out.push_str("#\n");
            continue;
        }
        // Wrap at 90 columns: clap joins a doc comment's lines into one.
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() + 1 + word.len() > 90 && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
}

/// Everything a running server needs to know; built from `ServeSettings`.
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
    /// Serve uTP on UDP at the listen addresses.
    pub utp: bool,
    pub utp_payload_bytes: usize,
    pub utp_initial_window_packets: usize,
    pub utp_socket_buffer_bytes: usize,
    pub utp_gso: bool,
    pub utp_half_open_per_core_max: usize,
    /// io_uring path: zero-copy send for replies with at least this many payload bytes
    /// (0 = never).
    pub send_zc_min_bytes: usize,
    /// Threads of the page-in pool (`server/pagein.rs`).
    pub page_in_threads: usize,
    /// Nice levels below the workers that the page-in threads run at.
    pub page_in_nice: i32,
    /// Page-ins one core may have in flight (`server/pagein.rs`).
    pub page_in_per_core: usize,
    /// MSE handshakes one address may start per second on a core.
    pub mse_handshakes_per_ip_per_second_max: u32,
    /// MSE handshakes one core may start per second from all addresses.
    pub mse_handshakes_per_core_per_second_max: u32,
    /// How long open sessions may run on after a shutdown request.
    pub shutdown_grace: Duration,
    /// Public HTTP listener addresses (empty: off).
    pub http: Vec<SocketAddr>,
    /// How long an HTTP request for an unknown hash waits for the miss path.
    pub http_miss_wait: Duration,
    /// Time an HTTP client has to send a whole request head.
    pub http_request_timeout: Duration,
    /// Bytes of .torrent answers each worker caches in a memfd (0: off).
    pub http_cache_bytes: u64,
    /// announce-list of the .torrent files the public HTTP listener serves.
    pub torrent_trackers: Vec<String>,
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
            utp: true,
            utp_payload_bytes: crate::utp::PAYLOAD_BYTES_DEFAULT,
            utp_initial_window_packets: crate::utp::INITIAL_WINDOW_PACKETS_DEFAULT,
            utp_socket_buffer_bytes: limits::UTP_SOCKET_BUFFER_BYTES_DEFAULT,
            utp_gso: true,
            utp_half_open_per_core_max: limits::UTP_HALF_OPEN_PER_CORE_MAX_DEFAULT,
            send_zc_min_bytes: 0,
            page_in_threads: limits::PAGE_IN_THREADS_DEFAULT,
            page_in_nice: limits::PAGE_IN_NICE_DEFAULT,
            page_in_per_core: limits::PAGE_IN_PER_CORE_DEFAULT,
            mse_handshakes_per_ip_per_second_max:
                limits::MSE_HANDSHAKES_PER_IP_PER_SECOND_MAX_DEFAULT,
            mse_handshakes_per_core_per_second_max:
                limits::MSE_HANDSHAKES_PER_CORE_PER_SECOND_MAX_DEFAULT,
            shutdown_grace: Duration::from_secs(5),
            http: Vec::new(),
            http_miss_wait: Duration::from_millis(limits::HTTP_MISS_WAIT_MS_DEFAULT),
            http_request_timeout: Duration::from_millis(limits::HTTP_REQUEST_TIMEOUT_MS_DEFAULT),
            http_cache_bytes: limits::HTTP_CACHE_MIB_DEFAULT << 20,
            torrent_trackers: Vec::new(),
        }
    }
}

impl ServeConfig {
    /// What the listeners need to know of uTP: off, or the socket buffer size.
    pub fn utp_buffers(&self) -> crate::server::listener::UdpBuffers {
        self.utp.then_some(self.utp_socket_buffer_bytes)
    }
}

/// `0.0.0.0:6881` and `[::]:6881` (the v6 socket is v6-only, so both can bind).
pub fn default_listen() -> Vec<SocketAddr> {
    ServeSettings::default().listen
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = default_config_toml();
        let parsed = ServeSettings::from_toml(&text).unwrap();
        let expected = ServeSettings {
            log: Some("info".into()),
            ..ServeSettings::default()
        };
        assert_eq!(parsed, expected, "{text}");
        assert!(text.contains("[upstream]"));
        assert!(text.contains("# Most open peer connections over all workers\n"));
    }

    #[test]
    fn upstream_defaults_agree_with_its_flags() {
        // UpstreamConfig writes its defaults twice (clap and Default); they must agree.
        assert_eq!(ServeSettings::default().upstream, UpstreamConfig::default());
        assert_eq!(ServeSettings::default().shared, SharedConfig::default());
        assert!(default_config_toml().contains("[shared]\n"));
    }

    #[test]
    fn requests_queued_max_is_capped_by_one_writev() {
        let with = |n: usize| ServeSettings {
            requests_queued_max: n,
            ..ServeSettings::default()
        };
        let max = limits::REQUESTS_QUEUED_MAX_LIMIT;
        assert_eq!(with(max).serve_config().unwrap().requests_queued_max, max);
        for bad in [0, max + 1, 510] {
            let err = with(bad).serve_config().unwrap_err().to_string();
            assert!(
                err.contains("requests-queued-max") && err.contains(&max.to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = ServeSettings::from_toml("conections-max = 5\n").unwrap_err();
        assert!(err.to_string().contains("conections-max"), "{err}");
        let err = ServeSettings::from_toml("[upstream]\nno-dhtt = true\n").unwrap_err();
        assert!(err.to_string().contains("no-dhtt"), "{err}");
    }

    #[test]
    fn explicit_flags_override_the_file_and_nothing_else_does() {
        let mut s = ServeSettings::from_toml(
            "connections-max = 7\nidle-timeout-ms = 9\npin-cores = true\n\
             [upstream]\nno-dht = true\ntrackers = [\"udp://a:1\"]\n",
        )
        .unwrap();
        let cmd = explicit_only(ServeSettings::augment_args(clap::Command::new("serve")));
        let m = cmd
            .try_get_matches_from(["serve", "--connections-max", "8", "--tracker", "udp://b:2"])
            .unwrap();
        s.apply_explicit(&m).unwrap();
        assert_eq!(s.connections_max, 8);
        assert_eq!(s.idle_timeout_ms, 9);
        assert!(
            s.pin_cores,
            "a switch absent from the command line keeps the file's value"
        );
        assert!(s.upstream.no_dht);
        assert_eq!(s.upstream.trackers, vec!["udp://b:2".to_string()]);
    }
}
