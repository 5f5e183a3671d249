//! The fault matrix: one small scenario per case, one invariant checked for all (in the manner of
//! CRIU's zdtm). Each case migrates a small running guest between two real agents and, at a named
//! point of the migration ([`perfplus::fault_injection`]), kills one agent (SIGKILL, as `kill -9`
//! does), holds it while the other side's keepalives run out, or cuts the link between two network
//! namespaces and restores it.
//!
//! The invariant, after every case:
//! - the `perfplus migrate` command ends, and its exit code is 0 exactly when its report says
//!   `completed`;
//! - the guest runs on at most one host; where it runs, its self-check stays clean over two more full
//!   sweeps of its working set;
//! - where it does not run, it is paused with a note that says why, or it is gone with the agent that
//!   hosted it; and it is where the case expects it;
//! - the operator's way out works: `vm resume` of a source's paused copy (whose destination is gone)
//!   runs it again with a clean self-check; `migrate --cancel` on a destination whose post-copy stalled
//!   destroys that incomplete copy.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{guest_counter, kvm_missing, wait_until, Cluster, ShapedLink, Spawned, TestAgent};

/// The guest of every case: small, so that a case takes seconds; writing, so that pre-copy has
/// rounds to do and post-copy has faults.
const MEMORY: &str = "32M";
const WORKLOAD: &str = "dirtier:working-set=8M,rate=20k";
const VM: &str = "g";
/// The post-copy time limit (`migrate --postcopy-timeout`) of every case but the link cuts that must
/// heal, which get [`POSTCOPY_TIMEOUT_HEALING`].
const POSTCOPY_TIMEOUT: &str = "3s";
const POSTCOPY_TIMEOUT_HEALING: &str = "30s";

/// What is done at the fault point.
#[derive(Clone, Copy)]
enum Fault {
    /// The agent whose point it is dies (SIGKILL).
    Kill,
    /// Both agents on one link between two namespaces; the agent whose point it is holds the
    /// migration there until the test has taken the link down; the link stays down for `cut_ms`.
    Cut { cut_ms: u64 },
}

/// Where the guest must be after the case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    SourceRunning,
    /// Paused on the source with a note; the destination has nothing (it died).
    SourcePaused,
    DestRunning,
    /// Paused on the destination (post-copy stalled) with a note; the source died with its copy.
    DestPaused,
    /// Paused on both after a partition longer than the post-copy limit: the source's copy (stale since
    /// the switch) and the destination's incomplete one. Never running on either.
    BothPaused,
    /// Nowhere: the source agent died with the guest before the commit; the destination dropped its
    /// half-built copy.
    Nowhere,
}

struct Case {
    /// `source:...` or `dest:...` (see `perfplus::fault_injection`).
    point: &'static str,
    fault: Fault,
    mode: &'static str,
    /// An extra fault point for the other agent (e.g. a hold that makes the link lapse before the
    /// point of this case can be reached).
    other_point: Option<&'static str>,
    expect: Expect,
}

fn on_source(point: &str) -> bool {
    point.starts_with("source:")
}

