//! Synthetic but valid BEP 3 v1 info dicts, deterministic from a seed: what `gen-store`
//! writes and what the criterion benches use. Only `std` here, so the benches of the root
//! crate include this very file (`#[path]`) instead of depending on the loadgen.
//!
//! A dict is `d6:lengthi<L>e4:name<..>12:piece lengthi16384e6:pieces<20·n>e` with `n`
//! random SHA-1-sized piece hashes and `L = n · 16 KiB`, so it passes magnetar's
//! `validate_info` (hash count matches the length) and libtorrent's parser. The size of the
//! dict is set by `n`: about `20 · n + 80` bytes.

/// BEP 9 metadata piece size.
pub const METADATA_PIECE_BYTES: usize = 16 * 1024;

/// Fixed bytes of a dict besides the `pieces` string (keys, name, integers), roughly.
const DICT_OVERHEAD_BYTES: usize = 90;

/// xorshift64: deterministic, dependency-free, good enough for synthetic bytes.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// In `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: no modulo bias worth caring about at these sizes.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// In `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// How big the generated dicts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeMix {
    /// Like real torrents' metadata: 1 to 8 BEP 9 pieces, each piece count equally
    /// likely, the size uniform within that piece count (so 1 KiB … 128 KiB).
    Real,
    /// About this many bytes each (for record-count scaling tests: 1M × ~300 B).
    Fixed(usize),
}

impl SizeMix {
    /// Target dict size for dict number `seed` (deterministic).
    pub fn size_for(self, rng: &mut Rng) -> usize {
        match self {
            SizeMix::Fixed(n) => n,
            SizeMix::Real => {
                let pieces = 1 + rng.below(8) as usize;
                let low = if pieces == 1 {
                    1024
                } else {
                    (pieces - 1) * METADATA_PIECE_BYTES + 1
                };
                let high = pieces * METADATA_PIECE_BYTES;
                low + rng.below((high - low) as u64 + 1) as usize
            }
        }
    }
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(b);
}

/// A valid v1 info dict of about `size` bytes (never more than `size` once `size` ≥ 130),
/// unique per `seed`.
pub fn info_dict(seed: u64, size: usize) -> Vec<u8> {
    let name = format!("synthetic-{seed:016x}.bin");
    // 20 bytes per hash; the name, keys and two integers take the rest.
    let fixed = DICT_OVERHEAD_BYTES + name.len() - 16;
    let pieces_n = (size.saturating_sub(fixed) / 20).max(1);
    let piece_length = 16 * 1024u64;
    let length = pieces_n as u64 * piece_length;
    let mut pieces = vec![0u8; pieces_n * 20];
    Rng::new(seed ^ 0x5eed_5eed).fill(&mut pieces);
    let mut out = Vec::with_capacity(pieces.len() + fixed + 16);
    out.extend_from_slice(format!("d6:lengthi{length}e4:name").as_bytes());
    push_bytes(&mut out, name.as_bytes());
    out.extend_from_slice(format!("12:piece lengthi{piece_length}e6:pieces").as_bytes());
    push_bytes(&mut out, &pieces);
    out.push(b'e');
    out
}

/// Dict number `i` of a set generated with `seed` and `mix`: the same `(seed, mix, i)` gives
/// the same bytes, so a store, a libtorrent seed and a floor server can be built apart.
pub fn nth_dict(seed: u64, mix: SizeMix, i: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed.wrapping_add(i.wrapping_mul(0x2545_F491_4F6C_DD1D)));
    let size = mix.size_for(&mut rng);
    info_dict(seed.rotate_left(32) ^ i, size)
}

/// A minimal .torrent around an info dict (`d4:info<dict>e`): all libtorrent needs to seed it.
pub fn torrent_file(info: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(info.len() + 10);
    out.extend_from_slice(b"d4:info");
    out.extend_from_slice(info);
    out.push(b'e');
    out
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)] // unused where benches/ include this file
    use super::*;

    #[test]
    fn sizes_follow_the_mix() {
        let mut rng = Rng::new(1);
        let mut seen = [0usize; 9];
        for _ in 0..2000 {
            let size = SizeMix::Real.size_for(&mut rng);
            assert!((1024..=8 * METADATA_PIECE_BYTES).contains(&size));
            seen[size.div_ceil(METADATA_PIECE_BYTES)] += 1;
        }
        assert!(seen[1..].iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(SizeMix::Fixed(300).size_for(&mut rng), 300);
    }

    #[test]
    fn dicts_are_close_to_their_size_and_deterministic() {
        for size in [130, 300, 1024, 16 * 1024, 16 * 1024 + 1, 128 * 1024] {
            let d = info_dict(7, size);
            assert!(
                d.len() <= size && d.len() + 40 >= size,
                "{size}: {}",
                d.len()
            );
            assert_eq!(d, info_dict(7, size));
            assert_ne!(d, info_dict(8, size));
        }
        assert_eq!(nth_dict(1, SizeMix::Real, 5), nth_dict(1, SizeMix::Real, 5));
        assert!(nth_dict(1, SizeMix::Real, 5).len() <= 8 * METADATA_PIECE_BYTES);
    }
}
