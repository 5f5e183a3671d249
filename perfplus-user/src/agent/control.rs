//! Control requests from a CLI ([`Role::Control`](perfplus_protocol::Role::Control)): `VmStart`, `VmList`,
//! `VmStatus`, `VmStop`, `VmResume`, `Migrate`, `MigrateResume`, `Track` and `VmConsole`, each answered on the
//! connection it came on.
use std::sync::Arc;

use anyhow::bail;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::Message;

use perfplus_vmm::vm::RunState;

use super::registry::{Busy, Refusal};
use super::{boot, console, incoming, outgoing, qemu_out, track, vm_info, AgentState};

/// Answers one control request.
pub(super) async fn control(state: &Arc<AgentState>, conn: &mut Connection, request: Message) -> anyhow::Result<()> {
    match request {
        Message::VmStart(req) => {
            let info = boot::start_vm(state, req).await?;
            conn.send(&Message::Vm(info)).await
        }
        Message::VmList => {
            let vms = state.vms.list();
            let infos = tokio::task::spawn_blocking(move || vms.iter().map(vm_info).collect()).await?;
            conn.send(&Message::Vms(infos)).await
        }
        Message::VmStatus { name } => {
            let Some(hosted) = state.vms.get(&name) else {
                return Err(state.no_such_vm(&name));
            };
            let info = tokio::task::spawn_blocking(move || vm_info(&hosted)).await?;
            conn.send(&Message::Vm(info)).await
        }
        Message::VmStop { name } => {
            let hosted = state.vms.stop(&name).map_err(|refusal| match refusal {
                Refusal::NoSuchVm => state.no_such_vm(&name),
                Refusal::Busy(_) => anyhow::anyhow!(
                    "VM {name:?} is being migrated or tracked; stop it afterwards, or end its migration first \
                     (`perfplus migrate --cancel ID --agent ...`; the id is in `vm status` and the agent's log)"
                ),
            })?;
            state.index.lock().expect("index lock").remove_vm(&name);
            tokio::task::spawn_blocking(move || drop(hosted)).await?;
            tracing::info!(vm = %name, "stopped");
            conn.send(&Message::Done).await
        }
        Message::VmResume { name } => {
            // A claim for the time of the resume: a VM being migrated or tracked is refused.
            let (claim, hosted) = state
                .vms
                .claim(&name, Busy::Migrating)
                .map_err(|refusal| match refusal {
                    Refusal::NoSuchVm => state.no_such_vm(&name),
                    Refusal::Busy(_) => {
                        anyhow::anyhow!("VM {name:?} is being migrated or tracked; resume it afterwards")
                    }
                })?;
            match hosted.vm.run_state() {
                RunState::Paused => hosted.vm.resume()?,
                other => bail!("VM {name:?} is not paused (it is {other:?})"),
            }
            hosted.note.clear();
            tracing::warn!(vm = %name, "resumed by an operator");
            drop(claim);
            let hosted = state.vms.get(&name).ok_or_else(|| state.no_such_vm(&name))?;
            let info = tokio::task::spawn_blocking(move || vm_info(&hosted)).await?;
            conn.send(&Message::Vm(info)).await
        }
        Message::Migrate(req) => outgoing::migrate_out(state, conn, req).await,
        Message::MigrateResume { id } => outgoing::resume(state, conn, id).await,
        Message::MigrateCancel { id } => {
            let what_happened = match outgoing::cancel(state, &id).await {
                Some(text) => text,
                None => match incoming::cancel(state, &id).await {
                    Some(text) => text,
                    None => bail!(
                        "no migration with id {id:?} on agent {}: neither an outgoing one nor an incoming \
                         one in post-copy (cancel a pre-copy migration on its source)",
                        state.name
                    ),
                },
            };
            conn.send(&Message::Cancelled { what_happened }).await
        }
        Message::Track(req) => track::track(state, conn, req).await,
        Message::QemuMigrate(req) => qemu_out::migrate(state, conn, req).await,
        Message::VmConsole(req) => console::stream(state, conn, req).await,
        other => bail!("{} is not a control request", other.describe()),
    }
}
