//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`) and of their stable-Rust replay
//! (`tests/fuzz_regressions.rs`, which runs every corpus file and crash reproducer through
//! these same functions in CI, without nightly). One function per target; each checks
//! invariants beyond "does not panic", and a broken invariant panics, which libFuzzer reports
//! as a crash. Not an API: hidden from the docs, called by nothing else.
//!
//! - `wire_decoder`    handshake, frames, extension handshake, ut_metadata, ut_pex
//! - `info_dict`       bencode scanner and info dict / .torrent validation
//! - `magnet`          magnet link parsing and formatting
//! - `store_recovery`  a fuzzed segment file recovered by `Store::open` / `open_read_only`
//! - `utp_connection`  hostile datagrams against an accepted uTP connection (virtual clock)
//! - `mse_responder`   a hostile MSE handshake against the responder
//! - `mse_session`     what follows a valid MSE handshake, through the whole serving pump
//! - `http_request`    a public HTTP request head: parse, route, and the answer heads

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::limits::{EXT_HANDSHAKE_BYTES_MAX, FRAME_BYTES_MAX};
use crate::magnet::{Magnet, PeerAddr};
use crate::metainfo::{build_torrent, info_span, validate_info, verify_info, InfoHashes};
use crate::store::{AppendOptions, AppendOutcome, Store, StoreOptions, SyncPolicy};
use crate::wire::bencode::{self, Value};
use crate::wire::{
    decode_frame, decode_handshake_head, decode_metadata, decode_peer_id, encode_frame,
    encode_handshake, encode_metadata_data_header, encode_metadata_reject, encode_metadata_request,
    Decoded, ExtHandshake, Frame, MetadataMsg, Pex, WireError, HANDSHAKE_HEAD_LEN, HANDSHAKE_LEN,
};

// ---------------------------------------------------------------------------------------------
// wire_decoder

/// The bytes a peer sends, read three ways: as a connection's first bytes (handshake, then
/// frames), as the frame stream after a handshake, and as a bare extension payload (so the
/// fuzzer reaches the bencode-reading decoders without having to learn framing first).
///
/// Invariants: a `Done` consumes at least one byte and no more than it was given; every
/// strict prefix of a frame that decodes is `NeedMore(m)` with `m > 0`, never overshooting
/// the frame (a prefix of a valid message is never an error); every frame re-encodes to the
/// exact bytes it came from; a decoded extension handshake or ut_metadata message re-encodes
/// to one that decodes to the same values; `decode_frame` never returns the one error that
/// keeps a connection open.
pub fn wire_decoder(data: &[u8]) {
    connection_start(data);
    frame_stream(data);
    extension_payload(0, data);
    extension_payload(1, data);
    pex_payload(data);
}

fn connection_start(data: &[u8]) {
    match decode_handshake_head(data) {
        Ok(Decoded::Done(head, n)) => {
            assert_eq!(n, HANDSHAKE_HEAD_LEN);
            match decode_peer_id(&data[n..]) {
                Decoded::Done(peer_id, m) => {
                    assert_eq!(n + m, HANDSHAKE_LEN);
                    let mut out = Vec::new();
                    let written =
                        encode_handshake(&mut out, head.reserved, &head.info_hash, &peer_id);
                    assert_eq!(written, out.len());
                    assert_eq!(
                        out,
                        data[..HANDSHAKE_LEN],
                        "handshake re-encodes differently"
                    );
                    frame_stream(&data[HANDSHAKE_LEN..]);
                }
                Decoded::NeedMore(m) => assert_eq!(data.len() + m, HANDSHAKE_LEN),
            }
        }
        Ok(Decoded::NeedMore(m)) => {
            assert!(m > 0);
            assert_eq!(data.len() + m, HANDSHAKE_HEAD_LEN);
        }
        Err(WireError::BadProtocol { at }) => assert!(at < data.len().min(20)),
        Err(e) => panic!("handshake head: unexpected error {e:?}"),
    }
}

fn frame_stream(mut rest: &[u8]) {
    loop {
        match decode_frame(rest) {
            Ok(Decoded::Done(frame, n)) => {
                assert!(n >= 4 && n <= rest.len(), "consumed {n} of {}", rest.len());
                assert!(n <= 4 + FRAME_BYTES_MAX);
                check_prefixes(&rest[..n]);
                check_frame(&frame, &rest[..n]);
                rest = &rest[n..];
            }
            Ok(Decoded::NeedMore(m)) => {
                assert!(m > 0, "NeedMore(0)");
                break;
            }
            Err(e) => {
                assert!(
                    e.closes_connection(),
                    "frame error keeps the connection: {e:?}"
                );
                break;
            }
        }
    }
}

