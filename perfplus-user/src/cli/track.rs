//! `perfplus track`: how fast a process or a hosted VM writes its memory, and whether pre-copy can
//! keep up with it.
//!
//! - `--pid PID`: the CLI itself attaches the eBPF `page_fault_user` program to the process and reports
//!   its write faults per interval (see [`crate::ebpf`] for what a write fault is).
//! - `--vm NAME --agent ADDR`: the agent that hosts the VM measures it (`agent::track`): exactly, with a
//!   `DirtyLogTracker` on the VM (the same KVM dirty bitmap a migration uses, so tracking is refused
//!   while the VM migrates and a migration is refused while it is tracked), plus the eBPF dirty-ring
//!   heat when the kernel lets the agent attach it (it only sees VMs in dirty-ring mode).
//!
//! - `--qmp PATH`: a QEMU guest. Its write faults never reach the host (KVM maps guest memory
//!   writable), so eBPF on the QEMU process sees nothing of them; QEMU measures instead
//!   (`calc-dirty-rate`, then `query-dirty-rate` once it says `measured`), in one of two modes
//!   ([`QemuDirtyMode`]): sampled content changes, or KVM's dirty log.
//!
//! Each interval prints a line (or, with `--json`, one JSON object): dirty pages and their rate, the
//! working set (distinct pages written in the interval), the hottest 2 MiB regions, and a verdict: the
//! dirty rate against the migration link (`--link`, default 1 Gbit/s).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use serde_json::{json, Value};

use crate::ebpf::{EbpfHeat, HeatSource, HOTTEST, REGION_BYTES};
use perfplus_protocol::{Credentials, Message, Role, TrackRegion, TrackRequest, TrackSample};

/// What the CLI asked for.
#[derive(Clone, Debug)]
pub struct TrackOptions {
    pub interval: Duration,
    /// Stop after this long (None: until interrupted).
    pub duration: Option<Duration>,
    pub json: bool,
    /// Migration link, bits per second.
    pub link_bits_per_s: f64,
}

impl TrackOptions {
    /// Intervals to run (0: unlimited).
    fn intervals(&self) -> u32 {
        match self.duration {
            None => 0,
            Some(d) => ((d.as_secs_f64() / self.interval.as_secs_f64()).round() as u32).max(1),
        }
    }

    fn link_pages_per_s(&self) -> f64 {
        self.link_bits_per_s / 8.0 / PAGE_SIZE as f64
    }
}

/// `1gbit`, `10Gbit`, `100mbit`, `2.5gbit`, `800kbit`, `1000000` (bits/s) → bits per second.
pub fn parse_link(text: &str) -> Result<f64, String> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| c.is_ascii_alphabetic() || c == '/').unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a link speed like 1gbit or 100mbit"))?;
    let scale = match unit.trim() {
        "" | "bit" | "bps" | "bit/s" => 1.0,
        "kbit" | "kbps" | "kbit/s" => 1e3,
        "mbit" | "mbps" | "mbit/s" => 1e6,
        "gbit" | "gbps" | "gbit/s" => 1e9,
        other => {
            return Err(format!(
                "unknown link unit {other:?} in {text:?} (use kbit, mbit or gbit)"
            ))
        }
    };
    if !(value > 0.0 && value.is_finite()) {
        return Err(format!("{text:?}: the link speed must be positive"));
    }
    Ok(value * scale)
}

/// Whether pre-copy keeps up with a dirty rate over a link.
pub fn verdict(dirty_pages_per_s: f64, link_pages_per_s: f64) -> String {
    let share = dirty_pages_per_s / link_pages_per_s;
    let pct = share * 100.0;
    if share < 0.5 {
        format!("converges: dirtying {pct:.1}% of the link")
    } else if share < 1.0 {
        format!("converges slowly: dirtying {pct:.0}% of the link, each round shrinks little")
    } else {
        format!(
            "will not converge under pre-copy: dirtying {share:.1}x the link (throttle the guest, use \
             post-copy, or count on hashing skipping unchanged pages)"
        )
    }
}

/// One interval, as printed.
#[derive(Clone, Debug, PartialEq)]
pub struct IntervalReport {
    pub interval: u32,
    pub elapsed_s: f64,
    pub interval_s: f64,
    pub dirty_pages: u64,
    pub working_set_pages: u64,
    pub hottest: Vec<TrackRegion>,
    pub source: String,
    pub ebpf_events: Option<u64>,
    /// `true`: hottest addresses are guest-physical, else process virtual addresses.
    pub guest: bool,
    pub guest_pages_written: Option<u64>,
    pub note: Option<String>,
}

