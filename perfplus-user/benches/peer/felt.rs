#![allow(dead_code)] // shared by several bench targets, each using a part
//! The stall the guest feels, measured from outside and the same way for every hypervisor: a thread
//! per process reads the built-in guest's heartbeat (a counter its main loop bumps every iteration, in its status
//! page) straight out of the guest RAM of every process that may hold the guest (source and
//! destination), about every 0.5 ms, with `process_vm_readv`. The guest makes progress when the highest
//! heartbeat of all copies grows; the felt stall is the longest time it did not. A paused source copy
//! keeps its last value, so the running copy is always the one that counts.
//!
//! Guest RAM is found in `/proc/PID/maps`: perfplus maps it from a memfd named `perfplus-guest-ram`,
//! QEMU from an anonymous mapping of the guest's RAM size; either way the candidate is accepted only
//! if the status page's magic is where it should be. The maps are scanned again every 50 ms (the
//! destination's RAM appears during the migration, the source's goes away after it), and every
//! millisecond while the guest makes no progress and a process has no RAM found yet: a post-copy
//! switch comes a few ms after the destination created the guest's RAM, and a probe that found it
//! only at its next regular scan saw a stall of up to 50 ms that the guest never had.
//!
//! The scans run on a thread of their own, and each process is sampled by a thread of its own:
//! reading `/proc/PID/maps`, or the RAM of a process, waits while that process changes its mappings (a
//! destination creating the guest's RAM, a source unmapping it after the migration), and one thread
//! waiting there for one process saw 12-50 ms stalls at those moments that the guest's own clock did
//! not see (its heartbeat was moving in the other process all along).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use perfplus_common::guest_abi::{StatusPage, STATUS_MAGIC, STATUS_PAGE_GPA};

/// What the probe saw.
#[derive(Clone, Debug, Default)]
pub struct Felt {
    /// Every stall over 10 ms: (start, length), in ms since the probe started.
    pub stalls: Vec<(f64, f64)>,
    /// Longest time without progress, in milliseconds.
    pub max_stall_ms: f64,
    /// When that stall began, in milliseconds since the probe started.
    pub stall_at_ms: f64,
    /// Samples taken, and the longest gap between two samples (the resolution actually achieved).
    pub samples: u64,
    pub max_sample_gap_ms: f64,
    /// Time a sampler could not see (a read that blocked over 2 ms on its process: one changing its
    /// memory map, a destination QEMU busy loading RAM at the switch), summed over the samplers: taken
    /// out of a stall it falls in when it was the process that then showed progress, so the figure is
    /// a lower bound there.
    pub blind_ms: f64,
    /// When the probe started (wall clock), to line its times up with the agents' logs.
    pub started_at: Option<std::time::SystemTime>,
}

/// A running probe; [`FeltProbe::finish`] stops it and returns what it saw.
pub struct FeltProbe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Felt>,
}

