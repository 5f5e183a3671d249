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
//! [`page_checksum`] (xxh3-64, unkeyed, ~100x faster) is *not* for dedup: it compares whole guest
//! memories after a migration, and guards the on-disk store against torn writes and bit rot.
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use perfplus_common::PAGE_SIZE;
use sha2::Sha256;

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
    /// [`key_fingerprint`] of the key.
    fingerprint: [u8; 16],
}

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
            fingerprint: fingerprint_of(key),
        }
    }

    /// The keyed digest of `page`: `HMAC-MD5(key, page)`.
    #[inline]
    pub fn digest(&self, page: &[u8; PAGE_SIZE]) -> PageDigest {
        self.mac(page)
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

/// The first 8 bytes of a digest, little-endian: what a destination advertises of the digests it holds
/// (the source then sends a full 16-byte digest as the reference, which the destination resolves).
#[inline]
pub fn digest_prefix(d: &PageDigest) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

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
