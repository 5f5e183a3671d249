//! The agent's Prometheus metrics: one process-wide registry (one agent per process), fed by the agent
//! (migrations, from their reports) and by the engine (post-copy fault latency, as each fault is
//! resolved), rendered in the text exposition format by [`render`] for `GET /metrics`.
//!
//! Who counts what: the *source* agent counts a migration, its pages, rounds, downtime and the guest's
//! felt stall, from the report it assembles; the *destination* counts arrivals and the post-copy
//! faults it measures. So a migration between two agents shows once in each agent's metrics, on its
//! own side.
use std::sync::LazyLock;

use perfplus_protocol::frame::{FULL_ITEM_LEN, REF_ITEM_LEN, ZERO_ITEM_LEN};
use perfplus_protocol::report::MigrationReport;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The agent's metrics. Names and labels are listed in README.md ("Metrics").
pub struct Metrics {
    registry: Registry,
    /// VMs hosted now (set at each scrape).
    pub vms_hosted: IntGauge,
    /// Outgoing migrations by outcome: the report's (`completed`, `unverified`, `pages-lost`,
    /// `postcopy-broken`, `cancelled`) or `failed` (no report: the guest stayed on the source).
    pub migrations: IntCounterVec,
    /// Incoming migrations by result: `hosted` or `failed`.
    pub incoming: IntCounterVec,
    /// Pre-copy pages by what was sent for them: `full`, `zero`, `held`, `unchanged` (the four add up
    /// to the rounds' dirty pages).
    pub pages: IntCounterVec,
    /// Bytes of the page items in `Pages` frames, by kind (an `unchanged` page sends none).
    pub page_bytes: IntCounterVec,
    /// References the destination could not resolve, sent again in full.
    pub pages_resent: IntCounter,
    /// Post-copy pages by how they went: `demanded` or `pushed`.
    pub postcopy_pages: IntCounterVec,
    /// Every byte on the migration connections (the reports' `bytes_on_wire`).
    pub wire_bytes: IntCounter,
    pub round_seconds: Histogram,
    pub downtime_seconds: Histogram,
    /// The guest's own longest stall (`guest_max_stall_ms`), when the guest measures it.
    pub guest_stall_seconds: Histogram,
    /// Post-copy: fault to page installed, for each fault that went to the source.
    pub fault_latency_seconds: Histogram,
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Buckets of durations that are milliseconds to seconds (rounds, downtime, stall).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of a post-copy fault's latency: a local fault costs ~7 µs here, a fault over a link more.
const FAULT_BUCKETS: &[f64] = &[
    5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.05, 0.1, 1.0,
];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
            let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("metric");
            registry.register(Box::new(vec.clone())).expect("registering a metric");
            vec
        }
        fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("metric");
            registry.register(Box::new(h.clone())).expect("registering a metric");
            h
        }
        fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
            let c = IntCounter::new(name, help).expect("metric");
            registry.register(Box::new(c.clone())).expect("registering a metric");
            c
        }
        let vms_hosted = IntGauge::new("perfplus_vms_hosted", "VMs this agent hosts").expect("metric");
        registry
            .register(Box::new(vms_hosted.clone()))
            .expect("registering a metric");
        let metrics = Metrics {
            vms_hosted,
            migrations: counter_vec(
                &registry,
                "perfplus_migrations_total",
                "Outgoing migrations by outcome (failed: no report, the guest stayed here)",
                "outcome",
            ),
            incoming: counter_vec(
                &registry,
                "perfplus_incoming_migrations_total",
                "Incoming migrations by result",
                "result",
            ),
            pages: counter_vec(
                &registry,
                "perfplus_migration_pages_total",
                "Pre-copy pages of outgoing migrations by what was sent for them",
                "kind",
            ),
            page_bytes: counter_vec(
                &registry,
                "perfplus_migration_page_bytes_total",
                "Bytes of page items sent by outgoing pre-copy rounds, by kind",
                "kind",
            ),
            pages_resent: counter(
                &registry,
                "perfplus_migration_pages_resent_total",
                "References the destination could not resolve, sent again in full",
            ),
            postcopy_pages: counter_vec(
                &registry,
                "perfplus_postcopy_pages_total",
                "Post-copy pages of outgoing migrations, by how they went",
                "how",
            ),
            wire_bytes: counter(
                &registry,
                "perfplus_migration_wire_bytes_total",
                "Bytes on the connections of outgoing migrations (frames, both directions)",
            ),
            round_seconds: histogram(
                &registry,
                "perfplus_migration_round_duration_seconds",
                "Duration of each pre-copy round (the stop-and-copy included)",
                SECONDS_BUCKETS,
            ),
            downtime_seconds: histogram(
                &registry,
                "perfplus_migration_downtime_seconds",
                "Downtime of each outgoing migration, as the agents measured it",
                SECONDS_BUCKETS,
            ),
            guest_stall_seconds: histogram(
                &registry,
                "perfplus_migration_guest_stall_seconds",
                "Longest stall the guest itself felt during each outgoing migration",
                SECONDS_BUCKETS,
            ),
            fault_latency_seconds: histogram(
                &registry,
                "perfplus_postcopy_fault_latency_seconds",
                "Post-copy faults on this destination: fault to page installed, for faults sent to the source",
                FAULT_BUCKETS,
            ),
            registry,
        };
        // Every label value shows from the start (at 0), so a scrape sees the full set.
        for outcome in [
            "completed",
            "unverified",
            "pages-lost",
            "postcopy-broken",
            "cancelled",
            "failed",
        ] {
            metrics.migrations.with_label_values(&[outcome]);
        }
        for result in ["hosted", "failed"] {
            metrics.incoming.with_label_values(&[result]);
        }
        for kind in ["full", "zero", "held", "unchanged"] {
            metrics.pages.with_label_values(&[kind]);
            metrics.page_bytes.with_label_values(&[kind]);
        }
        for how in ["demanded", "pushed"] {
            metrics.postcopy_pages.with_label_values(&[how]);
        }
        metrics
    }

    /// Counts an outgoing migration that ended with a report.
    pub fn record_report(&self, report: &MigrationReport) {
        self.migrations.with_label_values(&[report.outcome.name()]).inc();
        for round in &report.rounds {
            let kinds = [
                ("full", round.sent_pages, FULL_ITEM_LEN),
                ("zero", round.skipped_zero, ZERO_ITEM_LEN),
                ("held", round.skipped_held, REF_ITEM_LEN),
                ("unchanged", round.skipped_unchanged, 0),
            ];
            for (kind, pages, item_len) in kinds {
                self.pages.with_label_values(&[kind]).inc_by(pages);
                self.page_bytes
                    .with_label_values(&[kind])
                    .inc_by(pages * item_len as u64);
            }
            self.pages_resent.inc_by(round.resent_missing);
            self.round_seconds.observe(round.duration_ms / 1e3);
        }
        self.postcopy_pages
            .with_label_values(&["demanded"])
            .inc_by(report.pages_demanded);
        self.postcopy_pages
            .with_label_values(&["pushed"])
            .inc_by(report.pages_pushed);
        self.wire_bytes.inc_by(report.bytes_on_wire);
        self.downtime_seconds.observe(report.downtime_ms / 1e3);
        if let Some(stall_ms) = report.guest_max_stall_ms {
            self.guest_stall_seconds.observe(stall_ms / 1e3);
        }
    }

    /// Counts an outgoing migration that failed without a report.
    pub fn record_failed(&self) {
        self.migrations.with_label_values(&["failed"]).inc();
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics as text");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use perfplus_protocol::report::RoundReport;

    #[test]
    fn a_report_moves_the_counters_by_its_figures() {
        let metrics = Metrics::new();
        let report = MigrationReport {
            rounds: vec![
                RoundReport {
                    dirty_pages: 100,
                    sent_pages: 10,
                    skipped_zero: 50,
                    skipped_held: 30,
                    skipped_unchanged: 10,
                    duration_ms: 3.0,
                    ..RoundReport::default()
                },
                RoundReport {
                    dirty_pages: 5,
                    sent_pages: 5,
                    resent_missing: 1,
                    duration_ms: 1.0,
                    ..RoundReport::default()
                },
            ],
            bytes_on_wire: 12345,
            downtime_ms: 4.0,
            guest_max_stall_ms: Some(6.0),
            ..MigrationReport::default()
        };
        metrics.record_report(&report);
        metrics.record_failed();
        let text = metrics.render();
        for line in [
            "perfplus_migrations_total{outcome=\"completed\"} 1",
            "perfplus_migrations_total{outcome=\"failed\"} 1",
            "perfplus_migrations_total{outcome=\"cancelled\"} 0",
            "perfplus_migration_pages_total{kind=\"full\"} 15",
            "perfplus_migration_pages_total{kind=\"zero\"} 50",
            "perfplus_migration_pages_total{kind=\"held\"} 30",
            "perfplus_migration_pages_total{kind=\"unchanged\"} 10",
            "perfplus_migration_page_bytes_total{kind=\"full\"} 61815",
            "perfplus_migration_page_bytes_total{kind=\"zero\"} 450",
            "perfplus_migration_pages_resent_total 1",
            "perfplus_migration_wire_bytes_total 12345",
            "perfplus_migration_round_duration_seconds_count 2",
            "perfplus_migration_downtime_seconds_bucket{le=\"0.005\"} 1",
            "perfplus_migration_guest_stall_seconds_bucket{le=\"0.005\"} 0",
            "perfplus_migration_guest_stall_seconds_bucket{le=\"0.01\"} 1",
            "perfplus_postcopy_fault_latency_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
