//! Reading the multiboot (v1) information structure (from ring 3: all memory is identity-mapped and
//! user-accessible). Everything the guest needs is copied out before the guest writes any memory
//! beyond its image, because loaders (QEMU among them) put the information right after the image.

/// EAX value a multiboot loader passes.
pub const BOOTLOADER_MAGIC: u64 = 0x2BAD_B002;

const FLAG_MEM: u32 = 1 << 0;
const FLAG_CMDLINE: u32 = 1 << 2;
const FLAG_MMAP: u32 = 1 << 6;
const MMAP_AVAILABLE: u32 = 1;

/// Maximum command-line length kept (longer command lines are truncated).
pub const CMDLINE_MAX: usize = 1024;

/// What the guest takes from the loader.
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// End (exclusive) of the RAM region that contains the first byte after the guest image, if the
    /// loader described memory (memory map, or `mem_upper`).
    pub ram_end: Option<u64>,
    /// Which source `ram_end` came from (for the boot line).
    pub ram_source: &'static str,
}

impl BootInfo {
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }
}

/// Reads a `u32` field of the information structure.
///
/// # Safety
/// `addr` must be readable guest memory.
unsafe fn rd32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller; the structure is only 4-byte aligned at best.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

/// # Safety
/// `addr` must be readable guest memory.
unsafe fn rd64(addr: u64) -> u64 {
    // SAFETY: guaranteed by the caller; memory-map entries are packed.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// Parses the multiboot information at `mbi`. `image_end` is the first byte after the guest image:
/// the RAM region reported is the one that contains it.
///
/// # Safety
/// `mbi` must point at a multiboot information structure (as a loader that passed
/// [`BOOTLOADER_MAGIC`] guarantees), and the addresses in it must be readable.
pub unsafe fn parse(mbi: u64, image_end: u64) -> BootInfo {
    let mut info = BootInfo {
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
        ram_end: None,
        ram_source: "none",
    };
    // Every read below is of a field the loader filled in (its flag bit is checked first) or of memory
    // such a field points at; the caller guarantees those are readable.
    // SAFETY: `flags` is always present.
    let flags = unsafe { rd32(mbi) };
    if flags & FLAG_CMDLINE != 0 {
        // SAFETY: flag bit 2 says `cmdline` is valid.
        let p = u64::from(unsafe { rd32(mbi + 16) });
        while info.cmdline_len < CMDLINE_MAX {
            // SAFETY: within the NUL-terminated command line the loader passed.
            let b = unsafe { core::ptr::read((p + info.cmdline_len as u64) as *const u8) };
            if b == 0 {
                break;
            }
            info.cmdline[info.cmdline_len] = b;
            info.cmdline_len += 1;
        }
    }
    if flags & FLAG_MMAP != 0 {
        // SAFETY: flag bit 6 says `mmap_length` / `mmap_addr` are valid.
        let (len, addr) = unsafe { (u64::from(rd32(mbi + 44)), u64::from(rd32(mbi + 48))) };
        // Extend the region containing `image_end` over adjacent available entries (a few passes are
        // plenty: loaders report sorted, mostly merged maps).
        let mut region: Option<(u64, u64)> = None;
        for _ in 0..8 {
            let mut changed = false;
            let mut off = 0;
            while off + 24 <= len {
                let e = addr + off;
                // SAFETY: the entry (24 bytes at least) lies within the memory map the loader passed.
                let (size, base, length, kind) =
                    unsafe { (u64::from(rd32(e)), rd64(e + 4), rd64(e + 12), rd32(e + 20)) };
                off += size + 4;
                if kind != MMAP_AVAILABLE || length == 0 {
                    continue;
                }
                let end = base.saturating_add(length);
                match region {
                    None if base <= image_end && image_end < end => {
                        region = Some((base, end));
                        changed = true;
                    }
                    Some((s, e2)) if base <= e2 && end > e2 && base >= s => {
                        region = Some((s, end));
                        changed = true;
                    }
                    _ => {}
                }
            }
            if !changed {
                break;
            }
        }
        if let Some((_, end)) = region {
            info.ram_end = Some(end);
            info.ram_source = "memory map";
        }
    }
    if info.ram_end.is_none() && flags & FLAG_MEM != 0 {
        // SAFETY: flag bit 0 says `mem_upper` is valid.
        let upper_kib = u64::from(unsafe { rd32(mbi + 8) });
        info.ram_end = Some((1 << 20) + upper_kib * 1024);
        info.ram_source = "mem_upper";
    }
    info
}
