//! The report as a human reads it: the CLI's progress lines and the final table.
use perfplus_protocol::report::{MigrationReport, RoundReport};

const MIB: f64 = 1024.0 * 1024.0;

/// One progress line, as the CLI prints it while the migration runs.
pub fn progress_line(r: &RoundReport) -> String {
    format!(
        "round {:>2}{}: {} dirty, {} sent, skipped {} unchanged / {} zero / {} held, {:.1} MiB in {:.1} ms ({:.0} Mbit/s)",
        r.round,
        if r.stop_and_copy { " (stop-and-copy)" } else { "" },
        r.dirty_pages,
        r.sent_pages,
        r.skipped_unchanged,
        r.skipped_zero,
        r.skipped_held,
        r.bytes_on_wire as f64 / MIB,
        r.duration_ms,
        r.bandwidth_mbps
    )
}

/// The report as a human reads it.
pub fn table(r: &MigrationReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration of {} ({} MiB): {} -> {}  [{}, tracker {}, Perf+ hashing {}]",
        r.vm,
        r.memory_bytes / (1 << 20),
        r.source,
        r.destination,
        r.mode,
        r.tracker,
        if r.hashing { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "{:>5} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7} {:>10} {:>9} {:>8}",
        "round", "dirty", "sent", "unchanged", "zero", "held", "resent", "wire MiB", "ms", "Mbit/s"
    );
    for r in &r.rounds {
        let _ = writeln!(
            out,
            "{:>4}{} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7} {:>10.2} {:>9.1} {:>8.0}",
            r.round,
            if r.stop_and_copy { "*" } else { " " },
            r.dirty_pages,
            r.sent_pages,
            r.skipped_unchanged,
            r.skipped_zero,
            r.skipped_held,
            r.resent_missing,
            r.bytes_on_wire as f64 / MIB,
            r.duration_ms,
            r.bandwidth_mbps
        );
    }
    let _ = writeln!(out, "  (* = stop-and-copy with the guest paused; {})", r.stop_reason);
    let forecast = match (r.rounds.len() > 2, r.predicted_rounds, r.predicted_downtime_ms) {
        (false, _, _) => "none (fewer than 3 rounds)".to_string(),
        (true, Some(rounds), Some(ms)) => format!("{rounds} rounds, {ms:.1} ms downtime"),
        (true, _, _) => "no convergence before the round limit".to_string(),
    };
    let _ = writeln!(
        out,
        "forecast after r2   {forecast}; outcome {} rounds, {:.1} ms (order: {})",
        r.rounds.len(),
        r.downtime_ms,
        r.order
    );
    let stall = r
        .guest_max_stall_ms
        .map_or("not measured".to_string(), |ms| format!("{ms:.1} ms"));
    let _ = writeln!(
        out,
        "downtime            {:.1} ms (the guest itself saw a longest stall of {stall})",
        r.downtime_ms
    );
    let _ = writeln!(out, "total time          {:.1} ms", r.total_ms);
    let _ = writeln!(
        out,
        "bytes on the wire   {:.1} MiB ({} bytes, average {:.0} Mbit/s)",
        r.bytes_on_wire as f64 / MIB,
        r.bytes_on_wire,
        r.average_mbps
    );
    let _ = writeln!(
        out,
        "agent CPU           {:.0} ms (source {:.0} ms, destination {:.0} ms)",
        r.agent_cpu_ms, r.source_cpu_ms, r.destination_cpu_ms
    );
    let _ = writeln!(
        out,
        "held at destination {} from this migration, {} from hosted VMs, {} from the page store",
        r.held_from_this_migration, r.held_from_hosted_vms, r.held_from_store
    );
    let _ = writeln!(
        out,
        "lost pages          {} (memory digests {})",
        r.lost_pages,
        if r.memory_digest_equal { "equal" } else { "DIFFER" }
    );
    let progress = match (r.guest_pages_written_before, r.guest_pages_written_after) {
        (Some(before), Some(after)) => format!(", pages written {before} -> {after}"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "guest r-check    {}{progress}",
        if r.guest_verified {
            "passed on the destination".to_string()
        } else {
            format!("NOT verified (mismatches: {:?})", r.guest_mismatches)
        }
    );
    if r.switched_to_postcopy {
        let _ = writeln!(
            out,
            "post-copy           {:.1} ms until all {} missing pages were present: {} demanded, {} pushed, {} resent, {} refs resent in full, {} in full; {} reconnects",
            r.postcopy_ms,
            r.postcopy_pages,
            r.pages_demanded,
            r.pages_pushed,
            r.pages_resent,
            r.refs_resent,
            r.postcopy_full_pages,
            r.reconnects
        );
        let _ = writeln!(
            out,
            "demand faults       {} (+{} resolved locally), latency p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            r.demand_faults, r.local_faults, r.fault_latency_us.p50, r.fault_latency_us.p99, r.fault_latency_us.max
        );
    }
    if let Some(ebpf) = &r.ebpf {
        let _ = writeln!(
            out,
            "eBPF write events   {} (dirty-ring tracepoint, used as write heat)",
            ebpf.write_events
        );
    }
    let _ = writeln!(out, "availability        {:.9} % over a 30-day month", r.sla_percent);
    match &r.outcome_detail {
        Some(detail) => {
            let _ = writeln!(out, "outcome             {}: {detail}", r.outcome.name().to_uppercase());
        }
        None => {
            let _ = writeln!(out, "outcome             {}", r.outcome.name());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_lost_pages() {
        let report = MigrationReport {
            rounds: vec![RoundReport::default()],
            ..Default::default()
        };
        assert!(table(&report).contains("lost pages"));
        assert!(progress_line(&report.rounds[0]).starts_with("round  0"));
    }
}
