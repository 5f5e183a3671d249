//! The fuzz targets. Each takes any bytes and must not panic; the `assert!`s are the properties a
//! decoder promises (a panic here is a finding, whether the decoder or a property failed).

use arbitrary::Unstructured;
use perfplus_protocol::frame::{
    self, decode, decode_frame, decode_payload, encode, encode_hello, peek_header, Frame, FrameHeader, PageBatch,
    PageItem, HEADER_LEN, PAGE_BATCH_MAX_ITEMS,
};
use perfplus_protocol::handshake::{Handshake, Hello, Side, HELLO_LEN};
use perfplus_protocol::{Message, Role};
use perfplus_vmm::vm::multiboot::{self, RESERVED};
use perfplus_vmm::vm::{VmState, MIN_MEMORY};

use crate::generate;

/// A fuzz target: a name (the corpus folder under `fuzz/corpus/`), the function, and the largest
/// input the mutation fuzzer makes for it.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub max_len: usize,
}

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        run: frame,
        max_len: 64 << 10,
    },
    Target {
        name: "handshake",
        run: handshake,
        max_len: 256,
    },
    Target {
        name: "page_batch",
        run: page_batch,
        max_len: 64 << 10,
    },
    Target {
        name: "vm_state",
        run: vm_state,
        max_len: 64 << 10,
    },
    Target {
        name: "multiboot",
        run: multiboot,
        max_len: 256 << 10,
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Equality that holds for a float field that decoded as NaN too (the control messages carry f64s).
fn same_message(a: &Message, b: &Message) -> bool {
    a == b || format!("{a:?}") == format!("{b:?}")
}

fn encoded(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).unwrap_or_else(|e| panic!("a decoded {} does not encode again: {e}", msg.name()));
    out
}

/// A decoded message encodes again, and that encoding decodes to the same message and is a fixed
/// point (encoding what it decodes to gives the same bytes).
fn check_reencodes(msg: &Message) {
    let bytes = encoded(msg);
    let (again, used) = decode(&bytes)
        .unwrap_or_else(|e| panic!("the encoding of a decoded {} does not decode: {e}", msg.name()))
        .expect("a whole frame");
    assert_eq!(used, bytes.len());
    assert!(same_message(msg, &again), "{msg:?} came back as {again:?}");
    assert_eq!(
        encoded(&again),
        bytes,
        "encoding is not a fixed point for {}",
        msg.name()
    );
}

/// Frames: header, then payload, then [`Message`]. The bytes are read as a stream of frames back to
/// back (as a connection's buffer holds them), each frame decoded both from the slice and from an
/// owned payload (the connection's path), and then used to generate messages that must round-trip.
pub fn frame(data: &[u8]) {
    let mut rest = data;
    for _ in 0..16 {
        match decode_frame(rest) {
            Ok(Some((decoded, used))) => {
                assert!((HEADER_LEN..=rest.len()).contains(&used));
                let header = peek_header(rest).expect("decoded").expect("whole header");
                assert_eq!(header.frame_len(), used);
                let owned = decode_payload(header, rest[HEADER_LEN..used].to_vec());
                match (&decoded, owned) {
                    (Frame::Hello(h), Ok(Frame::Hello(o))) => {
                        assert_eq!(*h, o);
                        let mut again = Vec::new();
                        encode_hello(h, &mut again);
                        assert_eq!(again, rest[..used], "Hello is not canonical");
                    }
                    (Frame::Message(m), Ok(Frame::Message(o))) => {
                        assert!(same_message(m, &o), "owned decoding differs: {m:?} / {o:?}");
                        check_reencodes(m);
                        // The slice decoder for messages agrees.
                        let (d, n) = decode(rest).expect("decoded").expect("whole");
                        assert!(same_message(m, &d) && n == used);
                    }
                    (d, o) => panic!("slice and owned decoding disagree: {d:?} / {o:?}"),
                }
                rest = &rest[used..];
            }
            Ok(None) => {
                // Incomplete: either the header or the announced payload is not all there, and the
                // header, if present, is valid.
                if let Some(h) = peek_header(rest).expect("decode_frame accepted the header") {
                    assert!(h.frame_len() > rest.len());
                } else {
                    assert!(rest.len() < HEADER_LEN);
                }
                break;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                // The slice decoder for messages refuses it too (a Hello only after the handshake).
                assert!(decode(rest).is_err());
                break;
            }
        }
    }
    // A header alone: parsing its own bytes gives it back, and the pre-handshake check holds.
    if let Ok(Some(header)) = peek_header(data) {
        assert_eq!(FrameHeader::parse(&header.to_bytes()), Ok(header));
        if let Ok(h) = header.check_before_handshake() {
            assert!(h.payload_len <= frame::HANDSHAKE_ERROR_MAX.max(HELLO_LEN));
        }
    }
    // Messages made from the bytes decode to exactly what was encoded.
    let mut u = Unstructured::new(data);
    while let Ok(msg) = generate::message(&mut u) {
        let bytes = encoded(&msg);
        let (back, used) = decode(&bytes)
            .expect("a generated message decodes")
            .expect("whole frame");
        assert_eq!(used, bytes.len());
        assert_eq!(back, msg);
        if u.is_empty() {
            break;
        }
    }
}

