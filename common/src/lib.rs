//! Types shared by the perfplus agent, its built-in guest and its eBPF programs.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of pointers, so that the same definition can be
//! compiled into the host agent, into the `x86_64-unknown-none` guest and into BPF programs.
#![no_std]

/// Size of a guest page as perfplus tracks, hashes and sends it.
pub const PAGE_SIZE: usize = 4096;

/// The contract between the built-in workload guest and the agent that hosts it.
///
/// The guest runs its workload in ring 3 (ring-0 code is emulated, and slow, under this machine's KVM) and
/// reports through a *status page*: a fixed guest-physical page that the guest writes and the agent reads
/// straight out of guest memory. The page is ordinary guest RAM, so it migrates with the guest, and the
/// destination agent reads the same counters after the switch.
pub mod guest_abi {
    /// Guest-physical address of the status page (below 1 MiB, outside the kernel image).
    pub const STATUS_PAGE_GPA: u64 = 0x7000;

    /// `StatusPage::magic` once the guest has initialised the page.
    pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"PPGUEST1");

    /// Layout version of [`StatusPage`]; bump on any change.
    pub const STATUS_VERSION: u32 = 1;

    /// `StatusPage::first_mismatch_page` when no mismatch was found.
    pub const NO_MISMATCH: u64 = u64::MAX;

    /// Values of `StatusPage::state`.
    pub mod state {
        /// The guest has not reached its workload yet.
        pub const BOOTING: u32 = 0;
        /// Writing the initial content of every working-set page.
        pub const FILLING: u32 = 1;
        /// Main loop: paced writes, continuous verification.
        pub const RUNNING: u32 = 2;
        /// The guest stopped on an error; `message` says why.
        pub const FAILED: u32 = 3;
    }

    /// What the guest publishes. The guest writes every field except the `host_*` ones; the agent writes
    /// only the `host_*` fields. All fields are naturally aligned, so single-field reads are atomic on x86.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct StatusPage {
        /// [`STATUS_MAGIC`] once initialised.
        pub magic: u64,
        /// [`STATUS_VERSION`].
        pub version: u32,
        /// One of [`state`].
        pub state: u32,
        /// TSC frequency the guest was told on its command line (`tsc_khz=`), 0 if none.
        pub tsc_khz: u64,
        /// Guest-physical address of the first working-set page.
        pub working_set_base: u64,
        /// Number of 4 KiB pages in the working set.
        pub working_set_pages: u64,
        /// Incremented on every main-loop iteration: the guest is making progress while it grows.
        pub heartbeat: u64,
        /// Working-set page writes done since boot.
        pub pages_written: u64,
        /// Page verifications done since boot.
        pub pages_verified: u64,
        /// Completed verification sweeps over the whole working set.
        pub verify_sweeps: u64,
        /// Pages whose content did not match what the guest last wrote there. Must stay 0.
        pub mismatches: u64,
        /// Index (in the working set) of the first mismatching page, or [`NO_MISMATCH`].
        pub first_mismatch_page: u64,
        /// Longest gap, in TSC cycles, between two consecutive TSC reads of the main loop since the last
        /// stall reset: the longest time the guest did not run, as the guest itself saw it.
        pub max_stall_tsc: u64,
        /// TSC value at the end of that longest gap.
        pub max_stall_end_tsc: u64,
        /// TSC value at the latest main-loop iteration.
        pub last_tsc: u64,
        /// Copy of `host_stall_reset_request` taken when the guest last reset `max_stall_tsc`.
        pub stall_reset_ack: u64,
        /// Written by the agent: when it differs from `stall_reset_ack`, the guest resets `max_stall_tsc`
        /// to 0 and copies this value into `stall_reset_ack`.
        pub host_stall_reset_request: u64,
        /// Last message of the guest (NUL-terminated UTF-8): the reason when `state` is FAILED.
        pub message: [u8; 256],
    }

    /// Keys of the built-in guest's command line (space-separated `key=value`).
    ///
    /// Sizes take a K/M/G suffix; counts and rates take a k suffix (`20k` = 20000).
    pub mod cmdline {
        /// Working-set size (bytes, default 64M). Capped to the memory the guest has.
        pub const WORKING_SET: &str = "working-set";
        /// Page writes per second (default 10k; 0 = as fast as the guest can).
        pub const RATE: &str = "rate";
        /// Content mix, percentages that add up to 100:
        /// `mix=unique:40,dup:30,zero:10,same:20` (the default); `text:P` adds pages of text-like
        /// content (letters at English-like frequencies: about 2-2.5x smaller with zstd), unique per
        /// page and version like `unique`, whose pages are random and do not compress.
        /// `unique`: fresh pseudo-random content on every write; `dup`: one of a small pool of contents
        /// shared by many pages; `zero`: all zero; `same`: the same content the page already had.
        pub const MIX: &str = "mix";
        /// Hot set: `hot=P:W` sends W % of the writes to the first P % of the working set (default none).
        pub const HOT: &str = "hot";
        /// TSC frequency in kHz, filled in by the VMM (the guest cannot measure it cheaply).
        pub const TSC_KHZ: &str = "tsc_khz";
        /// Seed of the guest's pseudo-random generator.
        pub const SEED: &str = "seed";
        /// For tests of the host's defences: `hostile=console` floods the console with lines full of
        /// terminal escapes, forged log lines and invalid UTF-8; `hostile=counters` publishes absurd
        /// counters (verify_sweeps at u64::MAX, pages_written counting down); both: `console,counters`.
        pub const HOSTILE: &str = "hostile";
        /// `progress=off` stops the once-a-second progress line (`progress=on`, the default, prints
        /// it): a line goes through the guest's ring 0 and ~150 port-I/O exits, which on some hosts
        /// (kvm-pvm emulates ring 0) is not free.
        pub const PROGRESS: &str = "progress";
    }
}

