//! Destination side of post-copy: per-page state, the fault thread, the pass that maps present pages,
//! and the loop that installs pages as they come (demanded or pushed) until every page is present.
//!
//! Guest RAM is one memfd with two views ([`perfplus_vmm::memory`]): the guest view (KVM's) is
//! registered with userfaultfd in MISSING and MINOR modes, and has no page-table entry at the switch;
//! the agent view never faults. Where a page's content is decides how the guest faults on it and how it
//! is installed: a **hole** of the memfd faults MISSING and takes `UFFDIO_COPY` (`UFFDIO_ZEROPAGE`);
//! a page **in the page cache** (written in pre-copy) faults MINOR and is mapped with
//! `UFFDIO_CONTINUE`, after its content was replaced through the agent view if it is stale. Nothing is
//! punched out at the switch: the guest cannot read a stale page, it has no entry for it until the
//! CONTINUE that follows the new content.
//!
//! ```text
//!  state (PageTable)      its content here    guest fault (fault thread)        its content arrives
//!  ─────────────────────  ──────────────────  ────────────────────────────────  ──────────────────────
//!  MISSING                a hole              MISSING: request it ─► REQUESTED  COPY ─► PRESENT
//!  MISSING                stale, in the       MINOR: request it ─► REQUESTED    write (agent view),
//!                         page cache                                            CONTINUE ─► PRESENT
//!  REQUESTED              as MISSING          nothing (its request is out)      as MISSING ─► PRESENT
//!  ZERO_LOCAL             a hole, zero        MISSING: ZEROPAGE; MINOR:         (never sent)
//!                                             CONTINUE
//!  PRESENT                current, in the     MINOR: CONTINUE its run of        nothing (installed
//!                         page cache          present pages (≤ 64); else WAKE   once)
//! ```
//! Content may arrive before any fault (pushed, or eager before the resume): MISSING → PRESENT the same
//! way. A hole that something read through the agent view is in the page cache after all (a zero
//! page): its COPY fails with EEXIST and it is installed as a stale page. Every install maps the page
//! and wakes the vCPUs waiting on it; a page is requested at most once per connection, a page already
//! present is never requested nor written again, and a page only ever becomes PRESENT with the
//! source's content (or ZERO_LOCAL with zeros) mapped. Right after the resume, [`MapPass`] maps every
//! present page's run with `UFFDIO_CONTINUE`, so that the guest soon stops taking minor faults on
//! pages that were current at the switch.
//!
//! A lost connection changes nothing for the guest: its vCPUs wait on their faults. The loop waits for
//! the source to attach a new bulk connection (answers `ResumeState` with the pages still missing), then
//! a new demand channel, and sends the outstanding requests again. No error after the switch lets a
//! missing page become zeros: every failure of a connection or of a batch counts as a lost link; the
//! userfaultfd registration stays until every page is present.
//!
//! Fail-safe ([`run`]): while the link is down the VM's status note says since when it waits for pages.
//! If the link stays down for the migration's post-copy time limit (or the source says it gave up), the
//! guest is paused, still waiting for the source to reconnect (it is resumed if it does). An operator's
//! cancel pauses it and ends the migration with [`PostcopyAbandoned`]: the agent then destroys this
//! incomplete copy (the source's paused copy, stale since the switch, is what remains).
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::connection::ConnectionError;
use perfplus_vmm::vm::Vm;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::{bitmap_of, send_bounded, AttachRx, LINK_TIMEOUT, PING_INTERVAL};
use crate::content_index::ContentIndex;
use crate::fault_injection;
use crate::hashing::{page_checksum, PageDigest};
use crate::migration::page_sink::{apply_batch, HeldCounts, IndexedVm, PageSink};
use crate::migration::signals::{time_of_day, CancelSignal, StatusNote};
use crate::report::Latency;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::{PageBatch, PAGE_REQUEST_MAX};
use perfplus_protocol::{Channel, Message, PostcopyStats};
use perfplus_vmm::demand_paging::{Fault, GuestUffd, Installed};
use perfplus_vmm::PageSet;

pub const MISSING: u8 = 0;
pub const ZERO_LOCAL: u8 = 1;
pub const REQUESTED: u8 = 2;
pub const PRESENT: u8 = 3;

/// Each page's state at the switch, and the stale pages (missing although pre-copy wrote them here):
/// MISSING where the source says so, PRESENT where pre-copy wrote the page, ZERO_LOCAL elsewhere.
pub fn states_at_switch(missing: &PageSet, written: &[bool]) -> (Vec<u8>, PageSet) {
    let mut stale = PageSet::new(missing.capacity());
    let states = (0..missing.capacity())
        .map(|p| {
            if missing.contains(p) {
                if written[p as usize] {
                    stale.insert(p);
                }
                MISSING
            } else if written[p as usize] {
                PRESENT
            } else {
                ZERO_LOCAL
            }
        })
        .collect();
    (states, stale)
}

/// Pages the fault thread maps around a minor fault on a present page, at most: the run of present
/// pages around it within its aligned block of this many pages (one `UFFDIO_CONTINUE`).
pub const FAULT_MAP_RUN: u64 = 64;
/// Pages [`MapPass`] maps with one `UFFDIO_CONTINUE`, at most (2 MiB).
const PASS_MAP_RUN: u64 = 512;

