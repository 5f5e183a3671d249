//! The KVM interfaces `kvm-ioctls` 0.25 does not wrap, in its style (one typed safe function per
//! ioctl on the fd type it belongs to, the `unsafe` call inside with its reasoning):
//!
//! | interface | fd | here |
//! |---|---|---|
//! | `KVM_CLEAR_DIRTY_LOG` | VM | [`clear_dirty_log`] |
//! | `KVM_RESET_DIRTY_RINGS` | VM | [`reset_dirty_rings`] |
//! | the dirty ring, `mmap` at page `KVM_DIRTY_LOG_PAGE_OFFSET` | vCPU | [`DirtyRingMap`] |
//!
//! Everything else (creating VMs and vCPUs, memory slots, `KVM_GET_DIRTY_LOG`, `KVM_ENABLE_CAP`,
//! register state) comes from `kvm-ioctls` itself. The structures are `kvm-bindings`' (generated from
//! the uapi header); the ioctl numbers are checked against the kernel's in the tests.
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

/// `KVMIO`: the ioctl type of every KVM ioctl (include/uapi/linux/kvm.h).
pub const KVMIO: u32 = 0xAE;

// _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log).
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
// _IO(KVMIO, 0xc7).
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM pushed the entry (the header defines it with `_BITUL`, which
/// `kvm-bindings` does not carry).
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested the entry; `KVM_RESET_DIRTY_RINGS` may recycle it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// `KVM_CLEAR_DIRTY_LOG` on `vm`: clears the dirty bits of pages `[first_page, first_page +
/// num_pages)` of memory slot `slot` that are set in `bitmap` (bit `i` is page `first_page + i`) and
/// write-protects those pages again (with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled).
///
/// KVM wants `first_page` to be a multiple of 64 and `num_pages` too unless the range ends at the
/// end of the slot (EINVAL otherwise). `bitmap` must hold at least `num_pages` bits (InvalidInput
/// otherwise, before any call).
pub fn clear_dirty_log(vm: &VmFd, slot: u32, first_page: u64, num_pages: u32, bitmap: &[u64]) -> io::Result<()> {
    if (num_pages as usize).div_ceil(64) > bitmap.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "KVM_CLEAR_DIRTY_LOG: a bitmap of {} words for {num_pages} pages",
                bitmap.len()
            ),
        ));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads one `struct kvm_clear_dirty_log` (`arg`, kvm-bindings' type
    // for it, whose size is encoded in the ioctl number) and then `num_pages` bits at its bitmap
    // pointer, which points at `bitmap`: checked above to hold at least that many bits, borrowed
    // for the call. KVM only reads the bitmap (the uapi struct just does not say `const`) and
    // changes no memory of ours, only the write protection of guest pages. `vm` is a VM fd.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS` on `vm`: for every vCPU's ring, recycles the entries userspace marked
/// `KVM_DIRTY_GFN_F_RESET` (in order, stopping at the first that is not) and write-protects their
/// pages again. Returns how many entries were reset. EINVAL if the VM has no dirty rings.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; it reads the rings' shared entries (memory
    // KVM allocated and owns; our mappings of it are only accessed atomically or per the
    // `DirtyRingMap::gfn` contract) and writes none of our memory. `vm` is a VM fd.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u32)
}

/// One vCPU's dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): `entries` × `struct kvm_dirty_gfn
/// {u32 flags; u32 slot; u64 offset}` mapped shared from the vCPU fd at page offset
/// `KVM_DIRTY_LOG_PAGE_OFFSET` (64); unmapped on drop.
///
/// KVM writes an entry, then stores its `flags` with release semantics; userspace reads `flags`
/// with acquire ([`DirtyRingMap::flags`]), then the frame ([`DirtyRingMap::gfn`]), then stores
/// `KVM_DIRTY_GFN_F_RESET` with release and calls [`reset_dirty_rings`]. Indices wrap: entry `i`
/// is entry `i % entries`.
#[derive(Debug)]
pub struct DirtyRingMap {
    ring: NonNull<kvm_dirty_gfn>,
    entries: u32,
}

// SAFETY: the mapping belongs to this value alone (unmapped only in Drop); what it exposes is an
// `&AtomicU32` per entry (safe to use from any thread) and `gfn`, whose contract makes its reads
// race-free whatever thread calls it.
unsafe impl Send for DirtyRingMap {}
// SAFETY: as for Send: `&self` gives only atomic access to the shared flags, or the `gfn` reads
// whose contract excludes concurrent writes.
unsafe impl Sync for DirtyRingMap {}

