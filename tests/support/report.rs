//! The checks of a migration report (`migrate --json`): one checker for every mode, with the checks
//! of each mode on top of those every migration must pass.

use serde_json::Value;

/// What kind of migration a report must show.
#[derive(Clone, Copy, Debug)]
pub enum Expect<'a> {
    /// Pre-copy to the end, of a guest of `pages` pages: round 1 covers them all, the last round is
    /// the stop-and-copy.
    PreCopy { pages: u64 },
    /// A migration that switched to post-copy, in `mode` (`postcopy`, or `hybrid` that switched).
    PostCopy { mode: &'a str },
}

/// A number from a report; panics naming the field if it is missing.
pub fn report_u64(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("report without {field}: {report}"))
}

/// What no migration may do, whatever happened on the way: lose a page, end with memory that differs
/// from the source's, or leave a guest whose own check of its memory fails.
pub fn assert_nothing_lost(report: &Value) {
    assert_eq!(report["lost_pages"], 0, "report: {report}");
    assert_eq!(report["memory_digest_equal"], true, "report: {report}");
    assert_eq!(
        report["guest_verified"], true,
        "the guest's self-check must pass on the destination: {report}"
    );
    assert_eq!(report["guest_mismatches"], 0, "report: {report}");
    assert_eq!(report["outcome"], "completed", "report: {report}");
    assert!(report["outcome_detail"].is_null(), "report: {report}");
}

/// Checks what a completed migration of the built-in guest must show: [`assert_nothing_lost`], the
/// guest measured its stall and kept writing on the destination, and what `expect` implies.
pub fn assert_sound_report(report: &Value, expect: Expect) {
    assert_nothing_lost(report);
    let stall = report["guest_max_stall_ms"].as_f64();
    assert!(stall.is_some(), "the guest measured its own stall: {report}");
    let (before, after) = (
        report_u64(report, "guest_pages_written_before"),
        report_u64(report, "guest_pages_written_after"),
    );
    assert!(
        after > before,
        "the guest kept writing on the destination ({before} -> {after})"
    );
    match expect {
        Expect::PreCopy { pages } => {
            assert!(
                stall.unwrap() > 0.0,
                "the guest was paused, so it saw a stall: {report}"
            );
            assert_precopy_rounds(report, pages);
        }
        Expect::PostCopy { mode } => assert_postcopy(report, mode),
    }
}

/// Pre-copy: the rounds, their accounting, the downtime and the SLA.
fn assert_precopy_rounds(report: &Value, pages: u64) {
    let rounds = report["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2, "a first pass and a stop-and-copy at least: {report}");
    assert_eq!(rounds[0]["dirty_pages"], pages, "round 1 covers every page");
    assert_eq!(rounds.last().unwrap()["stop_and_copy"], true);
    let mut wire = 0;
    for round in rounds {
        let n = |f: &str| {
            round[f]
                .as_u64()
                .unwrap_or_else(|| panic!("round without {f}: {round}"))
        };
        assert_eq!(
            n("sent_pages") + n("skipped_unchanged") + n("skipped_zero") + n("skipped_held"),
            n("dirty_pages"),
            "sent + skipped = dirty in round {round}"
        );
        wire += n("bytes_on_wire");
    }
    assert!(
        report_u64(report, "bytes_on_wire") >= wire,
        "the total covers every round"
    );
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(report["total_ms"].as_f64().unwrap() >= report["downtime_ms"].as_f64().unwrap());
    let sla = report["sla_percent"].as_f64().unwrap();
    assert!(sla > 99.0 && sla < 100.0, "sla {sla}");
}

/// Post-copy (or hybrid that switched): every missing page crossed exactly once.
fn assert_postcopy(report: &Value, mode: &str) {
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["switched_to_postcopy"], true, "{report}");
    // Every missing page crossed once: as a demanded page or a pushed one, never both.
    let missing = report_u64(report, "postcopy_pages");
    assert!(missing > 0, "{report}");
    assert_eq!(
        report_u64(report, "pages_demanded") + report_u64(report, "pages_pushed"),
        missing,
        "each missing page is sent exactly once: {report}"
    );
    assert!(report["postcopy_ms"].as_f64().unwrap() > 0.0);
    assert!(report["fault_latency_us"]["max"].as_f64().unwrap() >= report["fault_latency_us"]["p50"].as_f64().unwrap());
}

/// How many pages the source's round 1 deferred to its end (pages the guest wrote before round 1 sent
/// them), from the source agent's log `agent_log`: the figure of its last migration that watched round
/// 1, or None if none did (pre-copy in address order does not watch).
pub fn round_one_deferred(agent_log: &str) -> Option<u64> {
    let line = agent_log.lines().rev().find(|line| line.contains("round 1 watched"))?;
    let digits: String = line
        .split_once("deferred=")
        .unwrap_or_else(|| panic!("no deferred= in {line:?}"))
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(
        digits
            .parse()
            .unwrap_or_else(|_| panic!("deferred= without a number in {line:?}")),
    )
}
