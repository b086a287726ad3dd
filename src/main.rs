//! The `magnetar` command line: parse arguments, build the config, run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};

use magnetar::admin::Admin;
use magnetar::config::{self, ServeSettings};
use magnetar::magnet::{Magnet, PeerAddr};
use magnetar::metainfo;
use magnetar::store::{Store, StoreOptions, SyncPolicy};

use magnetar::server::lifecycle;

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
    /// Default: info (or `log` in serve's config file).
    #[arg(long, global = true, env = "MAGNETAR_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Serve stored metadata to BitTorrent clients.
    Serve(ServeArgs),
    /// Print the default config file (every setting of `serve`, documented) to stdout.
    PrintConfig,
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
    /// TOML config file (see `magnetar print-config`); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ServeSettings,
}

#[derive(Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// .torrent files, or directories searched recursively for *.torrent.
    #[arg(required_unless_present = "from", value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Import every info dict of a shared store (s3://BUCKET[/PREFIX]) instead: prefill
    /// a new node. Credentials as for `serve --shared-store` (AWS_* variables or the
    /// --shared-* flags); tombstones there are applied here.
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]", conflicts_with = "paths")]
    from: Option<String>,
    #[command(flatten)]
    shared: magnetar::shared::SharedConfig,
}

#[derive(Args, Debug)]
struct MagnetArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Info-hash: 40 hex (v1), 32 base32 (v1) or 64 hex (v2).
    info_hash: String,
    /// The address clients should reach magnetar at, added as x.pe and xsource
    /// (e.g. 203.0.113.5:6881).
    #[arg(long, value_name = "HOST:PORT")]
    public_addr: Option<String>,
    /// A tracker `magnetar serve --announce-tracker` announces to, added as tr; repeatable.
    #[arg(long = "announce-tracker", value_name = "URL")]
    announce_trackers: Vec<String>,
    /// The URL `magnetar serve --http` is reached at (e.g. https://cache.example.org/),
    /// added as xs=URL/torrent/<HEX>.torrent (webtorrent and BiglyBT fetch it).
    #[arg(long, value_name = "URL")]
    public_http_url: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args, cli.log),
        Command::PrintConfig => {
            print!("{}", config::default_config_toml());
            Ok(())
        }
        Command::Import(args) => {
            init_logging(cli.log.as_deref().unwrap_or("info"));
            import(args)
        }
        Command::Magnet(args) => {
            init_logging(cli.log.as_deref().unwrap_or("info"));
            magnet(args)
        }
        Command::Fetch(args) => {
            init_logging(cli.log.as_deref().unwrap_or("info"));
            magnetar::upstream::cli::run(args)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

type LogReload =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn parse_filter(filter: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: log filter '{filter}' is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    })
}

/// Installs the stderr logger; the returned handle swaps the filter (SIGHUP).
fn init_logging(filter: &str) -> LogReload {
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(parse_filter(filter));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    handle
}

fn open_store(
    dir: &std::path::Path,
    sync: SyncPolicy,
    capacity_bytes: u64,
) -> anyhow::Result<(Store, magnetar::store::RecoveryReport)> {
    let opts = StoreOptions {
        sync,
        capacity_bytes,
        ..StoreOptions::default()
    };
    let (store, report) = Store::open(dir, opts)
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "store recovered: {report}");
    Ok((store, report))
}

/// Settings: the config file (if any) under the flags actually given.
fn resolve_settings(
    args: &ServeArgs,
    cli_log: Option<String>,
) -> anyhow::Result<(ServeSettings, bool)> {
    let mut settings = match &args.config {
        Some(path) => ServeSettings::from_file(path)?,
        None => ServeSettings::default(),
    };
    // Parse the command line again without defaults: only what the user gave overrides.
    let explicit = config::explicit_only_subcommand(Cli::command(), "serve")
        .try_get_matches_from(std::env::args_os())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(m) = explicit.subcommand_matches("serve") {
        settings.apply_explicit(m)?;
    }
    let log_pinned = cli_log.is_some();
    if let Some(log) = cli_log {
        settings.log = Some(log);
    }
    Ok((settings, log_pinned))
}

