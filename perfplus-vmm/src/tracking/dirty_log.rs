//! The KVM dirty-log tracker: dirty bitmap with manual clear (`KVM_GET_DIRTY_LOG` +
//! `KVM_CLEAR_DIRTY_LOG`, `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
//!
//! Creating the tracker turns dirty logging on for the VM's RAM slot: every page write-protected, the
//! bitmap empty (with `KVM_DIRTY_LOG_INITIALLY_SET`, by clearing the bitmap a few thousand pages at a
//! time, so that a guest that faults meanwhile is never held for the whole memory: see
//! [`RamSlot::set_dirty_logging`]). Each [`DirtyTracker::collect`]:
//! 1. `KVM_GET_DIRTY_LOG` reads the bitmap (with manual protection this changes nothing);
//! 2. `KVM_CLEAR_DIRTY_LOG` with *exactly those bits* clears them and write-protects those pages again;
//! 3. returns the pages.
//!
//! **Ordering guarantee.** Re-protection happens before `collect` returns, hence before the caller
//! reads any returned page. A guest write that lands after the clear is logged again and reported by
//! the next `collect`; a write that landed before it is in the memory the caller is about to read. So a
//! caller that reads every returned page after `collect` never misses a write: the page content it reads
//! is at least as new as the write that dirtied it, and anything newer is reported again. (A write
//! between step 1 and step 2 to a page whose bit was already set is covered by the same reasoning;
//! one to a page whose bit was not set keeps its bit, as step 2 only clears the bits of step 1.)
//!
//! Pages may be reported although their content did not change (under kvm-pvm some pages the guest only
//! read are logged): "dirty" is not "changed". Dropping the tracker turns dirty logging off.
use std::sync::Arc;

use anyhow::Context;

use super::{DirtyTracker, TrackerKind};
use crate::page_set::PageSet;
use crate::vm::{RamSlot, Vm};

/// Words of the bitmap cleared per `KVM_CLEAR_DIRTY_LOG` call when skipping clean stretches.
const CLEAR_CHUNK_WORDS: usize = 64;

/// Dirty tracking through KVM's dirty bitmap. `Send`: it holds the VM's RAM slot, not the VM.
pub struct DirtyLogTracker {
    ram: Arc<RamSlot>,
}

impl DirtyLogTracker {
    /// Starts tracking `vm`'s RAM (turns dirty logging on).
    pub fn new(vm: &Vm) -> anyhow::Result<Self> {
        Self::from_slot(vm.ram_slot().clone())
    }

    /// Starts tracking the RAM slot (turns dirty logging on).
    pub fn from_slot(ram: Arc<RamSlot>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !ram.ring_mode(),
            "the VM was created with a dirty ring, which excludes the dirty bitmap (use the dirty-ring tracker)"
        );
        anyhow::ensure!(
            !ram.dirty_logging(),
            "dirty logging is already on for this VM (another tracker?)"
        );
        ram.set_dirty_logging(true).context("starting the dirty-log tracker")?;
        Ok(Self { ram })
    }
}

impl DirtyTracker for DirtyLogTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::DirtyLog
    }

    fn collect(&mut self) -> anyhow::Result<PageSet> {
        let bitmap = self.ram.get_dirty_log()?;
        // Clear (and re-protect) exactly the bits we read, in chunks that skip all-clean stretches.
        for (chunk_index, chunk) in bitmap.chunks(CLEAR_CHUNK_WORDS).enumerate() {
            if chunk.iter().all(|&w| w == 0) {
                continue;
            }
            let first_page = (chunk_index * CLEAR_CHUNK_WORDS * 64) as u64;
            self.ram.clear_dirty_log(first_page, chunk)?;
        }
        Ok(PageSet::from_bitmap(bitmap, self.ram.page_count()))
    }
}

impl Drop for DirtyLogTracker {
    fn drop(&mut self) {
        if let Err(e) = self.ram.set_dirty_logging(false) {
            tracing::warn!("stopping the dirty-log tracker: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn tracker_is_send() {
        assert_send::<DirtyLogTracker>();
    }

    #[test]
    fn host_writes_are_not_logged_and_logging_toggles() {
        // Writes by the VMM through its own mapping are not guest writes; KVM does not log them.
        let vm = Vm::create("dirty-idle", 16 << 20, 1).unwrap();
        let mut tracker = DirtyLogTracker::new(&vm).unwrap();
        assert!(DirtyLogTracker::new(&vm).is_err(), "a second tracker is refused");
        vm.memory().write(0x20_0000, &[1; 64]).unwrap();
        let dirty = tracker.collect().unwrap();
        assert_eq!(dirty.capacity(), 4096);
        assert!(dirty.is_empty(), "{dirty:?}");
        drop(tracker);
        assert!(!vm.ram_slot().dirty_logging());
        assert!(vm.ram_slot().get_dirty_log().is_err());
    }
}
