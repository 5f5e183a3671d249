#![allow(dead_code)] // shared by several bench targets, each using a part
//! The peer: the same built-in guest, live-migrated by QEMU (Debian's qemu-system-x86) between two
//! QEMU processes on this machine, driven over QMP.
//!
//! QEMU's own figures come from `query-migrate` (total time, downtime, bytes transferred, dirty-sync
//! rounds); the guest's own longest stall is read from the destination's serial console, where the
//! guest prints `max_stall=…us` every second (QEMU cannot reset the guest's stall counter as the
//! perfplus agent does, so it is the longest stall since the guest's workload started: boot stalls do
//! not count, and a quiet guest's normal stalls are far below a migration's).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What one QEMU migration measured.
pub struct QemuRun {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes: f64,
    pub rounds: f64,
    pub guest_stall_ms: f64,
    pub mismatches: u64,
}

/// One QEMU process, killed (by the pid it was started with) and reaped when dropped.
pub struct Qemu {
    child: Child,
    /// The guest's RAM (`-m`), to find it in the process.
    memory_bytes: u64,
    serial: PathBuf,
    qmp: PathBuf,
    stderr: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The built-in guest's image written to `dir` (QEMU boots it with `-kernel`), and this host's TSC
/// frequency in kHz (the guest needs it on its command line, `tsc_khz=`, to measure time).
pub fn guest_kernel(dir: &Path) -> (PathBuf, u32) {
    let kernel = dir.join("perfplus-guest.elf");
    std::fs::write(&kernel, perfplus_vmm::vm::builtin_guest::IMAGE).unwrap();
    let tsc_khz = perfplus_vmm::vm::Vm::create("tsc-probe", 16 << 20, 1)
        .expect("a probe VM")
        .tsc_khz();
    (kernel, tsc_khz)
}

pub fn available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Starts QEMU `name` (its console, QMP socket and stderr in `dir`) with the built-in guest `kernel`,
/// inside `netns` if given; with `incoming` (`defer`, `tcp:…`, `unix:…`) it waits for a migration.
pub fn start(
    dir: &Path,
    name: &str,
    kernel: &Path,
    memory_mib: u64,
    append: &str,
    incoming: Option<&str>,
    netns: Option<&str>,
) -> Qemu {
    let serial = dir.join(format!("{name}.serial"));
    let qmp = dir.join(format!("{name}.qmp"));
    let stderr = dir.join(format!("{name}.stderr"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-enable-kvm", "-display", "none", "-no-reboot", "-m"])
        .arg(memory_mib.to_string())
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("QEMU stderr file"));
    if let Some(incoming) = incoming {
        cmd.args(["-incoming", incoming]);
    }
    if let Some(ns) = netns {
        crate::support::netns::run_inside(&mut cmd, ns);
    }
    let child = cmd.spawn().expect("starting qemu-system-x86_64");
    Qemu {
        child,
        memory_bytes: memory_mib << 20,
        serial,
        qmp,
        stderr,
    }
}

/// What the guest says on its console after a migration: its self-check and its own longest stall.
pub struct Verdict {
    pub mismatches: u64,
    pub guest_stall_ms: f64,
}

impl Qemu {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its QMP socket (QEMU serves one client at a time: let go of a [`Qmp`] before another needs it).
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// A QMP session with it.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// CPU time (user + system, ms) of the process so far, vCPU thread included.
    pub fn cpu_ms(&self) -> f64 {
        process_cpu_ms(self.child.id())
    }

    /// Waits until the guest runs its workload (its console says so).
    pub fn wait_running(&self) {
        wait_for_console(&self.serial, "; running", Duration::from_secs(120));
    }

    /// Panics with its stderr if the process has exited (`what`: when).
    pub fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            panic!("QEMU {} exited ({status}) {what}:\n{stderr}", self.qmp.display());
        }
    }

