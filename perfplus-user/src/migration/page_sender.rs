//! The Perf+ decision for each dirty page: send it in full, as a zero marker, as a reference to content
//! the destination holds, or not at all because its content did not change since it was last sent.
//!
//! The sender keeps, per page, the keyed digest of what the destination has at that page. The
//! destination's memory starts all zero, so every page starts with the zero page's digest. It also keeps
//! the set of digest prefixes the destination holds: what it advertised at the start plus everything
//! sent in this migration. The prefix is a hint: a reference the destination cannot resolve comes back
//! as "missing" and is sent again in full, so a prefix collision costs a page, never correctness.
//!
//! With hashing off (`--no-hashing`, the baseline Perf+ is compared against) no page is hashed, so
//! nothing is found unchanged or held, and every non-zero page goes in full; zero pages are still found
//! (a cheap scan, no digest) and go as zero markers, or not at all where the destination's page is
//! zero already, as with hashing on: the on/off comparison then measures what hashing adds, not zero
//! detection too. The sender then tracks only which destination pages are known to be zero.
//!
//! Pages read in bulk are inspected together ([`PageSender::inspect_many`]): the digests of a batch
//! are computed several pages at once ([`PageHasher::digest_many`]).

use perfplus_common::PAGE_SIZE;
use std::borrow::Borrow;

use crate::hashing::{digest_prefix, is_zero_page, PageDigest, PageHasher, PrefixSet};
use perfplus_protocol::frame::PageBatch;

/// What a page holds, as far as the decision is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Hashing is off and the page is not zero: no digest was taken.
    NotInspected,
    Zero,
    Digest(PageDigest),
}

/// What was decided for one page. A round report counts them as `sent_pages`, `skipped_zero`,
/// `skipped_held` and `skipped_unchanged`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageDecision {
    /// Sent with its content (every non-zero page, with hashing off).
    Full,
    /// Zero: a marker was sent, or nothing if the destination's page is zero already.
    Zero,
    /// Sent as a reference to content the destination holds.
    Held,
    /// Same content as the destination has at that page: nothing sent.
    Unchanged,
}

pub struct PageSender {
    hashing: bool,
    hasher: PageHasher,
    zero_digest: PageDigest,
    /// Digest of what the destination has at each page ([`UNKNOWN`] if not known; with hashing off,
    /// only the zero digest or [`UNKNOWN`]).
    at_destination: Vec<PageDigest>,
    /// Digest prefixes of content the destination holds somewhere.
    held: PrefixSet,
    /// What the destination advertised at the start (outside this migration's pages).
    advertised: Vec<u64>,
}

/// How many pages a caller reading pages one by one reads before inspecting them together
/// ([`PageSender::inspect_many`]): a few multiples of the hasher's eight lanes, 128 KiB, which stays in
/// the core's L2 cache between the read and the hash.
pub const INSPECT_PAGES: usize = 32;

/// What `at_destination` holds for a page whose content at the destination is not known.
const UNKNOWN: PageDigest = [0; 16];

impl PageSender {
    /// `hashing` off makes every non-zero page a full send (the baseline; see the module docs). `held`
    /// is what the destination advertised.
    pub fn new(hashing: bool, hasher: PageHasher, pages: u64, held: Vec<u64>) -> Self {
        let zero_digest = hasher.digest(&[0u8; PAGE_SIZE]);
        Self {
            hashing,
            hasher,
            zero_digest,
            at_destination: vec![zero_digest; pages as usize],
            held: held.iter().copied().collect(),
            advertised: held,
        }
    }

    /// What `data` holds, as the decision needs it: the part of [`PageSender::add`] that may run on
    /// another thread.
    pub fn inspect(&self, data: &[u8; PAGE_SIZE]) -> Content {
        if is_zero_page(data) {
            Content::Zero
        } else if !self.hashing {
            Content::NotInspected
        } else {
            Content::Digest(self.hasher.digest(data))
        }
    }

    /// [`PageSender::inspect`] of each of `pages`, in order, hashing the non-zero ones together (several
    /// at once: [`PageHasher::digest_many`]). Cheaper per page than `inspect` from about two pages on.
    pub fn inspect_many<P: Borrow<[u8; PAGE_SIZE]>>(&self, pages: &[P]) -> Vec<Content> {
        let mut contents: Vec<Content> = pages
            .iter()
            .map(|p| {
                if is_zero_page(p.borrow()) {
                    Content::Zero
                } else {
                    Content::NotInspected
                }
            })
            .collect();
        if self.hashing {
            let to_hash: Vec<&[u8; PAGE_SIZE]> = pages
                .iter()
                .zip(&contents)
                .filter(|(_, c)| **c == Content::NotInspected)
                .map(|(p, _)| p.borrow())
                .collect();
            let digests = self.hasher.digest_many(&to_hash);
            let unhashed = contents.iter_mut().filter(|c| **c == Content::NotInspected);
            for (content, digest) in unhashed.zip(digests) {
                *content = Content::Digest(digest);
            }
        }
        contents
    }

