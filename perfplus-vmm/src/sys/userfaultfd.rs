//! userfaultfd definitions newer than the installed headers (Debian 12 ships 6.1 uapi headers),
//! defined once here: `UFFD_FEATURE_WP_ASYNC` / `WP_UNPOPULATED` (6.7 / 6.4). `PAGEMAP_SCAN`, which
//! the write-protect tracker reads them back with, is in [`super::pagemap`].
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

const _: () = {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_uapi() {
        // userfaultfd.h: the numbers the installed 6.1 header gives.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
    }
}
