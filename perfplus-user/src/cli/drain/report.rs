//! What a drain reports: one entry per VM (where it runs now, and its migration's figures) and a total
//! for the event, as a table or as JSON. No I/O: the drain fills it in, `perfplus node drain` prints it.

use serde::{Deserialize, Serialize};

use crate::report::{MigrationReport, Outcome};
use perfplus_protocol::report::MONTH_MS;

/// Where a VM runs once the drain is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunsOn {
    /// Running on its destination, every page confirmed and the guest's self-check clean.
    Destination,
    /// Running on its destination, but not confirmed (the report's outcome says what is missing); the
    /// source keeps a paused copy.
    DestinationUnconfirmed,
    /// Still on the source, running (its migration failed before the commit, was cancelled, or never
    /// started).
    Source,
    /// Paused on the source (committed to a destination that did not confirm running it).
    SourcePaused,
    /// Running nowhere (post-copy broke: the destination's copy waits for pages, the source's is stale).
    Nowhere,
}

impl RunsOn {
    pub fn name(self) -> &'static str {
        match self {
            RunsOn::Destination => "destination",
            RunsOn::DestinationUnconfirmed => "destination (unconfirmed)",
            RunsOn::Source => "source",
            RunsOn::SourcePaused => "source, paused",
            RunsOn::Nowhere => "nowhere",
        }
    }
}

/// Where a migration report's outcome leaves the guest.
pub fn runs_on(outcome: Outcome) -> RunsOn {
    match outcome {
        Outcome::Completed => RunsOn::Destination,
        Outcome::Unverified | Outcome::PagesLost => RunsOn::DestinationUnconfirmed,
        Outcome::PostcopyBroken => RunsOn::Nowhere,
        Outcome::Cancelled => RunsOn::Source,
    }
}

/// One VM of the drain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmDrain {
    pub vm: String,
    pub memory_bytes: u64,
    /// The destination the plan gave it.
    pub destination: String,
    /// Dirty pages per second measured before the drain (None: not measured).
    pub dirty_pages_per_s: Option<f64>,
    pub predicted_s: f64,
    /// Seconds from the drain's start to this VM's migration start and end (None: never started).
    pub started_s: Option<f64>,
    pub ended_s: Option<f64>,
    /// "completed", another outcome of the migration report, "failed" (no report: the migration
    /// ended in an error) or "not-started".
    pub outcome: String,
    /// Where the VM runs now.
    pub runs_on: Option<RunsOn>,
    /// Why it is not running on its destination, confirmed (the report's detail, the error, the note
    /// of the agent that keeps it).
    pub detail: Option<String>,
    /// Pages sent with their content (pre-copy rounds and post-copy), as references, as zero markers,
    /// and found unchanged.
    pub pages_full: u64,
    pub pages_held: u64,
    pub pages_zero: u64,
    pub pages_unchanged: u64,
    pub bytes_on_wire: u64,
    pub rounds: u32,
    pub downtime_ms: Option<f64>,
    pub guest_max_stall_ms: Option<f64>,
    pub lost_pages: u64,
    /// Availability over a 30-day month with this migration's downtime (None: the VM runs nowhere).
    pub sla_percent: Option<f64>,
    /// The migration's own report, when it reached one.
    pub report: Option<MigrationReport>,
}

impl VmDrain {
    /// Fills the figures in from the migration's report.
    pub fn record_report(&mut self, report: MigrationReport) {
        let sum = |f: fn(&crate::report::RoundReport) -> u64| report.rounds.iter().map(f).sum::<u64>();
        self.pages_full = sum(|r| r.sent_pages) + report.postcopy_full_pages;
        self.pages_held = sum(|r| r.skipped_held);
        self.pages_zero = sum(|r| r.skipped_zero);
        self.pages_unchanged = sum(|r| r.skipped_unchanged);
        self.bytes_on_wire = report.bytes_on_wire;
        self.rounds = report.rounds.len() as u32;
        self.downtime_ms = Some(report.downtime_ms);
        self.guest_max_stall_ms = report.guest_max_stall_ms;
        self.lost_pages = report.lost_pages;
        self.outcome = report.outcome.name().to_string();
        let runs = runs_on(report.outcome);
        self.runs_on = Some(runs);
        self.sla_percent = (runs != RunsOn::Nowhere).then_some(report.sla_percent);
        self.detail = report.outcome_detail.clone();
        self.report = Some(report);
    }

    /// Whether the VM ended running on its destination with every page confirmed.
    pub fn ok(&self) -> bool {
        self.runs_on == Some(RunsOn::Destination) && self.lost_pages == 0
    }
}

