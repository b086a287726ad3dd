//! Magnet links: parsing and formatting of `xt` (BEP 9 `urn:btih:`, BEP 52 `urn:btmh:`),
//! `dn`, `tr`, `x.pe` and `xsource` (docs/protocol-facts.md §11, §15).
//!
//! A peer address is written twice: as `x.pe`, raw (`1.2.3.4:6881`, `[2001:db8::1]:6881`),
//! because libtorrent does not percent-decode it and drops an escaped one; and as
//! `xsource`, percent-encoded, which is how BiglyBT/Vuze write it (`MagnetPlugin`:
//! `UrlUtils.encode(UrlUtils.getURLForm(ip, port))`) and read it (URL-decoded). Parsing
//! takes both into `peers`.
//!
//! Parsing is lenient where one bad part must not void the link: a malformed `tr` or
//! `x.pe`, an `xt` of another namespace or a multihash other than sha2-256 is skipped
//! with a warning in `Magnet::warnings`. It is strict where the link would name the wrong
//! torrent: a btih / btmh whose digits are malformed is an error, and so is a link
//! without any BitTorrent info-hash.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use data_encoding::{BASE32, HEXLOWER, HEXLOWER_PERMISSIVE};

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MagnetError {
    #[error("not a magnet link (expected \"magnet:?\")")]
    NotMagnet,
    #[error("magnet link has no BitTorrent info-hash (xt=urn:btih:… or xt=urn:btmh:1220…)")]
    NoInfoHash,
    #[error("invalid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
}

/// A peer address from `x.pe`: a socket address, or a host name to resolve later.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    Socket(SocketAddr),
    Host(String, u16),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Magnet {
    /// v1 info-hash (SHA-1).
    pub btih: Option<[u8; 20]>,
    /// v2 info-hash (SHA-256 digest, without the multihash prefix `1220`).
    pub btmh: Option<[u8; 32]>,
    pub display_name: Option<String>,
    pub trackers: Vec<String>,
    pub peers: Vec<PeerAddr>,
    /// `xs=` (exact source) URLs of the whole .torrent: webtorrent 3 and BiglyBT fetch
    /// them over http(s) beside peer discovery (docs/protocol-facts.md §18). Written, not
    /// parsed (the miss path has no use for them).
    pub exact_sources: Vec<String>,
    /// Parts of the link that were skipped, and why. Not part of `to_uri`.
    pub warnings: Vec<String>,
}

