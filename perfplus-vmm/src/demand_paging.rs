//! Guest RAM under userfaultfd (MISSING mode): the destination's side of demand paging.
//!
//! What is registered is guest memory's guest view (the mapping KVM uses, [`crate::memory`]); the
//! agent reads and writes through its own view, which never faults. While registered, a guest access
//! (KVM, code fetch included) to a page that is not in the memfd's page cache stops the accessing thread in the kernel and queues a fault message on the
//! uffd. The page is then installed atomically with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which also
//! wakes every thread waiting on it. Nothing may write such memory with plain stores while it is
//! registered: a store to a missing page would itself fault (and wait for this module's caller).
//!
//! Pages that held stale content (sent in pre-copy, dirtied since) are dropped from the memfd with
//! `fallocate(PUNCH_HOLE)` before the vCPUs run, which makes them missing again.
//!
//! `UFFD_USER_MODE_ONLY` must stay off: KVM's own accesses to guest memory come from the kernel.
//! The ioctls are [`crate::sys::userfaultfd`]'s (whose fd never has it).
use std::sync::Arc;

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;

use crate::memory::GuestMemory;
use crate::sys::userfaultfd::{Userfaultfd, UFFDIO_REGISTER_MODE_MISSING};

/// A uffd with the whole guest view of one guest memory registered in MISSING mode.
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
    /// The page was missing and now holds the data.
    New,
    /// The page was already present (nothing written).
    AlreadyPresent,
}

impl GuestUffd {
    /// Creates a uffd and registers all of `memory` in MISSING mode.
    pub fn register(memory: Arc<GuestMemory>) -> anyhow::Result<GuestUffd> {
        // Close-on-exec and non-blocking; not user-mode-only: KVM touches guest memory from kernel
        // mode, and user-mode-only faults would break KVM_RUN. No features: only fault messages.
        let uffd = Userfaultfd::open()
            .and_then(|uffd| uffd.api(0).map(|_| uffd))
            .context("creating a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)")?;
        uffd.register(
            memory.guest_view_addr() as u64,
            memory.size(),
            UFFDIO_REGISTER_MODE_MISSING,
        )
        .context("registering guest memory with userfaultfd (MISSING mode)")?;
        Ok(GuestUffd { uffd, memory })
    }

    fn addr(&self, page: u64) -> u64 {
        assert!(page < self.memory.page_count(), "page {page} outside guest memory");
        // The offset is inside the mapping (checked above).
        self.memory.guest_view_addr() as u64 + page * PAGE_SIZE as u64
    }

    /// Installs `data` at `page` and wakes whoever waits on it.
    pub fn copy(&self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<Installed> {
        let dst = self.addr(page);
        loop {
            // SAFETY: `dst` is a page-aligned page inside the registered mapping (checked in `addr`),
            // `data` is a distinct PAGE_SIZE buffer; UFFDIO_COPY writes only `dst`'s page, atomically,
            // and no Rust reference points into guest memory (`GuestMemory` copies through raw
            // pointers only).
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

    /// Installs a zero page at `page` and wakes whoever waits on it.
    pub fn zero(&self, page: u64) -> anyhow::Result<Installed> {
        let dst = self.addr(page);
        // SAFETY: `dst` is a page-aligned page inside the registered mapping; UFFDIO_ZEROPAGE only
        // maps zeroes there, and no Rust reference points into guest memory (see `copy`).
        match unsafe { self.uffd.zeropage(dst, PAGE_SIZE as u64, true) } {
            Ok(_) => Ok(Installed::New),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Installed::AlreadyPresent),
            // Some memory kinds lack UFFDIO_ZEROPAGE: copy zeroes instead.
            Err(_) => self.copy(page, &[0; PAGE_SIZE]),
        }
    }

    /// Wakes threads waiting on `page` (for a fault whose page became present meanwhile).
    pub fn wake(&self, page: u64) {
        if let Err(e) = self.uffd.wake(self.addr(page), PAGE_SIZE as u64) {
            tracing::debug!("UFFDIO_WAKE of page {page}: {e}");
        }
    }

    /// Waits up to `timeout_ms` for a fault; returns the faulting guest page.
    pub fn next_fault(&self, timeout_ms: i32) -> anyhow::Result<Option<u64>> {
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
                    Ok(Some(offset / PAGE_SIZE as u64))
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

    /// Unregisters the memory: from now on missing pages fault in as zero pages. Only for when every
    /// page is present.
    pub fn unregister(&self) -> anyhow::Result<()> {
        self.uffd
            .unregister(self.memory.guest_view_addr() as u64, self.memory.size())
            .context("unregistering guest memory from userfaultfd")
    }
}

/// Drops pages `[first, first + count)` from `memory`'s memfd, so that they are missing (they fault
/// while registered; unregistered they read as zero).
pub fn punch_pages(memory: &GuestMemory, first: u64, count: u64) -> anyhow::Result<()> {
    let offset = first * PAGE_SIZE as u64;
    let len = count * PAGE_SIZE as u64;
    anyhow::ensure!(offset + len <= memory.size(), "punching pages outside guest memory");
    // SAFETY: fallocate on the memfd we own, inside its size; it changes file content only (no Rust
    // references into the mapping exist).
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

    #[test]
    fn faults_wait_until_a_page_is_copied() {
        let memory = Arc::new(GuestMemory::new(16 * PAGE_SIZE as u64).unwrap());
        memory.write_page(3, &[7; PAGE_SIZE]);
        punch_pages(&memory, 3, 1).unwrap();
        let uffd = Arc::new(GuestUffd::register(memory.clone()).unwrap());
        assert_eq!(uffd.next_fault(0).unwrap(), None, "no fault yet");
        let reader = {
            let memory = memory.clone();
            std::thread::spawn(move || {
                // SAFETY: inside the guest view (the registered one), kept mapped by `memory`; a raw
                // read, no reference.
                unsafe { memory.guest_view_addr().add(3 * PAGE_SIZE + 100).read_volatile() }
            })
        };
        let page = loop {
            if let Some(page) = uffd.next_fault(1000).unwrap() {
                break page;
            }
        };
        assert_eq!(page, 3);
        assert_eq!(uffd.copy(3, &[9; PAGE_SIZE]).unwrap(), Installed::New);
        assert_eq!(
            reader.join().unwrap(),
            9,
            "the reader saw the copied page, not the punched one"
        );
        assert_eq!(uffd.copy(3, &[1; PAGE_SIZE]).unwrap(), Installed::AlreadyPresent);
        assert_eq!(uffd.zero(5).unwrap(), Installed::New);
        let mut out = [1u8; PAGE_SIZE];
        memory.read_page(5, &mut out);
        assert!(out.iter().all(|&b| b == 0));
        assert_eq!(uffd.zero(5).unwrap(), Installed::AlreadyPresent);
        assert_eq!(
            uffd.zero(3).unwrap(),
            Installed::AlreadyPresent,
            "the copied page stays"
        );
        memory.read_page(3, &mut out);
        assert_eq!(out[0], 9);
        uffd.wake(3); // nobody waits: harmless
        uffd.unregister().unwrap();
    }
}
