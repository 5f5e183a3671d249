//! Source side of a pre-copy migration.
//!
//! ```text
//! connect + MigrateBegin ─► MigrateReady(held)
//! round 1: every page            ┐ guest runs; each round sends the pages the tracker reported
//! round 2..n: the dirty set      ┘ since the previous one, through the PageSender (Perf+ decisions)
//! converged (dirty set fits the downtime target at the measured rate) or round limit reached
//! pause ─► final dirty set ─► VmState ─► Running        (downtime = pause → Running)
//! ─► GroupChecksums (lost pages; PageChecksums of groups that differ) ─► GuestCheck ─► Complete(report)
//! ```
//! Until `Running` arrives every failure resumes the source guest and leaves it as it was (dirty
//! logging off again when the tracker is dropped). After `Running` the guest belongs to the
//! destination: the source never resumes it again, whatever happens next.
//!
//! Modes ([`MigrationMode`]): `precopy` as above; `postcopy` skips the rounds and switches at once;
//! `hybrid` runs rounds while the dirty set shrinks and switches to post-copy when a round leaves more
//! than half of what it sent dirty again (see `convergence`; round 1 checks this as it goes and stops
//! early, see [`RoundOneWatch`]), when the shrink rate seen could not reach the
//! downtime target within the round limit, or at the round limit. The switch (pause → `PostcopyBegin`
//! with the pages the destination lacks → eager pages → `VmState` → `Running`) is followed by
//! [`postcopy::supply::run`], which returns only once the destination has every page.

use std::time::Instant;

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use tokio::sync::mpsc::UnboundedSender;

use super::convergence::{too_dirty_to_iterate, Convergence, Decision, FirstRound, Heat, Prediction};
use super::outbound::Outbound;
use super::page_sender::{Content, PageDecision, PageSender, INSPECT_PAGES};
use super::postcopy;
use super::{agent_cpu_ms, PEER_TIMEOUT};
use crate::ebpf::{vcpu_threads_of, EbpfHeat, HeatSource};
use crate::fault_injection;
use crate::hashing::{page_checksum, PageDigest};
use crate::report::{assemble, sla_percent, MigrationReport, RoundReport};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::{PageBatch, PAGE_BATCH_MAX_ITEMS};
use perfplus_protocol::{Channel, GuestCheck, Message, MigrateBegin, MigrationMode, Role};
use perfplus_vmm::tracking::{self, DirtyTracker, TrackerKind};
use perfplus_vmm::vm::Vm;
use perfplus_vmm::PageSet;

/// A migration that reached the destination.
pub struct Completed {
    pub report: MigrationReport,
    /// Keyed digest of every page as the destination got it (hashing on), for the page store.
    pub page_digests: Option<Vec<PageDigest>>,
}

/// Where the guest stands on the source during a migration (see the switch-over in `perfplus_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ownership {
    /// The guest runs here.
    Running,
    /// Paused here for the switch, and still this host's: a failure resumes it.
    Paused,
    /// `Commit` went out (or its sending failed half-way): the destination may run the guest, so the
    /// engine never resumes it here.
    Committed,
}

/// A migration that failed after the source committed: the destination did not confirm that it runs
/// the guest, which stays paused on the source (never two running copies).
#[derive(Debug, thiserror::Error)]
#[error(
    "the guest was committed to {destination}, which did not confirm running it: it stays paused here; \
     resume it here (`perfplus vm resume`) only if {destination} does not run it"
)]
pub struct CommittedUnconfirmed {
    pub destination: String,
}

/// Moves the VM. On `Err` the source guest is running as before (it was resumed if it had been paused),
/// unless the error is a [`CommittedUnconfirmed`]: then it is paused here.
pub async fn migrate(job: Outbound, progress: UnboundedSender<RoundReport>) -> anyhow::Result<Completed> {
    let cpu_start = agent_cpu_ms();
    let started = Instant::now();
    let mut conn = Connection::connect(&job.destination, Role::Peer, &job.credentials)
        .await
        .with_context(|| format!("connecting to destination agent {}", job.destination))?;
    conn.set_compression(job.options.compression.mode())?;
    let mut ownership = Ownership::Running;
    let result = precopy(&job, &mut conn, &progress, started, &mut ownership).await;
    let mut switched = match result {
        Ok(switched) => switched,
        Err(err) => {
            match ownership {
                Ownership::Running => {}
                Ownership::Paused => {
                    if let Err(resume_err) = job.vm.resume() {
                        tracing::error!(vm = %job.vm_name, "could not resume the source guest after a failed migration: {resume_err:#}");
                    }
                }
                Ownership::Committed => {
                    let err = err.context(CommittedUnconfirmed {
                        destination: job.destination.clone(),
                    });
                    tracing::error!(vm = %job.vm_name, "migration to {} failed after the commit: {err:#}", job.destination);
                    return Err(err);
                }
            }
            conn.send_error(&format!("source aborts the migration: {err:#}")).await;
            tracing::warn!(vm = %job.vm_name, "migration to {} failed, guest keeps running here: {err:#}", job.destination);
            return Err(err);
        }
    };
    let outcome = match switched.handoff.take() {
        Some(handoff) => {
            tracing::info!(vm = %job.vm_name, id = %job.migration_id, "post-copy: guest runs on the destination, memory follows");
            let (outcome, sender) =
                postcopy::supply::run(&job, &job.migration_id, &mut conn, handoff, &job.resume).await;
            switched.sender = sender;
            // Total time covers the post-copy phase: the migration ends when every page is there.
            switched.total_ms = started.elapsed().as_secs_f64() * 1e3;
            Some(outcome)
        }
        None => None,
    };
    finish(&job, conn, switched, outcome, started, cpu_start).await
}

