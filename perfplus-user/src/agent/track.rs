//! The agent's side of `perfplus track --vm`: measures a hosted VM interval by interval with a
//! [`DirtyLogTracker`] (the same KVM dirty bitmap a migration uses, so tracking is refused while the VM
//! migrates and a migration is refused while it is tracked), plus the eBPF dirty-ring heat when the
//! kernel lets the agent attach it. The CLI's side, and what the figures mean, is `crate::cli::track`.
//!
//! The VM is claimed as `Busy::Tracking` for the request's duration; the claim holds no reference to
//! the VM, so stopping it ends the tracking instead of waiting for it.
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Message, TrackRequest, TrackSample};
use perfplus_vmm::tracking::dirty_log::DirtyLogTracker;
use perfplus_vmm::tracking::DirtyTracker;
use perfplus_vmm::vm::{RamSlot, RunState, Vm};

use super::registry::{Busy, Refusal};
use super::AgentState;
use crate::ebpf::{hottest_regions, vcpu_threads_of, EbpfHeat, HeatSource, HOTTEST, REGION_BYTES};

/// A hosted VM to measure, as the agent hands it over. Holds no strong reference to the VM, so that
/// stopping the VM is not delayed by tracking.
pub struct TrackTarget {
    pub name: String,
    pub vm: Weak<Vm>,
    pub ram: Arc<RamSlot>,
    pub vcpus: usize,
}

/// `perfplus track --vm`: measures the VM with its dirty log (and eBPF heat) for the CLI. Refused while
/// the VM migrates; a migration is refused while it is tracked.
pub(super) async fn track(state: &Arc<AgentState>, conn: &mut Connection, req: TrackRequest) -> anyhow::Result<()> {
    // Held while tracking: the VM cannot be migrated meanwhile (it can be stopped: tracking then ends).
    let (claim, hosted) = state
        .vms
        .claim(&req.vm, Busy::Tracking)
        .map_err(|refusal| match refusal {
            Refusal::NoSuchVm => state.no_such_vm(&req.vm),
            Refusal::Busy(Busy::Migrating) => {
                anyhow::anyhow!("VM {:?} is being migrated; track it when that ends", req.vm)
            }
            Refusal::Busy(Busy::Tracking) => anyhow::anyhow!("VM {:?} is already being tracked", req.vm),
        })?;
    let target = TrackTarget {
        name: req.vm.clone(),
        vm: Arc::downgrade(&hosted.vm),
        ram: hosted.vm.ram_slot().clone(),
        vcpus: hosted.vm.vcpu_count(),
    };
    // No strong reference to the VM while tracking (see `TrackTarget`).
    drop(hosted);
    let result = serve_vm(conn, target, req).await;
    drop(claim);
    result
}

/// The agent's side of `Track`: measures the VM interval by interval and sends a `TrackSample` for
/// each, then `Done`. Stops early when the CLI hangs up or the VM goes away.
pub async fn serve_vm(conn: &mut Connection, target: TrackTarget, req: TrackRequest) -> anyhow::Result<()> {
    if req.interval_ms == 0 {
        bail!("the tracking interval must be positive");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<TrackSample>>(4);
    let worker = tokio::task::spawn_blocking(move || measure(target, req, tx));
    while let Some(item) = rx.recv().await {
        match item {
            Ok(sample) => {
                if conn.send(&Message::TrackSample(Box::new(sample))).await.is_err() {
                    // The CLI left: dropping the receiver stops the worker at its next interval.
                    drop(rx);
                    worker.await.context("tracking task")?;
                    return Ok(());
                }
            }
            Err(err) => {
                drop(rx);
                worker.await.context("tracking task")?;
                return Err(err);
            }
        }
    }
    worker.await.context("tracking task")?;
    conn.send(&Message::Done).await
}

/// Turns dirty logging off again when dropped.
struct LoggingOn(Arc<RamSlot>);

impl Drop for LoggingOn {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_dirty_logging(false) {
            tracing::warn!("turning dirty logging off after tracking: {e:#}");
        }
    }
}

