//! The KVM dirty-ring tracker: per-vCPU rings of dirtied frames (`KVM_CAP_DIRTY_LOG_RING`), for VMs
//! created in ring mode ([`crate::vm::VmOptions::dirty_ring_entries`]; the rings themselves, their
//! harvesting and the full-ring handling of the vCPU threads are in [`crate::vm::vcpu_rings`], their
//! mapping and `KVM_RESET_DIRTY_RINGS` in [`crate::sys::kvm`]).
//!
//! Creating the tracker drops whatever the rings hold from an earlier tracker, then turns dirty logging
//! on for the RAM slot (`KVM_MEM_LOG_DIRTY_PAGES`): KVM write-protects every page, and the first guest
//! write to a page pushes one entry into the writing vCPU's ring. Each [`DirtyTracker::collect`]:
//! 1. kicks every running vCPU out of KVM_RUN and waits until each has come out
//!    ([`VcpuKicker::kick_and_wait`]; the vCPUs go on running at once);
//! 2. harvests every vCPU's ring from its fetch index (acquire-load of `flags`, take the frame, store
//!    `RESET` with release), into the pending set where full vCPUs already put theirs;
//! 3. `KVM_RESET_DIRTY_RINGS`: KVM recycles the harvested entries and write-protects their pages;
//! 4. hands out the pending set and starts an empty one.
//!
//! Steps 2 to 4 run under one lock that the vCPU threads take too when their ring is full, so a ring
//! is never harvested twice at once and the pending set never loses an entry. Step 1 runs before that
//! lock (a vCPU may need it to come out).
//!
//! **Why step 1.** An entry is not always in the ring when the write is in memory. A write to a
//! write-protected page faults, and KVM pushes the entry before the write is redone; but KVM pushes
//! only *after* the write for the writes it makes itself (`__kvm_write_guest_page`: copy, then
//! `mark_page_dirty_in_slot`), which under kvm-pvm include every write of guest ring-0 code (it is
//! emulated), and with Intel PML the entries of unprotected writes wait in the CPU's PML buffer until
//! the next VM exit. Both are done before KVM_RUN returns, so once every vCPU has left KVM_RUN after
//! the caller's look at guest memory, every write the caller could see is in a ring. Without step 1 a
//! collect could miss a write the caller had already seen (measured: the page of the last write of a
//! round came one collect late in about 1 % of rounds when collects ran back to back); QEMU kicks
//! its vCPUs synchronously for the same reason before it reaps the rings (`kvm_dirty_ring_flush`).
//!
//! **Ordering guarantee.** A guest write the caller could see before it called `collect` has its page
//! in the returned set (step 1), unless an earlier `collect` returned the page and re-protected it
//! after that write (then the caller's read after that `collect` saw the write). Every returned page was
//! write-protected again (step 3, or the full vCPU's own reset) before `collect` returns, hence before
//! the caller reads it. A guest write after the re-protection pushes a new entry and is reported by the
//! next `collect`; a write before it is in the memory the caller is about to read. An entry pushed
//! after step 2 passed its ring stays `DIRTY`, so step 3 (which stops at the first entry that is not
//! `RESET`) leaves it and its page for the next `collect`.
//!
//! Cost: one exit per running vCPU (tens of microseconds, on the vCPU's time too), then proportional
//! to the entries harvested (dirty pages), not to memory size, except for the fresh [`PageSet`]
//! bitmap (memory / 32 KiB bytes). Dropping the tracker turns dirty logging off.
use std::sync::Arc;

use anyhow::Context;

use super::{DirtyTracker, TrackerKind};
use crate::page_set::PageSet;
use crate::vm::{DirtyRings, RamSlot, VcpuKicker, Vm};

/// Dirty tracking through a VM's KVM dirty rings.
pub struct DirtyRingTracker {
    rings: Arc<DirtyRings>,
    ram: Arc<RamSlot>,
    vcpus: VcpuKicker,
}

impl DirtyRingTracker {
    /// Starts tracking `vm`'s RAM. Fails if the VM has no dirty rings.
    pub fn new(vm: &Vm) -> anyhow::Result<Self> {
        let rings = vm.dirty_rings().cloned().with_context(|| {
            format!(
                "VM {} was started without a dirty ring; start it with --tracker dirty-ring",
                vm.name()
            )
        })?;
        let ram = vm.ram_slot().clone();
        anyhow::ensure!(
            !ram.dirty_logging(),
            "VM {}: dirty logging is already on (another tracker?)",
            vm.name()
        );
        // Entries left from an earlier tracker are not writes since now: drop them while logging is
        // off (nothing new can arrive), then start.
        rings.take().context("draining the dirty rings")?;
        ram.set_dirty_logging(true).context("starting the dirty-ring tracker")?;
        Ok(Self {
            rings,
            ram,
            vcpus: vm.vcpu_kicker(),
        })
    }

    /// How many times a vCPU found its ring full (and harvested it itself) so far.
    pub fn full_exits(&self) -> u64 {
        self.rings.full_exits()
    }
}

impl DirtyTracker for DirtyRingTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::DirtyRing
    }

    fn collect(&mut self) -> anyhow::Result<PageSet> {
        // Not under the rings' lock: a vCPU whose ring is full takes it before it can come out.
        self.vcpus
            .kick_and_wait()
            .context("kicking the vCPUs out of KVM_RUN before harvesting their dirty rings")?;
        self.rings.take().context("harvesting the dirty rings")
    }
}

impl Drop for DirtyRingTracker {
    fn drop(&mut self) {
        if let Err(e) = self.ram.set_dirty_logging(false) {
            tracing::warn!("stopping the dirty-ring tracker: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn tracker_is_send() {
        assert_send::<DirtyRingTracker>();
    }

    #[test]
    fn host_writes_are_not_in_the_ring_and_logging_toggles() {
        let vm = Vm::create_with("ring-idle", 16 << 20, 2, TrackerKind::DirtyRing.vm_options()).unwrap();
        assert_eq!(vm.dirty_rings().unwrap().entries(), 4096);
        let mut tracker = DirtyRingTracker::new(&vm).unwrap();
        assert!(DirtyRingTracker::new(&vm).is_err(), "a second tracker is refused");
        vm.memory().write(0x20_0000, &[1; 64]).unwrap();
        let dirty = tracker.collect().unwrap();
        assert_eq!(dirty.capacity(), 4096);
        assert!(dirty.is_empty(), "{dirty:?}");
        drop(tracker);
        assert!(!vm.ram_slot().dirty_logging());
    }

    #[test]
    fn ring_sizes_are_checked() {
        let options = |n| crate::vm::VmOptions {
            dirty_ring_entries: Some(n),
        };
        let err = format!(
            "{:#}",
            Vm::create_with("ring-bad", 16 << 20, 1, options(1000)).err().unwrap()
        );
        assert!(err.contains("not a power of two"), "{err}");
        let err = format!(
            "{:#}",
            Vm::create_with("ring-big", 16 << 20, 1, options(1 << 30))
                .err()
                .unwrap()
        );
        assert!(err.contains("exceeds KVM's limit"), "{err}");
    }
}