    /// Waits until the guest has verified all of its memory twice more (its status page, read out of
    /// this process's RAM the way the felt probe reads it) and returns its counters: the guest
    /// re-verifies every page it wrote continuously, so after a migration this is the destination's
    /// self-check. Does not depend on the console (the guest may run with `progress=off`).
    pub fn verdict(&self) -> Verdict {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        let counters = || super::felt::guest_counters(pid, self.memory_bytes);
        let first = loop {
            if let Some(c) = counters() {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the migrated QEMU guest's status page is not readable"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let last = loop {
            let c = counters().unwrap_or(first);
            if c.verify_sweeps >= first.verify_sweeps + 2 {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the migrated QEMU guest did not verify its memory twice in 20 s: {c:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            last.state,
            perfplus_common::guest_abi::state::RUNNING,
            "the migrated QEMU guest does not run: {last:?}"
        );
        Verdict {
            mismatches: last.mismatches,
            guest_stall_ms: last.max_stall_ms,
        }
    }
}

/// A blocking QMP client, enough for a bench.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        qmp.read(); // greeting
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let value: Value = serde_json::from_str(&line).expect("QMP JSON");
            if value.get("event").is_none() {
                return value;
            }
        }
    }

    /// Runs `command`; panics on a QMP error. Its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").unwrap();
        let reply = self.read();
        assert!(reply.get("error").is_none(), "QMP {command}: {reply}");
        reply["return"].clone()
    }
}

fn wait_for_console(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU guest never printed {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How QEMU migrates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QemuMode {
    /// Pre-copy with this downtime limit (ms), one channel, no compression.
    Precopy { downtime_limit_ms: u64 },
    /// Pre-copy with multifd (2 channels) and zstd compression, the choice of a QEMU user on a slow link.
    MultifdZstd { downtime_limit_ms: u64 },
    /// Post-copy: pre-copy's first pass, then `migrate-start-postcopy`.
    Postcopy,
}

/// Where the two QEMUs run and how they talk.
pub struct Placement<'a> {
    pub source_netns: Option<&'a str>,
    pub destination_netns: Option<&'a str>,
    /// The destination's address as the source reaches it.
    pub destination_ip: &'a str,
    pub port: u16,
}

impl Placement<'_> {
    pub fn loopback(port: u16) -> Placement<'static> {
        Placement {
            source_netns: None,
            destination_netns: None,
            destination_ip: "127.0.0.1",
            port,
        }
    }
}

/// A source QEMU running the guest and a destination QEMU waiting for it.
pub struct QemuPair {
    source: Qemu,
    destination: Qemu,
    dir: tempfile::TempDir,
}

impl QemuPair {
    /// Boots the guest under a source QEMU (waits until its workload runs) and starts the destination.
    pub fn start(kernel: &Path, memory_mib: u64, append: &str, placement: &Placement) -> QemuPair {
        let dir = tempfile::tempdir().unwrap();
        let source = start(
            dir.path(),
            "source",
            kernel,
            memory_mib,
            append,
            None,
            placement.source_netns,
        );
        let destination = start(
            dir.path(),
            "destination",
            kernel,
            memory_mib,
            append,
            // Capabilities (multifd) must be set on the destination before it listens.
            Some("defer"),
            placement.destination_netns,
        );
        wait_for_console(&source.serial, "; running", Duration::from_secs(120));
        QemuPair {
            source,
            destination,
            dir,
        }
    }

    /// After a completed migration, readies the trip back: stops the old source (paused since the
    /// switch; killed by the pid it was started with), starts a new QEMU (`-incoming defer`, the same
    /// `kernel`, memory and `append` as the pair) in `netns`, where the old source ran, and swaps the
    /// roles: the running QEMU is the source now, the new one the destination, so that
    /// [`QemuPair::migrate`] (with the placement of the way back) brings the guest back. QEMU has no
    /// memory of the guest it sent away: the new destination starts empty.
    pub fn turn_around(&mut self, kernel: &Path, memory_mib: u64, append: &str, netns: Option<&str>) {
        let back = start(
            self.dir.path(),
            "back",
            kernel,
            memory_mib,
            append,
            Some("defer"),
            netns,
        );
        let running = std::mem::replace(&mut self.destination, back);
        drop(std::mem::replace(&mut self.source, running));
    }

    /// The pids of the source and the destination QEMU.
    pub fn pids(&self) -> (u32, u32) {
        (self.source.child.id(), self.destination.child.id())
    }

    /// CPU time (user + system, ms) of both QEMU processes so far.
    pub fn cpu_ms(&self) -> (f64, f64) {
        (
            process_cpu_ms(self.source.child.id()),
            process_cpu_ms(self.destination.child.id()),
        )
    }

