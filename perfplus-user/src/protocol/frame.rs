//! Frames: one [`Message`] (or handshake [`Hello`] / [`Auth`]) ⇄ bytes. No sockets here.
//!
//! ## Layout
//! Every frame is a fixed 8-byte header followed by its payload, all integers little-endian:
//! ```text
//! offset 0   u16  frame type   (FrameType, one per Message variant + Hello + Auth)
//! offset 2   u16  flags        (none defined: must be 0)
//! offset 4   u32  payload length in bytes
//! offset 8   payload
//! ```
//! Each frame type has a payload limit (an exact size for fixed-size frames, a maximum otherwise), see
//! [`FrameType::limit`]. It is checked from the header alone, by [`FrameHeader::parse`] / [`peek_header`],
//! so a reader rejects a frame announcing 4 GiB before it allocates or buffers anything.
//!
//! ## Payloads
//! - `Hello`: 45 bytes: `magic "PERFPLUS"`, `u16 min_version`, `u16 max_version`, `u8 role`
//!   (0 Control, 1 Peer), `[u8; 32] nonce`. This layout never changes between versions: it is what
//!   negotiates them.
//! - `Auth`: 32 bytes, the HMAC-SHA256 proof (see `handshake`).
//! - `Error`: the message, UTF-8, no length prefix.
//! - `VmList`, `Done`: empty.
//! - `RoundEnd`: `u32 round`.
//! - `RoundAck`: `u32 round`, `u32 count`, `count × u64` missing pages.
//! - `MigrateReady`: `u32 count`, `count × u64` held digest prefixes.
//! - `Running`: `f64 cpu_ms` (IEEE bits), `u32 count`, `count × u64` page checksums.
//! - `VmState`: the bytes as given (already a postcard encoding, see [`Message::VmState`]).
//! - `Pages`: a sequence of page items (see [`PageBatch`]).
//! - every other frame: the postcard encoding of the variant's payload struct or field.
//!
//! Decoding checks everything: counts against lengths, postcard content, trailing bytes. A `Pages`
//! payload is validated once, when the frame is decoded ([`PageBatch::from_payload`]); the batch then
//! owns the payload bytes and [`PageBatch::iter`] hands out zero-copy references into them.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use super::handshake::{Auth, Hello, HELLO_MAGIC};
use super::{Message, MigrateReady, Role};

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 8;

/// Bytes of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of a page digest.
pub const DIGEST_LEN: usize = 16;

/// Page items in one `Pages` frame at most (4 MiB of page content when every item is full).
pub const PAGE_BATCH_MAX_ITEMS: usize = 1024;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Payload bytes of a `Hello` frame.
pub const HELLO_LEN: usize = 8 + 2 + 2 + 1 + 32;
/// Payload bytes of an `Auth` frame.
pub const AUTH_LEN: usize = 32;
/// Largest `Error` payload.
pub const ERROR_MAX: usize = 64 * KIB;
/// Largest payload of a control frame (requests, replies, reports).
pub const CONTROL_MAX: usize = MIB;
/// Largest `Vms` payload (a list of VMs with their console tails).
pub const VM_LIST_MAX: usize = 16 * MIB;
/// Largest payload that carries a kernel image or a per-page array (`VmStart`, `MigrateReady`,
/// `RoundAck`, `Running`): 128 MiB, i.e. 16 Mi pages = 64 GiB of guest memory for the arrays.
pub const BULK_MAX: usize = 128 * MIB;
/// Largest `VmState` payload.
pub const VM_STATE_MAX: usize = 4 * MIB;

/// Bytes of a zero-page item: kind, page.
pub const ZERO_ITEM_LEN: usize = 1 + 8;
/// Bytes of a reference item: kind, page, digest.
pub const REF_ITEM_LEN: usize = 1 + 8 + DIGEST_LEN;
/// Bytes of a full-page item: kind, page, digest, content.
pub const FULL_ITEM_LEN: usize = 1 + 8 + DIGEST_LEN + PAGE_SIZE;
/// Largest `Pages` payload: [`PAGE_BATCH_MAX_ITEMS`] full items.
pub const PAGE_BATCH_MAX_PAYLOAD: usize = PAGE_BATCH_MAX_ITEMS * FULL_ITEM_LEN;

