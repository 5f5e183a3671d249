//! The drain's plan, without I/O: a predicted migration time per VM, a destination per VM (balanced by
//! memory), the order they start in, and which one starts next when a slot frees.
//!
//! **Predictor.** Pre-copy sends the whole guest once and then, round after round, what the guest
//! dirtied meanwhile: with `P` pages, a link of `L` pages/s and a dirty rate of `W` pages/s, the rounds
//! send `P`, `P·W/L`, `P·(W/L)²`, … pages, `P / (L − W)` seconds in all. A guest that dirties faster
//! than half the link leaves more than half of round 1's pages dirty; hybrid then switches to
//! post-copy (`migration::convergence`), which sends each page about once more after one pass:
//! `2 P / L`, which is also where `P / (L − W)` stands at `W = L / 2`. `W` is measured by the agent just before the drain
//! (one `perfplus track --vm` interval of the KVM dirty log). The figure ranks VMs; it is not a promise.
//!
//! **Destinations.** Biggest VM first, each to the destination with the least memory so far (what it
//! already hosts plus what the plan gave it): the classic greedy that keeps the largest loads apart.
//!
//! **Order.** Shortest predicted time first within the drain: on one link the last VM ends at about the
//! same time whatever the order (the link is busy throughout), but the VMs off the node early are many,
//! the mean time a VM waits is the least possible, and the busy VMs (those at risk of not converging)
//! go last, when nothing else competes for the link and the CPU.
//!
//! **Slots.** With `--parallel N`, a free slot takes the first VM in that order whose destination has
//! the fewest migrations under way. By default `N` is the number of destinations: one migration fills a
//! 1 Gbit/s link already (820–940 Mbit/s measured, README), so a second one on the same link halves both
//! rates, makes each one's rounds twice as long (twice the pages dirtied meanwhile) and starts before
//! the first VM's pages are at the destination, which then cannot offer them to it as references.

use perfplus_common::PAGE_SIZE;

/// Dirty rate, as a share of the link, from which hybrid is predicted to switch to post-copy.
pub const CONVERGENCE_SHARE: f64 = 0.5;

/// What the drain knows of a VM of the source before it plans.
#[derive(Clone, Debug, PartialEq)]
pub struct VmFacts {
    pub name: String,
    pub memory_bytes: u64,
    /// Dirty pages per second, as measured (None: not measured; taken as 0).
    pub dirty_pages_per_s: Option<f64>,
}

/// A VM with its destination (an index into the destinations) and predicted time, in start order.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub vm: VmFacts,
    pub destination: usize,
    pub predicted_s: f64,
}

/// Predicted time of one migration (see the module docs), in seconds, over a link of
/// `link_pages_per_s`.
pub fn predict_seconds(memory_bytes: u64, dirty_pages_per_s: f64, link_pages_per_s: f64) -> f64 {
    let pages = memory_bytes as f64 / PAGE_SIZE as f64;
    let link = link_pages_per_s.max(1.0);
    let dirty = dirty_pages_per_s.max(0.0);
    if dirty < CONVERGENCE_SHARE * link {
        pages / (link - dirty)
    } else {
        2.0 * pages / link
    }
}

/// The plan: each VM's destination and predicted time, in the order they should start.
/// `hosted_bytes[d]` is the memory destination `d` hosts already.
pub fn plan(vms: Vec<VmFacts>, hosted_bytes: &[u64], link_pages_per_s: f64) -> Vec<Planned> {
    assert!(!hosted_bytes.is_empty(), "a drain needs at least one destination");
    let mut planned: Vec<Planned> = vms
        .into_iter()
        .map(|vm| Planned {
            predicted_s: predict_seconds(vm.memory_bytes, vm.dirty_pages_per_s.unwrap_or(0.0), link_pages_per_s),
            vm,
            destination: 0,
        })
        .collect();
    // Biggest first to the least loaded destination (ties: the earlier destination).
    planned.sort_by(|a, b| {
        b.vm.memory_bytes
            .cmp(&a.vm.memory_bytes)
            .then(b.predicted_s.total_cmp(&a.predicted_s))
            .then(a.vm.name.cmp(&b.vm.name))
    });
    let mut load: Vec<u64> = hosted_bytes.to_vec();
    for p in &mut planned {
        let d = (0..load.len()).min_by_key(|&d| (load[d], d)).expect("a destination");
        p.destination = d;
        load[d] += p.vm.memory_bytes;
    }
    // Shortest predicted time first (ties: smaller, then by name, for a stable plan).
    planned.sort_by(|a, b| {
        a.predicted_s
            .total_cmp(&b.predicted_s)
            .then(a.vm.memory_bytes.cmp(&b.vm.memory_bytes))
            .then(a.vm.name.cmp(&b.vm.name))
    });
    planned
}

