//! The seed corpus, from real encodings: every message variant as its frame, Hellos, page batches,
//! VM states and multiboot images (the built-in guest among them). `perfplus-fuzz seeds DIR` writes
//! these files; `fuzz/corpus/` holds them, plus a VM state saved from a real KVM vCPU
//! ([`kvm_vm_state`], only where `/dev/kvm` is).

use perfplus_common::PAGE_SIZE;
use perfplus_protocol::frame::{encode, encode_hello, CompressionMode, Compressor, FrameHeader, FrameType, PageBatch};
use perfplus_protocol::handshake::{Hello, HELLO_LEN};
use perfplus_protocol::report::{MigrationReport, RoundReport};
use perfplus_protocol::{
    Channel, GuestCheck, KernelSource, Message, MigrateBegin, MigrateOptions, MigrateReady, MigrateRequest,
    MigrationMode, PostcopyAttach, PostcopyStats, TrackRegion, TrackRequest, TrackSample, VmInfo, VmStartRequest,
};
use perfplus_vmm::tracking::TrackerKind;
use perfplus_vmm::vm::devices::Devices;
use perfplus_vmm::vm::multiboot::HEADER_MAGIC;
use perfplus_vmm::vm::{builtin_guest, GuestStatus, VcpuState, VmState, VM_STATE_VERSION};

/// One seed file: the target's folder, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: impl Into<String>, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.into(),
        bytes,
    }
}

fn page(fill: u8) -> [u8; PAGE_SIZE] {
    let mut p = [fill; PAGE_SIZE];
    p[0] = 0xab;
    p
}

fn batch() -> PageBatch {
    let mut b = PageBatch::with_capacity(4);
    b.push_full(7, &[1; 16], &page(0x11));
    b.push_zero(8);
    b.push_ref(9, &[2; 16]);
    b.push_zero(u64::MAX);
    b
}

fn guest_status() -> GuestStatus {
    GuestStatus {
        state: 2,
        tsc_khz: 3_000_000,
        working_set_pages: 16384,
        heartbeat: 123_456,
        pages_written: 99_999,
        pages_verified: 88_888,
        verify_sweeps: 5,
        first_mismatch_page: None,
        max_stall_tsc: 3_000_000,
        message: "running".into(),
        working_set_base: 0x40_0000,
        ..Default::default()
    }
}

fn report() -> MigrationReport {
    MigrationReport {
        vm: "web".into(),
        source: "10.0.0.1:7001".into(),
        destination: "10.0.0.2:7001".into(),
        mode: "hybrid".into(),
        migration_id: "0123abcd".into(),
        tracker: "dirty-log".into(),
        hashing: true,
        memory_bytes: 1 << 30,
        rounds: vec![
            RoundReport {
                round: 1,
                dirty_pages: 262_144,
                sent_pages: 100_000,
                skipped_zero: 150_000,
                bytes_on_wire: 412_000_000,
                duration_ms: 812.5,
                bandwidth_mbps: 4056.0,
                ..Default::default()
            },
            RoundReport {
                round: 2,
                stop_and_copy: true,
                ..Default::default()
            },
        ],
        downtime_ms: 12.5,
        guest_max_stall_ms: Some(14.0),
        guest_pages_written_after: Some(77),
        stop_reason: "converged".into(),
        outcome_detail: Some("detail".into()),
        ..Default::default()
    }
}

fn vm_info() -> VmInfo {
    VmInfo {
        name: "web".into(),
        memory_bytes: 256 << 20,
        vcpus: 1,
        run_state: "running".into(),
        note: None,
        cmdline: "working-set=8M rate=5k".into(),
        guest: Some(guest_status()),
        console_tail: "perfplus-guest: t=1s written=5000\n".into(),
    }
}

