//! What to ask for: the info-hashes (from a file or a magnetar store), how popular each one
//! is (uniform or Zipf), and the share of random unknown hashes (misses).

use std::path::Path;

use anyhow::{bail, Context};
use magnetar::magnet::Magnet;
use magnetar::store::Store;

use crate::synth::Rng;

/// One handshake key per line: 40 hex (v1), 64 hex (v2, truncated to 20 bytes as in the
/// handshake), or a magnet link. Blank lines and `#` comments are skipped.
pub fn parse_hashes(text: &str) -> anyhow::Result<Vec<[u8; 20]>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = if line.starts_with("magnet:") {
            Magnet::parse(line)
                .with_context(|| format!("line {}: bad magnet", n + 1))?
                .handshake_key()
        } else {
            let bytes = hex::decode(line).with_context(|| format!("line {}: not hex", n + 1))?;
            match bytes.len() {
                20 | 32 => bytes[..20].try_into().expect("20 bytes"),
                len => bail!("line {}: {len} bytes, expected 20 or 32", n + 1),
            }
        };
        keys.push(key);
    }
    Ok(keys)
}

pub fn hashes_from_file(path: &Path) -> anyhow::Result<Vec<[u8; 20]>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let keys = parse_hashes(&text)?;
    if keys.is_empty() {
        bail!("{path:?} has no info-hashes");
    }
    Ok(keys)
}

/// The primary handshake key of every record in a magnetar data dir (opened read-only,
/// beside a running server if need be; every record is re-verified on open).
pub fn hashes_from_store(dir: &Path) -> anyhow::Result<Vec<[u8; 20]>> {
    let (store, report) =
        Store::open_read_only(dir).with_context(|| format!("opening store {dir:?}"))?;
    let mut keys = Vec::with_capacity(report.records);
    store.for_each_record(|r| keys.extend(r.hashes().primary_key()));
    // The index has no order; sort so that `--zipf` ranks are the same run after run.
    keys.sort_unstable();
    if keys.is_empty() {
        bail!("store {dir:?} has no records");
    }
    Ok(keys)
}

/// Picks the info-hash of each fetch.
pub struct Picker {
    keys: Vec<[u8; 20]>,
    /// Cumulative probabilities for Zipf; empty for uniform.
    cdf: Vec<f64>,
    miss_ratio: f64,
}

/// A pick: a known key, or a random one nobody has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub key: [u8; 20],
    pub miss: bool,
}

impl Picker {
    /// `zipf`: exponent `s` (rank r has weight 1/r^s, in file order), `None` for uniform.
    pub fn new(keys: Vec<[u8; 20]>, zipf: Option<f64>, miss_ratio: f64) -> Picker {
        assert!(!keys.is_empty());
        let cdf = match zipf {
            None => Vec::new(),
            Some(s) => {
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = (1..=keys.len())
                    .map(|r| {
                        acc += 1.0 / (r as f64).powf(s);
                        acc
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= acc;
                }
                cdf
            }
        };
        Picker {
            keys,
            cdf,
            miss_ratio: miss_ratio.clamp(0.0, 1.0),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn pick(&self, rng: &mut Rng) -> Pick {
        if self.miss_ratio > 0.0 && rng.unit() < self.miss_ratio {
            let mut key = [0u8; 20];
            rng.fill(&mut key);
            return Pick { key, miss: true };
        }
        let i = if self.cdf.is_empty() {
            rng.below(self.keys.len() as u64) as usize
        } else {
            let u = rng.unit();
            self.cdf
                .partition_point(|&c| c < u)
                .min(self.keys.len() - 1)
        };
        Pick {
            key: self.keys[i],
            miss: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_v2_and_magnets() {
        let v1 = "c8dd895fbc6cd38850205bf09c76a465ab7d7a3e";
        let v2 = "a".repeat(64);
        let magnet = format!("magnet:?xt=urn:btih:{v1}&dn=x");
        let text = format!("# comment\n{v1}\n\n{v2}\n{magnet}\n");
        let keys = parse_hashes(&text).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0], keys[2]);
        assert_eq!(keys[1], [0xaa; 20]);
        assert!(parse_hashes("abcd\n").is_err());
        assert!(parse_hashes("zz\n").is_err());
    }

    #[test]
    fn zipf_prefers_the_head_and_misses_mix_in() {
        let keys: Vec<[u8; 20]> = (0..100u8).map(|i| [i; 20]).collect();
        let mut rng = Rng::new(5);
        let zipf = Picker::new(keys.clone(), Some(1.2), 0.0);
        let mut first = 0;
        for _ in 0..10_000 {
            let p = zipf.pick(&mut rng);
            assert!(!p.miss);
            first += (p.key == [0; 20]) as u32;
        }
        // 1/H(100, 1.2) ≈ 0.28 of all picks go to rank 1.
        assert!((2500..3050).contains(&first), "{first}");
        let uniform = Picker::new(keys, None, 0.25);
        let misses = (0..10_000).filter(|_| uniform.pick(&mut rng).miss).count();
        assert!((2200..2800).contains(&misses), "{misses}");
    }
}
