//! Assembling the report from what the source measured and what the destination answered. Pure
//! functions over plain data, so that each rule (what counts as lost, which stall is the guest's own,
//! how the totals add up) is tested without a migration.
use perfplus_protocol::report::{MigrationReport, Outcome};
use perfplus_protocol::{GuestCheck, CHECKSUM_GROUP_PAGES};

use crate::hashing::group_checksums;

/// Compares the source's checksum of every page with the destination's (None: the destination never
/// sent them) and records the result: a page whose checksums differ, or every page when the
/// destination's list is missing or of the wrong length, is lost.
pub fn record_lost_pages(report: &mut MigrationReport, ours: &[u64], theirs: Option<&[u64]>) {
    match theirs {
        Some(theirs) if theirs.len() == ours.len() => {
            report.lost_pages = ours.iter().zip(theirs).filter(|(a, b)| a != b).count() as u64;
            report.memory_digest_equal = report.lost_pages == 0;
        }
        Some(theirs) => {
            tracing::error!(
                "destination sent {} page checksums for {} pages",
                theirs.len(),
                ours.len()
            );
            report.lost_pages = ours.len() as u64;
        }
        None => report.lost_pages = ours.len() as u64,
    }
}

/// The groups of pages (`CHECKSUM_GROUP_PAGES` each) whose checksum at the destination (`theirs`,
/// from `Message::GroupChecksums`) differs from the source's (computed from `ours`, a checksum per
/// page): the groups whose page checksums the source then asks for. Every group when the
/// destination's list has the wrong length.
pub fn differing_groups(ours: &[u64], theirs: &[u64]) -> Vec<u64> {
    let mine = group_checksums(ours);
    if theirs.len() != mine.len() {
        tracing::error!(
            "destination sent {} group checksums for {} groups",
            theirs.len(),
            mine.len()
        );
        return (0..mine.len() as u64).collect();
    }
    (0..mine.len())
        .filter(|&g| mine[g] != theirs[g])
        .map(|g| g as u64)
        .collect()
}

/// The destination's checksum of every page: `ours` where the groups' checksums agreed, and the
/// destination's `detail` (its answer to `PageChecksumsWanted`: the page checksums of the groups
/// `asked`, in that order) for the groups that differed. None when `detail` does not hold exactly the
/// pages of those groups (every page then counts as lost, [`record_lost_pages`]).
pub fn destination_page_checksums(ours: &[u64], asked: &[u64], detail: &[u64]) -> Option<Vec<u64>> {
    let mut theirs = ours.to_vec();
    let mut at = 0;
    for &group in asked {
        let start = usize::try_from(group).ok()?.checked_mul(CHECKSUM_GROUP_PAGES)?;
        let pages = theirs.get_mut(start..(start + CHECKSUM_GROUP_PAGES).min(ours.len()))?;
        let answer = detail.get(at..at + pages.len())?;
        pages.copy_from_slice(answer);
        at += pages.len();
    }
    (at == detail.len()).then_some(theirs)
}

/// Records what the destination saw of the guest after the resume. `stall_reset` is the stall-reset
/// request the source wrote before round 1: the guest's longest stall counts only if the guest
/// acknowledged it (otherwise the figure could predate the migration).
pub fn record_guest_check(report: &mut MigrationReport, check: &GuestCheck, stall_reset: Option<u64>) {
    report.guest_verified = check.verified && untrusted_status(check).is_none();
    report.held_from_store = check.held_from_store;
    report.held_from_hosted_vms = check.held_from_hosted_vms;
    report.held_from_this_migration = check.held_from_this_migration;
    if let Some(stats) = &check.postcopy {
        report.demand_faults = stats.demand_faults;
        report.local_faults = stats.local_faults;
        report.fault_latency_us = stats.fault_latency_us.clone();
        report.postcopy_ms = stats.postcopy_ms;
    }
    if let Some(after) = check.after.as_ref() {
        report.guest_pages_written_after = Some(after.pages_written);
        report.guest_mismatches = Some(after.mismatches);
        // The stall counter was reset on the source before round 1 and migrated with the guest.
        let reset_seen = stall_reset.is_some_and(|r| after.stall_reset_ack >= r);
        if reset_seen {
            report.guest_max_stall_ms = after.max_stall_ms();
        }
    }
    if report.guest_pages_written_before.is_none() {
        report.guest_pages_written_before = check.at_resume.as_ref().map(|s| s.pages_written);
    }
}

