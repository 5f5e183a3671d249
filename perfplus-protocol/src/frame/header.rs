//! The frame header and the table of frame types with their payload limits (see [`super`] for the
//! layout). The limits are checked from the header alone, before any payload buffer exists.

use std::fmt;

use perfplus_common::PAGE_SIZE;
use thiserror::Error;

use crate::handshake::{HELLO_LEN, HELLO_MAGIC};
#[cfg(doc)]
use crate::Message;

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 8;

// The layout of a `Pages` payload's items (`page_batch.rs` reads and writes them) sets that frame's
// limit, so their sizes are part of the limit table.
// A full item carries exactly 4096 bytes of page content on the wire (see the layout below); a
// build with another page size would speak a different protocol.
const _: () = assert!(PAGE_SIZE == 4096, "the Pages frame format carries 4096-byte pages");

/// Bytes of a page digest.
pub const DIGEST_LEN: usize = 16;

/// Page items in one `Pages` frame at most (4 MiB of page content when every item is full).
pub const PAGE_BATCH_MAX_ITEMS: usize = 1024;

/// Bytes of a zero-page item: kind, page.
pub const ZERO_ITEM_LEN: usize = 1 + 8;
/// Bytes of a reference item: kind, page, digest.
pub const REF_ITEM_LEN: usize = 1 + 8 + DIGEST_LEN;
/// Bytes of a full-page item: kind, page, digest, content.
pub const FULL_ITEM_LEN: usize = 1 + 8 + DIGEST_LEN + PAGE_SIZE;
/// Largest `Pages` payload: [`PAGE_BATCH_MAX_ITEMS`] full items.
pub const PAGE_BATCH_MAX_PAYLOAD: usize = PAGE_BATCH_MAX_ITEMS * FULL_ITEM_LEN;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Largest `Error` payload.
pub const ERROR_MAX: usize = 64 * KIB;
/// Largest payload of a control frame (requests, replies, reports).
pub const CONTROL_MAX: usize = MIB;
/// Largest `Vms` payload (a list of VMs with their console tails).
pub const VM_LIST_MAX: usize = 16 * MIB;
/// Largest payload that carries a kernel image or a per-page array (`VmStart`, `MigrateReady`,
/// `RoundAck`, `PageChecksums`): 128 MiB, i.e. 16 Mi pages = 64 GiB of guest memory for the arrays.
pub const BULK_MAX: usize = 128 * MIB;
/// Pages in one `PageRequest` at most.
pub const PAGE_REQUEST_MAX: usize = 4096;
/// Largest `PostcopyAttach` / `MigrateResume` / `MigrateCancel` payload (an id and a tag).
pub const ATTACH_MAX: usize = 256;
/// Bytes of guest console output in one `ConsoleOutput` at most (what an agent keeps of a console).
pub const CONSOLE_CHUNK_MAX: usize = 64 * KIB;
/// Largest `ConsoleOutput` payload: a chunk, its length and the count of bytes lost before it.
pub const CONSOLE_OUTPUT_MAX: usize = CONSOLE_CHUNK_MAX + 16;
/// Largest `VmConsole` payload: a VM name and a flag.
pub const CONSOLE_REQUEST_MAX: usize = 256;
/// Largest `VmState` payload.
pub const VM_STATE_MAX: usize = 4 * MIB;
/// Largest `Error` payload before the handshake completes: a refusal of the handshake says why in a
/// line, and nothing a peer without the key sends may cost more than a few KiB.
pub const HANDSHAKE_ERROR_MAX: usize = KIB;

