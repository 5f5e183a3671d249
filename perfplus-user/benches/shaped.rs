//! perfplus against QEMU over a real shaped link, measured from outside the guest the same way for both.
//!
//! Method:
//! - Two network namespaces joined by a veth pair, each end shaped with tbf to `PERFPLUS_BENCH_RATE`
//!   (default 1gbit); the link is checked with iperf3 first and its measured rate printed.
//! - The same built-in guest image, memory size (`PERFPLUS_BENCH_MEMORY`, default 1G) and workload for
//!   every hypervisor: a perfplus agent in each namespace, or a QEMU in each (Debian's qemu-system-x86,
//!   `-enable-kvm -kernel`, driven over QMP: one channel with downtime-limit 30 ms; multifd with 2
//!   channels and zstd, downtime-limit 30 ms; post-copy after the first pass where the scenario says).
//! - Once the guest runs its workload and two more seconds have passed, the migration starts. From then
//!   until a second after it ended (for perfplus: after the CLI's report, which comes after the
//!   destination verified the guest and the source dropped its copy), a probe thread
//!   (`peer/felt.rs`) reads the guest's heartbeat out of the RAM of both processes about every 0.5 ms:
//!   the *felt stall* is the longest time the guest made no progress. Bytes on the wire are the qdisc
//!   counters of both veth ends; CPU is the user + system time of the source and destination processes
//!   (vCPU threads included, for both); total time is what each tool reports (perfplus: `total_ms`;
//!   QEMU: `total-time`, or the bench's own time from `migrate` to `completed` when QEMU says 0, as
//!   it now and then does); the guest's self-check must be clean on the destination.
//! - Each run starts on a quiet host: this machine is itself a VM, and its kernel hands the memory a
//!   run freed to the hypervisor underneath (free page reporting), in passes every ~2 s that stalled
//!   whichever guest was running 30-35 ms at each pass, for ~20 s after a QEMU run; the bench waits
//!   until reporting has been idle 5 s (`peer/host.rs`; where the kernel has no such counter, it
//!   does not wait). The link's tbf burst is 256 KiB, over the largest (64 KiB GSO) packet, so tbf
//!   does not split packets in software on the cores the guests run on (`tests/support/link.rs`).
//! - Runs are interleaved (each perfplus mode, QEMU, QEMU multifd+zstd, then again),
//!   `PERFPLUS_BENCH_REPEAT` times (default 3); the table gives medians with min–max and the ratios
//!   perfplus / QEMU.
//! - Scenarios (the guest's page contents are a mix like real memory: random, text-like (English
//!   words, about 2.1-2.4× smaller with zstd), duplicated, zero, unchanged): `moderate` (10k page writes/s in 256 MiB),
//!   `idle` (100/s), `read-heavy` (10k writes/s into 256 MiB while the guest's verification reads the
//!   whole 1 GiB, about a pass a second), `duplicate-heavy` (60 % duplicated pages) and
//!   `faster-than-link` (50k writes/s: perfplus hybrid and post-copy against QEMU post-copy; QEMU's
//!   pre-copy, one channel or multifd+zstd, never converges there with these contents),
//!   `demo-mix` (the demo's guest: no text, 40 % random, 20 % unchanged random, 30 % duplicated, 20k
//!   writes/s) and `return-trip` (below). perfplus migrates with its defaults (`--compression auto`); its agents have
//!   no page store, except A's in `return-trip`.
//! - `return-trip`: `moderate`'s guest migrates A→B, then back B→A, and the return is what the table
//!   gives. Each trip is measured as above (its own probe over the two processes of that trip, its own
//!   qdisc counters, CPU and total time; the guest's self-check on A at the end). Between them: for
//!   perfplus, A's agent (page store as large as the guest) archives the pages of the VM that left, and
//!   the bench waits until A's log says so (`kept the departed VM's pages in the page store`, polled),
//!   so that the return neither waits for the archive nor finds it half done; for QEMU, the paused
//!   source is stopped and a new QEMU started in A with `-incoming defer`. Then both wait 2 s and
//!   migrate back in the same mode as the first trip. perfplus's return sends references to what A
//!   still holds (`held_from_store` in the report; pages the guest rewrote with new content since
//!   still cross whole); QEMU keeps nothing of a guest that left, so its return costs what its first
//!   trip cost. The line per run on stderr gives the first trip's figures too.
//!
//! Run: `scripts/bench.sh shaped` (installs QEMU and iperf3) or `cargo bench -p perfplus --bench shaped`.
//! `PERFPLUS_BENCH_SCENARIOS` (comma-separated names) picks scenarios. For work on perfplus itself:
//! `PERFPLUS_BENCH_QEMU=off` runs only the perfplus variants (no ratios then), and
//! `PERFPLUS_BENCH_LOGS=<dir>` keeps each perfplus run's agent logs and report there.