/// Makes the calling thread real-time (SCHED_FIFO at `priority`), so that it wakes on time whatever
/// else runs (the machine has two cores): a probe that is not scheduled sees nothing. Best effort:
/// without the privilege it runs as it is.
fn realtime(priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let mut value = 0u64;
    let local = libc::iovec {
        iov_base: (&mut value as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` describes 8 writable bytes of `value`, which outlives the call; the remote
    // address is only read by the kernel, which checks it against the target's address space.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    (n == 8).then_some(value)
}

/// Whether the page at `addr` in `pid` is present in its page tables (`/proc/PID/pagemap`, bit 63).
/// The probe reads only present pages: reading a missing page of a post-copy destination would
/// populate it behind the hypervisor's back (QEMU 7.2 then fails the migration with `postcopy_place_page:
/// File exists`).
fn page_present(pagemap: &std::fs::File, addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, addr / 4096 * 8).is_ok() && u64::from_le_bytes(entry) >> 63 == 1
}

/// Guest RAM found in a process: the address of guest-physical 0, and whether reads must be limited to
/// present pages (anonymous memory, QEMU's: a read of a missing post-copy page there populates it
/// behind QEMU's back. perfplus maps its memfd twice, the agent's view first and the guest's view,
/// which post-copy registers with userfaultfd; the probe reads the first, which never waits: the
/// heartbeat's page travels with the switch, so it is current there. So no read of either waits for
/// the guest: a slow one waited on the process, and is blind, see [`sample`]).
#[derive(Clone, Copy)]
struct Ram {
    base: u64,
    present_only: bool,
}

/// What the built-in guest publishes in its status page, read out of one process's copy of its RAM.
#[derive(Clone, Copy, Debug)]
pub struct GuestCounters {
    pub state: u32,
    pub verify_sweeps: u64,
    pub mismatches: u64,
    /// The guest's own longest stall since the last reset the host asked for (none, under QEMU).
    pub max_stall_ms: f64,
}

/// The guest's counters in `pid` (guest RAM of `ram_bytes`), read the way the probe reads the
/// heartbeat; None while no guest RAM is found there or its status page is not present.
pub fn guest_counters(pid: u32, ram_bytes: u64) -> Option<GuestCounters> {
    let ram = find_ram(pid, ram_bytes)?;
    let status = ram.base + STATUS_PAGE_GPA;
    if ram.present_only {
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
        if !page_present(&pagemap, status) {
            return None;
        }
    }
    let word = |offset: usize| read_u64(pid, status + offset as u64);
    // `state` is a u32: the low half of the little-endian word that starts there.
    let state = word(std::mem::offset_of!(StatusPage, state))? as u32;
    let tsc_khz = word(std::mem::offset_of!(StatusPage, tsc_khz))?;
    let max_stall_tsc = word(std::mem::offset_of!(StatusPage, max_stall_tsc))?;
    Some(GuestCounters {
        state,
        verify_sweeps: word(std::mem::offset_of!(StatusPage, verify_sweeps))?,
        mismatches: word(std::mem::offset_of!(StatusPage, mismatches))?,
        max_stall_ms: if tsc_khz > 0 {
            max_stall_tsc as f64 / tsc_khz as f64
        } else {
            f64::NAN
        },
    })
}

/// The guest RAM in `pid`, if it maps the guest's RAM (`ram_bytes`).
fn find_ram(pid: u32, ram_bytes: u64) -> Option<Ram> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        let size = end - start;
        let memfd = name.contains("perfplus-guest-ram") && size == ram_bytes;
        let candidate = memfd || (name.is_empty() && size >= ram_bytes && size <= ram_bytes + (4 << 20));
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
        if candidate
            && (memfd || page_present(&pagemap, start + STATUS_PAGE_GPA))
            && read_u64(pid, start + STATUS_PAGE_GPA) == Some(STATUS_MAGIC)
        {
            return Some(Ram {
                base: start,
                present_only: !memfd,
            });
        }
    }
    None
}

/// What the sampling threads share: the guest's progress as seen in any of its copies.
#[derive(Default)]
struct Progress {
    started: Option<Instant>,
    /// Highest heartbeat seen, and when it was first seen.
    best: u64,
    last: Option<Instant>,
    /// Bumped at each progress: a sampler's blind time counts only within the gap it was measured in.
    gap: u64,
    felt: Felt,
}

