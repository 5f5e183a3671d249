//! The report of one migration as it travels (`Progress`, `MigrateDone`, `Complete`): per round and in
//! total. `perfplus::report` assembles it and renders it as a table; as JSON it is this serde form.
//!
//! The JSON field names are a fixed point that scripts rely on (`scripts/demo.sh --json`).

use serde::{Deserialize, Serialize};

/// One 30-day month in milliseconds: the period availability is computed over.
pub const MONTH_MS: f64 = 2_592_000_000.0;

/// What one pre-copy round did. `sent_pages + skipped_unchanged + skipped_zero + skipped_held` always
/// equals `dirty_pages`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// 1 is the first full pass; the last round is the stop-and-copy with the guest paused.
    pub round: u32,
    /// True for the final stop-and-copy round.
    pub stop_and_copy: bool,
    /// Pages the tracker reported (every page for round 1).
    pub dirty_pages: u64,
    /// Pages sent with their full 4 KiB content.
    pub sent_pages: u64,
    /// Dirty pages whose content hash equals the one last sent for that page: not sent.
    pub skipped_unchanged: u64,
    /// Pages sent as a zero marker.
    pub skipped_zero: u64,
    /// Pages sent as a reference to content the destination already holds.
    pub skipped_held: u64,
    /// References the destination could not resolve and that were sent again in full.
    pub resent_missing: u64,
    /// Pages read from guest memory (and hashed) in this round: the dirty pages less those known to be
    /// zero without reading (holes of guest memory, in round 1). What the round's time was spent on.
    pub read_pages: u64,
    /// Bytes this round put on the wire (frames, both directions).
    pub bytes_on_wire: u64,
    /// Wall time of the round.
    pub duration_ms: f64,
    /// Bandwidth the round achieved, in Mbit/s.
    pub bandwidth_mbps: f64,
}

/// The report of one migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub vm: String,
    pub source: String,
    pub destination: String,
    /// "precopy", "postcopy" or "hybrid" (as asked).
    pub mode: String,
    /// Names the migration (for `perfplus migrate --resume ID`).
    pub migration_id: String,
    /// Hybrid: pre-copy could not converge and the migration finished in post-copy (always true for
    /// mode "postcopy").
    pub switched_to_postcopy: bool,
    /// Post-copy: from the resume on the destination until every page was present there.
    pub postcopy_ms: f64,
    /// Post-copy: pages the destination lacked at the switch (never sent, or dirtied since).
    pub postcopy_pages: u64,
    /// Post-copy: faults (guest or agent) that needed a page from the source.
    pub demand_faults: u64,
    /// Post-copy: faults the destination resolved locally (pages known to be zero).
    pub local_faults: u64,
    /// Post-copy: fault to page installed, for the faults that went to the source.
    pub fault_latency_us: Latency,
    /// Post-copy: missing pages sent because the destination asked for them.
    pub pages_demanded: u64,
    /// Post-copy: missing pages sent by the background push (eager pages sent with the switch included).
    pub pages_pushed: u64,
    /// Post-copy: pages sent a second time (lost with a connection, or a reference the destination
    /// could not resolve). Zero means every missing page crossed the network exactly once.
    pub pages_resent: u64,
    /// Post-copy: pages first sent as a reference the destination could not resolve, then in full.
    pub refs_resent: u64,
    /// Post-copy: of the pages demanded and pushed, how many went with their full content (the others as
    /// zero markers or references to content the destination held).
    pub postcopy_full_pages: u64,
    /// Post-copy: times the migration resumed after a lost connection.
    pub reconnects: u32,
    /// Dirty tracker used on the source.
    pub tracker: String,
    /// Whether Perf+ hashing (skip unchanged, references to held content) was on.
    pub hashing: bool,
    pub memory_bytes: u64,
    pub rounds: Vec<RoundReport>,
    /// Guest paused on the source until it runs on the destination, as the agents measured it.
    pub downtime_ms: f64,
    /// From the start of the migration until the destination confirmed the guest running.
    pub total_ms: f64,
    /// Every byte both agents exchanged on the migration connection, framing included.
    pub bytes_on_wire: u64,
    /// Average bandwidth over the whole migration, in Mbit/s.
    pub average_mbps: f64,
    /// CPU time (user + system) the source and destination agents spent on the migration.
    pub agent_cpu_ms: f64,
    pub source_cpu_ms: f64,
    pub destination_cpu_ms: f64,
    /// How the migration ended: `completed` only when the destination confirmed what it holds.
    pub outcome: Outcome,
    /// Why, when the outcome is not `completed`.
    pub outcome_detail: Option<String>,
    /// Pages whose content differs between source (paused at the switch) and destination (at resume).
    pub lost_pages: u64,
    /// True when every page's checksum matched on both sides.
    pub memory_digest_equal: bool,
    /// Availability over a 30-day month with this migration's downtime: (month - downtime) / month.
    pub sla_percent: f64,
    /// Longest time the guest itself saw itself not running (its TSC), across the migration.
    pub guest_max_stall_ms: Option<f64>,
    /// True when the guest's self-check completed a full sweep on the destination and found nothing.
    pub guest_verified: bool,
    /// Guest counters on the destination after the switch (progress evidence).
    pub guest_pages_written_before: Option<u64>,
    pub guest_pages_written_after: Option<u64>,
    pub guest_mismatches: Option<u64>,
    /// Pages the destination already held, by where they were found.
    pub held_from_store: u64,
    pub held_from_hosted_vms: u64,
    pub held_from_this_migration: u64,
    /// Why pre-copy stopped iterating: "converged" or "round limit".
    pub stop_reason: String,
    /// Order of the pages within a round: "hot-last" or "address".
    pub order: String,
    /// Forecast made after round 2 from the measured dirty rate and processing rate: rounds in all
    /// (None: pre-copy was not expected to converge) and downtime, to compare with `rounds` and
    /// `downtime_ms`.
    pub predicted_rounds: Option<u32>,
    pub predicted_downtime_ms: Option<f64>,
    /// What the eBPF dirty-ring program saw during the pre-copy rounds (dirty-ring VMs only).
    pub ebpf: Option<EbpfReport>,
    /// Compression of the page batches on the migration's connection ("auto", "zstd" or "off") and
    /// what it did (None when off).
    pub compression: String,
    pub compressed: Option<CompressionReport>,
}

