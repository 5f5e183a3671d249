//! A cluster of test agents: a temporary directory with a cluster key, the agents started with it and
//! the CLI run with it, here or inside a network namespace.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::agent::TestAgent;
use super::cli::{json_of, perfplus_command};
use super::guest::guest_is_running_and_verified;
use super::netns::Netns;
use super::wait_until;

/// A temporary directory (removed when dropped) with a cluster key in it.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key_file = dir.path().join("cluster.key");
        let out = perfplus_command(None)
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

    /// Starts an agent on loopback with a page store of the given size ("0" = none).
    pub fn agent_with_store(&self, name: &str, page_store_size: &str) -> TestAgent {
        self.start_agent(name, page_store_size, None)
    }

    /// Starts an agent inside network namespace `netns`, with a page store of the given size.
    pub fn agent_in(&self, netns: &Netns, name: &str, page_store_size: &str) -> TestAgent {
        self.start_agent(name, page_store_size, Some(netns.name()))
    }

    /// Starts an agent named `name` (its state in this cluster's directory), inside `netns` or on
    /// loopback (None).
    pub fn start_agent(&self, name: &str, page_store_size: &str, netns: Option<&str>) -> TestAgent {
        TestAgent::start(&self.key_file, &self.dir.path().join(name), page_store_size, netns)
    }

    /// [`Cluster::start_agent`] with more environment variables for the agent (e.g. a fault point).
    pub fn start_agent_with_env(
        &self,
        name: &str,
        page_store_size: &str,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> TestAgent {
        TestAgent::start_with_env(&self.key_file, &self.dir.path().join(name), page_store_size, netns, env)
    }

    /// The CLI with this cluster's key and `args`, to run inside `netns` (None: here).
    pub fn command_in(&self, netns: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = perfplus_command(netns);
        cmd.arg("--cluster-key-file").arg(&self.key_file).args(args);
        cmd
    }

    /// Runs the CLI inside `netns` (None: here) with this cluster's key.
    pub fn cli_in(&self, netns: Option<&str>, args: &[&str]) -> Output {
        self.command_in(netns, args).output().expect("running perfplus")
    }

    /// Runs the CLI inside `netns` (None: here) and parses its standard output as JSON; panics with
    /// the CLI's output on failure.
    pub fn cli_json_in(&self, netns: Option<&str>, args: &[&str]) -> Value {
        json_of(self.cli_in(netns, args), &format!("perfplus {args:?}"))
    }

    /// Runs the CLI (here) with this cluster's key.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_in(None, args)
    }

    /// Runs the CLI (here) and parses its standard output as JSON; panics with the CLI's output on
    /// failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        self.cli_json_in(None, args)
    }

    /// `vm status --json` of `name` on `agent` (asked from where the agent runs).
    pub fn status(&self, agent: &TestAgent, name: &str) -> Value {
        self.cli_json_in(agent.netns(), &["vm", "status", name, "--agent", &agent.addr, "--json"])
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
        let out = self.cli_in(agent.netns(), &args);
        assert!(
            out.status.success(),
            "vm start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_for_guest(agent, name);
    }

    /// Waits until guest `name` on `agent` runs its workload and has verified its memory once
    /// ([`guest_is_running_and_verified`]).
    pub fn wait_for_guest(&self, agent: &TestAgent, name: &str) {
        wait_until(
            Duration::from_secs(60),
            &format!("guest {name} running its workload"),
            || guest_is_running_and_verified(&self.status(agent, name)),
        );
    }
}

impl Cluster {
    /// Starts an agent on loopback with a 64 MiB page store and more `perfplus agent` options (e.g.
    /// `["--max-vm-memory", "32M"]`).
    pub fn agent_with_options(&self, name: &str, options: &[&str]) -> TestAgent {
        TestAgent::start_with(&self.key_file, &self.dir.path().join(name), "64M", None, options)
    }
}
