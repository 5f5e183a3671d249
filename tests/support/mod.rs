//! Shared pieces of the end-to-end tests: real agent processes, the real CLI, a cluster key.
//!
//! Every agent is started by these tests and stopped by the pid they started (never by name), and
//! every file lives in a temporary directory that is removed when the test ends.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PERFPLUS: &str = env!("CARGO_BIN_EXE_perfplus");

/// Skips (returns true, with the reason printed) only where KVM is truly absent.
pub fn kvm_missing() -> bool {
    if Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("SKIPPED: /dev/kvm does not exist on this machine");
    true
}

/// A temporary directory with a cluster key in it.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key_file = dir.path().join("cluster.key");
        let out = Command::new(PERFPLUS)
            .args(["keygen", "--out"])
            .arg(&key_file)
            .output()
            .expect("perfplus keygen");
        assert!(
            out.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster { dir, key_file }
    }

    /// Starts an agent on a free loopback port, with a 64 MiB page store.
    pub fn agent(&self, name: &str) -> TestAgent {
        self.agent_with_store(name, "64M")
    }

    /// Starts an agent with a page store of the given size ("0" = none).
    pub fn agent_with_store(&self, name: &str, page_store_size: &str) -> TestAgent {
        TestAgent::start(&self.key_file, &self.dir.path().join(name), page_store_size)
    }

    /// Runs the CLI with this cluster's key.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_key(&self.key_file, args)
    }

    /// Runs the CLI and parses its standard output as JSON; panics with the CLI's stderr on failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "perfplus {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "perfplus {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `vm status --json` of `name` on `agent`.
    pub fn status(&self, agent: &TestAgent, name: &str) -> Value {
        self.cli_json(&["vm", "status", name, "--agent", &agent.addr, "--json"])
    }

    /// Starts the built-in guest and waits until its workload runs.
    pub fn start_guest(&self, agent: &TestAgent, name: &str, memory: &str, workload: &str) {
        self.start_guest_with(agent, name, memory, workload, &[]);
    }

    /// [`Cluster::start_guest`] with more `vm start` arguments (e.g. `--tracker dirty-ring`).
    pub fn start_guest_with(&self, agent: &TestAgent, name: &str, memory: &str, workload: &str, extra: &[&str]) {
        let mut args = vec![
            "vm",
            "start",
            "--agent",
            &agent.addr,
            "--name",
            name,
            "--memory",
            memory,
            "--workload",
            workload,
        ];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "vm start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(
            Duration::from_secs(60),
            &format!("guest {name} running its workload"),
            || {
                let status = self.status(agent, name);
                status["guest"]["state"] == 2 && status["guest"]["verify_sweeps"].as_u64().unwrap_or(0) >= 1
            },
        );
    }
}

pub fn cli_with_key(key_file: &Path, args: &[&str]) -> Output {
    Command::new(PERFPLUS)
        .arg("--cluster-key-file")
        .arg(key_file)
        .args(args)
        .output()
        .expect("running perfplus")
}

/// A `perfplus agent` process.
pub struct TestAgent {
    child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl TestAgent {
    pub fn start(key_file: &Path, state_dir: &Path, page_store_size: &str) -> TestAgent {
        std::fs::create_dir_all(state_dir).expect("agent state dir");
        let log = state_dir.join("agent.log");
        let mut child = Command::new(PERFPLUS)
            .arg("--cluster-key-file")
            .arg(key_file)
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--page-store-size",
                page_store_size,
                "--state-dir",
            ])
            .arg(state_dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("starting perfplus agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("agent stdout"))
            .read_line(&mut line)
            .expect("agent output");
        let addr = line
            .trim()
            .strip_prefix("perfplus agent listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "agent did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        TestAgent { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills this agent (SIGKILL, by the pid this test started) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A guest counter from a `vm status --json` object.
pub fn guest_counter(status: &Value, field: &str) -> u64 {
    status["guest"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no guest.{field}: {status}"))
}
