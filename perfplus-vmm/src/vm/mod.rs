//! A small KVM VMM: guest memory, multiboot boot, vCPU threads, serial console and CMOS RTC, pause and
//! resume, and the vCPU/device state that moves with a migration.
//!
//! One [`Vm`] is one KVM VM with:
//! - all RAM in one memory slot at guest physical 0 ([`ram::RamSlot`]), with
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled so that dirty tracking can re-protect exactly the pages
//!   it collected ([`crate::tracking::dirty_log`]);
//! - vCPUs with KVM's supported CPUID ([`cpu`]); no in-kernel irqchip, no timer, no interrupts: the
//!   guest polls. Only vCPU 0 runs (there is no interrupt controller to start the others with
//!   INIT/SIPI); the others exist and their state migrates, but they stay in their reset state;
//! - port-I/O devices: a 16550 UART console and a CMOS RTC ([`devices`]);
//! - a multiboot (v1) loader ([`multiboot`]).
//!
//! Life cycle: [`Vm::create`] → [`Vm::load_multiboot`] *or* [`Vm::restore_state`] → [`Vm::start`] →
//! any number of [`Vm::pause`] / [`Vm::resume`] → [`Vm::save_state`] while paused → drop (stops and
//! joins the vCPU threads).
//!
//! Files: `ram.rs` (memory slot, dirty log), `vcpu_rings.rs` (dirty rings: harvesting for a tracker
//! and for a vCPU whose ring is full), `cpu.rs` (CPUID, MSRs, [`VcpuState`]), `vcpu.rs` (threads, run
//! loop, pause/resume), `devices.rs`, `multiboot.rs`, `status.rs` (the guest's status page),
//! `builtin_guest.rs` (the embedded workload guest). KVM ioctls come from `kvm-ioctls`, or from
//! [`crate::sys::kvm`] for what it lacks (`KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS`, the
//! dirty-ring mapping); no file here defines an ioctl.
pub mod builtin_guest;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod multiboot;
pub mod ram;
pub mod status;
pub mod vcpu;
pub mod vcpu_rings;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use kvm_bindings::{kvm_enable_cap, CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_bindings::{KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

pub use cpu::{VcpuState, XSAVE_MAX_BYTES};
pub use devices::DeviceState;
pub use ram::RamSlot;
pub use vcpu::{VcpuKicker, VCPU_NICE};
pub use vcpu_rings::DirtyRings;

use crate::memory::GuestMemory;
use vcpu::{Control, VcpuContext, VcpuHandle, VcpuThread};

/// Smallest guest RAM accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Guest-physical addresses KVM needs for its own structures (Intel real-mode support), just below
/// 4 GiB as QEMU places them. Set only when RAM ends below them.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const TSS_ADDR: u64 = 0xfffb_d000;
/// Version of [`VmState`]'s layout.
pub const VM_STATE_VERSION: u32 = 1;

/// The built-in guest's status page as the agent read it (see `perfplus_common::guest_abi`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub state: u32,
    pub tsc_khz: u64,
    pub working_set_pages: u64,
    pub heartbeat: u64,
    pub pages_written: u64,
    pub pages_verified: u64,
    pub verify_sweeps: u64,
    pub mismatches: u64,
    pub first_mismatch_page: Option<u64>,
    pub max_stall_tsc: u64,
    pub stall_reset_ack: u64,
    pub message: String,
    /// Guest-physical address of the first working-set page.
    #[serde(default)]
    pub working_set_base: u64,
    /// TSC at the guest's latest main-loop iteration.
    #[serde(default)]
    pub last_tsc: u64,
    /// TSC at the end of the longest stall.
    #[serde(default)]
    pub max_stall_end_tsc: u64,
}

impl GuestStatus {
    /// The longest stall in milliseconds, if the guest knows its TSC frequency.
    pub fn max_stall_ms(&self) -> Option<f64> {
        (self.tsc_khz > 0).then(|| self.max_stall_tsc as f64 / self.tsc_khz as f64)
    }
}

/// Everything besides RAM that a VM needs to continue elsewhere: vCPU registers and device registers.
/// Serialised with postcard between agents on the same machine kind (the vCPU structures are KVM's
/// own, as raw bytes).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// [`VM_STATE_VERSION`].
    pub version: u32,
    /// RAM size of the VM the state belongs to.
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
    /// Wall-clock time of the save (ns since the Unix epoch) and the TSC rate then: on restore, the
    /// guest's TSC is advanced by the time that passed, so the guest sees its downtime.
    pub saved_at_unix_ns: u64,
    pub tsc_khz: u32,
}