fn serve(args: ServeArgs, cli_log: Option<String>) -> anyhow::Result<()> {
    // Before any thread exists, so every thread inherits the mask and the signals wait for
    // the main thread's sigwait (no async-signal-safety puzzles in handlers).
    let signals = lifecycle::block_signals();
    let (settings, log_pinned) = resolve_settings(&args, cli_log)?;
    let log = init_logging(settings.log_filter());
    let cfg = settings.serve_config()?;
    let admin_cfg = settings.admin_config()?;
    let inherited = magnetar::server::listener::inherited_from_systemd()
        .context("reading the sockets passed by systemd (LISTEN_FDS)")?;
    if !inherited.peer.is_empty() {
        tracing::info!(
            sockets = inherited.peer.len(),
            "socket activation: serving peers on the sockets systemd passed; listen is ignored"
        );
    }
    if !inherited.http.is_empty() {
        tracing::info!(
            sockets = inherited.http.len(),
            "socket activation: the public HTTP listener is on the sockets systemd passed \
             (FileDescriptorName=http); http is ignored"
        );
    }

    let (store, recovery) = open_store(&cfg.data_dir, SyncPolicy::Always, settings.store_capacity)?;
    let store = Arc::new(store);
    let admin = match admin_cfg {
        Some(a) => Some(Admin::start(a, store.clone(), recovery)?),
        None => None,
    };
    let (upstream, shard_mailboxes) = magnetar::upstream::shard::Upstream::new(
        settings.upstream.clone(),
        store.clone(),
        cfg.threads,
    );
    let grace = cfg.shutdown_grace;
    // Before the server takes its first miss: the store's listener must be in place so no
    // stored record escapes the uploader (the cursor walk covers what came before).
    let shared = if settings.shared.enabled() {
        let tier = magnetar::shared::SharedTier::start(
            settings.shared.clone(),
            store.clone(),
            &cfg.data_dir,
            settings.upstream.metadata_bytes_max,
        )
        .context("starting the shared tier")?;
        upstream.set_shared(tier.clone());
        Some(tier)
    } else {
        None
    };
    upstream
        .start_dht(cfg.utp)
        .context("starting the DHT node")?;
    let server = magnetar::server::start(
        cfg,
        store.clone(),
        upstream.clone(),
        shard_mailboxes,
        inherited,
    )?;
    // Announces (DHT, trackers) carry the port peers reach us at: the public address's,
    // else the one we listen on.
    let public_port = settings
        .public_addr
        .as_deref()
        .and_then(|a| a.parse::<PeerAddr>().ok())
        .map(|p| match p {
            PeerAddr::Socket(s) => s.port(),
            PeerAddr::Host(_, port) => port,
        });
    if let Some(port) = public_port.or(server.local_addrs.first().map(|a| a.port())) {
        upstream.set_listen_port(port);
    }
    upstream.set_listen_addrs(server.local_addrs.clone());
    {
        let cores = server.stats.clone();
        upstream.set_served_source(Box::new(move |into| {
            for core in &cores {
                core.served.merge_into(into);
            }
        }));
    }
    let mut ready_line = format!("ready {}", server.describe());
    if let Some(a) = &admin {
        let (u, m) = (upstream.clone(), upstream.clone());
        a.state
            .add_metrics_hook(Arc::new(move |out: &mut String| u.write_metrics(out)));
        a.state
            .set_fetch_hook(Arc::new(move |magnet| Box::pin(m.fetch_magnet(&magnet))));
        if let Some(tier) = &shared {
            let (t, n) = (tier.clone(), tier.clone());
            a.state
                .add_metrics_hook(Arc::new(move |out: &mut String| t.write_metrics(out)));
            a.state
                .add_readiness_note(Arc::new(move || n.degraded_note()));
        }
        a.state.set_cores(server.stats.clone());
        a.state.set_ready();
        ready_line.push_str(&format!(" admin={}", a.local_addr));
    }
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{ready_line}");
        let _ = stdout.flush();
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    lifecycle::start_watchdog(server.stats.clone());

    let stats_every =
        (settings.stats_interval_s > 0).then(|| Duration::from_secs(settings.stats_interval_s));
    let mut next_stats = stats_every.map(|d| std::time::Instant::now() + d);
    loop {
        let wait = next_stats.map(|t| t.saturating_duration_since(std::time::Instant::now()));
        match signals.wait(wait) {
            Some(lifecycle::Signal::Reload) => {
                reload(&args, &store, &log, log_pinned);
            }
            Some(lifecycle::Signal::Stop(name)) => {
                tracing::info!("{name}: stopping (grace {grace:?})");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                if let Some(a) = &admin {
                    a.state.set_stopping();
                }
                let report = server.shutdown(grace);
                tracing::info!(
                    sessions_cut = report.sessions_cut,
                    workers_stuck = report.workers_stuck,
                    "workers stopped in {:?}",
                    report.elapsed
                );
                if let Some(a) = admin {
                    a.shutdown(Duration::from_secs(10));
                }
                if let Some(tier) = &shared {
                    // Uploads still queued get the grace too; the rest go up after the
                    // next start (durable cursor).
                    tier.shutdown(grace);
                }
                store.sync().context("flushing the store")?;
                // The index checkpoint: the next start takes it instead of re-hashing every
                // record (the store's drop writes it too, if this was the last reference).
                if let Err(e) = store.checkpoint() {
                    tracing::warn!("index checkpoint not written (the next start re-verifies every record): {e}");
                }
                drop(store);
                tracing::info!("stopped");
                return Ok(());
            }
            None => {}
        }
        if let (Some(t), Some(every)) = (next_stats, stats_every) {
            if std::time::Instant::now() >= t {
                log_counters(&server);
                next_stats = Some(t + every);
            }
        }
    }
}

