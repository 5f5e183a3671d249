//! Every [`Message`] ⇄ the payload of its frame, and the handshake's Hello ⇄ its payload (see
//! [`super`] for the payload layouts). Encoding refuses what decoding would refuse.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};

use super::header::{peek_header, FrameError, FrameHeader, FrameType, HEADER_LEN, PAGE_REQUEST_MAX};
use super::page_batch::PageBatch;
use crate::handshake::{Hello, HelloError, HELLO_LEN};
use crate::{Message, MigrateReady};

/// Any frame: a handshake frame or a message.
#[derive(Clone, Debug, PartialEq)]
// A Frame lives for one decode call and is matched at once; boxing the message would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Frame {
    Hello(Hello),
    Message(Message),
}

impl FrameType {
    /// The frame type that carries `msg`.
    pub fn of(msg: &Message) -> FrameType {
        match msg {
            Message::VmStart(_) => FrameType::VmStart,
            Message::VmList => FrameType::VmList,
            Message::VmStatus { .. } => FrameType::VmStatus,
            Message::VmStop { .. } => FrameType::VmStop,
            Message::VmResume { .. } => FrameType::VmResume,
            Message::Migrate(_) => FrameType::Migrate,
            Message::MigrateResume { .. } => FrameType::MigrateResume,
            Message::MigrateCancel { .. } => FrameType::MigrateCancel,
            Message::Cancelled { .. } => FrameType::Cancelled,
            Message::Vm(_) => FrameType::Vm,
            Message::Vms(_) => FrameType::Vms,
            Message::Done => FrameType::Done,
            Message::Progress(_) => FrameType::Progress,
            Message::MigrateDone(_) => FrameType::MigrateDone,
            Message::VmConsole(_) => FrameType::VmConsole,
            Message::ConsoleOutput(_) => FrameType::ConsoleOutput,
            Message::Track(_) => FrameType::Track,
            Message::TrackSample(_) => FrameType::TrackSample,
            Message::MigrateBegin(_) => FrameType::MigrateBegin,
            Message::MigrateReady(_) => FrameType::MigrateReady,
            Message::Pages(_) => FrameType::Pages,
            Message::RoundEnd { .. } => FrameType::RoundEnd,
            Message::RoundAck { .. } => FrameType::RoundAck,
            Message::VmState(_) => FrameType::VmState,
            Message::Running => FrameType::Running,
            Message::Restored => FrameType::Restored,
            Message::Commit => FrameType::Commit,
            Message::PageChecksums { .. } => FrameType::PageChecksums,
            Message::GroupChecksums { .. } => FrameType::GroupChecksums,
            Message::PageChecksumsWanted { .. } => FrameType::PageChecksumsWanted,
            Message::GuestCheck(_) => FrameType::GuestCheck,
            Message::Complete(_) => FrameType::Complete,
            Message::PostcopyBegin { .. } => FrameType::PostcopyBegin,
            Message::PostcopyAttach(_) => FrameType::PostcopyAttach,
            Message::PageRequest { .. } => FrameType::PageRequest,
            Message::PushAck { .. } => FrameType::PushAck,
            Message::AllPresent => FrameType::AllPresent,
            Message::ResumeState { .. } => FrameType::ResumeState,
            Message::Ping => FrameType::Ping,
            Message::QemuRelayBegin(_) => FrameType::QemuRelayBegin,
            Message::QemuStream(_) => FrameType::QemuStream,
            Message::QemuRelayDone(_) => FrameType::QemuRelayDone,
            Message::QemuMigrate(_) => FrameType::QemuMigrate,
            Message::QemuMigrateDone { .. } => FrameType::QemuMigrateDone,
            Message::Error { .. } => FrameType::Error,
        }
    }
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
        Message::VmStatus { name } | Message::VmStop { name } | Message::VmResume { name } => put_postcard(out, name),
        Message::Migrate(req) => put_postcard(out, req),
        Message::MigrateResume { id } | Message::MigrateCancel { id } => put_postcard(out, id),
        Message::Cancelled { what_happened } => put_postcard(out, what_happened),
        Message::Vm(info) => put_postcard(out, info),
        Message::Vms(list) => put_postcard(out, list),
        Message::Progress(round) => put_postcard(out, round),
        Message::MigrateDone(report) | Message::Complete(report) => put_postcard(out, &**report),
        Message::VmConsole(req) => put_postcard(out, req),
        Message::ConsoleOutput(output) => {
            if output.bytes.len() > super::CONSOLE_CHUNK_MAX {
                return Err(FrameError::Malformed {
                    frame: FrameType::ConsoleOutput,
                    detail: format!(
                        "{} bytes of console output; at most {} go in one frame",
                        output.bytes.len(),
                        super::CONSOLE_CHUNK_MAX
                    ),
                });
            }
            put_postcard(out, output)
        }
        Message::Track(req) => put_postcard(out, req),
        Message::TrackSample(sample) => put_postcard(out, &**sample),
        Message::MigrateBegin(begin) => put_postcard(out, begin),
        Message::MigrateReady(ready) => put_u64s(out, &ready.held),
        Message::Pages(batch) => {
            batch.check()?;
            out.extend_from_slice(batch.as_bytes());
        }
        Message::RoundEnd { round } => out.extend_from_slice(&round.to_le_bytes()),
        Message::RoundAck { round, missing } => {
            out.extend_from_slice(&round.to_le_bytes());
            put_u64s(out, missing);
        }
        Message::VmState(state) => out.extend_from_slice(state),
        Message::Running | Message::Restored | Message::Commit => {}
        Message::PageChecksums { checksums } | Message::GroupChecksums { checksums } => put_u64s(out, checksums),
        Message::PageChecksumsWanted { groups } => put_u64s(out, groups),
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
        Message::QemuRelayBegin(begin) => put_postcard(out, begin),
        Message::QemuStream(bytes) => out.extend_from_slice(bytes),
        Message::QemuRelayDone(done) => put_postcard(out, done),
        Message::QemuMigrate(request) => put_postcard(out, request),
        Message::QemuMigrateDone { report_json } => put_postcard(out, report_json),
        Message::Error { message } => out.extend_from_slice(message.as_bytes()),
    }
    Ok(())
}

