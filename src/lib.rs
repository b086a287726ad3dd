//! magnetar: a BitTorrent metadata cache.
//!
//! Layout, in the order a request's data flows:
//! - `limits`   every cap, named, with the reason for its value
//! - `config`   settings of `magnetar serve` (defaults, data dir)
//! - `wire`     sans-IO codec: handshake, frames, BEP 10 extension handshake, BEP 9 ut_metadata, bencode caps
//! - `magnet`   magnet link parsing and formatting (btih, btmh, dn, tr, x.pe)
//! - `metainfo` .torrent / info dict validation and info-hash computation (SHA-1 v1, SHA-256 v2)
//! - `store`    append-only mmap segments, record format, index, recovery
//! - `import`   `magnetar import`: .torrent files into the store
//! - `server`   thread-per-core monoio runtime, listeners, peer sessions, zero-copy block sends
//! - `utp`      sans-IO uTP (BEP 29): packet codec, connection state machine, LEDBAT
//! - `mse`      sans-IO Message Stream Encryption (MSE/PE): DH handshake, RC4, both sides
//! - `dht`      sans-IO Mainline DHT node: KRPC codec, routing table, lookups, answers (BEP 5/32/42/51)
//! - `upstream` the miss path: fetch unknown info dicts from the swarm
//! - `shared`   the shared tier: an S3-compatible bucket behind every node (docs/scale-out.md)
//! - `admin`    HTTP plane on its own thread: metrics, health, .torrent in/out, delete/block
//! - `tokio_thread` the thread + tokio runtime that `admin` and `shared` each run on

pub mod admin;
pub mod config;
pub mod dht;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod import;
pub mod limits;
pub mod magnet;
pub mod metainfo;
pub mod mse;
pub mod server;
pub mod shared;
pub mod store;
pub mod tokio_thread;
pub mod upstream;
pub mod utp;
pub mod wire;
