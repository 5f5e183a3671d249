#![allow(dead_code)] // shared by several test targets, each using a part
//! Real QEMU 7.2 processes running perfplus's built-in guest, for the tests: started with `-kernel`,
//! killed by the pid they were started with when dropped; QMP through the crate's own client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use perfplus_qemu::qmp::Qmp;

/// The guest's command line: a 16 MiB working set with every content kind (`dup` pages share 16
/// contents, so references must occur), rewritten at 5k pages/s.
pub const WORKLOAD: &str = "working-set=16M rate=5k mix=unique:40,dup:30,zero:10,same:20 seed=1";

/// A generous bound for things that take a second or two: a guard against hangs, not a timing test.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The built-in guest's image in `dir` and the host's TSC frequency (the guest's `tsc_khz=`).
pub fn guest_kernel(dir: &Path) -> (PathBuf, u32) {
    let kernel = dir.join("perfplus-guest.elf");
    std::fs::write(&kernel, perfplus_vmm::vm::builtin_guest::IMAGE).unwrap();
    let tsc_khz = perfplus_vmm::vm::Vm::create("tsc-probe", 16 << 20, 1)
        .expect("a probe VM (needs /dev/kvm)")
        .tsc_khz();
    (kernel, tsc_khz)
}

/// One QEMU process.
pub struct Qemu {
    child: Child,
    pub serial: PathBuf,
    pub qmp: PathBuf,
    stderr: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU with the guest; `incoming` waits for `migrate-incoming` (`-incoming defer`).
    pub fn start(dir: &Path, name: &str, kernel: &Path, memory_mib: u64, append: &str, incoming: bool) -> Qemu {
        let incoming = incoming.then_some("defer");
        Qemu::start_with(dir, name, kernel, memory_mib, append, incoming, |_| {})
    }

    /// Starts QEMU with the guest, `-incoming` set to `incoming` if given; `setup` may change the
    /// command first (e.g. to run it inside a network namespace, keeping its pid).
    pub fn start_with(
        dir: &Path,
        name: &str,
        kernel: &Path,
        memory_mib: u64,
        append: &str,
        incoming: Option<&str>,
        setup: impl FnOnce(&mut Command),
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
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(incoming) = incoming {
            cmd.args(["-incoming", incoming]);
        }
        setup(&mut cmd);
        let child = cmd
            .spawn()
            .expect("starting qemu-system-x86_64 (Debian's qemu-system-x86)");
        Qemu {
            child,
            serial,
            qmp,
            stderr,
        }
    }

    /// Connects to its QMP socket (QEMU creates it shortly after starting).
    pub async fn qmp(&mut self) -> Qmp {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Qmp::connect(&self.qmp).await {
                Ok(qmp) => return qmp,
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("QEMU exited ({status}): {}", self.stderr());
                    }
                    assert!(Instant::now() < deadline, "QMP at {}: {e}", self.qmp.display());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The pid it was started with.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the guest's console contains `needle`.
    pub async fn wait_for_console(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.console();
            if text.contains(needle) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}): {}\nconsole:\n{text}", self.stderr());
            }
            assert!(Instant::now() < deadline, "the guest never printed {needle:?}:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for two more progress lines of the guest and returns the last one: the guest re-verifies
    /// its pages continuously and counts mismatches there.
    pub async fn next_progress_lines(&mut self) -> String {
        let progress = |text: &str| text.lines().filter(|l| l.contains("max_stall=")).count();
        let before = progress(&self.console());
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.console();
            if progress(&text) >= before + 2 {
                return text
                    .lines()
                    .rev()
                    .find(|l| l.contains("max_stall="))
                    .unwrap()
                    .to_string();
            }
            assert!(Instant::now() < deadline, "the guest printed no progress:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `query-migrate` until the migration leaves its running states; returns the last reply.
pub async fn wait_migration(qmp: &mut Qmp) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = qmp.query_migrate().await.unwrap();
        match info["status"].as_str() {
            Some("completed") | Some("failed") | Some("cancelled") => return info,
            _ => {
                assert!(Instant::now() < deadline, "migration still running: {info}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A field `name=123` of a guest progress line.
pub fn field(line: &str, name: &str) -> u64 {
    let start = line.find(name).unwrap_or_else(|| panic!("no {name} in {line:?}")) + name.len();
    line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}
