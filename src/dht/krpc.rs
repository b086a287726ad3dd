//! KRPC (BEP 5) messages, sans-IO: [`decode`] one datagram into a [`Message`] that borrows
//! from it, and writers for the queries, responses and errors we send.
//!
//! Tolerance is the point of this module (docs/dht.md): the transaction id `t` is any byte
//! string up to [`TRANSACTION_ID_BYTES_MAX`] (libtorrent sends 2 bytes, jech/dht 4, others 1
//! or 8) and is echoed back byte for byte; `v` of any length and an `ip` that is not 6 or
//! 18 bytes are ignored, never a reason to drop a message; unknown keys are ignored; a
//! query whose arguments we cannot use is answered with error 203 rather than silence.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::dht::{NodeId, TRANSACTION_ID_BYTES_MAX, VALUES_PER_RESPONSE_MAX};
use crate::wire::bencode::{parse_prefix, push_bytes, push_int, Dict, Value};

/// Our client version in `v`: "MG" and a two-byte version (BEP 20 style, as libtorrent's
/// "LT" + version). Four bytes: the mainline crate ≤ 8 drops messages whose `v` is not.
pub const CLIENT_VERSION: &[u8; 4] = b"MG\x00\x01";

/// BEP 5 error codes we send.
pub const ERROR_PROTOCOL: i64 = 203;
pub const ERROR_METHOD_UNKNOWN: i64 = 204;

/// The address families a requester wants nodes of (BEP 32 `want`). Neither set means
/// "not said": answer with the requester's own family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub v4: bool,
    pub v6: bool,
}

