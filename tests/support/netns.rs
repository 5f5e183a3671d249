//! Network namespaces made by a test, and commands run inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

/// A network namespace (`ip netns add`), deleted when dropped. The namespace itself goes away once
/// the last process in it has ended: drop (kill) the agents started in it too.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name`. Err (with the reason) where namespaces cannot be made here; panics
    /// if one of that name exists already (left over by another run: a test never shares one).
    pub fn create(name: &str) -> Result<Netns, String> {
        let out = ip(&["netns", "add", name]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            assert!(
                !err.contains("File exists"),
                "network namespace {name} exists already (left over by another run?): {err}"
            );
            return Err(format!("ip netns add {name} failed: {err}"));
        }
        Ok(Netns { name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Makes `cmd` run inside network namespace `name` (its child joins it before `exec`), with the same
/// pid: the process a test starts is the one it stops.
pub fn run_inside(cmd: &mut Command, name: &str) {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("network namespace {name} ({path}): {e}"));
    // SAFETY: between fork and exec the child only makes the setns system call, on a descriptor the
    // closure owns (opened with O_CLOEXEC, so the new program does not inherit it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("running ip")
}

/// Runs a network command (`args[0]` with the rest) and panics, with its error, if it fails.
pub fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
