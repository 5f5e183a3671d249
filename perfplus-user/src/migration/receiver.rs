//! Destination side of a migration: create an empty VM, write what arrives, resolve references from
//! the content index, restore the vCPU state and resume the guest.
//!
//! The destination keeps an xxh3 checksum of every page as it writes it (read back from guest memory),
//! so that at resume it can tell the source what its memory holds without pausing the guest to read it
//! all again. Nothing but the receiver writes the new guest's memory before it resumes, so those
//! checksums are the memory at resume.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::guest_abi::state;
use perfplus_common::PAGE_SIZE;

use super::page_sink::{apply_batch, HeldCounts, IndexedVm, PageSink};
use super::postcopy::demand::{self, FaultThread, MapPass, PageTable, Session};
use super::postcopy::AttachRx;
use super::signals::{CancelSignal, StatusNote};
use super::{agent_cpu_ms, PEER_TIMEOUT};
use crate::content_index::ContentIndex;
use crate::fault_injection;
use crate::hashing::{group_checksums, page_checksum, PageHasher};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Channel, GuestCheck, Message, MigrateBegin, MigrateReady, CHECKSUM_GROUP_PAGES};
use perfplus_vmm::demand_paging::GuestUffd;
use perfplus_vmm::memory::GuestMemory;
use perfplus_vmm::vm::{GuestStatus, Vm, VmState};
use perfplus_vmm::PageSet;

/// How many digest prefixes the destination advertises at most (8 bytes each on the wire).
pub const MAX_ADVERTISED: usize = 16 << 20;
/// How long the destination waits for the guest's self-check to sweep its working set after the resume.
pub const GUEST_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the receiver needs from the agent.
pub struct Inbound {
    pub hasher: PageHasher,
    pub index: Arc<Mutex<ContentIndex>>,
    /// The source agent, as the operator knows it (for the status note).
    pub source: String,
    /// The incoming VM's status note (post-copy: "waiting for pages from ... since ...").
    pub note: StatusNote,
    /// An operator's `perfplus migrate --cancel` of this post-copy migration.
    pub cancel: CancelSignal,
}

/// How the guest came to run here.
enum Resumed {
    /// Every page was here at the resume; their checksums.
    Precopy(Vec<u64>),
    /// Post-copy: pages still arrive.
    Postcopy {
        session: Box<Session>,
        demand: Box<Connection>,
    },
}

