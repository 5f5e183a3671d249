//! The destination's content index: which page contents this agent already holds, by keyed digest,
//! and where, so that the source can send a reference (the digest) instead of 4 KiB and the receiver
//! can fill the page locally.
//!
//! # Sources of content
//!
//! * The on-disk [`PageStore`]: pages of VMs that left this host. Its own index says what it holds.
//! * Pages of VMs this agent hosts, each registered as a [`PageSource`] under a [`VmKey`]. The index
//!   learns their digests from the caller, who records `(page, digest)` as it writes pages
//!   ([`ContentIndex::record_pages`], batched and O(1) per page: it is on the receive hot path) or
//!   has them hashed once ([`ContentIndex::index_vm_pages`]).
//! * "Pages already sent earlier in this migration" need nothing special: the incoming VM is
//!   registered as a hosted VM from the start and the receiver records every page it writes. A
//!   resolution from the VM being filled is reported as [`HeldSource::SameVm`], from another hosted
//!   VM as [`HeldSource::HostedVm`].
//!
//! # Hosted memory is never trusted, only used
//!
//! Hosted VMs run and change their memory behind the index's back, so a digest recorded for
//! `(vm, page)` is a *hint*. [`ContentIndex::resolve`] copies the candidate page and re-hashes it with
//! the keyed [`PageHasher`]; only a page that reproduces the requested digest is returned. A mismatch
//! drops that location (and the VM's record for the page) and the next location is tried. Because the
//! digest is keyed (see [`crate::hashing`]), no guest can make a different page pass this check, so a
//! resolved page *is* the content the source hashed. Pages from the store are checked too: always
//! against the xxh3 checksum they were written with, and by default (`set_verify_store(true)`) also by
//! re-hashing with the key, which makes the store's trust argument the same as hosted memory's.
//!
//! # Memory
//!
//! Per hosted VM: one 16-byte digest per page (`Vec<PageDigest>`, the last digest recorded for each
//! page; all-zero = unknown). Globally: `HashMap<PageDigest, Entry>`, where an entry holds up to
//! [`MAX_LOCATIONS`] `(vm, page)` locations of 8 bytes: 44 bytes per distinct digest plus the
//! table's slack. Measured (`benches/hashing.rs`, all pages distinct): ~82 bytes of heap per hosted
//! page in total, i.e. ~20 MiB for a 1 GiB VM (2 % of its size); duplicate pages cost only their
//! 16-byte per-VM digest. Content shared by thousands of pages (a guest's pool of duplicate pages, zero pages) keeps
//! only its first few locations: enough to survive a few going stale, and it keeps record/unlink O(1).
//! If all of a digest's locations go stale, the digest is forgotten until a page with it is recorded
//! again: the index is a cache of opportunities, and a miss only costs bandwidth.
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use perfplus_common::PAGE_SIZE;

use crate::hashing::{digest_prefix, is_zero_page, PageDigest, PageHasher};
use crate::page_store::PageStore;
use perfplus_vmm::memory::GuestMemory;

/// How the agent names a VM it hosts.
pub type VmKey = String;

/// Locations remembered per digest.
pub const MAX_LOCATIONS: usize = 3;
/// Pages [`ContentIndex::archive_vm`] inserts per hold of the index lock.
pub const ARCHIVE_CHUNK: usize = 256;

/// Per-page digest meaning "content not known" (a real digest is all-zero with probability 2^-128).
const UNKNOWN: PageDigest = [0; 16];

/// Read access to the pages of a hosted VM. Implemented for [`GuestMemory`]; tests use plain buffers.
pub trait PageSource: Send + Sync {
    /// Number of 4 KiB pages.
    fn page_count(&self) -> u64;
    /// Copies page `page` (< `page_count()`) into `out`. May race with writers: the index re-hashes.
    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]);
    /// The page ranges that may hold data; every other page is zero without being read. Reading a
    /// page that was never written can cost memory (a memfd allocates it), so callers that walk every
    /// page walk these. By default: all of them.
    fn data_page_ranges(&self) -> Vec<Range<u64>> {
        std::iter::once(0..self.page_count()).collect()
    }
}

/// The pages of `source` that may hold data, in order (see [`PageSource::data_page_ranges`]).
pub fn data_pages(source: &dyn PageSource) -> impl Iterator<Item = u64> {
    source.data_page_ranges().into_iter().flatten()
}

impl PageSource for GuestMemory {
    fn page_count(&self) -> u64 {
        GuestMemory::page_count(self)
    }
    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) {
        GuestMemory::read_page(self, page, out)
    }
    fn data_page_ranges(&self) -> Vec<Range<u64>> {
        // The memfd's holes were never written: zero. If the kernel cannot say, every page.
        GuestMemory::data_page_ranges(self).unwrap_or_else(|err| {
            tracing::warn!("{err:#}; reading every page");
            std::iter::once(0..self.page_count()).collect()
        })
    }
}

