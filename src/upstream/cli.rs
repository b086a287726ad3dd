//! `magnetar fetch <magnet>`: the miss-path fetcher as a one-shot command.

use std::path::PathBuf;

use crate::upstream::config::UpstreamConfig;

/// Fetch a torrent's metadata from the swarm and write a .torrent.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The magnet link (its tr and x.pe are used as peer sources).
    pub magnet: String,
    /// Where to write the .torrent (default: <name>.torrent in the current directory).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also store the result in this data dir (it must not be held by a running server).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub upstream: UpstreamConfig,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("magnetar fetch is not built yet")
}
