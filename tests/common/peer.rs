//! A blocking BitTorrent client peer on std sockets for driving the real server, built on
//! the crate's own sans-IO codec: the bytes it sends (handshakes, extension messages,
//! requests, any raw frame), a connection with deadlines (`Peer`: every read has one,
//! every loop a bound), and the BEP 9 exchange on it (`open`, `fetch`, `fetch_all`).
//! `bep9::fetch_metadata` is the same client in one call, for tests that only want the
//! bytes.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use magnetar::limits::METADATA_PIECE_BYTES as PIECE;
use magnetar::wire::{
    decode_frame, decode_metadata, encode_extended_header, encode_handshake,
    encode_metadata_request, Decoded, ExtHandshake, Frame, MetadataMsg, Reserved, HANDSHAKE_LEN,
};
use sha1::{Digest, Sha1};

use super::info::Torrent;

/// Upper bound for anything the server should do "at once".
pub const PROMPT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Bytes we send, built with the crate's encoders.
// ---------------------------------------------------------------------------------------

pub const CLIENT_PEER_ID: [u8; 20] = *b"-TS0001-abcdefghijkl";

/// BEP 10 (+ Fast if asked); never the v2 bit.
pub fn reserved(fast: bool) -> Reserved {
    Reserved::ours(fast, false, false)
}

/// The 68-byte handshake.
pub fn handshake(reserved: Reserved, key: &[u8; 20]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_handshake(&mut out, reserved, key, &CLIENT_PEER_ID);
    assert_eq!(out.len(), HANDSHAKE_LEN);
    out
}

/// Our extension handshake; `ut_metadata` is the id the server must use towards us.
pub fn ext_handshake(ut_metadata: Option<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    ExtHandshake {
        ut_metadata,
        client: Some(b"magnetar test client"),
        reqq: Some(500),
        ..Default::default()
    }
    .encode(&mut out);
    out
}

/// A ut_metadata request addressed with the server's id.
pub fn request(server_id: u8, piece: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_metadata_request(&mut out, server_id, piece);
    out
}

pub fn requests(server_id: u8, pieces: impl IntoIterator<Item = u32>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        encode_metadata_request(&mut out, server_id, p);
    }
    out
}

/// An extended message (BEP 10) with a raw payload.
pub fn extended(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_extended_header(&mut out, id, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A BEP 3 frame with any id and payload.
pub fn raw_frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(id);
    out.extend_from_slice(payload);
    out
}

/// 127.0.0.`c`: a loopback source address of its own.
pub fn src(c: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, c)
}

pub fn socket_from(source: Ipv4Addr) -> socket2::Socket {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    // Pick the port at connect time (per 4-tuple), not at bind: thousands of connections
    // from one source address then do not run out of ports.
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(source), 0)))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    sock
}

pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = socket_from(source);
    sock.connect_timeout(&addr.into(), PROMPT)?;
    let s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// A blocking connection with deadlines.
// ---------------------------------------------------------------------------------------