/// What went wrong with a frame. Every variant names the frame and what was wrong with it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame type {0} (0x{0:04x})")]
    UnknownType(u16),
    #[error("frame {frame} has flags 0x{flags:04x}; this version defines none (they must be 0)")]
    BadFlags { frame: FrameType, flags: u16 },
    #[error("payload of {len} bytes exceeds the limit {max} for frame {frame}")]
    TooLarge { frame: FrameType, len: usize, max: usize },
    #[error("payload of frame {frame} is {len} bytes; it must be exactly {expected}")]
    WrongSize {
        frame: FrameType,
        len: usize,
        expected: usize,
    },
    #[error("payload of frame {frame} malformed: {detail}")]
    Malformed { frame: FrameType, detail: String },
    #[error("payload of frame {frame} has {extra} trailing bytes after its content")]
    TrailingBytes { frame: FrameType, extra: usize },
    #[error(
        "Hello frame carries magic \"{found}\" instead of \"{expected}\"",
        found = found.escape_ascii(),
        expected = HELLO_MAGIC.escape_ascii()
    )]
    BadMagic { found: [u8; 8] },
    #[error("page batch of {count} items exceeds the limit of {max} items")]
    TooManyItems { count: usize, max: usize },
    #[error("page item {index}: {detail}")]
    PageItem { index: usize, detail: String },
    #[error("unexpected handshake frame {0} after the handshake")]
    HandshakeFrame(FrameType),
    #[error(
        "frame {frame} ({len} bytes announced) before the handshake completed; only Hello and Error \
         frames of at most {HANDSHAKE_ERROR_MAX} bytes may come first"
    )]
    BeforeHandshake { frame: FrameType, len: usize },
}

/// The payload limit of a frame type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The payload is always exactly this long.
    Exact(usize),
    /// The payload is at most this long.
    Max(usize),
}

impl Limit {
    /// The largest payload the limit admits.
    pub fn max(self) -> usize {
        match self {
            Limit::Exact(n) | Limit::Max(n) => n,
        }
    }
}

macro_rules! frame_types {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $limit:expr; )*) => {
        /// The type of a frame, first field of its header: one per [`Message`] variant, plus the
        /// two handshake frames.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum FrameType {
            $( $(#[$doc])* $name = $value, )*
        }

        impl FrameType {
            /// Every frame type, in wire-value order.
            pub const ALL: &'static [FrameType] = &[$(FrameType::$name),*];

            /// The frame type with wire value `value`, if there is one.
            pub fn from_u16(value: u16) -> Option<FrameType> {
                match value {
                    $( $value => Some(FrameType::$name), )*
                    _ => None,
                }
            }

            /// The payload limit of this frame type.
            pub fn limit(self) -> Limit {
                match self {
                    $( FrameType::$name => $limit, )*
                }
            }

            /// The frame type's name, as error messages print it.
            pub fn name(self) -> &'static str {
                match self {
                    $( FrameType::$name => stringify!($name), )*
                }
            }
        }
    };
}

