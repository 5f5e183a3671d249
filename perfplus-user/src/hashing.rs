//! Perf+ page hashing: what a page contains, in 16 bytes.
//!
//! Every page the source is about to send is hashed. The digest decides two things:
//! * **Did it change?** A page whose digest equals the digest it had when it was last sent is not sent
//!   again (dirty logging under kvm-pvm also reports pages the guest only read).
//! * **Does the destination already hold it?** A page whose digest the destination holds (its
//!   [`ContentIndex`](crate::content_index::ContentIndex): on-disk store, hosted VMs, pages already
//!   received) is sent as a reference — the digest — instead of 4 KiB.
//!
//! # Why a *keyed* digest (HMAC-MD5)
//!
//! The second use is dangerous with an unkeyed hash. The destination substitutes content it already
//! holds for a reference, so if a guest can produce two different pages `A != B` with `H(A) == H(B)`, it
//! can make a destination hand `B` to whichever VM was meant to receive `A` — another tenant's VM, or
//! its own, with content it was not supposed to see or to influence. Plain MD5 collisions are cheap
//! (seconds on a laptop; chosen-prefix collisions in hours), and the guest fully controls its pages.
//!
//! So the digest is `HMAC-MD5(K, page)` with a 32-byte key `K` that the agents derive from the cluster's
//! secret and that no guest ever sees:
//! * All known MD5 collision attacks (identical-prefix and chosen-prefix) need to evaluate the
//!   compression function on chosen inputs from a *known* chaining value. Under HMAC the chaining value
//!   after the first block is `MD5-compress(IV, K ^ ipad)`, unknown to the guest, and the guest never
//!   sees any digest either (they travel between agents only), so it has neither the starting state
//!   nor an oracle to search with. HMAC's security needs only that MD5's compression function behaves
//!   as a PRF, which the collision attacks do not contradict (RFC 6151, section 2.3: HMAC-MD5 is not
//!   urgently threatened by the collision attacks). This is why MD5, ~4x faster than SHA-256 on this
//!   CPU, is still acceptable here.
//! * Why HMAC rather than `MD5(K || page)`: a key prefix makes the digest a Merkle–Damgård chaining
//!   value, so anyone holding `MD5(K || m)` can compute `MD5(K || m || pad || x)` without `K` (length
//!   extension); `MD5(page || K)` inherits every unkeyed collision of `page` (a collision in the first
//!   4 KiB stays a collision after appending `K`). HMAC's nested construction, `H(K^opad || H(K^ipad ||
//!   m))`, closes both, and is the standard, analysed way to key a hash.
//!
//! Digests are 128 bits: the birthday bound (2^64 pages) is far beyond any memory size, so accidental
//! collisions are not a concern either.
//!
//! # Cost
//!
//! HMAC's two keyed blocks (`K ^ ipad`, `K ^ opad`) are compressed once, in [`PageHasher::new`]; each
//! page then clones that precomputed state and costs MD5 of 4096 bytes (64 compressions) plus the two
//! compressions that finish the inner and outer hash: 66 instead of 64, ~3 % over plain MD5. Measured
//! speeds are in `benches/hashing.rs`.
//!
//! # Many pages at once
//!
//! MD5 is one serial chain of dependent steps per message, so one page at a time leaves most of a core
//! idle. [`PageHasher::digest_many`] hashes eight pages at once in the eight 32-bit lanes of AVX2's
//! registers (`md5x8`, chosen at run time when the CPU has AVX2; otherwise it is [`PageHasher::digest`]
//! page after page). The digests are the same, bit for bit: only the speed differs (see
//! `benches/hashing.rs`). Callers that hash pages in bulk (a round's dirty pages, indexing or archiving
//! a VM) collect a few dozen pages and hash them together.
//!
//! [`page_checksum`] (xxh3-64, unkeyed, ~100x faster) is *not* for dedup: it compares whole guest
//! memories after a migration, and guards the on-disk store against torn writes and bit rot.
use std::borrow::Borrow;

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::CHECKSUM_GROUP_PAGES;
use sha2::Sha256;

#[cfg(target_arch = "x86_64")]
mod md5x8;

/// The keyed digest of one 4 KiB page (HMAC-MD5).
pub type PageDigest = [u8; 16];

/// Length of the key a [`PageHasher`] is built from.
pub const PAGE_KEY_LEN: usize = 32;