/// What pre-copy hands to the switch-over bookkeeping.
struct Switched {
    rounds: Vec<RoundReport>,
    /// When the source guest was paused for the switch.
    paused_at: Instant,
    downtime_ms: f64,
    total_ms: f64,
    stop_reason: String,
    sender: PageSender,
    stall_reset: Option<u64>,
    written_before: Option<u64>,
    /// Set when the migration switched to post-copy.
    handoff: Option<postcopy::supply::Handoff>,
    prediction: Option<Prediction>,
    /// Write events the eBPF program saw, when it ran.
    ebpf_events: Option<u64>,
}

async fn precopy(
    job: &Outbound,
    conn: &mut Connection,
    progress: &UnboundedSender<RoundReport>,
    started: Instant,
    ownership: &mut Ownership,
) -> anyhow::Result<Switched> {
    let pages = job.memory_bytes / PAGE_SIZE as u64;
    conn.send(&Message::MigrateBegin(MigrateBegin {
        vm: job.vm_name.clone(),
        memory_bytes: job.memory_bytes,
        vcpus: job.vcpus,
        cmdline: job.cmdline.clone(),
        options: job.options.clone(),
        migration_id: job.migration_id.clone(),
        attach_secret: job.attach_secret,
    }))
    .await?;
    let held = match recv(conn, "MigrateReady").await? {
        Message::MigrateReady(ready) => ready.held,
        other => bail!("destination answered MigrateBegin with {}", other.describe()),
    };
    tracing::info!(vm = %job.vm_name, held = held.len(), "destination ready");
    fault_injection::reached("source:begin").await;

    // The guest measures its own longest stall; start that measurement now.
    let stall_reset = Some(job.vm.request_stall_reset());
    let written_before = job.vm.guest_status().map(|s| s.pages_written);

    let mode = job.options.mode;
    let mut demand = None;
    if mode != MigrationMode::Precopy {
        demand = Some(postcopy::supply::attach(job, &job.migration_id, Channel::Demand).await?);
    }
    let mut tracker = match mode {
        MigrationMode::Postcopy => None,
        _ => Some(
            tracking::start(tracker_kind(job), &job.vm)
                .with_context(|| format!("starting the {} tracker", tracker_kind(job)))?,
        ),
    };
    let mut sender = PageSender::new(job.options.hashing, job.hasher.clone(), pages, held);
    let mut convergence = Convergence::new(
        job.options.downtime_target_ms,
        job.options.max_rounds,
        mode == MigrationMode::Hybrid,
    );
    let mut heat = Heat::new(pages);
    let mut ebpf = attach_ebpf(job);
    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut dirty = PageSet::all(pages);
    let mut order: Vec<u64> = (0..pages).collect();
    // Holes of guest memory are zero: round 1 need not read them (tracking started before this, so a
    // page written after the look is in round 2).
    let mut known_zero = Some(holes(&job.vm)?);
    let mut stop_reason = String::from("post-copy from the start");
    let mut to_postcopy = mode == MigrationMode::Postcopy;
    while let Some(tracker) = tracker.as_mut().filter(|_| !to_postcopy) {
        if job.cancel.is_cancelled() {
            bail!("cancelled by an operator");
        }
        let number = rounds.len() as u32 + 1;
        let zero = known_zero.take();
        // Round 1 watches the guest as it goes (see `RoundOneWatch`): hot last sends the pages written
        // ahead of it at its end, hybrid may stop it early.
        let hybrid = mode == MigrationMode::Hybrid;
        let mut watch = (number == 1 && (job.options.hot_last || hybrid)).then(|| {
            RoundOneWatch::new(
                &mut **tracker,
                FirstRound::new(&order, pages, zero.as_ref(), job.options.hot_last),
                hybrid,
            )
        });
        let report = send_round(
            job,
            conn,
            &mut sender,
            &order,
            zero.as_ref(),
            number,
            false,
            watch.as_mut(),
        )
        .await?;
        let _ = progress.send(report.clone());
        log_round(&job.vm_name, &report);
        fault_injection::reached(&format!("source:round-{number}")).await;
        let watched = watch.map(|watch| watch.finish(&job.vm_name));
        let (rest, cut) = watched.map_or((None, None), |(rest, cut)| (Some(rest), cut));
        if let Some(why) = cut {
            // Everything the round did not send is missing too, deferred or not (holes aside: zero
            // there already).
            dirty = rest.expect("watched");
            rounds.push(report);
            stop_reason = why;
            to_postcopy = true;
            break;
        }
        // eBPF heat first: reading its maps takes a few ms, and the dirty set must be collected as
        // late as possible before the decision (what is written after it goes to the next round).
        let writes = match ebpf.as_mut().map(|(probe, events)| (probe.sample(), events)) {
            Some((Ok(sample), events)) => {
                *events += sample.write_events;
                sample.pages
            }
            Some((Err(err), _)) => {
                tracing::warn!(vm = %job.vm_name, "eBPF write heat: {err:#}");
                Vec::new()
            }
            None => Vec::new(),
        };
        dirty = tracker.collect()?;
        if let Some(rest) = &rest {
            dirty.union_with(rest);
        }
        heat.update(&dirty);
        // Pages written often in the round are hot too, whatever the dirty set says.
        heat.warm(writes.iter().map(|&(gpa, count)| (gpa / PAGE_SIZE as u64, count)));
        order = if job.options.hot_last {
            heat.order(&dirty)
        } else {
            dirty.iter().collect()
        };
        let decision = convergence.after_round(&report, dirty.count());
        rounds.push(report);
        match decision {
            Decision::Continue => {}
            Decision::StopAndCopy(why) => {
                stop_reason = why;
                break;
            }
            Decision::SwitchToPostcopy(why) => {
                stop_reason = why;
                to_postcopy = true;
                break;
            }
        }
    }
    tracing::info!(vm = %job.vm_name, "{stop_reason}");
    let link_rate = rounds.last().map(|r| r.bandwidth_mbps * 1e6 / 8.0).filter(|r| *r > 0.0);

    // Post-copy from the start: the holes of guest memory (never written, so zero, and zero at the
    // destination too) are not missing. Found while the guest still runs; at the pause only they are
    // looked at again, which costs next to nothing (one count of each, see
    // `GuestMemory::data_page_ranges_in`).
    let holes_before = match mode {
        MigrationMode::Postcopy => Some(hole_ranges(&job.vm, 0..pages)?),
        _ => None,
    };

    // Stop, then copy the rest (pre-copy) or hand over at once (post-copy).
    let paused_at = Instant::now();
    job.vm.pause().context("pausing the source guest")?;
    *ownership = Ownership::Paused;
    fault_injection::reached("source:stop-and-copy").await;
    if let Some(tracker) = tracker.as_mut() {
        dirty.union_with(&tracker.collect()?);
    }
    let collected_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    let mut handoff = None;
    if to_postcopy {
        let mut missing = dirty;
        for range in holes_before.into_iter().flatten() {
            for hole in hole_ranges(&job.vm, range)? {
                hole.for_each(|page| missing.remove(page));
            }
        }
        conn.send(&Message::PostcopyBegin {
            missing: missing.words().to_vec(),
        })
        .await?;
        let eager = postcopy::supply::eager_pages(&missing);
        postcopy::supply::send_eager(job, conn, &mut sender, &eager).await?;
        handoff = Some(postcopy::supply::Handoff {
            demand: demand.take().expect("demand channel opened for post-copy modes"),
            missing,
            sender: PageSender::new(job.options.hashing, job.hasher.clone(), 0, Vec::new()),
            link_rate,
            eager,
        });
    } else {
        let number = rounds.len() as u32 + 1;
        let pages: Vec<u64> = dirty.iter().collect();
        let report = send_round(job, conn, &mut sender, &pages, None, number, true, None).await?;
        let _ = progress.send(report.clone());
        log_round(&job.vm_name, &report);
        rounds.push(report);
    }
    let pages_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    fault_injection::reached("source:state").await;
    let state = job.vm.save_state().context("saving the vCPU and device state")?;
    let state = state.to_bytes()?;
    conn.send(&Message::VmState(state)).await?;
    let state_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    if let Some(handoff) = handoff.as_ref() {
        // The destination dropped the missing pages: the sender must send them whatever it thought
        // was there. Done while the destination restores the state, off the switch's critical path.
        for page in handoff.missing.iter().filter(|p| !handoff.eager.contains(p)) {
            sender.forget(page);
        }
        sender.rebuild_held();
    }
    match recv(conn, "Restored").await? {
        Message::Restored => {}
        other => bail!("destination answered VmState with {}", other.describe()),
    }
    let restored_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    if job.cancel.is_cancelled() {
        bail!("cancelled by an operator before the commit");
    }
    // The commit point. Set first: once Commit may have left, the destination may run the guest.
    *ownership = Ownership::Committed;
    conn.send(&Message::Commit).await?;
    fault_injection::reached("source:commit").await;
    let running = match recv(conn, "Running").await {
        Ok(Message::Running) => Ok(()),
        Ok(other) => Err(anyhow::anyhow!("destination answered Commit with {}", other.describe())),
        Err(err) => Err(err),
    };
    if let Err(err) = running {
        if handoff.is_none() {
            return Err(err);
        }
        // Post-copy: the destination may be running the guest and faulting; serve its pages (the
        // supply reconnects if the link is down).
        tracing::warn!(vm = %job.vm_name, "no Running after the commit, serving post-copy pages anyway: {err:#}");
    }
    fault_injection::reached("source:running").await;
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        vm = %job.vm_name,
        collected_ms, pages_ms, state_ms, restored_ms, downtime_ms,
        "switch-over: ms since the pause at each step (dirty set collected, pages sent, state sent, restored, running)"
    );
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(tracker);
    if let Some(handoff) = handoff.as_mut() {
        // The post-copy phase owns the sender now (it knows what the destination holds).
        std::mem::swap(&mut handoff.sender, &mut sender);
    }
    Ok(Switched {
        handoff,
        rounds,
        paused_at,
        downtime_ms,
        total_ms,
        stop_reason,
        sender,
        stall_reset,
        written_before,
        prediction: convergence.prediction(),
        ebpf_events: ebpf.map(|(_, events)| events),
    })
}