#[path = "../../tests/support/mod.rs"]
mod support;

mod peer {
    pub mod felt;
    pub mod host;
    pub mod link;
    pub mod qemu;
}

use std::time::Duration;

use peer::felt::{Felt, FeltProbe};
use peer::qemu::{process_cpu_ms, Placement, QemuMode, QemuPair};
use support::{Cluster, ShapedLink, TestAgent};

struct Scenario {
    name: &'static str,
    /// The built-in guest's command line (without `tsc_khz=`).
    cmdline: &'static str,
    /// `perfplus migrate --mode`, one variant per mode.
    perfplus_modes: &'static [&'static str],
    qemu: &'static [QemuMode],
    /// A→B, then back B→A: the figures are the return's ([`perfplus_return_run`], [`qemu_return_run`]).
    return_trip: bool,
}

const LIMIT30: QemuMode = QemuMode::Precopy { downtime_limit_ms: 30 };
const MULTIFD: QemuMode = QemuMode::MultifdZstd { downtime_limit_ms: 30 };

// Page contents like real memory: random (unique), text-like (English words, about 2.1-2.4×
// smaller with zstd), duplicated across pages, zero, and unchanged by writes (same).
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "moderate",
        cmdline: "working-set=256M rate=10k mix=unique:30,text:20,dup:20,zero:10,same:20",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: false,
    },
    Scenario {
        name: "idle",
        cmdline: "working-set=256M rate=100 mix=unique:30,text:20,dup:20,zero:10,same:20",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: false,
    },
    Scenario {
        // Writes go to the first quarter of the working set (hot=25:100), and the guest's
        // verification reads the whole of it, about a full pass over memory a second.
        name: "read-heavy",
        cmdline: "working-set=1G rate=10k hot=25:100 mix=unique:30,text:20,dup:20,zero:10,same:20",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: false,
    },
    Scenario {
        name: "duplicate-heavy",
        cmdline: "working-set=256M rate=10k mix=unique:10,text:10,dup:60,zero:10,same:10",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: false,
    },
    Scenario {
        name: "faster-than-link",
        cmdline: "working-set=256M rate=50k mix=unique:30,text:20,dup:20,zero:10,same:20",
        perfplus_modes: &["hybrid", "postcopy"],
        // Not QEMU's pre-copy, one channel or multifd+zstd: with pages like real memory (random pages
        // do not compress) neither converges at this rate.
        qemu: &[QemuMode::Postcopy],
        return_trip: false,
    },
    Scenario {
        // The demo's guest (`scripts/demo.sh`'s default workload): no text, 60 % random pages, 30 %
        // duplicated, at 20k page writes/s.
        name: "demo-mix",
        cmdline: "working-set=256M rate=20k mix=unique:40,dup:30,zero:10,same:20",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: false,
    },
    Scenario {
        // `moderate`'s guest, migrated A→B and, after a settle, back B→A: the return is measured. A
        // kept the departed guest's pages in its page store; QEMU has no such store.
        name: "return-trip",
        cmdline: "working-set=256M rate=10k mix=unique:30,text:20,dup:20,zero:10,same:20",
        perfplus_modes: &["precopy"],
        qemu: &[LIMIT30, MULTIFD],
        return_trip: true,
    },
];

