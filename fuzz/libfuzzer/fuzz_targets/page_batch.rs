//! libFuzzer entry for perfplus-fuzz's `page_batch` target (see `perfplus_fuzz::targets::page_batch`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfplus_fuzz::targets::page_batch(data));