impl Want {
    /// What to answer someone at `from` with.
    pub fn resolve(self, from: &SocketAddr) -> Want {
        if self.v4 || self.v6 {
            self
        } else {
            Want {
                v4: from.is_ipv4(),
                v6: from.is_ipv6(),
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query<'a> {
    Ping,
    FindNode {
        target: NodeId,
        want: Want,
    },
    GetPeers {
        info_hash: NodeId,
        want: Want,
    },
    AnnouncePeer {
        info_hash: NodeId,
        port: u16,
        implied_port: bool,
        token: &'a [u8],
    },
    /// BEP 51.
    SampleInfohashes {
        target: NodeId,
        want: Want,
    },
    /// A method we do not know (answered with 204).
    Unknown(&'a [u8]),
}

/// The parts of a response our lookups use. `nodes` and `nodes6` are the compact lists with
/// any incomplete trailing entry cut off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub id: NodeId,
    pub nodes: &'a [u8],
    pub nodes6: &'a [u8],
    pub values: Vec<SocketAddr>,
    pub token: Option<&'a [u8]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Query {
        id: NodeId,
        /// BEP 43: the sender does not answer queries; keep it out of routing tables.
        read_only: bool,
        query: Query<'a>,
    },
    Response(Response<'a>),
    Error {
        code: i64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The transaction id, exactly as sent.
    pub t: &'a [u8],
    pub body: Body<'a>,
    /// BEP 42: the address the sender saw us at (responses).
    pub ip: Option<SocketAddr>,
}

/// Why a datagram is not a message we act on.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a KRPC message at all (not bencode, not a dict, no usable `t` or `y`): dropped
    /// without an answer, as there is nobody to address one to.
    #[error("not a KRPC message")]
    NotKrpc,
    /// A query with a usable `t` but arguments we cannot use: answered with error 203.
    #[error("bad query: {reason}")]
    BadQuery { t: Vec<u8>, reason: &'static str },
    /// A response or error we cannot use (dropped; the query it answers times out).
    #[error("bad response: {0}")]
    BadResponse(&'static str),
}

/// Decodes one datagram. Bytes after the top-level dict are ignored (BEP 5 says nothing of
/// them; libtorrent ignores them too).
pub fn decode(datagram: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (value, _) = parse_prefix(datagram).map_err(|_| DecodeError::NotKrpc)?;
    let top = value.as_dict().ok_or(DecodeError::NotKrpc)?;
    let t = top
        .get(b"t")
        .and_then(|v| v.as_bytes())
        .filter(|t| t.len() <= TRANSACTION_ID_BYTES_MAX)
        .ok_or(DecodeError::NotKrpc)?;
    let y = top
        .get(b"y")
        .and_then(|v| v.as_bytes())
        .ok_or(DecodeError::NotKrpc)?;
    let ip = top
        .get(b"ip")
        .and_then(|v| v.as_bytes())
        .and_then(compact_addr);
    let body = match y {
        b"q" => decode_query(top).map_err(|reason| DecodeError::BadQuery {
            t: t.to_vec(),
            reason,
        })?,
        b"r" => Body::Response(decode_response(top).map_err(DecodeError::BadResponse)?),
        b"e" => Body::Error {
            code: top
                .get(b"e")
                .and_then(|e| e.as_list())
                .and_then(|mut l| l.next())
                .and_then(|c| c.as_int())
                .and_then(|c| c.to_i64())
                .unwrap_or(0),
        },
        _ => return Err(DecodeError::NotKrpc),
    };
    Ok(Message { t, body, ip })
}

fn id_of(v: Option<Value<'_>>) -> Option<NodeId> {
    v.and_then(|v| v.as_bytes())
        .and_then(|b| <[u8; 20]>::try_from(b).ok())
}

fn want_of(args: Dict<'_>) -> Want {
    let mut want = Want::default();
    if let Some(list) = args.get(b"want").and_then(|w| w.as_list()) {
        for item in list {
            match item.as_bytes() {
                Some(b"n4") => want.v4 = true,
                Some(b"n6") => want.v6 = true,
                _ => {}
            }
        }
    }
    want
}

fn decode_query(top: Dict<'_>) -> Result<Body<'_>, &'static str> {
    let method = top
        .get(b"q")
        .and_then(|q| q.as_bytes())
        .ok_or("no method")?;
    let args = top
        .get(b"a")
        .and_then(|a| a.as_dict())
        .ok_or("no arguments")?;
    let id = id_of(args.get(b"id")).ok_or("no 20-byte id")?;
    let read_only = top
        .get(b"ro")
        .and_then(|r| r.as_int())
        .and_then(|r| r.to_i64())
        == Some(1);
    let hash = |key: &[u8]| id_of(args.get(key)).ok_or("no 20-byte target or info_hash");
    let query = match method {
        b"ping" => Query::Ping,
        b"find_node" => Query::FindNode {
            target: hash(b"target")?,
            want: want_of(args),
        },
        b"get_peers" => Query::GetPeers {
            info_hash: hash(b"info_hash")?,
            want: want_of(args),
        },
        b"announce_peer" => {
            let implied_port = args
                .get(b"implied_port")
                .and_then(|p| p.as_int())
                .and_then(|p| p.to_i64())
                .is_some_and(|p| p != 0);
            let port = args
                .get(b"port")
                .and_then(|p| p.as_int())
                .and_then(|p| p.to_u64())
                .and_then(|p| u16::try_from(p).ok());
            // With implied_port the port argument may be missing or anything.
            let port = match (implied_port, port) {
                (true, p) => p.unwrap_or(0),
                (false, Some(p)) if p != 0 => p,
                (false, _) => return Err("no valid port"),
            };
            Query::AnnouncePeer {
                info_hash: hash(b"info_hash")?,
                port,
                implied_port,
                token: args
                    .get(b"token")
                    .and_then(|t| t.as_bytes())
                    .ok_or("no token")?,
            }
        }
        b"sample_infohashes" => Query::SampleInfohashes {
            target: hash(b"target")?,
            want: want_of(args),
        },
        other => Query::Unknown(other),
    };
    Ok(Body::Query {
        id,
        read_only,
        query,
    })
}

fn decode_response(top: Dict<'_>) -> Result<Response<'_>, &'static str> {
    let r = top.get(b"r").and_then(|r| r.as_dict()).ok_or("no r")?;
    let id = id_of(r.get(b"id")).ok_or("no 20-byte id")?;
    let compact = |key: &[u8], entry: usize| {
        let b = r.get(key).and_then(|v| v.as_bytes()).unwrap_or(&[]);
        &b[..b.len() - b.len() % entry]
    };
    let mut values = Vec::new();
    if let Some(list) = r.get(b"values").and_then(|v| v.as_list()) {
        for item in list.take(VALUES_PER_RESPONSE_MAX) {
            if let Some(addr) = item.as_bytes().and_then(compact_addr) {
                values.push(addr);
            }
        }
    }
    Ok(Response {
        id,
        nodes: compact(b"nodes", NODE4_BYTES),
        nodes6: compact(b"nodes6", NODE6_BYTES),
        values,
        token: r.get(b"token").and_then(|t| t.as_bytes()),
    })
}

/// Bytes of one compact IPv4 node (BEP 5) and IPv6 node (BEP 32).
pub const NODE4_BYTES: usize = 26;
pub const NODE6_BYTES: usize = 38;

/// A 6-byte (IPv4) or 18-byte (IPv6) compact address; None for any other length.
pub fn compact_addr(b: &[u8]) -> Option<SocketAddr> {
    match b.len() {
        6 => {
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be_bytes([b[4], b[5]]),
            )))
        }
        18 => {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be_bytes([b[16], b[17]]),
                0,
                0,
            )))
        }
        _ => None,
    }
}

