//! The destination's one way of installing a batch of pages, in pre-copy and in post-copy alike.
//!
//! [`apply_batch`] checks each item, writes `Full` and `Zero` pages and resolves `Ref` pages from the
//! content index, then records the page's content in the index; a reference the index cannot resolve
//! is handed back (to be asked for in full). Nothing here hashes a page: a full page comes with its
//! digest (hashing on) or without one (hashing off: zeros, and the index forgets what it had recorded
//! for that page), a zero marker with the zero page's known digest, whether hashing is on or off.
//! Where the bytes go is the [`PageSink`]'s business: plain
//! writes into the stopped guest's memory before the resume ([`super::receiver`]), `UFFDIO_COPY` (or a
//! write and `UFFDIO_CONTINUE`) into the running guest after a post-copy switch
//! ([`super::postcopy::demand`]).
use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::frame::{PageBatch, PageItem};

use crate::content_index::{ContentIndex, HeldSource};
use crate::hashing::PageDigest;

/// Where a destination installs pages.
pub trait PageSink {
    /// Pages of the guest memory behind the sink.
    fn pages(&self) -> u64;
    /// Installs `data` at `page`. `Ok(false)`: the page was there already and nothing was written (a
    /// page that crossed twice in post-copy), so its content is not recorded again.
    fn install(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<bool>;
    /// Installs a zero page at `page`, with the same answer as [`PageSink::install`].
    fn install_zero(&mut self, page: u64) -> anyhow::Result<bool>;
}

/// Pages the destination resolved from its content index, by where it found them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldCounts {
    /// The on-disk page store (pages of VMs that left).
    pub from_store: u64,
    /// Another VM this host runs.
    pub from_hosted: u64,
    /// A page of this migration that had already arrived.
    pub from_same_vm: u64,
}

impl HeldCounts {
    fn count(&mut self, source: HeldSource) {
        match source {
            HeldSource::Store => self.from_store += 1,
            HeldSource::HostedVm => self.from_hosted += 1,
            HeldSource::SameVm => self.from_same_vm += 1,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: HeldCounts) {
        self.from_store += other.from_store;
        self.from_hosted += other.from_hosted;
        self.from_same_vm += other.from_same_vm;
    }
}

/// What the index knows of the incoming VM: its key, whether digests are real (hashing on) and the
/// digest of a zero page.
pub struct IndexedVm<'a> {
    pub index: &'a mut ContentIndex,
    pub vm_key: &'a str,
    pub hashing: bool,
    pub zero_digest: &'a PageDigest,
}

