//! The `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` (Linux 6.7, `include/uapi/linux/fs.h`), with
//! `struct pm_scan_arg` and `struct page_region`, which Debian 12's 6.1 headers (and the `libc`
//! crate) do not have.
//!
//! The write-protect tracker uses it to read which pages of a range registered with userfaultfd
//! async write-protect were written, and to protect them again in the same walk
//! ([`PM_SCAN_WP_MATCHING`]). Gotchas: `size` must be 96; the call returns *regions*, not pages, and
//! can stop early when the output is full, so callers loop until `walk_end` reaches `end`; without
//! [`PM_SCAN_CHECK_WPASYNC`] ranges not registered for async write-protect are skipped silently.
//!
//! The layouts are checked against the uapi header's definition (and the size encoded in the ioctl
//! number) and with live calls in the tests.
use std::fs::File;
use std::io;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// `PAGE_IS_WPALLOWED`: the page is in a range registered for async write-protect.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected (or never protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PM_SCAN_WP_MATCHING`: write-protect the pages that match, in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) on a range not registered for async write-protect, instead
/// of silently skipping it.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: `[start, end)` (host virtual addresses) whose pages all have `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg` (96 bytes; `size` must be 96). [`Pagemap::scan`] sets `size`, `vec` and
/// `vec_len` itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Out: where the walk stopped (it can stop early when `vec` is full).
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

const PAGEMAP_IOCTL_MAGIC: u32 = b'f' as u32;
// _IOWR('f', 16, struct pm_scan_arg) = 0xc0606610.
ioctl_iowr_nr!(PAGEMAP_SCAN, PAGEMAP_IOCTL_MAGIC, 16, PmScanArg);

const _: () = {
    assert!(std::mem::size_of::<PmScanArg>() == 96);
    assert!(std::mem::size_of::<PageRegion>() == 24);
};

/// This process's `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open_self() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// `PAGEMAP_SCAN`: fills `out` with regions of `arg`'s range and returns how many it filled;
    /// `arg.walk_end` says where the walk stopped. `arg.size`, `arg.vec` and `arg.vec_len` are set
    /// here (96, and `out`).
    ///
    /// With [`PM_SCAN_WP_MATCHING`] the kernel write-protects the matching pages, but only in ranges
    /// registered for userfaultfd async write-protect (others fail with
    /// [`PM_SCAN_CHECK_WPASYNC`], or are skipped): writes to them still succeed, so no memory
    /// content changes and no thread blocks.
    pub fn scan(&self, arg: &mut PmScanArg, out: &mut [PageRegion]) -> io::Result<usize> {
        arg.size = std::mem::size_of::<PmScanArg>() as u64;
        arg.vec = out.as_mut_ptr() as u64;
        arg.vec_len = out.len() as u64;
        // SAFETY: PAGEMAP_SCAN reads and writes one 96-byte `struct pm_scan_arg` (`arg`, size set
        // above, layout checked) and writes at most `vec_len` `struct page_region`s (24 bytes each,
        // layout checked) at `vec`, which points at `out`, exclusively borrowed for the call.
        // Write-protecting pages of our own address space (WP_MATCHING, async ranges only) changes
        // no memory content. The return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, PAGEMAP_SCAN(), arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;
    use crate::sys::userfaultfd::{
        Userfaultfd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
    };

    /// `_IOC_SIZE` of an ioctl number.
    fn ioc_size(nr: libc::c_ulong) -> usize {
        ((nr >> 16) & 0x3fff) as usize
    }

    #[test]
    fn layouts_match_the_kernel_uapi() {
        // include/uapi/linux/fs.h (6.7+): twelve __u64 fields in this order.
        let fields = [
            offset_of!(PmScanArg, size),
            offset_of!(PmScanArg, flags),
            offset_of!(PmScanArg, start),
            offset_of!(PmScanArg, end),
            offset_of!(PmScanArg, walk_end),
            offset_of!(PmScanArg, vec),
            offset_of!(PmScanArg, vec_len),
            offset_of!(PmScanArg, max_pages),
            offset_of!(PmScanArg, category_inverted),
            offset_of!(PmScanArg, category_mask),
            offset_of!(PmScanArg, category_anyof_mask),
            offset_of!(PmScanArg, return_mask),
        ];
        assert_eq!(fields, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88]);
        assert_eq!(size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN(), 0xc060_6610, "the number the kernel defines");
        assert_eq!(ioc_size(PAGEMAP_SCAN()), size_of::<PmScanArg>());
        assert_eq!(
            [
                offset_of!(PageRegion, start),
                offset_of!(PageRegion, end),
                offset_of!(PageRegion, categories)
            ],
            [0, 8, 16]
        );
        assert_eq!(size_of::<PageRegion>(), 24);
    }

    #[test]
    fn the_kernel_accepts_the_calls() {
        let uffd = Userfaultfd::open().expect("userfaultfd");
        let api = uffd
            .api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            .expect("UFFDIO_API with WP_ASYNC");
        assert_ne!(api.features & UFFD_FEATURE_WP_ASYNC, 0, "{api:?}");
        let len = 16 * 4096;
        let mut memory = memmap2::MmapMut::map_anon(len).unwrap();
        memory.fill(1);
        let start = memory.as_ptr() as u64;
        uffd.register(start, len as u64, UFFDIO_REGISTER_MODE_WP).unwrap();
        let pagemap = Pagemap::open_self().unwrap();
        let mut regions = [PageRegion::default(); 8];
        let mut arg = PmScanArg {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end: start + len as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        // Every page was written before it was protected: one region covering all.
        let n = pagemap.scan(&mut arg, &mut regions).unwrap();
        assert_eq!(n, 1);
        assert_eq!(arg.walk_end, arg.end);
        assert_eq!((regions[0].start, regions[0].end), (start, start + len as u64));
        // Now protected: nothing written.
        let mut arg2 = PmScanArg { ..arg };
        assert_eq!(pagemap.scan(&mut arg2, &mut regions).unwrap(), 0);
        // One write, seen as one one-page region; the write itself went through (async).
        memory[5 * 4096 + 9] = 2;
        let mut arg3 = PmScanArg { ..arg };
        assert_eq!(pagemap.scan(&mut arg3, &mut regions).unwrap(), 1);
        assert_eq!((regions[0].start, regions[0].end), (start + 5 * 4096, start + 6 * 4096));
        assert_eq!(memory[5 * 4096 + 9], 2);
        // A wrong size is refused.
        let mut bad = PmScanArg { ..arg };
        bad.size = 88;
        // SAFETY: as in `Pagemap::scan` (`vec` points at `regions`); the kernel rejects the size
        // before touching `vec`.
        let ret = unsafe { ioctl_with_mut_ref(&pagemap.file, PAGEMAP_SCAN(), &mut bad) };
        assert!(ret < 0);
        uffd.unregister(start, len as u64).unwrap();
        // Unregistered: CHECK_WPASYNC refuses the range.
        let mut arg4 = PmScanArg { ..arg };
        let err = pagemap.scan(&mut arg4, &mut regions).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
