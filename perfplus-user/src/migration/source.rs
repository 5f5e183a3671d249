//! Source side of a pre-copy migration.
//!
//! ```text
//! connect + MigrateBegin ─► MigrateReady(held)
//! round 1: every page            ┐ guest runs; each round sends the pages the tracker reported
//! round 2..n: the dirty set      ┘ since the previous one, through the PageSender (Perf+ decisions)
//! converged (dirty set fits the downtime target at the measured rate) or round limit reached
//! pause ─► final dirty set ─► VmState ─► Running        (downtime = pause → Running)
//! ─► PageChecksums (lost pages) ─► GuestCheck ─► Complete(report)
//! ```
//! Until `Running` arrives every failure resumes the source guest and leaves it as it was (dirty
//! logging off again when the tracker is dropped). After `Running` the guest belongs to the
//! destination: the source never resumes it again, whatever happens next.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use tokio::sync::mpsc::UnboundedSender;

use super::page_sender::PageSender;
use super::{agent_cpu_ms, PEER_TIMEOUT};
use crate::hashing::{page_checksum, PageDigest, PageHasher};
use crate::protocol::connection::Connection;
use crate::protocol::frame::{PageBatch, PAGE_BATCH_MAX_ITEMS};
use crate::protocol::{ClusterKey, GuestCheck, Message, MigrateBegin, MigrateOptions, Role};
use crate::report::{sla_percent, MigrationReport, RoundReport};
use crate::tracking::{self, DirtyPages, TrackerKind};
use crate::vm::Vm;

/// What the source needs to move one VM.
pub struct Outbound {
    pub vm: Arc<Vm>,
    pub vm_name: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub cmdline: String,
    pub source_name: String,
    pub destination: String,
    pub options: MigrateOptions,
    pub key: ClusterKey,
    pub hasher: PageHasher,
}

/// A migration that reached the destination.
pub struct Completed {
    pub report: MigrationReport,
    /// Keyed digest of every page as the destination got it (hashing on), for the page store.
    pub page_digests: Option<Vec<PageDigest>>,
}

/// Moves the VM. On `Err` the source guest is running as before (it was resumed if it had been paused).
pub async fn migrate(job: Outbound, progress: UnboundedSender<RoundReport>) -> anyhow::Result<Completed> {
    let cpu_start = agent_cpu_ms();
    let started = Instant::now();
    let mut conn = Connection::connect(&job.destination, Role::Peer, &job.key)
        .await
        .with_context(|| format!("connecting to destination agent {}", job.destination))?;
    let mut paused = false;
    let result = precopy(&job, &mut conn, &progress, started, &mut paused).await;
    let switched = match result {
        Ok(switched) => switched,
        Err(err) => {
            if paused {
                if let Err(resume_err) = job.vm.resume() {
                    tracing::error!(vm = %job.vm_name, "could not resume the source guest after a failed migration: {resume_err:#}");
                }
            }
            conn.send_error(&format!("source aborts the migration: {err:#}")).await;
            tracing::warn!(vm = %job.vm_name, "migration to {} failed, guest keeps running here: {err:#}", job.destination);
            return Err(err);
        }
    };
    finish(&job, conn, switched, started, cpu_start).await
}

/// What pre-copy hands to the switch-over bookkeeping.
struct Switched {
    rounds: Vec<RoundReport>,
    downtime_ms: f64,
    total_ms: f64,
    stop_reason: String,
    sender: PageSender,
    stall_reset: Option<u64>,
    written_before: Option<u64>,
}