fn log_counters(server: &magnetar::server::Server) {
    let fields: Vec<String> = server
        .snapshot()
        .fields()
        .into_iter()
        .filter(|&(k, v)| v != 0 && k != "heartbeats")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!("counters: {}", fields.join(" "));
}

/// SIGHUP: re-read the blocklist, and the log level from the config file (unless `--log`
/// or MAGNETAR_LOG pinned it).
fn reload(args: &ServeArgs, store: &Store, log: &LogReload, log_pinned: bool) {
    match store.reload_blocklist() {
        Ok(r) => tracing::info!(
            entries = r.entries,
            unpublished = r.unpublished,
            bad_lines = r.bad_lines.len(),
            "SIGHUP: blocklist reloaded"
        ),
        Err(e) => tracing::error!("SIGHUP: blocklist reload failed: {e}"),
    }
    if log_pinned {
        return;
    }
    let Some(path) = &args.config else { return };
    match ServeSettings::from_file(path) {
        Ok(s) => {
            let filter = s.log_filter().to_owned();
            match log.reload(parse_filter(&filter)) {
                Ok(()) => tracing::info!(log = %filter, "SIGHUP: log filter reloaded"),
                Err(e) => tracing::error!("SIGHUP: log filter reload failed: {e}"),
            }
        }
        Err(e) => tracing::error!("SIGHUP: config file not reloaded: {e:#}"),
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.resolve();
    let (store, _) = open_store(&dir, SyncPolicy::Batch, 0)?;
    if let Some(url) = args.from {
        let mut shared = args.shared;
        shared.shared_store = Some(url.clone());
        let report = magnetar::shared::import::import_from(&shared, Arc::new(store))
            .with_context(|| format!("importing from {url}"))?;
        eprintln!("{report}");
        if report.failed + report.corrupt > 0 && report.imported + report.already_present == 0 {
            bail!("no object could be imported");
        }
        return Ok(());
    }
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
    let exact_sources = match &args.public_http_url {
        Some(url) => {
            let base = config::check_public_http_url(url)?;
            let hashes = &summary.hashes;
            magnetar::magnet::exact_source_url(&base, hashes.v1.as_ref(), hashes.v2.as_ref())
                .into_iter()
                .collect()
        }
        None => Vec::new(),
    };
    let magnet = Magnet {
        btih: summary.hashes.v1,
        btmh: summary.hashes.v2,
        display_name: Some(summary.name),
        trackers: args.announce_trackers,
        peers,
        exact_sources,
        warnings: Vec::new(),
    };
    println!("{magnet}");
    Ok(())
}
