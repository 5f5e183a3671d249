//! QEMU's own live migration, plain and through perfplus (`perfplus qemu migrate`, issue 12), over the
//! same shaped link, measured from outside the same way for both.
//!
//! Method:
//! - Two network namespaces a and b joined by a veth pair, each end shaped with tbf to
//!   `PERFPLUS_BENCH_RATE` (default 1gbit); the link is checked with iperf3 first and its measured rate
//!   printed.
//! - The same built-in guest image booted by QEMU 7.2 (Debian's qemu-system-x86, `-enable-kvm
//!   -kernel`), `PERFPLUS_BENCH_MEMORY` (default 1G) of RAM, a working set of
//!   `PERFPLUS_BENCH_WORKING_SET` (default a quarter of the memory: 256M for 1G), the same workload and
//!   seed, for both variants:
//!   - *plain QEMU*: the source QEMU in a migrates straight to a destination QEMU in b waiting at
//!     `-incoming tcp:0.0.0.0:PORT` (QMP `migrate-set-parameters`, `migrate tcp:10.77.0.2:PORT`; one
//!     channel, no capability set);
//!   - *QEMU through perfplus*: the same two QEMUs, the destination waiting at `-incoming unix:PATH`,
//!     a perfplus agent in each namespace (page store 1G each), and `perfplus qemu migrate --agent
//!     <agent a> --qmp … --to <agent b via 10.77.0.2> --incoming unix:PATH --destination-qmp …
//!     --downtime-limit … --max-bandwidth 10G --json` run in a, exactly as `tests/qemu_relay.rs` does.
//! - Same QEMU parameters for both: QEMU's default downtime limit (read from a QEMU's
//!   `query-migrate-parameters` before the runs) set explicitly, and max-bandwidth 10 GiB/s so that
//!   QEMU's own cap (32 MiB/s by default) is not the limit. Both are read back from the source QEMU
//!   after every migration and printed.
//! - Scenarios (`PERFPLUS_BENCH_SCENARIOS`, comma-separated names, picks):
//!   - `mixed`: the demo's content mix (`rate=10k mix=unique:40,dup:30,zero:10,same:20`), a → b;
//!   - `unique`: only unique content (`mix=unique:100`), same rate, a → b: nothing for Perf+ to save,
//!     so this is the relay's overhead (it must be no worse than 1.05x plain: checked and printed);
//!   - `return`: the mixed guest migrated a → b, then back b → a into a fresh `-incoming` QEMU on a;
//!     the return leg is the one measured (both legs are shown);
//!   - `two-vms`: two QEMUs of the same image, workload and seed on a; the first migrates a → b (and
//!     keeps running there), then the second; the second is the one measured (both are shown).
//! - `return` and `two-vms` pay off only once the destination agent can reference pages it holds from
//!   before (its page store, a VM it hosts); until then they show what the relay does on its own.
//! - Every QEMU, agent and the CLI are fresh for every run. Once the source guest runs its workload and
//!   two more seconds have passed, the leg starts; from then until a second after it ended (plain:
//!   the source's `query-migrate` says `completed`; relay: the CLI's report, after both QEMUs said
//!   `completed`), a probe thread (`peer/felt.rs`) reads the guest's heartbeat out of the RAM of the
//!   leg's two QEMU processes about every 0.5 ms: the *felt stall* is the longest time the guest made
//!   no progress. Bytes on the wire are the qdisc counters of both veth ends over that time (every byte
//!   both ways, headers, TLS and the return path included). Total time and downtime are QEMU's own
//!   (`total-time`, `downtime` of the source's `query-migrate`; for the relay the report's `total_ms`
//!   and `downtime_ms`, the same fields read by the source agent). CPU is user + system time over
//!   that span of the source and destination QEMU processes (their vCPU threads included: the guest's
//!   vCPU never idles, so a QEMU running the guest burns about one core for as long as it runs) and,
//!   through perfplus, of both agents. Then the destination must be `running` (`query-status`), its
//!   guest's self-check (two more progress lines) must count no mismatch, and the relay's report must
//!   say `completed` for both QEMUs.
//! - Each run starts once the host's free page reporting has been idle 5 s (`peer/host.rs`: this
//!   machine is a VM, and the passes that hand a run's freed memory back stall its guests 30-35 ms).
//! - Runs are interleaved (plain, through perfplus, then again), `PERFPLUS_BENCH_REPEAT` times
//!   (default 3); the tables give medians with min–max, and the ratios through perfplus / plain.
//! - Output: printed, and `target/bench-results/qemu/` (`PERFPLUS_QEMU_RESULTS` to change it):
//!   `summary.md` (conditions and tables) and the relay's JSON report of every leg.
//!
//! Run: `scripts/bench.sh qemu` (installs QEMU and iperf3) or `cargo bench -p perfplus --bench qemu`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod peer {
    pub mod felt;
    pub mod host;
    pub mod link;
    pub mod qemu;
}

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peer::felt::{Felt, FeltProbe};
use peer::qemu::{migrate_plain, process_cpu_ms, Qemu};
use perfplus::service::settings::parse_size;
use serde_json::{json, Value};
use support::{Cluster, Netns, ShapedLink, TestAgent};

