//! The agent's settings: the defaults, the TOML config file and the command-line flags, merged in that
//! order (a flag overrides the file, the file overrides a default).
//!
//! [`Settings`] is the one place the defaults live (its `Default`); the file deserializes into the same
//! struct with every key optional, and [`AgentArgs`] (the flags of `perfplus agent`) are all optional
//! too, so a flag given overrides and a flag left out does not. A key the file does not define is an
//! error that names the key and the file. `perfplus agent --print-config` prints the merged result
//! in the file's own format, so it can serve as a starting file.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::agent::limits::{
    AgentLimits, DEFAULT_MAX_UNAUTHENTICATED, DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE, DEFAULT_MAX_VCPUS,
    DEFAULT_MAX_VM_MEMORY,
};

/// The config file `perfplus agent` reads when `--config` names none, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/perfplus/agent.toml";

/// How the agent writes its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people: time, level, spans (the migration id), message, fields.
    #[default]
    Text,
    /// One JSON object a line, with the spans (`migration_id`) as fields: for log collectors.
    Json,
}

/// A size in bytes, written `512M`, `64G`, `4096` (or a plain number of bytes in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Size, String> {
        parse_size(text).map(Size)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
        match UNITS
            .iter()
            .find(|(unit, _)| self.0 != 0 && self.0.is_multiple_of(*unit))
        {
            Some((unit, suffix)) => write!(f, "{}{suffix}", self.0 / unit),
            None => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Everything `perfplus agent` is configured with. Its `Default` holds every default; the file's keys
/// are its field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address for the CLI and for other agents (host:port; port 0 picks a free one).
    pub listen: String,
    /// The agent's state: its page store, the VMs' console logs.
    pub state_dir: PathBuf,
    /// This agent's TLS credentials (ca.pem, cert.pem, key.pem, page.key), as `perfplus cert issue
    /// --agent` writes them.
    pub tls_dir: PathBuf,
    /// On-disk store of pages of VMs that left this host (0 disables it).
    pub page_store_size: Size,
    /// Largest guest memory of one VM this agent creates.
    pub max_vm_memory: Size,
    /// Most vCPUs of one VM this agent creates.
    pub max_vcpus: u8,
    /// Connections in the handshake (TLS, Hello) at once, at most.
    pub max_unauthenticated: usize,
    /// Of those, from one source address (IPv4 address, IPv6 /64).
    pub max_unauthenticated_per_source: usize,
    /// Agents (names in their certificates) this agent migrates to; empty: any agent of the cluster.
    pub allow_destinations: Vec<String>,
    /// Log filter (`info`, `debug`, or directives like `info,perfplus::migration=debug`); `RUST_LOG`
    /// overrides the file's, `--log-level` overrides both.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Address of the Prometheus endpoint (`GET /metrics`); absent: no metrics endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// A unix socket for the operators of this host (mode 0600; root or the agent's user; no
    /// certificate): `perfplus ... --agent unix:PATH`. Absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Each VM's serial console is logged to STATE_DIR/console/NAME.log (mode 0600), at most this much:
    /// then the file moves to NAME.log.1 (replacing it) and a new one starts. 0: no console logs.
    pub console_log_size: Size,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:7001".to_string(),
            state_dir: PathBuf::from("/var/lib/perfplus"),
            tls_dir: PathBuf::from("/etc/perfplus"),
            page_store_size: Size(512 << 20),
            max_vm_memory: Size(DEFAULT_MAX_VM_MEMORY),
            max_vcpus: DEFAULT_MAX_VCPUS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            allow_destinations: Vec::new(),
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
            metrics_listen: None,
            control_socket: None,
            console_log_size: Size(1 << 20),
        }
    }
}

/// The flags of `perfplus agent`. Each overrides the config file's key of the same name; the defaults
/// are [`Settings::default`] (`perfplus agent --print-config` shows them).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// The config file (TOML). Default: /etc/perfplus/agent.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, flags merged) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Address to listen on for the CLI and for other agents (port 0 picks a free port; the agent
    /// prints the address it got). [default: 127.0.0.1:7001]
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for the agent's state (its page store of earlier migrations, console logs).
    /// [default: /var/lib/perfplus]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Size of the on-disk page store that keeps pages of VMs that left this host, so that their
    /// content is not sent again if they come back (e.g. 512M; 0 disables it). [default: 512M]
    #[arg(long)]
    pub page_store_size: Option<Size>,
    /// Largest guest memory of one VM this agent creates, started here or arriving by migration
    /// (e.g. 64G); larger requests are refused before anything is allocated. [default: 64G]
    #[arg(long)]
    pub max_vm_memory: Option<Size>,
    /// Most vCPUs of one VM this agent creates. [default: 64]
    #[arg(long)]
    pub max_vcpus: Option<u8>,
    /// Connections that have not yet completed the handshake (TLS and the perfplus Hello), at most;
    /// more are closed at once. [default: 64]
    #[arg(long)]
    pub max_unauthenticated: Option<usize>,
    /// Of those, from one source address (an IPv4 address or an IPv6 /64), at most. [default: 8]
    #[arg(long)]
    pub max_unauthenticated_per_source: Option<usize>,
    /// Migrate only to these agents (names in their certificates; repeat or separate with commas).
    /// Without it (and without `allow_destinations` in the file), to any agent of the cluster.
    #[arg(long, value_name = "AGENT", value_delimiter = ',')]
    pub allow_destination: Vec<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives. [default: info]
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text, or json (one object a line, the migration id a field). [default: text]
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100). Default: off.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// A unix control socket for local operators (e.g. /run/perfplus/control.sock; mode 0600, root or
    /// the agent's user, no certificate): `perfplus vm list --agent unix:PATH`. Default: none.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Largest console log of one VM (STATE_DIR/console/NAME.log, then NAME.log.1; 0: none). [default: 1M]
    #[arg(long)]
    pub console_log_size: Option<Size>,
}

