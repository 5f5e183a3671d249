//! `perfplus qemu migrate` and the agents' page stores, across two network namespaces joined by a
//! 1 Gbit/s shaped link (as `tests/qemu_relay.rs`), with agents that keep page stores:
//!
//! - a return trip a → b → a: the first leg fills a's store with the guest's pages (archived once
//!   QEMU completed), so the return leg sends most of them as references to a's store, in far fewer
//!   link bytes; both QEMUs complete each time and the guest's self-check stays clean;
//! - a second VM of the same image a → b after a first one: b archived the first one's pages as they
//!   arrived and advertises them; with b's store file corrupted behind its back, the references
//!   cannot be resolved and the migration fails before QEMU completes: the second guest keeps running
//!   on a with a clean self-check, b's QEMU never runs it, and the CLI says so.
//!
//! The guests write mostly `same` pages (content fixed per page, whatever the version), so what the
//! return leg finds held does not depend on how fast this machine runs the test.

#[path = "../perfplus-qemu/tests/support/mod.rs"]
mod qemu;
mod support;

use std::path::Path;
use std::process::Output;

use perfplus_qemu::qmp::Qmp;
use qemu::{guest_kernel, Qemu};
use serde_json::{json, Value};
use support::{kvm_missing, netns, Cluster, ShapedLink, TestAgent};

/// 16 MiB written at 500 pages/s, 70 % of them `same` pages.
const WORKLOAD: &str = "working-set=16M rate=500 mix=same:70,unique:10,dup:10,zero:10 seed=5";

/// Two agents with page stores in the two namespaces of a shaped link.
struct Hosts {
    link: ShapedLink,
    cluster: Cluster,
    a: TestAgent,
    b: TestAgent,
    kernel: std::path::PathBuf,
    append: String,
}

impl Hosts {
    fn new(tag: char) -> Option<Hosts> {
        if kvm_missing() {
            return None;
        }
        let link = ShapedLink::new(tag, "1gbit")?;
        let cluster = Cluster::new();
        let a = cluster.agent_in(&link.a, "a", "64M");
        let b = cluster.agent_in(&link.b, "b", "64M");
        let (kernel, tsc_khz) = guest_kernel(cluster.dir.path());
        let append = format!("{WORKLOAD} tsc_khz={tsc_khz}");
        Some(Hosts {
            link,
            cluster,
            a,
            b,
            kernel,
            append,
        })
    }

    fn dir(&self) -> &Path {
        self.cluster.dir.path()
    }

    /// A QEMU named `name` in the namespace of agent `on` ('a' or 'b'), waiting for a migration if
    /// `incoming`.
    fn qemu(&self, name: &str, on: char, incoming: bool) -> Qemu {
        let ns = self.ns(on).to_string();
        let incoming = incoming.then(|| self.incoming(name));
        Qemu::start_with(
            self.dir(),
            name,
            &self.kernel,
            64,
            &self.append,
            incoming.as_deref(),
            |cmd| netns::run_inside(cmd, &ns),
        )
    }

    fn ns(&self, on: char) -> &str {
        if on == 'a' {
            self.link.a.name()
        } else {
            self.link.b.name()
        }
    }

    fn incoming(&self, name: &str) -> String {
        format!("unix:{}", self.dir().join(format!("{name}.in")).display())
    }

    /// `perfplus qemu migrate --json` from `src` (in the namespace of agent `from`) to `dst`, run
    /// inside `from`'s namespace.
    fn migrate(&self, from: char, src: &Qemu, dst_name: &str, dst: &Qemu) -> Output {
        let (agent, ip, to, to_ip) = if from == 'a' {
            (&self.a, ShapedLink::IP_A, &self.b, ShapedLink::IP_B)
        } else {
            (&self.b, ShapedLink::IP_B, &self.a, ShapedLink::IP_A)
        };
        let args = [
            "qemu".to_string(),
            "migrate".into(),
            "--agent".into(),
            agent.addr_via(ip),
            "--qmp".into(),
            src.qmp.display().to_string(),
            "--to".into(),
            to.addr_via(to_ip),
            "--incoming".into(),
            self.incoming(dst_name),
            "--destination-qmp".into(),
            dst.qmp.display().to_string(),
            "--max-bandwidth".into(),
            "10G".into(),
            "--json".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| self.cluster.cli_in(Some(self.ns(from)), &args))
    }

    /// The report of a migration that must have completed on both sides.
    fn completed(&self, out: &Output) -> Value {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "perfplus qemu migrate failed:\n{stderr}\nagent a:\n{}\nagent b:\n{}",
            self.a.log_text(),
            self.b.log_text()
        );
        let report: Value = serde_json::from_slice(&out.stdout).expect("the JSON report");
        println!("{report:#}");
        assert_eq!(report["status"], "completed", "{report}");
        assert_eq!(report["destination_status"], "completed", "{report}");
        assert_eq!(report["destination_run_state"], "running", "{report}");
        report
    }
}

