//! [`PageSet`]: a set of guest page indices as a bitmap (bit `i % 64` of word `i / 64` is page `i`).
//!
//! The one page-set type of the project: what a tracker reports written, the holes of a memory, the pages
//! a post-copy destination still lacks.
use std::fmt;

/// A set of guest page indices, kept as a bitmap (bit `i` of word `i / 64` is page `i`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
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
    pub fn union_with(&mut self, other: &PageSet) {
        assert_eq!(self.pages, other.pages, "page sets over different memory sizes");
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

impl fmt::Debug for PageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageSet({} of {})", self.count(), self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trip_and_iteration() {
        let mut set = PageSet::new(130);
        for page in [0, 63, 64, 129] {
            set.insert(page);
        }
        assert_eq!(set.count(), 4);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert!(set.contains(64) && !set.contains(65) && !set.contains(500));
        let copy = PageSet::from_bitmap(set.words().to_vec(), 130);
        assert_eq!(copy, set);
    }

    #[test]
    fn from_bitmap_ignores_bits_past_the_end() {
        let set = PageSet::from_bitmap(vec![u64::MAX, u64::MAX, u64::MAX], 70);
        assert_eq!(set.count(), 70);
        assert_eq!(PageSet::all(70), set);
    }
}
