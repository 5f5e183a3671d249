//! Incoming migrations from another agent ([`Role::Peer`](perfplus_protocol::Role::Peer)): `MigrateBegin`
//! receives a VM through the engine ([`receiver::receive`]) and hosts it; `PostcopyAttach` hands the other
//! connections of a post-copy migration to the arrival they belong to.
use std::sync::Arc;

use anyhow::bail;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{MigrationMode, MIGRATION_ID_MAX};

use super::boot::check_name;
use super::{AgentState, HostedVm};
use crate::migration::receiver;

/// `MigrateBegin`: receives a VM from another agent and hosts it here once it resumes. The name is
/// reserved while the VM arrives; on failure nothing is kept.
pub(super) async fn migrate_in(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    begin: perfplus_protocol::MigrateBegin,
) -> anyhow::Result<()> {
    let name = begin.vm.clone();
    let refuse = match check_name(&name) {
        Err(err) => Some(format!("{err:#}")),
        Ok(()) => {
            let vms = state.vms.lock().expect("vms lock");
            let mut arriving = state.arriving.lock().expect("arriving lock");
            if vms.contains_key(&name) || arriving.contains(&name) {
                Some(format!("a VM named {name:?} already exists on agent {}", state.name))
            } else {
                arriving.push(name.clone());
                None
            }
        }
    };
    if let Some(text) = refuse {
        conn.send_error(&text).await;
        bail!(text);
    }
    tracing::info!(vm = %name, memory_bytes = begin.memory_bytes, "migration in starts");
    let inbound = receiver::Inbound {
        hasher: state.hasher.clone(),
        index: state.index.clone(),
    };
    let (memory_bytes, vcpus, cmdline) = (begin.memory_bytes, begin.vcpus, begin.cmdline.clone());
    let tracker = begin.options.tracker.unwrap_or_default();
    let install_state = state.clone();
    let install_name = name.clone();
    let (attach_tx, attach_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = begin.migration_id.clone();
    let postcopy = begin.options.mode != MigrationMode::Precopy;
    if postcopy {
        if id.is_empty() || id.len() > MIGRATION_ID_MAX {
            let text = "a post-copy migration needs an id of 1 to 64 characters".to_string();
            conn.send_error(&text).await;
            state.arriving.lock().expect("arriving lock").retain(|n| n != &name);
            bail!(text);
        }
        state.attach.lock().expect("attach lock").insert(id.clone(), attach_tx);
    }
    let result = receiver::receive(conn, begin, &inbound, attach_rx, move |vm, filling| {
        let mut vms = install_state.vms.lock().expect("vms lock");
        vms.insert(
            install_name.clone(),
            HostedVm {
                vm,
                memory_bytes,
                vcpus,
                cmdline,
                tracker,
                // A guest whose memory is still arriving cannot be stopped or migrated.
                migrating: filling,
                tracking: false,
            },
        );
        install_state
            .arriving
            .lock()
            .expect("arriving lock")
            .retain(|n| n != &install_name);
        Ok(())
    })
    .await;
    if postcopy {
        state.attach.lock().expect("attach lock").remove(&id);
    }
    state.arriving.lock().expect("arriving lock").retain(|n| n != &name);
    if let Some(hosted) = state.vms.lock().expect("vms lock").get_mut(&name) {
        hosted.migrating = false;
    }
    if let Err(err) = &result {
        tracing::warn!(vm = %name, "migration in failed, nothing kept: {err:#}");
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
    let tx = state.attach.lock().expect("attach lock").get(&attach.id).cloned();
    match tx {
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
