//! The agent's log: on stderr, as text lines or as one JSON object a line. Spans are part of every
//! line: a migration's lines carry `migration_id` (and `vm`) from the span the agent opens for it.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use super::settings::LogFormat;

/// Installs the process's subscriber. `level` was checked by [`super::Settings`].
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("log level {level:?}: {e}"))?;
    // Colours only for a terminal (not for a file, a pipe or the journal).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        // The span's fields are flattened into `span` and `spans`; the migration id is in both.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
