//! Reading the built-in guest's status page (`guest_abi::StatusPage` at `STATUS_PAGE_GPA`) out of guest
//! memory, and writing the one field the host owns (`host_stall_reset_request`).
use std::mem::{offset_of, size_of};

use perfplus_common::guest_abi::{StatusPage, NO_MISMATCH, STATUS_MAGIC, STATUS_PAGE_GPA, STATUS_VERSION};

use super::GuestStatus;
use crate::memory::GuestMemory;

/// The guest's status, or `None` unless the page carries the expected magic and layout version.
pub fn read(mem: &GuestMemory) -> Option<GuestStatus> {
    let mut raw = [0u8; size_of::<StatusPage>()];
    mem.read(STATUS_PAGE_GPA, &mut raw).ok()?;
    // SAFETY: `raw` holds size_of::<StatusPage>() bytes; StatusPage is repr(C) plain data (integers and
    // a byte array), valid for any bit pattern, and read_unaligned does not need alignment.
    let page: StatusPage = unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const StatusPage) };
    if page.magic != STATUS_MAGIC || page.version != STATUS_VERSION {
        return None;
    }
    let len = page.message.iter().position(|&b| b == 0).unwrap_or(page.message.len());
    Some(GuestStatus {
        state: page.state,
        tsc_khz: page.tsc_khz,
        working_set_pages: page.working_set_pages,
        heartbeat: page.heartbeat,
        pages_written: page.pages_written,
        pages_verified: page.pages_verified,
        verify_sweeps: page.verify_sweeps,
        mismatches: page.mismatches,
        first_mismatch_page: (page.first_mismatch_page != NO_MISMATCH).then_some(page.first_mismatch_page),
        max_stall_tsc: page.max_stall_tsc,
        stall_reset_ack: page.stall_reset_ack,
        message: String::from_utf8_lossy(&page.message[..len]).into_owned(),
        working_set_base: page.working_set_base,
        last_tsc: page.last_tsc,
        max_stall_end_tsc: page.max_stall_end_tsc,
    })
}

/// Writes a new `host_stall_reset_request` (one more than the larger of the current request and the
/// guest's acknowledgement) and returns it.
pub fn request_stall_reset(mem: &GuestMemory) -> u64 {
    let request_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, host_stall_reset_request) as u64;
    let ack_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, stall_reset_ack) as u64;
    let current = mem.read_u64(request_gpa).unwrap_or(0);
    let ack = mem.read_u64(ack_gpa).unwrap_or(0);
    let next = current.max(ack).wrapping_add(1);
    if let Err(e) = mem.write_u64(request_gpa, next) {
        tracing::warn!("writing the stall reset request: {e:#}");
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_magic_and_version() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        assert_eq!(read(&mem), None);
        mem.write_u64(STATUS_PAGE_GPA, STATUS_MAGIC).unwrap();
        assert_eq!(read(&mem), None); // version 0
        let version_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, version) as u64;
        mem.write(version_gpa, &STATUS_VERSION.to_le_bytes()).unwrap();
        let heartbeat_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, heartbeat) as u64;
        mem.write_u64(heartbeat_gpa, 42).unwrap();
        let mismatch_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, first_mismatch_page) as u64;
        mem.write_u64(mismatch_gpa, NO_MISMATCH).unwrap();
        let msg_gpa = STATUS_PAGE_GPA + offset_of!(StatusPage, message) as u64;
        mem.write(msg_gpa, b"ok\0junk").unwrap();
        let status = read(&mem).unwrap();
        assert_eq!(status.heartbeat, 42);
        assert_eq!(status.first_mismatch_page, None);
        assert_eq!(status.message, "ok");
        assert_eq!(request_stall_reset(&mem), 1);
        assert_eq!(request_stall_reset(&mem), 2);
    }
}
