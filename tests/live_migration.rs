//! End to end: a running built-in guest moves between two agent processes on localhost, over real
//! sockets, on real KVM, and comes back.

mod support;

use std::time::Duration;

use support::{
    assert_nothing_lost, assert_sound_report, guest_counter, kvm_missing, round_one_deferred, wait_until, Cluster,
    Expect, ShapedLink, TestAgent,
};

#[test]
fn a_running_guest_migrates_and_comes_back() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "web1", "64M", "dirtier:working-set=16M,rate=5k");
    let pages = 64 * 256;

    let report = cluster.cli_json(&[
        "migrate",
        "web1",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--downtime-target",
        "30ms",
        "--mode",
        "precopy",
        "--json",
    ]);
    assert_sound_report(&report, Expect::PreCopy { pages });
    let first = &report["rounds"][0];
    assert!(
        first["skipped_zero"].as_u64().unwrap() > 0,
        "the untouched memory is zero: {first}"
    );
    assert!(
        first["skipped_held"].as_u64().unwrap() > 0,
        "duplicate pages go as references: {first}"
    );

    // The guest runs on B now, and only there.
    let status = cluster.status(&b, "web1");
    assert_eq!(status["run_state"], "running");
    let written = guest_counter(&status, "pages_written");
    wait_until(
        Duration::from_secs(10),
        "the guest to keep writing on the destination",
        || guest_counter(&cluster.status(&b, "web1"), "pages_written") > written,
    );
    assert_eq!(guest_counter(&cluster.status(&b, "web1"), "mismatches"), 0);
    let gone = cluster.cli(&["vm", "status", "web1", "--agent", &a.addr]);
    assert!(!gone.status.success(), "the source no longer hosts the VM");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no VM named"));

    // Back to A: A kept the pages of the VM that left in its page store, so whatever the guest did
    // not rewrite meanwhile travels as references.
    let back = cluster.cli_json(&[
        "migrate", "web1", "--from", &b.addr, "--to", &a.addr, "--mode", "precopy", "--json",
    ]);
    assert_sound_report(&back, Expect::PreCopy { pages });
    assert!(
        back["held_from_store"].as_u64().unwrap() > 0,
        "the page store served pages: {back}"
    );
    assert!(
        back["bytes_on_wire"].as_u64().unwrap() < report["bytes_on_wire"].as_u64().unwrap(),
        "coming back costs fewer bytes than leaving"
    );
    assert_eq!(cluster.status(&a, "web1")["run_state"], "running");
}

#[test]
fn hashing_off_sends_every_non_zero_dirty_page_in_full_and_zero_pages_as_markers() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "plain", "32M", "dirtier:working-set=8M,rate=2k");
    let report = cluster.cli_json(&[
        "migrate",
        "plain",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--no-hashing",
        "--mode",
        "precopy",
        // So that a full page costs its 4096 bytes on the wire: under `auto` the few compressible
        // pages of a batch of random ones go compressed, on any link, zstd's time being small
        // against the batch's.
        "--compression",
        "off",
        "--json",
    ]);
    assert_sound_report(&report, Expect::PreCopy { pages: 32 * 256 });
    assert_eq!(report["hashing"], false);
    for round in report["rounds"].as_array().unwrap() {
        assert_eq!(
            round["skipped_unchanged"], 0,
            "without hashing no page is found unchanged: {round}"
        );
        assert_eq!(round["skipped_held"], 0, "without hashing nothing is held: {round}");
        assert!(round["bytes_on_wire"].as_u64().unwrap() >= round["sent_pages"].as_u64().unwrap() * 4096);
    }
    // Zero-page detection stays on (a fair "Perf+ off"): most of a 32 MiB guest writing 8 MiB is zero.
    let first = &report["rounds"][0];
    assert!(
        first["skipped_zero"].as_u64().unwrap() > 16 * 256,
        "zero pages are not sent in full: {first}"
    );
}

