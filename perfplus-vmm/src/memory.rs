//! Guest RAM: one memfd, mapped shared twice into the agent: the agent's view, which this type reads
//! and writes, and the guest's view, which only KVM uses (the memory slot).
//!
//! The memory is a `memfd_create` file sized with `ftruncate` and mapped `MAP_SHARED` two times, side
//! by side in one reservation: the **agent view** (lower addresses) and the **guest view** (right
//! after it). Both map the same page cache, so a byte written through one is read through the other;
//! but each has its own page-table entries. KVM maps the guest view into the guest (its memory slot,
//! [`crate::vm::ram`]); every access of the agent (`read_page`, `write_page`, ...) goes through the
//! agent view. That split is what post-copy needs ([`crate::demand_paging`]): the guest view can be
//! registered with userfaultfd in MINOR mode, so that the guest faults on a page whose content the
//! agent is still replacing through its own view, without the agent ever faulting. A dirty tracker
//! that follows page-table entries (uffd-wp, [`crate::tracking::uffd_wp`]) tracks the guest view:
//! that is where the guest writes. The agent view comes first in `/proc/PID/maps` (lower address), so
//! a tool that reads the first mapping of the memfd from outside reads the agent's, which never waits.
//!
//! Because the guest may write any page at any moment, this type never hands out Rust references
//! into guest memory: every access is a raw-pointer copy (`ptr::copy_nonoverlapping`), which is the
//! only sound way to share bytes with a writer Rust does not know about. A copy taken while the guest
//! writes the same page may be torn; callers that need a stable copy pause the VM or rely on dirty
//! tracking to read the page again.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::ptr::NonNull;

use anyhow::{bail, ensure, Context};
use perfplus_common::PAGE_SIZE;

/// Pages [`GuestMemory::data_page_ranges_in`] counts in one `cachestat(2)` call when it looks for
/// data ranges (2 MiB: a call walks them in ~50 µs when they are all data).
const SCAN_CHUNK_PAGES: u64 = 512;

/// Pages it first counts in one call, to skip a stretch that is all hole at once (128 MiB: ~3 ms when
/// they are all data). Not the whole range: one call over 1 GiB of data walked 262k pages in ~23 ms
/// without a preemption point, and the read-heavy benchmark's guest stalled ~29 ms at every start.
const SCAN_SPAN_PAGES: u64 = 64 * SCAN_CHUNK_PAGES;

/// `cachestat(2)`'s number (the same on every architecture; the libc crate does not name it for
/// x86-64 yet), and its argument and result, as in `<linux/mman.h>`.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Guest physical memory `[0, size)`, backed by a memfd mapped shared twice (the agent's view and the
/// guest's, see the module doc). Safe to share between threads: reads and writes copy bytes with raw
/// pointer copies, as the guest may write any page at any time.
pub struct GuestMemory {
    /// Start of the reservation of `2 * size` bytes: the agent view at `base`, the guest view at
    /// `base + size`, both shared mappings of `file`. Unmapped on drop.
    base: NonNull<u8>,
    /// The memfd; kept open for `cachestat` and `memfd()`.
    file: File,
    size: u64,
}

// SAFETY: `GuestMemory` owns its mappings (nothing else unmaps them while it lives) and only ever
// accesses them with raw-pointer copies, which any thread may make concurrently (the guest does too).
unsafe impl Send for GuestMemory {}
// SAFETY: as above: no method hands out references into the mappings or mutates `self`.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("size", &self.size)
            .field("agent_view", &self.agent_view_addr())
            .field("guest_view", &self.guest_view_addr())
            .finish()
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: the reservation is ours (made in `new`, `2 * size` bytes), and no reference into it
        // exists; whoever maps it elsewhere (a KVM memory slot, a userfaultfd registration) holds an
        // `Arc<GuestMemory>`, so it is gone before this runs.
        unsafe { libc::munmap(self.base.as_ptr().cast(), 2 * self.size as usize) };
    }
}