/// The whole drain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    pub source: String,
    pub destinations: Vec<String>,
    pub parallel: usize,
    pub hashing: bool,
    /// Whether an operator interrupted the drain (Ctrl-C).
    pub interrupted: bool,
    /// In the order they started (those never started last).
    pub vms: Vec<VmDrain>,
    pub total: DrainTotal,
    /// VMs the source still hosts after the drain (asked from the source at the end).
    pub left_on_source: Vec<String>,
}

/// Sums over the VMs, and the event's availability.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainTotal {
    pub vms: usize,
    pub on_destination: usize,
    pub wall_s: f64,
    pub pages_full: u64,
    pub pages_held: u64,
    pub pages_zero: u64,
    pub pages_unchanged: u64,
    pub bytes_on_wire: u64,
    pub downtime_ms_sum: f64,
    pub downtime_ms_max: f64,
    pub guest_max_stall_ms: Option<f64>,
    pub lost_pages: u64,
    /// The event's availability: the VMs' months together less every VM's downtime, over the VMs'
    /// months (None when a VM runs nowhere: its downtime has no end yet).
    pub sla_percent: Option<f64>,
    /// The least available VM.
    pub worst_sla_percent: Option<f64>,
}

impl DrainReport {
    /// Computes the totals from the VMs.
    pub fn total_up(&mut self, wall_s: f64) {
        let vms = &self.vms;
        let mut t = DrainTotal {
            vms: vms.len(),
            on_destination: vms.iter().filter(|v| v.ok()).count(),
            wall_s,
            ..Default::default()
        };
        for v in vms {
            t.pages_full += v.pages_full;
            t.pages_held += v.pages_held;
            t.pages_zero += v.pages_zero;
            t.pages_unchanged += v.pages_unchanged;
            t.bytes_on_wire += v.bytes_on_wire;
            t.lost_pages += v.lost_pages;
            let down = v.downtime_ms.unwrap_or(0.0);
            t.downtime_ms_sum += down;
            t.downtime_ms_max = t.downtime_ms_max.max(down);
            if let Some(stall) = v.guest_max_stall_ms {
                t.guest_max_stall_ms = Some(t.guest_max_stall_ms.unwrap_or(0.0).max(stall));
            }
        }
        let nowhere = vms.iter().any(|v| v.runs_on == Some(RunsOn::Nowhere));
        if !vms.is_empty() && !nowhere {
            let months = MONTH_MS * vms.len() as f64;
            t.sla_percent = Some((months - t.downtime_ms_sum) / months * 100.0);
            t.worst_sla_percent = vms
                .iter()
                .map(|v| v.sla_percent.unwrap_or(100.0))
                .min_by(f64::total_cmp);
        }
        self.total = t;
    }

    /// Whether every VM ended running on a destination with nothing lost (the exit code).
    pub fn ok(&self) -> bool {
        self.vms.iter().all(VmDrain::ok) && self.left_on_source.is_empty()
    }