/// Which of `pending` (in start order) starts in a free slot: the first whose destination has the fewest
/// migrations under way (`in_flight[d]`). None when nothing is pending.
pub fn next_to_start(pending: &[&Planned], in_flight: &[usize]) -> Option<usize> {
    let least = pending.iter().map(|p| in_flight[p.destination]).min()?;
    pending.iter().position(|p| in_flight[p.destination] == least)
}

/// The default `--parallel`: one migration at a time per destination (see the module docs).
pub fn default_parallel(destinations: usize) -> usize {
    destinations.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, mib: u64, dirty: f64) -> VmFacts {
        VmFacts {
            name: name.into(),
            memory_bytes: mib << 20,
            dirty_pages_per_s: Some(dirty),
        }
    }

    const LINK: f64 = 30_000.0; // ~1 Gbit/s in pages/s

    #[test]
    fn the_predictor_grows_with_size_and_dirty_rate_and_caps_at_post_copy() {
        let quiet = predict_seconds(1 << 30, 0.0, LINK);
        assert!((quiet - 262_144.0 / LINK).abs() < 1e-9);
        assert!(predict_seconds(1 << 30, 10_000.0, LINK) > quiet);
        assert!(predict_seconds(2 << 30, 0.0, LINK) > quiet);
        // Faster than the link: post-copy's two passes, not an infinite time.
        let busy = predict_seconds(1 << 30, 50_000.0, LINK);
        assert!((busy - 2.0 * 262_144.0 / LINK).abs() < 1e-9);
    }

    #[test]
    fn small_and_quiet_first_and_busy_last() {
        let plan = plan(
            vec![vm("big", 512, 0.0), vm("busy", 64, 25_000.0), vm("small", 64, 0.0)],
            &[0],
            LINK,
        );
        let names: Vec<&str> = plan.iter().map(|p| p.vm.name.as_str()).collect();
        assert_eq!(names, ["small", "busy", "big"]);
        assert!(plan.iter().all(|p| p.destination == 0));
    }

    #[test]
    fn destinations_are_balanced_by_memory_counting_what_they_host() {
        let vms = vec![
            vm("a", 512, 0.0),
            vm("b", 256, 0.0),
            vm("c", 256, 0.0),
            vm("d", 128, 0.0),
        ];
        let plan2 = plan(vms.clone(), &[0, 0], LINK);
        let mut load = [0u64; 2];
        for p in &plan2 {
            load[p.destination] += p.vm.memory_bytes >> 20;
        }
        assert_eq!(load, [640, 512]);
        // A destination that hosts 2 GiB already gets nothing of 1.1 GiB.
        let plan3 = plan(vms, &[2 << 30, 0], LINK);
        assert!(plan3.iter().all(|p| p.destination == 1));
    }

    #[test]
    fn a_free_slot_goes_to_the_least_busy_destination() {
        let plan = plan(
            vec![vm("a", 64, 0.0), vm("b", 64, 0.0), vm("c", 128, 0.0), vm("d", 128, 0.0)],
            &[0, 0],
            LINK,
        );
        let pending: Vec<&Planned> = plan.iter().collect();
        let first = next_to_start(&pending, &[0, 0]).unwrap();
        assert_eq!(first, 0);
        let busy = plan[first].destination;
        let mut in_flight = [0, 0];
        in_flight[busy] = 1;
        let second = next_to_start(&pending[1..], &in_flight).unwrap();
        assert_ne!(
            pending[1 + second].destination,
            busy,
            "the other destination's link is idle"
        );
        assert_eq!(next_to_start(&[], &[0, 0]), None);
        assert_eq!(default_parallel(2), 2);
    }
}
