//! The keyed page digest the relay decides with.
//!
//! The agent's own hasher (`perfplus::hashing::PageHasher`, HMAC-MD5 with eight pages at once in AVX2
//! lanes) implements [`PageDigester`]; [`HmacMd5`] is the plain one-page-at-a-time equivalent for
//! this crate's tests and for callers without the agent. Both give the same digests for one key.

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;

use crate::stream::{Digest, PAGE_SIZE};

/// A keyed digest of a page's content: equal digests mean equal content, and no guest can forge a
/// collision without the key (see `perfplus::hashing` for why HMAC-MD5 is enough).
pub trait PageDigester: Send + Sync {
    fn digest(&self, page: &[u8; PAGE_SIZE]) -> Digest;

    /// The digests of several pages, in order: what the relay asks for each chunk of the stream, so
    /// that an implementation can hash them together (the agent's hashes eight at once).
    fn digest_many(&self, pages: &[&[u8; PAGE_SIZE]]) -> Vec<Digest> {
        pages.iter().map(|page| self.digest(page)).collect()
    }
}

/// HMAC-MD5 under a key, one page at a time.
#[derive(Clone)]
pub struct HmacMd5 {
    keyed: Hmac<Md5>,
}

impl HmacMd5 {
    pub fn new(key: &[u8]) -> HmacMd5 {
        HmacMd5 {
            keyed: <Hmac<Md5> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length"),
        }
    }
}

impl PageDigester for HmacMd5 {
    fn digest(&self, page: &[u8; PAGE_SIZE]) -> Digest {
        let mut mac = self.keyed.clone();
        mac.update(page);
        mac.finalize().into_bytes().into()
    }
}
