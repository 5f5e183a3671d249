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
//! (see [`DirtyTracker::collect`]). The KVM trackers see guest writes only; uffd-wp sees every write
//! through the VMM's mapping (guest and VMM alike).
//!
//! The KVM dirty log and the dirty ring exclude each other: a VM is created in one mode or the other
//! ([`crate::vm::VmOptions`]), and [`TrackerKind::vm_options`] says which a tracker needs.

pub mod dirty_log;
pub mod dirty_ring;
pub mod ebpf;
pub mod uapi;
pub mod uffd_wp;

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

use crate::vm::{Vm, VmOptions};

/// A set of guest page indices, kept as a bitmap (bit `i` of word `i / 64` is page `i`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every one of `pages` pages.
    pub fn all(pages: u64) -> Self {
        let mut set = Self::new(pages);
        for page in 0..pages {
            set.insert(page);
        }
        set
    }

    /// A set from a KVM-style bitmap (`words` may be longer than needed; bits past `pages` are ignored).
    pub fn from_bitmap(words: Vec<u64>, pages: u64) -> Self {
        let mut set = Self { words, pages };
        set.words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = set.words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        set
    }

    /// Number of pages the set ranges over.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn insert(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} outside a set of {} pages", self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn remove(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    /// Adds pages `range.start..range.end`.
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) {
        for page in range {
            self.insert(page);
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Adds every page of `other` (same capacity) to this set.
    pub fn union_with(&mut self, other: &DirtyPages) {
        assert_eq!(self.pages, other.pages, "dirty sets over different memory sizes");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Page indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }
}

impl fmt::Debug for DirtyPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtyPages({} of {})", self.count(), self.pages)
    }
}

/// Which kernel facility a tracker uses. The names are the CLI's `--tracker` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// KVM dirty bitmap with manual clear (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`).
    #[default]
    DirtyLog,
    /// KVM per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`); the VM must be created in ring mode.
    DirtyRing,
    /// userfaultfd async write-protect of the VMM's guest-RAM mapping, read with `PAGEMAP_SCAN`.
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
                dirty_ring_entries: Some(crate::vm::dirty_ring::DEFAULT_RING_ENTRIES),
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
    fn collect(&mut self) -> anyhow::Result<DirtyPages>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trip_and_iteration() {
        let mut set = DirtyPages::new(130);
        for page in [0, 63, 64, 129] {
            set.insert(page);
        }
        assert_eq!(set.count(), 4);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert!(set.contains(64) && !set.contains(65) && !set.contains(500));
        let copy = DirtyPages::from_bitmap(set.words().to_vec(), 130);
        assert_eq!(copy, set);
    }

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
        ring.set_dirty_logging(true).unwrap();
        let err = format!("{:#}", ring.get_dirty_log().unwrap_err());
        assert!(err.contains("dirty rings, not the bitmap"), "{err}");
        ring.set_dirty_logging(false).unwrap();
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

    #[test]
    fn from_bitmap_ignores_bits_past_the_end() {
        let set = DirtyPages::from_bitmap(vec![u64::MAX, u64::MAX, u64::MAX], 70);
        assert_eq!(set.count(), 70);
        assert_eq!(DirtyPages::all(70), set);
    }
}
