//! libFuzzer entry for perfplus-fuzz's `handshake` target (see `perfplus_fuzz::targets::handshake`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfplus_fuzz::targets::handshake(data));
