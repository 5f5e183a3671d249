//! The ring-3 workload: set-up from the multiboot information, the initial fill, and the main loop
//! of paced page writes and continuous verification.

use core::fmt::Write;
use core::sync::atomic::{compiler_fence, Ordering};

use perfplus_common::guest_abi::{state, NO_MISMATCH};
use perfplus_common::PAGE_SIZE;

use crate::boot::{image_end, MAPPED_LIMIT, STATIC_MAPPED};
use crate::cmdline::{self, Config, KIND_NAMES};
use crate::content::{check, fill, Contents, WORDS};
use crate::multiboot;
use crate::println;
use crate::status::Status;
use crate::sys::{self, rdtsc, Line};

/// TSC frequency assumed for pacing and reporting when the command line has no `tsc_khz=`.
const FALLBACK_TSC_KHZ: u64 = 2_000_000;
/// Mismatches printed one by one; later ones are only counted (and shown in progress lines).
const MAX_PRINTED_MISMATCHES: u64 = 32;
/// In unpaced mode (`rate=0`) one page is verified after this many writes.
const UNPACED_WRITES_PER_VERIFY: u64 = 8;
const PAGE: u64 = PAGE_SIZE as u64;
const TWO_MIB: u64 = 2 << 20;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Stops the guest with state FAILED and `msg` in the status page and on the console.
fn fail(status: &Status, msg: &str) -> ! {
    status.set_message(msg);
    status.set_state(state::FAILED);
    println!("perfplus-guest: FAILED: {msg}");
    sys::halt()
}

/// Prints a size in the largest binary unit that divides it.
struct Size(u64);

impl core::fmt::Display for Size {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}G", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}M", b >> 20)
        } else if b.is_multiple_of(1024) {
            write!(f, "{}K", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

/// Entry from the boot code: RDI = multiboot magic, RSI = multiboot information.
pub fn run(magic: u64, mbi: u64) -> ! {
    // Copy what we need out of the multiboot information before writing any memory (the status page
    // included: a loader could have put the information there).
    let boot = if magic == multiboot::BOOTLOADER_MAGIC && mbi != 0 {
        // SAFETY: a multiboot loader passed this pointer along with the magic in EAX.
        Some(unsafe { multiboot::parse(mbi, image_end()) })
    } else {
        None
    };
    let status = Status::init();
    let Some(boot) = boot else {
        fail(
            &status,
            "not started by a multiboot loader (EAX != 0x2BADB002 or no information structure)",
        );
    };
    let cfg = match cmdline::parse(boot.cmdline()) {
        Ok(c) => c,
        Err(msg) => fail(&status, msg.as_str()),
    };
    let Some(ram_end) = boot.ram_end else {
        fail(
            &status,
            "the loader reported no memory (need the multiboot memory map or mem_upper)",
        );
    };

    // Layout: [image][version array (u32 per page)] ... [working set, 2 MiB aligned] <= ram_end.
    let versions_base = align_up(image_end(), PAGE);
    let region_end = ram_end.min(MAPPED_LIMIT);
    let avail = region_end.saturating_sub(versions_base);
    let max_pages = avail.saturating_sub(TWO_MIB) / (PAGE + 4);
    let requested = cfg.working_set / PAGE;
    let pages = requested.min(max_pages);
    if pages == 0 {
        fail(&status, "no memory left for the working set above the guest image");
    }
    let ws_base = align_up(versions_base + pages * 4, TWO_MIB);
    let ws_end = ws_base + pages * PAGE;
    if ws_end > STATIC_MAPPED {
        sys::map_up_to(ws_end);
    }
    status.set_working_set(ws_base, pages);
    status.set_tsc_khz(cfg.tsc_khz);

    let mut line = Line::new();
    let _ = write!(
        line,
        "perfplus-guest: working-set={} ({} pages at {:#x}",
        Size(pages * PAGE),
        pages,
        ws_base
    );
    if pages < requested {
        let _ = write!(line, ", capped from {}", Size(cfg.working_set));
    }
    let _ = write!(line, ") rate=");
    if cfg.rate == 0 {
        let _ = write!(line, "unpaced");
    } else {
        let _ = write!(line, "{}/s", cfg.rate);
    }
    let _ = write!(line, " mix=");
    for (i, name) in KIND_NAMES.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(line, "{sep}{name}:{}", cfg.mix[i]);
    }
    match cfg.hot {
        Some((p, w)) => {
            let _ = write!(line, " hot={p}:{w}");
        }
        None => {
            let _ = write!(line, " hot=none");
        }
    }
    let _ = write!(line, " seed={} tsc_khz={}", cfg.seed, cfg.tsc_khz);
    if cfg.hostile_console || cfg.hostile_counters {
        let _ = write!(
            line,
            " HOSTILE:{}{}",
            if cfg.hostile_console { " console" } else { "" },
            if cfg.hostile_counters { " counters" } else { "" }
        );
    }
    if cfg.tsc_khz == 0 {
        let _ = write!(line, " (assuming {FALLBACK_TSC_KHZ} for pacing)");
    }
    let _ = write!(
        line,
        " versions={versions_base:#x} ram_end={ram_end:#x} ({})",
        boot.ram_source
    );
    line.print();

    let mut w = Workload::new(cfg, &status, ws_base, versions_base, pages);
    w.fill_all();
    w.main_loop()
}

struct Workload<'a> {
    status: &'a Status,
    contents: Contents,
    ws_base: u64,
    versions: *mut u32,
    pages: u64,
    /// Pages in the hot set (writes go there with probability `hot_weight` %); 0 = no hot set.
    hot_pages: u64,
    hot_weight: u64,
    rate: u64,
    tsc_hz: u64,
    rng: u64,
    written: u64,
    verified: u64,
    sweeps: u64,
    verify_cursor: u64,
    mismatches: u64,
    first_mismatch: u64,
    hostile_console: bool,
    hostile_counters: bool,
    progress: bool,
}

