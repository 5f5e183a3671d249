//! The destination's one way of installing a batch of pages, in pre-copy and in post-copy alike.
//!
//! [`apply_batch`] checks each item, writes `Full` and `Zero` pages and resolves `Ref` pages from the
//! content index, then records the page's content in the index; a reference the index cannot resolve
//! is handed back (to be asked for in full). Where the bytes go is the [`PageSink`]'s business: plain
//! writes into the stopped guest's memory before the resume ([`super::receiver`]), `UFFDIO_COPY` into
//! the running guest after a post-copy switch ([`super::postcopy::demand`]).
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
                if sink.install(page, data)? && vm.hashing {
                    vm.index.record_pages(vm.vm_key, &[(page, *digest)])?;
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
