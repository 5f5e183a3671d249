//! Multiboot (v1) loading: find the header, load the image, write the boot information, and put the
//! boot vCPU where a multiboot loader leaves it.
//!
//! Low-memory layout the VMM uses (besides the kernel image, which multiboot kernels put at ≥ 1 MiB):
//!
//! | range              | what                                                        |
//! |--------------------|-------------------------------------------------------------|
//! | `0x7000..0x8000`   | the guest's status page (`guest_abi::STATUS_PAGE_GPA`)      |
//! | `0x8000..0x8100`   | multiboot information structure ([`INFO_ADDR`])             |
//! | `0x8100..0x8200`   | memory map                                                  |
//! | `0x8200..0x8300`   | boot loader name                                            |
//! | `0x9000..0xa000`   | command line (at most 4095 bytes)                           |
//!
//! The image may not overlap `0x7000..0xa000`.
//!
//! The boot vCPU starts in flat 32-bit protected mode, paging off: CS = 0x08 (type 0xb, base 0, limit
//! 4 GiB, D/B = 1, G = 1), the data segments = 0x10 (type 3), CR0 = PE | ET, EFLAGS = 0x2,
//! EAX = 0x2BADB002, EBX = [`INFO_ADDR`], EIP = the entry point. The GDTR is not set up (the multiboot
//! spec leaves it to the kernel).
use anyhow::{bail, ensure, Context};
use goblin::elf::{program_header::PT_LOAD, Elf};
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use crate::memory::GuestMemory;

/// `multiboot_header.magic`.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at kernel entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// Guest-physical address of the multiboot information structure.
pub const INFO_ADDR: u64 = 0x8000;
const MMAP_ADDR: u64 = 0x8100;
const LOADER_NAME_ADDR: u64 = 0x8200;
const CMDLINE_ADDR: u64 = 0x9000;
const CMDLINE_MAX: usize = 4095;
/// Guest-physical range reserved by the VMM (status page + boot information).
pub const RESERVED: std::ops::Range<u64> = 0x7000..0xa000;
/// Initial ESP: just below the status page (the kernel sets its own stack).
const INITIAL_SP: u64 = 0x7000;
/// Top of conventional low memory (640 KiB).
const LOW_MEM_END: u64 = 0xa_0000;
const HIGH_MEM_START: u64 = 0x10_0000;

/// Flag bits of the header we understand: 0 (page-align modules), 1 (memory info), 2 (video mode:
/// accepted, not honoured: there is no framebuffer), 16 (address fields).
const HEADER_FLAG_AOUT_KLUDGE: u32 = 1 << 16;
const HEADER_FLAGS_KNOWN_LOW: u32 = 0b111;

/// The parts of a multiboot header the loader uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the header in the image.
    pub offset: usize,
    pub flags: u32,
    /// Address fields (present when flag bit 16 is set).
    pub addresses: Option<AoutAddresses>,
}

/// The a.out-kludge address fields of the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AoutAddresses {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Where a loaded kernel starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u32,
    /// Guest-physical ranges the image occupies (bss included).
    pub ranges: Vec<std::ops::Range<u64>>,
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Finds the multiboot header: magic + valid checksum, 4-byte aligned, within the first 8 KiB.
pub fn find_header(image: &[u8]) -> anyhow::Result<Header> {
    let limit = image.len().min(8192);
    let mut offset = 0;
    while offset + 12 <= limit {
        let magic = le32(image, offset);
        let flags = le32(image, offset + 4);
        let checksum = le32(image, offset + 8);
        if magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(checksum) == 0 {
            let unknown = flags & 0xffff & !HEADER_FLAGS_KNOWN_LOW;
            ensure!(
                unknown == 0,
                "multiboot header at offset {offset:#x} requires features this loader lacks (flags {flags:#x})"
            );
            let addresses = if flags & HEADER_FLAG_AOUT_KLUDGE != 0 {
                ensure!(
                    offset + 32 <= image.len(),
                    "multiboot header at offset {offset:#x} sets flag 16 but the image ends before its address fields"
                );
                Some(AoutAddresses {
                    header_addr: le32(image, offset + 12),
                    load_addr: le32(image, offset + 16),
                    load_end_addr: le32(image, offset + 20),
                    bss_end_addr: le32(image, offset + 24),
                    entry_addr: le32(image, offset + 28),
                })
            } else {
                None
            };
            return Ok(Header {
                offset,
                flags,
                addresses,
            });
        }
        offset += 4;
    }
    bail!("no multiboot (v1) header in the first 8 KiB of the kernel image (magic {HEADER_MAGIC:#x} with a valid checksum)")
}