frame_types! {
    /// Handshake: version range, role. (0x0002 was `Auth`, the cluster-key proof before version 4.)
    Hello = 0x0001, Limit::Exact(HELLO_LEN);
    /// [`Message::Error`].
    Error = 0x0003, Limit::Max(ERROR_MAX);
    /// [`Message::VmStart`] (may carry a kernel image).
    VmStart = 0x0101, Limit::Max(BULK_MAX);
    /// [`Message::VmList`].
    VmList = 0x0102, Limit::Exact(0);
    /// [`Message::VmStatus`].
    VmStatus = 0x0103, Limit::Max(CONTROL_MAX);
    /// [`Message::VmStop`].
    VmStop = 0x0104, Limit::Max(CONTROL_MAX);
    /// [`Message::Migrate`].
    Migrate = 0x0105, Limit::Max(CONTROL_MAX);
    /// [`Message::Vm`].
    Vm = 0x0106, Limit::Max(CONTROL_MAX);
    /// [`Message::Vms`].
    Vms = 0x0107, Limit::Max(VM_LIST_MAX);
    /// [`Message::Done`].
    Done = 0x0108, Limit::Exact(0);
    /// [`Message::Progress`].
    Progress = 0x0109, Limit::Max(CONTROL_MAX);
    /// [`Message::MigrateDone`].
    MigrateDone = 0x010a, Limit::Max(CONTROL_MAX);
    /// [`Message::MigrateResume`].
    MigrateResume = 0x010b, Limit::Max(ATTACH_MAX);
    /// [`Message::VmResume`].
    VmResume = 0x010c, Limit::Max(CONTROL_MAX);
    /// [`Message::MigrateCancel`].
    MigrateCancel = 0x010d, Limit::Max(ATTACH_MAX);
    /// [`Message::Cancelled`].
    Cancelled = 0x010e, Limit::Max(CONTROL_MAX);
    /// [`Message::VmConsole`].
    VmConsole = 0x0110, Limit::Max(CONSOLE_REQUEST_MAX);
    /// [`Message::ConsoleOutput`].
    ConsoleOutput = 0x0111, Limit::Max(CONSOLE_OUTPUT_MAX);
    /// [`Message::Track`].
    Track = 0x0120, Limit::Max(CONTROL_MAX);
    /// [`Message::TrackSample`].
    TrackSample = 0x0121, Limit::Max(CONTROL_MAX);
    /// [`Message::QemuMigrate`].
    QemuMigrate = 0x0130, Limit::Max(CONTROL_MAX);
    /// [`Message::QemuMigrateDone`].
    QemuMigrateDone = 0x0131, Limit::Max(CONTROL_MAX);
    /// [`Message::MigrateBegin`].
    MigrateBegin = 0x0201, Limit::Max(CONTROL_MAX);
    /// [`Message::MigrateReady`].
    MigrateReady = 0x0202, Limit::Max(BULK_MAX);
    /// [`Message::Pages`].
    Pages = 0x0203, Limit::Max(PAGE_BATCH_MAX_PAYLOAD);
    /// [`Message::RoundEnd`].
    RoundEnd = 0x0204, Limit::Exact(4);
    /// [`Message::RoundAck`].
    RoundAck = 0x0205, Limit::Max(BULK_MAX);
    /// [`Message::VmState`].
    VmState = 0x0206, Limit::Max(VM_STATE_MAX);
    /// [`Message::Running`].
    Running = 0x0207, Limit::Exact(0);
    /// [`Message::Complete`].
    Complete = 0x0208, Limit::Max(CONTROL_MAX);
    /// [`Message::PageChecksums`].
    PageChecksums = 0x0209, Limit::Max(BULK_MAX);
    /// [`Message::GuestCheck`].
    GuestCheck = 0x020a, Limit::Max(CONTROL_MAX);
    /// [`Message::PostcopyBegin`].
    PostcopyBegin = 0x020b, Limit::Max(BULK_MAX);
    /// [`Message::PostcopyAttach`].
    PostcopyAttach = 0x020c, Limit::Max(ATTACH_MAX);
    /// [`Message::PageRequest`].
    PageRequest = 0x020d, Limit::Max(1 + 4 + 8 * PAGE_REQUEST_MAX);
    /// [`Message::PushAck`].
    PushAck = 0x020e, Limit::Exact(16);
    /// [`Message::AllPresent`].
    AllPresent = 0x020f, Limit::Exact(0);
    /// [`Message::ResumeState`].
    ResumeState = 0x0210, Limit::Max(BULK_MAX);
    /// [`Message::Ping`].
    Ping = 0x0211, Limit::Exact(0);
    /// [`Message::Restored`].
    Restored = 0x0212, Limit::Exact(0);
    /// [`Message::Commit`].
    Commit = 0x0213, Limit::Exact(0);
    /// [`Message::Pages`] compressed with zstd (version 5): `u32` length of the `Pages` payload, then
    /// the zstd frame (`compression.rs`). Decodes to the same [`Message::Pages`].
    PagesZstd = 0x0214, Limit::Max(4 + PAGE_BATCH_MAX_PAYLOAD);
    /// [`Message::GroupChecksums`] (version 7).
    GroupChecksums = 0x0215, Limit::Max(BULK_MAX);
    /// [`Message::PageChecksumsWanted`] (version 7).
    PageChecksumsWanted = 0x0216, Limit::Max(BULK_MAX);
    /// [`Message::QemuRelayBegin`].
    QemuRelayBegin = 0x0301, Limit::Max(CONTROL_MAX);
    /// [`Message::QemuStream`].
    QemuStream = 0x0302, Limit::Max(crate::message::QEMU_STREAM_CHUNK_MAX);
    /// [`Message::QemuRelayDone`].
    QemuRelayDone = 0x0303, Limit::Max(CONTROL_MAX);
    /// [`Message::QemuStream`] compressed with zstd (version 6): `u32` length of the `QemuStream`
    /// payload, then the zstd frame (`compression.rs`). Decodes to the same [`Message::QemuStream`].
    QemuStreamZstd = 0x0304, Limit::Max(4 + crate::message::QEMU_STREAM_CHUNK_MAX);
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FrameType {
    /// Checks a payload length against this type's limit.
    pub fn check_len(self, len: usize) -> Result<(), FrameError> {
        match self.limit() {
            Limit::Exact(expected) if len != expected => Err(FrameError::WrongSize {
                frame: self,
                len,
                expected,
            }),
            Limit::Max(max) if len > max => Err(FrameError::TooLarge { frame: self, len, max }),
            _ => Ok(()),
        }
    }
}

/// A parsed, checked frame header: a known type, no flags, a payload length within the type's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub payload_len: usize,
}

