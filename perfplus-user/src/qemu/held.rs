//! What this host holds, for the QEMU relay: the advertisement a destination sends (the digest
//! prefixes of its content index), the resolver its expander asks ([`HostIndex`]: the content index,
//! re-hashed), and the archive both sides keep of the pages of a QEMU VM they relayed ([`Stager`]).
//!
//! # The archive
//!
//! The relay hands a copy of each page to a [`Tee`], which passes it to a staging thread through a
//! bounded channel without ever waiting: when the channel is full the page is dropped and counted.
//! The thread keeps each distinct content once, in an unlinked file of the page store's directory
//! (`O_TMPFILE`, mode 0600; at most as many pages as the store holds, more are counted and dropped).
//! Only when the migration is over does [`Stager::commit`] put into the store the staged pages the
//! destination QEMU ended with (the relay's `last_pages`: each address's last content), re-hashed,
//! [`ARCHIVE_CHUNK`] at a time under the content index lock, as `ContentIndex::archive_vm` does, and
//! no more than the store holds. The source commits once QEMU says `completed` (a failed migration
//! leaves the guest here, and the store untouched), the destination once the stream was written
//! whole. Dropping a [`Stager`] forgets what it staged.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use perfplus_qemu::relay::{HostPages, PageTee};
use perfplus_qemu::stream::Digest;

use crate::content_index::{ContentIndex, ARCHIVE_CHUNK};
use crate::hashing::PageHasher;
use crate::migration::receiver::MAX_ADVERTISED;

/// Pages on their way from the relay to the staging thread at most (64 MiB). The staging thread runs
/// below the relay and the guests (nice 10), so on a busy host it lags: this much lag costs memory
/// rather than pages of the archive (with 4 MiB, a loaded CI run skipped 1457 of 3518 pages).
pub(crate) const TEE_CHANNEL_PAGES: usize = 16384;

type Page = Box<[u8; PAGE_SIZE]>;

fn lock(index: &Mutex<ContentIndex>) -> MutexGuard<'_, ContentIndex> {
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a destination advertises: the digest prefixes of what its content index holds (its page
/// store, the VMs it hosts), at most [`MAX_ADVERTISED`].
pub(crate) fn advertisement(index: &Mutex<ContentIndex>) -> Vec<u64> {
    lock(index).held_prefixes(MAX_ADVERTISED)
}

/// A destination's advertisement as the source's filter takes it; a longer one than any agent sends
/// is refused (the frame's own limit bounds what it costs to receive).
pub(crate) fn advertised(held: Vec<u64>) -> anyhow::Result<HashSet<u64>> {
    if held.len() > MAX_ADVERTISED {
        bail!(
            "the destination advertised {} held pages; an agent advertises at most {MAX_ADVERTISED}",
            held.len()
        );
    }
    Ok(held.into_iter().collect())
}

/// The destination's [`HostPages`]: the content index, whose `resolve` re-hashes every candidate
/// (hosted memory always, the store by default) before it returns it.
pub(crate) struct HostIndex {
    index: Arc<Mutex<ContentIndex>>,
    /// What the index calls the VM being filled (it is not one of its hosted VMs).
    for_vm: String,
}

impl HostIndex {
    pub(crate) fn new(index: Arc<Mutex<ContentIndex>>, for_vm: String) -> HostIndex {
        HostIndex { index, for_vm }
    }
}

impl HostPages for HostIndex {
    fn fetch(&mut self, digest: &Digest, out: &mut [u8; PAGE_SIZE]) -> bool {
        lock(&self.index).resolve(digest, &self.for_vm, out).is_some()
    }
}

/// What an archive did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Archived {
    /// Pages offered to the page store (pages it held already are not written twice).
    pub pages: u64,
    /// Pages not kept: the relay went faster than the staging thread, or the staging was full.
    pub skipped: u64,
}

/// The relay's end of the archive: never blocks.
pub(crate) struct Tee {
    pages: SyncSender<(Digest, Page)>,
    skipped: Arc<AtomicU64>,
}

