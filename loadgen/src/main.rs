//! CLI of magnetar-loadgen: `magnetar-loadgen [run flags]` runs the load;
//! `gen-store` and `recover` build and time synthetic stores. See `--help`.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use magnetar_loadgen::run::{self, Driver, Mode, RunConfig, Transport};
use magnetar_loadgen::store_gen::{self, GenOptions};
use magnetar_loadgen::synth::SizeMix;
use magnetar_loadgen::{peer, report, targets};

/// Connections per loopback source address by default: half of magnetar's default
/// `--connections-per-ip-max` (64), because churn briefly holds more than that.
const CONNECTIONS_PER_SOURCE_DEFAULT: usize = 32;

#[derive(Parser)]
#[command(
    name = "magnetar-loadgen",
    version,
    about = "Simulated BitTorrent peers fetching metadata (BEP 9) from magnetar or any peer",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write K synthetic, valid info dicts into a magnetar store (and/or hash list,
    /// .torrent files for a libtorrent seed, the floor server's input).
    GenStore(GenArgs),
    /// Time opening a store as the server does (every record re-verified).
    Recover(RecoverArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Peer to load (repeatable; connections are spread over them).
    #[arg(long = "target", value_name = "HOST:PORT")]
    targets: Vec<String>,
    /// Info-hashes to fetch: one per line (40 hex, 64 hex, or magnet links).
    #[arg(long, value_name = "FILE")]
    hashes: Option<PathBuf>,
    /// Fetch every info-hash stored in this magnetar data dir.
    #[arg(long, value_name = "DIR")]
    from_store: Option<PathBuf>,
    /// Zipf popularity with this exponent (rank = order in the list); default uniform.
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
    /// Share of fetches for random unknown info-hashes (counted as misses, not errors).
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    miss_ratio: f64,
    #[arg(long, value_enum, default_value = "churn")]
    mode: Mode,
    /// How every connection is made: TCP, or uTP (BEP 29) over one UDP socket each.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Concurrent connections (closed loop: each starts its next fetch when one ends).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Runtime threads (one monoio runtime each).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pin thread i to the i-th CPU this process may use (see `taskset`).
    #[arg(long)]
    pin: bool,
    #[arg(long, value_enum, default_value = "auto")]
    driver: Driver,
    /// io_uring without COOP_TASKRUN (the loadgen before 2026-12-07): every datagram or
    /// segment arriving while a thread runs interrupts it, and on loopback the sender,
    /// i.e. the server under test, pays for that interrupt. For comparing with old runs.
    #[arg(long)]
    uring_interrupting: bool,
    /// Run this long: seconds, or with a unit (`8s`, `500ms`, `2m`)...
    #[arg(long, default_value = "10", value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,
    /// ...or stop after this many fetches (whichever comes first).
    #[arg(long, value_name = "N")]
    fetches: Option<u64>,
    /// Open loop: start this many fetches per second in total (latency counts from the
    /// scheduled start); default closed loop.
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    /// Requests in flight per connection (default: all pieces at once).
    #[arg(long, default_value_t = 1024)]
    pipeline: usize,
    /// Hash every assembled dict against its info-hash.
    #[arg(long)]
    verify: bool,
    /// Give up on one fetch (connect included) after this long (seconds, or `500ms`, …).
    #[arg(long, default_value = "10", value_name = "DURATION", value_parser = parse_duration)]
    timeout: Duration,
    /// Bind connections (TCP or uTP) to this many source addresses 127.0.0.1, .2, …
    /// (loopback targets only; each gives ~28k ports per target). 0 = as many as
    /// `--connections` needs: ports, and at most 32 connections per address, half of
    /// magnetar's default --connections-per-ip-max (64).
    #[arg(long, default_value_t = 0, value_name = "N")]
    sources: u8,
    /// Idle mode: write the connection count here once all are established.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Print one JSON line with the results at the end.
    #[arg(long)]
    json: bool,
    /// Write the latency histograms as an HdrHistogram log.
    #[arg(long, value_name = "FILE")]
    histogram: Option<PathBuf>,
    /// Write a latency-by-percentile plot.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Print the live line each second even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct GenArgs {
    /// magnetar data dir to create/extend.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// `real` (1–8 metadata pieces, like real torrents) or a size in bytes per dict.
    #[arg(long, default_value = "real")]
    size: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the v1 info-hashes here, one per line.
    #[arg(long, value_name = "FILE")]
    hashes: Option<PathBuf>,
    /// Write a .torrent per dict into this directory.
    #[arg(long, value_name = "DIR")]
    torrents: Option<PathBuf>,
    /// Write the floor server's input ([key][u32 LE len][dict]…).
    #[arg(long, value_name = "FILE")]
    floor: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Args)]
