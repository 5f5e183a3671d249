//! The destination half of `perfplus qemu migrate`: a peer's `QemuRelayBegin`, answered with what this
//! host holds (`MigrateReady{held}`: the content index's digest prefixes), then the relay dialect in,
//! a valid QEMU stream out to the destination QEMU's incoming socket (references expanded from pages
//! of this migration or from the content index, re-hashed before they are written), QEMU's return
//! path back. The pages that came whole are staged and, once the stream was written whole, archived
//! in the page store (a return trip or a second VM of the same image finds them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Message, MigrateReady, QemuRelayBegin, QemuRelayDone};
use perfplus_qemu::qmp::Qmp;
use perfplus_qemu::relay::{self, RelayConfig, Relayed};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};

use super::AgentState;
use crate::qemu::held::{self, Archived, HostIndex, Stager, Tee};
use crate::qemu::{link, QemuSocket};

/// How long the destination QEMU may take to report the end of its migration after the stream ended.
const SETTLE: Duration = Duration::from_secs(60);

/// How long a failed relay reads on, so that the source reads its error before the connection closes.
const DRAIN: Duration = Duration::from_secs(10);

/// Relays one QEMU migration into the QEMU `begin` names; errors go to the peer too.
pub(super) async fn relay_in(
    state: &Arc<AgentState>,
    mut conn: Connection,
    begin: QemuRelayBegin,
) -> anyhow::Result<()> {
    let max_held = state.limits.max_vm_memory / PAGE_SIZE as u64;
    let prepared = async {
        if begin.held_pages > max_held {
            bail!(
                "{} held pages asked for; this agent holds at most {max_held} (its --max-vm-memory)",
                begin.held_pages
            );
        }
        let mut qmp = match &begin.qmp {
            Some(path) => {
                let mut qmp = Qmp::connect(path.as_ref())
                    .await
                    .with_context(|| format!("the destination QEMU's QMP socket {path}"))?;
                qmp.check_supported().await?;
                Some(qmp)
            }
            None => None,
        };
        let socket = QemuSocket::connect(&begin.incoming).await?;
        if let Some(qmp) = &mut qmp {
            // Started with `-incoming URI`, QEMU is waiting: it says so.
            let status = qmp.execute("query-status", json!({})).await?;
            tracing::info!(incoming = %begin.incoming, status = %status["status"], "relaying a QEMU migration");
        }
        anyhow::Ok((qmp, socket))
    };
    let (qmp, socket) = match prepared.await {
        Ok(ready) => ready,
        Err(e) => {
            conn.send_error(&format!("{e:#}")).await;
            return Err(e);
        }
    };
    let held = held::advertisement(&state.index);
    tracing::debug!(held = held.len(), "advertising what this host holds to the QEMU relay");
    conn.send(&Message::MigrateReady(MigrateReady { held })).await?;
    let config = RelayConfig {
        held_pages: begin.held_pages as usize,
    };
    let (stager, tee) = Stager::start(&state.index).unzip();
    let host = HostIndex::new(Arc::clone(&state.index), format!("qemu {}", begin.incoming));
    let (mut reader, mut writer) = conn.into_split();
    let (relay_end, link_end) = link::pipe();
    let relayed = async {
        let (relayed, ()) = tokio::try_join!(
            async {
                match socket {
                    QemuSocket::Unix(s) => expand(relay_end, s, state, config, host, tee).await,
                    QemuSocket::Tcp(s) => expand(relay_end, s, state, config, host, tee).await,
                }
            },
            link::carry(&mut reader, &mut writer, link_end),
        )?;
        anyhow::Ok(relayed)
    };
    let Relayed { stats, last_pages } = match relayed.await {
        Ok(relayed) => relayed,
        Err(e) => {
            tracing::warn!(incoming = %begin.incoming, "QEMU relay failed: {e:#}");
            writer.send_error(&format!("{e:#}")).await;
            // Read on until the source hangs up: it then reads this error, not a reset connection.
            let _ = tokio::time::timeout(DRAIN, async { while reader.recv().await.is_ok() {} }).await;
            return Err(e);
        }
    };
    let (status, run_state) = match qmp {
        Some(mut qmp) => settle(&mut qmp).await.map(|(a, b)| (Some(a), Some(b)))?,
        None => (None, None),
    };
    // The stream was written whole: what it ended with is this host's now, unless QEMU refused it.
    let archived = match stager {
        Some(stager) if !matches!(status.as_deref(), Some("failed" | "cancelled")) => {
            tokio::task::spawn_blocking(move || stager.commit(&last_pages))
                .await?
                .unwrap_or_else(|e| {
                    tracing::warn!("page store: the relayed QEMU VM's pages were not archived: {e:#}");
                    Archived::default()
                })
        }
        _ => Archived::default(),
    };
    let total = stats.total();
    tracing::info!(
        incoming = %begin.incoming,
        full = total.full,
        expanded = total.referenced,
        expanded_host = total.host_referenced,
        archived = archived.pages,
        archive_skipped = archived.skipped,
        bytes_in = stats.bytes_in,
        bytes_out = stats.bytes_out,
        status = ?status,
        "QEMU migration relayed"
    );
    writer
        .send(&Message::QemuRelayDone(QemuRelayDone {
            pages_full: total.full,
            pages_expanded: total.referenced,
            zero_records: total.zero,
            bytes_in: stats.bytes_in,
            bytes_out: stats.bytes_out,
            qemu_migration_status: status,
            qemu_run_state: run_state,
            pages_expanded_host: total.host_referenced,
            pages_archived: archived.pages,
            archive_skipped: archived.skipped,
        }))
        .await
}

async fn expand<Q>(
    link: tokio::io::DuplexStream,
    qemu: Q,
    state: &AgentState,
    config: RelayConfig,
    host: HostIndex,
    tee: Option<Tee>,
) -> anyhow::Result<Relayed>
where
    Q: AsyncRead + AsyncWrite + Unpin,
{
    let mut expander = relay::destination::Expander::new(&state.hasher, config).with_host(Box::new(host));
    if let Some(tee) = tee {
        expander = expander.with_tee(Box::new(tee));
    }
    Ok(relay::destination::run_expander(link, qemu, expander).await?)
}

/// Waits until the destination QEMU's migration has ended; its status and run state.
async fn settle(qmp: &mut Qmp) -> anyhow::Result<(String, String)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = qmp.query_migrate().await?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") || Instant::now() > deadline {
            let run = qmp.execute("query-status", json!({})).await?;
            return Ok((status, run["status"].as_str().unwrap_or("unknown").to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