/// Receives the VM `begin` announces. `install` is called with the running VM once it has resumed
/// (the agent registers it; the flag says post-copy is still filling its memory); before that any
/// error destroys the half-built VM and leaves nothing. `attach` delivers the other connections of a
/// post-copy migration (demand channel, resumed connections). After the resume in post-copy, `conn`
/// may be replaced by the source's new connection.
pub async fn receive(
    conn: &mut Connection,
    begin: MigrateBegin,
    ctx: &Inbound,
    mut attach: AttachRx,
    install: impl FnOnce(Arc<Vm>, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let cpu_start = agent_cpu_ms();
    // Created in the mode the migration's tracker needs, so that the VM can migrate on with it.
    let tracker = begin.options.tracker.unwrap_or_default();
    let mut vm =
        Vm::create_with(&begin.vm, begin.memory_bytes, begin.vcpus, tracker.vm_options()).with_context(|| {
            format!(
                "creating VM {} ({} bytes, {} vCPUs, for the {tracker} tracker)",
                begin.vm, begin.memory_bytes, begin.vcpus
            )
        })?;
    let memory = vm.memory().clone();
    let key = begin.vm.clone();
    let held = {
        let mut index = ctx.index.lock().expect("content index lock");
        index
            .add_vm(key.clone(), memory.clone())
            .context("registering the incoming VM's memory")?;
        index.held_prefixes(MAX_ADVERTISED)
    };
    let result = receive_pages(conn, &begin, ctx, &mut vm, held, &mut attach).await;
    let (resumed, mut counters) = match result {
        Ok(done) => done,
        Err(err) => {
            ctx.index.lock().expect("content index lock").remove_vm(&key);
            return Err(err);
        }
    };

    // The guest is running here now.
    let vm = Arc::new(vm);
    let at_resume = vm.guest_status();
    let mut postcopy = None;
    let mut _demand_channel = None;
    let checksums = match resumed {
        Resumed::Precopy(checksums) => {
            install(vm.clone(), false)?;
            checksums
        }
        Resumed::Postcopy { mut session, demand } => {
            install(vm.clone(), true)?;
            let (stats, demand) = demand::run(&mut session, &vm, conn, *demand, &mut attach).await?;
            vm.set_vcpu_nice(perfplus_vmm::vm::VCPU_NICE);
            _demand_channel = demand;
            counters.add(session.held);
            postcopy = Some(stats);
            session.table.checksums()
        }
    };
    // A checksum per group of pages; the pages' own only for the groups the source asks about (after
    // the guest check, below).
    conn.send(&Message::GroupChecksums {
        checksums: group_checksums(&checksums),
    })
    .await?;
    let after = if begin.options.verify_guest {
        wait_for_guest_check(&vm, at_resume.as_ref()).await
    } else {
        vm.guest_status()
    };
    // The counters are guest memory: a verdict is only made from readings that can be believed, and
    // with arithmetic that cannot wrap.
    let untrusted = match (&at_resume, &after) {
        (Some(before), Some(after)) => after.untrustworthy_since(before),
        _ => None,
    };
    if let Some(why) = &untrusted {
        tracing::error!(vm = %begin.vm, "the guest's status page is not trustworthy: {why}");
    }
    let verified = match (&at_resume, &after) {
        (Some(before), Some(after)) => {
            untrusted.is_none()
                && after.verify_sweeps >= before.verify_sweeps.saturating_add(2)
                && after.mismatches == 0
                && after.state != state::FAILED
        }
        _ => false,
    };
    if let Some(after) = &after {
        if after.mismatches > 0 {
            tracing::error!(vm = %begin.vm, mismatches = after.mismatches, first = ?after.first_mismatch_page,
                "the guest's self-check found pages that do not hold what it wrote");
        }
    }
    conn.send(&Message::GuestCheck(Box::new(GuestCheck {
        at_resume,
        after,
        verified,
        cpu_ms: agent_cpu_ms() - cpu_start,
        held_from_store: counters.from_store,
        held_from_hosted_vms: counters.from_hosted,
        held_from_this_migration: counters.from_same_vm,
        postcopy,
    })))
    .await?;
    let mut answered = false;
    loop {
        match tokio::time::timeout(PEER_TIMEOUT, conn.recv()).await {
            Ok(Ok(Message::PageChecksumsWanted { groups })) if !answered => {
                answered = true;
                // The guest runs here whatever the source makes of it: a bad request ends the talk,
                // not the guest.
                let Some(detail) = checksums_of_groups(&checksums, &groups) else {
                    tracing::error!(vm = %begin.vm, "the source asked for checksums of groups that do not exist");
                    return Ok(());
                };
                tracing::warn!(vm = %begin.vm, groups = groups.len(), "the source found groups of pages that differ");
                conn.send(&Message::PageChecksums { checksums: detail }).await?;
                continue;
            }
            Ok(Ok(Message::Complete(report))) => tracing::info!(
                vm = %report.vm,
                downtime_ms = format!("{:.1}", report.downtime_ms),
                total_ms = format!("{:.1}", report.total_ms),
                bytes = report.bytes_on_wire,
                lost_pages = report.lost_pages,
                "migration in complete"
            ),
            Ok(Ok(other)) => tracing::warn!("source ended with {}", other.describe()),
            Ok(Err(err)) => tracing::warn!("source did not send its report: {err:#}"),
            Err(_) => tracing::warn!("source sent no report within {} s", PEER_TIMEOUT.as_secs()),
        }
        break;
    }
    Ok(())
}

/// The page checksums of `groups` (of `CHECKSUM_GROUP_PAGES` pages each), group after group: the
/// answer to `PageChecksumsWanted`. None if a group does not exist or one is asked for twice (so an
/// answer is never longer than the checksums of every page).
fn checksums_of_groups(checksums: &[u64], groups: &[u64]) -> Option<Vec<u64>> {
    let count = checksums.len().div_ceil(CHECKSUM_GROUP_PAGES);
    let mut seen = vec![false; count];
    let mut detail = Vec::new();
    for &group in groups {
        let g = usize::try_from(group).ok().filter(|&g| g < count)?;
        if std::mem::replace(&mut seen[g], true) {
            return None;
        }
        let start = g * CHECKSUM_GROUP_PAGES;
        detail.extend_from_slice(&checksums[start..(start + CHECKSUM_GROUP_PAGES).min(checksums.len())]);
    }
    Some(detail)
}

/// Everything up to and including the resume. Returns the page checksums at resume.
async fn receive_pages(
    conn: &mut Connection,
    begin: &MigrateBegin,
    ctx: &Inbound,
    vm: &mut Vm,
    held: Vec<u64>,
    attach: &mut AttachRx,
) -> anyhow::Result<(Resumed, HeldCounts)> {
    conn.send(&Message::MigrateReady(MigrateReady { held })).await?;
    fault_injection::reached("dest:begin").await;
    let memory = vm.memory().clone();
    let zero = [0u8; PAGE_SIZE];
    let zero_digest = ctx.hasher.digest(&zero);
    let mut checksums = vec![page_checksum(&zero); memory.page_count() as usize];
    let mut written = vec![false; memory.page_count() as usize];
    let mut missing = Vec::new();
    let mut held_counts = HeldCounts::default();
    loop {
        let message = match tokio::time::timeout(PEER_TIMEOUT, conn.recv()).await {
            Ok(result) => result.context("receiving from the source")?,
            Err(_) => bail!("the source sent nothing for {} s", PEER_TIMEOUT.as_secs()),
        };
        match message {
            Message::Pages(batch) => {
                let mut index = ctx.index.lock().expect("content index lock");
                let mut sink = StoppedGuest {
                    memory: &memory,
                    checksums: &mut checksums,
                    written: &mut written,
                    scratch: [0; PAGE_SIZE],
                };
                let mut indexed = IndexedVm {
                    index: &mut index,
                    vm_key: &begin.vm,
                    hashing: begin.options.hashing,
                    zero_digest: &zero_digest,
                };
                apply_batch(&batch, &mut sink, &mut indexed, &mut held_counts, &mut missing)?;
            }
            Message::RoundEnd { round } => {
                let missing = std::mem::take(&mut missing);
                conn.send(&Message::RoundAck { round, missing }).await?;
                fault_injection::reached(&format!("dest:round-{round}")).await;
            }
            Message::VmState(bytes) => {
                fault_injection::reached("dest:state").await;
                if !missing.is_empty() {
                    bail!(
                        "source sent the VM state while {} referenced pages are still missing",
                        missing.len()
                    );
                }
                restore_and_commit(conn, vm, &bytes).await?;
                vm.start().context("starting the migrated guest")?;
                confirm_running(conn, &begin.vm).await;
                tracing::info!(vm = %begin.vm, "guest resumed here");
                return Ok((Resumed::Precopy(checksums), held_counts));
            }
            Message::PostcopyBegin { missing: bitmap } => {
                if !missing.is_empty() {
                    bail!(
                        "source switched to post-copy while {} referenced pages are still missing",
                        missing.len()
                    );
                }
                let session = start_postcopy(begin, ctx, &memory, bitmap, checksums, &written, attach).await?;
                return finish_switch(conn, begin, vm, session, held_counts).await;
            }
            other => bail!("source sent {} during the page transfer", other.describe()),
        }
    }
}

/// The stopped incoming guest's memory as a page sink: plain writes (nothing runs it yet), each page
/// read back and checksummed as written, so that the checksums at resume need no second pass.
struct StoppedGuest<'a> {
    memory: &'a GuestMemory,
    checksums: &'a mut [u64],
    written: &'a mut [bool],
    scratch: [u8; PAGE_SIZE],
}

