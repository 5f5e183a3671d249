//! `perfplus track` end to end: real eBPF programs in this kernel (root), a real agent and guest.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{kvm_missing, Cluster, Spawned, PERFPLUS};

const PAGE: usize = 4096;

/// eBPF needs root here; skips (with the reason printed) only where it is truly absent.
fn ebpf_missing() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: eBPF tracking needs root and this test runs as another user");
        return true;
    }
    false
}

/// The regions `perfplus track` sums its hottest addresses over.
const REGION: u64 = 2 << 20;

/// A child process that writes one byte to each of `pages` pages, in order, then drops them with
/// `MADV_DONTNEED` (so that the next write faults again: a write fault happens on the first write to
/// a non-present page, not on every store) and sleeps 20 ms; `rounds` times, once told to start. So
/// it makes exactly `pages × rounds` write faults on those pages, and they come in the order page 0,
/// 1, …, `pages - 1`, 0, 1, … Its pages are the first of a 2 MiB region that holds nothing else, so
/// every write fault in that region is one of these. Its few other faults (copy-on-write of its stack
/// and data after fork) come before it says it is ready, as far as it can make them.
struct Writer {
    pid: libc::pid_t,
    /// The 2 MiB region that holds the writer's pages.
    region: u64,
    /// The parent's end of the pipe that tells the writer to start.
    go: File,
    /// The parent's end of the pipe on which the writer says it is ready, then done.
    said: File,
    reaped: bool,
}

/// A pipe whose ends are closed on exec (the other processes this test starts do not hold them).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which are then owned here.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

