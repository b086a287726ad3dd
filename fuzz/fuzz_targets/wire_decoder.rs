#![no_main]
//! See `magnetar::fuzz_entry::wire_decoder` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar::fuzz_entry::wire_decoder(data));