impl Magnet {
    pub fn parse(s: &str) -> Result<Magnet, MagnetError> {
        let s = s.trim();
        let query = match s.get(..8) {
            Some(scheme) if scheme.eq_ignore_ascii_case("magnet:?") => &s[8..],
            _ => return Err(MagnetError::NotMagnet),
        };
        let mut m = Magnet::default();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = param.split_once('=').unwrap_or((param, ""));
            // BEP 9 style indexed keys (xt.1, tr.2) mean the same as the plain ones.
            let key = match key.split_once('.') {
                Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
                _ => key,
            };
            match key {
                "xt" => m.parse_topic(&percent_decode(raw, false))?,
                // The first dn wins; later ones fall through to the ignored keys.
                "dn" if m.display_name.is_none() => {
                    m.display_name = Some(percent_decode(raw, true));
                }
                "tr" => {
                    let tracker = percent_decode(raw, false);
                    if !is_tracker_url(&tracker) {
                        m.warnings.push(format!(
                            "skipped tr {tracker:?}: not an http(s):// or udp:// URL"
                        ));
                    } else if !m.trackers.contains(&tracker) {
                        m.trackers.push(tracker);
                    }
                }
                "x.pe" | "xsource" => match percent_decode(raw, false).parse::<PeerAddr>() {
                    Ok(peer) if !m.peers.contains(&peer) => m.peers.push(peer),
                    Ok(_) => {}
                    Err(e) => m.warnings.push(format!("skipped {key}: {e}")),
                },
                _ => {} // xl, ws, as, kt, so, …: not used by magnetar
            }
        }
        if m.btih.is_none() && m.btmh.is_none() {
            return Err(MagnetError::NoInfoHash);
        }
        Ok(m)
    }

    fn parse_topic(&mut self, xt: &str) -> Result<(), MagnetError> {
        let invalid = |what| MagnetError::Invalid {
            what,
            value: xt.to_string(),
        };
        let urn = |prefix: &str| {
            xt.get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))
                .map(|_| &xt[prefix.len()..])
        };
        if let Some(digits) = urn("urn:btih:") {
            let hash = parse_btih(digits).ok_or_else(|| invalid("btih (40 hex or 32 base32)"))?;
            match self.btih {
                None => self.btih = Some(hash),
                Some(first) if first != hash => {
                    self.warnings.push(format!("skipped second btih {xt:?}"))
                }
                Some(_) => {}
            }
        } else if let Some(digits) = urn("urn:btmh:") {
            let multihash = HEXLOWER_PERMISSIVE
                .decode(digits.as_bytes())
                .map_err(|_| invalid("btmh (hex multihash)"))?;
            match multihash.as_slice() {
                [0x12, 0x20, digest @ ..] if digest.len() == 32 => {
                    let hash: [u8; 32] = digest.try_into().map_err(|_| invalid("btmh"))?;
                    match self.btmh {
                        None => self.btmh = Some(hash),
                        Some(first) if first != hash => {
                            self.warnings.push(format!("skipped second btmh {xt:?}"))
                        }
                        Some(_) => {}
                    }
                }
                [0x12, ..] => return Err(invalid("btmh sha2-256 (length must be 0x20)")),
                _ => self.warnings.push(format!(
                    "skipped btmh {xt:?}: multihash other than sha2-256"
                )),
            }
        } else {
            self.warnings
                .push(format!("skipped xt {xt:?}: not urn:btih or urn:btmh"));
        }
        Ok(())
    }

    /// The 20 bytes a handshake carries for this torrent: the v1 info-hash, else the
    /// first 20 bytes of the v2 one. `parse` guarantees one of them; a hand-built Magnet
    /// with neither gives all zeros.
    pub fn handshake_key(&self) -> [u8; 20] {
        match (self.btih, self.btmh) {
            (Some(v1), _) => v1,
            (None, Some(v2)) => {
                let mut key = [0u8; 20];
                key.copy_from_slice(&v2[..20]);
                key
            }
            (None, None) => [0; 20],
        }
    }

    /// `magnet:?xt=urn:btih:…&xt=urn:btmh:1220…&dn=…&tr=…&x.pe=…&xsource=…`. `dn`, `tr` and
    /// `xsource` are percent-encoded; `x.pe` is written raw (`[v6]:port`, `host:port`)
    /// because libtorrent 2.0.8 does not unescape it and drops an escaped one. Each peer
    /// appears as `x.pe` (libtorrent) and as `xsource` (BiglyBT/Vuze).
    pub fn to_uri(&self) -> String {
        let mut uri = String::from("magnet:?");
        let mut sep = "";
        let mut param = |uri: &mut String, key: &str, value: &str| {
            uri.push_str(sep);
            uri.push_str(key);
            uri.push('=');
            uri.push_str(value);
            sep = "&";
        };
        if let Some(v1) = &self.btih {
            param(&mut uri, "xt", &format!("urn:btih:{}", HEXLOWER.encode(v1)));
        }
        if let Some(v2) = &self.btmh {
            param(
                &mut uri,
                "xt",
                &format!("urn:btmh:1220{}", HEXLOWER.encode(v2)),
            );
        }
        if let Some(name) = &self.display_name {
            param(&mut uri, "dn", &percent_encode(name));
        }
        for tracker in &self.trackers {
            param(&mut uri, "tr", &percent_encode(tracker));
        }
        for peer in &self.peers {
            param(&mut uri, "x.pe", &peer.to_string());
        }
        for peer in &self.peers {
            param(&mut uri, "xsource", &percent_encode(&peer.to_string()));
        }
        for url in &self.exact_sources {
            param(&mut uri, "xs", &percent_encode(url));
        }
        uri
    }
}

/// The public HTTP listener's URL of a torrent's .torrent under `base` (a checked
/// `--public-http-url` without its trailing `/`): `BASE/torrent/<HEX>.torrent`, the v1 hash
/// (the itorrents form tools know), else the v2 one.
pub fn exact_source_url(
    base: &str,
    btih: Option<&[u8; 20]>,
    btmh: Option<&[u8; 32]>,
) -> Option<String> {
    let hash = match (btih, btmh) {
        (Some(v1), _) => data_encoding::HEXUPPER.encode(v1),
        (None, Some(v2)) => data_encoding::HEXUPPER.encode(v2),
        (None, None) => return None,
    };
    Some(format!("{base}/torrent/{hash}.torrent"))
}

impl fmt::Display for Magnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

impl FromStr for Magnet {
    type Err = MagnetError;
    fn from_str(s: &str) -> Result<Magnet, MagnetError> {
        Magnet::parse(s)
    }
}

