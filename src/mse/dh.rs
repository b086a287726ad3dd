//! MSE Diffie-Hellman: the 768-bit prime P (the same hex string in libtorrent's
//! `pe_crypto.cpp` and the Vuze spec), generator 2, public keys and shared secrets as 96
//! big-endian bytes.
//!
//! Crate choice, measured by `benches/mse.rs` (criterion, release, this project's 2-core
//! VM; medians):
//!
//! | what | time / throughput |
//! | --- | --- |
//! | one modexp, 256-bit exponent, `crypto-bigint` 0.7 (`FixedMontyForm`, constant time) | 98 µs |
//! | the same with `num-bigint` 0.4 (`BigUint::modpow`, variable time, allocating) | 119 µs |
//! | one whole responder handshake (Yb keygen + S + 3 SHA-1 + 2 RC4 keyings with 1 KiB discarded) | 186 µs |
//! | RC4 (`rc4` 0.2), 64 KiB buffers | 388 MiB/s |
//!
//! `crypto-bigint` is faster, constant time in our private exponent, allocation-free, and
//! maintained by RustCrypto (as are `sha1` and `rc4`), so it is the one we use;
//! `num-bigint` is only a dev-dependency of the bench. A core does ~5 000 encrypted
//! handshakes a second; RC4 at ~400 MB/s a core is far above what metadata serving sends.

use std::sync::LazyLock;

use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, U256, U768};

use super::MseError;

/// Length of Ya, Yb and S on the wire.
pub const DH_KEY_BYTES: usize = 96;

/// The MSE prime P, big-endian hex.
pub const PRIME_HEX: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74\
020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A63A36210000000000090563";

const LIMBS: usize = U768::LIMBS;

static PARAMS: LazyLock<FixedMontyParams<LIMBS>> =
    LazyLock::new(|| FixedMontyParams::new_vartime(Odd::<U768>::from_be_hex(PRIME_HEX)));

/// A private exponent (the caller's 32 random bytes) and its public key.
pub struct KeyPair {
    x: U256,
    /// `2^x mod P`, 96 bytes big-endian.
    pub public: [u8; DH_KEY_BYTES],
}

impl KeyPair {
    pub fn new(secret: &[u8; 32]) -> Self {
        let x = U256::from_be_slice(secret);
        let g = FixedMontyForm::new(&U768::from_u64(2), &PARAMS);
        KeyPair {
            x,
            public: to_bytes(&g.pow(&x).retrieve()),
        }
    }

    /// `S = Y^x mod P` for the peer's public key `Y`, 96 bytes big-endian. Refuses a `Y`
    /// outside `2..=P-2`: 0, 1 and P-1 fix S whatever our exponent is.
    pub fn shared_secret(&self, peer_public: &[u8]) -> Result<[u8; DH_KEY_BYTES], MseError> {
        if peer_public.len() != DH_KEY_BYTES {
            return Err(MseError::BadPublicKey);
        }
        let y = U768::from_be_slice(peer_public);
        let p = PARAMS.modulus().get();
        let p_minus_1 = p.wrapping_sub(&U768::ONE);
        if y.cmp_vartime(&U768::from_u64(2)).is_lt() || y.cmp_vartime(&p_minus_1).is_ge() {
            return Err(MseError::BadPublicKey);
        }
        let y = FixedMontyForm::new(&y, &PARAMS);
        Ok(to_bytes(&y.pow(&self.x).retrieve()))
    }
}

fn to_bytes(v: &U768) -> [u8; DH_KEY_BYTES] {
    let mut out = [0u8; DH_KEY_BYTES];
    out.copy_from_slice(v.to_be_bytes().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_bad_keys_are_refused() {
        let a = KeyPair::new(&[1; 32]);
        let b = KeyPair::new(&[2; 32]);
        assert_ne!(a.public, b.public);
        let s1 = a.shared_secret(&b.public).unwrap();
        let s2 = b.shared_secret(&a.public).unwrap();
        assert_eq!(s1, s2);
        let mut p = [0u8; 96];
        hex::decode_to_slice(PRIME_HEX, &mut p).unwrap();
        let mut p_minus_1 = p;
        p_minus_1[95] -= 1;
        let mut one = [0u8; 96];
        one[95] = 1;
        for bad in [[0u8; 96], one, p_minus_1, p, [0xff; 96]] {
            assert_eq!(a.shared_secret(&bad), Err(MseError::BadPublicKey));
        }
        assert_eq!(a.shared_secret(&[5; 95]), Err(MseError::BadPublicKey));
        let mut two = [0u8; 96];
        two[95] = 2;
        assert!(a.shared_secret(&two).is_ok());
    }

    #[test]
    fn generator_to_the_one_is_two() {
        let mut secret = [0u8; 32];
        secret[31] = 1;
        let k = KeyPair::new(&secret);
        let mut two = [0u8; 96];
        two[95] = 2;
        assert_eq!(k.public, two);
    }
}