/// The holes of `vm`'s memory: pages nobody ever wrote, so zero.
fn holes(vm: &Vm) -> anyhow::Result<PageSet> {
    let mut holes = PageSet::new(vm.memory().page_count());
    for range in hole_ranges(vm, 0..vm.memory().page_count())? {
        holes.insert_range(range);
    }
    Ok(holes)
}

/// The ranges of `within` that are holes of `vm`'s memory.
fn hole_ranges(vm: &Vm, within: std::ops::Range<u64>) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
    let mut holes = Vec::new();
    let mut next = within.start;
    for data in vm.memory().data_page_ranges_in(within.clone())? {
        if data.start > next {
            holes.push(next..data.start);
        }
        next = data.end;
    }
    if next < within.end {
        holes.push(next..within.end);
    }
    Ok(holes)
}

/// Counts one Perf+ decision in the round's report.
fn count(report: &mut RoundReport, decision: PageDecision) {
    match decision {
        PageDecision::Full => report.sent_pages += 1,
        PageDecision::Zero => report.skipped_zero += 1,
        PageDecision::Held => report.skipped_held += 1,
        PageDecision::Unchanged => report.skipped_unchanged += 1,
    }
}

/// How often round 1 looks at what the guest dirtied. A collect costs 0.05 to 0.13 ms with the dirty
/// log (1 to 16 GiB), an exit per vCPU with the dirty ring, ~1 ms/GiB with uffd-wp: under 1 % of the
/// round at this cadence.
const ROUND_ONE_LOOK: std::time::Duration = std::time::Duration::from_millis(200);
/// Pages round 1 must have read before it may stop early (a verdict on a handful would be noise).
const EARLY_MIN_PAGES: u64 = 4096;

