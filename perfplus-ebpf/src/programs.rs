//! The tracepoint programs and their maps (see `perfplus_common::ebpf_abi`).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap};
use aya_ebpf::programs::TracePointContext;
use aya_log_ebpf::warn;
use perfplus_common::ebpf_abi::{
    stat, Config, FaultPageKey, RingPageKey, RingVmStats, FAULT_PAGES_MAX, PF_WRITE, RATE_WINDOW_NS, RING_PAGES_MAX,
    RING_THREADS_MAX, RING_VMS_MAX,
};

#[map(name = "PERFPLUS_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "PERFPLUS_STATS")]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

#[map(name = "PERFPLUS_FAULT_PAGES")]
static FAULT_PAGES: LruHashMap<FaultPageKey, u64> = LruHashMap::with_max_entries(FAULT_PAGES_MAX, 0);

#[map(name = "PERFPLUS_RING_THREADS")]
static RING_THREADS: HashMap<u32, u32> = HashMap::with_max_entries(RING_THREADS_MAX, 0);

#[map(name = "PERFPLUS_RING_PAGES")]
static RING_PAGES: LruHashMap<RingPageKey, u64> = LruHashMap::with_max_entries(RING_PAGES_MAX, 0);

#[map(name = "PERFPLUS_RING_VMS")]
static RING_VMS: HashMap<u32, RingVmStats> = HashMap::with_max_entries(RING_VMS_MAX, 0);

// Field offsets from /sys/kernel/tracing/events/<group>/<event>/format (stable kernel ABI of these
// two events; the loader checks them against the running kernel's format files before attaching).
/// `exceptions:page_fault_user`: `unsigned long address` at 8, `error_code` at 24.
const PF_ADDRESS: usize = 8;
const PF_ERROR_CODE: usize = 24;
/// `kvm:kvm_dirty_ring_push`: `u32 slot` at 20, `u64 offset` at 24.
const RING_SLOT: usize = 20;
const RING_OFFSET: usize = 24;

const PAGE_SHIFT: u64 = 12;

/// Adds `n` to the u64 at `ptr` atomically (several CPUs update the same counters). The BPF target
/// has no compare-and-swap, so `AtomicU64::fetch_add` is not offered; the intrinsic compiles to the
/// BPF atomic add instruction.
#[inline(always)]
fn add(ptr: *mut u64, n: u64) {
    // SAFETY: `ptr` comes from a successful map lookup: it points to a live, 8-byte aligned u64 map
    // value that stays valid for the program's run (map values are not freed under a running program).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, n) };
}

#[inline(always)]
fn count(index: u32) {
    if let Some(ptr) = STATS.get_ptr_mut(index) {
        add(ptr, 1);
    }
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Adds one write to the per-page counter at `key`, creating it if needed.
#[inline(always)]
fn bump<K>(map: &LruHashMap<K, u64>, key: &K) -> bool {
    if let Some(ptr) = map.get_ptr_mut(key) {
        add(ptr, 1);
        return true;
    }
    // BPF_NOEXIST: two CPUs may race to create the key; the loser adds to the winner's entry.
    const BPF_NOEXIST: u64 = 1;
    if map.insert(key, 1u64, BPF_NOEXIST).is_ok() {
        return true;
    }
    match map.get_ptr_mut(key) {
        Some(ptr) => {
            add(ptr, 1);
            true
        }
        None => false,
    }
}

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn perfplus_page_fault_user(ctx: TracePointContext) -> u32 {
    let config = config();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if config.target_tgid == 0 || tgid != config.target_tgid {
        return 0;
    }
    count(stat::FAULTS);
    // SAFETY: the offsets are those of the event's format (checked by the loader); read_at copies
    // with bpf_probe_read_kernel, which fails cleanly on a bad address.
    let (address, error_code) = unsafe {
        match (ctx.read_at::<u64>(PF_ADDRESS), ctx.read_at::<u64>(PF_ERROR_CODE)) {
            (Ok(a), Ok(e)) => (a, e),
            _ => return 0,
        }
    };
    if error_code & PF_WRITE == 0 {
        return 0;
    }
    count(stat::WRITE_FAULTS);
    let key = FaultPageKey {
        page: address >> PAGE_SHIFT,
        generation: config.generation,
        _pad: 0,
    };
    if !bump(&FAULT_PAGES, &key) {
        count(stat::MAP_ERRORS);
        warn!(&ctx, "perfplus: cannot count a write fault at {:x}", address);
    }
    0
}

#[tracepoint(category = "kvm", name = "kvm_dirty_ring_push")]
pub fn perfplus_kvm_dirty_ring_push(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a lookup in a map whose values are plain u32s; the value is copied at once.
    let Some(vm_id) = (unsafe { RING_THREADS.get(&tid) }).copied() else {
        count(stat::RING_PUSHES_OTHER);
        return 0;
    };
    count(stat::RING_PUSHES);
    // SAFETY: offsets from the event's format (checked by the loader); bpf_probe_read_kernel copies.
    let (slot, gfn) = unsafe {
        match (ctx.read_at::<u32>(RING_SLOT), ctx.read_at::<u64>(RING_OFFSET)) {
            (Ok(s), Ok(o)) => (s, o),
            _ => return 0,
        }
    };
    let key = RingPageKey {
        gfn,
        vm_id,
        slot,
        generation: config().generation,
        _pad: 0,
    };
    if !bump(&RING_PAGES, &key) {
        count(stat::MAP_ERRORS);
        warn!(&ctx, "perfplus: cannot count a dirty-ring push of gfn {:x}", gfn);
    }
    vm_stats(vm_id);
    0
}

/// Per-VM totals and the windowed dirty-rate counter.
#[inline(always)]
fn vm_stats(vm_id: u32) {
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ptr = match RING_VMS.get_ptr_mut(&vm_id) {
        Some(ptr) => ptr,
        None => {
            let fresh = RingVmStats {
                pushes: 0,
                window_start_ns: now,
                window_pushes: 0,
                last_window_pushes: 0,
            };
            const BPF_NOEXIST: u64 = 1;
            let _ = RING_VMS.insert(&vm_id, fresh, BPF_NOEXIST);
            match RING_VMS.get_ptr_mut(&vm_id) {
                Some(ptr) => ptr,
                None => {
                    count(stat::MAP_ERRORS);
                    return;
                }
            }
        }
    };
    // SAFETY: `ptr` is a live map value (see `add`); the fields are u64s at 8-byte aligned offsets of
    // a repr(C) struct. The window switch is not atomic across CPUs; the rate is approximate (doc).
    unsafe {
        add(&raw mut (*ptr).pushes, 1);
        let start = (*ptr).window_start_ns;
        if now.wrapping_sub(start) >= RATE_WINDOW_NS {
            (*ptr).last_window_pushes = (*ptr).window_pushes;
            (*ptr).window_pushes = 0;
            (*ptr).window_start_ns = now;
        }
        add(&raw mut (*ptr).window_pushes, 1);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it exists because no_std needs one.
    loop {}
}
