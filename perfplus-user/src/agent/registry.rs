//! The registry of the VMs this agent hosts, of the names it has reserved, and of what each VM is busy with.
//!
//! Everything is under one mutex, which is a leaf: no registry method takes another lock, calls into a
//! VM, or drops a hosted value while holding it, and the lock never leaves this file. So the content
//! index lock (and any other) can be taken before or after a registry call, never inside one, and
//! there is no order to get wrong.
//!
//! What the registry hands out are guards whose `Drop` undoes them, so that every exit path (an error
//! returned with `?`, a task that panics) puts the registry back:
//! - [`Registry::reserve`] gives a [`Reservation`] of a name that is neither hosted nor reserved. A VM
//!   that boots or arrives holds one until it runs; [`Reservation::host`] turns it into a hosted VM,
//!   dropping it frees the name. So two arrivals, or an arrival and a `VmStart`, cannot take one name.
//! - [`Registry::claim`] gives a [`BusyGuard`]: the VM is [`Busy::Migrating`] or [`Busy::Tracking`]
//!   until the guard drops, and one claim excludes any other. A VM being migrated cannot be stopped
//!   ([`Registry::stop`] refuses); a tracked one can (the tracking then ends by itself).
//!   A claim belongs to one hosted VM, not to its name: releasing it after that VM was stopped and
//!   another took its name leaves the newcomer alone.
//!
//! The registry is generic over what it hosts, so that its rules are tested without KVM.
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::bail;

/// What a claimed VM is busy with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Busy {
    /// A migration of the VM is under way: out of this agent, or into it while its memory still arrives
    /// (post-copy). It cannot be stopped, migrated or tracked meanwhile.
    Migrating,
    /// `perfplus track` is measuring the VM (with its dirty log, as a migration would).
    Tracking,
}

/// Why a claim or a stop was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No VM of that name is hosted (it may be reserved: booting or arriving).
    NoSuchVm,
    /// The VM is claimed already, for that.
    Busy(Busy),
}

/// The name is hosted or reserved already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NameTaken;

/// A hosted VM as the registry saw it at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Snapshot<T> {
    pub(super) name: String,
    pub(super) value: T,
    pub(super) busy: Option<Busy>,
}

/// The VMs an agent hosts (`T`: what it keeps of each), the names it has reserved, and the claims.
pub(super) struct Registry<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    /// Invariant: a name is in at most one of `hosted` and `reserved`.
    hosted: HashMap<String, Entry<T>>,
    reserved: HashSet<String>,
    /// Tells apart successive VMs of one name.
    next_id: u64,
}

struct Entry<T> {
    id: u64,
    value: T,
    busy: Option<Busy>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            inner: Mutex::new(Inner {
                hosted: HashMap::new(),
                reserved: HashSet::new(),
                next_id: 0,
            }),
        }
    }
}

impl<T> Registry<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Every critical section here is a few map operations that leave the maps consistent, so a
        // lock poisoned by a panic elsewhere is still sound to use (and guards must not panic in drop).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many VMs are hosted (reserved names not counted).
    pub(super) fn len(&self) -> usize {
        self.lock().hosted.len()
    }

    /// Reserves `name` for a VM that is about to boot or arrive.
    pub(super) fn reserve(&self, name: &str) -> Result<Reservation<'_, T>, NameTaken> {
        let mut inner = self.lock();
        if inner.hosted.contains_key(name) || !inner.reserved.insert(name.to_string()) {
            return Err(NameTaken);
        }
        Ok(Reservation {
            registry: self,
            name: Some(name.to_string()),
        })
    }

    /// Removes a VM to stop it, unless it is being migrated. A tracked VM can be stopped: its tracking
    /// notices and ends. The caller drops what it gets (e.g. on a blocking thread).
    pub(super) fn stop(&self, name: &str) -> Result<T, Refusal> {
        let mut inner = self.lock();
        match inner.hosted.get(name) {
            None => Err(Refusal::NoSuchVm),
            Some(entry) if entry.busy == Some(Busy::Migrating) => Err(Refusal::Busy(Busy::Migrating)),
            Some(_) => Ok(inner.hosted.remove(name).expect("just found").value),
        }
    }

    /// Hosts `value` under the reserved `name`, claimed for `busy` if given; the reservation ends.
    fn host(&self, name: String, value: T, busy: Option<Busy>) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let was_reserved = inner.reserved.remove(&name);
        let previous = inner.hosted.insert(name, Entry { id, value, busy });
        drop(inner);
        debug_assert!(
            was_reserved && previous.is_none(),
            "hosted a name that was not reserved"
        );
        // Dropped outside the lock (were there one, against the invariant).
        drop(previous);
        id
    }

    /// Ends the claim `busy` of the VM `id`, if that VM is still hosted.
    fn release(&self, name: &str, id: u64, busy: Busy) {
        let mut inner = self.lock();
        if let Some(entry) = inner.hosted.get_mut(name).filter(|e| e.id == id) {
            debug_assert_eq!(entry.busy, Some(busy));
            entry.busy = None;
        }
    }

    /// Removes the VM `id`, if it is still hosted.
    fn remove(&self, name: &str, id: u64) -> Option<T> {
        let mut inner = self.lock();
        if inner.hosted.get(name).is_some_and(|e| e.id == id) {
            inner.hosted.remove(name).map(|e| e.value)
        } else {
            None
        }
    }
}

