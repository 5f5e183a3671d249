//! `perfplus track` on a QEMU guest: QEMU 7.2 measures the built-in guest's dirty rate through its QMP
//! socket (`--qmp`, both of QEMU's modes), and `--pid` of the QEMU process is refused with a pointer
//! to `--qmp` (its guest's writes never fault in the host, so eBPF would report a rate near zero).

#[path = "../perfplus-qemu/tests/support/mod.rs"]
mod qemu;
mod support;

use qemu::{guest_kernel, Qemu};
use serde_json::Value;
use support::{kvm_missing, perfplus_command};

/// Lines of JSON `perfplus track` printed.
fn intervals(out: &std::process::Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "perfplus track failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_measures_its_guest_for_track_and_the_pid_is_refused() {
    if kvm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (kernel, tsc_khz) = guest_kernel(dir.path());
    // QEMU samples RAM blocks of 128 MiB and more; a quarter of this one is rewritten at 10k pages/s.
    let append = format!("working-set=64M rate=10k mix=unique:100 tsc_khz={tsc_khz}");
    let mut vm = Qemu::start(dir.path(), "tracked", &kernel, 256, &append, false);
    vm.wait_for_console("; running").await;
    let qmp = vm.qmp.display().to_string();

    let refused = tokio::task::block_in_place(|| {
        perfplus_command(None)
            .args(["track", "--pid", &vm.pid().to_string(), "--seconds", "1"])
            .output()
            .unwrap()
    });
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("KVM guest") && stderr.contains("--qmp"), "{stderr}");

    let sampled = tokio::task::block_in_place(|| {
        perfplus_command(None)
            .args(["track", "--qmp", &qmp, "--seconds", "3", "--json"])
            .output()
            .unwrap()
    });
    let sampled = intervals(&sampled);
    assert_eq!(sampled.len(), 3, "{sampled:?}");
    for interval in &sampled {
        assert_eq!(interval["source"], "qemu page-sampling", "{interval}");
        assert_eq!(interval["interval_s"], 1.0, "{interval}");
    }
    // Unique pages change content on every write: some of QEMU's samples see it.
    assert!(
        sampled.iter().any(|i| i["dirty_pages"].as_u64().unwrap() > 0),
        "{sampled:?}\n{}",
        vm.console()
    );

    let logged = tokio::task::block_in_place(|| {
        perfplus_command(None)
            .args([
                "track",
                "--qmp",
                &qmp,
                "--qmp-mode",
                "dirty-bitmap",
                "--seconds",
                "1",
                "--json",
            ])
            .output()
            .unwrap()
    });
    let logged = intervals(&logged);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["source"], "qemu dirty-bitmap");
    assert!(logged[0]["dirty_pages"].as_u64().unwrap() > 0, "{logged:?}");

    // The guest ran on, undisturbed by the measurements.
    let line = vm.next_progress_lines().await;
    assert_eq!(qemu::field(&line, "mismatches="), 0, "{}", vm.console());
}