/// One message of every variant.
pub fn messages() -> Vec<Message> {
    let options = MigrateOptions {
        mode: MigrationMode::Precopy,
        tracker: Some(TrackerKind::DirtyRing),
        ..Default::default()
    };
    vec![
        Message::VmStart(VmStartRequest {
            name: "web".into(),
            memory_bytes: 256 << 20,
            vcpus: 1,
            kernel: KernelSource::Builtin,
            cmdline: "working-set=8M rate=5k".into(),
            tracker: TrackerKind::DirtyLog,
        }),
        Message::VmStart(VmStartRequest {
            name: "k".into(),
            memory_bytes: 16 << 20,
            vcpus: 2,
            kernel: KernelSource::Image(elf32(&multiboot_header(None), 0x10_0000, 64, 0x10_0000)),
            cmdline: String::new(),
            tracker: TrackerKind::UffdWp,
        }),
        Message::VmList,
        Message::VmStatus { name: "web".into() },
        Message::VmStop { name: "web".into() },
        Message::VmResume { name: "web".into() },
        Message::Migrate(MigrateRequest {
            vm: "web".into(),
            destination: "10.0.0.2:7001".into(),
            destination_agent: Some("hostB".into()),
            options: options.clone(),
        }),
        Message::MigrateResume { id: "0123abcd".into() },
        Message::MigrateCancel { id: "0123abcd".into() },
        Message::Cancelled {
            what_happened: "the guest runs on here".into(),
        },
        Message::Vm(vm_info()),
        Message::Vms(vec![vm_info(), vm_info()]),
        Message::Done,
        Message::Progress(report().rounds[0].clone()),
        Message::MigrateDone(Box::new(report())),
        Message::Track(TrackRequest {
            vm: "web".into(),
            interval_ms: 500,
            intervals: 10,
            ebpf: true,
        }),
        Message::TrackSample(Box::new(TrackSample {
            interval: 2,
            elapsed_s: 1.0,
            interval_s: 0.5,
            source: "dirty-log".into(),
            dirty_pages: 1000,
            hottest: vec![TrackRegion {
                start: 0x20_0000,
                pages: 12,
                writes: 40,
            }],
            ebpf_events: Some(3),
            ebpf_pages: None,
            guest_pages_written: Some(5000),
            note: None,
        })),
        Message::MigrateBegin(MigrateBegin {
            vm: "web".into(),
            memory_bytes: 256 << 20,
            vcpus: 1,
            cmdline: "working-set=8M".into(),
            options,
            migration_id: "0123abcd".into(),
            attach_secret: [0x5a; 32],
        }),
        Message::MigrateReady(MigrateReady {
            held: vec![1, 2, u64::MAX],
        }),
        Message::Pages(batch()),
        Message::RoundEnd { round: 3 },
        Message::RoundAck {
            round: 3,
            missing: vec![9, 10],
        },
        Message::VmState(synthetic_vm_state().to_bytes().expect("encodes")),
        Message::Restored,
        Message::Commit,
        Message::Running,
        Message::PageChecksums {
            checksums: vec![0xdead_beef, 0, u64::MAX],
        },
        Message::GuestCheck(Box::new(GuestCheck {
            at_resume: Some(guest_status()),
            after: Some(guest_status()),
            verified: true,
            cpu_ms: 3.5,
            held_from_store: 1,
            held_from_hosted_vms: 2,
            held_from_this_migration: 3,
            postcopy: Some(PostcopyStats {
                demand_faults: 4,
                ..Default::default()
            }),
        })),
        Message::Complete(Box::new(report())),
        Message::PostcopyBegin {
            missing: vec![u64::MAX, 0, 1],
        },
        Message::PostcopyAttach(PostcopyAttach {
            id: "0123abcd".into(),
            channel: Channel::Demand,
            secret: [0xa5; 32],
        }),
        Message::PageRequest {
            full: false,
            pages: vec![7, 8],
        },
        Message::PushAck {
            bytes: 1 << 30,
            present: 4096,
        },
        Message::AllPresent,
        Message::ResumeState { missing: vec![0xff] },
        Message::Ping,
        Message::Error {
            message: "no VM named \"x\"".into(),
        },
        // Version 7 (after the others, so that their seeds keep their names).
        Message::GroupChecksums {
            checksums: vec![0x0123_4567, u64::MAX],
        },
        Message::PageChecksumsWanted { groups: vec![0, 3] },
    ]
}

fn frame_of(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).expect("a seed message encodes");
    out
}

/// A compressed frame (`PagesZstd`, `QemuStreamZstd`) of `raw`, as a connection that compresses
/// sends it.
fn compressed_frame(frame_type: FrameType, raw: &[u8]) -> Vec<u8> {
    let mut compressor = Compressor::new(CompressionMode::Always).expect("a zstd compressor");
    let payload = compressor.compress(raw, None).expect("the seed's content compresses");
    let header = FrameHeader::new(frame_type, payload.len()).expect("within the frame's limit");
    [&header.to_bytes()[..], payload].concat()
}

/// A few records of a relayed QEMU stream (RAM records of text-like pages), as a `QemuStream` chunk.
fn qemu_stream_chunk() -> Vec<u8> {
    let mut out = Vec::new();
    for p in 0..4u64 {
        out.extend_from_slice(&((p << 12) | 0x08).to_be_bytes());
        out.extend((0..PAGE_SIZE).map(|i| b"etaoin shrdlu"[(i * 7 + p as usize) % 13]));
    }
    out
}

fn hello_frame(hello: &Hello) -> Vec<u8> {
    let mut out = Vec::new();
    encode_hello(hello, &mut out);
    out
}

