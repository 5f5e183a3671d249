//! libFuzzer entry for perfplus-fuzz's `multiboot` target (see `perfplus_fuzz::targets::multiboot`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfplus_fuzz::targets::multiboot(data));
