//! Dirty-page tracking: which guest pages were written since the last look.
//!
//! Every tracker implements [`DirtyTracker`]; the pre-copy engine only ever sees that trait and gets
//! one from [`start`]. Implementations:
//!
//! | kind | module | how | cost of one `collect` grows with |
//! |---|---|---|---|
//! | `dirty-log` | [`dirty_log`] | KVM dirty bitmap, manual clear | guest memory (bitmap size; small: 0.05 → 0.13 ms from 1 to 16 GiB) |
//! | `dirty-ring` | [`dirty_ring`] | KVM per-vCPU dirty rings (VM created in ring mode) | dirty pages |
//! | `uffd-wp` | [`uffd_wp`] | userfaultfd async write-protect + `PAGEMAP_SCAN` | the tracked range (`PAGEMAP_SCAN` walk, ~1 ms/GiB here) plus dirty pages |
//!
//! All three re-arm tracking of a page before `collect` returns it (each module says how), so a
//! caller that reads the returned pages after `collect` never misses a write. All may over-report
//! (see [`DirtyTracker::collect`]). All three see guest writes only: the KVM trackers by
//! construction, uffd-wp because it tracks guest RAM's guest view, and the VMM writes through its
//! own view ([`crate::memory`]).
//!
//! The KVM dirty log and the dirty ring exclude each other: a VM is created in one mode or the other
//! ([`crate::vm::VmOptions`]), and [`TrackerKind::vm_options`] says which a tracker needs.

pub mod dirty_log;
pub mod dirty_ring;
pub mod uffd_wp;

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

use crate::page_set::PageSet;
use crate::vm::{Vm, VmOptions};

/// Which kernel facility a tracker uses. The names are the CLI's `--tracker` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// KVM dirty bitmap with manual clear (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`).
    #[default]
    DirtyLog,
    /// KVM per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`); the VM must be created in ring mode.
    DirtyRing,
    /// userfaultfd async write-protect of guest RAM's guest view, read with `PAGEMAP_SCAN`.
    UffdWp,
}

impl TrackerKind {
    /// Every kind, in CLI order.
    pub const ALL: [TrackerKind; 3] = [TrackerKind::DirtyLog, TrackerKind::DirtyRing, TrackerKind::UffdWp];

    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::DirtyLog => "dirty-log",
            TrackerKind::DirtyRing => "dirty-ring",
            TrackerKind::UffdWp => "uffd-wp",
        }
    }

    /// How a VM must be created for this tracker to work on it.
    pub fn vm_options(self) -> VmOptions {
        match self {
            TrackerKind::DirtyRing => VmOptions {
                dirty_ring_entries: Some(crate::vm::vcpu_rings::DEFAULT_RING_ENTRIES),
            },
            TrackerKind::DirtyLog | TrackerKind::UffdWp => VmOptions::default(),
        }
    }

    /// Fails with an error that says what to do if `vm` was not created in the mode this tracker
    /// needs.
    pub fn check_vm(self, vm: &Vm) -> anyhow::Result<()> {
        let ring = vm.dirty_rings().is_some();
        match self {
            TrackerKind::DirtyRing if !ring => bail!(
                "VM {} was started without a dirty ring; start it with --tracker dirty-ring",
                vm.name()
            ),
            TrackerKind::DirtyLog if ring => bail!(
                "VM {} was started with a dirty ring, which excludes the dirty bitmap; \
                 use --tracker dirty-ring (or uffd-wp), or start it with --tracker dirty-log",
                vm.name()
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TrackerKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown tracker {text:?} (known: {})", names.join(", "))
        })
    }
}

/// Starts a tracker of `kind` on `vm` (tracking starts now), or says why the VM does not allow it.
pub fn start(kind: TrackerKind, vm: &Vm) -> anyhow::Result<Box<dyn DirtyTracker>> {
    kind.check_vm(vm)?;
    Ok(match kind {
        TrackerKind::DirtyLog => Box::new(dirty_log::DirtyLogTracker::new(vm)?),
        TrackerKind::DirtyRing => Box::new(dirty_ring::DirtyRingTracker::new(vm)?),
        TrackerKind::UffdWp => Box::new(uffd_wp::UffdWpTracker::new(vm)?),
    })
}

/// A source of "which pages were written".
///
/// Tracking starts when the tracker is created (every page written after that is reported once) and stops
/// when it is dropped, leaving the guest as it was.
pub trait DirtyTracker: Send {
    fn kind(&self) -> TrackerKind;

    /// The pages written since the previous call (or since the tracker was created), re-arming tracking
    /// for them so that a later write is reported by the next call. A page may be reported although its
    /// content did not change (e.g. KVM under kvm-pvm logs some pages that were only read): callers
    /// must not take "dirty" for "changed".
    fn collect(&mut self) -> anyhow::Result<PageSet>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_names_round_trip() {
        for kind in TrackerKind::ALL {
            assert_eq!(kind.name().parse::<TrackerKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
        let err = "soft-dirty".parse::<TrackerKind>().unwrap_err();
        assert!(err.contains("dirty-log, dirty-ring, uffd-wp"), "{err}");
    }

    #[test]
    fn start_says_which_mode_a_vm_needs() {
        let bitmap = Vm::create("web1", 16 << 20, 1).unwrap();
        let err = start(TrackerKind::DirtyRing, &bitmap).err().unwrap().to_string();
        assert_eq!(
            err,
            "VM web1 was started without a dirty ring; start it with --tracker dirty-ring"
        );
        let ring = Vm::create_with("web2", 16 << 20, 1, TrackerKind::DirtyRing.vm_options()).unwrap();
        let err = start(TrackerKind::DirtyLog, &ring).err().unwrap().to_string();
        assert!(err.contains("started with a dirty ring"), "{err}");
        // The bitmap calls are refused in ring mode with a clear error, even past the factory.
        ring.ram_slot().set_dirty_logging(true).unwrap();
        let err = format!("{:#}", ring.ram_slot().get_dirty_log().unwrap_err());
        assert!(err.contains("dirty rings, not the bitmap"), "{err}");
        ring.ram_slot().set_dirty_logging(false).unwrap();
        // uffd-wp works on either; each factory result reports its kind.
        for (kind, vm) in [
            (TrackerKind::DirtyLog, &bitmap),
            (TrackerKind::UffdWp, &bitmap),
            (TrackerKind::DirtyRing, &ring),
            (TrackerKind::UffdWp, &ring),
        ] {
            let tracker = start(kind, vm).unwrap();
            assert_eq!(tracker.kind(), kind);
        }
    }
}
