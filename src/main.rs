//! The `magnetar` command line: parse arguments, build the config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use magnetar::config::{self, DriverChoice, ServeConfig};
use magnetar::magnet::{Magnet, PeerAddr};
use magnetar::store::{Store, StoreOptions, SyncPolicy};
use magnetar::{limits, metainfo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// magnetar: a BitTorrent peer that always has the metadata.
///
/// Clients holding only a magnet link connect to magnetar (put `x.pe=HOST:PORT` in the
/// magnet) and receive the torrent's info dictionary at once over BEP 9.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, global = true, default_value = "info", env = "MAGNETAR_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve stored metadata to BitTorrent clients.
    Serve(ServeArgs),
    /// Add .torrent files (or directories of them) to the store.
    Import(ImportArgs),
    /// Print a magnet link for a stored torrent.
    Magnet(MagnetArgs),
    /// Fetch a torrent's metadata from the swarm (trackers, DHT, x.pe) and write a .torrent.
    Fetch(magnetar::upstream::cli::FetchArgs),
}

#[derive(Args, Debug)]
struct DataDirArg {
    /// Where the store lives; created if missing. Default: $STATE_DIRECTORY, else
    /// $XDG_DATA_HOME/magnetar, else ~/.local/share/magnetar.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl DataDirArg {
    fn resolve(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(config::default_data_dir)
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Address to accept peers on; repeat for several. Default: 0.0.0.0:6881 and [::]:6881.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Worker threads (one io runtime each). Default: one per CPU.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// io driver: auto (io_uring if the kernel allows it, else epoll), io-uring, epoll.
    #[arg(long, value_enum, default_value = "auto")]
    driver: DriverChoice,
    /// Pin worker i to CPU i.
    #[arg(long)]
    pin_cores: bool,
    /// Most open peer connections over all workers.
    #[arg(long, default_value_t = limits::CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// Most open connections from one IP address.
    #[arg(long, default_value_t = limits::CONNECTIONS_PER_IP_MAX_DEFAULT)]
    connections_per_ip_max: usize,
    /// Time a new connection has to send its handshake.
    #[arg(long, default_value_t = limits::HANDSHAKE_TIMEOUT_MS_DEFAULT, value_name = "MS")]
    handshake_timeout_ms: u64,
    /// Close a connection after this long without a byte from the peer.
    #[arg(long, default_value_t = limits::IDLE_TIMEOUT_MS_DEFAULT, value_name = "MS")]
    idle_timeout_ms: u64,
    /// Send a keep-alive after this long without sending anything.
    #[arg(long, default_value_t = limits::KEEPALIVE_INTERVAL_MS_DEFAULT, value_name = "MS")]
    keepalive_interval_ms: u64,
    /// Requests answered per connection per batch (advertised as reqq); more are rejected.
    #[arg(long, default_value_t = limits::REQUESTS_QUEUED_MAX)]
    requests_queued_max: usize,
    #[command(flatten)]
    upstream: magnetar::upstream::config::UpstreamConfig,
    /// Log the summed per-core counters this often (0: never).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    stats_interval_s: u64,
}

#[derive(Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// .torrent files, or directories searched recursively for *.torrent.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct MagnetArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Info-hash: 40 hex (v1), 32 base32 (v1) or 64 hex (v2).
    info_hash: String,
    /// The address clients should reach magnetar at, added as x.pe (e.g. 203.0.113.5:6881).
    #[arg(long, value_name = "HOST:PORT")]
    public_addr: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Import(args) => import(args),
        Command::Magnet(args) => magnet(args),
        Command::Fetch(args) => magnetar::upstream::cli::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn open_store(dir: &std::path::Path, sync: SyncPolicy) -> anyhow::Result<Store> {
    let opts = StoreOptions {
        sync,
        ..StoreOptions::default()
    };
    let (store, report) = Store::open(dir, opts)
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "store recovered: {report}");
    Ok(store)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = ServeConfig::new(args.data_dir.resolve());
    if !args.listen.is_empty() {
        cfg.listen = args.listen;
    }
    if let Some(t) = args.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        cfg.threads = t;
    }
    cfg.driver = args.driver;
    cfg.pin_cores = args.pin_cores;
    cfg.connections_max = args.connections_max;
    cfg.connections_per_ip_max = args.connections_per_ip_max;
    cfg.handshake_timeout = Duration::from_millis(args.handshake_timeout_ms);
    cfg.idle_timeout = Duration::from_millis(args.idle_timeout_ms);
    cfg.keepalive_interval = Duration::from_millis(args.keepalive_interval_ms);
    let reqq_max = (limits::IOVECS_PER_WRITE_MAX - 4) / 2;
    if args.requests_queued_max == 0 || args.requests_queued_max > reqq_max {
        bail!("--requests-queued-max must be between 1 and {reqq_max} (one writev per batch)");
    }
    cfg.requests_queued_max = args.requests_queued_max;

    let store = Arc::new(open_store(&cfg.data_dir, SyncPolicy::Always)?);
    let (upstream, shard_mailboxes) =
        magnetar::upstream::shard::Upstream::new(args.upstream, store.clone(), cfg.threads);
    let server = magnetar::server::start(cfg, store, upstream, shard_mailboxes)?;
    if args.stats_interval_s == 0 {
        server.join();
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(args.stats_interval_s));
        let fields: Vec<String> = server
            .snapshot()
            .fields()
            .into_iter()
            .filter(|&(_, v)| v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tracing::info!("counters: {}", fields.join(" "));
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.resolve();
    let store = open_store(&dir, SyncPolicy::Batch)?;
    let report = magnetar::import::import_paths(&store, &args.paths, true);
    eprintln!("{report}");
    if report.failed > 0 && report.imported + report.already_present == 0 {
        bail!("no torrent could be imported");
    }
    Ok(())
}

