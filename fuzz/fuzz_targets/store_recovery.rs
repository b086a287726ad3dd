#![no_main]
//! See `magnetar::fuzz_entry::store_recovery` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar::fuzz_entry::store_recovery(data));