impl StoppedGuest<'_> {
    fn installed(&mut self, page: u64) {
        self.memory.read_page(page, &mut self.scratch);
        self.checksums[page as usize] = page_checksum(&self.scratch);
        self.written[page as usize] = true;
    }
}

impl PageSink for StoppedGuest<'_> {
    fn pages(&self) -> u64 {
        self.memory.page_count()
    }

    fn install(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> anyhow::Result<bool> {
        self.memory.write_page(page, data);
        self.installed(page);
        Ok(true)
    }

    fn install_zero(&mut self, page: u64) -> anyhow::Result<bool> {
        self.memory.write_page(page, &[0; PAGE_SIZE]);
        self.installed(page);
        Ok(true)
    }
}

/// The switch to post-copy, before the resume: register the guest's view of its memory with
/// userfaultfd (MISSING | MINOR), set up the page table, start the fault thread. The pages the source
/// says are stale stay in the memfd: the guest has no page-table entry for them, and the first access
/// faults (MINOR) until the new content is written and mapped (see `postcopy::demand`).
async fn start_postcopy(
    begin: &MigrateBegin,
    ctx: &Inbound,
    memory: &Arc<GuestMemory>,
    bitmap: Vec<u64>,
    checksums: Vec<u64>,
    written: &[bool],
    attach: &mut AttachRx,
) -> anyhow::Result<(Box<Session>, Connection)> {
    let pages = memory.page_count();
    if bitmap.len() as u64 != pages.div_ceil(64) {
        bail!("post-copy bitmap has {} words for {pages} pages", bitmap.len());
    }
    let missing = PageSet::from_bitmap(bitmap, pages);
    let demand = match tokio::time::timeout(Duration::from_secs(10), attach.recv()).await {
        Ok(Some((conn, Channel::Demand))) => conn,
        Ok(Some((_, Channel::Bulk))) => bail!("a second bulk connection arrived before the post-copy switch"),
        Ok(None) => bail!("the agent stopped handing over connections"),
        Err(_) => bail!("the source opened no demand channel for post-copy"),
    };
    let started = Instant::now();
    // The content index keeps its records of the stale pages: a reference resolved through one reads
    // the page and re-hashes it (`ContentIndex::resolve`), and a stale page still holds exactly the
    // content its record names until its new content is installed, which records that. Forgetting
    // them here took 5-17 ms of the switch, with the guest paused on both hosts.
    let (states, stale) = demand::states_at_switch(&missing, written);
    let classified = started.elapsed();
    // From here on the guest's first access to any page faults to the fault thread: the registration
    // drops whatever page-table entries the guest view had. Nothing else is needed for stale pages:
    // their old content stays in the page cache, unmapped for the guest, until their new content is
    // written there and mapped.
    let uffd = GuestUffd::register(memory.clone())?;
    let registered = started.elapsed();
    let stale_count = stale.count();
    let table = Arc::new(PageTable::new(uffd, states, checksums, stale));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let fault_thread = FaultThread::spawn(table.clone(), tx)?;
    tracing::info!(
        vm = %begin.vm,
        missing = missing.count(),
        stale = stale_count,
        states_ms = classified.as_secs_f64() * 1e3,
        register_ms = (registered - classified).as_secs_f64() * 1e3,
        table_ms = (started.elapsed() - registered).as_secs_f64() * 1e3,
        "post-copy: memory registered with userfaultfd (MISSING | MINOR), stale pages left unmapped"
    );
    let session = Session {
        table,
        fault_thread: Some(fault_thread),
        map_pass: None,
        requests: rx,
        vm_key: begin.vm.clone(),
        index: ctx.index.clone(),
        hashing: begin.options.hashing,
        zero_digest: ctx.hasher.digest(&[0; PAGE_SIZE]),
        held: Default::default(),
        unresolved: Default::default(),
        resumed_at: Instant::now(),
        reconnects: 0,
        source: ctx.source.clone(),
        migration_id: begin.migration_id.clone(),
        limit: Duration::from_millis(begin.options.postcopy_timeout_ms),
        note: ctx.note.clone(),
        cancel: ctx.cancel.clone(),
    };
    Ok((Box::new(session), demand))
}

