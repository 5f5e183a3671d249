//! Shared pieces of the end-to-end tests (and of the benchmarks, which include this module by
//! `#[path]`): real agent processes, the real CLI, a cluster CA and credentials, network namespaces
//! joined by a shaped link, and the checks every migration report must pass.
//!
//! - [`cluster`]: a temporary directory with a cluster CA; starts agents (each with its own
//!   certificate) and runs the CLI (as an operator) in it.
//! - [`agent`]: a `perfplus agent` process, on loopback or inside a network namespace.
//! - [`cli`]: the `perfplus` command, run here or inside a network namespace.
//! - [`netns`], [`link`]: network namespaces, and two of them joined by a veth pair shaped with tbf.
//! - [`guest`]: what a `vm status --json` says about the built-in guest.
//! - [`report`]: the checks of a migration report.
//!
//! Every process is started by these tests and stopped by the pid they started (never by name), and
//! every file, namespace and veth pair they create is removed when its guard is dropped, whether the
//! test passes or panics.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod guest;
pub mod link;
pub mod netns;
pub mod relay;
pub mod report;

use std::path::Path;
use std::time::{Duration, Instant};

pub use agent::TestAgent;
pub use cli::{cli_with_tls, json_of, perfplus_command, Spawned};
pub use cluster::Cluster;
pub use guest::{guest_counter, guest_is_running_and_verified, GUEST_RUNNING};
pub use link::ShapedLink;
pub use netns::Netns;
pub use relay::{Arm, Relay, Tamper};
pub use report::{assert_nothing_lost, assert_sound_report, report_u64, round_one_deferred, Expect};

pub const PERFPLUS: &str = env!("CARGO_BIN_EXE_perfplus");

/// Skips (returns true, with the reason printed) only where KVM is truly absent.
pub fn kvm_missing() -> bool {
    if Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("SKIPPED: /dev/kvm does not exist on this machine");
    true
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
