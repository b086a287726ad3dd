//! Criterion micro-benchmarks of MSE (`src/mse/`): the DH modexp with `crypto-bigint` (what
//! we use) against `num-bigint`, one whole responder handshake, and RC4 throughput.
//! `cargo bench --bench mse`; the numbers are recorded in `src/mse/dh.rs`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use magnetar::mse::dh::KeyPair;
use magnetar::mse::{
    req2_hash, CryptoPolicy, Initiator, InitiatorStep, Responder, ResponderStep, PRIME_HEX,
};
use num_bigint::BigUint;
use rc4::{KeyInit, StreamCipher};

const KEY: [u8; 20] = [0xab; 20];
const A_SECRET: [u8; 32] = [7; 32];
const B_SECRET: [u8; 32] = [9; 32];

/// Everything A sends for a whole handshake with B (B's secret fixed, so it is the same
/// every run): Ya, PadA, step 3 with a 68-byte IA.
fn initiator_transcript() -> Vec<u8> {
    let mut a = Initiator::new(&A_SECRET, 100, KEY, CryptoPolicy::PreferPlaintext);
    let mut b = Responder::new(&B_SECRET, 100, CryptoPolicy::PreferPlaintext);
    let mut a_out = Vec::new();
    a.opening(&mut a_out);
    let mut b_out = Vec::new();
    let mut lookup = |r: &[u8; 20]| (*r == req2_hash(&KEY)).then_some(KEY);
    b.on_bytes(&a_out, &mut b_out, &mut lookup).unwrap();
    let step = a.on_bytes(&b_out, &mut a_out, &[0x13; 68]).unwrap();
    assert!(matches!(step, InitiatorStep::NeedMore { .. }));
    a_out
}

fn dh(c: &mut Criterion) {
    let mut g = c.benchmark_group("mse_dh");
    g.bench_function("modexp_crypto_bigint", |b| {
        b.iter(|| KeyPair::new(black_box(&A_SECRET)))
    });
    let p = BigUint::parse_bytes(PRIME_HEX.as_bytes(), 16).unwrap();
    let two = BigUint::from(2u32);
    g.bench_function("modexp_num_bigint", |b| {
        b.iter(|| {
            let x = BigUint::from_bytes_be(black_box(&A_SECRET));
            let y = two.modpow(&x, &p).to_bytes_be();
            let mut out = [0u8; 96];
            out[96 - y.len()..].copy_from_slice(&y);
            out
        })
    });
    let transcript = initiator_transcript();
    let req2 = req2_hash(&KEY);
    g.bench_function("responder_handshake", |b| {
        b.iter(|| {
            let mut r = Responder::new(&B_SECRET, 100, CryptoPolicy::PreferPlaintext);
            let mut out = Vec::with_capacity(256);
            let step = r
                .on_bytes(black_box(&transcript), &mut out, &mut |h| {
                    (*h == req2).then_some(KEY)
                })
                .unwrap();
            assert!(matches!(step, ResponderStep::Done { .. }));
            out
        })
    });
    g.finish();
}

fn rc4_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("mse_rc4");
    let mut buf = vec![0u8; 64 * 1024];
    g.throughput(Throughput::Bytes(buf.len() as u64));
    let mut cipher = rc4::Rc4::new_from_slice(&[1; 20]).unwrap();
    g.bench_function("apply_keystream_64KiB", |b| {
        b.iter(|| cipher.apply_keystream(black_box(&mut buf)))
    });
    g.finish();
}

criterion_group!(benches, dh, rc4_throughput);
criterion_main!(benches);
