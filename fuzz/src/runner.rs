//! The stable fuzz loop: seeds first, then mutants, until a count or a time budget is spent. There is
//! no coverage feedback: a mutant joins the bounded pool of inputs to mutate further when it ran
//! cleanly and looks new by a cheap proxy (its size class and first 12 bytes: a frame's header and
//! the start of its payload, an ELF's identification). A panic or an over-allocation stops the run
//! and is returned with its input.

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::alloc;
use crate::mutate::{mutate, Rng};
use crate::targets::Target;

/// When a run stops.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub executions: Option<u64>,
    pub time: Option<Duration>,
}

/// What went wrong with one input.
#[derive(Debug)]
pub enum Finding {
    Panic {
        message: String,
        input: Vec<u8>,
    },
    Allocation {
        peak: usize,
        largest: usize,
        input: Vec<u8>,
    },
}

impl Finding {
    pub fn input(&self) -> &[u8] {
        match self {
            Finding::Panic { input, .. } | Finding::Allocation { input, .. } => input,
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Panic { message, input } => write!(f, "panic on a {}-byte input: {message}", input.len()),
            Finding::Allocation { peak, largest, input } => write!(
                f,
                "a {}-byte input made the target hold {peak} bytes at once (largest request {largest}), over the \
                 limit of {} bytes",
                input.len(),
                alloc::LIMIT
            ),
        }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub executions: u64,
    pub elapsed: Duration,
    pub pool: usize,
    pub peak_alloc: Option<usize>,
    pub finding: Option<Finding>,
}

/// The message of the last panic, taken by [`QuietPanics`]'s hook.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// While alive, panics print nothing and leave their message for [`execute`] (a fuzz loop panics by
/// design until a bug is fixed). Dropping it puts the previous hook back.
pub struct QuietPanics(Option<PanicHook>);

type PanicHook = Box<dyn Fn(&panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

impl QuietPanics {
    pub fn install() -> QuietPanics {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{payload}{location}"));
        }));
        QuietPanics(Some(previous))
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        // Dropped while its thread unwinds (a test asserting under it failed), `set_hook` would panic
        // again and abort the process with the first panic's message swallowed by the quiet hook:
        // put back a hook that prints then, so that the failure shows.
        if let Some(previous) = self.0.take() {
            if std::thread::panicking() {
                if let Some(message) = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    eprintln!("panicked while panics were quiet: {message}");
                }
                return;
            }
            panic::set_hook(previous);
        }
    }
}

/// Runs `target` once on `input`: a panic or an over-allocation is a finding. Returns the bytes the
/// execution held at once (None without the counting allocator).
pub fn execute(target: &Target, input: &[u8]) -> Result<Option<usize>, Finding> {
    let base = alloc::reset_peak();
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let measured = alloc::peak_since_reset(base);
    if result.is_err() {
        let message = LAST_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "(message printed above)".into());
        return Err(Finding::Panic {
            message,
            input: input.to_vec(),
        });
    }
    if let Some((peak, largest)) = measured {
        if peak > alloc::LIMIT {
            return Err(Finding::Allocation {
                peak,
                largest,
                input: input.to_vec(),
            });
        }
    }
    Ok(measured.map(|(peak, _)| peak))
}

/// Inputs to mutate: the seeds, and mutants that reached something new by a cheap proxy (a new
/// (length, first 12 bytes) pair: a new frame type, header, item kind or size class). Bounded.
struct Pool {
    inputs: Vec<Vec<u8>>,
    seen: HashSet<(usize, [u8; 12])>,
    seeds: usize,
}

const POOL_MAX: usize = 4096;

impl Pool {
    fn key(input: &[u8]) -> (usize, [u8; 12]) {
        let mut head = [0u8; 12];
        let n = input.len().min(12);
        head[..n].copy_from_slice(&input[..n]);
        (input.len().min(64) + input.len() / 4096 * 64, head)
    }

    fn offer(&mut self, input: Vec<u8>, rng: &mut Rng) {
        if !self.seen.insert(Pool::key(&input)) {
            return;
        }
        if self.inputs.len() < POOL_MAX {
            self.inputs.push(input);
        } else {
            // Replace a mutant, never a seed.
            let at = self.seeds + rng.below(POOL_MAX - self.seeds);
            self.inputs[at] = input;
        }
    }
}

/// Reads every file of `dir` (none if it does not exist).
pub fn read_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    files.sort();
    files.iter().filter(|p| p.is_file()).map(std::fs::read).collect()
}

/// Runs `target` over `seeds` and their mutants until `budget` is spent or an input fails.
pub fn run(target: &Target, seeds: Vec<Vec<u8>>, budget: Budget, seed: u64) -> Report {
    let _quiet = QuietPanics::install();
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut seeds = seeds;
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    for s in &mut seeds {
        s.truncate(target.max_len);
    }
    let mut pool = Pool {
        seen: seeds.iter().map(|s| Pool::key(s)).collect(),
        seeds: seeds.len().min(POOL_MAX),
        inputs: seeds,
    };
    pool.inputs.truncate(POOL_MAX);
    let mut executions = 0u64;
    let mut peak_alloc: Option<usize> = None;
    let done = |executions: u64| {
        budget.executions.is_some_and(|n| executions >= n)
            || budget
                .time
                .is_some_and(|t| executions.is_multiple_of(256) && start.elapsed() >= t)
    };
    // Every seed once, unmutated.
    for i in 0..pool.inputs.len() {
        let input = pool.inputs[i].clone();
        match execute(target, &input) {
            Ok(peak) => peak_alloc = peak_alloc.max(peak),
            Err(finding) => return report(executions + 1, start, &pool, peak_alloc, Some(finding)),
        }
        executions += 1;
    }
    while !done(executions) {
        let a = rng.below(pool.inputs.len());
        let b = rng.below(pool.inputs.len());
        let input = mutate(&pool.inputs[a], &pool.inputs[b], &mut rng, target.max_len);
        executions += 1;
        match execute(target, &input) {
            Ok(peak) => {
                peak_alloc = peak_alloc.max(peak);
                pool.offer(input, &mut rng);
            }
            Err(finding) => return report(executions, start, &pool, peak_alloc, Some(finding)),
        }
    }
    report(executions, start, &pool, peak_alloc, None)
}

fn report(executions: u64, start: Instant, pool: &Pool, peak_alloc: Option<usize>, finding: Option<Finding>) -> Report {
    Report {
        executions,
        elapsed: start.elapsed(),
        pool: pool.inputs.len(),
        peak_alloc,
        finding,
    }
}