/// One whole frame as received (length prefix included).
#[derive(PartialEq)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    pub fn frame(&self) -> Frame<'_> {
        match decode_frame(&self.0) {
            Ok(Decoded::Done(f, n)) if n == self.0.len() => f,
            other => panic!("Msg holds a whole frame: {other:?}"),
        }
    }

    /// (extended id, ut_metadata message, block) or a panic naming what came instead.
    /// A keep-alive (four zero bytes).
    pub fn is_keepalive(&self) -> bool {
        self.0 == [0; 4]
    }

    pub fn metadata(&self) -> (u8, MetadataMsg, Vec<u8>) {
        match self.frame() {
            Frame::Extended { id, payload } if id != 0 => {
                let (msg, block) = decode_metadata(payload)
                    .unwrap_or_else(|e| panic!("bad ut_metadata message from server: {e}"));
                (id, msg, block.to_vec())
            }
            other => panic!("expected a ut_metadata message, got {other:?}"),
        }
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.frame() {
            Frame::Extended { id, payload } => write!(
                f,
                "Extended {{ id: {id}, payload: {:?} }}",
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ),
            other => write!(f, "{other:?}"),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Recv {
    Msg(Msg),
    /// EOF or reset.
    Closed,
    Timeout,
}

pub struct Peer {
    pub s: TcpStream,
    /// Received, not yet consumed.
    pub buf: Vec<u8>,
    /// Set once a read returned EOF or a reset.
    pub closed: bool,
}

impl Peer {
    pub fn connect(addr: SocketAddr) -> Peer {
        let s = TcpStream::connect_timeout(&addr, PROMPT).expect("connect");
        Peer::wrap(s)
    }

    /// Connects from a chosen loopback source address (any 127.x works on Linux).
    pub fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> Peer {
        Peer::wrap(connect_from(src, addr).unwrap_or_else(|e| panic!("connect from {src}: {e}")))
    }

    pub fn wrap(s: TcpStream) -> Peer {
        s.set_nodelay(true).unwrap();
        s.set_write_timeout(Some(PROMPT)).unwrap();
        Peer {
            s,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Writes all of `bytes`; panics if the server has closed.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to server");
    }

    /// Writes all of `bytes`; false if the server has closed (reset, broken pipe).
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok()
    }

    /// One read into `buf` before `deadline`: Ok(true) = got bytes, Ok(false) = EOF/reset,
    /// Err = deadline passed.
    pub fn fill(&mut self, deadline: Instant) -> Result<bool, ()> {
        if self.closed {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(());
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 64 * 1024];
        match self.s.read(&mut chunk) {
            Ok(0) => {
                self.closed = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(_) => {
                // ECONNRESET and friends: the server closed on us.
                self.closed = true;
                Ok(false)
            }
        }
    }

    /// Exactly `n` bytes, or a panic saying why not.
    pub fn read_exact(&mut self, n: usize, within: Duration, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + within;
        while self.buf.len() < n {
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => panic!(
                    "{what}: connection closed after {} of {n} bytes",
                    self.buf.len()
                ),
                Err(()) => panic!(
                    "{what}: only {} of {n} bytes within {within:?}",
                    self.buf.len()
                ),
            }
        }
        self.buf.drain(..n).collect()
    }

    pub fn recv(&mut self, within: Duration) -> Recv {
        let deadline = Instant::now() + within;
        loop {
            match decode_frame(&self.buf) {
                Ok(Decoded::Done(_, n)) => return Recv::Msg(Msg(self.buf.drain(..n).collect())),
                Ok(Decoded::NeedMore(_)) => {}
                Err(e) => panic!("server sent an undecodable frame: {e}"),
            }
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => return Recv::Closed,
                Err(()) => return Recv::Timeout,
            }
        }
    }

    /// The next message; panics on close or timeout.
    pub fn msg(&mut self, what: &str) -> Msg {
        match self.recv(PROMPT) {
            Recv::Msg(m) => m,
            other => panic!("{what}: expected a message, got {other:?}"),
        }
    }

    /// The next message that is not a keep-alive.
    pub fn msg_skipping_keepalives(&mut self, what: &str) -> Msg {
        for _ in 0..1000 {
            let m = self.msg(what);
            if !matches!(m.frame(), Frame::KeepAlive) {
                return m;
            }
        }
        panic!("{what}: only keep-alives");
    }

    /// Waits for the server to close; returns what arrived first and how long it took, or
    /// None if still open after `within`.
    pub fn closed_within(&mut self, within: Duration) -> Option<(Vec<u8>, Duration)> {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => return Some((std::mem::take(&mut self.buf), start.elapsed())),
                Err(()) => return None,
            }
        }
    }

    /// `closed_within`, panicking if still open after `within`.
    pub fn assert_closed_within(&mut self, within: Duration, what: &str) -> (Vec<u8>, Duration) {
        self.closed_within(within).unwrap_or_else(|| {
            panic!(
                "{what}: still open after {within:?} ({} bytes received)",
                self.buf.len()
            )
        })
    }

    /// Asserts nothing but keep-alives arrives for `quiet` and the connection stays open.
    pub fn assert_quiet(&mut self, quiet: Duration, what: &str) {
        let deadline = Instant::now() + quiet;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            match self.recv(deadline - now) {
                Recv::Timeout => return,
                Recv::Closed => panic!("{what}: server closed the connection"),
                Recv::Msg(m) => assert!(
                    matches!(m.frame(), Frame::KeepAlive),
                    "{what}: unexpected message {m:?}"
                ),
            }
        }
    }
}

/// What the server answered to our handshake.
pub struct Opened {
    pub peer: Peer,
    pub handshake: Vec<u8>,
    pub ext_payload: Vec<u8>,
    /// The server's ut_metadata id (requests go out with it).
    pub server_id: u8,
}

impl Opened {
    pub fn ext(&self) -> ExtHandshake<'_> {
        ExtHandshake::decode(&self.ext_payload).expect("server's extension handshake decodes")
    }
}