/// The contract between the eBPF programs of `perfplus-ebpf` and their loader in the agent
/// (`perfplus-user/src/ebpf.rs`): program and map names, map key and value layouts.
///
/// Two tracepoint programs, loaded from one object (every load has its own maps):
///
/// - [`PROG_FAULT`] on `exceptions:page_fault_user`: counts the user page faults of ONE process (the
///   tgid in [`Config::target_tgid`]); write faults (error code bit 1) are counted per 4 KiB page of
///   the process's virtual address space in [`MAP_FAULT_PAGES`]. A page faults for a write when it is
///   first written (fresh anonymous memory, or after `MADV_DONTNEED`), on copy-on-write and when the
///   kernel write-protected it (e.g. dirty tracking); later writes to a writable present page do not
///   fault, so this counts *write faults*, not stores.
/// - [`PROG_RING`] on `kvm:kvm_dirty_ring_push`: every page KVM pushes to a vCPU's dirty ring
///   (only VMs in dirty-ring mode; it sees nothing in bitmap mode). The event runs on the vCPU thread,
///   so the program keys the VM by the pushing thread: [`MAP_RING_THREADS`] maps a vCPU thread id
///   (kernel tid) to a VM id the agent chooses; pushes from other threads are only counted in
///   [`stat::RING_PUSHES_OTHER`]. Per page: [`RingPageKey`] (VM id, KVM slot, gfn offset in the slot).
///
/// **Intervals without loss.** Per-page keys carry a `generation`; the programs take the current one
/// from [`Config::generation`]. The loader bumps the generation, waits for programs in flight
/// (they run for microseconds) and then reads and deletes every key of the previous generation, so
/// each event lands in exactly one interval. Per-page maps are LRU hashes of [`FAULT_PAGES_MAX`] /
/// [`RING_PAGES_MAX`] entries (pages written in one interval beyond that evict the least recently
/// written ones; the totals in [`MAP_STATS`] stay exact).
pub mod splitmix;
pub mod text;

pub mod ebpf_abi {
    /// Program on `exceptions:page_fault_user`.
    pub const PROG_FAULT: &str = "perfplus_page_fault_user";
    /// Program on `kvm:kvm_dirty_ring_push`.
    pub const PROG_RING: &str = "perfplus_kvm_dirty_ring_push";

    /// `Array<Config>` with one entry (index 0), written by the loader.
    pub const MAP_CONFIG: &str = "PERFPLUS_CONFIG";
    /// `Array<u64>` of [`stat`] counters (cumulative since load).
    pub const MAP_STATS: &str = "PERFPLUS_STATS";
    /// `LruHashMap<FaultPageKey, u64>`: write faults per page of the target process.
    pub const MAP_FAULT_PAGES: &str = "PERFPLUS_FAULT_PAGES";
    /// `HashMap<u32 (tid), u32 (VM id)>`: the vCPU threads whose dirty-ring pushes are tracked.
    pub const MAP_RING_THREADS: &str = "PERFPLUS_RING_THREADS";
    /// `LruHashMap<RingPageKey, u64>`: dirty-ring pushes per guest page.
    pub const MAP_RING_PAGES: &str = "PERFPLUS_RING_PAGES";
    /// `HashMap<u32 (VM id), RingVmStats>`: per-VM totals and dirty rate.
    pub const MAP_RING_VMS: &str = "PERFPLUS_RING_VMS";

