//! x86 vCPU setup and state: CPUID, the MSRs worth migrating, and [`VcpuState`] save/restore.
//!
//! The state follows what KVM round-trips on the machines this project runs on (kvm-pvm): REGS, SREGS, FPU,
//! XSAVE, XCRS, DEBUGREGS, VCPU_EVENTS, MP_STATE, the MSRs of `KVM_GET_MSR_INDEX_LIST` that read back,
//! and the CPUID the vCPU was given. The VM has no in-kernel irqchip, so there is no LAPIC state.
//!
//! Restore order follows Firecracker's reasoning: CPUID first (other ioctls depend on it), then
//! MP_STATE, REGS (clears pending exceptions, so before VCPU_EVENTS), SREGS, FPU, XSAVE (supersedes
//! FPU), XCRS, DEBUGREGS, MSRs (with IA32_TSC_DEADLINE after IA32_TSC), VCPU_EVENTS last.
use anyhow::{ensure, Context};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// IA32_TSC: the guest's time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: must be restored after IA32_TSC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The CPUID for vCPU `id`: KVM's supported CPUID with the vCPU's APIC ID filled in.
pub fn vcpu_cpuid(kvm: &Kvm, id: u8) -> anyhow::Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // Initial APIC ID in EBX[31:24].
            0x1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            // x2APIC ID of the extended topology leaves.
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The MSRs of `KVM_GET_MSR_INDEX_LIST` that `vcpu` can read (others are skipped), in a safe restore
/// order.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> anyhow::Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().context("KVM_GET_MSR_INDEX_LIST")?;
    let mut readable = Vec::new();
    for &index in list.as_slice() {
        if read_msrs(vcpu, &[index]).map(|v| v.len() == 1).unwrap_or(false) {
            readable.push(index);
        } else {
            tracing::debug!("MSR {index:#x} does not read back; not migrated");
        }
    }
    // TSC_DEADLINE only restores relative to the TSC: put it last.
    readable.sort_by_key(|&i| i == MSR_IA32_TSC_DEADLINE);
    Ok(readable)
}

/// Reads `indices`; the result holds the ones that read, in order, stopping at the first failure.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> anyhow::Result<Vec<(u32, u64)>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).context("too many MSRs")?;
    let n = vcpu.get_msrs(&mut msrs).context("KVM_GET_MSRS")?;
    Ok(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect())
}

/// Writes MSRs one batch at a time; an MSR KVM refuses is skipped (and returned), the rest still set.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> anyhow::Result<Vec<u32>> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let batch = Msrs::from_entries(&entries).context("too many MSRs")?;
        let n = vcpu.set_msrs(&batch).context("KVM_SET_MSRS")?;
        if n < rest.len() {
            refused.push(rest[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(refused)
}

/// The x87/SSE state of `KVM_GET_FPU`, in a serialisable form.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds about one vCPU (besides guest RAM).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The `KVM_GET_XSAVE2` area as 32-bit words (the legacy 4 KiB region plus any extension).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub vcpu_events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// (index, value) in restore order.
    pub msrs: Vec<(u32, u64)>,
}

/// Largest XSAVE area a saved state may carry: KVM's XSAVE2 areas are a few KiB (AMX makes them
/// ~11 KiB); anything much larger is not a state this host could restore.
pub const XSAVE_MAX_BYTES: usize = 64 * 1024;

impl VcpuState {
    /// What a decoded state must satisfy before any ioctl sees it (see [`crate::vm::VmState::from_bytes`]).
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.cpuid.len() <= KVM_MAX_CPUID_ENTRIES,
            "vCPU {}: {} CPUID entries, KVM takes at most {KVM_MAX_CPUID_ENTRIES}",
            self.id,
            self.cpuid.len()
        );
        let legacy_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
        ensure!(
            (legacy_words..=XSAVE_MAX_BYTES / 4).contains(&self.xsave.len()),
            "vCPU {}: XSAVE area of {} bytes, expected {} to {XSAVE_MAX_BYTES}",
            self.id,
            self.xsave.len() * 4,
            legacy_words * 4
        );
        Ok(())
    }
}

/// Size in bytes of the vCPU's XSAVE area (`KVM_CAP_XSAVE2`), at least the legacy 4 KiB.
fn xsave_bytes(vm: &VmFd) -> usize {
    (vm.check_extension_int(Cap::Xsave2).max(0) as usize).max(std::mem::size_of::<kvm_bindings::kvm_xsave>())
}

