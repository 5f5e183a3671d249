//! A cluster of test agents: a temporary directory with the cluster's CA (`perfplus ca init`), each
//! agent started with credentials of its own (`perfplus cert issue --agent <name>`), and the CLI run
//! with an operator's, here or inside a network namespace.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::agent::TestAgent;
use super::cli::{json_of, perfplus_command};
use super::guest::guest_is_running_and_verified;
use super::netns::Netns;
use super::wait_until;

/// A temporary directory (removed when dropped) with a cluster CA and credentials in it.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The CA (`ca.pem`, `ca.key`).
    pub ca_dir: PathBuf,
    /// The operator's credentials the CLI runs with (operator "tester").
    pub tls_dir: PathBuf,
}

/// Runs `perfplus` with `args` (CA and certificate commands), panicking with its output on failure.
fn perfplus_ok(args: &[&std::ffi::OsStr]) {
    let out = perfplus_command(None).args(args).output().expect("running perfplus");
    assert!(
        out.status.success(),
        "perfplus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::named("test")
    }

    /// A cluster whose CA names it `cluster`.
    pub fn named(cluster: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_dir = dir.path().join("ca");
        perfplus_ok(&[
            "ca".as_ref(),
            "init".as_ref(),
            "--cluster".as_ref(),
            cluster.as_ref(),
            "--dir".as_ref(),
            ca_dir.as_os_str(),
        ]);
        let cluster = Cluster {
            tls_dir: PathBuf::new(),
            ca_dir,
            dir,
        };
        let tls_dir = cluster.issue("operator", "tester");
        Cluster { tls_dir, ..cluster }
    }

    /// Credentials of `role` ("agent", "operator" or "reader") named `name`, issued once by this
    /// cluster's CA (`perfplus cert issue`); returns their directory.
    pub fn issue(&self, role: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("tls-{role}-{name}"));
        if !out.exists() {
            perfplus_ok(&[
                "cert".as_ref(),
                "issue".as_ref(),
                "--ca-dir".as_ref(),
                self.ca_dir.as_os_str(),
                format!("--{role}").as_ref(),
                name.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ]);
        }
        out
    }

    /// The credentials of agent `name` (issued if needed), loaded, for tests that talk the protocol
    /// themselves.
    pub fn agent_credentials(&self, name: &str) -> perfplus_protocol::Credentials {
        perfplus_protocol::Credentials::load(&self.issue("agent", name)).expect("agent credentials")
    }

    /// The CLI with the credentials in `tls_dir` and `args`, run here.
    pub fn cli_as(&self, tls_dir: &std::path::Path, args: &[&str]) -> Output {
        perfplus_command(None)
            .arg("--tls-dir")
            .arg(tls_dir)
            .args(args)
            .output()
            .expect("running perfplus")
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
        TestAgent::start(
            &self.issue("agent", name),
            &self.dir.path().join(name),
            page_store_size,
            netns,
        )
    }

    /// [`Cluster::start_agent`] with more environment variables for the agent (e.g. a fault point).
    pub fn start_agent_with_env(
        &self,
        name: &str,
        page_store_size: &str,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> TestAgent {
        TestAgent::start_with_env(
            &self.issue("agent", name),
            &self.dir.path().join(name),
            page_store_size,
            netns,
            env,
        )
    }

    /// The CLI with this cluster's operator credentials and `args`, to run inside `netns` (None: here).
    pub fn command_in(&self, netns: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = perfplus_command(netns);
        cmd.arg("--tls-dir").arg(&self.tls_dir).args(args);
        cmd
    }

    /// Runs the CLI inside `netns` (None: here) as this cluster's operator.
    pub fn cli_in(&self, netns: Option<&str>, args: &[&str]) -> Output {
        self.command_in(netns, args).output().expect("running perfplus")
    }

    /// Runs the CLI inside `netns` (None: here) and parses its standard output as JSON; panics with
    /// the CLI's output on failure.
    pub fn cli_json_in(&self, netns: Option<&str>, args: &[&str]) -> Value {
        json_of(self.cli_in(netns, args), &format!("perfplus {args:?}"))
    }

    /// Runs the CLI (here) as this cluster's operator.
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
        TestAgent::start_with(
            &self.issue("agent", name),
            &self.dir.path().join(name),
            "64M",
            None,
            options,
        )
    }
}
