//! The Perf+ papers' experiment, reproduced: a node with 4, then 8 VMs fails under control (it is
//! drained for maintenance) and every VM moves live to the other node, with Perf+ hashing on and off.
//!
//! Method:
//! - Two network namespaces joined by a veth pair shaped with tbf to `PERFPLUS_BENCH_RATE` (default
//!   1gbit, the papers' gigabit switch), checked with iperf3 first; a perfplus agent in each (node 1,
//!   node 2), no page store (nothing on node 2 before the event).
//! - `PERFPLUS_HA_VMS` (default `4,8`) built-in guests on node 1, each `PERFPLUS_HA_MEMORY` (default
//!   128M) with a 32 MiB working set rewritten at 2000 pages/s, the default content mix (unique 40 %,
//!   shared 30 %, zero 10 %, rewritten unchanged 20 %), each with a seed of its own. Sized for this
//!   2-core machine: the built-in guest's vCPU never idles (it re-verifies its memory between writes),
//!   so 8 guests are 8 busy threads on 2 cores next to both agents; 8 × 128 MiB keeps every migration
//!   short (well under a second of link time each) while the vCPUs compete with the agents as a loaded
//!   node would.
//! - The controlled failure: `perfplus node drain --from node1 --to node2 --mode precopy --max-rounds 4`
//!   (the papers allowed four pre-copy iterations; what is still dirty then goes in the stop-and-copy,
//!   so nothing is lost), run once with hashing and once with `--no-hashing` (every non-zero dirty page
//!   in full; zero pages are still detected and sent as markers in both, so the comparison measures
//!   what hashing adds), each on fresh agents and guests, `PERFPLUS_BENCH_REPEAT` times (default 1),
//!   interleaved; medians when repeated.
//! - The drain runs with `--no-verify`: a VM's slot goes to the next one once every page's checksum
//!   matched on node 2, without waiting for its guest's self-check (two sweeps of its memory, which
//!   take seconds when 8 busy vCPUs share 2 cores). The bench then checks every guest on node 2 at
//!   once: running, two more sweeps, no mismatch.
//! - Figures: pages sent in full per iteration (I–IV pre-copy rounds, then the stop-and-copy) summed
//!   over the VMs, downtime (mean and largest of the VMs), the migration time (each VM's start to
//!   running on node 2, added up: the link carries one migration at a time), the event's span (first
//!   migration start to last end, with the drain's bookkeeping between VMs), agent CPU of both nodes
//!   for the migrations (outside the vCPU threads, from the reports) as a share of the machine's 2
//!   cores over the migration time, link utilisation (bytes the qdiscs counted / (migration time ×
//!   the link rate iperf3 measured)), lost pages, each guest's longest stall by its own TSC (since its
//!   migration began, read after the check: anything the loaded host did to it meanwhile counts), and
//!   the availability of the event over a 30-day month (every VM's downtime against every VM's month).
//! - Output: `target/bench-results/ha/` (`PERFPLUS_HA_RESULTS` to change it): `summary.md` (the
//!   table), `pages-per-round-N.svg`, `downtime-per-vm-N.svg` (plotters) and each drain's JSON report.
//!
//! Run: `scripts/bench.sh ha` (installs iperf3) or `cargo bench -p perfplus --bench ha`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod peer {
    pub mod host;
    pub mod link;
}

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use serde_json::Value;
use support::{Cluster, ShapedLink};

/// Columns of the pages-per-iteration table: four pre-copy rounds, then the stop-and-copy.
const ROUND_LABELS: [&str; 5] = ["I", "II", "III", "IV", "stop-copy"];

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One drain: the event.
struct Event {
    vms: usize,
    hashing: bool,
    report: Value,
    wire_bytes: u64,
    /// Each guest's longest stall by its own TSC, read on node 2 after its self-check, by VM (vm1, ...).
    stalls: Vec<f64>,
}

/// The figures of one event.
#[derive(Clone, Default)]
struct Figures {
    /// Pages sent in full per round column, and dirty pages per round column, summed over the VMs.
    full: [f64; 5],
    dirty: [f64; 5],
    downtime_mean_ms: f64,
    downtime_max_ms: f64,
    stall_max_ms: f64,
    span_s: f64,
    /// The VMs' migration times (start to running on node 2) added up: the time the link carried a
    /// migration, one at a time.
    migration_s: f64,
    cpu_percent: f64,
    cpu_src_ms: f64,
    cpu_dst_ms: f64,
    link_percent: f64,
    wire_mb: f64,
    lost_pages: f64,
    sla_percent: f64,
    on_destination: f64,
    /// Downtime per VM, by VM name (vm1, vm2, ...).
    downtime_by_vm: Vec<f64>,
}

