//! The guest-RAM memory slot and its KVM dirty log.
//!
//! All guest RAM is one KVM memory slot ([`RAM_SLOT`]) at guest physical address 0, backed by
//! [`GuestMemory`]'s guest view (the agent reads and writes through its own view of the same memfd).
//! The VM enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, so `KVM_GET_DIRTY_LOG` only *reads* the bitmap
//! and a page stays unprotected until `KVM_CLEAR_DIRTY_LOG` clears its bit and write-protects it
//! again. A VM without dirty rings also asks for `KVM_DIRTY_LOG_INITIALLY_SET` (where KVM offers it):
//! turning logging on then protects nothing and sets every bit, and [`RamSlot::set_dirty_logging`]
//! clears the bitmap itself, a few thousand pages per call. Without it, KVM write-protects the whole
//! slot in one pass under the VM's MMU lock, and a vCPU that faults meanwhile waits for all of it:
//! 8 ms for a 1 GiB guest here (measured with `perf` during a migration's start), growing with memory.
//! Dirty rings are left without it: KVM then skips the write-protection and has no bitmap to clear. `KVM_SET_USER_MEMORY_REGION` and `KVM_GET_DIRTY_LOG`
//! come from `kvm-ioctls`; `KVM_CLEAR_DIRTY_LOG`, which it lacks, from [`crate::sys::kvm`]. [`RamSlot`]
//! is the one way into the dirty log (the [`super::Vm`] hands it out, it does not wrap it).
//!
//! [`RamSlot`] is `Send + Sync` and shared (`Arc`) between the [`super::Vm`] and dirty trackers, so a
//! tracker can live on another thread than the VM.
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use perfplus_common::PAGE_SIZE;

use crate::memory::GuestMemory;
use crate::sys;

/// The KVM memory slot that holds all guest RAM.
pub const RAM_SLOT: u32 = 0;

/// The guest-RAM memory slot of one VM: registration, dirty-logging switch, dirty bitmap.
pub struct RamSlot {
    // Field order matters for drop: the VM fd (and with it the slot) goes before the memory it maps.
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set; the lock also serialises re-registrations.
    logging: Mutex<bool>,
    /// The VM logs into dirty rings: the bitmap ioctls are unavailable (KVM refuses them).
    ring_mode: bool,
    /// The VM has `KVM_DIRTY_LOG_INITIALLY_SET`: turning logging on leaves every bit set and every page
    /// writable, and the bitmap is cleared here.
    initially_set: bool,
}

/// Pages cleared per `KVM_CLEAR_DIRTY_LOG` call when logging starts: each call holds the VM's MMU lock
/// while it protects its pages (about 0.1 ms for 4096 pages here), so a vCPU that faults waits at most
/// that long.
const START_CLEAR_PAGES: u64 = 4096;

impl RamSlot {
    /// Registers `memory` as slot [`RAM_SLOT`] at guest physical address 0, without dirty logging.
    /// `ring_mode`: the VM has dirty rings, so logging goes there and the bitmap calls are refused.
    /// `initially_set`: the VM enabled `KVM_DIRTY_LOG_INITIALLY_SET` (never with `ring_mode`).
    pub(crate) fn register(
        vm_fd: Arc<VmFd>,
        memory: Arc<GuestMemory>,
        ring_mode: bool,
        initially_set: bool,
    ) -> anyhow::Result<Self> {
        ensure!(
            !(ring_mode && initially_set),
            "a dirty-ring VM must not use KVM_DIRTY_LOG_INITIALLY_SET"
        );
        let slot = Self {
            vm_fd,
            memory,
            logging: Mutex::new(false),
            ring_mode,
            initially_set,
        };
        slot.set_region(0).context("KVM_SET_USER_MEMORY_REGION for guest RAM")?;
        Ok(slot)
    }

