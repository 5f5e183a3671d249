//! Migrations under way, by migration id: the agent keeps one table of its outgoing migrations (what
//! `MigrateResume` finds) and one of its incoming post-copy migrations (where `PostcopyAttach` connections
//! go). An entry lives as long as the [`Registration`] that put it there.
//!
//! Each table has its own mutex, a leaf held only inside these methods.
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A table of `V` by migration id.
pub(super) struct ById<V> {
    inner: Mutex<Inner<V>>,
}

struct Inner<V> {
    entries: HashMap<String, (u64, V)>,
    /// Tells apart successive registrations of one id.
    next: u64,
}

impl<V> Default for ById<V> {
    fn default() -> Self {
        ById {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                next: 0,
            }),
        }
    }
}

impl<V> ById<V> {
    fn lock(&self) -> MutexGuard<'_, Inner<V>> {
        // A few map operations per critical section leave the map consistent: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `value` under `id` until the registration drops. A later registration of the same id takes
    /// its place (and the earlier one's drop then leaves it alone).
    pub(super) fn register(&self, id: String, value: V) -> Registration<'_, V> {
        let mut inner = self.lock();
        let generation = inner.next;
        inner.next += 1;
        let replaced = inner.entries.insert(id.clone(), (generation, value));
        drop(inner);
        drop(replaced);
        Registration {
            table: self,
            id,
            generation,
        }
    }
}

impl<V> ById<V> {
    /// Like [`ById::register`], but refused (None) if `id` is registered already: an id chosen by a
    /// peer must not take over the entry of a migration under way.
    pub(super) fn try_register(&self, id: String, value: V) -> Option<Registration<'_, V>> {
        let mut inner = self.lock();
        if inner.entries.contains_key(&id) {
            return None;
        }
        let generation = inner.next;
        inner.next += 1;
        inner.entries.insert(id.clone(), (generation, value));
        drop(inner);
        Some(Registration {
            table: self,
            id,
            generation,
        })
    }
}

impl<V: Clone> ById<V> {
    /// The value registered under `id`, if any.
    pub(super) fn get(&self, id: &str) -> Option<V> {
        self.lock().entries.get(id).map(|(_, value)| value.clone())
    }
}

/// An entry of a [`ById`] table; dropping it removes the entry.
#[must_use = "dropping a registration removes it"]
pub(super) struct Registration<'a, V> {
    table: &'a ById<V>,
    id: String,
    generation: u64,
}

impl<V> Drop for Registration<'_, V> {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        let removed = if inner.entries.get(&self.id).is_some_and(|(g, _)| *g == self.generation) {
            inner.entries.remove(&self.id)
        } else {
            None
        };
        drop(inner);
        drop(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_as_long_as_its_registration() {
        let table = ById::default();
        let registration = table.register("a1".to_string(), 5);
        assert_eq!(table.get("a1"), Some(5));
        assert_eq!(table.get("b2"), None);
        drop(registration);
        assert_eq!(table.get("a1"), None);
    }

    #[test]
    fn an_early_return_removes_the_entry() {
        fn run(table: &ById<u32>) -> anyhow::Result<()> {
            let _registration = table.register("a1".to_string(), 1);
            anyhow::bail!("the migration task failed")
        }
        let table = ById::default();
        assert!(run(&table).is_err());
        assert_eq!(table.get("a1"), None);
    }

    #[test]
    fn an_id_in_use_cannot_be_taken_over() {
        let table = ById::default();
        let first = table.try_register("a1".to_string(), 1).expect("a free id");
        assert!(table.try_register("a1".to_string(), 2).is_none());
        assert_eq!(table.get("a1"), Some(1));
        drop(first);
        assert!(table.try_register("a1".to_string(), 3).is_some());
    }

    #[test]
    fn a_replaced_registration_leaves_its_successor_alone() {
        let table = ById::default();
        let first = table.register("a1".to_string(), 1);
        let second = table.register("a1".to_string(), 2);
        assert_eq!(table.get("a1"), Some(2));
        drop(first);
        assert_eq!(table.get("a1"), Some(2));
        drop(second);
        assert_eq!(table.get("a1"), None);
    }
}
