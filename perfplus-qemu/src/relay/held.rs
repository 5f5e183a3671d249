//! What the destination agent holds to resolve references, and the source's mirror of it.

use std::collections::HashMap;

use crate::stream::Digest;

/// Pages by digest, filled by one rule both sides apply to the same pages in the same order: a full
/// page is kept if its digest is new and fewer than `max` pages are kept. The source keeps `()`
/// (it only needs to know), the destination the page itself.
pub struct Held<V> {
    pages: HashMap<Digest, V>,
    max: usize,
}

impl<V> Held<V> {
    pub fn new(max: usize) -> Held<V> {
        Held {
            pages: HashMap::new(),
            max,
        }
    }

    /// A full page passed through: keep it, by the rule. `make` builds the value only if it is kept.
    pub fn offer(&mut self, digest: Digest, make: impl FnOnce() -> V) {
        if self.pages.len() < self.max && !self.pages.contains_key(&digest) {
            self.pages.insert(digest, make());
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<&V> {
        self.pages.get(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.pages.contains_key(digest)
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}
