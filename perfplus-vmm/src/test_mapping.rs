//! Test memory: a mapping made with raw `mmap` (anonymous, or a shared memfd like guest RAM) that
//! tests hand to userfaultfd and the trackers. Shared by the `sys` and `tracking` tests.
use perfplus_common::PAGE_SIZE;

/// A mapping made with raw `mmap` and only accessed through raw pointers (so that the kernel
/// may install pages in it); unmapped on drop.
pub(crate) struct Mapping {
    pub(crate) addr: *mut u8,
    pub(crate) len: usize,
}

// SAFETY: plain memory owned by the Mapping; accessed only with raw-pointer reads and writes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `pages` anonymous private pages, or (`memfd`) a shared mapping of a memfd, like guest RAM.
    pub(crate) fn new(pages: usize, memfd: bool) -> Self {
        let len = pages * PAGE_SIZE;
        let (flags, fd) = if memfd {
            // SAFETY: a valid NUL-terminated name and flags; the result is checked.
            let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: `fd` is the memfd just created.
            assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
            (libc::MAP_SHARED, fd)
        } else {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
        };
        // SAFETY: a fresh mapping at an address the kernel picks, owned by the returned value.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        if fd >= 0 {
            // SAFETY: the mapping keeps the file; closing our fd of it is fine.
            unsafe { libc::close(fd) };
        }
        Self { addr: addr.cast(), len }
    }

    /// Two shared mappings of one memfd of `pages` pages: what one writes, the other reads (as
    /// guest RAM's agent view and guest view are).
    pub(crate) fn memfd_pair(pages: usize) -> (Self, Self) {
        let first = Self::new(pages, true);
        // SAFETY: mremap with an old size of 0 makes a second mapping of the pages of a shared
        // mapping (here: of the memfd `first` maps) at an address the kernel picks; it leaves `first`
        // as it is, and the new mapping is owned by the returned value.
        let addr = unsafe { libc::mremap(first.addr.cast(), 0, first.len, libc::MREMAP_MAYMOVE) };
        assert_ne!(addr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let second = Self {
            addr: addr.cast(),
            len: first.len,
        };
        (first, second)
    }

    pub(crate) fn page(&self, page: usize) -> u64 {
        assert!(page * PAGE_SIZE < self.len);
        self.addr as u64 + (page * PAGE_SIZE) as u64
    }

    pub(crate) fn read(&self, page: usize, offset: usize) -> u8 {
        assert!(page * PAGE_SIZE + offset < self.len);
        // SAFETY: inside the mapping (checked); a raw read, no reference.
        unsafe { self.addr.add(page * PAGE_SIZE + offset).read_volatile() }
    }

    pub(crate) fn write(&self, page: usize, offset: usize, value: u8) {
        assert!(page * PAGE_SIZE + offset < self.len);
        // SAFETY: inside the mapping (checked); a raw write, no reference.
        unsafe { self.addr.add(page * PAGE_SIZE + offset).write_volatile(value) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no reference into it exists.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}
