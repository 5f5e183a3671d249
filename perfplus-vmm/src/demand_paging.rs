//! Guest RAM under userfaultfd (MISSING and MINOR modes on the guest view): the destination's side of
//! demand paging.
//!
//! Guest memory is one memfd mapped twice ([`crate::memory`]): the guest view, which KVM maps into the
//! guest, and the agent view, which the agent reads and writes. Only the guest view is registered, in
//! both modes at once:
//! - **MISSING**: a guest access (KVM, code fetch included) to a page that is not in the memfd at all
//!   (a hole) stops the accessing thread in the kernel and queues a fault message. The page is then
//!   installed atomically with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which also wakes every thread
//!   waiting on it ([`GuestUffd::copy`], [`GuestUffd::zero`]).
//! - **MINOR**: an access to a page that *is* in the memfd's page cache but has no page-table entry in
//!   the guest view faults the same way (the message carries `UFFD_PAGEFAULT_FLAG_MINOR`). Mapping it
//!   with `UFFDIO_CONTINUE` lets the guest on, with whatever the page cache holds by then: the agent
//!   may first replace the content through its own view, which nothing registers
//!   ([`GuestUffd::replace`], [`GuestUffd::map`]).
//!
//! So pages that hold stale content (sent in pre-copy, dirtied since) need no work at the switch: at
//! registration the guest view has no page-table entries ([`GuestUffd::register`] drops any), so the
//! guest faults on every page it touches, a page whose content is current is mapped as it is, and a
//! stale one is rewritten before it is mapped. The guest never sees the stale bytes. (Before this,
//! each stale run was punched out of the memfd with `fallocate(PUNCH_HOLE)` while the guest was
//! paused: 5-14 µs a run, 40 ms of a 70 ms downtime.)
//!
//! Nothing may write the guest view with plain stores while it is registered: a store to an unmapped
//! page would itself fault (and wait for this module's caller). The agent view never faults.
//!
//! `UFFD_USER_MODE_ONLY` must stay off: KVM's own accesses to guest memory come from the kernel.
//! The ioctls are [`crate::sys::userfaultfd`]'s (whose fd never has it).
use std::sync::Arc;

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;

use crate::memory::GuestMemory;
use crate::sys::userfaultfd::{
    Userfaultfd, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFD_FEATURE_MINOR_SHMEM,
    UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WRITE,
};

/// A uffd with the whole guest view of one guest memory registered in MISSING and MINOR modes.
pub struct GuestUffd {
    uffd: Userfaultfd,
    memory: Arc<GuestMemory>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    // The fault thread and the page pushers share one GuestUffd.
    assert_send_sync::<GuestUffd>();
};

/// Outcome of installing a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The page was missing (or unmapped) and now holds the data, mapped in the guest view.
    New,
    /// [`GuestUffd::copy`], [`GuestUffd::zero`]: the page was in the memfd already (in its page cache,
    /// mapped or not), nothing was written. [`GuestUffd::replace`]: the guest view mapped the page
    /// already; the data was written all the same.
    AlreadyPresent,
}

/// A fault on the guest view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The guest page.
    pub page: u64,
    /// A MINOR fault: the page is in the memfd's page cache, unmapped in the guest view. Otherwise a
    /// MISSING fault: the page is a hole of the memfd.
    pub minor: bool,
    /// The access was a write.
    pub write: bool,
}

impl GuestUffd {
    /// Creates a uffd and registers all of `memory`'s guest view in MISSING and MINOR modes, then drops
    /// every page-table entry of the guest view, so that from here on every guest access to a page
    /// faults until this module maps it. The agent view is not touched.
    pub fn register(memory: Arc<GuestMemory>) -> anyhow::Result<GuestUffd> {
        // Close-on-exec and non-blocking; not user-mode-only: KVM touches guest memory from kernel
        // mode, and user-mode-only faults would break KVM_RUN. MINOR mode on a memfd needs
        // MINOR_SHMEM; no other feature: only fault messages.
        let uffd = Userfaultfd::open()
            .and_then(|uffd| uffd.api(UFFD_FEATURE_MINOR_SHMEM).map(|_| uffd))
            .context(
                "creating a userfaultfd with MINOR_SHMEM (needs root or vm.unprivileged_userfaultfd=1, and Linux 5.14)",
            )?;
        uffd.register(
            memory.guest_view_addr() as u64,
            memory.size(),
            UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
        )
        .context("registering guest memory's guest view with userfaultfd (MISSING | MINOR mode)")?;
        // Registered first: a page-table entry made before the registration (anything that touched the
        // guest view) would let the guest read a stale page without a fault. After it, only this
        // module's ioctls make entries.
        memory.clear_guest_view()?;
        Ok(GuestUffd { uffd, memory })
    }