impl IntervalReport {
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_pages as f64 / self.interval_s.max(1e-9)
    }

    /// Distinct pages written per second: what each pre-copy round has to send again, so what the
    /// verdict is about (a process's write faults may hit the same page several times).
    pub fn working_set_rate(&self) -> f64 {
        self.working_set_pages as f64 / self.interval_s.max(1e-9)
    }

    pub fn to_json(&self, link_pages_per_s: f64) -> Value {
        let addr_key = if self.guest { "region_gpa" } else { "addr" };
        let hottest: Vec<Value> = self
            .hottest
            .iter()
            .map(|r| json!({ addr_key: r.start, "writes": r.writes, "pages": r.pages }))
            .collect();
        let mut v = json!({
            "interval": self.interval,
            "elapsed_s": round3(self.elapsed_s),
            "interval_s": round3(self.interval_s),
            "dirty_pages": self.dirty_pages,
            "dirty_rate_pages_per_s": round3(self.dirty_rate()),
            "working_set_pages": self.working_set_pages,
            "hottest": hottest,
            "source": self.source,
            "ebpf_events": self.ebpf_events,
            "link_pages_per_s": round3(link_pages_per_s),
            "verdict": verdict(self.working_set_rate(), link_pages_per_s),
        });
        if let Some(written) = self.guest_pages_written {
            v["guest_pages_written"] = json!(written);
            v["guest_write_rate_pages_per_s"] = json!(round3(written as f64 / self.interval_s.max(1e-9)));
        }
        if let Some(note) = &self.note {
            v["note"] = json!(note);
        }
        v
    }

    pub fn to_line(&self, link_pages_per_s: f64) -> String {
        let hot: Vec<String> = self
            .hottest
            .iter()
            .take(3)
            .map(|r| format!("{:#x}:{}", r.start, r.writes))
            .collect();
        let mut line = format!(
            "[{:>3}] {:>7.1}s  dirty {:>8} pages ({:>9.0}/s)  working set {:>8} pages  [{}]",
            self.interval,
            self.elapsed_s,
            self.dirty_pages,
            self.dirty_rate(),
            self.working_set_pages,
            self.source
        );
        if let Some(events) = self.ebpf_events {
            line.push_str(&format!("  ebpf {events}"));
        }
        if let Some(written) = self.guest_pages_written {
            line.push_str(&format!(
                "  guest wrote {:.0}/s",
                written as f64 / self.interval_s.max(1e-9)
            ));
        }
        if !hot.is_empty() {
            line.push_str(&format!("  hottest 2M: {}", hot.join(" ")));
        }
        line.push_str(&format!(
            "\n      {}",
            verdict(self.working_set_rate(), link_pages_per_s)
        ));
        line
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints reports as they come and a summary at the end.
struct Printer {
    options: TrackOptions,
    reports: Vec<IntervalReport>,
}

impl Printer {
    fn print(&mut self, report: IntervalReport) {
        let link = self.options.link_pages_per_s();
        if self.options.json {
            println!("{}", report.to_json(link));
        } else {
            println!("{}", report.to_line(link));
        }
        self.reports.push(report);
    }

    fn finish(&self) {
        if self.options.json || self.reports.is_empty() {
            return;
        }
        // The first interval includes the start of tracking; average the later ones when there are any.
        let steady: Vec<&IntervalReport> = if self.reports.len() > 1 {
            self.reports.iter().skip(1).collect()
        } else {
            self.reports.iter().collect()
        };
        let pages: u64 = steady.iter().map(|r| r.working_set_pages).sum();
        let secs: f64 = steady.iter().map(|r| r.interval_s).sum();
        let rate = pages as f64 / secs.max(1e-9);
        let link = self.options.link_pages_per_s();
        println!(
            "average rate of distinct dirty pages {rate:.0} pages/s ({:.1} MiB/s) over {} interval(s); link {:.0} Mbit/s = {link:.0} pages/s",
            rate * PAGE_SIZE as f64 / (1 << 20) as f64,
            steady.len(),
            self.options.link_bits_per_s / 1e6
        );
        println!("verdict: {}", verdict(rate, link));
    }
}

/// `perfplus track --pid PID`: eBPF write faults of any process, measured here.
pub fn track_pid(pid: u32, options: TrackOptions) -> anyhow::Result<()> {
    if is_kvm_hypervisor(pid) {
        bail!(
            "pid {pid} runs a KVM guest: the guest's writes do not fault in the host, so counting the \
             process's write faults would report a dirty rate near 0 whatever the guest does; for a QEMU \
             guest use `perfplus track --qmp <its QMP socket>`, for a VM of a perfplus agent `--vm NAME`"
        );
    }
    let mut heat = EbpfHeat::attach(HeatSource::Process { pid }).context("tracking the process's write faults")?;
    if !options.json {
        println!(
            "tracking write faults of pid {pid} every {:?} (up to {} distinct pages per interval)",
            options.interval,
            heat.max_pages()
        );
    }
    let intervals = options.intervals();
    let mut printer = Printer {
        options: options.clone(),
        reports: Vec::new(),
    };
    let start = Instant::now();
    let mut last = start;
    let mut i = 0u32;
    while intervals == 0 || i < intervals {
        i += 1;
        std::thread::sleep((start + options.interval * i).saturating_duration_since(Instant::now()));
        let sample = heat.sample()?;
        let now = Instant::now();
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        printer.print(IntervalReport {
            interval: i,
            elapsed_s: (now - start).as_secs_f64(),
            interval_s: (now - last).as_secs_f64(),
            dirty_pages: sample.write_events,
            working_set_pages: sample.working_set_pages(),
            hottest: sample.hottest_regions(REGION_BYTES, HOTTEST),
            source: "ebpf".into(),
            ebpf_events: Some(sample.write_events),
            guest: false,
            guest_pages_written: None,
            note: (!alive).then(|| format!("process {pid} exited")),
        });
        last = now;
        if !alive {
            break;
        }
    }
    printer.finish();
    Ok(())
}

/// Whether process `pid` holds a KVM VM (an fd on `anon_inode:kvm-vm`).
fn is_kvm_hypervisor(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:kvm-vm"))
}

/// How QEMU measures a guest's dirty rate (`calc-dirty-rate`'s `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuDirtyMode {
    /// A sample of pages (512 per GiB) hashed at both ends of the interval: pages whose content
    /// changed, which is what Perf+ sends again. RAM blocks under 128 MiB are not sampled.
    PageSampling,
    /// KVM's dirty log for the interval: what plain QEMU pre-copy sends again (under kvm-pvm it
    /// includes pages the guest only read).
    DirtyBitmap,
}