/// What `hostile=console` prints, over and over: a screen clear and cursor move, colours, a carriage
/// return over the line, a forged agent log line after a newline, invalid UTF-8, a C1 CSI and a bidi
/// override, then a run of filler so that the lines are long.
const HOSTILE_LINE: &[u8] = b"\x1b[2J\x1b[1;1H\x1b[31mHOSTILE red\x1b[0m\roverwritten\n\
2026-01-01T00:00:00.000000Z  INFO perfplus::agent: FORGED migration completed\n\
bad utf-8: \xff\xfe\xc3 c1: \xc2\x9b2J bidi: \xe2\x80\xaeevil\x07\x08 \
................................................................................\r\n";

impl<'a> Workload<'a> {
    fn new(cfg: Config, status: &'a Status, ws_base: u64, versions: u64, pages: u64) -> Self {
        let (hot_pages, hot_weight) = match cfg.hot {
            Some((p, w)) if p > 0 => {
                let hp = (pages * u64::from(p) / 100).max(1);
                if hp >= pages {
                    (0, 0)
                } else {
                    (hp, u64::from(w))
                }
            }
            _ => (0, 0),
        };
        let khz = if cfg.tsc_khz == 0 {
            FALLBACK_TSC_KHZ
        } else {
            cfg.tsc_khz
        };
        Workload {
            status,
            contents: Contents::new(cfg.seed, cfg.mix),
            ws_base,
            versions: versions as *mut u32,
            pages,
            hot_pages,
            hot_weight,
            rate: cfg.rate,
            tsc_hz: khz * 1000,
            rng: crate::content::mix64(cfg.seed ^ 0x524e_4721) | 1,
            written: 0,
            verified: 0,
            sweeps: 0,
            verify_cursor: 0,
            mismatches: 0,
            first_mismatch: NO_MISMATCH,
            hostile_console: cfg.hostile_console,
            hostile_counters: cfg.hostile_counters,
            progress: cfg.progress,
        }
    }

    /// `pages_written` as published: counting down under `hostile=counters`.
    #[inline(always)]
    fn publish_written(&self) {
        let shown = if self.hostile_counters {
            u64::MAX - self.written
        } else {
            self.written
        };
        self.status.set_pages_written(shown);
    }

