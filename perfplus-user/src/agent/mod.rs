//! The per-host agent: hosts VMs, answers the CLI, and migrates VMs to and from other agents.
//!
//! One TCP listener serves both kinds of connection; the handshake says which one it is
//! ([`Role::Control`] from a CLI, [`Role::Peer`] from another agent). Both are authenticated with the
//! cluster key. Every connection is handled on its own task; a failure on one never touches the VMs.

pub mod track;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use perfplus_common::PAGE_SIZE;
use tokio::net::TcpListener;

use crate::content_index::ContentIndex;
use crate::hashing::PageHasher;
use crate::migration::postcopy::{self, AttachTx};
use crate::migration::receiver;
use crate::migration::{source, Outbound};
use crate::page_store::PageStore;
use crate::report::MigrationReport;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{
    ClusterKey, KernelSource, Message, MigrateOptions, MigrateRequest, MigrationMode, Role, VmInfo, VmStartRequest,
    MIGRATION_ID_MAX,
};
use perfplus_vmm::tracking::TrackerKind;
use perfplus_vmm::vm::{builtin_guest, RunState, Vm};

/// Label the page-hash key is derived under from the cluster key.
pub const PAGE_DIGEST_KEY_LABEL: &str = "perfplus page digest v1";

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Address to listen on (host:port; port 0 picks a free one).
    pub listen: String,
    /// Where the agent keeps its page store.
    pub state_dir: PathBuf,
    pub key: ClusterKey,
    /// Capacity of the on-disk page store, in 4 KiB pages (0 = no store).
    pub page_store_pages: u64,
}

/// A VM this agent hosts.
struct HostedVm {
    vm: Arc<Vm>,
    memory_bytes: u64,
    vcpus: u8,
    cmdline: String,
    /// The dirty tracker the VM was created for (its migrations' default).
    tracker: TrackerKind,
    /// A migration of this VM is under way.
    migrating: bool,
    /// `perfplus track` is measuring this VM (it uses the VM's dirty log, as a migration does).
    tracking: bool,
}

struct AgentState {
    name: String,
    key: ClusterKey,
    hasher: PageHasher,
    vms: Mutex<HashMap<String, HostedVm>>,
    /// Names of VMs being received (reserved so that two arrivals cannot collide).
    arriving: Mutex<Vec<String>>,
    index: Arc<Mutex<ContentIndex>>,
    /// Incoming post-copy migrations by id: where `PostcopyAttach` connections go.
    attach: Mutex<HashMap<String, AttachTx>>,
    /// Outgoing migrations by id: their resume signal and, once done, their result.
    outbound: Mutex<HashMap<String, OutboundHandle>>,
}

/// An outgoing migration a CLI can resume (`MigrateResume`) and wait for.
#[derive(Clone)]
struct OutboundHandle {
    resume: crate::migration::outbound::ResumeSignal,
    done: tokio::sync::watch::Receiver<Option<Result<MigrationReport, String>>>,
}

pub struct Agent {
    listener: TcpListener,
    state: Arc<AgentState>,
}

