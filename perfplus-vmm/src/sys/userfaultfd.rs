//! Kernel interfaces newer than the installed headers (Debian 12 ships 6.1 uapi headers), defined once
//! here: userfaultfd's `UFFD_FEATURE_WP_ASYNC` / `WP_UNPOPULATED` (6.7 / 6.4) and the `PAGEMAP_SCAN`
//! ioctl with `struct pm_scan_arg` / `struct page_region` (6.7, `include/uapi/linux/fs.h`).
//!
//! The `userfaultfd` crate (0.9) cannot ask for `WP_ASYNC` (its feature flags stop at Linux 4.14), so
//! [`Userfaultfd`] wraps the four ioctls the write-protect tracker needs, in the style of kvm-ioctls:
//! a typed safe method per ioctl, the `unsafe` call inside with its reasoning.
//!
//! The layouts are checked against the kernel at test time: sizes and offsets against the uapi
//! header's definition (and the size encoded in the ioctl number), and live calls that the running
//! kernel accepts.
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

// ---- userfaultfd (include/uapi/linux/userfaultfd.h)

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19): write-protect works on shmem (our guest RAM is a memfd).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (6.4): protecting an anonymous hole installs a marker.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (6.7): a write to a protected page un-protects it in the kernel without a
/// fault message; the written state is read back with `PAGEMAP_SCAN`.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
// The kernel declares UNREGISTER as _IOR although it reads the range (see the uapi header's comment).
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);

// ---- PAGEMAP_SCAN (include/uapi/linux/fs.h, 6.7)

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

/// `struct pm_scan_arg` (96 bytes; `size` must be 96).
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
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
};

/// A userfaultfd, with the ioctls the write-protect tracker uses.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens a userfaultfd (close-on-exec, non-blocking) that handles kernel-mode faults too (KVM's
    /// accesses to guest memory are kernel-mode; `UFFD_USER_MODE_ONLY` would break them). Tries the
    /// `userfaultfd` syscall first, then `/dev/userfaultfd`.
    pub fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one int of flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: the syscall returned a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            return Ok(Self { fd });
        }
        let syscall_err = io::Error::last_os_error();
        // USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00) on /dev/userfaultfd.
        let dev = File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(|e| io::Error::new(e.kind(), format!("userfaultfd(): {syscall_err}; /dev/userfaultfd: {e}")))?;
        const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument and returns a new fd.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// `UFFDIO_API`: enables `features` (all must be supported, or the call fails with EINVAL);
    /// returns what the kernel reports (its supported features and the ioctls available).
    pub fn api(&self, features: u64) -> io::Result<UffdioApi> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `arg` is (layout checked
        // above and in the tests); `arg` lives across the call. The return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_API(), &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg)
    }

    /// `UFFDIO_REGISTER` of `[start, start + len)` with `mode`.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads the range and mode and writes `ioctls` of one
        // `struct uffdio_register`, which `arg` is; it changes no memory of ours, only how faults
        // in the range are handled (with WP_ASYNC, writes still succeed).
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `UFFDIO_UNREGISTER` of `[start, start + len)` (also drops the write protection of its pages).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which `arg` is.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `PAGEMAP_SCAN` on `pagemap` (a `/proc/PID/pagemap` file): fills `out` with regions of `arg`'s
/// range and returns how many it filled; `arg.walk_end` says where the walk stopped. `arg.vec` and
/// `arg.vec_len` are set from `out` here.
pub fn pagemap_scan(pagemap: &File, arg: &mut PmScanArg, out: &mut [PageRegion]) -> io::Result<usize> {
    arg.size = std::mem::size_of::<PmScanArg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // SAFETY: PAGEMAP_SCAN reads and writes one 96-byte `struct pm_scan_arg` (`arg`, size set above)
    // and writes at most `vec_len` `struct page_region`s (24 bytes each, layout checked) at `vec`,
    // which points at `out`, exclusively borrowed for the call. Write-protecting pages of our own
    // address space (WP_MATCHING) changes no memory content. The return value is checked.
    let ret = unsafe { ioctl_with_mut_ref(pagemap, PAGEMAP_SCAN(), arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

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
        // userfaultfd.h: the numbers the installed 6.1 header gives.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
    }

    #[test]
    fn the_kernel_accepts_the_calls() {
        let uffd = Userfaultfd::open().expect("userfaultfd");
        let api = uffd
            .api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            .expect("UFFDIO_API with WP_ASYNC");
        assert_ne!(api.features & UFFD_FEATURE_WP_ASYNC, 0, "{api:?}");
        let len = 16 * 4096;
        // SAFETY: a fresh anonymous private mapping; unmapped below, nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let start = addr as u64;
        // SAFETY: the mapping is ours and `len` bytes long.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 1, len) };
        uffd.register(start, len as u64, UFFDIO_REGISTER_MODE_WP).unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
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
        let n = pagemap_scan(&pagemap, &mut arg, &mut regions).unwrap();
        assert_eq!(n, 1);
        assert_eq!(arg.walk_end, arg.end);
        assert_eq!((regions[0].start, regions[0].end), (start, start + len as u64));
        // Now protected: nothing written.
        let mut arg2 = PmScanArg { ..arg };
        assert_eq!(pagemap_scan(&pagemap, &mut arg2, &mut regions).unwrap(), 0);
        // A wrong size is refused.
        let mut bad = PmScanArg { ..arg };
        bad.size = 88;
        // SAFETY: as in `pagemap_scan`; the kernel rejects the size before touching `vec`.
        let ret = unsafe { ioctl_with_mut_ref(&pagemap, PAGEMAP_SCAN(), &mut bad) };
        assert!(ret < 0);
        uffd.unregister(start, len as u64).unwrap();
        // Unregistered: CHECK_WPASYNC refuses the range.
        let mut arg3 = PmScanArg { ..arg };
        let err = pagemap_scan(&pagemap, &mut arg3, &mut regions).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        assert_eq!(unsafe { libc::munmap(addr, len) }, 0);
    }
}
