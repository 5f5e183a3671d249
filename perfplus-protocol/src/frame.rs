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
//! - `Hello`: [`HELLO_LEN`] (45) bytes, laid out by [`Hello::to_bytes`]: magic `"PERFPLUS"`, version
//!   range, role, nonce. This layout never changes between versions: it is what negotiates them.
//! - `Auth`: [`AUTH_LEN`] (32) bytes, the HMAC-SHA256 proof (see [`crate::handshake`]).
//! - `Error`: the message, UTF-8, no length prefix.
//! - `VmList`, `Done`: empty.
//! - `RoundEnd`: `u32 round`.
//! - `RoundAck`: `u32 round`, `u32 count`, `count × u64` missing pages.
//! - `MigrateReady`: `u32 count`, `count × u64` held digest prefixes.
//! - `Running`: empty.
//! - `PageChecksums`: `u32 count`, `count × u64` page checksums.
//! - `PostcopyBegin`, `ResumeState`: `u32 count`, `count × u64` bitmap words.
//! - `PageRequest`: `u8 full` (0 or 1), `u32 count`, `count × u64` pages (at most [`PAGE_REQUEST_MAX`]).
//! - `PushAck`: `u64 bytes`, `u64 present`.
//! - `AllPresent`, `Ping`: empty.
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