impl Agent {
    /// Opens the page store and binds the listener.
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating the state directory {}", config.state_dir.display()))?;
        let hasher = PageHasher::new(&config.key.derive(PAGE_DIGEST_KEY_LABEL));
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
        let addr = listener.local_addr()?;
        let state = Arc::new(AgentState {
            name: addr.to_string(),
            key: config.key.clone(),
            index: Arc::new(Mutex::new(ContentIndex::new(hasher.clone(), store))),
            hasher,
            vms: Mutex::new(HashMap::new()),
            arriving: Mutex::new(Vec::new()),
            attach: Mutex::new(HashMap::new()),
            outbound: Mutex::new(HashMap::new()),
        });
        Ok(Agent { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves connections until the process ends.
    pub async fn serve(self) -> anyhow::Result<()> {
        loop {
            let (stream, peer) = self.listener.accept().await.context("accepting a connection")?;
            let state = self.state.clone();
            tokio::spawn(async move {
                if let Err(err) = handle(state, stream).await {
                    tracing::warn!(%peer, "connection ended with an error: {err:#}");
                }
            });
        }
    }
}

async fn handle(state: Arc<AgentState>, stream: tokio::net::TcpStream) -> anyhow::Result<()> {
    let (mut conn, role) = Connection::accept(stream, &state.key).await?;
    let request = conn.recv().await?;
    match role {
        Role::Control => {
            if let Err(err) = control(&state, &mut conn, request).await {
                conn.send_error(&format!("{err:#}")).await;
                return Err(err);
            }
            Ok(())
        }
        Role::Peer => match request {
            Message::MigrateBegin(begin) => migrate_in(&state, &mut conn, begin).await,
            Message::PostcopyAttach(attach) => {
                let tx = state.attach.lock().expect("attach lock").get(&attach.id).cloned();
                match tx {
                    Some(tx) => {
                        tracing::info!(id = %attach.id, channel = ?attach.channel, "post-copy connection attached");
                        if let Err(tokio::sync::mpsc::error::SendError((mut conn, _))) = tx.send((conn, attach.channel))
                        {
                            conn.send_error("that migration has ended").await;
                        }
                        Ok(())
                    }
                    None => {
                        let text = format!("no migration with id {:?} is in post-copy on this agent", attach.id);
                        conn.send_error(&text).await;
                        bail!(text)
                    }
                }
            }
            other => {
                let text = format!(
                    "a peer connection must start with MigrateBegin, not {}",
                    other.describe()
                );
                conn.send_error(&text).await;
                bail!(text)
            }
        },
    }
}

async fn control(state: &Arc<AgentState>, conn: &mut Connection, request: Message) -> anyhow::Result<()> {
    match request {
        Message::VmStart(req) => {
            let info = start_vm(state, req).await?;
            conn.send(&Message::Vm(info)).await
        }
        Message::VmList => {
            let mut infos: Vec<VmInfo> = {
                let vms = state.vms.lock().expect("vms lock");
                vms.iter().map(|(name, vm)| vm_info(name, vm)).collect()
            };
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            conn.send(&Message::Vms(infos)).await
        }
        Message::VmStatus { name } => {
            let info = {
                let vms = state.vms.lock().expect("vms lock");
                vms.get(&name).map(|vm| vm_info(&name, vm))
            };
            match info {
                Some(info) => conn.send(&Message::Vm(info)).await,
                None => bail!("no VM named {name:?} on agent {}", state.name),
            }
        }
        Message::VmStop { name } => {
            let removed = {
                let mut vms = state.vms.lock().expect("vms lock");
                match vms.get(&name) {
                    None => bail!("no VM named {name:?} on agent {}", state.name),
                    Some(vm) if vm.migrating => bail!("VM {name:?} is being migrated; stop it afterwards"),
                    Some(_) => vms.remove(&name),
                }
            };
            if let Some(hosted) = removed {
                state.index.lock().expect("index lock").remove_vm(&name);
                tokio::task::spawn_blocking(move || drop(hosted)).await?;
                tracing::info!(vm = %name, "stopped");
            }
            conn.send(&Message::Done).await
        }
        Message::Migrate(req) => migrate_out(state, conn, req).await,
        Message::MigrateResume { id } => {
            let handle = state.outbound.lock().expect("outbound lock").get(&id).cloned();
            let Some(mut handle) = handle else {
                bail!("no migration with id {id:?} is under way on agent {}", state.name);
            };
            handle.resume.notify_one();
            tracing::info!(%id, "resume requested by a CLI");
            let result = handle
                .done
                .wait_for(|r| r.is_some())
                .await
                .map_err(|_| anyhow::anyhow!("migration {id} ended without a result"))?
                .clone()
                .expect("waited for a result");
            match result {
                Ok(report) => conn.send(&Message::MigrateDone(Box::new(report))).await,
                Err(text) => bail!(text),
            }
        }
        Message::Track(req) => track(state, conn, req).await,
        other => bail!("{} is not a control request", other.describe()),
    }
}

fn vm_info(name: &str, hosted: &HostedVm) -> VmInfo {
    let run_state = match hosted.vm.run_state() {
        RunState::Created => "created".to_string(),
        RunState::Running => "running".to_string(),
        RunState::Paused if hosted.migrating => "paused (migrating)".to_string(),
        RunState::Paused => "paused".to_string(),
        RunState::Halted => "halted".to_string(),
        RunState::Failed(why) => format!("failed: {why}"),
    };
    VmInfo {
        name: name.to_string(),
        memory_bytes: hosted.memory_bytes,
        vcpus: hosted.vcpus,
        run_state,
        cmdline: hosted.cmdline.clone(),
        guest: hosted.vm.guest_status(),
        console_tail: hosted.vm.console_tail(),
    }
}

/// Checks a VM name: it appears in logs, paths and command lines.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid VM name {name:?}: use 1 to 64 characters among A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

async fn start_vm(state: &Arc<AgentState>, req: VmStartRequest) -> anyhow::Result<VmInfo> {
    check_name(&req.name)?;
    if !req.memory_bytes.is_multiple_of(PAGE_SIZE as u64) {
        bail!("memory size {} is not a multiple of 4 KiB", req.memory_bytes);
    }
    {
        let vms = state.vms.lock().expect("vms lock");
        if vms.contains_key(&req.name) || state.arriving.lock().expect("arriving lock").contains(&req.name) {
            bail!("a VM named {:?} already exists on agent {}", req.name, state.name);
        }
    }
    let name = req.name.clone();
    let (memory_bytes, vcpus, tracker) = (req.memory_bytes, req.vcpus, req.tracker);
    let hasher = state.hasher.clone();
    let (vm, cmdline, image_pages) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vm, String, _)> {
        let mut vm = Vm::create_with(&name, memory_bytes, vcpus, tracker.vm_options())?;
        let (kernel, cmdline) = match req.kernel {
            // The built-in guest paces itself and measures its stalls with the TSC.
            KernelSource::Builtin => (
                builtin_guest::IMAGE.to_vec(),
                format!("{} tsc_khz={}", req.cmdline.trim(), vm.tsc_khz()),
            ),
            KernelSource::Image(bytes) => (bytes, req.cmdline),
        };
        vm.load_multiboot(&kernel, &cmdline)?;
        // What the loader wrote is the image: index it, so that a VM booted from the same image
        // elsewhere can send those pages here as references.
        let image_pages = digest_data_pages(&vm, &hasher)?;
        vm.start()?;
        Ok((vm, cmdline, image_pages))
    })
    .await??;
    let hosted = HostedVm {
        vm: Arc::new(vm),
        memory_bytes,
        vcpus,
        cmdline,
        tracker,
        migrating: false,
        tracking: false,
    };
    let info = vm_info(&req.name, &hosted);
    let mut vms = state.vms.lock().expect("vms lock");
    if vms.contains_key(&req.name) {
        bail!("a VM named {:?} appeared on agent {} meanwhile", req.name, state.name);
    }
    let memory = hosted.vm.memory().clone();
    vms.insert(req.name.clone(), hosted);
    drop(vms);
    {
        let mut index = state.index.lock().expect("index lock");
        if let Err(err) = index
            .add_vm(req.name.clone(), memory)
            .and_then(|()| index.record_pages(&req.name, &image_pages))
        {
            tracing::warn!(vm = %req.name, "not indexing the VM's image: {err}");
        }
    }
    tracing::info!(vm = %req.name, memory_bytes, vcpus, image_pages = image_pages.len(), %tracker, "started");
    Ok(info)
}