impl PageTee for Tee {
    fn page(&mut self, digest: Digest, page: Page) {
        if self.pages.try_send((digest, page)).is_err() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The staging thread, until the migration is over (see the module docs).
pub(crate) struct Stager {
    worker: JoinHandle<anyhow::Result<Staging>>,
    skipped: Arc<AtomicU64>,
    index: Arc<Mutex<ContentIndex>>,
}

/// Distinct contents staged, by digest: their slot in the file.
struct Staging {
    file: File,
    slots: std::collections::HashMap<Digest, u64>,
}

impl Stager {
    /// Starts staging for `index`'s page store; `None` if there is no store (or no staging file, with
    /// a warning: the relay runs as well without).
    pub(crate) fn start(index: &Arc<Mutex<ContentIndex>>) -> Option<(Stager, Tee)> {
        Stager::start_bounded(index, TEE_CHANNEL_PAGES)
    }

    fn start_bounded(index: &Arc<Mutex<ContentIndex>>, channel_pages: usize) -> Option<(Stager, Tee)> {
        let (dir, capacity) = {
            let ix = lock(index);
            let store = ix.store().filter(|s| s.capacity() > 0)?;
            (store.dir().to_path_buf(), store.capacity())
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir);
        let file = match file {
            Ok(file) => file,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err,
                    "no staging file for the QEMU relay's pages: they are not archived");
                return None;
            }
        };
        let (sender, receiver) = mpsc::sync_channel(channel_pages);
        let skipped = Arc::new(AtomicU64::new(0));
        let worker = std::thread::Builder::new().name("qemu-archive".into()).spawn({
            let skipped = Arc::clone(&skipped);
            // Below the relay and the guests: on a busy host it skips pages rather than slow them.
            move || crate::migration::at_low_priority(|| stage(receiver, file, capacity, &skipped))
        });
        let worker = match worker {
            Ok(worker) => worker,
            Err(err) => {
                tracing::warn!(error = %err, "no staging thread for the QEMU relay's pages: they are not archived");
                return None;
            }
        };
        let tee = Tee {
            pages: sender,
            skipped: Arc::clone(&skipped),
        };
        let stager = Stager {
            worker,
            skipped,
            index: Arc::clone(index),
        };
        Some((stager, tee))
    }

    /// Waits for the staging thread (every [`Tee`] must have been dropped), then puts the staged
    /// pages among `last` into the store (see the module docs). Blocking: run it off the runtime.
    pub(crate) fn commit(self, last: &[Digest]) -> anyhow::Result<Archived> {
        let staging = self
            .worker
            .join()
            .map_err(|_| anyhow::anyhow!("the archive's staging thread panicked"))??;
        let (hasher, capacity): (PageHasher, u64) = {
            let ix = lock(&self.index);
            (ix.hasher().clone(), ix.store().map_or(0, |s| s.capacity()))
        };
        let mut archived = Archived {
            pages: 0,
            skipped: self.skipped.load(Ordering::Relaxed),
        };
        // Read ARCHIVE_CHUNK pages, check them together (eight digests at once), insert them under one
        // hold of the index lock.
        let mut digests: Vec<Digest> = Vec::with_capacity(ARCHIVE_CHUNK);
        let mut pages: Vec<[u8; PAGE_SIZE]> = Vec::with_capacity(ARCHIVE_CHUNK);
        let insert = |digests: &mut Vec<Digest>, pages: &mut Vec<[u8; PAGE_SIZE]>| -> anyhow::Result<u64> {
            let actual = hasher.digest_many(pages);
            let mut ix = lock(&self.index);
            let mut inserted = 0;
            if let Some(store) = ix.store_mut() {
                for ((digest, page), actual) in digests.iter().zip(pages.iter()).zip(&actual) {
                    if actual != digest {
                        tracing::warn!("a staged page does not hash to its digest; not archived");
                        continue;
                    }
                    store.insert(digest, page)?;
                    inserted += 1;
                }
            }
            digests.clear();
            pages.clear();
            Ok(inserted)
        };
        for digest in last {
            if archived.pages + digests.len() as u64 == capacity {
                break;
            }
            // Not staged: skipped, or content the host held already (expanded from it).
            let Some(&slot) = staging.slots.get(digest) else {
                continue;
            };
            let mut page = [0u8; PAGE_SIZE];
            staging
                .file
                .read_exact_at(&mut page, slot * PAGE_SIZE as u64)
                .context("reading the QEMU relay's staging file")?;
            digests.push(*digest);
            pages.push(page);
            if digests.len() == ARCHIVE_CHUNK {
                archived.pages += insert(&mut digests, &mut pages)?;
            }
        }
        archived.pages += insert(&mut digests, &mut pages)?;
        if let Some(store) = lock(&self.index).store_mut() {
            store.flush()?;
        }
        Ok(archived)
    }
}

