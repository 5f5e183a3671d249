//! Outgoing migrations (`Migrate`): hands a hosted VM to the engine ([`source::migrate`]), forwards its
//! progress to the CLI, and keeps a handle by migration id that `MigrateResume` uses to wake a post-copy
//! migration's reconnection and wait for its result.
use std::sync::Arc;

use anyhow::{bail, Context};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Message, MigrateOptions, MigrateRequest};
use perfplus_vmm::vm::RunState;
use tracing::Instrument;

use super::registry::{Busy, Refusal};
use super::{archive, AgentState};
use crate::migration::outbound::ResumeSignal;
use crate::migration::signals::{time_of_day, CancelSignal};
use crate::migration::{postcopy, source, Outbound};
use crate::report::{MigrationReport, Outcome};

/// An outgoing migration a CLI can resume (`MigrateResume`) and wait for.
#[derive(Clone)]
pub(super) struct OutboundHandle {
    pub(super) resume: ResumeSignal,
    pub(super) cancel: CancelSignal,
    pub(super) done: tokio::sync::watch::Receiver<Option<Result<MigrationReport, String>>>,
}

/// `Migrate`: moves a hosted VM to another agent, sending the CLI each round's progress and then the report.
/// On failure the VM keeps running here.
pub(super) async fn migrate_out(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    req: MigrateRequest,
) -> anyhow::Result<()> {
    if req.options.downtime_target_ms.is_nan() || req.options.downtime_target_ms <= 0.0 || req.options.max_rounds == 0 {
        bail!("the downtime target must be positive and the round limit at least 1");
    }
    // Held until the migration ends: the VM cannot be stopped, tracked or migrated again meanwhile.
    let (claim, hosted) = state
        .vms
        .claim(&req.vm, Busy::Migrating)
        .map_err(|refusal| match refusal {
            Refusal::NoSuchVm => state.no_such_vm(&req.vm),
            Refusal::Busy(Busy::Migrating) => anyhow::anyhow!("VM {:?} is already being migrated", req.vm),
            Refusal::Busy(Busy::Tracking) => anyhow::anyhow!(
                "VM {:?} is being tracked (`perfplus track`); migrate it when that ends",
                req.vm
            ),
        })?;
    if hosted.vm.run_state() != RunState::Running {
        bail!("VM {:?} is not running (it is {:?})", req.vm, hosted.vm.run_state());
    }
    // The tracker: the one asked for, else the one the VM was started with; refused early (with
    // what to do) if the VM was not created in the mode it needs.
    let tracker = req.options.tracker.unwrap_or(hosted.tracker);
    tracker.check_vm(&hosted.vm)?;
    let mut attach_secret = [0u8; 32];
    getrandom::fill(&mut attach_secret).map_err(|e| anyhow::anyhow!("drawing the migration's attach secret: {e}"))?;
    let job = Outbound {
        migration_id: postcopy::new_migration_id(),
        attach_secret,
        resume: Default::default(),
        cancel: Default::default(),
        vm: hosted.vm,
        vm_name: req.vm.clone(),
        memory_bytes: hosted.memory_bytes,
        vcpus: hosted.vcpus,
        cmdline: hosted.cmdline,
        source_name: state.name.clone(),
        destination: req.destination.clone(),
        options: MigrateOptions {
            tracker: Some(tracker),
            ..req.options.clone()
        },
        // The destination is checked when the engine connects: an agent of this cluster, the one the
        // operator named (if any), and one this agent's allow-list admits.
        credentials: state.credentials.clone().expecting_agent(req.destination_agent.clone()),
        hasher: state.hasher.clone(),
    };
    let id = job.migration_id.clone();
    let note = hosted.note.clone();
    // Every line this migration logs, here and in the engine's tasks, carries its id.
    let span = tracing::info_span!("migration", migration_id = %id, vm = %req.vm);
    async move {
        note.set(format!("migrating to {} (migration {id})", req.destination));
        tracing::info!(to = %req.destination, mode = req.options.mode.name(), "migration out starts");
        let (done_tx, done_rx) = tokio::sync::watch::channel(None);
        // Found by `MigrateResume` until the migration ends.
        let registration = state.outbound.register(
            id.clone(),
            OutboundHandle {
                resume: job.resume.clone(),
                cancel: job.cancel.clone(),
                done: done_rx,
            },
        );
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut migration = tokio::spawn(source::migrate(job, progress_tx).in_current_span());
        // Forward progress to the CLI while the migration runs; a CLI that goes away does not stop it.
        let mut cli_gone = false;
        let result = loop {
            tokio::select! {
                Some(round) = progress_rx.recv() => {
                    if !cli_gone && conn.send(&Message::Progress(round)).await.is_err() {
                        cli_gone = true;
                    }
                }
                result = &mut migration => break result.context("migration task")?,
            }
        };
        while let Ok(round) = progress_rx.try_recv() {
            if !cli_gone {
                let _ = conn.send(&Message::Progress(round)).await;
            }
        }
        let _ = done_tx.send(Some(match &result {
            Ok(completed) => Ok(completed.report.clone()),
            Err(err) => Err(format!("{err:#}")),
        }));
        drop(registration);
        match &result {
            Ok(completed) => crate::metrics::get().record_report(&completed.report),
            Err(_) => crate::metrics::get().record_failed(),
        }
        match result {
            Ok(completed) if completed.report.outcome != Outcome::Completed => {
                // The guest runs on the destination, but what it holds was not confirmed (or post-copy
                // broke): the paused copy here is kept (never resumed by the agent) for the operator to
                // compare or recover from.
                let report = completed.report;
                note.set(format!(
                    "kept after migration {id} to {} ended {} at {}; resume it here only if {} does not run it",
                    req.destination,
                    report.outcome.name(),
                    time_of_day(),
                    req.destination
                ));
                drop(claim);
                tracing::error!(vm = %req.vm, to = %req.destination, outcome = report.outcome.name(),
                detail = report.outcome_detail.as_deref().unwrap_or(""),
                "migration out ended unconfirmed; the guest runs on the destination, its paused copy stays here");
                conn.send(&Message::MigrateDone(Box::new(report))).await
            }
            Ok(completed) => {
                // The VM runs on the destination now, confirmed: it leaves the registry with its claim.
                let hosted = claim.remove();
                let report = completed.report;
                tracing::info!(vm = %req.vm, to = %req.destination, downtime_ms = format!("{:.1}", report.downtime_ms),
                lost_pages = report.lost_pages, "migration out complete; the VM now runs on the destination");
                // The report first: what follows is housekeeping, which a loaded host may delay. The
                // archive counts as under way from before the report leaves, so that a VM arriving
                // after it (a return trip the CLI starts at once) waits for it (`archive::Archiving`).
                let under_way = hosted.as_ref().map(|_| state.archiving.begin());
                let sent = conn.send(&Message::MigrateDone(Box::new(report))).await;
                if let Some(hosted) = hosted {
                    // Archiving writes the guest's pages to disk and dropping the VM joins its threads:
                    // both off the async runtime, which serves every other connection.
                    let (state, name, digests) = (state.clone(), req.vm.clone(), completed.page_digests);
                    let span = tracing::Span::current();
                    tokio::task::spawn_blocking(move || {
                        let _span = span.enter();
                        crate::migration::at_low_priority(|| {
                            archive::keep_pages(&state, &name, &hosted.vm, digests);
                            drop(hosted);
                        });
                        drop(under_way);
                    })
                    .await?;
                }
                sent
            }
            Err(err) => {
                let committed = err.downcast_ref::<source::CommittedUnconfirmed>().is_some();
                if committed {
                    note.set(format!(
                        "kept after migration {id} to {} failed past its commit at {}; resume it here only if {} \
                     does not run it",
                        req.destination,
                        time_of_day(),
                        req.destination
                    ));
                } else {
                    note.clear();
                }
                drop(claim);
                let here = if committed {
                    "the VM is paused here"
                } else {
                    "the VM keeps running here"
                };
                Err(err.context(format!("migrating {} to {} ({here})", req.vm, req.destination)))
            }
        }
    }
    .instrument(span)
    .await
}