    fn addr(&self, page: u64) -> u64 {
        assert!(page < self.memory.page_count(), "page {page} outside guest memory");
        // The offset is inside the guest view (checked above).
        self.memory.guest_view_addr() as u64 + page * PAGE_SIZE as u64
    }

    /// Installs `data` at `page`, a hole of the memfd, and wakes whoever waits on it.
    /// `AlreadyPresent` (nothing written) if the page is in the memfd already.
    pub fn copy(&self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<Installed> {
        let dst = self.addr(page);
        loop {
            // SAFETY: `dst` is a page-aligned page inside the registered guest view (checked in
            // `addr`), `data` is a distinct PAGE_SIZE buffer; UFFDIO_COPY writes only a page that is
            // not in the memfd yet, atomically, and no Rust reference points into guest memory
            // (`GuestMemory` copies through raw pointers only).
            match unsafe { self.uffd.copy(dst, data, true) } {
                Ok(n) if n == PAGE_SIZE as u64 => return Ok(Installed::New),
                Ok(n) => bail!("UFFDIO_COPY of guest page {page}: copied {n} of {PAGE_SIZE} bytes"),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(Installed::AlreadyPresent),
                // The address space changed under the copy; nothing was installed, try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => bail!("UFFDIO_COPY of guest page {page}: {e}"),
            }
        }
    }

    /// Installs a zero page at `page`, a hole of the memfd, and wakes whoever waits on it.
    /// `AlreadyPresent` (nothing written) if the page is in the memfd already.
    pub fn zero(&self, page: u64) -> anyhow::Result<Installed> {
        let dst = self.addr(page);
        // SAFETY: `dst` is a page-aligned page inside the registered guest view; UFFDIO_ZEROPAGE only
        // installs zeroes in a page not in the memfd yet, and no Rust reference points into guest
        // memory (see `copy`).
        match unsafe { self.uffd.zeropage(dst, PAGE_SIZE as u64, true) } {
            Ok(_) => Ok(Installed::New),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Installed::AlreadyPresent),
            // Some memory kinds lack UFFDIO_ZEROPAGE: copy zeroes instead.
            Err(_) => self.copy(page, &[0; PAGE_SIZE]),
        }
    }

    /// Replaces the content of `page` with `data` and maps it in the guest view, waking whoever waits
    /// on it: for a page the guest view has not mapped (in the page cache with stale content, or a
    /// hole). The data goes into the page cache through the agent view, which faults on nothing, then
    /// `UFFDIO_CONTINUE` maps the page: the guest, which has no entry for the page until then, only
    /// ever reads `data`. `AlreadyPresent` if the guest view mapped the page already (the data is
    /// written all the same, but the guest may have read the old content: a caller's bug).
    pub fn replace(&self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<Installed> {
        self.memory.write_page(page, data);
        Ok(match self.map(page, 1)? {
            1 => Installed::New,
            _ => Installed::AlreadyPresent,
        })
    }

    /// Maps up to `count` pages from `first` in the guest view with one `UFFDIO_CONTINUE` (to what the
    /// page cache holds for them) and wakes whoever waits on the pages it mapped. Returns how many it
    /// mapped, from `first` on: fewer than `count` if it stopped at a page already mapped (or at a
    /// hole), 0 if `first` is mapped already. Fails if `first` is a hole of the memfd (not in the page
    /// cache: nothing to map) or outside the registered range. Every page of the range must be one
    /// whose content the guest may see now.
    pub fn map(&self, first: u64, count: u64) -> anyhow::Result<u64> {
        assert!(
            count > 0
                && first
                    .checked_add(count)
                    .is_some_and(|end| end <= self.memory.page_count()),
            "pages [{first}, +{count}) outside guest memory"
        );
        let start = self.addr(first);
        loop {
            // SAFETY: the range is inside the registered guest view (checked above), page-aligned;
            // UFFDIO_CONTINUE only maps pages of the page cache there, and no Rust reference points
            // into guest memory (see `copy`). Which content that exposes is the caller's contract.
            match unsafe { self.uffd.continue_range(start, count * PAGE_SIZE as u64, true) } {
                Ok(bytes) => return Ok(bytes / PAGE_SIZE as u64),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(0),
                // The address space changed under the call; nothing was mapped, try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    bail!("UFFDIO_CONTINUE of guest pages [{first}, +{count}): page {first} is a hole (EFAULT)")
                }
                Err(e) => bail!("UFFDIO_CONTINUE of guest pages [{first}, +{count}): {e}"),
            }
        }
    }

