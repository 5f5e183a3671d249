//! Frames: one [`Message`] (or the handshake's [`Hello`]) ⇄ bytes. No sockets here.
//!
//! ## Layout
//! Every frame is a fixed 8-byte header followed by its payload, all integers little-endian:
//! ```text
//! offset 0   u16  frame type   (FrameType, one per Message variant + Hello)
//! offset 2   u16  flags        (none defined: must be 0)
//! offset 4   u32  payload length in bytes
//! offset 8   payload
//! ```
//! Each frame type has a payload limit (an exact size for fixed-size frames, a maximum otherwise), see
//! [`FrameType::limit`]. It is checked from the header alone, by [`FrameHeader::parse`] / [`peek_header`],
//! so a reader rejects a frame announcing 4 GiB before it allocates or buffers anything. Until the
//! perfplus handshake completes (inside TLS) a reader admits only Hello and an `Error` of at most
//! [`HANDSHAKE_ERROR_MAX`] bytes ([`FrameHeader::check_before_handshake`]): a peer that has not agreed
//! on a version and a role cannot announce anything larger.
//!
//! ## Payloads
//! - `Hello`: [`HELLO_LEN`] (13) bytes, laid out by [`Hello::to_bytes`]: magic `"PERFPLUS"`, version
//!   range, role. From version 4 on this layout never changes: it is what negotiates versions.
//!   (Type 0x0002, `Auth`, the cluster-key proof of versions 1 to 3, is retired: TLS authenticates.)
//! - `Error`: the message, UTF-8, no length prefix.
//! - `VmList`, `Done`: empty.
//! - `RoundEnd`: `u32 round`.
//! - `RoundAck`: `u32 round`, `u32 count`, `count × u64` missing pages.
//! - `MigrateReady`: `u32 count`, `count × u64` held digest prefixes.
//! - `Running`: empty.
//! - `PageChecksums`, `GroupChecksums` (version 7): `u32 count`, `count × u64` checksums.
//! - `PageChecksumsWanted` (version 7): `u32 count`, `count × u64` group numbers.
//! - `PostcopyBegin`, `ResumeState`: `u32 count`, `count × u64` bitmap words.
//! - `PageRequest`: `u8 full` (0 or 1), `u32 count`, `count × u64` pages (at most [`PAGE_REQUEST_MAX`]).
//! - `PushAck`: `u64 bytes`, `u64 present`.
//! - `AllPresent`, `Ping`: empty.
//! - `VmState`: the bytes as given (already a postcard encoding, see [`Message::VmState`]).
//! - `Pages`: a sequence of page items (see [`PageBatch`]).
//! - `PagesZstd` (version 5): `u32` length of a `Pages` payload, then that payload compressed by zstd
//!   (see [`Compressor`]); it decodes to the same [`Message::Pages`].
//! - `QemuStream`: the bytes as given (a chunk of a relayed QEMU stream; empty ends a direction).
//! - `QemuStreamZstd` (version 6): `u32` length of a `QemuStream` payload, then that payload compressed
//!   by zstd, as `PagesZstd`; it decodes to the same [`Message::QemuStream`].
//! - every other frame: the postcard encoding of the variant's payload struct or field.
//!
//! Decoding checks everything: counts against lengths, postcard content, trailing bytes. A `Pages`
//! payload is validated once, when the frame is decoded ([`PageBatch::from_payload`]); the batch then
//! owns the payload bytes and [`PageBatch::iter`] hands out zero-copy references into them.
//!
//! ## Files
//! - `header.rs`: the frame types and their payload limits (one macro table), [`FrameHeader`],
//!   [`peek_header`], [`FrameError`].
//! - `codec.rs`: [`Message`] ⇄ payload, and the handshake's Hello ⇄ payload:
//!   [`encode`], [`decode`], [`decode_frame`], [`decode_payload`].
//! - `page_batch.rs`: [`PageBatch`], the `Pages` payload, and its items.
//! - `compression.rs`: the `PagesZstd` and `QemuStreamZstd` payloads ([`decompress`]) and
//!   [`Compressor`], which decides per payload whether compressing makes sending faster, and in
//!   adaptive mode splits a page batch so that the pages that look incompressible
//!   ([`looks_incompressible`]) travel raw and the rest compressed.

#[cfg(doc)]
use crate::handshake::{Hello, HELLO_LEN};
#[cfg(doc)]
use crate::Message;

mod codec;
mod compression;
mod header;
mod page_batch;
#[cfg(test)]
pub(crate) mod test_support;

pub use codec::{decode, decode_frame, decode_payload, encode, encode_hello, pages_header, Frame};
pub use compression::{
    decompress, decompress_batch, looks_incompressible, CompressionMode, CompressionStats, Compressor, LinkRate,
    SendPlan,
};
pub use header::{
    peek_header, FrameError, FrameHeader, FrameType, Limit, ATTACH_MAX, BULK_MAX, CONSOLE_CHUNK_MAX,
    CONSOLE_OUTPUT_MAX, CONSOLE_REQUEST_MAX, CONTROL_MAX, DIGEST_LEN, ERROR_MAX, FULL_ITEM_LEN, HANDSHAKE_ERROR_MAX,
    HEADER_LEN, PAGE_BATCH_MAX_ITEMS, PAGE_BATCH_MAX_PAYLOAD, PAGE_REQUEST_MAX, REF_ITEM_LEN, VM_LIST_MAX,
    VM_STATE_MAX, ZERO_ITEM_LEN,
};
pub use page_batch::{PageBatch, PageItem, PageItems};
