//! The miss path: find peers for an unknown info-hash (the connecting client, PEX,
//! trackers, the DHT, magnet hints, parent nodes), fetch the metadata from several of them
//! at once over BEP 9, verify it against the info-hash, store it, wake the waiting clients.

pub mod config;