/// Why the guest's status readings the destination sent cannot be believed, if they cannot: they are
/// guest memory, and a guest may write anything there (see `GuestStatus::untrustworthy`). The source
/// checks them itself rather than take the destination's `verified` alone.
fn untrusted_status(check: &GuestCheck) -> Option<String> {
    match (&check.at_resume, &check.after) {
        (Some(before), Some(after)) => after.untrustworthy_since(before),
        (Some(one), None) | (None, Some(one)) => one.untrustworthy(),
        (None, None) => None,
    }
}

/// Decides the outcome from what the destination confirmed: its page checksums (`checksums_received`),
/// then the guest check (`None`: it never came). `completed` needs both, no lost page, and a passed
/// self-check when one was asked for and the guest has one.
pub fn record_outcome(
    report: &mut MigrationReport,
    checksums_received: bool,
    check: Option<&GuestCheck>,
    verify_requested: bool,
) {
    let (outcome, detail) = if !checksums_received {
        (
            Outcome::Unverified,
            Some("the destination sent no page checksums: what it holds is unknown".to_string()),
        )
    } else if report.lost_pages > 0 {
        (
            Outcome::PagesLost,
            Some(format!(
                "{} pages differ between source and destination",
                report.lost_pages
            )),
        )
    } else if let Some(check) = check {
        if let Some(why) = untrusted_status(check) {
            (
                Outcome::Unverified,
                Some(format!("the guest's status page is not trustworthy: {why}")),
            )
        } else if verify_requested && check.at_resume.is_some() && !check.verified {
            (
                Outcome::Unverified,
                Some("the guest's self-check did not pass on the destination".to_string()),
            )
        } else {
            (Outcome::Completed, None)
        }
    } else {
        (
            Outcome::Unverified,
            Some("the destination sent no guest check".to_string()),
        )
    };
    report.outcome = outcome;
    report.outcome_detail = detail;
}

/// Post-copy that ended before the destination had every page (`why`: the time limit passed without
/// a link, or an operator cancelled; `missing`: pages the destination lacked at its last
/// acknowledgement). The guest is not verified running anywhere from the switch on, so availability
/// counts the whole time since the source paused it (`down_ms`) as down, not the switch's downtime.
pub fn record_postcopy_broken(report: &mut MigrationReport, why: &str, missing: u64, down_ms: f64) {
    report.outcome = Outcome::PostcopyBroken;
    report.outcome_detail = Some(format!(
        "post-copy broken ({why}): {missing} pages never reached {}, whose guest waits for them \
         (paused once the time limit passes); the copy paused on {} is stale since the switch, \
         {:.0} ms ago. The guest runs nowhere: cancel it on {} (`perfplus migrate --cancel {}`) \
         or resume the stale copy (`perfplus vm resume`)",
        report.destination, report.source, down_ms, report.destination, report.migration_id,
    ));
    report.sla_percent = super::sla_percent(down_ms);
}

/// Records the totals: bytes on every connection of the migration, the average rate over the total
/// time, and the CPU both agents spent.
pub fn record_totals(report: &mut MigrationReport, bytes_on_wire: u64, source_cpu_ms: f64, destination_cpu_ms: f64) {
    report.bytes_on_wire = bytes_on_wire;
    report.average_mbps = report.bytes_on_wire as f64 * 8.0 / (report.total_ms.max(1e-3) * 1e3);
    report.source_cpu_ms = source_cpu_ms;
    report.destination_cpu_ms = destination_cpu_ms;
    report.agent_cpu_ms = report.source_cpu_ms + report.destination_cpu_ms;
}

#[cfg(test)]
mod tests {
    use super::*;
    use perfplus_vmm::vm::GuestStatus;

