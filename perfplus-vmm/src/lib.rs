//! perfplus's VMM layer: everything that touches KVM, guest memory and the kernel's page tracking,
//! and nothing of hashing, the wire or migrations (those live in `perfplus-protocol` and `perfplus`,
//! which build on this crate; nothing here may import from them).
//!
//! Modules, lowest first (each imports only from those above it in this list):
//! - [`memory`]: guest RAM, a memfd mapped shared twice (the agent's view, read and written by copy;
//!   the guest's view, KVM's memory slot).
//! - [`page_set`]: [`PageSet`], a bitmap of guest pages (dirty pages, holes, missing pages).
//! - [`sys`]: the kernel wrappers, one typed safe method per ioctl: [`sys::kvm`] (the KVM ioctls
//!   `kvm-ioctls` lacks: `KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS`, the dirty-ring mapping),
//!   [`sys::userfaultfd`] (all of userfaultfd: MISSING, MINOR and WP modes, COPY, ZEROPAGE, CONTINUE,
//!   WRITEPROTECT, WAKE, fault messages), [`sys::pagemap`] (`PAGEMAP_SCAN`). Everything else goes
//!   through `kvm-ioctls`.
//! - [`demand_paging`]: guest RAM's guest view registered with userfaultfd (MISSING and MINOR modes),
//!   holes installed with `UFFDIO_COPY`, cached pages mapped (after a rewrite if stale) with
//!   `UFFDIO_CONTINUE`: the destination's side of post-copy (on [`sys::userfaultfd`]).
//! - [`vm`]: the VMM proper: KVM VM and vCPU threads, multiboot loader, devices, pause/resume,
//!   `VmState`, the built-in guest.
//! - [`tracking`]: which pages the guest wrote: KVM dirty log, KVM dirty ring, userfaultfd
//!   write-protect.
pub mod demand_paging;
pub mod memory;
pub mod page_set;
pub mod sys;
pub mod tracking;
pub mod vm;

#[cfg(test)]
mod guest_tests;
#[cfg(test)]
mod test_mapping;

pub use memory::GuestMemory;
pub use page_set::PageSet;