const KIND_ZERO: u8 = 0;
const KIND_FULL: u8 = 1;
const KIND_REF: u8 = 2;

/// What went wrong with a frame. Every variant names the frame and what was wrong with it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame type {0} (0x{0:04x})")]
    UnknownType(u16),
    #[error("frame {frame} has flags 0x{flags:04x}; this version defines none (they must be 0)")]
    BadFlags { frame: FrameType, flags: u16 },
    #[error("payload of {len} bytes exceeds the limit {max} for frame {frame}")]
    TooLarge {
        frame: FrameType,
        len: usize,
        max: usize,
    },
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
    /// Handshake: version range, role, nonce.
    Hello = 0x0001, Limit::Exact(HELLO_LEN);
    /// Handshake: proof of the cluster key.
    Auth = 0x0002, Limit::Exact(AUTH_LEN);
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
    Running = 0x0207, Limit::Max(BULK_MAX);
    /// [`Message::Complete`].
    Complete = 0x0208, Limit::Max(CONTROL_MAX);
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FrameType {
    /// The frame type that carries `msg`.
    pub fn of(msg: &Message) -> FrameType {
        match msg {
            Message::VmStart(_) => FrameType::VmStart,
            Message::VmList => FrameType::VmList,
            Message::VmStatus { .. } => FrameType::VmStatus,
            Message::VmStop { .. } => FrameType::VmStop,
            Message::Migrate(_) => FrameType::Migrate,
            Message::Vm(_) => FrameType::Vm,
            Message::Vms(_) => FrameType::Vms,
            Message::Done => FrameType::Done,
            Message::Progress(_) => FrameType::Progress,
            Message::MigrateDone(_) => FrameType::MigrateDone,
            Message::MigrateBegin(_) => FrameType::MigrateBegin,
            Message::MigrateReady(_) => FrameType::MigrateReady,
            Message::Pages(_) => FrameType::Pages,
            Message::RoundEnd { .. } => FrameType::RoundEnd,
            Message::RoundAck { .. } => FrameType::RoundAck,
            Message::VmState(_) => FrameType::VmState,
            Message::Running { .. } => FrameType::Running,
            Message::Complete(_) => FrameType::Complete,
            Message::Error { .. } => FrameType::Error,
        }
    }

    /// Checks a payload length against this type's limit.
    pub fn check_len(self, len: usize) -> Result<(), FrameError> {
        match self.limit() {
            Limit::Exact(expected) if len != expected => Err(FrameError::WrongSize {
                frame: self,
                len,
                expected,
            }),
            Limit::Max(max) if len > max => Err(FrameError::TooLarge {
                frame: self,
                len,
                max,
            }),
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

/// Any frame: a handshake frame or a message.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Auth(Auth),
    Message(Message),
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends the frame of `msg` to `out`. Fails (leaving `out` as it was) when the payload would
/// exceed the frame type's limit, so an oversized message is refused here rather than by the peer.
/// A [`PageBatch`]'s bytes are copied once, into `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let frame_type = FrameType::of(msg);
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    match msg {
        Message::VmStart(req) => put_postcard(out, req),
        Message::VmList | Message::Done => {}
        Message::VmStatus { name } | Message::VmStop { name } => put_postcard(out, name),
        Message::Migrate(req) => put_postcard(out, req),
        Message::Vm(info) => put_postcard(out, info),
        Message::Vms(list) => put_postcard(out, list),
        Message::Progress(round) => put_postcard(out, round),
        Message::MigrateDone(report) | Message::Complete(report) => put_postcard(out, &**report),
        Message::MigrateBegin(begin) => put_postcard(out, begin),
        Message::MigrateReady(ready) => put_u64s(out, &ready.held),
        Message::Pages(batch) => {
            batch.check()?;
            out.extend_from_slice(&batch.bytes);
        }
        Message::RoundEnd { round } => out.extend_from_slice(&round.to_le_bytes()),
        Message::RoundAck { round, missing } => {
            out.extend_from_slice(&round.to_le_bytes());
            put_u64s(out, missing);
        }
        Message::VmState(state) => out.extend_from_slice(state),
        Message::Running {
            page_checksums,
            cpu_ms,
        } => {
            out.extend_from_slice(&cpu_ms.to_le_bytes());
            put_u64s(out, page_checksums);
        }
        Message::Error { message } => out.extend_from_slice(message.as_bytes()),
    }
    finish_frame(out, start, frame_type)
}

/// Appends a `Hello` frame to `out`.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    out.extend_from_slice(&header_bytes(FrameType::Hello, HELLO_LEN));
    out.extend_from_slice(&hello_payload(hello));
}

/// Appends an `Auth` frame to `out`.
pub fn encode_auth(auth: &Auth, out: &mut Vec<u8>) {
    out.extend_from_slice(&header_bytes(FrameType::Auth, AUTH_LEN));
    out.extend_from_slice(&auth.mac);
}

/// The payload bytes of a `Hello` frame (the handshake authenticates them).
pub fn hello_payload(hello: &Hello) -> [u8; HELLO_LEN] {
    let mut p = [0u8; HELLO_LEN];
    p[0..8].copy_from_slice(HELLO_MAGIC);
    p[8..10].copy_from_slice(&hello.min_version.to_le_bytes());
    p[10..12].copy_from_slice(&hello.max_version.to_le_bytes());
    p[12] = match hello.role {
        Role::Control => 0,
        Role::Peer => 1,
    };
    p[13..45].copy_from_slice(&hello.nonce);
    p
}

/// The header of a `Pages` frame for `batch`, for writers that send the batch bytes themselves
/// (see [`PageBatch::as_bytes`]) instead of copying them into a frame buffer.
pub fn pages_header(batch: &PageBatch) -> Result<[u8; HEADER_LEN], FrameError> {
    batch.check()?;
    Ok(FrameHeader::new(FrameType::Pages, batch.payload_len())?.to_bytes())
}

/// Header bytes for a fixed-size frame whose length is known to be within the limit.
fn header_bytes(frame_type: FrameType, len: usize) -> [u8; HEADER_LEN] {
    FrameHeader {
        frame_type,
        payload_len: len,
    }
    .to_bytes()
}

fn finish_frame(out: &mut Vec<u8>, start: usize, frame_type: FrameType) -> Result<(), FrameError> {
    let payload_len = out.len() - start - HEADER_LEN;
    match FrameHeader::new(frame_type, payload_len) {
        Ok(header) => {
            out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn put_postcard<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // postcard can only fail on a sequence of unknown length or a full fixed buffer; the payload
    // types are plain structs, vectors and strings written into a growable Vec, so it cannot.
    let written = postcard::to_extend(value, std::mem::take(out))
        .expect("postcard encoding of a protocol payload into a Vec cannot fail");
    *out = written;
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    // A count that does not fit a u32 makes a payload far over every limit; it is refused by
    // finish_frame, so saturating here only keeps the arithmetic defined.
    let count = u32::try_from(values.len()).unwrap_or(u32::MAX);
    out.reserve(4 + values.len().saturating_mul(8));
    out.extend_from_slice(&count.to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Decodes the message frame at the start of `buf`: `None` when `buf` does not hold a whole frame yet
/// (the header is still checked as soon as it is there), else the message and the bytes consumed.
/// Handshake frames are refused ([`FrameError::HandshakeFrame`]).
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    match decode_frame(buf)? {
        None => Ok(None),
        Some((Frame::Message(msg), used)) => Ok(Some((msg, used))),
        Some((Frame::Hello(_), _)) => Err(FrameError::HandshakeFrame(FrameType::Hello)),
        Some((Frame::Auth(_), _)) => Err(FrameError::HandshakeFrame(FrameType::Auth)),
    }
}

/// Decodes any frame at the start of `buf`, handshake frames included. See [`decode`].
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(HEADER_LEN..header.frame_len()) else {
        return Ok(None);
    };
    let frame = decode_payload_slice(header.frame_type, payload)?;
    Ok(Some((frame, header.frame_len())))
}

/// Decodes the payload of a frame whose header was already read and checked, taking ownership of the
/// payload bytes: a `Pages` or `VmState` payload becomes the message without being copied.
pub fn decode_payload(header: FrameHeader, payload: Vec<u8>) -> Result<Frame, FrameError> {
    let frame_type = header.frame_type;
    frame_type.check_len(payload.len())?;
    match frame_type {
        FrameType::Pages => Ok(Frame::Message(Message::Pages(PageBatch::from_payload(
            payload,
        )?))),
        FrameType::VmState => Ok(Frame::Message(Message::VmState(payload))),
        _ => decode_payload_slice(frame_type, &payload),
    }
}

fn decode_payload_slice(frame_type: FrameType, p: &[u8]) -> Result<Frame, FrameError> {
    frame_type.check_len(p.len())?;
    let msg = match frame_type {
        FrameType::Hello => return decode_hello(p).map(Frame::Hello),
        FrameType::Auth => {
            let mac = p.try_into().map_err(|_| FrameError::WrongSize {
                frame: frame_type,
                len: p.len(),
                expected: AUTH_LEN,
            })?;
            return Ok(Frame::Auth(Auth { mac }));
        }
        FrameType::Error => Message::Error {
            message: String::from_utf8(p.to_vec()).map_err(|e| malformed(frame_type, e))?,
        },
        FrameType::VmStart => Message::VmStart(get_postcard(frame_type, p)?),
        FrameType::VmList => Message::VmList,
        FrameType::VmStatus => Message::VmStatus {
            name: get_postcard(frame_type, p)?,
        },
        FrameType::VmStop => Message::VmStop {
            name: get_postcard(frame_type, p)?,
        },
        FrameType::Migrate => Message::Migrate(get_postcard(frame_type, p)?),
        FrameType::Vm => Message::Vm(get_postcard(frame_type, p)?),
        FrameType::Vms => Message::Vms(get_postcard(frame_type, p)?),
        FrameType::Done => Message::Done,
        FrameType::Progress => Message::Progress(get_postcard(frame_type, p)?),
        FrameType::MigrateDone => Message::MigrateDone(Box::new(get_postcard(frame_type, p)?)),
        FrameType::MigrateBegin => Message::MigrateBegin(get_postcard(frame_type, p)?),
        FrameType::MigrateReady => Message::MigrateReady(MigrateReady {
            held: get_u64s(frame_type, p, "held digest prefixes")?,
        }),
        FrameType::Pages => Message::Pages(PageBatch::from_payload(p.to_vec())?),
        FrameType::RoundEnd => Message::RoundEnd {
            round: get_u32(frame_type, p)?,
        },
        FrameType::RoundAck => Message::RoundAck {
            round: get_u32(frame_type, p)?,
            missing: get_u64s(frame_type, &p[4..], "missing pages")?,
        },
        FrameType::VmState => Message::VmState(p.to_vec()),
        FrameType::Running => {
            let bits = p
                .first_chunk::<8>()
                .ok_or_else(|| malformed(frame_type, "shorter than its 8-byte cpu_ms field"))?;
            Message::Running {
                cpu_ms: f64::from_le_bytes(*bits),
                page_checksums: get_u64s(frame_type, &p[8..], "page checksums")?,
            }
        }
        FrameType::Complete => Message::Complete(Box::new(get_postcard(frame_type, p)?)),
    };
    Ok(Frame::Message(msg))
}

fn decode_hello(p: &[u8]) -> Result<Hello, FrameError> {
    let bytes: &[u8; HELLO_LEN] = p.try_into().map_err(|_| FrameError::WrongSize {
        frame: FrameType::Hello,
        len: p.len(),
        expected: HELLO_LEN,
    })?;
    let magic: [u8; 8] = bytes[0..8].try_into().expect("8-byte slice");
    if &magic != HELLO_MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let min_version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let max_version = u16::from_le_bytes([bytes[10], bytes[11]]);
    if min_version > max_version {
        return Err(malformed(
            FrameType::Hello,
            format!("version range {min_version}..={max_version} is empty"),
        ));
    }
    let role = match bytes[12] {
        0 => Role::Control,
        1 => Role::Peer,
        other => return Err(malformed(FrameType::Hello, format!("unknown role {other}"))),
    };
    Ok(Hello {
        min_version,
        max_version,
        role,
        nonce: bytes[13..45].try_into().expect("32-byte slice"),
    })
}

fn malformed(frame: FrameType, detail: impl fmt::Display) -> FrameError {
    FrameError::Malformed {
        frame,
        detail: detail.to_string(),
    }
}

fn get_postcard<T: DeserializeOwned>(frame: FrameType, p: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes::<T>(p).map_err(|e| malformed(frame, e))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes {
            frame,
            extra: rest.len(),
        });
    }
    Ok(value)
}

fn get_u32(frame: FrameType, p: &[u8]) -> Result<u32, FrameError> {
    let bytes = p
        .first_chunk::<4>()
        .ok_or_else(|| malformed(frame, "shorter than its 4-byte round field"))?;
    if frame == FrameType::RoundEnd && p.len() > 4 {
        return Err(FrameError::TrailingBytes {
            frame,
            extra: p.len() - 4,
        });
    }
    Ok(u32::from_le_bytes(*bytes))
}

/// `u32 count` then `count × u64`, and nothing after.
fn get_u64s(frame: FrameType, p: &[u8], what: &str) -> Result<Vec<u64>, FrameError> {
    let count_bytes = p
        .first_chunk::<4>()
        .ok_or_else(|| malformed(frame, format!("no room for the count of {what}")))?;
    let count = u32::from_le_bytes(*count_bytes) as usize;
    let body = &p[4..];
    let needed = count * 8;
    if body.len() < needed {
        return Err(malformed(
            frame,
            format!(
                "declares {count} {what} ({needed} bytes) but carries {} bytes",
                body.len()
            ),
        ));
    }
    if body.len() > needed {
        return Err(FrameError::TrailingBytes {
            frame,
            extra: body.len() - needed,
        });
    }
    Ok(body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Page batches

/// A batch of page items, encoded in place: the payload of a `Pages` frame.
///
/// Items, back to back, integers little-endian:
/// ```text
/// Zero: u8 0, u64 page                                   (9 bytes)
/// Full: u8 1, u64 page, [u8; 16] digest, [u8; 4096] data (4121 bytes)
/// Ref:  u8 2, u64 page, [u8; 16] digest                  (25 bytes)
/// ```
/// Build with the `push_*` methods (at most [`PAGE_BATCH_MAX_ITEMS`] items: check [`is_full`](Self::is_full)),
/// read with [`iter`](Self::iter). A batch decoded from a frame was validated whole by
/// [`from_payload`](Self::from_payload), so its iterator yields no errors; the iterator still checks
/// every item as it goes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageBatch {
    bytes: Vec<u8>,
    items: usize,
}

/// One item of a [`PageBatch`], borrowed from the batch's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageItem<'a> {
    /// The page's content, with its digest.
    Full {
        page: u64,
        digest: &'a [u8; DIGEST_LEN],
        data: &'a [u8; PAGE_SIZE],
    },
    /// The page is all zeroes.
    Zero { page: u64 },
    /// The page holds the content with this digest, which the destination already has.
    Ref {
        page: u64,
        digest: &'a [u8; DIGEST_LEN],
    },
}

impl PageItem<'_> {
    /// The guest page the item is about.
    pub fn page(&self) -> u64 {
        match *self {
            PageItem::Full { page, .. } | PageItem::Zero { page } | PageItem::Ref { page, .. } => {
                page
            }
        }
    }
}

