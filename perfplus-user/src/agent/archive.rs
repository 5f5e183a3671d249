//! Archiving the pages of a VM that left this agent: they go into the page store, so that its content is
//! held here if it (or a VM from the same image) comes back.
use perfplus_vmm::vm::Vm;

use super::AgentState;
use crate::content_index::ContentIndex;

/// Puts the pages of a VM that left into the page store, so that its content is held here if it (or a
/// VM from the same image) comes back.
pub(super) fn keep_pages(state: &AgentState, name: &str, vm: &Vm, digests: Option<Vec<crate::hashing::PageDigest>>) {
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
    if let Err(err) = index.record_pages(name, &pages) {
        index.remove_vm(name);
        tracing::warn!(vm = %name, "page store: {err:#}");
        return;
    }
    // The lock is taken again per chunk of pages: migrations under way are not held up by the archive.
    drop(index);
    match ContentIndex::archive_vm(&state.index, name) {
        Ok(kept) => tracing::info!(vm = %name, pages = kept, "kept the departed VM's pages in the page store"),
        Err(err) => {
            state.index.lock().expect("index lock").remove_vm(name);
            tracing::warn!(vm = %name, "page store: {err:#}");
        }
    }
}
