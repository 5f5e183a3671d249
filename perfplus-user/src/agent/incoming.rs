//! Incoming migrations from another agent ([`Role::Peer`](perfplus_protocol::Role::Peer)): `MigrateBegin`
//! receives a VM through the engine ([`receiver::receive`]) and hosts it; `PostcopyAttach` hands the other
//! connections of a post-copy migration to the arrival they belong to.
use std::sync::Arc;

use anyhow::bail;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{MigrationMode, MIGRATION_ID_MAX};

use super::registry::{check_name, Busy};
use super::{AgentState, HostedVm};
use crate::migration::postcopy::demand::PostcopyAbandoned;
use crate::migration::postcopy::AttachTx;
use crate::migration::receiver;
use crate::migration::signals::{CancelSignal, StatusNote};

/// An incoming post-copy migration, by id: where its other connections go, and its cancel.
#[derive(Clone)]
pub(super) struct IncomingHandle {
    pub(super) attach: AttachTx,
    pub(super) cancel: CancelSignal,
    /// Set when the migration has ended, with what became of the guest.
    pub(super) done: tokio::sync::watch::Receiver<Option<String>>,
    /// What its other connections must present: the secret from its `MigrateBegin`, from the agent that
    /// sent it.
    secret: perfplus_protocol::AttachSecret,
    source: perfplus_protocol::Identity,
}

