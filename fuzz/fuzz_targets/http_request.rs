#![no_main]
//! See `magnetar::fuzz_entry::http_request` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar::fuzz_entry::http_request(data));
