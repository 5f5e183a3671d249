//! Booting a VM on this agent (`VmStart`) and indexing the pages of its image in the content index, so
//! that a VM booted from the same image elsewhere can send those pages here as references.
use std::sync::Arc;

use anyhow::bail;
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::{KernelSource, VmInfo, VmStartRequest};
use perfplus_vmm::vm::{builtin_guest, Vm};

use super::registry::{check_name, Snapshot};
use super::{vm_info, AgentState, HostedVm};
use crate::hashing::PageHasher;

/// `VmStart`: boots a VM from the built-in guest or a multiboot image and hosts it.
pub(super) async fn start_vm(state: &Arc<AgentState>, req: VmStartRequest) -> anyhow::Result<VmInfo> {
    check_name(&req.name)?;
    state.limits.check_vm(&req.name, req.memory_bytes, req.vcpus)?;
    if !req.memory_bytes.is_multiple_of(PAGE_SIZE as u64) {
        bail!("memory size {} is not a multiple of 4 KiB", req.memory_bytes);
    }
    // Held while the VM boots: a VM of that name cannot be started or received meanwhile.
    let reservation = state
        .vms
        .reserve(&req.name)
        .map_err(|_| anyhow::anyhow!(state.name_taken(&req.name)))?;
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
    let hosted = Snapshot {
        name: req.name.clone(),
        value: HostedVm {
            vm: Arc::new(vm),
            memory_bytes,
            vcpus,
            cmdline,
            tracker,
            note: Default::default(),
        },
        busy: None,
    };
    let info = vm_info(&hosted);
    let memory = hosted.value.vm.memory().clone();
    reservation.host(hosted.value);
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
