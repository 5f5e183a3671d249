//! The source half of `perfplus qemu migrate`, run by the source host's agent (it holds the page
//! secret the digests are keyed with; a CLI does not) on the CLI's `QemuMigrate` request.
//!
//! 1. QMP: QEMU 7.2 and no capability the relay cannot carry (multifd, xbzrle, compress, post-copy,
//!    ...), else a clear refusal before anything starts; the downtime limit and bandwidth if given;
//!    the `return-path` capability on, so that QEMU completes only once the destination QEMU has
//!    loaded the whole stream: a relay that fails (a reference the destination cannot resolve) fails
//!    QEMU's migration, and the guest keeps running here.
//! 2. The destination agent (role Peer, this agent's certificate and destination policy): `QemuRelayBegin`; it checks its QEMU and
//!    connects to its incoming socket, then answers `MigrateReady{held}`: the digest prefixes its
//!    host holds (page store, hosted VMs), which the filter sends as references.
//! 3. A unix socket of the agent's own; QMP `migrate unix:…`; QEMU's stream goes through
//!    `perfplus_qemu::relay::source` and the connection (compressed as `options.compression` says:
//!    the connection's [`Compressor`](perfplus_protocol::frame::Compressor), as for page batches);
//!    QEMU's `query-migrate` gives the progress. The pages that leave are staged for this agent's
//!    page store ([`held::Stager`]) and archived once QEMU says `completed` (each address's last
//!    content).
//! 4. The report: QEMU's figures, the relay's counts, the destination's `QemuRelayDone`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Credentials, Message, QemuMigrateRequest, QemuRelayBegin, QemuRelayDone, Role};
use perfplus_qemu::qmp::Qmp;
use perfplus_qemu::relay::{self, RelayConfig};
use serde_json::{json, Value};
use tokio::net::UnixListener;

use super::held::{self, Archived, Stager};
use super::link;
use super::report::QemuReport;
use crate::content_index::ContentIndex;
use crate::hashing::PageHasher;

