//! A `perfplus agent` process, started on loopback or inside a network namespace by the same helper.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::cli::perfplus_command;

/// A `perfplus agent` process, killed (by the pid this test started) and reaped when dropped.
pub struct TestAgent {
    child: Child,
    /// The agent's standard output after the "listening on" line, line by line.
    stdout: std::sync::mpsc::Receiver<String>,
    netns: Option<String>,
    port: u16,
    /// The agent's address where it runs: on loopback, or inside its namespace (run the CLI there:
    /// [`Cluster::cli_in`](super::Cluster::cli_in) with [`TestAgent::netns`]).
    pub addr: String,
    pub log: PathBuf,
}

impl TestAgent {
    /// Starts an agent with the credentials in `tls_dir` (an agent's), its state and its log (`agent.log`) in
    /// `state_dir`, and a page store of `page_store_size` ("0" = none). With `netns` None it listens
    /// on a free loopback port; inside namespace `netns` on a free port of every address there, so
    /// that a peer in another namespace reaches it ([`TestAgent::addr_via`]).
    pub fn start(tls_dir: &Path, state_dir: &Path, page_store_size: &str, netns: Option<&str>) -> TestAgent {
        TestAgent::start_full(tls_dir, state_dir, page_store_size, netns, &[], &[])
    }

    /// [`TestAgent::start`] with more `perfplus agent` options (e.g. `["--max-vm-memory", "32M"]`).
    pub fn start_with(
        tls_dir: &Path,
        state_dir: &Path,
        page_store_size: &str,
        netns: Option<&str>,
        options: &[&str],
    ) -> TestAgent {
        TestAgent::start_full(tls_dir, state_dir, page_store_size, netns, options, &[])
    }

    /// [`TestAgent::start`] with more environment variables for the agent (e.g. a fault point).
    pub fn start_with_env(
        tls_dir: &Path,
        state_dir: &Path,
        page_store_size: &str,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> TestAgent {
        TestAgent::start_full(tls_dir, state_dir, page_store_size, netns, &[], env)
    }

    /// [`TestAgent::start`] with more agent options and environment variables.
    pub fn start_full(
        tls_dir: &Path,
        state_dir: &Path,
        page_store_size: &str,
        netns: Option<&str>,
        options: &[&str],
        env: &[(&str, &str)],
    ) -> TestAgent {
        std::fs::create_dir_all(state_dir).expect("agent state dir");
        let log = state_dir.join("agent.log");
        let listen = if netns.is_some() { "0.0.0.0:0" } else { "127.0.0.1:0" };
        let mut command = perfplus_command(netns);
        command
            .arg("--tls-dir")
            .arg(tls_dir)
            .args([
                "agent",
                // Whatever /etc/perfplus/agent.toml this machine has: the test's agent is set by its flags.
                "--config",
                "/dev/null",
                "--listen",
                listen,
                "--page-store-size",
                page_store_size,
                "--state-dir",
            ])
            .arg(state_dir)
            .args(options)
            .envs(env.iter().copied());
        TestAgent::spawn(command, log, netns)
    }

    /// Starts the agent `command` (a `perfplus ... agent ...` command line, configured by the caller,
    /// e.g. from a config file), its stderr to `log`, and waits for the line that says where it listens.
    /// `netns`: the namespace the command runs in, if any.
    pub fn spawn(mut command: std::process::Command, log: PathBuf, netns: Option<&str>) -> TestAgent {
        let mut child = command
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("starting perfplus agent");
        let mut stdout = BufReader::new(child.stdout.take().expect("agent stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("agent output");
        let listening: SocketAddr = line
            .trim()
            .strip_prefix("perfplus agent listening on ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| {
                // Reap the agent before panicking: Drop does not run for a value never built.
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agent did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let port = listening.port();
        // The agent may print more (e.g. its metrics address): read it on, so it never blocks on
        // a full pipe.
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        TestAgent {
            stdout: lines_rx,
            child,
            netns: netns.map(str::to_string),
            port,
            addr: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// The next line the agent prints on its standard output after "listening on" (None if it prints
    /// none within `timeout`).
    pub fn next_stdout_line(&self, timeout: std::time::Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    /// The network namespace the agent runs in (None: this test's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The agent's address as reached through its address `ip` (e.g. from the other end of a link).
    pub fn addr_via(&self, ip: &str) -> String {
        format!("{ip}:{}", self.port)
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

    /// The agent's log so far, without terminal colour codes.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
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
