//! High availability: the OCF resource agent `ocf/perfplus-vm` (ocf:perfplus:vm) under a real two-node
//! Pacemaker/Corosync cluster, under `ocf-tester`, and action by action.
//!
//! The cluster is `scripts/ha/up.sh`'s: two nodes, each a network namespace with its own mount, UTS
//! and PID namespaces, its own Corosync, Pacemaker and perfplus agent; `scripts/ha/down.sh` ends them
//! (a guard runs it, whether the test passes or panics). Putting the node that runs the VM in standby
//! must move the VM by live migration (Pacemaker calls migrate_to, then migrate_from, then stop on the
//! source), never by stop and start: the guest's counters go on from where they were and its
//! self-check stays clean.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_nothing_lost, guest_counter, guest_is_running_and_verified, kvm_missing, perfplus_command, wait_until,
    Cluster, GUEST_RUNNING, PERFPLUS,
};

/// The repository's root (this crate is one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn resource_agent() -> PathBuf {
    repo().join("ocf/perfplus-vm")
}

/// Skips (true, with the reason printed) where the cluster software or KVM is absent, or the test is
/// not root; `scripts/setup.sh` installs the packages.
fn ha_missing() -> bool {
    if kvm_missing() {
        return true;
    }
    if unsafe_geteuid() != 0 {
        eprintln!("SKIPPED: the Pacemaker tests need root (namespaces, Corosync, Pacemaker)");
        return true;
    }
    for tool in [
        "corosync",
        "pacemakerd",
        "crm_mon",
        "cibadmin",
        "crm_standby",
        "ocf-tester",
        "xmllint",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("PATH=$PATH:/usr/sbin:/sbin command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            eprintln!("SKIPPED: {tool} is not installed (scripts/setup.sh installs Debian's packages)");
            return true;
        }
    }
    false
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory others may read and traverse (ocf-tester runs the agent's meta-data as `nobody`),
/// removed when dropped.
fn public_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// The whole cluster test's time: every wait takes at most what is left of it (normally the test
/// takes ~12 s; the budget only bounds a test that goes wrong).
struct Budget(Instant);

impl Budget {
    const TOTAL: Duration = Duration::from_secs(150);

    fn start() -> Budget {
        Budget(Instant::now() + Budget::TOTAL)
    }

    /// `cap`, or what is left of the budget if that is less.
    fn at_most(&self, cap: Duration) -> Duration {
        cap.min(self.0.saturating_duration_since(Instant::now()))
    }
}

/// A two-node cluster made by `scripts/ha/up.sh`, with a perfplus agent on port 7001 in each node;
/// `scripts/ha/down.sh` ends it when dropped.
struct HaCluster {
    dir: tempfile::TempDir,
    prefix: String,
    /// The operator's credentials the test's CLI and the resource agent use.
    tls_dir: PathBuf,
}

impl HaCluster {
    /// Up, with agents whose certificates `keys`' CA issues (named n1, n2).
    fn up(keys: &Cluster) -> HaCluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut cluster = HaCluster {
            dir,
            prefix: String::new(),
            tls_dir: keys.tls_dir.clone(),
        };
        // `cluster` exists before up.sh runs: if it fails half-way, Drop still runs down.sh.
        let out = Command::new(repo().join("scripts/ha/up.sh"))
            .arg(cluster.dir.path())
            .env("PERFPLUS", PERFPLUS)
            .env("PERFPLUS_CA", &keys.ca_dir)
            .output()
            .expect("running scripts/ha/up.sh");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "scripts/ha/up.sh failed: {}", text(&out));
        cluster.prefix = fs::read_to_string(cluster.dir.path().join("prefix"))
            .expect("up.sh records its namespace prefix")
            .trim()
            .to_string();
        cluster
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Runs a command on `node` (scripts/ha/on).
    fn on(&self, node: &str, args: &[&str]) -> Output {
        Command::new(repo().join("scripts/ha/on"))
            .arg(self.dir.path())
            .arg(node)
            .args(args)
            .output()
            .expect("running scripts/ha/on")
    }

    fn on_ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.on(node, args);
        assert!(out.status.success(), "{args:?} on {node} failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `perfplus vm status` of `vm` on `node`'s agent: None if the agent does not host it.
    fn vm_status(&self, node: &str, vm: &str) -> Option<Value> {
        let netns = format!("{}{node}", self.prefix);
        let out = perfplus_command(Some(&netns))
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .args(["vm", "status", vm, "--agent", "127.0.0.1:7001", "--json"])
            .output()
            .expect("perfplus vm status");
        if out.status.success() {
            return Some(serde_json::from_slice(&out.stdout).expect("vm status JSON"));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no VM named"), "vm status on {node}: {err}");
        None
    }

    /// Where Pacemaker says the resource runs (`crm_resource --locate`), as seen from `node`.
    fn located(&self, node: &str, rsc: &str) -> Vec<String> {
        let out = self.on(node, &["crm_resource", "--locate", "--resource", rsc, "--quiet"]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn pacemaker_log(&self, node: &str) -> String {
        fs::read_to_string(self.path(&format!("{node}/var-log/pacemaker/pacemaker.log"))).unwrap_or_default()
    }

    /// Lengths of both nodes' Pacemaker logs: a mark to read the operations after it.
    fn log_mark(&self) -> [usize; 2] {
        [self.pacemaker_log("n1").len(), self.pacemaker_log("n2").len()]
    }

    /// The operations on `rsc` whose results the nodes' controllers logged after `mark`, as
    /// (operation, node, result), node 1's then node 2's, each in order.
    fn ops_since(&self, mark: [usize; 2], rsc: &str) -> Vec<(String, String, String)> {
        let mut ops = Vec::new();
        for (i, node) in ["n1", "n2"].into_iter().enumerate() {
            let log = self.pacemaker_log(node);
            for line in log.get(mark[i]..).unwrap_or("").lines() {
                // "... notice: Result of migrate_to operation for vm1 on n1: ok | ..."
                let Some(rest) = line.split("Result of ").nth(1) else {
                    continue;
                };
                let Some((op, rest)) = rest.split_once(" operation for ") else {
                    continue;
                };
                let Some(rest) = rest.strip_prefix(&format!("{rsc} on ")) else {
                    continue;
                };
                let Some((on, result)) = rest.split_once(": ") else {
                    continue;
                };
                let result = result.split(" | ").next().unwrap_or("").trim();
                ops.push((op.to_string(), on.to_string(), result.to_string()));
            }
        }
        ops
    }

    /// The migration reports the resource agent logged on `node` (one JSON object a line).
    fn reports(&self, node: &str) -> Vec<Value> {
        fs::read_to_string(self.path(&format!("{node}/var-log/perfplus/ocf-migrations.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a report line is JSON"))
            .collect()
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/ha/down.sh"))
            .arg(self.dir.path())
            .status();
    }
}

/// What one standby moved: the times measured and the migration's report.
struct Move {
    to_agent: Duration,
    to_pacemaker: Duration,
    report: Value,
}

/// Puts `from` in standby and waits until the VM runs on `to`; asserts it moved by live migration
/// (migrate_to on `from`, migrate_from on `to`, stop only of the source's leftover on `from`, no
/// start and no stop on `to`) and that the guest went on where it was.
fn standby_moves_vm(ha: &HaCluster, budget: &Budget, vm: &str, from: &str, to: &str) -> Move {
    let before = ha.vm_status(from, vm).expect("the VM runs on the node put in standby");
    assert!(guest_is_running_and_verified(&before), "{before}");
    let written = guest_counter(&before, "pages_written");
    let reports_before = ha.reports(from).len();
    let mark = ha.log_mark();

    let t0 = Instant::now();
    ha.on_ok(from, &["crm_standby", "--node", from, "--update", "on"]);
    let (mut to_agent, mut to_pacemaker) = (None, None);
    wait_until(
        budget.at_most(Duration::from_secs(60)),
        &format!("{vm} running on {to} after standby of {from}"),
        || {
            if to_agent.is_none() && ha.vm_status(to, vm).is_some_and(|s| s["run_state"] == "running") {
                to_agent = Some(t0.elapsed());
            }
            if to_pacemaker.is_none() && ha.located(to, vm) == [to] {
                to_pacemaker = Some(t0.elapsed());
            }
            to_agent.is_some() && to_pacemaker.is_some()
        },
    );
    // The source's stop (of what the migration left there: nothing) ends the transition.
    wait_until(
        budget.at_most(Duration::from_secs(30)),
        &format!("the stop of {vm}'s source part on {from}"),
        || {
            ha.ops_since(mark, vm)
                .iter()
                .any(|(op, on, _)| op == "stop" && on == from)
        },
    );

    let ops = ha.ops_since(mark, vm);
    let has = |op: &str, on: &str| ops.iter().any(|(o, n, r)| o == op && n == on && r == "ok");
    assert!(has("migrate_to", from), "migrate_to on {from}: {ops:?}");
    assert!(has("migrate_from", to), "migrate_from on {to}: {ops:?}");
    for (op, on, result) in &ops {
        assert!(op != "start", "a live migration, not a restart: {ops:?}");
        assert!(!(op == "stop" && on == to), "nothing stopped on {to}: {ops:?}");
        assert!(
            result == "ok" || op == "monitor" || op == "probe",
            "every operation succeeded: {ops:?}"
        );
    }

    // One VM, on `to`, the same guest: its counters went on, its self-check is clean.
    assert!(ha.vm_status(from, vm).is_none(), "no copy left on {from}");
    let after = ha.vm_status(to, vm).expect("the VM on the target");
    assert_eq!(after["run_state"], "running", "{after}");
    assert!(after["note"].is_null(), "{after}");
    assert_eq!(after["guest"]["state"], GUEST_RUNNING, "{after}");
    assert!(
        guest_counter(&after, "pages_written") >= written,
        "the guest's writes went on from {written} (a restarted guest counts from 0): {after}"
    );
    let sweeps = guest_counter(&after, "verify_sweeps");
    wait_until(
        budget.at_most(Duration::from_secs(30)),
        "a verification sweep on the target",
        || {
            ha.vm_status(to, vm)
                .is_some_and(|s| guest_counter(&s, "verify_sweeps") > sweeps)
        },
    );
    let later = ha.vm_status(to, vm).expect("the VM on the target");
    assert_eq!(guest_counter(&later, "mismatches"), 0, "{later}");
    assert!(guest_counter(&later, "pages_written") > written, "{later}");

    // The agent's log of the migration: perfplus's own report, complete and clean.
    let reports = ha.reports(from);
    assert_eq!(reports.len(), reports_before + 1, "one migration logged on {from}");
    let logged = reports.last().unwrap();
    assert_eq!(logged["from_node"], from);
    assert_eq!(logged["to_node"], to);
    let report = logged["report"].clone();
    assert_nothing_lost(&report);
    Move {
        to_agent: to_agent.unwrap(),
        to_pacemaker: to_pacemaker.unwrap(),
        report,
    }
}

fn print_move(what: &str, m: &Move) {
    let r = &m.report;
    let ms = |field: &str| r[field].as_f64().map_or("?".to_string(), |v| format!("{v:.1}"));
    eprintln!(
        "{what}: standby command -> VM running on the target's agent {:.0} ms, Pacemaker shows it there {:.0} ms \
         (polled every ~0.1 s); migration ({}, {} rounds) total {} ms, downtime {} ms, guest's longest stall {} ms",
        m.to_agent.as_secs_f64() * 1000.0,
        m.to_pacemaker.as_secs_f64() * 1000.0,
        r["mode"].as_str().unwrap_or("?"),
        r["rounds"].as_array().map_or(0, |r| r.len()),
        ms("total_ms"),
        ms("downtime_ms"),
        ms("guest_max_stall_ms"),
    );
}

#[test]
fn standby_moves_the_vm_by_live_migration_and_back() {
    if ha_missing() {
        return;
    }
    let started = Instant::now();
    let budget = Budget::start();
    let keys = Cluster::new();
    let ha = HaCluster::up(&keys);
    eprintln!("cluster up in {:.1} s", started.elapsed().as_secs_f64());

    // The VM resource and its preference for n1 (less than it sticks where it runs: stickiness 100),
    // in one CIB update, so that Pacemaker places it knowing both.
    let tls_dir = keys.tls_dir.display().to_string();
    let configuration = format!(
        r#"<configuration><resources>
  <primitive id="vm1" class="ocf" provider="perfplus" type="vm">
    <instance_attributes id="vm1-params">
      <nvpair id="vm1-binary" name="binary" value="{PERFPLUS}"/>
      <nvpair id="vm1-tls" name="tls_dir" value="{tls_dir}"/>
      <nvpair id="vm1-memory" name="memory" value="64M"/>
      <nvpair id="vm1-workload" name="workload" value="dirtier:working-set=16M,rate=5k"/>
      <nvpair id="vm1-downtime" name="migration_downtime" value="30"/>
    </instance_attributes>
    <meta_attributes id="vm1-meta">
      <nvpair id="vm1-allow-migrate" name="allow-migrate" value="true"/>
    </meta_attributes>
    <operations>
      <op id="vm1-start" name="start" interval="0s" timeout="60s"/>
      <op id="vm1-stop" name="stop" interval="0s" timeout="60s"/>
      <op id="vm1-monitor" name="monitor" interval="5s" timeout="30s"/>
      <op id="vm1-migrate_to" name="migrate_to" interval="0s" timeout="180s"/>
      <op id="vm1-migrate_from" name="migrate_from" interval="0s" timeout="60s"/>
    </operations>
  </primitive>
</resources><constraints>
  <rsc_location id="vm1-prefers-n1" rsc="vm1" node="n1" score="50"/>
</constraints></configuration>"#
    );
    ha.on_ok(
        "n1",
        &[
            "cibadmin",
            "--modify",
            "--allow-create",
            "--scope",
            "configuration",
            "--xml-text",
            &configuration,
        ],
    );
    wait_until(budget.at_most(Duration::from_secs(60)), "vm1 started on n1", || {
        ha.located("n1", "vm1") == ["n1"]
            && ha
                .vm_status("n1", "vm1")
                .is_some_and(|s| guest_is_running_and_verified(&s))
    });
    let starts = ha.ops_since([0, 0], "vm1");
    assert!(
        starts
            .iter()
            .any(|(op, on, r)| op == "start" && on == "n1" && r == "ok"),
        "{starts:?}"
    );

    // n1 into standby: the VM goes to n2, live.
    let out = standby_moves_vm(&ha, &budget, "vm1", "n1", "n2");
    print_move("n1 standby", &out);

    // n1 back online (the VM stays on n2: stickiness), then n2 into standby: back to n1, live.
    ha.on_ok("n1", &["crm_standby", "--node", "n1", "--update", "off"]);
    wait_until(budget.at_most(Duration::from_secs(30)), "n1 online again", || {
        let out = ha.on("n1", &["crm_mon", "--one-shot", "--output-as=xml"]);
        String::from_utf8_lossy(&out.stdout).contains(r#"<node name="n1" id="1" online="true" standby="false""#)
    });
    assert_eq!(ha.located("n1", "vm1"), ["n2"], "the VM stays where it runs");
    let back = standby_moves_vm(&ha, &budget, "vm1", "n2", "n1");
    print_move("n2 standby", &back);

    let all = ha.ops_since([0, 0], "vm1");
    let count = |op: &str| all.iter().filter(|(o, _, _)| o == op).count();
    assert_eq!(count("start"), 1, "started once, then only migrated: {all:?}");
    assert_eq!(count("migrate_to"), 2, "{all:?}");
    assert_eq!(count("migrate_from"), 2, "{all:?}");
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}

/// ocf-tester (resource-agents) checks the agent's meta-data against the OCF DTD and runs its
/// actions (validate-all, monitor, start twice, stop twice, probes, migrate_to/migrate_from) against
/// a perfplus agent on loopback.
#[test]
fn ocf_tester_passes_on_the_resource_agent() {
    if ha_missing() {
        return;
    }
    let cluster = Cluster::new();
    let agent = cluster.agent("na");
    // ocf-tester runs meta-data as `nobody`: the agent must be where nobody can reach it.
    let public = public_tempdir();
    let ra = public.path().join("perfplus-vm");
    fs::copy(resource_agent(), &ra).expect("copying the resource agent");
    fs::set_permissions(&ra, fs::Permissions::from_mode(0o755)).expect("chmod");

    let key = format!("tls_dir={}", cluster.tls_dir.display());
    let local = format!("agent={}", agent.addr);
    let binary = format!("binary={PERFPLUS}");
    let out = Command::new("ocf-tester")
        .env(
            "PATH",
            format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()),
        )
        .args(["-n", "ocftest", "-o", &binary, "-o", &key, "-o", &local])
        .args([
            "-o",
            "memory=32M",
            "-o",
            "workload=dirtier:working-set=4M,rate=1k",
            "-o",
            "report_log=",
        ])
        .arg(&ra)
        .output()
        .expect("running ocf-tester");
    let output = text(&out);
    eprintln!("ocf-tester:\n{output}");
    assert!(out.status.success(), "ocf-tester failed:\n{output}");
    assert!(output.contains("passed all tests"), "{output}");
    // It left nothing running.
    let list = cluster.cli_json(&["vm", "list", "--agent", &agent.addr, "--json"]);
    assert_eq!(list, serde_json::json!([]), "{list}");
}

/// The agent's actions one by one, as Pacemaker runs them (OCF environment), between two perfplus
/// agents on loopback: the exit codes of each state, and a migration with its report logged.
#[test]
fn the_resource_agent_actions_and_their_exit_codes() {
    if ha_missing() {
        return;
    }
    let cluster = Cluster::new();
    // Agents named after their nodes, as the resource agent checks by default.
    let a = cluster.agent("na");
    let b = cluster.agent("nb");
    let report_log = cluster.dir.path().join("reports.jsonl");
    let agents = format!("na={} nb={}", a.addr, b.addr);
    let run = |action: &str, local: &str, extra: &[(&str, &str)]| -> (i32, String) {
        let mut cmd = Command::new(resource_agent());
        cmd.arg(action)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", "web1")
            .env("OCF_RESKEY_CRM_meta_timeout", "30000")
            .env("OCF_RESKEY_CRM_meta_interval", "10000")
            .env("OCF_RESKEY_binary", PERFPLUS)
            .env("OCF_RESKEY_tls_dir", &cluster.tls_dir)
            .env("OCF_RESKEY_agent", local)
            .env("OCF_RESKEY_agents", &agents)
            .env("OCF_RESKEY_memory", "32M")
            .env("OCF_RESKEY_workload", "dirtier:working-set=4M,rate=2k")
            .env("OCF_RESKEY_report_log", &report_log)
            .env(
                "PATH",
                format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()),
            );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("running the resource agent");
        (out.status.code().unwrap_or(-1), text(&out))
    };
    const SUCCESS: i32 = 0;
    const ERR_GENERIC: i32 = 1;
    const ERR_CONFIGURED: i32 = 6;
    const NOT_RUNNING: i32 = 7;

    assert_eq!(run("validate-all", &a.addr, &[]).0, SUCCESS);
    let (rc, out) = run("validate-all", &a.addr, &[("OCF_RESKEY_migration_mode", "sideways")]);
    assert_eq!(rc, ERR_CONFIGURED, "{out}");
    assert!(out.contains("migration_mode"), "{out}");
    assert_eq!(
        run("validate-all", &a.addr, &[("OCF_RESKEY_name", "no/slash")]).0,
        ERR_CONFIGURED
    );
    assert_eq!(run("monitor", &a.addr, &[]).0, NOT_RUNNING);
    // No agent listens there: its VMs cannot run.
    assert_eq!(run("monitor", "127.0.0.1:1", &[]).0, NOT_RUNNING);
    assert_eq!(run("stop", "127.0.0.1:1", &[]).0, SUCCESS);

    let (rc, out) = run("start", &a.addr, &[]);
    assert_eq!(rc, SUCCESS, "{out}");
    assert_eq!(run("monitor", &a.addr, &[]).0, SUCCESS);
    assert_eq!(run("start", &a.addr, &[]).0, SUCCESS, "a second start succeeds");
    assert_eq!(run("monitor", &b.addr, &[]).0, NOT_RUNNING);
    cluster.wait_for_guest(&a, "web1");
    let written = guest_counter(&cluster.status(&a, "web1"), "pages_written");

    // migrate_to without a target is refused; with one it moves the VM and logs the report.
    assert_eq!(run("migrate_to", &a.addr, &[]).0, ERR_GENERIC);
    let meta = [
        ("OCF_RESKEY_CRM_meta_migrate_source", "na"),
        ("OCF_RESKEY_CRM_meta_migrate_target", "nb"),
    ];
    let (rc, out) = run("migrate_to", &a.addr, &meta);
    assert_eq!(rc, SUCCESS, "{out}");
    assert!(out.contains("migrated to nb"), "{out}");
    let (rc, out) = run("migrate_from", &b.addr, &meta);
    assert_eq!(rc, SUCCESS, "{out}");
    assert_eq!(run("monitor", &a.addr, &[]).0, NOT_RUNNING);
    assert_eq!(run("monitor", &b.addr, &[]).0, SUCCESS);
    // A repeated migrate_to finds the VM on its target already.
    assert_eq!(run("migrate_to", &a.addr, &meta).0, SUCCESS);
    let status = cluster.status(&b, "web1");
    assert!(guest_counter(&status, "pages_written") >= written, "{status}");
    assert_eq!(guest_counter(&status, "mismatches"), 0, "{status}");

    let log = fs::read_to_string(&report_log).expect("the report log");
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(lines[0]["resource"], "web1");
    assert_eq!(lines[0]["from_node"], "na");
    assert_eq!(lines[0]["to_node"], "nb");
    assert_nothing_lost(&lines[0]["report"]);

    // An agent that answers for another node is not trusted with the guest: refused, and the VM stays.
    let impostor_agents = format!("nb={} nx={}", b.addr, a.addr);
    let impostor = [
        ("OCF_RESKEY_CRM_meta_migrate_source", "nb"),
        ("OCF_RESKEY_CRM_meta_migrate_target", "nx"),
        ("OCF_RESKEY_agents", impostor_agents.as_str()),
    ];
    let (rc, out) = run("migrate_to", &b.addr, &impostor);
    assert_eq!(rc, ERR_GENERIC, "{out}");
    assert!(
        out.contains(r#"it is agent \"na\", not the agent \"nx\""#)
            || out.contains(r#"it is agent "na", not the agent "nx""#),
        "the refusal names the agent that answered: {out}"
    );
    assert_eq!(run("monitor", &b.addr, &[]).0, SUCCESS);
    assert_eq!(run("monitor", &a.addr, &[]).0, NOT_RUNNING);

    // A migration that cannot happen (the target has no agent) fails, and the VM stays.
    let nowhere = [
        ("OCF_RESKEY_CRM_meta_migrate_source", "nb"),
        ("OCF_RESKEY_CRM_meta_migrate_target", "nc"),
        ("OCF_RESKEY_agents", "nc=127.0.0.1:1"),
    ];
    let (rc, out) = run("migrate_to", &b.addr, &nowhere);
    assert_eq!(rc, ERR_GENERIC, "{out}");
    assert!(out.contains("ocf-exit-reason"), "{out}");
    assert_eq!(run("monitor", &b.addr, &[]).0, SUCCESS);

    // Stopped, and stopped again: both succeed, and nothing is left.
    assert_eq!(run("stop", &b.addr, &[]).0, SUCCESS);
    assert_eq!(run("stop", &b.addr, &[]).0, SUCCESS, "a second stop succeeds");
    assert_eq!(run("monitor", &b.addr, &[]).0, NOT_RUNNING);
    assert_eq!(
        cluster.cli_json(&["vm", "list", "--agent", &b.addr, "--json"]),
        serde_json::json!([])
    );
}