/// Every strict prefix of a whole frame asks for more bytes, and never for more than the rest
/// of the frame. Each decode of a prefix is O(1) (lengths are checked, bodies are not scanned).
fn check_prefixes(frame: &[u8]) {
    for k in 0..frame.len() {
        match decode_frame(&frame[..k]) {
            Ok(Decoded::NeedMore(m)) => {
                assert!(m > 0 && k + m <= frame.len(), "prefix {k}: NeedMore({m})")
            }
            other => panic!(
                "prefix of {k} bytes of a {}-byte frame: {other:?}",
                frame.len()
            ),
        }
    }
}

fn check_frame(frame: &Frame<'_>, bytes: &[u8]) {
    let mut out = Vec::new();
    let written = encode_frame(&mut out, frame);
    assert_eq!(written, out.len());
    match frame {
        // The decoder does not keep unknown payloads; the encoder writes zeros.
        Frame::Unknown { len, .. } => {
            assert_eq!(out.len(), bytes.len());
            assert_eq!(out[..5], bytes[..5]);
            assert_eq!(*len, bytes.len() - 5);
        }
        _ => assert_eq!(out, bytes, "{frame:?} re-encodes differently"),
    }
    if let Frame::Extended { id, payload } = *frame {
        extension_payload(id, payload);
        pex_payload(payload);
    }
}

/// The payload of an extended message: the extension handshake for id 0, else read as
/// ut_metadata (any other id may be ours for it).
fn extension_payload(id: u8, payload: &[u8]) {
    if id == 0 {
        match ExtHandshake::decode(payload) {
            Ok(hs) => {
                let mut out = Vec::new();
                let written = hs.encode(&mut out);
                assert_eq!(written, out.len());
                let again = match decode_frame(&out) {
                    Ok(Decoded::Done(Frame::Extended { id: 0, payload }, n)) if n == out.len() => {
                        payload
                    }
                    other => panic!("re-encoded extension handshake decodes as {other:?}"),
                };
                // Re-encoding always writes `m`, so it may grow a payload that sat at the cap.
                if again.len() <= EXT_HANDSHAKE_BYTES_MAX {
                    assert_eq!(ExtHandshake::decode(again), Ok(hs));
                }
            }
            Err(e) => assert!(e.closes_connection(), "{e:?}"),
        }
        return;
    }
    match decode_metadata(payload) {
        Ok((msg, block)) => {
            let mut out = Vec::new();
            let written = match msg {
                MetadataMsg::Request { piece } => {
                    assert!(block.is_empty());
                    encode_metadata_request(&mut out, id, piece)
                }
                MetadataMsg::Reject { piece } => {
                    assert!(block.is_empty());
                    encode_metadata_reject(&mut out, id, piece)
                }
                MetadataMsg::Data { piece, total_size } => {
                    let n =
                        encode_metadata_data_header(&mut out, id, piece, total_size, block.len());
                    out.extend_from_slice(block);
                    n + block.len()
                }
            };
            assert_eq!(written, out.len());
            if out.len() > 4 + FRAME_BYTES_MAX {
                return; // a block too long to frame; the fetcher checks sizes first
            }
            match decode_frame(&out) {
                Ok(Decoded::Done(Frame::Extended { id: got, payload }, n)) => {
                    assert_eq!((got, n), (id, out.len()));
                    assert_eq!(decode_metadata(payload), Ok((msg, block)));
                }
                other => panic!("re-encoded {msg:?} decodes as {other:?}"),
            }
        }
        Err(WireError::UnknownMetadataType(t)) => assert!(!(0..=2).contains(&t)),
        Err(e) => assert!(e.closes_connection(), "{e:?}"),
    }
}

fn pex_payload(payload: &[u8]) {
    if let Ok(pex) = Pex::decode(payload) {
        let added = pex
            .added()
            .inspect(|(a, _)| assert_ne!(a.port(), 0))
            .count();
        assert!(added <= pex.added.len() / 6 + pex.added6.len() / 18);
        let dropped = pex.dropped().inspect(|a| assert_ne!(a.port(), 0)).count();
        assert!(dropped <= pex.dropped.len() / 6 + pex.dropped6.len() / 18);
    }
}

// ---------------------------------------------------------------------------------------------
// info_dict

