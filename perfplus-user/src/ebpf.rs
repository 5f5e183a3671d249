//! Write heat from eBPF: which pages are written, and how often, seen by tracepoint programs
//! (`perfplus-ebpf`, layouts in [`perfplus_common::ebpf_abi`]).
//!
//! This is an *extra* source of information next to the [`perfplus_vmm::tracking::DirtyTracker`]s, not one of them:
//! - [`HeatSource::Process`]: write faults of any process (`exceptions:page_fault_user`). A write fault
//!   happens on the first write to a page (fresh memory, after `MADV_DONTNEED`, copy-on-write, or a
//!   page the kernel write-protected), not on every store; so the counts are write *faults*.
//! - [`HeatSource::VmThreads`]: pages a VM pushes to its KVM dirty rings (`kvm:kvm_dirty_ring_push`),
//!   matched to the VM by its vCPU threads. Only VMs in dirty-ring mode produce these events; a VM in
//!   bitmap mode shows none.
//!
//! The object is built by `build.rs` (aya-build) and embedded in the binary. Every [`EbpfHeat`] loads
//! its own copy (its own maps); dropping it detaches the programs. Loading needs root
//! (`CAP_BPF` + `CAP_PERFMON`) and tracefs, which is mounted on `/sys/kernel/tracing` if it is absent.
//!
//! [`EbpfHeat::sample`] returns what happened since the previous sample, without losing or
//! double-counting an event: it moves the programs to a new generation of keys, waits for programs
//! in flight, then reads and deletes every key of the previous generation.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::TracePoint;
use aya::Ebpf;
use perfplus_common::ebpf_abi::{
    self, stat, Config, FaultPageKey, RingPageKey, RingVmStats, FAULT_PAGES_MAX, RING_PAGES_MAX,
};
use perfplus_common::PAGE_SIZE;

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/perfplus-ebpf"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// How long [`EbpfHeat::sample`] waits after switching generations for programs that read the old
/// generation to finish. Tracepoint programs run for microseconds without sleeping.
const GENERATION_GRACE: Duration = Duration::from_millis(2);

/// What to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeatSource {
    /// Write faults of one process (its tgid).
    Process { pid: u32 },
    /// Dirty-ring pushes of the given vCPU threads (kernel tids), counted under `vm_id`.
    VmThreads { vm_id: u32, tids: Vec<u32> },
}

/// What happened in one interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeatSample {
    /// Write events: write faults of the process, or pages pushed to the VM's dirty rings.
    pub write_events: u64,
    /// All page faults of the process (reads included); 0 for a VM.
    pub all_faults: u64,
    /// Dirty-ring pushes by threads that are not tracked (other VMs); 0 for a process.
    pub other_pushes: u64,
    /// Per-page counter updates the programs could not make (should stay 0).
    pub map_errors: u64,
    /// In-kernel dirty-rate counter of the VM (pushes in its last complete second), if any.
    pub kernel_rate: Option<u64>,
    /// Write events per page, by page address (virtual address for a process, guest-physical address
    /// relative to its memslot for a VM), ascending. Bounded by the per-page map size
    /// ([`max_pages`](EbpfHeat::max_pages)).
    pub pages: Vec<(u64, u64)>,
}

/// A range of memory and the writes it got (the type `perfplus track` carries on the wire).
pub use perfplus_protocol::TrackRegion as Region;

/// Size of the regions `perfplus track` ranks by write heat.
pub const REGION_BYTES: u64 = 2 << 20;
/// Regions `perfplus track` lists per interval, hottest first.
pub const HOTTEST: usize = 5;

impl HeatSample {
    /// Distinct pages written in the interval.
    pub fn working_set_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// The `n` pages with the most write events, hottest first (ties: lower address first).
    pub fn hottest_pages(&self, n: usize) -> Vec<(u64, u64)> {
        let mut pages = self.pages.clone();
        pages.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        pages.truncate(n);
        pages
    }

    /// The `n` regions of `region_bytes` (a power of two) with the most write events, hottest first.
    pub fn hottest_regions(&self, region_bytes: u64, n: usize) -> Vec<Region> {
        hottest_regions(self.pages.iter().copied(), region_bytes, n)
    }
}