impl VmState {
    /// The bytes a `VmState` message carries (postcard).
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        postcard::to_allocvec(self).context("encoding the VM state")
    }

    /// Decodes what [`VmState::to_bytes`] wrote, as it arrives from a peer, and checks what can be
    /// checked without a VM: the layout version, one state per vCPU with distinct ids, CPUID entries
    /// KVM could take, an XSAVE area at least the legacy size and at most [`XSAVE_MAX_BYTES`], and 128
    /// bytes of CMOS RAM. [`Vm::restore_state`] checks the rest against the VM it restores into.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<VmState> {
        let state: VmState = postcard::from_bytes(bytes).context("decoding the VM state")?;
        state.check()?;
        Ok(state)
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.version == VM_STATE_VERSION,
            "VM state version {} is not the supported {VM_STATE_VERSION}",
            self.version
        );
        ensure!(!self.vcpus.is_empty(), "VM state has no vCPU");
        let mut ids = std::collections::HashSet::new();
        for vcpu in &self.vcpus {
            ensure!(ids.insert(vcpu.id), "VM state has vCPU {} twice", vcpu.id);
            vcpu.check()?;
        }
        ensure!(
            self.devices.cmos_ram.len() == 128,
            "device state has {} bytes of CMOS RAM, expected 128",
            self.devices.cmos_ram.len()
        );
        Ok(())
    }
}

/// How a VM is created. The default is what [`Vm::create`] makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmOptions {
    /// Create the VM with a KVM dirty ring of this many entries per vCPU (a power of two) instead of
    /// the dirty bitmap: then only the dirty-ring tracker can log its guest writes (see
    /// [`vcpu_rings`]). Must be chosen at creation: KVM only enables rings before vCPUs exist.
    pub dirty_ring_entries: Option<u32>,
}

/// Where the VM's vCPUs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created, not started yet.
    Created,
    Running,
    Paused,
    /// The guest executed HLT with interrupts off and will not continue.
    Halted,
    /// KVM or the VMM failed; the text says why.
    Failed(String),
}

pub struct Vm {
    name: String,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    ram: Arc<RamSlot>,
    /// The dirty rings, if the VM was created with them.
    dirty_rings: Option<Arc<DirtyRings>>,
    vcpus: Vec<VcpuHandle>,
    /// The CPUID each vCPU was given (saved with its state).
    cpuids: Vec<CpuId>,
    /// MSRs that read back, in restore order.
    msr_indices: Vec<u32>,
    tsc_khz: u32,
    devices: Arc<Mutex<devices::Devices>>,
    control: Arc<Control>,
    threads: Vec<VcpuThread>,
    started: bool,
}

fn open_kvm() -> anyhow::Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => {
            anyhow::anyhow!("/dev/kvm: permission denied (need access to /dev/kvm, e.g. the kvm group)")
        }
        libc::ENOENT => {
            anyhow::anyhow!("/dev/kvm: no such device (KVM is not available on this host)")
        }
        _ => anyhow::Error::new(e).context("opening /dev/kvm"),
    })
}

impl Vm {
    /// Creates a VM with `memory_bytes` of RAM and `vcpus` vCPUs, dirty bitmap mode; nothing runs yet.
    pub fn create(name: &str, memory_bytes: u64, vcpus: u8) -> anyhow::Result<Vm> {
        Self::create_with(name, memory_bytes, vcpus, VmOptions::default())
    }

