//! `perfplus track` end to end: real eBPF programs in this kernel (root), a real agent and guest.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{kvm_missing, Cluster, PERFPLUS};

const PAGE: usize = 4096;

/// eBPF needs root here; skips (with the reason printed) only where it is truly absent.
fn ebpf_missing() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: eBPF tracking needs root and this test runs as another user");
        return true;
    }
    false
}

/// A child process that, until killed, writes one byte to each of `pages` pages, drops them with
/// `MADV_DONTNEED` (so that the next write faults again: a write fault happens on the first write to
/// a non-present page, not on every store) and sleeps 20 ms. Its write faults per interval are
/// `pages` per round on exactly those pages (plus a few copy-on-write faults on its stack after fork).
struct Writer {
    pid: libc::pid_t,
    base: u64,
}

impl Writer {
    fn spawn(pages: usize) -> Writer {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous private mapping; nothing else is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: the child makes only raw syscalls and stores into the mapping (no allocation, no
        // locks), which is what a child of a multi-threaded process may do; it never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let nap = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            loop {
                // SAFETY: every store is inside the `len`-byte mapping; madvise/nanosleep on valid args.
                unsafe {
                    for page in 0..pages {
                        std::ptr::write_volatile(base.cast::<u8>().add(page * PAGE), 1);
                    }
                    libc::madvise(base, len, libc::MADV_DONTNEED);
                    libc::nanosleep(&nap, std::ptr::null_mut());
                }
            }
        }
        // SAFETY: the parent never uses its copy of the mapping.
        unsafe { libc::munmap(base, len) };
        Writer { pid, base: base as u64 }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // SAFETY: the pid of the child this struct forked; killed and reaped once.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect()
}

#[test]
fn track_pid_reports_the_working_set_of_a_known_writer() {
    if ebpf_missing() {
        return;
    }
    const PAGES: usize = 300;
    let writer = Writer::spawn(PAGES);
    let out = Command::new(PERFPLUS)
        .args(["track", "--pid", &writer.pid.to_string()])
        .args(["--seconds", "2", "--interval", "500ms", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let samples = json_lines(&out.stdout);
    assert_eq!(samples.len(), 4, "{samples:?}");
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["interval"], i as u64 + 1);
        assert_eq!(s["source"], "ebpf");
        let ws = s["working_set_pages"].as_u64().unwrap();
        assert!(
            (PAGES as u64..=PAGES as u64 + 16).contains(&ws),
            "working set {ws}: {s}"
        );
        // ~25 rounds/s of PAGES write faults each; loose bounds for a loaded machine.
        let events = s["ebpf_events"].as_u64().unwrap();
        assert_eq!(s["dirty_pages"].as_u64().unwrap(), events);
        assert!(events >= 2 * PAGES as u64, "at least two rounds in 500 ms: {s}");
        assert!(events % PAGES as u64 <= 16, "whole rounds (plus stack faults): {s}");
        // The writer's pages lie in at most two 2 MiB regions, which are the hottest.
        let hottest = s["hottest"].as_array().unwrap();
        let top = hottest[0]["addr"].as_u64().unwrap();
        let region = writer.base & !((2 << 20) - 1);
        assert!(
            top == region || top == region + (2 << 20),
            "hottest {top:#x}, writer at {:#x}",
            writer.base
        );
        assert!(s["verdict"].as_str().unwrap().starts_with("converges"), "{s}");
    }
}

#[test]
fn track_pid_of_a_missing_process_fails_clearly() {
    let out = Command::new(PERFPLUS)
        .args(["track", "--pid", "999999999", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no process with pid 999999999"), "{err}");
}

#[test]
fn track_pid_without_root_says_it_needs_root() {
    if ebpf_missing() {
        return;
    }
    if !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED: setpriv (util-linux) is absent, cannot drop root for this test");
        return;
    }
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .args([PERFPLUS, "track", "--pid", "1", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn track_vm_reports_the_guest_dirty_rate_and_blocks_migration() {
    if kvm_missing() || ebpf_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    // A large working set: random writes rarely hit the same page twice within a second, so the
    // distinct dirty pages per second are close to the guest's own write rate (2000/s).
    cluster.start_guest(&a, "tracked", "512M", "dirtier:working-set=256M,rate=2k");
    let track = Command::new(PERFPLUS)
        .arg("--cluster-key-file")
        .arg(&cluster.key_file)
        .args([
            "track",
            "--vm",
            "tracked",
            "--agent",
            &a.addr,
            "--seconds",
            "4",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The VM's dirty log is in use: a migration is refused meanwhile, and the VM keeps running.
    let migrate = cluster.cli(&["migrate", "tracked", "--from", &a.addr, "--to", &b.addr]);
    assert!(!migrate.status.success());
    let err = String::from_utf8_lossy(&migrate.stderr);
    assert!(err.contains("being tracked"), "{err}");

    let out = track.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let samples = json_lines(&out.stdout);
    assert_eq!(samples.len(), 4, "{samples:?}");
    for s in &samples[1..] {
        assert_eq!(s["source"], "dirty-log");
        let rate = s["dirty_rate_pages_per_s"].as_f64().unwrap();
        let guest = s["guest_write_rate_pages_per_s"].as_f64().unwrap();
        // The guest's own counter, plus its bookkeeping pages (version table, status page).
        assert!(
            (guest * 0.9..guest * 1.15).contains(&rate),
            "dirty rate {rate} vs guest {guest}: {s}"
        );
        assert!(
            (1700.0..2300.0).contains(&guest),
            "the guest paces itself at 2000/s: {s}"
        );
        assert_eq!(s["working_set_pages"], s["dirty_pages"]);
        // Bitmap mode: the dirty-ring program is attached but sees nothing.
        assert_eq!(s["ebpf_events"], 0, "{s}");
        assert!(!s["hottest"].as_array().unwrap().is_empty());
    }
    // Tracking ended: the VM still runs and can now migrate (not done here: a plain status check).
    let status = cluster.status(&a, "tracked");
    assert_eq!(status["run_state"], "running");
}