/// QEMU's bandwidth cap in both variants (bytes/s), far above the link; `--max-bandwidth` spells it.
const MAX_BANDWIDTH: u64 = 10 << 30;
const MAX_BANDWIDTH_FLAG: &str = "10G";

/// Each agent's page store (`cluster.agent_in`).
const PAGE_STORE: &str = "1G";

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One leg a → b.
    OneLeg,
    /// a → b, then b → a into a fresh QEMU on a; the return leg is measured.
    Return,
    /// Two guests on a; the first a → b, then the second; the second is measured.
    TwoVms,
}

impl Shape {
    /// The legs' labels, the measured one last.
    fn legs(self) -> &'static [&'static str] {
        match self {
            Shape::OneLeg => &["a → b"],
            Shape::Return => &["a → b (first leg)", "b → a (return, measured)"],
            Shape::TwoVms => &["first VM a → b", "second VM a → b (measured)"],
        }
    }
}

struct Scenario {
    name: &'static str,
    /// The guest's command line without `working-set=` and `tsc_khz=`.
    workload: &'static str,
    shape: Shape,
}

const MIXED: &str = "rate=10k mix=unique:40,dup:30,zero:10,same:20 seed=1";

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "mixed",
        workload: MIXED,
        shape: Shape::OneLeg,
    },
    Scenario {
        name: "unique",
        workload: "rate=10k mix=unique:100 seed=1",
        shape: Shape::OneLeg,
    },
    Scenario {
        name: "return",
        workload: MIXED,
        shape: Shape::Return,
    },
    Scenario {
        name: "two-vms",
        workload: MIXED,
        shape: Shape::TwoVms,
    },
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    Plain,
    Relay,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain QEMU",
            Variant::Relay => "QEMU through perfplus",
        }
    }
}

/// What one leg measured.
#[derive(Clone, Default)]
struct Run {
    felt: Felt,
    wire_bytes: f64,
    total_ms: f64,
    downtime_ms: f64,
    cpu_qemu_src_ms: f64,
    cpu_qemu_dst_ms: f64,
    /// Through perfplus only (NaN for plain QEMU).
    cpu_agent_src_ms: f64,
    cpu_agent_dst_ms: f64,
    /// Through perfplus: pages sent whole, as references, dropped as unchanged (pre-copy and
    /// stop-and-copy together; NaN for plain QEMU).
    pages_full: f64,
    pages_referenced: f64,
    pages_unchanged: f64,
    /// QEMU's `downtime-limit` (ms) and `max-bandwidth` (bytes/s), read back from the source.
    parameters: (u64, u64),
}

/// One of the two namespaces.
#[derive(Clone, Copy)]
enum Host {
    A,
    B,
}

/// Which way a leg goes.
#[derive(Clone, Copy)]
enum Way {
    AtoB,
    BtoA,
}

/// The perfplus side of a relayed run: a cluster and an agent in each namespace.
struct Agents {
    cluster: Cluster,
    a: TestAgent,
    b: TestAgent,
}

struct Bench {
    link: ShapedLink,
    kernel: PathBuf,
    tsc_khz: u32,
    memory_bytes: u64,
    working_set: String,
    downtime_limit_ms: u64,
    /// The last TCP port a plain destination listened on.
    port: std::cell::Cell<u16>,
    results: PathBuf,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn results_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PERFPLUS_QEMU_RESULTS") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench-results/qemu")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