    fn set_region(&self, flags: u32) -> anyhow::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags,
            guest_phys_addr: 0,
            memory_size: self.memory.size(),
            userspace_addr: self.memory.guest_view_addr() as u64,
        };
        // SAFETY: the region is the whole guest view of `self.memory`, which stays mapped as long as this
        // slot exists (we hold an `Arc` to it, dropped after the VM fd, see the field order), so KVM
        // never sees an unmapped host range.
        unsafe { self.vm_fd.set_user_memory_region(region) }?;
        Ok(())
    }

    /// The guest memory the slot maps.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Number of 4 KiB pages in the slot (bits of the dirty bitmap).
    pub fn page_count(&self) -> u64 {
        self.memory.page_count()
    }

    /// Whether the VM logs into dirty rings rather than the bitmap.
    pub fn ring_mode(&self) -> bool {
        self.ring_mode
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        *self.logging.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns dirty logging on or off by re-registering the slot with or without
    /// `KVM_MEM_LOG_DIRTY_PAGES` (allowed while vCPUs run). Turning it on write-protects every page and
    /// starts with an empty bitmap (with `INITIALLY_SET`, by clearing the bitmap in steps of
    /// [`START_CLEAR_PAGES`] before returning: a write before a page's step is in memory when this
    /// returns, a write after it is logged); turning it off drops the bitmap. A no-op if already in
    /// that state.
    pub fn set_dirty_logging(&self, on: bool) -> anyhow::Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|e| e.into_inner());
        if *logging == on {
            return Ok(());
        }
        self.set_region(if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
            .with_context(|| format!("turning KVM dirty logging {}", if on { "on" } else { "off" }))?;
        *logging = on;
        if on && self.initially_set {
            if let Err(e) = self.clear_all_in_steps() {
                *logging = false;
                if let Err(off) = self.set_region(0) {
                    tracing::warn!("turning KVM dirty logging off after a failed start: {off:#}");
                }
                return Err(e.context("write-protecting guest RAM for dirty logging"));
            }
        }
        Ok(())
    }

    /// Clears every bit of a bitmap `INITIALLY_SET` filled, [`START_CLEAR_PAGES`] pages per call.
    fn clear_all_in_steps(&self) -> anyhow::Result<()> {
        let pages = self.page_count();
        let ones = vec![u64::MAX; (START_CLEAR_PAGES / 64) as usize];
        for first in (0..pages).step_by(START_CLEAR_PAGES as usize) {
            let words = (pages - first).min(START_CLEAR_PAGES).div_ceil(64) as usize;
            self.clear_dirty_log(first, &ones[..words])?;
        }
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG`: the bitmap of pages written since they were last cleared (one bit per
    /// page, bit `i % 64` of word `i / 64`). With manual protection this does not clear anything.
    pub fn get_dirty_log(&self) -> anyhow::Result<Vec<u64>> {
        ensure!(
            !self.ring_mode,
            "KVM_GET_DIRTY_LOG: the VM logs into dirty rings, not the bitmap"
        );
        ensure!(self.dirty_logging(), "KVM_GET_DIRTY_LOG: dirty logging is off");
        let bitmap = self
            .vm_fd
            .get_dirty_log(RAM_SLOT, self.memory.size() as usize)
            .context("KVM_GET_DIRTY_LOG")?;
        Ok(bitmap)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears the bits set in `bitmap` (page `first_page + i` for bit `i`) and
    /// write-protects those pages again, so that the next guest write to them is logged. When this
    /// returns, every later write to those pages sets their bit again.
    ///
    /// `first_page` must be a multiple of 64; the bitmap may extend past the end of memory (those bits
    /// are ignored).
    pub fn clear_dirty_log(&self, first_page: u64, bitmap: &[u64]) -> anyhow::Result<()> {
        let pages = self.page_count();
        ensure!(
            !self.ring_mode,
            "KVM_CLEAR_DIRTY_LOG: the VM logs into dirty rings, not the bitmap"
        );
        ensure!(
            first_page.is_multiple_of(64),
            "KVM_CLEAR_DIRTY_LOG: first page {first_page} is not a multiple of 64"
        );
        ensure!(
            first_page < pages || bitmap.is_empty(),
            "KVM_CLEAR_DIRTY_LOG: first page {first_page} outside memory of {pages} pages"
        );
        if bitmap.is_empty() {
            return Ok(());
        }
        // KVM wants num_pages to be a multiple of 64 unless the range ends at the end of the slot.
        let num_pages = (bitmap.len() as u64 * 64).min(pages - first_page);
        let num_pages = u32::try_from(num_pages).context("KVM_CLEAR_DIRTY_LOG: too many pages")?;
        sys::kvm::clear_dirty_log(&self.vm_fd, RAM_SLOT, first_page, num_pages, bitmap)
            .with_context(|| format!("KVM_CLEAR_DIRTY_LOG of pages [{first_page}, +{num_pages})"))
    }

    /// Raw fd of the VM (for diagnostics).
    pub fn vm_raw_fd(&self) -> i32 {
        self.vm_fd.as_raw_fd()
    }
}

const _: () = assert!(PAGE_SIZE == 4096, "the dirty bitmap has one bit per 4 KiB host page");