    /// The report as a table: one line per VM, then the total and, for each VM not on its destination,
    /// where it is and why.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ndrain of {} to {} ({} at a time, hashing {})",
            self.source,
            self.destinations.join(", "),
            self.parallel,
            if self.hashing { "on" } else { "off" }
        );
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9} {:>9} {:>5} {:>12}  outcome / runs on",
            "vm",
            "destination",
            "MiB",
            "full",
            "held",
            "zero",
            "MB wire",
            "rounds",
            "down ms",
            "stall ms",
            "lost",
            "SLA %",
        );
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for v in &self.vms {
            let _ = writeln!(
                out,
                "{:<16} {:<22} {:>7} {:>8} {:>8} {:>8} {:>9.1} {:>6} {:>9} {:>9} {:>5} {:>12}  {} / {}",
                v.vm,
                v.destination,
                v.memory_bytes >> 20,
                v.pages_full,
                v.pages_held,
                v.pages_zero,
                v.bytes_on_wire as f64 / 1e6,
                v.rounds,
                ms(v.downtime_ms),
                ms(v.guest_max_stall_ms),
                v.lost_pages,
                v.sla_percent.map_or("-".to_string(), |s| format!("{s:.7}")),
                v.outcome,
                v.runs_on.map_or("?", RunsOn::name),
            );
        }
        let t = &self.total;
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:>7} {:>8} {:>8} {:>8} {:>9.1} {:>6} {:>9} {:>9} {:>5} {:>12}  {} of {} on a destination in {:.1} s",
            "total",
            "",
            self.vms.iter().map(|v| v.memory_bytes >> 20).sum::<u64>(),
            t.pages_full,
            t.pages_held,
            t.pages_zero,
            t.bytes_on_wire as f64 / 1e6,
            "",
            format!("{:.1}", t.downtime_ms_sum),
            ms(t.guest_max_stall_ms),
            t.lost_pages,
            t.sla_percent.map_or("-".to_string(), |s| format!("{s:.7}")),
            t.on_destination,
            t.vms,
            t.wall_s
        );
        let _ = writeln!(
            out,
            "availability of the event (every VM over a 30-day month): {}; least available VM: {}; longest downtime {:.1} ms",
            t.sla_percent.map_or("not met: a VM runs nowhere".to_string(), |s| format!("{s:.7} %")),
            t.worst_sla_percent.map_or("-".to_string(), |s| format!("{s:.7} %")),
            t.downtime_ms_max
        );
        for v in self.vms.iter().filter(|v| !v.ok()) {
            let _ = writeln!(
                out,
                "  {}: {} ({}){}",
                v.vm,
                v.outcome,
                match v.runs_on {
                    Some(RunsOn::Destination) | Some(RunsOn::DestinationUnconfirmed) =>
                        format!("runs on {}", v.destination),
                    Some(RunsOn::Source) => format!("runs on {}", self.source),
                    Some(RunsOn::SourcePaused) => format!("paused on {}", self.source),
                    Some(RunsOn::Nowhere) | None => "runs nowhere".to_string(),
                },
                v.detail.as_deref().map_or(String::new(), |d| format!(": {d}"))
            );
        }
        if !self.left_on_source.is_empty() {
            let _ = writeln!(out, "  still on {}: {}", self.source, self.left_on_source.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RoundReport;

    fn report(outcome: Outcome, downtime_ms: f64) -> MigrationReport {
        MigrationReport {
            outcome,
            downtime_ms,
            sla_percent: perfplus_protocol::report::sla_percent(downtime_ms),
            bytes_on_wire: 1000,
            rounds: vec![
                RoundReport {
                    sent_pages: 10,
                    skipped_held: 5,
                    skipped_zero: 3,
                    ..Default::default()
                },
                RoundReport {
                    sent_pages: 2,
                    skipped_unchanged: 4,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn vm(name: &str, outcome: Outcome, downtime_ms: f64) -> VmDrain {
        let mut v = VmDrain {
            vm: name.into(),
            ..Default::default()
        };
        v.record_report(report(outcome, downtime_ms));
        v
    }

    #[test]
    fn totals_and_availability_of_the_event() {
        let mut d = DrainReport {
            vms: vec![vm("a", Outcome::Completed, 10.0), vm("b", Outcome::Completed, 30.0)],
            ..Default::default()
        };
        d.total_up(2.0);
        assert!(d.ok());
        let t = &d.total;
        assert_eq!(
            (t.pages_full, t.pages_held, t.pages_zero, t.pages_unchanged),
            (24, 10, 6, 8)
        );
        assert_eq!(t.downtime_ms_sum, 40.0);
        let expected = (2.0 * MONTH_MS - 40.0) / (2.0 * MONTH_MS) * 100.0;
        assert!((t.sla_percent.unwrap() - expected).abs() < 1e-12);
        assert_eq!(t.worst_sla_percent, Some(perfplus_protocol::report::sla_percent(30.0)));
        assert!(d.table().contains("2 of 2 on a destination"));
    }

    #[test]
    fn a_vm_not_on_its_destination_fails_the_drain_and_is_explained() {
        let mut failed = VmDrain {
            vm: "c".into(),
            outcome: "failed".into(),
            runs_on: Some(RunsOn::Source),
            detail: Some("connection refused".into()),
            ..Default::default()
        };
        failed.destination = "b:1".into();
        let mut d = DrainReport {
            source: "a:1".into(),
            vms: vec![vm("a", Outcome::Completed, 10.0), failed],
            ..Default::default()
        };
        d.total_up(1.0);
        assert!(!d.ok());
        assert!(d.table().contains("c: failed (runs on a:1): connection refused"));
        // A broken post-copy leaves the VM nowhere: no availability can be claimed for the event.
        d.vms.push(vm("e", Outcome::PostcopyBroken, 5.0));
        d.total_up(1.0);
        assert_eq!(d.total.sla_percent, None);
        assert!(d.table().contains("e: postcopy-broken (runs nowhere)"));
        // Every page confirmed but left on the source is not a drained node.
        let mut left = DrainReport {
            vms: vec![vm("a", Outcome::Completed, 1.0)],
            left_on_source: vec!["x".into()],
            ..Default::default()
        };
        left.total_up(1.0);
        assert!(!left.ok());
    }
}