/// Round 1, watched as it goes: every [`ROUND_ONE_LOOK`] (between two chunks of pages) the tracker is
/// collected and the result handed to the round's order, [`FirstRound`]: with hot last, a page written
/// ahead of the round is deferred to its end (it is hot), and a page written behind it goes to round
/// 2's set (see `FirstRound` for why no write is lost). The collect comes before the next chunk is
/// taken from the order and read, which is the order of calls `FirstRound` relies on.
///
/// Hybrid: if more than half of the pages sent so far are dirty again, the round stops there: pre-copy
/// cannot converge, and the rest of the round would only be sent again. Measured at 50k writes/s in
/// 256 MiB over 1 Gbit/s: round 1 took 2.4 s and left 53k of its 66k pages dirty before hybrid
/// switched; stopped early, round 1's bytes are not sent twice. "Dirty again" counts the pages found
/// written after round 1 sent them (pages written before it reached them, deferred or not, are not).
/// The pages not sent at the stop, deferred or not, are missing in post-copy like every unsent page.
struct RoundOneWatch<'a> {
    tracker: &'a mut dyn DirtyTracker,
    round: FirstRound<'a>,
    early_switch: bool,
    looked: Instant,
    looks: u32,
    /// Time spent collecting and sorting what was collected.
    looking: std::time::Duration,
    /// Why the round stopped early.
    cut: Option<String>,
}

impl<'a> RoundOneWatch<'a> {
    fn new(tracker: &'a mut dyn DirtyTracker, round: FirstRound<'a>, early_switch: bool) -> Self {
        Self {
            tracker,
            round,
            early_switch,
            looked: Instant::now(),
            looks: 0,
            looking: std::time::Duration::ZERO,
            cut: None,
        }
    }

    /// Between two chunks: looks at the tracker if it is time; true if the round should stop there.
    fn look(&mut self, read_pages: u64, started: Instant) -> anyhow::Result<bool> {
        if self.round.handed_out() == 0 || self.round.is_done() || self.looked.elapsed() < ROUND_ONE_LOOK {
            return Ok(false);
        }
        let begun = Instant::now();
        let collected = self.tracker.collect()?;
        let deferred = self.round.found_dirty(&collected);
        self.looked = Instant::now();
        self.looks += 1;
        self.looking += self.looked - begun;
        tracing::debug!(
            collected = collected.count(),
            deferred,
            sent = self.round.handed_out(),
            dirty_again = self.round.dirty_again(),
            "round 1 looked at the tracker"
        );
        // What the guest wrote while round 1 went, ahead of the round or behind it: with hot last, a
        // guest that writes its whole working set has it deferred, and the pages written again after
        // they were sent alone would say so only once the round is nearly over.
        let (again, ahead) = (self.round.dirty_again(), self.round.written_ahead());
        let written = again + ahead;
        if !self.early_switch || read_pages < EARLY_MIN_PAGES || !too_dirty_to_iterate(read_pages, written) {
            return Ok(false);
        }
        self.cut = Some(format!(
            "pre-copy cannot converge: the guest wrote {written} pages ({again} after round 1 sent them, {ahead} before) while round 1 sent {read_pages} in {:.0} ms (more than half); switched to post-copy before the round ended, {} pages unsent",
            started.elapsed().as_secs_f64() * 1e3,
            self.round.unsent()
        ));
        Ok(true)
    }