    /// Entries of [`MAP_FAULT_PAGES`]: 1 GiB of 4 KiB pages per interval.
    pub const FAULT_PAGES_MAX: u32 = 1 << 18;
    /// Entries of [`MAP_RING_PAGES`]: 1 GiB of 4 KiB guest pages per interval.
    pub const RING_PAGES_MAX: u32 = 1 << 18;
    /// Entries of [`MAP_RING_THREADS`] (vCPU threads tracked at once).
    pub const RING_THREADS_MAX: u32 = 1024;
    /// Entries of [`MAP_RING_VMS`].
    pub const RING_VMS_MAX: u32 = 256;

    /// Length of the window of the in-kernel dirty-rate counters ([`RingVmStats::last_window_pushes`]).
    pub const RATE_WINDOW_NS: u64 = 1_000_000_000;

    /// Indices of [`MAP_STATS`].
    pub mod stat {
        /// `page_fault_user` events of the target process.
        pub const FAULTS: u32 = 0;
        /// Of which write faults (error code bit 1).
        pub const WRITE_FAULTS: u32 = 1;
        /// `kvm_dirty_ring_push` events of tracked vCPU threads.
        pub const RING_PUSHES: u32 = 2;
        /// `kvm_dirty_ring_push` events of any other thread (seen, not tracked).
        pub const RING_PUSHES_OTHER: u32 = 3;
        /// Per-page map updates that failed (should stay 0).
        pub const MAP_ERRORS: u32 = 4;
        /// Number of counters.
        pub const COUNT: u32 = 5;
    }

    /// Error-code bit of a write access in `page_fault_user` (x86 `X86_PF_WRITE`).
    pub const PF_WRITE: u64 = 1 << 1;

    /// What the loader tells the programs.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// Process (tgid) whose page faults [`PROG_FAULT`] counts; 0 = none.
        pub target_tgid: u32,
        /// Generation stamped into the per-page keys (see the module doc).
        pub generation: u32,
    }

    /// Key of [`MAP_FAULT_PAGES`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct FaultPageKey {
        /// Virtual page number (faulting address >> 12) in the target process.
        pub page: u64,
        /// [`Config::generation`] when the fault happened.
        pub generation: u32,
        pub _pad: u32,
    }

    /// Key of [`MAP_RING_PAGES`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct RingPageKey {
        /// Page offset in the memslot (the tracepoint's `offset`, a gfn relative to the slot base).
        pub gfn: u64,
        /// The VM id of the pushing thread ([`MAP_RING_THREADS`]).
        pub vm_id: u32,
        /// KVM slot as the tracepoint reports it: address-space id << 16 | slot id.
        pub slot: u32,
        /// [`Config::generation`] when the page was pushed.
        pub generation: u32,
        pub _pad: u32,
    }

    /// Value of [`MAP_RING_VMS`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RingVmStats {
        /// Pages pushed to the dirty rings of this VM since load.
        pub pushes: u64,
        /// Start (bpf_ktime_get_ns) of the current rate window.
        pub window_start_ns: u64,
        /// Pushes in the current window so far.
        pub window_pushes: u64,
        /// Pushes in the last complete window of [`RATE_WINDOW_NS`] (the in-kernel dirty rate, pages/s;
        /// approximate: concurrent vCPUs may race on the window switch).
        pub last_window_pushes: u64,
    }
}

// SAFETY: every type below is `#[repr(C)]`, made of integers only, with explicit padding fields, so
// any byte pattern is a valid value and there are no uninitialised padding bytes.
#[cfg(feature = "user")]
mod pod {
    use super::ebpf_abi::{Config, FaultPageKey, RingPageKey, RingVmStats};
    // SAFETY: see above (repr(C), integers only, no implicit padding).
    unsafe impl aya::Pod for Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FaultPageKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RingPageKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RingVmStats {}
}
