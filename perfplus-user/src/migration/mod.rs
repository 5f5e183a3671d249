//! The migration engine: the source's pre-copy rounds ([`source`]) and the destination's receiver
//! ([`receiver`]). Both speak [`perfplus_protocol::Message`]s over one authenticated connection.
//!
//! The CPU an agent spends on a migration is its process CPU time minus that of its vCPU threads (the
//! guests' own work): see [`agent_cpu_ms`].

pub mod convergence;
pub mod outbound;
pub mod page_sender;
pub mod page_sink;
pub mod postcopy;
pub mod receiver;
pub mod signals;
pub mod source;

pub use outbound::Outbound;

use std::time::Duration;

/// How long either side waits for the other's next message before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of the names of vCPU threads (see `vm`): their CPU time is the guest's, not the agent's.
pub const VCPU_THREAD_PREFIX: &str = "vcpu";

/// Nice value of the work done after a switch-over (checksums of the source's pages, archiving, the
/// teardown of a VM that left): below the vCPU threads (`perfplus_vmm::vm::VCPU_NICE`) and the agent
/// (nice 0) without starving (a guest's busy vCPU would starve an idle-class thread on a loaded host).
pub const AFTER_SWITCH_NICE: libc::c_int = 10;

/// Runs `f` on this thread at [`AFTER_SWITCH_NICE`], then puts the thread's nice value back. For
/// blocking work that must not take the CPU from guests (call it inside `spawn_blocking`).
pub fn at_low_priority<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: getpriority/setpriority on this thread's id with PRIO_PROCESS (per thread on Linux) have
    // no memory-safety preconditions; errno is cleared first, as -1 is a valid nice value.
    let before = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    // SAFETY: as above.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, AFTER_SWITCH_NICE) };
    let result = f();
    // SAFETY: as above; lowering the nice value back needs CAP_SYS_NICE, which the agent (root) has.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, before) } != 0 {
        tracing::warn!(
            "could not restore a blocking thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
    result
}

/// CPU time (user + system) this process has used outside its vCPU threads, in milliseconds.
pub fn agent_cpu_ms() -> f64 {
    process_cpu_ms() - vcpu_threads_cpu_ms()
}

fn process_cpu_ms() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage and RUSAGE_SELF is a valid target.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn vcpu_threads_cpu_ms() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ...": comm may contain spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(VCPU_THREAD_PREFIX) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the comm: state is field 3 of the full line, utime 14 and stime 15.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (field(14) + field(15)) / ticks * 1e3;
    }
    total
}
