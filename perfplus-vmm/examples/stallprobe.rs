// Temporary probe (not committed): what stalls the guest under dirty-log tracking.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use perfplus_vmm::tracking::{self, TrackerKind};
use perfplus_vmm::vm::{builtin_guest, Vm};

fn main() {
    let workload = std::env::args()
        .nth(1)
        .unwrap_or("working-set=256M rate=10k mix=unique:30,text:20,dup:20,zero:10,same:20".into());
    let mem: u64 = std::env::var("MEMG").map(|v| v.parse::<u64>().unwrap()).unwrap_or(1) << 30;
    let mut vm = Vm::create_with("probe", mem, 1, TrackerKind::DirtyLog.vm_options()).unwrap();
    let cmdline = format!("{workload} tsc_khz={}", vm.tsc_khz());
    vm.load_multiboot(builtin_guest::IMAGE, &cmdline).unwrap();
    vm.start().unwrap();
    loop {
        if vm.guest_status().is_some_and(|s| s.verify_sweeps > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let memory = vm.memory().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stalls: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let t0 = Instant::now();
    let probe = {
        let stop = stop.clone();
        let stalls = stalls.clone();
        let memory = memory.clone();
        std::thread::spawn(move || {
            let mut last = perfplus_vmm::vm::status::read(&memory).unwrap().heartbeat;
            let mut since = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let hb = perfplus_vmm::vm::status::read(&memory).unwrap().heartbeat;
                let now = Instant::now();
                if hb != last {
                    let gap = (now - since).as_secs_f64() * 1e3;
                    if gap > std::env::var("TH").map(|v| v.parse().unwrap()).unwrap_or(5.0) {
                        stalls.lock().unwrap().push(((since - t0).as_secs_f64() * 1e3, gap));
                    }
                    last = hb;
                    since = now;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let phase = |name: &str, stalls: &Arc<Mutex<Vec<(f64, f64)>>>| {
        let mut s = stalls.lock().unwrap();
        let v: Vec<String> = s.iter().map(|(at, g)| format!("{g:.1}@{at:.0}")).collect();
        println!("{name}: stalls>5ms {}", v.join(" "));
        s.clear();
    };
    let mode = std::env::var("MODE").unwrap_or_default();
    std::thread::sleep(Duration::from_secs(2));
    phase("untracked", &stalls);
    if mode == "vm" {
        for i in 0..3 {
            let t = Instant::now();
            let mut other = Vm::create_with("other", 1 << 30, 1, TrackerKind::DirtyLog.vm_options()).unwrap();
            println!(
                "create {:.1} ms at {:.0}",
                t.elapsed().as_secs_f64() * 1e3,
                (t - t0).as_secs_f64() * 1e3
            );
            std::thread::sleep(Duration::from_millis(300));
            if i > 0 {
                let t = Instant::now();
                other.memory().write(0x100000, &vec![7u8; 64 << 20]).unwrap();
                println!(
                    "write 64M {:.1} ms at {:.0}",
                    t.elapsed().as_secs_f64() * 1e3,
                    (t - t0).as_secs_f64() * 1e3
                );
            }
            if i > 1 {
                other.load_multiboot(builtin_guest::IMAGE, &cmdline).unwrap();
                other.start().unwrap();
                std::thread::sleep(Duration::from_millis(1500));
            }
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            drop(other);
            println!(
                "drop {:.1} ms at {:.0}",
                t.elapsed().as_secs_f64() * 1e3,
                (t - t0).as_secs_f64() * 1e3
            );
            std::thread::sleep(Duration::from_millis(300));
            phase("vm", &stalls);
        }
        stop.store(true, Ordering::Relaxed);
        probe.join().unwrap();
        return;
    }
    let t = Instant::now();
    let mut tracker = tracking::start(TrackerKind::DirtyLog, &vm).unwrap();
    println!(
        "enable {:.1} ms at {:.0}",
        t.elapsed().as_secs_f64() * 1e3,
        (t - t0).as_secs_f64() * 1e3
    );
    std::thread::sleep(Duration::from_millis(500));
    phase("enabled", &stalls);
    let mut page = [0u8; 4096];
    for i in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let d = tracker.collect().unwrap();
        let c = t.elapsed().as_secs_f64() * 1e3;
        if mode == "read" {
            for p in d.iter() {
                memory.read_page(p, &mut page);
            }
        }
        println!(
            "collect {i}: {} pages in {c:.1} ms at {:.0}",
            d.count(),
            (t - t0).as_secs_f64() * 1e3
        );
    }
    phase("collecting", &stalls);
    drop(tracker);
    std::thread::sleep(Duration::from_secs(2));
    phase("after", &stalls);
    stop.store(true, Ordering::Relaxed);
    probe.join().unwrap();
}