/// Domain-separation label of [`key_fingerprint`].
const FINGERPRINT_LABEL: &[u8] = b"perfplus page-hash key fingerprint v1";

/// Computes keyed page digests (HMAC-MD5 under a 32-byte key). Cheap to clone, `Send + Sync`: share one
/// per thread, or call [`PageHasher::digest`] from many threads on a shared one.
#[derive(Clone)]
pub struct PageHasher {
    /// HMAC state with the key's inner and outer blocks already compressed.
    keyed: Hmac<Md5>,
    /// The same two chaining values as bare MD5 states, for hashing many pages at once.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    states: KeyStates,
    /// [`key_fingerprint`] of the key.
    fingerprint: [u8; 16],
}

/// MD5's chaining values after HMAC's first block of the inner hash (`K ^ ipad`) and of the outer hash
/// (`K ^ opad`).
#[derive(Clone, Copy)]
struct KeyStates {
    inner: [u32; 4],
    outer: [u32; 4],
}

impl KeyStates {
    /// RFC 2104: a key longer than a block is replaced by its MD5; the key is padded with zeros to a
    /// block and XORed with 0x36 (inner) or 0x5c (outer); each block is compressed from MD5's IV.
    fn new(key: &[u8]) -> Self {
        let hashed: [u8; 16];
        let key = if key.len() > BLOCK {
            hashed = <Md5 as md5::Digest>::digest(key).into();
            &hashed[..]
        } else {
            key
        };
        let state_after = |pad: u8| {
            let mut block = [pad; BLOCK];
            for (b, k) in block.iter_mut().zip(key) {
                *b ^= k;
            }
            let mut state = MD5_IV;
            md5::block_api::compress(&mut state, &[block]);
            state
        };
        Self {
            inner: state_after(0x36),
            outer: state_after(0x5c),
        }
    }
}

/// MD5's block size.
const BLOCK: usize = 64;
/// MD5's initial chaining value (RFC 1321).
const MD5_IV: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
/// Fewest pages worth a multi-buffer pass with idle lanes: below this, the remainder of a batch is
/// hashed page by page (one eight-lane pass costs about 1.25 scalar pages: `benches/hashing.rs`, batches
/// of 2 already hash ~1.6x as many pages per second as one at a time).
#[cfg(target_arch = "x86_64")]
const MIN_SIMD_PAGES: usize = 2;

impl PageHasher {
    /// Builds a hasher for `key` (derived by the caller from the cluster's secret).
    pub fn new(key: &[u8; PAGE_KEY_LEN]) -> Self {
        Self::with_key_bytes(key)
    }

    /// Any key length, for the RFC 2202 test vectors (HMAC hashes keys longer than a block first).
    fn with_key_bytes(key: &[u8]) -> Self {
        let keyed = <Hmac<Md5> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
        Self {
            keyed,
            states: KeyStates::new(key),
            fingerprint: fingerprint_of(key),
        }
    }

    /// The keyed digest of `page`: `HMAC-MD5(key, page)`.
    #[inline]
    pub fn digest(&self, page: &[u8; PAGE_SIZE]) -> PageDigest {
        self.mac(page)
    }

    /// The keyed digests of `pages`, in their order: for each, what [`PageHasher::digest`] gives, but
    /// eight pages at once on a CPU with AVX2 (several times the pages per second of one core; see the
    /// module docs). Takes anything that borrows as a page: `&[u8; PAGE_SIZE]`, boxed or plain pages.
    pub fn digest_many<P: Borrow<[u8; PAGE_SIZE]>>(&self, pages: &[P]) -> Vec<PageDigest> {
        let mut out = vec![[0u8; 16]; pages.len()];
        self.digest_many_into(pages, &mut out);
        out
    }

