//! The `perfplus` command: run where the test runs or inside a network namespace, its JSON output, and
//! the processes a test leaves running in the background.

use std::path::Path;
use std::process::{Child, Command, Output};

use serde_json::Value;

use super::{netns, PERFPLUS};

/// A `perfplus` command that runs inside network namespace `netns`, or where this test runs (None).
pub fn perfplus_command(netns: Option<&str>) -> Command {
    let mut cmd = Command::new(PERFPLUS);
    if let Some(ns) = netns {
        netns::run_inside(&mut cmd, ns);
    }
    cmd
}

/// Runs the CLI (here) with the credentials in `tls_dir`.
pub fn cli_with_tls(tls_dir: &Path, args: &[&str]) -> Output {
    perfplus_command(None)
        .arg("--tls-dir")
        .arg(tls_dir)
        .args(args)
        .output()
        .expect("running perfplus")
}

/// The JSON a CLI run printed on its standard output; panics naming `what`, with the CLI's output, if
/// it failed or printed no JSON.
pub fn json_of(out: Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A process the test spawned and lets run in the background (a `migrate`, a `track`): killed by the
/// pid the test started, and reaped, if the test ends (or panics) before waiting for it.
pub struct Spawned(Option<Child>);

impl Spawned {
    pub fn new(child: Child) -> Spawned {
        Spawned(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("a spawned process not waited for yet")
    }

    /// Waits for the process to end and collects its (piped) output.
    pub fn wait_with_output(mut self) -> Output {
        self.0
            .take()
            .expect("a spawned process not waited for yet")
            .wait_with_output()
            .expect("waiting for a spawned process")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