use super::handshake::{Auth, Hello, HelloError, AUTH_LEN, HELLO_LEN, HELLO_MAGIC};
use super::{Message, MigrateReady};

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
/// Largest `PostcopyAttach` / `MigrateResume` payload (an id and a tag).
pub const ATTACH_MAX: usize = 256;
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
    /// [`Message::MigrateResume`].
    MigrateResume = 0x010b, Limit::Max(ATTACH_MAX);
    /// [`Message::Track`].
    Track = 0x0120, Limit::Max(CONTROL_MAX);
    /// [`Message::TrackSample`].
    TrackSample = 0x0121, Limit::Max(CONTROL_MAX);
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
            Message::MigrateResume { .. } => FrameType::MigrateResume,
            Message::Vm(_) => FrameType::Vm,
            Message::Vms(_) => FrameType::Vms,
            Message::Done => FrameType::Done,
            Message::Progress(_) => FrameType::Progress,
            Message::MigrateDone(_) => FrameType::MigrateDone,
            Message::Track(_) => FrameType::Track,
            Message::TrackSample(_) => FrameType::TrackSample,
            Message::MigrateBegin(_) => FrameType::MigrateBegin,
            Message::MigrateReady(_) => FrameType::MigrateReady,
            Message::Pages(_) => FrameType::Pages,
            Message::RoundEnd { .. } => FrameType::RoundEnd,
            Message::RoundAck { .. } => FrameType::RoundAck,
            Message::VmState(_) => FrameType::VmState,
            Message::Running => FrameType::Running,
            Message::PageChecksums { .. } => FrameType::PageChecksums,
            Message::GuestCheck(_) => FrameType::GuestCheck,
            Message::Complete(_) => FrameType::Complete,
            Message::PostcopyBegin { .. } => FrameType::PostcopyBegin,
            Message::PostcopyAttach(_) => FrameType::PostcopyAttach,
            Message::PageRequest { .. } => FrameType::PageRequest,
            Message::PushAck { .. } => FrameType::PushAck,
            Message::AllPresent => FrameType::AllPresent,
            Message::ResumeState { .. } => FrameType::ResumeState,
            Message::Ping => FrameType::Ping,
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
// A Frame lives for one decode call and is matched at once; boxing the message would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
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
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let result = put_payload(msg, out).and_then(|()| {
        let header = FrameHeader::new(FrameType::of(msg), out.len() - start - HEADER_LEN)?;
        out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(())
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn put_payload(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    match msg {
        Message::VmStart(req) => put_postcard(out, req),
        Message::VmList | Message::Done => {}
        Message::VmStatus { name } | Message::VmStop { name } => put_postcard(out, name),
        Message::Migrate(req) => put_postcard(out, req),
        Message::MigrateResume { id } => put_postcard(out, id),
        Message::Vm(info) => put_postcard(out, info),
        Message::Vms(list) => put_postcard(out, list),
        Message::Progress(round) => put_postcard(out, round),
        Message::MigrateDone(report) | Message::Complete(report) => put_postcard(out, &**report),
        Message::Track(req) => put_postcard(out, req),
        Message::TrackSample(sample) => put_postcard(out, &**sample),
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
        Message::Running => {}
        Message::PageChecksums { checksums } => put_u64s(out, checksums),
        Message::GuestCheck(check) => put_postcard(out, check),
        Message::PostcopyBegin { missing } | Message::ResumeState { missing } => put_u64s(out, missing),
        Message::PostcopyAttach(attach) => put_postcard(out, attach),
        Message::PageRequest { full, pages } => {
            out.push(u8::from(*full));
            put_u64s(out, pages);
        }
        Message::PushAck { bytes, present } => {
            out.extend_from_slice(&bytes.to_le_bytes());
            out.extend_from_slice(&present.to_le_bytes());
        }
        Message::AllPresent | Message::Ping => {}
        Message::Error { message } => out.extend_from_slice(message.as_bytes()),
    }
    Ok(())
}

/// Appends a `Hello` frame to `out`.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    out.extend_from_slice(&header_bytes(FrameType::Hello, HELLO_LEN));
    out.extend_from_slice(&hello.to_bytes());
}

/// Appends an `Auth` frame to `out`.
pub fn encode_auth(auth: &Auth, out: &mut Vec<u8>) {
    out.extend_from_slice(&header_bytes(FrameType::Auth, AUTH_LEN));
    out.extend_from_slice(&auth.mac);
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
        FrameType::Pages => Ok(Frame::Message(Message::Pages(PageBatch::from_payload(payload)?))),
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
        FrameType::MigrateResume => Message::MigrateResume {
            id: get_postcard(frame_type, p)?,
        },
        FrameType::Vm => Message::Vm(get_postcard(frame_type, p)?),
        FrameType::Vms => Message::Vms(get_postcard(frame_type, p)?),
        FrameType::Done => Message::Done,
        FrameType::Progress => Message::Progress(get_postcard(frame_type, p)?),
        FrameType::MigrateDone => Message::MigrateDone(Box::new(get_postcard(frame_type, p)?)),
        FrameType::Track => Message::Track(get_postcard(frame_type, p)?),
        FrameType::TrackSample => Message::TrackSample(Box::new(get_postcard(frame_type, p)?)),
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
        FrameType::Running => Message::Running,
        FrameType::PageChecksums => Message::PageChecksums {
            checksums: get_u64s(frame_type, p, "page checksums")?,
        },
        FrameType::GuestCheck => Message::GuestCheck(Box::new(get_postcard(frame_type, p)?)),
        FrameType::Complete => Message::Complete(Box::new(get_postcard(frame_type, p)?)),
        FrameType::PostcopyBegin => Message::PostcopyBegin {
            missing: get_u64s(frame_type, p, "bitmap words")?,
        },
        FrameType::ResumeState => Message::ResumeState {
            missing: get_u64s(frame_type, p, "bitmap words")?,
        },
        FrameType::PostcopyAttach => Message::PostcopyAttach(get_postcard(frame_type, p)?),
        FrameType::PageRequest => {
            let (&flag, rest) = p
                .split_first()
                .ok_or_else(|| malformed(frame_type, "no room for the full flag"))?;
            let full = match flag {
                0 => false,
                1 => true,
                other => return Err(malformed(frame_type, format!("full flag {other} is neither 0 nor 1"))),
            };
            let pages = get_u64s(frame_type, rest, "pages")?;
            if pages.len() > PAGE_REQUEST_MAX {
                return Err(malformed(
                    frame_type,
                    format!("{} pages requested, at most {PAGE_REQUEST_MAX}", pages.len()),
                ));
            }
            Message::PageRequest { full, pages }
        }
        FrameType::PushAck => Message::PushAck {
            bytes: u64::from_le_bytes(p[0..8].try_into().expect("exact size checked")),
            present: u64::from_le_bytes(p[8..16].try_into().expect("exact size checked")),
        },
        FrameType::AllPresent => Message::AllPresent,
        FrameType::Ping => Message::Ping,
    };
    Ok(Frame::Message(msg))
}