/// What the destination knows of each page; shared with the fault thread.
pub struct PageTable {
    uffd: GuestUffd,
    state: Vec<AtomicU8>,
    /// Pages whose stale content is in the memfd's page cache at the switch (sent in pre-copy,
    /// missing since): installed by a write through the agent view and a CONTINUE, not a COPY.
    stale: PageSet,
    /// xxh3 of each page's content as installed (what the source compares at the end).
    checksums: Vec<AtomicU64>,
    /// Pages that need nothing more from the source (PRESENT or ZERO_LOCAL).
    done: AtomicU64,
    faults: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<f64>>,
    demand_faults: AtomicU64,
    local_faults: AtomicU64,
    /// Minor faults on present pages (resolved by mapping them), and pages [`MapPass`] mapped.
    minor_faults: AtomicU64,
    pass_mapped: AtomicU64,
}

impl PageTable {
    /// `states[i]` is MISSING, ZERO_LOCAL or PRESENT; `checksums` the content of present pages;
    /// `stale` the missing pages whose old content is in the page cache (the others are holes).
    pub fn new(uffd: GuestUffd, states: Vec<u8>, checksums: Vec<u64>, stale: PageSet) -> PageTable {
        let done = states.iter().filter(|&&s| s != MISSING).count() as u64;
        PageTable {
            uffd,
            state: states.into_iter().map(AtomicU8::new).collect(),
            stale,
            checksums: checksums.into_iter().map(AtomicU64::new).collect(),
            done: AtomicU64::new(done),
            faults: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            demand_faults: AtomicU64::new(0),
            local_faults: AtomicU64::new(0),
            minor_faults: AtomicU64::new(0),
            pass_mapped: AtomicU64::new(0),
        }
    }

    pub fn pages(&self) -> u64 {
        self.state.len() as u64
    }

    pub fn all_done(&self) -> bool {
        self.done.load(Ordering::Acquire) == self.pages()
    }