    /// Wakes threads waiting on `page` (for a fault whose page became mapped meanwhile).
    pub fn wake(&self, page: u64) {
        if let Err(e) = self.uffd.wake(self.addr(page), PAGE_SIZE as u64) {
            tracing::debug!("UFFDIO_WAKE of page {page}: {e}");
        }
    }

    /// Waits up to `timeout_ms` for a fault; returns its page (see [`GuestUffd::next_fault_kind`] for
    /// whether it was MISSING or MINOR).
    pub fn next_fault(&self, timeout_ms: i32) -> anyhow::Result<Option<u64>> {
        Ok(self.next_fault_kind(timeout_ms)?.map(|fault| fault.page))
    }

    /// Waits up to `timeout_ms` for a fault; returns it.
    pub fn next_fault_kind(&self, timeout_ms: i32) -> anyhow::Result<Option<Fault>> {
        match self.uffd.wait_readable(timeout_ms) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e).context("poll on the userfaultfd"),
        }
        match self.uffd.read_msg() {
            Ok(Some(msg)) => match msg.pagefault() {
                Some(fault) => {
                    let offset = fault.address.wrapping_sub(self.memory.guest_view_addr() as u64);
                    if offset >= self.memory.size() {
                        bail!("userfaultfd fault at {:#x}, outside guest memory", fault.address);
                    }
                    Ok(Some(Fault {
                        page: offset / PAGE_SIZE as u64,
                        minor: fault.flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                        write: fault.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    }))
                }
                None => {
                    tracing::debug!("userfaultfd event ignored: {msg:?}");
                    Ok(None)
                }
            },
            Ok(None) => Ok(None),
            Err(e) => bail!("reading the userfaultfd: {e}"),
        }
    }

    /// Unregisters the guest view: from now on its unmapped pages fault in as usual (holes as zero
    /// pages, cached pages as they are). Only for when every page holds its content.
    pub fn unregister(&self) -> anyhow::Result<()> {
        self.uffd
            .unregister(self.memory.guest_view_addr() as u64, self.memory.size())
            .context("unregistering guest memory from userfaultfd")
    }
}