/// The staging thread: each distinct content once, up to `capacity` of them.
fn stage(pages: Receiver<(Digest, Page)>, file: File, capacity: u64, skipped: &AtomicU64) -> anyhow::Result<Staging> {
    let mut staging = Staging {
        file,
        slots: std::collections::HashMap::new(),
    };
    for (digest, page) in pages {
        if staging.slots.contains_key(&digest) {
            continue;
        }
        let slot = staging.slots.len() as u64;
        if slot >= capacity {
            skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        staging
            .file
            .write_all_at(&page[..], slot * PAGE_SIZE as u64)
            .context("writing the QEMU relay's staging file")?;
        staging.slots.insert(digest, slot);
    }
    Ok(staging)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_store::PageStore;

    fn content(tag: u8) -> Page {
        let mut page = Box::new([tag; PAGE_SIZE]);
        page[1] = 0xa5;
        page
    }

    fn index_with_store(dir: &std::path::Path, capacity: u64) -> Arc<Mutex<ContentIndex>> {
        let hasher = PageHasher::new(&[9; 32]);
        let store = PageStore::open(dir, capacity, hasher.key_fingerprint()).unwrap();
        Arc::new(Mutex::new(ContentIndex::new(hasher, Some(store))))
    }

    #[test]
    fn only_the_last_contents_are_archived_and_the_store_resolves_them() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_store(dir.path(), 64);
        let hasher = lock(&index).hasher().clone();
        let digest = |tag: u8| hasher.digest(&content(tag));
        let (stager, mut tee) = Stager::start(&index).expect("a store");
        for tag in [1, 2, 3, 2, 1] {
            tee.page(digest(tag), content(tag));
        }
        drop(tee);
        // Content 1 was overwritten; 4 was never staged (the host held it, say).
        let archived = stager.commit(&[digest(2), digest(3), digest(4)]).unwrap();
        assert_eq!(archived, Archived { pages: 2, skipped: 0 });
        assert_eq!(lock(&index).stats().store_pages, 2);
        assert!(!lock(&index).contains(&digest(1)));
        let mut out = [0u8; PAGE_SIZE];
        assert!(HostIndex::new(Arc::clone(&index), "qemu".into()).fetch(&digest(3), &mut out));
        assert_eq!(out, *content(3));
        assert_eq!(lock(&index).stats().resolved_store, 1);
    }

    #[test]
    fn a_full_channel_or_staging_skips_and_counts_and_a_dropped_stager_archives_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_store(dir.path(), 2);
        let hasher = lock(&index).hasher().clone();
        let digest = |tag: u8| hasher.digest(&content(tag));
        // Staging holds at most the store's capacity: the third content is skipped.
        let (stager, mut tee) = Stager::start(&index).unwrap();
        for tag in [1, 2, 3] {
            tee.page(digest(tag), content(tag));
        }
        drop(tee);
        let archived = stager.commit(&[digest(1), digest(2), digest(3)]).unwrap();
        assert_eq!(archived, Archived { pages: 2, skipped: 1 });

        // A channel of one page: the tee never waits; what it drops is counted, the rest archived.
        let store_dir = tempfile::tempdir().unwrap();
        let index = index_with_store(store_dir.path(), 256);
        let (stager, mut tee) = Stager::start_bounded(&index, 1).unwrap();
        for tag in 0..200u8 {
            tee.page(digest(tag), content(tag));
        }
        drop(tee);
        let all: Vec<Digest> = (0..200u8).map(digest).collect();
        let archived = stager.commit(&all).unwrap();
        assert_eq!(archived.pages + archived.skipped, 200, "{archived:?}");

        // Dropped without a commit (the migration failed): nothing reaches the store.
        let store_dir = tempfile::tempdir().unwrap();
        let index = index_with_store(store_dir.path(), 64);
        let (stager, mut tee) = Stager::start(&index).unwrap();
        tee.page(digest(1), content(1));
        drop(tee);
        drop(stager);
        assert_eq!(lock(&index).stats().store_pages, 0);
    }

    #[test]
    fn a_source_refuses_an_advertisement_larger_than_any_agent_sends() {
        assert_eq!(advertised(vec![1, 2, 2]).unwrap().len(), 2);
        let error = advertised(vec![0; MAX_ADVERTISED + 1]).unwrap_err();
        assert!(error.to_string().contains("advertised"), "{error}");
    }
}
