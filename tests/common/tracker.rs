//! Waiting on a tracker: until magnetar says it has announced, and until the tracker lists
//! a port for a hash. Shared by the discovery and Transmission tests.

use std::time::{Duration, Instant};

use magnetar::upstream::tracker::{announce_event, AnnounceEvent, AnnounceRequest};

use super::kit::metrics;
use super::ServerProc;

/// Waits until magnetar's metrics say one hash is announced to `tracker`.
pub fn wait_announced_by_magnetar(server: &ServerProc, tracker: &str) {
    let name = format!("magnetar_tracker_announced_hashes{{tracker=\"{tracker}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics(server).get(&name).copied() != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "magnetar never announced to {tracker}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `port` is among the peers `tracker_url` lists for `key` (asking as a
/// leecher, then leaving so the probe is not handed out as a peer).
pub fn wait_listed(tracker_url: &str, key: [u8; 20], port: u16) {
    let req = AnnounceRequest {
        info_hash: key,
        peer_id: *b"-TS0001-trackerprobe",
        port: 9,
        left: 1,
        numwant: 50,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = announce_event(
            tracker_url,
            &req,
            AnnounceEvent::Started,
            Duration::from_secs(5),
        );
        if resp.is_ok_and(|r| r.peers.iter().any(|p| p.port() == port)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} never listed by {tracker_url}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = announce_event(
        tracker_url,
        &req,
        AnnounceEvent::Stopped,
        Duration::from_secs(5),
    );
}