/// What compressing page batches did in one migration (the bulk connection's pre-copy rounds and
/// post-copy push; demand answers travel as they are), or what compressing a relayed QEMU stream did
/// (its chunks on the way to the destination; `perfplus::qemu::report`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressionReport {
    /// Batches (or stream chunks) sent compressed, their bytes, and what crossed for them instead. A
    /// batch split in adaptive mode counts with its compressed part only (its pages that looked
    /// incompressible went raw beside it, `frame::compression`).
    pub batches: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// Batches compressed and sent as they were all the same: they shrank by less than 5 %.
    pub probes_unused: u64,
    /// CPU time spent compressing (and, for page batches, estimating and splitting them).
    pub cpu_ms: f64,
    /// Of `batches`, how many were compressed at zstd's levels 1, 2 and 3 (adaptive mode moves
    /// between them by zstd's measured speed against the link's rate).
    #[serde(default)]
    pub batches_at_level: [u64; 3],
}

impl From<crate::frame::CompressionStats> for CompressionReport {
    fn from(s: crate::frame::CompressionStats) -> CompressionReport {
        CompressionReport {
            batches: s.batches,
            raw_bytes: s.raw_bytes,
            wire_bytes: s.compressed_bytes,
            probes_unused: s.probes_unused,
            cpu_ms: s.cpu.as_secs_f64() * 1e3,
            batches_at_level: s.batches_at_level,
        }
    }
}

/// How a migration that reached `Running` ended. (One that did not returns an error instead of a
/// report: the guest then runs on the source, or, after the commit, waits paused there.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The guest runs on the destination, every page's checksum matched and the guest's self-check
    /// passed there (or the guest has none).
    #[default]
    Completed,
    /// The guest runs on the destination, but what it holds was not confirmed (checksums or the guest
    /// check missing, or the self-check failed).
    Unverified,
    /// Pages differ between the source's copy and the destination's.
    PagesLost,
    /// Post-copy ended before every page reached the destination (the link stayed down past the time
    /// limit, or an operator cancelled): the destination's guest lacks pages and is paused there; the
    /// source's paused copy is stale since the switch. The guest is lost unless the link comes back.
    PostcopyBroken,
    /// An operator cancelled the migration before the commit: the guest keeps running on the source.
    Cancelled,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Unverified => "unverified",
            Outcome::PagesLost => "pages-lost",
            Outcome::PostcopyBroken => "postcopy-broken",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// eBPF figures of one migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EbpfReport {
    /// Pages the guest's vCPUs pushed to their dirty rings, as the tracepoint program counted them.
    pub write_events: u64,
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub count: u64,
}

impl Latency {
    /// Percentiles of `samples` (sorted here).
    pub fn of(samples: &mut [f64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50: at(0.5),
            p99: at(0.99),
            max: samples[samples.len() - 1],
            count: samples.len() as u64,
        }
    }
}

/// Availability in percent over a 30-day month for a given downtime.
pub fn sla_percent(downtime_ms: f64) -> f64 {
    (MONTH_MS - downtime_ms) / MONTH_MS * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sla_matches_the_papers_formula() {
        // Xen PV + Perf+ in the papers: 110 ms downtime -> 99.99999576 %.
        let sla = sla_percent(110.0);
        assert!((sla - 99.999_995_756).abs() < 1e-8, "{sla}");
        assert_eq!(sla_percent(0.0), 100.0);
    }

    #[test]
    fn json_has_the_fixed_field_names() {
        let report = MigrationReport {
            rounds: vec![RoundReport::default()],
            ..Default::default()
        };
        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "rounds",
            "downtime_ms",
            "total_ms",
            "bytes_on_wire",
            "agent_cpu_ms",
            "lost_pages",
            "outcome",
            "sla_percent",
            "guest_verified",
            "guest_max_stall_ms",
            "memory_digest_equal",
            "mode",
            "switched_to_postcopy",
            "postcopy_ms",
            "demand_faults",
            "fault_latency_us",
            "pages_demanded",
            "pages_pushed",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        for field in [
            "dirty_pages",
            "sent_pages",
            "skipped_unchanged",
            "skipped_zero",
            "skipped_held",
            "bytes_on_wire",
        ] {
            assert!(json["rounds"][0].get(field).is_some(), "missing rounds[].{field}");
        }
        assert!(json["fault_latency_us"].get("p99").is_some());
        let mut samples = vec![3.0, 1.0, 2.0];
        let l = Latency::of(&mut samples);
        assert_eq!((l.p50, l.max, l.count), (2.0, 3.0, 3));
    }
}