    /// The round is over (or stopped): what later rounds or post-copy must still send (see
    /// [`FirstRound::into_rest`]), and why the round stopped early if it did.
    fn finish(self, vm: &str) -> (PageSet, Option<String>) {
        tracing::info!(
            vm,
            deferred = self.round.deferrals(),
            dirty_again = self.round.dirty_again(),
            looks = self.looks,
            look_ms = format!("{:.1}", self.looking.as_secs_f64() * 1e3),
            "round 1 watched: pages written ahead of it were sent at its end"
        );
        (self.round.into_rest(), self.cut)
    }
}

/// Sends one round: every page of `pages` in that order, then RoundEnd, then whatever the destination
/// reports missing, until it misses nothing. Pages in `known_zero` are counted as zero without being
/// read. With `watch` (round 1), pages are taken from its order as the round goes, and the round may
/// stop before its end (see [`RoundOneWatch`]); `pages` is that order as planned.
#[allow(clippy::too_many_arguments)]
async fn send_round(
    job: &Outbound,
    conn: &mut Connection,
    sender: &mut PageSender,
    pages: &[u64],
    known_zero: Option<&PageSet>,
    number: u32,
    stop_and_copy: bool,
    mut watch: Option<&mut RoundOneWatch<'_>>,
) -> anyhow::Result<RoundReport> {
    let started = Instant::now();
    let wire_before = conn.bytes_sent() + conn.bytes_received();
    let mut report = RoundReport {
        round: number,
        stop_and_copy,
        dirty_pages: pages.len() as u64,
        ..Default::default()
    };
    let memory = job.vm.memory();
    let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
    let mut data = Box::new([0u8; PAGE_SIZE]);
    // Pages are read a few at a time and inspected together (their digests several at once).
    let mut read = vec![[0u8; PAGE_SIZE]; INSPECT_PAGES];
    let mut in_batch = 0;
    if stop_and_copy && job.options.hashing {
        // The guest is paused, so its core is free: hash on two threads.
        for chunk in pages.chunks(PAGE_BATCH_MAX_ITEMS) {
            for (page, data, content) in inspect_in_parallel(sender, memory, chunk) {
                count(&mut report, sender.add_inspected(page, &data, content, &mut batch));
            }
            report.read_pages += chunk.len() as u64;
            flush(conn, &mut batch).await?;
        }
    } else {
        let is_known_zero = |page| known_zero.is_some_and(|zero| zero.contains(page));
        let mut planned = pages.chunks(INSPECT_PAGES);
        let mut chunk = Vec::with_capacity(INSPECT_PAGES);
        loop {
            chunk.clear();
            match watch.as_deref_mut() {
                Some(watch) => {
                    // The look comes first: the pages of this chunk are read after it.
                    if watch.look(report.read_pages, started)? {
                        break;
                    }
                    watch.round.next_chunk(&mut chunk, INSPECT_PAGES);
                }
                None => chunk.extend_from_slice(planned.next().unwrap_or_default()),
            }
            if chunk.is_empty() {
                break;
            }
            let mut n = 0;
            for &page in chunk.iter().filter(|&&page| !is_known_zero(page)) {
                memory.read_page(page, &mut read[n]);
                n += 1;
            }
            let mut contents = sender.inspect_many(&read[..n]).into_iter();
            let mut next = 0;
            for &page in &chunk {
                if is_known_zero(page) {
                    count(&mut report, sender.add_known_zero(page, &mut batch));
                } else {
                    let content = contents.next().expect("one content per page read");
                    count(
                        &mut report,
                        sender.add_inspected(page, &read[next], content, &mut batch),
                    );
                    next += 1;
                    report.read_pages += 1;
                }
                in_batch += 1;
                if in_batch == PAGE_BATCH_MAX_ITEMS {
                    flush(conn, &mut batch).await?;
                    in_batch = 0;
                }
            }
        }
    }
    flush(conn, &mut batch).await?;
    loop {
        conn.send(&Message::RoundEnd { round: number }).await?;
        let missing = match recv(conn, "RoundAck").await? {
            Message::RoundAck { round, missing } if round == number => missing,
            other => bail!("destination answered RoundEnd {number} with {}", other.describe()),
        };
        if missing.is_empty() {
            break;
        }
        tracing::debug!(
            round = number,
            missing = missing.len(),
            "destination could not resolve references"
        );
        for page in missing {
            if page >= memory.page_count() {
                bail!(
                    "destination reported page {page} missing, but the guest has {} pages",
                    memory.page_count()
                );
            }
            memory.read_page(page, &mut data);
            sender.add_full(page, &data, &mut batch);
            report.resent_missing += 1;
            if batch.len() == PAGE_BATCH_MAX_ITEMS {
                flush(conn, &mut batch).await?;
            }
        }
        flush(conn, &mut batch).await?;
    }
    report.bytes_on_wire = conn.bytes_sent() + conn.bytes_received() - wire_before;
    report.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    report.bandwidth_mbps = report.bytes_on_wire as f64 * 8.0 / (report.duration_ms.max(1e-3) * 1e3);
    Ok(report)
}

