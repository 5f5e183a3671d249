//! Messages and frames the tests of the `frame` files share.

use super::*;
use crate::report::{MigrationReport, RoundReport};
use crate::{
    KernelSource, Message, MigrateBegin, MigrateOptions, MigrateReady, MigrateRequest, VmInfo, VmStartRequest,
};
use perfplus_common::PAGE_SIZE;
use perfplus_vmm::vm::GuestStatus;

pub(super) fn round() -> RoundReport {
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

pub(super) fn report() -> MigrationReport {
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

pub(super) fn vm_info() -> VmInfo {
    VmInfo {
        name: "web".into(),
        memory_bytes: 256 << 20,
        vcpus: 2,
        run_state: "running".into(),
        note: Some("waiting for pages from 10.0.0.1:7001 since 12:03:04 UTC".into()),
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

pub(super) fn page(fill: u8) -> [u8; PAGE_SIZE] {
    let mut p = [fill; PAGE_SIZE];
    p[0] = 0xAB;
    p[PAGE_SIZE - 1] = fill.wrapping_add(1);
    p
}

pub(super) fn batch() -> PageBatch {
    let mut b = PageBatch::with_capacity(4);
    b.push_full(7, &[1; 16], &page(0x11));
    b.push_zero(8);
    b.push_ref(9, &[2; 16]);
    b.push_full(u64::MAX, &[3; 16], &page(0x22));
    b
}

/// One message of every variant.
pub(super) fn every_message() -> Vec<Message> {
    let options = MigrateOptions {
        downtime_target_ms: 12.5,
        max_rounds: 7,
        hashing: false,
        verify_guest: true,
        hot_last: false,
        mode: crate::MigrationMode::Postcopy,
        tracker: Some(perfplus_vmm::tracking::TrackerKind::UffdWp),
        postcopy_timeout_ms: 4_500,
        compression: crate::Compression::Zstd,
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
        Message::VmResume { name: "db".into() },
        Message::Migrate(MigrateRequest {
            vm: "web".into(),
            destination: "10.0.0.2:7000".into(),
            destination_agent: Some("hostB".into()),
            options: options.clone(),
        }),
        Message::Vm(vm_info()),
        Message::Vms(vec![vm_info(), vm_info()]),
        Message::Vms(vec![]),
        Message::Done,
        Message::Progress(round()),
        Message::MigrateDone(Box::new(report())),
        Message::VmConsole(crate::ConsoleRequest {
            name: "web".into(),
            follow: true,
        }),
        Message::ConsoleOutput(crate::ConsoleOutput {
            lost: 12,
            bytes: b"boot\x1b[2J\r\nok\n".to_vec(),
        }),
        Message::ConsoleOutput(crate::ConsoleOutput {
            lost: 0,
            bytes: vec![0xff; crate::frame::CONSOLE_CHUNK_MAX],
        }),
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
            attach_secret: [0x5a; 32],
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
        Message::Restored,
        Message::Commit,
        Message::Running,
        Message::PageChecksums {
            checksums: vec![1, 2, 3, u64::MAX],
        },
        Message::GroupChecksums {
            checksums: vec![7, u64::MAX],
        },
        Message::PageChecksumsWanted { groups: vec![0, 5] },
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
        Message::MigrateCancel { id: "0123abcd".into() },
        Message::Cancelled {
            what_happened: "the guest stays paused here".into(),
        },
        Message::PostcopyBegin {
            missing: vec![u64::MAX, 1],
        },
        Message::ResumeState { missing: vec![] },
        Message::PostcopyAttach(crate::PostcopyAttach {
            id: "0123abcd".into(),
            channel: crate::Channel::Demand,
            secret: [0xa5; 32],
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
        Message::QemuRelayBegin(crate::QemuRelayBegin {
            incoming: "unix:/run/qemu/web1.incoming".into(),
            qmp: Some("/run/qemu/web1.qmp".into()),
            held_pages: 65536,
        }),
        Message::QemuStream(b"QEVM\0\0\0\x03".to_vec()),
        Message::QemuStream(vec![]),
        Message::QemuMigrate(crate::QemuMigrateRequest {
            qmp: "/run/qemu/web1.qmp".into(),
            to: "10.0.0.2:7001".into(),
            destination_agent: Some("b".into()),
            incoming: "unix:/run/qemu/web1.in".into(),
            destination_qmp: None,
            downtime_limit_ms: Some(30),
            max_bandwidth: None,
            held_pages: 65536,
            compression: crate::Compression::Off,
        }),
        Message::QemuMigrateDone {
            report_json: "{}".into(),
        },
        Message::QemuRelayDone(crate::QemuRelayDone {
            pages_full: 3,
            qemu_migration_status: Some("completed".into()),
            ..Default::default()
        }),
        Message::Error {
            message: "no VM named \"x\" ✗".into(),
        },
    ]
}

pub(super) fn encoded(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).unwrap();
    out
}

pub(super) fn header(frame_type: u16, flags: u16, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&frame_type.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

pub(super) fn frame_bytes(frame_type: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut f = header(frame_type as u16, 0, payload.len() as u32);
    f.extend_from_slice(payload);
    f
}

pub(super) fn decode_err(buf: &[u8]) -> String {
    decode(buf).unwrap_err().to_string()
}

/// splitmix64: the guest's own content generator (guest/src/content.rs).
pub(crate) use perfplus_common::splitmix::next as mix;

/// A random page (the guest's `unique` and `same` pages: a splitmix64 stream).
pub(crate) fn random_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut z = seed;
    let mut page = [0u8; PAGE_SIZE];
    for word in page.chunks_exact_mut(8) {
        word.copy_from_slice(&mix(&mut z).to_le_bytes());
    }
    page
}

/// A text-like page as the guest writes them (`perfplus_common::text`).
pub(crate) fn guest_text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    perfplus_common::text::text_page(seed, &mut page);
    page
}

/// Whether `first` and `rest` interleave to `batch`, each keeping the batch's order.
pub(crate) fn interleave_to(batch: &PageBatch, first: &PageBatch, rest: &PageBatch) -> bool {
    let (mut f, mut r) = (first.iter().peekable(), rest.iter().peekable());
    for item in batch {
        let item = item.unwrap();
        if f.peek().is_some_and(|i| *i.as_ref().unwrap() == item) {
            f.next();
        } else if r.peek().is_some_and(|i| *i.as_ref().unwrap() == item) {
            r.next();
        } else {
            return false;
        }
    }
    f.next().is_none() && r.next().is_none()
}
