//! Waiting out the host's own background work that stalls every guest on it, before a measured run.
//!
//! This machine is itself a VM, and its kernel reports freed memory to the hypervisor underneath
//! (free page reporting through virtio-balloon: `/sys/module/page_reporting/`). While it does, every
//! guest on the machine stalls: on the shaped bench each reporting pass (three reports of 64 MiB,
//! every ~2.1 s) came with a 30-35 ms stall of whichever guest was running, perfplus's or QEMU's, at
//! the same instants as the passes. What a run frees (QEMU's 1 GiB of THP-backed guest RAM above all)
//! kept the passes going for ~20 s, so the previous run decided the next one's stalls. Runs start only
//! once reporting has been idle a while; where the kernel has no such counter, at once.
use std::time::{Duration, Instant};

/// Kibibytes reported so far (this kernel's counter; upstream kernels have none).
const REPORTED_KIB: &str = "/sys/module/page_reporting/parameters/reported_kib";
/// Reporting runs every 2 s while there is freed memory to report: idle this long means done.
const QUIET: Duration = Duration::from_secs(5);
/// Longest wait: a run starts after it whatever the host does (and says so).
const MOST: Duration = Duration::from_secs(120);

fn reported_kib() -> Option<u64> {
    std::fs::read_to_string(REPORTED_KIB).ok()?.trim().parse().ok()
}

/// Waits until the host's free page reporting has been idle for [`QUIET`] (at most [`MOST`]), and
/// says on stderr how long that took when it was more than the quiet time itself.
pub fn wait_until_quiet() {
    let Some(mut last) = reported_kib() else {
        return;
    };
    let (start, first) = (Instant::now(), last);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < QUIET {
        if start.elapsed() > MOST {
            eprintln!(
                "  the host still reports freed memory after {} s: starting the run anyway",
                MOST.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = reported_kib().unwrap_or(last);
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
    if last != first {
        eprintln!(
            "  waited {:.0} s for the host's free page reporting to go idle ({} MiB reported meanwhile)",
            start.elapsed().as_secs_f64(),
            (last - first) >> 10
        );
    }
}
