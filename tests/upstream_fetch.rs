//! The miss path's client side against real peers on loopback: a libtorrent seed (v1,
//! v2, hybrid; 1 to 10 metadata pieces), and hostile peers written here with the wire
//! codec (liars, size games, unrequested and short pieces, silence). Each test is bounded
//! by the fetch deadlines it sets, and the libtorrent seed's start by a 60 s readiness wait.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::bep9::{FakeSeed, SeedBehaviour};
use common::info::{v1_info_with, v1_key};
use common::*;
use magnetar::upstream::fetch::{fetch, FetchError, FetchEvent, FetchSpec, PRIVATE_VIA_DHT_OR_PEX};
use magnetar::upstream::peer::{fetch_from_peer, PeerFetchConfig};
use magnetar::upstream::{PeerCandidate, PeerSource};

/// Records the largest single allocation, to show that a peer announcing a huge
/// `metadata_size` does not make us allocate it.
struct LargestAlloc;

static LARGEST_ALLOC_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC_BYTES.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

fn block_on<Fut: Future>(fut: Fut) -> Fut::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(fut)
}

/// Inside the runtime that ran the fetch (so its tasks could still be alive): waits up
/// to 5 s for the test peer to see our side of a connection close.
async fn closed_within(peer: &FakeSeed, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(5) {
        if let Some(at) = peer.try_closed() {
            return Some(at.duration_since(since));
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn peer_cfg(key: [u8; 20], peer_timeout: Duration) -> PeerFetchConfig {
    PeerFetchConfig {
        key,
        peer_id: *b"-MX0100-upstreamtest",
        metadata_bytes_max: magnetar::limits::METADATA_BYTES_MAX,
        connect_timeout: Duration::from_secs(5),
        peer_timeout,
        stall_timeout: magnetar::upstream::config::PEER_STALL_TIMEOUT,
        v2_bit: false,
    }
}

fn spec(key: [u8; 20], peers_max: usize, within: Duration) -> FetchSpec {
    FetchSpec {
        key,
        peer_id: *b"-MX0100-upstreamtest",
        metadata_bytes_max: magnetar::limits::METADATA_BYTES_MAX,
        peers_max,
        connect_timeout: Duration::from_secs(5),
        peer_timeout: Duration::from_secs(10),
        stall_timeout: magnetar::upstream::config::PEER_STALL_TIMEOUT,
        deadline: Instant::now() + within,
    }
}

fn candidates(list: &[(SocketAddr, PeerSource)], close: bool) -> flume::Receiver<PeerCandidate> {
    let (tx, rx) = flume::unbounded();
    for &(addr, source) in list {
        tx.send(PeerCandidate { addr, source }).unwrap();
    }
    if !close {
        // Keep the channel open (a source still searching) for the whole test.
        std::mem::forget(tx);
    }
    rx
}

// ---------------------------------------------------------------------------------------
// libtorrent

#[test]
fn fetch_from_peer_gets_v1_v2_hybrid_metadata_from_libtorrent() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(tmp.path());
    let labels = ["v1-small", "v1-large", "v2-large", "hybrid-large"];
    let paths: Vec<&Path> = labels.iter().map(|l| torrents[*l].path.as_path()).collect();
    let seed = LtSeed::start(&paths, &tmp.path().join("content"), &[]);
    assert_eq!(torrents["v1-small"].metadata_pieces, 1);
    assert!(torrents["v1-large"].metadata_pieces >= 5);
    // (label, key): every torrent by each of its handshake keys.
    let mut cases = Vec::new();
    for l in labels {
        let t = &torrents[l];
        cases.extend(t.v1_key().map(|k| (l, k)));
        cases.extend(t.v2_key().map(|k| (l, k)));
    }
    assert_eq!(cases.len(), 5);
    on_both_drivers(|| async {
        for &(label, key) in &cases {
            let cfg = peer_cfg(key, Duration::from_secs(20));
            let info = fetch_from_peer(seed.addr(), &cfg)
                .await
                .unwrap_or_else(|e| panic!("{label} by {}: {e}", hex::encode(key)));
            assert!(info == torrents[label].info, "{label}: bytes differ");
        }
    });
}

#[test]
fn a_liar_next_to_a_libtorrent_seed_is_banned_and_the_seed_wins() {
    require_libtorrent();
    let tmp = tempfile::tempdir().unwrap();
    let torrents = make_lt_torrents(tmp.path());
    let seed = LtSeed::start(
        &[&torrents["v1-large"].path],
        &tmp.path().join("content"),
        &[],
    );
    let t = &torrents["v1-large"];
    let key = t.v1_key().unwrap();
    let liar = FakeSeed::start(t.info.clone(), key, SeedBehaviour::Liar);
    // One peer at a time, liar first: it is certainly tried to the end.
    let rx = candidates(
        &[
            (liar.addr, PeerSource::Tracker),
            (seed.addr(), PeerSource::Dht),
            (liar.addr, PeerSource::Pex),
        ],
        true,
    );
    let (ev_tx, ev_rx) = flume::unbounded();
    let ok = block_on(fetch(
        spec(key, 1, Duration::from_secs(30)),
        rx,
        Some(ev_tx),
    ))
    .unwrap();
    assert!(ok.info == t.info);
    assert_eq!(ok.from.addr, seed.addr());
    assert_eq!(ok.banned, vec![liar.addr]);
    assert_eq!(
        ok.peers_tried, 2,
        "the duplicate address is not tried again"
    );
    assert!(!ok.summary.private);
    let events: Vec<FetchEvent> = ev_rx.drain().collect();
    assert!(events.contains(&FetchEvent::Banned(liar.addr)));
    assert!(events.contains(&FetchEvent::Connected(seed.addr())));
    let found = events
        .iter()
        .filter(|e| matches!(e, FetchEvent::PeerFound(_)))
        .count();
    assert_eq!(found, 2);
    assert!(events.iter().any(|e| matches!(
        e,
        FetchEvent::Piece { addr, received: 8, total: 8 } if *addr == seed.addr()
    )));
}

/// A valid v1 info dict of 3+ metadata pieces (the `pieces` string carries the bulk).
fn sample_info(private: bool) -> Vec<u8> {
    let info = v1_info_with("test.bin", 2_500, private);
    let summary = magnetar::metainfo::validate_info(&info).unwrap();
    assert_eq!(summary.private, private);
    info
}

/// A peer that stops answering with our requests outstanding (libtorrent's uTP ends a
/// connection that way after three lost transmissions of one packet, telling nobody) is
/// noticed after `stall_timeout`, not the whole peer timeout, and gets one fresh
/// connection, which completes.
#[test]
fn a_peer_that_stalls_gets_one_fresh_connection() {
    let info = sample_info(false);
    assert!(
        info.len() > 2 * 16 * 1024,
        "a stall needs a request left unanswered"
    );
    let key = v1_key(&info);
    on_both_drivers(|| async {
        let seed = FakeSeed::start(info.clone(), key, SeedBehaviour::StallsFirstConnection);
        let mut cfg = peer_cfg(key, Duration::from_secs(20));
        cfg.stall_timeout = Duration::from_millis(500);
        let started = Instant::now();
        let got = fetch_from_peer(seed.addr, &cfg).await;
        let elapsed = started.elapsed();
        assert!(got.unwrap() == info);
        assert_eq!(seed.connections(), 2);
        assert!(
            elapsed >= cfg.stall_timeout && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
    });
}

#[test]
fn hostile_peers_fail_with_their_reason_and_bounded_memory() {
    let info = sample_info(false);
    assert!(info.len() > 2 * 16 * 1024);
    let key = v1_key(&info);
    let cases = [
        (SeedBehaviour::HONEST, None),
        (SeedBehaviour::Liar, Some("hash_mismatch")),
        (SeedBehaviour::HugeSize, Some("size")),
        (SeedBehaviour::SizeChangesAfterRequests, Some("size")),
        (SeedBehaviour::DataBeforeRequest, Some("protocol")),
        (SeedBehaviour::ShortPiece, Some("protocol")),
        (SeedBehaviour::Rejects, Some("rejected")),
        (SeedBehaviour::NoSize, Some("size")),
        (SeedBehaviour::Silent, Some("timeout")),
        (SeedBehaviour::Stalls, Some("stalled")),
    ];
    let peers: Vec<(SeedBehaviour, Option<&str>, FakeSeed)> = cases
        .iter()
        .map(|&(b, r)| (b, r, FakeSeed::start(info.clone(), key, b)))
        .collect();
    on_both_drivers(|| async {
        for (b, reason, peer) in &peers {
            let mut cfg = peer_cfg(key, Duration::from_millis(1500));
            // Short, so a stall (twice: the fresh connection stalls too) shows within the
            // 1.5 s exchange; the fake seeds answer at once.
            cfg.stall_timeout = Duration::from_millis(300);
            let started = Instant::now();
            let got = fetch_from_peer(peer.addr, &cfg).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{b:?} took too long"
            );
            match (got, reason) {
                (Ok(bytes), None) => assert!(bytes == info),
                (Err(e), Some(r)) => assert_eq!(e.reason(), *r, "{b:?}: {e}"),
                (got, _) => panic!("{b:?}: {:?}", got.map(|v| v.len())),
            }
        }
    });
    let largest = LARGEST_ALLOC_BYTES.load(Ordering::Relaxed);
    assert!(largest < 256 << 20, "largest allocation {largest} bytes");
    // Our side of every connection was closed when fetch_from_peer returned.
    for (b, _, peer) in &peers {
        peer.closed_within(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{b:?}: connection left open"));
    }
}

#[test]
fn only_liars_end_in_no_peers_or_deadline() {
    let info = sample_info(false);
    let key = v1_key(&info);
    let liar = FakeSeed::start(info.clone(), key, SeedBehaviour::Liar);
    let huge = FakeSeed::start(info.clone(), key, SeedBehaviour::HugeSize);
    let silent = FakeSeed::start(info.clone(), key, SeedBehaviour::Silent);
    let unreachable = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
        // Dropped: connecting is refused.
    };
    let list = [
        (liar.addr, PeerSource::Tracker),
        (huge.addr, PeerSource::Dht),
        (unreachable, PeerSource::Magnet),
        (liar.addr, PeerSource::Tracker),
    ];

    // The sources are done: NoPeers once all have failed.
    let mut s = spec(key, 8, Duration::from_secs(20));
    s.peer_timeout = Duration::from_secs(2);
    let started = Instant::now();
    match block_on(fetch(s, candidates(&list, true), None)) {
        Err(FetchError::NoPeers { tried, banned }) => {
            assert_eq!(tried, 3);
            assert_eq!(banned, vec![liar.addr]);
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Sources still searching: the deadline ends it, the silent peer included.
    let mut with_silent = list.to_vec();
    with_silent.push((silent.addr, PeerSource::Client));
    let mut s = spec(key, 8, Duration::from_millis(1500));
    s.peer_timeout = Duration::from_secs(30);
    let started = Instant::now();
    let (ev_tx, ev_rx) = flume::unbounded();
    let (result, elapsed, closed) = block_on(async {
        let r = fetch(s, candidates(&with_silent, false), Some(ev_tx)).await;
        let elapsed = started.elapsed();
        (r, elapsed, closed_within(&silent, started).await)
    });
    match result {
        Err(e @ FetchError::Deadline { .. }) => {
            assert_eq!(e.reason(), "deadline");
            let FetchError::Deadline { tried, banned } = e else {
                unreachable!()
            };
            assert_eq!((tried, banned), (4, vec![liar.addr]));
        }
        other => panic!("{other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(4));
    let closed = closed.expect("the silent peer's connection outlived the fetch");
    assert!(
        closed < elapsed + Duration::from_secs(1),
        "closed after {closed:?}"
    );
    let failed: Vec<&'static str> = ev_rx
        .drain()
        .filter_map(|e| match e {
            FetchEvent::PeerFailed(_, r) => Some(r),
            _ => None,
        })
        .collect();
    assert!(
        failed.contains(&"size") && failed.contains(&"connect"),
        "{failed:?}"
    );
}

#[test]
fn the_first_verified_peer_wins_and_the_others_are_abandoned() {
    let info = sample_info(false);
    let key = v1_key(&info);
    let silent = FakeSeed::start(info.clone(), key, SeedBehaviour::Silent);
    let honest = FakeSeed::start(info.clone(), key, SeedBehaviour::HONEST);
    let mut s = spec(key, 4, Duration::from_secs(20));
    s.peer_timeout = Duration::from_secs(30);
    let rx = candidates(
        &[
            (silent.addr, PeerSource::Client),
            (honest.addr, PeerSource::Client),
        ],
        false,
    );
    let started = Instant::now();
    let (ok, elapsed, closed) = block_on(async {
        let ok = fetch(s, rx, None).await.unwrap();
        let elapsed = started.elapsed();
        (ok, elapsed, closed_within(&silent, started).await)
    });
    assert!(ok.info == info);
    assert_eq!(ok.from.addr, honest.addr);
    assert_eq!(ok.peers_tried, 2);
    assert!(ok.banned.is_empty());
    let closed = closed.expect("the losing peer's connection outlived the fetch");
    assert!(
        closed < elapsed + Duration::from_secs(1),
        "closed after {closed:?}"
    );
}

/// BEP 27: a private dict is never taken from a peer found through the DHT or PEX.
#[test]
fn private_metadata_only_from_sources_that_allow_it() {
    let info = sample_info(true);
    let key = v1_key(&info);
    let via_dht = FakeSeed::start(info.clone(), key, SeedBehaviour::HONEST);
    let via_pex = FakeSeed::start(info.clone(), key, SeedBehaviour::HONEST);
    let via_tracker = FakeSeed::start(info.clone(), key, SeedBehaviour::HONEST);

    let rx = candidates(
        &[
            (via_dht.addr, PeerSource::Dht),
            (via_pex.addr, PeerSource::Pex),
        ],
        true,
    );
    let (ev_tx, ev_rx) = flume::unbounded();
    match block_on(fetch(
        spec(key, 1, Duration::from_secs(20)),
        rx,
        Some(ev_tx),
    )) {
        Err(FetchError::NoPeers { tried, banned }) => {
            // The PEX peer is not even connected once the dict is known to be private.
            assert_eq!(tried, 1);
            assert!(banned.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let failed: Vec<FetchEvent> = ev_rx
        .drain()
        .filter(|e| matches!(e, FetchEvent::PeerFailed(..)))
        .collect();
    assert_eq!(
        failed,
        vec![
            FetchEvent::PeerFailed(via_dht.addr, PRIVATE_VIA_DHT_OR_PEX),
            FetchEvent::PeerFailed(via_pex.addr, PRIVATE_VIA_DHT_OR_PEX),
        ]
    );

    let rx = candidates(
        &[
            (via_dht.addr, PeerSource::Dht),
            (via_tracker.addr, PeerSource::Tracker),
        ],
        true,
    );
    let ok = block_on(fetch(spec(key, 1, Duration::from_secs(20)), rx, None)).unwrap();
    assert!(ok.info == info);
    assert!(ok.summary.private);
    assert_eq!(ok.from.addr, via_tracker.addr);
    assert_eq!(ok.from.source, PeerSource::Tracker);
}

#[test]
fn no_candidates_at_all() {
    let rx = candidates(&[], true);
    match block_on(fetch(spec([1; 20], 4, Duration::from_secs(5)), rx, None)) {
        Err(e @ FetchError::NoPeers { tried: 0, .. }) => assert_eq!(e.reason(), "no_peers"),
        other => panic!("{other:?}"),
    }
    // A deadline already past ends the fetch at once.
    let rx = candidates(&[], false);
    let mut s = spec([1; 20], 4, Duration::ZERO);
    s.deadline = Instant::now();
    assert!(matches!(
        block_on(fetch(s, rx, None)),
        Err(FetchError::Deadline { tried: 0, .. })
    ));
}