/// Checks that `[start, end)` is inside RAM of `ram_size` bytes and clear of the VMM's reserved low area.
fn check_range(ram_size: u64, start: u64, end: u64, what: &str) -> anyhow::Result<()> {
    ensure!(
        end <= ram_size,
        "{what} [{start:#x}, {end:#x}) does not fit in guest RAM of {ram_size:#x} bytes"
    );
    ensure!(
        end <= RESERVED.start || start >= RESERVED.end,
        "{what} [{start:#x}, {end:#x}) overlaps the status page and multiboot information area [{:#x}, {:#x})",
        RESERVED.start,
        RESERVED.end
    );
    Ok(())
}

/// One piece of a kernel image in guest memory: the image bytes `file` go to `start`, and zeroes
/// follow them up to `end` (the bss).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    pub file: std::ops::Range<usize>,
}

/// What loading an image will do, decided from the image bytes alone ([`plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub entry: u32,
    pub segments: Vec<Segment>,
}

/// Parses and checks a multiboot image for guest RAM of `ram_size` bytes, touching no memory: every
/// segment lies inside RAM and outside [`RESERVED`], its file bytes inside the image, no two overlap.
/// [`load_image`] carries the plan out; this is the part a peer's (or an operator's) bytes reach.
pub fn plan(image: &[u8], ram_size: u64) -> anyhow::Result<Plan> {
    let header = find_header(image)?;
    match &header.addresses {
        Some(a) => plan_aout(image, ram_size, &header, a),
        None => plan_elf(image, ram_size),
    }
}

/// Loads the image into guest memory (not the boot information; see [`write_boot_info`]).
pub fn load_image(mem: &GuestMemory, image: &[u8]) -> anyhow::Result<Loaded> {
    let plan = plan(image, mem.size())?;
    for s in &plan.segments {
        let data = &image[s.file.clone()];
        mem.write(s.start, data)?;
        let data_end = s.start + data.len() as u64;
        mem.zero(data_end, s.end - data_end)?;
    }
    Ok(Loaded {
        entry: plan.entry,
        ranges: plan.segments.iter().map(|s| s.start..s.end).collect(),
    })
}

fn plan_aout(image: &[u8], ram_size: u64, header: &Header, a: &AoutAddresses) -> anyhow::Result<Plan> {
    ensure!(
        a.load_addr <= a.header_addr,
        "multiboot header: load_addr {:#x} is above header_addr {:#x}",
        a.load_addr,
        a.header_addr
    );
    let file_start = (header.offset as u64)
        .checked_sub(u64::from(a.header_addr - a.load_addr))
        .context("multiboot header: header_addr - load_addr points before the start of the file")?;
    let load_len = if a.load_end_addr == 0 {
        image.len() as u64 - file_start
    } else {
        ensure!(
            a.load_end_addr >= a.load_addr,
            "multiboot header: load_end_addr {:#x} below load_addr {:#x}",
            a.load_end_addr,
            a.load_addr
        );
        u64::from(a.load_end_addr - a.load_addr)
    };
    ensure!(
        file_start + load_len <= image.len() as u64,
        "multiboot header: the load range ({load_len:#x} bytes from file offset {file_start:#x}) runs past the end of the {:#x}-byte image",
        image.len()
    );
    let start = u64::from(a.load_addr);
    let load_end = start + load_len;
    let end = if a.bss_end_addr == 0 {
        load_end
    } else {
        ensure!(
            u64::from(a.bss_end_addr) >= load_end,
            "multiboot header: bss_end_addr {:#x} is below the end of the loaded data {load_end:#x}",
            a.bss_end_addr
        );
        u64::from(a.bss_end_addr)
    };
    check_range(ram_size, start, end, "kernel image")?;
    Ok(Plan {
        entry: a.entry_addr,
        segments: vec![Segment {
            start,
            end,
            file: file_start as usize..(file_start + load_len) as usize,
        }],
    })
}

