//! HTTP tracker client (BEP 3 announce, BEP 23 compact peers, BEP 7 `peers6`): builds the
//! announce URL, GETs it with ureq (plain HTTP only), and parses the bencoded answer with
//! `wire::bencode`. `parse_response` is sans-IO and tested on its own.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use crate::upstream::tracker::{
    tracker_message, AnnounceEvent, AnnounceRequest, AnnounceResponse, PeerCollector, TrackerError,
    PEERS_PER_RESPONSE_MAX, TRACKER_RESPONSE_BYTES_MAX,
};
use crate::wire::bencode;

/// Idle keep-alive connections kept to trackers: none. Trackers (opentracker among them)
/// close idle connections on their own schedule, and ureq does not retry a GET that fails
/// on a pooled connection the tracker already closed: announces then failed with
/// "connection reset" (seen against opentracker at 40 announces in a row). An announce
/// per miss can afford its TCP handshake.
const IDLE_TRACKER_CONNECTIONS_MAX: usize = 0;

/// Response headers read; real tracker headers are a few hundred bytes.
const RESPONSE_HEADER_BYTES_MAX: usize = 16 * 1024;

/// One agent for the process (it owns the connection pool). Redirects are not followed: a
/// tracker answering 3xx is reported as `Http(3xx)` rather than sending us to an address
/// we were not given (and most redirects go to https, which we cannot speak anyway). The
/// environment's proxy settings are ignored: trackers are reached directly.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(concat!("magnetar/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections(IDLE_TRACKER_CONNECTIONS_MAX)
            .max_idle_connections_per_host(IDLE_TRACKER_CONNECTIONS_MAX)
            .max_response_header_size(RESPONSE_HEADER_BYTES_MAX)
            .build()
            .into()
    })
}

/// Announces over HTTP; all of it (DNS, connect, request, body) within `timeout`.
pub fn announce(
    url: &str,
    req: &AnnounceRequest,
    event: AnnounceEvent,
    timeout: Duration,
) -> Result<AnnounceResponse, TrackerError> {
    let full = announce_url(url, req, event);
    let result = agent()
        .get(&full)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .call();
    let mut resp = result.map_err(|e| map_ureq_error(e, url))?;
    let status = resp.status().as_u16();
    if resp
        .body()
        .content_length()
        .is_some_and(|n| n > TRACKER_RESPONSE_BYTES_MAX as u64)
    {
        return Err(TrackerError::TooLarge);
    }
    // One byte past the cap so that a body of exactly the cap is accepted and a longer one
    // is recognised.
    let body = resp
        .body_mut()
        .with_config()
        .limit(TRACKER_RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_vec()
        .map_err(|e| map_ureq_error(e, url))?;
    if body.len() > TRACKER_RESPONSE_BYTES_MAX {
        return Err(TrackerError::TooLarge);
    }
    if !(200..300).contains(&status) {
        // Some trackers explain a refusal in a bencoded body even with an error status.
        return Err(match parse_response(&body) {
            Err(TrackerError::Failure(reason)) => TrackerError::Failure(reason),
            _ => TrackerError::Http(status),
        });
    }
    parse_response(&body)
}

fn map_ureq_error(e: ureq::Error, url: &str) -> TrackerError {
    match e {
        ureq::Error::Timeout(_) => TrackerError::Timeout,
        ureq::Error::StatusCode(code) => TrackerError::Http(code),
        ureq::Error::BodyExceedsLimit(_) => TrackerError::TooLarge,
        ureq::Error::HostNotFound => TrackerError::HostNotFound(url.to_string()),
        ureq::Error::BadUri(m) => TrackerError::BadUrl(m),
        ureq::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => TrackerError::Timeout,
            _ => TrackerError::Io(io),
        },
        ureq::Error::LargeResponseHeader(..) => TrackerError::TooLarge,
        ureq::Error::Protocol(_) => TrackerError::Malformed("not an HTTP/1.1 response"),
        other => TrackerError::Io(std::io::Error::other(other.to_string())),
    }
}