/// Appends the compact form of `addr` (6 or 18 bytes). An IPv4-mapped IPv6 address is
/// written as IPv4, the family the peer will dial.
pub fn push_compact_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match canonical(*addr) {
        SocketAddr::V4(a) => out.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => out.extend_from_slice(&a.ip().octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// `addr` with an IPv4-mapped IPv6 address turned into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The nodes of a compact `nodes` (26-byte entries) or `nodes6` (38-byte) string.
pub fn compact_nodes(b: &[u8], entry: usize) -> impl Iterator<Item = (NodeId, SocketAddr)> + '_ {
    b.chunks_exact(entry).filter_map(|c| {
        let id = <[u8; 20]>::try_from(&c[..20]).ok()?;
        Some((id, compact_addr(&c[20..])?))
    })
}

/// What one response carries beyond `id`. Fields left empty are not written.
#[derive(Default, Debug)]
pub struct ResponseBody<'a> {
    /// Compact nodes, IPv4 (`nodes`) and IPv6 (`nodes6`).
    pub nodes: Option<&'a [u8]>,
    pub nodes6: Option<&'a [u8]>,
    pub token: Option<&'a [u8]>,
    pub values: &'a [SocketAddr],
    /// BEP 51: (`interval` seconds, `num`, `samples` concatenated 20-byte hashes).
    pub samples: Option<(u64, u64, &'a [u8])>,
}

/// Writes a response to transaction `t`. `to` is the requester's address, written as `ip`
/// (BEP 42) so it learns its external address.
pub fn write_response(
    out: &mut Vec<u8>,
    t: &[u8],
    id: &NodeId,
    to: &SocketAddr,
    body: &ResponseBody<'_>,
) {
    // Keys in sorted order, as BEP 3 asks of every dict.
    out.extend_from_slice(b"d2:ip");
    let mut ip = Vec::with_capacity(18);
    push_compact_addr(&mut ip, to);
    push_bytes(out, &ip);
    out.extend_from_slice(b"1:rd2:id");
    push_bytes(out, id);
    if let Some((interval, _, _)) = body.samples {
        out.extend_from_slice(b"8:interval");
        push_int(out, interval);
    }
    if let Some(n) = body.nodes {
        out.extend_from_slice(b"5:nodes");
        push_bytes(out, n);
    }
    if let Some(n) = body.nodes6 {
        out.extend_from_slice(b"6:nodes6");
        push_bytes(out, n);
    }
    if let Some((_, num, samples)) = body.samples {
        out.extend_from_slice(b"3:num");
        push_int(out, num);
        out.extend_from_slice(b"7:samples");
        push_bytes(out, samples);
    }
    if let Some(token) = body.token {
        out.extend_from_slice(b"5:token");
        push_bytes(out, token);
    }
    if !body.values.is_empty() {
        out.extend_from_slice(b"6:valuesl");
        let mut a = Vec::with_capacity(18);
        for v in body.values {
            a.clear();
            push_compact_addr(&mut a, v);
            push_bytes(out, &a);
        }
        out.push(b'e');
    }
    out.push(b'e');
    write_tail(out, t, b"r");
}

/// `1:t<t>1:v<version>1:y<kind>e`: the keys every message ends with, in sorted order.
fn write_tail(out: &mut Vec<u8>, t: &[u8], kind: &[u8]) {
    out.extend_from_slice(b"1:t");
    push_bytes(out, t);
    out.extend_from_slice(b"1:v");
    push_bytes(out, CLIENT_VERSION);
    out.extend_from_slice(b"1:y");
    push_bytes(out, kind);
    out.push(b'e');
}

/// Writes an error reply to transaction `t`.
pub fn write_error(out: &mut Vec<u8>, t: &[u8], code: i64, message: &str) {
    out.extend_from_slice(b"d1:eli");
    crate::wire::bencode::push_decimal(out, code.unsigned_abs());
    out.push(b'e');
    push_bytes(out, message.as_bytes());
    out.push(b'e');
    write_tail(out, t, b"e");
}

/// A query we send.
#[derive(Clone, Copy, Debug)]
pub enum OutQuery<'a> {
    Ping,
    FindNode {
        target: &'a NodeId,
        want: Want,
    },
    GetPeers {
        info_hash: &'a NodeId,
        want: Want,
    },
    /// `implied_port` = 1 only when `port` is also the port the query leaves from (the DHT
    /// on the serving port); with a DHT port of its own, the serving port is said outright.
    AnnouncePeer {
        info_hash: &'a NodeId,
        port: u16,
        implied_port: bool,
        token: &'a [u8],
    },
}

