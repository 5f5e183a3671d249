//! A global allocator that counts: live bytes, the peak since the last [`reset_peak`], and the largest
//! single request. The runner resets the peak before each execution and reads it after, so that an
//! input that makes a decoder allocate far more than its size is a finding like a panic.
//!
//! Install it in a binary with `#[global_allocator] static A: perfplus_fuzz::alloc::Counting =
//! perfplus_fuzz::alloc::Counting;`. Without it the counters stay 0 and [`peak_since_reset`] says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Most bytes one execution may have allocated at once beyond what was live before it. The largest
/// legitimate allocation of any target is a few MiB (postcard preallocates at most 1 MiB per sequence,
/// the largest frame payload is 4 MiB); inputs are at most 256 KiB.
pub const LIMIT: usize = 64 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The counting allocator: [`System`] plus three counters.
pub struct Counting;

fn note_alloc(size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

fn note_free(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only updates
// counters besides, so `System`'s guarantees (alignment, size, no unwinding) carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract; `ptr` came from `System` with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

/// Starts a new measurement: the peak becomes what is live now, the largest request 0.
pub fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    live
}

/// Bytes allocated at once beyond `base` (from [`reset_peak`]) since then, and the largest single
/// request; `None` when the counting allocator is not the global one.
pub fn peak_since_reset(base: usize) -> Option<(usize, usize)> {
    INSTALLED.load(Ordering::Relaxed).then(|| {
        (
            PEAK.load(Ordering::Relaxed).saturating_sub(base),
            LARGEST.load(Ordering::Relaxed),
        )
    })
}
