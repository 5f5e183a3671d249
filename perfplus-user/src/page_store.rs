//! The on-disk page store: a bounded, persistent, content-addressed ring of 4 KiB pages.
//!
//! An agent keeps, in its `--state-dir`, pages of VMs that left this host (migrated away). When a VM
//! (or one like it: same OS image, same libraries) migrates back, the source is told these digests are
//! held and sends references instead of pages. The store is a cache: losing it costs bandwidth, never
//! correctness, so anything doubtful is dropped rather than trusted.
//!
//! # On-disk layout (version 1, all integers little-endian)
//!
//! `pagestore.dat`: `capacity` slots of 4096 bytes; slot `i` at byte offset `i * 4096`.
//!
//! `pagestore.idx`: a 64-byte header, then `capacity` records of 64 bytes (record `i` at
//! `64 + i * 64`; 64-byte records never straddle a disk sector).
//!
//! | header bytes | field |
//! |---|---|
//! | 0..8   | magic `b"PPSTORE1"` |
//! | 8..12  | version `u32` = 1 |
//! | 12..16 | record size `u32` = 64 |
//! | 16..32 | key fingerprint ([`key_fingerprint`](crate::hashing::key_fingerprint)) |
//! | 32..40 | capacity `u64` (slots) |
//! | 40..48 | page size `u64` = 4096 |
//! | 48..56 | reserved, zero |
//! | 56..64 | `xxh3_64(bytes 0..56)` |
//!
//! | record bytes | field |
//! |---|---|
//! | 0..16  | keyed page digest |
//! | 16..24 | insertion sequence number `u64`; 0 = empty slot |
//! | 24..32 | `xxh3_64` of the slot's 4096 data bytes |
//! | 32..56 | reserved, zero |
//! | 56..64 | `xxh3_64_with_seed(bytes 0..56, seed = slot index)` |
//!
//! There is no "next slot" field to keep in sync: the ring position is derived on open from the
//! record with the highest sequence number (the newest insert), so it cannot disagree with the records.
//!
//! # What is trusted, and why that is enough
//!
//! * **Whole store.** Discarded, with a `warn!` naming the reason, if the header's magic, version,
//!   checksum, capacity or key fingerprint do not match, or a file has the wrong size (truncated). A
//!   store written under another key holds digests this agent cannot reproduce, so it is useless; one
//!   with another capacity is rebuilt (simplest; the store is a cache).
//! * **Record.** Its checksum covers its own slot index, so a torn, zeroed or misplaced record is
//!   treated as an empty slot. Duplicate digests keep the newest.
//! * **Crash mid-insert.** An insert writes (1) a zero record over the slot, (2) the data, (3) the new
//!   record; no fsync between them (that would cost milliseconds per page). After a process crash
//!   the page cache keeps that order, so a slot is either empty or complete. After a power loss the
//!   disk may have reordered the writes, so every record also carries `xxh3_64` of its data, and
//!   [`PageStore::get`] checks it on every read: a record pointing at data it was not written with
//!   (torn write, bit rot, a later insert that reached the disk without its record) reads as *absent*.
//! * **Adversarial content.** xxh3 is unkeyed, so in principle a guest could craft data whose torn
//!   mixture matches a checksum, if it could also time a power failure. For full certainty
//!   [`PageStore::get_verified`] re-hashes the page with the keyed [`PageHasher`] (~7 µs a page) and
//!   compares with the digest; the content index does that by default (its `verify_store` option).
//!
//! The directory is created 0700 and both files 0600 (they hold guest memory); see
//! [`crate::private_files`]. The contents are not encrypted.
//!
//! `capacity == 0` disables the store: no files are created or read, inserts are dropped.
//! One process at a time: the index file is locked (`flock`) while a store is open.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use perfplus_common::PAGE_SIZE;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::hashing::{page_checksum, PageDigest, PageHasher};
use crate::private_files;

/// File name of the page data.
pub const DATA_FILE: &str = "pagestore.dat";
/// File name of the header and slot records.
pub const INDEX_FILE: &str = "pagestore.idx";

const MAGIC: [u8; 8] = *b"PPSTORE1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
const RECORD_LEN: usize = 64;
const PAGE: u64 = PAGE_SIZE as u64;

/// What the store knows about one slot (32 bytes in memory).
#[derive(Clone, Copy, Default)]
struct SlotMeta {
    digest: PageDigest,
    /// 0 = empty.
    seq: u64,
    data_check: u64,
}