/// The Hello bytes and the handshake's version and role negotiation.
pub fn handshake(data: &[u8]) {
    if let Some(bytes) = data.first_chunk::<HELLO_LEN>() {
        match Hello::from_bytes(bytes) {
            Ok(hello) => assert_eq!(&hello.to_bytes(), bytes, "Hello is not canonical"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        // The same bytes as a Hello frame before the handshake: admitted, and decoded alike.
        let mut framed = Vec::new();
        framed.extend_from_slice(&1u16.to_le_bytes());
        framed.extend_from_slice(&0u16.to_le_bytes());
        framed.extend_from_slice(&(HELLO_LEN as u32).to_le_bytes());
        framed.extend_from_slice(bytes);
        let header = peek_header(&framed).expect("Hello header").expect("whole");
        assert!(header.check_before_handshake().is_ok());
        match (decode_frame(&framed), Hello::from_bytes(bytes)) {
            (Ok(Some((Frame::Hello(a), _))), Ok(b)) => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("Hello frame {a:?} and Hello bytes {b:?} disagree"),
        }
    }

    // Two sides with version ranges and roles from the bytes; the Hellos travel as frames.
    let mut u = Unstructured::new(data);
    let Ok((a_min, a_max, b_min, b_max, a_role, b_role)) = (|| -> arbitrary::Result<_> {
        let role = |u: &mut Unstructured| -> arbitrary::Result<Role> { Ok(*u.choose(&[Role::Control, Role::Peer])?) };
        Ok((
            u.arbitrary::<u16>()?,
            u.arbitrary::<u16>()?,
            u.arbitrary::<u16>()?,
            u.arbitrary::<u16>()?,
            role(&mut u)?,
            role(&mut u)?,
        ))
    })() else {
        return;
    };
    let wire = |hello: &Hello| -> Hello {
        let mut out = Vec::new();
        encode_hello(hello, &mut out);
        match decode_frame(&out) {
            Ok(Some((Frame::Hello(h), used))) if used == out.len() => h,
            other => panic!("a Hello this side made does not decode: {other:?}"),
        }
    };
    let initiator = Handshake::with_versions(Side::Initiator, a_role, a_min, a_max);
    let mut responder = Handshake::with_versions(Side::Responder, b_role, b_min, b_max);
    let (a, b) = (*initiator.hello(), *responder.hello());
    assert!(a.min_version <= a.max_version && b.min_version <= b.max_version);
    let overlap = a.min_version.max(b.min_version)..=a.max_version.min(b.max_version);
    match responder.receive_hello(&wire(&a)) {
        Ok(established) => {
            assert!(!overlap.is_empty());
            assert_eq!(established.version, *overlap.end(), "the highest common version");
            assert_eq!(established.role, a_role);
            responder.answer_role(a_role);
            let back = initiator
                .receive_hello(&wire(responder.hello()))
                .expect("the initiator accepts the responder's answer");
            assert_eq!(back, established);
        }
        Err(e) => {
            assert!(overlap.is_empty(), "refused overlapping ranges: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
    // An initiator refuses an answer with another role.
    let mut other = Handshake::with_versions(Side::Responder, b_role, a.min_version, a.max_version);
    other.answer_role(match a_role {
        Role::Control => Role::Peer,
        Role::Peer => Role::Control,
    });
    assert!(initiator.receive_hello(&wire(other.hello())).is_err());
}

/// The `Pages` payload: a valid batch yields exactly its items, which rebuild the same bytes; a
/// generated batch survives a frame's encode and decode.
pub fn page_batch(data: &[u8]) {
    if let Ok(batch) = PageBatch::from_payload(data.to_vec()) {
        assert!(batch.len() <= PAGE_BATCH_MAX_ITEMS);
        let mut rebuilt = PageBatch::with_capacity(batch.len());
        let mut n = 0;
        for item in &batch {
            match item.expect("a validated batch yields no error") {
                PageItem::Full { page, digest, data } => rebuilt.push_full(page, digest, data),
                PageItem::Zero { page } => rebuilt.push_zero(page),
                PageItem::Ref { page, digest } => rebuilt.push_ref(page, digest),
            }
            n += 1;
        }
        assert_eq!(n, batch.len());
        assert_eq!(rebuilt.as_bytes(), data);
        assert_eq!(rebuilt, batch);
        check_reencodes(&Message::Pages(batch));
    }
    let mut u = Unstructured::new(data);
    if let Ok(batch) = generate::page_batch(&mut u, 64) {
        let msg = Message::Pages(batch);
        let bytes = encoded(&msg);
        let (back, _) = decode(&bytes).expect("a generated batch decodes").expect("whole");
        assert_eq!(back, msg);
    }
}

/// The VM state a destination decodes before restoring it: what decodes and passes the checks
/// encodes again to bytes that decode alike (a fixed point).
pub fn vm_state(data: &[u8]) {
    if let Ok(state) = VmState::from_bytes(data) {
        let bytes = state.to_bytes().expect("a decoded VM state encodes");
        let again = VmState::from_bytes(&bytes).expect("the encoding of a decoded VM state decodes");
        assert_eq!(again.to_bytes().expect("encodes"), bytes);
        // It travels in a VmState frame as is.
        check_reencodes(&Message::VmState(bytes));
    }
}

/// The multiboot loader's parsing: a plan for any image is within RAM, clear of the reserved low
/// area, within the image's bytes, and its segments do not overlap.
pub fn multiboot(data: &[u8]) {
    let _ = multiboot::find_header(data);
    for ram in [MIN_MEMORY, 64 << 30] {
        let Ok(plan) = multiboot::plan(data, ram) else {
            continue;
        };
        assert!(!plan.segments.is_empty());
        for (i, s) in plan.segments.iter().enumerate() {
            assert!(s.start <= s.end && s.end <= ram, "{s:?} outside RAM of {ram:#x}");
            assert!(
                s.end <= RESERVED.start || s.start >= RESERVED.end,
                "{s:?} overlaps {RESERVED:?}"
            );
            assert!(
                s.file.start <= s.file.end && s.file.end <= data.len(),
                "{s:?} outside the image"
            );
            assert!((s.file.len() as u64) <= s.end - s.start, "{s:?}: more file than memory");
            for t in &plan.segments[i + 1..] {
                assert!(s.end <= t.start || t.end <= s.start, "{s:?} overlaps {t:?}");
            }
        }
    }
}