fn parse_btih(digits: &str) -> Option<[u8; 20]> {
    let bytes = match digits.len() {
        40 => HEXLOWER_PERMISSIVE.decode(digits.as_bytes()).ok()?,
        32 => BASE32.decode(digits.to_ascii_uppercase().as_bytes()).ok()?,
        _ => return None,
    };
    bytes.try_into().ok()
}

fn is_tracker_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let scheme_ok = ["http", "https", "udp"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    scheme_ok
        && !host.is_empty()
        && !host.starts_with(':')
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl FromStr for PeerAddr {
    type Err = MagnetError;

    /// `1.2.3.4:port`, `[v6]:port` or `host.name:port`; port 1–65535.
    fn from_str(s: &str) -> Result<PeerAddr, MagnetError> {
        let invalid = |why: &'static str| MagnetError::Invalid {
            what: why,
            value: s.to_string(),
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(invalid("peer address (port 0)"));
            }
            return Ok(PeerAddr::Socket(addr));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| invalid("peer address (no port)"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid("peer address (port must be 1-65535)"))?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            // All digits and dots but not an IPv4 address (e.g. 1.2.3): not a host name.
            && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if !host_ok {
            return Err(invalid("peer address (bad host)"));
        }
        Ok(PeerAddr::Host(host.to_string(), port))
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Socket(addr) => write!(f, "{addr}"),
            PeerAddr::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); a malformed escape is
/// kept literally, invalid UTF-8 becomes U+FFFD.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |j: usize| bytes.get(j).and_then(|&c| (c as char).to_digit(16));
        match b {
            b'%' => {
                if let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                out.push(b);
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_source_is_written_percent_encoded_after_the_peers() {
        let url = exact_source_url("https://cache.example.org/m", Some(&v1()), None).unwrap();
        assert_eq!(
            url,
            format!(
                "https://cache.example.org/m/torrent/{}.torrent",
                HEX.to_uppercase()
            )
        );
        let m = Magnet {
            btih: Some(v1()),
            peers: vec![PeerAddr::Socket("203.0.113.5:6881".parse().unwrap())],
            exact_sources: vec![url],
            ..Magnet::default()
        };
        let uri = m.to_uri();
        assert!(
            uri.ends_with(&format!(
                "&xsource=203.0.113.5%3A6881&xs=https%3A%2F%2Fcache.example.org%2Fm%2Ftorrent%2F{}.torrent",
                HEX.to_uppercase()
            )),
            "{uri}"
        );
        let v2 = [7u8; 32];
        assert!(exact_source_url("http://h", None, Some(&v2))
            .unwrap()
            .ends_with(&format!("{}.torrent", "07".repeat(32))));
        assert_eq!(exact_source_url("http://h", None, None), None);
    }

    const HEX: &str = "c8295ce630f2064f08440db1534e37da6b4eabc7";
    const V2: &str = "8c7bd5ac8a5a6aa8b7e0e3ad1b2ac0f1be0e3b5f2b4a6e3e1d0c9b8a79685746";

    fn v1() -> [u8; 20] {
        HEXLOWER.decode(HEX.as_bytes()).unwrap().try_into().unwrap()
    }

    fn v2() -> [u8; 32] {
        HEXLOWER.decode(V2.as_bytes()).unwrap().try_into().unwrap()
    }

    #[test]
    fn btih_forms() {
        let b32 = BASE32.encode(&v1());
        for xt in [
            HEX.to_string(),
            HEX.to_uppercase(),
            b32.clone(),
            b32.to_lowercase(),
        ] {
            let m = Magnet::parse(&format!("magnet:?xt=urn:btih:{xt}")).unwrap();
            assert_eq!(m.btih, Some(v1()), "{xt}");
            assert_eq!(m.handshake_key(), v1());
            assert!(m.warnings.is_empty());
        }
        let m = Magnet::parse(&format!("MAGNET:?XT=urn:btih:{HEX}")).map(|m| m.btih);
        assert_eq!(m, Err(MagnetError::NoInfoHash), "keys are case-sensitive");
        let m = Magnet::parse(&format!("Magnet:?xt=URN:BTIH:{HEX}")).unwrap();
        assert_eq!(m.btih, Some(v1()));
    }

    #[test]
    fn btmh_and_hybrid() {
        let m = Magnet::parse(&format!("magnet:?xt=urn:btmh:1220{V2}")).unwrap();
        assert_eq!((m.btih, m.btmh), (None, Some(v2())));
        assert_eq!(m.handshake_key()[..], v2()[..20]);
        let m = Magnet::parse(&format!("magnet:?xt=urn:btmh:1220{V2}&xt=urn:btih:{HEX}")).unwrap();
        assert_eq!((m.btih, m.btmh), (Some(v1()), Some(v2())));
        assert_eq!(m.handshake_key(), v1());
        assert_eq!(
            m.to_uri(),
            format!("magnet:?xt=urn:btih:{HEX}&xt=urn:btmh:1220{V2}")
        );
        // Other multihash (sha3-256 = 0x16): skipped with a warning.
        let m = Magnet::parse(&format!("magnet:?xt=urn:btmh:1620{V2}&xt=urn:btih:{HEX}")).unwrap();
        assert_eq!((m.btmh, m.warnings.len()), (None, 1));
        assert_eq!(
            Magnet::parse(&format!("magnet:?xt=urn:btmh:1620{V2}")),
            Err(MagnetError::NoInfoHash)
        );
    }

    #[test]
    fn malformed_hashes_are_errors() {
        for bad in [
            format!("magnet:?xt=urn:btih:{}", &HEX[..39]),
            format!("magnet:?xt=urn:btih:{}g", &HEX[..39]),
            "magnet:?xt=urn:btih:".to_string(),
            "magnet:?xt=urn:btih:01234567890123456789012345678901".to_string(), // '0','1' not base32
            format!("magnet:?xt=urn:btmh:1220{}", &V2[..62]),
            format!("magnet:?xt=urn:btmh:1214{}", &V2[..40]),
            format!("magnet:?xt=urn:btmh:1220{V2}zz"),
        ] {
            assert!(
                matches!(Magnet::parse(&bad), Err(MagnetError::Invalid { .. })),
                "{bad}"
            );
        }
        assert_eq!(Magnet::parse("http://x"), Err(MagnetError::NotMagnet));
        assert_eq!(Magnet::parse("magnet:"), Err(MagnetError::NotMagnet));
        assert_eq!(Magnet::parse("magnet:?dn=x"), Err(MagnetError::NoInfoHash));
        assert_eq!(
            Magnet::parse("magnet:?xt=urn:ed2k:abc"),
            Err(MagnetError::NoInfoHash)
        );
    }

    #[test]
    fn all_parts() {
        let uri = format!(
            "magnet:?xt=urn:btih:{HEX}&dn=Some+Name%20%C3%A9&tr=udp%3A%2F%2Ftracker.example%3A1337%2Fannounce\
             &tr=https://t.example/a?x=1&x.pe=1.2.3.4:6881&x.pe=[2001:db8::1]:51413\
             &x.pe=peer.example.org:80&xl=123&ws=http://w"
        );
        let m = Magnet::parse(&uri).unwrap();
        assert_eq!(m.display_name.as_deref(), Some("Some Name é"));
        assert_eq!(
            m.trackers,
            [
                "udp://tracker.example:1337/announce",
                "https://t.example/a?x=1"
            ]
        );
        assert_eq!(
            m.peers,
            [
                PeerAddr::Socket("1.2.3.4:6881".parse().unwrap()),
                PeerAddr::Socket("[2001:db8::1]:51413".parse().unwrap()),
                PeerAddr::Host("peer.example.org".into(), 80),
            ]
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let again = Magnet::parse(&m.to_uri()).unwrap();
        assert_eq!(again, m);
        assert_eq!(m.to_string(), m.to_uri());
        assert!(m.to_uri().contains("&x.pe=[2001:db8::1]:51413"));
        assert!(m
            .to_uri()
            .contains("&xsource=%5B2001%3Adb8%3A%3A1%5D%3A51413"));
        assert!(m
            .to_uri()
            .contains("&dn=Some%20Name%20%C3%A9&tr=udp%3A%2F%2Ftracker"));
    }

    #[test]
    fn peers_are_written_raw_as_x_pe_and_encoded_as_xsource() {
        let m = Magnet {
            btih: Some(v1()),
            display_name: Some("a b".into()),
            trackers: vec![
                "udp://t.example:6969/announce".into(),
                "http://t2.example/announce?k=1&x=2".into(),
            ],
            peers: vec![
                PeerAddr::Socket("203.0.113.5:6881".parse().unwrap()),
                PeerAddr::Socket("[2001:db8::1]:6881".parse().unwrap()),
                PeerAddr::Host("seed.example.org".into(), 51413),
            ],
            ..Magnet::default()
        };
        assert_eq!(
            m.to_uri(),
            format!(
                "magnet:?xt=urn:btih:{HEX}&dn=a%20b\
                 &tr=udp%3A%2F%2Ft.example%3A6969%2Fannounce\
                 &tr=http%3A%2F%2Ft2.example%2Fannounce%3Fk%3D1%26x%3D2\
                 &x.pe=203.0.113.5:6881&x.pe=[2001:db8::1]:6881&x.pe=seed.example.org:51413\
                 &xsource=203.0.113.5%3A6881&xsource=%5B2001%3Adb8%3A%3A1%5D%3A6881\
                 &xsource=seed.example.org%3A51413"
            )
        );
        // Read back: x.pe and xsource name the same peers once.
        let again = Magnet::parse(&m.to_uri()).unwrap();
        assert_eq!(again, m);
        // xsource alone (as BiglyBT writes it) is a peer too, raw or encoded.
        let b = Magnet::parse(&format!(
            "magnet:?xt=urn:btih:{HEX}&xsource=198.51.100.7%3A1&xsource=[::1]:2&xsource=bad"
        ))
        .unwrap();
        assert_eq!(
            b.peers,
            [
                PeerAddr::Socket("198.51.100.7:1".parse().unwrap()),
                PeerAddr::Socket("[::1]:2".parse().unwrap()),
            ]
        );
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(
            b.warnings[0].starts_with("skipped xsource"),
            "{:?}",
            b.warnings
        );
    }

    #[test]
    fn malformed_parts_are_skipped_with_warnings() {
        let uri = format!(
            "magnet:?xt=urn:btih:{HEX}&x.pe=1.2.3.4&x.pe=1.2.3.4:0&x.pe=host:99999&x.pe=::1:80\
             &x.pe=bad_host!:1&x.pe=:80&x.pe=1.2.3:80&x.pe=5.6.7.8:9\
             &tr=ftp://x&tr=notaurl&tr=udp://&tr=wss://t.example&tr=http://ok.example/announce\
             &xt=urn:sha1:abc"
        );
        let m = Magnet::parse(&uri).unwrap();
        assert_eq!(m.peers, [PeerAddr::Socket("5.6.7.8:9".parse().unwrap())]);
        assert_eq!(m.trackers, ["http://ok.example/announce"]);
        assert_eq!(m.warnings.len(), 7 + 4 + 1, "{:#?}", m.warnings);
    }

    #[test]
    fn peer_addr_forms() {
        for (s, display) in [
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("[::1]:65535", "[::1]:65535"),
            ("a-b.example_x.com:6881", "a-b.example_x.com:6881"),
            ("localhost:2", "localhost:2"),
        ] {
            let p: PeerAddr = s.parse().unwrap();
            assert_eq!(p.to_string(), display);
            assert_eq!(display.parse::<PeerAddr>().unwrap(), p);
        }
        for bad in [
            "",
            ":",
            "1.2.3.4",
            "[::1]",
            "[::1]:0",
            "h:0",
            "h:-1",
            "h:",
            ":1",
            "a..b:1",
            "a b:1",
            "256.1.1.1:1",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_inputs_never_panic_and_round_trip() {
        let tokens = [
            "magnet:?",
            "xt=urn:btih:",
            "xt=urn:btmh:1220",
            HEX,
            V2,
            "&",
            "=",
            "dn=",
            "tr=",
            "x.pe=",
            "%",
            "%C3",
            "%A9",
            "+",
            "[",
            "]",
            ":",
            "::1",
            "1.2.3.4",
            "80",
            "0",
            "udp://",
            "http://",
            "h.example",
            "/",
            "é",
            "\u{0}",
            "xt.1=",
            "ffff",
        ];
        let mut rng = crate::wire::test_rng::XorShift::new(0x3a6);
        let mut ok = 0;
        for _ in 0..100_000 {
            let mut s = String::new();
            if rng.below(5) != 0 {
                s.push_str("magnet:?xt=urn:btih:");
                s.push_str(HEX);
                s.push('&');
            }
            for _ in 0..rng.below(12) {
                s.push_str(tokens[rng.below(tokens.len())]);
            }
            if let Ok(m) = Magnet::parse(&s) {
                ok += 1;
                let again = Magnet::parse(&m.to_uri()).unwrap();
                assert_eq!(
                    (
                        again.btih,
                        again.btmh,
                        &again.display_name,
                        &again.trackers,
                        &again.peers
                    ),
                    (m.btih, m.btmh, &m.display_name, &m.trackers, &m.peers),
                    "{s}"
                );
            }
        }
        assert!(
            ok > 100,
            "the generator should produce some valid links: {ok}"
        );
    }
}