    /// Decides how to send `page` whose current content is `data`, appends the item to `batch` (nothing
    /// for an unchanged page) and returns the decision (the caller counts it).
    pub fn add(&mut self, page: u64, data: &[u8; PAGE_SIZE], batch: &mut PageBatch) -> PageDecision {
        let content = self.inspect(data);
        self.add_inspected(page, data, content, batch)
    }

    /// [`PageSender::add`] with the content already inspected (by [`PageSender::inspect`]).
    pub fn add_inspected(
        &mut self,
        page: u64,
        data: &[u8; PAGE_SIZE],
        content: Content,
        batch: &mut PageBatch,
    ) -> PageDecision {
        let slot = page as usize;
        let digest = match content {
            Content::NotInspected => {
                self.at_destination[slot] = UNKNOWN;
                batch.push_full(page, &UNKNOWN, data);
                return PageDecision::Full;
            }
            Content::Zero => return self.add_known_zero(page, batch),
            Content::Digest(digest) => digest,
        };
        if self.at_destination[slot] == digest {
            return PageDecision::Unchanged;
        }
        self.at_destination[slot] = digest;
        if self.held.contains(&digest_prefix(&digest)) {
            batch.push_ref(page, &digest);
            PageDecision::Held
        } else {
            batch.push_full(page, &digest, data);
            self.held.insert(digest_prefix(&digest));
            PageDecision::Full
        }
    }

    /// Decides for `page`, known to be zero without reading it (a hole of guest memory), as for a zero
    /// page.
    pub fn add_known_zero(&mut self, page: u64, batch: &mut PageBatch) -> PageDecision {
        if self.at_destination[page as usize] != self.zero_digest {
            batch.push_zero(page);
            self.at_destination[page as usize] = self.zero_digest;
        }
        PageDecision::Zero
    }

    /// Sends `page` in full whatever the destination is thought to hold: the answer to a reference the
    /// destination could not resolve.
    pub fn add_full(&mut self, page: u64, data: &[u8; PAGE_SIZE], batch: &mut PageBatch) {
        let digest = if self.hashing {
            self.hasher.digest(data)
        } else {
            UNKNOWN
        };
        self.at_destination[page as usize] = digest;
        if self.hashing {
            self.held.insert(digest_prefix(&digest));
        }
        batch.push_full(page, &digest, data);
    }

    /// The destination no longer has anything at `page` (post-copy dropped it): the next `add` sends it
    /// whatever its content (a zero page as a zero marker).
    pub fn forget(&mut self, page: u64) {
        self.at_destination[page as usize] = UNKNOWN;
    }

    /// Recomputes what the destination holds after pages were dropped there (post-copy switch): what
    /// it advertised, plus the content of the pages it still has. References then point at content the
    /// destination can resolve without asking back.
    pub fn rebuild_held(&mut self) {
        // About as many prefixes as before the pages were dropped.
        self.held = PrefixSet::with_capacity_and_hasher(self.held.len(), Default::default());
        self.held.extend(self.advertised.iter().copied());
        for d in &self.at_destination {
            if *d != UNKNOWN {
                self.held.insert(digest_prefix(d));
            }
        }
    }

    /// Digest of what the destination has at each page (meaningful with hashing on).
    pub fn destination_digests(&self) -> &[PageDigest] {
        &self.at_destination
    }