/// A field of the report's pages, pre-copy and stop-and-copy added up.
fn pages(report: &Value, field: &str) -> u64 {
    report["precopy"][field].as_u64().unwrap() + report["stop_and_copy"][field].as_u64().unwrap()
}

/// The guest goes on verifying every page it wrote: no mismatch.
async fn self_check_clean(guest: &mut Qemu) {
    let line = guest.next_progress_lines().await;
    assert_eq!(qemu::field(&line, "mismatches="), 0, "{}", guest.console());
    assert!(!guest.console().contains("MISMATCH"), "{}", guest.console());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_trip_sends_most_pages_as_references_to_the_first_hosts_store() {
    let Some(hosts) = Hosts::new('s') else { return };
    let mut a1 = hosts.qemu("a1", 'a', false);
    let mut b1 = hosts.qemu("b1", 'b', true);
    a1.wait_for_console("; running").await;
    drop(b1.qmp().await); // up: its QMP and incoming sockets exist

    let out = hosts.migrate('a', &a1, "b1", &b1);
    let there = hosts.completed(&out);
    assert_eq!(pages(&there, "host_referenced"), 0, "b held nothing: {there}");
    assert!(
        there["archived_pages"].as_u64().unwrap() > 1000,
        "a kept the pages that left: {there}"
    );
    assert!(there["destination_archived_pages"].as_u64().unwrap() > 1000, "{there}");
    drop(a1); // paused since it completed: the guest is b1's now
    self_check_clean(&mut b1).await;

    let mut a2 = hosts.qemu("a2", 'a', true);
    drop(a2.qmp().await);
    let out = hosts.migrate('b', &b1, "a2", &a2);
    let back = hosts.completed(&out);
    self_check_clean(&mut a2).await;

    let (full_there, host_back) = (pages(&there, "full"), pages(&back, "host_referenced"));
    let (bytes_there, bytes_back) = (
        there["link_bytes"].as_u64().unwrap(),
        back["link_bytes"].as_u64().unwrap(),
    );
    println!(
        "there: {full_there} pages whole, {bytes_there} link bytes; back: {} whole, {host_back} \
         references to a's store, {} to pages of this migration, {bytes_back} link bytes",
        pages(&back, "full"),
        pages(&back, "referenced")
    );
    assert!(
        host_back * 2 > full_there,
        "most of what went whole comes back as references to a's store: {back}"
    );
    assert_eq!(
        back["destination_expanded_host"].as_u64().unwrap(),
        host_back,
        "a expanded each of them (re-hashed)"
    );
    assert!(
        bytes_back * 2 < bytes_there,
        "the return leg carried far fewer bytes: {bytes_back} against {bytes_there}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_to_a_store_gone_bad_fail_the_migration_and_the_guest_runs_on() {
    let Some(hosts) = Hosts::new('t') else { return };
    let mut a1 = hosts.qemu("a1", 'a', false);
    let mut b1 = hosts.qemu("b1", 'b', true);
    a1.wait_for_console("; running").await;
    drop(b1.qmp().await);
    let out = hosts.migrate('a', &a1, "b1", &b1);
    let first = hosts.completed(&out);
    assert!(first["destination_archived_pages"].as_u64().unwrap() > 1000, "{first}");
    drop(a1);

    // A second VM of the same image on a; b's store file changes behind b's back.
    let mut a2 = hosts.qemu("a2", 'a', false);
    let mut b2 = hosts.qemu("b2", 'b', true);
    a2.wait_for_console("; running").await;
    drop(b2.qmp().await);
    let store = hosts.dir().join("b/page-store/pagestore.dat");
    let length = std::fs::metadata(&store).unwrap().len();
    std::fs::write(&store, vec![0xab; length as usize]).unwrap();

    let out = hosts.migrate('a', &a2, "b2", &b2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not hold") && stderr.contains("running here"),
        "the CLI says why, and where the guest runs: {stderr}\nagent b:\n{}",
        hosts.b.log_text()
    );
    let mut qmp = a2.qmp().await;
    assert_eq!(qmp.query_migrate().await.unwrap()["status"], "failed");
    assert_eq!(
        qmp.execute("query-status", json!({})).await.unwrap()["status"],
        "running"
    );
    drop(qmp);
    self_check_clean(&mut a2).await;
    // b's QEMU never ran the guest: it gave up its incoming migration (and exits, as QEMU 7.2 does).
    if let Ok(mut qmp) = Qmp::connect(&b2.qmp).await {
        if let Ok(status) = qmp.execute("query-status", json!({})).await {
            assert_ne!(status["status"], "running", "{status}");
        }
    }
}