/// Keyed digests of every page of `vm` that holds data (not a hole of its memory).
fn digest_data_pages(vm: &Vm, hasher: &PageHasher) -> anyhow::Result<Vec<(u64, crate::hashing::PageDigest)>> {
    let memory = vm.memory();
    let mut data = Box::new([0u8; PAGE_SIZE]);
    let mut pages = Vec::new();
    for range in memory.data_page_ranges()? {
        for page in range {
            memory.read_page(page, &mut data);
            pages.push((page, hasher.digest(&data)));
        }
    }
    Ok(pages)
}

async fn migrate_out(state: &Arc<AgentState>, conn: &mut Connection, req: MigrateRequest) -> anyhow::Result<()> {
    if req.options.downtime_target_ms.is_nan() || req.options.downtime_target_ms <= 0.0 || req.options.max_rounds == 0 {
        bail!("the downtime target must be positive and the round limit at least 1");
    }
    let job = {
        let mut vms = state.vms.lock().expect("vms lock");
        let Some(hosted) = vms.get_mut(&req.vm) else {
            bail!("no VM named {:?} on agent {}", req.vm, state.name);
        };
        if hosted.migrating {
            bail!("VM {:?} is already being migrated", req.vm);
        }
        if hosted.tracking {
            bail!(
                "VM {:?} is being tracked (`perfplus track`); migrate it when that ends",
                req.vm
            );
        }
        if hosted.vm.run_state() != RunState::Running {
            bail!("VM {:?} is not running (it is {:?})", req.vm, hosted.vm.run_state());
        }
        // The tracker: the one asked for, else the one the VM was started with; refused early (with
        // what to do) if the VM was not created in the mode it needs.
        let tracker = req.options.tracker.unwrap_or(hosted.tracker);
        tracker.check_vm(&hosted.vm)?;
        hosted.migrating = true;
        let migration_id = postcopy::new_migration_id();
        Outbound {
            migration_id,
            resume: Default::default(),
            vm: hosted.vm.clone(),
            vm_name: req.vm.clone(),
            memory_bytes: hosted.memory_bytes,
            vcpus: hosted.vcpus,
            cmdline: hosted.cmdline.clone(),
            source_name: state.name.clone(),
            destination: req.destination.clone(),
            options: MigrateOptions {
                tracker: Some(tracker),
                ..req.options.clone()
            },
            key: state.key.clone(),
            hasher: state.hasher.clone(),
        }
    };
    let id = job.migration_id.clone();
    tracing::info!(vm = %req.vm, to = %req.destination, %id, mode = req.options.mode.name(), "migration out starts");
    let (done_tx, done_rx) = tokio::sync::watch::channel(None);
    state.outbound.lock().expect("outbound lock").insert(
        id.clone(),
        OutboundHandle {
            resume: job.resume.clone(),
            done: done_rx,
        },
    );
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut migration = tokio::spawn(source::migrate(job, progress_tx));
    // Forward progress to the CLI while the migration runs; a CLI that goes away does not stop it.
    let mut cli_gone = false;
    let result = loop {
        tokio::select! {
            Some(round) = progress_rx.recv() => {
                if !cli_gone && conn.send(&Message::Progress(round)).await.is_err() {
                    cli_gone = true;
                }
            }
            result = &mut migration => break result.context("migration task")?,
        }
    };
    while let Ok(round) = progress_rx.try_recv() {
        if !cli_gone {
            let _ = conn.send(&Message::Progress(round)).await;
        }
    }
    let _ = done_tx.send(Some(match &result {
        Ok(completed) => Ok(completed.report.clone()),
        Err(err) => Err(format!("{err:#}")),
    }));
    state.outbound.lock().expect("outbound lock").remove(&id);
    match result {
        Ok(completed) => {
            let hosted = state.vms.lock().expect("vms lock").remove(&req.vm);
            let report = completed.report;
            if let Some(hosted) = hosted {
                keep_pages(state, &req.vm, &hosted.vm, completed.page_digests);
                tokio::task::spawn_blocking(move || drop(hosted)).await?;
            }
            tracing::info!(vm = %req.vm, to = %req.destination, downtime_ms = format!("{:.1}", report.downtime_ms),
                lost_pages = report.lost_pages, "migration out complete; the VM now runs on the destination");
            conn.send(&Message::MigrateDone(Box::new(report))).await
        }
        Err(err) => {
            if let Some(hosted) = state.vms.lock().expect("vms lock").get_mut(&req.vm) {
                hosted.migrating = false;
            }
            Err(err.context(format!(
                "migrating {} to {} (the VM keeps running here)",
                req.vm, req.destination
            )))
        }
    }
}