/// `MigrateBegin`: receives a VM from another agent and hosts it here once it resumes. The name is
/// reserved while the VM arrives; on failure nothing is kept. A VM over the agent's quotas
/// ([`super::AgentLimits`]) is refused before anything is allocated for it.
pub(super) async fn migrate_in(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    begin: perfplus_protocol::MigrateBegin,
) -> anyhow::Result<()> {
    let name = begin.vm.clone();
    // Held until the VM is hosted (or the arrival fails): a VM of that name cannot be started or
    // received meanwhile.
    let checked = check_name(&name).and_then(|()| state.limits.check_vm(&name, begin.memory_bytes, begin.vcpus));
    let reserved = match checked {
        Err(err) => Err(format!("{err:#}")),
        Ok(()) => state.vms.reserve(&name).map_err(|_| state.name_taken(&name)),
    };
    let reservation = match reserved {
        Ok(reservation) => reservation,
        Err(text) => {
            conn.send_error(&text).await;
            bail!(text);
        }
    };
    tracing::info!(vm = %name, memory_bytes = begin.memory_bytes, "migration in starts");
    if !state.archiving.settled(std::time::Duration::ZERO).await {
        tracing::info!(vm = %name, "waiting for the page store to take the pages of a VM that left");
        if !state.archiving.settled(super::archive::ARCHIVE_WAIT).await {
            tracing::warn!(vm = %name, "the page store is still archiving after {:?}; going ahead without those pages",
                super::archive::ARCHIVE_WAIT);
        }
    }
    let note = StatusNote::default();
    let cancel = CancelSignal::default();
    let inbound = receiver::Inbound {
        hasher: state.hasher.clone(),
        index: state.index.clone(),
        source: conn.peer().to_string(),
        note: note.clone(),
        cancel: cancel.clone(),
    };
    let (done_tx, done_rx) = tokio::sync::watch::channel(None);
    let (memory_bytes, vcpus, cmdline) = (begin.memory_bytes, begin.vcpus, begin.cmdline.clone());
    let tracker = begin.options.tracker.unwrap_or_default();
    let (attach_tx, attach_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = begin.migration_id.clone();
    let postcopy = begin.options.mode != MigrationMode::Precopy;
    // Where the migration's other connections go, until `receive` returns.
    let attached = if postcopy {
        if id.is_empty() || id.len() > MIGRATION_ID_MAX {
            let text = "a post-copy migration needs an id of 1 to 64 characters".to_string();
            conn.send_error(&text).await;
            bail!(text);
        }
        match state.attach.try_register(
            id.clone(),
            IncomingHandle {
                attach: attach_tx.clone(),
                cancel,
                done: done_rx,
                secret: begin.attach_secret,
                source: conn.peer_identity().clone(),
            },
        ) {
            Some(registration) => Some(registration),
            None => {
                let text = format!("a migration with id {id:?} is already arriving here");
                conn.send_error(&text).await;
                bail!(text);
            }
        }
    } else {
        None
    };
    // A guest whose memory is still arriving (post-copy) is hosted claimed as migrating: it cannot be
    // stopped, migrated or tracked until the claim drops, when `receive` returns.
    let mut filling = None;
    let mut installed = false;
    let result = receiver::receive(conn, begin, &inbound, attach_rx, |vm, still_filling| {
        let hosted = HostedVm {
            vm,
            memory_bytes,
            vcpus,
            cmdline,
            tracker,
            note,
        };
        if still_filling {
            filling = Some(reservation.host_claimed(hosted, Busy::Migrating));
        } else {
            reservation.host(hosted);
        }
        installed = true;
        Ok(())
    })
    .await;
    drop(attached);
    let abandoned = result
        .as_ref()
        .err()
        .and_then(|err| err.downcast_ref::<PostcopyAbandoned>());
    if let (Some(abandoned), Some(claim)) = (abandoned, filling.take()) {
        // The operator gave this incomplete copy up: destroy it (off the runtime: dropping a VM joins
        // its vCPU threads). What remains of the guest is the source's paused copy.
        let missing = abandoned.missing;
        let removed = claim.remove();
        state.index.lock().expect("index lock").remove_vm(&name);
        tokio::task::spawn_blocking(move || drop(removed)).await?;
        let text = format!(
            "the incomplete copy of {name} here ({missing} pages missing) is destroyed; what remains of \
             the guest is the source's paused copy, stale since the switch (`perfplus vm resume` there)"
        );
        tracing::error!(vm = %name, "{text}");
        let _ = done_tx.send(Some(text));
        return result;
    }
    drop(filling);
    let _ = done_tx.send(Some(match &result {
        Ok(()) => format!("the migration of {name} had completed: it runs here"),
        Err(err) => format!("the migration of {name} had ended: {err:#}"),
    }));
    if let Err(err) = &result {
        if installed {
            tracing::warn!(vm = %name, "migration in ended with an error after the guest started here (it runs here): {err:#}");
        } else {
            tracing::warn!(vm = %name, "migration in failed, nothing kept: {err:#}");
        }
        conn.send_error(&format!("destination: {err:#}")).await;
    }
    result
}

/// `PostcopyAttach`: hands the connection to the post-copy arrival with that id.
pub(super) async fn attach(
    state: &Arc<AgentState>,
    mut conn: Connection,
    attach: perfplus_protocol::PostcopyAttach,
) -> anyhow::Result<()> {
    let handle = state.attach.get(&attach.id);
    // The id alone is no credential (it is shown in `vm status`, logs and reports): the connection must
    // come from the agent that began the migration and present the migration's secret.
    if let Some(handle) = &handle {
        let from = conn.peer_identity().clone();
        let refusal = if from != handle.source {
            Some(format!(
                "post-copy attach to migration {:?} refused: it comes from {from}, the migration from {}",
                attach.id, handle.source
            ))
        } else if !secrets_equal(&attach.secret, &handle.secret) {
            Some(format!(
                "post-copy attach to migration {:?} refused: wrong secret for that migration",
                attach.id
            ))
        } else {
            None
        };
        if let Some(text) = refusal {
            tracing::warn!(peer = %conn.peer(), "{text}");
            conn.send_error(&text).await;
            bail!(text)
        }
    }
    match handle {
        Some(handle) => {
            tracing::info!(id = %attach.id, channel = ?attach.channel, "post-copy connection attached");
            if let Err(tokio::sync::mpsc::error::SendError((mut conn, _))) = handle.attach.send((conn, attach.channel))
            {
                conn.send_error("that migration has ended").await;
            }
            Ok(())
        }
        None => {
            let text = format!("no migration with id {:?} is in post-copy on this agent", attach.id);
            conn.send_error(&text).await;
            bail!(text)
        }
    }
}

/// Compares two secrets without stopping at the first byte that differs.
fn secrets_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `MigrateCancel` of an incoming post-copy migration: the guest here is paused and destroyed (it
/// lacks pages). Returns what became of it, or None if no incoming post-copy migration has that id.
pub(super) async fn cancel(state: &Arc<AgentState>, id: &str) -> Option<String> {
    let mut handle = state.attach.get(id)?;
    handle.cancel.cancel();
    tracing::warn!(%id, "incoming post-copy migration cancelled by an operator");
    let text = handle
        .done
        .wait_for(|done| done.is_some())
        .await
        .ok()
        .and_then(|done| done.clone())
        .unwrap_or_else(|| "the migration ended".to_string());
    Some(text)
}
