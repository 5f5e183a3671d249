//! Post-copy and hybrid migration over a shaped link: two network namespaces joined by a veth pair,
//! rate-limited with `tc tbf`, one agent in each (`ip netns exec`), a guest whose write rate pre-copy
//! cannot converge on. And a link cut in the middle of post-copy, then restored.
//!
//! The namespaces, the veth pair and the agents are created here and removed when the test ends,
//! whether it passes or panics (guards with `Drop`; agents are killed by the pid the test started).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{kvm_missing, wait_until, Cluster, PERFPLUS};

/// Two namespaces `<name>a` / `<name>b` with a veth pair `<name>-a` / `<name>-b`, 10.X.Y.1 / .2, each
/// end shaped with tbf.
struct Link {
    ns_a: String,
    ns_b: String,
    dev_a: String,
    ip_a: String,
    ip_b: String,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("running a network command")
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Link {
    /// None (with a reason printed) when network namespaces cannot be made here.
    fn new(tag: &str, rate: &str) -> Option<Link> {
        let id = std::process::id() % 10000;
        let name = format!("pp{tag}{id}");
        let subnet = format!(
            "10.{}.{}",
            100 + id % 100,
            (id / 100) % 100 + u32::from(tag.as_bytes()[0] % 100)
        );
        let link = Link {
            ns_a: format!("{name}a"),
            ns_b: format!("{name}b"),
            dev_a: format!("{name}-a"),
            ip_a: format!("{subnet}.1"),
            ip_b: format!("{subnet}.2"),
        };
        if !sh(&["ip", "netns", "add", &link.ns_a]).status.success() {
            eprintln!("SKIPPED: cannot create network namespaces (ip netns add failed)");
            return None;
        }
        must(&["ip", "netns", "add", &link.ns_b]);
        let dev_b = format!("{name}-b");
        must(&[
            "ip",
            "link",
            "add",
            &link.dev_a,
            "netns",
            &link.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            &dev_b,
            "netns",
            &link.ns_b,
        ]);
        for (ns, dev, ip) in [
            (&link.ns_a, &link.dev_a, format!("{subnet}.1/24")),
            (&link.ns_b, &dev_b, format!("{subnet}.2/24")),
        ] {
            must(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "64kb", "latency", "50ms",
            ]);
        }
        Some(link)
    }