impl<T: Clone> Registry<T> {
    /// The hosted VM `name`, if any.
    pub(super) fn get(&self, name: &str) -> Option<Snapshot<T>> {
        let inner = self.lock();
        inner.hosted.get(name).map(|entry| Snapshot {
            name: name.to_string(),
            value: entry.value.clone(),
            busy: entry.busy,
        })
    }

    /// Every hosted VM, by name.
    pub(super) fn list(&self) -> Vec<Snapshot<T>> {
        let mut all: Vec<Snapshot<T>> = {
            let inner = self.lock();
            inner
                .hosted
                .iter()
                .map(|(name, entry)| Snapshot {
                    name: name.clone(),
                    value: entry.value.clone(),
                    busy: entry.busy,
                })
                .collect()
        };
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Claims the hosted VM `name` for `busy`, refused if it is not hosted or claimed already. Returns the
    /// claim and what is hosted (a copy, which the caller may drop early: the claim holds no part of it).
    pub(super) fn claim(&self, name: &str, busy: Busy) -> Result<(BusyGuard<'_, T>, T), Refusal> {
        let mut inner = self.lock();
        let entry = inner.hosted.get_mut(name).ok_or(Refusal::NoSuchVm)?;
        if let Some(current) = entry.busy {
            return Err(Refusal::Busy(current));
        }
        entry.busy = Some(busy);
        let value = entry.value.clone();
        let guard = BusyGuard {
            registry: self,
            claim: Some((name.to_string(), entry.id)),
            busy,
        };
        Ok((guard, value))
    }
}

/// A name reserved for a VM that boots or arrives; dropped before [`Reservation::host`], it frees the name.
#[must_use = "dropping a reservation frees the name"]
pub(super) struct Reservation<'a, T> {
    registry: &'a Registry<T>,
    /// `None` once hosted.
    name: Option<String>,
}

impl<'a, T> Reservation<'a, T> {
    /// Hosts the VM under the reserved name.
    pub(super) fn host(mut self, value: T) {
        let name = self.name.take().expect("a reservation is hosted once");
        self.registry.host(name, value, None);
    }

    /// Hosts the VM under the reserved name, claimed for `busy` until the guard drops (e.g. a VM whose
    /// memory is still arriving).
    pub(super) fn host_claimed(mut self, value: T, busy: Busy) -> BusyGuard<'a, T> {
        let name = self.name.take().expect("a reservation is hosted once");
        let id = self.registry.host(name.clone(), value, Some(busy));
        BusyGuard {
            registry: self.registry,
            claim: Some((name, id)),
            busy,
        }
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            self.registry.lock().reserved.remove(&name);
        }
    }
}

/// A VM claimed for one [`Busy`] state; dropping the guard ends the claim.
#[must_use = "dropping a claim ends it"]
pub(super) struct BusyGuard<'a, T> {
    registry: &'a Registry<T>,
    /// The VM's name and id; `None` once removed.
    claim: Option<(String, u64)>,
    busy: Busy,
}

impl<T> BusyGuard<'_, T> {
    /// Removes the claimed VM (it left: migrated away) and returns it, for the caller to drop.
    pub(super) fn remove(mut self) -> Option<T> {
        let (name, id) = self.claim.take().expect("a claim is removed once");
        self.registry.remove(&name, id)
    }
}