impl QemuDirtyMode {
    fn qmp_name(self) -> &'static str {
        match self {
            QemuDirtyMode::PageSampling => "page-sampling",
            QemuDirtyMode::DirtyBitmap => "dirty-bitmap",
        }
    }
}

impl std::str::FromStr for QemuDirtyMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "page-sampling" => Ok(QemuDirtyMode::PageSampling),
            "dirty-bitmap" => Ok(QemuDirtyMode::DirtyBitmap),
            other => Err(format!("{other:?}: expected page-sampling or dirty-bitmap")),
        }
    }
}

/// Longest a QEMU measurement may take beyond its own length before tracking gives up.
const QEMU_MEASURE_SLACK: Duration = Duration::from_secs(10);

/// `perfplus track --qmp PATH`: QEMU measures its guest, interval by interval.
pub async fn track_qmp(path: &std::path::Path, mode: QemuDirtyMode, options: TrackOptions) -> anyhow::Result<()> {
    let mut qmp = perfplus_qemu::qmp::Qmp::connect(path)
        .await
        .with_context(|| format!("QMP socket {}", path.display()))?;
    let (major, minor, micro) = qmp.version().await?;
    // QEMU 7.2 measures in whole seconds.
    let seconds = options.interval.as_secs_f64().ceil().max(1.0) as u64;
    let options = TrackOptions {
        interval: Duration::from_secs(seconds),
        ..options
    };
    if !options.json {
        println!(
            "tracking the QEMU {major}.{minor}.{micro} guest at {} every {seconds} s ({})",
            path.display(),
            mode.qmp_name()
        );
    }
    let intervals = options.intervals();
    let mut printer = Printer {
        options: options.clone(),
        reports: Vec::new(),
    };
    let start = Instant::now();
    let mut previous_start: Option<Value> = None;
    let mut i = 0u32;
    while intervals == 0 || i < intervals {
        i += 1;
        let began = Instant::now();
        qmp.execute(
            "calc-dirty-rate",
            json!({ "calc-time": seconds, "mode": mode.qmp_name() }),
        )
        .await
        .context("QEMU's calc-dirty-rate")?;
        let deadline = began + options.interval + QEMU_MEASURE_SLACK;
        let measured = loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::signal::ctrl_c() => {
                    printer.finish();
                    return Ok(());
                }
            }
            let info = qmp.execute("query-dirty-rate", json!({})).await?;
            // A `measured` left from the previous interval has its start time.
            if info["status"] == "measured" && Some(&info["start-time"]) != previous_start.as_ref() {
                break info;
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU did not finish measuring the dirty rate within {:?}: {info}",
                    deadline - began
                );
            }
        };
        previous_start = Some(measured["start-time"].clone());
        let mib_per_s = measured["dirty-rate"]
            .as_f64()
            .with_context(|| format!("query-dirty-rate gave no dirty-rate: {measured}"))?;
        let interval_s = seconds as f64;
        let pages = (mib_per_s * (1 << 20) as f64 / PAGE_SIZE as f64 * interval_s).round() as u64;
        printer.print(IntervalReport {
            interval: i,
            elapsed_s: start.elapsed().as_secs_f64(),
            interval_s,
            dirty_pages: pages,
            working_set_pages: pages,
            hottest: Vec::new(),
            source: format!("qemu {}", mode.qmp_name()),
            ebpf_events: None,
            guest: true,
            guest_pages_written: None,
            note: None,
        });
    }
    printer.finish();
    Ok(())
}