/// `perfplus track --vm`: measures the VM with its dirty log (and eBPF heat) for the CLI. Refused while
/// the VM migrates; a migration is refused while it is tracked.
async fn track(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    req: perfplus_protocol::TrackRequest,
) -> anyhow::Result<()> {
    let target = {
        let mut vms = state.vms.lock().expect("vms lock");
        let Some(hosted) = vms.get_mut(&req.vm) else {
            bail!("no VM named {:?} on agent {}", req.vm, state.name);
        };
        if hosted.migrating {
            bail!("VM {:?} is being migrated; track it when that ends", req.vm);
        }
        if hosted.tracking {
            bail!("VM {:?} is already being tracked", req.vm);
        }
        hosted.tracking = true;
        track::TrackTarget {
            name: req.vm.clone(),
            vm: Arc::downgrade(&hosted.vm),
            ram: hosted.vm.ram_slot().clone(),
            vcpus: hosted.vm.vcpu_count(),
        }
    };
    let name = req.vm.clone();
    let result = track::serve_vm(conn, target, req).await;
    if let Some(hosted) = state.vms.lock().expect("vms lock").get_mut(&name) {
        hosted.tracking = false;
    }
    result
}

/// Puts the pages of a VM that left into the page store, so that its content is held here if it (or a
/// VM from the same image) comes back.
fn keep_pages(state: &AgentState, name: &str, vm: &Vm, digests: Option<Vec<crate::hashing::PageDigest>>) {
    let Some(digests) = digests else { return };
    let mut index = state.index.lock().expect("index lock");
    if index.store().is_none() {
        index.remove_vm(name);
        return;
    }
    if !index.has_vm(name) {
        if let Err(err) = index.add_vm(name, vm.memory().clone()) {
            tracing::warn!(vm = %name, "page store: {err}");
            return;
        }
    }
    let pages: Vec<(u64, crate::hashing::PageDigest)> = digests
        .into_iter()
        .enumerate()
        .map(|(page, digest)| (page as u64, digest))
        .collect();
    let kept = index
        .record_pages(name, &pages)
        .map_err(anyhow::Error::from)
        .and_then(|()| index.archive_vm(name));
    match kept {
        Ok(kept) => tracing::info!(vm = %name, pages = kept, "kept the departed VM's pages in the page store"),
        Err(err) => {
            index.remove_vm(name);
            tracing::warn!(vm = %name, "page store: {err:#}");
        }
    }
}