impl GuestMemory {
    /// Creates zero-filled guest memory of `size_bytes` (a multiple of 4 KiB).
    pub fn new(size_bytes: u64) -> anyhow::Result<Self> {
        ensure!(
            size_bytes > 0 && size_bytes.is_multiple_of(PAGE_SIZE as u64),
            "guest memory size {size_bytes} must be a non-zero multiple of 4 KiB"
        );
        let len = usize::try_from(size_bytes).context("guest memory size does not fit usize")?;
        let reserved = len
            .checked_mul(2)
            .context("guest memory size does not fit usize twice")?;
        let name = c"perfplus-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string and the flags are valid; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create for guest memory");
        }
        // SAFETY: `fd` was just returned by memfd_create, is open and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size_bytes)
            .with_context(|| format!("ftruncate guest memory memfd to {size_bytes} bytes"))?;
        // One reservation for both views, so that their order (agent view first) is known.
        // SAFETY: a new inaccessible anonymous mapping at an address the kernel picks; the result is
        // checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("reserving {reserved} bytes of address space for guest memory"));
        }
        let base = NonNull::new(base.cast::<u8>()).context("mmap returned a null reservation")?;
        let memory = Self {
            base,
            file,
            size: size_bytes,
        };
        for (view, at) in [("agent", 0), ("guest", len)] {
            // SAFETY: MAP_FIXED replaces `len` bytes of our own reservation (`at` + `len` <=
            // `reserved`), which nothing uses yet, with a shared mapping of the memfd.
            let mapped = unsafe {
                libc::mmap(
                    memory.base.as_ptr().add(at).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    memory.file.as_raw_fd(),
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                // `memory` unmaps the whole reservation as it drops.
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("mmap of the {view} view of {size_bytes} bytes of guest memory"));
            }
        }
        Ok(memory)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn page_count(&self) -> u64 {
        self.size() / PAGE_SIZE as u64
    }

    /// Host virtual address of guest physical address 0 in the agent view: what this type reads and
    /// writes.
    pub fn agent_view_addr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Host virtual address of guest physical address 0 in the guest view: for KVM's memory slot, and
    /// for what follows the guest's own accesses (userfaultfd, uffd-wp). Nothing in the agent reads or
    /// writes through it: an access would map the page there (see [`GuestMemory::clear_guest_view`]).
    pub fn guest_view_addr(&self) -> *mut u8 {
        // SAFETY: `base + size` is inside the reservation of `2 * size` bytes.
        unsafe { self.base.as_ptr().add(self.size as usize) }
    }

    /// Drops every page-table entry of the guest view (`MADV_DONTNEED`): the content stays (it is the
    /// memfd's), but the guest's next access to each page faults again, into the kernel, or into
    /// userfaultfd if the view is registered. For the post-copy switch: whatever may have touched the
    /// guest view before, no page of it is mapped then.
    pub fn clear_guest_view(&self) -> anyhow::Result<()> {
        // SAFETY: MADV_DONTNEED on our own shared mapping only drops its page-table entries; the pages
        // stay in the memfd, so nothing any reader sees changes, and no reference into it exists.
        let rc = unsafe { libc::madvise(self.guest_view_addr().cast(), self.size as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("MADV_DONTNEED of the guest view of guest memory");
        }
        Ok(())
    }

    /// The memfd backing the memory (e.g. to map it a second time). Owned by `self`.
    pub fn memfd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Page ranges `[start, end)` of the memfd that hold data. Every page outside them is a hole: never
    /// written by anyone, so all zero, and reading it would only make the kernel allocate memory for it.
    /// A page may turn from hole to data right after the call (the guest runs); callers that must not
    /// miss such a write track dirty pages from before the call.
    pub fn data_page_ranges(&self) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
        self.data_page_ranges_in(0..self.page_count())
    }

    /// [`GuestMemory::data_page_ranges`] within the pages `within` (clipped to them).
    ///
    /// Counted with `cachestat(2)` (Linux 6.5): a [`SCAN_SPAN_PAGES`] stretch first (skipped if all
    /// hole), then its [`SCAN_CHUNK_PAGES`] chunks, halving a chunk that is part data, part hole until
    /// each part is one or the other: no call walks more than a stretch of the page cache.
    /// `lseek(SEEK_HOLE)`, the way of older kernels (the fallback here), walks the
    /// whole run of data it starts in, in one go and without a preemption point: 14 ms for the 65k
    /// data pages of the benchmark's guest, on this machine's kernel (no preemption), during which
    /// the guest's vCPU, when it shared that core, did not run (a 14 ms stall at every migration's
    /// start, measured from outside the guest).
    pub fn data_page_ranges_in(&self, within: std::ops::Range<u64>) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
        let within = within.start.min(self.page_count())..within.end.min(self.page_count());
        match self.data_page_ranges_by_count(within.clone()) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => {
                self.data_page_ranges_by_seek(within)
            }
            other => other.context("finding the data ranges of guest memory (cachestat)"),
        }
    }

    /// [`GuestMemory::data_page_ranges_in`] with `cachestat(2)`; an error of the call as it came.
    fn data_page_ranges_by_count(&self, within: std::ops::Range<u64>) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        let mut span = within.start;
        while span < within.end {
            let span_end = (span + SCAN_SPAN_PAGES).min(within.end);
            // A stretch that is all hole (most of what the pause looks at again) in one call: walking
            // an empty stretch of the page cache costs next to nothing.
            if self.data_pages_in(span..span_end)? > 0 {
                let mut chunk = span;
                while chunk < span_end {
                    let end = (chunk + SCAN_CHUNK_PAGES).min(span_end);
                    self.collect_data(chunk..end, &mut ranges)?;
                    chunk = end;
                }
            }
            span = span_end;
        }
        Ok(ranges)
    }

    /// Appends the data ranges of `pages` to `ranges` (merged with the last one where they touch).
    fn collect_data(&self, pages: std::ops::Range<u64>, ranges: &mut Vec<std::ops::Range<u64>>) -> std::io::Result<()> {
        let data = self.data_pages_in(pages.clone())?;
        let len = pages.end - pages.start;
        if data == 0 {
            return Ok(());
        }
        if data >= len {
            match ranges.last_mut() {
                Some(last) if last.end == pages.start => last.end = pages.end,
                _ => ranges.push(pages),
            }
            return Ok(());
        }
        // Part data, part hole (so two pages or more): each half on its own.
        let middle = pages.start + len / 2;
        self.collect_data(pages.start..middle, ranges)?;
        self.collect_data(middle..pages.end, ranges)
    }

    /// How many pages of `pages` (not empty) hold data: in memory, or swapped out (`cachestat` counts
    /// a swapped-out page of shared memory as evicted; it holds data all the same).
    fn data_pages_in(&self, pages: std::ops::Range<u64>) -> std::io::Result<u64> {
        let page = PAGE_SIZE as u64;
        let range = CachestatRange {
            off: pages.start * page,
            len: (pages.end - pages.start) * page,
        };
        let mut stat = Cachestat::default();
        // SAFETY: cachestat(2) reads `range` and writes one `struct cachestat` to `stat`, both live
        // and laid out as the kernel's (`#[repr(C)]`, five and two u64s); the fd is this struct's.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.memfd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stat.nr_cache + stat.nr_evicted)
    }

    /// [`GuestMemory::data_page_ranges_in`] with `lseek(SEEK_DATA / SEEK_HOLE)`, for kernels without
    /// `cachestat(2)`.
    fn data_page_ranges_by_seek(&self, within: std::ops::Range<u64>) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
        let fd = self.memfd();
        let page = PAGE_SIZE as libc::off_t;
        let size = (within.end.min(self.page_count()) as libc::off_t) * page;
        let mut ranges = Vec::new();
        let mut offset: libc::off_t = within.start as libc::off_t * page;
        while offset < size {
            // SAFETY: lseek on an fd this struct owns; it only moves the file offset.
            let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data past `offset`
                }
                return Err(err).context("finding the data ranges of guest memory (SEEK_DATA)");
            }
            if data >= size {
                break; // the next data lies past `within`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error()).context("SEEK_HOLE on guest memory");
            }
            let hole = hole.min(size);
            ranges.push((data / page) as u64..(hole as u64).div_ceil(PAGE_SIZE as u64));
            offset = hole;
        }
        Ok(ranges)
    }

    /// Copies page `page` out. Panics if `page >= page_count()`.
    pub fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) {
        assert!(
            page < self.page_count(),
            "guest page {page} outside memory of {} pages",
            self.page_count()
        );
        // SAFETY: the page lies inside the mapping (checked above), `out` is a distinct Rust buffer of
        // PAGE_SIZE bytes; the source may change concurrently (guest writes) which only affects the
        // values copied, not memory safety, as u8 has no invalid bit patterns.
        unsafe { self.copy_out(page * PAGE_SIZE as u64, out) }
    }

    /// Overwrites page `page`. Panics if `page >= page_count()`.
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE]) {
        assert!(
            page < self.page_count(),
            "guest page {page} outside memory of {} pages",
            self.page_count()
        );
        // SAFETY: the page lies inside the mapping (checked above) and `data` is a distinct buffer; no
        // Rust reference into guest memory exists, so writing through the raw pointer aliases nothing.
        unsafe { self.copy_in(page * PAGE_SIZE as u64, data) }
    }

    /// Copies `out.len()` bytes at `gpa` out; error if the range is outside memory.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> anyhow::Result<()> {
        self.check_range(gpa, out.len())?;
        // SAFETY: the range was checked to lie inside the mapping; see `read_page`.
        unsafe { self.copy_out(gpa, out) };
        Ok(())
    }

    /// Writes `data` at `gpa`; error if the range is outside memory.
    pub fn write(&self, gpa: u64, data: &[u8]) -> anyhow::Result<()> {
        self.check_range(gpa, data.len())?;
        // SAFETY: the range was checked to lie inside the mapping; see `write_page`.
        unsafe { self.copy_in(gpa, data) };
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with zeroes; error if the range is outside memory.
    pub fn zero(&self, gpa: u64, len: u64) -> anyhow::Result<()> {
        let len_usize = usize::try_from(len).context("length does not fit usize")?;
        self.check_range(gpa, len_usize)?;
        // SAFETY: the range was checked to lie inside the mapping; no Rust reference into it exists.
        unsafe { std::ptr::write_bytes(self.agent_view_addr().add(gpa as usize), 0, len_usize) };
        Ok(())
    }

    /// Reads a little-endian `u64` at `gpa` with one aligned load when `gpa` is 8-byte aligned (so
    /// that a value the guest writes concurrently is never torn).
    pub fn read_u64(&self, gpa: u64) -> anyhow::Result<u64> {
        self.check_range(gpa, 8)?;
        // SAFETY: the 8 bytes lie inside the mapping (checked); a volatile read of a u64 from shared
        // memory is sound for any bit pattern; unaligned addresses use read_unaligned.
        let value = unsafe {
            let ptr = self.agent_view_addr().add(gpa as usize) as *const u64;
            if gpa.is_multiple_of(8) {
                std::ptr::read_volatile(ptr)
            } else {
                std::ptr::read_unaligned(ptr)
            }
        };
        Ok(u64::from_le(value))
    }

    /// Writes a little-endian `u64` at `gpa` with one aligned store when `gpa` is 8-byte aligned.
    pub fn write_u64(&self, gpa: u64, value: u64) -> anyhow::Result<()> {
        self.check_range(gpa, 8)?;
        // SAFETY: the 8 bytes lie inside the mapping (checked); see `read_u64`.
        unsafe {
            let ptr = self.agent_view_addr().add(gpa as usize) as *mut u64;
            if gpa.is_multiple_of(8) {
                std::ptr::write_volatile(ptr, value.to_le())
            } else {
                std::ptr::write_unaligned(ptr, value.to_le())
            }
        };
        Ok(())
    }

    fn check_range(&self, gpa: u64, len: usize) -> anyhow::Result<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => bail!(
                "guest range [{gpa:#x}, +{len:#x}) outside guest memory of {:#x} bytes",
                self.size
            ),
        }
    }

    /// # Safety
    /// `[gpa, gpa + out.len())` must lie inside the mapping.
    unsafe fn copy_out(&self, gpa: u64, out: &mut [u8]) {
        // SAFETY: guaranteed by the caller; source (shared mapping) and destination (Rust buffer)
        // cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.agent_view_addr().add(gpa as usize), out.as_mut_ptr(), out.len()) }
    }

    /// # Safety
    /// `[gpa, gpa + data.len())` must lie inside the mapping.
    unsafe fn copy_in(&self, gpa: u64, data: &[u8]) {
        // SAFETY: the range is inside the mapping (caller's guarantee); `data` is a Rust slice and this
        // module never creates slices into guest memory, so source and destination do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.agent_view_addr().add(gpa as usize), data.len()) }
    }
}