impl fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("items", &self.items)
            .field("payload_len", &self.bytes.len())
            .finish()
    }
}

impl PageBatch {
    /// An empty batch.
    pub fn new() -> PageBatch {
        PageBatch::default()
    }

    /// An empty batch with room for `pages` full items (capped at [`PAGE_BATCH_MAX_ITEMS`]).
    pub fn with_capacity(pages: usize) -> PageBatch {
        PageBatch {
            bytes: Vec::with_capacity(pages.min(PAGE_BATCH_MAX_ITEMS) * FULL_ITEM_LEN),
            items: 0,
        }
    }

    /// Appends a page sent in full.
    pub fn push_full(&mut self, page: u64, digest: &[u8; DIGEST_LEN], data: &[u8; PAGE_SIZE]) {
        self.bytes.reserve(FULL_ITEM_LEN);
        self.bytes.push(KIND_FULL);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.bytes.extend_from_slice(digest);
        self.bytes.extend_from_slice(data);
        self.items += 1;
    }

    /// Appends a zero-page marker.
    pub fn push_zero(&mut self, page: u64) {
        self.bytes.push(KIND_ZERO);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.items += 1;
    }

    /// Appends a reference to content the destination holds.
    pub fn push_ref(&mut self, page: u64, digest: &[u8; DIGEST_LEN]) {
        self.bytes.push(KIND_REF);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.bytes.extend_from_slice(digest);
        self.items += 1;
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.items
    }

