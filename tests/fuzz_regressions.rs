//! The fuzz corpus and crash reproducers, replayed on stable Rust: every file under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same
//! `magnetar::fuzz_entry` function that the cargo-fuzz target `<target>` calls (see
//! SECURITY.md "Fuzzing"; `scripts/fuzz.sh` runs the fuzzers themselves).
//!
//! `write_seed_corpus` (ignored) writes the hand-made seeds the corpus started from:
//! `cargo test --test fuzz_regressions -- --ignored write_seed_corpus`.

use std::path::{Path, PathBuf};

use magnetar::fuzz_entry;

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 8] = [
    ("wire_decoder", fuzz_entry::wire_decoder),
    ("info_dict", fuzz_entry::info_dict),
    ("magnet", fuzz_entry::magnet),
    ("store_recovery", fuzz_entry::store_recovery),
    ("utp_connection", fuzz_entry::utp_connection),
    ("mse_responder", fuzz_entry::mse_responder),
    ("mse_session", fuzz_entry::mse_session),
    ("http_request", fuzz_entry::http_request),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("read corpus dir").path())
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`; fails naming each input that panicked.
fn replay(target: &str, entry: Entry) {
    let mut inputs = files_in(&fuzz_dir().join("corpus").join(target));
    let corpus = inputs.len();
    inputs.extend(files_in(&fuzz_dir().join("regressions").join(target)));
    assert!(corpus > 0, "fuzz/corpus/{target} is empty");
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("read input");
            std::panic::catch_unwind(|| entry(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: inputs that fail: {failed:#?}");
}

#[test]
fn wire_decoder_corpus_and_regressions() {
    replay(TARGETS[0].0, TARGETS[0].1);
}

#[test]
fn info_dict_corpus_and_regressions() {
    replay(TARGETS[1].0, TARGETS[1].1);
}

#[test]
fn magnet_corpus_and_regressions() {
    replay(TARGETS[2].0, TARGETS[2].1);
}

#[test]
fn store_recovery_corpus_and_regressions() {
    replay(TARGETS[3].0, TARGETS[3].1);
}

#[test]
fn utp_connection_corpus_and_regressions() {
    replay(TARGETS[4].0, TARGETS[4].1);
}

#[test]
fn mse_responder_corpus_and_regressions() {
    replay(TARGETS[5].0, TARGETS[5].1);
}

#[test]
fn mse_session_corpus_and_regressions() {
    replay(TARGETS[6].0, TARGETS[6].1);
}

#[test]
fn http_request_corpus_and_regressions() {
    replay(TARGETS[7].0, TARGETS[7].1);
}

/// Every target has a fuzz target file and a corpus, and nothing in `fuzz/` names a target
/// this test does not replay.
#[test]
fn every_fuzz_target_is_replayed() {
    let mut on_disk: Vec<String> = files_in(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    on_disk.sort();
    let mut replayed: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    replayed.sort();
    assert_eq!(on_disk, replayed);
}

// ---------------------------------------------------------------------------------------------
// Seeds

fn fixture_torrents() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torrents");
    files_in(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "torrent"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap().to_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn info_of(torrent: &[u8]) -> Vec<u8> {
    torrent[magnetar::metainfo::info_span(torrent).unwrap()].to_vec()
}

fn write_seed(target: &str, name: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn wire_seeds() {
    use magnetar::wire::*;
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for p in files_in(&golden) {
        if p.extension().is_some_and(|e| e == "bin") {
            let name = p.file_stem().unwrap().to_str().unwrap();
            write_seed("wire_decoder", name, &std::fs::read(&p).unwrap());
        }
    }
    // A client's whole session: handshake, extension handshake, requests, then every frame
    // kind we know, a data message, a reject, a pex message and an unknown id.
    let mut s = Vec::new();
    encode_handshake(&mut s, Reserved::ours(true, true, true), &[1; 20], &[2; 20]);
    ExtHandshake {
        ut_metadata: Some(3),
        ut_pex: Some(1),
        metadata_size: Some(40_000),
        client: Some(b"seed 1.0"),
        reqq: Some(250),
        yourip: Some("127.0.0.1".parse().unwrap()),
        listen_port: Some(6881),
    }
    .encode(&mut s);
    encode_metadata_request(&mut s, 3, 0);
    encode_metadata_request(&mut s, 3, 2);
    write_seed("wire_decoder", "session", &s);

    let mut f = Vec::new();
    for frame in [
        Frame::KeepAlive,
        Frame::Choke,
        Frame::Unchoke,
        Frame::Interested,
        Frame::NotInterested,
        Frame::Have(7),
        Frame::Bitfield(&[0xff, 0x80]),
        Frame::Request {
            index: 1,
            begin: 16384,
            length: 16384,
        },
        Frame::Piece {
            index: 1,
            begin: 0,
            block: b"abcd",
        },
        Frame::Cancel {
            index: 1,
            begin: 16384,
            length: 16384,
        },
        Frame::Port(6881),
        Frame::Suggest(3),
        Frame::HaveAll,
        Frame::HaveNone,
        Frame::Reject {
            index: 1,
            begin: 0,
            length: 16384,
        },
        Frame::AllowedFast(9),
        Frame::Unknown { id: 21, len: 3 },
    ] {
        encode_frame(&mut f, &frame);
    }
    encode_metadata_data_header(&mut f, 2, 1, 16_400, 16);
    f.extend_from_slice(b"0123456789abcdef");
    encode_metadata_reject(&mut f, 2, 5);
    let pex = b"d5:added12:\x7f\x00\x00\x01\x1a\xe1\x0a\x00\x00\x02\x1a\xe27:added.f2:\x02\x106:added618:\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x1a\xe17:dropped6:\x01\x02\x03\x04\x00\x50e";
    encode_extended_header(&mut f, 1, pex.len());
    f.extend_from_slice(pex);
    write_seed("wire_decoder", "frames", &f);
    write_seed("wire_decoder", "pex", pex);
    write_seed(
        "wire_decoder",
        "metadata-data",
        b"d8:msg_typei1e5:piecei0e10:total_sizei3eeabc",
    );
}

fn info_seeds() {
    for (name, torrent) in fixture_torrents() {
        write_seed("info_dict", &format!("{name}.torrent"), &torrent);
        write_seed("info_dict", &format!("{name}.info"), &info_of(&torrent));
    }
    // Unsorted keys, pad files, a private flag, name.utf-8.
    write_seed(
        "info_dict",
        "v1-pad-private",
        b"d4:name1:x5:filesld6:lengthi5e4:pathl1:aeed4:attr1:p6:lengthi16379e4:pathl4:.pad1:0eed6:lengthi3e4:pathl1:beee12:piece lengthi16384e6:pieces40:0123456789012345678901234567890123456789\
7:privatei1e10:name.utf-81:ye",
    );
}

fn magnet_seeds() {
    let v1 = "c8295ce630f2064f08440db1534e37da6b4eabc7";
    let v2 = "8c7bd5ac8a5a6aa8b7e0e3ad1b2ac0f1be0e3b5f2b4a6e3e1d0c9b8a79685746";
    for (name, m) in [
        ("v1", format!("magnet:?xt=urn:btih:{v1}")),
        (
            "v1-base32",
            "magnet:?xt=urn:btih:ZAUVZZRQ6IDE6CCEBWYVGTRX3JVU5K6H".to_string(),
        ),
        (
            "hybrid-full",
            format!(
                "magnet:?xt=urn:btih:{v1}&xt=urn:btmh:1220{v2}&dn=A%20name+with%2Bplus&\
                 tr=udp%3A%2F%2Ftracker.example%3A6969&tr=https://t.example/announce&\
                 x.pe=127.0.0.1:6881&x.pe=[::1]:6882&x.pe=seed.example.org:51413"
            ),
        ),
        (
            "indexed-and-odd",
            format!(
                "MAGNET:?xt.1=urn:btih:{v1}&xt.2=urn:ed2k:abc&dn=x&dn=y&tr=ftp://no&x.pe=1.2.3:4&\
                 x.pe=[fe80::1%25eth0]:80&kt=a+b&ws=http://w"
            ),
        ),
        (
            "v2-only",
            format!("magnet:?xt=urn:btmh:1220{v2}&dn=%E2%9C%93"),
        ),
    ] {
        write_seed("magnet", name, m.as_bytes());
    }
}

fn store_seeds() {
    use magnetar::fuzz_entry::{STORE_FIX_CRC, STORE_FIX_HASHES, STORE_SPLIT};
    use magnetar::store::{AppendOptions, Store, StoreOptions, SyncPolicy};
    let dir = std::env::temp_dir().join(format!("magnetar-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = StoreOptions {
        shards: 1,
        segment_bytes: 1 << 20,
        sync: SyncPolicy::Batch,
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(&dir, opts).unwrap();
    let infos: Vec<Vec<u8>> = fixture_torrents()
        .iter()
        .map(|(_, t)| info_of(t))
        .filter(|i| i.len() < 2000)
        .collect();
    for info in &infos {
        store.append(info, AppendOptions::default()).unwrap();
    }
    // A tombstone for the first record.
    let key = magnetar::metainfo::validate_info(&infos[0])
        .unwrap()
        .hashes
        .primary_key()
        .unwrap();
    store.delete(&key, None, "seed").unwrap();
    drop(store);
    let seg = std::fs::read(dir.join("segments/seg-000-00000000.mseg")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let half = (seg.len() / 2) as u16;
    let [lo, hi] = half.to_le_bytes();
    for (name, ctrl) in [
        ("segment", 0),
        ("segment-fixcrc", STORE_FIX_CRC),
        ("segment-fixhash", STORE_FIX_HASHES),
        ("segment-split", STORE_SPLIT | STORE_FIX_CRC),
    ] {
        let mut input = vec![ctrl, lo, hi];
        input.extend_from_slice(&seg);
        write_seed("store_recovery", name, &input);
    }
    // A torn tail: the last record cut in half.
    let mut torn = vec![0, 0, 0];
    torn.extend_from_slice(&seg[..seg.len() - 40]);
    write_seed("store_recovery", "segment-torn", &torn);
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    wire_seeds();
    info_seeds();
    magnet_seeds();
    store_seeds();
    utp_seeds();
    mse_seeds();
    mse_session_seeds();
    http_seeds();
}

fn http_seeds() {
    let v1 = "c8295ce630f2064f08440db1534e37da6b4eabc7";
    for (name, req) in [
        (
            "get",
            format!("GET /torrent/{v1}.torrent HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "get-title-etag",
            format!(
                "GET /torrent/{}.torrent?title=A%20film%0d%0aX:+y HTTP/1.1\r\n\
                 If-None-Match: W/\"{v1}-00000000\"\r\nConnection: close\r\n\r\n",
                v1.to_uppercase()
            ),
        ),
        (
            "preflight",
            "OPTIONS /torrent/x.torrent HTTP/1.1\r\nOrigin: http://a\r\n\
             Access-Control-Request-Headers: user-agent, range\r\n\r\n"
                .to_string(),
        ),
        (
            "pipelined-head-1.0",
            format!("HEAD /torrent/{v1}.torrent HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
        ),
    ] {
        write_seed("http_request", name, req.as_bytes());
    }
}

/// A uTP header as the fuzz entry's records carry it: (control, datagram).
fn utp_record(ctl: u8, ty: u8, conn_id: u16, seq: u16, ack: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![ty << 4 | 1, 0];
    d.extend_from_slice(&conn_id.to_be_bytes());
    d.extend_from_slice(&1000u32.to_be_bytes());
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&(1u32 << 20).to_be_bytes());
    d.extend_from_slice(&seq.to_be_bytes());
    d.extend_from_slice(&ack.to_be_bytes());
    d.extend_from_slice(payload);
    let mut r = vec![ctl, d.len() as u8];
    r.extend_from_slice(&d);
    r
}

fn utp_seeds() {
    // The accepted connection: SYN id 100 seq 500, our seq 7000 (fuzz_entry). The peer acks
    // our SYN-ACK as libtorrent does (6999), sends data, acks ours, closes.
    let mut flow = utp_record(1, 2, 101, 501, 6999, &[]);
    flow.extend(utp_record(1, 0, 101, 501, 6999, b"hello"));
    flow.extend(utp_record(0x45, 2, 101, 502, 7000, &[]));
    flow.extend(utp_record(0x21, 2, 101, 502, 7005, &[]));
    flow.extend(utp_record(1, 1, 101, 502, 7010, &[]));
    write_seed("utp_connection", "libtorrent-flow", &flow);
    // Never established: a retransmitted SYN and garbage.
    let mut unverified = utp_record(1, 4, 100, 500, 0, &[]);
    unverified.extend(utp_record(0x3f, 0, 101, 900, 123, b"x"));
    write_seed("utp_connection", "unverified", &unverified);
}

fn mse_seeds() {
    use magnetar::mse::{CryptoPolicy, Initiator};
    // An initiator's opening and step 3 for the fuzz entry's known torrent ([0x11; 20]),
    // read in 64-byte steps (the first byte).
    for (name, policy) in [
        ("plaintext", CryptoPolicy::PreferPlaintext),
        ("rc4", CryptoPolicy::Rc4Only),
    ] {
        let ini = Initiator::new(&[9u8; 32], 20, [0x11; 20], policy);
        let mut opening = Vec::new();
        ini.opening(&mut opening);
        let mut seed = vec![64u8];
        seed.extend_from_slice(&opening);
        // Step 3 depends on the responder's key; the opening alone reaches the req1 search.
        write_seed("mse_responder", name, &seed);
    }
}

fn mse_session_seeds() {
    use magnetar::wire::{encode_handshake, Reserved};
    let known = fuzz_entry::mse_session_key();
    let other = [0x77u8; 20];
    let handshake = |key: &[u8; 20]| {
        let mut v = Vec::new();
        encode_handshake(
            &mut v,
            Reserved::ours(false, false, false),
            key,
            b"-XX0001-fuzzseedpeer",
        );
        v
    };
    // ut_metadata request for piece 0 after the extension handshake (ours: id 1 for theirs).
    let mut after = Vec::new();
    let ext = b"d1:md11:ut_metadatai1eee";
    after.extend_from_slice(&((ext.len() + 2) as u32).to_be_bytes());
    after.extend_from_slice(&[20, 0]);
    after.extend_from_slice(ext);
    let req = b"d8:msg_typei0e5:piecei0ee";
    after.extend_from_slice(&((req.len() + 2) as u32).to_be_bytes());
    after.extend_from_slice(&[20, 1]);
    after.extend_from_slice(req);
    for (crypto, bit) in [("plain", 0u8), ("rc4", 1)] {
        for (torrent, key) in [("proven", known), ("other", other)] {
            // The BitTorrent handshake inside the MSE handshake (IA)...
            let mut seed = vec![bit | 16 << 1, 68];
            seed.extend(handshake(&key));
            seed.extend_from_slice(&after);
            write_seed("mse_session", &format!("{torrent}-in-ia-{crypto}"), &seed);
            // ...and after it.
            let mut seed = vec![bit | 16 << 1, 0];
            seed.extend(handshake(&key));
            seed.extend_from_slice(&after);
            write_seed("mse_session", &format!("{torrent}-after-{crypto}"), &seed);
        }
    }
}