fn figures(event: &Event, link_mbps: f64) -> Figures {
    let vms = event.report["vms"].as_array().expect("vms");
    let mut f = Figures {
        downtime_by_vm: vec![0.0; event.vms],
        ..Default::default()
    };
    let (mut first_start, mut last_end) = (f64::INFINITY, 0.0f64);
    let mut downtimes = Vec::new();
    for vm in vms {
        let report = &vm["report"];
        for round in report["rounds"].as_array().expect("rounds") {
            let column = if round["stop_and_copy"] == true {
                4
            } else {
                (round["round"].as_u64().unwrap() as usize - 1).min(3)
            };
            f.full[column] += round["sent_pages"].as_f64().unwrap();
            f.dirty[column] += round["dirty_pages"].as_f64().unwrap();
        }
        let down = vm["downtime_ms"].as_f64().unwrap_or(f64::NAN);
        downtimes.push(down);
        let index: usize = vm["vm"].as_str().unwrap().trim_start_matches("vm").parse().unwrap();
        f.downtime_by_vm[index - 1] = down;
        f.cpu_src_ms += report["source_cpu_ms"].as_f64().unwrap_or(0.0);
        f.cpu_dst_ms += report["destination_cpu_ms"].as_f64().unwrap_or(0.0);
        first_start = first_start.min(vm["started_s"].as_f64().unwrap());
        last_end = last_end.max(vm["ended_s"].as_f64().unwrap());
    }
    f.stall_max_ms = event.stalls.iter().cloned().fold(0.0, f64::max);
    f.migration_s = vms
        .iter()
        .map(|v| v["report"]["total_ms"].as_f64().unwrap() / 1e3)
        .sum();
    f.downtime_mean_ms = downtimes.iter().sum::<f64>() / downtimes.len() as f64;
    f.downtime_max_ms = downtimes.iter().cloned().fold(0.0, f64::max);
    f.span_s = last_end - first_start;
    f.cpu_percent = (f.cpu_src_ms + f.cpu_dst_ms) / (f.migration_s * 1e3 * 2.0) * 100.0;
    f.wire_mb = event.wire_bytes as f64 / 1e6;
    f.link_percent = event.wire_bytes as f64 * 8.0 / (f.migration_s * link_mbps * 1e6) * 100.0;
    let total = &event.report["total"];
    f.lost_pages = total["lost_pages"].as_f64().unwrap();
    f.sla_percent = total["sla_percent"].as_f64().unwrap_or(f64::NAN);
    f.on_destination = total["on_destination"].as_f64().unwrap();
    f
}

/// The median of each figure over repetitions.
fn median(runs: &[Figures]) -> Figures {
    let m = |g: &dyn Fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(g).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = Figures {
        downtime_mean_ms: m(&|f| f.downtime_mean_ms),
        downtime_max_ms: m(&|f| f.downtime_max_ms),
        stall_max_ms: m(&|f| f.stall_max_ms),
        span_s: m(&|f| f.span_s),
        migration_s: m(&|f| f.migration_s),
        cpu_percent: m(&|f| f.cpu_percent),
        cpu_src_ms: m(&|f| f.cpu_src_ms),
        cpu_dst_ms: m(&|f| f.cpu_dst_ms),
        link_percent: m(&|f| f.link_percent),
        wire_mb: m(&|f| f.wire_mb),
        lost_pages: m(&|f| f.lost_pages),
        sla_percent: m(&|f| f.sla_percent),
        on_destination: m(&|f| f.on_destination),
        downtime_by_vm: runs[0].downtime_by_vm.clone(),
        ..Default::default()
    };
    for c in 0..5 {
        out.full[c] = m(&|f| f.full[c]);
        out.dirty[c] = m(&|f| f.dirty[c]);
    }
    for i in 0..out.downtime_by_vm.len() {
        out.downtime_by_vm[i] = m(&|f| f.downtime_by_vm[i]);
    }
    out
}