/// The bytes as a bencoded value, as an info dict and as a .torrent.
///
/// Invariants: a value the scanner accepts re-serialises, item by item in wire order, to
/// exactly its input bytes (canonical integers and lengths; dict and list views agree with
/// the scanner on where every item ends); an info dict that validates has the SHA-1 of its
/// bytes as v1 hash iff it has v1 fields, the SHA-256 iff it is v2, at least one of them, and
/// `verify_info` accepts it; wrapped in a .torrent by `build_torrent`, `info_span` finds
/// exactly those bytes again; `info_span` of any input is one whole dict inside the input.
pub fn info_dict(data: &[u8]) {
    if let Ok((value, len)) = bencode::parse_prefix(data) {
        assert!(len > 0 && len <= data.len());
        assert_eq!(bencode::value_len(data), Ok(len));
        let mut out = Vec::with_capacity(len);
        reserialize(value, &mut out);
        assert_eq!(out, data[..len], "bencode view re-serialises differently");
    }

    if let Ok(summary) = validate_info(data) {
        let hashes = summary.hashes;
        assert!(hashes.v1.is_some() || hashes.v2.is_some());
        if let Some(v1) = hashes.v1 {
            assert_eq!(v1, <[u8; 20]>::from(Sha1::digest(data)));
        }
        if let Some(v2) = hashes.v2 {
            assert_eq!(v2, <[u8; 32]>::from(Sha256::digest(data)));
        }
        assert!(verify_info(data, &hashes));
        assert!(summary.piece_length > 0);
        assert!(summary.total_size == 0 || summary.files > 0);
        let torrent = build_torrent(data, &["udp://tracker.example:6969".to_string()]);
        let span = info_span(&torrent).expect("build_torrent output has an info span");
        assert_eq!(&torrent[span], data);
    }

    if let Ok(span) = info_span(data) {
        assert!(span.start < span.end && span.end <= data.len());
        let info = &data[span];
        assert_eq!(info[0], b'd');
        assert_eq!(bencode::value_len(info), Ok(info.len()));
        // Validation of the span must not depend on what surrounds it.
        let _ = validate_info(info);
    }
}