/// A sampling thread: reads `pid`'s copy of the heartbeat about every 0.5 ms and records progress.
///
/// A read that takes over 2 ms waited on the process (its memory map locked while it maps or unmaps
/// memory: a destination creating the guest's RAM, a source tearing it down), not on the guest: the
/// probe reads perfplus's agent view, which never waits for a missing page, and only present pages of
/// QEMU's RAM. That time is blind for this process. If this sampler then sees progress, the blind part
/// of the gap it ends is taken out of it (the guest may have moved meanwhile; the figure is a lower
/// bound there); a sampler blind on a process that no longer runs the guest costs nothing, since the
/// other sees the guest move.
fn sample(
    pid: u32,
    index: usize,
    heartbeat: u64,
    found: &Mutex<Vec<Option<Ram>>>,
    shared: &Mutex<Progress>,
    stalled_now: &AtomicBool,
    stop: &AtomicBool,
) {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
    let started = Instant::now();
    {
        let mut p = shared.lock().unwrap();
        p.started.get_or_insert(started);
        p.felt.started_at.get_or_insert_with(std::time::SystemTime::now);
    }
    // This sampler's blind time within the current gap (`gap` says which).
    let (mut blind_ms, mut blind_gap) = (0.0, 0u64);
    let mut last_sample = started;
    while !stop.load(Ordering::Acquire) {
        let ram = found.lock().unwrap()[index];
        let before_read = Instant::now();
        let value = ram.and_then(|ram| {
            let addr = ram.base + heartbeat;
            let readable = !ram.present_only || page_present(pagemap.as_ref()?, addr);
            readable.then(|| read_u64(pid, addr))?
        });
        let now = Instant::now();
        let read_ms = (now - before_read).as_secs_f64() * 1e3;
        {
            let mut p = shared.lock().unwrap();
            let p = &mut *p;
            p.felt.samples += 1;
            p.felt.max_sample_gap_ms = p.felt.max_sample_gap_ms.max((now - last_sample).as_secs_f64() * 1e3);
            last_sample = now;
            if blind_gap != p.gap {
                (blind_ms, blind_gap) = (0.0, p.gap);
            }
            if read_ms > 2.0 {
                p.felt.blind_ms += read_ms;
                // Only the part after the last progress falls in the gap under way.
                let from = p.last.map_or(before_read, |last| last.max(before_read));
                blind_ms += (now - from).as_secs_f64() * 1e3;
            }
            if let Some(value) = value.filter(|&v| v > p.best) {
                if let Some(prev) = p.last {
                    let gap = (now - prev).as_secs_f64() * 1e3 - blind_ms;
                    let at = (prev - p.started.unwrap_or(started)).as_secs_f64() * 1e3;
                    if gap > 10.0 {
                        p.felt.stalls.push((at, gap));
                    }
                    if gap > p.felt.max_stall_ms {
                        p.felt.max_stall_ms = gap;
                        p.felt.stall_at_ms = at;
                    }
                }
                p.best = value;
                p.last = Some(now);
                p.gap += 1;
            }
            let stalled = p.last.is_some_and(|t| now - t > Duration::from_millis(1));
            stalled_now.store(stalled, Ordering::Release);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

impl FeltProbe {
    /// Starts watching `pids` for a guest of `ram_bytes`.
    pub fn start(pids: Vec<u32>, ram_bytes: u64) -> FeltProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = STATUS_PAGE_GPA + std::mem::offset_of!(StatusPage, heartbeat) as u64;
        // What the scanner found, and whether the sampler sees the guest stalled (rescan fast then).
        let found: Arc<Mutex<Vec<Option<Ram>>>> = Arc::new(Mutex::new(vec![None; pids.len()]));
        let stalled_now = Arc::new(AtomicBool::new(false));
        let scanner = {
            let (found, stalled_now, flag, pids) = (found.clone(), stalled_now.clone(), stop.clone(), pids.clone());
            std::thread::Builder::new()
                .name("felt-scan".into())
                .spawn(move || {
                    realtime(9);
                    let mut last_scan: Option<Instant> = None;
                    while !flag.load(Ordering::Acquire) {
                        let lacking = found.lock().unwrap().iter().any(Option::is_none);
                        let every = if lacking && stalled_now.load(Ordering::Acquire) {
                            Duration::from_millis(1)
                        } else {
                            Duration::from_millis(50)
                        };
                        if last_scan.is_none_or(|t| t.elapsed() > every) {
                            let rams: Vec<Option<Ram>> = pids.iter().map(|&pid| find_ram(pid, ram_bytes)).collect();
                            *found.lock().unwrap() = rams;
                            last_scan = Some(Instant::now());
                        }
                        // With every copy found, nothing can change the cadence before the next scan:
                        // sleep until then. Otherwise look again soon, to switch to fast scans as soon
                        // as the guest stalls. (A real-time thread waking every 0.5 ms for nothing
                        // preempts the vCPU it measures.)
                        let nap = match last_scan {
                            Some(t) if !lacking => every.saturating_sub(t.elapsed()),
                            _ => Duration::ZERO,
                        };
                        std::thread::sleep(nap.max(Duration::from_micros(500)));
                    }
                })
                .expect("starting the felt-stall probe's scanner")
        };
        // One sampling thread per process, so that a read that waits on one process (its memory
        // map locked while it maps or unmaps RAM) does not hide the guest's progress in the other.
        let shared = Arc::new(Mutex::new(Progress::default()));
        let samplers: Vec<JoinHandle<()>> = pids
            .iter()
            .enumerate()
            .map(|(index, &pid)| {
                let (found, stalled_now, flag, shared) =
                    (found.clone(), stalled_now.clone(), stop.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("felt-stall-{index}"))
                    .spawn(move || {
                        realtime(10);
                        sample(pid, index, heartbeat, &found, &shared, &stalled_now, &flag)
                    })
                    .expect("starting the felt-stall probe's sampler")
            })
            .collect();
        let handle = std::thread::Builder::new()
            .name("felt-stall".into())
            .spawn(move || {
                for sampler in samplers {
                    let _ = sampler.join();
                }
                let _ = scanner.join();
                let progress = shared.lock().unwrap();
                progress.felt.clone()
            })
            .expect("starting the felt-stall probe");
        FeltProbe { stop, handle }
    }

    pub fn finish(self) -> Felt {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("felt-stall probe")
    }
}
