//! vCPU threads: the KVM_RUN loop, and how the VM pauses, resumes and stops them.
//!
//! Each running vCPU has a thread that owns the vCPU fd's lock while it is inside the run loop and
//! drops it whenever it parks, so that a paused VM's vCPU fds are free for save/restore.
//!
//! Kicking a vCPU out of KVM_RUN: under the control lock, the controller sets `kvm_run.immediate_exit`
//! to 1 and sends the thread [`kick_signal`] (a real-time signal with a no-op handler). If the thread
//! is inside KVM_RUN the signal makes it return EINTR; if it is about to enter, `immediate_exit` makes
//! KVM return EINTR at once. The thread only clears `immediate_exit` under the same lock after it saw
//! the `Run` request, so a kick is never lost. KVM completes a pending port-I/O exit before it honours
//! `immediate_exit`, and a thread that has handled an I/O exit re-enters KVM_RUN once more before it
//! parks: when a vCPU is parked, its registers hold the results of all its I/O.
//!
//! Kicking without pausing ([`VcpuKicker::kick_and_wait`], for the dirty-ring tracker): each thread
//! counts its passes through KVM_RUN under the control lock (odd from the moment it leaves the lock
//! to enter KVM_RUN until it takes the lock again at the top of its loop, or on its way out). The
//! kicker kicks every thread whose count is odd and waits until that count moved: the KVM_RUN the
//! thread was in has returned. KVM pushes the dirty-ring entry of some guest writes only after the
//! write is in memory, but always before KVM_RUN returns ([`super::vcpu_rings`]): after this, every
//! write the caller could already see is in the ring.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::devices::Devices;
use super::vcpu_rings::DirtyRings;
use super::RunState;

/// Offset from SIGRTMIN of the signal that kicks vCPU threads out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 1;
/// How long `pause` waits for every vCPU to park before it reports an error.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`VcpuKicker::kick_and_wait`] waits for the kicked vCPUs to leave KVM_RUN.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a kick is repeated while a vCPU has not left KVM_RUN (a kick is never lost, see the
/// module doc; repeating it is cheap insurance, as in `pause_all`).
const KICK_REPEAT: Duration = Duration::from_millis(20);

