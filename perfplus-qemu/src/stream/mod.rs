//! QEMU 7.2's migration stream, as far as perfplus reads it: typed items ([`Item`]), an incremental
//! [`Parser`] and a [`write`]r that re-emits them byte for byte.
//!
//! # What QEMU 7.2 sends (pre-copy, one channel, no compression)
//!
//! All integers are big-endian. Learned from QEMU's `migration/savevm.c`, `migration/ram.c`,
//! `docs/devel/migration.rst` and checked against streams captured from QEMU 7.2.22 (pc-i440fx-7.2 and
//! pc-q35-7.2 machines; section footers are on for every machine newer than 2.5):
//!
//! ```text
//! header         u32 0x5145564d ("QEVM")  u32 3
//! configuration  u8 0x07  u32 len  machine type (len bytes)           [subsections 0x05: refused]
//! section start  u8 0x01  u32 id  u8 len  idstr  u32 instance  u32 version   ─┐ contents  footer
//! section part   u8 0x02  u32 id                                                ├ (RAM only, below)
//! section end    u8 0x03  u32 id                                              ─┘
//! footer         u8 0x7e  u32 id   (the id of the section it closes)
//! command        u8 0x08  u16 cmd  u16 len  data            (MIG_CMD_*; PACKAGED, post-copy: refused)
//! section full   u8 0x04  …  ─┐  non-iterable device state, then EOF (u8 0x00), then the vmdesc
//! EOF            u8 0x00  …  ─┘  (u8 0x06  u32 len  JSON): the "tail", passed through opaque
//! ```
//!
//! The contents of the RAM section (`idstr` "ram") are records that start with a u64: the page's
//! offset in its block (page-aligned) ORed with `RAM_SAVE_FLAG_*` in the low 12 bits:
//!
//! ```text
//! MEM_SIZE 0x04  (section start only) total RAM bytes; then per block until the lengths add up to it:
//!                u8 len  block name  u64 used length
//! PAGE     0x08  [u8 len  block name unless CONTINUE 0x20]  4096 bytes of content
//! ZERO     0x02  [u8 len  block name unless CONTINUE 0x20]  u8 fill byte (QEMU sends 0)
//! EOS      0x10  end of this section's contents (the footer follows)
//! ```
//!
//! A record with CONTINUE (0x20) belongs to the block of the previous record. Anything else in RAM
//! contents (XBZRLE 0x40, HOOK 0x80 for RDMA, COMPRESS_PAGE 0x100) is refused with an error, as is
//! any iterable section other than RAM (block migration, dirty bitmaps, VFIO).
//!
//! # What perfplus does not parse
//!
//! Non-iterable devices (`SECTION_FULL`) carry their fields without a length; only the vmdesc JSON at
//! the very end describes them. Since QEMU sends them after the last RAM section (stop-and-copy), the
//! parser passes everything from the first `SECTION_FULL` or `EOF` on through as [`Item::Tail`] bytes,
//! as they arrive. [`split_tail`] finds the EOF and the vmdesc in a complete tail.
//!
//! # The relay dialect
//!
//! Between two perfplus agents the same stream travels with one extension: a RAM record with flag
//! [`FLAG_PERFPLUS_REF`] (0x800, unused by QEMU) carries a 16-byte keyed digest instead of the page
//! (a page the destination agent holds). Only a parser built with [`Dialect::Relay`] accepts it; the
//! destination agent expands it to a PAGE record before QEMU sees the stream.

mod parser;
mod writer;

pub use parser::{Dialect, Parser};
pub use writer::write;

/// The size of a target page (x86-64), the unit of RAM records.
pub const PAGE_SIZE: usize = 4096;
/// "QEVM": the stream's first four bytes.
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU 7.2 writes.
pub const FILE_VERSION: u32 = 3;

pub(crate) const VM_EOF: u8 = 0x00;
pub(crate) const VM_SECTION_START: u8 = 0x01;
pub(crate) const VM_SECTION_PART: u8 = 0x02;
pub(crate) const VM_SECTION_END: u8 = 0x03;
pub(crate) const VM_SECTION_FULL: u8 = 0x04;
pub(crate) const VM_SUBSECTION: u8 = 0x05;
pub(crate) const VM_VMDESCRIPTION: u8 = 0x06;
pub(crate) const VM_CONFIGURATION: u8 = 0x07;
pub(crate) const VM_COMMAND: u8 = 0x08;
pub(crate) const VM_SECTION_FOOTER: u8 = 0x7e;