async fn migrate_in(
    state: &Arc<AgentState>,
    conn: &mut Connection,
    begin: perfplus_protocol::MigrateBegin,
) -> anyhow::Result<()> {
    let name = begin.vm.clone();
    let refuse = match check_name(&name) {
        Err(err) => Some(format!("{err:#}")),
        Ok(()) => {
            let vms = state.vms.lock().expect("vms lock");
            let mut arriving = state.arriving.lock().expect("arriving lock");
            if vms.contains_key(&name) || arriving.contains(&name) {
                Some(format!("a VM named {name:?} already exists on agent {}", state.name))
            } else {
                arriving.push(name.clone());
                None
            }
        }
    };
    if let Some(text) = refuse {
        conn.send_error(&text).await;
        bail!(text);
    }
    tracing::info!(vm = %name, memory_bytes = begin.memory_bytes, "migration in starts");
    let inbound = receiver::Inbound {
        hasher: state.hasher.clone(),
        index: state.index.clone(),
    };
    let (memory_bytes, vcpus, cmdline) = (begin.memory_bytes, begin.vcpus, begin.cmdline.clone());
    let tracker = begin.options.tracker.unwrap_or_default();
    let install_state = state.clone();
    let install_name = name.clone();
    let (attach_tx, attach_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = begin.migration_id.clone();
    let postcopy = begin.options.mode != MigrationMode::Precopy;
    if postcopy {
        if id.is_empty() || id.len() > MIGRATION_ID_MAX {
            let text = "a post-copy migration needs an id of 1 to 64 characters".to_string();
            conn.send_error(&text).await;
            state.arriving.lock().expect("arriving lock").retain(|n| n != &name);
            bail!(text);
        }
        state.attach.lock().expect("attach lock").insert(id.clone(), attach_tx);
    }
    let result = receiver::receive(conn, begin, &inbound, attach_rx, move |vm, filling| {
        let mut vms = install_state.vms.lock().expect("vms lock");
        vms.insert(
            install_name.clone(),
            HostedVm {
                vm,
                memory_bytes,
                vcpus,
                cmdline,
                tracker,
                // A guest whose memory is still arriving cannot be stopped or migrated.
                migrating: filling,
                tracking: false,
            },
        );
        install_state
            .arriving
            .lock()
            .expect("arriving lock")
            .retain(|n| n != &install_name);
        Ok(())
    })
    .await;
    if postcopy {
        state.attach.lock().expect("attach lock").remove(&id);
    }
    state.arriving.lock().expect("arriving lock").retain(|n| n != &name);
    if let Some(hosted) = state.vms.lock().expect("vms lock").get_mut(&name) {
        hosted.migrating = false;
    }
    if let Err(err) = &result {
        tracing::warn!(vm = %name, "migration in failed, nothing kept: {err:#}");
        conn.send_error(&format!("destination: {err:#}")).await;
    }
    result
}