    /// [`Vm::create`] with options (e.g. a dirty ring instead of the bitmap).
    pub fn create_with(name: &str, memory_bytes: u64, vcpus: u8, options: VmOptions) -> anyhow::Result<Vm> {
        ensure!(
            memory_bytes.is_multiple_of(4096) && memory_bytes >= MIN_MEMORY,
            "VM {name}: memory must be a multiple of 4 KiB and at least 16 MiB (got {memory_bytes} bytes)"
        );
        ensure!(vcpus >= 1, "VM {name}: needs at least one vCPU");
        let kvm = open_kvm()?;
        let max_vcpus = kvm.get_max_vcpus();
        ensure!(
            usize::from(vcpus) <= max_vcpus,
            "VM {name}: {vcpus} vCPUs requested, KVM allows {max_vcpus}"
        );
        let vm_fd = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);

        let supported = vm_fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        ensure!(
            supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 != 0,
            "VM {name}: KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (needed for dirty tracking)"
        );
        // INITIALLY_SET spares the guest a whole-memory write-protection pass when tracking starts
        // (see `ram`); a dirty-ring VM must not have it (KVM would then protect nothing for the ring).
        let initially_set = options.dirty_ring_entries.is_none() && supported & KVM_DIRTY_LOG_INITIALLY_SET as i32 != 0;
        let mut flags = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        if initially_set {
            flags |= u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [flags, 0, 0, 0],
            ..Default::default()
        };
        vm_fd
            .enable_cap(&cap)
            .context("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")?;

        if memory_bytes <= IDENTITY_MAP_ADDR {
            vm_fd
                .set_identity_map_address(IDENTITY_MAP_ADDR)
                .context("KVM_SET_IDENTITY_MAP_ADDR")?;
            vm_fd.set_tss_address(TSS_ADDR as usize).context("KVM_SET_TSS_ADDR")?;
        } else {
            tracing::warn!(
                "VM {name}: RAM reaches the TSS/identity-map area; not setting them (only Intel real mode needs them)"
            );
        }

        let memory = Arc::new(
            GuestMemory::new(memory_bytes)
                .with_context(|| format!("VM {name}: allocating {memory_bytes} bytes of RAM"))?,
        );
        let dirty_rings = match options.dirty_ring_entries {
            Some(entries) => Some(Arc::new(
                DirtyRings::enable(vm_fd.clone(), entries, memory_bytes / 4096)
                    .with_context(|| format!("VM {name}: creating it with a dirty ring"))?,
            )),
            None => None,
        };
        let ram = Arc::new(RamSlot::register(
            vm_fd.clone(),
            memory.clone(),
            dirty_rings.is_some(),
            initially_set,
        )?);