/// The signal used to kick vCPU threads (its handler does nothing; installed once per process).
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> anyhow::Result<()> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), noop_handler)
            .map(|_| 0)
            .unwrap_or_else(|e| e.errno())
    });
    if errno != 0 {
        anyhow::bail!(
            "installing the vCPU kick signal handler: {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
    Ok(())
}

/// What the controller wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
pub struct ControlState {
    pub want: Want,
    /// Threads started and not yet exited.
    pub threads: usize,
    /// Threads parked (paused, halted, failed, or about to exit).
    pub parked: usize,
    pub run_state: RunState,
    /// Every vCPU thread that has started, in start order (see [`VcpuKicker`]).
    runners: Vec<Runner>,
    /// Callers of [`VcpuKicker::kick_and_wait`] waiting on `cond` for a thread to leave KVM_RUN.
    kick_waiters: usize,
    /// Nice value of the vCPU threads ([`VCPU_NICE`] unless changed with [`ControlState::set_nice`]).
    nice: libc::c_int,
}

impl ControlState {
    /// Sets the nice value of every live vCPU thread, and of those that start later.
    pub fn set_nice(&mut self, nice: libc::c_int) {
        self.nice = nice;
        for tid in self.runners.iter().filter_map(|r| r.tid) {
            set_thread_nice(tid, nice);
        }
    }

    /// Thread `slot` is back from KVM_RUN (or never entered it): ends its pass and wakes a waiting
    /// kicker. Call with the control lock held, which is how the `ControlState` is reached.
    fn back_from_run(&mut self, slot: usize, cond: &Condvar) {
        let runner = &mut self.runners[slot];
        if runner.in_run() {
            runner.passes += 1;
            if self.kick_waiters > 0 {
                cond.notify_all();
            }
        }
    }

    /// Thread `slot` is about to release the control lock and enter KVM_RUN.
    fn entering_run(&mut self, slot: usize) {
        let runner = &mut self.runners[slot];
        debug_assert!(!runner.in_run());
        runner.passes += 1;
    }
}

/// One started vCPU thread as [`VcpuKicker`] sees it.
#[derive(Debug)]
struct Runner {
    /// `pthread_self()` of the thread: the target of the kick signal.
    thread: libc::pthread_t,
    /// Its thread id while it runs (`None` once it exited: the id may be another thread's by then).
    tid: Option<libc::pid_t>,
    immediate_exit: ImmediateExit,
    /// Passes through KVM_RUN, counted under the control lock: odd from the moment the thread
    /// releases the lock to enter KVM_RUN until it holds it again afterwards. A thread only exits
    /// (and is only joined) after holding the lock with an even count, so a thread whose count is
    /// odd under the lock is alive, its pthread_t valid and its vCPU fd (whose `kvm_run` page
    /// `immediate_exit` points into) open.
    passes: u64,
}

impl Runner {
    fn in_run(&self) -> bool {
        self.passes % 2 == 1
    }
}

/// The lock + condvar the controller and the vCPU threads meet on.
#[derive(Debug)]
pub struct Control {
    pub state: Mutex<ControlState>,
    pub cond: Condvar,
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(ControlState {
                want: Want::Run,
                threads: 0,
                parked: 0,
                run_state: RunState::Created,
                runners: Vec::new(),
                kick_waiters: 0,
                nice: VCPU_NICE,
            }),
            cond: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `kvm_run.immediate_exit` of one vCPU, writable from any thread.
#[derive(Clone, Copy, Debug)]
pub struct ImmediateExit(*mut u8);

// SAFETY: the pointer refers to the vCPU's kvm_run mmap, which lives as long as the vCPU fd; the
// `VcpuHandle` that holds this also holds the fd (Arc), so the pointer outlives every use through it;
// the copy in a `Runner` is used only while its thread, which holds the fd too, is alive (see
// `Runner::passes`). Accesses are atomic byte stores.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; all accesses are atomic.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub fn of(vcpu: &mut VcpuFd) -> Self {
        Self(&mut vcpu.get_kvm_run().immediate_exit as *mut u8)
    }

    pub fn set(&self, value: u8) {
        // SAFETY: the pointer is valid (see the Send impl) and a byte needs no alignment. Every Rust
        // access to `immediate_exit` goes through this atomic store (KVM reads it with READ_ONCE), so
        // there is no data race on the byte. `VcpuFd::run` briefly holds a `&mut kvm_run` while it
        // decodes an exit, but it never reads or writes this field; the kvm_run page is shared with
        // the kernel and always accessed as raw memory, as in Firecracker's kick path.
        unsafe { AtomicU8::from_ptr(self.0) }.store(value, Ordering::SeqCst);
    }
}

/// One vCPU as the VM holds it: its fd and how to kick it.
pub struct VcpuHandle {
    pub id: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub immediate_exit: ImmediateExit,
}

/// A started vCPU thread.
pub struct VcpuThread {
    pub immediate_exit: ImmediateExit,
    pub join: std::thread::JoinHandle<()>,
}

impl VcpuThread {
    /// Makes the thread leave KVM_RUN soon. Call with the control lock held.
    pub fn kick(&self) {
        self.immediate_exit.set(1);
        // SAFETY: the JoinHandle is alive, so its pthread_t is valid (the thread is joined only by
        // `Vm::drop`, which kicks before joining); pthread_kill with a valid signal has no other
        // precondition.
        let ret = unsafe {
            libc::pthread_kill(
                std::os::unix::thread::JoinHandleExt::as_pthread_t(&self.join),
                kick_signal(),
            )
        };
        warn_kill_failed(ret);
    }
}

