//! `perfplus agent` as a service: the settings (defaults, config file, flags), the log, the agent
//! itself, its metrics endpoint and the readiness signal to a service manager.
//!
//! - [`settings`]: [`Settings`] (the one set of defaults), the TOML file, the flags ([`AgentArgs`]);
//! - `logging`: text or JSON lines on stderr, filtered by the settings' level;
//! - `metrics_http`: `GET /metrics` ([`crate::metrics`]) on its own port, when configured;
//! - `notify`: `READY=1` and `STATUS=` over `$NOTIFY_SOCKET` (systemd's `Type=notify`) once the agent
//!   listens; nothing without that variable.
//!
//! The same path runs under systemd (`scripts/systemd/perfplus-agent.service`) and without it
//! (`perfplus agent --config FILE` from a shell, an init script or a supervisor).

mod logging;
mod metrics_http;
mod notify;
pub mod settings;

use std::path::PathBuf;

use anyhow::Context;
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::CertRole;

use crate::agent::{Agent, AgentConfig};
pub use settings::{AgentArgs, Settings};

/// Runs `perfplus agent` until the process ends. `tls_dir` is the global `--tls-dir` (or
/// `PERFPLUS_TLS_DIR`) when one was given: it overrides the file's `tls_dir`.
pub fn run(args: AgentArgs, tls_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let resolved = Settings::resolve(&args, tls_dir.as_deref(), rust_log.as_deref())?;
    if args.print_config {
        print!("{}", resolved.print());
        return Ok(());
    }
    let settings = resolved.settings;
    logging::init(&settings.log_level, settings.log_format)?;
    if let Some(file) = &resolved.file {
        tracing::info!(config = %file.display(), "configuration read");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let credentials = crate::cli::pki::load(&settings.tls_dir)?;
    anyhow::ensure!(
        credentials.identity().role == CertRole::Agent,
        "an agent needs an agent's certificate; this one is {}'s (in {}; `perfplus cert issue --agent NAME`)",
        credentials.identity(),
        settings.tls_dir.display()
    );
    let identity = credentials.identity().clone();
    let allowed = (!settings.allow_destinations.is_empty()).then(|| settings.allow_destinations.clone());
    let agent = Agent::bind(AgentConfig {
        listen: settings.listen.clone(),
        state_dir: settings.state_dir.clone(),
        page_key: crate::cli::pki::page_key(&settings.tls_dir)?,
        credentials: credentials.with_allowed_agents(allowed),
        page_store_pages: settings.page_store_size.0 / PAGE_SIZE as u64,
        limits: settings.limits(),
        console_log_bytes: settings.console_log_size.0,
        control_socket: settings.control_socket.clone(),
    })
    .await?;
    let metrics = match &settings.metrics_listen {
        Some(addr) => Some(metrics_http::bind(addr, agent.view()).await?),
        None => None,
    };
    let listening = agent.local_addr();
    // Scripts and tests wait for this line to learn the address.
    println!("perfplus agent listening on {listening}");
    let mut status = format!("listening on {listening}");
    if let Some(path) = agent.control_socket() {
        status.push_str(&format!(", control socket {}", path.display()));
    }
    if let Some(metrics) = &metrics {
        let addr = metrics.local_addr();
        println!("perfplus agent metrics on http://{addr}/metrics");
        status.push_str(&format!(", metrics on {addr}"));
    }
    tracing::info!(%listening, %identity, "agent ready");
    // Only now is the agent ready: its listener (and the metrics endpoint) accept connections.
    notify::ready(&status);
    if let Some(metrics) = metrics {
        tokio::spawn(metrics.serve());
    }
    agent.serve().await
}