/// One controlled failure: `vms` guests on node 1, drained to node 2.
fn event(link: &ShapedLink, vms: usize, memory: &str, hashing: bool) -> Event {
    let cluster = Cluster::new();
    let node1 = cluster.agent_in(&link.a, "node1", "0");
    let node2 = cluster.agent_in(&link.b, "node2", "0");
    for i in 1..=vms {
        let workload = format!("dirtier:working-set=32M,rate=2k,mix=unique:40,dup:30,zero:10,same:20,seed={i}");
        cluster.start_guest(&node1, &format!("vm{i}"), memory, &workload);
    }
    // Every guest past its first sweep, then two seconds of steady writing.
    std::thread::sleep(Duration::from_secs(2));
    let wire = link.bytes_sent();
    let to = node2.addr_via(ShapedLink::IP_B);
    let mut args = vec![
        "node",
        "drain",
        "--from",
        &node1.addr,
        "--to",
        &to,
        "--mode",
        "precopy",
        "--max-rounds",
        "4",
        "--no-verify",
        "--json",
    ];
    if !hashing {
        args.push("--no-hashing");
    }
    let out = cluster
        .command_in(Some(link.a.name()), &args)
        .output()
        .expect("node drain");
    let wire_bytes = link.bytes_sent() - wire;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "node drain printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "the drain left a VM behind: {}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every guest's own check, on node 2, all at once: two more sweeps of its memory without a
    // mismatch; its longest stall since its migration began (reset by the source before round 1).
    let names: Vec<String> = (1..=vms).map(|i| format!("vm{i}")).collect();
    let at_end: Vec<Value> = names.iter().map(|n| cluster.status(&node2, n)).collect();
    let mut last = at_end.clone();
    support::wait_until(Duration::from_secs(300), "every guest's self-check on node 2", || {
        last = names.iter().map(|n| cluster.status(&node2, n)).collect();
        last.iter().zip(&at_end).all(|(now, then)| {
            support::guest_counter(now, "verify_sweeps") >= support::guest_counter(then, "verify_sweeps") + 2
        })
    });
    let mut stalls = Vec::new();
    for (name, status) in names.iter().zip(&last) {
        assert_eq!(status["run_state"], "running", "{name} on node 2: {status}");
        assert_eq!(support::guest_counter(status, "mismatches"), 0, "{name}: {status}");
        let khz = support::guest_counter(status, "tsc_khz").max(1) as f64;
        stalls.push(support::guest_counter(status, "max_stall_tsc") as f64 / khz);
    }
    Event {
        vms,
        hashing,
        report,
        wire_bytes,
        stalls,
    }
}

fn results_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PERFPLUS_HA_RESULTS") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench-results/ha")
}

const ON: RGBColor = RGBColor(31, 119, 180);
const OFF: RGBColor = RGBColor(214, 39, 40);

