//! The per-host agent: hosts VMs, answers the CLI, and migrates VMs to and from other agents.
//!
//! One TCP listener serves both kinds of connection; the handshake says which one it is
//! ([`Role::Control`] from a CLI, [`Role::Peer`] from another agent). Both run TLS 1.3 with a
//! certificate of the cluster CA on each side ([`perfplus_protocol::tls`]). A peer connection is
//! admitted only from an agent's certificate; each control request is checked against the role of the
//! CLI's certificate (reading for readers and agents, everything for operators). Every connection is
//! handled on its own task; a failure on one never touches the VMs.
//!
//! This file binds the listener and dispatches each connection by its role; the rest, one concern a file:
//! - `control`: the CLI's requests (start, list, status, stop, migrate, resume, track);
//! - `boot`: booting a VM and indexing its image's pages;
//! - `control_socket`: the unix control socket of local operators (no certificate; `SO_PEERCRED`);
//! - `console`: a VM's serial console streamed to a CLI (`VmConsole`), and its log file;
//! - `outgoing`: migrations of hosted VMs to other agents, and their resumable handles;
//! - `incoming`: migrations from other agents, and the attachment of their post-copy connections;
//! - `qemu_out`, `qemu_in`: the two halves of `perfplus qemu migrate` (a relayed QEMU migration stream);
//! - `archive`: keeping the pages of VMs that left in the page store;
//! - `by_id`: the tables of migrations under way by id (outgoing ones, incoming post-copy ones);
//! - `registry`: the VMs hosted, the names reserved, and what each VM is busy with (one lock, guards);
//! - `admission`: accept errors survived, connections in the handshake capped (in all, per source);
//! - `limits`: the agent's quotas ([`AgentLimits`]): VM sizes, connections in the handshake;
//! - [`track`]: the agent's side of `perfplus track --vm`.

mod admission;
mod archive;
mod boot;
mod by_id;
mod console;
mod control;
mod control_socket;
mod incoming;
pub mod limits;
mod outgoing;
mod qemu_in;
mod qemu_out;
mod registry;
pub mod track;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tracing::Instrument;

use self::admission::{Admission, RateLimited};
use self::by_id::ById;
use self::registry::{Busy, Registry, Snapshot};
use crate::content_index::ContentIndex;
use crate::hashing::PageHasher;
use crate::migration::signals::StatusNote;
use crate::page_store::PageStore;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{ClusterKey, Credentials, Message, Role, VmInfo};
use perfplus_vmm::tracking::TrackerKind;
use perfplus_vmm::vm::{RunState, Vm};

pub use self::limits::AgentLimits;

/// Label the page-hash key is derived under from the cluster's page-digest secret.
pub const PAGE_DIGEST_KEY_LABEL: &str = "perfplus page digest v1";

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Address to listen on (host:port; port 0 picks a free one).
    pub listen: String,
    /// Where the agent keeps its page store.
    pub state_dir: PathBuf,
    /// This agent's TLS credentials (its certificate must be an agent's), with its allow-list of
    /// destinations, if any.
    pub credentials: Credentials,
    /// The cluster's page-digest secret (`page.key`, the same on every agent of the cluster).
    pub page_key: ClusterKey,
    /// Capacity of the on-disk page store, in 4 KiB pages (0 = no store).
    pub page_store_pages: u64,
    /// Quotas: VM sizes, connections in the handshake.
    pub limits: AgentLimits,
    /// Largest console log file of one VM (`STATE_DIR/console/NAME.log`); 0: no console logs.
    pub console_log_bytes: u64,
    /// The unix control socket for local operators, if any.
    pub control_socket: Option<PathBuf>,
}

/// What the agent keeps of a VM it hosts (cloned out of the registry: cheap, and it holds the VM by `Arc`).
#[derive(Clone)]
struct HostedVm {
    vm: Arc<Vm>,
    memory_bytes: u64,
    vcpus: u8,
    cmdline: String,
    /// The dirty tracker the VM was created for (its migrations' default).
    tracker: TrackerKind,
    /// What the agent says about the VM beyond its run state (post-copy waiting for pages, a paused
    /// copy a migration left here).
    note: StatusNote,
}