        let mut handles = Vec::new();
        let mut cpuids = Vec::new();
        for id in 0..vcpus {
            let mut fd = vm_fd
                .create_vcpu(u64::from(id))
                .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
            let cpuid = cpu::vcpu_cpuid(&kvm, id)?;
            fd.set_cpuid2(&cpuid)
                .with_context(|| format!("KVM_SET_CPUID2 on vCPU {id}"))?;
            if let Some(rings) = &dirty_rings {
                rings
                    .add_vcpu(&fd)
                    .with_context(|| format!("VM {name}: dirty ring of vCPU {id}"))?;
            }
            let immediate_exit = vcpu::ImmediateExit::of(&mut fd);
            handles.push(VcpuHandle {
                id,
                fd: Arc::new(Mutex::new(fd)),
                immediate_exit,
            });
            cpuids.push(cpuid);
        }
        let (msr_indices, tsc_khz) = {
            let fd = handles[0].fd.lock().unwrap_or_else(|e| e.into_inner());
            let tsc_khz = fd.get_tsc_khz().unwrap_or_else(|e| {
                tracing::warn!("VM {name}: KVM_GET_TSC_KHZ failed ({e}); TSC rate unknown");
                0
            });
            (cpu::readable_msrs(&kvm, &fd)?, tsc_khz)
        };
        tracing::debug!(
            "VM {name}: {memory_bytes} bytes, {vcpus} vCPUs, {} MSRs migrate, TSC {tsc_khz} kHz",
            msr_indices.len()
        );
        Ok(Vm {
            name: name.to_owned(),
            kvm,
            vm_fd,
            memory,
            ram,
            dirty_rings,
            vcpus: handles,
            cpuids,
            msr_indices,
            tsc_khz,
            devices: Arc::new(Mutex::new(devices::Devices::new(name))),
            control: Arc::new(Control::new()),
            threads: Vec::new(),
            started: false,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The host TSC rate in kHz as KVM reports it (`KVM_GET_TSC_KHZ`), 0 if unknown. Pass it to the
    /// built-in guest as `tsc_khz=`.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Loads a multiboot (v1) kernel with `cmdline` and sets up the boot vCPU to enter it.
    pub fn load_multiboot(&mut self, kernel: &[u8], cmdline: &str) -> anyhow::Result<()> {
        ensure!(!self.started, "VM {}: load_multiboot after start", self.name);
        let loaded = multiboot::load_image(&self.memory, kernel)
            .with_context(|| format!("VM {}: loading the multiboot kernel", self.name))?;
        let info = multiboot::write_boot_info(&self.memory, cmdline)?;
        let fd = self.vcpus[0].fd.lock().unwrap_or_else(|e| e.into_inner());
        multiboot::set_boot_cpu(&fd, loaded.entry, info)?;
        tracing::debug!(
            "VM {}: kernel loaded at {:x?}, entry {:#x}",
            self.name,
            loaded.ranges,
            loaded.entry
        );
        Ok(())
    }

    /// Starts the vCPU threads (vCPU 0 only; see the module doc).
    pub fn start(&mut self) -> anyhow::Result<()> {
        ensure!(!self.started, "VM {}: already started", self.name);
        self.control.lock().run_state = RunState::Running;
        let boot = &self.vcpus[0];
        let thread = vcpu::spawn(VcpuContext {
            vm_name: self.name.clone(),
            id: boot.id,
            fd: boot.fd.clone(),
            immediate_exit: boot.immediate_exit,
            control: self.control.clone(),
            devices: self.devices.clone(),
            dirty_rings: self.dirty_rings.clone(),
        });
        match thread {
            Ok(t) => self.threads.push(t),
            Err(e) => {
                self.control.lock().run_state = RunState::Failed(format!("starting vCPU 0: {e:#}"));
                return Err(e).context("starting the vCPU thread");
            }
        }
        self.started = true;
        Ok(())
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are parked. Idempotent.
    /// Sets the nice value of the guest's vCPU threads (from their start, [`VCPU_NICE`]: above the
    /// agent's threads). A destination in post-copy runs them at the agent's priority until every page
    /// is there: the guest then waits on the agent's work, which must not be starved by the guest.
    pub fn set_vcpu_nice(&self, nice: libc::c_int) {
        self.control.lock().set_nice(nice);
    }

    pub fn pause(&self) -> anyhow::Result<()> {
        self.pause_timed().map(|_| ())
    }

    /// [`Vm::pause`], returning how long it took.
    pub fn pause_timed(&self) -> anyhow::Result<Duration> {
        vcpu::pause_all(&self.control, &self.threads).with_context(|| format!("VM {}: pause", self.name))
    }

    /// Asks the vCPUs to park at their next exit and returns at once (see [`vcpu::request_pause`]):
    /// for a guest whose vCPUs may be blocked on missing post-copy pages. [`Vm::resume`] undoes it.
    pub fn request_pause(&self) {
        vcpu::request_pause(&self.control);
    }

    /// Asks the vCPUs to exit for good and returns at once; dropping the VM joins them. For a VM
    /// that will be destroyed while a vCPU may wait on a userfaultfd fault: ask first, then release
    /// the userfaultfd (which lets the fault complete), then drop.
    pub fn request_stop(&self) {
        vcpu::request_stop(&self.control, &self.threads);
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        vcpu::resume_all(&self.control);
        Ok(())
    }

    /// The paused VM's vCPU and device state.
    pub fn save_state(&self) -> anyhow::Result<VmState> {
        let run_state = self.run_state();
        ensure!(
            run_state != RunState::Running,
            "VM {}: save_state needs a paused VM (pause first)",
            self.name
        );
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (handle, cpuid) in self.vcpus.iter().zip(&self.cpuids) {
            let fd = handle.fd.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.push(
                VcpuState::save(&self.vm_fd, &fd, handle.id, cpuid, &self.msr_indices)
                    .with_context(|| format!("VM {}: saving vCPU {}", self.name, handle.id))?,
            );
        }
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner()).save();
        Ok(VmState {
            version: VM_STATE_VERSION,
            memory_bytes: self.memory.size(),
            vcpus,
            devices,
            saved_at_unix_ns: unix_ns(),
            tsc_khz: self.tsc_khz,
        })
    }

    /// Loads state saved by `save_state` into a created, not yet started VM.
    pub fn restore_state(&mut self, state: &VmState) -> anyhow::Result<()> {
        ensure!(
            !self.started,
            "VM {}: restore_state needs a VM that has not started",
            self.name
        );
        ensure!(
            state.version == VM_STATE_VERSION,
            "VM {}: state version {} is not the supported {VM_STATE_VERSION}",
            self.name,
            state.version
        );
        ensure!(
            state.memory_bytes == self.memory.size(),
            "VM {}: state is for {} bytes of RAM, this VM has {}",
            self.name,
            state.memory_bytes,
            self.memory.size()
        );
        ensure!(
            state.vcpus.len() == self.vcpus.len(),
            "VM {}: state has {} vCPUs, this VM has {}",
            self.name,
            state.vcpus.len(),
            self.vcpus.len()
        );
        let elapsed_ns = unix_ns().saturating_sub(state.saved_at_unix_ns);
        let tsc_advance = (u128::from(elapsed_ns) * u128::from(state.tsc_khz) / 1_000_000) as u64;
        for (i, (handle, saved)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            let fd = handle.fd.lock().unwrap_or_else(|e| e.into_inner());
            saved
                .restore(&self.vm_fd, &fd, tsc_advance)
                .with_context(|| format!("VM {}: restoring vCPU {}", self.name, saved.id))?;
            self.cpuids[i] = CpuId::from_entries(&saved.cpuid).context("saved CPUID")?;
        }
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.devices)?;
        Ok(())
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn run_state(&self) -> RunState {
        self.control.lock().run_state.clone()
    }

    pub fn guest_status(&self) -> Option<GuestStatus> {
        status::read(&self.memory)
    }

    /// Asks the guest to reset its longest-stall measurement; returns the request number to wait for
    /// in `GuestStatus::stall_reset_ack`.
    pub fn request_stall_reset(&self) -> u64 {
        status::request_stall_reset(&self.memory)
    }

    /// The last lines the guest wrote to its serial console, escaped ([`console::escape`]).
    pub fn console_tail(&self) -> String {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).console_tail()
    }

    /// Console lines and bytes kept out of the log since the VM started ([`console::LogBudget`]).
    pub fn console_dropped(&self) -> console::Dropped {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).console_dropped()
    }