/// Aggregates `(page address, writes)` into regions of `region_bytes` (a power of two) and returns
/// the `n` with the most writes, hottest first (ties: lower address first).
pub fn hottest_regions(pages: impl IntoIterator<Item = (u64, u64)>, region_bytes: u64, n: usize) -> Vec<Region> {
    assert!(
        region_bytes.is_power_of_two(),
        "region size {region_bytes} is not a power of two"
    );
    let mut regions: HashMap<u64, Region> = HashMap::new();
    for (addr, writes) in pages {
        let start = addr & !(region_bytes - 1);
        let r = regions.entry(start).or_insert(Region {
            start,
            pages: 0,
            writes: 0,
        });
        r.pages += 1;
        r.writes += writes;
    }
    let mut list: Vec<Region> = regions.into_values().collect();
    list.sort_by(|a, b| b.writes.cmp(&a.writes).then(a.start.cmp(&b.start)));
    list.truncate(n);
    list
}

/// Loaded and attached eBPF programs for one [`HeatSource`], and their maps.
pub struct EbpfHeat {
    ebpf: Ebpf,
    source: HeatSource,
    generation: u32,
    last_stats: [u64; stat::COUNT as usize],
    last_vm_pushes: u64,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl std::fmt::Debug for EbpfHeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfHeat")
            .field("source", &self.source)
            .field("generation", &self.generation)
            .finish()
    }
}

impl EbpfHeat {
    /// Loads the programs, configures them for `source` and attaches the one it needs.
    pub fn attach(source: HeatSource) -> anyhow::Result<EbpfHeat> {
        ensure_tracefs()?;
        // Only the map of the attached program gets its full size: an LRU hash preallocates every
        // entry (about 20 MiB of kernel memory for 2^18 pages).
        let unused = match source {
            HeatSource::Process { .. } => ebpf_abi::MAP_RING_PAGES,
            HeatSource::VmThreads { .. } => ebpf_abi::MAP_FAULT_PAGES,
        };
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(unused, 1)
            .load(OBJECT)
            .map_err(|e| refused("loading the eBPF object", e.into()))?;
        // Log records of the programs go to the `log` crate, which tracing-subscriber forwards.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("eBPF logs unavailable: {e}");
                None
            }
        };
        let mut heat = EbpfHeat {
            ebpf,
            source: source.clone(),
            generation: 1,
            last_stats: [0; stat::COUNT as usize],
            last_vm_pushes: 0,
            logger,
        };
        let (program, category, name, target_tgid) = match &source {
            HeatSource::Process { pid } => {
                if *pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
                    bail!("no process with pid {pid}");
                }
                check_format("exceptions", "page_fault_user", &[("address", 8), ("error_code", 24)])?;
                (ebpf_abi::PROG_FAULT, "exceptions", "page_fault_user", *pid)
            }
            HeatSource::VmThreads { vm_id, tids } => {
                check_format("kvm", "kvm_dirty_ring_push", &[("slot", 20), ("offset", 24)])?;
                let mut threads: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(
                    heat.ebpf
                        .map_mut(ebpf_abi::MAP_RING_THREADS)
                        .context("map of vCPU threads")?,
                )?;
                for tid in tids {
                    threads.insert(tid, vm_id, 0)?;
                }
                (ebpf_abi::PROG_RING, "kvm", "kvm_dirty_ring_push", 0)
            }
        };
        heat.write_config(target_tgid)?;
        let prog: &mut TracePoint = heat
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .map_err(|e| refused(&format!("loading {program}"), e.into()))?;
        prog.attach(category, name)
            .map_err(|e| refused(&format!("attaching {program} to {category}:{name}"), e.into()))?;
        Ok(heat)
    }

    /// Most distinct pages one interval can report (size of the per-page LRU map).
    pub fn max_pages(&self) -> u32 {
        match self.source {
            HeatSource::Process { .. } => FAULT_PAGES_MAX,
            HeatSource::VmThreads { .. } => RING_PAGES_MAX,
        }
    }

    pub fn source(&self) -> &HeatSource {
        &self.source
    }

    fn write_config(&mut self, target_tgid: u32) -> anyhow::Result<()> {
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(self.ebpf.map_mut(ebpf_abi::MAP_CONFIG).context("config map")?)?;
        config.set(
            0,
            Config {
                target_tgid,
                generation: self.generation,
            },
            0,
        )?;
        Ok(())
    }

    /// What happened since the previous sample (or since [`attach`](Self::attach)).
    pub fn sample(&mut self) -> anyhow::Result<HeatSample> {
        self.generation = self.generation.wrapping_add(1);
        let tgid = match self.source {
            HeatSource::Process { pid } => pid,
            HeatSource::VmThreads { .. } => 0,
        };
        self.write_config(tgid)?;
        std::thread::sleep(GENERATION_GRACE);

        let mut sample = HeatSample::default();
        let page = PAGE_SIZE as u64;
        match &self.source {
            HeatSource::Process { .. } => {
                let mut map: BpfHashMap<&mut MapData, FaultPageKey, u64> =
                    BpfHashMap::try_from(self.ebpf.map_mut(ebpf_abi::MAP_FAULT_PAGES).context("fault map")?)?;
                // A key the LRU evicts during the walk makes the kernel restart it from the first
                // key: keep each key once.
                let mut done: HashMap<FaultPageKey, u64> = HashMap::new();
                for entry in map.iter() {
                    let (key, writes) = entry?;
                    if key.generation != self.generation {
                        done.insert(key, writes);
                    }
                }
                for (key, writes) in done {
                    sample.pages.push((key.page * page, writes));
                    remove_key(&mut map, &key)?;
                }
            }
            HeatSource::VmThreads { vm_id, .. } => {
                let vm_id = *vm_id;
                let mut map: BpfHashMap<&mut MapData, RingPageKey, u64> =
                    BpfHashMap::try_from(self.ebpf.map_mut(ebpf_abi::MAP_RING_PAGES).context("ring map")?)?;
                let mut done: HashMap<RingPageKey, u64> = HashMap::new();
                for entry in map.iter() {
                    let (key, writes) = entry?;
                    if key.generation != self.generation {
                        done.insert(key, writes);
                    }
                }
                let mut by_gpa: HashMap<u64, u64> = HashMap::new();
                for (key, writes) in done {
                    if key.vm_id == vm_id {
                        // The agent's VMs have one RAM slot, at guest-physical 0.
                        *by_gpa.entry(key.gfn * page).or_default() += writes;
                    }
                    remove_key(&mut map, &key)?;
                }
                sample.pages = by_gpa.into_iter().collect();
                let vms: BpfHashMap<&mut MapData, u32, RingVmStats> =
                    BpfHashMap::try_from(self.ebpf.map_mut(ebpf_abi::MAP_RING_VMS).context("VM map")?)?;
                if let Ok(stats) = vms.get(&vm_id, 0) {
                    sample.kernel_rate = Some(stats.last_window_pushes);
                    self.last_vm_pushes = stats.pushes;
                }
            }
        }
        sample.pages.sort_unstable();

        let stats: Array<&MapData, u64> = Array::try_from(self.ebpf.map(ebpf_abi::MAP_STATS).context("stats map")?)?;
        let mut now = [0u64; stat::COUNT as usize];
        for (i, slot) in now.iter_mut().enumerate() {
            *slot = stats.get(&(i as u32), 0)?;
        }
        let delta = |i: u32| now[i as usize].wrapping_sub(self.last_stats[i as usize]);
        match self.source {
            HeatSource::Process { .. } => {
                sample.write_events = delta(stat::WRITE_FAULTS);
                sample.all_faults = delta(stat::FAULTS);
            }
            HeatSource::VmThreads { .. } => {
                sample.write_events = delta(stat::RING_PUSHES);
                sample.other_pushes = delta(stat::RING_PUSHES_OTHER);
            }
        }
        sample.map_errors = delta(stat::MAP_ERRORS);
        self.last_stats = now;
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        Ok(sample)
    }
}

