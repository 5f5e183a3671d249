//! The CLI's side of the control protocol: one authenticated connection per command.

use anyhow::bail;

use crate::report::{MigrationReport, RoundReport};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Credentials, Message, MigrateRequest, Role, VmInfo, VmStartRequest};

/// A control connection to `agent`: host:port over TLS, or `unix:PATH` over the agent's control socket.
pub async fn connect(agent: &str, role: Role, credentials: &Credentials) -> anyhow::Result<Connection> {
    match agent.strip_prefix("unix:") {
        Some(path) => Connection::connect_local(std::path::Path::new(path), role).await,
        None => Connection::connect(agent, role, credentials).await,
    }
}

/// A connection from the CLI to one agent.
pub struct AgentClient {
    conn: Connection,
    agent: String,
}

impl AgentClient {
    /// Connects to `agent`: host:port (TLS, with `credentials`), or `unix:PATH`, the agent's control
    /// socket (no certificate: `credentials` go unused).
    pub async fn connect(agent: &str, credentials: &Credentials) -> anyhow::Result<AgentClient> {
        let conn = connect(agent, Role::Control, credentials).await?;
        Ok(AgentClient {
            conn,
            agent: agent.to_string(),
        })
    }

    async fn call(mut self, request: Message) -> anyhow::Result<Message> {
        self.conn.send(&request).await?;
        self.conn.recv().await
    }

    pub async fn start_vm(self, request: VmStartRequest) -> anyhow::Result<VmInfo> {
        let agent = self.agent.clone();
        match self.call(Message::VmStart(request)).await? {
            Message::Vm(info) => Ok(info),
            other => bail!("agent {agent} answered VmStart with {}", other.describe()),
        }
    }

    pub async fn list(self) -> anyhow::Result<Vec<VmInfo>> {
        let agent = self.agent.clone();
        match self.call(Message::VmList).await? {
            Message::Vms(vms) => Ok(vms),
            other => bail!("agent {agent} answered VmList with {}", other.describe()),
        }
    }

    pub async fn status(self, name: &str) -> anyhow::Result<VmInfo> {
        let agent = self.agent.clone();
        match self.call(Message::VmStatus { name: name.to_string() }).await? {
            Message::Vm(info) => Ok(info),
            other => bail!("agent {agent} answered VmStatus with {}", other.describe()),
        }
    }

    pub async fn stop(self, name: &str) -> anyhow::Result<()> {
        let agent = self.agent.clone();
        match self.call(Message::VmStop { name: name.to_string() }).await? {
            Message::Done => Ok(()),
            other => bail!("agent {agent} answered VmStop with {}", other.describe()),
        }
    }

    pub async fn resume_vm(self, name: &str) -> anyhow::Result<VmInfo> {
        let agent = self.agent.clone();
        match self.call(Message::VmResume { name: name.to_string() }).await? {
            Message::Vm(info) => Ok(info),
            other => bail!("agent {agent} answered VmResume with {}", other.describe()),
        }
    }

    /// Streams VM `name`'s console: `output` gets each chunk (and the bytes lost before it) until the
    /// agent ends the stream (not following, or the VM left).
    pub async fn console(
        mut self,
        name: &str,
        follow: bool,
        mut output: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let request = perfplus_protocol::ConsoleRequest {
            name: name.to_string(),
            follow,
        };
        self.conn.send(&Message::VmConsole(request)).await?;
        loop {
            match self.conn.recv().await? {
                Message::ConsoleOutput(chunk) => output(chunk.lost, &chunk.bytes)?,
                Message::Done => return Ok(()),
                other => bail!("agent {} answered VmConsole with {}", self.agent, other.describe()),
            }
        }
    }

    /// Asks the (source) agent to resume post-copy migration `id` now and waits for its report.
    pub async fn resume(mut self, id: &str) -> anyhow::Result<MigrationReport> {
        self.conn.send(&Message::MigrateResume { id: id.to_string() }).await?;
        loop {
            match self.conn.recv().await? {
                Message::Progress(_) => {}
                Message::MigrateDone(report) => return Ok(*report),
                other => bail!("agent {} sent {} while resuming", self.agent, other.describe()),
            }
        }
    }

    /// Cancels migration `id` on this agent; returns what became of the guest.
    pub async fn cancel(mut self, id: &str) -> anyhow::Result<String> {
        self.conn.send(&Message::MigrateCancel { id: id.to_string() }).await?;
        match self.conn.recv().await? {
            Message::Cancelled { what_happened } => Ok(what_happened),
            other => bail!("agent {} answered the cancel with {}", self.agent, other.describe()),
        }
    }

    /// Asks the agent to migrate a VM; `on_round` sees every round as it finishes.
    pub async fn migrate(
        mut self,
        request: MigrateRequest,
        mut on_round: impl FnMut(&RoundReport),
    ) -> anyhow::Result<MigrationReport> {
        self.conn.send(&Message::Migrate(request)).await?;
        loop {
            match self.conn.recv().await? {
                Message::Progress(round) => on_round(&round),
                Message::MigrateDone(report) => return Ok(*report),
                other => bail!("agent {} sent {} during the migration", self.agent, other.describe()),
            }
        }
    }

    /// Asks the (source) agent to relay the QEMU migration `request` describes; waits for its report.
    pub async fn qemu_migrate(
        mut self,
        request: perfplus_protocol::QemuMigrateRequest,
    ) -> anyhow::Result<crate::qemu::report::QemuReport> {
        self.conn.send(&Message::QemuMigrate(request)).await?;
        match self.conn.recv().await? {
            Message::QemuMigrateDone { report_json } => Ok(serde_json::from_str(&report_json)?),
            other => bail!("agent {} answered QemuMigrate with {}", self.agent, other.describe()),
        }
    }
}
