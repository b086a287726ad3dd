//! Blocking BEP 9 test peers on std sockets, built on the crate's sans-IO codec:
//! `fetch_metadata` (a client that asks a server for an info dict) and `FakeSeed` (a
//! server that has one, honest or lying, counting its connections).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake,
    encode_metadata_data_header, encode_metadata_reject, encode_metadata_request,
    metadata_piece_count, metadata_piece_range, Decoded, ExtHandshake, Frame, MetadataMsg,
    Reserved, HANDSHAKE_LEN, OUR_UT_METADATA_ID,
};

const OUR_UT_METADATA: u8 = 7;

/// Reads frames from `s` into `buf`, calling `on` for each, until `on` returns Some or
/// `deadline` passes (None) or the peer closes (None).
fn read_frames<T>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    mut on: impl FnMut(Frame<'_>) -> Option<T>,
) -> Option<T> {
    loop {
        loop {
            match decode_frame(buf) {
                Ok(Decoded::Done(frame, n)) => {
                    let r = on(frame);
                    buf.drain(..n);
                    if r.is_some() {
                        return r;
                    }
                }
                Ok(Decoded::NeedMore(_)) => break,
                Err(_) => return None,
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let mut tmp = [0u8; 65536];
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Connects to `addr` as a metadata-less client for `key` and returns the info dict, or
/// an error string. Accepts `metadata_size` in a first or a later extension handshake.
pub fn fetch_metadata(
    addr: SocketAddr,
    key: &[u8; 20],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let mut out = Vec::new();
    encode_handshake(
        &mut out,
        Reserved::ours(true, false, false),
        key,
        b"-TS0001-testclient00",
    );
    ExtHandshake {
        ut_metadata: Some(OUR_UT_METADATA),
        ut_pex: None,
        metadata_size: None,
        client: Some(b"test client"),
        reqq: Some(250),
        yourip: None,
        listen_port: None,
    }
    .encode(&mut out);
    s.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    // Their handshake.
    while buf.len() < HANDSHAKE_LEN {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or("handshake timeout")?;
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let mut tmp = [0u8; 4096];
        match s.read(&mut tmp) {
            Ok(0) => return Err("closed before handshake".into()),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => return Err(format!("read handshake: {e}")),
        }
    }
    match decode_handshake_head(&buf) {
        Ok(Decoded::Done(h, _)) if &h.info_hash == key => {}
        other => return Err(format!("bad handshake: {other:?}")),
    }
    buf.drain(..HANDSHAKE_LEN);
    // Extension handshakes until one carries metadata_size.
    let (their_id, size) = read_frames(&mut s, &mut buf, deadline, |f| match f {
        Frame::Extended { id: 0, payload } => {
            let hs = ExtHandshake::decode(payload).ok()?;
            Some((hs.ut_metadata?, hs.metadata_size?))
        }
        _ => None,
    })
    .ok_or("no extension handshake with metadata_size")?;
    let pieces = metadata_piece_count(size as usize);
    let mut out = Vec::new();
    for p in 0..pieces as u32 {
        encode_metadata_request(&mut out, their_id, p);
    }
    s.write_all(&out)
        .map_err(|e| format!("write requests: {e}"))?;
    let mut info = vec![0u8; size as usize];
    let mut got = 0;
    read_frames(&mut s, &mut buf, deadline, |f| {
        if let Frame::Extended {
            id: OUR_UT_METADATA,
            payload,
        } = f
        {
            if let Ok((MetadataMsg::Data { piece, .. }, data)) = decode_metadata(payload) {
                let r = metadata_piece_range(size as usize, piece)?;
                info[r].copy_from_slice(data);
                got += 1;
            }
        }
        (got == pieces).then_some(())
    })
    .ok_or("metadata pieces did not all arrive")?;
    Ok(info)
}

/// How a `FakeSeed` answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SeedBehaviour {
    /// Serves the real bytes after waiting `delay` before its extension handshake.
    Honest { delay: Duration },
    /// Serves bytes of the right sizes that fail the hash.
    Liar,
    /// Announces 4 GiB.
    HugeSize,
    /// Announces the real size, then another in a second handshake once asked.
    SizeChangesAfterRequests,
    /// Sends piece 0 right after its extension handshake, before being asked.
    DataBeforeRequest,
    /// Answers with a block one byte short.
    ShortPiece,
    /// Rejects every request.
    Rejects,
    /// Handshakes, then an extension handshake without metadata_size, then nothing.
    NoSize,
    /// Reads the handshake and never says a word.
    Silent,
    /// Every connection answers the first request it reads, then reads on and never answers
    /// again.
    Stalls,
    /// Its first connection answers the first request it reads, then reads on and never
    /// answers again (a peer whose side died without a RESET); later connections are
    /// honest.
    StallsFirstConnection,
}

impl SeedBehaviour {
    /// Honest at once.
    pub const HONEST: SeedBehaviour = SeedBehaviour::Honest {
        delay: Duration::ZERO,
    };
}

/// The seed's ut_metadata id (the fetcher addresses requests with it).
pub const SEED_UT_METADATA: u8 = 3;

/// A minimal BEP 9 seed on 127.0.0.1 for one or many info dicts (by the key a client
/// handshakes with; an unknown key is closed); counts accepted connections and notes when
/// each one ended (the other side closed, or 60 s without a byte).
pub struct FakeSeed {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    closed: Mutex<mpsc::Receiver<Instant>>,
}

impl FakeSeed {
    pub fn start(info: Vec<u8>, key: [u8; 20], behaviour: SeedBehaviour) -> FakeSeed {
        FakeSeed::serving(Arc::new(HashMap::from([(key, info)])), behaviour)
    }

    /// A seed of every dict in `dicts`.
    pub fn serving(dicts: Arc<HashMap<[u8; 20], Vec<u8>>>, behaviour: SeedBehaviour) -> FakeSeed {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let (tx, closed) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let nth = count.fetch_add(1, Ordering::SeqCst);
                let behaviour = match behaviour {
                    SeedBehaviour::StallsFirstConnection if nth > 0 => SeedBehaviour::HONEST,
                    b => b,
                };
                let (dicts, tx) = (dicts.clone(), tx.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &dicts, behaviour);
                    let _ = tx.send(Instant::now());
                });
            }
        });
        FakeSeed {
            addr,
            connections,
            closed: Mutex::new(closed),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// When a connection ended, if one has since the last call.
    pub fn try_closed(&self) -> Option<Instant> {
        self.closed.lock().unwrap().try_recv().ok()
    }

    /// When a connection ended, waiting at most `within` for one to.
    pub fn closed_within(&self, within: Duration) -> Option<Instant> {
        self.closed.lock().unwrap().recv_timeout(within).ok()
    }
}

