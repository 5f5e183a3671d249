//! Post-copy benchmark: demand-fault latency against the local `UFFDIO_COPY` floor, and hybrid against
//! pure pre-copy on a workload pre-copy cannot converge on. Run: `cargo bench -p perfplus --bench postcopy`.
//!
//! Method.
//! 1. Floor (same run, same machine): 64 MiB of guest memory (a memfd, as the VMM uses) registered with
//!    userfaultfd MISSING; one thread reads one byte of each of 4096 random pages in turn; a second
//!    thread waits on the uffd and answers each fault with a 4 KiB `UFFDIO_COPY` (the agent's own
//!    [`GuestUffd`]). Measured: fault read → copy done, per fault (what the agent's fault latency counts
//!    too), and the reader's own time per page. Memory is touched once before (host warm-up).
//! 2. Demand-fault latency end to end on loopback: two agents, the built-in guest (256 MiB,
//!    `working-set=64M rate=20k`), `migrate --mode postcopy`; the destination's `fault_latency_us`
//!    (fault read → page installed, for faults that went to the source) is divided by the floor's.
//!    The background push runs meanwhile (as it does in real use), on the same two cores.
//! 3. Non-converging workload (`working-set=64M rate=0`, i.e. as fast as the guest can write, ~550k
//!    writes/s, 256 MiB guest) on loopback: `--mode precopy --max-rounds 8` (stops at the round limit
//!    and stop-and-copies the whole dirty set) against `--mode hybrid` (switches to post-copy when the
//!    dirty set shrinks by less than half a round). Reported: total time, downtime (agents), the guest's own longest stall
//!    (its TSC), bytes on the wire. Each run uses fresh agents; `PERFPLUS_BENCH_REPEAT` (default 1)
//!    repeats and takes the median. Loopback is far faster than a real link; `tests/postcopy.rs` runs
//!    the same modes over a 150 Mbit/s tbf link.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use perfplus_vmm::demand_paging::GuestUffd;
use perfplus_vmm::memory::GuestMemory;
use serde_json::Value;
use support::Cluster;

const PAGE: usize = 4096;

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// Returns (p50, p99) of the handler's fault→copy time and the reader's time per page, in µs.
fn uffd_floor() -> (f64, f64, f64) {
    let pages = 16384u64;
    let memory = Arc::new(GuestMemory::new(pages * PAGE as u64).expect("memory"));
    // Warm the host memory, then drop it from the memfd so that every page is missing again.
    for p in 0..pages {
        memory.write_page(p, &[1; PAGE]);
    }
    perfplus_vmm::demand_paging::punch_pages(&memory, 0, pages).expect("punch");
    let uffd = Arc::new(GuestUffd::register(memory.clone()).expect("userfaultfd"));
    let mut order: Vec<u64> = (0..pages).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order.truncate(4096);
    let n = order.len();
    let reader = {
        // Through the guest view, as a vCPU reads: the agent's view never faults.
        let memory = memory.clone();
        let base = memory.guest_view_addr() as usize;
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut sum = 0u8;
            for &p in &order {
                // SAFETY: page `p` lies inside the guest view of `memory` (p < pages), which this
                // thread keeps mapped (it holds the Arc); a u8 has no invalid values, and the read
                // only waits in the kernel until the handler below installed the page.
                sum ^= unsafe { std::ptr::read_volatile((base + p as usize * PAGE) as *const u8) };
            }
            std::hint::black_box(sum);
            drop(memory);
            start.elapsed().as_secs_f64() * 1e6 / order.len() as f64
        })
    };
    let data = [7u8; PAGE];
    let mut handler = Vec::with_capacity(n);
    while handler.len() < n {
        if let Some(page) = uffd.next_fault(1000).expect("fault") {
            let t = Instant::now();
            uffd.copy(page, &data).expect("copy");
            handler.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let per_page = reader.join().expect("reader");
    uffd.unregister().expect("unregister");
    (percentile(&mut handler, 0.5), percentile(&mut handler, 0.99), per_page)
}

fn migrate(memory: &str, workload: &str, extra: &[&str]) -> Value {
    let cluster = Cluster::new();
    let a = cluster.agent_with_store("a", "0");
    let b = cluster.agent_with_store("b", "0");
    cluster.start_guest(&a, "bench", memory, workload);
    std::thread::sleep(Duration::from_secs(1));
    let mut args = vec!["migrate", "bench", "--from", &a.addr, "--to", &b.addr, "--json"];
    args.extend_from_slice(extra);
    let report: Value = cluster.cli_json(&args);
    assert_eq!(report["lost_pages"], 0, "a benchmark run lost pages: {report}");
    assert_eq!(report["guest_verified"], true, "guest self-check failed: {report}");
    report
}

fn f(report: &Value, field: &str) -> f64 {
    report[field].as_f64().unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let repeat: usize = std::env::var("PERFPLUS_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);

    let (floor_p50, floor_p99, reader_us) = uffd_floor();
    println!("local UFFDIO_COPY floor (4 KiB, fault thread): p50 {floor_p50:.1} us, p99 {floor_p99:.1} us; reader sees {reader_us:.1} us per page");

    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut faults = Vec::new();
    for _ in 0..repeat {
        let r = migrate("256M", "dirtier:working-set=64M,rate=20k", &["--mode", "postcopy"]);
        p50.push(r["fault_latency_us"]["p50"].as_f64().unwrap());
        p99.push(r["fault_latency_us"]["p99"].as_f64().unwrap());
        faults.push(f(&r, "demand_faults"));
    }
    let (p50, p99) = (median(p50), median(p99));
    println!(
        "demand fault over loopback (post-copy, push running): p50 {p50:.0} us, p99 {p99:.0} us over {:.0} faults; ratio to the floor: p50 x{:.0}, p99 x{:.0}",
        median(faults),
        p50 / floor_p50,
        p99 / floor_p99
    );

    let workload = "dirtier:working-set=64M,rate=0";
    println!("\nnon-converging workload ({workload}, 256 MiB), loopback, median of {repeat}:");
    println!(
        "{:<28} {:>10} {:>12} {:>14} {:>10} {:>8}",
        "mode", "total ms", "downtime ms", "guest stall ms", "wire MiB", "rounds"
    );
    for (name, args) in [
        (
            "pre-copy (8 rounds max)",
            vec!["--mode", "precopy", "--max-rounds", "8"],
        ),
        ("hybrid (8 rounds max)", vec!["--mode", "hybrid", "--max-rounds", "8"]),
    ] {
        let runs: Vec<Value> = (0..repeat).map(|_| migrate("256M", workload, &args)).collect();
        let m = |field: &str| median(runs.iter().map(|r| f(r, field)).collect());
        let rounds = median(
            runs.iter()
                .map(|r| r["rounds"].as_array().unwrap().len() as f64)
                .collect(),
        );
        println!(
            "{:<28} {:>10.0} {:>12.1} {:>14.1} {:>10.1} {:>8.0}",
            name,
            m("total_ms"),
            m("downtime_ms"),
            m("guest_max_stall_ms"),
            m("bytes_on_wire") / 1048576.0,
            rounds
        );
    }
}
