#![no_main]
//! See `magnetar::fuzz_entry::utp_connection` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar::fuzz_entry::utp_connection(data));
