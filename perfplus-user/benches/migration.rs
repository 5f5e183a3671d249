//! Migration benchmark: the same guest and workload migrated with Perf+ hashing on and off, in one run.
//!
//! Method: for each workload, twice (hashing on, then off), a fresh pair of agents on localhost (no page
//! store, so no run benefits from an earlier one) starts the built-in guest with that workload, waits
//! until the guest has swept its working set once and one more second has passed, and migrates it with
//! the default downtime target. The migration report of each run is recorded; the table prints the
//! figures and the on/off ratios of bytes on the wire, pages sent per round, downtime, the guest's own
//! longest stall and total time. Each pair of runs is repeated `PERFPLUS_BENCH_REPEAT` times (default 1)
//! and the median is reported. Run: `cargo bench -p perfplus --bench migration`
//! (`PERFPLUS_BENCH_MEMORY`, default 512M, sets the guest size).

#[path = "../../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use support::Cluster;

struct Workload {
    name: &'static str,
    spec: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "duplicate-heavy",
        spec: "dirtier:working-set=128M,rate=20k,mix=unique:10,dup:70,zero:10,same:10",
    },
    Workload {
        name: "mixed (demo)",
        spec: "dirtier:working-set=128M,rate=20k,mix=unique:40,dup:30,zero:10,same:20",
    },
    Workload {
        name: "all unique",
        spec: "dirtier:working-set=128M,rate=20k,mix=unique:100,dup:0,zero:0,same:0",
    },
];

#[derive(Clone, Copy, Default)]
struct Figures {
    bytes: f64,
    rounds: f64,
    sent_per_round: f64,
    downtime_ms: f64,
    stall_ms: f64,
    total_ms: f64,
    cpu_ms: f64,
}

fn run(memory: &str, workload: &Workload, hashing: bool) -> Figures {
    let cluster = Cluster::new();
    let a = cluster.agent_with_store("a", "0");
    let b = cluster.agent_with_store("b", "0");
    cluster.start_guest(&a, "bench", memory, workload.spec);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut args = vec!["migrate", "bench", "--from", &a.addr, "--to", &b.addr, "--json"];
    if !hashing {
        args.push("--no-hashing");
    }
    let report: Value = cluster.cli_json(&args);
    assert_eq!(report["lost_pages"], 0, "a benchmark run lost pages: {report}");
    let rounds = report["rounds"].as_array().expect("rounds");
    let sent: u64 = rounds.iter().map(|r| r["sent_pages"].as_u64().unwrap()).sum();
    Figures {
        bytes: report["bytes_on_wire"].as_f64().unwrap(),
        rounds: rounds.len() as f64,
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
    for workload in &WORKLOADS {
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..repeat {
            on.push(run(&memory, workload, true));
            off.push(run(&memory, workload, false));
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
    }
}
