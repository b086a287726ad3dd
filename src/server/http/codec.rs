//! The public HTTP listener's protocol, without I/O: a request head in (parsed by
//! `httparse`, every size capped), what to answer out, and the response heads written into
//! a caller's buffer. The driver (`http/mod.rs`) looks records up, runs misses and moves
//! bytes.
//!
//! Routes: `GET`/`HEAD /torrent/<hash>.torrent[?title=NAME]` (40 hex either case, 32
//! base32, 64 hex v2) and `OPTIONS *` (CORS preflight). Nothing else exists here: this
//! listener never reaches an admin endpoint or the filesystem.

use std::io::Write as _;

use crate::admin::HashQuery;
use crate::limits;

/// The methods we tell apart; any other token is `Other` (405).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
    Other,
}

/// What the request target names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `/torrent/<hash>.torrent`, with the `title` query parameter if any.
    Torrent {
        hash: HashQuery,
        title: Option<String>,
    },
    /// `/torrent/<something>.torrent` where something is not an info-hash.
    BadHash,
    /// Any other path.
    Unknown,
}

/// One parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub target: Target,
    /// The connection stays open after the answer (HTTP/1.1 unless `Connection: close`;
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `If-None-Match`, as sent.
    pub if_none_match: Option<String>,
    /// `Access-Control-Request-Headers` of a preflight, if it is a plain token list.
    pub preflight_headers: Option<String>,
}

/// A request head we refuse; each has its status, and the connection closes after it
/// (what follows the head cannot be trusted to start a new request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or broken syntax: 400.
    Malformed,
    /// Longer than `HTTP_REQUEST_HEAD_BYTES_MAX`, or more than `HTTP_HEADERS_MAX` headers: 431.
    HeadTooLarge,
    /// Target longer than `HTTP_TARGET_BYTES_MAX`: 414.
    TargetTooLong,
    /// A request body (`Content-Length` > 0 or `Transfer-Encoding`): nothing here takes one; 413.
    Body,
}

impl HeadError {
    pub fn status(self) -> Status {
        match self {
            HeadError::Malformed => Status::BadRequest,
            HeadError::HeadTooLarge => Status::HeadersTooLarge,
            HeadError::TargetTooLong => Status::UriTooLong,
            HeadError::Body => Status::PayloadTooLarge,
        }
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete (read more;
/// `buf` is already too long once it passes `HTTP_REQUEST_HEAD_BYTES_MAX`). `Ok(Some((req,
/// n)))`: the head took `n` bytes; what follows is the next pipelined request.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; limits::HTTP_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits::HTTP_REQUEST_HEAD_BYTES_MAX {
                return Err(HeadError::HeadTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadTooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if n > limits::HTTP_REQUEST_HEAD_BYTES_MAX {
        return Err(HeadError::HeadTooLarge);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    if path.len() > limits::HTTP_TARGET_BYTES_MAX {
        return Err(HeadError::TargetTooLong);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let mut keep_alive = version == 1;
    let mut if_none_match = None;
    let mut preflight_headers = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(HeadError::Malformed)?;
            if len > 0 {
                return Err(HeadError::Body);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Body);
        } else if name.eq_ignore_ascii_case("if-none-match") {
            if_none_match = std::str::from_utf8(h.value).ok().map(str::to_owned);
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            preflight_headers = token_list(h.value);
        }
    }
    // An HTTP/1.0 client without `Connection: keep-alive` waits for the close.
    if version == 0
        && !req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        keep_alive = false;
    }
    Ok(Some((
        Request {
            method,
            target: parse_target(path),
            keep_alive,
            if_none_match,
            preflight_headers,
        },
        n,
    )))
}

/// A header value that is a comma-separated list of header-name tokens (what a browser
/// sends in `Access-Control-Request-Headers`), or `None`: only such a list is echoed back.
fn token_list(value: &[u8]) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= 512
        && value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b',' | b' '));
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

/// `/torrent/<hash>.torrent[?query]` → its hash and title.
pub fn parse_target(target: &str) -> Target {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Some(name) = path
        .strip_prefix("/torrent/")
        .and_then(|rest| rest.strip_suffix(".torrent"))
    else {
        return Target::Unknown;
    };
    let Some(hash) = crate::admin::parse_hash(name) else {
        return Target::BadHash;
    };
    let title = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "title")
            .and_then(|(_, v)| clean_title(&crate::magnet::percent_decode(v, true)))
    });
    Target::Torrent { hash, title }
}

/// Longest download file name we put into `Content-Disposition`, in characters.
const TITLE_CHARS_MAX: usize = 200;

/// A `?title=` as a file name: control characters, path separators and quotes dropped,
/// `.torrent` appended unless present; `None` when nothing is left.
fn clean_title(raw: &str) -> Option<String> {
    let mut t: String = raw
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '/' | '\\' | '"'))
        .take(TITLE_CHARS_MAX)
        .collect();
    t = t.trim().trim_start_matches('.').trim().to_owned();
    if t.is_empty() {
        return None;
    }
    if !t.to_ascii_lowercase().ends_with(".torrent") {
        t.push_str(".torrent");
    }
    Some(t)
}