/// Drops pages `[first, first + count)` from `memory`'s memfd, so that they are holes (while the guest
/// view is registered they fault MISSING; unregistered they read as zero). The post-copy switch does
/// not need it any more (stale pages stay in the page cache, unmapped); kept for the post-copy
/// benchmark's floor, which makes every page a hole.
pub fn punch_pages(memory: &GuestMemory, first: u64, count: u64) -> anyhow::Result<()> {
    let offset = first * PAGE_SIZE as u64;
    let len = count * PAGE_SIZE as u64;
    anyhow::ensure!(offset + len <= memory.size(), "punching pages outside guest memory");
    // SAFETY: fallocate on the memfd we own, inside its size; it changes file content only (no Rust
    // references into the mappings exist).
    let rc = unsafe {
        libc::fallocate(
            memory.memfd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("dropping guest pages [{first}, +{count}) (fallocate PUNCH_HOLE)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads byte 100 of `page` through the guest view (as the guest would), on a thread.
    fn guest_reader(memory: &Arc<GuestMemory>, page: u64) -> std::thread::JoinHandle<u8> {
        let addr = memory.guest_view_addr() as usize + page as usize * PAGE_SIZE + 100;
        let memory = memory.clone();
        std::thread::spawn(move || {
            // SAFETY: inside the guest view, which `memory` keeps mapped until the thread ends; a
            // raw read, no reference.
            let value = unsafe { (addr as *const u8).read_volatile() };
            drop(memory);
            value
        })
    }

    fn fault(uffd: &GuestUffd) -> Fault {
        loop {
            if let Some(fault) = uffd.next_fault_kind(1000).unwrap() {
                return fault;
            }
        }
    }

    #[test]
    fn faults_wait_until_a_page_is_installed_or_mapped() {
        let memory = Arc::new(GuestMemory::new(16 * PAGE_SIZE as u64).unwrap());
        for page in [3, 4, 5, 6, 13, 14] {
            memory.write_page(page, &[7; PAGE_SIZE]); // pre-copy: in the page cache
        }
        // Something touched the guest view before the switch: registering drops that mapping.
        let mut out = [0u8; PAGE_SIZE];
        // SAFETY: inside the guest view, unregistered yet: a plain raw read, no reference.
        let before = unsafe { memory.guest_view_addr().add(3 * PAGE_SIZE).read_volatile() };
        assert_eq!(before, 7);
        let uffd = Arc::new(GuestUffd::register(memory.clone()).unwrap());
        assert_eq!(uffd.next_fault(0).unwrap(), None, "no fault yet");

        // A stale page (3): a minor fault; the new content replaces the old before the guest sees it.
        let reader = guest_reader(&memory, 3);
        assert_eq!(
            fault(&uffd),
            Fault {
                page: 3,
                minor: true,
                write: false
            }
        );
        assert_eq!(uffd.replace(3, &[9; PAGE_SIZE]).unwrap(), Installed::New);
        assert_eq!(
            reader.join().unwrap(),
            9,
            "the reader saw the new page, not the stale one"
        );
        assert_eq!(uffd.replace(3, &[9; PAGE_SIZE]).unwrap(), Installed::AlreadyPresent);

        // A current page (4): mapped as it is, with its neighbours in one call.
        let reader = guest_reader(&memory, 4);
        assert_eq!(fault(&uffd).page, 4);
        assert_eq!(uffd.map(4, 3).unwrap(), 3);
        assert_eq!(reader.join().unwrap(), 7);
        assert_eq!(uffd.map(4, 1).unwrap(), 0, "mapped already");
        assert_eq!(uffd.map(5, 3).unwrap(), 0, "page 5 is mapped: nothing more");
        let hole = format!("{:#}", uffd.map(2, 2).unwrap_err());
        assert!(hole.contains("page 2 is a hole"), "{hole}");
        assert_eq!(uffd.map(14, 1).unwrap(), 1);
        assert_eq!(uffd.map(13, 2).unwrap(), 1, "13 mapped, stopped at 14 (mapped already)");

        // A hole (8): a missing fault, installed by a copy.
        let reader = guest_reader(&memory, 8);
        assert_eq!(
            fault(&uffd),
            Fault {
                page: 8,
                minor: false,
                write: false
            }
        );
        assert_eq!(uffd.copy(8, &[1; PAGE_SIZE]).unwrap(), Installed::New);
        assert_eq!(reader.join().unwrap(), 1);
        assert_eq!(uffd.copy(8, &[2; PAGE_SIZE]).unwrap(), Installed::AlreadyPresent);
        assert_eq!(
            uffd.copy(6, &[2; PAGE_SIZE]).unwrap(),
            Installed::AlreadyPresent,
            "cached"
        );
        assert_eq!(uffd.zero(10).unwrap(), Installed::New);
        assert_eq!(uffd.zero(10).unwrap(), Installed::AlreadyPresent);
        memory.read_page(10, &mut out);
        assert!(out.iter().all(|&b| b == 0));
        memory.read_page(8, &mut out);
        assert_eq!(out[0], 1, "the copied page stays");
        // The agent's view never waits, whatever the guest view's state: page 12 is a hole.
        memory.read_page(12, &mut out);
        assert_eq!(uffd.next_fault(0).unwrap(), None);
        // A punched page is a hole again: it faults MISSING.
        punch_pages(&memory, 12, 1).unwrap();
        let reader = guest_reader(&memory, 12);
        assert_eq!(uffd.next_fault(10_000).unwrap(), Some(12));
        assert_eq!(uffd.zero(12).unwrap(), Installed::New);
        assert_eq!(reader.join().unwrap(), 0);
        uffd.wake(3); // nobody waits: harmless
        uffd.unregister().unwrap();
    }
}