/// What `VmList` and `VmStatus` say about a hosted VM. Blocking: it reads the guest's memory, and the
/// snapshot may hold the last reference to a VM stopped meanwhile (dropping a VM joins its vCPU threads).
fn vm_info(hosted: &Snapshot<HostedVm>) -> VmInfo {
    let Snapshot {
        name,
        value: hosted,
        busy,
    } = hosted;
    let run_state = match hosted.vm.run_state() {
        RunState::Created => "created".to_string(),
        RunState::Running => "running".to_string(),
        RunState::Paused if *busy == Some(Busy::Migrating) => "paused (migrating)".to_string(),
        RunState::Paused => "paused".to_string(),
        RunState::Halted => "halted".to_string(),
        RunState::Failed(why) => format!("failed: {why}"),
    };
    let guest = hosted.vm.guest_status();
    // What the operator should know beyond the state: the migration's note, a status page that
    // cannot be believed (guest memory, written by the guest), console output kept out of the log.
    let mut notes: Vec<String> = hosted.note.get().into_iter().collect();
    if let Some(why) = guest.as_ref().and_then(|g| g.untrustworthy()) {
        notes.push(format!("the guest's status page is not trustworthy: {why}"));
    }
    let dropped = hosted.vm.console_dropped();
    if dropped.lines > 0 {
        notes.push(format!(
            "{} console lines ({} bytes) were over the log limit of {} bytes/s and not logged",
            dropped.lines,
            dropped.bytes,
            perfplus_vmm::vm::console::LOG_BYTES_PER_SEC
        ));
    }
    VmInfo {
        name: name.clone(),
        memory_bytes: hosted.memory_bytes,
        vcpus: hosted.vcpus,
        run_state,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        cmdline: hosted.cmdline.clone(),
        guest,
        console_tail: hosted.vm.console_tail(),
    }
}

/// What every connection's task shares.
///
/// Locks, one at a time and never two together: `vms`, `attach` and `outbound` are leaves held only
/// inside their own methods (no other lock is taken, no VM touched, while one is held); the content
/// `index` lock is taken by the agent and the engine between registry calls, never inside one.
struct AgentState {
    name: String,
    credentials: Credentials,
    limits: AgentLimits,
    hasher: PageHasher,
    /// The VMs hosted, the names reserved by boots and arrivals, and which VM is migrating or tracked.
    vms: Registry<HostedVm>,
    index: Arc<Mutex<ContentIndex>>,
    /// Incoming post-copy migrations by id: where `PostcopyAttach` connections go, and their cancel.
    attach: ById<incoming::IncomingHandle>,
    /// Outgoing migrations by id: their resume signal and, once done, their result.
    outbound: ById<outgoing::OutboundHandle>,
    /// Pages of departed VMs going into the page store.
    archiving: archive::Archiving,
}

impl AgentState {
    fn no_such_vm(&self, name: &str) -> anyhow::Error {
        anyhow::anyhow!("no VM named {name:?} on agent {}", self.name)
    }

    fn name_taken(&self, name: &str) -> String {
        format!("a VM named {name:?} already exists on agent {}", self.name)
    }
}

/// What the service around an agent may ask of it while it serves (see [`Agent::view`]).
#[derive(Clone)]
pub struct AgentView(Arc<AgentState>);

impl AgentView {
    /// VMs hosted now.
    pub fn vms_hosted(&self) -> usize {
        self.0.vms.len()
    }
}

pub struct Agent {
    listener: TcpListener,
    state: Arc<AgentState>,
    admission: Arc<Admission>,
    /// Where the VMs' console logs go, and their largest size (0: none).
    console_logs: (PathBuf, u64),
    control_socket: Option<control_socket::ControlSocket>,
}

