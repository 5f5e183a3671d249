//! userfaultfd (`include/uapi/linux/userfaultfd.h`): the one wrapper of it in perfplus, for both of
//! its users:
//! - the destination of a post-copy migration ([`crate::demand_paging`]): MISSING and MINOR modes,
//!   pages installed with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` (holes) or mapped with
//!   `UFFDIO_CONTINUE` (already in the page cache), fault messages read from the fd;
//! - the write-protect tracker ([`crate::tracking::uffd_wp`]): WP mode with `UFFD_FEATURE_WP_ASYNC`
//!   (6.7), read back with `PAGEMAP_SCAN` ([`super::pagemap`]).
//!
//! | ioctl / call | here |
//! |---|---|
//! | `userfaultfd()`, or `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` | [`Userfaultfd::open`] |
//! | `UFFDIO_API` | [`Userfaultfd::api`] |
//! | `UFFDIO_REGISTER` (MISSING, MINOR and WP modes) | [`Userfaultfd::register`] |
//! | `UFFDIO_UNREGISTER` | [`Userfaultfd::unregister`] |
//! | `UFFDIO_COPY` | [`Userfaultfd::copy`] |
//! | `UFFDIO_ZEROPAGE` | [`Userfaultfd::zeropage`] |
//! | `UFFDIO_CONTINUE` | [`Userfaultfd::continue_range`] |
//! | `UFFDIO_WRITEPROTECT` (protect) | [`Userfaultfd::write_protect`] |
//! | `UFFDIO_WAKE` | [`Userfaultfd::wake`] |
//! | `poll` for a message, `read` of a `struct uffd_msg` | [`Userfaultfd::wait_readable`], [`Userfaultfd::read_msg`] |
//!
//! Why not the `userfaultfd` crate: its feature flags stop at Linux 4.14, so it cannot ask for
//! `WP_ASYNC`, and two wrappers of one kernel interface are one too many. Debian 12's 6.1 headers
//! lack `WP_ASYNC` (and `WP_UNPOPULATED`), so the definitions here are the project's own.
//!
//! The fd handles kernel-mode faults too: it is never opened with `UFFD_USER_MODE_ONLY`, because
//! KVM's accesses to guest memory (and `read`/`write` syscalls on it) are kernel-mode; with that
//! flag `KVM_RUN` fails with an internal error.
//!
//! The layouts are checked against the kernel at test time: sizes and offsets against the uapi
//! header's definition (and the size encoded in each ioctl number), and live calls that the running
//! kernel accepts.
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;
/// `UFFDIO_REGISTER_MODE_MISSING`: a fault on a page that is not present stops the faulting thread
/// and queues a message, until the page is installed (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE`).
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR` (5.13; shmem since 5.14): a fault on a page that *is* in the page
/// cache but has no page-table entry in the registered range stops the faulting thread and queues a
/// message, until the entry is installed (`UFFDIO_CONTINUE`). Another mapping of the same file
/// (or `write`) can change the page in between without the faulting mapping seeing it.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFDIO_COPY_MODE_DONTWAKE` (and `UFFDIO_ZEROPAGE_MODE_DONTWAKE`, `UFFDIO_CONTINUE_MODE_DONTWAKE`,
/// the same bit): do not wake the threads waiting on the range.
const MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFD_FEATURE_MINOR_SHMEM` (5.14): MINOR mode works on shmem (our guest RAM is a memfd).
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19): write-protect works on shmem (our guest RAM is a memfd).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (6.4): protecting an anonymous hole installs a marker.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (6.7): a write to a protected page un-protects it in the kernel without a
/// fault message; the written state is read back with `PAGEMAP_SCAN`.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_EVENT_PAGEFAULT`: the only event without event features (none are asked for here).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault was a write to a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`: a MINOR-mode fault (the page is in the page cache, unmapped here);
/// without it, a MISSING-mode fault (no page at all).
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
/// `1 << _UFFDIO_WAKE`: the bit for `UFFDIO_WAKE` in the `ioctls` mask [`Userfaultfd::register`]
/// returns.
pub const IOCTL_BIT_WAKE: u64 = 1 << 0x02;
/// `1 << _UFFDIO_COPY`, likewise.
pub const IOCTL_BIT_COPY: u64 = 1 << 0x03;
/// `1 << _UFFDIO_ZEROPAGE`, likewise.
pub const IOCTL_BIT_ZEROPAGE: u64 = 1 << 0x04;
/// `1 << _UFFDIO_CONTINUE`, likewise.
pub const IOCTL_BIT_CONTINUE: u64 = 1 << 0x07;

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

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Out: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: un-protect).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffd_msg` (32 bytes, `__packed` in the header, but every field is naturally aligned):
/// one event read from the fd. `arg` is the header's union; see [`UffdMsg::pagefault`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

/// `arg.pagefault` of a [`UffdMsg`] (without `feat.ptid`, which needs `UFFD_FEATURE_THREAD_ID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pagefault {
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// The faulting address, rounded down to its page.
    pub address: u64,
}

