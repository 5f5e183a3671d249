//! KVM dirty rings (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): per-vCPU rings of dirtied guest frames,
//! harvested for a tracker or by a vCPU whose ring is full. `kvm-ioctls` 0.25 does not wrap them; the
//! ring mapping ([`DirtyRingMap`]) and `KVM_RESET_DIRTY_RINGS` are in [`crate::sys::kvm`], this module
//! holds the harvesting protocol and its locking.
//!
//! **Protocol (Documentation/virt/kvm/api.rst, `KVM_CAP_DIRTY_LOG_RING`).** The capability is enabled
//! on the VM with the ring size in bytes *before any vCPU exists*. Each vCPU fd then offers its ring
//! for `mmap` at page offset `KVM_DIRTY_LOG_PAGE_OFFSET` (64): `entries` × `struct kvm_dirty_gfn
//! {u32 flags; u32 slot; u64 offset}`. While a memslot has `KVM_MEM_LOG_DIRTY_PAGES`, KVM pushes one
//! entry (flags `DIRTY`) for the first write to a write-protected page, into the ring of the vCPU that
//! wrote it, and the bitmap ioctls are refused. Userspace harvests from its own fetch index: read
//! `flags` with acquire; while `DIRTY` is set, take `slot`/`offset`, store `RESET` with release, and
//! move on. `KVM_RESET_DIRTY_RINGS` on the VM fd then, for every ring, recycles the entries marked
//! `RESET` (in order, stopping at the first that is not) and write-protects their pages again.
//!
//! **When an entry appears.** Not necessarily when the write does: KVM pushes before a faulting write
//! to a write-protected page is redone, but only after the write for writes it makes itself
//! (`__kvm_write_guest_page` copies, then calls `mark_page_dirty_in_slot`; under kvm-pvm that is every
//! write of emulated guest ring-0 code), and with Intel PML at the next VM exit. It is always in the
//! ring before the vCPU's KVM_RUN returns, so a harvest that must see every write the harvester could
//! already see kicks the vCPUs out first (the tracker does, [`crate::tracking::dirty_ring`]).
//!
//! **Full rings.** A ring has a soft limit (its size minus entries KVM reserves, 64 here plus the CPU's
//! PML buffer on Intel). When a vCPU's ring reaches it, KVM finishes the current exit with room to
//! spare (the reserved entries; the hard limit is never reached, so nothing is dropped) and the next
//! `KVM_RUN` returns `KVM_EXIT_DIRTY_RING_FULL` without entering the guest, again and again, until
//! the ring is harvested and reset. The vCPU thread then calls [`DirtyRings::harvest_vcpu`]: it
//! moves its own ring's entries into a pending set shared with the tracker, resets, and re-enters.
//!
//! **Locking.** One mutex guards every ring's fetch index, the pending set and the reset ioctl, so
//! two harvests never walk one ring at the same time and an entry is never taken twice or skipped.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, ensure, Context};
use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL};
use kvm_ioctls::{VcpuFd, VmFd};

use super::ram::RAM_SLOT;
use crate::page_set::PageSet;
use crate::sys::kvm::{reset_dirty_rings, DirtyRingMap, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET};

/// Entries per vCPU ring when the caller does not choose (64 KiB per vCPU).
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// One vCPU's ring and where its harvest stands.
struct Ring {
    map: DirtyRingMap,
    /// Index of the next entry to harvest (wraps modulo the ring size).
    fetch: u32,
    /// Full-ring exits in a row that found nothing to harvest (see [`DirtyRings::harvest_vcpu`]).
    empty_full_exits: u32,
}

impl Ring {
    /// Moves every harvestable entry into `into`; returns how many.
    fn harvest(&mut self, pages: u64, into: &mut PageSet, strays: &mut u64) -> u32 {
        let mut taken = 0;
        loop {
            let flags = self.map.flags(self.fetch);
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return taken;
            }
            // SAFETY: the acquire load above saw DIRTY; the entry is handed back (RESET stored below,
            // then `KVM_RESET_DIRTY_RINGS` by our caller) only after this read.
            let (slot, offset) = unsafe { self.map.gfn(self.fetch) };
            if slot == RAM_SLOT && offset < pages {
                into.insert(offset);
            } else {
                *strays += 1;
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            taken += 1;
        }
    }
}

struct Harvest {
    rings: Vec<Ring>,
    /// Pages harvested and reset but not yet handed to a tracker.
    pending: PageSet,
    /// Entries for another slot or past the end of RAM (never expected; counted for diagnostics).
    strays: u64,
    /// Times a vCPU found its ring full.
    full_exits: u64,
}

/// The dirty rings of one VM. Shared (`Arc`) between the VM, its vCPU threads and a tracker.
pub struct DirtyRings {
    // Field order: the mappings (in `state`) are unmapped before the VM fd closes.
    state: Mutex<Harvest>,
    /// Entries per ring, as enabled on the VM.
    entries: u32,
    vm_fd: Arc<VmFd>,
    pages: u64,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DirtyRings>();
};