/// Reads `pages` and inspects them (zero test, keyed digest) on two threads.
fn inspect_in_parallel(
    sender: &PageSender,
    memory: &perfplus_vmm::memory::GuestMemory,
    pages: &[u64],
) -> Vec<(u64, Box<[u8; PAGE_SIZE]>, Content)> {
    let work = |part: &[u64]| -> Vec<(u64, Box<[u8; PAGE_SIZE]>, Content)> {
        let data: Vec<Box<[u8; PAGE_SIZE]>> = part
            .iter()
            .map(|&page| {
                let mut data = Box::new([0u8; PAGE_SIZE]);
                memory.read_page(page, &mut data);
                data
            })
            .collect();
        let contents = sender.inspect_many(&data);
        part.iter()
            .zip(data)
            .zip(contents)
            .map(|((&page, data), content)| (page, data, content))
            .collect()
    };
    let (first, second) = pages.split_at(pages.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| work(second));
        let mut done = work(first);
        done.extend(other.join().expect("page inspection thread"));
        done
    })
}

async fn flush(conn: &mut Connection, batch: &mut PageBatch) -> anyhow::Result<()> {
    if !batch.is_empty() {
        let full = std::mem::replace(batch, PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS));
        conn.send(&Message::Pages(full)).await?;
    }
    Ok(())
}

/// After the switch: compare memories, collect the guest's verdict, write the report.
async fn finish(
    job: &Outbound,
    mut conn: Connection,
    switched: Switched,
    outcome: Option<postcopy::supply::Outcome>,
    started: Instant,
    cpu_start: f64,
) -> anyhow::Result<Completed> {
    // The source guest is paused for good: its memory is the state the destination started from. Read
    // off the async runtime and at a low priority: the guest now runs elsewhere (on this host too,
    // in tests and benchmarks) and must not wait for this.
    let memory = job.vm.memory().clone();
    let ours: Vec<u64> = tokio::task::spawn_blocking(move || super::at_low_priority(|| page_checksums(&memory)))
        .await
        .context("checksumming the source's pages")?;
    let mut report = MigrationReport {
        vm: job.vm_name.clone(),
        source: job.source_name.clone(),
        destination: job.destination.clone(),
        mode: job.options.mode.name().into(),
        migration_id: job.migration_id.clone(),
        tracker: tracker_kind(job).name().into(),
        hashing: job.options.hashing,
        memory_bytes: job.memory_bytes,
        downtime_ms: switched.downtime_ms,
        total_ms: switched.total_ms,
        sla_percent: sla_percent(switched.downtime_ms),
        stop_reason: switched.stop_reason,
        guest_pages_written_before: switched.written_before,
        order: if job.options.hot_last { "hot-last" } else { "address" }.into(),
        predicted_rounds: switched.prediction.and_then(|p| p.rounds),
        predicted_downtime_ms: switched.prediction.and_then(|p| p.downtime_ms),
        ebpf: switched
            .ebpf_events
            .map(|write_events| crate::report::EbpfReport { write_events }),
        compression: job.options.compression.to_string(),
        compressed: conn.compression_stats().map(crate::report::CompressionReport::from),
        ..Default::default()
    };
    report.rounds = switched.rounds;
    if let Some(o) = &outcome {
        report.switched_to_postcopy = true;
        report.postcopy_pages = o.postcopy_pages;
        report.pages_demanded = o.pages_demanded;
        report.pages_pushed = o.pages_pushed;
        report.pages_resent = o.pages_resent;
        report.refs_resent = o.refs_resent;
        report.postcopy_full_pages = o.full_pages;
        report.reconnects = o.reconnects;
    }

    let broken = outcome.as_ref().and_then(|o| o.broken.as_ref());
    if let Some(broken) = broken {
        // Nothing more comes from the destination; tell it (if it still listens) that the source ends.
        conn.send_error(&format!("the source ends post-copy: {}", broken.why))
            .await;
    }
    // A checksum per group of pages first; where a group differs, its pages' checksums (asked for
    // now, answered after the guest check) say which pages were lost.
    let groups = match broken {
        Some(_) => None,
        None => recv_group_checksums(&mut conn).await,
    };
    let asked = groups.map(|theirs| assemble::differing_groups(&ours, &theirs));
    if let Some(asked) = asked.as_ref().filter(|asked| !asked.is_empty()) {
        tracing::error!(vm = %job.vm_name, groups = asked.len(), "groups of pages differ on the destination");
        if let Err(err) = conn.send(&Message::PageChecksumsWanted { groups: asked.clone() }).await {
            tracing::error!("could not ask for the page checksums of those groups: {err:#}");
        }
    }

    let check = match broken {
        Some(_) => None,
        None => recv_guest_check(&mut conn).await,
    };
    let theirs = match asked {
        Some(asked) if asked.is_empty() => Some(ours.clone()),
        Some(asked) => recv_page_checksums(&mut conn)
            .await
            .and_then(|detail| assemble::destination_page_checksums(&ours, &asked, &detail)),
        None => None,
    };
    assemble::record_lost_pages(&mut report, &ours, theirs.as_deref());
    let checksums_received = theirs.is_some();
    let destination_cpu_ms = check.as_ref().map_or(0.0, |c| c.cpu_ms);
    if let Some(check) = &check {
        assemble::record_guest_check(&mut report, check, switched.stall_reset);
    }
    assemble::record_outcome(
        &mut report,
        checksums_received,
        check.as_ref(),
        job.options.verify_guest,
    );
    if let Some(broken) = broken {
        let down_ms = switched.paused_at.elapsed().as_secs_f64() * 1e3;
        assemble::record_postcopy_broken(&mut report, &broken.why, broken.missing, down_ms);
    }

    let bytes_on_wire =
        conn.bytes_sent() + conn.bytes_received() + outcome.as_ref().map_or(0, |o| o.other_connection_bytes);
    assemble::record_totals(
        &mut report,
        bytes_on_wire,
        agent_cpu_ms() - cpu_start,
        destination_cpu_ms,
    );
    let _ = started;
    if broken.is_none() {
        if let Err(err) = conn.send(&Message::Complete(Box::new(report.clone()))).await {
            tracing::warn!("could not send the final report to the destination: {err:#}");
        }
    }
    let page_digests = job
        .options
        .hashing
        .then(|| switched.sender.destination_digests().to_vec());
    Ok(Completed { report, page_digests })
}