impl Bench {
    fn memory_mib(&self) -> u64 {
        self.memory_bytes >> 20
    }

    fn append(&self, scenario: &Scenario) -> String {
        format!(
            "working-set={} {} tsc_khz={}",
            self.working_set, scenario.workload, self.tsc_khz
        )
    }

    /// Namespace `host`'s `Netns` and address.
    fn host(&self, host: Host) -> (&Netns, &'static str) {
        match host {
            Host::A => (&self.link.a, ShapedLink::IP_A),
            Host::B => (&self.link.b, ShapedLink::IP_B),
        }
    }

    fn start_source(&self, dir: &Path, name: &str, host: Host, append: &str) -> Qemu {
        let ns = self.host(host).0;
        peer::qemu::start(
            dir,
            name,
            &self.kernel,
            self.memory_mib(),
            append,
            None,
            Some(ns.name()),
        )
    }

    /// A destination QEMU in `host` waiting for the guest, and where to send it: plain, QEMU listens
    /// on a TCP port of its namespace; through perfplus, on a unix socket its agent connects to.
    fn start_destination(&self, variant: Variant, dir: &Path, name: &str, host: Host, append: &str) -> (Qemu, String) {
        let (ns, ip) = self.host(host);
        let (incoming, target) = match variant {
            Variant::Plain => {
                let port = self.port.get() + 1;
                self.port.set(port);
                (format!("tcp:0.0.0.0:{port}"), format!("tcp:{ip}:{port}"))
            }
            Variant::Relay => {
                let uri = format!("unix:{}", dir.join(format!("{name}.incoming")).display());
                (uri.clone(), uri)
            }
        };
        let qemu = peer::qemu::start(
            dir,
            name,
            &self.kernel,
            self.memory_mib(),
            append,
            Some(&incoming),
            Some(ns.name()),
        );
        (qemu, target)
    }

    /// One run of `scenario` in `variant`, on fresh QEMUs (and agents); every leg's figures, the
    /// measured one last. The relay's reports go to the results directory, named by `tag`.
    fn run(&self, scenario: &Scenario, variant: Variant, tag: &str) -> Vec<Run> {
        // Not while the host hands the last run's freed memory back (see `peer/host.rs`).
        peer::host::wait_until_quiet();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let agents = (variant == Variant::Relay).then(|| {
            let cluster = Cluster::new();
            let a = cluster.agent_in(&self.link.a, "a", PAGE_STORE);
            let b = cluster.agent_in(&self.link.b, "b", PAGE_STORE);
            Agents { cluster, a, b }
        });
        let agents = agents.as_ref();
        let append = self.append(scenario);
        let dir = dir.path();
        let settle = || std::thread::sleep(Duration::from_secs(2));
        match scenario.shape {
            Shape::OneLeg => {
                let source = self.start_source(dir, "source", Host::A, &append);
                let (mut destination, target) = self.start_destination(variant, dir, "destination", Host::B, &append);
                source.wait_running();
                settle();
                let run = self.leg(variant, agents, Way::AtoB, &source, &mut destination, &target, tag);
                vec![run]
            }
            Shape::Return => {
                let source = self.start_source(dir, "source", Host::A, &append);
                let (mut there, target) = self.start_destination(variant, dir, "there", Host::B, &append);
                source.wait_running();
                settle();
                let first = self.leg(
                    variant,
                    agents,
                    Way::AtoB,
                    &source,
                    &mut there,
                    &target,
                    &format!("{tag}-first"),
                );
                drop(source);
                let (mut back, target) = self.start_destination(variant, dir, "back", Host::A, &append);
                settle();
                let ret = self.leg(
                    variant,
                    agents,
                    Way::BtoA,
                    &there,
                    &mut back,
                    &target,
                    &format!("{tag}-return"),
                );
                vec![first, ret]
            }
            Shape::TwoVms => {
                let first = self.start_source(dir, "first", Host::A, &append);
                let second = self.start_source(dir, "second", Host::A, &append);
                let (mut first_there, first_target) =
                    self.start_destination(variant, dir, "first-there", Host::B, &append);
                let (mut second_there, second_target) =
                    self.start_destination(variant, dir, "second-there", Host::B, &append);
                first.wait_running();
                second.wait_running();
                settle();
                let one = self.leg(
                    variant,
                    agents,
                    Way::AtoB,
                    &first,
                    &mut first_there,
                    &first_target,
                    &format!("{tag}-first"),
                );
                drop(first);
                settle();
                let two = self.leg(
                    variant,
                    agents,
                    Way::AtoB,
                    &second,
                    &mut second_there,
                    &second_target,
                    &format!("{tag}-second"),
                );
                vec![one, two]
            }
        }
    }

