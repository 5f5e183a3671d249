//! What a `vm status --json` says about the built-in guest.

use serde_json::Value;

/// `guest.state` of a guest in its main loop (paced writes, continuous verification): the value the
/// guest publishes in its status page.
pub const GUEST_RUNNING: u32 = perfplus_common::guest_abi::state::RUNNING;

/// Whether the guest of a `vm status --json` object runs its workload and has verified its memory at
/// least once: the readiness every test waits for before it migrates or measures a guest.
pub fn guest_is_running_and_verified(status: &Value) -> bool {
    status["guest"]["state"] == GUEST_RUNNING && status["guest"]["verify_sweeps"].as_u64().unwrap_or(0) >= 1
}

/// A guest counter from a `vm status --json` object.
pub fn guest_counter(status: &Value, field: &str) -> u64 {
    status["guest"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no guest.{field}: {status}"))
}
