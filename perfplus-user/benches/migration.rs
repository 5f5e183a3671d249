//! Migration benchmark: the same guest and workload migrated with Perf+ hashing on and off, and by the
//! peer (QEMU 7.2, Debian's qemu-system-x86), in one run.
//!
//! Method: for each workload, twice (hashing on, then off), a fresh pair of agents on localhost (no page
//! store, so no run benefits from an earlier one) starts the built-in guest with that workload, waits
//! until the guest has swept its working set once and one more second has passed, and migrates it with
//! the default downtime target. The migration report of each run is recorded; the table prints the
//! figures and the on/off ratios of bytes on the wire, pages sent per round, downtime, the guest's own
//! longest stall and total time. Each pair of runs is repeated `PERFPLUS_BENCH_REPEAT` times (default 1)
//! and the median is reported.
//!
//! Order: the same pre-copy migration of a guest with a hot set (`hot=10:90`, 40k writes/s) with the
//! pages of each round sent hot-last and in address order; it reports the pages sent after round 1,
//! rounds, downtime and total time of each, and their ratios.
//!
//! The peer: when `qemu-system-x86_64` is installed (`scripts/bench.sh` installs it), the same guest
//! image with the same workload and memory size boots under QEMU (`-enable-kvm -kernel`) and QEMU
//! live-migrates it to a second QEMU over loopback (QMP `migrate`, downtime limit = our target 30 ms,
//! bandwidth unlimited) — see `peer/qemu.rs` for how its figures are read. The last table gives
//! perfplus (hashing on) / QEMU ratios: below 1 is better for perfplus.
//!
//! Run: `scripts/bench.sh` or `cargo bench -p perfplus --bench migration` (`PERFPLUS_BENCH_MEMORY`,
//! default 512M, sets the guest size). Close other work first: the machine has two cores, and the
//! guest's vCPU takes one.

#[path = "../../tests/support/mod.rs"]
mod support;

mod peer {
    pub mod felt;
    pub mod qemu;
}

use serde_json::Value;
use support::Cluster;

struct Workload {
    name: &'static str,
    /// The built-in guest's command line (without `tsc_khz=`).
    cmdline: &'static str,
}

impl Workload {
    /// The same workload as a `perfplus vm start --workload` value.
    fn spec(&self) -> String {
        format!("dirtier:{}", self.cmdline.replace(' ', ","))
    }
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "duplicate-heavy",
        cmdline: "working-set=128M rate=20k mix=unique:10,dup:70,zero:10,same:10",
    },
    Workload {
        name: "mixed (demo)",
        cmdline: "working-set=128M rate=20k mix=unique:40,dup:30,zero:10,same:20",
    },
    Workload {
        name: "all unique",
        cmdline: "working-set=128M rate=20k mix=unique:100,dup:0,zero:0,same:0",
    },
];

#[derive(Clone, Copy, Default)]
struct Figures {
    bytes: f64,
    /// Pages sent in full after round 1 (pages sent again, or first written during the migration).
    resent: f64,
    rounds: f64,
    sent_per_round: f64,
    downtime_ms: f64,
    stall_ms: f64,
    total_ms: f64,
    cpu_ms: f64,
}