impl DirtyRingMap {
    /// Maps the dirty ring of `vcpu` (`entries * 16` bytes; `entries` a power of two).
    ///
    /// # Safety
    ///
    /// `vcpu`'s VM enabled its dirty ring with exactly `entries` entries (`KVM_ENABLE_CAP` of
    /// `KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]` with `entries * 16` bytes). KVM cannot be asked for the
    /// size, and the `mmap` itself succeeds whatever it is (even with no ring at all); but pages
    /// past the real ring are not backed, and the first access to one raises SIGBUS.
    pub unsafe fn new(vcpu: &VcpuFd, entries: u32) -> io::Result<Self> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        if entries == 0 || !entries.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty ring of {entries} entries: not a power of two"),
            ));
        }
        let page = 4096i64;
        // SAFETY: maps `bytes` of the vCPU fd, shared, at the page offset KVM documents for the
        // dirty ring (the caller guarantees KVM backs all of them); a new mapping at an address the
        // kernel picks aliases no Rust object. The result is checked; on success it is `bytes` long
        // and page-aligned (so every entry is aligned).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = NonNull::new(addr.cast::<kvm_dirty_gfn>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ring, entries })
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        // In bounds: the index is reduced modulo the number of entries the mapping holds.
        self.ring.as_ptr().wrapping_add((index % self.entries) as usize)
    }

    /// The `flags` of entry `index`, shared with KVM (which stores it with release semantics): read
    /// it with acquire, store `KVM_DIRTY_GFN_F_RESET` with release.
    pub fn flags(&self, index: u32) -> &AtomicU32 {
        // SAFETY: the entry is inside the mapping (`entry` reduces the index) and `flags`, a u32 at
        // offset 0 of a 16-byte entry of a page-aligned mapping, is 4-aligned; the mapping lives as
        // long as `self`, which the returned reference borrows. KVM accesses it only atomically
        // (READ_ONCE / smp_store_release), so every access is atomic.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.entry(index)).flags) }
    }

    /// `(slot, offset)` of entry `index`: the memory slot and the page in it that was dirtied.
    ///
    /// # Safety
    ///
    /// The caller saw `KVM_DIRTY_GFN_F_DIRTY` in this entry's [`flags`](Self::flags) with an acquire
    /// load and has not handed the entry back since (stored `KVM_DIRTY_GFN_F_RESET` and called
    /// [`reset_dirty_rings`]): KVM does not write the entry in that time, so this read does not race.
    pub unsafe fn gfn(&self, index: u32) -> (u32, u64) {
        let entry = self.entry(index);
        // SAFETY: inside the mapping and aligned (see `flags`); the caller's contract orders these
        // plain reads after KVM's writes of the entry and before any later one.
        unsafe { ((*entry).slot, (*entry).offset) }
    }
}

impl Drop for DirtyRingMap {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping made in `new`; no reference into it outlives `self`
        // (`flags` borrows `self`).
        unsafe { libc::munmap(self.ring.as_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{
        kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
    };
    use kvm_ioctls::Kvm;
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn layouts_match_the_kernel_uapi() {
        // The numbers include/uapi/linux/kvm.h gives (the size of kvm_clear_dirty_log is 24).
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
        assert_eq!(std::mem::size_of::<kvm_dirty_gfn>(), 16);
        assert_eq!(std::mem::offset_of!(kvm_dirty_gfn, flags), 0);
    }

    /// A VM with a 64-page slot 0 over `memory`, dirty logging on, manual protection enabled.
    fn vm_with_logged_slot(kvm: &Kvm, memory: &memmap2::MmapMut) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: memory.len() as u64,
            userspace_addr: memory.as_ptr() as u64,
        };
        // SAFETY: `memory` outlives the VM in every caller (declared before it, dropped after it).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        vm
    }

    #[test]
    fn the_kernel_accepts_clear_dirty_log() {
        let kvm = Kvm::new().unwrap();
        let memory = memmap2::MmapMut::map_anon(128 * 4096).unwrap();
        let vm = vm_with_logged_slot(&kvm, &memory);
        clear_dirty_log(&vm, 0, 0, 64, &[u64::MAX]).unwrap();
        // The last 64 pages, ending at the end of the slot.
        clear_dirty_log(&vm, 0, 64, 64, &[1]).unwrap();
        // Too short a bitmap is refused here, before KVM would read past it.
        let err = clear_dirty_log(&vm, 0, 0, 128, &[0]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        // KVM's own checks: an unaligned first page, a slot that does not exist.
        let err = clear_dirty_log(&vm, 0, 1, 64, &[0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        let err = clear_dirty_log(&vm, 7, 0, 64, &[0]).unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
        // No dirty rings on this VM.
        let err = reset_dirty_rings(&vm).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn the_kernel_accepts_the_dirty_ring_calls() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let entries = 4096u32;
        let cap = if vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) > 0 {
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            KVM_CAP_DIRTY_LOG_RING
        };
        let enable = kvm_enable_cap {
            cap,
            args: [u64::from(entries) * 16, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&enable).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // SAFETY: the VM's ring was enabled with `entries` entries just above.
        let ring = unsafe { DirtyRingMap::new(&vcpu, entries) }.unwrap();
        assert_eq!(ring.entries(), entries);
        // A fresh ring: no entry pushed; index `entries` is entry 0 again.
        assert_eq!(ring.flags(0).load(Ordering::Acquire), 0);
        assert_eq!(ring.flags(entries).load(Ordering::Acquire), 0);
        assert_eq!(ring.flags(entries - 1).load(Ordering::Acquire), 0);
        assert_eq!(reset_dirty_rings(&vm).unwrap(), 0, "nothing to reset");
        // SAFETY: refused before anything is mapped.
        let refused = unsafe { DirtyRingMap::new(&vcpu, 1000) };
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