/// The measuring loop (blocking). Errors go to the channel.
fn measure(target: TrackTarget, req: TrackRequest, tx: tokio::sync::mpsc::Sender<anyhow::Result<TrackSample>>) {
    let mut notes: Vec<String> = Vec::new();
    let mut heat = if req.ebpf {
        match vcpu_threads_of(&target.name, target.vcpus)
            .and_then(|tids| EbpfHeat::attach(HeatSource::VmThreads { vm_id: 1, tids }))
        {
            Ok(h) => Some(h),
            Err(e) => {
                notes.push(format!("eBPF heat unavailable: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut _logging: Option<LoggingOn> = None;
    let mut tracker = match DirtyLogTracker::from_slot(target.ram.clone()) {
        Ok(t) => Some(t),
        Err(e) if heat.is_some() => {
            // E.g. a VM in dirty-ring mode (no bitmap): KVM pushes to the rings only while dirty
            // logging is on, so turn it on for the tracking's duration.
            notes.push(format!(
                "dirty log unavailable ({e:#}); dirty pages from eBPF dirty-ring events"
            ));
            if !target.ram.dirty_logging() {
                match target.ram.set_dirty_logging(true) {
                    Ok(()) => _logging = Some(LoggingOn(target.ram.clone())),
                    Err(e) => notes.push(format!("turning dirty logging on failed: {e:#}")),
                }
            }
            None
        }
        Err(e) => {
            let _ = tx.blocking_send(Err(e.context("starting the dirty-log tracker")));
            return;
        }
    };
    let interval = Duration::from_millis(u64::from(req.interval_ms));
    let guest_written = |vm: &Weak<Vm>| vm.upgrade().and_then(|v| v.guest_status()).map(|g| g.pages_written);
    let mut last_written = guest_written(&target.vm);
    let mut log_failed = false;
    let start = Instant::now();
    let mut last = start;
    let mut i = 0u32;
    while req.intervals == 0 || i < req.intervals {
        i += 1;
        std::thread::sleep((start + interval * i).saturating_duration_since(Instant::now()));
        let result = (|| -> anyhow::Result<TrackSample> {
            // A VM in dirty-ring mode has no dirty bitmap: its first collect fails. Then the tracker
            // stays (its dirty logging feeds the rings) and the eBPF ring events are the source.
            let dirty = match tracker
                .as_mut()
                .filter(|_| !log_failed)
                .map(|t| t.collect())
                .transpose()
            {
                Ok(d) => d,
                Err(e) if heat.is_some() => {
                    log_failed = true;
                    notes.push(format!(
                        "dirty log unavailable ({e:#}); dirty pages from eBPF dirty-ring events"
                    ));
                    None
                }
                Err(e) => return Err(e),
            };
            let ebpf = heat.as_mut().map(|h| h.sample()).transpose()?;
            let now = Instant::now();
            let written = guest_written(&target.vm);
            let guest_pages_written = match (last_written, written) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            };
            last_written = written;
            let page = PAGE_SIZE as u64;
            let (source, dirty_pages, hottest) = match (&dirty, &ebpf) {
                (Some(d), _) => (
                    "dirty-log",
                    d.count(),
                    hottest_regions(d.iter().map(|p| (p * page, 1)), REGION_BYTES, HOTTEST),
                ),
                (None, Some(e)) => ("ebpf", e.working_set_pages(), e.hottest_regions(REGION_BYTES, HOTTEST)),
                (None, None) => unreachable!("a tracker or eBPF heat is always there"),
            };
            let sample = TrackSample {
                interval: i,
                elapsed_s: (now - start).as_secs_f64(),
                interval_s: (now - last).as_secs_f64(),
                source: source.to_string(),
                dirty_pages,
                hottest,
                ebpf_events: ebpf.as_ref().map(|e| e.write_events),
                ebpf_pages: ebpf.as_ref().map(|e| e.working_set_pages()),
                guest_pages_written,
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            };
            last = now;
            Ok(sample)
        })();
        let stop = result.is_err();
        if tx.blocking_send(result).is_err() || stop {
            return;
        }
        match target.vm.upgrade().map(|v| v.run_state()) {
            Some(RunState::Running) | Some(RunState::Paused) => {}
            Some(other) => {
                let _ = tx.blocking_send(Err(anyhow::anyhow!("VM {} is {other:?}; tracking ends", target.name)));
                return;
            }
            None => {
                let _ = tx.blocking_send(Err(anyhow::anyhow!("VM {} was stopped; tracking ends", target.name)));
                return;
            }
        }
    }
}