/// Accepts 40 hex or 32 base32 (v1) and 64 hex (v2).
fn parse_info_hash(s: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = match s.len() {
        40 | 64 => hex::decode(s).ok(),
        32 => data_encoding::BASE32
            .decode(s.to_ascii_uppercase().as_bytes())
            .ok(),
        _ => None,
    };
    bytes.with_context(|| format!("'{s}' is not an info-hash (40 hex, 32 base32 or 64 hex)"))
}

fn magnet(args: MagnetArgs) -> anyhow::Result<()> {
    let key = parse_info_hash(&args.info_hash)?;
    let dir = args.data_dir.resolve();
    // Read-only: no lock, so this works beside a running `magnetar serve`.
    let (store, report) = Store::open_read_only(&dir)
        .with_context(|| format!("opening the store in {} (read-only)", dir.display()))?;
    tracing::info!(dir = %dir.display(), "store read: {report}");
    let record = if key.len() == 32 {
        store.lookup_v2(&key.try_into().expect("32 bytes"))
    } else {
        store.lookup(&key.try_into().expect("20 bytes"))
    };
    let record = record.with_context(|| format!("{} is not in the store", args.info_hash))?;
    let summary = metainfo::validate_info(record.info()).context("stored record")?;
    let mut peers = Vec::new();
    if let Some(addr) = &args.public_addr {
        peers.push(
            addr.parse::<PeerAddr>()
                .map_err(|e| anyhow::anyhow!("--public-addr '{addr}': {e}"))?,
        );
    } else {
        eprintln!("note: no --public-addr given, so the magnet has no x.pe pointing at magnetar");
    }
    let magnet = Magnet {
        btih: summary.hashes.v1,
        btmh: summary.hashes.v2,
        display_name: Some(summary.name),
        trackers: Vec::new(),
        peers,
        warnings: Vec::new(),
    };
    println!("{magnet}");
    Ok(())
}