impl DirtyRings {
    /// Enables dirty rings of `entries` entries on a VM that has no vCPU yet (prefers the
    /// acquire/release flavour). Then [`DirtyRings::add_vcpu`] maps each vCPU's ring.
    pub(crate) fn enable(vm_fd: Arc<VmFd>, entries: u32, pages: u64) -> anyhow::Result<Self> {
        ensure!(
            entries.is_power_of_two(),
            "dirty ring: {entries} entries is not a power of two"
        );
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let acq_rel = vm_fd.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
        let plain = vm_fd.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
        let (cap, max) = match (acq_rel, plain) {
            (max, _) if max > 0 => (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, max),
            (_, max) if max > 0 => (KVM_CAP_DIRTY_LOG_RING, max),
            _ => bail!("KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] unsupported)"),
        };
        ensure!(
            bytes <= max as usize,
            "dirty ring of {entries} entries ({bytes} bytes) exceeds KVM's limit of {max} bytes"
        );
        let enable = kvm_enable_cap {
            cap,
            args: [bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        vm_fd
            .enable_cap(&enable)
            .with_context(|| format!("enabling a dirty ring of {entries} entries (cap {cap})"))?;
        Ok(Self {
            state: Mutex::new(Harvest {
                rings: Vec::new(),
                pending: PageSet::new(pages),
                strays: 0,
                full_exits: 0,
            }),
            entries,
            vm_fd,
            pages,
        })
    }

    /// Maps the ring of the next vCPU (vCPUs are added in id order: ring `i` is vCPU `i`'s). `vcpu`
    /// must be a vCPU of the VM this was enabled on (the only caller, `Vm::create_with`, passes the
    /// vCPUs it creates from that VM's fd).
    pub(crate) fn add_vcpu(&self, vcpu: &VcpuFd) -> anyhow::Result<()> {
        // SAFETY: `vcpu` belongs to the VM whose ring `enable` sized to `self.entries` entries (see
        // the doc above), so KVM backs the whole mapping.
        let map = unsafe { DirtyRingMap::new(vcpu, self.entries) }.context("mapping a vCPU's dirty ring")?;
        self.lock().rings.push(Ring {
            map,
            fetch: 0,
            empty_full_exits: 0,
        });
        Ok(())
    }

    /// Entries per ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn lock(&self) -> MutexGuard<'_, Harvest> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by vCPU `vcpu`'s thread on `KVM_EXIT_DIRTY_RING_FULL`: moves its ring into the pending
    /// set and resets it, so that the vCPU can run again. Nothing is lost: the tracker's next
    /// `take` returns these pages.
    ///
    /// Fails if the ring overflowed: KVM then keeps reporting it full although every entry was
    /// harvested and reset (its indices are more than a ring apart, entries were overwritten and
    /// their pages lost; the kernel warns "kvm_dirty_ring_push"). kvm-pvm does that when it emulates
    /// guest code: it runs up to 1024 instructions per batch without honouring the soft limit, so a
    /// batch that dirties more pages than the 64 reserved entries overruns the ring. One empty
    /// harvest is normal (the tracker may have just harvested the ring); two in a row are not.
    pub fn harvest_vcpu(&self, vcpu: usize) -> anyhow::Result<()> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.full_exits += 1;
        let ring = state
            .rings
            .get_mut(vcpu)
            .with_context(|| format!("dirty ring of vCPU {vcpu} not mapped"))?;
        let taken = ring.harvest(self.pages, &mut state.pending, &mut state.strays);
        ring.empty_full_exits = if taken == 0 { ring.empty_full_exits + 1 } else { 0 };
        if ring.empty_full_exits >= 2 {
            bail!(
                "the dirty ring of vCPU {vcpu} overflowed ({} entries): KVM pushed past its hard limit and \
                 dirtied pages were lost (kvm-pvm's emulator ignores the soft limit; use a bigger ring or \
                 another tracker)",
                ring.map.entries()
            );
        }
        self.reset()
    }

    /// Harvests every ring, resets them (re-protecting the pages), and returns every page harvested
    /// since the previous call (including by full vCPUs). When this returns, every returned page is
    /// write-protected again, so a later guest write to it makes a new entry.
    pub fn take(&self) -> anyhow::Result<PageSet> {
        let mut guard = self.lock();
        let state = &mut *guard;
        for ring in &mut state.rings {
            ring.harvest(self.pages, &mut state.pending, &mut state.strays);
        }
        self.reset()?;
        if state.strays > 0 {
            tracing::warn!(
                strays = state.strays,
                "dirty ring entries outside the RAM slot were ignored"
            );
            state.strays = 0;
        }
        Ok(std::mem::replace(&mut state.pending, PageSet::new(self.pages)))
    }

    /// How many times a vCPU found its ring full so far.
    pub fn full_exits(&self) -> u64 {
        self.lock().full_exits
    }

    /// `KVM_RESET_DIRTY_RINGS` (call with the lock held, after marking entries RESET).
    fn reset(&self) -> anyhow::Result<()> {
        reset_dirty_rings(&self.vm_fd).context("KVM_RESET_DIRTY_RINGS")?;
        Ok(())
    }
}
