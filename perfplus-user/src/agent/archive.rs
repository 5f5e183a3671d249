//! Archiving the pages of a VM that left this agent: they go into the page store, so that its content is
//! held here if it (or a VM from the same image) comes back.
use std::time::Duration;

use perfplus_vmm::vm::Vm;

use super::AgentState;
use crate::content_index::ContentIndex;

/// Longest an arriving VM waits for archives under way before it goes ahead without their pages.
pub(super) const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// Archives of departed VMs under way. The CLI has its report before the archive ends (archiving is
/// housekeeping at a low priority, which a loaded host can delay by many seconds); an arriving VM
/// waits for them instead, so that the page store it is offered holds every page of a VM that just
/// left (a return trip finds them all).
pub(super) struct Archiving {
    running: tokio::sync::watch::Sender<usize>,
}

impl Default for Archiving {
    fn default() -> Self {
        Archiving {
            running: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// One archive under way, until dropped.
pub(super) struct ArchiveUnderWay(tokio::sync::watch::Sender<usize>);

impl Drop for ArchiveUnderWay {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Archiving {
    pub(super) fn begin(&self) -> ArchiveUnderWay {
        self.running.send_modify(|n| *n += 1);
        ArchiveUnderWay(self.running.clone())
    }

    /// Waits until no archive is under way, at most `limit`; whether none is.
    pub(super) async fn settled(&self, limit: Duration) -> bool {
        let mut running = self.running.subscribe();
        tokio::time::timeout(limit, running.wait_for(|&n| n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

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