impl Agent {
    /// Opens the page store and binds the listener.
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Agent> {
        anyhow::ensure!(
            config.limits.max_unauthenticated >= 1 && config.limits.max_unauthenticated_per_source >= 1,
            "the caps on connections in the handshake must be at least 1 (no connection could authenticate)"
        );
        anyhow::ensure!(
            config.credentials.identity().role == perfplus_protocol::CertRole::Agent,
            "an agent needs an agent's certificate; this one is {}'s (`perfplus cert issue --agent NAME`)",
            config.credentials.identity()
        );
        crate::private_files::state_dir(&config.state_dir)?;
        let hasher = PageHasher::new(&config.page_key.derive(PAGE_DIGEST_KEY_LABEL));
        let store = if config.page_store_pages > 0 {
            let dir = config.state_dir.join("page-store");
            Some(PageStore::open(
                &dir,
                config.page_store_pages,
                hasher.key_fingerprint(),
            )?)
        } else {
            None
        };
        let listener = TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let control_socket = config.control_socket.as_deref().map(control_socket::bind).transpose()?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AgentState {
            name: addr.to_string(),
            credentials: config.credentials.clone(),
            limits: config.limits.clone(),
            index: Arc::new(Mutex::new(ContentIndex::new(hasher.clone(), store))),
            hasher,
            vms: Registry::default(),
            attach: ById::default(),
            outbound: ById::default(),
            archiving: archive::Archiving::default(),
        });
        let admission = Admission::new(
            config.limits.max_unauthenticated,
            config.limits.max_unauthenticated_per_source,
        );
        Ok(Agent {
            listener,
            state,
            admission,
            console_logs: (config.state_dir.join("console"), config.console_log_bytes),
            control_socket,
        })
    }

    /// A handle on what the agent hosts, for its metrics endpoint; it stays valid while the agent serves.
    pub fn view(&self) -> AgentView {
        AgentView(self.state.clone())
    }

    /// The control socket's path, if the agent has one.
    pub fn control_socket(&self) -> Option<&std::path::Path> {
        self.control_socket.as_ref().map(|s| s.path())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves connections until the process ends. A failed `accept` is logged and retried (after
    /// 100 ms when the agent lacks descriptors or memory), never fatal: the
    /// agent's guests outlive any number of connections. Connections over the handshake caps are
    /// closed at once.
    pub async fn serve(self) -> anyhow::Result<()> {
        let (dir, max_bytes) = self.console_logs.clone();
        tokio::spawn(console::keep_logs(self.state.clone(), dir, max_bytes));
        if let Some(socket) = self.control_socket {
            tokio::spawn(socket.serve(self.state.clone()));
        }
        let mut accept_errors = RateLimited::default();
        let mut refusals = RateLimited::default();
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    if let Some(left_out) = accept_errors.due() {
                        tracing::warn!(left_out, "accepting a connection: {err} (retrying)");
                    }
                    if admission::needs_backoff(&err) {
                        tokio::time::sleep(admission::ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            let permit = match self.admission.admit(peer.ip()) {
                Ok(permit) => permit,
                Err(refused) => {
                    if let Some(left_out) = refusals.due() {
                        tracing::warn!(%peer, left_out, "connection closed unanswered: {refused}");
                    }
                    drop(stream);
                    continue;
                }
            };
            let state = self.state.clone();
            let admission = self.admission.clone();
            tokio::spawn(async move {
                // The admission's place is held until the handshake ends, either way.
                let accepted = Connection::accept(stream, &state.credentials).await;
                drop(permit);
                match accepted {
                    Err(err) => admission.handshake_failed(peer, &err),
                    Ok((conn, role)) => {
                        if let Err(err) = handle(state, conn, role).await {
                            tracing::warn!(%peer, "connection ended with an error: {err:#}");
                        }
                    }
                }
            });
        }
    }
}

/// One authenticated connection: its first request, by the role the handshake agreed.
async fn handle(state: Arc<AgentState>, mut conn: Connection, role: Role) -> anyhow::Result<()> {
    let request = conn.recv().await?;
    match role {
        Role::Control => {
            // The role in the CLI's certificate decides what it may ask.
            let who = conn.peer_identity().clone();
            let allowed = match request.control_access() {
                Some(access) => who.role.allows(access),
                None => true, // not a control request: `control` refuses it, naming it
            };
            if !allowed {
                let text = format!(
                    "{} refused: the certificate of {who} may only read (vm list, vm status); starting, stopping, \
                     resuming, migrating, cancelling and tracking need an operator's certificate",
                    request.name()
                );
                tracing::warn!(peer = %conn.peer(), "{text}");
                conn.send_error(&text).await;
                bail!(text);
            }
            if let Err(err) = control::control(&state, &mut conn, request).await {
                conn.send_error(&format!("{err:#}")).await;
                return Err(err);
            }
            Ok(())
        }
        Role::Peer => match request {
            Message::MigrateBegin(begin) => {
                // Every line of the arrival, here and in the engine, carries the migration's id.
                let span = tracing::info_span!("migration", migration_id = %begin.migration_id, vm = %begin.vm);
                let result = incoming::migrate_in(&state, &mut conn, begin).instrument(span).await;
                let arrived = if result.is_ok() { "hosted" } else { "failed" };
                crate::metrics::get().incoming.with_label_values(&[arrived]).inc();
                result
            }
            Message::PostcopyAttach(attach) => incoming::attach(&state, conn, attach).await,
            Message::QemuRelayBegin(begin) => qemu_in::relay_in(&state, conn, begin).await,
            other => {
                let text = format!(
                    "a peer connection must start with MigrateBegin, PostcopyAttach or QemuRelayBegin, not {}",
                    other.describe()
                );
                conn.send_error(&text).await;
                bail!(text)
            }
        },
    }
}