pub(crate) const FLAG_ZERO: u64 = 0x02;
pub(crate) const FLAG_MEM_SIZE: u64 = 0x04;
pub(crate) const FLAG_PAGE: u64 = 0x08;
pub(crate) const FLAG_EOS: u64 = 0x10;
pub(crate) const FLAG_CONTINUE: u64 = 0x20;
/// perfplus's relay extension: the record carries a keyed digest, not the page.
pub const FLAG_PERFPLUS_REF: u64 = 0x800;
pub(crate) const FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// `MIG_CMD_PACKAGED`: a post-copy package (a stream inside the stream).
pub(crate) const MIG_CMD_PACKAGED: u16 = 7;

/// A keyed digest of one page (HMAC-MD5).
pub type Digest = [u8; 16];

/// One RAM block as the RAM section's start lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub name: String,
    pub length: u64,
}

/// What a RAM record carries for its page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RamBody {
    /// The whole page (`RAM_SAVE_FLAG_PAGE`).
    Page(Box<[u8; PAGE_SIZE]>),
    /// A page filled with one byte (`RAM_SAVE_FLAG_ZERO`; QEMU always sends 0).
    Zero(u8),
    /// Relay dialect only: the destination agent holds a page with this digest.
    Ref(Digest),
}

/// One page record of the RAM section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamRecord {
    /// Offset of the page in its block (page-aligned).
    pub offset: u64,
    /// The block's name as written; `None` when the record had `RAM_SAVE_FLAG_CONTINUE`.
    pub block_name: Option<String>,
    /// The block it belongs to: an index into the block list of the RAM section's start.
    pub block: usize,
    pub body: RamBody,
}

/// One item of the stream, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Magic and version.
    Header { version: u32 },
    /// `QEMU_VM_CONFIGURATION`: the machine type.
    Configuration { machine: String },
    /// `QEMU_VM_SECTION_START` of an iterable section (only "ram" is accepted).
    SectionStart {
        id: u32,
        name: String,
        instance: u32,
        version: u32,
    },
    /// `QEMU_VM_SECTION_PART`: one pre-copy round's contents follow.
    SectionPart { id: u32 },
    /// `QEMU_VM_SECTION_END`: the stop-and-copy round's contents follow.
    SectionEnd { id: u32 },
    /// `RAM_SAVE_FLAG_MEM_SIZE`: the total RAM size; the block list follows.
    RamMemSize { total: u64 },
    /// One entry of the block list.
    RamBlock(RamBlock),
    /// A page, a zero page or (relay dialect) a reference.
    Ram(RamRecord),
    /// `RAM_SAVE_FLAG_EOS`: the end of a RAM section's contents.
    RamEos,
    /// `QEMU_VM_SECTION_FOOTER` of section `id`.
    Footer { id: u32 },
    /// `QEMU_VM_COMMAND` (e.g. open return path, ping).
    Command { cmd: u16, data: Vec<u8> },
    /// Bytes of the tail: non-iterable device state, EOF and the vmdesc, passed through unparsed.
    Tail(Vec<u8>),
}

/// What is wrong with a stream, and where (`at`: the offset in the stream).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("not a QEMU migration stream: magic {found:#010x} at the start (expected {FILE_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("QEMU migration stream version {found}; only version {FILE_VERSION} (QEMU 7.2) is supported")]
    BadVersion { found: u32 },
    #[error("at byte {at}: {what}")]
    Malformed { at: u64, what: String },
    #[error("at byte {at}: not supported: {what}")]
    Unsupported { at: u64, what: String },
}

/// The tail of a complete stream split at its EOF: the device state and the vmdesc JSON.
#[derive(Debug)]
pub struct TailParts<'a> {
    /// `SECTION_FULL` sections of the non-iterable devices (their fields are not parsed).
    pub device_state: &'a [u8],
    /// The vmdesc JSON (QEMU's description of those sections), if the stream had one.
    pub vmdesc: Option<&'a str>,
}

/// Splits a complete tail (everything [`Item::Tail`] carried) at its EOF byte: QEMU ends a pre-copy
/// stream with `EOF` and then `0x06, u32 len, len bytes of JSON`, which this finds from the end.
pub fn split_tail(tail: &[u8]) -> Option<TailParts<'_>> {
    // The vmdesc: the only position where a 0x06 byte is followed by a length reaching exactly the end.
    for start in (0..tail.len().saturating_sub(5)).rev() {
        if tail[start] != VM_VMDESCRIPTION || start == 0 || tail[start - 1] != VM_EOF {
            continue;
        }
        let len = u32::from_be_bytes(tail[start + 1..start + 5].try_into().ok()?) as usize;
        if start + 5 + len == tail.len() {
            let json = std::str::from_utf8(&tail[start + 5..]).ok()?;
            return Some(TailParts {
                device_state: &tail[..start - 1],
                vmdesc: Some(json),
            });
        }
    }
    (tail.last() == Some(&VM_EOF)).then(|| TailParts {
        device_state: &tail[..tail.len() - 1],
        vmdesc: None,
    })
}
