//! Criterion micro-benchmarks of the sans-IO wire codec: decode and encode of each message
//! magnetar handles on the hit path. `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use magnetar::wire::{
    decode_frame, decode_handshake_head, decode_metadata, encode_handshake,
    encode_metadata_data_header, encode_metadata_reject, encode_metadata_request, ExtHandshake,
    Reserved,
};

fn ext_handshake() -> Vec<u8> {
    let mut out = Vec::new();
    ExtHandshake {
        ut_metadata: Some(3),
        ut_pex: Some(1),
        metadata_size: Some(100_000),
        client: Some(b"libtorrent 2.0.8"),
        reqq: Some(250),
        yourip: Some("127.0.0.1".parse().unwrap()),
        listen_port: Some(6881),
    }
    .encode(&mut out);
    out
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let mut hs = Vec::new();
    encode_handshake(
        &mut hs,
        Reserved::ours(true, false, false),
        &[7; 20],
        &[9; 20],
    );
    g.bench_function("handshake_head", |b| {
        b.iter(|| decode_handshake_head(black_box(&hs)))
    });
    let ext = ext_handshake();
    g.bench_function("frame+ext_handshake", |b| {
        b.iter(|| {
            let Ok(magnetar::wire::Decoded::Done(
                magnetar::wire::Frame::Extended { payload, .. },
                _,
            )) = decode_frame(black_box(&ext))
            else {
                unreachable!()
            };
            ExtHandshake::decode(payload).unwrap()
        })
    });
    let mut req = Vec::new();
    encode_metadata_request(&mut req, 3, 5);
    g.bench_function("frame+metadata_request", |b| {
        b.iter(|| {
            let Ok(magnetar::wire::Decoded::Done(
                magnetar::wire::Frame::Extended { payload, .. },
                _,
            )) = decode_frame(black_box(&req))
            else {
                unreachable!()
            };
            decode_metadata(payload).unwrap()
        })
    });
    let mut data = Vec::new();
    encode_metadata_data_header(&mut data, 3, 2, 100_000, 16384);
    data.extend(vec![0u8; 16384]);
    g.bench_function("frame+metadata_data_16k", |b| {
        b.iter(|| {
            let Ok(magnetar::wire::Decoded::Done(
                magnetar::wire::Frame::Extended { payload, .. },
                _,
            )) = decode_frame(black_box(&data))
            else {
                unreachable!()
            };
            decode_metadata(payload).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("encode");
    let mut out = Vec::with_capacity(1024);
    g.bench_function("handshake", |b| {
        b.iter(|| {
            out.clear();
            encode_handshake(
                &mut out,
                Reserved::ours(true, false, false),
                black_box(&[7; 20]),
                &[9; 20],
            )
        })
    });
    g.bench_function("ext_handshake", |b| {
        b.iter(|| {
            out.clear();
            ExtHandshake {
                ut_metadata: Some(2),
                metadata_size: Some(black_box(100_000)),
                client: Some(b"magnetar 0.1.0"),
                reqq: Some(250),
                yourip: Some("127.0.0.1".parse().unwrap()),
                ..Default::default()
            }
            .encode(&mut out)
        })
    });
    g.bench_function("metadata_data_header", |b| {
        b.iter(|| {
            out.clear();
            encode_metadata_data_header(&mut out, 3, black_box(5), black_box(100_000), 16384)
        })
    });
    g.bench_function("metadata_request", |b| {
        b.iter(|| {
            out.clear();
            encode_metadata_request(&mut out, 3, black_box(5))
        })
    });
    g.bench_function("metadata_reject", |b| {
        b.iter(|| {
            out.clear();
            encode_metadata_reject(&mut out, 3, black_box(5))
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