fn plan_elf(image: &[u8], ram_size: u64) -> anyhow::Result<Plan> {
    let elf = Elf::parse(image).context(
        "the multiboot header does not set flag 16 (address fields), so the kernel must be ELF, but it does not parse as ELF",
    )?;
    ensure!(
        matches!(
            elf.header.e_machine,
            goblin::elf::header::EM_386 | goblin::elf::header::EM_X86_64
        ),
        "ELF kernel is for machine {} (need x86 or x86-64)",
        elf.header.e_machine
    );
    let mut segments: Vec<Segment> = Vec::new();
    let mut entry = None;
    for ph in elf.program_headers.iter().filter(|ph| ph.p_type == PT_LOAD) {
        if ph.p_memsz == 0 {
            continue;
        }
        ensure!(
            ph.p_filesz <= ph.p_memsz,
            "ELF segment at {:#x}: file size {:#x} exceeds memory size {:#x}",
            ph.p_paddr,
            ph.p_filesz,
            ph.p_memsz
        );
        let start = ph.p_paddr;
        let end = start.checked_add(ph.p_memsz).context("ELF segment end overflows")?;
        check_range(ram_size, start, end, "ELF segment")?;
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&e| e <= image.len() as u64)
            .with_context(|| {
                format!(
                    "ELF segment at {start:#x}: file range [{:#x}, +{:#x}) runs past the end of the image",
                    ph.p_offset, ph.p_filesz
                )
            })?;
        // The entry is a virtual address; translate it through the segment that contains it.
        let vend = ph.p_vaddr.checked_add(ph.p_memsz).with_context(|| {
            format!(
                "ELF segment at {start:#x}: virtual range {:#x} + {:#x} overflows",
                ph.p_vaddr, ph.p_memsz
            )
        })?;
        if (ph.p_vaddr..vend).contains(&elf.entry) {
            entry = Some(elf.entry - ph.p_vaddr + ph.p_paddr);
        }
        segments.push(Segment {
            start,
            end,
            file: ph.p_offset as usize..file_end as usize,
        });
    }
    ensure!(!segments.is_empty(), "ELF kernel has no loadable segment");
    for (i, a) in segments.iter().enumerate() {
        for b in &segments[i + 1..] {
            ensure!(
                a.end <= b.start || b.end <= a.start,
                "ELF segments [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap",
                a.start,
                a.end,
                b.start,
                b.end
            );
        }
    }
    let entry = entry.unwrap_or(elf.entry);
    let entry = u32::try_from(entry)
        .with_context(|| format!("ELF entry point {entry:#x} is above 4 GiB (multiboot enters in 32-bit mode)"))?;
    Ok(Plan { entry, segments })
}

/// Writes the multiboot information structure, memory map, loader name and command line.
pub fn write_boot_info(mem: &GuestMemory, cmdline: &str) -> anyhow::Result<u64> {
    ensure!(
        cmdline.len() <= CMDLINE_MAX,
        "kernel command line is {} bytes; at most {CMDLINE_MAX} fit",
        cmdline.len()
    );
    ensure!(
        !cmdline.as_bytes().contains(&0),
        "kernel command line contains a NUL byte"
    );
    ensure!(mem.size() >= HIGH_MEM_START * 2, "guest RAM must be at least 2 MiB");
    mem.zero(INFO_ADDR, RESERVED.end - INFO_ADDR)?;

    // Memory map: entries of { u32 size (20, not counting itself), u64 base, u64 length, u32 type }.
    let mut mmap = Vec::new();
    for (base, len) in [(0u64, LOW_MEM_END), (HIGH_MEM_START, mem.size() - HIGH_MEM_START)] {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes()); // available RAM
    }
    mem.write(MMAP_ADDR, &mmap)?;
    mem.write(LOADER_NAME_ADDR, b"perfplus\0")?;
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write(CMDLINE_ADDR, &line)?;

    const MEM: u32 = 1 << 0;
    const CMDLINE: u32 = 1 << 2;
    const MMAP: u32 = 1 << 6;
    const LOADER_NAME: u32 = 1 << 9;
    let mut info = [0u8; 0x74];
    let mut put = |at: usize, v: u32| info[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(0, MEM | CMDLINE | MMAP | LOADER_NAME);
    put(4, (LOW_MEM_END / 1024) as u32); // mem_lower, KiB
    put(
        8,
        ((mem.size() - HIGH_MEM_START) / 1024).min(u64::from(u32::MAX)) as u32,
    ); // mem_upper
    put(16, CMDLINE_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, LOADER_NAME_ADDR as u32);
    mem.write(INFO_ADDR, &info)?;
    Ok(INFO_ADDR)
}

