//! The relay between two agents: QEMU's stream in on the source, a valid QEMU stream out on the
//! destination, Perf+ in between.
//!
//! ```text
//!  source QEMU ──stream──► source::run ──relay dialect──► destination::run ──stream──► destination QEMU
//!              ◄──────────── return path (raw bytes) ◄──────────────────────────────── (if QEMU opens it)
//! ```
//!
//! Per RAM record the source decides ([`source::Filter`]):
//! * the destination QEMU already has this content at this address (same keyed digest as the last
//!   record the relay let through for it) → dropped: QEMU keeps the page it has;
//! * the destination agent holds a page with this digest ([`Held`]: pages of this migration it
//!   passed on) → a reference of 16 bytes, which [`destination::Expander`] replaces by the page after
//!   re-hashing it;
//! * the destination *host* holds it (the destination agent advertised the digest's 8-byte prefix
//!   before the stream began: its page store of VMs that left, the VMs it hosts) → the same
//!   reference; the expander finds it in [`Held`] or else asks the agent ([`HostPages`]), re-hashes
//!   what it gets, and keeps it in [`Held`] as if it had come whole (both sides apply that rule too).
//!   A reference it cannot resolve stops the stream with an error before QEMU gets anything more:
//!   the stream cannot be rewound, and a page it cannot verify never goes into the guest (the
//!   destination QEMU then fails its incoming migration, and the source QEMU, with its return path
//!   on, fails too and keeps running the guest);
//! * otherwise the page itself; zero records stay zero records (dropped too when unchanged).
//!
//! Both sides apply one deterministic rule to what the destination holds ([`Held::offer`], in stream
//! order, up to [`RelayConfig::held_pages`]), so the source knows it without a message back. A RAM
//! record names its block whenever the previous record *on the link* was of another block or the
//! section just began, whatever QEMU wrote: dropping a record never leaves a `CONTINUE` pointing at
//! the wrong block. Everything that is not a RAM record passes through byte for byte.

pub mod destination;
mod held;
mod pump;
pub mod source;

pub use held::Held;
pub use pump::RelayError;

use crate::stream::{Digest, PAGE_SIZE};

/// The first 8 bytes of a digest, little-endian: what a destination agent advertises of what its
/// host holds (the same prefix as perfplus's `hashing::digest_prefix`).
pub fn digest_prefix(digest: &Digest) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Pages the destination host holds outside this migration (the destination agent's page store, the
/// VMs it hosts), as the destination agent resolves them. The [`destination::Expander`] re-hashes
/// whatever it gets: an implementation that returns the wrong content makes the relay fail, never
/// the guest read it.
pub trait HostPages: Send {
    /// Fills `out` with content whose keyed digest is `digest`, if the host holds one.
    fn fetch(&mut self, digest: &Digest, out: &mut [u8; PAGE_SIZE]) -> bool;
}

/// Where an agent keeps copies of the pages the relay passes on (for its page store, after the
/// migration). Called on the relay's hot path: it must not block (drop the page instead).
pub trait PageTee: Send {
    fn page(&mut self, digest: Digest, page: Box<[u8; PAGE_SIZE]>);
}

/// What a relay side did, and the content the destination QEMU ended up with.
#[derive(Clone, Debug, Default)]
pub struct Relayed {
    pub stats: RelayStats,
    /// The distinct digests of the last non-zero page the destination QEMU got at each address (its
    /// memory's content when the stream ended), in no particular order.
    pub last_pages: Vec<Digest>,
}

/// How much the destination agent keeps to resolve references.
#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    /// The most distinct pages the destination agent holds (4 KiB each); both sides must agree.
    pub held_pages: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        // 256 MiB of distinct contents.
        RelayConfig { held_pages: 65536 }
    }
}

/// What became of RAM records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages sent whole.
    pub full: u64,
    /// Pages sent as a reference to a page of this migration the destination agent holds.
    pub referenced: u64,
    /// Pages sent as a reference to a page the destination host held before this migration (its
    /// page store, its VMs).
    pub host_referenced: u64,
    /// Pages dropped: the destination QEMU has this content at this address.
    pub unchanged: u64,
    /// Zero records passed on.
    pub zero: u64,
    /// Zero records dropped (the page is zero there already).
    pub zero_unchanged: u64,
}

impl PageCounts {
    /// RAM records QEMU sent.
    pub fn records(&self) -> u64 {
        self.full + self.referenced + self.host_referenced + self.unchanged + self.zero + self.zero_unchanged
    }

    /// Both added up.
    pub fn plus(&self, other: &PageCounts) -> PageCounts {
        PageCounts {
            full: self.full + other.full,
            referenced: self.referenced + other.referenced,
            host_referenced: self.host_referenced + other.host_referenced,
            unchanged: self.unchanged + other.unchanged,
            zero: self.zero + other.zero,
            zero_unchanged: self.zero_unchanged + other.zero_unchanged,
        }
    }
}

/// What one side of the relay did. QEMU sends a RAM section per slice of an iteration (~50 ms, not
/// one per pass over memory; `query-migrate`'s `dirty-sync-count` counts the passes), so the pages
/// are counted for the pre-copy sections together and for the stop-and-copy section (`SECTION_END`,
/// sent with the guest paused) apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// RAM sections (start, parts, end).
    pub sections: u64,
    /// Records of the sections sent while the guest ran.
    pub precopy: PageCounts,
    /// Records of the stop-and-copy section.
    pub stop_and_copy: PageCounts,
    /// Bytes read from the stream's input (QEMU on the source, the link on the destination).
    pub bytes_in: u64,
    /// Bytes written to the output (the link on the source, QEMU on the destination).
    pub bytes_out: u64,
    /// Bytes of the device-state tail passed through.
    pub tail_bytes: u64,
    /// Bytes relayed on the return path (destination QEMU to source QEMU).
    pub return_path_bytes: u64,
    /// Whether the current section is the stop-and-copy.
    in_stop_and_copy: bool,
}

impl RelayStats {
    /// Pre-copy and stop-and-copy added up.
    pub fn total(&self) -> PageCounts {
        self.precopy.plus(&self.stop_and_copy)
    }

    /// A RAM section begins.
    pub(crate) fn section(&mut self, item: &crate::stream::Item) {
        self.sections += 1;
        self.in_stop_and_copy = matches!(item, crate::stream::Item::SectionEnd { .. });
    }

    /// The counts of the current section's kind.
    pub(crate) fn counts(&mut self) -> &mut PageCounts {
        if self.in_stop_and_copy {
            &mut self.stop_and_copy
        } else {
            &mut self.precopy
        }
    }
}

#[cfg(test)]
mod tests;