fn warn_kill_failed(ret: libc::c_int) {
    if ret != 0 {
        tracing::warn!(
            "pthread_kill of a vCPU thread: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
}

/// Kicks a VM's running vCPUs out of KVM_RUN and waits until each has come out, without pausing
/// them. Holds the VM's control block only (no vCPU, no fd): it is `Send`, cheap to clone, and
/// harmless after the VM is gone (there is nothing left to kick).
#[derive(Clone, Debug)]
pub struct VcpuKicker(Arc<Control>);

impl VcpuKicker {
    pub(crate) fn new(control: Arc<Control>) -> Self {
        Self(control)
    }

    /// Returns once every vCPU thread that was inside KVM_RUN (or handling its last exit) when this
    /// was called has come back to the top of its run loop, so that every KVM_RUN that was under
    /// way has returned. Whatever KVM does for a vCPU before KVM_RUN returns is then done; in
    /// particular every guest write the caller could see before the call has its dirty-ring entry
    /// (see [`crate::vm::vcpu_rings`]). Parked, halted and not yet started vCPUs are not waited
    /// for. The vCPUs run on at once (each exit costs tens of microseconds). Must not be called
    /// from a vCPU thread, nor with a lock a vCPU thread takes while handling an exit (the dirty
    /// rings', the devices').
    ///
    /// Fails if a vCPU does not come out within 5 s. (Under kvm-pvm a vCPU blocked on a page that
    /// userfaultfd has not supplied spins instead of leaving; the trackers, the only callers, never
    /// run on a VM whose memory is still arriving.)
    pub fn kick_and_wait(&self) -> anyhow::Result<()> {
        let control = &*self.0;
        let start = Instant::now();
        let mut st = control.lock();
        let waiting: Vec<(usize, u64)> = st
            .runners
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_run())
            .map(|(slot, r)| (slot, r.passes))
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        st.kick_waiters += 1;
        let mut kicked_at = None;
        let result = loop {
            let pending: Vec<usize> = waiting
                .iter()
                .filter(|&&(slot, passes)| st.runners[slot].passes == passes)
                .map(|&(slot, _)| slot)
                .collect();
            if pending.is_empty() {
                break Ok(());
            }
            if start.elapsed() > KICK_TIMEOUT {
                break Err(anyhow::anyhow!(
                    "{} of {} vCPUs did not leave KVM_RUN within {KICK_TIMEOUT:?} of a kick",
                    pending.len(),
                    waiting.len()
                ));
            }
            if kicked_at.is_none_or(|at: Instant| at.elapsed() >= KICK_REPEAT) {
                for &slot in &pending {
                    let runner = &st.runners[slot];
                    runner.immediate_exit.set(1);
                    // SAFETY: the runner's pass is still odd and we hold the control lock, so the
                    // thread is alive (see `Runner::passes`) and its pthread_t valid; pthread_kill
                    // with a valid signal has no other precondition.
                    warn_kill_failed(unsafe { libc::pthread_kill(runner.thread, kick_signal()) });
                }
                kicked_at = Some(Instant::now());
            }
            st = control
                .cond
                .wait_timeout(st, KICK_REPEAT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        st.kick_waiters -= 1;
        result
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub vm_name: String,
    pub id: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub immediate_exit: ImmediateExit,
    pub control: Arc<Control>,
    pub devices: Arc<Mutex<Devices>>,
    /// The VM's dirty rings (ring mode only): a full ring is harvested by its own vCPU thread.
    pub dirty_rings: Option<Arc<DirtyRings>>,
}

/// Nice value of vCPU threads: a little above the agent's own threads (nice 0, its after-switch work
/// 10), so that migration work on a busy host takes its time from the agent rather than from the
/// guest. Measured on the shaped-link benchmark's moderate scenario (2 cores for both agents and the
/// guest, 4 single runs each, loaded): the guest's longest stall was 13-24 ms at -2 (total 2.7-3.8 s)
/// against 20-32 ms at 0 (2.6-4.1 s); at -5 the agents starved (5.5 and 10.8 s) and the stall did
/// not improve. Not while the guest waits on the agent (post-copy: its faults are the agent's work):
/// see [`ControlState::set_nice`].
pub const VCPU_NICE: libc::c_int = -2;

/// Sets thread `tid`'s nice value; a failure (no CAP_SYS_NICE) leaves it as it was: slower for the
/// guest, not wrong.
fn set_thread_nice(tid: libc::pid_t, nice: libc::c_int) {
    // SAFETY: setpriority with PRIO_PROCESS on a thread id (per thread on Linux) has no memory-safety
    // preconditions; the caller holds the control lock, under which `tid` is a live vCPU thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        tracing::debug!("vCPU thread {tid} at nice {nice}: {}", std::io::Error::last_os_error());
    }
}

/// Starts the thread of one vCPU (counted in `control` before this returns).
pub fn spawn(ctx: VcpuContext) -> anyhow::Result<VcpuThread> {
    install_kick_handler()?;
    let immediate_exit = ctx.immediate_exit;
    ctx.control.lock().threads += 1;
    let control = ctx.control.clone();
    let join = std::thread::Builder::new()
        // "vcpu" first: thread names are cut at 15 bytes, and the agent finds vCPU threads by prefix.
        .name(format!("vcpu{}-{}", ctx.id, ctx.vm_name))
        .spawn(move || thread_main(ctx))
        .inspect_err(|_| control.lock().threads -= 1)?;
    Ok(VcpuThread { immediate_exit, join })
}

fn thread_main(ctx: VcpuContext) {
    // The kick signal must reach this thread even if the spawner had it blocked.
    if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
        tracing::warn!("unblocking the vCPU kick signal: {e}");
    }
    let slot = {
        let mut st = ctx.control.lock();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        set_thread_nice(tid, st.nice);
        st.runners.push(Runner {
            // SAFETY: pthread_self has no precondition.
            thread: unsafe { libc::pthread_self() },
            tid: Some(tid),
            immediate_exit: ctx.immediate_exit,
            passes: 0,
        });
        st.runners.len() - 1
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(&ctx, slot)));
    let terminal = match outcome {
        Ok(Some(state)) => Some(state),
        Ok(None) => None, // asked to stop
        Err(_) => Some(RunState::Failed(format!("vCPU {} thread panicked", ctx.id))),
    };
    let mut st = ctx.control.lock();
    // Out of KVM_RUN for good (run_loop may have returned straight from an exit, or panicked).
    st.back_from_run(slot, &ctx.control.cond);
    if let Some(state) = terminal {
        tracing::info!(vm = %ctx.vm_name, vcpu = ctx.id, "vCPU stopped: {state:?}");
        if !matches!(st.run_state, RunState::Failed(_)) {
            st.run_state = state;
        }
        // Stay parked (the VM may still be saved) until the VM stops.
        st.parked += 1;
        ctx.control.cond.notify_all();
        while st.want != Want::Stop {
            st = ctx.control.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    } else {
        st.parked += 1;
    }
    st.runners[slot].tid = None;
    st.threads -= 1;
    st.parked -= 1;
    ctx.control.cond.notify_all();
}

/// Runs until asked to stop (`None`) or the vCPU can no longer run (`Some(Halted | Failed)`).
/// `slot` is the thread's entry in `ControlState::runners`.
fn run_loop(ctx: &VcpuContext, slot: usize) -> Option<RunState> {
    let mut io_pending = false;
    loop {
        {
            let mut st = ctx.control.lock();
            st.back_from_run(slot, &ctx.control.cond);
            // A vCPU with an I/O exit in flight re-enters KVM_RUN once (immediate_exit is set) before
            // it parks, so that KVM completes the I/O into its registers.
            if st.want == Want::Stop {
                return None;
            }
            if st.want == Want::Pause && !io_pending {
                st.parked += 1;
                // The last to park completes a pause nobody waits for ([`request_pause`]).
                if st.parked == st.threads && st.run_state == RunState::Running {
                    st.run_state = RunState::Paused;
                }
                ctx.control.cond.notify_all();
                while st.want == Want::Pause {
                    st = ctx.control.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.parked -= 1;
                if st.want == Want::Stop {
                    return None;
                }
            }
            if st.want == Want::Run {
                ctx.immediate_exit.set(0);
            }
            st.entering_run(slot);
        }
        let mut vcpu = ctx.fd.lock().unwrap_or_else(|e| e.into_inner());
        let exit = vcpu.run();
        io_pending = false;
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                lock_devices(ctx).io_in(port, data);
                io_pending = true;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                lock_devices(ctx).io_out(port, data);
                io_pending = true;
            }
            Ok(VcpuExit::Hlt) => return Some(RunState::Halted),
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Shutdown) => {
                return Some(failure(&vcpu, ctx.id, "shutdown (triple fault)"));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let what = format!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host cpu {cpu}");
                return Some(failure(&vcpu, ctx.id, &what));
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active union field.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let what = format!(
                    "KVM_EXIT_INTERNAL_ERROR: suberror {} data {:x?}",
                    internal.suberror,
                    &internal.data[..n]
                );
                return Some(failure(&vcpu, ctx.id, &what));
            }
            Ok(VcpuExit::MmioRead(addr, _)) => {
                let what = format!("MMIO read at guest physical {addr:#x} (outside RAM; no MMIO devices)");
                return Some(failure(&vcpu, ctx.id, &what));
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let what = format!(
                    "MMIO write of {} bytes at guest physical {addr:#x} (outside RAM; no MMIO devices)",
                    data.len()
                );
                return Some(failure(&vcpu, ctx.id, &what));
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                // The ring reached its soft limit: KVM will not enter the guest again until it is
                // harvested and reset. Move it to the pending set (nothing is lost) and go on.
                let harvested = match &ctx.dirty_rings {
                    Some(rings) => rings.harvest_vcpu(usize::from(ctx.id)),
                    None => Err(anyhow::anyhow!("KVM_EXIT_DIRTY_RING_FULL on a VM without dirty rings")),
                };
                if let Err(e) = harvested {
                    return Some(failure(&vcpu, ctx.id, &format!("{e:#}")));
                }
            }
            Ok(other) => {
                let what = format!("unexpected KVM exit {other:?}");
                return Some(failure(&vcpu, ctx.id, &what));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(failure(&vcpu, ctx.id, &format!("KVM_RUN: {e}"))),
        }
    }
}

fn lock_devices(ctx: &VcpuContext) -> MutexGuard<'_, Devices> {
    ctx.devices.lock().unwrap_or_else(|e| e.into_inner())
}

