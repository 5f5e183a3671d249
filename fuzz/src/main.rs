//! `perfplus-fuzz`: the stable mutation fuzzer over perfplus's decoders.
//!
//! ```text
//! perfplus-fuzz run TARGET [--corpus DIR] [--executions N] [--seconds S] [--seed X] [--artifacts DIR]
//! perfplus-fuzz replay TARGET FILE...      run files through a target (a crash's input, a corpus)
//! perfplus-fuzz seeds DIR [--kvm]          write the seed corpus (with --kvm: a real vCPU's state too)
//! perfplus-fuzz list                       the targets
//! ```
//! `run` stops at the first panic or over-allocation, saves the input under `--artifacts` (default
//! `fuzz/artifacts/TARGET/`) and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use perfplus_fuzz::runner::{self, Budget};
use perfplus_fuzz::{seeds, targets};

#[global_allocator]
static ALLOC: perfplus_fuzz::alloc::Counting = perfplus_fuzz::alloc::Counting;

fn usage() -> &'static str {
    "usage: perfplus-fuzz run TARGET [--corpus DIR] [--executions N] [--seconds S] [--seed X] [--artifacts DIR]\n\
     \x20      perfplus-fuzz replay TARGET FILE...\n\
     \x20      perfplus-fuzz seeds DIR [--kvm]\n\
     \x20      perfplus-fuzz list"
}

fn target(name: Option<String>) -> anyhow::Result<&'static targets::Target> {
    let name = name.context(usage())?;
    targets::by_name(&name).with_context(|| {
        let names: Vec<_> = targets::TARGETS.iter().map(|t| t.name).collect();
        format!("no target {name:?}; the targets are {}", names.join(", "))
    })
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let target = target(args.next())?;
    let mut corpus = PathBuf::from("fuzz/corpus").join(target.name);
    let mut artifacts = PathBuf::from("fuzz/artifacts").join(target.name);
    let mut budget = Budget {
        executions: None,
        time: None,
    };
    let mut seed = 1u64;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--corpus" => corpus = value()?.into(),
            "--artifacts" => artifacts = value()?.into(),
            "--executions" => budget.executions = Some(value()?.parse().context("--executions")?),
            "--seconds" => budget.time = Some(Duration::from_secs_f64(value()?.parse().context("--seconds")?)),
            "--seed" => seed = value()?.parse().context("--seed")?,
            other => bail!("unknown option {other}\n{}", usage()),
        }
    }
    if budget.executions.is_none() && budget.time.is_none() {
        bail!("give --executions or --seconds (or both): a run must end by itself");
    }
    let inputs = runner::read_corpus(&corpus).with_context(|| format!("reading {}", corpus.display()))?;
    let seeds = inputs.len();
    let report = runner::run(target, inputs, budget, seed);
    let secs = report.elapsed.as_secs_f64();
    println!(
        "{}: {} executions in {:.1} s ({:.0}/s), {} seeds from {}, pool {}, peak allocation {}, {}",
        target.name,
        report.executions,
        secs,
        report.executions as f64 / secs.max(1e-9),
        seeds,
        corpus.display(),
        report.pool,
        report
            .peak_alloc
            .map_or("not measured".into(), |b| format!("{} KiB", b.div_ceil(1024))),
        if report.finding.is_some() {
            "FAILED"
        } else {
            "no finding"
        }
    );
    if let Some(finding) = report.finding {
        std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
        let path = artifacts.join(format!("crash-{:016x}", fnv(finding.input())));
        std::fs::write(&path, finding.input()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("{}: {finding}\ninput saved as {}", target.name, path.display());
        return Ok(false);
    }
    Ok(true)
}

fn replay(mut args: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let target = target(args.next())?;
    let _quiet = runner::QuietPanics::install();
    let mut ok = true;
    for file in args {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {file}"))?;
        match runner::execute(target, &bytes) {
            Ok(_) => println!("{file}: ok"),
            Err(finding) => {
                println!("{file}: {finding}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

fn write_seeds(mut args: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let dir = PathBuf::from(args.next().context(usage())?);
    let kvm = args.any(|a| a == "--kvm");
    let mut all = seeds::seeds();
    if kvm {
        let state = seeds::kvm_vm_state().context("saving a real vCPU's state (needs /dev/kvm)")?;
        all.push(seeds::Seed {
            target: "vm_state",
            name: "kvm".into(),
            bytes: state.to_bytes()?,
        });
    }
    for s in &all {
        let folder = dir.join(s.target);
        std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
        std::fs::write(folder.join(&s.name), &s.bytes).with_context(|| format!("writing {}", s.name))?;
    }
    println!("{} seeds written under {}", all.len(), dir.display());
    Ok(true)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("run") => run(args),
        Some("replay") => replay(args),
        Some("seeds") => write_seeds(args),
        Some("list") => {
            for t in targets::TARGETS {
                println!("{} (inputs up to {} bytes)", t.name, t.max_len);
            }
            Ok(true)
        }
        _ => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("perfplus-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}
