//! The measurements of one migration: per round and in total, as a human table and as JSON.
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
    /// "precopy".
    pub mode: String,
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
}

/// Availability in percent over a 30-day month for a given downtime.
pub fn sla_percent(downtime_ms: f64) -> f64 {
    (MONTH_MS - downtime_ms) / MONTH_MS * 100.0
}