impl UffdMsg {
    /// The page fault this message reports, if it is one.
    pub fn pagefault(&self) -> Option<Pagefault> {
        (self.event == UFFD_EVENT_PAGEFAULT).then_some(Pagefault {
            flags: self.arg[0],
            address: self.arg[1],
        })
    }
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
// The kernel declares UNREGISTER and WAKE as _IOR although it reads the range (see the uapi
// header's comment).
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioContinue);

const _: () = {
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
    assert!(std::mem::size_of::<UffdioCopy>() == 40);
    assert!(std::mem::size_of::<UffdioZeropage>() == 32);
    assert!(std::mem::size_of::<UffdioContinue>() == 32);
    assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
    assert!(std::mem::size_of::<UffdMsg>() == 32);
};

/// A userfaultfd: close-on-exec, non-blocking, handling kernel-mode faults too.
///
/// Installing a page in a missing page of an anonymous mapping (a fault thread would first wait
/// with [`Userfaultfd::wait_readable`] and take the fault's address from [`Userfaultfd::read_msg`]):
///
/// ```
/// use perfplus_vmm::sys::userfaultfd::{Userfaultfd, UFFDIO_REGISTER_MODE_MISSING};
///
/// let uffd = Userfaultfd::open()?;
/// uffd.api(0)?;
/// let map = memmap2::MmapMut::map_anon(2 * 4096)?;
/// let start = map.as_ptr() as u64;
/// uffd.register(start, 2 * 4096, UFFDIO_REGISTER_MODE_MISSING)?;
/// // SAFETY: the mapping is only accessed through raw pointers.
/// let copied = unsafe { uffd.copy(start + 4096, &[7; 4096], true)? };
/// assert_eq!(copied, 4096);
/// // SAFETY: inside the mapping, and that page is present now (a read of page 0 would wait).
/// assert_eq!(unsafe { map.as_ptr().add(4096 + 100).read_volatile() }, 7);
/// uffd.unregister(start, 2 * 4096)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `Ok(n)` for an install ioctl (COPY, ZEROPAGE, CONTINUE) that returned `ret` and reported `done` bytes: the
/// kernel answers EAGAIN both when it installed only part of the range (`done` > 0) and when the
/// address space changed under it and it installed nothing (`done` = -EAGAIN).
fn installed(ret: i32, done: i64) -> io::Result<u64> {
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) if done > 0 => Ok(done as u64),
            _ => Err(err),
        };
    }
    u64::try_from(done).map_err(|_| io::Error::from_raw_os_error(-done as i32))
}

impl Userfaultfd {
    /// Opens a userfaultfd (close-on-exec, non-blocking) that handles kernel-mode faults too (KVM's
    /// accesses to guest memory are kernel-mode; `UFFD_USER_MODE_ONLY` would break them). Tries the
    /// `userfaultfd` syscall first, then `/dev/userfaultfd`. Then call [`Userfaultfd::api`].
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
    /// returns what the kernel reports (its supported features and the ioctls available). Must come
    /// once, before any other ioctl.
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