/// Removes a key; one the LRU evicted meanwhile is already gone, which is fine.
fn remove_key<K: aya::Pod>(map: &mut BpfHashMap<&mut MapData, K, u64>, key: &K) -> anyhow::Result<()> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Turns a load/attach failure into an error that says what to do about it.
fn refused(what: &str, err: anyhow::Error) -> anyhow::Error {
    let text = format!("{err:#}");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let hint = if !root {
        "eBPF tracking needs root (CAP_BPF and CAP_PERFMON): run perfplus as root"
    } else if text.contains("Operation not permitted") || text.contains("EPERM") {
        "the kernel refused the program (lockdown, or missing CAP_BPF/CAP_PERFMON)"
    } else if text.contains("tracefs") || text.contains("No such file") {
        "tracefs or the tracepoint is missing (mount -t tracefs nodev /sys/kernel/tracing)"
    } else {
        "the kernel refused the eBPF program"
    };
    err.context(format!("{what}: {hint}"))
}

/// Mounts tracefs on /sys/kernel/tracing when it is not there (aya looks it up once per process).
fn ensure_tracefs() -> anyhow::Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS).expect("no NUL in the path");
    let fstype = c"tracefs";
    let source = c"nodev";
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("eBPF tracking needs root: tracefs is not mounted (or not readable) and mounting it on {TRACEFS} failed: {err}");
    }
    Ok(())
}

