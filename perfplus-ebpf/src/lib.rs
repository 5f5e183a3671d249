//! eBPF programs of perfplus.
//!
//! Empty until the kernel-assisted tracking work (dirty ring, userfaultfd write-protect and the aya
//! tracepoint programs) fills it; the crate exists so that the ebpf/common/user split is in place.
#![no_std]