    /// True when the batch holds no item.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// True when the batch holds [`PAGE_BATCH_MAX_ITEMS`] items: send it before pushing more.
    pub fn is_full(&self) -> bool {
        self.items >= PAGE_BATCH_MAX_ITEMS
    }

    /// Bytes of the encoded items (the `Pages` frame's payload).
    pub fn payload_len(&self) -> usize {
        self.bytes.len()
    }

    /// The encoded items.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Removes every item, keeping the allocation.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items = 0;
    }

    /// Iterates over the items, borrowing their digests and contents from the batch.
    /// Yields an error (and then stops) at an item of unknown kind or a truncated item.
    pub fn iter(&self) -> PageItems<'_> {
        PageItems {
            rest: &self.bytes,
            index: 0,
            done: false,
        }
    }

    /// Takes ownership of a `Pages` payload after checking every item's kind and length and the item
    /// count; nothing is copied.
    pub fn from_payload(bytes: Vec<u8>) -> Result<PageBatch, FrameError> {
        FrameType::Pages.check_len(bytes.len())?;
        let mut items = 0;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            if items == PAGE_BATCH_MAX_ITEMS {
                return Err(FrameError::TooManyItems {
                    count: items + 1,
                    max: PAGE_BATCH_MAX_ITEMS,
                });
            }
            let (_, len) = parse_item(rest, items)?;
            rest = &rest[len..];
            items += 1;
        }
        Ok(PageBatch { bytes, items })
    }

    /// The checks a decoder would make, for the encoder: item count and payload size.
    fn check(&self) -> Result<(), FrameError> {
        if self.items > PAGE_BATCH_MAX_ITEMS {
            return Err(FrameError::TooManyItems {
                count: self.items,
                max: PAGE_BATCH_MAX_ITEMS,
            });
        }
        FrameType::Pages.check_len(self.bytes.len())
    }
}