impl<T> Drop for BusyGuard<'_, T> {
    fn drop(&mut self) {
        if let Some((name, id)) = self.claim.take() {
            self.registry.release(&name, id, self.busy);
        }
    }
}

/// Checks a VM name: it appears in logs, paths and command lines.
pub(super) fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid VM name {name:?}: use 1 to 64 characters among A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosting(names: &[&str]) -> Registry<u32> {
        let registry = Registry::default();
        for (i, name) in names.iter().enumerate() {
            registry.reserve(name).expect("free name").host(i as u32);
        }
        registry
    }

    fn busy_of(registry: &Registry<u32>, name: &str) -> Option<Busy> {
        registry.get(name).expect("hosted").busy
    }

    #[test]
    fn a_reserved_name_cannot_be_reserved_again_until_released() {
        let registry: Registry<u32> = Registry::default();
        let first = registry.reserve("web1").expect("free");
        assert_eq!(registry.reserve("web1").err(), Some(NameTaken));
        assert!(registry.reserve("web2").is_ok(), "another name is free");
        assert!(registry.get("web1").is_none(), "reserved is not hosted");
        assert_eq!(registry.claim("web1", Busy::Tracking).err(), Some(Refusal::NoSuchVm));
        assert_eq!(registry.stop("web1").err(), Some(Refusal::NoSuchVm));
        drop(first);
        assert!(
            registry.reserve("web1").is_ok(),
            "dropping the reservation frees the name"
        );
    }

    #[test]
    fn a_hosted_name_cannot_be_reserved_and_hosting_ends_the_reservation() {
        let registry = hosting(&["web1"]);
        assert_eq!(registry.reserve("web1").err(), Some(NameTaken));
        assert_eq!(
            registry.get("web1"),
            Some(Snapshot {
                name: "web1".into(),
                value: 0,
                busy: None
            })
        );
        registry.stop("web1").expect("stoppable");
        assert!(registry.reserve("web1").is_ok(), "a stopped VM's name is free");
    }

    #[test]
    fn an_early_return_frees_the_reservation() {
        fn arrive(registry: &Registry<u32>, fail: bool) -> anyhow::Result<()> {
            let reservation = registry.reserve("web1").map_err(|_| anyhow::anyhow!("taken"))?;
            if fail {
                bail!("the source went away");
            }
            reservation.host(7);
            Ok(())
        }
        let registry = Registry::default();
        assert!(arrive(&registry, true).is_err());
        assert!(registry.get("web1").is_none());
        arrive(&registry, false).expect("the name was freed");
        assert_eq!(registry.get("web1").map(|s| s.value), Some(7));
        assert!(arrive(&registry, false).is_err(), "hosted now");
    }

    #[test]
    fn concurrent_reservations_of_one_name_let_exactly_one_through() {
        let registry: Registry<u32> = Registry::default();
        let barrier = std::sync::Barrier::new(8);
        let won = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        // Hold the reservation until every thread has tried.
                        let got = registry.reserve("web1");
                        barrier.wait();
                        got.is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .filter(|&won| won)
                .count()
        });
        assert_eq!(won, 1);
    }

    #[test]
    fn one_claim_at_a_time_and_the_refusal_says_which() {
        let registry = hosting(&["web1"]);
        let (claim, value) = registry.claim("web1", Busy::Migrating).expect("idle");
        assert_eq!(value, 0);
        assert_eq!(busy_of(&registry, "web1"), Some(Busy::Migrating));
        assert_eq!(
            registry.claim("web1", Busy::Migrating).err(),
            Some(Refusal::Busy(Busy::Migrating))
        );
        assert_eq!(
            registry.claim("web1", Busy::Tracking).err(),
            Some(Refusal::Busy(Busy::Migrating))
        );
        drop(claim);
        assert_eq!(busy_of(&registry, "web1"), None);
        let (tracking, _) = registry.claim("web1", Busy::Tracking).expect("released");
        assert_eq!(
            registry.claim("web1", Busy::Migrating).err(),
            Some(Refusal::Busy(Busy::Tracking))
        );
        assert_eq!(
            registry.claim("web1", Busy::Tracking).err(),
            Some(Refusal::Busy(Busy::Tracking))
        );
        drop(tracking);
        assert_eq!(registry.claim("nope", Busy::Tracking).err(), Some(Refusal::NoSuchVm));
    }

    #[test]
    fn an_early_return_or_a_panic_ends_the_claim() {
        fn migrate(registry: &Registry<u32>) -> anyhow::Result<()> {
            let (_claim, _) = registry
                .claim("web1", Busy::Migrating)
                .map_err(|r| anyhow::anyhow!("{r:?}"))?;
            bail!("connecting to the destination");
        }
        let registry = hosting(&["web1"]);
        assert!(migrate(&registry).is_err());
        assert_eq!(busy_of(&registry, "web1"), None);

        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (_claim, _) = registry.claim("web1", Busy::Tracking).expect("idle");
            panic!("the tracking task failed");
        }));
        assert!(unwound.is_err());
        assert_eq!(busy_of(&registry, "web1"), None);
        assert!(registry.claim("web1", Busy::Migrating).is_ok());
    }

    #[test]
    fn a_migrating_vm_cannot_be_stopped_a_tracked_one_can() {
        let registry = hosting(&["web1", "web2"]);
        let (migrating, _) = registry.claim("web1", Busy::Migrating).expect("idle");
        assert_eq!(registry.stop("web1").err(), Some(Refusal::Busy(Busy::Migrating)));
        drop(migrating);
        assert_eq!(registry.stop("web1"), Ok(0));

        let (tracking, _) = registry.claim("web2", Busy::Tracking).expect("idle");
        assert_eq!(registry.stop("web2"), Ok(1));
        drop(tracking);
        assert!(registry.get("web2").is_none());
        assert_eq!(registry.stop("web2").err(), Some(Refusal::NoSuchVm));
    }

    #[test]
    fn a_claim_on_a_stopped_vm_leaves_the_next_vm_of_its_name_alone() {
        let registry = hosting(&["web1"]);
        let (old_tracking, _) = registry.claim("web1", Busy::Tracking).expect("idle");
        registry.stop("web1").expect("a tracked VM can be stopped");
        registry.reserve("web1").expect("free").host(9);
        let (new_tracking, _) = registry.claim("web1", Busy::Tracking).expect("the newcomer is idle");
        drop(old_tracking);
        assert_eq!(
            busy_of(&registry, "web1"),
            Some(Busy::Tracking),
            "the old claim's release must not end the new one"
        );
        drop(new_tracking);
        assert_eq!(busy_of(&registry, "web1"), None);
    }

    #[test]
    fn removing_a_claimed_vm_frees_its_name() {
        let registry = hosting(&["web1"]);
        let (claim, _) = registry.claim("web1", Busy::Migrating).expect("idle");
        assert_eq!(claim.remove(), Some(0));
        assert!(registry.get("web1").is_none());
        assert!(registry.reserve("web1").is_ok());
    }

    #[test]
    fn a_vm_hosted_claimed_is_busy_until_the_guard_drops() {
        let registry: Registry<u32> = Registry::default();
        let filling = registry.reserve("web1").expect("free").host_claimed(3, Busy::Migrating);
        assert_eq!(busy_of(&registry, "web1"), Some(Busy::Migrating));
        assert_eq!(registry.reserve("web1").err(), Some(NameTaken), "hosted now");
        assert_eq!(registry.stop("web1").err(), Some(Refusal::Busy(Busy::Migrating)));
        drop(filling);
        assert_eq!(busy_of(&registry, "web1"), None);
        assert_eq!(registry.stop("web1"), Ok(3));
    }

    #[test]
    fn the_list_is_by_name_and_shows_claims() {
        let registry = hosting(&["b", "c", "a"]);
        let _reserved = registry.reserve("d").expect("free");
        let (_claim, _) = registry.claim("c", Busy::Tracking).expect("idle");
        let list: Vec<(String, Option<Busy>)> = registry.list().into_iter().map(|s| (s.name, s.busy)).collect();
        assert_eq!(
            list,
            [
                ("a".to_string(), None),
                ("b".to_string(), None),
                ("c".to_string(), Some(Busy::Tracking))
            ]
        );
    }

    #[test]
    fn names() {
        for good in ["web1", "a", "A-b_c.d", &"x".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            let err = check_name(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid VM name"), "{err}");
        }
    }
}