/// The destination's next message if it is `what` (as `pick` finds it), else None with the reason logged.
async fn recv_expected<T>(conn: &mut Connection, what: &str, pick: impl FnOnce(Message) -> Option<T>) -> Option<T> {
    match recv(conn, what).await {
        Ok(message) => {
            let described = message.describe();
            let picked = pick(message);
            if picked.is_none() {
                tracing::error!("destination sent {described} instead of {what}");
            }
            picked
        }
        Err(err) => {
            tracing::error!("nothing from the destination instead of {what}: {err:#}");
            None
        }
    }
}

/// The xxh3 checksum of every page of `memory`. Pages the memfd holds no data for are zero and are
/// not read: reading them through the mapping would make the kernel allocate them, all of the
/// guest's untouched memory, on a host it has just left.
fn page_checksums(memory: &perfplus_vmm::memory::GuestMemory) -> Vec<u64> {
    let mut sums = vec![page_checksum(&[0; PAGE_SIZE]); memory.page_count() as usize];
    let mut data = Box::new([0u8; PAGE_SIZE]);
    for page in crate::content_index::data_pages(memory) {
        memory.read_page(page, &mut data);
        sums[page as usize] = page_checksum(&data);
    }
    sums
}

async fn recv_group_checksums(conn: &mut Connection) -> Option<Vec<u64>> {
    recv_expected(conn, "its group checksums", |m| match m {
        Message::GroupChecksums { checksums } => Some(checksums),
        _ => None,
    })
    .await
}

async fn recv_page_checksums(conn: &mut Connection) -> Option<Vec<u64>> {
    recv_expected(conn, "the page checksums of the groups that differ", |m| match m {
        Message::PageChecksums { checksums } => Some(checksums),
        _ => None,
    })
    .await
}

async fn recv_guest_check(conn: &mut Connection) -> Option<GuestCheck> {
    recv_expected(conn, "the guest check", |m| match m {
        Message::GuestCheck(check) => Some(*check),
        _ => None,
    })
    .await
}

/// The tracker of this migration (the agent resolves the VM's own before the job starts).
/// The eBPF dirty-ring program on the VM's vCPU threads, when the VM uses the dirty ring (the program
/// sees nothing otherwise). An extra source of heat, never of truth: failing to attach only logs.
fn attach_ebpf(job: &Outbound) -> Option<(EbpfHeat, u64)> {
    if tracker_kind(job) != TrackerKind::DirtyRing || job.options.mode == MigrationMode::Postcopy {
        return None;
    }
    let attached = vcpu_threads_of(&job.vm_name, usize::from(job.vcpus))
        .and_then(|tids| EbpfHeat::attach(HeatSource::VmThreads { vm_id: 1, tids }));
    match attached {
        Ok(probe) => Some((probe, 0)),
        Err(err) => {
            tracing::warn!(vm = %job.vm_name, "no eBPF write heat for this migration: {err:#}");
            None
        }
    }
}

fn tracker_kind(job: &Outbound) -> TrackerKind {
    job.options.tracker.unwrap_or_default()
}

async fn recv(conn: &mut Connection, expecting: &str) -> anyhow::Result<Message> {
    match tokio::time::timeout(PEER_TIMEOUT, conn.recv()).await {
        Ok(result) => result.with_context(|| format!("waiting for {expecting} from the destination")),
        Err(_) => bail!(
            "the destination sent no {expecting} within {} s",
            PEER_TIMEOUT.as_secs()
        ),
    }
}

fn log_round(vm: &str, r: &RoundReport) {
    tracing::info!(
        vm,
        round = r.round,
        stop_and_copy = r.stop_and_copy,
        dirty = r.dirty_pages,
        sent = r.sent_pages,
        unchanged = r.skipped_unchanged,
        zero = r.skipped_zero,
        held = r.skipped_held,
        bytes = r.bytes_on_wire,
        ms = format!("{:.1}", r.duration_ms),
        "round done"
    );
}