fn run(memory: &str, workload: &Workload, hashing: bool, extra: &[&str]) -> Figures {
    let cluster = Cluster::new();
    let a = cluster.agent_with_store("a", "0");
    let b = cluster.agent_with_store("b", "0");
    cluster.start_guest(&a, "bench", memory, &workload.spec());
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Pre-copy only: this benchmark compares pre-copy variants (post-copy has its own bench).
    let mut args = vec![
        "migrate", "bench", "--from", &a.addr, "--to", &b.addr, "--json", "--mode", "precopy",
    ];
    args.extend_from_slice(extra);
    if !hashing {
        args.push("--no-hashing");
    }
    let report: Value = cluster.cli_json(&args);
    assert_eq!(report["lost_pages"], 0, "a benchmark run lost pages: {report}");
    let rounds = report["rounds"].as_array().expect("rounds");
    let sent: u64 = rounds.iter().map(|r| r["sent_pages"].as_u64().unwrap()).sum();
    let resent: u64 = rounds.iter().skip(1).map(|r| r["sent_pages"].as_u64().unwrap()).sum();
    Figures {
        bytes: report["bytes_on_wire"].as_f64().unwrap(),
        rounds: rounds.len() as f64,
        resent: resent as f64,
        sent_per_round: sent as f64 / rounds.len() as f64,
        downtime_ms: report["downtime_ms"].as_f64().unwrap(),
        stall_ms: report["guest_max_stall_ms"].as_f64().unwrap_or(f64::NAN),
        total_ms: report["total_ms"].as_f64().unwrap(),
        cpu_ms: report["agent_cpu_ms"].as_f64().unwrap(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn median_figures(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        bytes: m(|f| f.bytes),
        rounds: m(|f| f.rounds),
        resent: m(|f| f.resent),
        sent_per_round: m(|f| f.sent_per_round),
        downtime_ms: m(|f| f.downtime_ms),
        stall_ms: m(|f| f.stall_ms),
        total_ms: m(|f| f.total_ms),
        cpu_ms: m(|f| f.cpu_ms),
    }
}

fn main() {
    if support::kvm_missing() {
        return;
    }
    let memory = std::env::var("PERFPLUS_BENCH_MEMORY").unwrap_or_else(|_| "512M".into());
    let repeat: usize = std::env::var("PERFPLUS_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!("perfplus migration benchmark: guest {memory}, {repeat} run(s) per setting, medians");
    println!(
        "{:<16} {:>7} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "workload", "hashing", "wire MiB", "rounds", "sent/rnd", "downtime", "guest stall", "total ms", "CPU ms"
    );
    let mut results = Vec::new();
    for workload in &WORKLOADS {
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..repeat {
            on.push(run(&memory, workload, true, &[]));
            off.push(run(&memory, workload, false, &[]));
        }
        let (on, off) = (median_figures(&on), median_figures(&off));
        for (label, f) in [("on", on), ("off", off)] {
            println!(
                "{:<16} {:>7} {:>10.1} {:>7.0} {:>10.0} {:>8.1}ms {:>9.1}ms {:>10.0} {:>8.0}",
                workload.name,
                label,
                f.bytes / 1048576.0,
                f.rounds,
                f.sent_per_round,
                f.downtime_ms,
                f.stall_ms,
                f.total_ms,
                f.cpu_ms
            );
        }
        println!(
            "{:<16} on/off: bytes {:.3}, sent pages per round {:.3}, downtime {:.2}, guest stall {:.2}, total time {:.2}",
            workload.name,
            on.bytes / off.bytes,
            on.sent_per_round / off.sent_per_round,
            on.downtime_ms / off.downtime_ms,
            on.stall_ms / off.stall_ms,
            on.total_ms / off.total_ms
        );
        results.push((workload, on));
    }
    compare_order(&memory, repeat);
    compare_with_qemu(&memory, &results);
}

/// Hot-last against address order on a workload with a hot set (90 % of the writes to 10 % of the
/// working set): pages re-sent (sent in more than one round), rounds, downtime.
fn compare_order(memory: &str, repeat: usize) {
    let workload = Workload {
        name: "hot set 10:90",
        cmdline: "working-set=128M rate=40k hot=10:90",
    };
    let mut hot_last = Vec::new();
    let mut address = Vec::new();
    for _ in 0..repeat {
        hot_last.push(run(memory, &workload, true, &["--order", "hot-last"]));
        address.push(run(memory, &workload, true, &["--order", "address"]));
    }
    let (hot, addr) = (median_figures(&hot_last), median_figures(&address));
    println!();
    println!("order of a round, workload {} ({}):", workload.name, workload.cmdline);
    for (label, f) in [("hot-last", hot), ("address", addr)] {
        println!(
            "  {label:<9} sent after round 1 {:>7.0} pages, rounds {:>3.0}, downtime {:>6.1} ms, guest stall {:>6.1} ms, total {:>6.0} ms",
            f.resent, f.rounds, f.downtime_ms, f.stall_ms, f.total_ms
        );
    }
    println!(
        "  hot-last/address: pages sent after round 1 {:.3}, downtime {:.3}, total time {:.3}",
        hot.resent / addr.resent,
        hot.downtime_ms / addr.downtime_ms,
        hot.total_ms / addr.total_ms
    );
}

fn memory_mib(memory: &str) -> u64 {
    let digits: u64 = memory
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .expect("memory size");
    match memory.chars().last() {
        Some('G') | Some('g') => digits * 1024,
        _ => digits,
    }
}

fn compare_with_qemu(memory: &str, ours: &[(&Workload, Figures)]) {
    if !peer::qemu::available() {
        println!("QEMU comparison skipped: qemu-system-x86_64 is not installed (scripts/bench.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (kernel, tsc_khz) = peer::qemu::guest_kernel(dir.path());
    println!();
    println!("peer: QEMU 7.2 migrating the same guest (downtime limit 30 ms, loopback, bandwidth unlimited)");
    println!(
        "{:<16} {:>10} {:>7} {:>10} {:>11} {:>10} | perfplus/QEMU: {:>6} {:>8} {:>7} {:>6}",
        "workload", "wire MiB", "rounds", "downtime", "guest stall", "total ms", "bytes", "downtime", "stall", "total"
    );
    for (i, (workload, ours)) in ours.iter().enumerate() {
        let append = format!("{} tsc_khz={tsc_khz}", workload.cmdline);
        let qemu = peer::qemu::migrate(&kernel, memory_mib(memory), &append, 30, 47000 + i as u16);
        assert_eq!(qemu.mismatches, 0, "the guest found mismatches after QEMU's migration");
        println!(
            "{:<16} {:>10.1} {:>7.0} {:>8.1}ms {:>9.1}ms {:>10.0} | {:>21.3} {:>8.3} {:>7.3} {:>6.3}",
            workload.name,
            qemu.bytes / 1048576.0,
            qemu.rounds,
            qemu.downtime_ms,
            qemu.guest_stall_ms,
            qemu.total_ms,
            ours.bytes / qemu.bytes,
            ours.downtime_ms / qemu.downtime_ms,
            ours.stall_ms / qemu.guest_stall_ms,
            ours.total_ms / qemu.total_ms
        );
    }
}
