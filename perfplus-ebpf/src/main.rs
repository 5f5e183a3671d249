//! eBPF programs of perfplus (built for `bpfel-unknown-none` by `perfplus-user/build.rs`).
//!
//! The programs, maps and layouts are specified in `perfplus_common::ebpf_abi`. For the host target
//! this crate is an empty binary, so that the host workspace builds, lints and tests without the BPF
//! toolchain.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values (built with RUSTC_BOOTSTRAP=1, like `-Z build-std`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