    pub fn zero_digest(&self) -> &PageDigest {
        &self.zero_digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perfplus_protocol::frame::PageItem;

    fn page(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    fn kinds(batch: &PageBatch) -> Vec<String> {
        batch
            .iter()
            .map(|item| match item.expect("valid item") {
                PageItem::Full { page, .. } => format!("full {page}"),
                PageItem::Zero { page } => format!("zero {page}"),
                PageItem::Ref { page, .. } => format!("ref {page}"),
            })
            .collect()
    }

    #[test]
    fn hashing_skips_unchanged_zero_and_held_pages() {
        let hasher = PageHasher::new(&[7; 32]);
        let held_elsewhere = digest_prefix(&hasher.digest(&page(9)));
        let mut sender = PageSender::new(true, hasher, 8, vec![held_elsewhere]);
        let mut batch = PageBatch::with_capacity(8);

        assert_eq!(sender.add(0, &page(1), &mut batch), PageDecision::Full);
        assert_eq!(
            sender.add(1, &page(1), &mut batch),
            PageDecision::Held,
            "same content as page 0"
        );
        assert_eq!(sender.add(2, &page(0), &mut batch), PageDecision::Zero);
        assert_eq!(sender.add(3, &page(9), &mut batch), PageDecision::Held, "advertised");
        assert_eq!(sender.add(0, &page(1), &mut batch), PageDecision::Unchanged);
        assert_eq!(
            kinds(&batch),
            ["full 0", "ref 1", "ref 3"],
            "a zero page the destination has needs no marker"
        );

        // Page 0 becomes zero: now a marker is needed.
        batch.clear();
        assert_eq!(sender.add(0, &page(0), &mut batch), PageDecision::Zero);
        assert_eq!(kinds(&batch), ["zero 0"]);
    }

    #[test]
    fn without_hashing_every_non_zero_page_is_sent_in_full_and_zero_pages_as_markers() {
        let hasher = PageHasher::new(&[7; 32]);
        let advertised = digest_prefix(&hasher.digest(&page(9)));
        let mut sender = PageSender::new(false, hasher, 8, vec![advertised]);
        let mut batch = PageBatch::with_capacity(16);
        assert_eq!(sender.add(0, &page(1), &mut batch), PageDecision::Full);
        assert_eq!(sender.add(1, &page(1), &mut batch), PageDecision::Full, "no references");
        assert_eq!(
            sender.add(2, &page(9), &mut batch),
            PageDecision::Full,
            "nothing is held"
        );
        assert_eq!(
            sender.add(0, &page(1), &mut batch),
            PageDecision::Full,
            "no unchanged pages"
        );
        assert_eq!(
            sender.add(3, &page(0), &mut batch),
            PageDecision::Zero,
            "the destination's page is zero already: nothing to send"
        );
        assert_eq!(sender.add_known_zero(4, &mut batch), PageDecision::Zero);
        assert_eq!(kinds(&batch), ["full 0", "full 1", "full 2", "full 0"]);
        assert!(
            batch.iter().all(|item| match item.unwrap() {
                PageItem::Full { digest, .. } => *digest == [0; 16],
                _ => true,
            }),
            "no digest is computed"
        );

        // Pages that held data and are zero now get a marker, once.
        batch.clear();
        assert_eq!(sender.add(0, &page(0), &mut batch), PageDecision::Zero);
        assert_eq!(sender.add_known_zero(1, &mut batch), PageDecision::Zero);
        assert_eq!(sender.add(0, &page(0), &mut batch), PageDecision::Zero);
        assert_eq!(kinds(&batch), ["zero 0", "zero 1"]);

        // A page the destination dropped (post-copy) is sent whatever it holds, zero as a marker.
        batch.clear();
        sender.forget(3);
        assert_eq!(sender.add(3, &page(0), &mut batch), PageDecision::Zero);
        sender.add_full(2, &page(0), &mut batch);
        assert_eq!(sender.add(2, &page(0), &mut batch), PageDecision::Zero);
        assert_eq!(kinds(&batch), ["zero 3", "full 2", "zero 2"]);
    }

    #[test]
    fn inspect_many_is_inspect_of_each_page() {
        let hasher = PageHasher::new(&[7; 32]);
        let pages: Vec<[u8; PAGE_SIZE]> = (0..21u8).map(|i| page(if i % 3 == 0 { 0 } else { i })).collect();
        for hashing in [true, false] {
            let sender = PageSender::new(hashing, hasher.clone(), 0, vec![]);
            let one_by_one: Vec<Content> = pages.iter().map(|p| sender.inspect(p)).collect();
            assert_eq!(sender.inspect_many(&pages), one_by_one);
            let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().collect();
            assert_eq!(sender.inspect_many(&refs), one_by_one);
        }
        let sender = PageSender::new(true, hasher.clone(), 0, vec![]);
        assert_eq!(
            sender.inspect_many(&pages[1..2]),
            [Content::Digest(hasher.digest(&page(1)))]
        );
        assert!(sender.inspect_many::<[u8; PAGE_SIZE]>(&[]).is_empty());
    }
}