/// Where the settings came from, for `--print-config`'s header and for errors.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub settings: Settings,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// Whether the log level came from `RUST_LOG` (it overrides the file's, not `--log-level`).
    pub log_level_from_env: bool,
}

impl Settings {
    /// Reads a config file: TOML with [`Settings`]' keys, all optional. An unknown key is an error
    /// naming it and the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Settings::from_toml(&text).with_context(|| format!("config file {}", path.display()))
    }

    fn from_toml(text: &str) -> anyhow::Result<Settings> {
        // toml's message names the key (`unknown field `listn`, expected one of ...`) and its line.
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    /// Defaults, then the file (`--config FILE`, else [`DEFAULT_CONFIG_PATH`] if it exists), then the
    /// flags. `tls_dir` is the global `--tls-dir` (or `PERFPLUS_TLS_DIR`) when one was given; `rust_log`
    /// is `RUST_LOG` if set.
    pub fn resolve(args: &AgentArgs, tls_dir: Option<&Path>, rust_log: Option<&str>) -> anyhow::Result<Resolved> {
        let file = match &args.config {
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let mut settings = match &file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let mut log_level_from_env = false;
        if let Some(level) = rust_log.filter(|l| !l.trim().is_empty()) {
            settings.log_level = level.to_string();
            log_level_from_env = true;
        }
        settings.apply(args, tls_dir);
        if args.log_level.is_some() {
            log_level_from_env = false;
        }
        settings.check()?;
        Ok(Resolved {
            settings,
            file,
            log_level_from_env,
        })
    }

    /// The flags given override.
    fn apply(&mut self, args: &AgentArgs, tls_dir: Option<&Path>) {
        fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
            if let Some(value) = flag {
                *field = value.clone();
            }
        }
        set(&mut self.listen, &args.listen);
        set(&mut self.state_dir, &args.state_dir);
        if let Some(dir) = tls_dir {
            self.tls_dir = dir.to_path_buf();
        }
        set(&mut self.page_store_size, &args.page_store_size);
        set(&mut self.max_vm_memory, &args.max_vm_memory);
        set(&mut self.max_vcpus, &args.max_vcpus);
        set(&mut self.max_unauthenticated, &args.max_unauthenticated);
        set(
            &mut self.max_unauthenticated_per_source,
            &args.max_unauthenticated_per_source,
        );
        if !args.allow_destination.is_empty() {
            self.allow_destinations = args.allow_destination.clone();
        }
        set(&mut self.log_level, &args.log_level);
        set(&mut self.log_format, &args.log_format);
        if args.metrics_listen.is_some() {
            self.metrics_listen = args.metrics_listen.clone();
        }
        set(&mut self.console_log_size, &args.console_log_size);
        if args.control_socket.is_some() {
            self.control_socket = args.control_socket.clone();
        }
    }

    /// What no agent can run with, said before anything starts.
    fn check(&self) -> anyhow::Result<()> {
        if self.max_unauthenticated == 0 || self.max_unauthenticated_per_source == 0 {
            bail!(
                "max_unauthenticated and max_unauthenticated_per_source must be at least 1 (no connection could \
                 authenticate)"
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            bail!(
                "log_level {:?} is not a level (error, warn, info, debug, trace) nor tracing directives",
                self.log_level
            );
        }
        Ok(())
    }

    /// The quotas.
    pub fn limits(&self) -> AgentLimits {
        AgentLimits {
            max_vm_memory: self.max_vm_memory.0,
            max_vcpus: self.max_vcpus,
            max_unauthenticated: self.max_unauthenticated,
            max_unauthenticated_per_source: self.max_unauthenticated_per_source,
        }
    }

    /// The settings as a config file (what `--print-config` prints after its header).
    pub fn to_toml(&self) -> String {
        let mut text = toml::to_string(self).expect("settings serialize to TOML");
        if self.metrics_listen.is_none() {
            text.push_str("# metrics_listen = \"127.0.0.1:9100\"  (off)\n");
        }
        if self.control_socket.is_none() {
            text.push_str("# control_socket = \"/run/perfplus/control.sock\"  (off)\n");
        }
        text
    }
}

impl Resolved {
    /// `--print-config`: where each value came from, then the settings as TOML.
    pub fn print(&self) -> String {
        let from = match &self.file {
            Some(path) => format!("defaults, overridden by {} and by the flags", path.display()),
            None => "defaults (no config file), overridden by the flags".to_string(),
        };
        let mut text = format!("# perfplus agent: effective configuration ({from})\n");
        if self.log_level_from_env {
            text.push_str("# log_level from RUST_LOG\n");
        }
        text.push_str(&self.settings.to_toml());
        text
    }
}

/// `256M`, `1G`, `4096`, `512K` → bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let number: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 256M or 1G"))?;
    let unit = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use K, M or G)")),
    };
    number.checked_mul(unit).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> AgentArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: AgentArgs,
        }
        let wrap = Wrap::try_parse_from(std::iter::once("agent").chain(flags.iter().copied())).unwrap();
        wrap.args
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").unwrap_err().contains("unknown size unit"));
        assert_eq!(Size(512 << 20).to_string(), "512M");
        assert_eq!(Size(0).to_string(), "0");
        assert_eq!(Size(4097).to_string(), "4097");
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let config = file(
            "listen = \"0.0.0.0:7101\"\nstate_dir = \"/srv/perfplus\"\npage_store_size = \"1G\"\nmax_vcpus = 4\n\
             max_vm_memory = 1073741824\nallow_destinations = [\"b\", \"c\"]\nmetrics_listen = \"127.0.0.1:9100\"\n\
             log_format = \"json\"\n",
        );
        let path = config.path().to_str().unwrap();
        let resolved = Settings::resolve(&args(&["--config", path, "--max-vcpus", "2"]), None, None).unwrap();
        let s = &resolved.settings;
        assert_eq!(resolved.file.as_deref(), Some(config.path()));
        assert_eq!(s.listen, "0.0.0.0:7101");
        assert_eq!(s.state_dir, PathBuf::from("/srv/perfplus"));
        assert_eq!(s.page_store_size, Size(1 << 30));
        assert_eq!(s.max_vm_memory, Size(1 << 30));
        assert_eq!(s.max_vcpus, 2, "the flag wins over the file");
        assert_eq!(s.allow_destinations, ["b", "c"]);
        assert_eq!(s.metrics_listen.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(s.log_format, LogFormat::Json);
        // Keys the file leaves out keep their defaults.
        assert_eq!(s.max_unauthenticated, DEFAULT_MAX_UNAUTHENTICATED);
        assert_eq!(s.tls_dir, Settings::default().tls_dir);

        let flags = Settings::resolve(
            &args(&[
                "--config",
                path,
                "--listen",
                "127.0.0.1:0",
                "--allow-destination",
                "d",
                "--log-format",
                "text",
                "--page-store-size",
                "0",
            ]),
            Some(Path::new("/tmp/creds")),
            Some("debug"),
        )
        .unwrap();
        assert_eq!(flags.settings.listen, "127.0.0.1:0");
        assert_eq!(flags.settings.allow_destinations, ["d"]);
        assert_eq!(flags.settings.log_format, LogFormat::Text);
        assert_eq!(flags.settings.page_store_size, Size(0));
        assert_eq!(flags.settings.tls_dir, PathBuf::from("/tmp/creds"));
        assert_eq!(flags.settings.log_level, "debug", "RUST_LOG overrides the file");
        let flag_level = Settings::resolve(&args(&["--config", path, "--log-level", "warn"]), None, Some("debug"));
        assert_eq!(
            flag_level.unwrap().settings.log_level,
            "warn",
            "--log-level overrides RUST_LOG"
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_the_file() {
        let config = file("listen = \"127.0.0.1:1\"\nmax_vcpu = 4\n");
        let err = Settings::resolve(&args(&["--config", config.path().to_str().unwrap()]), None, None).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("max_vcpu"), "{text}");
        assert!(text.contains(&config.path().display().to_string()), "{text}");
        let bad_size = file("page_store_size = \"12X\"\n");
        let text = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", bad_size.path().to_str().unwrap()]), None, None).unwrap_err()
        );
        assert!(text.contains("unknown size unit"), "{text}");
        let missing = Settings::resolve(&args(&["--config", "/nonexistent/agent.toml"]), None, None).unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/agent.toml"));
    }

    #[test]
    fn the_printed_configuration_reads_back_as_the_same_settings() {
        let resolved = Settings::resolve(&args(&["--config", file("").path().to_str().unwrap()]), None, None).unwrap();
        assert_eq!(resolved.settings, Settings::default());
        let printed = resolved.print();
        assert!(printed.contains("page_store_size = \"512M\""), "{printed}");
        assert_eq!(Settings::from_toml(&printed).unwrap(), resolved.settings);
        let with_metrics = Settings {
            metrics_listen: Some("127.0.0.1:9100".into()),
            allow_destinations: vec!["b".into()],
            ..Settings::default()
        };
        assert_eq!(Settings::from_toml(&with_metrics.to_toml()).unwrap(), with_metrics);
    }
}
