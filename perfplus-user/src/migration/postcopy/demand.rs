//! Destination side of post-copy: per-page state, the fault thread, and the loop that installs pages
//! as they come (demanded or pushed) until every page is present.
//!
//! Per page ([`PageTable`]): `MISSING` (the source has it) → `REQUESTED` (a fault asked for it) →
//! `PRESENT`; or `ZERO_LOCAL` (absent here, known to be zero: a fault resolves it locally with
//! `UFFDIO_ZEROPAGE`). Every transition to `PRESENT` installs the page with one `UFFDIO_COPY`, which
//! wakes the vCPUs waiting on it; a page is requested at most once per connection, and a page already
//! present is never requested.
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
use perfplus_vmm::demand_paging::{GuestUffd, Installed};

pub const MISSING: u8 = 0;
pub const ZERO_LOCAL: u8 = 1;
pub const REQUESTED: u8 = 2;
pub const PRESENT: u8 = 3;

/// What the destination knows of each page; shared with the fault thread.
pub struct PageTable {
    uffd: GuestUffd,
    state: Vec<AtomicU8>,
    /// xxh3 of each page's content as installed (what the source compares at the end).
    checksums: Vec<AtomicU64>,
    /// Pages that need nothing more from the source (PRESENT or ZERO_LOCAL).
    done: AtomicU64,
    faults: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<f64>>,
    demand_faults: AtomicU64,
    local_faults: AtomicU64,
}

impl PageTable {
    /// `states[i]` is MISSING, ZERO_LOCAL or PRESENT; `checksums` the content of present pages.
    pub fn new(uffd: GuestUffd, states: Vec<u8>, checksums: Vec<u64>) -> PageTable {
        let done = states.iter().filter(|&&s| s != MISSING).count() as u64;
        PageTable {
            uffd,
            state: states.into_iter().map(AtomicU8::new).collect(),
            checksums: checksums.into_iter().map(AtomicU64::new).collect(),
            done: AtomicU64::new(done),
            faults: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            demand_faults: AtomicU64::new(0),
            local_faults: AtomicU64::new(0),
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
        let installed = self.uffd.copy(page, data)?;
        if installed == Installed::New {
            self.checksums[page as usize].store(page_checksum(data), Ordering::Release);
        } else {
            // Something populated a page the table holds missing (it must not happen: every missing
            // page is punched after the registration). Its checksum stays unknown, so the source's
            // comparison reports it lost rather than the guest running on it unnoticed.
            tracing::error!(page, "a missing page was present before its content arrived");
        }
        self.mark_present(page);
        Ok(installed == Installed::New)
    }

    /// Installs a zero page at `page` unless it is present already.
    pub fn install_zero(&self, page: u64) -> anyhow::Result<bool> {
        if self.state(page) == PRESENT {
            return Ok(false);
        }
        let installed = self.uffd.zero(page)?;
        if installed == Installed::New {
            self.checksums[page as usize].store(page_checksum(&[0; PAGE_SIZE]), Ordering::Release);
        }
        self.mark_present(page);
        Ok(installed == Installed::New)
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

    /// A fault on `page`: request it (once), resolve it locally, or wake a stale waiter.
    fn on_fault(&self, page: u64, requests: &UnboundedSender<u64>) {
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
                    if let Err(e) = self.uffd.zero(page) {
                        tracing::error!("resolving a fault on zero page {page}: {e:#}");
                    }
                    // Stays ZERO_LOCAL (already counted as done); a later fault is a stale message.
                    return;
                }
                REQUESTED => return,
                _ => {
                    self.uffd.wake(page);
                    return;
                }
            }
        }
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

/// Post-copy installs through the page table: `UFFDIO_COPY` wakes the vCPUs waiting on the page, and a
/// page already present is left alone.
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

/// The fault thread: reads faults until `stop`, hands requests to the network loop.
pub struct FaultThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl FaultThread {
    pub fn spawn(table: Arc<PageTable>, requests: UnboundedSender<u64>) -> anyhow::Result<FaultThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The thread logs inside the migration's span (its id on every line).
        let span = tracing::Span::current();
        let handle = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                let _span = span.enter();
                while !flag.load(Ordering::Acquire) {
                    match table.uffd.next_fault(50) {
                        Ok(Some(page)) => table.on_fault(page, &requests),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!("userfaultfd: {e:#}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .context("starting the userfaultfd fault thread")?;
        Ok(FaultThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What the loop needs besides the connections.
pub struct Session {
    pub table: Arc<PageTable>,
    pub fault_thread: Option<FaultThread>,
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
    // Every page is here: stop intercepting faults.
    session.fault_thread.take();
    session.table.unregister()?;
    let stats = session.stats();
    tracing::info!(
        postcopy_ms = format!("{:.1}", stats.postcopy_ms),
        demand_faults = stats.demand_faults,
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