/// Eager pages, the vCPU state, the resume.
async fn finish_switch(
    conn: &mut Connection,
    begin: &MigrateBegin,
    vm: &mut Vm,
    (mut session, demand): (Box<Session>, Connection),
    counters: HeldCounts,
) -> anyhow::Result<(Resumed, HeldCounts)> {
    loop {
        let message = match tokio::time::timeout(PEER_TIMEOUT, conn.recv()).await {
            Ok(result) => result.context("receiving from the source")?,
            Err(_) => bail!("the source sent nothing for {} s", PEER_TIMEOUT.as_secs()),
        };
        match message {
            Message::Pages(batch) => session.apply(&batch)?,
            Message::VmState(bytes) => {
                fault_injection::reached("dest:state").await;
                restore_and_commit(conn, vm, &bytes).await?;
                session.resumed_at = Instant::now();
                // Until every page is here the guest waits on this agent's work: same priority.
                vm.set_vcpu_nice(0);
                vm.start().context("starting the migrated guest")?;
                // Maps the pages that were current at the switch, so that the guest soon stops
                // faulting on them; until then each first access costs a minor fault.
                session.map_pass = Some(MapPass::spawn(session.table.clone())?);
                confirm_running(conn, &begin.vm).await;
                tracing::info!(vm = %begin.vm, "guest resumed here in post-copy");
                return Ok((
                    Resumed::Postcopy {
                        session,
                        demand: Box::new(demand),
                    },
                    counters,
                ));
            }
            other => bail!("source sent {} during the post-copy switch", other.describe()),
        }
    }
}