/// A VM state of the shape a real one has (one vCPU, a legacy XSAVE area, a few CPUID entries and
/// MSRs, the devices of a new VM), made without KVM.
pub fn synthetic_vm_state() -> VmState {
    let mut vcpu = VcpuState {
        xsave: vec![0; 1024],
        msrs: vec![(0x10, 123_456_789), (0xc000_0080, 0x500), (0x6e0, 0)],
        ..Default::default()
    };
    vcpu.regs.rip = 0x10_0000;
    vcpu.regs.rflags = 2;
    vcpu.sregs.cr0 = 0x8000_0011;
    vcpu.cpuid = (0..4)
        .map(|function| kvm_cpuid(function, 0x1234_5678 ^ function))
        .collect();
    vcpu.mp_state.mp_state = 0;
    VmState {
        version: VM_STATE_VERSION,
        memory_bytes: 16 << 20,
        vcpus: vec![vcpu],
        devices: Devices::new("seed").save(),
        saved_at_unix_ns: 1_700_000_000_000_000_000,
        tsc_khz: 2_000_000,
    }
}

fn kvm_cpuid(function: u32, value: u32) -> kvm_bindings::kvm_cpuid_entry2 {
    kvm_bindings::kvm_cpuid_entry2 {
        function,
        eax: value,
        ebx: value.rotate_left(8),
        ecx: value.rotate_left(16),
        edx: value.rotate_left(24),
        ..Default::default()
    }
}

/// The state of a real vCPU: a 16 MiB VM with the built-in guest loaded, saved before it ran.
pub fn kvm_vm_state() -> anyhow::Result<VmState> {
    let mut vm = perfplus_vmm::vm::Vm::create("fuzz-seed", 16 << 20, 1)?;
    vm.load_multiboot(builtin_guest::IMAGE, "working-set=4M rate=1k")?;
    vm.save_state()
}

/// A multiboot header (flags 0x3, or 0x10003 with the a.out address fields).
pub fn multiboot_header(aout: Option<[u32; 5]>) -> Vec<u8> {
    let flags: u32 = if aout.is_some() { 0x1_0003 } else { 0x3 };
    let mut h = Vec::new();
    h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags).to_le_bytes());
    for f in aout.into_iter().flatten() {
        h.extend_from_slice(&f.to_le_bytes());
    }
    h
}

/// A minimal ELF32 i386 executable: one PT_LOAD of `payload` at `paddr` with `bss` more bytes.
pub fn elf32(payload: &[u8], paddr: u32, bss: u32, entry: u32) -> Vec<u8> {
    const EHSIZE: u32 = 52;
    const PHSIZE: u32 = 32;
    let mut f = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let p16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let p32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    p16(&mut f, 2); // ET_EXEC
    p16(&mut f, 3); // EM_386
    p32(&mut f, 1);
    p32(&mut f, entry);
    p32(&mut f, EHSIZE); // phoff
    p32(&mut f, 0); // shoff
    p32(&mut f, 0); // flags
    for v in [EHSIZE as u16, PHSIZE as u16, 1, 40, 0, 0] {
        p16(&mut f, v);
    }
    let len = payload.len() as u32;
    for v in [1, EHSIZE + PHSIZE, paddr, paddr, len, len + bss, 7, 0x1000] {
        p32(&mut f, v);
    }
    f.extend_from_slice(payload);
    f
}

/// A minimal ELF64 x86-64 executable with two PT_LOADs (code, then data with a bss), a section
/// header table with a string table.
pub fn elf64(payload: &[u8], paddr: u64, entry: u64) -> Vec<u8> {
    const EHSIZE: u64 = 64;
    const PHSIZE: u64 = 56;
    const SHSIZE: u64 = 64;
    let data_off = EHSIZE + 2 * PHSIZE;
    let strtab = b"\0.text\0.shstrtab\0";
    let strtab_off = data_off + payload.len() as u64;
    let sh_off = strtab_off + strtab.len() as u64;
    let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let p16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let p32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    let p64 = |f: &mut Vec<u8>, v: u64| f.extend_from_slice(&v.to_le_bytes());
    p16(&mut f, 2);
    p16(&mut f, 62); // EM_X86_64
    p32(&mut f, 1);
    p64(&mut f, entry);
    p64(&mut f, EHSIZE);
    p64(&mut f, sh_off);
    p32(&mut f, 0);
    for v in [EHSIZE as u16, PHSIZE as u16, 2, SHSIZE as u16, 3, 2] {
        p16(&mut f, v);
    }
    let half = payload.len() as u64 / 2;
    // Code: the first half of the payload; data: the rest, with 4 KiB of bss, 1 MiB higher.
    for (offset, addr, filesz, memsz, flags) in [
        (data_off, paddr, half, half, 5u32),
        (
            data_off + half,
            paddr + 0x10_0000,
            payload.len() as u64 - half,
            payload.len() as u64 - half + 4096,
            6,
        ),
    ] {
        p32(&mut f, 1);
        p32(&mut f, flags);
        p64(&mut f, offset);
        p64(&mut f, addr);
        p64(&mut f, addr);
        p64(&mut f, filesz);
        p64(&mut f, memsz);
        p64(&mut f, 0x1000);
    }
    f.extend_from_slice(payload);
    f.extend_from_slice(strtab);
    // Section headers: null, .text, .shstrtab.
    f.extend_from_slice(&[0; SHSIZE as usize]);
    for (name, kind, flags, addr, offset, size) in [
        (1u32, 1u32, 6u64, paddr, data_off, half),
        (7, 3, 0, 0, strtab_off, strtab.len() as u64),
    ] {
        p32(&mut f, name);
        p32(&mut f, kind);
        p64(&mut f, flags);
        p64(&mut f, addr);
        p64(&mut f, offset);
        p64(&mut f, size);
        p32(&mut f, 0);
        p32(&mut f, 0);
        p64(&mut f, 1);
        p64(&mut f, 0);
    }
    f
}