/// `MigrateCancel` of an outgoing migration: signals it and waits for its end. Returns what became of
/// the guest, or None if no outgoing migration has that id.
pub(super) async fn cancel(state: &Arc<AgentState>, id: &str) -> Option<String> {
    let mut handle = state.outbound.get(id)?;
    handle.cancel.cancel();
    tracing::warn!(%id, "outgoing migration cancelled by an operator");
    let result = handle.done.wait_for(|r| r.is_some()).await.ok()?.clone()?;
    Some(match result {
        Ok(report) if report.outcome == Outcome::Completed => {
            "too late to cancel: the migration had completed and the guest runs on the destination".to_string()
        }
        Ok(report) => format!(
            "migration ended {}: {}",
            report.outcome.name(),
            report.outcome_detail.unwrap_or_default()
        ),
        Err(text) => format!("migration failed: {text}"),
    })
}

/// `MigrateResume`: wakes the outgoing migration `id` (a post-copy migration that lost its link
/// reconnects at once) and answers with its result when it ends.
pub(super) async fn resume(state: &Arc<AgentState>, conn: &mut Connection, id: String) -> anyhow::Result<()> {
    let Some(mut handle) = state.outbound.get(&id) else {
        bail!("no migration with id {id:?} is under way on agent {}", state.name);
    };
    handle.resume.notify_one();
    tracing::info!(%id, "resume requested by a CLI");
    let result = handle
        .done
        .wait_for(|r| r.is_some())
        .await
        .map_err(|_| anyhow::anyhow!("migration {id} ended without a result"))?
        .clone()
        .expect("waited for a result");
    match result {
        Ok(report) => conn.send(&Message::MigrateDone(Box::new(report))).await,
        Err(text) => bail!(text),
    }
}