    /// `UFFDIO_REGISTER` of `[start, start + len)` (page-aligned, mapped) with `mode`
    /// ([`UFFDIO_REGISTER_MODE_MISSING`], [`UFFDIO_REGISTER_MODE_MINOR`] and/or
    /// [`UFFDIO_REGISTER_MODE_WP`]); returns the mask of ioctls available on the range (`IOCTL_BIT_*`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads the range and mode and writes `ioctls` of one
        // `struct uffdio_register`, which `arg` is; it changes no memory of ours, only how faults
        // in the range are handled (a missing page then waits for an install, which only the
        // unsafe `copy`/`zeropage`/`continue_range` make; with WP_ASYNC, writes still succeed).
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.ioctls)
    }

    /// `UFFDIO_UNREGISTER` of `[start, start + len)` (also drops the write protection of its pages;
    /// missing pages then fault in as usual: zeroes for anonymous memory, holes of a memfd too).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which `arg` is.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: atomically installs a copy of `src` at `dst` (page-aligned, `src.len()` a
    /// multiple of the page size), in pages that are missing, and wakes the threads waiting on the
    /// range if `wake`. Returns the bytes installed: all of `src`, or fewer if the kernel stopped
    /// early (EAGAIN after a partial copy; the rest is still missing). Errors install nothing;
    /// notably EEXIST (a page is already present), EAGAIN (the address space changed under the
    /// call: try again), ENOENT (`dst` is not in a registered range), EINVAL (not aligned).
    ///
    /// # Safety
    ///
    /// No Rust reference may point into `[dst, dst + src.len())`: the kernel changes that memory
    /// (a missing page reads as nothing until now; afterwards, as `src`). Memory only ever accessed
    /// through raw pointers (as [`crate::memory::GuestMemory`] is) or by the kernel qualifies. The
    /// kernel itself checks that the range is registered with a userfaultfd (of the process that
    /// opened this one), and never overwrites a present page.
    pub unsafe fn copy(&self, dst: u64, src: &[u8], wake: bool) -> io::Result<u64> {
        let mut arg = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wake { 0 } else { MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads one `struct uffdio_copy` (`arg`, layout checked) and writes its
        // `copy` field; it reads `len` bytes at `src`, which is `src`'s slice, borrowed for the call.
        // Writing at `dst` is covered by the caller's contract. The return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut arg) };
        installed(ret, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: atomically installs zero pages at `[start, start + len)` (page-aligned),
    /// in pages that are missing, and wakes the threads waiting on the range if `wake`. Returns and
    /// fails as [`Userfaultfd::copy`] does. Some memory kinds (hugetlbfs) refuse it (EINVAL).
    ///
    /// # Safety
    ///
    /// As for [`Userfaultfd::copy`]: no Rust reference may point into the range.
    pub unsafe fn zeropage(&self, start: u64, len: u64, wake: bool) -> io::Result<u64> {
        let mut arg = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if wake { 0 } else { MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads one `struct uffdio_zeropage` (`arg`, layout checked) and
        // writes its `zeropage` field; writing at `start` is covered by the caller's contract. The
        // return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut arg) };
        installed(ret, arg.zeropage)
    }

    /// `UFFDIO_CONTINUE`: maps the pages of `[start, start + len)` (page-aligned, registered in MINOR
    /// mode) to what the page cache holds for them, and wakes the threads waiting on the range if
    /// `wake`. Returns the bytes mapped: all of `len`, or fewer if the kernel stopped early (EAGAIN
    /// after a partial mapping, e.g. at a page already mapped; the rest is untouched). Errors map
    /// nothing; notably EEXIST (the first page is mapped already), EFAULT (the first page is not in
    /// the page cache: a hole), ENOENT (not in a registered range).
    ///
    /// # Safety
    ///
    /// No Rust reference may point into the range: the kernel makes the mapping's pages readable
    /// there (before this they fault; afterwards they read as the page cache's content, which may be
    /// what another mapping of the same file wrote). As for [`Userfaultfd::copy`], memory only ever
    /// accessed through raw pointers or by the kernel qualifies.
    pub unsafe fn continue_range(&self, start: u64, len: u64, wake: bool) -> io::Result<u64> {
        let mut arg = UffdioContinue {
            range: UffdioRange { start, len },
            mode: if wake { 0 } else { MODE_DONTWAKE },
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads one `struct uffdio_continue` (`arg`, layout checked) and
        // writes its `mapped` field; what it maps at `start` is covered by the caller's contract. The
        // return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_CONTINUE(), &mut arg) };
        installed(ret, arg.mapped)
    }

    /// `UFFDIO_WRITEPROTECT` of `[start, start + len)` (page-aligned, registered in WP mode): sets the
    /// uffd-wp bit of every page there, and where a page is not mapped (and the memory is a file's, or
    /// `WP_UNPOPULATED` is on) a marker that keeps the bit when the page is mapped later. With
    /// `WP_ASYNC` the next write to each page un-protects it without a message.
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect` (`arg`, layout checked);
        // it only changes page protections (a later write faults, or with WP_ASYNC goes on), never
        // memory contents.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_WRITEPROTECT(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `UFFDIO_WAKE` of `[start, start + len)`: wakes the threads waiting on faults there (for a
    /// fault whose page became present meanwhile, or after a `copy` without `wake`).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`, which `arg` is; it changes no memory.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for the fd to become readable (a message queued):
    /// `poll` with `POLLIN`. `Ok(false)` on timeout; an interrupted wait is an error of kind
    /// `Interrupted`.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call, and 1 is its count.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n > 0)
    }

    /// Reads one message (`struct uffd_msg`); `None` if none is queued (the fd is non-blocking).
    pub fn read_msg(&self) -> io::Result<Option<UffdMsg>> {
        let mut msg = UffdMsg::default();
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: `read` writes at most `size` bytes at `&mut msg`, which is `size` bytes of plain
        // integers (any bytes are a valid value), exclusively borrowed for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut msg).cast(), size) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(err);
        }
        if n as usize != size {
            // The kernel only hands out whole messages; 0 would be end of file.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("userfaultfd read returned {n} bytes, not one {size}-byte message"),
            ));
        }
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};
    use std::time::Duration;

    use super::*;

    const PAGE: usize = 4096;
    use crate::test_mapping::Mapping;

    /// `_IOC_SIZE` of an ioctl number.
    fn ioc_size(nr: libc::c_ulong) -> usize {
        ((nr >> 16) & 0x3fff) as usize
    }

    #[test]
    fn layouts_match_the_kernel_uapi() {
        // The numbers the installed 6.1 header gives (unchanged since).
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(ioc_size(UFFDIO_COPY()), size_of::<UffdioCopy>());
        assert_eq!(ioc_size(UFFDIO_ZEROPAGE()), size_of::<UffdioZeropage>());
        assert_eq!(UFFDIO_CONTINUE(), 0xc020_aa07);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(ioc_size(UFFDIO_CONTINUE()), size_of::<UffdioContinue>());
        assert_eq!(offset_of!(UffdioContinue, mode), 16);
        assert_eq!(offset_of!(UffdioContinue, mapped), 24);
        assert_eq!(offset_of!(UffdioCopy, copy), 32);
        assert_eq!(offset_of!(UffdioZeropage, mode), 16);
        assert_eq!(offset_of!(UffdioZeropage, zeropage), 24);
        // struct uffd_msg: arg at 8; arg.pagefault.flags at 8, .address at 16, .feat.ptid at 24.
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(offset_of!(UffdMsg, arg), 8);
    }

    /// Waits for the next message, which must be a page fault; returns it.
    fn next_fault(uffd: &Userfaultfd) -> Pagefault {
        assert!(uffd.wait_readable(10_000).unwrap(), "no fault within 10 s");
        let msg = uffd.read_msg().unwrap().expect("a message after poll");
        msg.pagefault().unwrap_or_else(|| panic!("not a page fault: {msg:?}"))
    }

    fn missing_mode_round_trip(memfd: bool) {
        let uffd = Userfaultfd::open().expect("userfaultfd");
        // SAFETY: F_GETFL / F_GETFD on our own fd.
        let (fl, fd_flags) = unsafe {
            (
                libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(uffd.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0, "non-blocking");
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        uffd.api(0).unwrap();
        let memory = std::sync::Arc::new(Mapping::new(16, memfd));
        let ioctls = uffd
            .register(memory.page(0), memory.len as u64, UFFDIO_REGISTER_MODE_MISSING)
            .unwrap();
        for bit in [IOCTL_BIT_WAKE, IOCTL_BIT_COPY, IOCTL_BIT_ZEROPAGE] {
            assert_ne!(ioctls & bit, 0, "{ioctls:#x}");
        }
        assert_eq!(uffd.read_msg().unwrap(), None, "nothing queued");
        assert!(!uffd.wait_readable(0).unwrap());

        // A read fault from a thread: reported, resolved by a copy that wakes the reader.
        let reader = {
            let memory = memory.clone();
            std::thread::spawn(move || memory.read(2, 100))
        };
        let fault = next_fault(&uffd);
        assert_eq!(fault.address, memory.page(2));
        assert_eq!(fault.flags & UFFD_PAGEFAULT_FLAG_WRITE, 0, "a read");
        // SAFETY: the mapping is only accessed through raw pointers.
        let copied = unsafe { uffd.copy(memory.page(2), &[9; PAGE], true) }.unwrap();
        assert_eq!(copied, PAGE as u64);
        assert_eq!(reader.join().unwrap(), 9);
        // SAFETY: as above.
        let again = unsafe { uffd.copy(memory.page(2), &[1; PAGE], true) }.unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST), "{again}");
        assert_eq!(memory.read(2, 0), 9, "a present page is never overwritten");

        // ZEROPAGE, and EEXIST on a second one.
        // SAFETY: as above.
        let zeroed = unsafe { uffd.zeropage(memory.page(5), PAGE as u64, true) }.unwrap();
        assert_eq!(zeroed, PAGE as u64);
        assert_eq!(memory.read(5, 123), 0);
        // SAFETY: as above.
        let again = unsafe { uffd.zeropage(memory.page(5), PAGE as u64, true) }.unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST), "{again}");

        // A write fault, resolved by a copy that does not wake, then a WAKE: the write lands on the
        // copied page.
        let writer = {
            let memory = memory.clone();
            std::thread::spawn(move || memory.write(7, 0, 0x55))
        };
        let fault = next_fault(&uffd);
        assert_eq!(fault.address, memory.page(7));
        assert_ne!(fault.flags & UFFD_PAGEFAULT_FLAG_WRITE, 0, "a write");
        // SAFETY: as above.
        unsafe { uffd.copy(memory.page(7), &[7; PAGE], false) }.unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "not woken without a WAKE");
        uffd.wake(memory.page(7), PAGE as u64).unwrap();
        writer.join().unwrap();
        assert_eq!((memory.read(7, 0), memory.read(7, 1)), (0x55, 7));

        // A kernel-mode fault (write(2) reading from the page) is reported too: the fd is not
        // user-mode-only, which KVM needs.
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two fds.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let syscall = {
            let src = memory.page(9) as usize;
            std::thread::spawn(move || {
                // SAFETY: reads 16 bytes of the mapping (kept alive by the test until the join).
                unsafe { libc::write(pipe[1], src as *const libc::c_void, 16) }
            })
        };
        let fault = next_fault(&uffd);
        assert_eq!(fault.address, memory.page(9));
        // SAFETY: as above.
        unsafe { uffd.copy(memory.page(9), &[3; PAGE], true) }.unwrap();
        assert_eq!(syscall.join().unwrap(), 16);
        let mut out = [0u8; 16];
        // SAFETY: reads into `out`, 16 bytes; then closes the pipe's fds, ours.
        unsafe {
            assert_eq!(libc::read(pipe[0], out.as_mut_ptr().cast(), 16), 16);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        assert_eq!(out, [3; 16]);

        // The kernel checks alignment and registration.
        // SAFETY: as above (refused anyway).
        let unaligned = unsafe { uffd.copy(memory.page(11) + 8, &[1; PAGE], true) }.unwrap_err();
        assert_eq!(unaligned.raw_os_error(), Some(libc::EINVAL), "{unaligned}");
        let other = Mapping::new(1, memfd);
        // SAFETY: `other` too is only accessed through raw pointers.
        let unregistered = unsafe { uffd.copy(other.page(0), &[1; PAGE], true) }.unwrap_err();
        assert_eq!(unregistered.raw_os_error(), Some(libc::ENOENT), "{unregistered}");

        // Unregistered, a missing page reads as zero without a fault.
        uffd.unregister(memory.page(0), memory.len as u64).unwrap();
        assert_eq!(memory.read(12, 0), 0);
        assert_eq!(uffd.read_msg().unwrap(), None);
    }

    #[test]
    fn missing_mode_on_anonymous_memory() {
        missing_mode_round_trip(false);
    }

    #[test]
    fn missing_mode_on_a_memfd() {
        missing_mode_round_trip(true);
    }

    /// MISSING and MINOR modes on the second of two mappings of a memfd (as post-copy registers the
    /// guest's view of guest RAM): a page in the page cache faults as MINOR until `UFFDIO_CONTINUE`
    /// maps it, and what the first mapping wrote meanwhile is what it maps; a hole faults as MISSING
    /// and takes `UFFDIO_COPY`, which refuses a page in the page cache.
    #[test]
    fn minor_and_missing_modes_on_a_second_mapping_of_a_memfd() {
        let (agent, guest) = Mapping::memfd_pair(16);
        for page in 0..6 {
            agent.write(page, 0, 1); // in the page cache, never mapped by `guest`
        }
        let uffd = Userfaultfd::open().expect("userfaultfd");
        let api = uffd.api(UFFD_FEATURE_MINOR_SHMEM).expect("UFFDIO_API with MINOR_SHMEM");
        assert_ne!(api.features & UFFD_FEATURE_MINOR_SHMEM, 0, "{api:?}");
        let guest = std::sync::Arc::new(guest);
        let ioctls = uffd
            .register(
                guest.page(0),
                guest.len as u64,
                UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
            )
            .unwrap();
        for bit in [IOCTL_BIT_WAKE, IOCTL_BIT_COPY, IOCTL_BIT_ZEROPAGE, IOCTL_BIT_CONTINUE] {
            assert_ne!(ioctls & bit, 0, "{ioctls:#x}");
        }

        // A read of a cached page through `guest`: a minor fault. The content is replaced through
        // `agent` while the reader waits; CONTINUE maps the new content and wakes it.
        let reader = {
            let guest = guest.clone();
            std::thread::spawn(move || guest.read(1, 0))
        };
        let fault = next_fault(&uffd);
        assert_eq!(fault.address, guest.page(1));
        assert_ne!(fault.flags & UFFD_PAGEFAULT_FLAG_MINOR, 0, "a minor fault: {fault:?}");
        agent.write(1, 0, 7);
        // SAFETY: the mappings are only accessed through raw pointers.
        let mapped = unsafe { uffd.continue_range(guest.page(1), PAGE as u64, true) }.unwrap();
        assert_eq!(mapped, PAGE as u64);
        assert_eq!(
            reader.join().unwrap(),
            7,
            "the reader saw what the agent wrote, not the old page"
        );

        // A write to a hole: a MISSING fault (no MINOR flag), resolved by COPY.
        let writer = {
            let guest = guest.clone();
            std::thread::spawn(move || guest.write(9, 1, 0x55))
        };
        let fault = next_fault(&uffd);
        assert_eq!(fault.address, guest.page(9));
        assert_eq!(fault.flags & UFFD_PAGEFAULT_FLAG_MINOR, 0, "a missing fault: {fault:?}");
        // SAFETY: as above.
        unsafe { uffd.copy(guest.page(9), &[3; PAGE], true) }.unwrap();
        writer.join().unwrap();
        assert_eq!(
            (agent.read(9, 0), agent.read(9, 1)),
            (3, 0x55),
            "one page, both mappings"
        );

        // COPY refuses a page that is in the page cache (even unmapped here).
        // SAFETY: as above.
        let cached = unsafe { uffd.copy(guest.page(3), &[1; PAGE], true) }.unwrap_err();
        assert_eq!(cached.raw_os_error(), Some(libc::EEXIST), "{cached}");
        // A range over pages 0..6 where page 1 is mapped: the first call maps page 0 and stops
        // there (partial: EAGAIN with the count), the next is refused at page 1, the rest maps.
        // SAFETY: as above.
        let first = unsafe { uffd.continue_range(guest.page(0), 6 * PAGE as u64, true) }.unwrap();
        assert_eq!(first, PAGE as u64);
        // SAFETY: as above.
        let at_mapped = unsafe { uffd.continue_range(guest.page(1), 5 * PAGE as u64, true) }.unwrap_err();
        assert_eq!(at_mapped.raw_os_error(), Some(libc::EEXIST), "{at_mapped}");
        // SAFETY: as above.
        let rest = unsafe { uffd.continue_range(guest.page(2), 4 * PAGE as u64, true) }.unwrap();
        assert_eq!(rest, 4 * PAGE as u64);
        assert_eq!(guest.read(5, 0), 1);
        // A hole cannot be continued.
        // SAFETY: as above.
        let hole = unsafe { uffd.continue_range(guest.page(12), PAGE as u64, true) }.unwrap_err();
        assert_eq!(hole.raw_os_error(), Some(libc::EFAULT), "{hole}");
        // `agent` is not registered: it reads and writes any page without a fault.
        assert_eq!(agent.read(14, 0), 0);
        assert_eq!(uffd.read_msg().unwrap(), None, "no fault from the agent's mapping");
        uffd.unregister(guest.page(0), guest.len as u64).unwrap();
        assert_eq!(
            guest.read(14, 0),
            0,
            "unregistered: the page the agent's read allocated"
        );
    }

    /// WP mode with WP_ASYNC on a memfd (as guest RAM is): a write to a protected page goes on
    /// without a message, and `PAGEMAP_SCAN` sees it.
    #[test]
    fn write_protect_mode_with_wp_async_on_a_memfd() {
        use crate::sys::pagemap::{
            PageRegion, Pagemap, PmScanArg, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
        };

        let uffd = Userfaultfd::open().expect("userfaultfd");
        let api = uffd
            .api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
            .expect("UFFDIO_API with WP_ASYNC");
        assert_ne!(api.features & UFFD_FEATURE_WP_ASYNC, 0, "{api:?}");
        let again = uffd.api(0).unwrap_err();
        assert_eq!(
            again.raw_os_error(),
            Some(libc::EINVAL),
            "UFFDIO_API is once per fd: {again}"
        );
        let memory = Mapping::new(4, true);
        for page in 0..4 {
            memory.write(page, 0, 1);
        }
        let (start, end) = (memory.page(0), memory.page(0) + memory.len as u64);
        uffd.register(start, memory.len as u64, UFFDIO_REGISTER_MODE_WP)
            .unwrap();
        let pagemap = Pagemap::open_self().unwrap();
        let mut regions = [PageRegion::default(); 4];
        let scan = |regions: &mut [PageRegion]| {
            let mut arg = PmScanArg {
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let n = pagemap.scan(&mut arg, regions).unwrap();
            assert_eq!(arg.walk_end, end);
            n
        };
        assert_eq!(scan(&mut regions), 1, "all written before: one region, now protected");
        assert_eq!(scan(&mut regions), 0);
        memory.write(2, 9, 2);
        assert_eq!(memory.read(2, 9), 2);
        assert_eq!(uffd.read_msg().unwrap(), None, "async: no message");
        assert_eq!(scan(&mut regions), 1);
        assert_eq!((regions[0].start, regions[0].end), (memory.page(2), memory.page(3)));
        uffd.unregister(start, memory.len as u64).unwrap();
    }

    /// `UFFDIO_WRITEPROTECT` on a mapping of a memfd whose pages it never mapped (written through
    /// another mapping): a marker per page keeps the protection, so a later read maps the page still
    /// protected and only a write shows as written.
    #[test]
    fn write_protect_marks_unmapped_pages_of_a_memfd() {
        use crate::sys::pagemap::{PageRegion, Pagemap, PmScanArg, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC};

        let (agent, guest) = Mapping::memfd_pair(8);
        for page in 0..8 {
            agent.write(page, 0, 1);
        }
        let uffd = Userfaultfd::open().expect("userfaultfd");
        uffd.api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
            .unwrap();
        let (start, end) = (guest.page(0), guest.page(0) + guest.len as u64);
        uffd.register(start, guest.len as u64, UFFDIO_REGISTER_MODE_WP).unwrap();
        let pagemap = Pagemap::open_self().unwrap();
        let written = || {
            let mut regions = [PageRegion::default(); 8];
            let mut arg = PmScanArg {
                flags: PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let n = pagemap.scan(&mut arg, &mut regions).unwrap();
            regions[..n]
                .iter()
                .flat_map(|r| (r.start - start) / PAGE as u64..(r.end - start) / PAGE as u64)
                .collect::<Vec<_>>()
        };
        uffd.write_protect(start, guest.len as u64).unwrap();
        for page in 0..8 {
            assert_eq!(guest.read(page, 0), 1);
        }
        assert_eq!(written(), Vec::<u64>::new(), "reads of marked pages are not writes");
        guest.write(5, 0, 2);
        assert_eq!(written(), vec![5]);
        uffd.unregister(start, guest.len as u64).unwrap();
    }
}