// The fault thread, the pushers and the vCPUs share one; this assertion keeps the impls above.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GuestMemory>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_cover_exactly_the_written_pages() {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        assert_eq!(mem.data_page_ranges().unwrap(), vec![], "fresh memory is one hole");
        let page = [7u8; PAGE_SIZE];
        for p in [3, 4, 5, 40, 63] {
            mem.write_page(p, &page);
        }
        assert_eq!(mem.data_page_ranges().unwrap(), vec![3..6, 40..41, 63..64]);
        // Within a part of memory: clipped to it, nothing from outside.
        assert_eq!(mem.data_page_ranges_in(4..41).unwrap(), vec![4..6, 40..41]);
        assert_eq!(mem.data_page_ranges_in(6..40).unwrap(), vec![], "a hole stays a hole");
        assert_eq!(mem.data_page_ranges_in(41..64).unwrap(), vec![63..64]);
    }

    #[test]
    fn counting_and_seeking_find_the_same_data_ranges() {
        // Across several scan chunks, with runs that start and end inside chunks and on their edges.
        let pages = 5 * SCAN_CHUNK_PAGES + 77;
        let mem = GuestMemory::new(pages * PAGE_SIZE as u64).unwrap();
        let page = [1u8; PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut written = std::collections::BTreeSet::new();
        for run in [0..3, 511..513, 1024..1536, 1600..2100, 2100..2101, pages - 2..pages] {
            written.extend(run);
        }
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            written.insert(x % pages);
        }
        for &p in &written {
            mem.write_page(p, &page);
        }
        let counted = mem.data_page_ranges_by_count(0..pages).unwrap();
        let covered: std::collections::BTreeSet<u64> = counted.iter().cloned().flatten().collect();
        assert_eq!(covered, written, "exactly the written pages");
        assert!(
            counted.windows(2).all(|w| w[0].end < w[1].start),
            "merged where they touch: {counted:?}"
        );
        for within in [0..pages, 1..pages - 1, 500..1030, 2100..2101, 3000..3000] {
            assert_eq!(
                mem.data_page_ranges_by_count(within.clone()).unwrap(),
                mem.data_page_ranges_by_seek(within.clone()).unwrap(),
                "{within:?}"
            );
        }
    }

    #[test]
    fn the_two_views_share_their_pages() {
        let mem = GuestMemory::new(8 * PAGE_SIZE as u64).unwrap();
        let (agent, guest) = (mem.agent_view_addr(), mem.guest_view_addr());
        assert_eq!(
            guest as usize,
            agent as usize + 8 * PAGE_SIZE,
            "the agent view comes first"
        );
        mem.write_page(2, &[5; PAGE_SIZE]);
        // SAFETY: inside the guest view; raw accesses, no reference.
        unsafe {
            assert_eq!(guest.add(2 * PAGE_SIZE + 7).read_volatile(), 5);
            guest.add(3 * PAGE_SIZE).write_volatile(9);
        }
        let mut page = [0u8; PAGE_SIZE];
        mem.read_page(3, &mut page);
        assert_eq!(page[0], 9, "a write through the guest view is read through the agent's");
        mem.clear_guest_view().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { guest.add(3 * PAGE_SIZE).read_volatile() }, 9, "content stays");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let views: Vec<&str> = maps
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{:x}-", agent as usize)) || l.starts_with(&format!("{:x}-", guest as usize))
            })
            .collect();
        assert_eq!(views.len(), 2, "{views:?}");
        assert!(
            views
                .iter()
                .all(|l| l.contains("rw-s") && l.contains("perfplus-guest-ram")),
            "{views:?}"
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(GuestMemory::new(0).is_err());
        assert!(GuestMemory::new(4097).is_err());
    }

    #[test]
    fn starts_zeroed_and_round_trips() {
        let mem = GuestMemory::new(16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(mem.page_count(), 16);
        let mut page = [0xaau8; PAGE_SIZE];
        mem.read_page(3, &mut page);
        assert!(page.iter().all(|&b| b == 0));
        let data = [0x5au8; PAGE_SIZE];
        mem.write_page(15, &data);
        mem.read_page(15, &mut page);
        assert_eq!(page, data);
        mem.write(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        mem.read(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        mem.write_u64(0x2000, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.read_u64(0x2000).unwrap(), 0x1122_3344_5566_7788);
        mem.zero(100, 5).unwrap();
        mem.read(100, &mut out).unwrap();
        assert_eq!(out, [0; 5]);
    }

    #[test]
    fn bounds_are_checked() {
        let mem = GuestMemory::new(4 * PAGE_SIZE as u64).unwrap();
        let mut buf = [0u8; 8];
        assert!(mem.read(4 * PAGE_SIZE as u64 - 8, &mut buf).is_ok());
        assert!(mem.read(4 * PAGE_SIZE as u64 - 7, &mut buf).is_err());
        assert!(mem.write(u64::MAX - 2, &buf).is_err());
        assert!(mem.read_u64(4 * PAGE_SIZE as u64).is_err());
        assert!(mem.zero(0, 4 * PAGE_SIZE as u64 + 1).is_err());
    }

    #[test]
    #[should_panic(expected = "outside memory")]
    fn read_page_out_of_range_panics() {
        let mem = GuestMemory::new(4 * PAGE_SIZE as u64).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        mem.read_page(4, &mut page);
    }

    #[test]
    fn shared_between_threads() {
        let mem = std::sync::Arc::new(GuestMemory::new(4 * PAGE_SIZE as u64).unwrap());
        let writer = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.write_page(1, &[7; PAGE_SIZE]))
        };
        writer.join().unwrap();
        let mut page = [0u8; PAGE_SIZE];
        mem.read_page(1, &mut page);
        assert_eq!(page[4095], 7);
    }
}