/// Where a resolved page came from (for the migration report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum HeldSource {
    /// The on-disk page store.
    Store,
    /// Memory of another VM this agent hosts.
    HostedVm,
    /// The VM being filled itself (a page received earlier in this migration).
    SameVm,
}

/// Misuse of the index by its caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("VM {0:?} is not registered with the content index")]
    UnknownVm(VmKey),
    #[error("VM {0:?} is already registered with the content index")]
    DuplicateVm(VmKey),
    #[error("page {page} is outside VM {vm:?} ({pages} pages)")]
    PageOutOfRange { vm: VmKey, page: u64, pages: u64 },
    #[error("VM {vm:?} has {pages} pages; the content index supports at most 2^32")]
    TooLarge { vm: VmKey, pages: u64 },
}

/// Counters and sizes of a [`ContentIndex`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexStats {
    /// Distinct digests with at least one hosted-memory location.
    pub entries: u64,
    /// Hosted-memory locations in the table (≤ `MAX_LOCATIONS` per entry).
    pub locations: u64,
    /// Registered hosted VMs.
    pub hosted_vms: u64,
    /// Hosted pages whose digest is known.
    pub recorded_pages: u64,
    /// Pages in the on-disk store.
    pub store_pages: u64,
    /// Store capacity in pages (0 = no store).
    pub store_capacity: u64,
    /// Approximate heap memory of the index and the store's in-memory index, in bytes.
    pub memory_bytes: u64,
    /// Resolutions served by the store.
    pub resolved_store: u64,
    /// Resolutions served by another hosted VM.
    pub resolved_hosted: u64,
    /// Resolutions served by the VM being filled.
    pub resolved_same_vm: u64,
    /// Locations found stale (content changed) and dropped during resolution.
    pub stale_dropped: u64,
    /// Store pages that failed verification and were dropped.
    pub store_rejected: u64,
    /// Resolutions that found nothing.
    pub misses: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    vm: u32,
    page: u32,
}

/// Up to [`MAX_LOCATIONS`] hosted locations of one digest (28 bytes).
#[derive(Clone, Copy)]
struct Entry {
    locs: [Loc; MAX_LOCATIONS],
    n: u8,
}

impl Entry {
    fn locs(&self) -> &[Loc] {
        &self.locs[..usize::from(self.n)]
    }
}

struct HostedVm {
    key: VmKey,
    source: Arc<dyn PageSource>,
    /// Last digest recorded per page, [`UNKNOWN`] if none.
    digests: Vec<PageDigest>,
}

/// What the destination agent holds, by digest (see the module docs).
pub struct ContentIndex {
    hasher: PageHasher,
    store: Option<PageStore>,
    verify_store: bool,
    entries: HashMap<PageDigest, Entry>,
    vms: Vec<Option<HostedVm>>,
    vm_ids: HashMap<VmKey, u32>,
    free_ids: Vec<u32>,
    zero_digest: PageDigest,
    stats: IndexStats,
}

impl std::fmt::Debug for ContentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentIndex")
            .field("hasher", &self.hasher)
            .field("store", &self.store)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Adds `loc` to `digest`'s entry; a full entry forgets its oldest location to make room. The newest
/// holders are kept because content that keeps being written (shared or duplicate pages) keeps being
/// recorded, so its entry stays fresh however often old holders are overwritten. Returns whether the
/// entry grew (false when a location was replaced).
fn link(entries: &mut HashMap<PageDigest, Entry>, digest: &PageDigest, loc: Loc) -> bool {
    let e = entries.entry(*digest).or_insert(Entry {
        locs: [Loc { vm: 0, page: 0 }; MAX_LOCATIONS],
        n: 0,
    });
    if usize::from(e.n) == MAX_LOCATIONS {
        e.locs.copy_within(1.., 0);
        e.locs[MAX_LOCATIONS - 1] = loc;
        return false;
    }
    e.locs[usize::from(e.n)] = loc;
    e.n += 1;
    true
}

/// Removes `loc` from `digest`'s entry (dropping an emptied entry). Returns whether it was there.
fn unlink(entries: &mut HashMap<PageDigest, Entry>, digest: &PageDigest, loc: Loc) -> bool {
    let Some(e) = entries.get_mut(digest) else {
        return false;
    };
    let Some(i) = e.locs().iter().position(|&l| l == loc) else {
        return false;
    };
    let last = usize::from(e.n) - 1;
    e.locs[i] = e.locs[last];
    e.n -= 1;
    if e.n == 0 {
        entries.remove(digest);
    }
    true
}

/// Pages hashed together when a whole VM is read ([`ContentIndex::index_vm_pages`],
/// [`ContentIndex::archive_vm`]).
const HASH_BATCH: usize = 32;

