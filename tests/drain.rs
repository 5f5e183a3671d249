//! End to end: `perfplus node drain` empties an agent of its running guests, real agent processes on
//! loopback, real KVM guests: to one destination (where a second VM of the same content sends little
//! more than references to the first one's pages), to two (balanced by memory), and with one VM the
//! destination refuses (the others are drained all the same, the exit code and the report say which
//! VM stayed where).

mod support;

use serde_json::Value;
use support::{guest_counter, kvm_missing, Cluster, TestAgent};

/// The built-in guest with mostly unique content, keyed by `seed`: two guests of the same seed fill
/// their memory with the same pages.
fn workload(seed: u32, working_set: &str) -> String {
    workload_at(seed, working_set, 300)
}

/// [`workload`] writing `rate` pages per second. The twins write slowly (20/s), so that they stay alike
/// however long the second waits for the first: even a minute of waiting (a loaded machine) rewrites
/// under 15 % of their 8192-page working set.
fn workload_at(seed: u32, working_set: &str, rate: u32) -> String {
    format!("dirtier:working-set={working_set},rate={rate},mix=unique:85,dup:5,zero:5,same:5,seed={seed}")
}

/// Runs `node drain` with `args` and returns (success, the JSON report, stderr).
fn drain(cluster: &Cluster, args: &[&str]) -> (bool, Value, String) {
    let mut all = vec!["node", "drain", "--json"];
    all.extend_from_slice(args);
    let out = cluster.cli(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "node drain printed no JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.success(), report, stderr)
}

fn vm_names(cluster: &Cluster, agent: &TestAgent) -> Vec<String> {
    let list = cluster.cli_json(&["vm", "list", "--agent", &agent.addr, "--json"]);
    let mut names: Vec<String> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn entry<'a>(report: &'a Value, vm: &str) -> &'a Value {
    report["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["vm"] == vm)
        .unwrap_or_else(|| panic!("no entry for {vm}: {report}"))
}

/// A VM the drain moved: its entry says so, its migration report is clean, and it runs on `agent`
/// with a clean self-check.
fn assert_moved(cluster: &Cluster, report: &Value, vm: &str, agent: &TestAgent) {
    let e = entry(report, vm);
    assert_eq!(e["outcome"], "completed", "{e}");
    assert_eq!(e["runs_on"], "destination", "{e}");
    assert_eq!(e["destination"], agent.addr.as_str(), "{e}");
    assert_eq!(e["lost_pages"], 0, "{e}");
    assert!(e["downtime_ms"].as_f64().unwrap() > 0.0, "{e}");
    assert!(e["guest_max_stall_ms"].as_f64().is_some(), "{e}");
    let sla = e["sla_percent"].as_f64().unwrap();
    assert!(sla > 99.0 && sla < 100.0, "{e}");
    let migration = &e["report"];
    assert_eq!(migration["memory_digest_equal"], true, "{migration}");
    assert_eq!(migration["guest_verified"], true, "{migration}");
    let status = cluster.status(agent, vm);
    assert_eq!(status["run_state"], "running", "{status}");
    assert_eq!(guest_counter(&status, "mismatches"), 0, "{status}");
}

#[test]
fn three_vms_drain_to_one_destination_and_the_second_of_two_alike_sends_references() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "twin1", "48M", &workload_at(7, "32M", 20));
    cluster.start_guest(&a, "twin2", "48M", &workload_at(7, "32M", 20));
    cluster.start_guest(&a, "other", "32M", &workload(99, "8M"));

    let (ok, report, stderr) = drain(&cluster, &["--from", &a.addr, "--to", &b.addr]);
    assert!(ok, "the drain succeeds: {report}\n{stderr}");
    assert_eq!(report["parallel"], 1, "one destination: one migration at a time");
    assert_eq!(report["vms"].as_array().unwrap().len(), 3);
    for vm in ["twin1", "twin2", "other"] {
        assert_moved(&cluster, &report, vm, &b);
    }
    assert!(vm_names(&cluster, &a).is_empty(), "nothing left on A");
    assert_eq!(report["left_on_source"].as_array().unwrap().len(), 0);
    assert_eq!(vm_names(&cluster, &b), ["other", "twin1", "twin2"]);
    let total = &report["total"];
    assert_eq!(total["on_destination"], 3);
    assert_eq!(total["lost_pages"], 0);
    let sla = total["sla_percent"].as_f64().unwrap();
    assert!(sla > 99.0 && sla < 100.0, "{total}");
    // Progress per VM went to stderr.
    for vm in ["twin1", "twin2", "other"] {
        assert!(stderr.contains(vm), "progress names {vm}: {stderr}");
    }

    // The twins hold the same pages: whichever went second found the first's on B and sent references.
    let (first, second) = {
        let (t1, t2) = (entry(&report, "twin1"), entry(&report, "twin2"));
        if t1["started_s"].as_f64() < t2["started_s"].as_f64() {
            (t1, t2)
        } else {
            (t2, t1)
        }
    };
    let full = |e: &Value| e["pages_full"].as_u64().unwrap();
    let bytes = |e: &Value| e["bytes_on_wire"].as_u64().unwrap();
    eprintln!(
        "dedup: {} sent {} full pages, {} bytes; {} (same content, after it) {} full pages, {} held, {} bytes",
        first["vm"],
        full(first),
        bytes(first),
        second["vm"],
        full(second),
        second["pages_held"],
        bytes(second)
    );
    assert!(
        full(first) > 32 * 256 / 2,
        "the first twin sends its working set: {first}"
    );
    assert!(
        full(second) * 4 < full(first),
        "the second twin sends far fewer full pages: {second}"
    );
    assert!(bytes(second) * 2 < bytes(first), "and far fewer bytes: {second}");
    assert!(
        second["report"]["held_from_hosted_vms"].as_u64().unwrap() > 32 * 256 / 2,
        "resolved from the first twin's memory on B: {second}"
    );
}

