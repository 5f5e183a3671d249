//! Values made from fuzz input with [`arbitrary`]: messages (every variant whose fields carry no
//! floating point, so that `==` is exact) and page batches. The targets encode them and check that
//! decoding gives back exactly what was encoded.

use arbitrary::{Result, Unstructured};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::frame::{PageBatch, ERROR_MAX, PAGE_BATCH_MAX_ITEMS, PAGE_REQUEST_MAX};
use perfplus_protocol::{Channel, KernelSource, Message, MigrateReady, PostcopyAttach, TrackRequest, VmStartRequest};
use perfplus_vmm::tracking::TrackerKind;

/// A vector of at most `max` items.
fn vec_of<T>(u: &mut Unstructured, max: usize, mut item: impl FnMut(&mut Unstructured) -> Result<T>) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| item(u)).collect()
}

fn u64s(u: &mut Unstructured, max: usize) -> Result<Vec<u64>> {
    vec_of(u, max, |u| u.arbitrary())
}

fn string(u: &mut Unstructured, max: usize) -> Result<String> {
    let s: String = u.arbitrary()?;
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(s[..end].to_string())
}

fn tracker(u: &mut Unstructured) -> Result<TrackerKind> {
    Ok(*u.choose(&TrackerKind::ALL)?)
}

/// A page batch of up to `max_items` items of every kind.
pub fn page_batch(u: &mut Unstructured, max_items: usize) -> Result<PageBatch> {
    let n = u.int_in_range(0..=max_items.min(PAGE_BATCH_MAX_ITEMS))?;
    let mut batch = PageBatch::with_capacity(n);
    for _ in 0..n {
        let page: u64 = u.arbitrary()?;
        match u.int_in_range(0..=2u8)? {
            0 => batch.push_zero(page),
            1 => batch.push_ref(page, &u.arbitrary()?),
            _ => {
                let mut data = [0u8; PAGE_SIZE];
                // Whatever input is left fills the start of the page; the rest stays zero.
                let take = u.len().min(PAGE_SIZE).min(u.int_in_range(0..=64usize)?);
                data[..take].copy_from_slice(u.bytes(take)?);
                batch.push_full(page, &u.arbitrary()?, &data);
            }
        }
    }
    Ok(batch)
}

/// A message of one of the float-free variants, within its frame's limits.
pub fn message(u: &mut Unstructured) -> Result<Message> {
    Ok(match u.int_in_range(0..=30u8)? {
        0 => Message::Error {
            message: string(u, ERROR_MAX)?,
        },
        1 => Message::RoundEnd { round: u.arbitrary()? },
        2 => Message::RoundAck {
            round: u.arbitrary()?,
            missing: u64s(u, 512)?,
        },
        3 => Message::MigrateReady(MigrateReady { held: u64s(u, 512)? }),
        4 => Message::PageChecksums {
            checksums: u64s(u, 512)?,
        },
        5 => Message::PostcopyBegin { missing: u64s(u, 512)? },
        6 => Message::ResumeState { missing: u64s(u, 512)? },
        7 => Message::PageRequest {
            full: u.arbitrary()?,
            pages: u64s(u, PAGE_REQUEST_MAX)?,
        },
        8 => Message::PushAck {
            bytes: u.arbitrary()?,
            present: u.arbitrary()?,
        },
        9 => Message::VmState(vec_of(u, 4096, |u| u.arbitrary())?),
        10 => Message::Pages(page_batch(u, 16)?),
        11 => Message::VmStatus { name: string(u, 256)? },
        12 => Message::VmStop { name: string(u, 256)? },
        13 => Message::VmResume { name: string(u, 256)? },
        14 => Message::MigrateResume { id: string(u, 64)? },
        15 => Message::MigrateCancel { id: string(u, 64)? },
        16 => Message::Cancelled {
            what_happened: string(u, 1024)?,
        },
        17 => Message::Track(TrackRequest {
            vm: string(u, 256)?,
            interval_ms: u.arbitrary()?,
            intervals: u.arbitrary()?,
            ebpf: u.arbitrary()?,
        }),
        18 => Message::PostcopyAttach(PostcopyAttach {
            id: string(u, 64)?,
            channel: *u.choose(&[Channel::Bulk, Channel::Demand])?,
            secret: u.arbitrary()?,
        }),
        19 => Message::VmStart(VmStartRequest {
            name: string(u, 256)?,
            memory_bytes: u.arbitrary()?,
            vcpus: u.arbitrary()?,
            kernel: if u.arbitrary()? {
                KernelSource::Builtin
            } else {
                KernelSource::Image(vec_of(u, 4096, |u| u.arbitrary())?)
            },
            cmdline: string(u, 4096)?,
            tracker: tracker(u)?,
        }),
        20 => Message::VmList,
        21 => Message::Done,
        22 => Message::Running,
        23 => Message::Restored,
        24 => Message::Commit,
        25 => Message::AllPresent,
        26 => Message::Ping,
        27 => Message::QemuStream(vec_of(u, 4096, |u| u.arbitrary())?),
        28 => Message::GroupChecksums {
            checksums: u64s(u, 512)?,
        },
        29 => Message::PageChecksumsWanted { groups: u64s(u, 512)? },
        _ => Message::Error { message: String::new() },
    })
}
