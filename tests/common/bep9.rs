//! Blocking BEP 9 test peers on std sockets, built on the crate's sans-IO codec:
//! `fetch_metadata` (a client that asks a server for an info dict) and `FakeSeed` (a
//! server that has one, honest or lying, counting its connections).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magnetar::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake,
    encode_metadata_data_header, encode_metadata_request, metadata_piece_count,
    metadata_piece_range, Decoded, ExtHandshake, Frame, MetadataMsg, Reserved, HANDSHAKE_LEN,
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
#[derive(Clone, Copy, Debug)]
pub enum SeedBehaviour {
    /// Serves the real bytes after waiting `delay` before its extension handshake.
    Honest { delay: Duration },
    /// Serves bytes of the right sizes that fail the hash.
    Liar,
}

/// A minimal BEP 9 seed on 127.0.0.1 for one info dict; counts accepted connections.
pub struct FakeSeed {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

impl FakeSeed {
    pub fn start(info: Vec<u8>, key: [u8; 20], behaviour: SeedBehaviour) -> FakeSeed {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let info = Arc::new(info);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                count.fetch_add(1, Ordering::SeqCst);
                let info = info.clone();
                std::thread::spawn(move || serve_one(stream, &info, key, behaviour));
            }
        });
        FakeSeed { addr, connections }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn serve_one(mut s: TcpStream, info: &[u8], key: [u8; 20], behaviour: SeedBehaviour) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = Vec::new();
    while buf.len() < HANDSHAKE_LEN {
        let mut tmp = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    match decode_handshake_head(&buf) {
        Ok(Decoded::Done(h, _)) if h.info_hash == key => {}
        _ => return,
    }
    buf.drain(..HANDSHAKE_LEN);
    let mut out = Vec::new();
    encode_handshake(
        &mut out,
        Reserved::ours(false, false, false),
        &key,
        b"-FS0001-fakeseed0000",
    );
    if s.write_all(&out).is_err() {
        return;
    }
    if let SeedBehaviour::Honest { delay } = behaviour {
        std::thread::sleep(delay);
    }
    out.clear();
    ExtHandshake {
        ut_metadata: Some(3),
        ut_pex: None,
        metadata_size: Some(info.len() as u64),
        client: Some(b"fake seed"),
        reqq: None,
        yourip: None,
        listen_port: None,
    }
    .encode(&mut out);
    if s.write_all(&out).is_err() {
        return;
    }
    let mut their_id = None;
    let Ok(mut w) = s.try_clone() else { return };
    let _: Option<()> = read_frames(&mut s, &mut buf, deadline, |f| {
        match f {
            Frame::Extended { id: 0, payload } => {
                their_id = ExtHandshake::decode(payload)
                    .ok()
                    .and_then(|h| h.ut_metadata);
            }
            Frame::Extended { id: 3, payload } => {
                if let (Ok((MetadataMsg::Request { piece }, _)), Some(id)) =
                    (decode_metadata(payload), their_id)
                {
                    if let Some(r) = metadata_piece_range(info.len(), piece) {
                        let mut msg = Vec::new();
                        encode_metadata_data_header(
                            &mut msg,
                            id,
                            piece,
                            info.len() as u64,
                            r.len(),
                        );
                        match behaviour {
                            SeedBehaviour::Honest { .. } => msg.extend_from_slice(&info[r]),
                            SeedBehaviour::Liar => msg.extend(info[r].iter().map(|b| b ^ 0x5a)),
                        }
                        let _ = w.write_all(&msg);
                    }
                }
            }
            _ => {}
        }
        None
    });
}
