//! What the agent and a running migration share besides the connections: the operator's cancel, and a
//! line of status the migration writes for `perfplus vm status` ("waiting for pages from A since ...").
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Set once, when an operator cancels the migration (`perfplus migrate --cancel ID`).
#[derive(Clone, Debug)]
pub struct CancelSignal(Arc<watch::Sender<bool>>);

impl Default for CancelSignal {
    fn default() -> Self {
        CancelSignal(Arc::new(watch::channel(false).0))
    }
}

impl CancelSignal {
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the migration is cancelled (at once if it already is). Cancel-safe.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we wait.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

/// A line of status about a VM, beyond its run state, kept by whoever knows it (a post-copy migration
/// waiting for pages, a migration that left the VM paused here); empty when there is nothing to say.
#[derive(Clone, Debug, Default)]
pub struct StatusNote(Arc<Mutex<Option<String>>>);

impl StatusNote {
    pub fn set(&self, text: impl Into<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(text.into());
    }

    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The wall-clock time of day, UTC, as `HH:MM:SS` (for notes an operator reads next to the logs).
pub fn time_of_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_wakes_a_waiter_and_stays_set() {
        let cancel = CancelSignal::default();
        assert!(!cancel.is_cancelled());
        let waiter = {
            let cancel = cancel.clone();
            tokio::spawn(async move { cancel.cancelled().await })
        };
        cancel.cancel();
        waiter.await.unwrap();
        assert!(cancel.is_cancelled());
        // A later waiter returns at once.
        cancel.cancelled().await;
    }

    #[test]
    fn a_note_is_shared_by_its_clones() {
        let note = StatusNote::default();
        let other = note.clone();
        note.set("waiting for pages");
        assert_eq!(other.get().as_deref(), Some("waiting for pages"));
        other.clear();
        assert_eq!(note.get(), None);
    }
}