    /// Migrates the guest in `mode` and waits for `completed`; then lets the guest print two more
    /// progress lines on the destination and returns what QEMU and the guest measured.
    pub fn migrate(&mut self, mode: QemuMode, placement: &Placement) -> QemuRun {
        let mut src = Qmp::connect(&self.source.qmp);
        let mut dst = Qmp::connect(&self.destination.qmp);
        let (downtime_limit_ms, multifd, postcopy) = match mode {
            QemuMode::Precopy { downtime_limit_ms } => (downtime_limit_ms, false, false),
            QemuMode::MultifdZstd { downtime_limit_ms } => (downtime_limit_ms, true, false),
            QemuMode::Postcopy => (300, false, true),
        };
        for qmp in [&mut src, &mut dst] {
            let mut caps = vec![];
            if multifd {
                caps.push(json!({"capability": "multifd", "state": true}));
            }
            if postcopy {
                caps.push(json!({"capability": "postcopy-ram", "state": true}));
            }
            if !caps.is_empty() {
                qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }));
            }
            if multifd {
                qmp.execute(
                    "migrate-set-parameters",
                    json!({ "multifd-channels": 2, "multifd-compression": "zstd" }),
                );
            }
        }
        let uri = format!("tcp:{}:{}", placement.destination_ip, placement.port);
        let listen = format!("tcp:0.0.0.0:{}", placement.port);
        dst.execute("migrate-incoming", json!({ "uri": listen }));
        src.execute(
            "migrate-set-parameters",
            json!({ "downtime-limit": downtime_limit_ms, "max-bandwidth": 10u64 << 30 }),
        );
        src.execute("migrate", json!({ "uri": uri }));
        let mut switched = false;
        let info = wait_migration(&mut src, &mut self.destination, |src, info| {
            if postcopy && !switched && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
                // After the first full pass, as a QEMU user switching to post-copy would.
                src.execute("migrate-start-postcopy", json!({}));
                switched = true;
            }
        });
        read_guest_verdict(&self.destination, info)
    }
}

/// Longest a QEMU migration of the benches may take.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(300);

/// Polls the source's `query-migrate` every 20 ms until `completed` (panics if the migration fails
/// or the destination exits), calling `during` with each reply before that; the last reply.
pub fn wait_migration(src: &mut Qmp, destination: &mut Qemu, mut during: impl FnMut(&mut Qmp, &Value)) -> Value {
    // A pre-copy that cannot converge would run for ever: the bench stops there, saying so.
    let deadline = Instant::now() + MIGRATION_PATIENCE;
    loop {
        destination.check_alive("during the migration");
        if Instant::now() > deadline {
            let info = src.execute("query-migrate", json!({}));
            let _ = src.execute("migrate_cancel", json!({}));
            panic!("QEMU's migration did not complete within {MIGRATION_PATIENCE:?} (it cannot converge?): {info}");
        }
        let info = src.execute("query-migrate", json!({}));
        match info["status"].as_str() {
            Some("completed") => return info,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {info}"),
            _ => {
                during(src, &info);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// QEMU's own migration, as a QEMU user runs it: `parameters` (`migrate-set-parameters`) on the
/// source, `migrate` to `uri` (where `destination` waits with `-incoming`), until `completed`; the
/// source's last `query-migrate`. Both QMP sessions are closed when it returns.
pub fn migrate_plain(source: &Qemu, destination: &mut Qemu, uri: &str, parameters: Value) -> Value {
    let mut src = source.qmp();
    src.execute("migrate-set-parameters", parameters);
    src.execute("migrate", json!({ "uri": uri }));
    wait_migration(&mut src, destination, |_, _| {})
}

/// CPU time (user + system) of process `pid`, in milliseconds.
pub fn process_cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(close) = stat.rfind(')') else { return f64::NAN };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(14) + field(15)) / ticks * 1e3
}

/// Boots the guest under QEMU, lets it run, migrates it to a second QEMU with `downtime_limit_ms`,
/// and returns what both QEMU and the guest measured.
pub fn migrate(kernel: &Path, memory_mib: u64, append: &str, downtime_limit_ms: u64, port: u16) -> QemuRun {
    let placement = Placement::loopback(port);
    let mut pair = QemuPair::start(kernel, memory_mib, append, &placement);
    std::thread::sleep(Duration::from_secs(2));
    pair.migrate(QemuMode::Precopy { downtime_limit_ms }, &placement)
}

/// What the guest says on the destination's console after the migration, with QEMU's `info`.
fn read_guest_verdict(destination: &Qemu, info: Value) -> QemuRun {
    let verdict = destination.verdict();
    QemuRun {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        guest_stall_ms: verdict.guest_stall_ms,
        mismatches: verdict.mismatches,
    }
}