impl<'a> IntoIterator for &'a PageBatch {
    type Item = Result<PageItem<'a>, FrameError>;
    type IntoIter = PageItems<'a>;
    fn into_iter(self) -> PageItems<'a> {
        self.iter()
    }
}

/// Iterator over the items of a [`PageBatch`].
pub struct PageItems<'a> {
    rest: &'a [u8],
    index: usize,
    done: bool,
}

impl<'a> Iterator for PageItems<'a> {
    type Item = Result<PageItem<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.rest.is_empty() {
            return None;
        }
        match parse_item(self.rest, self.index) {
            Ok((item, len)) => {
                self.rest = &self.rest[len..];
                self.index += 1;
                Some(Ok(item))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Parses the item at the start of `buf` (item number `index`, for errors): the item and its length.
fn parse_item(buf: &[u8], index: usize) -> Result<(PageItem<'_>, usize), FrameError> {
    let kind = buf[0];
    let (name, len) = match kind {
        KIND_ZERO => ("zero", ZERO_ITEM_LEN),
        KIND_FULL => ("full", FULL_ITEM_LEN),
        KIND_REF => ("reference", REF_ITEM_LEN),
        other => {
            return Err(FrameError::PageItem {
                index,
                detail: format!("unknown kind {other}"),
            })
        }
    };
    let Some(item) = buf.get(..len) else {
        return Err(FrameError::PageItem {
            index,
            detail: format!(
                "truncated: a {name} item is {len} bytes, only {} remain",
                buf.len()
            ),
        });
    };
    let page = u64::from_le_bytes(item[1..9].try_into().expect("8-byte slice"));
    let item = match kind {
        KIND_ZERO => PageItem::Zero { page },
        KIND_FULL => PageItem::Full {
            page,
            digest: item[9..25].try_into().expect("16-byte slice"),
            data: item[25..].try_into().expect("4096-byte slice"),
        },
        _ => PageItem::Ref {
            page,
            digest: item[9..25].try_into().expect("16-byte slice"),
        },
    };
    Ok((item, len))
}
