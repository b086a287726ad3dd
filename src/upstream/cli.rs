//! `magnetar fetch <magnet>`: the miss-path fetcher as a one-shot command. Same sources
//! (the magnet's `x.pe` and `tr`, `--tracker`, the DHT, `--parent`), same fetcher, same
//! verification as the server; prints progress and writes a .torrent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::magnet::{Magnet, PeerAddr};
use crate::metainfo;
use crate::upstream::config::UpstreamConfig;
use crate::upstream::fetch::{self, FetchEvent};
use crate::upstream::tracker::{self, AnnounceRequest};
use crate::upstream::{PeerCandidate, PeerSource};

/// Fetch a torrent's metadata from the swarm and write a .torrent.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The magnet link (its tr and x.pe are used as peer sources).
    pub magnet: String,
    /// Where to write the .torrent (default: <info-hash>.torrent in the current directory).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also store the result in this data dir (it must not be held by a running server).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub upstream: UpstreamConfig,
}

/// Resolves `x.pe` entries (hostnames too) to candidates.
pub fn magnet_peers(magnet: &Magnet) -> Vec<PeerCandidate> {
    let mut out = Vec::new();
    for p in &magnet.peers {
        match p {
            PeerAddr::Socket(addr) => out.push(PeerCandidate {
                addr: *addr,
                source: PeerSource::Magnet,
            }),
            PeerAddr::Host(host, port) => {
                match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port)) {
                    Ok(addrs) => out.extend(addrs.map(|addr| PeerCandidate {
                        addr,
                        source: PeerSource::Magnet,
                    })),
                    Err(e) => tracing::warn!("x.pe {host}:{port}: {e}"),
                }
            }
        }
    }
    out
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let magnet = Magnet::parse(&args.magnet).map_err(|e| anyhow::anyhow!("bad magnet: {e}"))?;
    for w in &magnet.warnings {
        eprintln!("warning: {w}");
    }
    let key = magnet.handshake_key();
    let cfg = args.upstream;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(cfg.fetch_timeout_ms);
    let peer_id = crate::upstream::peer_id(0);

    // Sources: x.pe, parents, trackers (magnet tr + --tracker), the DHT.
    let (tx, rx) = flume::bounded::<PeerCandidate>(1024);
    for c in magnet_peers(&magnet) {
        let _ = tx.try_send(c);
    }
    for p in &cfg.parents {
        if let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(p.as_str()) {
            for addr in addrs {
                let _ = tx.try_send(PeerCandidate {
                    addr,
                    source: PeerSource::Parent,
                });
            }
        }
    }
    let mut trackers = cfg.trackers.clone();
    trackers.extend(
        magnet
            .trackers
            .iter()
            .filter(|t| !cfg.trackers.contains(t))
            .cloned(),
    );
    if !trackers.is_empty() {
        let req = AnnounceRequest {
            info_hash: key,
            peer_id,
            port: 6881,
            left: 1,
            numwant: 50,
        };
        if let Err(e) =
            tracker::spawn_announces(trackers.clone(), req, cfg.tracker_timeout(), tx.clone())
        {
            eprintln!("warning: tracker announces not started: {e}");
        }
    }
    let _dht = if cfg.no_dht {
        None
    } else {
        let node = crate::upstream::dht::start(&cfg).context("starting the DHT node")?;
        if node.get_peers(key, tx.clone(), deadline).is_err() {
            eprintln!("warning: DHT lookup refused by the rate limit");
        }
        Some(node)
    };
    drop(tx);

    let spec = cfg.fetch_spec(key, peer_id, deadline);
    let (ev_tx, ev_rx) = flume::unbounded::<FetchEvent>();
    let printer = std::thread::spawn(move || {
        let (mut found, mut connected, mut failed) = (0usize, 0usize, 0usize);
        while let Ok(ev) = ev_rx.recv() {
            match &ev {
                FetchEvent::PeerFound(_) => found += 1,
                FetchEvent::Connected(_) => connected += 1,
                FetchEvent::PeerFailed(..) | FetchEvent::Banned(_) => failed += 1,
                _ => {}
            }
            eprintln!(
                "[{:>6.2}s] peers found {found}, connected {connected}, failed {failed}: {ev:?}",
                started.elapsed().as_secs_f64()
            );
        }
    });
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("building the io runtime")?;
    let result = rt.block_on(fetch::fetch(spec, rx, Some(ev_tx)));
    let _ = printer.join();
    let success = match result {
        Ok(s) => s,
        Err(e) => bail!("no verified metadata for {}: {e}", hex::encode(key)),
    };
    let summary = metainfo::validate_info(&success.info).context("fetched metadata")?;
    eprintln!(
        "got {} bytes of metadata for '{}' from {} ({}) in {:.2}s",
        success.info.len(),
        summary.name,
        success.from.addr,
        success.from.source.name(),
        started.elapsed().as_secs_f64()
    );

    let torrent = metainfo::build_torrent(&success.info, &trackers);
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.torrent", hex::encode(key))));
    std::fs::write(&out, &torrent).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());

    if let Some(dir) = args.data_dir {
        let (store, _) = crate::store::Store::open(&dir, Default::default())
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        store
            .append(&success.info, Default::default())
            .context("storing the metadata")?;
        eprintln!("stored in {}", dir.display());
    }
    Ok(())
}
