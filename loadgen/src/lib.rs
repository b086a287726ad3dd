//! magnetar-loadgen: simulated BitTorrent peers that fetch metadata (BEP 9) from any peer —
//! magnetar, a libtorrent seed, the benches' floor server — and measure it. It depends on
//! magnetar's codec (`wire`), `metainfo`, `magnet` and `store` (to read a data dir), never on
//! the server internals.
//!
//! Layout, in the order a run flows:
//! - `targets`   info-hashes to ask for (file, magnets, store) and their popularity
//! - `peer`      one peer's conversation, sans-IO: handshake, extension handshake, pieces
//! - `run`       thread-per-core monoio runtimes, connections, counters, histograms
//! - `report`    live line, final table, JSON line, HdrHistogram log, SVG plot
//! - `synth`     synthetic valid info dicts (also used by the root crate's benches)
//! - `store_gen` `gen-store` and `recover`: synthetic stores and their recovery time

pub mod peer;
pub mod report;
pub mod run;
pub mod store_gen;
pub mod synth;
pub mod targets;