/// The destination's half of the switch-over, up to the commit: restores the vCPU and device state
/// into the (stopped) VM, says `Restored` and waits for the source's `Commit`. Until `Commit` arrives
/// the source owns the guest: any failure here (no commit within the peer timeout, a lost connection)
/// returns an error and the VM, which never ran, is destroyed by the caller.
async fn restore_and_commit(conn: &mut Connection, vm: &mut Vm, state: &[u8]) -> anyhow::Result<()> {
    let state = VmState::from_bytes(state).context("the VM state from the source")?;
    vm.restore_state(&state)
        .context("restoring the vCPU and device state")?;
    conn.send(&Message::Restored).await?;
    fault_injection::reached("dest:restored").await;
    match tokio::time::timeout(PEER_TIMEOUT, conn.recv()).await {
        Ok(Ok(Message::Commit)) => {
            fault_injection::reached("dest:commit").await;
            Ok(())
        }
        Ok(Ok(other)) => bail!("source sent {} instead of Commit", other.describe()),
        Ok(Err(err)) => Err(err.context("waiting for the source's Commit (the guest never ran here)")),
        Err(_) => bail!(
            "the source did not commit within {} s (the guest never ran here)",
            PEER_TIMEOUT.as_secs()
        ),
    }
}

/// Tells the source that the guest runs here. The guest is this host's since `Commit`: a lost
/// `Running` must not stop it, so a failure is only logged (the source, committed, keeps its copy
/// paused and says so).
async fn confirm_running(conn: &mut Connection, vm: &str) {
    if let Err(err) = conn.send(&Message::Running).await {
        tracing::warn!(vm, "the guest runs here, but telling the source failed: {err:#}");
    }
    fault_injection::reached("dest:running").await;
}

