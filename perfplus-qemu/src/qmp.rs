//! A QMP client (QEMU's JSON monitor on a unix socket): the greeting, `qmp_capabilities`, commands and
//! their replies; asynchronous events are skipped. [`Qmp::check_supported`] is the set-up check the
//! relay needs before a migration starts: QEMU 7.2, and none of the capabilities whose stream the
//! relay cannot carry.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The QEMU version whose stream format this crate implements (major, minor).
pub const SUPPORTED_VERSION: (u64, u64) = (7, 2);

/// The longest line QMP may send (a `query-migrate` reply is ~1 KiB; a guard, not a limit QEMU has).
const MAX_LINE: usize = 1 << 20;

/// Capabilities whose stream the relay cannot carry, with what to say.
const REFUSED_CAPABILITIES: [(&str, &str); 9] = [
    (
        "multifd",
        "multifd sends RAM on channels of its own; migrate over one channel",
    ),
    ("xbzrle", "XBZRLE sends deltas against a cache the relay does not keep"),
    (
        "compress",
        "compressed pages cannot be hashed; perfplus drops and references pages instead",
    ),
    ("postcopy-ram", "post-copy is not relayed yet"),
    ("postcopy-preempt", "post-copy is not relayed yet"),
    ("x-ignore-shared", "shared RAM blocks change the block list's format"),
    ("validate-uuid", "it adds a configuration subsection"),
    ("rdma-pin-all", "RDMA is not a socket"),
    ("background-snapshot", "a snapshot is not a migration"),
];

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU {found} is not supported: perfplus relays the migration stream of QEMU {}.{} only", SUPPORTED_VERSION.0, SUPPORTED_VERSION.1)]
    Version { found: String },
    #[error("QEMU's migration capability {capability} is on: {why}")]
    Capability { capability: String, why: String },
    #[error("unexpected QMP reply to {command}: {reply}")]
    Reply { command: String, reply: String },
}

/// One QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let (read, writer) = UnixStream::connect(path).await?.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = qmp.read_value().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Reply {
                command: "(greeting)".into(),
                reply: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.len() > MAX_LINE {
                return Err(QmpError::LineTooLong);
            }
            let value: Value = serde_json::from_slice(&line)?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    /// Runs `command` and returns its `return` value, or QEMU's error.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command, "arguments": arguments }).to_string();
        request.push('\n');
        self.writer.write_all(request.as_bytes()).await?;
        let reply = self.read_value().await?;
        if let Some(error) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.into(),
                class: error["class"].as_str().unwrap_or("?").into(),
                desc: error["desc"].as_str().unwrap_or("?").into(),
            });
        }
        reply.get("return").cloned().ok_or_else(|| QmpError::Reply {
            command: command.into(),
            reply: reply.to_string(),
        })
    }

    /// QEMU's version as `query-version` gives it: (major, minor, micro).
    pub async fn version(&mut self) -> Result<(u64, u64, u64), QmpError> {
        let v = self.execute("query-version", json!({})).await?;
        let q = &v["qemu"];
        match (q["major"].as_u64(), q["minor"].as_u64(), q["micro"].as_u64()) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            _ => Err(QmpError::Reply {
                command: "query-version".into(),
                reply: v.to_string(),
            }),
        }
    }

    /// Refuses a QEMU other than 7.2 and a migration set up with a capability the relay cannot
    /// carry; returns the version.
    pub async fn check_supported(&mut self) -> Result<(u64, u64, u64), QmpError> {
        let version = self.version().await?;
        if (version.0, version.1) != SUPPORTED_VERSION {
            return Err(QmpError::Version {
                found: format!("{}.{}.{}", version.0, version.1, version.2),
            });
        }
        let caps = self.execute("query-migrate-capabilities", json!({})).await?;
        for cap in caps.as_array().into_iter().flatten() {
            let name = cap["capability"].as_str().unwrap_or("");
            if cap["state"].as_bool() == Some(true) {
                if let Some((_, why)) = REFUSED_CAPABILITIES.iter().find(|(c, _)| *c == name) {
                    return Err(QmpError::Capability {
                        capability: name.into(),
                        why: (*why).into(),
                    });
                }
            }
        }
        Ok(version)
    }

    /// Starts the migration to `uri` (`tcp:HOST:PORT` or `unix:PATH`).
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", json!({ "uri": uri })).await.map(|_| ())
    }

    /// `query-migrate` as QEMU returns it (`status`, `total-time`, `downtime`, `ram`: …).
    pub async fn query_migrate(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate", json!({})).await
    }
}
