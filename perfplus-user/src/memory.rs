//! Guest RAM: one memfd, mapped shared into the agent, handed to KVM as a memory slot.
//! (API skeleton; the VMM work fills it in.)
use perfplus_common::PAGE_SIZE;

/// Guest physical memory `[0, size)`, backed by a memfd and mapped shared (so that another mapping of
/// the same file, e.g. KVM's, sees the same pages). Safe to share between threads: reads and writes
/// copy bytes with raw pointer copies, as the guest may write any page at any time.
pub struct GuestMemory {
    _private: (),
}

impl GuestMemory {
    /// Creates zero-filled guest memory of `size_bytes` (a multiple of 4 KiB).
    pub fn new(_size_bytes: u64) -> anyhow::Result<Self> {
        anyhow::bail!("not yet")
    }
    pub fn size(&self) -> u64 {
        0
    }
    pub fn page_count(&self) -> u64 {
        self.size() / PAGE_SIZE as u64
    }
    /// Host virtual address of guest physical address 0.
    pub fn host_addr(&self) -> *mut u8 {
        std::ptr::null_mut()
    }
    /// Copies page `page` out. Panics if `page >= page_count()`.
    pub fn read_page(&self, _page: u64, _out: &mut [u8; PAGE_SIZE]) {}
    /// Overwrites page `page`. Panics if `page >= page_count()`.
    pub fn write_page(&self, _page: u64, _data: &[u8; PAGE_SIZE]) {}
    /// Copies `out.len()` bytes at `gpa` out; error if the range is outside memory.
    pub fn read(&self, _gpa: u64, _out: &mut [u8]) -> anyhow::Result<()> {
        Ok(())
    }
    /// Writes `data` at `gpa`; error if the range is outside memory.
    pub fn write(&self, _gpa: u64, _data: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}