struct RecoverArgs {
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

/// A duration: a bare number of seconds (`10`, `0.5`) or a number with a unit
/// (`500ms`, `8s`, `2m`, `1h`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected seconds or a number with ms, s, m or h"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("`{s}`: unknown unit `{u}` (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("magnetar-loadgen: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::GenStore(a)) => gen(a),
        Some(Command::Recover(a)) => recover(a),
        None => run_load(cli.run),
    }
}

fn gen(a: GenArgs) -> anyhow::Result<()> {
    let mix = match a.size.as_str() {
        "real" => SizeMix::Real,
        n => SizeMix::Fixed(n.parse().context("--size: `real` or a byte count")?),
    };
    if a.data_dir.is_none() && a.hashes.is_none() && a.torrents.is_none() && a.floor.is_none() {
        bail!("nothing to write: give --data-dir, --hashes, --torrents and/or --floor");
    }
    let (n, bytes, elapsed) = store_gen::gen_store(&GenOptions {
        data_dir: a.data_dir,
        count: a.count,
        mix,
        seed: a.seed,
        hashes: a.hashes,
        torrents: a.torrents,
        floor: a.floor,
        threads: a.threads,
    })?;
    println!(
        "generated {n} info dicts ({:.1} MB) in {:.2} s",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn recover(a: RecoverArgs) -> anyhow::Result<()> {
    let runs = store_gen::recover(&a.data_dir, a.runs)?;
    let mut ms: Vec<f64> = runs.iter().map(|r| r.2.as_secs_f64() * 1e3).collect();
    for (i, (records, bytes, d)) in runs.iter().enumerate() {
        println!(
            "run {}: {records} records ({:.1} MB) recovered in {:.1} ms",
            i + 1,
            *bytes as f64 / 1e6,
            d.as_secs_f64() * 1e3
        );
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let (records, bytes, _) = runs[0];
    println!(
        "median {median:.1} ms: {:.0} records/s, {:.0} MB/s",
        records as f64 / (median / 1e3),
        bytes as f64 / 1e6 / (median / 1e3)
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"records": records, "bytes": bytes, "median_ms": median, "runs_ms": ms})
        );
    }
    Ok(())
}