/// Writes a validated value back out, walking it through the `Value` views.
fn reserialize(value: Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Int(i) => {
            out.push(b'i');
            out.extend_from_slice(i.digits());
            out.push(b'e');
        }
        Value::Bytes(b) => bencode::push_bytes(out, b),
        Value::List(l) => {
            out.push(b'l');
            for item in l {
                reserialize(item, out);
            }
            out.push(b'e');
        }
        Value::Dict(d) => {
            out.push(b'd');
            for (k, v) in d {
                bencode::push_bytes(out, k);
                reserialize(v, out);
            }
            out.push(b'e');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// magnet

/// The bytes (lossily UTF-8) as a magnet link.
///
/// Invariants: a link that parses formats (`to_uri`) to one that parses without warnings to
/// the same info-hashes, name, trackers and peers, and formats to the same string again; every
/// `x.pe` peer's text form parses back to itself.
pub fn magnet(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(m) = Magnet::parse(&text) else {
        return;
    };
    assert!(m.btih.is_some() || m.btmh.is_some());
    let uri = m.to_uri();
    let again = Magnet::parse(&uri).unwrap_or_else(|e| panic!("{uri:?} does not parse: {e}"));
    assert_eq!(again.btih, m.btih, "{uri}");
    assert_eq!(again.btmh, m.btmh, "{uri}");
    assert_eq!(again.display_name, m.display_name, "{uri}");
    assert_eq!(again.trackers, m.trackers, "{uri}");
    assert_eq!(again.peers, m.peers, "{uri}");
    assert!(again.warnings.is_empty(), "{uri}: {:?}", again.warnings);
    assert_eq!(again.to_uri(), uri);
    for peer in &m.peers {
        assert_eq!(peer.to_string().parse::<PeerAddr>().as_ref(), Ok(peer));
    }
}

// ---------------------------------------------------------------------------------------------
// store_recovery

/// Control byte (first input byte), then two bytes of split offset (little-endian), then the
/// segment bytes.
pub const STORE_INPUT_HEAD: usize = 3;
/// Control bit: recompute the CRC of every header-like 80 bytes (8-aligned, starting with the
/// magic), so mutations of header fields are not all stopped by the CRC.
pub const STORE_FIX_CRC: u8 = 1;
/// Control bit: before the CRCs, recompute the SHA-1 / SHA-256 in every such header over the
/// payload its `info_len` names, so payload mutations are not all stopped by the hashes.
pub const STORE_FIX_HASHES: u8 = 2;
/// Control bit: split the bytes at the offset into two segments (two shards), so records,
/// duplicates and tombstones meet across segments.
pub const STORE_SPLIT: u8 = 4;

/// Offsets inside the 80-byte record header (`store/record.rs`).
const MAGIC: &[u8; 4] = b"MGR1";
const HEADER_BYTES: usize = 80;

/// A store directory holding the fuzzed segment(s), recovered read-only, read-write, again
/// read-write, and after one append.
///
/// Invariants: recovery never panics and never refuses a segment except for another format
/// version; every record it publishes verifies against its hashes and is found under each of
/// them; read-only and read-write recovery publish the same records; recovery is idempotent
/// (a second read-write open finds the same records and no tail left to cut); a dict appended
/// after recovery is found after the next open (the cut tail does not hide it).
pub fn store_recovery(data: &[u8]) {
    let (ctrl, split, segment) = match data {
        [c, lo, hi, rest @ ..] => (*c, usize::from(u16::from_le_bytes([*lo, *hi])), rest),
        _ => (0, 0, &[][..]),
    };
    let mut segment = segment.to_vec();
    if ctrl & STORE_FIX_HASHES != 0 {
        fix_hashes(&mut segment);
    }
    if ctrl & (STORE_FIX_CRC | STORE_FIX_HASHES) != 0 {
        fix_crcs(&mut segment);
    }
    let dir = ScratchDir::new();
    let segments = dir.path().join("segments");
    std::fs::create_dir_all(&segments).expect("create segments dir");
    if ctrl & STORE_SPLIT != 0 && !segment.is_empty() {
        let at = split % (segment.len() + 1);
        std::fs::write(segments.join("seg-000-00000000.mseg"), &segment[..at]).unwrap();
        std::fs::write(segments.join("seg-001-00000000.mseg"), &segment[at..]).unwrap();
    } else {
        std::fs::write(segments.join("seg-000-00000000.mseg"), &segment).unwrap();
    }
    let opts = StoreOptions {
        shards: 2,
        segment_bytes: 64 * 1024,
        sync: SyncPolicy::Batch,
        ..StoreOptions::default()
    };

    let read_only = match Store::open_read_only(dir.path()) {
        Ok((store, report)) => {
            let records = checked_records(&store);
            assert_eq!(records.len(), report.records);
            Some((records, report))
        }
        // Only an intact header of another format version stops recovery.
        Err(crate::store::StoreError::UnsupportedFormat { .. }) => None,
        Err(e) => panic!("read-only recovery failed: {e}"),
    };
    let (first, report) = match Store::open(dir.path(), opts.clone()) {
        Ok((store, report)) => (checked_records(&store), report),
        Err(crate::store::StoreError::UnsupportedFormat { .. }) => {
            assert!(read_only.is_none(), "only read-write refused the version");
            return;
        }
        Err(e) => panic!("recovery failed: {e}"),
    };
    let (ro_records, ro_report) = read_only.expect("read-write accepted what read-only refused");
    assert_eq!(
        first, ro_records,
        "read-only and read-write recovery disagree"
    );
    assert_eq!(report.records, ro_report.records);
    assert_eq!(report.torn_tails_truncated, ro_report.torn_tails_skipped);
    assert_eq!(report.bytes_truncated, ro_report.tail_bytes_skipped);
    assert_eq!(
        report.corrupt_records_skipped,
        ro_report.corrupt_records_skipped
    );

    let (store, again) = Store::open(dir.path(), opts.clone()).expect("second recovery");
    assert_eq!(checked_records(&store), first, "recovery is not idempotent");
    assert_eq!(again.torn_tails_truncated, 0, "a tail survived truncation");
    assert_eq!(
        again.corrupt_records_skipped,
        report.corrupt_records_skipped
    );

    // A fresh dict appended behind whatever recovery kept must be there after the next open.
    let fresh = fresh_info(&segment);
    let appended = match store.append(&fresh, AppendOptions::default()) {
        Ok(AppendOutcome::Stored(r)) => Some(r.hashes()),
        Ok(AppendOutcome::AlreadyPresent(_)) => None,
        Err(e) => panic!("append after recovery failed: {e}"),
    };
    drop(store);
    let (store, _) = Store::open(dir.path(), opts).expect("recovery after append");
    let after = checked_records(&store);
    if let Some(hashes) = appended {
        let key = hashes.primary_key().expect("validated");
        let found = store.lookup(&key).expect("appended record lost at reopen");
        assert_eq!(found.info(), &fresh[..]);
        assert_eq!(after.len(), first.len() + 1);
    } else {
        assert_eq!(after, first);
    }
}

/// A published record as recovery is compared on: (v1, v2, info bytes).
type RecordView = (Option<[u8; 20]>, Option<[u8; 32]>, Vec<u8>);

/// Every published record, sorted; checks each verifies and is reachable under each of its
/// keys.
fn checked_records(store: &Store) -> Vec<RecordView> {
    let mut records = Vec::new();
    store.for_each_record(|r| {
        let hashes: InfoHashes = r.hashes();
        assert!(
            verify_info(r.info(), &hashes),
            "published record fails its hash"
        );
        assert_eq!(r.len(), r.info().len());
        records.push((hashes.v1, hashes.v2, r.info().to_vec()));
    });
    for (v1, v2, info) in &records {
        let hashes = InfoHashes { v1: *v1, v2: *v2 };
        for key in hashes.handshake_keys() {
            let found = store.lookup(&key).expect("record not found under its key");
            assert_eq!(found.info(), &info[..]);
        }
        if let Some(v2) = v2 {
            assert!(store.lookup_v2(v2).is_some());
        }
    }
    records.sort();
    assert_eq!(records.len() as u64, store.stats().records);
    records
}

/// A small valid v1 info dict whose hash depends on the input, so it is new to the store.
fn fresh_info(seed: &[u8]) -> Vec<u8> {
    let name = hex::encode(&Sha1::digest(seed)[..8]);
    let mut info =
        format!("d6:lengthi1e4:name16:{name}12:piece lengthi16384e6:pieces20:").into_bytes();
    info.extend_from_slice(&[0x5a; 20]);
    info.push(b'e');
    info
}

/// 8-aligned offsets where a header-like 80 bytes starts.
fn header_offsets(segment: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..segment.len().saturating_sub(HEADER_BYTES - 1))
        .step_by(8)
        .filter(|&p| &segment[p..p + 4] == MAGIC)
}

fn fix_hashes(segment: &mut [u8]) {
    let offsets: Vec<usize> = header_offsets(segment).collect();
    for p in offsets {
        let flags = segment[p + 6];
        let info_len = u32::from_le_bytes(segment[p + 8..p + 12].try_into().unwrap()) as usize;
        let Some(payload) = segment.get(p + HEADER_BYTES..p + HEADER_BYTES + info_len) else {
            continue;
        };
        let v1: [u8; 20] = Sha1::digest(payload).into();
        let v2: [u8; 32] = Sha256::digest(payload).into();
        if flags & 1 != 0 {
            segment[p + 12..p + 32].copy_from_slice(&v1);
        }
        if flags & 2 != 0 {
            segment[p + 32..p + 64].copy_from_slice(&v2);
        }
    }
}

fn fix_crcs(segment: &mut [u8]) {
    let offsets: Vec<usize> = header_offsets(segment).collect();
    for p in offsets {
        let header = &mut segment[p..p + HEADER_BYTES];
        header[72..76].fill(0);
        let crc = crc32fast::hash(header);
        header[72..76].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A directory removed on drop: in /dev/shm when there is one (recovery opens, maps, syncs
/// and truncates files thousands of times a second under the fuzzer), else the temp dir.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("magnetar-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// utp_connection

/// Datagrams from a hostile peer, fed to an accepted uTP connection with a virtual clock.
/// The input is a sequence of records: one control byte (low 5 bits: milliseconds to
/// advance; bit 5: fire timers; bit 6: the application reads everything; bit 7: unused, it
/// once held pure acks back) and a length byte, then that many bytes of datagram.
///
/// Invariants: never a panic; before the peer has acked our SYN-ACK the connection has sent
/// no more bytes than it received (no amplifier); only a datagram that acks our SYN-ACK's
/// sequence number (the initial sequence number, or one less as libtorrent and libutp
/// send) establishes the connection, so a blind spoofer must guess it (the endpoint draws
/// it from a keyed hash, SECURITY.md); every datagram fits the largest header plus one
/// payload; what is readable never exceeds the reassembly cap; the connection never asks
/// for a timer in the past once its timers have fired. (The server's GSO sends group these same datagrams without changing
/// one byte: `server::udp` tests.)
pub fn utp_connection(data: &[u8]) {
    use crate::utp::{self, Connection, Header, PacketType};
    use std::time::{Duration, Instant};

    let cfg = utp::Config::default();
    let mut syn = [0u8; utp::HEADER_LEN];
    Header {
        ty: PacketType::Syn,
        connection_id: 100,
        timestamp_us: 1,
        timestamp_diff_us: 0,
        wnd_size: 1 << 20,
        seq_nr: 500,
        ack_nr: 0,
    }
    .encode(0, &mut syn);
    let start = Instant::now();
    let mut now = start;
    let Ok(syn) = utp::decode(&syn) else {
        panic!("our own SYN does not decode")
    };
    const ISN: u16 = 7000;
    let mut conn: Connection<Vec<u8>> = Connection::accept(cfg.clone(), &syn, ISN, now);
    let (mut bytes_in, mut bytes_out) = (utp::HEADER_LEN, 0usize);
    let mut wrote = false;
    let mut rest = data;
    while rest.len() >= 2 {
        let (ctl, len) = (rest[0], rest[1] as usize);
        let dgram = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        now += Duration::from_millis(u64::from(ctl & 0x1f));
        if let Ok(pkt) = utp::decode(dgram) {
            bytes_in += dgram.len();
            let was_established = conn.is_established();
            let acks_isn = [ISN, ISN.wrapping_sub(1)].contains(&pkt.header.ack_nr);
            conn.on_packet(&pkt, now);
            assert!(
                was_established || !conn.is_established() || acks_isn,
                "established by a datagram acking {} (our SYN-ACK was {ISN})",
                pkt.header.ack_nr
            );
        }
        if ctl & 0x20 != 0 {
            if let Some(t) = conn.next_timeout() {
                now = now.max(t);
                conn.on_timeout(now);
                if let Some(next) = conn.next_timeout() {
                    assert!(next >= now, "a timer in the past after firing");
                }
            }
        }
        if ctl & 0x40 != 0 {
            let n = conn.readable().len();
            conn.consume(n);
        }
        if conn.is_established() && !wrote {
            // Give the connection something to send once the peer is real.
            conn.write(vec![0x5a; 40_000]);
            wrote = true;
        }
        assert!(
            conn.readable().len() <= cfg.reassembly_bytes_max,
            "readable past the reassembly cap"
        );
        let established = conn.is_established();
        while let Some(t) = conn.poll_transmit(now) {
            assert!(
                t.len() <= utp::HEADER_BYTES_MAX + cfg.payload_bytes_max,
                "a datagram over the MTU budget"
            );
            bytes_out += t.len();
        }
        if !established && !conn.is_established() {
            assert!(
                bytes_out <= bytes_in,
                "sent {bytes_out} bytes to an unverified peer that sent {bytes_in}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mse_responder

/// Bytes of an incoming MSE handshake, fed to a responder in reads whose sizes come from
/// the input's first byte. The responder knows one torrent.
///
/// Invariants: never a panic; `consumed` never exceeds what was given; what the responder
/// writes is bounded (Yb, its padding and the final VC/select message); a finished
/// handshake names the one torrent it knows and hands back an initial payload within the
/// IA cap.
pub fn mse_responder(data: &[u8]) {
    use crate::limits::{MSE_IA_BYTES_MAX, MSE_PAD_BYTES_MAX};
    use crate::mse::{CryptoPolicy, Responder, ResponderStep, DH_KEY_BYTES};

    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let known = [0x11u8; 20];
    let known_req2 = crate::mse::req2_hash(&known);
    let mut lookup = |h: &[u8; 20]| (*h == known_req2).then_some(known);
    let mut responder = Responder::new(&[3u8; 32], 37, CryptoPolicy::PreferPlaintext);
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    while fed < data.len() {
        let take = step.min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + take]);
        fed += take;
        match responder.on_bytes(&buf, &mut out, &mut lookup) {
            Ok(ResponderStep::NeedMore { consumed }) => {
                assert!(consumed <= buf.len());
                buf.drain(..consumed);
            }
            Ok(ResponderStep::Done {
                consumed,
                info_hash,
                initial_payload,
                ..
            }) => {
                assert!(consumed <= buf.len());
                assert_eq!(info_hash, known, "finished for a torrent it does not know");
                assert!(initial_payload.len() <= MSE_IA_BYTES_MAX);
                break;
            }
            Err(_) => break,
        }
        assert!(
            out.len() <= DH_KEY_BYTES + MSE_PAD_BYTES_MAX + 8 + 4 + 2 + MSE_PAD_BYTES_MAX,
            "the responder wrote {} bytes",
            out.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// mse_session

/// A stored torrent and a worker's context for `mse_session`, made once per thread (a store
/// on disk per input would make the fuzzer crawl).
struct SessionKit {
    ctx: crate::server::conn::WorkerCtx,
    key: [u8; 20],
    _mailboxes: Vec<flume::Receiver<crate::upstream::shard::ShardCmd>>,
    _dir: ScratchDir,
}

thread_local! {
    static SESSION_KIT: SessionKit = session_kit();
}

fn session_kit() -> SessionKit {
    use crate::config::ServeConfig;
    use crate::server::stats::CoreStats;
    use crate::upstream::config::UpstreamConfig;
    use crate::upstream::shard::Upstream;
    use std::sync::Arc;

    let dir = ScratchDir::new();
    let (store, _) = Store::open(dir.path(), StoreOptions::default()).expect("open store");
    let store = Arc::new(store);
    let info = fresh_info(b"mse_session");
    store
        .append(&info, AppendOptions::default())
        .expect("store the known torrent");
    let mut cfg = ServeConfig::new(dir.path().to_path_buf());
    // Every input is a new handshake from the same address: the rate limits would refuse
    // most of them and hide the code after the handshake from the fuzzer.
    cfg.mse_handshakes_per_ip_per_second_max = 1_000_000_000;
    cfg.mse_handshakes_per_core_per_second_max = 1_000_000_000;
    let (upstream, mailboxes) = Upstream::new(UpstreamConfig::default(), store.clone(), 1);
    let page_in = Arc::new(
        crate::server::pagein::PageIn::start(store.clone(), 1, 0, 1, std::time::Duration::ZERO)
            .expect("page-in thread"),
    );
    let ctx = crate::server::conn::WorkerCtx::new(
        store,
        Arc::new(cfg),
        Arc::new(CoreStats::default()),
        *b"-MG0001-fuzzsession0",
        upstream,
        page_in,
    );
    SessionKit {
        ctx,
        key: Sha1::digest(&info).into(),
        _mailboxes: mailboxes,
        _dir: dir,
    }
}

/// The key of the torrent `mse_session` stores (for seeds).
pub fn mse_session_key() -> [u8; 20] {
    SESSION_KIT.with(|kit| kit.key)
}

/// A client that completes a real MSE handshake for the one stored torrent (SKEY = its
/// key, so req2 proves it), then sends the input's bytes, through the same pump the
/// servers run. Input: a control byte (bit 0: plaintext or RC4 offered; bits 1-7: read
/// size in 4-byte steps), the length of the initial payload (IA), then the bytes the
/// client sends: the first `IA length` as IA inside the handshake, the rest after it.
///
/// Invariants: an encrypted connection is served only the torrent its handshake proved.
/// The first thing we send after the handshake, if anything, is a BitTorrent handshake
/// for that torrent; no fetch, shard message or store is ever started for another one
/// (the stored torrent is a hit, so none is started at all).
pub fn mse_session(data: &[u8]) {
    use crate::mse::{CryptoPolicy, Initiator, InitiatorStep};
    use monoio::time::Instant;

    let [ctl, ia_len, stream @ ..] = data else {
        return;
    };
    let policy = if ctl & 1 == 0 {
        CryptoPolicy::PreferPlaintext
    } else {
        CryptoPolicy::Rc4Only
    };
    let read = usize::from(ctl >> 1).max(1) * 4;
    let ia_len = usize::from(*ia_len)
        .min(stream.len())
        .min(crate::limits::MSE_IA_BYTES_MAX);
    let (ia, rest) = stream.split_at(ia_len);
    SESSION_KIT.with(|kit| {
        let now = Instant::now();
        let peer: std::net::SocketAddr = "192.0.2.9:6881".parse().expect("address");
        let mut pump = crate::server::pump::Pump::new(&kit.ctx, peer, now);
        let mut out = crate::server::send::OutBatch::new();
        let mut ini = Initiator::new(&[9u8; 32], 8, kit.key, policy);
        let mut to_server = Vec::new();
        ini.opening(&mut to_server);
        let mut to_client = Vec::new();
        let mut alive = pump_serve(
            &mut pump,
            &mut to_server,
            now,
            &mut out,
            &mut to_client,
            &kit.key,
        );
        // The handshake: a few round trips at most.
        let mut done = None;
        for _ in 0..4 {
            if !alive {
                break;
            }
            let mut step3 = Vec::new();
            match ini.on_bytes(&to_client, &mut step3, ia) {
                Ok(InitiatorStep::NeedMore { consumed }) => {
                    to_client.drain(..consumed);
                }
                Ok(InitiatorStep::Done {
                    consumed, cipher, ..
                }) => {
                    to_client.drain(..consumed);
                    done = Some(cipher);
                }
                Err(_) => return,
            }
            if !step3.is_empty() {
                alive = pump_serve(
                    &mut pump,
                    &mut step3,
                    now,
                    &mut out,
                    &mut to_client,
                    &kit.key,
                );
            }
            if done.is_some() {
                break;
            }
        }
        let Some(mut cipher) = done else {
            return;
        };
        // What the server sends after the handshake, in the clear.
        let mut served = std::mem::take(&mut to_client);
        if let Some(c) = &mut cipher {
            c.decrypt_in_place(&mut served);
        }
        for chunk in rest.chunks(read) {
            if !alive {
                break;
            }
            let mut bytes = chunk.to_vec();
            if let Some(c) = &mut cipher {
                c.encrypt_in_place(&mut bytes);
            }
            alive = pump_serve(
                &mut pump,
                &mut bytes,
                now,
                &mut out,
                &mut to_client,
                &kit.key,
            );
            if let Some(c) = &mut cipher {
                c.decrypt_in_place(&mut to_client);
            }
            served.append(&mut to_client);
        }
        if served.len() >= HANDSHAKE_LEN {
            assert_eq!(
                &served[28..48],
                &kit.key[..],
                "answered an encrypted peer with a handshake for a torrent it did not prove"
            );
        }
    });
}

/// Feed `fresh` to the pump and run its steps until it waits; what it sends is appended to
/// `sent`. Panics on any step for a torrent other than `key`. False once it closed.
fn pump_serve(
    pump: &mut crate::server::pump::Pump<'_>,
    fresh: &mut [u8],
    now: monoio::time::Instant,
    out: &mut crate::server::send::OutBatch,
    sent: &mut Vec<u8>,
    key: &[u8; 20],
) -> bool {
    use crate::server::pump::Step;
    let take = |out: &mut crate::server::send::OutBatch, sent: &mut Vec<u8>| {
        out.seal();
        let start = sent.len();
        while sent.len() - start < out.sealed_len() {
            let at = sent.len() - start;
            sent.extend_from_slice(out.contiguous_at(at));
        }
        out.clear();
    };
    let mut step = pump.on_bytes(fresh, false, now, out);
    loop {
        match step {
            Step::Send => {
                take(out, sent);
                pump.on_sent(now);
            }
            Step::Close { flush, .. } => {
                if flush {
                    take(out, sent);
                }
                return false;
            }
            Step::Fetch(k) => {
                assert_eq!(
                    &k, key,
                    "a fetch started for a torrent the handshake did not prove"
                );
                pump.on_fetch(None);
            }
            Step::Shard { key: k, .. } => {
                assert_eq!(
                    &k, key,
                    "a shard message for a torrent the handshake did not prove"
                );
            }
            Step::Store(_) => panic!("a store started from an encrypted peer of a stored torrent"),
            Step::PageIn(k) => {
                assert_eq!(
                    &k, key,
                    "a page-in for a torrent the handshake did not prove"
                );
                let record = pump.ctx().store.page_in(&k);
                pump.on_paged_in(record);
            }
            Step::Wait => return true,
        }
        step = pump.poll(now, out);
    }
}

// ---------------------------------------------------------------------------------------------
// http_request

/// Bytes a client sends to the public HTTP listener (`server::http`).
///
/// Invariants: a parsed head consumed at least one byte, no more than given and no more
/// than `HTTP_REQUEST_HEAD_BYTES_MAX`, and parses again the same from exactly those bytes;
/// the answer heads built from what the client controls (the title in
/// `Content-Disposition`, the echoed preflight headers, the ETag) are well-formed: every
/// line ends in CRLF, no CR or LF inside a line, and the one empty line is the last
/// (no header or response injection).
pub fn http_request(data: &[u8]) {
    use crate::server::http::codec::{self, Target};
    let Ok(Some((req, used))) = codec::parse_head(data) else {
        return;
    };
    assert!(used > 0 && used <= data.len());
    assert!(used <= crate::limits::HTTP_REQUEST_HEAD_BYTES_MAX);
    assert_eq!(
        codec::parse_head(&data[..used]),
        Ok(Some((req.clone(), used)))
    );
    let mut out = Vec::new();
    let title = match &req.target {
        Target::Torrent { title, .. } => title.clone(),
        _ => None,
    };
    codec::torrent_head(
        &mut out,
        req.keep_alive,
        req.if_none_match.as_deref().unwrap_or("\"x\""),
        title.as_deref().unwrap_or("x.torrent"),
        1,
    );
    assert_well_formed_head(&out);
    out.clear();
    codec::preflight(&mut out, req.keep_alive, req.preflight_headers.as_deref());
    assert_well_formed_head(&out);
}

fn assert_well_formed_head(head: &[u8]) {
    let text = std::str::from_utf8(head).expect("answer heads are UTF-8");
    let body_at = text
        .find("\r\n\r\n")
        .expect("a head ends with an empty line")
        + 4;
    assert_eq!(
        body_at,
        text.len(),
        "nothing after the empty line: {text:?}"
    );
    for line in text[..body_at - 4].split("\r\n") {
        assert!(!line.is_empty() && !line.contains(['\r', '\n']), "{text:?}");
    }
}
