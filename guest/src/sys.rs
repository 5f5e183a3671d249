//! Ring-3 side of the guest's services: the `ud2` calls into the ring-0 handler in [`crate::boot`],
//! the TSC, and a small formatted console.

use core::arch::asm;
use core::fmt;

use crate::boot::{MAGIC_HALT, MAGIC_MAP, MAGIC_PRINT};

/// Writes `bytes` to the serial console (COM1). Costs a trap into emulated ring 0 plus one port-I/O
/// exit per byte: ~0.5 ms for a line. Callers exclude that time from stall measurements.
pub fn print_bytes(bytes: &[u8]) {
    // SAFETY: `ud2` with RAX = MAGIC_PRINT traps into the ring-0 #UD handler, which reads `len`
    // bytes at `ptr` (a live slice), writes them to the UART and resumes after the `ud2`, clobbering
    // only RAX, RDX, RDI and RSI (declared). It uses the TSS RSP0 stack, not ours.
    unsafe {
        asm!(
            "ud2",
            inout("rax") MAGIC_PRINT => _,
            inout("rdi") bytes.as_ptr() => _,
            inout("rsi") bytes.len() => _,
            out("rdx") _,
            options(nostack, readonly)
        );
    }
}

/// Asks ring 0 to identity-map guest-physical memory from 4 GiB up to `end` (capped at 64 GiB).
pub fn map_up_to(end: u64) {
    // SAFETY: the MAGIC_MAP request only adds present entries to the identity map (for addresses
    // that were unmapped, so no existing translation changes) and clobbers RAX, RDX, RDI, RSI.
    unsafe {
        asm!(
            "ud2",
            inout("rax") MAGIC_MAP => _,
            inout("rdi") end => _,
            out("rsi") _,
            out("rdx") _,
            options(nostack)
        );
    }
}

/// Stops the vCPU for good (`cli; hlt` in ring 0; a VMM sees a HLT exit).
pub fn halt() -> ! {
    // SAFETY: the MAGIC_HALT request never returns.
    unsafe { asm!("ud2", in("rax") MAGIC_HALT, options(noreturn, nostack)) }
}

/// Reads the time-stamp counter (allowed in ring 3: the guest leaves CR4.TSD clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only writes EDX:EAX.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A fixed-size line buffer implementing `fmt::Write` (output beyond its capacity is dropped).
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line { buf: [0; 512], len: 0 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text, for copying into the status page's message.
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are appended, but truncation may split a character: keep the valid part.
        match core::str::from_utf8(self.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                let valid = &self.buf[..e.valid_up_to()];
                // Cannot fail: `valid_up_to` is the length of the longest valid prefix.
                core::str::from_utf8(valid).unwrap_or("")
            }
        }
    }

    /// Prints the line followed by CR LF.
    pub fn print(&mut self) {
        let end = self.len.min(self.buf.len() - 2);
        self.buf[end] = b'\r';
        self.buf[end + 1] = b'\n';
        print_bytes(&self.buf[..end + 2]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep two bytes for the CR LF that `print` adds.
        let room = self.buf.len() - 2 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// `println!`-like: formats into a [`Line`] and prints it.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::sys::Line::new();
        // Writing into a Line never fails.
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.print();
    }};
}