/// Open files of an enabled store.
struct Files {
    data: File,
    index: File,
}

/// A bounded, persistent, content-addressed store of 4 KiB pages (see the module docs).
pub struct PageStore {
    dir: PathBuf,
    capacity: u64,
    key_fingerprint: [u8; 16],
    /// `None` when the store is disabled (capacity 0).
    files: Option<Files>,
    slots: Vec<SlotMeta>,
    by_digest: HashMap<PageDigest, u32>,
    next_slot: u64,
    next_seq: u64,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl PageStore {
    /// Opens (or creates) the store in `dir`, holding at most `capacity_pages` pages, for digests made
    /// under the key whose fingerprint is `key_fingerprint`. An existing store that does not match
    /// (another key, another capacity, corrupt or truncated) is discarded with a warning, never trusted.
    /// Errors only on I/O failure or if another process has the store open.
    pub fn open(dir: &Path, capacity_pages: u64, key_fingerprint: [u8; 16]) -> Result<PageStore> {
        let mut store = PageStore {
            dir: dir.to_path_buf(),
            capacity: capacity_pages,
            key_fingerprint,
            files: None,
            slots: Vec::new(),
            by_digest: HashMap::new(),
            next_slot: 0,
            next_seq: 1,
        };
        if capacity_pages == 0 {
            return Ok(store);
        }
        anyhow::ensure!(
            capacity_pages <= u64::from(u32::MAX),
            "page store capacity {capacity_pages} pages is too large (max {})",
            u32::MAX
        );
        // The pages are guest memory: the directory is 0700 and the files 0600 (tightened if an older
        // store was made with more).
        private_files::own_dir(dir).with_context(|| format!("creating page store directory {}", dir.display()))?;
        let open = |name: &str| -> Result<File> { private_files::open_own_file(&dir.join(name)) };
        let index = open(INDEX_FILE)?;
        index.try_lock().map_err(|e| {
            anyhow::anyhow!(
                "page store {} is in use by another process ({e})",
                dir.join(INDEX_FILE).display()
            )
        })?;
        let data = open(DATA_FILE)?;
        store.files = Some(Files { data, index });

        let fresh = Self::is_fresh(store.files.as_ref().expect("just set"))?;
        let loaded = if fresh {
            Err("no store yet".to_string())
        } else {
            store.load()?
        };
        match loaded {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), pages = store.len(), capacity = capacity_pages,
                    "page store opened");
            }
            Err(why) => {
                if !fresh {
                    tracing::warn!(dir = %dir.display(), reason = %why,
                        "discarding page store: it cannot be trusted");
                }
                store.reset()?;
            }
        }
        Ok(store)
    }

    /// Both files empty: a store being created, not one being discarded.
    fn is_fresh(files: &Files) -> Result<bool> {
        Ok(files.index.metadata()?.len() == 0 && files.data.metadata()?.len() == 0)
    }

    /// Reads and validates an existing store. `Ok(Err(reason))` = not trustworthy as a whole.
    fn load(&mut self) -> Result<std::result::Result<(), String>> {
        let files = self.files.as_ref().expect("enabled store");
        let cap = self.capacity;
        let want_index_len = HEADER_LEN + cap * RECORD_LEN as u64;
        let index_len = files.index.metadata()?.len();
        let data_len = files.data.metadata()?.len();
        if index_len < HEADER_LEN {
            return Ok(Err(format!("index file truncated ({index_len} bytes, no header)")));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        files.index.read_exact_at(&mut header, 0)?;
        if header[0..8] != MAGIC {
            return Ok(Err("bad magic in index header".into()));
        }
        if u64::from_le_bytes(header[56..64].try_into().expect("8")) != xxh3_64(&header[..56]) {
            return Ok(Err("index header checksum mismatch (corrupt header)".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4"));
        if version != VERSION {
            return Ok(Err(format!(
                "store version {version}, this agent reads version {VERSION}"
            )));
        }
        let record_len = u32::from_le_bytes(header[12..16].try_into().expect("4"));
        let page_size = u64::from_le_bytes(header[40..48].try_into().expect("8"));
        if record_len as usize != RECORD_LEN || page_size != PAGE {
            return Ok(Err(format!(
                "record size {record_len} / page size {page_size}, expected {RECORD_LEN} / {PAGE}"
            )));
        }
        if header[16..32] != self.key_fingerprint {
            return Ok(Err(format!(
                "written under another page-hash key (fingerprint {}, ours {})",
                hex::encode(&header[16..32]),
                hex::encode(self.key_fingerprint)
            )));
        }
        let stored_cap = u64::from_le_bytes(header[32..40].try_into().expect("8"));
        if stored_cap != cap {
            return Ok(Err(format!("capacity changed from {stored_cap} to {cap} pages")));
        }
        if index_len != want_index_len {
            return Ok(Err(format!(
                "index file is {index_len} bytes, expected {want_index_len} (truncated?)"
            )));
        }
        if data_len != cap * PAGE {
            return Ok(Err(format!(
                "data file is {data_len} bytes, expected {} (truncated?)",
                cap * PAGE
            )));
        }

        let mut records = vec![0u8; cap as usize * RECORD_LEN];
        files.index.read_exact_at(&mut records, HEADER_LEN)?;
        let mut slots = vec![SlotMeta::default(); cap as usize];
        let mut by_digest: HashMap<PageDigest, u32> = HashMap::with_capacity(cap as usize);
        let (mut bad, mut dup) = (0u64, 0u64);
        let mut newest: Option<(u64, u64)> = None; // (seq, slot)
        for (slot, rec) in records.chunks_exact(RECORD_LEN).enumerate() {
            let Some(meta) = decode_record(slot as u64, rec) else {
                bad += 1;
                continue;
            };
            if meta.seq == 0 {
                continue;
            }
            if newest.is_none_or(|(s, _)| meta.seq > s) {
                newest = Some((meta.seq, slot as u64));
            }
            if let Some(&other) = by_digest.get(&meta.digest) {
                dup += 1;
                if slots[other as usize].seq > meta.seq {
                    continue;
                }
                slots[other as usize] = SlotMeta::default();
            }
            by_digest.insert(meta.digest, slot as u32);
            slots[slot] = meta;
        }
        if bad > 0 || dup > 0 {
            tracing::warn!(dir = %self.dir.display(), torn_or_corrupt = bad, duplicates = dup,
                "page store: ignoring slot records that cannot be trusted");
        }
        if let Some((seq, slot)) = newest {
            self.next_seq = seq + 1;
            self.next_slot = (slot + 1) % cap;
        }
        self.slots = slots;
        self.by_digest = by_digest;
        Ok(Ok(()))
    }

    /// Recreates empty files with a fresh header.
    fn reset(&mut self) -> Result<()> {
        let files = self.files.as_ref().expect("enabled store");
        let cap = self.capacity;
        // Header last: until it is written and synced, a crash leaves a store the next open discards.
        files.index.set_len(0)?;
        files.data.set_len(0)?;
        files.data.set_len(cap * PAGE)?;
        files.index.set_len(HEADER_LEN + cap * RECORD_LEN as u64)?;
        files.data.sync_all()?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
        header[16..32].copy_from_slice(&self.key_fingerprint);
        header[32..40].copy_from_slice(&cap.to_le_bytes());
        header[40..48].copy_from_slice(&PAGE.to_le_bytes());
        let check = xxh3_64(&header[..56]);
        header[56..64].copy_from_slice(&check.to_le_bytes());
        files.index.write_all_at(&header, 0)?;
        files.index.sync_all()?;
        self.slots = vec![SlotMeta::default(); cap as usize];
        self.by_digest = HashMap::with_capacity(cap as usize);
        self.next_slot = 0;
        self.next_seq = 1;
        Ok(())
    }

    /// Adds `page` under `digest` (which the caller computed with the store's key). No-op if the digest
    /// is present or the store is disabled; when full, the oldest page is evicted (FIFO ring).
    pub fn insert(&mut self, digest: &PageDigest, page: &[u8; PAGE_SIZE]) -> Result<()> {
        let Some(files) = self.files.as_ref() else {
            return Ok(());
        };
        if self.by_digest.contains_key(digest) {
            return Ok(());
        }
        let slot = self.next_slot;
        let old = std::mem::take(&mut self.slots[slot as usize]);
        if old.seq != 0 {
            self.by_digest.remove(&old.digest);
        }
        let rec_off = HEADER_LEN + slot * RECORD_LEN as u64;
        // (1) the slot is empty on disk, (2) its data, (3) its record: see the module docs.
        files
            .index
            .write_all_at(&[0u8; RECORD_LEN], rec_off)
            .context("page store: clearing slot record")?;
        files
            .data
            .write_all_at(page, slot * PAGE)
            .context("page store: writing page")?;
        let meta = SlotMeta {
            digest: *digest,
            seq: self.next_seq,
            data_check: page_checksum(page),
        };
        files
            .index
            .write_all_at(&encode_record(slot, &meta), rec_off)
            .context("page store: writing slot record")?;
        self.slots[slot as usize] = meta;
        self.by_digest.insert(*digest, slot as u32);
        self.next_seq += 1;
        self.next_slot = (slot + 1) % self.capacity;
        Ok(())
    }

    /// Copies the page stored under `digest` into `out`. `Ok(false)` if absent, or if the data on disk
    /// no longer matches the checksum it was written with (torn write, corruption: logged).
    pub fn get(&self, digest: &PageDigest, out: &mut [u8; PAGE_SIZE]) -> Result<bool> {
        let (Some(files), Some(&slot)) = (self.files.as_ref(), self.by_digest.get(digest)) else {
            return Ok(false);
        };
        let slot = u64::from(slot);
        files
            .data
            .read_exact_at(out, slot * PAGE)
            .context("page store: reading page")?;
        if page_checksum(out) != self.slots[slot as usize].data_check {
            tracing::warn!(dir = %self.dir.display(), slot,
                "page store: slot data does not match its record checksum; not used");
            return Ok(false);
        }
        Ok(true)
    }

    /// [`get`](Self::get), then re-hashes the page with the keyed `hasher` and returns `Ok(false)` (with
    /// a warning) unless it reproduces `digest`. Costs one keyed hash (~7 µs) more than `get`.
    pub fn get_verified(&self, digest: &PageDigest, out: &mut [u8; PAGE_SIZE], hasher: &PageHasher) -> Result<bool> {
        if !self.get(digest, out)? {
            return Ok(false);
        }
        if hasher.digest(out) != *digest {
            tracing::warn!(dir = %self.dir.display(),
                "page store: page does not hash to its digest; not used");
            return Ok(false);
        }
        Ok(true)
    }

    /// Forgets `digest` (e.g. after [`get`](Self::get) found its data bad). Returns whether it was held.
    pub fn remove(&mut self, digest: &PageDigest) -> Result<bool> {
        let (Some(files), Some(slot)) = (self.files.as_ref(), self.by_digest.remove(digest)) else {
            return Ok(false);
        };
        self.slots[slot as usize] = SlotMeta::default();
        files
            .index
            .write_all_at(&[0u8; RECORD_LEN], HEADER_LEN + u64::from(slot) * RECORD_LEN as u64)
            .context("page store: clearing slot record")?;
        Ok(true)
    }

    /// Whether a page with `digest` is held.
    pub fn contains(&self, digest: &PageDigest) -> bool {
        self.by_digest.contains_key(digest)
    }

    /// Number of pages held.
    pub fn len(&self) -> u64 {
        self.by_digest.len() as u64
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Maximum number of pages (0 = disabled).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Fingerprint of the key the store's digests were made with.
    pub fn key_fingerprint(&self) -> [u8; 16] {
        self.key_fingerprint
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every digest held, in no particular order.
    pub fn digests(&self) -> impl Iterator<Item = &PageDigest> + '_ {
        self.by_digest.keys()
    }

    /// Approximate heap memory of the in-memory index, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        (self.slots.capacity() * std::mem::size_of::<SlotMeta>()) as u64
            + (self.by_digest.capacity() * (std::mem::size_of::<(PageDigest, u32)>() + 1)) as u64
    }

    /// Makes everything inserted so far durable (fdatasync of both files).
    pub fn flush(&mut self) -> Result<()> {
        if let Some(files) = self.files.as_ref() {
            files.data.sync_data().context("page store: syncing data")?;
            files.index.sync_data().context("page store: syncing index")?;
        }
        Ok(())
    }
}

fn encode_record(slot: u64, m: &SlotMeta) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..16].copy_from_slice(&m.digest);
    r[16..24].copy_from_slice(&m.seq.to_le_bytes());
    r[24..32].copy_from_slice(&m.data_check.to_le_bytes());
    let check = xxh3_64_with_seed(&r[..56], slot);
    r[56..64].copy_from_slice(&check.to_le_bytes());
    r
}

/// `None` = torn or corrupt; `Some` with `seq == 0` = empty slot.
fn decode_record(slot: u64, r: &[u8]) -> Option<SlotMeta> {
    if r.iter().all(|&b| b == 0) {
        return Some(SlotMeta::default());
    }
    let check = u64::from_le_bytes(r[56..64].try_into().expect("8"));
    if check != xxh3_64_with_seed(&r[..56], slot) {
        return None;
    }
    let seq = u64::from_le_bytes(r[16..24].try_into().expect("8"));
    if seq == 0 {
        return None;
    }
    Some(SlotMeta {
        digest: r[0..16].try_into().expect("16"),
        seq,
        data_check: u64::from_le_bytes(r[24..32].try_into().expect("8")),
    })
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    const FP: [u8; 16] = [7; 16];

    fn hasher() -> PageHasher {
        PageHasher::new(&[9; 32])
    }

    fn page(tag: u32) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, c) in p.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&(tag.wrapping_mul(2_654_435_761) ^ i as u32).to_le_bytes());
        }
        p
    }

    fn put(s: &mut PageStore, h: &PageHasher, tag: u32) -> PageDigest {
        let p = page(tag);
        let d = h.digest(&p);
        s.insert(&d, &p).unwrap();
        d
    }

    fn has(s: &PageStore, h: &PageHasher, tag: u32) -> bool {
        let mut out = [0u8; PAGE_SIZE];
        let d = h.digest(&page(tag));
        let got = s.get(&d, &mut out).unwrap();
        assert_eq!(got, s.contains(&d));
        if got {
            assert_eq!(out, page(tag));
        }
        got
    }

    #[test]
    fn insert_get_and_duplicate_insert() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut s = PageStore::open(dir.path(), 8, FP).unwrap();
        assert_eq!((s.len(), s.capacity()), (0, 8));
        let d1 = put(&mut s, &h, 1);
        put(&mut s, &h, 2);
        put(&mut s, &h, 1); // already present: no-op, takes no slot
        assert_eq!(s.len(), 2);
        assert!(has(&s, &h, 1) && has(&s, &h, 2) && !has(&s, &h, 3));
        let mut out = [0u8; PAGE_SIZE];
        assert!(s.get_verified(&d1, &mut out, &h).unwrap());
        // A hasher with another key does not reproduce the digest.
        assert!(!s.get_verified(&d1, &mut out, &PageHasher::new(&[1; 32])).unwrap());
        let mut all: Vec<_> = s.digests().copied().collect();
        all.sort();
        let mut want = vec![d1, h.digest(&page(2))];
        want.sort();
        assert_eq!(all, want);
        assert!(s.remove(&d1).unwrap());
        assert!(!has(&s, &h, 1) && s.len() == 1);
    }

    #[test]
    fn evicts_oldest_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        let mut s = PageStore::open(dir.path(), 3, FP).unwrap();
        for t in 1..=3 {
            put(&mut s, &h, t);
        }
        put(&mut s, &h, 4);
        assert_eq!(s.len(), 3);
        assert!(!has(&s, &h, 1));
        assert!(has(&s, &h, 2) && has(&s, &h, 3) && has(&s, &h, 4));
        put(&mut s, &h, 5);
        assert!(!has(&s, &h, 2) && has(&s, &h, 5));
    }

    #[test]
    fn persists_across_reopen_including_ring_position() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        {
            let mut s = PageStore::open(dir.path(), 3, FP).unwrap();
            for t in 1..=4 {
                put(&mut s, &h, t); // 4 evicted 1; 2 is now the oldest
            }
            s.flush().unwrap();
        }
        let mut s = PageStore::open(dir.path(), 3, FP).unwrap();
        assert_eq!(s.len(), 3);
        assert!(!has(&s, &h, 1) && has(&s, &h, 2) && has(&s, &h, 3) && has(&s, &h, 4));
        put(&mut s, &h, 5);
        assert!(!has(&s, &h, 2) && has(&s, &h, 3) && has(&s, &h, 5));
    }

    #[test]
    fn second_open_while_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = PageStore::open(dir.path(), 2, FP).unwrap();
        let err = PageStore::open(dir.path(), 2, FP).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    /// A store with pages 1 and 2, closed.
    fn closed_store(dir: &Path, h: &PageHasher) {
        let mut s = PageStore::open(dir, 4, FP).unwrap();
        put(&mut s, h, 1);
        put(&mut s, h, 2);
        s.flush().unwrap();
    }

    #[test]
    fn other_key_fingerprint_discards() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        closed_store(dir.path(), &h);
        let s = PageStore::open(dir.path(), 4, [8; 16]).unwrap();
        assert!(s.is_empty());
        drop(s);
        // And the store is now written under the new fingerprint: the old one sees nothing either.
        assert!(PageStore::open(dir.path(), 4, FP).unwrap().is_empty());
    }

    #[test]
    fn truncated_or_corrupt_files_discard() {
        let h = hasher();
        type Damage = fn(&Path);
        let damage: [(&str, Damage); 5] = [
            ("data-truncated", |d| {
                let f = OpenOptions::new().write(true).open(d.join(DATA_FILE)).unwrap();
                f.set_len(3 * PAGE + 100).unwrap();
            }),
            ("index-truncated", |d| {
                let f = OpenOptions::new().write(true).open(d.join(INDEX_FILE)).unwrap();
                f.set_len(HEADER_LEN + 2 * RECORD_LEN as u64).unwrap();
            }),
            ("index-tiny", |d| {
                let f = OpenOptions::new().write(true).open(d.join(INDEX_FILE)).unwrap();
                f.set_len(10).unwrap();
            }),
            ("header-corrupt", |d| {
                let f = OpenOptions::new().write(true).open(d.join(INDEX_FILE)).unwrap();
                f.write_all_at(&[0xee], 33).unwrap();
            }),
            ("data-missing", |d| std::fs::remove_file(d.join(DATA_FILE)).unwrap()),
        ];
        for (name, f) in damage {
            let dir = tempfile::tempdir().unwrap();
            closed_store(dir.path(), &h);
            f(dir.path());
            let mut s = PageStore::open(dir.path(), 4, FP).unwrap();
            assert!(s.is_empty(), "{name}: damaged store must be discarded");
            // The store is usable again after the discard.
            put(&mut s, &h, 3);
            assert!(has(&s, &h, 3), "{name}");
        }
    }

    #[test]
    fn capacity_change_discards() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        closed_store(dir.path(), &h);
        assert!(PageStore::open(dir.path(), 5, FP).unwrap().is_empty());
    }

    #[test]
    fn torn_record_loses_only_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        closed_store(dir.path(), &h);
        // Page 1 is in slot 0: tear its record.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(INDEX_FILE))
            .unwrap();
        f.write_all_at(&[0x55; 8], HEADER_LEN + 4).unwrap();
        drop(f);
        let s = PageStore::open(dir.path(), 4, FP).unwrap();
        assert_eq!(s.len(), 1);
        assert!(!has(&s, &h, 1) && has(&s, &h, 2));
    }

    #[test]
    fn record_moved_to_another_slot_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        closed_store(dir.path(), &h);
        // Copy slot 0's (valid) record over slot 2's: its checksum is bound to slot 0.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join(INDEX_FILE))
            .unwrap();
        let mut rec = [0u8; RECORD_LEN];
        f.read_exact_at(&mut rec, HEADER_LEN).unwrap();
        f.write_all_at(&rec, HEADER_LEN + 2 * RECORD_LEN as u64).unwrap();
        drop(f);
        let s = PageStore::open(dir.path(), 4, FP).unwrap();
        assert_eq!(s.len(), 2);
        assert!(has(&s, &h, 1) && has(&s, &h, 2));
    }

    #[test]
    fn data_not_matching_its_record_is_not_returned() {
        // As after a power loss where the data of a new insert reached the disk but its record did not.
        let dir = tempfile::tempdir().unwrap();
        let h = hasher();
        closed_store(dir.path(), &h);
        let f = OpenOptions::new().write(true).open(dir.path().join(DATA_FILE)).unwrap();
        f.write_all_at(&page(99), PAGE).unwrap(); // slot 1 = page 2
        drop(f);
        let s = PageStore::open(dir.path(), 4, FP).unwrap();
        assert!(has(&s, &h, 1));
        let mut out = [0u8; PAGE_SIZE];
        assert!(!s.get(&h.digest(&page(2)), &mut out).unwrap());
        assert!(!s.get_verified(&h.digest(&page(2)), &mut out, &h).unwrap());
    }

    #[test]
    fn capacity_zero_is_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("never-created");
        let h = hasher();
        let mut s = PageStore::open(&sub, 0, FP).unwrap();
        put(&mut s, &h, 1);
        assert!(s.is_empty() && !has(&s, &h, 1));
        s.flush().unwrap();
        assert!(!sub.exists());
    }
}
