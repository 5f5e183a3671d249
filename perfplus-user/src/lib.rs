//! perfplus: live migration of KVM guests with Perf+ page hashing.
//!
//! This crate sits on top of `perfplus-vmm` (guest memory, the VMM, the dirty trackers) and
//! `perfplus-protocol` (the wire); see ARCHITECTURE.md. The data flow, upstream to downstream:
//! `perfplus_vmm::tracking` (which pages changed) → [`hashing`] and [`content_index`] (what they
//! contain, what the destination holds) → [`migration`] (order, rounds, convergence) → the wire →
//! [`migration::receiver`] (write, resolve references) → the destination's guest memory; [`report`]
//! is fed by every stage. [`agent`] is the per-host daemon that owns the VMs, [`cli`] the operator's
//! side, [`ebpf`] the loader of the write-heat programs.

pub mod agent;
pub mod cli;
pub mod content_index;
pub mod ebpf;
pub mod fault_injection;
pub mod hashing;
pub mod metrics;
pub mod migration;
pub mod page_store;
pub mod private_files;
pub mod qemu;
pub mod report;
pub mod service;