#[derive(Clone, Default)]
struct Run {
    felt: Felt,
    wire_bytes: f64,
    total_ms: f64,
    reported_downtime_ms: f64,
    cpu_source_ms: f64,
    cpu_destination_ms: f64,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn memory_bytes(memory: &str) -> u64 {
    let digits: u64 = memory
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap();
    match memory.chars().last() {
        Some('G') | Some('g') => digits << 30,
        Some('M') | Some('m') => digits << 20,
        _ => digits,
    }
}

fn perfplus_run(link: &ShapedLink, memory: &str, scenario: &Scenario, mode: &str) -> Run {
    let cluster = Cluster::new();
    let a = cluster.agent_in(&link.a, "a", "0");
    let b = cluster.agent_in(&link.b, "b", "0");
    let spec = format!("dirtier:{}", scenario.cmdline.replace(' ', ","));
    cluster.start_guest(&a, "bench", memory, &spec);
    std::thread::sleep(Duration::from_secs(2));
    let (run, report) = perfplus_trip(&cluster, link, &a, (&b, &b.addr_via(ShapedLink::IP_B)), memory, mode);
    if let Ok(dir) = std::env::var("PERFPLUS_BENCH_LOGS") {
        keep_logs(
            std::path::Path::new(&dir),
            &format!("{}-{mode}", scenario.name),
            &a,
            &b,
            &report,
        );
    }
    assert_eq!(report["outcome"], "completed", "perfplus run not completed: {report}");
    log_run(
        &format!(
            "perfplus (total {:.0} ms, downtime {:.1} ms, the guest's own longest stall {:.1} ms)",
            report["total_ms"].as_f64().unwrap_or(0.0),
            report["downtime_ms"].as_f64().unwrap_or(0.0),
            report["guest_max_stall_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        &run.felt,
    );
    run
}

/// One perfplus migration of the guest `bench` from agent `from` to agent `to`, reached at `to_addr`
/// (the CLI runs in `from`'s namespace), measured from outside: the probe over both agents from before
/// the CLI starts until a second after its report, the qdisc counters, both agents' CPU. The run and
/// the CLI's report.
fn perfplus_trip(
    cluster: &Cluster,
    link: &ShapedLink,
    from: &TestAgent,
    (to, to_addr): (&TestAgent, &str),
    memory: &str,
    mode: &str,
) -> (Run, serde_json::Value) {
    let (cpu_from, cpu_to) = (process_cpu_ms(from.pid()), process_cpu_ms(to.pid()));
    let wire = link.bytes_sent();
    let probe = FeltProbe::start(vec![from.pid(), to.pid()], memory_bytes(memory));
    let report = cluster.cli_json_in(
        from.netns(),
        &[
            "migrate", "bench", "--from", &from.addr, "--to", to_addr, "--mode", mode, "--json",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let felt = probe.finish();
    let run = Run {
        felt,
        wire_bytes: (link.bytes_sent() - wire) as f64,
        total_ms: report["total_ms"].as_f64().unwrap_or(f64::NAN),
        reported_downtime_ms: report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        cpu_source_ms: process_cpu_ms(from.pid()) - cpu_from,
        cpu_destination_ms: process_cpu_ms(to.pid()) - cpu_to,
    };
    (run, report)
}

/// Time between the end of the forward trip (and, for perfplus, of A's archive) and the start of the
/// return, the same for both tools.
const SETTLE: Duration = Duration::from_secs(2);

/// Longest the bench waits for an agent's archive of a departed VM (it runs at a low priority: a loaded
/// host delays it by seconds); past that the run stops, saying so.
const ARCHIVE_PATIENCE: Duration = Duration::from_secs(300);

/// What `agent::archive` logs once the pages of a VM that left are in the page store.
const ARCHIVED: &str = "kept the departed VM's pages in the page store";

/// Waits until `agent`'s log says the pages of VM `vm`, which left it, are in its page store (polled
/// every 50 ms); the pages it kept and how long the wait took. Panics if the archive failed (the agent
/// warns `page store: …`) or took longer than [`ARCHIVE_PATIENCE`].
fn wait_for_archive(agent: &TestAgent, vm: &str) -> (u64, Duration) {
    let started = std::time::Instant::now();
    let vm_field = format!("vm={vm}");
    loop {
        let log = agent.log_text();
        let about_vm = || log.lines().filter(|l| l.contains(&vm_field));
        if let Some((_, fields)) = about_vm().find_map(|l| l.split_once(ARCHIVED)) {
            let pages = fields
                .split_once("pages=")
                .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no pages= in the archive's log line: {fields:?}"));
            return (pages, started.elapsed());
        }
        if let Some(failed) = about_vm().find(|l| l.contains("page store:")) {
            panic!("the agent did not archive {vm}'s pages: {failed}");
        }
        assert!(
            started.elapsed() < ARCHIVE_PATIENCE,
            "the agent's archive of {vm} did not end within {ARCHIVE_PATIENCE:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `return-trip` for perfplus: the guest migrates A→B; once A's log says the pages of the VM that left
/// are in its page store (as large as the guest) and [`SETTLE`] has passed, it migrates back B→A, where
/// what A still holds travels as references. Both trips measured as [`perfplus_trip`]; the run returned
/// is the return's.
fn perfplus_return_run(link: &ShapedLink, memory: &str, scenario: &Scenario, mode: &str) -> Run {
    let cluster = Cluster::new();
    let a = cluster.agent_in(&link.a, "a", memory);
    // B needs no store: what it would archive after the return would run during the probe's last second.
    let b = cluster.agent_in(&link.b, "b", "0");
    let spec = format!("dirtier:{}", scenario.cmdline.replace(' ', ","));
    cluster.start_guest(&a, "bench", memory, &spec);
    std::thread::sleep(Duration::from_secs(2));
    let (forward, there) = perfplus_trip(&cluster, link, &a, (&b, &b.addr_via(ShapedLink::IP_B)), memory, mode);
    assert_eq!(
        there["outcome"], "completed",
        "perfplus's forward trip not completed: {there}"
    );
    let (archived, archive_wait) = wait_for_archive(&a, "bench");
    std::thread::sleep(SETTLE);
    let (back, report) = perfplus_trip(&cluster, link, &b, (&a, &a.addr_via(ShapedLink::IP_A)), memory, mode);
    if let Ok(dir) = std::env::var("PERFPLUS_BENCH_LOGS") {
        let both = serde_json::json!({ "forward": there, "return": report });
        keep_logs(
            std::path::Path::new(&dir),
            &format!("{}-{mode}", scenario.name),
            &a,
            &b,
            &both,
        );
    }
    assert_eq!(
        report["outcome"], "completed",
        "perfplus's return trip not completed: {report}"
    );
    assert_eq!(report["guest_verified"], true, "the guest's self-check on A: {report}");
    assert!(
        !a.log_text().contains("waiting for the page store to take the pages"),
        "the return waited for A's archive: the bench must start it only after the archive"
    );
    let held = |r: &serde_json::Value| r["held_from_store"].as_u64().unwrap_or(0);
    log_run(
        &format!(
            "perfplus return trip (forward A→B: felt {:.1} ms, wire {:.1} MB, total {:.0} ms, held_from_store {}; \
             A's archive ({archived} pages) done {:.1} s after the forward's probe; return B→A: wire {:.1} MB, \
             total {:.0} ms, downtime {:.1} ms, held_from_store {}, the guest's own longest stall {:.1} ms)",
            forward.felt.max_stall_ms,
            forward.wire_bytes / 1e6,
            forward.total_ms,
            held(&there),
            archive_wait.as_secs_f64(),
            back.wire_bytes / 1e6,
            back.total_ms,
            back.reported_downtime_ms,
            held(&report),
            report["guest_max_stall_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        &back.felt,
    );
    back
}

/// Copies a run's agent logs and report into `dir` as `<label>-<n>.{a.log,b.log,json}`.
fn keep_logs(
    dir: &std::path::Path,
    label: &str,
    a: &support::TestAgent,
    b: &support::TestAgent,
    report: &serde_json::Value,
) {
    std::fs::create_dir_all(dir).expect("PERFPLUS_BENCH_LOGS directory");
    let n = (1..).find(|n| !dir.join(format!("{label}-{n}.json")).exists()).unwrap();
    let base = dir.join(format!("{label}-{n}"));
    std::fs::write(base.with_extension("a.log"), a.log_text()).unwrap();
    std::fs::write(base.with_extension("b.log"), b.log_text()).unwrap();
    std::fs::write(base.with_extension("json"), format!("{report:#}")).unwrap();
    eprintln!("  logs and report: {}.*", base.display());
}

fn qemu_run(link: &ShapedLink, kernel: &std::path::Path, memory: &str, append: &str, mode: QemuMode, port: u16) -> Run {
    let (mut pair, placement) = qemu_pair_a_to_b(link, kernel, memory, append, port);
    qemu_trip(&mut pair, link, memory, mode, &placement)
}

/// A QEMU in A running the guest and one in B waiting for it on `port`, once the guest has run two
/// seconds (its workload under way, as for perfplus).
fn qemu_pair_a_to_b<'a>(
    link: &'a ShapedLink,
    kernel: &std::path::Path,
    memory: &str,
    append: &str,
    port: u16,
) -> (QemuPair, Placement<'a>) {
    let placement = Placement {
        source_netns: Some(link.a.name()),
        destination_netns: Some(link.b.name()),
        destination_ip: ShapedLink::IP_B,
        port,
    };
    let pair = QemuPair::start(kernel, memory_bytes(memory) >> 20, append, &placement);
    std::thread::sleep(Duration::from_secs(2));
    (pair, placement)
}

/// One QEMU migration of `pair` in `mode`, measured from outside as [`perfplus_trip`] measures
/// perfplus's; the guest's self-check on the destination must be clean.
fn qemu_trip(pair: &mut QemuPair, link: &ShapedLink, memory: &str, mode: QemuMode, placement: &Placement) -> Run {
    let (src, dst) = pair.pids();
    let (cpu_a, cpu_b) = pair.cpu_ms();
    let wire = link.bytes_sent();
    let probe = FeltProbe::start(vec![src, dst], memory_bytes(memory));
    let began = std::time::Instant::now();
    let mut run = pair.migrate(mode, placement);
    let waited_ms = began.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(1));
    let felt = probe.finish();
    assert_eq!(
        run.mismatches, 0,
        "the guest found mismatches after QEMU's migration ({mode:?})"
    );
    // Now and then QEMU 7.2 answers `total-time: 0` (and `downtime: 0`) for a migration whose bytes
    // crossed: the time the bench waited for `completed` stands in (polled every 20 ms, so at most
    // that much more, with the set-up calls), said on stderr.
    if run.total_ms.is_nan() || run.total_ms <= 0.0 {
        eprintln!(
            "  QEMU reported total-time {}: the bench's own {waited_ms:.0} ms from `migrate` to `completed` stands in",
            run.total_ms
        );
        run.total_ms = waited_ms;
    }
    let (cpu_a2, cpu_b2) = pair.cpu_ms();
    Run {
        felt,
        wire_bytes: (link.bytes_sent() - wire) as f64,
        total_ms: run.total_ms,
        reported_downtime_ms: run.downtime_ms,
        cpu_source_ms: cpu_a2 - cpu_a,
        cpu_destination_ms: cpu_b2 - cpu_b,
    }
}

/// `return-trip` for QEMU: the guest migrates A→B; the source QEMU in A is stopped, a new one started
/// there with `-incoming defer`, and after [`SETTLE`] the guest migrates back B→A in the same mode
/// (QEMU keeps nothing of a guest that left: the return costs what the first trip cost). Both trips
/// measured as [`qemu_trip`]; the run returned is the return's.
fn qemu_return_run(
    link: &ShapedLink,
    kernel: &std::path::Path,
    memory: &str,
    append: &str,
    mode: QemuMode,
    port: u16,
) -> Run {
    let (mut pair, there) = qemu_pair_a_to_b(link, kernel, memory, append, port);
    let forward = qemu_trip(&mut pair, link, memory, mode, &there);
    pair.turn_around(kernel, memory_bytes(memory) >> 20, append, Some(link.a.name()));
    std::thread::sleep(SETTLE);
    // The same port number, now in A's namespace (the forward's destination listened in B's).
    let back_placement = Placement {
        source_netns: Some(link.b.name()),
        destination_netns: Some(link.a.name()),
        destination_ip: ShapedLink::IP_A,
        port,
    };
    let back = qemu_trip(&mut pair, link, memory, mode, &back_placement);
    log_run(
        &format!(
            "{} return trip (forward A→B: felt {:.1} ms, wire {:.1} MB, total {:.0} ms; return B→A: wire {:.1} MB, \
             total {:.0} ms, downtime {:.1} ms)",
            qemu_label(&mode),
            forward.felt.max_stall_ms,
            forward.wire_bytes / 1e6,
            forward.total_ms,
            back.wire_bytes / 1e6,
            back.total_ms,
            back.reported_downtime_ms
        ),
        &back.felt,
    );
    back
}

/// One line per run on stderr: the stalls the probe saw (start and length, ms since it started, and
/// when it started in UTC, as the agents' logs give times).
fn log_run(label: &str, felt: &Felt) {
    let stalls: Vec<String> = felt.stalls.iter().map(|(at, ms)| format!("{ms:.0}@{at:.0}")).collect();
    let since_epoch = felt
        .started_at
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let ms_of_day = since_epoch.as_millis() % 86_400_000;
    eprintln!(
        "  {label}: felt {:.1} ms; stalls over 10 ms (length@start): {}; blind {:.0} ms; {} samples, longest gap between two of one process {:.1} ms; probe started {:02}:{:02}:{:02}.{:03} UTC",
        felt.max_stall_ms,
        stalls.join(" "),
        felt.blind_ms,
        felt.samples,
        felt.max_sample_gap_ms,
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    );
}

/// Median and min–max of `f` over `runs`.
fn stat(runs: &[Run], f: impl Fn(&Run) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn cell((median, min, max): (f64, f64, f64), digits: usize) -> String {
    format!("{median:.digits$} [{min:.digits$}–{max:.digits$}]")
}

fn qemu_label(mode: &QemuMode) -> String {
    match mode {
        QemuMode::Precopy { downtime_limit_ms } => format!("QEMU (limit {downtime_limit_ms} ms)"),
        QemuMode::MultifdZstd { downtime_limit_ms } => format!("QEMU multifd+zstd (limit {downtime_limit_ms} ms)"),
        QemuMode::Postcopy => "QEMU post-copy".to_string(),
    }
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
    let repeat: usize = env_or("PERFPLUS_BENCH_REPEAT", "3")
        .parse()
        .expect("PERFPLUS_BENCH_REPEAT");
    let chosen = std::env::var("PERFPLUS_BENCH_SCENARIOS").ok();
    let with_qemu = std::env::var("PERFPLUS_BENCH_QEMU").map_or(true, |v| v != "off");
    let Some(link) = ShapedLink::new('q', &rate) else {
        return;
    };
    let measured = peer::link::iperf(&link, 5299);
    println!("# perfplus vs QEMU over a {rate} tbf-shaped veth between two network namespaces");
    match measured {
        Some(mbps) => println!("\nlink measured with iperf3 (TCP, 2 s): {mbps:.0} Mbit/s"),
        None => println!("\nlink not measured: iperf3 is not installed (scripts/bench.sh installs it)"),
    }
    println!("guest: the built-in guest, {memory}; {repeat} interleaved runs per variant; median [min–max]\n");

    let dir = tempfile::tempdir().unwrap();
    let (kernel, tsc_khz) = peer::qemu::guest_kernel(dir.path());
    let mut port = 47200u16;
    for scenario in SCENARIOS {
        if chosen
            .as_deref()
            .is_some_and(|c| !c.split(',').any(|n| n == scenario.name))
        {
            continue;
        }
        let append = format!("{} tsc_khz={tsc_khz}", scenario.cmdline);
        let mut ours: Vec<Vec<Run>> = vec![Vec::new(); scenario.perfplus_modes.len()];
        let mut theirs: Vec<Vec<Run>> = vec![Vec::new(); scenario.qemu.len()];
        for rep in 0..repeat {
            eprintln!("{}: run {}/{repeat}", scenario.name, rep + 1);
            for (i, mode) in scenario.perfplus_modes.iter().enumerate() {
                // Every run, perfplus's or QEMU's, starts on a quiet host (`peer/host.rs`).
                peer::host::wait_until_quiet();
                ours[i].push(if scenario.return_trip {
                    perfplus_return_run(&link, &memory, scenario, mode)
                } else {
                    perfplus_run(&link, &memory, scenario, mode)
                });
            }
            for (i, mode) in scenario.qemu.iter().enumerate().filter(|_| with_qemu) {
                port += 1;
                peer::host::wait_until_quiet();
                let run = if scenario.return_trip {
                    qemu_return_run(&link, &kernel, &memory, &append, *mode, port)
                } else {
                    qemu_run(&link, &kernel, &memory, &append, *mode, port)
                };
                theirs[i].push(run);
            }
        }
        println!("## {} ({})\n", scenario.name, scenario.cmdline);
        if scenario.return_trip {
            println!(
                "A→B, then back B→A after a {} s settle (perfplus: once A had archived the guest's pages); the figures are the return's.\n",
                SETTLE.as_secs()
            );
        }
        println!("| variant | felt stall (ms) | reported downtime (ms) | wire (MB) | total (ms) | CPU src / dst (ms) | probe blind (ms) |");
        println!("|---|---|---|---|---|---|---|");
        let row = |label: &str, runs: &[Run]| {
            println!(
                "| {label} | {} | {} | {} | {} | {:.0} / {:.0} | {:.0} |",
                cell(stat(runs, |r| r.felt.max_stall_ms), 1),
                cell(stat(runs, |r| r.reported_downtime_ms), 1),
                cell(stat(runs, |r| r.wire_bytes / 1e6), 1),
                cell(stat(runs, |r| r.total_ms), 0),
                stat(runs, |r| r.cpu_source_ms).0,
                stat(runs, |r| r.cpu_destination_ms).0,
                stat(runs, |r| r.felt.blind_ms).2,
            )
        };
        for (mode, runs) in scenario.perfplus_modes.iter().zip(&ours) {
            row(&format!("perfplus {mode}"), runs);
        }
        for (mode, runs) in scenario.qemu.iter().zip(&theirs).filter(|_| with_qemu) {
            row(&qemu_label(mode), runs);
        }
        println!("\n| perfplus … / … | felt stall | wire bytes | total time |\n|---|---|---|---|");
        for (ours_mode, ours) in scenario.perfplus_modes.iter().zip(&ours) {
            for (mode, runs) in scenario.qemu.iter().zip(&theirs).filter(|_| with_qemu) {
                let ratio = |f: fn(&Run) -> f64| stat(ours, f).0 / stat(runs, f).0;
                println!(
                    "| {ours_mode} / {} | {:.2} | {:.2} | {:.2} |",
                    qemu_label(mode),
                    ratio(|r| r.felt.max_stall_ms),
                    ratio(|r| r.wire_bytes),
                    ratio(|r| r.total_ms)
                );
            }
        }
        println!();
    }
}
