//! Dirty-tracker benchmark: what each tracker costs the guest, and what one `collect()` costs as guest
//! memory grows.
//!
//! Method (all in one process, real KVM, the built-in guest):
//! 1. **Guest slowdown.** For each tracker, a 256 MiB VM (created in the mode the tracker needs) runs
//!    the built-in guest flat out (`working-set=64M rate=0`, every write a fresh page). Once it has
//!    swept its working set, its `pages_written` and `heartbeat` rates are measured over
//!    `PERFPLUS_BENCH_SECS` (default 2) seconds untracked, then over the same time with the tracker
//!    running and collecting every 50 ms (as pre-copy rounds do, back to back), then untracked again.
//!    The slowdown is 1 − tracked / mean(untracked before, after).
//! 2. **Cost of one `collect()`.** For each guest size (1, 4, 16 GiB, one VM at a time, freed before
//!    the next; the memfd is lazily allocated so untouched guest memory costs nothing) and each tracker,
//!    the guest writes a small working set flat out (`working-set=4M`: ≤ 1024 dirty pages per
//!    collect). After a first collect, 30 collects 20 ms apart are timed; the table gives the median,
//!    p90 and the median dirty count. The dirty set is the same at every size, so a cost that grows
//!    with the size is a cost of the memory size itself (the dirty log's bitmap).
//!
//! Run: `cargo bench -p perfplus --bench trackers` (`PERFPLUS_BENCH_SIZES=1G,4G` to choose sizes).
use std::time::{Duration, Instant};

use perfplus_common::guest_abi::state;
use perfplus_vmm::tracking::{self, TrackerKind};
use perfplus_vmm::vm::{builtin_guest, GuestStatus, RunState, Vm};

fn boot(name: &str, memory: u64, kind: TrackerKind, workload: &str) -> Vm {
    let mut vm = Vm::create_with(name, memory, 1, kind.vm_options()).expect("creating the VM");
    let cmdline = format!("{workload} tsc_khz={}", vm.tsc_khz());
    vm.load_multiboot(builtin_guest::IMAGE, &cmdline)
        .expect("loading the guest");
    vm.start().expect("starting the VM");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = vm.guest_status();
        if status
            .as_ref()
            .is_some_and(|s| s.state == state::RUNNING && s.verify_sweeps > 0)
        {
            return vm;
        }
        assert!(
            Instant::now() < deadline && !matches!(vm.run_state(), RunState::Failed(_) | RunState::Halted),
            "guest did not start: {:?} {status:?}\n{}",
            vm.run_state(),
            vm.console_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(vm: &Vm) -> GuestStatus {
    vm.guest_status().expect("guest status")
}

/// (pages written per second, heartbeats per second) over `secs`, collecting every 50 ms if a tracker
/// is given.
fn rates(vm: &Vm, secs: f64, mut tracker: Option<&mut Box<dyn tracking::DirtyTracker>>) -> (f64, f64) {
    let before = status(vm);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(t) = tracker.as_mut() {
            t.collect().expect("collect");
        }
    }
    let after = status(vm);
    let elapsed = start.elapsed().as_secs_f64();
    (
        (after.pages_written - before.pages_written) as f64 / elapsed,
        (after.heartbeat - before.heartbeat) as f64 / elapsed,
    )
}

fn slowdown(secs: f64) {
    println!("\n## Guest slowdown while tracked (256 MiB guest, working-set=64M rate=0, collect every 50 ms)\n");
    println!("| tracker | pages/s untracked | pages/s tracked | slowdown | heartbeats/s untracked | tracked |");
    println!("|---|---:|---:|---:|---:|---:|");
    for kind in TrackerKind::ALL {
        let vm = boot(&format!("bench-slow-{kind}"), 256 << 20, kind, "working-set=64M rate=0");
        let (p0, h0) = rates(&vm, secs, None);
        let mut tracker = tracking::start(kind, &vm).expect("tracker");
        tracker.collect().expect("collect");
        let (pt, ht) = rates(&vm, secs, Some(&mut tracker));
        drop(tracker);
        let (p1, h1) = rates(&vm, secs, None);
        let (pu, hu) = ((p0 + p1) / 2.0, (h0 + h1) / 2.0);
        println!(
            "| {kind} | {pu:.0} | {pt:.0} | {:.1} % | {hu:.0} | {ht:.0} |",
            (1.0 - pt / pu) * 100.0
        );
        assert_eq!(status(&vm).mismatches, 0);
    }
}

fn parse_size(text: &str) -> u64 {
    let (n, unit) = text.split_at(text.len() - 1);
    let n: u64 = n.parse().expect("size like 4G");
    match unit {
        "G" => n << 30,
        "M" => n << 20,
        _ => panic!("size like 4G or 512M: {text}"),
    }
}

fn collect_cost() {
    let sizes: Vec<String> = std::env::var("PERFPLUS_BENCH_SIZES")
        .unwrap_or_else(|_| "1G,4G,16G".into())
        .split(',')
        .map(str::to_string)
        .collect();
    println!("\n## Cost of one collect() (guest writing working-set=4M flat out, 30 collects 20 ms apart)\n");
    println!("| guest | tracker | median | p90 | dirty pages (median) |");
    println!("|---|---|---:|---:|---:|");
    for size in &sizes {
        for kind in TrackerKind::ALL {
            let vm = boot(
                &format!("bench-{kind}-{size}"),
                parse_size(size),
                kind,
                "working-set=4M rate=0",
            );
            let mut tracker = tracking::start(kind, &vm).expect("tracker");
            tracker.collect().expect("collect");
            let mut times = Vec::new();
            let mut counts = Vec::new();
            for _ in 0..30 {
                std::thread::sleep(Duration::from_millis(20));
                let start = Instant::now();
                let dirty = tracker.collect().expect("collect");
                times.push(start.elapsed());
                counts.push(dirty.count());
            }
            times.sort();
            counts.sort();
            println!(
                "| {size} | {kind} | {:.3} ms | {:.3} ms | {} |",
                times[times.len() / 2].as_secs_f64() * 1e3,
                times[times.len() * 9 / 10].as_secs_f64() * 1e3,
                counts[counts.len() / 2]
            );
            drop(tracker);
            drop(vm);
        }
    }
}

fn main() {
    let secs: f64 = std::env::var("PERFPLUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    if filter.is_empty() || "slowdown".contains(&filter) {
        slowdown(secs);
    }
    if filter.is_empty() || "collect".contains(&filter) {
        collect_cost();
    }
}