    /// Migrates the guest from `source` to `destination` (waiting for it at `target`) and measures it.
    #[allow(clippy::too_many_arguments)]
    fn leg(
        &self,
        variant: Variant,
        agents: Option<&Agents>,
        way: Way,
        source: &Qemu,
        destination: &mut Qemu,
        target: &str,
        tag: &str,
    ) -> Run {
        let (from_ns, from_ip, to_ip) = match way {
            Way::AtoB => (&self.link.a, ShapedLink::IP_A, ShapedLink::IP_B),
            Way::BtoA => (&self.link.b, ShapedLink::IP_B, ShapedLink::IP_A),
        };
        let agent_pair = agents.map(|agents| match way {
            Way::AtoB => (&agents.a, &agents.b),
            Way::BtoA => (&agents.b, &agents.a),
        });
        let cpu = |destination: &Qemu| {
            let (agent_src, agent_dst) = agent_pair.map_or((f64::NAN, f64::NAN), |(s, d)| {
                (process_cpu_ms(s.pid()), process_cpu_ms(d.pid()))
            });
            [source.cpu_ms(), destination.cpu_ms(), agent_src, agent_dst]
        };
        let cpu_before = cpu(destination);
        let wire = self.link.bytes_sent();
        let probe = FeltProbe::start(vec![source.pid(), destination.pid()], self.memory_bytes);
        let mut relayed = None;
        let (total_ms, downtime_ms) = match (variant, agents, agent_pair) {
            (Variant::Relay, Some(agents), Some((agent_src, agent_dst))) => {
                let report = relay(
                    &agents.cluster,
                    from_ns,
                    &agent_src.addr_via(from_ip),
                    &agent_dst.addr_via(to_ip),
                    source,
                    destination,
                    target,
                    self.downtime_limit_ms,
                    (agent_src, agent_dst),
                );
                let figures = (
                    report["total_ms"].as_f64().unwrap_or(f64::NAN),
                    report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                );
                relayed = Some(report);
                figures
            }
            _ => {
                let parameters = json!({
                    "downtime-limit": self.downtime_limit_ms,
                    "max-bandwidth": MAX_BANDWIDTH,
                });
                let info = migrate_plain(source, destination, target, parameters);
                (
                    info["total-time"].as_f64().unwrap_or(f64::NAN),
                    info["downtime"].as_f64().unwrap_or(f64::NAN),
                )
            }
        };
        std::thread::sleep(Duration::from_secs(1));
        let felt = probe.finish();
        let wire_bytes = (self.link.bytes_sent() - wire) as f64;
        let cpu_after = cpu(destination);

        // What QEMU migrated with, whether the guest runs on the destination, and its self-check.
        let parameters = source.qmp().execute("query-migrate-parameters", json!({}));
        let parameters = (
            parameters["downtime-limit"].as_u64().unwrap_or(0),
            parameters["max-bandwidth"].as_u64().unwrap_or(0),
        );
        let state = destination.qmp().execute("query-status", json!({}));
        assert_eq!(
            state["status"], "running",
            "the destination QEMU does not run the guest after the migration ({variant:?})"
        );
        let verdict = destination.verdict();
        assert_eq!(
            verdict.mismatches, 0,
            "the guest found mismatches on the destination ({variant:?}, {tag})"
        );

        let pages = |kind: &str| {
            relayed.as_ref().map_or(f64::NAN, |r| {
                r["precopy"][kind].as_f64().unwrap_or(0.0) + r["stop_and_copy"][kind].as_f64().unwrap_or(0.0)
            })
        };
        let run = Run {
            felt,
            wire_bytes,
            total_ms,
            downtime_ms,
            cpu_qemu_src_ms: cpu_after[0] - cpu_before[0],
            cpu_qemu_dst_ms: cpu_after[1] - cpu_before[1],
            cpu_agent_src_ms: cpu_after[2] - cpu_before[2],
            cpu_agent_dst_ms: cpu_after[3] - cpu_before[3],
            pages_full: pages("full"),
            pages_referenced: pages("referenced"),
            pages_unchanged: pages("unchanged"),
            parameters,
        };
        // The five longest stalls the probe saw (length@start, ms since it started).
        let mut stalls = run.felt.stalls.clone();
        stalls.sort_by(|x, y| y.1.total_cmp(&x.1));
        let longest: Vec<String> = stalls
            .iter()
            .take(5)
            .map(|(at, ms)| format!("{ms:.0}@{at:.0}"))
            .collect();
        eprintln!(
            "  {tag} {}: total {:.0} ms, downtime {:.0} ms, wire {:.1} MB, felt {:.1} ms ({} stalls over 10 ms, \
             longest length@start: {}; blind {:.0} ms), the guest's own stall since boot {:.1} ms{}",
            variant.label(),
            run.total_ms,
            run.downtime_ms,
            run.wire_bytes / 1e6,
            run.felt.max_stall_ms,
            stalls.len(),
            longest.join(" "),
            run.felt.blind_ms,
            verdict.guest_stall_ms,
            match &relayed {
                Some(r) => format!(
                    "; pages whole {} / referenced {} / unchanged {}, QEMU's stream {:.1} MB, link {:.1} MB",
                    run.pages_full,
                    run.pages_referenced,
                    run.pages_unchanged,
                    r["qemu_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    r["link_bytes"].as_f64().unwrap_or(0.0) / 1e6
                ),
                None => String::new(),
            }
        );
        if let Some(report) = relayed {
            let _ = std::fs::write(
                self.results.join(format!("{tag}.json")),
                serde_json::to_string_pretty(&report).unwrap_or_default(),
            );
        }
        run
    }
}

/// `perfplus qemu migrate` run in `from_ns` through the source agent at `agent` to the destination
/// agent at `to`; the JSON report, checked: both QEMUs `completed`, the destination running.
#[allow(clippy::too_many_arguments)]
fn relay(
    cluster: &Cluster,
    from_ns: &Netns,
    agent: &str,
    to: &str,
    source: &Qemu,
    destination: &Qemu,
    target: &str,
    downtime_limit_ms: u64,
    agents: (&TestAgent, &TestAgent),
) -> Value {
    let (qmp, destination_qmp) = (
        source.qmp_path().display().to_string(),
        destination.qmp_path().display().to_string(),
    );
    let downtime_limit = format!("{downtime_limit_ms}ms");
    let args = [
        "qemu",
        "migrate",
        "--agent",
        agent,
        "--qmp",
        &qmp,
        "--to",
        to,
        "--incoming",
        target,
        "--destination-qmp",
        &destination_qmp,
        "--downtime-limit",
        &downtime_limit,
        "--max-bandwidth",
        MAX_BANDWIDTH_FLAG,
        "--json",
    ];
    let out = cluster.cli_in(Some(from_ns.name()), &args);
    assert!(
        out.status.success(),
        "perfplus qemu migrate failed:\n{}\n{}\nsource agent:\n{}\ndestination agent:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agents.0.log_text(),
        agents.1.log_text()
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the relay's JSON report");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["destination_status"], "completed", "{report}");
    assert_eq!(report["destination_run_state"], "running", "{report}");
    report
}

/// Median and min–max of `f` over `runs`.
fn stat(runs: &[Run], f: impl Fn(&Run) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn cell((median, min, max): (f64, f64, f64), digits: usize) -> String {
    if median.is_nan() {
        return "—".into();
    }
    format!("{median:.digits$} [{min:.digits$}–{max:.digits$}]")
}

/// The tables of one scenario: `runs[variant][rep][leg]`.
fn tables(scenario: &Scenario, bench: &Bench, plain: &[Vec<Run>], relayed: &[Vec<Run>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## {} (working-set={} {})\n",
        scenario.name, bench.working_set, scenario.workload
    );
    let _ = writeln!(
        out,
        "| variant | leg | felt stall (ms) | QEMU downtime (ms) | wire (MB) | total (ms) | CPU QEMU src / dst (ms) \
         | CPU agents src / dst (ms) | pages whole / ref / unchanged | probe blind (ms) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let legs = scenario.shape.legs();
    let leg_runs = |runs: &[Vec<Run>], leg: usize| -> Vec<Run> { runs.iter().map(|r| r[leg].clone()).collect() };
    for (leg, leg_label) in legs.iter().enumerate() {
        for (variant, runs) in [(Variant::Plain, plain), (Variant::Relay, relayed)] {
            let runs = leg_runs(runs, leg);
            let agents = if variant == Variant::Relay {
                format!(
                    "{:.0} / {:.0}",
                    stat(&runs, |r| r.cpu_agent_src_ms).0,
                    stat(&runs, |r| r.cpu_agent_dst_ms).0
                )
            } else {
                "—".into()
            };
            let pages = if variant == Variant::Relay {
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    stat(&runs, |r| r.pages_full).0,
                    stat(&runs, |r| r.pages_referenced).0,
                    stat(&runs, |r| r.pages_unchanged).0
                )
            } else {
                "—".into()
            };
            let _ = writeln!(
                out,
                "| {} | {leg_label} | {} | {} | {} | {} | {:.0} / {:.0} | {agents} | {pages} | {:.0} |",
                variant.label(),
                cell(stat(&runs, |r| r.felt.max_stall_ms), 1),
                cell(stat(&runs, |r| r.downtime_ms), 0),
                cell(stat(&runs, |r| r.wire_bytes / 1e6), 1),
                cell(stat(&runs, |r| r.total_ms), 0),
                stat(&runs, |r| r.cpu_qemu_src_ms).0,
                stat(&runs, |r| r.cpu_qemu_dst_ms).0,
                stat(&runs, |r| r.felt.blind_ms).2,
            );
        }
    }
    let _ = writeln!(
        out,
        "\n| through perfplus / plain (medians) | wire bytes | total time | felt stall |\n|---|---|---|---|"
    );
    let mut ratios = Vec::new();
    for (leg, leg_label) in legs.iter().enumerate() {
        let (p, r) = (leg_runs(plain, leg), leg_runs(relayed, leg));
        let ratio = |f: fn(&Run) -> f64| stat(&r, f).0 / stat(&p, f).0;
        let (wire, total, felt) = (
            ratio(|r| r.wire_bytes),
            ratio(|r| r.total_ms),
            ratio(|r| r.felt.max_stall_ms),
        );
        let _ = writeln!(out, "| {leg_label} | {wire:.2} | {total:.2} | {felt:.2} |");
        ratios.push((wire, total));
    }
    if scenario.name == "unique" {
        let (wire, total) = ratios[ratios.len() - 1];
        let verdict = if wire <= 1.05 && total <= 1.05 {
            "met"
        } else {
            "NOT MET"
        };
        let _ = writeln!(
            out,
            "\nThrough perfplus no worse than 1.05x plain on unique content (wire bytes {wire:.2}, total time \
             {total:.2}): {verdict}."
        );
    }
    let _ = writeln!(out);
    out
}

/// QEMU's version and its default downtime limit, asked of a QEMU that waits for a migration.
fn qemu_defaults(kernel: &Path) -> (String, u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let qemu = peer::qemu::start(dir.path(), "defaults", kernel, 64, "", Some("defer"), None);
    let mut qmp = qemu.qmp();
    let version = qmp.execute("query-version", json!({}));
    let parameters = qmp.execute("query-migrate-parameters", json!({}));
    let q = &version["qemu"];
    (
        format!("{}.{}.{}", q["major"], q["minor"], q["micro"]),
        parameters["downtime-limit"].as_u64().expect("downtime-limit"),
    )
}

fn main() {
    if support::kvm_missing() {
        return;
    }
    if !peer::qemu::available() {
        println!("skipped: qemu-system-x86_64 is not installed (scripts/bench.sh installs it)");
        return;
    }
    let rate = env_or("PERFPLUS_BENCH_RATE", "1gbit");
    let memory = env_or("PERFPLUS_BENCH_MEMORY", "1G");
    let memory_bytes = parse_size(&memory).expect("PERFPLUS_BENCH_MEMORY");
    let working_set = env_or("PERFPLUS_BENCH_WORKING_SET", &format!("{}M", memory_bytes >> 22));
    let repeat: usize = env_or("PERFPLUS_BENCH_REPEAT", "3")
        .parse()
        .expect("PERFPLUS_BENCH_REPEAT");
    let chosen = std::env::var("PERFPLUS_BENCH_SCENARIOS").ok();
    let Some(link) = ShapedLink::new('k', &rate) else {
        return;
    };
    let results = results_dir();
    std::fs::create_dir_all(&results).expect("the results directory");
    let files = tempfile::tempdir().expect("a temporary directory");
    let (kernel, tsc_khz) = peer::qemu::guest_kernel(files.path());
    let (version, downtime_limit_ms) = qemu_defaults(&kernel);
    let measured = peer::link::iperf(&link, 5297);

    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "# QEMU {version}'s live migration, plain and through perfplus, over a {rate} tbf-shaped veth \
         between two network namespaces\n"
    );
    let _ = writeln!(
        summary,
        "- link: {}",
        measured.map_or(
            "not measured (iperf3 is not installed; scripts/bench.sh installs it)".into(),
            |mbps| format!("{mbps:.0} Mbit/s measured with iperf3 (TCP, 2 s)")
        )
    );
    let _ = writeln!(
        summary,
        "- guest: the built-in guest under QEMU `-enable-kvm -kernel`, {memory} of RAM, working set {working_set}"
    );
    let _ = writeln!(
        summary,
        "- QEMU parameters, both variants: downtime-limit {downtime_limit_ms} ms (QEMU's default), \
         max-bandwidth {} MiB/s; one channel, no capability",
        MAX_BANDWIDTH >> 20
    );
    let _ = writeln!(
        summary,
        "- through perfplus: an agent in each namespace (page store {PAGE_STORE}), `perfplus qemu migrate` with \
         `--downtime-limit {downtime_limit_ms}ms --max-bandwidth {MAX_BANDWIDTH_FLAG}` and the default `--held`"
    );
    let _ = writeln!(
        summary,
        "- {repeat} interleaved runs per variant (plain, through perfplus, ...), fresh QEMUs and agents each; \
         median [min–max]; load average at the start {}\n",
        load_average()
    );
    print!("{summary}");
    let summary_path = results.join("summary.md");
    let _ = std::fs::write(&summary_path, &summary);

    let bench = Bench {
        link,
        kernel,
        tsc_khz,
        memory_bytes,
        working_set,
        downtime_limit_ms,
        port: std::cell::Cell::new(47400),
        results,
    };
    for scenario in SCENARIOS {
        if chosen
            .as_deref()
            .is_some_and(|c| !c.split(',').any(|n| n.trim() == scenario.name))
        {
            continue;
        }
        let load_before = load_average();
        let (mut plain, mut relayed) = (Vec::new(), Vec::new());
        for rep in 1..=repeat {
            eprintln!("{}: run {rep}/{repeat}", scenario.name);
            plain.push(bench.run(scenario, Variant::Plain, &format!("{}-{rep}-plain", scenario.name)));
            relayed.push(bench.run(scenario, Variant::Relay, &format!("{}-{rep}-relay", scenario.name)));
        }
        let mut text = tables(scenario, &bench, &plain, &relayed);
        let parameters: std::collections::BTreeSet<(u64, u64)> =
            plain.iter().chain(&relayed).flatten().map(|r| r.parameters).collect();
        let _ = writeln!(
            text,
            "QEMU's parameters read back from the sources: {}; load average before / after: {load_before} / {}\n",
            parameters
                .iter()
                .map(|(d, b)| format!("downtime-limit {d} ms, max-bandwidth {} MiB/s", b >> 20))
                .collect::<Vec<_>>()
                .join("; "),
            load_average()
        );
        if parameters.len() != 1 {
            let _ = writeln!(
                text,
                "WARNING: the runs did not all migrate with the same parameters.\n"
            );
        }
        print!("{text}");
        summary.push_str(&text);
        let _ = std::fs::write(&summary_path, &summary);
    }
    println!("written to {}", summary_path.display());
}