/// Checks that the tracepoint exists and its fields sit where the programs read them.
fn check_format(category: &str, name: &str, fields: &[(&str, usize)]) -> anyhow::Result<()> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let path = if path.exists() {
        path
    } else {
        Path::new("/sys/kernel/debug/tracing/events")
            .join(category)
            .join(name)
            .join("format")
    };
    let format = std::fs::read_to_string(&path)
        .with_context(|| format!("tracepoint {category}:{name} is not available ({})", path.display()))?;
    for (field, offset) in fields {
        let found = format.lines().find_map(|line| {
            let decl = line.trim().strip_prefix("field:")?;
            let (decl, rest) = decl.split_once(';')?;
            if decl.split_whitespace().last()? != *field {
                return None;
            }
            rest.trim()
                .strip_prefix("offset:")?
                .split(';')
                .next()?
                .parse::<usize>()
                .ok()
        });
        match found {
            Some(o) if o == *offset => {}
            Some(o) => bail!("{category}:{name} has field {field} at offset {o}, the program reads it at {offset}"),
            None => bail!("{category}:{name} has no field {field}"),
        }
    }
    Ok(())
}

/// The kernel thread ids of the vCPU threads of VM `name` in this process (threads are named
/// `vcpuN-<name>`, cut to 15 bytes by the kernel). Fails when another thread's name is the same after
/// the cut (two VMs whose names share a long prefix): the events could not be told apart.
pub fn vcpu_threads_of(name: &str, vcpus: usize) -> anyhow::Result<Vec<u32>> {
    let wanted: Vec<String> = (0..vcpus)
        .map(|i| {
            let mut comm = format!("vcpu{i}-{name}");
            while comm.len() > 15 {
                comm.pop();
            }
            comm
        })
        .collect();
    let mut found: Vec<(usize, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(i) = wanted.iter().position(|w| w == comm.trim_end()) {
            found.push((i, tid));
        }
    }
    for (i, w) in wanted.iter().enumerate() {
        match found.iter().filter(|(j, _)| *j == i).count() {
            0 => bail!("no vCPU thread {w:?} in this process (is VM {name:?} running?)"),
            1 => {}
            _ => bail!("several threads are named {w:?}: VM names that share their first characters cannot be told apart by eBPF"),
        }
    }
    Ok(found.into_iter().map(|(_, tid)| tid).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child process that writes `pages` fresh pages `rounds` times when told to, and reports the
    /// base address of its pages.
    ///
    /// Write faults happen on the *first* write to a page that is not present (or not writable), not
    /// on every store: so each round writes one byte to every page, then drops the pages with
    /// `MADV_DONTNEED`, and the next round's write to each page faults again. The expected count is
    /// exactly `rounds` write faults on each of the `pages` pages.
    struct Writer {
        pid: libc::pid_t,
        go: libc::c_int,
        done: libc::c_int,
        base: u64,
    }

    impl Writer {
        fn spawn(pages: usize, rounds: usize) -> Writer {
            let mut go = [0; 2];
            let mut done = [0; 2];
            // SAFETY: pipe() writes two fds into each 2-element array.
            assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::pipe(done.as_mut_ptr()) }, 0);
            let len = pages * PAGE_SIZE;
            // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            // SAFETY: the child only makes raw syscalls and plain stores to the mapping (no
            // allocation, no locks) before _exit, which is what is allowed after fork in a
            // multi-threaded process.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: child side: fds and mapping are valid copies from the parent; each store is
                // inside the mapping of `len` bytes.
                unsafe {
                    let mut byte = 0u8;
                    libc::read(go[0], (&raw mut byte).cast(), 1);
                    for round in 0..rounds {
                        for page in 0..pages {
                            std::ptr::write_volatile(base.cast::<u8>().add(page * PAGE_SIZE), round as u8 + 1);
                        }
                        libc::madvise(base, len, libc::MADV_DONTNEED);
                    }
                    libc::write(done[1], (&raw const byte).cast(), 1);
                    libc::read(go[0], (&raw mut byte).cast(), 1);
                    libc::_exit(0);
                }
            }
            // SAFETY: the parent does not use the mapping; unmapping its copy is harmless to the child.
            unsafe { libc::munmap(base, len) };
            Writer {
                pid,
                go: go[1],
                done: done[0],
                base: base as u64,
            }
        }

        fn run_and_wait(&self) {
            let byte = 1u8;
            let mut got = 0u8;
            // SAFETY: valid pipe fds owned by this struct; one-byte buffers.
            unsafe {
                assert_eq!(libc::write(self.go, (&raw const byte).cast(), 1), 1);
                assert_eq!(libc::read(self.done, (&raw mut got).cast(), 1), 1);
            }
        }
    }

    impl Drop for Writer {
        fn drop(&mut self) {
            let byte = 1u8;
            // SAFETY: valid fds and pid owned by this struct; the child exits on the second byte.
            unsafe {
                libc::write(self.go, (&raw const byte).cast(), 1);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
                libc::close(self.go);
                libc::close(self.done);
            }
        }
    }

    #[test]
    fn page_fault_program_counts_a_known_write_pattern() {
        const PAGES: usize = 64;
        const ROUNDS: usize = 3;
        let writer = Writer::spawn(PAGES, ROUNDS);
        let mut heat = EbpfHeat::attach(HeatSource::Process { pid: writer.pid as u32 }).unwrap();
        let before = heat.sample().unwrap();
        assert_eq!(before.write_events, 0, "the writer waits before writing: {before:?}");
        writer.run_and_wait();
        let sample = heat.sample().unwrap();
        let range = writer.base..writer.base + (PAGES * PAGE_SIZE) as u64;
        let ours: Vec<(u64, u64)> = sample
            .pages
            .iter()
            .copied()
            .filter(|(a, _)| range.contains(a))
            .collect();
        assert_eq!(ours.len(), PAGES, "every page faulted: {ours:?}");
        assert!(
            ours.iter().all(|&(_, w)| w == ROUNDS as u64),
            "{ROUNDS} write faults per page: {ours:?}"
        );
        // The child may also fault on its own stack (copy-on-write after fork): a few more pages.
        assert!(sample.write_events >= (PAGES * ROUNDS) as u64);
        assert!(sample.write_events <= (PAGES * ROUNDS + 16) as u64, "{sample:?}");
        assert!(sample.working_set_pages() <= PAGES as u64 + 16);
        assert_eq!(sample.map_errors, 0);
        // The keys of the interval were consumed: nothing is reported twice.
        let after = heat.sample().unwrap();
        assert!(after.pages.iter().all(|(a, _)| !range.contains(a)), "{after:?}");
        assert_eq!(heat.max_pages(), FAULT_PAGES_MAX);
        let top = sample.hottest_pages(1);
        assert!(top[0].1 >= ROUNDS as u64, "{top:?}");
    }

    #[test]
    fn dirty_ring_program_attaches_and_ignores_other_threads() {
        // No VM of this process is in dirty-ring mode here; the program must attach and count
        // nothing for threads it was not given.
        let mut heat = EbpfHeat::attach(HeatSource::VmThreads {
            vm_id: 7,
            tids: vec![u32::MAX - 1],
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let sample = heat.sample().unwrap();
        assert_eq!(sample.write_events, 0);
        assert!(sample.pages.is_empty());
        assert_eq!(sample.kernel_rate, None);
    }

    #[test]
    fn a_missing_process_is_refused() {
        let err = EbpfHeat::attach(HeatSource::Process { pid: u32::MAX / 2 }).unwrap_err();
        assert!(format!("{err:#}").contains("no process"), "{err:#}");
    }

    #[test]
    fn regions_aggregate_and_sort() {
        let mb2 = 2 << 20;
        let pages = vec![(0x1000, 1), (0x2000, 2), (mb2 + 0x3000, 10), (3 * mb2, 1)];
        let hot = hottest_regions(pages, mb2, 2);
        assert_eq!(
            hot,
            vec![
                Region {
                    start: mb2,
                    pages: 1,
                    writes: 10
                },
                Region {
                    start: 0,
                    pages: 2,
                    writes: 3
                },
            ]
        );
    }

    #[test]
    fn vcpu_thread_names_are_found() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        // The new thread sets its kernel name itself when it starts: wait until it runs.
        let t = std::thread::Builder::new()
            .name("vcpu0-heat-test-vm-long".into())
            .spawn(move || {
                ready_tx.send(()).unwrap();
                rx.recv().ok()
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let tids = vcpu_threads_of("heat-test-vm-long", 1).unwrap();
        assert_eq!(tids.len(), 1);
        assert!(vcpu_threads_of("no-such-vm", 1).is_err());
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}

#[cfg(test)]
mod ring_tests;
