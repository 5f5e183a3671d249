//! libFuzzer entry for perfplus-fuzz's `frame` target (see `perfplus_fuzz::targets::frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfplus_fuzz::targets::frame(data));