/// Sends `first` (a handshake, maybe more), reads the 68-byte handshake and the first
/// message, which must be the extension handshake.
pub fn open_with(mut peer: Peer, first: &[u8]) -> Opened {
    peer.send(first);
    let handshake = peer.read_exact(HANDSHAKE_LEN, PROMPT, "server handshake");
    assert_eq!(
        handshake[28..48],
        first[28..48],
        "the server echoes our info-hash"
    );
    let m = peer.msg("extension handshake");
    let ext_payload = match m.frame() {
        Frame::Extended { id: 0, payload } => payload.to_vec(),
        other => panic!(
            "first message after the handshake must be the extension handshake, got {other:?}"
        ),
    };
    let server_id = ExtHandshake::decode(&ext_payload)
        .expect("server's extension handshake decodes")
        .ut_metadata
        .expect("server advertises ut_metadata");
    assert_ne!(server_id, 0, "server's ut_metadata id must be nonzero");
    Opened {
        peer,
        handshake,
        ext_payload,
        server_id,
    }
}

/// Full handshake + our extension handshake (ut_metadata = `our_id`), no Fast bit.
pub fn open(addr: SocketAddr, key: &[u8; 20], our_id: u8) -> Opened {
    let mut first = handshake(reserved(false), key);
    first.extend(ext_handshake(Some(our_id)));
    open_with(Peer::connect(addr), &first)
}

/// Requests `pieces` in one write and checks each answer is the right data message with
/// `our_id`; returns the blocks in order.
pub fn fetch(o: &mut Opened, t: &Torrent, our_id: u8, pieces: &[u32]) -> Vec<Vec<u8>> {
    fetch_on(&mut o.peer, o.server_id, t, our_id, pieces)
}

/// `fetch` on a connection whose server id is `server_id`.
pub fn fetch_on(
    peer: &mut Peer,
    server_id: u8,
    t: &Torrent,
    our_id: u8,
    pieces: &[u32],
) -> Vec<Vec<u8>> {
    let wire = requests(server_id, pieces.iter().copied());
    peer.send(&wire);
    let mut blocks = Vec::new();
    for &piece in pieces {
        let m = peer.msg_skipping_keepalives("data message");
        let (id, msg, block) = m.metadata();
        assert_eq!(id, our_id, "data must carry OUR ut_metadata id ({m:?})");
        assert_eq!(
            msg,
            MetadataMsg::Data {
                piece,
                total_size: t.info.len() as u64
            },
            "{m:?}"
        );
        let start = piece as usize * PIECE;
        let end = t.info.len().min(start + PIECE);
        assert_eq!(block.len(), end - start, "piece {piece} block length");
        if (piece as usize) + 1 < t.pieces() {
            assert_eq!(block.len(), PIECE, "only the last piece may be short");
        }
        assert!(block == t.info[start..end], "piece {piece} bytes differ");
        blocks.push(block);
    }
    blocks
}

/// Every piece of `t`, checked, and the whole checked against its hash.
pub fn fetch_all(o: &mut Opened, t: &Torrent, our_id: u8) {
    fetch_all_on(&mut o.peer, o.server_id, t, our_id)
}

/// `fetch_all` on a connection whose server id is `server_id`.
pub fn fetch_all_on(peer: &mut Peer, server_id: u8, t: &Torrent, our_id: u8) {
    let pieces: Vec<u32> = (0..t.pieces() as u32).collect();
    let got: Vec<u8> = fetch_on(peer, server_id, t, our_id, &pieces).concat();
    assert_eq!(got.len(), t.info.len());
    assert!(got == t.info, "reassembled metadata differs");
    let want: [u8; 20] = Sha1::digest(&t.info).into();
    let have: [u8; 20] = Sha1::digest(&got).into();
    assert_eq!(have, want);
}

/// Bounded retry for "the server has noticed a close and freed the slot".
pub fn admitted_eventually(
    mut connect: impl FnMut() -> Peer,
    key: &[u8; 20],
    what: &str,
) -> Opened {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut p = connect();
        let mut first = handshake(reserved(false), key);
        first.extend(ext_handshake(Some(1)));
        p.send(&first);
        let d = Instant::now() + Duration::from_secs(2);
        while p.buf.len() < HANDSHAKE_LEN && p.fill(d) == Ok(true) {}
        if p.buf.len() >= HANDSHAKE_LEN {
            let handshake = p.read_exact(HANDSHAKE_LEN, PROMPT, what);
            let m = p.msg(what);
            let Frame::Extended { id: 0, payload } = m.frame() else {
                panic!("{what}: {m:?}")
            };
            let ext_payload = payload.to_vec();
            let server_id = ExtHandshake::decode(&ext_payload)
                .unwrap()
                .ut_metadata
                .unwrap();
            return Opened {
                peer: p,
                handshake,
                ext_payload,
                server_id,
            };
        }
        assert!(Instant::now() < deadline, "{what}: never admitted");
        std::thread::sleep(Duration::from_millis(50));
    }
}