/// Serves one connection until the other side closes (or 60 s pass without a byte).
fn serve_one(
    mut s: TcpStream,
    dicts: &HashMap<[u8; 20], Vec<u8>>,
    b: SeedBehaviour,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < HANDSHAKE_LEN {
        match s.read(&mut chunk)? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let key = match decode_handshake_head(&buf) {
        Ok(Decoded::Done(h, _)) => h.info_hash,
        _ => return Ok(()),
    };
    let Some(info) = dicts.get(&key) else {
        return Ok(());
    };
    buf.drain(..HANDSHAKE_LEN);
    if b == SeedBehaviour::Silent {
        while s.read(&mut chunk)? > 0 {}
        return Ok(());
    }
    let lie: Vec<u8> = info.iter().map(|x| x ^ 0x5a).collect();
    let served = if b == SeedBehaviour::Liar {
        &lie[..]
    } else {
        info
    };
    let size = match b {
        SeedBehaviour::HugeSize => Some(4u64 << 30),
        SeedBehaviour::NoSize => None,
        _ => Some(info.len() as u64),
    };
    let mut out = Vec::new();
    encode_handshake(
        &mut out,
        Reserved::ours(true, false, false),
        &key,
        b"-FS0001-fakeseed0000",
    );
    s.write_all(&out)?;
    if let SeedBehaviour::Honest { delay } = b {
        std::thread::sleep(delay);
    }
    out.clear();
    seed_ext_handshake(&mut out, size);
    // Until their extension handshake says otherwise: magnetar's id.
    let mut their_id = OUR_UT_METADATA_ID;
    if b == SeedBehaviour::DataBeforeRequest {
        data(&mut out, their_id, served, 0);
    }
    s.write_all(&out)?;
    let mut size_changed = false;
    let mut answered = 0usize;
    loop {
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            let (frame, used) = match decode_frame(&buf[pos..]) {
                Ok(Decoded::Done(frame, used)) => (frame, used),
                Ok(Decoded::NeedMore(_)) => break,
                Err(_) => return Ok(()),
            };
            pos += used;
            let Frame::Extended { id, payload } = frame else {
                continue;
            };
            if id == 0 {
                if let Some(id) = ExtHandshake::decode(payload)
                    .ok()
                    .and_then(|h| h.ut_metadata)
                {
                    their_id = id;
                }
                continue;
            }
            if id != SEED_UT_METADATA {
                continue;
            }
            let Ok((MetadataMsg::Request { piece }, _)) = decode_metadata(payload) else {
                continue;
            };
            answered += 1;
            match b {
                SeedBehaviour::Stalls | SeedBehaviour::StallsFirstConnection if answered > 1 => {}
                SeedBehaviour::SizeChangesAfterRequests if !size_changed => {
                    size_changed = true;
                    seed_ext_handshake(&mut out, Some(info.len() as u64 + 16 * 1024));
                }
                SeedBehaviour::SizeChangesAfterRequests => {}
                SeedBehaviour::Rejects => {
                    encode_metadata_reject(&mut out, their_id, piece);
                }
                SeedBehaviour::ShortPiece => {
                    let Some(range) = metadata_piece_range(info.len(), piece) else {
                        continue;
                    };
                    let short = &info[range.start..range.end - 1];
                    encode_metadata_data_header(
                        &mut out,
                        their_id,
                        piece,
                        info.len() as u64,
                        short.len(),
                    );
                    out.extend_from_slice(short);
                }
                _ => data(&mut out, their_id, served, piece),
            }
        }
        buf.drain(..pos);
        s.write_all(&out)?;
        match s.read(&mut chunk)? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn seed_ext_handshake(out: &mut Vec<u8>, size: Option<u64>) {
    ExtHandshake {
        ut_metadata: Some(SEED_UT_METADATA),
        metadata_size: size,
        client: Some(b"fake seed"),
        reqq: Some(500),
        ..ExtHandshake::default()
    }
    .encode(out);
}

/// A data message for `piece` of `info`, to ut_metadata id `id` (nothing for a piece out
/// of range).
fn data(out: &mut Vec<u8>, id: u8, info: &[u8], piece: u32) {
    let Some(range) = metadata_piece_range(info.len(), piece) else {
        return;
    };
    encode_metadata_data_header(out, id, piece, info.len() as u64, range.len());
    out.extend_from_slice(&info[range]);
}
