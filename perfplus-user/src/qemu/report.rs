//! The report of a relayed QEMU migration: QEMU's own figures (`query-migrate`), what the relay did
//! with QEMU's pages, and what the destination agent and QEMU said.

use std::path::Path;

use perfplus_protocol::frame::CompressionStats;
use perfplus_protocol::report::CompressionReport;
use perfplus_protocol::{Compression, QemuRelayDone};
use perfplus_qemu::relay::{PageCounts, RelayStats};

use super::held::Archived;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Pages by kind, as the report shows them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Pages {
    /// Sent whole.
    pub full: u64,
    /// Sent as a reference to a page of this migration the destination agent held.
    pub referenced: u64,
    /// Sent as a reference to a page the destination host held before (its page store, its VMs).
    #[serde(default)]
    pub host_referenced: u64,
    /// Dropped: the destination QEMU had this content at this address.
    pub unchanged: u64,
    /// Zero records passed on, and dropped as unchanged.
    pub zero: u64,
    pub zero_unchanged: u64,
}

impl From<PageCounts> for Pages {
    fn from(c: PageCounts) -> Pages {
        Pages {
            full: c.full,
            referenced: c.referenced,
            host_referenced: c.host_referenced,
            unchanged: c.unchanged,
            zero: c.zero,
            zero_unchanged: c.zero_unchanged,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QemuReport {
    pub qmp: String,
    pub destination: String,
    pub qemu_version: String,
    /// QEMU's final status (`completed`, `failed`, `cancelled`).
    pub status: String,
    /// QEMU's passes over memory (`dirty-sync-count`).
    pub rounds: u64,
    pub total_ms: f64,
    /// Downtime as QEMU reports it.
    pub downtime_ms: f64,
    pub setup_ms: f64,
    /// RAM sections QEMU sent (a section per ~50 ms slice of a pass).
    pub sections: u64,
    pub precopy: Pages,
    pub stop_and_copy: Pages,
    /// Bytes of QEMU's stream, bytes the relay sent to the destination (frames included), bytes the
    /// destination agent wrote into the destination QEMU's stream.
    pub qemu_bytes: u64,
    pub link_bytes: u64,
    pub destination_qemu_bytes: u64,
    /// Bytes of QEMU's return path relayed back.
    pub return_path_bytes: u64,
    /// Compression of the relayed stream on the link ("auto", "zstd" or "off") and what it did (None
    /// when off), as in perfplus's own report: `link_bytes` counts the compressed chunks as they
    /// crossed.
    pub compression: String,
    pub compressed: Option<CompressionReport>,
    /// The destination QEMU's `query-migrate` status and run state (with `--destination-qmp`).
    pub destination_status: Option<String>,
    pub destination_run_state: Option<String>,
    /// What the destination agent expanded: references to pages of this migration, and to pages its
    /// host held before (page store, hosted VMs); both re-hashed before QEMU got them.
    #[serde(default)]
    pub destination_expanded: u64,
    #[serde(default)]
    pub destination_expanded_host: u64,
    /// Pages each agent put into its page store afterwards (the source once QEMU completed, the
    /// destination once the stream was written whole), and pages their archives skipped.
    #[serde(default)]
    pub archived_pages: u64,
    #[serde(default)]
    pub archive_skipped: u64,
    #[serde(default)]
    pub destination_archived_pages: u64,
    #[serde(default)]
    pub destination_archive_skipped: u64,
}

impl QemuReport {
    pub fn new(
        qmp: &Path,
        destination: &str,
        version: (u64, u64, u64),
        info: &Value,
        stats: RelayStats,
        link_bytes: u64,
        done: QemuRelayDone,
    ) -> QemuReport {
        let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        QemuReport {
            qmp: qmp.display().to_string(),
            destination: destination.to_string(),
            qemu_version: format!("{}.{}.{}", version.0, version.1, version.2),
            status: info["status"].as_str().unwrap_or("unknown").to_string(),
            rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            total_ms: number(&info["total-time"]),
            downtime_ms: number(&info["downtime"]),
            setup_ms: number(&info["setup-time"]),
            sections: stats.sections,
            precopy: stats.precopy.into(),
            stop_and_copy: stats.stop_and_copy.into(),
            qemu_bytes: stats.bytes_in,
            link_bytes,
            destination_qemu_bytes: done.bytes_out,
            return_path_bytes: stats.return_path_bytes,
            compression: Compression::Off.to_string(),
            compressed: None,
            destination_status: done.qemu_migration_status,
            destination_run_state: done.qemu_run_state,
            destination_expanded: done.pages_expanded,
            destination_expanded_host: done.pages_expanded_host,
            archived_pages: 0,
            archive_skipped: 0,
            destination_archived_pages: done.pages_archived,
            destination_archive_skipped: done.archive_skipped,
        }
    }

    /// What the source agent's archive did.
    pub fn with_archive(self, archived: Archived) -> QemuReport {
        QemuReport {
            archived_pages: archived.pages,
            archive_skipped: archived.skipped,
            ..self
        }
    }

    /// The report with what compression of the relayed stream (`compression`) did on the link.
    pub fn with_compression(mut self, compression: Compression, stats: Option<CompressionStats>) -> QemuReport {
        self.compression = compression.to_string();
        self.compressed = stats.map(CompressionReport::from);
        self
    }

    /// Completed on the source, and on the destination too when its QEMU was asked.
    pub fn succeeded(&self) -> bool {
        self.status == "completed" && self.destination_status.as_deref().is_none_or(|s| s == "completed")
    }

    /// The report as a human reads it.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        const MB: f64 = 1e6;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "QEMU {} migration ({}) -> {} through perfplus: {}",
            self.qemu_version, self.qmp, self.destination, self.status
        );
        let _ = writeln!(
            out,
            "QEMU: {} rounds (dirty syncs), {} RAM sections, total {:.0} ms, downtime {:.0} ms, setup {:.0} ms",
            self.rounds, self.sections, self.total_ms, self.downtime_ms, self.setup_ms
        );
        let _ = writeln!(out, "{:<28} {:>12} {:>14}", "pages", "pre-copy", "stop-and-copy");
        let (pre, stop) = (&self.precopy, &self.stop_and_copy);
        for (name, pre, stop) in [
            ("sent whole", pre.full, stop.full),
            ("reference (this migration)", pre.referenced, stop.referenced),
            (
                "reference (host's store/VMs)",
                pre.host_referenced,
                stop.host_referenced,
            ),
            ("dropped (unchanged)", pre.unchanged, stop.unchanged),
            ("zero records", pre.zero, stop.zero),
            ("zero dropped (unchanged)", pre.zero_unchanged, stop.zero_unchanged),
        ] {
            let _ = writeln!(out, "{name:<28} {pre:>12} {stop:>14}");
        }
        let ratio = if self.qemu_bytes > 0 {
            self.link_bytes as f64 / self.qemu_bytes as f64
        } else {
            f64::NAN
        };
        let _ = writeln!(
            out,
            "bytes: QEMU sent {:.1} MB, the link carried {:.1} MB ({ratio:.2}x), the destination QEMU got {:.1} MB",
            self.qemu_bytes as f64 / MB,
            self.link_bytes as f64 / MB,
            self.destination_qemu_bytes as f64 / MB
        );
        let _ = writeln!(out, "{}", self.compression_line());
        let _ = writeln!(
            out,
            "destination agent: expanded {} references to pages of this migration and {} to pages its host held (page store, VMs), each re-hashed",
            self.destination_expanded, self.destination_expanded_host
        );
        let _ = writeln!(
            out,
            "page stores: {} pages archived here ({} skipped), {} at the destination ({} skipped)",
            self.archived_pages,
            self.archive_skipped,
            self.destination_archived_pages,
            self.destination_archive_skipped
        );
        let _ = writeln!(
            out,
            "destination QEMU: {}, {}",
            self.destination_status
                .as_deref()
                .unwrap_or("status not asked (no --destination-qmp)"),
            self.destination_run_state.as_deref().unwrap_or("run state not asked")
        );
        out
    }

    /// What compression did, in a line.
    fn compression_line(&self) -> String {
        const MB: f64 = 1e6;
        match &self.compressed {
            None => format!("compression: {}", self.compression),
            Some(c) if c.batches == 0 => format!(
                "compression: {}, no chunk compressed ({} tried that did not shrink, {:.0} ms of CPU)",
                self.compression, c.probes_unused, c.cpu_ms
            ),
            Some(c) => {
                let ratio = c.raw_bytes as f64 / c.wire_bytes.max(1) as f64;
                format!(
                    "compression: {}, {} chunks compressed ({:.1} MB of stream in {:.1} MB, {ratio:.2}x), {} tried \
                     that did not shrink, {:.0} ms of CPU",
                    self.compression,
                    c.batches,
                    c.raw_bytes as f64 / MB,
                    c.wire_bytes as f64 / MB,
                    c.probes_unused,
                    c.cpu_ms
                )
            }
        }
    }
}

/// One progress line from QEMU's `query-migrate`.
pub fn progress_line(info: &Value) -> String {
    let ram = &info["ram"];
    format!(
        "QEMU: {} round {}, {:.1} MB sent, {:.1} MB remaining, {} pages whole, {} zero",
        info["status"].as_str().unwrap_or("?"),
        ram["dirty-sync-count"].as_u64().unwrap_or(0),
        ram["transferred"].as_f64().unwrap_or(0.0) / 1e6,
        ram["remaining"].as_f64().unwrap_or(0.0) / 1e6,
        ram["normal"].as_u64().unwrap_or(0),
        ram["duplicate"].as_u64().unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn report() -> QemuReport {
        let info = serde_json::json!({"status": "completed", "total-time": 600, "downtime": 14, "setup-time": 2});
        let mut stats = RelayStats::default();
        stats.bytes_in = 30_000_000;
        QemuReport::new(
            Path::new("/run/q.qmp"),
            "10.0.0.2:7001",
            (7, 2, 22),
            &info,
            stats,
            11_000_000,
            QemuRelayDone::default(),
        )
    }

    #[test]
    fn the_table_says_what_compression_did() {
        let off = report();
        assert_eq!((off.compression.as_str(), off.compressed.as_ref()), ("off", None));
        assert!(off.table().contains("\ncompression: off\n"), "{}", off.table());
        let auto = report().with_compression(
            Compression::Auto,
            Some(CompressionStats {
                probes_unused: 7,
                ..Default::default()
            }),
        );
        assert!(
            auto.table()
                .contains("compression: auto, no chunk compressed (7 tried that did not shrink, 0 ms of CPU)"),
            "{}",
            auto.table()
        );
        let zstd = report().with_compression(
            Compression::Zstd,
            Some(CompressionStats {
                batches: 86,
                raw_bytes: 12_373_040,
                compressed_bytes: 10_094_752,
                probes_unused: 17,
                cpu: Duration::from_millis(60),
                batches_at_level: [86, 0, 0],
            }),
        );
        let table = zstd.table();
        assert!(
            table.contains(
                "compression: zstd, 86 chunks compressed (12.4 MB of stream in 10.1 MB, 1.23x), 17 tried that \
                 did not shrink, 60 ms of CPU"
            ),
            "{table}"
        );
        // And in the JSON, as perfplus's own report has them.
        let json = serde_json::to_value(&zstd).unwrap();
        assert_eq!(json["compression"], "zstd");
        assert_eq!(json["compressed"]["wire_bytes"], 10_094_752);
        assert_eq!(json["compressed"]["cpu_ms"], 60.0);
    }
}