    /// The serial console's output from position `from` on (see [`devices::Devices::console_since`]).
    pub fn console_since(&self, from: u64) -> devices::ConsoleChunk {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .console_since(from)
    }

    /// The RAM slot (shareable with a dirty tracker on another thread): the one way into the KVM dirty
    /// log ([`RamSlot::set_dirty_logging`], [`RamSlot::get_dirty_log`], [`RamSlot::clear_dirty_log`]).
    pub fn ram_slot(&self) -> &Arc<RamSlot> {
        &self.ram
    }

    /// The VM's dirty rings, if it was created with them ([`VmOptions::dirty_ring_entries`]).
    pub fn dirty_rings(&self) -> Option<&Arc<DirtyRings>> {
        self.dirty_rings.as_ref()
    }

    /// A handle that kicks the running vCPUs out of KVM_RUN and waits for them (it may outlive the
    /// VM); see [`VcpuKicker::kick_and_wait`].
    pub fn vcpu_kicker(&self) -> VcpuKicker {
        VcpuKicker::new(self.control.clone())
    }

    /// The `/dev/kvm` handle the VM was created with.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let threads = std::mem::take(&mut self.threads);
        vcpu::stop_all(&self.control, threads);
        if let Err(e) = self.ram.set_dirty_logging(false) {
            tracing::debug!("VM {}: turning dirty logging off at drop: {e:#}", self.name);
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Fails if a VM cannot run here (for callers that want a clear error early).
pub fn check_kvm() -> anyhow::Result<()> {
    let kvm = open_kvm()?;
    if kvm.get_api_version() != 12 {
        bail!("/dev/kvm: API version {} (need 12)", kvm.get_api_version());
    }
    Ok(())
}