#[test]
fn a_kernel_file_boots_migrates_and_shares_its_image_with_a_hosted_vm() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    // A multiboot kernel given as a file, as for a guest perfplus did not build.
    let kernel = cluster.dir.path().join("kernel.elf");
    let out = cluster.cli(&["guest-image", "--out", kernel.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kernel = kernel.to_str().unwrap();
    for (agent, name) in [(&a, "file1"), (&b, "file2")] {
        let out = cluster.cli(&[
            "vm",
            "start",
            "--agent",
            &agent.addr,
            "--name",
            name,
            "--memory",
            "32M",
            "--kernel",
            kernel,
            "--cmdline",
            "working-set=4M rate=2k",
        ]);
        assert!(
            out.status.success(),
            "vm start --kernel: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cluster.wait_for_guest(&a, "file1");

    let report = cluster.cli_json(&["migrate", "file1", "--from", &a.addr, "--to", &b.addr, "--json"]);
    assert_nothing_lost(&report);
    // B hosts file2, booted from the same image: its kernel pages travel as references.
    assert!(report["held_from_hosted_vms"].as_u64().unwrap() > 0, "{report}");
}

/// Hot last in round 1: pages the guest writes before round 1 has sent them are sent at its end. The
/// guest writes 4k pages/s, all into the first quarter of its 64 MiB working set (4096 pages, which
/// round 1 reaches first), with contents that never repeat, over a 100 Mbit/s link: whatever the
/// machine's load, round 1 cannot send more than ~3k pages/s (plus what the socket buffers hold), so it
/// lasts seconds, many 200 ms looks at the tracker, and at the first look most of the hot pages are
/// still unsent while the guest writes into them all the time. Round 1 must defer some, and the guest
/// must arrive whole. The same guest back in address order is not watched (nothing deferred) and
/// arrives whole too. Round 2's dirty sets of both are printed, not compared: the two migrations run
/// at different moments on a shared machine.
#[test]
fn round_1_sends_the_pages_written_ahead_of_it_at_its_end() {
    if kvm_missing() {
        return;
    }
    let Some(link) = ShapedLink::new('r', "100mbit") else {
        return;
    };
    let cluster = Cluster::new();
    let a = cluster.agent_in(&link.a, "a", "0");
    let b = cluster.agent_in(&link.b, "b", "0");
    cluster.start_guest(
        &a,
        "hot",
        "96M",
        "dirtier:working-set=64M,rate=4k,hot=25:100,mix=unique:100",
    );
    let pages = 96 * 256;
    let migrate = |from: &TestAgent, to: &str, order: &str| {
        cluster.cli_json_in(
            from.netns(),
            &[
                "migrate",
                "hot",
                "--from",
                &from.addr,
                "--to",
                to,
                "--mode",
                "precopy",
                "--max-rounds",
                "3",
                "--order",
                order,
                "--json",
            ],
        )
    };
    let there = migrate(&a, &b.addr_via(ShapedLink::IP_B), "hot-last");
    assert_sound_report(&there, Expect::PreCopy { pages });
    assert_eq!(there["order"], "hot-last");
    let deferred = round_one_deferred(&a.log_text()).expect("round 1 was watched");
    assert!(deferred > 0, "round 1 deferred no page of the hot quarter: {there}");
    assert_eq!(cluster.status(&b, "hot")["run_state"], "running");

    let back = migrate(&b, &a.addr_via(ShapedLink::IP_A), "address");
    assert_sound_report(&back, Expect::PreCopy { pages });
    assert_eq!(back["order"], "address");
    assert_eq!(
        round_one_deferred(&b.log_text()),
        None,
        "address order: round 1 not watched"
    );
    assert_eq!(cluster.status(&a, "hot")["run_state"], "running");
    let round_2 = |r: &serde_json::Value| r["rounds"][1]["dirty_pages"].as_u64().unwrap();
    eprintln!(
        "round 1 deferred {deferred} pages; round 2's dirty set: {} pages hot-last, {} in address order \
         (round 1: {:.0} ms and {:.0} ms; downtime {:.0} ms and {:.0} ms)",
        round_2(&there),
        round_2(&back),
        there["rounds"][0]["duration_ms"].as_f64().unwrap(),
        back["rounds"][0]["duration_ms"].as_f64().unwrap(),
        there["downtime_ms"].as_f64().unwrap(),
        back["downtime_ms"].as_f64().unwrap(),
    );
}

/// Migrates a guest started with `--tracker kind` there and back with the VM's own tracker: the
/// destination must have created the VM in the same mode (a dirty-ring VM can only migrate on with
/// the ring).
fn migrates_there_and_back_with(kind: &str) {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    let name = format!("t-{kind}");
    cluster.start_guest_with(
        &a,
        &name,
        "64M",
        "dirtier:working-set=16M,rate=5k",
        &["--tracker", kind],
    );
    let pages = 64 * 256;
    // Pre-copy whatever the machine's load: hybrid would switch to post-copy if rounds were slow.
    let there = cluster.cli_json(&[
        "migrate", &name, "--from", &a.addr, "--to", &b.addr, "--mode", "precopy", "--json",
    ]);
    assert_sound_report(&there, Expect::PreCopy { pages });
    assert_eq!(there["tracker"], kind, "report: {there}");
    if kind == "dirty-ring" {
        // The eBPF tracepoint program ran beside the ring and saw the guest's writes.
        let events = there["ebpf"]["write_events"].as_u64().unwrap_or(0);
        assert!(events > 0, "no eBPF write events in {there}");
    } else {
        assert!(there["ebpf"].is_null(), "eBPF only runs with the dirty ring: {there}");
    }
    let back = cluster.cli_json(&[
        "migrate", &name, "--from", &b.addr, "--to", &a.addr, "--mode", "precopy", "--json",
    ]);
    assert_sound_report(&back, Expect::PreCopy { pages });
    assert_eq!(back["tracker"], kind, "the destination kept the VM's tracker: {back}");
    assert_eq!(cluster.status(&a, &name)["run_state"], "running");
}

#[test]
fn migrates_with_the_dirty_log_tracker() {
    migrates_there_and_back_with("dirty-log");
}

#[test]
fn migrates_with_the_dirty_ring_tracker() {
    migrates_there_and_back_with("dirty-ring");
}

#[test]
fn migrates_with_the_uffd_wp_tracker() {
    migrates_there_and_back_with("uffd-wp");
}

/// `migrate --tracker` overrides the VM's own where the VM allows it, and says what to do where not.
#[test]
fn migrate_tracker_option_overrides_or_explains() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "web1", "32M", "dirtier:working-set=8M,rate=2k");
    let refused = cluster.cli(&[
        "migrate",
        "web1",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--tracker",
        "dirty-ring",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("VM web1 was started without a dirty ring; start it with --tracker dirty-ring"),
        "{stderr}"
    );
    assert_eq!(
        cluster.status(&a, "web1")["run_state"],
        "running",
        "the refusal left the guest alone"
    );
    let bad = cluster.cli(&[
        "migrate",
        "web1",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--tracker",
        "soft-dirty",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dirty-log, dirty-ring, uffd-wp"));
    let report = cluster.cli_json(&[
        "migrate",
        "web1",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--tracker",
        "uffd-wp",
        "--mode",
        "precopy",
        "--json",
    ]);
    assert_sound_report(&report, Expect::PreCopy { pages: 32 * 256 });
    assert_eq!(report["tracker"], "uffd-wp");
}

/// Text-like pages cross compressed when asked (`--compression zstd`), arrive whole, and cost fewer
/// bytes than the same guest's next migration sends uncompressed (`--compression off`).
#[test]
fn text_pages_cross_compressed_and_arrive_whole() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    // A third agent that never held the guest: nothing travels as a reference to it.
    let c = cluster.agent("c");
    cluster.start_guest(
        &a,
        "prose",
        "64M",
        "dirtier:working-set=32M,rate=2k,mix=text:90,zero:10",
    );
    let pages = 64 * 256;
    let migrate = |from: &str, to: &str, compression: &str| {
        cluster.cli_json(&[
            "migrate",
            "prose",
            "--from",
            from,
            "--to",
            to,
            "--mode",
            "precopy",
            "--compression",
            compression,
            "--json",
        ])
    };
    let there = migrate(&a.addr, &b.addr, "zstd");
    assert_sound_report(&there, Expect::PreCopy { pages });
    assert_eq!(there["compression"], "zstd");
    let z = &there["compressed"];
    let (batches, raw, wire) = (
        z["batches"].as_u64().unwrap(),
        z["raw_bytes"].as_u64().unwrap(),
        z["wire_bytes"].as_u64().unwrap(),
    );
    assert!(batches > 0, "{there}");
    // English words (`perfplus_common::text`: ~2.1x a page alone with zstd level 1, ~2.4x in a
    // batch), so well under 3/4 of the size.
    assert!(
        wire * 4 < raw * 3,
        "{wire} bytes on the wire for {raw} bytes of pages: {there}"
    );
    let back = migrate(&b.addr, &c.addr, "off");
    assert_sound_report(&back, Expect::PreCopy { pages });
    assert!(back["compressed"].is_null(), "{back}");
    // The first passes move the same pages (every text page is non-zero): compressed, fewer bytes.
    let first = |r: &serde_json::Value| r["rounds"][0]["bytes_on_wire"].as_u64().unwrap();
    assert!(
        first(&there) * 4 < first(&back) * 3,
        "round 1: {} bytes compressed, {} not",
        first(&there),
        first(&back)
    );
}