/// How long QEMU may take to connect after `migrate`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often QEMU's progress is asked for.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Migrates the QEMU behind `options.qmp` through the destination agent, with `credentials` (an
/// agent's), `hasher` (the agent's page digests) and `index` (whose page store keeps the pages that
/// left); `progress` sees QEMU's `query-migrate` while it runs.
pub async fn migrate(
    credentials: &Credentials,
    hasher: &PageHasher,
    index: &Arc<Mutex<ContentIndex>>,
    options: &QemuMigrateRequest,
    mut progress: impl FnMut(&Value),
) -> anyhow::Result<QemuReport> {
    let mut qmp = Qmp::connect(Path::new(&options.qmp))
        .await
        .with_context(|| format!("QMP socket {}", options.qmp))?;
    let version = qmp.check_supported().await?;
    let mut parameters = serde_json::Map::new();
    if let Some(ms) = options.downtime_limit_ms {
        parameters.insert("downtime-limit".into(), json!(ms));
    }
    if let Some(bytes) = options.max_bandwidth {
        parameters.insert("max-bandwidth".into(), json!(bytes));
    }
    if !parameters.is_empty() {
        qmp.execute("migrate-set-parameters", Value::Object(parameters)).await?;
    }
    // QEMU then waits for the destination QEMU's word that it loaded everything before it completes.
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "return-path", "state": true }] }),
    )
    .await?;

    let credentials = credentials.clone().expecting_agent(options.destination_agent.clone());
    let mut conn = Connection::connect(&options.to, Role::Peer, &credentials)
        .await
        .with_context(|| format!("connecting to destination agent {}", options.to))?;
    conn.send(&Message::QemuRelayBegin(QemuRelayBegin {
        incoming: options.incoming.clone(),
        qmp: options.destination_qmp.clone(),
        held_pages: options.held_pages,
    }))
    .await?;
    let host_held = match conn.recv().await? {
        Message::MigrateReady(ready) => held::advertised(ready.held)?,
        // An agent that holds nothing to offer.
        Message::Done => Default::default(),
        other => bail!("agent {} answered QemuRelayBegin with {}", options.to, other.describe()),
    };
    let bytes_before = conn.bytes_sent();
    // The relayed stream from here on; the destination's answers never pass this writer.
    conn.set_compression(options.compression.mode())?;

    let socket = SocketFile::new()?;
    let listener = UnixListener::bind(&socket.0).with_context(|| format!("listening on {}", socket.0.display()))?;
    qmp.migrate(&format!("unix:{}", socket.0.display())).await?;
    let (qemu, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "QEMU did not connect to {} within {CONNECT_TIMEOUT:?}",
                socket.0.display()
            )
        })?
        .context("QEMU's migration connection")?;
    drop(socket);

    let config = RelayConfig {
        held_pages: usize::try_from(options.held_pages).unwrap_or(usize::MAX),
    };
    let (stager, tee) = Stager::start(index).unzip();
    let mut filter = relay::source::Filter::new(hasher, config).with_host_held(host_held);
    if let Some(tee) = tee {
        filter = filter.with_tee(Box::new(tee));
    }
    let (relay_end, link_end) = link::pipe();
    let (mut reader, mut writer) = conn.into_split();
    let relaying = async {
        let (relayed, ()) = tokio::try_join!(
            async {
                relay::source::run_filter(qemu, relay_end, filter)
                    .await
                    .map_err(anyhow::Error::from)
            },
            link::carry(&mut reader, &mut writer, link_end),
        )?;
        let done = match reader.recv().await? {
            Message::QemuRelayDone(done) => done,
            other => bail!("agent {} sent {} at the end", options.to, other.describe()),
        };
        anyhow::Ok((relayed, done))
    };
    let watching = async {
        loop {
            let info = qmp.query_migrate().await?;
            progress(&info);
            if matches!(info["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                return anyhow::Ok(info);
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
    };
    let (relayed, info) = tokio::join!(relaying, watching);
    let info = info?;
    let link_bytes = writer.bytes_sent() - bytes_before;
    let compressed = writer.compression_stats();
    let (relayed, done): (relay::Relayed, QemuRelayDone) = match relayed {
        Ok(result) => result,
        Err(e) => {
            let status = info["status"].as_str().unwrap_or("?");
            let run_state = match qmp.execute("query-status", json!({})).await {
                Ok(run) => run["status"].as_str().unwrap_or("unknown").to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            bail!(
                "QEMU's migration is {status}: the relay failed: {e:#}; the source QEMU's guest is {run_state}{}",
                if status == "completed" {
                    ""
                } else {
                    " here (the destination QEMU never ran it)"
                }
            )
        }
    };
    // Only what the migration completed with counts as held: archived once QEMU says so.
    let archived = match stager {
        Some(stager) if info["status"] == "completed" => {
            let last = relayed.last_pages;
            tokio::task::spawn_blocking(move || stager.commit(&last))
                .await?
                .unwrap_or_else(|e| {
                    tracing::warn!("page store: the relayed QEMU VM's pages were not archived: {e:#}");
                    Archived::default()
                })
        }
        _ => Archived::default(),
    };
    let stats = relayed.stats;
    Ok(QemuReport::new(
        Path::new(&options.qmp),
        &options.to,
        version,
        &info,
        stats,
        link_bytes,
        done,
    )
    .with_archive(archived)
    .with_compression(options.compression, compressed))
}

/// A unix socket path of this process's own, removed when dropped.
struct SocketFile(PathBuf);

impl SocketFile {
    fn new() -> anyhow::Result<SocketFile> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("perfplus-qemu-{}-{nanos}.sock", std::process::id()));
        if Path::new(&path).exists() {
            bail!("{} exists already", path.display());
        }
        Ok(SocketFile(path))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