/// The source's side of the switch-over against a scripted destination over a real loopback
/// connection, with a real guest: who runs the guest when the destination goes away before or after
/// the commit.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use perfplus_protocol::{CertRole, Credentials, Identity, MigrateOptions, MigrateReady};
    use perfplus_vmm::vm::{builtin_guest, RunState};
    use tokio::net::TcpListener;

    use super::*;
    use crate::hashing::PageHasher;

    /// Bytes of memory the kernel has allocated for `memory`'s memfd.
    fn allocated(memory: &perfplus_vmm::memory::GuestMemory) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", memory.memfd()))
            .unwrap()
            .blocks()
            * 512
    }

    #[test]
    fn checksums_skip_pages_never_written_and_allocate_nothing() {
        let memory = perfplus_vmm::memory::GuestMemory::new(1024 * PAGE_SIZE as u64).unwrap();
        for (page, fill) in [(3u64, 1u8), (4, 2), (700, 3)] {
            memory.write_page(page, &[fill; PAGE_SIZE]);
        }
        let before = allocated(&memory);
        assert_eq!(before, 3 * PAGE_SIZE as u64);
        let sums = page_checksums(&memory);
        assert_eq!(allocated(&memory), before, "reading holes allocated them");
        let mut data = Box::new([0u8; PAGE_SIZE]);
        for page in 0..memory.page_count() {
            memory.read_page(page, &mut data);
            assert_eq!(sums[page as usize], page_checksum(&data), "page {page}");
        }
        assert_eq!(
            allocated(&memory),
            1024 * PAGE_SIZE as u64,
            "reading every page allocates them all"
        );
    }

    /// Where the scripted destination stops answering.
    #[derive(Clone, Copy, PartialEq)]
    enum HangUp {
        /// On `VmState`, before `Restored`: the source still owns the guest.
        BeforeRestored,
        /// On `Commit`, before `Running`: the destination may run the guest.
        AfterCommit,
    }

    async fn scripted_destination(listener: TcpListener, credentials: Credentials, hang_up: HangUp) {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Connection::accept(stream, &credentials).await.unwrap();
        loop {
            match conn.recv().await.unwrap() {
                Message::MigrateBegin(_) => conn
                    .send(&Message::MigrateReady(MigrateReady { held: Vec::new() }))
                    .await
                    .unwrap(),
                Message::Pages(_) => {}
                Message::RoundEnd { round } => conn
                    .send(&Message::RoundAck {
                        round,
                        missing: Vec::new(),
                    })
                    .await
                    .unwrap(),
                Message::VmState(_) if hang_up == HangUp::BeforeRestored => return,
                Message::VmState(_) => conn.send(&Message::Restored).await.unwrap(),
                Message::Commit => return,
                other => panic!("unexpected {}", other.name()),
            }
        }
    }

    async fn migrate_to(hang_up: HangUp) -> (Arc<Vm>, anyhow::Error) {
        let mut vm = Vm::create("web1", 16 << 20, 1).unwrap();
        let cmdline = format!("working-set=1M rate=1k tsc_khz={}", vm.tsc_khz());
        vm.load_multiboot(builtin_guest::IMAGE, &cmdline).unwrap();
        vm.start().unwrap();
        let vm = Arc::new(vm);
        let (source_credentials, ca) =
            Credentials::ephemeral(&Identity::new(CertRole::Agent, "source").unwrap()).unwrap();
        let destination_credentials =
            Credentials::issued_by(&ca, &Identity::new(CertRole::Agent, "destination").unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let destination = listener.local_addr().unwrap().to_string();
        let job = Outbound {
            vm: vm.clone(),
            vm_name: "web1".into(),
            memory_bytes: 16 << 20,
            vcpus: 1,
            cmdline,
            source_name: "source".into(),
            destination,
            options: MigrateOptions {
                mode: MigrationMode::Precopy,
                max_rounds: 1,
                verify_guest: false,
                ..Default::default()
            },
            credentials: source_credentials,
            hasher: PageHasher::new(&[4; 32]),
            migration_id: String::new(),
            attach_secret: [0; 32],
            resume: Default::default(),
            cancel: Default::default(),
        };
        let (progress, _rounds) = tokio::sync::mpsc::unbounded_channel();
        let (result, ()) = tokio::join!(
            migrate(job, progress),
            scripted_destination(listener, destination_credentials, hang_up)
        );
        let Err(err) = result else {
            panic!("the migration cannot complete");
        };
        (vm, err)
    }

    #[tokio::test]
    async fn a_destination_lost_before_the_commit_leaves_the_guest_running_here() {
        let (vm, err) = migrate_to(HangUp::BeforeRestored).await;
        assert!(err.downcast_ref::<CommittedUnconfirmed>().is_none(), "{err:#}");
        assert_eq!(vm.run_state(), RunState::Running, "{err:#}");
    }

    #[tokio::test]
    async fn a_destination_lost_after_the_commit_leaves_the_guest_paused_here() {
        let (vm, err) = migrate_to(HangUp::AfterCommit).await;
        assert!(err.downcast_ref::<CommittedUnconfirmed>().is_some(), "{err:#}");
        assert!(format!("{err:#}").contains("did not confirm running it"), "{err:#}");
        assert_eq!(
            vm.run_state(),
            RunState::Paused,
            "never resumed here: the destination may run it"
        );
    }
}
