//! Types shared by the perfplus agent, its built-in guest and (later) its eBPF programs.
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
        /// `mix=unique:40,dup:30,zero:10,same:20` (the default).
        /// `unique`: fresh pseudo-random content on every write; `dup`: one of a small pool of contents
        /// shared by many pages; `zero`: all zero; `same`: the same content the page already had.
        pub const MIX: &str = "mix";
        /// Hot set: `hot=P:W` sends W % of the writes to the first P % of the working set (default none).
        pub const HOT: &str = "hot";
        /// TSC frequency in kHz, filled in by the VMM (the guest cannot measure it cheaply).
        pub const TSC_KHZ: &str = "tsc_khz";
        /// Seed of the guest's pseudo-random generator.
        pub const SEED: &str = "seed";
    }
}
