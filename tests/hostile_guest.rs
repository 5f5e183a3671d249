//! End to end, issue 10 item 5: a hostile built-in guest (its `hostile=` workload modes) against a
//! real agent on real KVM. A guest that floods its console with terminal escapes, forged log lines
//! and invalid UTF-8 must leave the agent's log bounded and escaped; a guest that writes absurd
//! counters in its status page must not get a clean verdict from a migration.

mod support;

use std::time::{Duration, Instant};

use perfplus_vmm::vm::console::{LOG_BURST_BYTES, LOG_BYTES_PER_SEC};
use support::{kvm_missing, wait_until, Cluster};

/// The guest text the agent logged for VM `name`: on its console lines, between "guest: " and the
/// `vm=` field that ends the line.
fn guest_lines<'a>(log: &'a str, name: &str) -> Vec<&'a str> {
    let tag = format!(" vm={name}");
    log.lines()
        .filter_map(|l| l.split_once(" guest: ").map(|(_, text)| text))
        .filter_map(|text| text.strip_suffix(tag.as_str()))
        .collect()
}

#[test]
fn a_console_flood_is_rate_limited_and_escaped_in_the_agent_log() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let started = Instant::now();
    cluster.start_guest(&a, "noisy", "32M", "dirtier:working-set=4M,rate=1k,hostile=console");

    // The guest prints hostile lines without pause; the log must say that it drops them, and later
    // report how many it dropped (with the next line it logs).
    let raw = || std::fs::read(&a.log).expect("agent log");
    wait_until(Duration::from_secs(60), "the agent to drop console lines", || {
        String::from_utf8_lossy(&raw()).contains("guest console: output over the log limit")
    });
    wait_until(Duration::from_secs(60), "the agent to report dropped lines", || {
        String::from_utf8_lossy(&raw()).contains("not logged over the last")
    });
    let bytes = raw();
    let elapsed = started.elapsed();

    // Escaped: no byte of the log is a terminal control (the agent runs with NO_COLOR, so none of its
    // own either), the log is valid UTF-8, and the forged line is inside a guest line, not a line of
    // its own.
    let log = String::from_utf8(bytes.clone()).expect("the agent log is valid UTF-8");
    for (i, &b) in bytes.iter().enumerate() {
        assert!(
            b == b'\n' || !(b < 0x20 || b == 0x7f),
            "control byte {b:#04x} at {i} in the agent log"
        );
    }
    assert!(
        !log.contains('\u{9b}') && !log.contains('\u{202e}'),
        "C1 CSI or a bidi override in the log"
    );
    let lines = guest_lines(&log, "noisy");
    assert!(
        lines.iter().any(|l| l.contains("\\e[2J\\e[1;1H\\e[31mHOSTILE")),
        "the escape sequences are shown escaped: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("bad utf-8: \\xff\\xfe\\xc3")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("bidi: \\u{202e}evil\\x07\\x08")),
        "{lines:?}"
    );
    for line in log.lines().filter(|l| l.contains("FORGED")) {
        assert!(
            line.contains(" guest: ") && line.ends_with(" vm=noisy"),
            "a forged log line: {line}"
        );
    }

    // Bounded: the guest text logged is within the budget for the time the VM has existed (the test
    // started before the VM, so `elapsed` is an upper bound of the agent's own time).
    let logged: usize = lines.iter().map(|l| l.len()).sum();
    let bound = LOG_BURST_BYTES + LOG_BYTES_PER_SEC * (elapsed.as_secs() + 1);
    assert!(
        logged as u64 <= bound,
        "{logged} bytes of guest text logged in {elapsed:?}, over the budget of {bound}"
    );

    // `vm status` counts what was not logged, and shows the console tail escaped.
    let status = cluster.status(&a, "noisy");
    let note = status["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("console lines") && note.contains("not logged"),
        "{status}"
    );
    let text = cluster.cli(&["vm", "status", "noisy", "--agent", &a.addr]);
    assert!(text.status.success());
    assert!(
        !text.stdout.iter().any(|&b| b == 0x1b || b == b'\r' || b == 0x07),
        "terminal controls in `vm status`:\n{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert!(String::from_utf8_lossy(&text.stdout).contains("\\e[2J"));
}

#[test]
fn absurd_guest_counters_do_not_make_a_clean_verdict() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "liar", "32M", "dirtier:working-set=4M,rate=1k,hostile=counters");

    // The agent says the status page cannot be believed.
    let status = cluster.status(&a, "liar");
    assert_eq!(status["guest"]["verify_sweeps"].as_u64(), Some(u64::MAX), "{status}");
    assert!(
        status["note"]
            .as_str()
            .unwrap_or_default()
            .contains("the guest's status page is not trustworthy"),
        "{status}"
    );

    // The migration itself works (memory is checked by checksums, not by the guest), but its verdict
    // is not "completed": the guest's self-check cannot be believed.
    let out = cluster.cli(&["migrate", "liar", "--from", &a.addr, "--to", &b.addr, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "migrate printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        !out.status.success(),
        "a migration that is not completed exits non-zero"
    );
    assert_eq!(report["outcome"], "unverified", "{report}");
    assert_eq!(report["lost_pages"], 0, "{report}");
    assert_eq!(report["guest_verified"], false, "{report}");
    let detail = report["outcome_detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("the guest's status page is not trustworthy"),
        "{detail}"
    );
    // The guest runs on the destination (the verdict is about trust, not about the move).
    assert_eq!(cluster.status(&b, "liar")["run_state"], "running");
    assert!(b.log_text().contains("the guest's status page is not trustworthy"));
}