async fn precopy(
    job: &Outbound,
    conn: &mut Connection,
    progress: &UnboundedSender<RoundReport>,
    started: Instant,
    paused: &mut bool,
) -> anyhow::Result<Switched> {
    let pages = job.memory_bytes / PAGE_SIZE as u64;
    conn.send(&Message::MigrateBegin(MigrateBegin {
        vm: job.vm_name.clone(),
        memory_bytes: job.memory_bytes,
        vcpus: job.vcpus,
        cmdline: job.cmdline.clone(),
        options: job.options.clone(),
    }))
    .await?;
    let held = match recv(conn, "MigrateReady").await? {
        Message::MigrateReady(ready) => ready.held,
        other => bail!("destination answered MigrateBegin with {}", describe(&other)),
    };
    tracing::info!(vm = %job.vm_name, held = held.len(), "destination ready");

    // The guest measures its own longest stall; start that measurement now.
    let stall_reset = Some(job.vm.request_stall_reset());
    let written_before = job.vm.guest_status().map(|s| s.pages_written);

    let mut tracker = tracking::start(tracker_kind(job), &job.vm)
        .with_context(|| format!("starting the {} tracker", tracker_kind(job)))?;
    let mut sender = PageSender::new(job.options.hashing, job.hasher.clone(), pages, held);
    let mut rounds = Vec::new();
    let mut dirty = DirtyPages::all(pages);
    let mut processed_pages = 0u64;
    let mut processing_secs = 0f64;
    let stop_reason;
    loop {
        let number = rounds.len() as u32 + 1;
        let report = send_round(job, conn, &mut sender, &dirty, number, false).await?;
        processed_pages += report.dirty_pages;
        processing_secs += report.duration_ms / 1e3;
        let _ = progress.send(report.clone());
        log_round(&job.vm_name, &report);
        rounds.push(report);

        dirty = tracker.collect()?;
        let rate = processed_pages as f64 / processing_secs.max(1e-6);
        let predicted_ms = dirty.count() as f64 / rate * 1e3;
        if predicted_ms <= job.options.downtime_target_ms {
            stop_reason = format!(
                "converged: {} dirty pages fit the {} ms target ({predicted_ms:.1} ms at {rate:.0} pages/s)",
                dirty.count(),
                job.options.downtime_target_ms
            );
            break;
        }
        if number >= job.options.max_rounds {
            stop_reason = format!(
                "round limit {} reached with {} dirty pages ({predicted_ms:.1} ms predicted)",
                job.options.max_rounds,
                dirty.count()
            );
            break;
        }
    }
    tracing::info!(vm = %job.vm_name, "{stop_reason}");

    // Stop and copy.
    let paused_at = Instant::now();
    job.vm.pause().context("pausing the source guest")?;
    *paused = true;
    dirty.union_with(&tracker.collect()?);
    let number = rounds.len() as u32 + 1;
    let report = send_round(job, conn, &mut sender, &dirty, number, true).await?;
    let _ = progress.send(report.clone());
    log_round(&job.vm_name, &report);
    rounds.push(report);
    let state = job.vm.save_state().context("saving the vCPU and device state")?;
    let state = postcard::to_allocvec(&state).context("encoding the VM state")?;
    conn.send(&Message::VmState(state)).await?;
    match recv(conn, "Running").await? {
        Message::Running => {}
        other => bail!("destination answered VmState with {}", describe(&other)),
    }
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(tracker);
    Ok(Switched {
        rounds,
        downtime_ms,
        total_ms,
        stop_reason,
        sender,
        stall_reset,
        written_before,
    })
}

