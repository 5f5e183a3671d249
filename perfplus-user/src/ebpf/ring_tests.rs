//! The dirty-ring program against the dirty-ring tracker, on a VM in ring mode.
//!
//! The program must see exactly the pages the ring tracker harvests (first measured here on a quiet
//! machine: over 3 s at 2000 writes/s, an in-kernel rate of 1908-1930 pages/s; under load the guest
//! writes less, so the test checks what the rate is, pushes of one window, not what it amounts to).

use super::*;
use perfplus_vmm::tracking::dirty_ring::DirtyRingTracker;
use perfplus_vmm::tracking::DirtyTracker;
use perfplus_vmm::vm::{builtin_guest, Vm, VmOptions};
use std::collections::BTreeSet;

#[test]
fn dirty_ring_program_sees_exactly_the_ring_tracker_pages() {
    let name = "ringheat";
    let mut vm = Vm::create_with(
        name,
        128 << 20,
        1,
        VmOptions {
            dirty_ring_entries: Some(4096),
        },
    )
    .unwrap();
    let cmdline = format!("working-set=64M rate=2k tsc_khz={}", vm.tsc_khz());
    vm.load_multiboot(builtin_guest::IMAGE, &cmdline).unwrap();
    vm.start().unwrap();
    let t0 = std::time::Instant::now();
    while vm.guest_status().map(|g| g.state) != Some(2) {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
    }
    let tids = vcpu_threads_of(name, 1).unwrap();
    // eBPF first, then the tracker: every push after the tracker starts is seen by both.
    let mut heat = EbpfHeat::attach(HeatSource::VmThreads { vm_id: 1, tids }).unwrap();
    let mut tracker = DirtyRingTracker::new(&vm).unwrap();
    let (mut ring_all, mut ebpf_all) = (BTreeSet::new(), BTreeSet::new());
    let (mut ring_n, mut events) = (0, 0);
    for round in 0..4 {
        if round < 3 {
            std::thread::sleep(Duration::from_secs(1));
        } else {
            vm.pause().unwrap(); // nothing in flight for the last look
        }
        let ring = tracker.collect().unwrap();
        let sample = heat.sample().unwrap();
        eprintln!(
            "round {round}: ring tracker {} pages, ebpf {} events {} pages, kernel rate {:?}, errors {}",
            ring.count(),
            sample.write_events,
            sample.working_set_pages(),
            sample.kernel_rate,
            sample.map_errors
        );
        assert_eq!(sample.map_errors, 0);
        ring_n += ring.count();
        events += sample.write_events;
        if round < 3 {
            // One window's pushes: some (the guest writes all along), never more than all so far.
            let rate = sample.kernel_rate.unwrap();
            assert!(
                rate > 0 && rate <= events,
                "in-kernel rate {rate} after {events} pushes"
            );
        }
        ring_all.extend(ring.iter().map(|p| p * 4096));
        ebpf_all.extend(sample.pages.iter().map(|(a, _)| *a));
    }
    // Over the whole run, the program saw exactly the pages the ring tracker harvested; each
    // interval's sets differ only at the edges (collect and sample are not one instant).
    assert_eq!(ring_all, ebpf_all);
    assert!(events >= ring_n, "{events} pushes, {ring_n} harvested");
}
