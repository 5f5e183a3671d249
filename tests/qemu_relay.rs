//! `perfplus qemu migrate` across two network namespaces joined by a 1 Gbit/s shaped link: the source
//! QEMU 7.2, its agent and the CLI in namespace a, the destination agent and QEMU (`-incoming unix:…`)
//! in b; the agents relay over TLS with their certificates. The
//! guest must keep running on the destination with a clean self-check, both QEMUs must say
//! `completed`, Perf+ must have sent the guest's shared contents as references, and the relayed stream
//! must have crossed compressed (`--compression zstd`; the guest writes text-like pages too). First, a
//! source QEMU with xbzrle on is refused before anything starts.

#[path = "../perfplus-qemu/tests/support/mod.rs"]
mod qemu;
mod support;

use std::process::Output;

use qemu::{guest_kernel, Qemu};
use serde_json::json;
use support::{kvm_missing, netns, Cluster, ShapedLink};

/// The relay tests' workload (`qemu::WORKLOAD`) with a third of its pages text-like (English words,
/// about 2.1-2.4x with zstd, where `unique` pages do not compress at all), so that compressing the
/// stream always pays.
const WORKLOAD: &str = "working-set=16M rate=5k mix=unique:20,dup:30,zero:10,same:10,text:30 seed=1";

fn run(cluster: &Cluster, ns: &str, args: Vec<String>) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.cli_in(Some(ns), &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_guest_migrates_through_two_agents_across_namespaces() {
    if kvm_missing() {
        return;
    }
    let Some(link) = ShapedLink::new('r', "1gbit") else {
        return;
    };
    let cluster = Cluster::new();
    let agent_a = cluster.agent_in(&link.a, "a", "0");
    let agent_b = cluster.agent_in(&link.b, "b", "0");
    let dir = cluster.dir.path();
    let (kernel, tsc_khz) = guest_kernel(dir);
    let append = format!("{WORKLOAD} tsc_khz={tsc_khz}");
    let (ns_a, ns_b) = (link.a.name().to_string(), link.b.name().to_string());
    let mut src = Qemu::start_with(dir, "source", &kernel, 64, &append, None, |cmd| {
        netns::run_inside(cmd, &ns_a)
    });
    let incoming = format!("unix:{}", dir.join("incoming.sock").display());
    let mut dst = Qemu::start_with(dir, "destination", &kernel, 64, &append, Some(&incoming), |cmd| {
        netns::run_inside(cmd, &ns_b)
    });
    src.wait_for_console("; running").await;
    // QEMU serves one QMP client at a time: the test lets go of each before the CLI or the agent needs it.
    drop(dst.qmp().await); // it is up: its QMP and incoming sockets exist

    let (src_qmp_path, dst_qmp_path) = (src.qmp.display().to_string(), dst.qmp.display().to_string());
    let migrate = |extra: &[&str]| {
        let mut args: Vec<String> = ["qemu", "migrate", "--agent"].map(String::from).to_vec();
        args.push(agent_a.addr_via(ShapedLink::IP_A));
        args.extend(["--qmp".into(), src_qmp_path.clone()]);
        args.extend(["--to".into(), agent_b.addr_via(ShapedLink::IP_B)]);
        args.extend(["--incoming".into(), incoming.clone()]);
        args.extend(["--destination-qmp".into(), dst_qmp_path.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // xbzrle would send deltas the relay cannot hash: refused at set-up, the guest untouched.
    let xbzrle = |on: bool| json!({ "capabilities": [{ "capability": "xbzrle", "state": on }] });
    let mut src_qmp = src.qmp().await;
    src_qmp.execute("migrate-set-capabilities", xbzrle(true)).await.unwrap();
    drop(src_qmp);
    let refused = tokio::task::block_in_place(|| run(&cluster, &ns_a, migrate(&[])));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("xbzrle"), "{stderr}");
    let mut src_qmp = src.qmp().await;
    assert_eq!(
        src_qmp.query_migrate().await.unwrap().get("status"),
        None,
        "nothing started"
    );
    src_qmp
        .execute("migrate-set-capabilities", xbzrle(false))
        .await
        .unwrap();
    drop(src_qmp);

    // zstd rather than auto: whether auto compresses depends on how fast this machine compresses
    // against the link; forced, every chunk that shrinks goes compressed.
    let out = tokio::task::block_in_place(|| {
        run(
            &cluster,
            &ns_a,
            migrate(&["--max-bandwidth", "10G", "--compression", "zstd", "--json"]),
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "perfplus qemu migrate failed:\n{stderr}\nagent a:\n{}\nagent b:\n{}",
        agent_a.log_text(),
        agent_b.log_text()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the JSON report");
    println!("{report:#}");
    assert_eq!(report["qemu_version"].as_str().unwrap().get(..4), Some("7.2."));
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["destination_status"], "completed", "{report}");
    assert_eq!(report["destination_run_state"], "running", "{report}");
    let total =
        |field: &str| report["precopy"][field].as_u64().unwrap() + report["stop_and_copy"][field].as_u64().unwrap();
    assert!(
        total("referenced") > 100,
        "the guest's shared contents travel as references: {report}"
    );
    assert!(total("full") > 0);
    assert!(report["link_bytes"].as_u64().unwrap() < report["qemu_bytes"].as_u64().unwrap());
    // Compressed: a chunk goes compressed only if it shrank by 5 % at least, so the stream's
    // compressed chunks did too, and the text pages guarantee there are some.
    assert_eq!(report["compression"], "zstd");
    let compressed = |field: &str| report["compressed"][field].as_u64().unwrap();
    assert!(compressed("batches") > 0, "{report}");
    assert!(
        compressed("wire_bytes") as f64 * 1.05 <= compressed("raw_bytes") as f64,
        "{report}"
    );

    // The guest goes on verifying every page it wrote, on the destination now.
    let line = dst.next_progress_lines().await;
    assert_eq!(qemu::field(&line, "mismatches="), 0, "{}", dst.console());
    assert!(!dst.console().contains("MISMATCH"), "{}", dst.console());
}
