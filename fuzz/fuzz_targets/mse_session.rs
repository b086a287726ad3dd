#![no_main]
//! See `magnetar::fuzz_entry::mse_session` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar::fuzz_entry::mse_session(data));