impl FrameHeader {
    /// A header for a payload of `payload_len` bytes; checks the limit.
    pub fn new(frame_type: FrameType, payload_len: usize) -> Result<FrameHeader, FrameError> {
        frame_type.check_len(payload_len)?;
        Ok(FrameHeader {
            frame_type,
            payload_len,
        })
    }

    /// Parses and checks a header: the type is known, the flags are 0, the length is within limits.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let raw_type = u16::from_le_bytes([bytes[0], bytes[1]]);
        let flags = u16::from_le_bytes([bytes[2], bytes[3]]);
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let frame_type = FrameType::from_u16(raw_type).ok_or(FrameError::UnknownType(raw_type))?;
        if flags != 0 {
            return Err(FrameError::BadFlags {
                frame: frame_type,
                flags,
            });
        }
        FrameHeader::new(frame_type, len)
    }

    /// Checks a header that arrived before the handshake completed: only the handshake's own frames
    /// (Hello) and an `Error` of at most [`HANDSHAKE_ERROR_MAX`] bytes are admitted, so that a
    /// peer that has not agreed on a version and a role cannot make the reader allocate or buffer more than that.
    pub fn check_before_handshake(self) -> Result<FrameHeader, FrameError> {
        match self.frame_type {
            FrameType::Hello => Ok(self),
            FrameType::Error if self.payload_len <= HANDSHAKE_ERROR_MAX => Ok(self),
            frame => Err(FrameError::BeforeHandshake {
                frame,
                len: self.payload_len,
            }),
        }
    }

    /// The header's wire bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&(self.frame_type as u16).to_le_bytes());
        // out[2..4]: flags, 0.
        // The limits are all far below 4 GiB, so a checked header's length fits a u32.
        out[4..8].copy_from_slice(&(self.payload_len as u32).to_le_bytes());
        out
    }

    /// Header plus payload bytes.
    pub fn frame_len(self) -> usize {
        HEADER_LEN + self.payload_len
    }
}