/// Appends a `Hello` frame to `out`.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    out.extend_from_slice(&header_bytes(FrameType::Hello, HELLO_LEN));
    out.extend_from_slice(&hello.to_bytes());
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
    // A count that does not fit a u32 makes a payload far over every limit; `encode` refuses it when
    // it checks the payload length against the frame type's limit, so saturating here only keeps the
    // arithmetic defined.
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
        FrameType::PagesZstd => Ok(Frame::Message(Message::Pages(super::compression::decompress_batch(
            &payload,
        )?))),
        FrameType::QemuStreamZstd => Ok(Frame::Message(Message::QemuStream(super::compression::decompress(
            frame_type, &payload,
        )?))),
        FrameType::VmState => Ok(Frame::Message(Message::VmState(payload))),
        _ => decode_payload_slice(frame_type, &payload),
    }
}

fn decode_payload_slice(frame_type: FrameType, p: &[u8]) -> Result<Frame, FrameError> {
    frame_type.check_len(p.len())?;
    let msg = match frame_type {
        FrameType::Hello => return decode_hello(p).map(Frame::Hello),
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
        FrameType::VmResume => Message::VmResume {
            name: get_postcard(frame_type, p)?,
        },
        FrameType::Migrate => Message::Migrate(get_postcard(frame_type, p)?),
        FrameType::MigrateResume => Message::MigrateResume {
            id: get_postcard(frame_type, p)?,
        },
        FrameType::MigrateCancel => Message::MigrateCancel {
            id: get_postcard(frame_type, p)?,
        },
        FrameType::Cancelled => Message::Cancelled {
            what_happened: get_postcard(frame_type, p)?,
        },
        FrameType::Vm => Message::Vm(get_postcard(frame_type, p)?),
        FrameType::Vms => Message::Vms(get_postcard(frame_type, p)?),
        FrameType::Done => Message::Done,
        FrameType::Progress => Message::Progress(get_postcard(frame_type, p)?),
        FrameType::MigrateDone => Message::MigrateDone(Box::new(get_postcard(frame_type, p)?)),
        FrameType::VmConsole => Message::VmConsole(get_postcard(frame_type, p)?),
        FrameType::ConsoleOutput => Message::ConsoleOutput(get_postcard(frame_type, p)?),
        FrameType::Track => Message::Track(get_postcard(frame_type, p)?),
        FrameType::TrackSample => Message::TrackSample(Box::new(get_postcard(frame_type, p)?)),
        FrameType::MigrateBegin => Message::MigrateBegin(get_postcard(frame_type, p)?),
        FrameType::MigrateReady => Message::MigrateReady(MigrateReady {
            held: get_u64s(frame_type, p, "held digest prefixes")?,
        }),
        FrameType::Pages => Message::Pages(PageBatch::from_payload(p.to_vec())?),
        FrameType::PagesZstd => Message::Pages(super::compression::decompress_batch(p)?),
        FrameType::RoundEnd => Message::RoundEnd {
            round: get_u32(frame_type, p)?,
        },
        FrameType::RoundAck => Message::RoundAck {
            round: get_u32(frame_type, p)?,
            missing: get_u64s(frame_type, &p[4..], "missing pages")?,
        },
        FrameType::VmState => Message::VmState(p.to_vec()),
        FrameType::Running => Message::Running,
        FrameType::Restored => Message::Restored,
        FrameType::Commit => Message::Commit,
        FrameType::PageChecksums => Message::PageChecksums {
            checksums: get_u64s(frame_type, p, "page checksums")?,
        },
        FrameType::GroupChecksums => Message::GroupChecksums {
            checksums: get_u64s(frame_type, p, "group checksums")?,
        },
        FrameType::PageChecksumsWanted => Message::PageChecksumsWanted {
            groups: get_u64s(frame_type, p, "groups")?,
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
        FrameType::QemuRelayBegin => Message::QemuRelayBegin(get_postcard(frame_type, p)?),
        FrameType::QemuStream => Message::QemuStream(p.to_vec()),
        FrameType::QemuStreamZstd => Message::QemuStream(super::compression::decompress(frame_type, p)?),
        FrameType::QemuRelayDone => Message::QemuRelayDone(get_postcard(frame_type, p)?),
        FrameType::QemuMigrate => Message::QemuMigrate(get_postcard(frame_type, p)?),
        FrameType::QemuMigrateDone => Message::QemuMigrateDone {
            report_json: get_postcard(frame_type, p)?,
        },
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

pub(super) fn malformed(frame: FrameType, detail: impl fmt::Display) -> FrameError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_support::*;
    use crate::frame::{FULL_ITEM_LEN, REF_ITEM_LEN, ZERO_ITEM_LEN};
    use crate::handshake::HELLO_LEN;
    use crate::Role;

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
            // Hello is the handshake's; PagesZstd and QemuStreamZstd are a Pages and a QemuStream
            // message compressed (compression.rs).
            .filter(|t| !matches!(t, FrameType::Hello | FrameType::PagesZstd | FrameType::QemuStreamZstd))
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
        };
        let mut out = Vec::new();
        encode_hello(&hello, &mut out);
        assert_eq!(out.len(), HEADER_LEN + HELLO_LEN);
        assert_eq!(&out[HEADER_LEN..HEADER_LEN + 8], b"PERFPLUS");
        assert_eq!(decode_frame(&out).unwrap(), Some((Frame::Hello(hello), out.len())));
        assert_eq!(decode_err(&out), "unexpected handshake frame Hello after the handshake");

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
            decode_frame(&frame_bytes(FrameType::Hello, &[0; 12]))
                .unwrap_err()
                .to_string(),
            "payload of frame Hello is 12 bytes; it must be exactly 13"
        );
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
            perfplus_common::splitmix::next(&mut self.0)
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