fn failure(vcpu: &VcpuFd, id: u8, what: &str) -> RunState {
    let rip = vcpu
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into());
    let msg = format!("vCPU {id}: {what} at rip={rip}");
    tracing::error!("{msg}");
    RunState::Failed(msg)
}

/// Asks every thread to park and waits until all are parked (with their I/O completed).
pub fn pause_all(control: &Control, threads: &[VcpuThread]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut st = control.lock();
    if st.threads == 0 || st.want == Want::Stop {
        return Ok(Duration::ZERO);
    }
    st.want = Want::Pause;
    for t in threads {
        t.kick();
    }
    while st.parked < st.threads {
        let (guard, timeout) = control
            .cond
            .wait_timeout(st, Duration::from_millis(20))
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        if timeout.timed_out() && st.parked < st.threads {
            if start.elapsed() > PAUSE_TIMEOUT {
                anyhow::bail!(
                    "pause: only {} of {} vCPUs stopped within {PAUSE_TIMEOUT:?}",
                    st.parked,
                    st.threads
                );
            }
            // A signal can only be lost if it arrived between two KVM_RUNs, and immediate_exit
            // covers that; kick again anyway, it is cheap.
            for t in threads {
                t.kick();
            }
        }
    }
    if st.run_state == RunState::Running {
        st.run_state = RunState::Paused;
    }
    Ok(start.elapsed())
}

