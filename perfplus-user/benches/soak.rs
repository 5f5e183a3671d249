//! Soak: one guest under load migrated back and forth between two agents, many times, checking every
//! migration and whether the agents leak.
//!
//! Method: two agents on localhost (with page stores, as in production: a guest coming back finds its
//! pages held) and one built-in guest (`PERFPLUS_SOAK_MEMORY`, default 128M) writing 20k pages/s over a
//! 32 MiB working set of mixed content. It is migrated A→B, B→A, ... `PERFPLUS_SOAK_MIGRATIONS` times
//! (default 100), alternating pre-copy and hybrid. Every report must say `completed` with no lost page
//! and equal digests (the guest's self-check passed on the destination). After the first round trip
//! (warm-up: the page stores and caches fill) and at the end, the open file descriptors
//! (`/proc/PID/fd`) and resident memory (`VmRSS`) of both agents are read; the table gives them, and
//! the downtime and total time (median, min–max) of the migrations, and a second table the same
//! figures every 20 migrations (the page stores fill up to their capacity, 256 MiB each, so RSS grows
//! until they are full and should stay flat after). The run stops at the first failed
//! migration, or after `PERFPLUS_SOAK_DEADLINE_S` seconds (default 1200), and then exits non-zero.
//!
//! Run: `scripts/bench.sh soak` or `cargo bench -p perfplus --bench soak`.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Cluster, TestAgent};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Open file descriptors and resident memory (KiB) of a process.
fn usage(agent: &TestAgent) -> (usize, u64) {
    let pid = agent.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    (fds, rss)
}

fn median_min_max(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn main() {
    if support::kvm_missing() {
        return;
    }
    let migrations: usize = env_or("PERFPLUS_SOAK_MIGRATIONS", 100);
    let memory: String = env_or("PERFPLUS_SOAK_MEMORY", "128M".to_string());
    let deadline = Instant::now() + Duration::from_secs(env_or("PERFPLUS_SOAK_DEADLINE_S", 1200));
    let cluster = Cluster::new();
    let agents = [
        cluster.agent_with_store("a", "256M"),
        cluster.agent_with_store("b", "256M"),
    ];
    cluster.start_guest(
        &agents[0],
        "soak",
        &memory,
        "dirtier:working-set=32M,rate=20k,mix=unique:40,dup:30,zero:10,same:20",
    );

    let started = Instant::now();
    let mut downtimes = Vec::new();
    let mut totals = Vec::new();
    let mut warm: Option<[(usize, u64); 2]> = None;
    // (migrations done, usage of both agents) every 20 migrations, for the trend.
    let mut samples: Vec<(usize, [(usize, u64); 2])> = Vec::new();
    let mut failure = None;
    for i in 0..migrations {
        if Instant::now() > deadline {
            failure = Some(format!("deadline reached after {i} migrations"));
            break;
        }
        let (from, to) = (&agents[i % 2], &agents[(i + 1) % 2]);
        let mode = if i % 4 < 2 { "precopy" } else { "hybrid" };
        let out = cluster.cli(&[
            "migrate", "soak", "--from", &from.addr, "--to", &to.addr, "--mode", mode, "--json",
        ]);
        let report: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        let ok = out.status.success()
            && report.as_ref().is_some_and(|r| {
                r["outcome"] == "completed" && r["lost_pages"] == 0 && r["memory_digest_equal"] == true
            });
        if !ok {
            failure = Some(format!(
                "migration {} ({mode}) failed: {}\n{}",
                i + 1,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
            break;
        }
        let report = report.unwrap();
        downtimes.push(report["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        totals.push(report["total_ms"].as_f64().unwrap_or(f64::NAN));
        if i == 1 {
            warm = Some([usage(&agents[0]), usage(&agents[1])]);
        }
        if (i + 1) % 20 == 0 {
            samples.push((i + 1, [usage(&agents[0]), usage(&agents[1])]));
        }
        eprintln!(
            "  {:3}/{migrations} {mode:8} downtime {:6.1} ms total {:7.1} ms",
            i + 1,
            report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            report["total_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let end = [usage(&agents[0]), usage(&agents[1])];
    println!(
        "\n## Soak: {} migrations of one {memory} guest in {:.0} s\n",
        downtimes.len(),
        started.elapsed().as_secs_f64()
    );
    if !downtimes.is_empty() {
        let (d, dmin, dmax) = median_min_max(&mut downtimes);
        let (t, tmin, tmax) = median_min_max(&mut totals);
        println!("| figure | median | min–max |\n|---|---|---|");
        println!("| downtime (ms) | {d:.1} | {dmin:.1}–{dmax:.1} |");
        println!("| total time (ms) | {t:.0} | {tmin:.0}–{tmax:.0} |");
    }
    if let Some(warm) = warm {
        println!("\n| agent | fds after warm-up | fds at the end | RSS after warm-up | RSS at the end |\n|---|---|---|---|---|");
        for (name, (w, e)) in ["a", "b"].iter().zip(warm.iter().zip(end.iter())) {
            println!(
                "| {name} | {} | {} | {:.1} MiB | {:.1} MiB |",
                w.0,
                e.0,
                w.1 as f64 / 1024.0,
                e.1 as f64 / 1024.0
            );
        }
    }
    if !samples.is_empty() {
        println!("\n| after migrations | fds a | fds b | RSS a (MiB) | RSS b (MiB) |\n|---|---|---|---|---|");
        for (n, [a, b]) in &samples {
            println!(
                "| {n} | {} | {} | {:.1} | {:.1} |",
                a.0,
                b.0,
                a.1 as f64 / 1024.0,
                b.1 as f64 / 1024.0
            );
        }
    }
    if let Some(failure) = failure {
        eprintln!("soak FAILED: {failure}");
        std::process::exit(1);
    }
    println!("\nevery migration completed: no lost page, digests equal, the guest's self-check clean");
}
