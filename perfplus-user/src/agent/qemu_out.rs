//! The source half of `perfplus qemu migrate` on the agent: a CLI's `QemuMigrate`, run with this
//! agent's credentials and page digests, answered with the report.

use std::sync::Arc;

use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Message, QemuMigrateRequest};

use super::AgentState;
use crate::qemu::{outbound, report};

pub(super) async fn migrate(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    request: QemuMigrateRequest,
) -> anyhow::Result<()> {
    tracing::info!(qmp = %request.qmp, to = %request.to, incoming = %request.incoming, "relaying a QEMU migration out");
    let report = outbound::migrate(&state.credentials, &state.hasher, &state.index, &request, |info| {
        tracing::debug!("{}", report::progress_line(info))
    })
    .await?;
    tracing::info!(qmp = %request.qmp, status = %report.status, link_bytes = report.link_bytes, "QEMU migration relayed out");
    conn.send(&Message::QemuMigrateDone {
        report_json: serde_json::to_string(&report)?,
    })
    .await
}
