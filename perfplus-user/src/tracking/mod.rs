//! Dirty-page tracking: which guest pages were written since the last look.
//!
//! Every tracker implements [`DirtyTracker`]; the pre-copy engine only ever sees that trait. The KVM dirty
//! log (bitmap, manual clear) is the first implementation; the dirty ring, userfaultfd write-protect and
//! eBPF write-heat sources plug in behind the same interface.

pub mod dirty_log;
pub mod ebpf;

use std::fmt;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// KVM dirty bitmap with manual clear (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`).
    DirtyLog,
}

impl TrackerKind {
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::DirtyLog => "dirty-log",
        }
    }
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
    fn from_bitmap_ignores_bits_past_the_end() {
        let set = DirtyPages::from_bitmap(vec![u64::MAX, u64::MAX, u64::MAX], 70);
        assert_eq!(set.count(), 70);
        assert_eq!(DirtyPages::all(70), set);
    }
}