    #[test]
    fn groups_that_differ_are_asked_for_and_their_pages_counted() {
        // 200 pages: groups of 64, 64, 64 and 8. Pages 70 and 199 differ at the destination.
        let ours: Vec<u64> = (0..200).collect();
        let mut dest = ours.clone();
        dest[70] = 9999;
        dest[199] = 7777;
        let asked = differing_groups(&ours, &group_checksums(&dest));
        assert_eq!(asked, [1, 3]);
        // The destination answers with the pages of groups 1 and 3, in that order.
        let detail: Vec<u64> = dest[64..128].iter().chain(&dest[192..200]).copied().collect();
        let theirs = destination_page_checksums(&ours, &asked, &detail).unwrap();
        assert_eq!(theirs, dest);
        let mut r = MigrationReport::default();
        record_lost_pages(&mut r, &ours, Some(&theirs));
        assert_eq!((r.lost_pages, r.memory_digest_equal), (2, false));
        // An answer one page short or long, or for a group that does not exist, confirms nothing.
        assert_eq!(destination_page_checksums(&ours, &asked, &detail[1..]), None);
        let longer: Vec<u64> = detail.iter().copied().chain([0]).collect();
        assert_eq!(destination_page_checksums(&ours, &asked, &longer), None);
        assert_eq!(destination_page_checksums(&ours, &[4], &[]), None);
        // Nothing differs: nothing asked. A list of the wrong length: every group.
        assert!(differing_groups(&ours, &group_checksums(&ours)).is_empty());
        assert_eq!(differing_groups(&ours, &[1, 2]), [0, 1, 2, 3]);
    }

    #[test]
    fn lost_pages_are_the_pages_whose_checksums_differ_or_all_when_unknown() {
        let mut r = MigrationReport::default();
        record_lost_pages(&mut r, &[1, 2, 3], Some(&[1, 2, 3]));
        assert_eq!((r.lost_pages, r.memory_digest_equal), (0, true));
        let mut r = MigrationReport::default();
        record_lost_pages(&mut r, &[1, 2, 3], Some(&[1, 9, 3]));
        assert_eq!((r.lost_pages, r.memory_digest_equal), (1, false));
        let mut r = MigrationReport::default();
        record_lost_pages(&mut r, &[1, 2, 3], Some(&[1, 2]));
        assert_eq!((r.lost_pages, r.memory_digest_equal), (3, false));
        let mut r = MigrationReport::default();
        record_lost_pages(&mut r, &[1, 2, 3], None);
        assert_eq!((r.lost_pages, r.memory_digest_equal), (3, false));
    }

    #[test]
    fn the_guest_stall_counts_only_after_the_guest_acknowledged_the_reset() {
        let after = GuestStatus {
            tsc_khz: 1_000_000,
            max_stall_tsc: 5_000_000,
            stall_reset_ack: 3,
            pages_written: 70,
            ..Default::default()
        };
        let check = GuestCheck {
            at_resume: Some(GuestStatus {
                pages_written: 50,
                ..Default::default()
            }),
            after: Some(after),
            verified: true,
            cpu_ms: 1.0,
            held_from_store: 1,
            held_from_hosted_vms: 2,
            held_from_this_migration: 3,
            postcopy: None,
        };
        let mut r = MigrationReport::default();
        record_guest_check(&mut r, &check, Some(3));
        assert!(r.guest_verified);
        assert_eq!(r.guest_max_stall_ms, check.after.as_ref().unwrap().max_stall_ms());
        assert_eq!(r.guest_max_stall_ms, Some(5.0));
        assert_eq!(r.guest_pages_written_before, Some(50));
        assert_eq!(r.guest_pages_written_after, Some(70));
        assert_eq!(
            (r.held_from_store, r.held_from_hosted_vms, r.held_from_this_migration),
            (1, 2, 3)
        );

        let mut r = MigrationReport::default();
        record_guest_check(&mut r, &check, Some(4));
        assert_eq!(r.guest_max_stall_ms, None, "the guest never saw request 4");
    }