/// The statuses this listener answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    NoContent,
    NotModified,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UriTooLong,
    TooManyRequests,
    HeadersTooLarge,
    ServiceUnavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::NoContent => 204,
            Status::NotModified => 304,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::PayloadTooLarge => 413,
            Status::UriTooLong => 414,
            Status::TooManyRequests => 429,
            Status::HeadersTooLarge => 431,
            Status::ServiceUnavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::NoContent => "No Content",
            Status::NotModified => "Not Modified",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::UriTooLong => "URI Too Long",
            Status::TooManyRequests => "Too Many Requests",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// Methods this listener knows, for `Allow` and the preflight.
const ALLOW: &str = "GET, HEAD, OPTIONS";

/// A 200 may be cached by browsers and proxies for a day: the info dict named by its hash
/// never changes, but the announce-list may, and an operator may delete a hash.
pub const CACHE_OK: &str = "public, max-age=86400";

/// Headers every answer carries: status line, CORS (every origin: the answers are public
/// and carry no credentials), and the connection's fate.
fn start(out: &mut Vec<u8>, status: Status, keep_alive: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n\
         Server: magnetar\r\n\
         Access-Control-Allow-Origin: *\r\n\
         Access-Control-Expose-Headers: Content-Disposition, Content-Length, ETag, Retry-After\r\n\
         Connection: {}\r\n",
        status.code(),
        status.reason(),
        if keep_alive { "keep-alive" } else { "close" }
    );
}

/// The head of a .torrent answer (200), `body_len` bytes to follow (the caller sends them,
/// unless it answers HEAD).
pub fn torrent_head(
    out: &mut Vec<u8>,
    keep_alive: bool,
    etag: &str,
    file_name: &str,
    body_len: usize,
) {
    start(out, Status::Ok, keep_alive);
    // Written straight into `out` (no String per answer): the ASCII fallback name, then
    // the RFC 5987 form (UTF-8, everything but RFC 3986 unreserved percent-encoded).
    out.extend_from_slice(
        b"Content-Type: application/x-bittorrent\r\nContent-Disposition: attachment; filename=\"",
    );
    out.extend(file_name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || " ._-()[]".contains(c) {
            c as u8
        } else {
            b'_'
        }
    }));
    out.extend_from_slice(b"\"; filename*=UTF-8''");
    for &b in file_name.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    let _ = write!(
        out,
        "\r\nETag: {etag}\r\nCache-Control: {CACHE_OK}\r\nContent-Length: {body_len}\r\n\r\n"
    );
}

/// The head of a 304 (the client's copy is current).
pub fn not_modified_head(out: &mut Vec<u8>, keep_alive: bool, etag: &str) {
    start(out, Status::NotModified, keep_alive);
    let _ = write!(out, "ETag: {etag}\r\nCache-Control: {CACHE_OK}\r\n\r\n");
}

/// A CORS preflight answer: the methods we serve, and the headers the page asked for
/// (echoed when they are a plain token list, else the ones clients send: `user-agent`
/// matters to webtorrent#1606).
pub fn preflight(out: &mut Vec<u8>, keep_alive: bool, asked: Option<&str>) {
    start(out, Status::NoContent, keep_alive);
    let _ = write!(
        out,
        "Access-Control-Allow-Methods: {ALLOW}\r\n\
         Access-Control-Allow-Headers: {}\r\n\
         Access-Control-Max-Age: 86400\r\n\
         Content-Length: 0\r\n\r\n",
        asked.unwrap_or("user-agent, if-none-match, range, content-type")
    );
}

