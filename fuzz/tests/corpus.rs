//! Every committed input runs through its target without a finding: the seed corpus
//! (`fuzz/corpus/TARGET/`) and the inputs of findings that were fixed (`fuzz/regressions/TARGET/`).
//! And the seeds are what they claim to be: real encodings that decode.

use std::path::Path;

use perfplus_fuzz::runner::{execute, read_corpus, QuietPanics};
use perfplus_fuzz::{seeds, TARGETS};
use perfplus_protocol::frame::decode_frame;

#[global_allocator]
static ALLOC: perfplus_fuzz::alloc::Counting = perfplus_fuzz::alloc::Counting;

/// The allocator's counters and the panic hook belong to the whole process, and the test harness runs
/// tests on several threads: an execution measured while another test allocates (the hog below
/// allocates over the limit on purpose) would count that test's bytes as its own. A CI run found a
/// regression input "holding" 69 MB that way. Every test here holds this while it runs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn replay(folder: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
    let _quiet = QuietPanics::install();
    let mut n = 0;
    for target in TARGETS {
        for input in read_corpus(&root.join(target.name)).expect("reading the corpus") {
            if let Err(finding) = execute(target, &input) {
                panic!("{folder}/{}: {finding}", target.name);
            }
            n += 1;
        }
    }
    n
}

#[test]
fn the_seed_corpus_runs_clean() {
    let _serial = one_at_a_time();
    let n = replay("corpus");
    assert!(n >= seeds::seeds().len(), "{n} inputs in fuzz/corpus");
}

#[test]
fn fixed_findings_stay_fixed() {
    let _serial = one_at_a_time();
    replay("regressions");
}

#[test]
fn seeds_are_real_encodings() {
    let _serial = one_at_a_time();
    for seed in seeds::seeds() {
        match seed.target {
            "frame" => {
                let (_, used) = decode_frame(&seed.bytes).unwrap().expect("a whole frame");
                assert!(used <= seed.bytes.len(), "{}", seed.name);
            }
            "page_batch" => {
                perfplus_protocol::frame::PageBatch::from_payload(seed.bytes.clone()).unwrap();
            }
            "vm_state" => {
                perfplus_vmm::vm::VmState::from_bytes(&seed.bytes).unwrap();
            }
            "multiboot" => {
                perfplus_vmm::vm::multiboot::plan(&seed.bytes, 64 << 20)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", seed.name));
            }
            "handshake" => {
                let hello: &[u8; 13] = seed.bytes[..13].try_into().unwrap();
                perfplus_protocol::handshake::Hello::from_bytes(hello).unwrap();
            }
            other => panic!("seed for unknown target {other}"),
        }
        // The committed corpus holds it too; the built-in guest only as a file of that name: its bytes
        // depend on where it was compiled (the build path reaches the image), so the committed copy is
        // a build of it, not this build's.
        let committed = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(seed.target)
            .join(&seed.name);
        if seed.name == "builtin-guest" {
            assert!(committed.is_file(), "{} is missing", committed.display());
            continue;
        }
        assert_eq!(
            std::fs::read(&committed).ok().as_deref(),
            Some(&seed.bytes[..]),
            "{} differs from what `perfplus-fuzz seeds` writes",
            committed.display()
        );
    }
}

#[test]
fn an_over_allocation_and_a_panic_are_findings() {
    let _serial = one_at_a_time();
    use perfplus_fuzz::Target;
    let _quiet = QuietPanics::install();
    let hog = Target {
        name: "hog",
        run: |data| {
            // A MiB over the limit: the counters are the process's, and the test harness's own
            // threads allocate and free a few bytes meanwhile (1 byte over was seen to measure 24
            // bytes under).
            let v = vec![0u8; perfplus_fuzz::alloc::LIMIT + (1 << 20) + data.len()];
            std::hint::black_box(v);
        },
        max_len: 16,
    };
    let err = execute(&hog, b"x").unwrap_err().to_string();
    assert!(err.contains("over the limit"), "{err}");
    let boom = Target {
        name: "boom",
        run: |data| assert!(data.is_empty(), "not empty"),
        max_len: 16,
    };
    let err = execute(&boom, b"x").unwrap_err().to_string();
    assert!(err.contains("panic on a 1-byte input: not empty"), "{err}");
    assert!(execute(&boom, b"").is_ok());
}
