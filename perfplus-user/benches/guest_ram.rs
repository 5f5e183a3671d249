//! Does guest RAM backed by huge pages help the guest? (issue 8, item 7: measure before changing it.)
//!
//! perfplus's guest RAM is a memfd mapped twice (`perfplus_vmm::memory`); the kernel backs shmem with
//! transparent huge pages only where `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows it
//! (this machine: `never`; QEMU's anonymous guest RAM gets them under `enabled=madvise`).
//!
//! Method (one process, real KVM, the built-in guest, 1 GiB): for each setting, `never` and then
//! `advise` with both views of the memfd `madvise(MADV_HUGEPAGE)` before the guest touches them, a VM
//! boots and fills its working set (`working-set=1G`, the benchmark's mix); the time from start to
//! the guest's first full verification sweep is the fill (every page faulted in, written and read
//! once). Then its rates over `PERFPLUS_BENCH_SECS` (default 3) seconds: `rate=0` (writes flat out,
//! a page verified every few writes) gives pages written/s, and in a second VM `rate=1000` (the
//! guest's spare time verifies, reading pages in address order) pages verified/s. `ShmemHugePages`
//! and `ShmemPmdMapped` from `/proc/meminfo` say how much was backed and mapped huge. Settings
//! alternate, `PERFPLUS_BENCH_REPEAT` (default 3) times each; medians with min–max. The setting in
//! place before is restored at the end, also on a panic.
//!
//! Run: `cargo bench -p perfplus --bench guest_ram` (root, /dev/kvm).
use std::time::{Duration, Instant};

use perfplus_common::guest_abi::state;
use perfplus_vmm::tracking::TrackerKind;
use perfplus_vmm::vm::{builtin_guest, GuestStatus, RunState, Vm};

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
const MIX: &str = "mix=unique:30,text:20,dup:20,zero:10,same:20";

/// Puts the shmem THP setting back as it was when dropped.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(SHMEM_ENABLED, &self.0) {
            eprintln!("could not restore {SHMEM_ENABLED} to {}: {err}", self.0);
        }
    }
}

/// The selected value of a sysfs choice like `always within_size advise [never] deny force`.
fn selected(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_string)
}

fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn madvise_huge(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr + len` is one of the VM's two mappings of its memfd, alive for the VM's
    // lifetime; MADV_HUGEPAGE only sets a flag on the mapping and changes no byte of it.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    assert_eq!(rc, 0, "madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
}

/// Boots a 1 GiB guest with `workload`; returns it once it finished its first sweep, and how long
/// that took from the start.
fn boot(name: &str, workload: &str, huge: bool) -> (Vm, Duration) {
    let size = 1u64 << 30;
    let mut vm = Vm::create_with(name, size, 1, TrackerKind::DirtyLog.vm_options()).expect("creating the VM");
    if huge {
        let memory = vm.memory().clone();
        madvise_huge(memory.agent_view_addr(), size as usize);
        madvise_huge(memory.guest_view_addr(), size as usize);
        assert_eq!(
            memory.guest_view_addr() as usize % (2 << 20),
            0,
            "the guest view is not 2 MiB aligned: no huge mapping possible"
        );
    }
    let cmdline = format!("working-set=1G {workload} {MIX} tsc_khz={}", vm.tsc_khz());
    vm.load_multiboot(builtin_guest::IMAGE, &cmdline)
        .expect("loading the guest");
    let started = Instant::now();
    vm.start().expect("starting the VM");
    let deadline = started + Duration::from_secs(300);
    loop {
        let status = vm.guest_status();
        if status
            .as_ref()
            .is_some_and(|s| s.state == state::RUNNING && s.verify_sweeps > 0)
        {
            return (vm, started.elapsed());
        }
        assert!(
            Instant::now() < deadline && !matches!(vm.run_state(), RunState::Failed(_) | RunState::Halted),
            "guest did not start: {:?} {status:?}\n{}",
            vm.run_state(),
            vm.console_tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(vm: &Vm) -> GuestStatus {
    vm.guest_status().expect("guest status")
}

/// Pages written and verified per second over `secs`.
fn rates(vm: &Vm, secs: f64) -> (f64, f64) {
    let before = status(vm);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after = status(vm);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(
        after.mismatches, 0,
        "the guest found pages that do not hold what it wrote"
    );
    (
        (after.pages_written - before.pages_written) as f64 / elapsed,
        (after.pages_verified - before.pages_verified) as f64 / elapsed,
    )
}

#[derive(Default)]
struct Samples {
    fill_ms: Vec<f64>,
    written: Vec<f64>,
    verified: Vec<f64>,
    huge_mib: Vec<f64>,
    pmd_mib: Vec<f64>,
}

fn median(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!("{:.0} [{:.0}–{:.0}]", s[s.len() / 2], s[0], s[s.len() - 1])
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() || !std::path::Path::new(SHMEM_ENABLED).exists() {
        println!("skipped: needs /dev/kvm and {SHMEM_ENABLED}");
        return;
    }
    let secs: f64 = std::env::var("PERFPLUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let repeat: usize = std::env::var("PERFPLUS_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let before = std::fs::read_to_string(SHMEM_ENABLED).expect("reading shmem_enabled");
    let _restore = Restore(selected(&before).expect("a selected shmem_enabled value"));
    let settings = [("never", false), ("advise", true)];
    let mut samples: Vec<Samples> = settings.iter().map(|_| Samples::default()).collect();
    for run in 0..repeat {
        for (i, &(setting, huge)) in settings.iter().enumerate() {
            std::fs::write(SHMEM_ENABLED, setting).expect("setting shmem_enabled");
            let s = &mut samples[i];
            let (vm, fill) = boot(&format!("bench-ram-{setting}-{run}"), "rate=0", huge);
            s.fill_ms.push(fill.as_secs_f64() * 1e3);
            s.huge_mib.push(meminfo_kib("ShmemHugePages") as f64 / 1024.0);
            s.pmd_mib.push(meminfo_kib("ShmemPmdMapped") as f64 / 1024.0);
            s.written.push(rates(&vm, secs).0);
            drop(vm);
            let (vm, _) = boot(&format!("bench-ram-{setting}-{run}-v"), "rate=1000", huge);
            s.verified.push(rates(&vm, secs).1);
            drop(vm);
            eprintln!(
                "run {}/{repeat} shmem_enabled={setting}: fill {:.0} ms, {:.0} pages written/s, {:.0} verified/s, \
                 ShmemHugePages {:.0} MiB, ShmemPmdMapped {:.0} MiB",
                run + 1,
                s.fill_ms[run],
                s.written[run],
                s.verified[run],
                s.huge_mib[run],
                s.pmd_mib[run]
            );
        }
    }
    println!("# Guest RAM with and without shmem huge pages (1 GiB built-in guest, {MIX})\n");
    println!("medians of {repeat} alternating runs [min–max]; {secs} s per rate\n");
    println!("| shmem_enabled | fill to first sweep (ms) | pages written/s (rate=0) | pages verified/s (rate=1000) | ShmemHugePages (MiB) | ShmemPmdMapped (MiB) |");
    println!("|---|---|---|---|---|---|");
    for (i, &(setting, huge)) in settings.iter().enumerate() {
        let s = &samples[i];
        println!(
            "| {setting}{} | {} | {} | {} | {} | {} |",
            if huge { " + MADV_HUGEPAGE" } else { "" },
            median(&s.fill_ms),
            median(&s.written),
            median(&s.verified),
            median(&s.huge_mib),
            median(&s.pmd_mib)
        );
    }
}