impl Writer {
    /// Forks the writer and waits until it is ready; it writes nothing before [`Writer::start`].
    fn spawn(pages: usize, rounds: usize) -> Writer {
        assert!(pages * PAGE <= REGION as usize);
        // Twice a region, so that a whole aligned region lies inside the mapping.
        let len = 2 * REGION as usize;
        // SAFETY: a fresh anonymous private mapping; nothing else is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        // One fault per 4 KiB page, whatever the machine's transparent huge page setting.
        // SAFETY: advice on the mapping just made.
        assert_eq!(unsafe { libc::madvise(map, len, libc::MADV_NOHUGEPAGE) }, 0);
        let region = (map as u64 + REGION - 1) & !(REGION - 1);
        let base = region as *mut u8;
        let (go_read, go_write) = pipe();
        let (said_read, said_write) = pipe();
        let (go_fd, said_fd) = (go_read.as_raw_fd(), said_write.as_raw_fd());
        // SAFETY: the child makes only raw system calls and stores into the mapping (no allocation,
        // no locks), which is what a child of a multi-threaded process may do; it never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let nap = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            let no_nap = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            let mut byte = 0u8;
            let one = (&raw mut byte).cast::<libc::c_void>();
            // SAFETY: every store is inside the region, which lies inside the mapping; the other
            // calls get valid arguments. Before saying "ready", the calls of the loop are made once
            // (no page of the region is present yet, so MADV_DONTNEED drops nothing): whatever they
            // fault in is faulted before the tracking starts.
            unsafe {
                libc::madvise(base.cast(), pages * PAGE, libc::MADV_DONTNEED);
                libc::nanosleep(&no_nap, std::ptr::null_mut());
                if libc::write(said_fd, one, 1) != 1 || libc::read(go_fd, one, 1) != 1 {
                    libc::_exit(1);
                }
                for _ in 0..rounds {
                    for page in 0..pages {
                        std::ptr::write_volatile(base.add(page * PAGE), 1);
                    }
                    libc::madvise(base.cast(), pages * PAGE, libc::MADV_DONTNEED);
                    libc::nanosleep(&nap, std::ptr::null_mut());
                }
                libc::write(said_fd, one, 1);
                loop {
                    libc::pause();
                }
            }
        }
        // SAFETY: the parent never uses its copy of the mapping.
        unsafe { libc::munmap(map, len) };
        // The child's ends: closed here, so that reading `said` ends if the child dies.
        drop((go_read, said_write));
        let mut writer = Writer {
            pid,
            region,
            go: File::from(go_write),
            said: File::from(said_read),
            reaped: false,
        };
        writer.hear("ready");
        writer
    }

    /// Waits for the writer's next byte; panics if it died instead.
    fn hear(&mut self, what: &str) {
        let mut byte = [0u8; 1];
        assert_eq!(
            self.said.read(&mut byte).expect("reading from the writer"),
            1,
            "the writer died before it was {what}"
        );
    }

    /// Lets the writer make its rounds.
    fn start(&mut self) {
        self.go.write_all(b"g").expect("starting the writer");
    }

    /// Waits until the writer made all its write faults.
    fn wait_done(&mut self) {
        self.hear("done");
    }

    /// Kills the writer (by the pid this test forked) and reaps it; once.
    fn kill(&mut self) {
        if !self.reaped {
            self.reaped = true;
            // SAFETY: the pid of the child this struct forked, not reaped yet.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The standard output of a running `perfplus track --json`, read as it comes.
struct TrackOutput {
    stdout: ChildStdout,
    bytes: Vec<u8>,
}

impl TrackOutput {
    /// Complete lines read so far.
    fn lines(&self) -> usize {
        self.bytes.iter().filter(|&&b| b == b'\n').count()
    }

    /// Reads until `n` lines are complete; panics if the output ends first.
    fn read_lines(&mut self, n: usize) {
        let mut buf = [0u8; 4096];
        while self.lines() < n {
            let got = self.stdout.read(&mut buf).expect("reading track's output");
            assert!(
                got > 0,
                "track ended after {} lines, {n} expected: {}",
                self.lines(),
                String::from_utf8_lossy(&self.bytes)
            );
            self.bytes.extend_from_slice(&buf[..got]);
        }
    }

    /// Reads what track has printed by now, without waiting for more.
    fn read_printed(&mut self) {
        let mut pending: libc::c_int = 0;
        // SAFETY: FIONREAD stores the number of bytes the pipe holds into `pending`.
        let rc = unsafe { libc::ioctl(self.stdout.as_raw_fd(), libc::FIONREAD, &raw mut pending) };
        assert_eq!(rc, 0, "FIONREAD on track's output");
        let mut printed = vec![0u8; usize::try_from(pending).unwrap()];
        self.stdout.read_exact(&mut printed).expect("reading track's output");
        self.bytes.extend_from_slice(&printed);
    }

    fn read_to_end(&mut self) {
        self.stdout
            .read_to_end(&mut self.bytes)
            .expect("reading track's output");
    }
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect()
}

/// The verdict of an interval follows from the interval's own numbers: its working set per second
/// against the link, below half of it "converges". `interval_s` is rounded to 1 ms, so a share
/// within that rounding of a threshold could go either way; it is not checked.
fn assert_verdict_follows(s: &Value) {
    let ws = s["working_set_pages"].as_f64().unwrap();
    let secs = s["interval_s"].as_f64().unwrap();
    let link = s["link_pages_per_s"].as_f64().unwrap();
    let verdict = s["verdict"].as_str().unwrap();
    let most = ws / (secs - 0.0005).max(1e-9) / link;
    let least = ws / (secs + 0.0005) / link;
    if most < 0.5 {
        assert!(verdict.starts_with("converges:"), "{s}");
    } else if least >= 0.5 && most < 1.0 {
        assert!(verdict.starts_with("converges slowly"), "{s}");
    } else if least >= 1.0 {
        assert!(verdict.starts_with("will not converge"), "{s}");
    }
}

/// The eBPF tracker counts every write fault of a process exactly once, wherever the interval
/// boundaries fall: a writer of known faults starts once tracking is on and stops before it ends;
/// the intervals add up to its faults, and each interval is consistent with a run of its sequence.
#[test]
fn track_pid_reports_the_working_set_of_a_known_writer() {
    if ebpf_missing() {
        return;
    }
    const PAGES: u64 = 300;
    const ROUNDS: u64 = 20;
    // Faults of the writer outside its region (copy-on-write after fork), at most.
    const OTHERS: u64 = 16;
    let mut writer = Writer::spawn(PAGES as usize, ROUNDS as usize);
    // Short intervals, so that the writer's rounds cross several boundaries; --seconds is only a
    // ceiling: track ends at the first interval after the writer is gone.
    let mut track = Spawned::new(
        Command::new(PERFPLUS)
            .args(["track", "--pid", &writer.pid.to_string()])
            .args(["--interval", "100ms", "--seconds", "60", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus track"),
    );
    let mut out = TrackOutput {
        stdout: track.child().stdout.take().unwrap(),
        bytes: Vec::new(),
    };
    // Interval 1 ends after the program is attached: only then does the writer start.
    out.read_lines(1);
    writer.start();
    writer.wait_done();
    // Every line not complete in the pipe now is completed after the writer's last fault, and track
    // starts an interval only after it printed the previous one: the interval of the second such
    // line begins after that fault, so the lines up to it report every fault.
    out.read_printed();
    let printed = out.lines();
    out.read_lines(printed + 2);
    // Now the writer goes; track notices at its next interval and ends.
    writer.kill();
    out.read_to_end();
    let finished = track.wait_with_output();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );

    let samples = json_lines(&out.bytes);
    assert!(samples.len() > printed + 2, "{samples:?}");
    assert_eq!(
        samples.last().unwrap()["note"],
        format!("process {} exited", writer.pid),
        "{samples:?}"
    );
    // Per interval: the writer's faults (its region) and the distinct pages they hit. The pages and
    // the hottest regions of an interval are its generation of the per-page map; `ebpf_events` (and
    // `dirty_pages`) count the faults since the previous interval's counter read, which comes a little
    // after that interval's switch: intervals agree on totals, not one by one.
    let writer_runs: Vec<(u64, u64)> = samples
        .iter()
        .map(|s| {
            s["hottest"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["addr"] == writer.region)
                .map_or((0, 0), |r| {
                    (r["writes"].as_u64().unwrap(), r["pages"].as_u64().unwrap())
                })
        })
        .collect();
    let writer_faults: u64 = writer_runs.iter().map(|&(writes, _)| writes).sum();
    let events: u64 = samples.iter().map(|s| s["ebpf_events"].as_u64().unwrap()).sum();
    assert_eq!(
        writer_faults,
        ROUNDS * PAGES,
        "every write fault of the writer counted once: {samples:?}"
    );
    assert!(
        events >= writer_faults,
        "the fault counter saw at least the writer's {writer_faults} faults: {samples:?}"
    );
    let others = events - writer_faults;
    assert!(
        others <= OTHERS,
        "{others} faults outside the writer's region: {samples:?}"
    );
    for (i, (s, &(writes, pages))) in samples.iter().zip(&writer_runs).enumerate() {
        assert_eq!(s["interval"], i as u64 + 1);
        assert_eq!(s["source"], "ebpf");
        assert_eq!(s["dirty_pages"], s["ebpf_events"], "{s}");
        if i == 0 {
            assert_eq!(writes, 0, "the writer starts after interval 1: {s}");
        }
        // Whatever part of the writer's sequence an interval holds, it holds a run of it, and a run
        // of n faults hits min(n, PAGES) distinct pages.
        assert_eq!(pages, writes.min(PAGES), "a run of the writer's faults: {s}");
        let ws = s["working_set_pages"].as_u64().unwrap();
        assert!(
            (pages..=pages + others).contains(&ws),
            "working set {ws}: the writer's {pages} pages and at most {others} others: {s}"
        );
        // Other regions have at most `others` writes: so the writer's region is listed whenever it
        // has writes, and it is the hottest when it has more.
        if writes > others {
            let top = s["hottest"][0]["addr"].as_u64().unwrap();
            assert_eq!(top, writer.region, "the writer's region is the hottest: {s}");
        }
        assert_verdict_follows(s);
    }
}

#[test]
fn track_pid_of_a_missing_process_fails_clearly() {
    let out = Command::new(PERFPLUS)
        .args(["track", "--pid", "999999999", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no process with pid 999999999"), "{err}");
}

#[test]
fn track_pid_without_root_says_it_needs_root() {
    if ebpf_missing() {
        return;
    }
    if !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED: setpriv (util-linux) is absent, cannot drop root for this test");
        return;
    }
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .args([PERFPLUS, "track", "--pid", "1", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn track_vm_reports_the_guest_dirty_rate_and_blocks_migration() {
    if kvm_missing() || ebpf_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    // A large working set: random writes rarely hit the same page twice within a second, so the
    // distinct dirty pages per second are close to the guest's own write rate (2000/s).
    cluster.start_guest(&a, "tracked", "512M", "dirtier:working-set=256M,rate=2k");
    let track = Spawned::new(
        cluster
            .command_in(
                None,
                &[
                    "track",
                    "--vm",
                    "tracked",
                    "--agent",
                    &a.addr,
                    "--seconds",
                    "4",
                    "--json",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus track"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    // The VM's dirty log is in use: a migration is refused meanwhile, and the VM keeps running.
    let migrate = cluster.cli(&["migrate", "tracked", "--from", &a.addr, "--to", &b.addr]);
    assert!(!migrate.status.success());
    let err = String::from_utf8_lossy(&migrate.stderr);
    assert!(err.contains("being tracked"), "{err}");

    let out = track.wait_with_output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let samples = json_lines(&out.stdout);
    assert_eq!(samples.len(), 4, "{samples:?}");
    for s in &samples[1..] {
        assert_eq!(s["source"], "dirty-log");
        let rate = s["dirty_rate_pages_per_s"].as_f64().unwrap();
        let guest = s["guest_write_rate_pages_per_s"].as_f64().unwrap();
        // The guest's own counter, plus its bookkeeping pages (version table, status page).
        assert!(
            (guest * 0.9..guest * 1.15).contains(&rate),
            "dirty rate {rate} vs guest {guest}: {s}"
        );
        // It paces itself at 2000/s (1700-2300 measured on a quiet machine); a loaded machine runs
        // it less, which the comparison above follows: here only that it wrote.
        assert!(guest > 0.0, "the guest wrote nothing: {s}");
        assert_eq!(s["working_set_pages"], s["dirty_pages"]);
        // Bitmap mode: the dirty-ring program is attached but sees nothing.
        assert_eq!(s["ebpf_events"], 0, "{s}");
        assert!(!s["hottest"].as_array().unwrap().is_empty());
    }
    // Tracking ended: the VM still runs and can now migrate (not done here: a plain status check).
    let status = cluster.status(&a, "tracked");
    assert_eq!(status["run_state"], "running");
}
