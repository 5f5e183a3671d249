//! A small KVM VMM: guest memory, multiboot boot, vCPU threads, serial console and CMOS RTC, pause and
//! resume, and the vCPU/device state that moves with a migration.
//! (API skeleton; the VMM work fills it in.)
pub mod builtin_guest;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::memory::GuestMemory;

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
}

impl GuestStatus {
    /// The longest stall in milliseconds, if the guest knows its TSC frequency.
    pub fn max_stall_ms(&self) -> Option<f64> {
        (self.tsc_khz > 0).then(|| self.max_stall_tsc as f64 / self.tsc_khz as f64)
    }
}

/// Everything besides RAM that a VM needs to continue elsewhere.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {}

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
    _private: (),
}

impl Vm {
    /// Creates a VM with `memory_bytes` of RAM and `vcpus` vCPUs; nothing runs yet.
    pub fn create(_name: &str, _memory_bytes: u64, _vcpus: u8) -> anyhow::Result<Vm> {
        anyhow::bail!("not yet")
    }
    /// Loads a multiboot (v1) kernel with `cmdline` and sets up the boot vCPU to enter it.
    pub fn load_multiboot(&mut self, _kernel: &[u8], _cmdline: &str) -> anyhow::Result<()> {
        Ok(())
    }
    /// Starts the vCPU threads.
    pub fn start(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Stops every vCPU outside KVM_RUN; returns once all are parked. Idempotent.
    pub fn pause(&self) -> anyhow::Result<()> {
        Ok(())
    }
    pub fn resume(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// The paused VM's vCPU and device state.
    pub fn save_state(&self) -> anyhow::Result<VmState> {
        Ok(VmState::default())
    }
    /// Loads state saved by `save_state` into a created, not yet started VM.
    pub fn restore_state(&mut self, _state: &VmState) -> anyhow::Result<()> {
        Ok(())
    }
    pub fn memory(&self) -> &Arc<GuestMemory> {
        unimplemented!()
    }
    pub fn run_state(&self) -> RunState {
        RunState::Created
    }
    pub fn guest_status(&self) -> Option<GuestStatus> {
        None
    }
    /// Asks the guest to reset its longest-stall measurement; returns the request number to wait for
    /// in `GuestStatus::stall_reset_ack`.
    pub fn request_stall_reset(&self) -> u64 {
        0
    }
    /// The last lines the guest wrote to its serial console.
    pub fn console_tail(&self) -> String {
        String::new()
    }
    /// Turns KVM dirty logging of guest RAM on or off.
    pub fn set_dirty_logging(&self, _on: bool) -> anyhow::Result<()> {
        Ok(())
    }
}