fn xsave_fam_len(vm: &VmFd) -> usize {
    (xsave_bytes(vm) - std::mem::size_of::<kvm_bindings::kvm_xsave>()).div_ceil(4)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn save(vm: &VmFd, vcpu: &VcpuFd, id: u8, cpuid: &CpuId, msr_indices: &[u32]) -> anyhow::Result<Self> {
        let mut xsave = Xsave::new(xsave_fam_len(vm)).context("allocating the XSAVE buffer")?;
        // SAFETY: `xsave` was allocated with the FAM length derived from KVM_CAP_XSAVE2, so it holds
        // the whole area KVM_GET_XSAVE2 writes.
        unsafe { vcpu.get_xsave2(&mut xsave) }.context("KVM_GET_XSAVE2")?;
        let fam = xsave.as_fam_struct_ref();
        let mut words = fam.xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());

        let mut msrs = Vec::with_capacity(msr_indices.len());
        let mut rest = msr_indices;
        while !rest.is_empty() {
            let got = read_msrs(vcpu, rest)?;
            let n = got.len();
            msrs.extend(got);
            if n < rest.len() {
                tracing::debug!("MSR {:#x} no longer reads; skipped", rest[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }

        Ok(Self {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            regs: vcpu.get_regs().context("KVM_GET_REGS")?,
            sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
            fpu: FpuState::from(&vcpu.get_fpu().context("KVM_GET_FPU")?),
            xsave: words,
            xcrs: vcpu.get_xcrs().context("KVM_GET_XCRS")?,
            debugregs: vcpu.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
            vcpu_events: vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
            mp_state: vcpu.get_mp_state().context("KVM_GET_MP_STATE")?,
            msrs,
        })
    }

    /// Loads the state into a vCPU that has not run. `tsc_advance` is added to the saved IA32_TSC
    /// (the time the guest was away, in TSC cycles), so the guest sees its downtime as time that passed.
    /// Returns the MSRs KVM refused (skipped).
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd, tsc_advance: u64) -> anyhow::Result<Vec<u32>> {
        let cpuid = CpuId::from_entries(&self.cpuid).context("saved CPUID has too many entries")?;
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
        vcpu.set_mp_state(self.mp_state).context("KVM_SET_MP_STATE")?;
        vcpu.set_regs(&self.regs).context("KVM_SET_REGS")?;
        vcpu.set_sregs(&self.sregs).context("KVM_SET_SREGS")?;
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu)).context("KVM_SET_FPU")?;

        let legacy_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
        ensure!(
            self.xsave.len() >= legacy_words,
            "saved XSAVE area has {} words, expected at least {legacy_words}",
            self.xsave.len()
        );
        let fam_len = xsave_fam_len(vm);
        ensure!(
            self.xsave.len() - legacy_words <= fam_len,
            "saved XSAVE area ({} bytes) is larger than this host's ({} bytes)",
            self.xsave.len() * 4,
            xsave_bytes(vm)
        );
        let mut xsave = Xsave::new(fam_len).context("allocating the XSAVE buffer")?;
        // SAFETY: only plain integer arrays of the FAM struct are written; sizes were checked above.
        unsafe {
            let fam = xsave.as_mut_fam_struct();
            fam.xsave.region.copy_from_slice(&self.xsave[..legacy_words]);
        }
        xsave.as_mut_slice()[..self.xsave.len() - legacy_words].copy_from_slice(&self.xsave[legacy_words..]);
        // SAFETY: `xsave` holds the full area KVM_CAP_XSAVE2 reports, so KVM reads within it.
        unsafe { vcpu.set_xsave2(&xsave) }.context("KVM_SET_XSAVE2")?;

        vcpu.set_xcrs(&self.xcrs).context("KVM_SET_XCRS")?;
        vcpu.set_debug_regs(&self.debugregs).context("KVM_SET_DEBUGREGS")?;
        let msrs: Vec<(u32, u64)> = self
            .msrs
            .iter()
            .map(|&(index, value)| match index {
                MSR_IA32_TSC => (index, value.wrapping_add(tsc_advance)),
                _ => (index, value),
            })
            .collect();
        let refused = write_msrs(vcpu, &msrs)?;
        for index in &refused {
            tracing::debug!("KVM refused to restore MSR {index:#x}; skipped");
        }
        vcpu.set_vcpu_events(&self.vcpu_events).context("KVM_SET_VCPU_EVENTS")?;
        Ok(refused)
    }
}