/// A few pages of a VM read together and hashed together.
struct ReadBatch {
    pages: Vec<[u8; PAGE_SIZE]>,
}

impl ReadBatch {
    fn new() -> Self {
        Self {
            pages: Vec::with_capacity(HASH_BATCH),
        }
    }

    /// Reads `range` of `source` into `self.pages` and returns each page's keyed digest, `None` for a
    /// zero page (not hashed).
    fn digests(&mut self, source: &dyn PageSource, range: Range<u64>, hasher: &PageHasher) -> Vec<Option<PageDigest>> {
        self.pages.clear();
        self.pages.resize((range.end - range.start) as usize, [0; PAGE_SIZE]);
        for (page, out) in range.zip(&mut self.pages) {
            source.read_page(page, out);
        }
        let zero: Vec<bool> = self.pages.iter().map(is_zero_page).collect();
        let non_zero: Vec<&[u8; PAGE_SIZE]> = self
            .pages
            .iter()
            .zip(&zero)
            .filter(|(_, z)| !**z)
            .map(|(p, _)| p)
            .collect();
        let mut digests = hasher.digest_many(&non_zero).into_iter();
        zero.iter().map(|z| if *z { None } else { digests.next() }).collect()
    }
}

/// `ranges` (clipped to `pages`) cut into pieces of at most [`HASH_BATCH`] pages.
fn hash_batches(ranges: Vec<Range<u64>>, pages: u64) -> impl Iterator<Item = Range<u64>> {
    ranges.into_iter().flat_map(move |range| {
        let end = range.end.min(pages);
        (range.start..end)
            .step_by(HASH_BATCH)
            .map(move |first| first..end.min(first + HASH_BATCH as u64))
    })
}

impl ContentIndex {
    /// An index keyed like `hasher`, over `store` (if any). The store must have been opened with
    /// `hasher.key_fingerprint()`; a store of another key is dropped with a warning, as its digests
    /// could never match.
    pub fn new(hasher: PageHasher, store: Option<PageStore>) -> Self {
        let store = store.filter(|s| {
            let ok = s.key_fingerprint() == hasher.key_fingerprint();
            if !ok {
                tracing::warn!(dir = %s.dir().display(),
                    "page store was opened for another page-hash key; not using it");
            }
            ok
        });
        let zero_digest = hasher.digest(&[0u8; PAGE_SIZE]);
        Self {
            hasher,
            store,
            verify_store: true,
            entries: HashMap::new(),
            vms: Vec::new(),
            vm_ids: HashMap::new(),
            free_ids: Vec::new(),
            zero_digest,
            stats: IndexStats::default(),
        }
    }

    /// Whether pages read from the store are re-hashed with the key before use (default `true`; with
    /// `false` they are checked only against their xxh3 checksum, saving ~7 µs a page).
    pub fn set_verify_store(&mut self, verify: bool) {
        self.verify_store = verify;
    }

    /// The hasher the index verifies with.
    pub fn hasher(&self) -> &PageHasher {
        &self.hasher
    }