/// Waits until the guest completed two verification sweeps after `at_resume` (so one ran entirely on
/// this host), found a mismatch, failed, or the timeout passed. Returns the last status read.
async fn wait_for_guest_check(vm: &Vm, at_resume: Option<&GuestStatus>) -> Option<GuestStatus> {
    let at_resume = at_resume?;
    let deadline = Instant::now() + GUEST_CHECK_TIMEOUT;
    loop {
        let status = vm.guest_status()?;
        let done = status.verify_sweeps >= at_resume.verify_sweeps.saturating_add(2)
            || status.mismatches > at_resume.mismatches
            || status.state == state::FAILED
            || status.untrustworthy_since(at_resume).is_some();
        if done || Instant::now() >= deadline {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The receive loop against a scripted source over a real loopback connection, with a real VM and
/// content index: what the destination answers, and what it leaves when the source gives up.
#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use perfplus_protocol::frame::PageBatch;
    use perfplus_protocol::{MigrateOptions, Role};

    use super::*;

    const PAGES: u64 = 4096; // 16 MiB, the smallest VM

    struct Destination {
        ctx: Inbound,
        installed: Arc<AtomicBool>,
    }

    fn destination() -> Destination {
        let hasher = PageHasher::new(&[9; 32]);
        Destination {
            ctx: Inbound {
                index: Arc::new(Mutex::new(ContentIndex::new(hasher.clone(), None))),
                hasher,
                source: "scripted source".into(),
                note: Default::default(),
                cancel: Default::default(),
            },
            installed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn begin() -> MigrateBegin {
        MigrateBegin {
            vm: "web1".into(),
            memory_bytes: PAGES * PAGE_SIZE as u64,
            vcpus: 1,
            cmdline: String::new(),
            options: MigrateOptions {
                mode: perfplus_protocol::MigrationMode::Precopy,
                verify_guest: false,
                ..Default::default()
            },
            migration_id: String::new(),
            attach_secret: [0; 32],
        }
    }

    /// Runs the receiver on one end of a loopback pair and `source` on the other; returns the
    /// receiver's result.
    async fn run<F, Fut>(dest: &Destination, source: F) -> anyhow::Result<()>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (source_end, mut dest_end) = Connection::pair(Role::Peer).await.unwrap();
        let (_attach_tx, attach_rx) = tokio::sync::mpsc::unbounded_channel();
        let installed = dest.installed.clone();
        let receiving = receive(&mut dest_end, begin(), &dest.ctx, attach_rx, move |_, _| {
            installed.store(true, Ordering::SeqCst);
            Ok(())
        });
        let (result, ()) = tokio::join!(receiving, source(source_end));
        result
    }

    async fn expect(conn: &mut Connection) -> Message {
        conn.recv().await.expect("a message from the destination")
    }

    #[tokio::test]
    async fn unresolved_references_come_back_and_an_abort_leaves_nothing() {
        let dest = destination();
        let content = [0x5a; PAGE_SIZE];
        let digest = dest.ctx.hasher.digest(&content);
        let unknown = dest.ctx.hasher.digest(&[0x11; PAGE_SIZE]);
        let result = run(&dest, |mut src| async move {
            let Message::MigrateReady(_) = expect(&mut src).await else {
                panic!("MigrateReady expected");
            };
            let mut batch = PageBatch::with_capacity(4);
            batch.push_full(10, &digest, &content);
            batch.push_ref(11, &digest);
            batch.push_ref(12, &unknown);
            src.send(&Message::Pages(batch)).await.unwrap();
            src.send(&Message::RoundEnd { round: 1 }).await.unwrap();
            match expect(&mut src).await {
                Message::RoundAck { round: 1, missing } => assert_eq!(missing, [12]),
                other => panic!("RoundAck expected, got {}", other.name()),
            }
            // The source sends the VM state while page 12 is still missing: refused.
            let mut batch = PageBatch::with_capacity(1);
            batch.push_ref(13, &unknown);
            src.send(&Message::Pages(batch)).await.unwrap();
            src.send(&Message::VmState(Vec::new())).await.unwrap();
        })
        .await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("source sent the VM state while 1 referenced pages are still missing"),
            "{err}"
        );
        assert!(
            !dest.installed.load(Ordering::SeqCst),
            "no guest was handed to the agent"
        );
        assert!(
            !dest.ctx.index.lock().unwrap().has_vm("web1"),
            "the half-built VM left the content index"
        );
    }

    #[tokio::test]
    async fn a_source_that_gives_up_ends_the_receiver_with_its_reason() {
        let dest = destination();
        let result = run(&dest, |mut src| async move {
            expect(&mut src).await;
            src.send_error("source aborts the migration: test").await;
        })
        .await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("source aborts the migration: test"), "{err}");
        assert!(!dest.installed.load(Ordering::SeqCst));
        assert!(!dest.ctx.index.lock().unwrap().has_vm("web1"));
    }

    #[tokio::test]
    async fn a_page_outside_the_guest_is_refused() {
        let dest = destination();
        let result = run(&dest, |mut src| async move {
            expect(&mut src).await;
            let mut batch = PageBatch::with_capacity(1);
            batch.push_zero(PAGES);
            src.send(&Message::Pages(batch)).await.unwrap();
        })
        .await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("source sent page 4096, but the guest has 4096 pages"),
            "{err}"
        );
    }

    /// A guest paused on a "source" VM in this process: its VM state and its memory, as the last
    /// round would send them.
    fn paused_source() -> (Vm, Vec<u8>) {
        let mut vm = Vm::create("source", PAGES * PAGE_SIZE as u64, 1).unwrap();
        let cmdline = format!("working-set=1M rate=1k tsc_khz={}", vm.tsc_khz());
        vm.load_multiboot(perfplus_vmm::vm::builtin_guest::IMAGE, &cmdline)
            .unwrap();
        vm.start().unwrap();
        vm.pause().unwrap();
        let state = vm.save_state().unwrap().to_bytes().unwrap();
        (vm, state)
    }

    /// Sends every page of `vm` in full and ends round 1.
    async fn send_memory(src: &mut Connection, vm: &Vm, hasher: &PageHasher) {
        let mut data = [0u8; PAGE_SIZE];
        for first in (0..PAGES).step_by(1024) {
            let mut batch = PageBatch::with_capacity(1024);
            for page in first..first + 1024 {
                vm.memory().read_page(page, &mut data);
                batch.push_full(page, &hasher.digest(&data), &data);
            }
            src.send(&Message::Pages(batch)).await.unwrap();
        }
        src.send(&Message::RoundEnd { round: 1 }).await.unwrap();
        match expect(src).await {
            Message::RoundAck { missing, .. } => assert!(missing.is_empty(), "{missing:?}"),
            other => panic!("RoundAck expected, got {}", other.name()),
        }
    }

    #[tokio::test]
    async fn the_destination_runs_the_guest_only_after_the_commit() {
        let dest = destination();
        let hasher = dest.ctx.hasher.clone();
        let (source_vm, state) = paused_source();
        let installed = dest.installed.clone();
        let result = run(&dest, |mut src| async move {
            expect(&mut src).await; // MigrateReady
            send_memory(&mut src, &source_vm, &hasher).await;
            src.send(&Message::VmState(state)).await.unwrap();
            match expect(&mut src).await {
                Message::Restored => {}
                other => panic!("Restored expected, got {}", other.name()),
            }
            assert!(
                !installed.load(Ordering::SeqCst),
                "restored, not running: the source still owns the guest"
            );
            src.send(&Message::Commit).await.unwrap();
            match expect(&mut src).await {
                Message::Running => {}
                other => panic!("Running expected, got {}", other.name()),
            }
            let Message::GroupChecksums { checksums: groups } = expect(&mut src).await else {
                panic!("GroupChecksums expected");
            };
            assert_eq!(groups.len(), (PAGES as usize).div_ceil(CHECKSUM_GROUP_PAGES));
            // Asked for the pages of two groups, it answers after its guest check with their
            // checksums, in the order asked, and they make up the groups' checksums.
            src.send(&Message::PageChecksumsWanted { groups: vec![1, 0] })
                .await
                .unwrap();
            let Message::GuestCheck(_) = expect(&mut src).await else {
                panic!("GuestCheck expected");
            };
            let Message::PageChecksums { checksums } = expect(&mut src).await else {
                panic!("PageChecksums expected");
            };
            assert_eq!(checksums.len(), 2 * CHECKSUM_GROUP_PAGES);
            let (one, zero) = checksums.split_at(CHECKSUM_GROUP_PAGES);
            assert_eq!(group_checksums(one), [groups[1]]);
            assert_eq!(group_checksums(zero), [groups[0]]);
            src.send(&Message::Complete(Box::default())).await.unwrap();
        })
        .await;
        result.unwrap();
        assert!(dest.installed.load(Ordering::SeqCst));
    }

    /// Page content for the split test: a random stream (`seed` odd) or a text page as the built-in
    /// guest writes them (`seed` even, `perfplus_common::text`).
    fn content(seed: u64) -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        if seed.is_multiple_of(2) {
            perfplus_common::text::text_page(seed, &mut page);
            return page;
        }
        let mut z = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        for word in page.chunks_exact_mut(8) {
            word.copy_from_slice(&perfplus_common::splitmix::next(&mut z).to_le_bytes());
        }
        page
    }

    /// A batch that the source's adaptive compression splits (its random pages, and what may go with
    /// them, in a `Pages` frame; the rest after them, compressed if that pays) lands as the batch:
    /// references to a page earlier in the same batch, random or text-like, and to the old content of
    /// a page the batch rewrites after them all resolve (nothing comes back missing), and at the resume
    /// every page of the guest holds what the source's does.
    #[tokio::test]
    async fn a_page_batch_split_by_compression_lands_as_the_batch() {
        use perfplus_protocol::frame::{CompressionMode, Compressor, PageItem, SendPlan};
        let dest = destination();
        let hasher = dest.ctx.hasher.clone();
        let (source_vm, state) = paused_source();
        let memory = source_vm.memory().clone();
        // Pages the guest does not use (its 1 MiB working set lies below 6 MiB).
        const AT: u64 = 3000;
        let old = content(1);
        let [t0, r1, t5, r6, r7, r9] = [2, 3, 4, 5, 7, 9].map(content);
        let digest = |data: &[u8; PAGE_SIZE]| hasher.digest(data);
        let mut batch = PageBatch::with_capacity(16);
        batch.push_full(AT, &digest(&t0), &t0);
        batch.push_full(AT + 1, &digest(&r1), &r1);
        batch.push_ref(AT + 2, &digest(&r1)); // random, earlier in the batch
        batch.push_ref(AT + 3, &digest(&old)); // held at AT + 7 only, which the batch rewrites below
        batch.push_zero(AT + 4);
        batch.push_full(AT + 5, &digest(&t5), &t5);
        batch.push_full(AT + 6, &digest(&r6), &r6);
        batch.push_full(AT + 7, &digest(&r7), &r7);
        batch.push_ref(AT + 8, &digest(&t0)); // text-like, earlier in the batch: stays behind it
        batch.push_full(AT + 9, &digest(&r9), &r9);
        for (page, data) in [
            (AT, t0),
            (AT + 1, r1),
            (AT + 2, r1),
            (AT + 3, old),
            (AT + 4, [0; PAGE_SIZE]),
        ] {
            memory.write_page(page, &data);
        }
        for (page, data) in [(AT + 5, t5), (AT + 6, r6), (AT + 7, r7), (AT + 8, t0), (AT + 9, r9)] {
            memory.write_page(page, &data);
        }
        // What a fresh adaptive compressor does with it, as the source's is for its first batch.
        let pages = |b: &PageBatch| b.iter().map(|i| i.unwrap().page() - AT).collect::<Vec<_>>();
        let (first, rest) = match Compressor::new(CompressionMode::Adaptive)
            .unwrap()
            .plan_pages(&batch, None)
        {
            SendPlan::Split { first, rest, .. } => (first.clone(), rest.clone()),
            other => panic!("not split: {other:?}"),
        };
        assert_eq!(pages(&first), [1, 2, 3, 4, 6, 7]);
        assert_eq!(pages(&rest), [0, 5, 8, 9]);
        assert!(matches!(rest.iter().nth(2), Some(Ok(PageItem::Ref { .. }))));

        let expected: Vec<u64> = (0..PAGES)
            .map(|p| {
                let mut data = [0u8; PAGE_SIZE];
                memory.read_page(p, &mut data);
                page_checksum(&data)
            })
            .collect();
        let result = run(&dest, |mut src| async move {
            expect(&mut src).await; // MigrateReady
                                    // Before: the old content of AT + 7, uncompressed.
            let mut before = PageBatch::with_capacity(1);
            before.push_full(AT + 7, &hasher.digest(&old), &old);
            src.send(&Message::Pages(before)).await.unwrap();
            // The batch, through a fresh adaptive compressor: measured, so split.
            src.set_compression(CompressionMode::Adaptive).unwrap();
            src.send(&Message::Pages(batch)).await.unwrap();
            let stats = src.compression_stats().unwrap();
            // Compressed, or measured and sent raw (loopback may be too fast for it to pay): either
            // way only the rest went through zstd.
            assert_eq!(stats.batches + stats.probes_unused, 1, "{stats:?}");
            if stats.batches == 1 {
                assert_eq!(stats.raw_bytes, rest.payload_len() as u64);
            }
            // Every other page in full.
            let mut data = [0u8; PAGE_SIZE];
            let others: Vec<u64> = (0..PAGES).filter(|p| !(AT..AT + 10).contains(p)).collect();
            for chunk in others.chunks(1024) {
                let mut batch = PageBatch::with_capacity(chunk.len());
                for &page in chunk {
                    source_vm.memory().read_page(page, &mut data);
                    batch.push_full(page, &hasher.digest(&data), &data);
                }
                src.send(&Message::Pages(batch)).await.unwrap();
            }
            src.send(&Message::RoundEnd { round: 1 }).await.unwrap();
            match expect(&mut src).await {
                Message::RoundAck { missing, .. } => assert!(missing.is_empty(), "{missing:?}"),
                other => panic!("RoundAck expected, got {}", other.name()),
            }
            src.send(&Message::VmState(state)).await.unwrap();
            let Message::Restored = expect(&mut src).await else {
                panic!("Restored expected");
            };
            src.send(&Message::Commit).await.unwrap();
            let Message::Running = expect(&mut src).await else {
                panic!("Running expected");
            };
            let Message::GroupChecksums { checksums } = expect(&mut src).await else {
                panic!("GroupChecksums expected");
            };
            let sources = group_checksums(&expected);
            assert_eq!(checksums.len(), sources.len());
            let wrong: Vec<usize> = (0..checksums.len()).filter(|&g| checksums[g] != sources[g]).collect();
            assert!(
                wrong.is_empty(),
                "groups of pages that differ from the source's: {wrong:?}"
            );
            let Message::GuestCheck(_) = expect(&mut src).await else {
                panic!("GuestCheck expected");
            };
            src.send(&Message::Complete(Box::default())).await.unwrap();
        })
        .await;
        result.unwrap();
        assert!(dest.installed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_source_lost_before_the_commit_leaves_no_guest_here() {
        let dest = destination();
        let hasher = dest.ctx.hasher.clone();
        let (source_vm, state) = paused_source();
        let result = run(&dest, |mut src| async move {
            expect(&mut src).await;
            send_memory(&mut src, &source_vm, &hasher).await;
            src.send(&Message::VmState(state)).await.unwrap();
            let Message::Restored = expect(&mut src).await else {
                panic!("Restored expected");
            };
            // The source goes away without committing.
        })
        .await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("the guest never ran here"), "{err}");
        assert!(!dest.installed.load(Ordering::SeqCst));
        assert!(!dest.ctx.index.lock().unwrap().has_vm("web1"));
    }
}