/// Puts `vcpu` at the kernel entry in flat 32-bit protected mode (see the module doc).
pub fn set_boot_cpu(vcpu: &VcpuFd, entry: u32, info_addr: u64) -> anyhow::Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS (boot)")?;

    let regs = kvm_bindings::kvm_regs {
        rip: u64::from(entry),
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: info_addr,
        rsp: INITIAL_SP,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS (boot)")?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A multiboot header (flags 0x3, or with bit 16 and the given address fields).
    pub fn header(aout: Option<[u32; 5]>) -> Vec<u8> {
        let flags: u32 = if aout.is_some() { 0x1_0003 } else { 0x3 };
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        if let Some(fields) = aout {
            for f in fields {
                h.extend_from_slice(&f.to_le_bytes());
            }
        }
        h
    }

    /// A minimal ELF32 i386 executable with one PT_LOAD of `payload` at `paddr` (memsz = payload +
    /// `bss`), entry `entry`.
    pub fn elf32(payload: &[u8], paddr: u32, bss: u32, entry: u32) -> Vec<u8> {
        const EHSIZE: u32 = 52;
        const PHSIZE: u32 = 32;
        let off = EHSIZE + PHSIZE;
        let mut f = Vec::new();
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]);
        f.extend_from_slice(&[0; 8]);
        let p16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
        p16(&mut f, 2); // ET_EXEC
        p16(&mut f, 3); // EM_386
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&entry.to_le_bytes());
        f.extend_from_slice(&EHSIZE.to_le_bytes()); // phoff
        f.extend_from_slice(&0u32.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // flags
        p16(&mut f, EHSIZE as u16);
        p16(&mut f, PHSIZE as u16);
        p16(&mut f, 1); // phnum
        p16(&mut f, 40); // shentsize
        p16(&mut f, 0); // shnum
        p16(&mut f, 0); // shstrndx
        for v in [
            1u32, // PT_LOAD
            off,
            paddr,
            paddr,
            payload.len() as u32,
            payload.len() as u32 + bss,
            7,
            0x1000,
        ] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(f.len() as u32, off);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn finds_header_and_checks_checksum() {
        let mut image = vec![0u8; 64];
        image.extend(header(None));
        let h = find_header(&image).unwrap();
        assert_eq!((h.offset, h.flags, h.addresses), (64, 3, None));
        // Misaligned headers are not found.
        let mut odd = vec![0u8; 2];
        odd.extend(header(None));
        assert!(find_header(&odd).is_err());
        // A bad checksum is not a header.
        let mut bad = header(None);
        bad[8] ^= 1;
        assert!(find_header(&bad).is_err());
        // Past 8 KiB it is not looked for.
        let mut far = vec![0u8; 8192];
        far.extend(header(None));
        assert!(find_header(&far).is_err());
    }

    #[test]
    fn loads_elf32_and_zeroes_bss() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        mem.write(0x10_0000 + 200, &[0xee; 100]).unwrap(); // stale bytes where the bss goes
        let mut payload = header(None);
        payload.extend_from_slice(&[0x90, 0xf4]);
        let image = elf32(&payload, 0x10_0000, 4096, 0x10_000c);
        let loaded = load_image(&mem, &image).unwrap();
        assert_eq!(loaded.entry, 0x10_000c);
        assert_eq!(loaded.ranges, vec![0x10_0000..0x10_0000 + 14 + 4096]);
        let mut out = [0u8; 2];
        mem.read(0x10_000c, &mut out).unwrap();
        assert_eq!(out, [0x90, 0xf4]);
        let mut bss = [1u8; 100];
        mem.read(0x10_0000 + 200, &mut bss).unwrap();
        assert_eq!(bss, [0; 100]);
    }

    #[test]
    fn loads_aout_kludge() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        // Flat binary: header at offset 0 loaded at 0x200000, 0x40 bytes of file, bss to 0x201000.
        let mut image = header(Some([0x20_0000, 0x20_0000, 0x20_0040, 0x20_1000, 0x20_0020]));
        image.resize(0x40, 0xab);
        image.extend_from_slice(&[0xcc; 16]); // beyond load_end_addr: not loaded
        let loaded = load_image(&mem, &image).unwrap();
        assert_eq!(loaded.entry, 0x20_0020);
        assert_eq!(loaded.ranges, vec![0x20_0000..0x20_1000]);
        let mut b = [0u8; 2];
        mem.read(0x20_003f, &mut b).unwrap();
        assert_eq!(b, [0xab, 0]);
    }

    #[test]
    fn refuses_reserved_area_and_out_of_ram() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        let low = elf32(&header(None), 0x7800, 0, 0x7800);
        let err = load_image(&mem, &low).unwrap_err().to_string();
        assert!(err.contains("overlaps the status page"), "{err}");
        let high = elf32(&header(None), 0x100_0000 - 4, 0, 0x100_0000 - 4);
        let err = load_image(&mem, &high).unwrap_err().to_string();
        assert!(err.contains("does not fit in guest RAM"), "{err}");
        assert!(load_image(&mem, b"not a kernel").is_err());
    }

    /// A minimal ELF64 x86-64 executable with one PT_LOAD of `payload` at `paddr`, virtual `vaddr`.
    fn elf64(payload: &[u8], paddr: u64, vaddr: u64, entry: u64) -> Vec<u8> {
        let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        for v in [entry, 64, 0] {
            f.extend_from_slice(&v.to_le_bytes()); // entry, phoff, shoff
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&7u32.to_le_bytes());
        let len = payload.len() as u64;
        for v in [120, vaddr, paddr, len, len + 0x1000, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_virtual_range_that_wraps_is_refused_not_an_overflow() {
        // Found by fuzzing (fuzz/regressions/multiboot/): p_vaddr + p_memsz overflowed (a panic where
        // overflow checks are on, a wrapped range where not).
        let image = elf64(&header(None), 0x10_0000, u64::MAX - 5, 0x10_0000);
        let err = plan(&image, 16 << 20).unwrap_err().to_string();
        assert_eq!(
            err,
            "ELF segment at 0x100000: virtual range 0xfffffffffffffffa + 0x100c overflows"
        );
        // The same image with a sane virtual address loads, its entry translated to physical.
        let image = elf64(&header(None), 0x10_0000, 0xffff_8000_0000_0000, 0xffff_8000_0000_0004);
        let plan = plan(&image, 16 << 20).unwrap();
        assert_eq!(plan.entry, 0x10_0004);
        assert_eq!(
            plan.segments,
            vec![Segment {
                start: 0x10_0000,
                end: 0x10_100c,
                file: 120..132
            }]
        );
    }

    #[test]
    fn boot_info_layout() {
        let mem = GuestMemory::new(32 << 20).unwrap();
        let info = write_boot_info(&mem, "working-set=8M rate=5k").unwrap();
        let mut raw = [0u8; 0x74];
        mem.read(info, &mut raw).unwrap();
        assert_eq!(le32(&raw, 0), 0x245);
        assert_eq!(le32(&raw, 4), 640);
        assert_eq!(le32(&raw, 8), (31 << 20) / 1024);
        let cmdline = le32(&raw, 16) as u64;
        assert!(!(0x7000..0x8000).contains(&cmdline));
        let mut line = [0u8; 23];
        mem.read(cmdline, &mut line).unwrap();
        assert_eq!(&line, b"working-set=8M rate=5k\0");
        let mut mmap = vec![0u8; le32(&raw, 44) as usize];
        mem.read(u64::from(le32(&raw, 48)), &mut mmap).unwrap();
        assert_eq!(mmap.len(), 48);
        assert_eq!(u64::from_le_bytes(mmap[28..36].try_into().unwrap()), 0x10_0000);
        assert_eq!(u64::from_le_bytes(mmap[36..44].try_into().unwrap()), 31 << 20);
        assert!(write_boot_info(&mem, &"x".repeat(5000)).is_err());
    }
}