    /// [`PageHasher::digest_many`] into `out` (one digest per page: `out.len() == pages.len()`).
    pub fn digest_many_into<P: Borrow<[u8; PAGE_SIZE]>>(&self, pages: &[P], out: &mut [PageDigest]) {
        assert_eq!(pages.len(), out.len(), "one digest per page");
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = md5x8::Md5x8::detect() {
            return self.digest_many_simd(simd, pages, out);
        }
        for (page, digest) in pages.iter().zip(out) {
            *digest = self.digest(page.borrow());
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn digest_many_simd<P: Borrow<[u8; PAGE_SIZE]>>(&self, simd: md5x8::Md5x8, pages: &[P], out: &mut [PageDigest]) {
        use md5x8::LANES;
        let KeyStates { inner, outer } = &self.states;
        for (pages, out) in pages.chunks(LANES).zip(out.chunks_mut(LANES)) {
            if pages.len() < MIN_SIMD_PAGES {
                for (page, digest) in pages.iter().zip(out) {
                    *digest = self.digest(page.borrow());
                }
                continue;
            }
            // A short last chunk fills its idle lanes with its first page; their digests are dropped.
            let lanes: [&[u8; PAGE_SIZE]; LANES] =
                std::array::from_fn(|lane| pages.get(lane).unwrap_or(&pages[0]).borrow());
            let digests = simd.hmac_pages(inner, outer, &lanes);
            out.copy_from_slice(&digests[..out.len()]);
        }
    }

    /// HMAC-MD5 of any message (the page path is this with 4096 bytes).
    #[inline]
    fn mac(&self, data: &[u8]) -> PageDigest {
        let mut m = self.keyed.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Fingerprint of this hasher's key (see [`key_fingerprint`]).
    pub fn key_fingerprint(&self) -> [u8; 16] {
        self.fingerprint
    }
}

impl std::fmt::Debug for PageHasher {
    /// Never prints the key or the keyed state; the fingerprint identifies it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHasher")
            .field("key_fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// A 16-byte public identifier of a page-hash key: the first 16 bytes of
/// `HMAC-SHA256(key, "perfplus page-hash key fingerprint v1")`. It reveals nothing usable about the key
/// (HMAC-SHA256 is a PRF) and is what the [`PageStore`](crate::page_store::PageStore) records, so that
/// a store written under another key is discarded rather than trusted.
pub fn key_fingerprint(key: &[u8; PAGE_KEY_LEN]) -> [u8; 16] {
    fingerprint_of(key)
}

fn fingerprint_of(key: &[u8]) -> [u8; 16] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(FINGERPRINT_LABEL);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// True if every byte of `page` is zero.
///
/// ORs the page together in 256-byte blocks of `u64` lanes (which the compiler turns into a few wide
/// vector ORs per block) and stops at the first block that is not zero: a non-zero page usually
/// returns after its first 256 bytes, a zero page costs one pass at memory speed.
#[inline]
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    const BLOCK: usize = 256;
    page.chunks_exact(BLOCK).all(|block| {
        let mut acc = 0u64;
        for lane in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(lane.try_into().expect("8-byte lane"));
        }
        acc == 0
    })
}

/// Unkeyed 64-bit checksum of a page (xxh3-64). For comparing whole guest memories after a migration
/// and for detecting torn or rotten pages on disk, *never* for deciding that two pages are equal on
/// behalf of a guest (a guest can forge xxh3 collisions; use [`PageHasher`]).
#[inline]
pub fn page_checksum(page: &[u8; PAGE_SIZE]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The checksum of each group of [`CHECKSUM_GROUP_PAGES`] pages (the last one may be shorter), from
/// the pages' checksums: the xxh3-64 of those checksums, little-endian, one after the other. What the
/// destination sends after the resume (`Message::GroupChecksums`), and the source compares with its
/// own; like [`page_checksum`], for finding pages that differ, not for proving that they do not.
pub fn group_checksums(page_checksums: &[u64]) -> Vec<u64> {
    let mut bytes = Vec::with_capacity(CHECKSUM_GROUP_PAGES * 8);
    page_checksums
        .chunks(CHECKSUM_GROUP_PAGES)
        .map(|group| {
            bytes.clear();
            for sum in group {
                bytes.extend_from_slice(&sum.to_le_bytes());
            }
            xxhash_rust::xxh3::xxh3_64(&bytes)
        })
        .collect()
}

/// The first 8 bytes of a digest, little-endian: what a destination advertises of the digests it holds
/// (the source then sends a full 16-byte digest as the reference, which the destination resolves).
#[inline]
pub fn digest_prefix(d: &PageDigest) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Hashes a digest prefix as itself. Prefixes are keyed HMAC output: uniform, and nobody without the
/// key chooses them, so SipHash's defence against crafted keys buys nothing, and the sender rebuilds
/// its held set (a prefix per page of the guest) during the post-copy switch.
#[derive(Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A set of digest prefixes ([`digest_prefix`]).
pub type PrefixSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<PrefixHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn hx(s: &str) -> PageDigest {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn pattern_page() -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = ((i * 7) % 251) as u8;
        }
        p
    }

    #[test]
    fn rfc2202_hmac_md5_vectors() {
        let cases: [(&[u8], &[u8], &str); 4] = [
            (&[0x0b; 16], b"Hi There", "9294727a3638bb1c13f48ef8158bfc9d"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "750c783e6ab0b503eaa86e310a5db738",
            ),
            (&[0xaa; 16], &[0xdd; 50], "56be34521d144c88dbb8c733f0e8b3f6"),
            (
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
            ),
        ];
        for (key, msg, want) in cases {
            assert_eq!(PageHasher::with_key_bytes(key).mac(msg), hx(want), "key {key:02x?}");
        }
    }

    #[test]
    fn page_digest_matches_independent_hmac_md5() {
        // Expected values from Python: hmac.new(bytes(range(32)), page, hashlib.md5).hexdigest().
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let h = PageHasher::new(&key);
        assert_eq!(h.digest(&pattern_page()), hx("b531386e278e740b9c06fbf71a0520b4"));
        assert_eq!(h.digest(&[0u8; PAGE_SIZE]), hx("d1987def31de5f7274473e788b3e09d6"));
        // The precomputed state is cloned, never consumed: digests are repeatable.
        assert_eq!(h.digest(&pattern_page()), h.clone().digest(&pattern_page()));
    }

    #[test]
    fn different_keys_give_different_digests_and_fingerprints() {
        let a = PageHasher::new(&[1u8; 32]);
        let b = PageHasher::new(&[2u8; 32]);
        let p = pattern_page();
        assert_ne!(a.digest(&p), b.digest(&p));
        assert_ne!(a.key_fingerprint(), b.key_fingerprint());
        assert_eq!(a.key_fingerprint(), key_fingerprint(&[1u8; 32]));
        // Keyed: not plain MD5 of the page.
        let plain: PageDigest = <Md5 as md5::Digest>::digest(p).into();
        assert_ne!(a.digest(&p), plain);
        // Debug output does not leak the key's state.
        assert!(format!("{a:?}").contains(&hex::encode(a.key_fingerprint())));
    }

    /// Random-looking pages (xorshift64), deterministic.
    fn random_pages(n: usize, seed: u64) -> Vec<[u8; PAGE_SIZE]> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                let mut p = [0u8; PAGE_SIZE];
                for c in p.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                p
            })
            .collect()
    }

    /// Pages for the batch tests: random ones, and the edges (all zero, all 0xff, a single bit set at
    /// either end, one byte off another lane's page), in an order that puts them in every lane.
    fn mixed_pages() -> Vec<[u8; PAGE_SIZE]> {
        let mut pages = random_pages(40, 0x1234_5678_9abc_def1);
        let mut first_bit = [0u8; PAGE_SIZE];
        first_bit[0] = 1;
        let mut last_bit = [0u8; PAGE_SIZE];
        last_bit[PAGE_SIZE - 1] = 0x80;
        let mut almost = pages[0];
        almost[2048] ^= 0x10;
        for (at, page) in [
            [0u8; PAGE_SIZE],
            [0xff; PAGE_SIZE],
            first_bit,
            last_bit,
            almost,
            pattern_page(),
        ]
        .into_iter()
        .enumerate()
        {
            pages.insert(at * 7 % pages.len(), page);
        }
        pages
    }

    /// HMAC-MD5 of a page written out with the md-5 crate alone: `MD5(K^opad || MD5(K^ipad || page))`.
    fn reference_hmac(key: &[u8], page: &[u8; PAGE_SIZE]) -> PageDigest {
        use md5::Digest;
        let mut k = [0u8; BLOCK];
        k[..key.len()].copy_from_slice(key);
        let inner = Md5::new()
            .chain_update(k.map(|b| b ^ 0x36))
            .chain_update(page)
            .finalize();
        Md5::new()
            .chain_update(k.map(|b| b ^ 0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// The digest from the hasher's bare key states, with the md-5 crate's compression function.
    fn digest_from_states(h: &PageHasher, page: &[u8; PAGE_SIZE]) -> PageDigest {
        let mut state = h.states.inner;
        let (blocks, rest) = page.as_chunks::<BLOCK>();
        assert!(rest.is_empty());
        md5::block_api::compress(&mut state, blocks);
        let mut pad = [0u8; BLOCK];
        pad[0] = 0x80;
        pad[56..].copy_from_slice(&(((BLOCK + PAGE_SIZE) * 8) as u64).to_le_bytes());
        md5::block_api::compress(&mut state, &[pad]);
        let mut outer = [0u8; BLOCK];
        for (chunk, w) in outer.chunks_exact_mut(4).zip(state) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        outer[16] = 0x80;
        outer[56..].copy_from_slice(&(((BLOCK + 16) * 8) as u64).to_le_bytes());
        let mut state = h.states.outer;
        md5::block_api::compress(&mut state, &[outer]);
        let mut out = [0u8; 16];
        for (chunk, w) in out.chunks_exact_mut(4).zip(state) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    #[test]
    fn key_states_are_hmac_md5s_first_blocks() {
        let pages = mixed_pages();
        let key: [u8; 32] = std::array::from_fn(|i| (i * 13 + 1) as u8);
        let h = PageHasher::new(&key);
        for page in &pages {
            let want = reference_hmac(&key, page);
            assert_eq!(h.digest(page), want);
            assert_eq!(digest_from_states(&h, page), want);
        }
        // A key longer than a block is hashed first (RFC 2104), in the states as in `Hmac`.
        let long = PageHasher::with_key_bytes(&[0xaa; 80]);
        assert_eq!(digest_from_states(&long, &pages[3]), long.digest(&pages[3]));
    }

    #[test]
    fn digest_many_is_digest_for_every_count_and_lane() {
        let pages = mixed_pages();
        let key: [u8; 32] = std::array::from_fn(|i| (255 - i) as u8);
        for h in [PageHasher::new(&key), PageHasher::with_key_bytes(&[0xaa; 80])] {
            let want: Vec<PageDigest> = pages.iter().map(|p| h.digest(p)).collect();
            for n in 0..=17 {
                for start in [0, 1, 5, pages.len() - n] {
                    let batch: Vec<&[u8; PAGE_SIZE]> = pages[start..start + n].iter().collect();
                    assert_eq!(h.digest_many(&batch), want[start..start + n], "{n} pages from {start}");
                }
            }
            // Owned and boxed pages borrow as pages too.
            assert_eq!(h.digest_many(&pages), want);
            let boxed: Vec<Box<[u8; PAGE_SIZE]>> = pages.iter().map(|p| Box::new(*p)).collect();
            assert_eq!(h.digest_many(&boxed), want);
        }
    }

    /// The eight-lane code itself (not through `digest_many`'s choice of path), against the md-5
    /// crate's HMAC: every lane position, every page, idle lanes repeating a page.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn md5x8_lanes_match_the_md5_crate() {
        let Some(simd) = md5x8::Md5x8::detect() else {
            eprintln!("no AVX2 on this CPU: the eight-lane MD5 is not used here, nothing to compare");
            return;
        };
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 ^ 0x5a);
        let h = PageHasher::new(&key);
        let pages = mixed_pages();
        for rotation in 0..md5x8::LANES {
            for chunk in pages.chunks(md5x8::LANES) {
                let lanes: [&[u8; PAGE_SIZE]; md5x8::LANES] =
                    std::array::from_fn(|l| &chunk[(l + rotation) % chunk.len()]);
                let got = simd.hmac_pages(&h.states.inner, &h.states.outer, &lanes);
                for (lane, page) in lanes.iter().enumerate() {
                    assert_eq!(got[lane], reference_hmac(&key, page), "lane {lane}");
                }
            }
        }
    }

    #[test]
    fn hasher_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<PageHasher>();
    }

    #[test]
    fn zero_page_edge_cases() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for pos in [0, 1, 7, 8, 255, 256, 2048, PAGE_SIZE - 8, PAGE_SIZE - 1] {
            p[pos] = 1;
            assert!(!is_zero_page(&p), "byte {pos}");
            p[pos] = 0;
        }
        p[PAGE_SIZE - 1] = 0x80;
        assert!(!is_zero_page(&p));
        assert!(!is_zero_page(&[0xff; PAGE_SIZE]));
    }

    #[test]
    fn checksum_and_prefix() {
        let p = pattern_page();
        assert_eq!(page_checksum(&p), xxhash_rust::xxh3::xxh3_64(&p));
        let mut q = p;
        q[4095] ^= 1;
        assert_ne!(page_checksum(&p), page_checksum(&q));
        let d: PageDigest = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        assert_eq!(digest_prefix(&d), 0x0807_0605_0403_0201);
    }
}