/// Every seed that needs no KVM.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let msgs = messages();
    for (i, msg) in msgs.iter().enumerate() {
        out.push(seed("frame", format!("{i:02}-{}", msg.name()), frame_of(msg)));
    }
    let hello = Hello {
        min_version: 4,
        max_version: 4,
        role: perfplus_protocol::Role::Peer,
    };
    out.push(seed("frame", "hello", hello_frame(&hello)));
    // A connection's first bytes: a Hello, then a few messages, back to back.
    let mut stream = hello_frame(&hello);
    for msg in &msgs[20..24] {
        stream.extend(frame_of(msg));
    }
    out.push(seed("frame", "stream", stream));
    // The compressed frames, which decode to a Pages and a QemuStream message.
    out.push(seed(
        "frame",
        "zstd-pages",
        compressed_frame(FrameType::PagesZstd, batch().as_bytes()),
    ));
    out.push(seed(
        "frame",
        "zstd-qemu-stream",
        compressed_frame(FrameType::QemuStreamZstd, &qemu_stream_chunk()),
    ));

    for (name, min, max, role) in [
        ("control-v4", 4, 4, perfplus_protocol::Role::Control),
        ("peer-v1-v4", 1, 4, perfplus_protocol::Role::Peer),
        ("peer-v5-v9", 5, 9, perfplus_protocol::Role::Peer),
    ] {
        let mut bytes = Hello {
            min_version: min,
            max_version: max,
            role,
        }
        .to_bytes()
        .to_vec();
        assert_eq!(bytes.len(), HELLO_LEN);
        // The rest drives the negotiation part of the target (versions and roles of two sides).
        bytes.extend_from_slice(&[4, 0, 4, 0, 3, 0, 5, 0, 1, 0]);
        out.push(seed("handshake", name, bytes));
    }

    out.push(seed("page_batch", "mixed", batch().as_bytes().to_vec()));
    let mut zeros = PageBatch::new();
    for p in 0..64 {
        zeros.push_zero(p);
    }
    out.push(seed("page_batch", "zeros", zeros.as_bytes().to_vec()));
    let mut refs = PageBatch::new();
    for p in 0..16 {
        refs.push_ref(p * 3, &[p as u8; 16]);
    }
    out.push(seed("page_batch", "refs", refs.as_bytes().to_vec()));
    let mut full = PageBatch::new();
    full.push_full(0, &[9; 16], &page(0));
    full.push_full(1, &[8; 16], &page(0xff));
    out.push(seed("page_batch", "full", full.as_bytes().to_vec()));

    out.push(seed(
        "vm_state",
        "synthetic",
        synthetic_vm_state().to_bytes().expect("encodes"),
    ));

    out.push(seed("multiboot", "builtin-guest", builtin_guest::IMAGE.to_vec()));
    let mut code = multiboot_header(None);
    code.extend_from_slice(&[0x90, 0xf4]);
    out.push(seed("multiboot", "elf32", elf32(&code, 0x10_0000, 4096, 0x10_000c)));
    let mut code64 = multiboot_header(None);
    code64.extend_from_slice(&[0x90; 20]);
    out.push(seed("multiboot", "elf64", elf64(&code64, 0x20_0000, 0x20_000c)));
    let mut flat = multiboot_header(Some([0x20_0000, 0x20_0000, 0x20_0040, 0x20_1000, 0x20_0020]));
    flat.resize(0x40, 0xab);
    flat.extend_from_slice(&[0xcc; 16]);
    out.push(seed("multiboot", "aout", flat));
    out
}