    #[test]
    fn only_a_confirmed_migration_is_completed() {
        let check = |verified, status: bool| GuestCheck {
            at_resume: status.then(GuestStatus::default),
            after: None,
            verified,
            cpu_ms: 0.0,
            held_from_store: 0,
            held_from_hosted_vms: 0,
            held_from_this_migration: 0,
            postcopy: None,
        };
        let outcome = |lost, checksums, c: Option<&GuestCheck>, verify| {
            let mut r = MigrationReport {
                lost_pages: lost,
                ..Default::default()
            };
            record_outcome(&mut r, checksums, c, verify);
            (r.outcome, r.outcome_detail.is_some())
        };
        assert_eq!(
            outcome(0, true, Some(&check(true, true)), true),
            (Outcome::Completed, false)
        );
        assert_eq!(
            outcome(0, true, Some(&check(false, false)), true),
            (Outcome::Completed, false),
            "a guest without a self-check cannot fail it"
        );
        assert_eq!(
            outcome(0, true, Some(&check(false, true)), false),
            (Outcome::Completed, false),
            "verification not asked for"
        );
        assert_eq!(
            outcome(0, true, Some(&check(false, true)), true),
            (Outcome::Unverified, true)
        );
        assert_eq!(outcome(0, true, None, true), (Outcome::Unverified, true));
        assert_eq!(
            outcome(3, true, Some(&check(true, true)), true),
            (Outcome::PagesLost, true)
        );
        assert_eq!(outcome(4096, false, None, true), (Outcome::Unverified, true));
    }

    #[test]
    fn absurd_guest_counters_are_not_a_clean_verdict() {
        let before = GuestStatus {
            state: 2,
            working_set_pages: 100,
            pages_written: 500,
            pages_verified: 300,
            verify_sweeps: 3,
            heartbeat: 10,
            ..Default::default()
        };
        // What a hostile guest wrote: sweeps at u64::MAX (`before + 2` would wrap to 1) and
        // pages_written going back; the destination (old code) called that verified.
        let after = GuestStatus {
            verify_sweeps: u64::MAX,
            pages_written: 400,
            ..before.clone()
        };
        let check = GuestCheck {
            at_resume: Some(before.clone()),
            after: Some(after),
            verified: true,
            cpu_ms: 0.0,
            held_from_store: 0,
            held_from_hosted_vms: 0,
            held_from_this_migration: 0,
            postcopy: None,
        };
        let mut r = MigrationReport::default();
        record_guest_check(&mut r, &check, None);
        assert!(!r.guest_verified);
        record_outcome(&mut r, true, Some(&check), true);
        assert_eq!(r.outcome, Outcome::Unverified);
        let detail = r.outcome_detail.unwrap();
        assert!(
            detail.starts_with("the guest's status page is not trustworthy: verify_sweeps is 18446744073709551615"),
            "{detail}"
        );
        // Counters that went back alone are enough, and so is one absurd reading.
        let check = GuestCheck {
            after: Some(GuestStatus {
                pages_written: 499,
                heartbeat: 11,
                ..before.clone()
            }),
            ..check
        };
        let mut r = MigrationReport::default();
        record_outcome(&mut r, true, Some(&check), false);
        assert_eq!(r.outcome, Outcome::Unverified);
        assert!(r
            .outcome_detail
            .unwrap()
            .contains("pages_written went back from 500 to 499"));
        let check = GuestCheck {
            after: None,
            at_resume: Some(GuestStatus {
                mismatches: u64::MAX,
                ..before
            }),
            ..check
        };
        let mut r = MigrationReport::default();
        record_outcome(&mut r, true, Some(&check), false);
        assert_eq!(r.outcome, Outcome::Unverified);
    }

    #[test]
    fn broken_postcopy_counts_the_time_since_the_switch_as_down() {
        let mut r = MigrationReport {
            destination: "b:7001".into(),
            migration_id: "0123".into(),
            downtime_ms: 5.0,
            sla_percent: super::super::sla_percent(5.0),
            ..Default::default()
        };
        record_postcopy_broken(&mut r, "cancelled by an operator", 12, 60_000.0);
        assert_eq!(r.outcome, Outcome::PostcopyBroken);
        assert_eq!(r.sla_percent, super::super::sla_percent(60_000.0));
        let detail = r.outcome_detail.unwrap();
        assert!(detail.contains("12 pages never reached b:7001"), "{detail}");
        assert!(detail.contains("--cancel 0123"), "{detail}");
    }

    #[test]
    fn totals_add_both_agents_cpu_and_rate_over_total_time() {
        let mut r = MigrationReport {
            total_ms: 1000.0,
            ..Default::default()
        };
        record_totals(&mut r, 125_000_000, 30.0, 20.0);
        assert_eq!(r.average_mbps, 1000.0);
        assert_eq!(r.agent_cpu_ms, 50.0);
    }
}