/// Asks every thread to park at its next exit from KVM_RUN, without kicking and without waiting:
/// a vCPU blocked on a page that userfaultfd has not supplied stays blocked (and parks once the page
/// comes). A kick would not get it out: under kvm-pvm a fault with a signal pending is retried in the
/// kernel without end, spinning a core. The VM's run state becomes `Paused` when the last thread parks.
pub fn request_pause(control: &Control) {
    let mut st = control.lock();
    if st.want == Want::Run {
        st.want = Want::Pause;
    }
}

/// Asks every thread to exit (kicking them) without waiting; `stop_all` joins them later.
pub fn request_stop(control: &Control, threads: &[VcpuThread]) {
    let mut st = control.lock();
    st.want = Want::Stop;
    for t in threads {
        t.kick();
    }
    control.cond.notify_all();
}

/// Lets paused threads run again.
pub fn resume_all(control: &Control) {
    let mut st = control.lock();
    if st.want == Want::Pause {
        st.want = Want::Run;
        if st.run_state == RunState::Paused {
            st.run_state = RunState::Running;
        }
        control.cond.notify_all();
    }
}

/// Stops and joins every thread.
pub fn stop_all(control: &Control, threads: Vec<VcpuThread>) {
    {
        let mut st = control.lock();
        st.want = Want::Stop;
        for t in &threads {
            t.kick();
        }
        control.cond.notify_all();
    }
    for t in threads {
        if t.join.join().is_err() {
            tracing::warn!("a vCPU thread panicked while stopping");
        }
    }
}