fn decode_hello(p: &[u8]) -> Result<Hello, FrameError> {
    let bytes: &[u8; HELLO_LEN] = p.try_into().map_err(|_| FrameError::WrongSize {
        frame: FrameType::Hello,
        len: p.len(),
        expected: HELLO_LEN,
    })?;
    Hello::from_bytes(bytes).map_err(|e| match e {
        HelloError::BadMagic { found } => FrameError::BadMagic { found },
        other => malformed(FrameType::Hello, other),
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
    Ref { page: u64, digest: &'a [u8; DIGEST_LEN] },
}

impl PageItem<'_> {
    /// The guest page the item is about.
    pub fn page(&self) -> u64 {
        match *self {
            PageItem::Full { page, .. } | PageItem::Zero { page } | PageItem::Ref { page, .. } => page,
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
            detail: format!("truncated: a {name} item is {len} bytes, only {} remain", buf.len()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{MigrationReport, RoundReport};
    use crate::{KernelSource, MigrateBegin, MigrateOptions, MigrateRequest, Role, VmInfo, VmStartRequest};
    use perfplus_vmm::vm::GuestStatus;

    fn round() -> RoundReport {
        RoundReport {
            round: 3,
            stop_and_copy: true,
            dirty_pages: 100,
            sent_pages: 40,
            skipped_unchanged: 30,
            skipped_zero: 20,
            skipped_held: 10,
            resent_missing: 2,
            read_pages: 90,
            bytes_on_wire: 123_456,
            duration_ms: 1.5,
            bandwidth_mbps: 9400.25,
        }
    }

    fn report() -> MigrationReport {
        MigrationReport {
            vm: "web".into(),
            source: "10.0.0.1:7000".into(),
            destination: "10.0.0.2:7000".into(),
            mode: "precopy".into(),
            tracker: "dirty-log".into(),
            hashing: true,
            memory_bytes: 1 << 30,
            rounds: vec![round(), RoundReport::default()],
            downtime_ms: 12.5,
            guest_max_stall_ms: Some(13.0),
            guest_pages_written_after: Some(77),
            stop_reason: "converged".into(),
            ..Default::default()
        }
    }

    fn vm_info() -> VmInfo {
        VmInfo {
            name: "web".into(),
            memory_bytes: 256 << 20,
            vcpus: 2,
            run_state: "running".into(),
            cmdline: "wss=1000".into(),
            guest: Some(GuestStatus {
                state: 2,
                tsc_khz: 3_000_000,
                first_mismatch_page: Some(5),
                message: "ok ✓".into(),
                ..Default::default()
            }),
            console_tail: "booted\n".into(),
        }
    }

    fn page(fill: u8) -> [u8; PAGE_SIZE] {
        let mut p = [fill; PAGE_SIZE];
        p[0] = 0xAB;
        p[PAGE_SIZE - 1] = fill.wrapping_add(1);
        p
    }

    fn batch() -> PageBatch {
        let mut b = PageBatch::with_capacity(4);
        b.push_full(7, &[1; 16], &page(0x11));
        b.push_zero(8);
        b.push_ref(9, &[2; 16]);
        b.push_full(u64::MAX, &[3; 16], &page(0x22));
        b
    }

    /// One message of every variant.
    fn every_message() -> Vec<Message> {
        let options = MigrateOptions {
            downtime_target_ms: 12.5,
            max_rounds: 7,
            hashing: false,
            verify_guest: true,
            hot_last: false,
            mode: crate::MigrationMode::Postcopy,
            tracker: Some(perfplus_vmm::tracking::TrackerKind::UffdWp),
        };
        vec![
            Message::VmStart(VmStartRequest {
                name: "web".into(),
                memory_bytes: 1 << 28,
                vcpus: 4,
                kernel: KernelSource::Image(vec![0x7f, b'E', b'L', b'F', 0, 1, 2]),
                cmdline: "console=ttyS0".into(),
                tracker: perfplus_vmm::tracking::TrackerKind::DirtyRing,
            }),
            Message::VmStart(VmStartRequest {
                name: String::new(),
                memory_bytes: 0,
                vcpus: 1,
                kernel: KernelSource::Builtin,
                cmdline: String::new(),
                tracker: perfplus_vmm::tracking::TrackerKind::DirtyLog,
            }),
            Message::VmList,
            Message::VmStatus { name: "web".into() },
            Message::VmStop { name: "db".into() },
            Message::Migrate(MigrateRequest {
                vm: "web".into(),
                destination: "10.0.0.2:7000".into(),
                options: options.clone(),
            }),
            Message::Vm(vm_info()),
            Message::Vms(vec![vm_info(), vm_info()]),
            Message::Vms(vec![]),
            Message::Done,
            Message::Progress(round()),
            Message::MigrateDone(Box::new(report())),
            Message::Track(crate::TrackRequest {
                vm: "web".into(),
                interval_ms: 1000,
                intervals: 0,
                ebpf: true,
            }),
            Message::TrackSample(Box::new(crate::TrackSample {
                interval: 3,
                elapsed_s: 3.01,
                interval_s: 1.002,
                source: "dirty-log".into(),
                dirty_pages: 1999,
                hottest: vec![crate::TrackRegion {
                    start: 0x20_0000,
                    pages: 12,
                    writes: 40,
                }],
                ebpf_events: Some(0),
                ebpf_pages: None,
                guest_pages_written: Some(2000),
                note: Some("bitmap mode".into()),
            })),
            Message::MigrateBegin(MigrateBegin {
                vm: "web".into(),
                memory_bytes: 1 << 30,
                vcpus: 2,
                cmdline: "x=1".into(),
                options,
                migration_id: "0123abcd".into(),
            }),
            Message::MigrateReady(MigrateReady {
                held: vec![0, 1, u64::MAX, 0x0123_4567_89ab_cdef],
            }),
            Message::MigrateReady(MigrateReady { held: vec![] }),
            Message::Pages(batch()),
            Message::Pages(PageBatch::new()),
            Message::RoundEnd { round: 42 },
            Message::RoundAck {
                round: 42,
                missing: vec![3, 99],
            },
            Message::VmState(vec![9, 8, 7]),
            Message::Running,
            Message::PageChecksums {
                checksums: vec![1, 2, 3, u64::MAX],
            },
            Message::GuestCheck(Box::new(crate::GuestCheck {
                at_resume: Some(perfplus_vmm::vm::GuestStatus::default()),
                after: None,
                verified: true,
                cpu_ms: 12.5,
                held_from_store: 1,
                held_from_hosted_vms: 2,
                held_from_this_migration: 3,
                postcopy: Some(crate::PostcopyStats {
                    demand_faults: 5,
                    ..Default::default()
                }),
            })),
            Message::Complete(Box::new(report())),
            Message::MigrateResume { id: "0123abcd".into() },
            Message::PostcopyBegin {
                missing: vec![u64::MAX, 1],
            },
            Message::ResumeState { missing: vec![] },
            Message::PostcopyAttach(crate::PostcopyAttach {
                id: "0123abcd".into(),
                channel: crate::Channel::Demand,
            }),
            Message::PageRequest {
                full: true,
                pages: vec![7, 0x1234],
            },
            Message::PageRequest {
                full: false,
                pages: vec![],
            },
            Message::PushAck {
                bytes: 1 << 40,
                present: 77,
            },
            Message::AllPresent,
            Message::Ping,
            Message::Error {
                message: "no VM named \"x\" ✗".into(),
            },
        ]
    }

    fn encoded(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out).unwrap();
        out
    }

    fn header(frame_type: u16, flags: u16, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&frame_type.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h
    }

    fn frame_bytes(frame_type: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut f = header(frame_type as u16, 0, payload.len() as u32);
        f.extend_from_slice(payload);
        f
    }

    fn decode_err(buf: &[u8]) -> String {
        decode(buf).unwrap_err().to_string()
    }

    #[test]
    fn every_message_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for msg in every_message() {
            let bytes = encoded(&msg);
            let header = peek_header(&bytes).unwrap().unwrap();
            assert_eq!(header.frame_type, FrameType::of(&msg));
            assert_eq!(header.frame_len(), bytes.len());
            assert_eq!(&bytes[2..4], &[0, 0], "flags");
            let (decoded, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(decoded, msg);
            assert_eq!(used, bytes.len());
            // Owned decoding gives the same message.
            let owned = decode_payload(header, bytes[HEADER_LEN..].to_vec()).unwrap();
            assert_eq!(owned, Frame::Message(msg.clone()));
            // Every strict prefix is incomplete, never an error or a message.
            for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
                if cut < bytes.len() {
                    assert_eq!(decode(&bytes[..cut]).unwrap(), None, "{msg:?} cut at {cut}");
                }
            }
            seen.insert(header.frame_type);
        }
        let message_types: Vec<_> = FrameType::ALL
            .iter()
            .filter(|t| !matches!(t, FrameType::Hello | FrameType::Auth))
            .collect();
        assert_eq!(seen.len(), message_types.len(), "a variant is missing");
    }

    #[test]
    fn frames_back_to_back() {
        let msgs = every_message();
        let mut stream = Vec::new();
        for m in &msgs {
            encode(m, &mut stream).unwrap();
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, used)) = decode(&stream[at..]).unwrap() {
            got.push(m);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert_eq!(got, msgs);
    }

    #[test]
    fn compact_layouts_are_as_documented() {
        assert_eq!(
            encoded(&Message::RoundEnd { round: 0x0102_0304 }),
            frame_bytes(FrameType::RoundEnd, &[4, 3, 2, 1])
        );
        let ack = encoded(&Message::RoundAck {
            round: 1,
            missing: vec![2],
        });
        assert_eq!(
            ack,
            frame_bytes(FrameType::RoundAck, &[1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(encoded(&Message::VmList), vec![0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        let pages = encoded(&Message::Pages(batch()));
        assert_eq!(
            pages.len(),
            HEADER_LEN + 2 * FULL_ITEM_LEN + ZERO_ITEM_LEN + REF_ITEM_LEN
        );
    }

    #[test]
    fn handshake_frames() {
        let hello = Hello {
            min_version: 1,
            max_version: 3,
            role: Role::Control,
            nonce: [7; 32],
        };
        let mut out = Vec::new();
        encode_hello(&hello, &mut out);
        assert_eq!(out.len(), HEADER_LEN + HELLO_LEN);
        assert_eq!(&out[HEADER_LEN..HEADER_LEN + 8], b"PERFPLUS");
        assert_eq!(decode_frame(&out).unwrap(), Some((Frame::Hello(hello), out.len())));
        assert_eq!(decode_err(&out), "unexpected handshake frame Hello after the handshake");

        let auth = Auth { mac: [9; 32] };
        let mut out = Vec::new();
        encode_auth(&auth, &mut out);
        assert_eq!(decode_frame(&out).unwrap(), Some((Frame::Auth(auth), out.len())));

        let mut bad = hello.to_bytes();
        bad[..8].copy_from_slice(b"NOTPERFP");
        assert_eq!(
            decode_frame(&frame_bytes(FrameType::Hello, &bad))
                .unwrap_err()
                .to_string(),
            "Hello frame carries magic \"NOTPERFP\" instead of \"PERFPLUS\""
        );
        let mut bad = hello.to_bytes();
        bad[12] = 9;
        assert_eq!(
            decode_frame(&frame_bytes(FrameType::Hello, &bad))
                .unwrap_err()
                .to_string(),
            "payload of frame Hello malformed: unknown role 9"
        );
        let mut bad = hello.to_bytes();
        bad[8] = 5; // min 5 > max 3
        assert_eq!(
            decode_frame(&frame_bytes(FrameType::Hello, &bad))
                .unwrap_err()
                .to_string(),
            "payload of frame Hello malformed: version range 5..=3 is empty"
        );
        assert_eq!(
            decode_frame(&frame_bytes(FrameType::Hello, &[0; 44]))
                .unwrap_err()
                .to_string(),
            "payload of frame Hello is 44 bytes; it must be exactly 45"
        );
    }

    #[test]
    fn page_batch_round_trip() {
        let b = batch();
        assert_eq!(b.len(), 4);
        assert!(!b.is_empty());
        assert!(!b.is_full());
        assert_eq!(b.payload_len(), 2 * FULL_ITEM_LEN + ZERO_ITEM_LEN + REF_ITEM_LEN);
        assert_eq!(format!("{b:?}"), "PageBatch { items: 4, payload_len: 8276 }");

        let bytes = encoded(&Message::Pages(b.clone()));
        let Some((Message::Pages(decoded), _)) = decode(&bytes).unwrap() else {
            panic!("not a Pages message");
        };
        let items: Vec<_> = decoded.iter().collect::<Result<_, _>>().unwrap();
        let (p11, p22) = (page(0x11), page(0x22));
        assert_eq!(
            items,
            vec![
                PageItem::Full {
                    page: 7,
                    digest: &[1; 16],
                    data: &p11
                },
                PageItem::Zero { page: 8 },
                PageItem::Ref {
                    page: 9,
                    digest: &[2; 16]
                },
                PageItem::Full {
                    page: u64::MAX,
                    digest: &[3; 16],
                    data: &p22
                },
            ]
        );
        assert_eq!(
            items.iter().map(PageItem::page).collect::<Vec<_>>(),
            [7, 8, 9, u64::MAX]
        );
        // Zero-copy: the data reference points into the batch's own bytes.
        if let PageItem::Full { data, .. } = items[0] {
            let range = decoded.as_bytes().as_ptr_range();
            assert!(range.contains(&data.as_ptr()));
        }
        assert_eq!(decoded, b);

        let mut cleared = decoded.clone();
        cleared.clear();
        assert!(cleared.is_empty());
        assert_eq!(cleared.payload_len(), 0);
        assert_eq!(cleared.iter().count(), 0);
    }

    #[test]
    fn full_page_batch_fits_its_frame() {
        let mut b = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for i in 0..PAGE_BATCH_MAX_ITEMS as u64 {
            b.push_full(i, &[i as u8; 16], &page(i as u8));
        }
        assert!(b.is_full());
        assert_eq!(b.payload_len(), PAGE_BATCH_MAX_PAYLOAD);
        let bytes = encoded(&Message::Pages(b.clone()));
        let (msg, _) = decode(&bytes).unwrap().unwrap();
        assert_eq!(msg, Message::Pages(b.clone()));

        // One more item is refused by the encoder, with `out` left as it was.
        b.push_zero(0);
        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode(&Message::Pages(b.clone()), &mut out).unwrap_err().to_string(),
            "page batch of 1025 items exceeds the limit of 1024 items"
        );
        assert_eq!(out, [1, 2, 3]);
        assert!(pages_header(&b).is_err());
    }

    #[test]
    fn page_item_errors_name_the_item() {
        let mut raw = batch().as_bytes().to_vec();
        // Item 1 (the zero item) starts right after the first full item.
        raw[FULL_ITEM_LEN] = 7;
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, &raw)),
            "page item 1: unknown kind 7"
        );

        let whole = batch();
        let raw = &whole.as_bytes()[..FULL_ITEM_LEN + ZERO_ITEM_LEN + 10];
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, raw)),
            "page item 2: truncated: a reference item is 25 bytes, only 10 remain"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, &[KIND_FULL, 0, 0])),
            "page item 0: truncated: a full item is 4121 bytes, only 3 remain"
        );

        // More than PAGE_BATCH_MAX_ITEMS small items fit the byte limit but not the item limit.
        let mut many = PageBatch::new();
        for i in 0..=PAGE_BATCH_MAX_ITEMS as u64 {
            many.push_zero(i);
        }
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, many.as_bytes())),
            "page batch of 1025 items exceeds the limit of 1024 items"
        );
    }

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
    fn header_errors() {
        assert_eq!(decode_err(&header(0x4547, 0, 0)), "unknown frame type 17735 (0x4547)");
        assert_eq!(decode_err(b"GET / HTTP/1.1\r\n"), "unknown frame type 17735 (0x4547)");
        assert_eq!(
            decode_err(&header(FrameType::Done as u16, 0x8000, 0)),
            "frame Done has flags 0x8000; this version defines none (they must be 0)"
        );
        assert_eq!(decode(&[0x08, 0x01, 0]).unwrap(), None);
    }

    #[test]
    fn payload_errors() {
        // postcard string whose length prefix (5) runs past the payload.
        assert_eq!(
            decode_err(&frame_bytes(FrameType::VmStatus, &[5, b'a'])),
            "payload of frame VmStatus malformed: Hit the end of buffer, expected more data"
        );
        // A valid name followed by a stray byte.
        assert_eq!(
            decode_err(&frame_bytes(FrameType::VmStop, &[1, b'a', 0xff])),
            "payload of frame VmStop has 1 trailing bytes after its content"
        );
        // KernelSource discriminant 9 does not exist.
        let mut start = encoded(&every_message()[1]);
        let kernel_at = start.len() - 2; // ... kernel (1 byte), cmdline length (1 byte)
        start[kernel_at] = 9;
        let err = decode_err(&start);
        assert!(err.starts_with("payload of frame VmStart malformed: "), "{err}");
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Error, &[0xff, 0xfe])),
            "payload of frame Error malformed: invalid utf-8 sequence of 1 bytes from index 0"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::RoundAck, &[1, 0, 0, 0, 2, 0, 0, 0, 1, 2, 3])),
            "payload of frame RoundAck malformed: declares 2 missing pages (16 bytes) but carries 3 bytes"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::MigrateReady, &[0, 0, 0, 0, 1])),
            "payload of frame MigrateReady has 1 trailing bytes after its content"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::MigrateReady, &[0, 0])),
            "payload of frame MigrateReady malformed: no room for the count of held digest prefixes"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Running, &[0; 7])),
            "payload of frame Running is 7 bytes; it must be exactly 0"
        );
        // A count of 4 Gi entries is refused by comparing with the payload, not by allocating.
        assert_eq!(
            decode_err(&frame_bytes(FrameType::PageChecksums, &[0xff, 0xff, 0xff, 0xff])),
            "payload of frame PageChecksums malformed: declares 4294967295 page checksums (34359738360 bytes) but carries 0 bytes"
        );
        assert_eq!(
            decode_payload(
                FrameHeader::new(FrameType::VmState, 3).unwrap(),
                vec![0; 4 * 1024 * 1024 + 1]
            )
            .unwrap_err()
            .to_string(),
            "payload of 4194305 bytes exceeds the limit 4194304 for frame VmState"
        );
    }

    /// splitmix64: a fixed-seed generator for the fuzz loops.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_decode_never_panics() {
        let mut rng = Rng(0x5eed);
        let mut outcomes = [0usize; 3]; // incomplete, message, error
        let mut tally = |r: Result<Option<(Message, usize)>, FrameError>, len: usize| match r {
            Ok(None) => outcomes[0] += 1,
            Ok(Some((_, used))) => {
                assert!(used <= len);
                outcomes[1] += 1
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                outcomes[2] += 1
            }
        };
        // 1. Random bytes.
        for _ in 0..3000 {
            let len = rng.below(64);
            let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            tally(decode(&buf), buf.len());
        }
        // 2. A valid header of a random type, with a random payload of the announced length.
        for _ in 0..3000 {
            let t = FrameType::ALL[rng.below(FrameType::ALL.len())];
            let len = rng.below(t.limit().max().min(200) + 1);
            let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let buf = frame_bytes(t, &payload);
            let _ = decode_frame(&buf);
            tally(decode(&buf), buf.len());
        }
        // 3. Valid frames with a few bytes flipped, and truncated.
        let valid: Vec<Vec<u8>> = every_message().iter().map(encoded).collect();
        for _ in 0..3000 {
            let mut buf = valid[rng.below(valid.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(buf.len());
                buf[at] ^= 1 << rng.below(8);
            }
            if rng.below(4) == 0 {
                buf.truncate(rng.below(buf.len() + 1));
            }
            tally(decode(&buf), buf.len());
        }
        // Every kind of outcome was reached, so the loops exercised the decoder, not just the header.
        assert!(outcomes.iter().all(|&n| n > 100), "{outcomes:?}");
    }
}
