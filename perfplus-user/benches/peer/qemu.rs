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

struct Qemu {
    child: Child,
    serial: PathBuf,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start(dir: &Path, name: &str, kernel: &Path, memory_mib: u64, append: &str, incoming: Option<u16>) -> Qemu {
    let serial = dir.join(format!("{name}.serial"));
    let qmp = dir.join(format!("{name}.qmp"));
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
        .stderr(Stdio::null());
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    let child = cmd.spawn().expect("starting qemu-system-x86_64");
    Qemu { child, serial, qmp }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
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

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
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

/// Boots the guest under QEMU, lets it run, migrates it to a second QEMU with `downtime_limit_ms`,
/// and returns what both QEMU and the guest measured.
pub fn migrate(kernel: &Path, memory_mib: u64, append: &str, downtime_limit_ms: u64, port: u16) -> QemuRun {
    let dir = tempfile::tempdir().unwrap();
    let source = start(dir.path(), "source", kernel, memory_mib, append, None);
    let destination = start(dir.path(), "destination", kernel, memory_mib, append, Some(port));
    wait_for_console(&source.serial, "; running", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let mut qmp = Qmp::connect(&source.qmp);
    qmp.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": downtime_limit_ms, "max-bandwidth": 10u64 << 30 }),
    );
    qmp.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
    let info = loop {
        let info = qmp.execute("query-migrate", json!({}));
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {info}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // Let the guest print two more progress lines on the destination.
    let before = std::fs::read_to_string(&destination.serial)
        .unwrap_or_default()
        .lines()
        .count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&destination.serial)
        .unwrap_or_default()
        .lines()
        .count()
        < before + 2
    {
        assert!(Instant::now() < deadline, "the migrated QEMU guest printed nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = std::fs::read_to_string(&destination.serial).unwrap_or_default();
    let last = console
        .lines()
        .rev()
        .find(|l| l.contains("max_stall="))
        .expect("a progress line")
        .to_string();
    let field = |name: &str| -> u64 {
        let start = last.find(name).unwrap_or_else(|| panic!("no {name} in {last:?}")) + name.len();
        last[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    QemuRun {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        guest_stall_ms: field("max_stall=") as f64 / 1000.0,
        mismatches: field("mismatches="),
    }
}
