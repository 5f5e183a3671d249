//! libFuzzer entry for perfplus-fuzz's `vm_state` target (see `perfplus_fuzz::targets::vm_state`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfplus_fuzz::targets::vm_state(data));
