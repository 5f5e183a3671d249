//! Reading the built-in guest's status page (`guest_abi::StatusPage` at `STATUS_PAGE_GPA`) out of guest
//! memory, and writing the one field the host owns (`host_stall_reset_request`).
use std::mem::{offset_of, size_of};

use perfplus_common::guest_abi::{state, StatusPage, NO_MISMATCH, STATUS_MAGIC, STATUS_PAGE_GPA, STATUS_VERSION};

use super::console;
use super::GuestStatus;
use crate::memory::GuestMemory;

/// A counter no honest guest reaches: 2^56 events take years even at a billion a second.
const COUNTER_MAX: u64 = 1 << 56;

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
        message: console::escape(&page.message[..len]),
        working_set_base: page.working_set_base,
        last_tsc: page.last_tsc,
        max_stall_end_tsc: page.max_stall_end_tsc,
    })
}

/// The status page is guest memory: a guest (buggy, or compromised) writes whatever it likes there.
/// These checks find counters that the built-in guest's workload cannot produce, so that a verdict
/// is never made from them. They allow for the agent reading the page while the guest updates it
/// (fields are written one at a time: a counter may be one step ahead of a related one).
impl GuestStatus {
    /// Why this one reading cannot be believed, if it cannot.
    pub fn untrustworthy(&self) -> Option<String> {
        if self.state > state::FAILED {
            return Some(format!("state {} is not one the guest defines", self.state));
        }
        for (name, value) in [
            ("pages_written", self.pages_written),
            ("pages_verified", self.pages_verified),
            ("verify_sweeps", self.verify_sweeps),
            ("mismatches", self.mismatches),
            ("heartbeat", self.heartbeat),
            ("working_set_pages", self.working_set_pages),
        ] {
            if value >= COUNTER_MAX {
                return Some(format!("{name} is {value}, more than a guest counts in years"));
            }
        }
        // A mismatch is found by a verification (one step ahead at most).
        if self.mismatches > self.pages_verified.saturating_add(1) {
            return Some(format!(
                "{} mismatches in {} verified pages",
                self.mismatches, self.pages_verified
            ));
        }
        // A sweep is working_set_pages verifications.
        if self.verify_sweeps > 0
            && self
                .verify_sweeps
                .checked_mul(self.working_set_pages)
                .is_none_or(|n| n > self.pages_verified.saturating_add(1))
        {
            return Some(format!(
                "{} sweeps over {} pages, but only {} pages verified",
                self.verify_sweeps, self.working_set_pages, self.pages_verified
            ));
        }
        if self.mismatches > 0 && self.first_mismatch_page.is_none() {
            return Some(format!("{} mismatches but no first mismatching page", self.mismatches));
        }
        if let Some(page) = self.first_mismatch_page {
            if self.working_set_pages > 0 && page >= self.working_set_pages {
                return Some(format!(
                    "first mismatching page {page} is outside the working set of {} pages",
                    self.working_set_pages
                ));
            }
        }
        None
    }

    /// Why this reading, taken after `before` (of the same guest), cannot be believed, if it cannot:
    /// [`GuestStatus::untrustworthy`] of either, or a counter that went backwards, or a working set
    /// that moved.
    pub fn untrustworthy_since(&self, before: &GuestStatus) -> Option<String> {
        if let Some(why) = before.untrustworthy() {
            return Some(format!("earlier: {why}"));
        }
        if let Some(why) = self.untrustworthy() {
            return Some(why);
        }
        for (name, was, is) in [
            ("pages_written", before.pages_written, self.pages_written),
            ("pages_verified", before.pages_verified, self.pages_verified),
            ("verify_sweeps", before.verify_sweeps, self.verify_sweeps),
            ("mismatches", before.mismatches, self.mismatches),
            ("heartbeat", before.heartbeat, self.heartbeat),
        ] {
            if is < was {
                return Some(format!("{name} went back from {was} to {is}"));
            }
        }
        if before.working_set_pages != 0
            && (before.working_set_pages, before.working_set_base) != (self.working_set_pages, self.working_set_base)
        {
            return Some(format!(
                "the working set changed from {} pages at {:#x} to {} pages at {:#x}",
                before.working_set_pages, before.working_set_base, self.working_set_pages, self.working_set_base
            ));
        }
        None
    }
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

        // The guest's message is shown escaped.
        mem.write(msg_gpa, b"\x1b[2Jforged\nline\0").unwrap();
        assert_eq!(read(&mem).unwrap().message, "\\e[2Jforged\\nline");
    }

    fn honest() -> GuestStatus {
        GuestStatus {
            state: state::RUNNING,
            working_set_pages: 1000,
            heartbeat: 5000,
            pages_written: 3000,
            pages_verified: 2500,
            verify_sweeps: 2,
            ..Default::default()
        }
    }

    #[test]
    fn counters_a_guest_cannot_reach_are_not_trusted() {
        let ok = honest();
        assert_eq!(ok.untrustworthy(), None);
        let later = GuestStatus {
            heartbeat: 6000,
            pages_written: 3100,
            pages_verified: 3001,
            verify_sweeps: 3,
            mismatches: 1,
            first_mismatch_page: Some(999),
            ..ok.clone()
        };
        assert_eq!(later.untrustworthy_since(&ok), None);
        // A read between two fields' updates: one step ahead is fine.
        let racing = GuestStatus {
            pages_verified: 2999,
            ..later.clone()
        };
        assert_eq!(racing.untrustworthy(), None);

        let bad = |s: GuestStatus| s.untrustworthy().expect("untrustworthy");
        assert_eq!(
            bad(GuestStatus {
                verify_sweeps: u64::MAX,
                ..ok.clone()
            }),
            "verify_sweeps is 18446744073709551615, more than a guest counts in years"
        );
        assert_eq!(
            bad(GuestStatus {
                verify_sweeps: 1 << 50,
                ..ok.clone()
            }),
            "1125899906842624 sweeps over 1000 pages, but only 2500 pages verified"
        );
        assert_eq!(
            bad(GuestStatus {
                mismatches: 2502,
                first_mismatch_page: Some(1),
                ..ok.clone()
            }),
            "2502 mismatches in 2500 verified pages"
        );
        assert!(bad(GuestStatus { state: 7, ..ok.clone() }).contains("state 7"));
        assert!(bad(GuestStatus {
            mismatches: 1,
            ..ok.clone()
        })
        .contains("no first mismatching page"));
        assert!(bad(GuestStatus {
            mismatches: 1,
            first_mismatch_page: Some(1000),
            ..ok.clone()
        })
        .contains("outside the working set"));

        let since = |after: GuestStatus| after.untrustworthy_since(&ok).expect("untrustworthy");
        assert_eq!(
            since(GuestStatus {
                pages_written: 10,
                ..later.clone()
            }),
            "pages_written went back from 3000 to 10"
        );
        // Mismatches that wrapped around to 0.
        let with_mismatch = GuestStatus {
            mismatches: 5,
            first_mismatch_page: Some(3),
            ..later.clone()
        };
        assert_eq!(
            GuestStatus {
                mismatches: 0,
                first_mismatch_page: None,
                ..later.clone()
            }
            .untrustworthy_since(&with_mismatch)
            .unwrap(),
            "mismatches went back from 5 to 0"
        );
        assert!(since(GuestStatus {
            working_set_base: 0x1000,
            ..later.clone()
        })
        .contains("working set changed"));
        assert!(later
            .untrustworthy_since(&GuestStatus {
                heartbeat: u64::MAX,
                ..ok.clone()
            })
            .unwrap()
            .starts_with("earlier: heartbeat"));
    }
}