/// Sends one round: every page of `dirty`, then RoundEnd, then whatever the destination reports
/// missing, until it misses nothing.
async fn send_round(
    job: &Outbound,
    conn: &mut Connection,
    sender: &mut PageSender,
    dirty: &DirtyPages,
    number: u32,
    stop_and_copy: bool,
) -> anyhow::Result<RoundReport> {
    let started = Instant::now();
    let wire_before = conn.bytes_sent() + conn.bytes_received();
    let mut report = RoundReport {
        round: number,
        stop_and_copy,
        dirty_pages: dirty.count(),
        ..Default::default()
    };
    let memory = job.vm.memory();
    let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
    let mut data = Box::new([0u8; PAGE_SIZE]);
    let mut in_batch = 0;
    for page in dirty.iter() {
        memory.read_page(page, &mut data);
        sender.add(page, &data, &mut batch, &mut report);
        in_batch += 1;
        if in_batch == PAGE_BATCH_MAX_ITEMS {
            flush(conn, &mut batch).await?;
            in_batch = 0;
        }
    }
    flush(conn, &mut batch).await?;
    loop {
        conn.send(&Message::RoundEnd { round: number }).await?;
        let missing = match recv(conn, "RoundAck").await? {
            Message::RoundAck { round, missing } if round == number => missing,
            other => bail!("destination answered RoundEnd {number} with {}", describe(&other)),
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
    started: Instant,
    cpu_start: f64,
) -> anyhow::Result<Completed> {
    // The source guest is paused for good: its memory is the state the destination started from.
    let memory = job.vm.memory();
    let mut data = Box::new([0u8; PAGE_SIZE]);
    let ours: Vec<u64> = (0..memory.page_count())
        .map(|page| {
            memory.read_page(page, &mut data);
            page_checksum(&data)
        })
        .collect();
    let mut report = MigrationReport {
        vm: job.vm_name.clone(),
        source: job.source_name.clone(),
        destination: job.destination.clone(),
        mode: "precopy".into(),
        tracker: tracker_kind(job).name().into(),
        hashing: job.options.hashing,
        memory_bytes: job.memory_bytes,
        downtime_ms: switched.downtime_ms,
        total_ms: switched.total_ms,
        sla_percent: sla_percent(switched.downtime_ms),
        stop_reason: switched.stop_reason,
        guest_pages_written_before: switched.written_before,
        ..Default::default()
    };
    report.rounds = switched.rounds;

    let theirs = match recv(&mut conn, "PageChecksums").await {
        Ok(Message::PageChecksums { checksums }) => Some(checksums),
        Ok(other) => {
            tracing::error!("destination sent {} instead of its page checksums", describe(&other));
            None
        }
        Err(err) => {
            tracing::error!("no page checksums from the destination: {err:#}");
            None
        }
    };
    match theirs {
        Some(theirs) if theirs.len() == ours.len() => {
            report.lost_pages = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count() as u64;
            report.memory_digest_equal = report.lost_pages == 0;
        }
        Some(theirs) => {
            tracing::error!(
                "destination sent {} page checksums for {} pages",
                theirs.len(),
                ours.len()
            );
            report.lost_pages = ours.len() as u64;
        }
        None => report.lost_pages = ours.len() as u64,
    }

    let check = match recv(&mut conn, "GuestCheck").await {
        Ok(Message::GuestCheck(check)) => Some(*check),
        Ok(other) => {
            tracing::error!("destination sent {} instead of the guest check", describe(&other));
            None
        }
        Err(err) => {
            tracing::error!("no guest check from the destination: {err:#}");
            None
        }
    };
    let destination_cpu_ms = check.as_ref().map_or(0.0, |c| c.cpu_ms);
    if let Some(GuestCheck {
        at_resume,
        after,
        verified,
        held_from_store,
        held_from_hosted_vms,
        held_from_this_migration,
        ..
    }) = check
    {
        report.guest_verified = verified;
        report.held_from_store = held_from_store;
        report.held_from_hosted_vms = held_from_hosted_vms;
        report.held_from_this_migration = held_from_this_migration;
        if let Some(after) = after.as_ref() {
            report.guest_pages_written_after = Some(after.pages_written);
            report.guest_mismatches = Some(after.mismatches);
            // The stall counter was reset on the source before round 1 and migrated with the guest.
            let reset_seen = switched.stall_reset.is_some_and(|r| after.stall_reset_ack >= r);
            if reset_seen {
                report.guest_max_stall_ms = after.max_stall_ms();
            }
        }
        if report.guest_pages_written_before.is_none() {
            report.guest_pages_written_before = at_resume.map(|s| s.pages_written);
        }
    }

    report.bytes_on_wire = conn.bytes_sent() + conn.bytes_received();
    report.average_mbps = report.bytes_on_wire as f64 * 8.0 / (report.total_ms.max(1e-3) * 1e3);
    report.source_cpu_ms = agent_cpu_ms() - cpu_start;
    report.destination_cpu_ms = destination_cpu_ms;
    report.agent_cpu_ms = report.source_cpu_ms + report.destination_cpu_ms;
    let _ = started;
    if let Err(err) = conn.send(&Message::Complete(Box::new(report.clone()))).await {
        tracing::warn!("could not send the final report to the destination: {err:#}");
    }
    let page_digests = job
        .options
        .hashing
        .then(|| switched.sender.destination_digests().to_vec());
    Ok(Completed { report, page_digests })
}

/// The tracker of this migration (the agent resolves the VM's own before the job starts).
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

/// A short name of a message for error texts (never its payload).
pub fn describe(message: &Message) -> String {
    let text = format!("{message:?}");
    let name: String = text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if let Message::Error { message } = message {
        return format!("an error: {message}");
    }
    format!("an unexpected {name} message")
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
