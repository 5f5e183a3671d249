//! Incoming migrations from another agent ([`Role::Peer`](perfplus_protocol::Role::Peer)): `MigrateBegin`
//! receives a VM through the engine ([`receiver::receive`]) and hosts it; `PostcopyAttach` hands the other
//! connections of a post-copy migration to the arrival they belong to.
use std::sync::Arc;

use anyhow::bail;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{MigrationMode, MIGRATION_ID_MAX};

use super::registry::{check_name, Busy};
use super::{AgentState, HostedVm};
use crate::migration::receiver;

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
    let inbound = receiver::Inbound {
        hasher: state.hasher.clone(),
        index: state.index.clone(),
    };
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
        Some(state.attach.register(id.clone(), attach_tx.clone()))
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
    drop(filling);
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
    match state.attach.get(&attach.id) {
        Some(tx) => {
            tracing::info!(id = %attach.id, channel = ?attach.channel, "post-copy connection attached");
            if let Err(tokio::sync::mpsc::error::SendError((mut conn, _))) = tx.send((conn, attach.channel)) {
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