/// A short text answer (errors, 404s), never cached. `head_only`: the same head, no body
/// (HEAD). `retry_after_s`: for 429.
pub fn text(
    out: &mut Vec<u8>,
    status: Status,
    keep_alive: bool,
    body: &str,
    head_only: bool,
    retry_after_s: Option<u64>,
) {
    start(out, status, keep_alive);
    if status == Status::MethodNotAllowed {
        let _ = write!(out, "Allow: {ALLOW}\r\n");
    }
    if let Some(s) = retry_after_s {
        let _ = write!(out, "Retry-After: {s}\r\n");
    }
    let _ = write!(
        out,
        "Content-Type: text/plain; charset=utf-8\r\n\
         Cache-Control: no-store\r\n\
         Content-Length: {}\r\n\r\n",
        body.len() + 1
    );
    if !head_only {
        out.extend_from_slice(body.as_bytes());
        out.push(b'\n');
    }
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 §13.1.2:
/// `*`, or any listed tag equal once a `W/` prefix is dropped).
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    fn strip(t: &str) -> &str {
        t.trim().trim_start_matches("W/")
    }
    let ours = strip(etag);
    if_none_match
        .split(',')
        .any(|t| t.trim() == "*" || strip(t) == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c8295ce630f2064f08440db1534e37da6b4eabc7";

    fn parse(s: &str) -> Result<Option<(Request, usize)>, HeadError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn torrent_route_upper_and_lower_hex_base32_and_v2() {
        let lower = format!("GET /torrent/{HEX}.torrent HTTP/1.1\r\nHost: x\r\n\r\n");
        let (req, n) = parse(&lower).unwrap().unwrap();
        assert_eq!(n, lower.len());
        let Target::Torrent { hash, title } = req.target else {
            panic!("not a torrent target")
        };
        assert_eq!(hex::encode(hash.key), HEX);
        assert_eq!(title, None);
        assert!(req.keep_alive);
        let upper = format!(
            "GET /torrent/{}.torrent HTTP/1.1\r\n\r\n",
            HEX.to_uppercase()
        );
        let (req, _) = parse(&upper).unwrap().unwrap();
        assert!(matches!(req.target, Target::Torrent { hash: h, .. } if h == hash));
        let b32 = data_encoding::BASE32.encode(&hash.key).to_lowercase();
        let (req, _) = parse(&format!("HEAD /torrent/{b32}.torrent HTTP/1.1\r\n\r\n"))
            .unwrap()
            .unwrap();
        assert_eq!(req.method, Method::Head);
        assert!(matches!(req.target, Target::Torrent { hash: h, .. } if h == hash));
        let v2 = "ab".repeat(32);
        let (req, _) = parse(&format!("GET /torrent/{v2}.torrent HTTP/1.1\r\n\r\n"))
            .unwrap()
            .unwrap();
        assert!(matches!(req.target, Target::Torrent { hash: h, .. } if h.v2 == Some([0xab; 32])));
    }

    #[test]
    fn bad_hashes_and_other_paths() {
        let longer = format!("{HEX}0");
        for bad in ["xyz", "", &HEX[1..], longer.as_str()] {
            assert_eq!(
                parse_target(&format!("/torrent/{bad}.torrent")),
                Target::BadHash
            );
        }
        for other in [
            "/",
            "/torrents/x.torrent",
            "/metrics",
            "/torrent/",
            "/../etc/passwd",
        ] {
            assert_eq!(parse_target(other), Target::Unknown, "{other}");
        }
    }

    #[test]
    fn title_is_decoded_and_cleaned() {
        let t = |q: &str| match parse_target(&format!("/torrent/{HEX}.torrent?{q}")) {
            Target::Torrent { title, .. } => title,
            other => panic!("{other:?}"),
        };
        assert_eq!(t("title=My%20Film"), Some("My Film.torrent".into()));
        assert_eq!(t("a=1&title=x+y.torrent"), Some("x y.torrent".into()));
        assert_eq!(
            t("title=..%2F..%2Fetc%2Fpasswd"),
            Some("etcpasswd.torrent".into())
        );
        assert_eq!(t("title=%0d%0a"), None);
        assert_eq!(t("other=1"), None);
    }

    #[test]
    fn connection_semantics() {
        let (r, _) = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
        let (r, _) = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        let (r, _) = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
    }

    #[test]
    fn limits_give_their_statuses() {
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        let long_header = format!(
            "GET / HTTP/1.1\r\nX: {}",
            "a".repeat(limits::HTTP_REQUEST_HEAD_BYTES_MAX)
        );
        assert_eq!(parse(&long_header), Err(HeadError::HeadTooLarge));
        let many: String = (0..=limits::HTTP_HEADERS_MAX)
            .map(|i| format!("X{i}: y\r\n"))
            .collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::HeadTooLarge)
        );
        let long_target = format!(
            "GET /{} HTTP/1.1\r\n\r\n",
            "a".repeat(limits::HTTP_TARGET_BYTES_MAX)
        );
        assert_eq!(parse(&long_target), Err(HeadError::TargetTooLong));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Err(HeadError::Body)
        );
        assert_eq!(
            parse("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Body)
        );
        let empty_body = "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse(empty_body).unwrap().unwrap().1, empty_body.len());
        assert_eq!(
            parse("\x16\x03\x01 tls hello\r\n\r\n"),
            Err(HeadError::Malformed)
        );
    }

    #[test]
    fn preflight_headers_are_echoed_only_as_tokens() {
        let (r, _) = parse("OPTIONS /torrent/x.torrent HTTP/1.1\r\nAccess-Control-Request-Headers: user-agent, x-foo\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, Method::Options);
        assert_eq!(r.preflight_headers.as_deref(), Some("user-agent, x-foo"));
        let (r, _) = parse("OPTIONS / HTTP/1.1\r\nAccess-Control-Request-Headers: a\"b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.preflight_headers, None);
    }

    #[test]
    fn etags_compare_weakly() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("W/\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", \"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    #[test]
    fn never_panics_on_prefixes_of_any_input() {
        let sample = format!(
            "GET /torrent/{HEX}.torrent?title=%ff%fe HTTP/1.1\r\nIf-None-Match: \"a\"\r\nConnection: x\r\n\r\n"
        );
        for end in 0..sample.len() {
            let _ = parse_head(&sample.as_bytes()[..end]);
        }
        for b in 0..=255u8 {
            let _ = parse_head(&[b; 64]);
        }
    }
}