/// Writes query `q` with transaction id `t` from node `id`.
pub fn write_query(out: &mut Vec<u8>, t: &[u8], id: &NodeId, q: &OutQuery<'_>) {
    out.extend_from_slice(b"d1:ad2:id");
    push_bytes(out, id);
    let (method, want): (&[u8], Option<Want>) = match q {
        OutQuery::Ping => (b"ping", None),
        OutQuery::FindNode { target, want } => {
            out.extend_from_slice(b"6:target");
            push_bytes(out, &target[..]);
            (b"find_node", Some(*want))
        }
        OutQuery::GetPeers { info_hash, want } => {
            out.extend_from_slice(b"9:info_hash");
            push_bytes(out, &info_hash[..]);
            (b"get_peers", Some(*want))
        }
        OutQuery::AnnouncePeer {
            info_hash,
            port,
            implied_port,
            token,
        } => {
            out.extend_from_slice(if *implied_port {
                b"12:implied_porti1e9:info_hash"
            } else {
                b"12:implied_porti0e9:info_hash"
            });
            push_bytes(out, &info_hash[..]);
            out.extend_from_slice(b"4:port");
            push_int(out, u64::from(*port));
            out.extend_from_slice(b"5:token");
            push_bytes(out, token);
            (b"announce_peer", None)
        }
    };
    // `want` only when both families are wanted: a node that knows no BEP 32 ignores it,
    // and one family alone is what a node answers by default.
    if want.is_some_and(|w| w.v4 && w.v6) {
        out.extend_from_slice(b"4:wantl2:n42:n6e");
    }
    out.extend_from_slice(b"e1:q");
    push_bytes(out, method);
    write_tail(out, t, b"q");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn any_transaction_id_length_is_kept_byte_for_byte() {
        for t in [&b"a"[..], b"aa", b"\x00\xff\x10\x01", b"12345678"] {
            let mut q = Vec::new();
            write_query(&mut q, t, &[7; 20], &OutQuery::Ping);
            let m = decode(&q).unwrap();
            assert_eq!(m.t, t);
            assert!(matches!(
                m.body,
                Body::Query {
                    id,
                    query: Query::Ping,
                    ..
                } if id == [7; 20]
            ));
        }
        let long = [b'x'; TRANSACTION_ID_BYTES_MAX + 1];
        let mut q = Vec::new();
        write_query(&mut q, &long, &[7; 20], &OutQuery::Ping);
        assert_eq!(decode(&q), Err(DecodeError::NotKrpc));
    }

    #[test]
    fn odd_v_and_ip_are_tolerated() {
        // libtorrent's ping with a 2-byte t, a 4-byte v; then an 8-byte v and a 5-byte ip.
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:v4:LT\x02\x001:y1:qe";
        assert_eq!(decode(q).unwrap().t, b"aa");
        let q = b"d1:ad2:id20:abcdefghij0123456789e2:ip5:xxxxx1:q4:ping1:t1:z1:v8:12345678\
                  1:y1:qe";
        let m = decode(q).unwrap();
        assert_eq!((m.t, m.ip), (&b"z"[..], None));
    }

    #[test]
    fn a_query_we_cannot_use_names_its_transaction() {
        let q = b"d1:ad2:id3:abce1:q4:ping1:t2:xy1:y1:qe";
        assert_eq!(
            decode(q),
            Err(DecodeError::BadQuery {
                t: b"xy".to_vec(),
                reason: "no 20-byte id"
            })
        );
        assert_eq!(decode(b"le"), Err(DecodeError::NotKrpc));
        assert_eq!(decode(b"d1:y1:qe"), Err(DecodeError::NotKrpc));
    }

    #[test]
    fn queries_round_trip() {
        let (ih, tok) = ([3u8; 20], b"tok".as_slice());
        let want = Want { v4: true, v6: true };
        let cases = [
            (
                OutQuery::FindNode { target: &ih, want },
                Query::FindNode { target: ih, want },
            ),
            (
                OutQuery::GetPeers {
                    info_hash: &ih,
                    want: Want {
                        v4: true,
                        v6: false,
                    },
                },
                Query::GetPeers {
                    info_hash: ih,
                    want: Want::default(),
                },
            ),
            (
                OutQuery::AnnouncePeer {
                    info_hash: &ih,
                    port: 6881,
                    implied_port: false,
                    token: tok,
                },
                Query::AnnouncePeer {
                    info_hash: ih,
                    port: 6881,
                    implied_port: false,
                    token: tok,
                },
            ),
            (
                OutQuery::AnnouncePeer {
                    info_hash: &ih,
                    port: 6881,
                    implied_port: true,
                    token: tok,
                },
                Query::AnnouncePeer {
                    info_hash: ih,
                    port: 6881,
                    implied_port: true,
                    token: tok,
                },
            ),
        ];
        for (out, expect) in cases {
            let mut b = Vec::new();
            write_query(&mut b, b"tt", &[1; 20], &out);
            match decode(&b).unwrap().body {
                Body::Query { query, .. } => assert_eq!(query, expect),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn responses_round_trip_with_nodes6_values_and_samples() {
        let mut nodes = Vec::new();
        nodes.extend_from_slice(&[9; 20]);
        push_compact_addr(&mut nodes, &addr("10.0.0.1:5"));
        let mut nodes6 = Vec::new();
        nodes6.extend_from_slice(&[8; 20]);
        push_compact_addr(&mut nodes6, &addr("[2001:db8::1]:7"));
        let values = [addr("1.2.3.4:6881"), addr("[::1]:6881")];
        let mut b = Vec::new();
        write_response(
            &mut b,
            b"\x01",
            &[2; 20],
            &addr("[::ffff:127.0.0.1]:9"),
            &ResponseBody {
                nodes: Some(&nodes),
                nodes6: Some(&nodes6),
                token: Some(b"secret"),
                values: &values,
                samples: Some((60, 3, &[5; 40])),
            },
        );
        let m = decode(&b).unwrap();
        assert_eq!(m.t, b"\x01");
        assert_eq!(m.ip, Some(addr("127.0.0.1:9")));
        let Body::Response(r) = m.body else { panic!() };
        assert_eq!(r.id, [2; 20]);
        assert_eq!(r.values, values);
        assert_eq!(r.token, Some(&b"secret"[..]));
        assert_eq!(
            compact_nodes(r.nodes, NODE4_BYTES).collect::<Vec<_>>(),
            [([9; 20], addr("10.0.0.1:5"))]
        );
        assert_eq!(
            compact_nodes(r.nodes6, NODE6_BYTES).collect::<Vec<_>>(),
            [([8; 20], addr("[2001:db8::1]:7"))]
        );
        // Keys sorted at every level: the strict decoder (bendy) reads it.
        let mut dec = bendy::decoding::Decoder::new(&b);
        let mut seen = 0;
        if let Ok(Some(bendy::decoding::Object::Dict(mut d))) = dec.next_object() {
            while let Ok(Some((_k, _v))) = d.next_pair() {
                seen += 1;
            }
        }
        assert_eq!(seen, 5, "ip r t v y");
    }

    #[test]
    fn errors_carry_code_and_transaction() {
        let mut b = Vec::new();
        write_error(&mut b, b"ab", ERROR_METHOD_UNKNOWN, "Method Unknown");
        assert_eq!(
            &b[..],
            b"d1:eli204e14:Method Unknowne1:t2:ab1:v4:MG\x00\x011:y1:ee"
        );
        let m = decode(&b).unwrap();
        assert_eq!(m.body, Body::Error { code: 204 });
    }

    #[test]
    fn never_panics_on_truncations_and_flips() {
        let mut b = Vec::new();
        write_response(
            &mut b,
            b"xy",
            &[2; 20],
            &addr("1.2.3.4:5"),
            &ResponseBody {
                token: Some(b"t"),
                values: &[addr("1.2.3.4:6881")],
                ..Default::default()
            },
        );
        for n in 0..b.len() {
            let _ = decode(&b[..n]);
            let mut c = b.clone();
            c[n] ^= 0x5a;
            let _ = decode(&c);
        }
    }
}