fn raise_fd_limit() {
    // SAFETY: get/setrlimit on plain structs.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn fd_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

fn run_load(a: RunArgs) -> anyhow::Result<()> {
    if a.targets.is_empty() {
        bail!("give at least one --target HOST:PORT (or a subcommand; see --help)");
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for t in &a.targets {
        addrs.push(
            t.to_socket_addrs()
                .with_context(|| format!("resolving {t}"))?
                .next()
                .with_context(|| format!("{t} resolves to nothing"))?,
        );
    }
    let keys = match (&a.hashes, &a.from_store) {
        (Some(f), None) => targets::hashes_from_file(f)?,
        (None, Some(d)) => targets::hashes_from_store(d)?,
        _ => bail!("give exactly one of --hashes FILE or --from-store DIR"),
    };
    raise_fd_limit();
    let limit = fd_limit();
    if a.connections as u64 + 64 > limit {
        bail!(
            "--connections {} needs more file descriptors than the limit of {limit} (hard limit; raise it with `ulimit -Hn` as root)",
            a.connections
        );
    }
    // Ports: ~28k ephemeral ports per (source, target) pair; TIME_WAIT reuse covers churn.
    let loopback = addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4());
    let sources = match a.sources {
        0 if loopback => {
            // Ports, and the server's per-address cap: churn briefly holds more than
            // `connections` per address (closes the server has not seen yet), so stay at
            // half of magnetar's default --connections-per-ip-max.
            let per_pair = 25_000usize;
            let by_ports = a.connections.div_ceil(per_pair * addrs.len());
            let by_cap = a.connections.div_ceil(CONNECTIONS_PER_SOURCE_DEFAULT);
            let need = by_ports.max(by_cap).clamp(1, 254);
            if need > 1 {
                eprintln!(
                    "magnetar-loadgen: {} connections: binding to {need} source addresses 127.0.0.1..{need}",
                    a.connections
                );
            }
            need
        }
        0 => 1,
        n if !loopback => bail!("--sources {n} only works with IPv4 loopback targets"),
        n => n as usize,
    };
    let sources: Vec<IpAddr> = if sources > 1 {
        (1..=sources as u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    } else {
        Vec::new()
    };
    let cfg_sources = sources.len().max(1);
    let picker = targets::Picker::new(keys, a.zipf, a.miss_ratio);
    let cfg = RunConfig {
        targets: addrs,
        mode: a.mode,
        transport: a.transport,
        threads: a.threads,
        connections: a.connections,
        duration: a.duration,
        fetches: a.fetches,
        rate: a.rate,
        pipeline: a.pipeline,
        verify: a.verify,
        timeout: a.timeout,
        sources,
        driver: a.driver,
        uring_interrupting: a.uring_interrupting,
        pin: a.pin,
        seed: a.seed,
        ready_file: a.ready_file.clone(),
    };
    let show = a.progress || std::io::stderr().is_terminal();
    let mut prev = [0u64; 6];
    let mut prev_at = Duration::ZERO;
    let result = run::run(cfg, picker, |at, now| {
        if show {
            let dt = (at - prev_at).as_secs_f64();
            eprintln!("{}", report::live_line(at, now, prev, dt));
        }
        prev = now;
        prev_at = at;
    })?;
    let mode = match a.mode {
        Mode::Churn => "churn",
        Mode::Keepalive => "keepalive",
        Mode::Idle => "idle",
    };
    print!("{}", report::table(&result));
    let closed = result.errors[peer::FetchError::Closed as usize];
    if closed > 0 {
        let per_source = a.connections.div_ceil(cfg_sources.max(1));
        eprintln!(
            "magnetar-loadgen: the server closed {closed} connections before their fetch ended. \
             {per_source} connections per source address: if the server's \
             --connections-per-ip-max (default 64) is near that, churn exceeds it for a moment \
             (closes it has not seen yet); raise it, or spread with --sources N (loopback)."
        );
    }
    if let Some(path) = &a.histogram {
        report::write_histogram_log(&result, path)?;
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "magnetar-loadgen {mode}, {} {} connections, {} → {}",
            a.connections,
            a.transport.name(),
            a.targets.join(","),
            result.driver
        );
        std::fs::write(path, report::plot_svg(&result, &title))
            .with_context(|| format!("writing {path:?}"))?;
    }
    if a.json {
        let mut j = report::json(&result, mode, a.connections, a.threads.max(1));
        j["transport"] = a.transport.name().into();
        println!("{j}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_with_and_without_units() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert_eq!(ok("0.5"), Duration::from_millis(500));
        assert_eq!(ok("8s"), Duration::from_secs(8));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok(" 3 s "), Duration::from_secs(3));
        assert_eq!(ok("0"), Duration::ZERO);
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in [
            "", "s", "ms", "8x", "-1", "1.2.3s", "5 sec", "1e3", "nan", "inf",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn duration_flag_takes_units() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["magnetar-loadgen", "--duration", "8s"]).unwrap();
        assert_eq!(cli.run.duration, Duration::from_secs(8));
        let cli = super::Cli::try_parse_from(["magnetar-loadgen", "--duration", "2m"]).unwrap();
        assert_eq!(cli.run.duration, Duration::from_secs(120));
        let cli = super::Cli::try_parse_from(["magnetar-loadgen"]).unwrap();
        assert_eq!(cli.run.duration, Duration::from_secs(10));
        assert_eq!(cli.run.transport, super::Transport::Tcp);
        let cli = super::Cli::try_parse_from(["magnetar-loadgen", "--transport", "utp"]).unwrap();
        assert_eq!(cli.run.transport, super::Transport::Utp);
    }
}