/// `perfplus track --vm NAME --agent ADDR`: asks the agent to measure, prints what it sends.
pub async fn track_vm(agent: &str, credentials: &Credentials, vm: &str, options: TrackOptions) -> anyhow::Result<()> {
    let mut conn = super::client::connect(agent, Role::Control, credentials).await?;
    let request = TrackRequest {
        vm: vm.to_string(),
        interval_ms: options.interval.as_millis().clamp(10, u32::MAX as u128) as u32,
        intervals: options.intervals(),
        ebpf: true,
    };
    conn.send(&Message::Track(request)).await?;
    if !options.json {
        println!("tracking VM {vm} on {agent} every {:?}", options.interval);
    }
    let mut printer = Printer {
        options,
        reports: Vec::new(),
    };
    loop {
        tokio::select! {
            msg = conn.recv() => match msg? {
                Message::TrackSample(s) => printer.print(report_of(&s)),
                Message::Done => break,
                other => bail!("agent {agent} sent {} while tracking", other.describe()),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    printer.finish();
    Ok(())
}

fn report_of(s: &TrackSample) -> IntervalReport {
    IntervalReport {
        interval: s.interval,
        elapsed_s: s.elapsed_s,
        interval_s: s.interval_s,
        dirty_pages: s.dirty_pages,
        working_set_pages: s.dirty_pages,
        hottest: s.hottest.clone(),
        source: s.source.clone(),
        ebpf_events: s.ebpf_events,
        guest: true,
        guest_pages_written: s.guest_pages_written,
        note: s.note.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_verdicts() {
        assert_eq!(parse_link("1gbit"), Ok(1e9));
        assert_eq!(parse_link("100Mbit"), Ok(1e8));
        assert_eq!(parse_link("2.5gbit"), Ok(2.5e9));
        assert!(parse_link("fast").is_err());
        assert!(parse_link("1 furlong").is_err());
        let link = 1e9 / 8.0 / 4096.0; // 30518 pages/s
        assert!(verdict(1000.0, link).starts_with("converges:"));
        assert!(verdict(20000.0, link).starts_with("converges slowly"));
        assert!(verdict(40000.0, link).starts_with("will not converge"));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let r = IntervalReport {
            interval: 2,
            elapsed_s: 2.0,
            interval_s: 1.0,
            dirty_pages: 500,
            working_set_pages: 400,
            hottest: vec![TrackRegion {
                start: 0x40_0000,
                pages: 10,
                writes: 30,
            }],
            source: "ebpf".into(),
            ebpf_events: Some(500),
            guest: false,
            guest_pages_written: None,
            note: None,
        };
        let v = r.to_json(30518.0);
        for field in [
            "interval",
            "elapsed_s",
            "dirty_pages",
            "dirty_rate_pages_per_s",
            "working_set_pages",
            "hottest",
            "source",
            "ebpf_events",
            "verdict",
        ] {
            assert!(v.get(field).is_some(), "{field} missing in {v}");
        }
        assert_eq!(v["hottest"][0]["addr"], 0x40_0000);
        assert_eq!(v["dirty_rate_pages_per_s"], 500.0);
    }
}