/// Pages sent in full per iteration, hashing on and off, as grouped bars (the papers' Charts 1 and 3).
fn chart_pages(path: &Path, vms: usize, on: &Figures, off: &Figures) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = on.full.iter().chain(&off.full).cloned().fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{vms} VMs: pages sent in full per iteration (sum over VMs)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..4.5f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 && i < 5 {
                ROUND_LABELS[i].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("pages (4 KiB)")
        .x_desc("iteration")
        .draw()?;
    for (series, figures, color, shift) in [("Perf+ hashing on", on, ON, -0.38), ("hashing off", off, OFF, 0.02)] {
        chart
            .draw_series(figures.full.iter().enumerate().map(|(i, &v)| {
                let x = i as f64 + shift;
                Rectangle::new([(x, 0.0), (x + 0.36, v)], color.filled())
            }))?
            .label(series)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Downtime per VM, hashing on and off, as grouped bars (the papers' Charts 2 and 4).
fn chart_downtime(path: &Path, vms: usize, on: &Figures, off: &Figures) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = on
        .downtime_by_vm
        .iter()
        .chain(&off.downtime_by_vm)
        .cloned()
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{vms} VMs: downtime per VM"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..vms as f64 + 0.5, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(vms)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("vm{}", x.round() as usize)
            } else {
                String::new()
            }
        })
        .y_desc("downtime (ms)")
        .draw()?;
    for (series, figures, color, shift) in [("Perf+ hashing on", on, ON, -0.38), ("hashing off", off, OFF, 0.02)] {
        chart
            .draw_series(figures.downtime_by_vm.iter().enumerate().map(|(i, &v)| {
                let x = (i + 1) as f64 + shift;
                Rectangle::new([(x, 0.0), (x + 0.36, v)], color.filled())
            }))?
            .label(series)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    if support::kvm_missing() {
        return;
    }
    let rate = env_or("PERFPLUS_BENCH_RATE", "1gbit");
    let memory = env_or("PERFPLUS_HA_MEMORY", "128M");
    let repeat: usize = env_or("PERFPLUS_BENCH_REPEAT", "1")
        .parse()
        .expect("PERFPLUS_BENCH_REPEAT");
    let counts: Vec<usize> = env_or("PERFPLUS_HA_VMS", "4,8")
        .split(',')
        .map(|n| n.trim().parse().expect("PERFPLUS_HA_VMS: numbers"))
        .collect();
    let dir = results_dir();
    std::fs::create_dir_all(&dir).expect("results directory");
    let Some(link) = ShapedLink::new('h', &rate) else {
        return;
    };
    let measured = peer::link::iperf(&link, 5298);
    let link_mbps = measured.unwrap_or_else(|| {
        let nominal = perfplus::cli::track::parse_link(&rate).expect("PERFPLUS_BENCH_RATE") / 1e6;
        eprintln!("iperf3 missing: link utilisation against the nominal {nominal:.0} Mbit/s");
        nominal
    });

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# The Perf+ papers' experiment: a node drained, hashing on and off\n\n\
         Two network namespaces (node 1, node 2) joined by a {rate} tbf-shaped veth ({}); on node 1, N built-in \
         guests of {memory} (32 MiB working set rewritten at 2000 pages/s, default content mix, a seed each); \
         `perfplus node drain --mode precopy --max-rounds 4` moves them all to node 2, one at a time. \
         {repeat} run(s) per variant{}. Method: `perfplus-user/benches/ha.rs`.\n",
        measured.map_or("not measured".to_string(), |m| format!("iperf3: {m:.0} Mbit/s")),
        if repeat > 1 { ", medians" } else { "" }
    );
    for &n in &counts {
        let mut on_runs = Vec::new();
        let mut off_runs = Vec::new();
        for rep in 0..repeat {
            for hashing in [true, false] {
                eprintln!(
                    "{n} VMs, hashing {}: run {}/{repeat}",
                    if hashing { "on" } else { "off" },
                    rep + 1
                );
                // Each run on a quiet host: the previous one's freed guest RAM stalls guests while the
                // host reports it (`peer/host.rs`).
                peer::host::wait_until_quiet();
                let e = event(&link, n, &memory, hashing);
                let name = format!("drain-{n}-{}-{}.json", if hashing { "on" } else { "off" }, rep + 1);
                std::fs::write(dir.join(name), serde_json::to_string_pretty(&e.report).unwrap()).expect("report file");
                let f = figures(&e, link_mbps);
                eprintln!(
                    "  {} VMs on node 2; full pages {:?}; downtime mean {:.1} ms; span {:.2} s; lost {}",
                    f.on_destination, f.full, f.downtime_mean_ms, f.span_s, f.lost_pages
                );
                assert_eq!(e.hashing, hashing);
                if hashing {
                    on_runs.push(f);
                } else {
                    off_runs.push(f);
                }
            }
        }
        let (on, off) = (median(&on_runs), median(&off_runs));
        let pages_svg = format!("pages-per-round-{n}.svg");
        let downtime_svg = format!("downtime-per-vm-{n}.svg");
        chart_pages(&dir.join(&pages_svg), n, &on, &off).expect("pages chart");
        chart_downtime(&dir.join(&downtime_svg), n, &on, &off).expect("downtime chart");

        let _ = writeln!(md, "## {n} VMs\n");
        let _ = writeln!(
            md,
            "| variant | I | II | III | IV | stop-copy | downtime mean / max (ms) | guest stall max (ms) | migration time \
             (s, Σ VMs) | event span (s) | agent CPU (% of 2 cores) | link use (%) | wire (MB) | lost pages | SLA % (event) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (label, f) in [("Perf+ hashing on", &on), ("hashing off", &off)] {
            let _ = writeln!(
                md,
                "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.8} |",
                f.full[0],
                f.full[1],
                f.full[2],
                f.full[3],
                f.full[4],
                f.downtime_mean_ms,
                f.downtime_max_ms,
                f.stall_max_ms,
                f.migration_s,
                f.span_s,
                f.cpu_percent,
                f.link_percent,
                f.wire_mb,
                f.lost_pages,
                f.sla_percent
            );
        }
        let _ = writeln!(
            md,
            "\nPages sent in full per iteration, summed over the VMs (dirty pages the tracker reported: on {:?}, off \
             {:?}). Agent CPU: on {:.0} ms (node 1) + {:.0} ms (node 2), off {:.0} + {:.0} ms. Charts: \
             [{pages_svg}]({pages_svg}), [{downtime_svg}]({downtime_svg}).\n",
            on.dirty.map(|v| v as u64),
            off.dirty.map(|v| v as u64),
            on.cpu_src_ms,
            on.cpu_dst_ms,
            off.cpu_src_ms,
            off.cpu_dst_ms
        );
    }
    std::fs::write(dir.join("summary.md"), &md).expect("summary.md");
    println!("{md}");
    println!("results in {}", dir.display());
}