/// The announce URL: the tracker's URL (its own query, e.g. a passkey, kept; a fragment
/// dropped) with our parameters appended. `compact=1` always: some trackers (opentracker
/// among them) answer nothing else. A regular announce carries no `event` (BEP 3).
pub fn announce_url(url: &str, req: &AnnounceRequest, event: AnnounceEvent) -> String {
    let base = url.split('#').next().unwrap_or(url);
    let mut out = String::with_capacity(base.len() + 256);
    out.push_str(base);
    out.push(if base.contains('?') { '&' } else { '?' });
    out.push_str("info_hash=");
    percent_encode(&req.info_hash, &mut out);
    out.push_str("&peer_id=");
    percent_encode(&req.peer_id, &mut out);
    let numwant = req.numwant.min(PEERS_PER_RESPONSE_MAX as u32);
    out.push_str(&format!(
        "&port={}&uploaded=0&downloaded=0&left={}&compact=1&numwant={numwant}",
        req.port, req.left
    ));
    if let Some(e) = event.http_value() {
        out.push_str("&event=");
        out.push_str(e);
    }
    out
}

/// RFC 3986: every byte but the unreserved `A-Z a-z 0-9 - . _ ~` becomes `%XX`.
fn percent_encode(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Parses an announce response body: `failure reason` becomes `Failure`; peers come from
/// `peers` (BEP 23 compact string of 6-byte entries, or BEP 3 list of `{ip, port}` dicts)
/// and `peers6` (BEP 7, 18-byte entries). Non-compact `ip`s that are host names are skipped
/// (we do not resolve names a tracker hands out). Bytes after the dict are ignored.
pub fn parse_response(body: &[u8]) -> Result<AnnounceResponse, TrackerError> {
    let (value, _) =
        bencode::parse_prefix(body).map_err(|_| TrackerError::Malformed("body is not bencoded"))?;
    let dict = value
        .as_dict()
        .ok_or(TrackerError::Malformed("body is not a dict"))?;
    if let Some(reason) = dict.get(b"failure reason") {
        let reason = reason
            .as_bytes()
            .ok_or(TrackerError::Malformed("failure reason is not a string"))?;
        return Err(TrackerError::Failure(tracker_message(reason)));
    }
    let interval = match dict.get(b"interval") {
        None => None,
        Some(v) => Some(Duration::from_secs(
            v.as_int()
                .and_then(|i| i.to_u64())
                .ok_or(TrackerError::Malformed(
                    "interval is not a non-negative integer",
                ))?,
        )),
    };
    let peers = dict.get(b"peers");
    let peers6 = dict.get(b"peers6");
    if peers.is_none() && peers6.is_none() {
        return Err(TrackerError::Malformed("neither peers nor peers6"));
    }
    let mut out = PeerCollector::default();
    match peers {
        None => {}
        Some(bencode::Value::Bytes(compact)) => {
            if compact.len() % 6 != 0 {
                return Err(TrackerError::Malformed("compact peers not a multiple of 6"));
            }
            for c in compact.chunks_exact(6) {
                let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
                out.push(SocketAddr::from((ip, u16::from_be_bytes([c[4], c[5]]))));
            }
        }
        Some(bencode::Value::List(list)) => {
            for item in list {
                let d = item
                    .as_dict()
                    .ok_or(TrackerError::Malformed("peer is not a dict"))?;
                let ip = d
                    .get(b"ip")
                    .and_then(|v| v.as_bytes())
                    .ok_or(TrackerError::Malformed("peer without ip"))?;
                let port = d
                    .get(b"port")
                    .and_then(|v| v.as_int())
                    .and_then(|i| i.to_u64())
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or(TrackerError::Malformed("peer without a valid port"))?;
                let ip = std::str::from_utf8(ip)
                    .ok()
                    .and_then(|s| s.trim_matches(|c| c == '[' || c == ']').parse().ok());
                if let Some(ip) = ip {
                    out.push(SocketAddr::new(ip, port));
                }
            }
        }
        Some(_) => return Err(TrackerError::Malformed("peers is neither string nor list")),
    }
    if let Some(v) = peers6 {
        let compact = v
            .as_bytes()
            .ok_or(TrackerError::Malformed("peers6 is not a string"))?;
        if compact.len() % 18 != 0 {
            return Err(TrackerError::Malformed("peers6 not a multiple of 18"));
        }
        for c in compact.chunks_exact(18) {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&c[..16]);
            let port = u16::from_be_bytes([c[16], c[17]]);
            out.push(SocketAddr::from((Ipv6Addr::from(ip), port)));
        }
    }
    Ok(AnnounceResponse {
        peers: out.into_peers(),
        interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn url_encodes_every_reserved_byte() {
        let mut info_hash = [0u8; 20];
        info_hash[..8].copy_from_slice(b"aZ09-._~");
        info_hash[8..12].copy_from_slice(&[b' ', b'%', 0xff, b'/']);
        let req = AnnounceRequest {
            info_hash,
            peer_id: *b"-MX0001-abcdefghijkl",
            port: 6881,
            left: 12345,
            numwant: 10_000,
        };
        let u = announce_url(
            "http://t.example:8080/announce?passkey=x#frag",
            &req,
            AnnounceEvent::Started,
        );
        assert_eq!(
            u,
            "http://t.example:8080/announce?passkey=x&info_hash=aZ09-._~%20%25%FF%2F\
             %00%00%00%00%00%00%00%00&peer_id=-MX0001-abcdefghijkl&port=6881&uploaded=0\
             &downloaded=0&left=12345&compact=1&numwant=500&event=started"
        );
        assert!(announce_url("http://t/a", &req, AnnounceEvent::Regular)
            .starts_with("http://t/a?info_hash="));
    }

    #[test]
    fn compact_peers_and_peers6() {
        let mut body = b"d8:intervali1800e5:peers12:".to_vec();
        body.extend_from_slice(&[127, 0, 0, 1, 0x04, 0x57, 10, 0, 0, 2, 0, 0]);
        body.extend_from_slice(b"6:peers618:");
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0x1a, 0xe1]);
        body.push(b'e');
        let r = parse_response(&body).unwrap();
        assert_eq!(r.interval, Some(Duration::from_secs(1800)));
        // 10.0.0.2:0 is dropped (port 0).
        assert_eq!(r.peers, vec![addr("127.0.0.1:1111"), addr("[::1]:6881")]);
    }

    #[test]
    fn non_compact_peers() {
        let body = b"d5:peersld2:ip9:127.0.0.17:peer id20:aaaaaaaaaaaaaaaaaaaa4:porti1111eed2:ip3:::14:porti2222eed2:ip15:tracker.example4:porti80eeee";
        let r = parse_response(body).unwrap();
        assert_eq!(r.interval, None);
        assert_eq!(r.peers, vec![addr("127.0.0.1:1111"), addr("[::1]:2222")]);
    }

    #[test]
    fn failure_reason() {
        match parse_response(b"d14:failure reason17:torrent not founde") {
            Err(TrackerError::Failure(m)) => assert_eq!(m, "torrent not found"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_bodies_are_clean_errors() {
        for body in [
            &b""[..],
            b"<html>nope</html>",
            b"le",
            b"d8:intervali5ee",
            b"d5:peers5:abcdee",
            b"d5:peersi3ee",
            b"d5:peersli1eee",
            b"d5:peersld2:ip9:127.0.0.1eee",
            b"d5:peersld2:ip9:127.0.0.14:porti70000eeee",
            b"d6:peers65:abcdee",
            b"d8:intervali-1e5:peers0:e",
            b"d14:failure reasoni1ee",
            b"d5:peers",
        ] {
            assert!(
                matches!(parse_response(body), Err(TrackerError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn never_panics_on_prefixes_and_flips() {
        let mut body = b"d8:intervali1800e5:peers12:".to_vec();
        body.extend_from_slice(&[127, 0, 0, 1, 0x04, 0x57, 10, 0, 0, 2, 0, 1]);
        body.extend_from_slice(b"e");
        for n in 0..=body.len() {
            let _ = parse_response(&body[..n]);
        }
        for i in 0..body.len() {
            for bit in 0..8 {
                let mut b = body.clone();
                b[i] ^= 1 << bit;
                let _ = parse_response(&b);
            }
        }
    }
}