#[test]
fn a_drain_to_two_destinations_balances_memory() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    let c = cluster.agent("c");
    cluster.start_guest(&a, "big", "64M", &workload(1, "16M"));
    cluster.start_guest(&a, "small1", "32M", &workload(2, "8M"));
    cluster.start_guest(&a, "small2", "32M", &workload(3, "8M"));

    let (ok, report, stderr) = drain(&cluster, &["--from", &a.addr, "--to", &b.addr, "--to", &c.addr]);
    assert!(ok, "the drain succeeds: {report}\n{stderr}");
    assert_eq!(report["parallel"], 2, "two destinations: two migrations at a time");
    // 64 MiB to one destination, the two 32 MiB VMs to the other.
    let (on_b, on_c) = (vm_names(&cluster, &b), vm_names(&cluster, &c));
    let (big_side, small_side) = if on_b == ["big"] { (&b, &c) } else { (&c, &b) };
    assert_eq!(vm_names(&cluster, big_side), ["big"], "B: {on_b:?}, C: {on_c:?}");
    assert_eq!(
        vm_names(&cluster, small_side),
        ["small1", "small2"],
        "B: {on_b:?}, C: {on_c:?}"
    );
    assert_moved(&cluster, &report, "big", big_side);
    assert_moved(&cluster, &report, "small1", small_side);
    assert_moved(&cluster, &report, "small2", small_side);
    assert!(vm_names(&cluster, &a).is_empty(), "nothing left on A");
}

#[test]
fn a_vm_the_destination_refuses_stays_on_the_source_and_the_others_are_drained() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    // B takes VMs of at most 40 MiB: the 64 MiB one is refused, before anything is sent.
    let b = cluster.agent_with_options("b", &["--max-vm-memory", "40M"]);
    cluster.start_guest(&a, "fits1", "32M", &workload(4, "8M"));
    cluster.start_guest(&a, "toobig", "64M", &workload(5, "8M"));
    cluster.start_guest(&a, "fits2", "32M", &workload(6, "8M"));

    let (ok, report, stderr) = drain(&cluster, &["--from", &a.addr, "--to", &b.addr]);
    assert!(!ok, "a VM not drained makes the drain fail: {report}\n{stderr}");
    assert!(stderr.contains("toobig"), "the error names the VM: {stderr}");
    assert_moved(&cluster, &report, "fits1", &b);
    assert_moved(&cluster, &report, "fits2", &b);
    let refused = entry(&report, "toobig");
    assert_eq!(refused["outcome"], "failed", "{refused}");
    assert_eq!(refused["runs_on"], "source", "{refused}");
    assert!(
        refused["detail"].as_str().unwrap().contains("max-vm-memory"),
        "the reason is the quota: {refused}"
    );
    assert_eq!(report["total"]["on_destination"], 2);
    assert_eq!(report["left_on_source"], serde_json::json!(["toobig"]));
    // It still runs on A, untouched.
    let status = cluster.status(&a, "toobig");
    assert_eq!(status["run_state"], "running", "{status}");
    assert_eq!(guest_counter(&status, "mismatches"), 0);
}
