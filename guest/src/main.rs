//! perfplus-guest: the built-in workload guest of perfplus.
//!
//! A `no_std` multiboot (v1) kernel. A tiny ring-0 part ([`boot`]) switches to long mode with an
//! identity map and drops to ring 3, where the whole workload ([`workload`]) runs at native speed:
//! pages of a working set are rewritten at a paced rate with contents of known kinds, and every page
//! is continuously re-verified against the content the guest knows it wrote. Progress is published
//! in the status page (`perfplus_common::guest_abi`) and printed on the serial console.
#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod content;
mod multiboot;
mod status;
mod sys;
mod workload;

use core::fmt::Write;

/// Ring-3 entry, reached by `iretq` from the boot code: RDI = multiboot magic, RSI = information.
extern "C" fn user_main(magic: u64, mbi: u64) -> ! {
    workload::run(magic, mbi)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = sys::Line::new();
    let _ = write!(line, "panic: {info}");
    let status = status::Status::existing();
    status.set_message(line.as_str());
    status.set_state(perfplus_common::guest_abi::state::FAILED);
    let mut out = sys::Line::new();
    let _ = write!(out, "perfplus-guest: FAILED: {}", line.as_str());
    out.print();
    sys::halt()
}