/// The header at the start of `buf`, checked, or `None` if fewer than [`HEADER_LEN`] bytes are there.
pub fn peek_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    match buf.first_chunk::<HEADER_LEN>() {
        Some(bytes) => FrameHeader::parse(bytes).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_support::*;
    use crate::frame::{decode, encode};
    use crate::Message;

    #[test]
    fn limits_are_checked_from_the_header_alone() {
        // 4 GiB - 1 announced, no payload present: refused, not "incomplete".
        let h = header(FrameType::Pages as u16, 0, u32::MAX);
        assert_eq!(
            decode_err(&h),
            "payload of 4294967295 bytes exceeds the limit 4219904 for frame Pages"
        );
        assert!(matches!(
            peek_header(&h),
            Err(FrameError::TooLarge {
                frame: FrameType::Pages,
                len: 4294967295,
                max: PAGE_BATCH_MAX_PAYLOAD
            })
        ));
        let h = header(FrameType::Error as u16, 0, 64 * 1024 + 1);
        assert_eq!(
            decode_err(&h),
            "payload of 65537 bytes exceeds the limit 65536 for frame Error"
        );
        let h = header(FrameType::RoundEnd as u16, 0, 5);
        assert_eq!(
            decode_err(&h),
            "payload of frame RoundEnd is 5 bytes; it must be exactly 4"
        );
        let h = header(FrameType::VmState as u16, 0, 4 * 1024 * 1024 + 1);
        assert_eq!(
            decode_err(&h),
            "payload of 4194305 bytes exceeds the limit 4194304 for frame VmState"
        );
        // Exactly at the limit is fine (incomplete here).
        assert_eq!(decode(&header(FrameType::VmState as u16, 0, 4 << 20)).unwrap(), None);

        // The encoder refuses what the decoder would.
        let mut out = Vec::new();
        let err = encode(
            &Message::Error {
                message: "x".repeat(ERROR_MAX + 1),
            },
            &mut out,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload of 65537 bytes exceeds the limit 65536 for frame Error"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn before_the_handshake_only_small_handshake_frames_pass() {
        let parse =
            |frame_type: FrameType, len: u32| peek_header(&header(frame_type as u16, 0, len)).map(Option::unwrap);
        let hello = parse(FrameType::Hello, FrameType::Hello.limit().max() as u32).unwrap();
        assert!(hello.check_before_handshake().is_ok());
        let small_error = parse(FrameType::Error, HANDSHAKE_ERROR_MAX as u32).unwrap();
        assert!(small_error.check_before_handshake().is_ok());
        // What the attacker sent: a 128 MiB VmStart before any handshake.
        let vm_start = parse(FrameType::VmStart, BULK_MAX as u32).unwrap();
        assert_eq!(
            vm_start.check_before_handshake().unwrap_err().to_string(),
            "frame VmStart (134217728 bytes announced) before the handshake completed; only Hello and \
             Error frames of at most 1024 bytes may come first"
        );
        let big_error = parse(FrameType::Error, HANDSHAKE_ERROR_MAX as u32 + 1).unwrap();
        assert!(matches!(
            big_error.check_before_handshake(),
            Err(FrameError::BeforeHandshake {
                frame: FrameType::Error,
                len: 1025
            })
        ));
        // Every other type is refused whatever its length, even an empty one.
        for &frame_type in FrameType::ALL {
            if matches!(frame_type, FrameType::Hello | FrameType::Error) {
                continue;
            }
            let header = FrameHeader {
                frame_type,
                payload_len: 0,
            };
            assert!(header.check_before_handshake().is_err(), "{frame_type}");
        }
    }

    #[test]
    fn header_errors() {
        assert_eq!(decode_err(&header(0x4547, 0, 0)), "unknown frame type 17735 (0x4547)");
        assert_eq!(decode_err(b"GET / HTTP/1.1\r\n"), "unknown frame type 17735 (0x4547)");
        assert_eq!(
            decode_err(&header(FrameType::Done as u16, 0x8000, 0)),
            "frame Done has flags 0x8000; this version defines none (they must be 0)"
        );
        assert_eq!(decode(&[0x08, 0x01, 0]).unwrap(), None);
    }
}