    /// xorshift64* for choosing pages.
    #[inline(always)]
    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    #[inline(always)]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_rand()) * u128::from(n)) >> 64) as u64
    }

    fn pick_page(&mut self) -> u64 {
        if self.hot_pages == 0 {
            return self.below(self.pages);
        }
        if self.below(100) < self.hot_weight {
            self.below(self.hot_pages)
        } else {
            self.hot_pages + self.below(self.pages - self.hot_pages)
        }
    }

    #[inline(always)]
    fn page_ptr(&self, page: u64) -> *mut u64 {
        (self.ws_base + page * PAGE) as *mut u64
    }

    #[inline(always)]
    fn version(&self, page: u64) -> u32 {
        // SAFETY: page < pages; the version array (pages u32s) lies between the image and the
        // working set, in identity-mapped RAM only this code uses.
        unsafe { self.versions.add(page as usize).read_volatile() }
    }

    #[inline(always)]
    fn set_version(&self, page: u64, v: u32) {
        // SAFETY: as in `version`.
        unsafe { self.versions.add(page as usize).write_volatile(v) }
    }

    /// Rewrites `page` with a new version. The version is bumped *before* the content is written and
    /// verification never runs in between (single thread), so a freeze at any instruction followed
    /// by a faithful migration cannot produce a false mismatch.
    #[inline(always)]
    fn write_page(&mut self, page: u64) {
        let v = self.version(page).wrapping_add(1);
        self.set_version(page, v);
        compiler_fence(Ordering::SeqCst);
        let c = self.contents.content(page, v);
        // SAFETY: page < pages: a page of the working set, which only this code references.
        unsafe { fill(self.page_ptr(page), c) };
        compiler_fence(Ordering::SeqCst);
        self.written += 1;
        self.publish_written();
    }

    /// Initial content (version 0) of every page.
    fn fill_all(&mut self) {
        self.status.set_message("filling");
        self.status.set_state(state::FILLING);
        let start = rdtsc();
        let mut next_report = start + self.tsc_hz;
        for page in 0..self.pages {
            self.set_version(page, 0);
            compiler_fence(Ordering::SeqCst);
            let c = self.contents.content(page, 0);
            // SAFETY: page < pages, see `write_page`.
            unsafe { fill(self.page_ptr(page), c) };
            compiler_fence(Ordering::SeqCst);
            self.written += 1;
            self.publish_written();
            if page & 255 == 0 && rdtsc() >= next_report {
                println!("perfplus-guest: filling {}/{} pages", page, self.pages);
                next_report = rdtsc() + self.tsc_hz;
            }
        }
        let ms = rdtsc().saturating_sub(start) * 1000 / self.tsc_hz;
        println!("perfplus-guest: filled {} pages in {} ms; running", self.pages, ms);
    }

    /// Verifies the next page in round-robin order.
    #[inline(always)]
    fn verify_next(&mut self) {
        let page = self.verify_cursor;
        let v = self.version(page);
        let c = self.contents.content(page, v);
        // SAFETY: page < pages, see `write_page`.
        if let Some((word, got)) = unsafe { check(self.page_ptr(page), c) } {
            self.mismatch(page, v, word, got, c.word(word));
            // Repair, so that the next sweeps check fresh content rather than recount this page.
            // SAFETY: as above.
            unsafe { fill(self.page_ptr(page), c) };
        }
        self.verified += 1;
        self.status.set_pages_verified(self.verified);
        self.verify_cursor += 1;
        if self.verify_cursor == self.pages {
            self.verify_cursor = 0;
            self.sweeps += 1;
            // `hostile=counters`: a sweep count at u64::MAX (a host adding 2 to it wraps to 1).
            self.status
                .set_verify_sweeps(if self.hostile_counters { u64::MAX } else { self.sweeps });
        }
    }

    #[cold]
    fn mismatch(&mut self, page: u64, version: u32, word: usize, got: u64, expected: u64) {
        self.mismatches += 1;
        if self.first_mismatch == NO_MISMATCH {
            self.first_mismatch = page;
        }
        self.status.set_mismatches(self.mismatches, self.first_mismatch);
        if self.mismatches <= MAX_PRINTED_MISMATCHES {
            println!(
                "perfplus-guest: MISMATCH page={} gpa={:#x} kind={} version={} word={} expected={:#018x} found={:#018x}",
                page,
                self.ws_base + page * PAGE + word as u64 * 8,
                KIND_NAMES[self.contents.kind(page)],
                version,
                word,
                expected,
                got
            );
        }
    }

    fn main_loop(&mut self) -> ! {
        let st = self.status;
        st.set_message("running");
        st.set_state(state::RUNNING);
        let hz = self.tsc_hz;
        // Pacing: one write every `interval` cycles; at most `max_backlog` cycles of missed writes
        // are caught up (after a long pause, e.g. a migration's switch-over, the rest are dropped).
        let interval = hz.checked_div(self.rate).map_or(0, |i| i.max(1));
        let max_backlog = hz / 100;
        let mut heartbeat = 0u64;
        let mut max_stall = 0u64;
        let mut reset_ack = st.host_stall_reset_request();
        st.set_stall_reset_ack(reset_ack);
        let start = rdtsc();
        let mut prev = start;
        let mut next_write = start;
        let mut unpaced_count = 0u64;
        let mut last_report = start;
        let mut last_written = self.written;
        let mut last_verified = self.verified;
        let mut last_sweeps = self.sweeps;
        let mut last_mismatches = self.mismatches;
        loop {
            let now = rdtsc();
            // A TSC that went backwards (a move to a host with a smaller TSC) measures nothing; restart
            // the pacing and reporting clocks from it.
            let gap = now.saturating_sub(prev);
            if now < prev {
                next_write = now;
                last_report = now;
            }
            prev = now;
            heartbeat += 1;
            st.set_heartbeat(heartbeat, now);
            let req = st.host_stall_reset_request();
            if req != reset_ack {
                reset_ack = req;
                max_stall = 0;
                st.set_max_stall(0, 0);
                st.set_stall_reset_ack(req);
            }
            if gap > max_stall {
                max_stall = gap;
                st.set_max_stall(gap, now);
            }

            let write = if interval == 0 {
                unpaced_count += 1;
                !unpaced_count.is_multiple_of(UNPACED_WRITES_PER_VERIFY + 1)
            } else if now >= next_write {
                next_write += interval;
                if now > next_write + max_backlog {
                    next_write = now.saturating_sub(max_backlog);
                }
                true
            } else {
                false
            };
            if write {
                let page = self.pick_page();
                self.write_page(page);
            } else {
                self.verify_next();
            }
            if self.hostile_console && heartbeat.is_multiple_of(64) {
                sys::print_bytes(HOSTILE_LINE);
                // Not a stall: the guest chose to print.
                prev = rdtsc();
            }

            if self.mismatches != last_mismatches {
                // A mismatch was just printed: do not count the printing as a stall.
                last_mismatches = self.mismatches;
                prev = rdtsc();
            }
            if now.saturating_sub(last_report) >= hz {
                let el = now.saturating_sub(last_report).max(1);
                let per_s = |d: u64| (u128::from(d) * u128::from(hz) / u128::from(el)) as u64;
                let dw = self.written - last_written;
                let dv = self.verified - last_verified;
                let ds = self.sweeps - last_sweeps;
                let stall_us = (u128::from(max_stall) * 1_000_000 / u128::from(hz)) as u64;
                let mut l = Line::new();
                let _ = write!(
                    l,
                    "perfplus-guest: t={}s written={} (+{}/s) verified={} (+{}/s) sweeps={} (+{}/s",
                    now.saturating_sub(start) / hz,
                    self.written,
                    per_s(dw),
                    self.verified,
                    per_s(dv),
                    self.sweeps,
                    per_s(ds)
                );
                if let Some(us) = (el * 1_000_000 / hz).checked_div(ds) {
                    let _ = write!(l, ", {us} us/sweep");
                }
                let _ = write!(l, ") mismatches={} max_stall={}us", self.mismatches, stall_us);
                if self.progress {
                    l.print();
                }
                last_report = now;
                last_written = self.written;
                last_verified = self.verified;
                last_sweeps = self.sweeps;
                // Exclude the printing from the stall measurement.
                prev = rdtsc();
            }
        }
    }
}

// The working set is made of whole pages of u64 words.
const _: () = assert!(WORDS * 8 == PAGE_SIZE);
