//! The status page (`guest_abi::StatusPage` at `guest_abi::STATUS_PAGE_GPA`): the guest's report to
//! the agent, which reads it straight out of guest memory. Every store is volatile so that each
//! published value really reaches memory, and fields are naturally aligned u32/u64 (single stores).

use core::ptr::{addr_of, addr_of_mut};

use perfplus_common::guest_abi::{state, StatusPage, NO_MISMATCH, STATUS_MAGIC, STATUS_PAGE_GPA, STATUS_VERSION};

/// Handle on the status page. Only one exists (the guest is single-threaded).
pub struct Status {
    page: *mut StatusPage,
}

/// Volatile store of one field.
macro_rules! put {
    ($s:expr, $field:ident, $v:expr) => {
        // SAFETY: `page` points at the identity-mapped status page (see `Status::init`); the field
        // is naturally aligned.
        unsafe { addr_of_mut!((*$s.page).$field).write_volatile($v) }
    };
}

impl Status {
    /// Initialises the page: every field, then `magic` last, so that an agent which sees the magic
    /// sees a consistent page. State BOOTING.
    pub fn init() -> Status {
        let s = Status {
            page: STATUS_PAGE_GPA as *mut StatusPage,
        };
        put!(s, magic, 0);
        put!(s, version, STATUS_VERSION);
        put!(s, state, state::BOOTING);
        put!(s, tsc_khz, 0);
        put!(s, working_set_base, 0);
        put!(s, working_set_pages, 0);
        put!(s, heartbeat, 0);
        put!(s, pages_written, 0);
        put!(s, pages_verified, 0);
        put!(s, verify_sweeps, 0);
        put!(s, mismatches, 0);
        put!(s, first_mismatch_page, NO_MISMATCH);
        put!(s, max_stall_tsc, 0);
        put!(s, max_stall_end_tsc, 0);
        put!(s, last_tsc, 0);
        // The agent may have asked for a reset before the guest booted: acknowledge what is there.
        let req = s.host_stall_reset_request();
        put!(s, stall_reset_ack, req);
        s.set_message("booting");
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        put!(s, magic, STATUS_MAGIC);
        s
    }

    /// A status handle for the panic path (the page may or may not have been initialised).
    pub fn existing() -> Status {
        Status {
            page: STATUS_PAGE_GPA as *mut StatusPage,
        }
    }

    pub fn set_state(&self, v: u32) {
        put!(self, state, v);
    }
    pub fn set_tsc_khz(&self, v: u64) {
        put!(self, tsc_khz, v);
    }
    pub fn set_working_set(&self, base: u64, pages: u64) {
        put!(self, working_set_base, base);
        put!(self, working_set_pages, pages);
    }
    #[inline(always)]
    pub fn set_heartbeat(&self, v: u64, tsc: u64) {
        put!(self, heartbeat, v);
        put!(self, last_tsc, tsc);
    }
    #[inline(always)]
    pub fn set_pages_written(&self, v: u64) {
        put!(self, pages_written, v);
    }
    #[inline(always)]
    pub fn set_pages_verified(&self, v: u64) {
        put!(self, pages_verified, v);
    }
    pub fn set_verify_sweeps(&self, v: u64) {
        put!(self, verify_sweeps, v);
    }
    pub fn set_mismatches(&self, count: u64, first: u64) {
        put!(self, first_mismatch_page, first);
        put!(self, mismatches, count);
    }
    pub fn set_max_stall(&self, tsc: u64, end_tsc: u64) {
        put!(self, max_stall_end_tsc, end_tsc);
        put!(self, max_stall_tsc, tsc);
    }
    pub fn set_stall_reset_ack(&self, v: u64) {
        put!(self, stall_reset_ack, v);
    }

    /// The agent's field.
    #[inline(always)]
    pub fn host_stall_reset_request(&self) -> u64 {
        // SAFETY: as in `put!`; the agent writes this field concurrently, hence the volatile read.
        unsafe { addr_of!((*self.page).host_stall_reset_request).read_volatile() }
    }

    /// Copies `msg` (truncated to 255 bytes at a character boundary) and a NUL into `message`.
    pub fn set_message(&self, msg: &str) {
        let mut n = msg.len().min(255);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: `message` is a 256-byte array inside the status page.
        let dst = unsafe { addr_of_mut!((*self.page).message) } as *mut u8;
        for (i, &b) in msg.as_bytes()[..n].iter().enumerate() {
            // SAFETY: i < 255, within `message`.
            unsafe { dst.add(i).write_volatile(b) };
        }
        // SAFETY: n <= 255, within `message`.
        unsafe { dst.add(n).write_volatile(0) };
    }
}
