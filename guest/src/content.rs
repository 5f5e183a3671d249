//! Page contents: every working-set page's content is a pure function of (seed, page index, page
//! version), so the guest can regenerate what any page must hold and check it.

use perfplus_common::text::text_page;
use perfplus_common::PAGE_SIZE;

/// Words (u64) per page.
pub const WORDS: usize = PAGE_SIZE / 8;

/// Number of distinct contents `dup` pages share.
pub const DUP_POOL: u64 = 16;

pub use perfplus_common::splitmix::{mix64, GOLDEN};

/// Kinds of page (indices into `cmdline::KIND_NAMES` and `Config::mix`).
pub const UNIQUE: usize = 0;
pub const DUP: usize = 1;
pub const ZERO: usize = 2;
pub const SAME: usize = 3;
pub const TEXT: usize = 4;

/// What a page holds: all zero, the splitmix64 stream that starts after `key`, or the text page of
/// `key` (English words, `perfplus_common::text`: ~2.1x smaller with zstd level 1 alone, ~2.4x in a
/// batch, like real text).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Stream(u64),
    Text(u64),
}

/// The text page of `key`, as words.
#[inline(always)]
fn text_words(key: u64) -> [u64; WORDS] {
    let mut bytes = [0u8; PAGE_SIZE];
    text_page(key, &mut bytes);
    let mut words = [0u64; WORDS];
    for (w, b) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
    words
}

impl Content {
    /// Word `i` of the content.
    #[inline(always)]
    pub fn word(self, i: usize) -> u64 {
        match self {
            Content::Zero => 0,
            Content::Stream(k) => mix64(k.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN))),
            Content::Text(k) => text_words(k)[i],
        }
    }
}

/// The content rules of one run.
pub struct Contents {
    /// Cumulative percentage thresholds of unique, dup, zero, same (text is the rest).
    thresholds: [u64; 4],
    kind_salt: u64,
    unique_salt: u64,
    dup_salt: u64,
    same_salt: u64,
}

impl Contents {
    pub fn new(seed: u64, mix: [u8; 5]) -> Contents {
        let m = mix.map(u64::from);
        Contents {
            thresholds: [m[0], m[0] + m[1], m[0] + m[1] + m[2], m[0] + m[1] + m[2] + m[3]],
            kind_salt: mix64(seed ^ 0x4b49_4e44),
            unique_salt: mix64(seed ^ 0x554e_4951),
            dup_salt: mix64(seed ^ 0x4455_5000),
            same_salt: mix64(seed ^ 0x5341_4d45),
        }
    }

    /// The kind of `page`: a hash of its index against the mix percentages.
    #[inline(always)]
    pub fn kind(&self, page: u64) -> usize {
        let h = mix64(page ^ self.kind_salt) % 100;
        if h < self.thresholds[0] {
            UNIQUE
        } else if h < self.thresholds[1] {
            DUP
        } else if h < self.thresholds[2] {
            ZERO
        } else if h < self.thresholds[3] {
            SAME
        } else {
            TEXT
        }
    }

    /// What `page` holds at `version`.
    #[inline(always)]
    pub fn content(&self, page: u64, version: u32) -> Content {
        match self.kind(page) {
            UNIQUE => Content::Stream(mix64(mix64(self.unique_salt ^ page) ^ u64::from(version))),
            DUP => {
                let slot = mix64(self.dup_salt ^ page ^ (u64::from(version) << 40)) % DUP_POOL;
                Content::Stream(mix64(self.dup_salt.wrapping_add(slot)))
            }
            ZERO => Content::Zero,
            SAME => Content::Stream(mix64(self.same_salt ^ page)),
            // Its own salt, so a text page is not a unique page's stream in other letters.
            _ => Content::Text(mix64(mix64(self.unique_salt ^ page ^ 0x5445_5854) ^ u64::from(version))),
        }
    }
}

/// Writes `c` into the page at `p`.
///
/// # Safety
/// `p` must be a page-aligned, writable 4 KiB page that nothing else references.
#[inline(always)]
pub unsafe fn fill(p: *mut u64, c: Content) {
    match c {
        Content::Zero => {
            for i in 0..WORDS {
                // SAFETY: i < WORDS, within the page (caller).
                unsafe { p.add(i).write_volatile(0) };
            }
        }
        Content::Stream(k) => {
            let mut x = k;
            for i in 0..WORDS {
                x = x.wrapping_add(GOLDEN);
                // SAFETY: i < WORDS, within the page (caller).
                unsafe { p.add(i).write_volatile(mix64(x)) };
            }
        }
        Content::Text(k) => {
            for (i, w) in text_words(k).into_iter().enumerate() {
                // SAFETY: i < WORDS, within the page (caller).
                unsafe { p.add(i).write_volatile(w) };
            }
        }
    }
}

/// Checks the page at `p` against `c`: `None` if it matches, else the first differing word index and
/// the value found there.
///
/// # Safety
/// `p` must be a page-aligned, readable 4 KiB page.
#[inline(always)]
pub unsafe fn check(p: *const u64, c: Content) -> Option<(usize, u64)> {
    // A text page is generated once, for the check and for finding the first difference.
    let text = match c {
        Content::Text(k) => Some(text_words(k)),
        _ => None,
    };
    let mut diff = 0u64;
    match c {
        Content::Zero => {
            for i in 0..WORDS {
                // SAFETY: i < WORDS, within the page (caller).
                diff |= unsafe { p.add(i).read_volatile() };
            }
        }
        Content::Stream(k) => {
            let mut x = k;
            for i in 0..WORDS {
                x = x.wrapping_add(GOLDEN);
                // SAFETY: i < WORDS, within the page (caller).
                diff |= unsafe { p.add(i).read_volatile() } ^ mix64(x);
            }
        }
        Content::Text(_) => {
            for (i, &w) in text.iter().flatten().enumerate() {
                // SAFETY: i < WORDS, within the page (caller).
                diff |= unsafe { p.add(i).read_volatile() } ^ w;
            }
        }
    }
    if diff == 0 {
        return None;
    }
    (0..WORDS).find_map(|i| {
        // SAFETY: i < WORDS, within the page (caller).
        let got = unsafe { p.add(i).read_volatile() };
        let expected = text.as_ref().map_or_else(|| c.word(i), |t| t[i]);
        (got != expected).then_some((i, got))
    })
}