    /// Registers a hosted VM (all its pages unknown until recorded).
    pub fn add_vm(&mut self, vm: impl Into<VmKey>, source: Arc<dyn PageSource>) -> Result<(), IndexError> {
        let key = vm.into();
        if self.vm_ids.contains_key(&key) {
            return Err(IndexError::DuplicateVm(key));
        }
        let pages = source.page_count();
        if pages > 1 << 32 {
            return Err(IndexError::TooLarge { vm: key, pages });
        }
        let hosted = HostedVm {
            key: key.clone(),
            source,
            digests: vec![UNKNOWN; pages as usize],
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.vms[id as usize] = Some(hosted);
                id
            }
            None => {
                self.vms.push(Some(hosted));
                (self.vms.len() - 1) as u32
            }
        };
        self.vm_ids.insert(key, id);
        Ok(())
    }

    /// Unregisters a hosted VM and forgets every location in it. Returns whether it was registered.
    pub fn remove_vm(&mut self, vm: &str) -> bool {
        let Some(id) = self.vm_ids.remove(vm) else {
            return false;
        };
        let hosted = self.vms[id as usize].take().expect("registered VM has a slot");
        for (page, d) in hosted.digests.iter().enumerate() {
            if *d != UNKNOWN {
                self.stats.recorded_pages -= 1;
                let loc = Loc {
                    vm: id,
                    page: page as u32,
                };
                if unlink(&mut self.entries, d, loc) {
                    self.stats.locations -= 1;
                }
            }
        }
        self.free_ids.push(id);
        true
    }

    /// Whether `vm` is registered.
    pub fn has_vm(&self, vm: &str) -> bool {
        self.vm_ids.contains_key(vm)
    }

    /// Records that `vm`'s page `page` now holds content with `digest`, for each pair (the caller has
    /// just written it, or hashed it). Replaces what was recorded for that page before: its old digest
    /// no longer points there. Pairs before an out-of-range page are applied.
    pub fn record_pages(&mut self, vm: &str, pages: &[(u64, PageDigest)]) -> Result<(), IndexError> {
        let id = *self.vm_ids.get(vm).ok_or_else(|| IndexError::UnknownVm(vm.into()))?;
        let hosted = self.vms[id as usize].as_mut().expect("registered VM has a slot");
        for &(page, digest) in pages {
            let Some(slot) = hosted.digests.get_mut(page as usize) else {
                return Err(IndexError::PageOutOfRange {
                    vm: vm.into(),
                    page,
                    pages: hosted.digests.len() as u64,
                });
            };
            let old = *slot;
            if old == digest {
                continue;
            }
            let loc = Loc {
                vm: id,
                page: page as u32,
            };
            if old != UNKNOWN {
                self.stats.recorded_pages -= 1;
                if unlink(&mut self.entries, &old, loc) {
                    self.stats.locations -= 1;
                }
            }
            *slot = digest;
            if digest != UNKNOWN {
                self.stats.recorded_pages += 1;
                if link(&mut self.entries, &digest, loc) {
                    self.stats.locations += 1;
                }
            }
        }
        Ok(())
    }

    /// Forgets what was recorded for these pages of `vm` (their content is no longer known, e.g. they
    /// are being written by other means).
    pub fn forget_pages(&mut self, vm: &str, pages: &[u64]) -> Result<(), IndexError> {
        let batch: Vec<(u64, PageDigest)> = pages.iter().map(|&p| (p, UNKNOWN)).collect();
        self.record_pages(vm, &batch)
    }

    /// Reads and hashes every page of `vm` and records it (for a VM whose content the index has not
    /// seen being written, e.g. one booted on this host). Returns the number of pages recorded.
    /// Costs one keyed hash per non-zero page, hashed [`HASH_BATCH`] pages at a time
    /// ([`PageHasher::digest_many`]).
    pub fn index_vm_pages(&mut self, vm: &str) -> Result<u64, IndexError> {
        let id = *self.vm_ids.get(vm).ok_or_else(|| IndexError::UnknownVm(vm.into()))?;
        let source = Arc::clone(&self.vms[id as usize].as_ref().expect("slot").source);
        let pages = self.vms[id as usize].as_ref().expect("slot").digests.len() as u64;
        let mut read = ReadBatch::new();
        let mut batch = Vec::with_capacity(HASH_BATCH);
        // Pages outside the data ranges are zero, recorded as such without being read.
        let mut next = 0;
        for range in hash_batches(source.data_page_ranges(), pages) {
            batch.extend((next..range.start).map(|page| (page, self.zero_digest)));
            next = range.end;
            let digests = read.digests(&*source, range.clone(), &self.hasher);
            batch.extend(
                range
                    .zip(digests)
                    .map(|(page, d)| (page, d.unwrap_or(self.zero_digest))),
            );
            self.record_pages(vm, &batch)?;
            batch.clear();
        }
        batch.extend((next..pages).map(|page| (page, self.zero_digest)));
        self.record_pages(vm, &batch)?;
        Ok(pages)
    }

    /// Puts the non-zero pages of `vm` into the store of the index behind `index` (hashed afresh: the
    /// VM has left, or is leaving, this host, and is paused) and then unregisters it. The lock is held
    /// only to insert each chunk of [`ARCHIVE_CHUNK`] pages: reading and hashing happen outside it, so
    /// that migrations under way (which take the lock for every batch) wait at most one chunk. Stops
    /// once the store's capacity has been offered (more would only evict what it just took). Returns the
    /// number of pages offered (pages the store held already are not written twice).
    pub fn archive_vm(index: &Mutex<ContentIndex>, vm: &str) -> anyhow::Result<u64> {
        let lock = || index.lock().unwrap_or_else(PoisonError::into_inner);
        let (source, hasher, capacity) = {
            let ix = lock();
            let id = *ix.vm_ids.get(vm).ok_or_else(|| IndexError::UnknownVm(vm.into()))?;
            let source = Arc::clone(&ix.vms[id as usize].as_ref().expect("slot").source);
            let capacity = ix.store.as_ref().map_or(0, |s| s.capacity());
            (source, ix.hasher.clone(), capacity)
        };
        let mut offered = 0;
        let mut read = ReadBatch::new();
        let pages = source.page_count();
        // Hashed HASH_BATCH pages at a time outside the lock; inserted ARCHIVE_CHUNK at a time under it.
        let mut chunk: Vec<(PageDigest, [u8; PAGE_SIZE])> = Vec::with_capacity(ARCHIVE_CHUNK);
        let insert = |chunk: &mut Vec<(PageDigest, [u8; PAGE_SIZE])>| -> anyhow::Result<()> {
            let mut ix = lock();
            if let Some(store) = ix.store.as_mut() {
                for (digest, data) in chunk.drain(..) {
                    store.insert(&digest, &data)?;
                }
            }
            chunk.clear();
            Ok(())
        };
        'pages: for range in hash_batches(source.data_page_ranges(), pages) {
            let digests = read.digests(&*source, range, &hasher);
            for (data, digest) in read.pages.iter().zip(digests) {
                if offered == capacity {
                    break 'pages;
                }
                if let Some(digest) = digest {
                    chunk.push((digest, *data));
                    offered += 1;
                    if chunk.len() == ARCHIVE_CHUNK {
                        insert(&mut chunk)?;
                    }
                }
            }
        }
        insert(&mut chunk)?;
        let mut ix = lock();
        if let Some(store) = ix.store.as_mut() {
            store.flush()?;
        }
        ix.remove_vm(vm);
        Ok(offered)
    }

    /// Whether `digest` is held (by the store or by a hosted location, not yet verified).
    pub fn contains(&self, digest: &PageDigest) -> bool {
        self.entries.contains_key(digest) || self.store.as_ref().is_some_and(|s| s.contains(digest))
    }

    /// The [`digest_prefix`] of every digest held, hosted memory first, then the store; deduplicated,
    /// at most `limit` of them, sorted ascending.
    pub fn held_prefixes(&self, limit: usize) -> Vec<u64> {
        let store_digests = self.store.iter().flat_map(|s| s.digests());
        let mut set: HashSet<u64> =
            HashSet::with_capacity(limit.min(self.entries.len() + self.stats_store_len() as usize));
        for d in self.entries.keys().chain(store_digests) {
            if set.len() >= limit {
                break;
            }
            set.insert(digest_prefix(d));
        }
        let mut v: Vec<u64> = set.into_iter().collect();
        v.sort_unstable();
        v
    }

    fn stats_store_len(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.len())
    }

    /// Fills `out` with content hashing to `digest`, for a page of `for_vm` (the VM being filled; it
    /// need not be registered). Tries hosted memory first (`for_vm`'s own pages, then other VMs'),
    /// each candidate re-hashed, stale ones dropped; then the store. `None` if nothing holds it: the
    /// receiver must then ask the source for the page.
    pub fn resolve(&mut self, digest: &PageDigest, for_vm: &str, out: &mut [u8; PAGE_SIZE]) -> Option<HeldSource> {
        let for_id = self.vm_ids.get(for_vm).copied();
        while let Some(loc) = self.entries.get(digest).and_then(|e| {
            let l = e.locs();
            l.iter().find(|l| Some(l.vm) == for_id).or(l.first()).copied()
        }) {
            let hosted = self.vms[loc.vm as usize].as_mut().expect("located VM is registered");
            hosted.source.read_page(u64::from(loc.page), out);
            if self.hasher.digest(out) == *digest {
                return Some(if Some(loc.vm) == for_id {
                    self.stats.resolved_same_vm += 1;
                    HeldSource::SameVm
                } else {
                    self.stats.resolved_hosted += 1;
                    HeldSource::HostedVm
                });
            }
            // Changed behind our back: the page's record is wrong, whatever it says.
            self.stats.stale_dropped += 1;
            let slot = &mut hosted.digests[loc.page as usize];
            if *slot == *digest {
                *slot = UNKNOWN;
                self.stats.recorded_pages -= 1;
            }
            if unlink(&mut self.entries, digest, loc) {
                self.stats.locations -= 1;
            }
        }
        if let Some(store) = self.store.as_mut() {
            if store.contains(digest) {
                let got = if self.verify_store {
                    store.get_verified(digest, out, &self.hasher)
                } else {
                    store.get(digest, out)
                };
                match got {
                    Ok(true) => {
                        self.stats.resolved_store += 1;
                        return Some(HeldSource::Store);
                    }
                    Ok(false) => {
                        self.stats.store_rejected += 1;
                        if let Err(e) = store.remove(digest) {
                            tracing::warn!(error = %e, "page store: could not drop a bad page");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "page store: read failed"),
                }
            }
        }
        self.stats.misses += 1;
        None
    }

    /// The store, if any.
    pub fn store(&self) -> Option<&PageStore> {
        self.store.as_ref()
    }

    /// The store, to insert pages into (e.g. of a VM leaving this host; see also
    /// [`ContentIndex::archive_vm`]). The index asks the store what it holds on every lookup, so
    /// inserts and evictions through this reference are seen at once.
    pub fn store_mut(&mut self) -> Option<&mut PageStore> {
        self.store.as_mut()
    }

    /// Counters and sizes.
    pub fn stats(&self) -> IndexStats {
        let entry_bytes = std::mem::size_of::<(PageDigest, Entry)>() + 1;
        let vm_bytes: usize = self
            .vms
            .iter()
            .flatten()
            .map(|v| v.digests.capacity() * std::mem::size_of::<PageDigest>())
            .sum();
        IndexStats {
            entries: self.entries.len() as u64,
            hosted_vms: self.vm_ids.len() as u64,
            store_pages: self.stats_store_len(),
            store_capacity: self.store.as_ref().map_or(0, |s| s.capacity()),
            memory_bytes: (self.entries.capacity() * entry_bytes + vm_bytes) as u64
                + self.store.as_ref().map_or(0, |s| s.memory_bytes()),
            ..self.stats
        }
    }

    /// Keys of the registered hosted VMs.
    pub fn vms(&self) -> impl Iterator<Item = &VmKey> + '_ {
        self.vms.iter().flatten().map(|v| &v.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::RwLock;

    /// A hosted VM's memory as plain buffers, writable behind the index's back.
    struct Mem(RwLock<Vec<[u8; PAGE_SIZE]>>);

    impl Mem {
        fn new(pages: usize) -> Arc<Mem> {
            Arc::new(Mem(RwLock::new(vec![[0u8; PAGE_SIZE]; pages])))
        }
        fn set(&self, page: u64, data: &[u8; PAGE_SIZE]) {
            self.0.write().unwrap()[page as usize] = *data;
        }
    }

    impl PageSource for Mem {
        fn page_count(&self) -> u64 {
            self.0.read().unwrap().len() as u64
        }
        fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) {
            *out = self.0.read().unwrap()[page as usize];
        }
    }

    fn content(tag: u32) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, c) in p.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&(tag.wrapping_mul(0x9e37_79b9) ^ i as u32).to_le_bytes());
        }
        p
    }

    fn hasher() -> PageHasher {
        PageHasher::new(&[3; 32])
    }

    /// Writes `tag`'s content at `page` of `mem` and records it, like the receiver does.
    fn write(ix: &mut ContentIndex, vm: &str, mem: &Mem, page: u64, tag: u32) -> PageDigest {
        let c = content(tag);
        mem.set(page, &c);
        let d = ix.hasher().digest(&c);
        ix.record_pages(vm, &[(page, d)]).unwrap();
        d
    }

    fn resolve(ix: &mut ContentIndex, d: &PageDigest, vm: &str) -> Option<(HeldSource, u32)> {
        let mut out = [0u8; PAGE_SIZE];
        let src = ix.resolve(d, vm, &mut out)?;
        assert_eq!(ix.hasher().digest(&out), *d, "resolved content must hash to the digest");
        let tag = (0..1000).find(|&t| content(t) == out).expect("known content");
        Some((src, tag))
    }

    #[test]
    fn resolves_from_store() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut store = PageStore::open(dir.path(), 16, h.key_fingerprint()).unwrap();
        let d = h.digest(&content(5));
        store.insert(&d, &content(5)).unwrap();
        let mut ix = ContentIndex::new(h, Some(store));
        assert!(ix.contains(&d));
        assert_eq!(resolve(&mut ix, &d, "incoming"), Some((HeldSource::Store, 5)));
        // Pages inserted through store_mut are seen at once.
        let d6 = ix.hasher().digest(&content(6));
        ix.store_mut().unwrap().insert(&d6, &content(6)).unwrap();
        assert_eq!(resolve(&mut ix, &d6, "incoming"), Some((HeldSource::Store, 6)));
        assert_eq!(ix.stats().resolved_store, 2);
        assert_eq!(ix.held_prefixes(100), {
            let mut v = vec![digest_prefix(&d), digest_prefix(&d6)];
            v.sort();
            v
        });
    }

    #[test]
    fn store_page_failing_keyed_check_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut store = PageStore::open(dir.path(), 16, h.key_fingerprint()).unwrap();
        // Intact on disk (xxh3 matches), but not the content of the digest it is filed under.
        let d = h.digest(&content(1));
        store.insert(&d, &content(2)).unwrap();
        let mut ix = ContentIndex::new(h, Some(store));
        assert_eq!(resolve(&mut ix, &d, "x"), None);
        assert_eq!(ix.stats().store_rejected, 1);
        assert!(!ix.contains(&d), "the bad page is dropped from the store");
    }

    #[test]
    fn store_of_another_key_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::open(dir.path(), 4, [1; 16]).unwrap();
        let ix = ContentIndex::new(hasher(), Some(store));
        assert!(ix.store().is_none());
    }

    #[test]
    fn resolves_from_hosted_vm_and_same_vm() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(8);
        let b = Mem::new(8);
        ix.add_vm("a", a.clone()).unwrap();
        ix.add_vm("b", b.clone()).unwrap();
        let d = write(&mut ix, "a", &a, 3, 10);
        assert_eq!(resolve(&mut ix, &d, "b"), Some((HeldSource::HostedVm, 10)));
        assert_eq!(resolve(&mut ix, &d, "a"), Some((HeldSource::SameVm, 10)));
        // Not registered at all: still served from a hosted VM.
        assert_eq!(resolve(&mut ix, &d, "c"), Some((HeldSource::HostedVm, 10)));
        // Held by both: the VM being filled is preferred.
        write(&mut ix, "b", &b, 0, 10);
        assert_eq!(resolve(&mut ix, &d, "b"), Some((HeldSource::SameVm, 10)));
        assert_eq!(resolve(&mut ix, &d, "a"), Some((HeldSource::SameVm, 10)));
        let s = ix.stats();
        assert_eq!((s.resolved_same_vm, s.resolved_hosted), (3, 2));
        assert_eq!((s.entries, s.locations, s.recorded_pages), (1, 2, 2));
    }

    #[test]
    fn stale_hosted_page_is_detected_and_not_used() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(8);
        ix.add_vm("a", a.clone()).unwrap();
        let d = write(&mut ix, "a", &a, 2, 20);
        a.set(2, &content(21)); // the guest writes; nobody tells the index
        assert_eq!(resolve(&mut ix, &d, "x"), None);
        let s = ix.stats();
        assert_eq!((s.stale_dropped, s.misses, s.entries, s.recorded_pages), (1, 1, 0, 0));
        assert!(ix.held_prefixes(10).is_empty());
        // With a second copy elsewhere, the stale one is skipped and the good one used.
        write(&mut ix, "a", &a, 5, 30);
        let d30 = write(&mut ix, "a", &a, 6, 30);
        a.set(5, &content(31));
        assert_eq!(resolve(&mut ix, &d30, "a"), Some((HeldSource::SameVm, 30)));
        assert_eq!(resolve(&mut ix, &d30, "a"), Some((HeldSource::SameVm, 30)));
        assert_eq!(ix.stats().stale_dropped, 2);
    }

    #[test]
    fn stale_hosted_page_falls_back_to_store() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut store = PageStore::open(dir.path(), 4, h.key_fingerprint()).unwrap();
        store.insert(&h.digest(&content(7)), &content(7)).unwrap();
        let mut ix = ContentIndex::new(h, Some(store));
        let a = Mem::new(4);
        ix.add_vm("a", a.clone()).unwrap();
        let d = write(&mut ix, "a", &a, 1, 7);
        a.set(1, &content(8));
        assert_eq!(resolve(&mut ix, &d, "a"), Some((HeldSource::Store, 7)));
    }

    #[test]
    fn overwrite_updates_the_index() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(4);
        ix.add_vm("a", a.clone()).unwrap();
        let d1 = write(&mut ix, "a", &a, 0, 1);
        let d2 = write(&mut ix, "a", &a, 0, 2);
        assert!(!ix.contains(&d1) && ix.contains(&d2));
        // d1 is simply not held: no stale re-hash was needed to find that out.
        assert_eq!(resolve(&mut ix, &d1, "a"), None);
        assert_eq!(ix.stats().stale_dropped, 0);
        assert_eq!(resolve(&mut ix, &d2, "a"), Some((HeldSource::SameVm, 2)));
        assert_eq!(ix.held_prefixes(10), vec![digest_prefix(&d2)]);
        // Recording the same digest again is a no-op; forgetting removes it.
        ix.record_pages("a", &[(0, d2)]).unwrap();
        assert_eq!(ix.stats().locations, 1);
        ix.forget_pages("a", &[0]).unwrap();
        assert!(!ix.contains(&d2));
        assert_eq!(ix.stats().recorded_pages, 0);
    }

    #[test]
    fn duplicate_content_keeps_a_few_locations() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(16);
        ix.add_vm("a", a.clone()).unwrap();
        for p in 0..10 {
            write(&mut ix, "a", &a, p, 4);
        }
        let s = ix.stats();
        assert_eq!(
            (s.entries, s.locations, s.recorded_pages),
            (1, MAX_LOCATIONS as u64, 10)
        );
        // The newest holders are kept: overwriting older ones leaves the entry alone.
        for p in 0..7 {
            write(&mut ix, "a", &a, p, 100 + p as u32);
        }
        let d4 = ix.hasher().digest(&content(4));
        assert_eq!(resolve(&mut ix, &d4, "a"), Some((HeldSource::SameVm, 4)));
    }

    #[test]
    fn remove_vm_forgets_its_pages_and_ids_are_reused() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(4);
        let b = Mem::new(4);
        ix.add_vm("a", a.clone()).unwrap();
        ix.add_vm("b", b.clone()).unwrap();
        let da = write(&mut ix, "a", &a, 1, 1);
        let db = write(&mut ix, "b", &b, 1, 2);
        assert!(ix.remove_vm("a"));
        assert!(!ix.remove_vm("a"));
        assert!(!ix.contains(&da) && ix.contains(&db));
        assert_eq!(resolve(&mut ix, &da, "b"), None);
        let c = Mem::new(4);
        ix.add_vm("c", c.clone()).unwrap();
        let dc = write(&mut ix, "c", &c, 1, 3);
        assert_eq!(resolve(&mut ix, &dc, "b"), Some((HeldSource::HostedVm, 3)));
        assert_eq!(resolve(&mut ix, &db, "c"), Some((HeldSource::HostedVm, 2)));
        let s = ix.stats();
        assert_eq!((s.hosted_vms, s.entries, s.recorded_pages), (2, 2, 2));
        let mut keys: Vec<_> = ix.vms().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["b", "c"]);
    }

    #[test]
    fn caller_errors() {
        let mut ix = ContentIndex::new(hasher(), None);
        let a = Mem::new(4);
        ix.add_vm("a", a.clone()).unwrap();
        assert_eq!(ix.add_vm("a", a.clone()), Err(IndexError::DuplicateVm("a".into())));
        assert_eq!(ix.record_pages("zz", &[]), Err(IndexError::UnknownVm("zz".into())));
        assert_eq!(
            ix.record_pages("a", &[(4, [1; 16])]),
            Err(IndexError::PageOutOfRange {
                vm: "a".into(),
                page: 4,
                pages: 4
            })
        );
    }

    #[test]
    fn held_prefixes_dedups_across_sources_and_respects_limit() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut store = PageStore::open(dir.path(), 16, h.key_fingerprint()).unwrap();
        for t in [1, 2, 3] {
            store.insert(&h.digest(&content(t)), &content(t)).unwrap();
        }
        let mut ix = ContentIndex::new(h, Some(store));
        let a = Mem::new(8);
        ix.add_vm("a", a.clone()).unwrap();
        for (p, t) in [(0, 3), (1, 4), (2, 4), (3, 5)] {
            write(&mut ix, "a", &a, p, t);
        }
        let mut want: Vec<u64> = (1..=5)
            .map(|t| digest_prefix(&ix.hasher().digest(&content(t))))
            .collect();
        want.sort();
        assert_eq!(ix.held_prefixes(1000), want);
        let limited = ix.held_prefixes(2);
        assert_eq!(limited.len(), 2);
        assert!(limited.iter().all(|p| want.contains(p)));
        assert!(ix.held_prefixes(0).is_empty());
    }

    #[test]
    fn index_and_archive_a_vm() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let store = PageStore::open(dir.path(), 64, h.key_fingerprint()).unwrap();
        let mut ix = ContentIndex::new(h, Some(store));
        let a = Mem::new(6);
        for (p, t) in [(0, 1), (1, 2), (2, 2)] {
            a.set(p, &content(t));
        }
        ix.add_vm("a", a.clone()).unwrap();
        assert_eq!(ix.index_vm_pages("a"), Ok(6));
        let d2 = ix.hasher().digest(&content(2));
        assert_eq!(resolve(&mut ix, &d2, "b"), Some((HeldSource::HostedVm, 2)));
        let zero = ix.hasher().digest(&[0u8; PAGE_SIZE]);
        assert!(ix.contains(&zero));
        let ix = Mutex::new(ix);
        assert_eq!(ContentIndex::archive_vm(&ix, "a").unwrap(), 3);
        let mut ix = ix.into_inner().unwrap();
        assert!(!ix.has_vm("a"));
        assert_eq!(ix.stats().store_pages, 2, "zero pages and duplicates are not stored");
        assert_eq!(resolve(&mut ix, &d2, "b"), Some((HeldSource::Store, 2)));
        assert!(!ix.contains(&zero));
    }

    #[test]
    fn archiving_stops_at_the_store_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let store = PageStore::open(dir.path(), 2, h.key_fingerprint()).unwrap();
        let mut ix = ContentIndex::new(h, Some(store));
        let a = Mem::new(8);
        for p in 0..5 {
            a.set(p, &content(p as u32 + 1));
        }
        ix.add_vm("a", a).unwrap();
        let ix = Mutex::new(ix);
        assert_eq!(
            ContentIndex::archive_vm(&ix, "a").unwrap(),
            2,
            "two pages fill the store"
        );
        let ix = ix.into_inner().unwrap();
        assert_eq!(ix.stats().store_pages, 2);
        assert!(!ix.has_vm("a"));
    }

    #[test]
    fn index_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ContentIndex>();
    }
}
