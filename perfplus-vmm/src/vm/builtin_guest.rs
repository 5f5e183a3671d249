//! The built-in workload guest: a `no_std` multiboot (v1) kernel (crate `guest/`, built for
//! `x86_64-unknown-none` by `build.rs` and embedded here).
//!
//! Boot it like any multiboot kernel: load the `PT_LOAD` segments of [`IMAGE`] at their `p_paddr`
//! (one segment at 1 MiB; its memory size is larger than its file size: zero the rest), enter the ELF
//! entry point in flat 32-bit protected mode with paging off, `EAX = 0x2BADB002` and `EBX` pointing
//! at a multiboot information structure that carries the command line (flag bit 2) and the memory
//! map (bit 6) or `mem_upper` (bit 0). Keep the page at `guest_abi::STATUS_PAGE_GPA` (0x7000) and
//! the range from 1 MiB up free of loader data the guest must keep (it reads the information
//! structure once, first). The guest needs `KVM_SET_CPUID2` (it sets `EFER.LME`), prints on a 16550
//! at 0x3f8 (writes to THR only) and runs with interrupts disabled.
//!
//! The guest reports through the status page (`perfplus_common::guest_abi::StatusPage`); when it
//! fails (state FAILED) it halts with interrupts off. Its command line takes the keys of
//! `perfplus_common::guest_abi::cmdline`; the VMM should append `tsc_khz=<host TSC kHz>` (without it
//! the guest assumes 2 GHz for pacing and reports `tsc_khz = 0`). See `guest/README.md`.

/// The guest's ELF64 image (multiboot header with the address fields, so QEMU's `-kernel` takes it
/// as is).
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/perfplus-guest.elf"));

/// A command line that exercises every content kind: a 64 MiB working set rewritten at 10k pages/s,
/// 40 % of the pages with fresh content on every write, 30 % drawn from a small pool of shared
/// contents, 10 % zero and 20 % rewritten with unchanged content. The agent appends `tsc_khz=`.
pub const DEFAULT_CMDLINE: &str = "working-set=64M rate=10k mix=unique:40,dup:30,zero:10,same:20 seed=1";

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn image_is_an_elf64_with_a_multiboot_header_in_its_first_8k() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        assert_eq!(IMAGE[4], 2, "ELF64");
        let search = &IMAGE[..IMAGE.len().min(8192)];
        let off = (0..search.len() - 12)
            .step_by(4)
            .find(|&o| u32_at(search, o) == 0x1BAD_B002)
            .expect("multiboot header magic");
        let flags = u32_at(search, off + 4);
        let checksum = u32_at(search, off + 8);
        assert_eq!(0x1BAD_B002u32.wrapping_add(flags).wrapping_add(checksum), 0);
        assert_ne!(flags & (1 << 16), 0, "address fields (a.out kludge) present");
    }

    #[test]
    fn default_cmdline_names_every_kind() {
        for kind in ["unique:", "dup:", "zero:", "same:"] {
            assert!(DEFAULT_CMDLINE.contains(kind), "{kind}");
        }
    }
}