/// Runs one case and checks the invariant.
fn run(case: Case) {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let link = match case.fault {
        Fault::Kill => None,
        Fault::Cut { .. } => match ShapedLink::new('f', "1gbit") {
            Some(link) => Some(link),
            None => return,
        },
    };
    let go = cluster.dir.path().join("link-cut");
    let spec = match case.fault {
        Fault::Kill => case.point.to_string(),
        Fault::Cut { .. } => format!("{}:until={}", case.point, go.display()),
    };
    let (mut env_a, mut env_b) = (Vec::new(), Vec::new());
    let mine = if on_source(case.point) { &mut env_a } else { &mut env_b };
    mine.push(("PERFPLUS_FAULT_AT", spec.as_str()));
    if let Some(other) = case.other_point {
        let theirs = if on_source(case.point) { &mut env_b } else { &mut env_a };
        theirs.push(("PERFPLUS_FAULT_AT", other));
    }
    let (ns_a, ns_b) = match &link {
        Some(link) => (Some(link.a.name()), Some(link.b.name())),
        None => (None, None),
    };
    let mut a = cluster.start_agent_with_env("a", "0", ns_a, &env_a);
    let mut b = cluster.start_agent_with_env("b", "0", ns_b, &env_b);
    let to = match &link {
        Some(_) => b.addr_via(ShapedLink::IP_B),
        None => b.addr.clone(),
    };
    cluster.start_guest(&a, VM, MEMORY, WORKLOAD);

    let heals = matches!(case.fault, Fault::Cut { .. }) && case.expect == Expect::DestRunning;
    let postcopy_timeout = if heals {
        POSTCOPY_TIMEOUT_HEALING
    } else {
        POSTCOPY_TIMEOUT
    };
    let out_path = cluster.dir.path().join("migrate.out");
    let err_path = cluster.dir.path().join("migrate.err");
    let mut migrate = Spawned::new(
        cluster
            .command_in(
                ns_a,
                &[
                    "migrate",
                    VM,
                    "--from",
                    &a.addr,
                    "--to",
                    &to,
                    "--mode",
                    case.mode,
                    "--downtime-target",
                    "0.001ms",
                    "--max-rounds",
                    "3",
                    "--postcopy-timeout",
                    postcopy_timeout,
                    "--json",
                ],
            )
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("perfplus migrate"),
    );

    let victim_is_a = on_source(case.point);
    if let (Fault::Cut { cut_ms, .. }, Some(link)) = (case.fault, &link) {
        let holder = if victim_is_a { &a } else { &b };
        let marker = format!("fault point {} reached", case.point);
        wait_until(Duration::from_secs(60), &marker, || holder.log_text().contains(&marker));
        link.set_up(false);
        // The held migration goes on into the cut link.
        std::fs::write(&go, b"").unwrap();
        std::thread::sleep(Duration::from_millis(cut_ms));
        link.set_up(true);
    }

    // The command ends: every fault leads to an answer within the time limits.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = migrate.child().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "perfplus migrate did not end ({})",
            case.point
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let context = format!(
        "case {} ({:?}):\nmigrate stdout:\n{stdout}\nmigrate stderr:\n{stderr}",
        case.point, case.expect
    );

    // The fault happened where the case says.
    if let Fault::Kill = case.fault {
        let victim = if victim_is_a { &mut a } else { &mut b };
        wait_until(Duration::from_secs(10), "the victim agent to die", || {
            !victim.is_alive()
        });
        let marker = format!("fault point {} reached", case.point);
        assert!(
            victim.log_text().contains(&marker),
            "{marker} not in the log: {context}"
        );
    }

    // Exit code and report agree.
    let report: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    let outcome = report.as_ref().map(|r| r["outcome"].as_str().unwrap_or("").to_string());
    assert_eq!(
        status.success(),
        outcome.as_deref() == Some("completed"),
        "exit code {status} with outcome {outcome:?}: {context}"
    );

    if heals && case.mode == "postcopy" {
        let reconnects = report.as_ref().and_then(|r| r["reconnects"].as_u64()).unwrap_or(0);
        assert!(reconnects >= 1, "the post-copy link came back: {context}");
    }

    let alive_a = a.is_alive();
    let alive_b = b.is_alive();
    let source = alive_a.then_some(&a);
    let dest = alive_b.then_some(&b);

    // Settle: a destination that lost its source stalls after the post-copy limit; one that lost it
    // before the commit drops its half-built copy.
    match case.expect {
        Expect::DestPaused | Expect::BothPaused => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !vm_status(&cluster, &b).is_some_and(|s| stalled(&s)) {
                assert!(
                    Instant::now() < deadline,
                    "the destination's post-copy did not stall: {:?}\ndestination log:\n{}\nsource log:\n{}\n{context}",
                    vm_status(&cluster, &b),
                    b.log_text(),
                    a.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Expect::Nowhere => wait_until(Duration::from_secs(60), "the destination to drop its copy", || {
            vm_status(&cluster, &b).is_none()
        }),
        _ => {}
    }

    let on_a = source.and_then(|a| vm_status(&cluster, a));
    let on_b = dest.and_then(|b| vm_status(&cluster, b));
    // A stalled post-copy guest is paused: its vCPUs park at their next exit, and one blocked on a
    // missing page stays blocked (its run state may still say running until it parks).
    let running = |s: &Option<Value>| s.as_ref().is_some_and(|s| s["run_state"] == "running" && !stalled(s));
    let paused = |s: &Option<Value>| {
        s.as_ref().is_some_and(|s| {
            (s["run_state"] == "paused" || stalled(s)) && s["note"].as_str().is_some_and(|n| !n.is_empty())
        })
    };
    assert!(
        !(running(&on_a) && running(&on_b)),
        "the guest runs on both hosts: {context}"
    );
    let placed = match case.expect {
        Expect::SourceRunning => running(&on_a) && on_b.is_none(),
        Expect::SourcePaused => paused(&on_a) && on_b.is_none(),
        Expect::DestRunning => running(&on_b) && on_a.is_none(),
        Expect::DestPaused => paused(&on_b) && on_a.is_none(),
        Expect::BothPaused => paused(&on_a) && paused(&on_b),
        Expect::Nowhere => on_a.is_none() && on_b.is_none(),
    };
    assert!(
        placed,
        "expected {:?}; on the source: {on_a:?}; on the destination: {on_b:?}; {context}",
        case.expect
    );

    // Where it runs, it runs clean.
    if running(&on_a) {
        assert_runs_clean(&cluster, &a);
    }
    if running(&on_b) {
        assert_runs_clean(&cluster, &b);
    }

    // The operator's way out.
    if paused(&on_b) {
        let note = on_b.as_ref().unwrap()["note"].as_str().unwrap().to_string();
        let id = note
            .split("--cancel ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
            .unwrap_or_else(|| panic!("the stalled destination's note names no migration id: {note}"));
        let out = cluster.cli_in(b.netns(), &["migrate", "--cancel", id, "--agent", &b.addr]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("destroyed"),
            "cancel on the destination: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(vm_status(&cluster, &b).is_none(), "the cancelled copy is gone");
    }
    if paused(&on_a) {
        let out = cluster.cli_in(a.netns(), &["vm", "resume", VM, "--agent", &a.addr]);
        assert!(
            out.status.success(),
            "vm resume on the source: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_runs_clean(&cluster, &a);
    }
    drop(migrate);
}

/// Whether a `vm status --json` says the VM's post-copy stalled (paused, waiting for its pages).
fn stalled(status: &Value) -> bool {
    status["note"]
        .as_str()
        .is_some_and(|note| note.contains("post-copy stalled"))
}

/// `vm status --json` of the guest on `agent`, or None if the agent hosts no such VM.
fn vm_status(cluster: &Cluster, agent: &TestAgent) -> Option<Value> {
    let out = cluster.cli_in(agent.netns(), &["vm", "status", VM, "--agent", &agent.addr, "--json"]);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).expect("vm status JSON"));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no VM named"), "vm status failed otherwise: {err}");
    None
}

/// The guest on `agent` keeps writing and completes two more full verification sweeps, finding nothing.
fn assert_runs_clean(cluster: &Cluster, agent: &TestAgent) {
    let before = vm_status(cluster, agent).expect("the guest is there");
    let sweeps = guest_counter(&before, "verify_sweeps");
    let written = guest_counter(&before, "pages_written");
    wait_until(Duration::from_secs(30), "two more verification sweeps", || {
        vm_status(cluster, agent).is_some_and(|s| guest_counter(&s, "verify_sweeps") >= sweeps + 2)
    });
    let after = vm_status(cluster, agent).unwrap();
    assert!(
        guest_counter(&after, "pages_written") > written,
        "the guest makes progress: {after}"
    );
    assert_eq!(guest_counter(&after, "mismatches"), 0, "{after}");
}

macro_rules! cases {
    ($($name:ident: $point:literal, $fault:expr, $mode:literal, $other:expr => $expect:ident;)*) => {$(
        #[test]
        fn $name() {
            run(Case {
                point: $point,
                fault: $fault,
                mode: $mode,
                other_point: $other,
                expect: Expect::$expect,
            });
        }
    )*};
}

const KILL: Fault = Fault::Kill;

cases! {
    // The source agent dies (and its guest with it, as with a host crash): the destination never runs
    // a guest it was not committed, and runs the one it was.
    source_killed_after_the_handshake: "source:begin", KILL, "precopy", None => Nowhere;
    source_killed_after_the_first_pass: "source:round-1", KILL, "precopy", None => Nowhere;
    source_killed_after_round_2: "source:round-2", KILL, "precopy", None => Nowhere;
    source_killed_at_stop_and_copy: "source:stop-and-copy", KILL, "precopy", None => Nowhere;
    source_killed_before_the_state_transfer: "source:state", KILL, "precopy", None => Nowhere;
    source_killed_after_the_commit: "source:commit", KILL, "precopy", None => DestRunning;
    source_killed_after_running_before_verification: "source:running", KILL, "precopy", None => DestRunning;
    source_killed_during_the_postcopy_push: "source:postcopy-push", KILL, "postcopy", None => DestPaused;
    source_killed_serving_postcopy_demand: "source:postcopy-demand", KILL, "postcopy", None => DestPaused;
    source_killed_as_postcopy_resumes:
        "source:postcopy-resume", KILL, "postcopy", Some("dest:postcopy-push:pause=3000") => DestPaused;

    // The destination agent dies: before the commit the source resumes its guest; after it the source
    // keeps its copy paused (it cannot know whether the destination ran it), for `vm resume`.
    dest_killed_after_the_handshake: "dest:begin", KILL, "precopy", None => SourceRunning;
    dest_killed_after_the_first_pass: "dest:round-1", KILL, "precopy", None => SourceRunning;
    dest_killed_after_round_2: "dest:round-2", KILL, "precopy", None => SourceRunning;
    dest_killed_receiving_the_state: "dest:state", KILL, "precopy", None => SourceRunning;
    dest_killed_restored_before_the_commit: "dest:restored", KILL, "precopy", None => SourcePaused;
    dest_killed_at_the_commit: "dest:commit", KILL, "precopy", None => SourcePaused;
    dest_killed_after_running_before_verification: "dest:running", KILL, "precopy", None => SourcePaused;
    dest_killed_during_the_postcopy_push: "dest:postcopy-push", KILL, "postcopy", None => SourcePaused;
    dest_killed_demanding_pages: "dest:postcopy-demand", KILL, "postcopy", None => SourcePaused;
    dest_killed_as_postcopy_resumes:
        "dest:postcopy-resume", KILL, "postcopy", Some("source:postcopy-push:pause=3000") => SourcePaused;

    // The link is cut and restored: shorter than the time limits, the migration completes.
    link_cut_during_precopy_rounds:
        "source:round-2", Fault::Cut { cut_ms: 3000 }, "precopy", None => DestRunning;
    link_cut_after_the_commit:
        "source:commit", Fault::Cut { cut_ms: 3000 }, "precopy", None => DestRunning;
    link_cut_during_postcopy_within_the_limit:
        "dest:postcopy-push", Fault::Cut { cut_ms: 3000 }, "postcopy", None => DestRunning;
    // Longer than the post-copy limit: the source gives up, the destination pauses; neither runs it.
    link_cut_during_postcopy_past_the_limit:
        "source:postcopy-push", Fault::Cut { cut_ms: 9000 }, "postcopy", None => BothPaused;
}