/// Installs every item of `batch` into `sink`, keeping `vm`'s index entries in step and counting
/// resolved references in `held`. Pages whose reference could not be resolved go to `unresolved`
/// (nothing is written for them). Fails on a malformed item or a page outside guest memory.
pub fn apply_batch(
    batch: &PageBatch,
    sink: &mut impl PageSink,
    vm: &mut IndexedVm<'_>,
    held: &mut HeldCounts,
    unresolved: &mut impl Extend<u64>,
) -> anyhow::Result<()> {
    let pages = sink.pages();
    let mut scratch = [0u8; PAGE_SIZE];
    for (i, item) in batch.iter().enumerate() {
        let item = item.with_context(|| format!("malformed page batch from the source (item {i})"))?;
        let page = item.page();
        if page >= pages {
            bail!("source sent page {page}, but the guest has {pages} pages");
        }
        match item {
            PageItem::Full { page, digest, data } => {
                if sink.install(page, data)? {
                    if vm.hashing {
                        vm.index.record_pages(vm.vm_key, &[(page, *digest)])?;
                    } else {
                        // No digest came (hashing off): whatever was recorded there (a zero marker's
                        // zero digest) is no longer the page's content.
                        vm.index.forget_pages(vm.vm_key, &[page])?;
                    }
                }
            }
            PageItem::Zero { page } => {
                if sink.install_zero(page)? {
                    vm.index.record_pages(vm.vm_key, &[(page, *vm.zero_digest)])?;
                }
            }
            PageItem::Ref { page, digest } => match vm.index.resolve(digest, vm.vm_key, &mut scratch) {
                Some(source) => {
                    if sink.install(page, &scratch)? {
                        vm.index.record_pages(vm.vm_key, &[(page, *digest)])?;
                    }
                    held.count(source);
                }
                None => unresolved.extend([page]),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, RwLock};

    use super::*;
    use crate::content_index::PageSource;
    use crate::hashing::PageHasher;

    /// Guest memory as plain buffers: the sink writes them, the index reads them back for references.
    /// Pages in `present` refuse a second install, as post-copy's page table does.
    struct Memory {
        pages: RwLock<Vec<[u8; PAGE_SIZE]>>,
        present: RwLock<Vec<bool>>,
        refuse_present: bool,
    }

    impl Memory {
        fn new(pages: usize, refuse_present: bool) -> Arc<Memory> {
            Arc::new(Memory {
                pages: RwLock::new(vec![[0; PAGE_SIZE]; pages]),
                present: RwLock::new(vec![false; pages]),
                refuse_present,
            })
        }
        fn page(&self, page: u64) -> [u8; PAGE_SIZE] {
            self.pages.read().unwrap()[page as usize]
        }
    }

    impl PageSource for Memory {
        fn page_count(&self) -> u64 {
            self.pages.read().unwrap().len() as u64
        }
        fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) {
            *out = self.page(page);
        }
    }

    impl PageSink for &Memory {
        fn pages(&self) -> u64 {
            self.page_count()
        }
        fn install(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<bool> {
            let mut present = self.present.write().unwrap();
            if self.refuse_present && present[page as usize] {
                return Ok(false);
            }
            present[page as usize] = true;
            self.pages.write().unwrap()[page as usize] = *data;
            Ok(true)
        }
        fn install_zero(&mut self, page: u64) -> anyhow::Result<bool> {
            self.install(page, &[0; PAGE_SIZE])
        }
    }

    struct Dest {
        index: ContentIndex,
        memory: Arc<Memory>,
        zero_digest: PageDigest,
        held: HeldCounts,
        unresolved: Vec<u64>,
    }

    fn dest(pages: usize, refuse_present: bool) -> Dest {
        let hasher = PageHasher::new(&[5; 32]);
        let zero_digest = hasher.digest(&[0; PAGE_SIZE]);
        let mut index = ContentIndex::new(hasher, None);
        let memory = Memory::new(pages, refuse_present);
        index.add_vm("web1", memory.clone()).unwrap();
        Dest {
            index,
            memory,
            zero_digest,
            held: HeldCounts::default(),
            unresolved: Vec::new(),
        }
    }

    impl Dest {
        fn apply(&mut self, batch: &PageBatch) -> anyhow::Result<()> {
            self.apply_hashing(batch, true)
        }
        fn apply_hashing(&mut self, batch: &PageBatch, hashing: bool) -> anyhow::Result<()> {
            let mut vm = IndexedVm {
                index: &mut self.index,
                vm_key: "web1",
                hashing,
                zero_digest: &self.zero_digest,
            };
            apply_batch(batch, &mut &*self.memory, &mut vm, &mut self.held, &mut self.unresolved)
        }
        fn digest(&self, data: &[u8; PAGE_SIZE]) -> PageDigest {
            self.index.hasher().digest(data)
        }
    }

    #[test]
    fn full_zero_and_references_land_and_unknown_references_come_back() {
        let mut d = dest(8, false);
        let a = [0xa5; PAGE_SIZE];
        let da = d.digest(&a);
        let unknown = d.digest(&[0x11; PAGE_SIZE]);
        let mut batch = PageBatch::with_capacity(4);
        batch.push_full(1, &da, &a);
        batch.push_ref(2, &da); // the content of page 1, which arrived just before
        batch.push_ref(3, &unknown);
        d.apply(&batch).unwrap();
        assert_eq!(d.memory.page(1), a);
        assert_eq!(d.memory.page(2), a, "a reference is expanded from what the index holds");
        assert_eq!(
            d.memory.page(3),
            [0; PAGE_SIZE],
            "nothing is written for an unresolved reference"
        );
        assert_eq!(d.unresolved, [3]);
        assert_eq!(
            d.held,
            HeldCounts {
                from_same_vm: 1,
                ..Default::default()
            }
        );

        let mut batch = PageBatch::with_capacity(1);
        batch.push_zero(1);
        d.apply(&batch).unwrap();
        assert_eq!(d.memory.page(1), [0; PAGE_SIZE]);
        assert!(d.index.contains(&da), "page 2 still holds the content");
    }

    #[test]
    fn without_hashing_zero_markers_land_and_full_pages_replace_their_record() {
        let mut d = dest(4, false);
        let a = [0x3c; PAGE_SIZE];
        d.memory.pages.write().unwrap()[2] = a;
        let mut batch = PageBatch::with_capacity(4);
        batch.push_zero(2);
        batch.push_full(1, &[0; 16], &a);
        d.apply_hashing(&batch, false).unwrap();
        assert_eq!(d.memory.page(2), [0; PAGE_SIZE], "a zero marker writes a zero page");
        assert_eq!(d.memory.page(1), a);
        assert!(d.index.contains(&d.zero_digest), "page 2 is known to be zero");
        let da = d.digest(&a);
        assert!(!d.index.contains(&da), "a full page without its digest is not recorded");

        // Page 2 gets data: it no longer holds the zero page, and the index says so.
        let mut batch = PageBatch::with_capacity(1);
        batch.push_full(2, &[0; 16], &a);
        d.apply_hashing(&batch, false).unwrap();
        assert_eq!(d.memory.page(2), a);
        assert!(!d.index.contains(&d.zero_digest));
        assert!(d.unresolved.is_empty());
    }

    #[test]
    fn a_page_already_present_is_neither_written_nor_recorded_again() {
        let mut d = dest(4, true);
        let a = [1; PAGE_SIZE];
        let b = [2; PAGE_SIZE];
        let (da, db) = (d.digest(&a), d.digest(&b));
        let mut batch = PageBatch::with_capacity(2);
        batch.push_full(0, &da, &a);
        batch.push_full(0, &db, &b);
        d.apply(&batch).unwrap();
        assert_eq!(d.memory.page(0), a);
        assert!(d.index.contains(&da) && !d.index.contains(&db));
    }

    #[test]
    fn a_page_outside_guest_memory_is_refused_with_its_number() {
        let mut d = dest(4, false);
        let mut batch = PageBatch::with_capacity(1);
        batch.push_zero(4);
        let err = d.apply(&batch).unwrap_err().to_string();
        assert_eq!(err, "source sent page 4, but the guest has 4 pages");
    }
}