    pub fn done_count(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    fn state(&self, page: u64) -> u8 {
        self.state[page as usize].load(Ordering::Acquire)
    }

    /// Installs `data` at `page` unless it is present already. True if it was installed now.
    pub fn install(&self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<bool> {
        if matches!(self.state(page), PRESENT | ZERO_LOCAL) {
            return Ok(false);
        }
        let installed = self.put(page, data)?;
        if installed == Installed::New {
            self.checksums[page as usize].store(page_checksum(data), Ordering::Release);
        } else {
            self.mapped_before_install(page);
        }
        self.mark_present(page);
        Ok(installed == Installed::New)
    }

    /// Installs a zero page at `page` unless it is present already.
    pub fn install_zero(&self, page: u64) -> anyhow::Result<bool> {
        let installed = match self.state(page) {
            PRESENT => return Ok(false),
            // A hole known to be zero (perhaps zeroed by a fault already): a zero page, if none is there.
            ZERO_LOCAL => self.uffd.zero(page)?,
            _ => {
                let installed = self.put(page, &[0; PAGE_SIZE])?;
                if installed != Installed::New {
                    self.mapped_before_install(page);
                }
                installed
            }
        };
        if installed == Installed::New {
            self.checksums[page as usize].store(page_checksum(&[0; PAGE_SIZE]), Ordering::Release);
        }
        self.mark_present(page);
        Ok(installed == Installed::New)
    }

    /// Puts `data` into `page`, which is not present (MISSING or REQUESTED): the guest view has no
    /// entry for it. A hole takes one `UFFDIO_COPY`; a page in the page cache (stale, or a hole that a
    /// read through the agent view filled with zeros, which the COPY finds) is rewritten through the
    /// agent view, then mapped with `UFFDIO_CONTINUE`. Either maps the page and wakes its waiters.
    fn put(&self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<Installed> {
        if !self.stale.contains(page) && self.uffd.copy(page, data)? == Installed::New {
            return Ok(Installed::New);
        }
        self.uffd.replace(page, data)
    }

    /// The guest view mapped a page before its content arrived: it must not happen (only this table
    /// maps pages, and a missing one only once its content is in). Its checksum stays unknown, so the
    /// source's comparison reports it lost rather than the guest running on it unnoticed.
    fn mapped_before_install(&self, page: u64) {
        tracing::error!(
            page,
            "a missing page was mapped in the guest before its content arrived"
        );
        self.uffd.wake(page);
    }

    fn mark_present(&self, page: u64) {
        let old = self.state[page as usize].swap(PRESENT, Ordering::AcqRel);
        if matches!(old, MISSING | REQUESTED) {
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        if old == REQUESTED {
            let started = self.faults.lock().expect("faults lock").remove(&page);
            if let Some(started) = started {
                let seconds = started.elapsed().as_secs_f64();
                crate::metrics::get().fault_latency_seconds.observe(seconds);
                self.latencies_us.lock().expect("latency lock").push(seconds * 1e6);
            }
        }
    }

    /// A fault: request the page (once), resolve it locally (zero, or map a present page's run), or
    /// wake a waiter whose page got mapped meanwhile.
    fn on_fault(&self, fault: Fault, requests: &UnboundedSender<u64>) {
        let page = fault.page;
        loop {
            match self.state(page) {
                MISSING => {
                    if self.state[page as usize]
                        .compare_exchange(MISSING, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.faults.lock().expect("faults lock").insert(page, Instant::now());
                        self.demand_faults.fetch_add(1, Ordering::Relaxed);
                        let _ = requests.send(page);
                        return;
                    }
                }
                ZERO_LOCAL => {
                    self.local_faults.fetch_add(1, Ordering::Relaxed);
                    // A hole gets a zero page. A minor fault: the page is in the page cache already,
                    // zero (a read through the agent view allocated it, or an earlier zero page lost
                    // its mapping): map it. A zero page refused for the same reason: likewise.
                    let zeroed = !fault.minor
                        && match self.uffd.zero(page) {
                            Ok(installed) => installed == Installed::New,
                            Err(e) => {
                                tracing::error!("resolving a fault on zero page {page}: {e:#}");
                                return;
                            }
                        };
                    if !zeroed {
                        self.map_or_wake(page);
                    }
                    // Stays ZERO_LOCAL (already counted as done); a later fault is a stale message.
                    return;
                }
                REQUESTED => return,
                _ if fault.minor => {
                    self.minor_faults.fetch_add(1, Ordering::Relaxed);
                    self.map_around(page);
                    return;
                }
                _ => {
                    self.uffd.wake(page);
                    return;
                }
            }
        }
    }

    /// Maps `page` alone, or wakes its waiters if it is mapped already.
    fn map_or_wake(&self, page: u64) {
        match self.uffd.map(page, 1) {
            Ok(1) => {}
            Ok(_) => self.uffd.wake(page),
            Err(e) => tracing::error!("mapping guest page {page} after a fault: {e:#}"),
        }
    }

    /// A minor fault on present page `page`: maps the run of present pages around it within its
    /// aligned block of [`FAULT_MAP_RUN`] pages (never past a page that is not present), with as few
    /// `UFFDIO_CONTINUE`s as the pages already mapped in it allow, and makes sure its waiters wake.
    fn map_around(&self, page: u64) {
        let block = page - page % FAULT_MAP_RUN;
        let block_end = (block + FAULT_MAP_RUN).min(self.pages());
        let mut first = page;
        while first > block && self.state(first - 1) == PRESENT {
            first -= 1;
        }
        let mut end = page + 1;
        while end < block_end && self.state(end) == PRESENT {
            end += 1;
        }
        let mut woken = false;
        let mut at = first;
        while at < end {
            match self.uffd.map(at, end - at) {
                // Mapped already (by the pass, or a fault on a neighbour): skip it.
                Ok(0) => at += 1,
                Ok(n) => {
                    woken |= (at..at + n).contains(&page);
                    at += n;
                }
                Err(e) => {
                    tracing::error!("mapping present guest page {at} after a minor fault: {e:#}");
                    at += 1;
                }
            }
        }
        if !woken {
            self.uffd.wake(page);
        }
    }

    /// Maps every present page's run into the guest view, `PASS_MAP_RUN` pages per call at most, until
    /// done or `stop`; returns the pages it mapped (pages mapped already are skipped).
    fn map_present(&self, stop: &AtomicBool) -> anyhow::Result<u64> {
        let pages = self.pages();
        let mut mapped = 0;
        let mut page = 0;
        while page < pages && !stop.load(Ordering::Relaxed) {
            if self.state(page) != PRESENT {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < pages && end - page < PASS_MAP_RUN && self.state(end) == PRESENT {
                end += 1;
            }
            match self.uffd.map(page, end - page)? {
                0 => page += 1,
                n => {
                    mapped += n;
                    self.pass_mapped.fetch_add(n, Ordering::Relaxed);
                    page += n;
                }
            }
        }
        Ok(mapped)
    }

    /// Pages not done yet, as a bitmap.
    pub fn missing_bitmap(&self) -> Vec<u64> {
        bitmap_of(self.pages(), |p| matches!(self.state(p), MISSING | REQUESTED))
    }

    pub fn requested_pages(&self) -> Vec<u64> {
        (0..self.pages()).filter(|&p| self.state(p) == REQUESTED).collect()
    }

    pub fn checksums(&self) -> Vec<u64> {
        self.checksums.iter().map(|c| c.load(Ordering::Acquire)).collect()
    }

    pub fn unregister(&self) -> anyhow::Result<()> {
        self.uffd.unregister()
    }
}

/// Post-copy installs through the page table: `UFFDIO_COPY` (or a write and `UFFDIO_CONTINUE`) wakes
/// the vCPUs waiting on the page, and a page already present is left alone.
impl PageSink for &PageTable {
    fn pages(&self) -> u64 {
        PageTable::pages(self)
    }

    fn install(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<bool> {
        PageTable::install(self, page, data)
    }

    fn install_zero(&mut self, page: u64) -> anyhow::Result<bool> {
        PageTable::install_zero(self, page)
    }
}

/// A thread of this module's: it runs its work in the migration's span (its id on every line) until
/// the work ends or the flag it is given is set; dropping it sets the flag and waits for it.
struct StoppableThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl StoppableThread {
    fn spawn(name: &str, work: impl FnOnce(&AtomicBool) + Send + 'static) -> std::io::Result<StoppableThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let span = tracing::Span::current();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _span = span.enter();
            work(&flag);
        })?;
        Ok(StoppableThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Waits for the work to end by itself.
    fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StoppableThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The fault thread: reads faults until stopped (when this is dropped), hands requests to the network
/// loop.
pub struct FaultThread {
    _running: StoppableThread,
}

impl FaultThread {
    pub fn spawn(table: Arc<PageTable>, requests: UnboundedSender<u64>) -> anyhow::Result<FaultThread> {
        let thread = StoppableThread::spawn("uffd-faults", move |stop| {
            while !stop.load(Ordering::Acquire) {
                match table.uffd.next_fault_kind(50) {
                    Ok(Some(fault)) => table.on_fault(fault, &requests),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("userfaultfd: {e:#}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .context("starting the userfaultfd fault thread")?;
        Ok(FaultThread { _running: thread })
    }
}

/// The pass that maps every present page into the guest view right after the resume (see the module
/// doc), on a thread of its own; dropping it stops it.
pub struct MapPass(StoppableThread);

impl MapPass {
    pub fn spawn(table: Arc<PageTable>) -> anyhow::Result<MapPass> {
        let thread = StoppableThread::spawn("uffd-map", move |stop| {
            let started = Instant::now();
            match table.map_present(stop) {
                Ok(mapped) => tracing::info!(
                    mapped,
                    present = (0..table.pages()).filter(|&p| table.state(p) == PRESENT).count(),
                    ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                    stopped = stop.load(Ordering::Relaxed),
                    "post-copy: present pages mapped into the guest"
                ),
                // Only a shortcut: faults map what the pass did not.
                Err(e) => tracing::warn!("post-copy: mapping present pages stopped: {e:#}"),
            }
        })
        .context("starting the post-copy mapping pass")?;
        Ok(MapPass(thread))
    }

    /// Waits for the pass to finish (for tests).
    pub fn join(self) {
        self.0.join();
    }
}

/// What the loop needs besides the connections.
pub struct Session {
    pub table: Arc<PageTable>,
    pub fault_thread: Option<FaultThread>,
    /// Started at the resume.
    pub map_pass: Option<MapPass>,
    pub requests: UnboundedReceiver<u64>,
    pub vm_key: String,
    pub index: Arc<Mutex<ContentIndex>>,
    pub hashing: bool,
    pub zero_digest: PageDigest,
    pub held: HeldCounts,
    /// References that could not be resolved: to be requested in full.
    pub unresolved: BTreeSet<u64>,
    pub resumed_at: Instant,
    pub reconnects: u32,
    /// The source, as the operator knows it (for the status note).
    pub source: String,
    pub migration_id: String,
    /// How long the link may stay down before the guest is paused.
    pub limit: Duration,
    pub note: StatusNote,
    pub cancel: CancelSignal,
}

/// Post-copy given up on the destination by an operator's cancel: the guest here lacks pages and is
/// paused (never resumed); the agent destroys it.
#[derive(Debug, thiserror::Error)]
#[error("post-copy cancelled by an operator with {missing} pages still missing: this incomplete copy cannot run")]
pub struct PostcopyAbandoned {
    pub missing: u64,
}

impl Session {
    /// Applies a batch of pages (pushed, demanded or eager).
    pub fn apply(&mut self, batch: &PageBatch) -> anyhow::Result<()> {
        let mut index = self.index.lock().expect("content index lock");
        let mut indexed = IndexedVm {
            index: &mut index,
            vm_key: &self.vm_key,
            hashing: self.hashing,
            zero_digest: &self.zero_digest,
        };
        apply_batch(
            batch,
            &mut &*self.table,
            &mut indexed,
            &mut self.held,
            &mut self.unresolved,
        )
    }

    /// The measurements so far.
    pub fn stats(&self) -> PostcopyStats {
        let mut samples = self.table.latencies_us.lock().expect("latency lock").clone();
        PostcopyStats {
            demand_faults: self.table.demand_faults.load(Ordering::Relaxed),
            local_faults: self.table.local_faults.load(Ordering::Relaxed),
            fault_latency_us: Latency::of(&mut samples),
            postcopy_ms: self.resumed_at.elapsed().as_secs_f64() * 1e3,
            reconnects: self.reconnects,
        }
    }
}

enum Event {
    Demand(anyhow::Result<Message>),
    Bulk(anyhow::Result<Message>),
    Request(u64),
    Tick,
    Attach(Connection, Channel),
    /// The link has been down for the time limit.
    Stall,
    Cancel,
}

/// Sends `pages` as page requests (in frames of at most [`PAGE_REQUEST_MAX`]).
async fn request(demand: &mut Connection, full: bool, pages: &[u64]) -> anyhow::Result<()> {
    for chunk in pages.chunks(PAGE_REQUEST_MAX) {
        send_bounded(
            demand,
            &Message::PageRequest {
                full,
                pages: chunk.to_vec(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Runs post-copy until every page is present, surviving lost connections; `bulk` is replaced by the
/// source's new bulk connection after a resume. Sends `AllPresent` at the end and unregisters the
/// memory from userfaultfd. Returns the measurements and the demand channel, to be closed only after
/// the final exchange (a source that sees it close before `AllPresent` would take the link for lost).
pub async fn run(
    session: &mut Session,
    vm: &Arc<Vm>,
    bulk: &mut Connection,
    demand: Connection,
    attach: &mut AttachRx,
) -> anyhow::Result<(PostcopyStats, Option<Connection>)> {
    let mut demand = Some(demand);
    let mut applied_bytes = 0u64;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While the link is down: since when (for the note and the time limit).
    let mut down_since: Option<(Instant, String)> = None;
    // The link stayed down for the time limit (or the source gave up) and the guest was paused (`paused`:
    // the pause worked); both undone when the link comes back.
    let mut stalled = false;
    let mut paused = false;
    let cancel = session.cancel.clone();
    loop {
        if session.table.all_done() {
            break;
        }
        let event = match demand.as_mut() {
            Some(dem) => tokio::select! {
                msg = dem.recv() => Event::Demand(msg),
                msg = bulk.recv() => Event::Bulk(msg),
                Some(page) = session.requests.recv() => Event::Request(page),
                _ = tick.tick() => Event::Tick,
                Some((conn, channel)) = attach.recv() => Event::Attach(conn, channel),
                _ = cancel.cancelled() => Event::Cancel,
            },
            // Link down: the guest's faults wait; their requests are kept in the table for the resume.
            None => {
                let stall_at = down_since.as_ref().map_or_else(Instant::now, |(at, _)| *at) + session.limit;
                tokio::select! {
                    Some((conn, channel)) = attach.recv() => Event::Attach(conn, channel),
                    Some(_page) = session.requests.recv() => continue,
                    _ = tokio::time::sleep_until(stall_at.into()), if !stalled => Event::Stall,
                    _ = cancel.cancelled() => Event::Cancel,
                }
            }
        };
        let lost: Option<anyhow::Error> = match event {
            Event::Demand(msg) => {
                let dem = demand.as_mut().expect("demand channel up");
                match msg {
                    Ok(Message::Pages(batch)) => {
                        last_heard = Instant::now();
                        match session.apply(&batch) {
                            Ok(()) => flush_unresolved(session, dem).await.err(),
                            Err(err) => Some(err.context("applying demanded pages")),
                        }
                    }
                    Ok(Message::Ping) => {
                        last_heard = Instant::now();
                        None
                    }
                    Ok(other) => Some(anyhow::anyhow!(
                        "source sent {} on the demand channel",
                        other.describe()
                    )),
                    Err(e) => Some(e),
                }
            }
            Event::Bulk(msg) => match msg {
                Ok(Message::Pages(batch)) => {
                    if let Err(err) = session.apply(&batch) {
                        // Whatever the batch held stays missing; the source resends it after a resume.
                        demand = None;
                        tracing::error!("applying pushed pages: {err:#}");
                        down_since.get_or_insert_with(|| (Instant::now(), time_of_day()));
                        continue;
                    }
                    applied_bytes += batch.payload_len() as u64;
                    fault_injection::reached("dest:postcopy-push").await;
                    let ack = Message::PushAck {
                        bytes: applied_bytes,
                        present: session.table.done_count(),
                    };
                    match send_bounded(bulk, &ack).await {
                        Ok(()) => flush_unresolved(session, demand.as_mut().expect("demand channel up"))
                            .await
                            .err(),
                        Err(e) => Some(e),
                    }
                }
                Ok(Message::Ping) => None,
                Ok(other) => Some(anyhow::anyhow!("source sent {} on the bulk channel", other.describe())),
                Err(e) => Some(e),
            },
            Event::Request(page) => {
                let mut pages = vec![page];
                while pages.len() < PAGE_REQUEST_MAX {
                    match session.requests.try_recv() {
                        Ok(p) => pages.push(p),
                        Err(_) => break,
                    }
                }
                match request(demand.as_mut().expect("demand channel up"), false, &pages).await {
                    Ok(()) => {
                        fault_injection::reached("dest:postcopy-demand").await;
                        None
                    }
                    Err(err) => Some(err),
                }
            }
            Event::Tick => {
                if last_heard.elapsed() > LINK_TIMEOUT {
                    Some(anyhow::anyhow!(
                        "nothing from the source for {:.1} s",
                        last_heard.elapsed().as_secs_f64()
                    ))
                } else {
                    send_bounded(demand.as_mut().expect("demand channel up"), &Message::Ping)
                        .await
                        .err()
                }
            }
            Event::Attach(conn, Channel::Bulk) => {
                // A new bulk connection replaces whatever was there (the source saw the link die,
                // perhaps before this side did).
                *bulk = conn;
                demand = None;
                match resume(session, bulk, attach).await {
                    Ok(d) => {
                        demand = Some(d);
                        applied_bytes = 0;
                        last_heard = Instant::now();
                        down_since = None;
                        session.note.clear();
                        stalled = false;
                        if std::mem::take(&mut paused) {
                            if let Err(err) = vm.resume() {
                                tracing::error!("resuming the post-copy guest after the link came back: {err:#}");
                            }
                            tracing::info!("post-copy link back: the guest runs again");
                        }
                        fault_injection::reached("dest:postcopy-resume").await;
                    }
                    Err(e) => tracing::warn!("post-copy resume failed: {e:#}"),
                }
                None
            }
            Event::Attach(_, Channel::Demand) => {
                tracing::warn!("a demand channel arrived without a new bulk connection; ignored");
                None
            }
            Event::Stall => {
                stalled = true;
                paused = stall(session, vm, "the post-copy time limit passed without a link");
                None
            }
            Event::Cancel => {
                let missing = session.table.pages() - session.table.done_count();
                // The vCPUs are told to exit before the userfaultfd goes (when the session drops): a
                // fault then completes only to leave KVM_RUN, and the VM is destroyed, never resumed.
                vm.request_stop();
                session.note.set(format!(
                    "stopped: post-copy cancelled with {missing} pages missing; being destroyed"
                ));
                tracing::error!(
                    missing,
                    "post-copy cancelled by an operator: this incomplete copy is destroyed"
                );
                return Err(PostcopyAbandoned { missing }.into());
            }
        };
        if let Some(err) = lost {
            let missing = session.table.pages() - session.table.done_count();
            if demand.is_some() {
                tracing::warn!(
                    missing,
                    "post-copy link lost, the guest waits on its faults until the source reconnects: {err:#}"
                );
            }
            demand = None;
            let (_, since) = down_since.get_or_insert_with(|| (Instant::now(), time_of_day()));
            if !stalled {
                session.note.set(format!(
                    "waiting for pages from {} since {since} ({missing} missing; migration {})",
                    session.source, session.migration_id
                ));
            }
            let gave_up = err
                .downcast_ref::<ConnectionError>()
                .is_some_and(|e| matches!(e, ConnectionError::PeerReported { .. }));
            if gave_up && !stalled {
                // The source said why it ends: it will not reconnect by itself.
                stalled = true;
                paused = stall(session, vm, &format!("{err:#}"));
            }
        }
    }
    // Every page is here: stop intercepting faults (what is not mapped yet faults in as usual).
    session.map_pass.take();
    session.fault_thread.take();
    session.table.unregister()?;
    let stats = session.stats();
    tracing::info!(
        postcopy_ms = format!("{:.1}", stats.postcopy_ms),
        demand_faults = stats.demand_faults,
        minor_faults = session.table.minor_faults.load(Ordering::Relaxed),
        pass_mapped = session.table.pass_mapped.load(Ordering::Relaxed),
        p99_us = format!("{:.0}", stats.fault_latency_us.p99),
        "post-copy: every page present"
    );
    if send_bounded(bulk, &Message::AllPresent).await.is_err() {
        // The source will reconnect and learn from ResumeState that nothing is missing.
        await_final_attach(session, bulk, attach).await?;
    }
    Ok((stats, demand))
}

/// Pauses the guest because its pages cannot come now (`why`), and says so in its status note. The
/// pause is asked for, not waited for: a vCPU blocked on a missing page stays blocked (it never runs on
/// anything but the guest's own pages) and parks when its page comes. Returns true (a pause to undo).
fn stall(session: &Session, vm: &Arc<Vm>, why: &str) -> bool {
    let missing = session.table.pages() - session.table.done_count();
    vm.request_pause();
    session.note.set(format!(
        "post-copy stalled since {} ({why}), {missing} pages missing from {}: the guest is paused (a \
         vCPU blocked on a missing page stays blocked); it resumes if the source reconnects; \
         `perfplus migrate --cancel {}` on this agent gives it up (destroys this incomplete copy)",
        time_of_day(),
        session.source,
        session.migration_id
    ));
    tracing::error!(
        missing,
        "post-copy stalled ({why}): the guest is paused and waits for its pages"
    );
    true
}

async fn flush_unresolved(session: &mut Session, demand: &mut Connection) -> anyhow::Result<()> {
    if session.unresolved.is_empty() {
        return Ok(());
    }
    let pages: Vec<u64> = std::mem::take(&mut session.unresolved).into_iter().collect();
    request(demand, true, &pages).await
}

/// A new bulk connection arrived: tell the source what is missing, wait for the new demand channel,
/// and send the outstanding requests again.
async fn resume(session: &mut Session, bulk: &mut Connection, attach: &mut AttachRx) -> anyhow::Result<Connection> {
    send_bounded(
        bulk,
        &Message::ResumeState {
            missing: session.table.missing_bitmap(),
        },
    )
    .await?;
    let (mut demand, channel) = tokio::time::timeout(Duration::from_secs(10), attach.recv())
        .await
        .context("no demand channel within 10 s of the resume")?
        .context("the agent stopped handing over connections")?;
    if channel != Channel::Demand {
        bail!("expected the demand channel after a resumed bulk connection");
    }
    // Requests made while the link was down are in the table (REQUESTED): send them all again.
    while session.requests.try_recv().is_ok() {}
    let requested = session.table.requested_pages();
    request(&mut demand, false, &requested).await?;
    flush_unresolved(session, &mut demand).await?;
    session.reconnects += 1;
    tracing::info!(
        outstanding = requested.len(),
        missing = session.table.pages() - session.table.done_count(),
        "post-copy resumed"
    );
    Ok(demand)
}

/// The link died right as the last page arrived: answer the source's reconnection with an empty
/// `ResumeState` (it then knows everything is present), within a minute.
async fn await_final_attach(session: &mut Session, bulk: &mut Connection, attach: &mut AttachRx) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (conn, channel) = tokio::time::timeout(left, attach.recv())
            .await
            .context("the source did not reconnect after the last page")?
            .context("the agent stopped handing over connections")?;
        if channel == Channel::Bulk {
            *bulk = conn;
            bulk.send(&Message::ResumeState {
                missing: session.table.missing_bitmap(),
            })
            .await?;
            return Ok(());
        }
    }
}

/// The page states on real userfaultfd faults: a thread reading the guest view stands for a vCPU in
/// the first test, the built-in guest on a real KVM VM in the second.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use perfplus_vmm::memory::GuestMemory;
    use perfplus_vmm::tracking::{self, TrackerKind};
    use perfplus_vmm::vm::{builtin_guest, RunState, Vm};
    use tokio::sync::mpsc::error::TryRecvError;

    use super::*;

    /// Reads byte 0 of `page` through the guest view, as a vCPU would, on a thread.
    fn guest_read(memory: &Arc<GuestMemory>, page: u64) -> std::thread::JoinHandle<u8> {
        let memory = memory.clone();
        std::thread::spawn(move || {
            // SAFETY: inside the guest view (`page` < the memory's pages), kept mapped by `memory`
            // until the read is done; a raw read, no reference.
            unsafe { memory.guest_view_addr().add(page as usize * PAGE_SIZE).read_volatile() }
        })
    }

    /// Whether the guest view maps `page` (`/proc/self/pagemap`, bit 63).
    fn mapped(memory: &GuestMemory, page: u64) -> bool {
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut entry = [0u8; 8];
        let index = memory.guest_view_addr() as u64 / PAGE_SIZE as u64 + page;
        pagemap.read_exact_at(&mut entry, index * 8).unwrap();
        u64::from_le_bytes(entry) >> 63 == 1
    }

    fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    /// Every state of the module doc on one 128-page memory: pages 0..32 written in pre-copy (5 and 6
    /// dirtied since: stale), 40..43 missing holes, the rest known zero.
    #[test]
    fn faults_and_arrivals_take_each_page_to_present_the_right_way() {
        const PAGES: u64 = 128;
        let memory = Arc::new(GuestMemory::new(PAGES * PAGE_SIZE as u64).unwrap());
        let zero = page_checksum(&page_of(0));
        let mut states = vec![ZERO_LOCAL; PAGES as usize];
        let mut checksums = vec![zero; PAGES as usize];
        let mut stale = PageSet::new(PAGES);
        for page in 0..32 {
            memory.write_page(page, &page_of(1));
            states[page as usize] = PRESENT;
            checksums[page as usize] = page_checksum(&page_of(1));
        }
        for page in [5, 6] {
            states[page as usize] = MISSING;
            stale.insert(page);
        }
        for page in [40, 41, 42] {
            states[page as usize] = MISSING;
        }
        let uffd = GuestUffd::register(memory.clone()).unwrap();
        let table = Arc::new(PageTable::new(uffd, states, checksums, stale));
        assert_eq!(table.done_count(), PAGES - 5);
        let (tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let faults = FaultThread::spawn(table.clone(), tx).unwrap();

        // A minor fault on a present page: mapped as it is, with its run (7..32: the stale page 6 and
        // the zero page 32 bound it), and nothing is asked of the source.
        assert_eq!(guest_read(&memory, 10).join().unwrap(), 1);
        assert_eq!(table.minor_faults.load(Ordering::Relaxed), 1);
        assert!((7..32).all(|p| mapped(&memory, p)));
        assert!((0..7).chain(32..PAGES).all(|p| !mapped(&memory, p)));
        assert_eq!(requests.try_recv(), Err(TryRecvError::Empty));

        // A minor fault on a stale page: requested; the vCPU waits (the guest view has no entry for
        // the page) until the new content is in and mapped, and never sees the old.
        let reader = guest_read(&memory, 5);
        assert_eq!(requests.blocking_recv(), Some(5));
        assert_eq!(table.state(5), REQUESTED);
        assert!(!mapped(&memory, 5), "stale: not mapped while its content is on the way");
        assert!(table.install(5, &page_of(2)).unwrap());
        assert_eq!(reader.join().unwrap(), 2, "the new content, not the stale 1");
        assert_eq!(table.state(5), PRESENT);
        assert_eq!(table.checksums()[5], page_checksum(&page_of(2)));
        assert!(
            !table.install(5, &page_of(3)).unwrap(),
            "a page that arrives twice is installed once"
        );
        assert_eq!(guest_read(&memory, 5).join().unwrap(), 2);

        // Arrivals before any fault: a stale page (rewritten, mapped) and a hole (copied).
        assert!(table.install(6, &page_of(4)).unwrap());
        assert!(table.install(41, &page_of(5)).unwrap());
        assert!(mapped(&memory, 6) && mapped(&memory, 41));
        assert_eq!(guest_read(&memory, 6).join().unwrap(), 4);
        assert_eq!(guest_read(&memory, 41).join().unwrap(), 5);
        assert_eq!(requests.try_recv(), Err(TryRecvError::Empty), "nothing asked for");

        // A missing fault on a hole: requested, installed by a copy.
        let reader = guest_read(&memory, 40);
        assert_eq!(requests.blocking_recv(), Some(40));
        assert!(table.install_zero(40).unwrap());
        assert_eq!(reader.join().unwrap(), 0);

        // A hole that a read through the agent view filled with zeros: it faults as minor, and its
        // content arrives as for a stale page (the copy finds the page in the cache).
        let mut out = page_of(9);
        memory.read_page(42, &mut out);
        let reader = guest_read(&memory, 42);
        assert_eq!(requests.blocking_recv(), Some(42));
        assert!(table.install(42, &page_of(6)).unwrap());
        assert_eq!(reader.join().unwrap(), 6);
        assert_eq!(table.checksums()[42], page_checksum(&page_of(6)));

        // A page known to be zero: resolved here.
        assert_eq!(guest_read(&memory, 100).join().unwrap(), 0);
        assert_eq!(table.local_faults.load(Ordering::Relaxed), 1);
        assert_eq!(requests.try_recv(), Err(TryRecvError::Empty));
        assert!(table.all_done());
        assert_eq!(table.demand_faults.load(Ordering::Relaxed), 3);

        // The pass maps what is present and not mapped yet (0..5), nothing else.
        MapPass::spawn(table.clone()).unwrap().join();
        assert_eq!(table.pass_mapped.load(Ordering::Relaxed), 5);
        for page in 0..PAGES {
            let expected = page < 32 || (40..43).contains(&page) || page == 100;
            assert_eq!(mapped(&memory, page), expected, "page {page}");
        }
        drop(faults);
        table.unregister().unwrap();
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The built-in guest is copied while it runs (one pre-copy round), dirties pages after it, and is
    /// resumed on the copy in post-copy: the pages it dirtied fault (stale: MINOR) and get the
    /// source's content before the guest sees them; its own check of every page it wrote finds no
    /// mismatch, although every stale page holds poison until then.
    #[test]
    fn a_guest_resumed_over_stale_pages_sees_only_their_new_content() {
        const MEM: u64 = 16 << 20;
        let pages = MEM / PAGE_SIZE as u64;
        let mut src = Vm::create("pc-src", MEM, 1).unwrap();
        let cmdline = format!("working-set=1M rate=2k tsc_khz={}", src.tsc_khz());
        src.load_multiboot(builtin_guest::IMAGE, &cmdline).unwrap();
        src.start().unwrap();
        let status = |vm: &Vm| vm.guest_status().unwrap_or_default();
        wait_for("the guest's workload", || {
            status(&src).state == perfplus_common::guest_abi::state::RUNNING
        });
        let mut tracker = tracking::start(TrackerKind::DirtyLog, &src).unwrap();
        let mut dst = Vm::create("pc-dst", MEM, 1).unwrap();
        let mut written = vec![false; pages as usize];
        let mut data = [0u8; PAGE_SIZE];
        for range in src.memory().data_page_ranges().unwrap() {
            for page in range {
                src.memory().read_page(page, &mut data);
                dst.memory().write_page(page, &data);
                written[page as usize] = true;
            }
        }
        let sent = status(&src).pages_written;
        wait_for("the guest to write on", || status(&src).pages_written > sent + 300);
        src.pause().unwrap();
        let dirty = tracker.collect().unwrap();
        drop(tracker);
        let at_switch = status(&src);

        let (states, stale) = states_at_switch(&dirty, &written);
        let checksums: Vec<u64> = (0..pages)
            .map(|p| {
                dst.memory().read_page(p, &mut data);
                page_checksum(&data)
            })
            .collect();
        let missing = states.iter().filter(|&&s| s == MISSING).count() as u64;
        // What a stale page holds is what the guest wrote earlier, which its own check cannot tell
        // from its current content if it read the stale version numbers too: poison it, so that a
        // stale page it ever read would fail its check (or crash it).
        for page in stale.iter() {
            dst.memory().write_page(page, &page_of(0xee));
        }
        let working_set = at_switch.working_set_base / PAGE_SIZE as u64
            ..at_switch.working_set_base / PAGE_SIZE as u64 + at_switch.working_set_pages;
        let stale_in_working_set: Vec<u64> = stale.iter().filter(|p| working_set.contains(p)).collect();
        assert!(
            stale_in_working_set.len() > 100,
            "the guest dirtied pages it had before: {} stale of {missing} missing",
            stale.count()
        );

        dst.restore_state(&src.save_state().unwrap()).unwrap();
        let uffd = GuestUffd::register(dst.memory().clone()).unwrap();
        let table = Arc::new(PageTable::new(uffd, states, checksums, stale));
        let (tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let faults = FaultThread::spawn(table.clone(), tx).unwrap();
        dst.start().unwrap();
        let pass = MapPass::spawn(table.clone()).unwrap();
        let mut serve = |table: &PageTable| {
            while let Ok(page) = requests.try_recv() {
                src.memory().read_page(page, &mut data);
                table.install(page, &data).unwrap();
            }
        };
        // Demand only, until the guest has checked its whole working set twice: every stale page of
        // it faulted, was asked for and arrived.
        let running = |vm: &Vm| {
            assert_eq!(vm.run_state(), RunState::Running, "{}", vm.console_tail());
            let now = status(vm);
            assert_eq!(
                now.mismatches, 0,
                "the guest read pages that do not hold what it wrote: {now:?}"
            );
            now
        };
        wait_for("two verification sweeps on demanded pages", || {
            serve(&table);
            running(&dst).verify_sweeps >= at_switch.verify_sweeps + 2
        });
        for &page in &stale_in_working_set {
            assert_eq!(table.state(page), PRESENT, "stale page {page} of the working set");
        }
        assert!(table.demand_faults.load(Ordering::Relaxed) >= stale_in_working_set.len() as u64);
        // Then every page still missing, as the push would send it.
        for page in 0..pages {
            if matches!(table.state(page), MISSING | REQUESTED) {
                src.memory().read_page(page, &mut data);
                table.install(page, &data).unwrap();
            }
        }
        assert!(table.all_done());
        let checksums = table.checksums();
        for page in (0..pages).filter(|&p| dirty.contains(p)) {
            src.memory().read_page(page, &mut data);
            assert_eq!(
                checksums[page as usize],
                page_checksum(&data),
                "page {page} as the source has it"
            );
        }
        let now = status(&dst).verify_sweeps;
        wait_for("two more sweeps", || status(&dst).verify_sweeps >= now + 2);
        let after = status(&dst);
        assert_eq!(
            after.mismatches, 0,
            "the guest found pages that do not hold what it wrote: {after:?}"
        );
        assert_eq!(after.state, perfplus_common::guest_abi::state::RUNNING, "{after:?}");
        drop(pass);
        drop(faults);
        table.unregister().unwrap();
    }
}