    fn set_up(&self, up: bool) {
        must(&[
            "ip",
            "-n",
            &self.ns_a,
            "link",
            "set",
            &self.dev_a,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it (and with it the pair).
        let _ = sh(&["ip", "netns", "del", &self.ns_a]);
        let _ = sh(&["ip", "netns", "del", &self.ns_b]);
    }
}

/// A `perfplus agent` running inside a namespace, listening on all its addresses.
struct NsAgent {
    child: Child,
    ns: String,
    port: String,
    log: std::path::PathBuf,
}

impl NsAgent {
    fn start(cluster: &Cluster, ns: &str, name: &str) -> NsAgent {
        let dir = cluster.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("agent.log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PERFPLUS, "--cluster-key-file"])
            .arg(&cluster.key_file)
            .args([
                "agent",
                "--listen",
                "0.0.0.0:0",
                "--page-store-size",
                "0",
                "--state-dir",
            ])
            .arg(&dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting an agent in a namespace");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .filter(|_| line.contains("listening on"))
            .unwrap_or_else(|| {
                panic!(
                    "agent did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap()
                )
            })
            .to_string();
        NsAgent {
            child,
            ns: ns.to_string(),
            port,
            log,
        }
    }

    /// The agent's address from inside its own namespace.
    fn local(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The CLI inside namespace `ns`.
fn cli(cluster: &Cluster, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, PERFPLUS, "--cluster-key-file"])
        .arg(&cluster.key_file)
        .args(args);
    cmd
}

fn json_of(out: Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn status(cluster: &Cluster, agent: &NsAgent, vm: &str) -> Value {
    json_of(
        cli(
            cluster,
            &agent.ns,
            &["vm", "status", vm, "--agent", &agent.local(), "--json"],
        )
        .output()
        .unwrap(),
        "vm status",
    )
}

fn start_guest(cluster: &Cluster, agent: &NsAgent, vm: &str, memory: &str, workload: &str) {
    let out = cli(
        cluster,
        &agent.ns,
        &[
            "vm",
            "start",
            "--agent",
            &agent.local(),
            "--name",
            vm,
            "--memory",
            memory,
            "--workload",
            workload,
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "vm start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(60), "the guest's workload", || {
        let s = status(cluster, agent, vm);
        s["guest"]["state"] == 2 && s["guest"]["verify_sweeps"].as_u64().unwrap_or(0) >= 1
    });
}

fn n(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("report without {field}: {report}"))
}

/// What a completed post-copy (or hybrid that switched) migration must show.
fn assert_postcopy_report(report: &Value, mode: &str) {
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["switched_to_postcopy"], true, "{report}");
    assert_eq!(report["lost_pages"], 0, "{report}");
    assert_eq!(report["memory_digest_equal"], true, "{report}");
    assert_eq!(
        report["guest_verified"], true,
        "the guest's self-check passes: {report}"
    );
    assert_eq!(report["guest_mismatches"], 0, "{report}");
    let (before, after) = (
        n(report, "guest_pages_written_before"),
        n(report, "guest_pages_written_after"),
    );
    assert!(
        after > before,
        "the guest kept writing on the destination ({before} -> {after})"
    );
    // Every missing page crossed once: as a demanded page or a pushed one, never both.
    let missing = n(report, "postcopy_pages");
    assert!(missing > 0, "{report}");
    assert_eq!(
        n(report, "pages_demanded") + n(report, "pages_pushed"),
        missing,
        "each missing page is sent exactly once: {report}"
    );
    assert!(report["postcopy_ms"].as_f64().unwrap() > 0.0);
    assert!(report["fault_latency_us"]["max"].as_f64().unwrap() >= report["fault_latency_us"]["p50"].as_f64().unwrap());
    assert!(
        report["guest_max_stall_ms"].as_f64().is_some(),
        "the guest measured its stall: {report}"
    );
}

#[test]
fn postcopy_and_hybrid_over_a_shaped_link() {
    if kvm_missing() {
        return;
    }
    let Some(link) = Link::new("h", "150mbit") else { return };
    let cluster = Cluster::new();
    let a = NsAgent::start(&cluster, &link.ns_a, "a");
    let b = NsAgent::start(&cluster, &link.ns_b, "b");
    // 20k random writes/s over 32 MiB: every round leaves nearly the whole working set dirty again,
    // while the link moves ~4.5k pages/s. Pre-copy alone cannot converge on this.
    start_guest(
        &cluster,
        &a,
        "busy",
        "128M",
        "dirtier:working-set=32M,rate=20k,mix=unique:70,dup:10,zero:10,same:10",
    );
    let to_b = format!("{}:{}", link.ip_b, b.port);
    let started = Instant::now();
    let report = json_of(
        cli(
            &cluster,
            &link.ns_a,
            &[
                "migrate",
                "busy",
                "--from",
                &a.local(),
                "--to",
                &to_b,
                "--max-rounds",
                "8",
                "--json",
            ],
        )
        .output()
        .unwrap(),
        "hybrid migrate",
    );
    eprintln!("hybrid over 150 Mbit/s in {:?}: {report}", started.elapsed());
    assert_postcopy_report(&report, "hybrid");
    assert!(
        report["stop_reason"]
            .as_str()
            .unwrap()
            .contains("switched to post-copy"),
        "{report}"
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert!(
        rounds.len() >= 2 && rounds.len() < 8,
        "switched before the round limit: {report}"
    );
    assert!(
        n(&report, "postcopy_pages") < 128 * 256,
        "pages sent in pre-copy and not dirtied since were not missing: {report}"
    );
    let s = status(&cluster, &b, "busy");
    assert_eq!(s["run_state"], "running");
    let written = s["guest"]["pages_written"].as_u64().unwrap();
    wait_until(Duration::from_secs(10), "the guest to keep writing on B", || {
        status(&cluster, &b, "busy")["guest"]["pages_written"].as_u64().unwrap() > written
    });

    // And back to A in pure post-copy: nothing moves before the switch.
    let to_a = format!("{}:{}", link.ip_a, a.port);
    let back = json_of(
        cli(
            &cluster,
            &link.ns_b,
            &[
                "migrate",
                "busy",
                "--from",
                &b.local(),
                "--to",
                &to_a,
                "--mode",
                "postcopy",
                "--json",
            ],
        )
        .output()
        .unwrap(),
        "postcopy migrate",
    );
    eprintln!("postcopy over 150 Mbit/s: {back}");
    assert_postcopy_report(&back, "postcopy");
    assert_eq!(
        n(&back, "postcopy_pages"),
        128 * 256,
        "post-copy: every page is missing at the switch"
    );
    assert!(back["rounds"].as_array().unwrap().is_empty());
    assert!(
        n(&back, "demand_faults") > 0,
        "the guest faulted on missing pages: {back}"
    );
    assert!(
        back["downtime_ms"].as_f64().unwrap() < 500.0,
        "post-copy switches without moving memory: {back}"
    );
    assert_eq!(status(&cluster, &a, "busy")["run_state"], "running");
}

#[test]
fn a_link_cut_during_postcopy_is_survived_and_resumed() {
    if kvm_missing() {
        return;
    }
    let Some(link) = Link::new("f", "60mbit") else { return };
    let cluster = Cluster::new();
    let a = NsAgent::start(&cluster, &link.ns_a, "a");
    let b = NsAgent::start(&cluster, &link.ns_b, "b");
    start_guest(
        &cluster,
        &a,
        "cut",
        "128M",
        "dirtier:working-set=48M,rate=20k,mix=unique:100",
    );
    let to_b = format!("{}:{}", link.ip_b, b.port);
    let migrate = cli(
        &cluster,
        &link.ns_a,
        &[
            "migrate",
            "cut",
            "--from",
            &a.local(),
            "--to",
            &to_b,
            "--mode",
            "postcopy",
            "--json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until(Duration::from_secs(30), "the guest to resume on B in post-copy", || {
        b.log_text().contains("guest resumed here in post-copy")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !b.log_text().contains("every page present"),
        "post-copy must still be under way when the link is cut"
    );
    link.set_up(false);
    // Both sides notice (keepalives stop) and wait; the guest waits on its faults, the agent answers.
    wait_until(
        Duration::from_secs(15),
        "the destination to notice the lost link",
        || b.log_text().contains("post-copy link lost"),
    );
    let s = status(&cluster, &b, "cut");
    assert_eq!(s["guest"]["mismatches"], 0, "{s}");
    std::thread::sleep(Duration::from_secs(1));
    link.set_up(true);

    // Resume by hand as well as automatically: whichever comes first, both see the report.
    let log = a.log_text();
    let id = log
        .split("id=")
        .nth(1)
        .map(|rest| {
            rest.trim_start_matches('"')
                .chars()
                .take_while(|c| c.is_ascii_hexdigit())
                .collect::<String>()
        })
        .expect("the source logs the migration id");
    assert_eq!(id.len(), 16, "migration id {id:?}");
    let resumed = json_of(
        cli(
            &cluster,
            &link.ns_a,
            &["migrate", "--from", &a.local(), "--resume", &id, "--json"],
        )
        .output()
        .unwrap(),
        "migrate --resume",
    );
    let report = json_of(migrate.wait_with_output().unwrap(), "the interrupted migrate");
    eprintln!("post-copy with a cut link: {report}");
    assert_eq!(resumed["migration_id"], report["migration_id"]);
    assert_eq!(report["lost_pages"], 0, "{report}");
    assert_eq!(report["memory_digest_equal"], true, "{report}");
    assert_eq!(report["guest_verified"], true, "{report}");
    assert_eq!(report["guest_mismatches"], 0, "{report}");
    assert!(n(&report, "reconnects") >= 1, "{report}");
    assert_eq!(status(&cluster, &b, "cut")["run_state"], "running");
}
