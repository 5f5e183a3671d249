//! `perfplus node drain --from A --to B [--to C ...]`: evacuates every VM of agent A by live migration,
//! a few at a time, and reports each VM and the whole event.
//!
//! 1. Asks A for its VMs and each destination for the memory it hosts already.
//! 2. Measures each VM's dirty rate on A (one interval of `perfplus track --vm`, all VMs at once).
//! 3. Plans ([`plan`]): a destination per VM (balanced by memory), the start order (shortest
//!    predicted migration first), `--parallel` slots (default: one per destination).
//! 4. Runs the migrations through A's ordinary `Migrate` request, the same as `perfplus migrate`,
//!    printing progress per VM. A VM whose migration fails does not stop the others: its failure is
//!    recorded and the next VM starts.
//! 5. On Ctrl-C: starts nothing more and cancels the migrations still in their pre-copy rounds (the
//!    `perfplus migrate --cancel` of each migration, whose id A's `vm status` note names); those
//!    whose guest A has already paused (stop-and-copy, or post-copy, where a cancel would leave the
//!    guest running nowhere) are left to finish. A second Ctrl-C leaves at once.
//! 6. Reports ([`report`]): per VM where it runs (the migration report's outcome; after an error A and
//!    the destination are asked), pages, bytes, downtime, the guest's own longest stall, lost pages,
//!    availability; a total for the event; and what A still hosts.
//!
//! **Dedup across VMs.** A destination advertises, when a migration begins, the digests of every page
//! it holds: pages of the VMs it hosts (those that arrived earlier in the drain included) and of its
//! page store; the source then sends those pages as 25-byte references, which the destination
//! resolves from its own memory after re-hashing them. So a VM that goes to a destination after
//! another with the same content sends only what differs; the default of one migration per destination
//! at a time makes that so for every VM of the drain. Migrations that run at the same time to the same
//! destination (`--parallel` above the number of destinations) do not see each other's pages.

pub mod plan;
pub mod report;

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Credentials, Message, MigrateOptions, MigrateRequest, MigrationMode, Role, TrackRequest};
use tokio::task::JoinSet;

use self::plan::{Planned, VmFacts};
use self::report::{DrainReport, RunsOn, VmDrain};
use crate::cli::client::AgentClient;
use crate::report::{MigrationReport, RoundReport};
use perfplus_common::PAGE_SIZE;

/// `perfplus node drain`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct DrainArgs {
    /// The agent to empty.
    #[arg(long)]
    pub from: String,
    /// An agent to move VMs to (repeat for several: VMs are spread over them, balanced by memory).
    #[arg(long, required = true)]
    pub to: Vec<String>,
    /// Migrations at a time (default: one per destination, as one migration fills a 1 Gbit/s link).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// The migration link, for the predicted times that order the VMs (e.g. 1gbit, 10gbit).
    #[arg(long, default_value = "1gbit", value_parser = crate::cli::track::parse_link)]
    pub link: f64,
    /// How long to measure each VM's dirty rate before planning (e.g. 500ms; 0 skips it and orders by
    /// memory size alone).
    #[arg(long, default_value = "500ms", value_parser = parse_ms)]
    pub measure: f64,
    /// precopy, postcopy or hybrid, as for `perfplus migrate`.
    #[arg(long, default_value = "hybrid")]
    pub mode: MigrationMode,
    /// Longest acceptable downtime of each VM (e.g. 30ms).
    #[arg(long, default_value = "30ms", value_parser = parse_ms)]
    pub downtime_target: f64,
    /// Most pre-copy rounds of each migration.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Turn Perf+ hashing off (zero pages are still found and sent as markers).
    #[arg(long)]
    pub no_hashing: bool,
    /// Do not wait for each guest's self-check on its destination (two sweeps of its memory) before the
    /// VM's slot goes to the next one; the page checksums still confirm every page.
    #[arg(long)]
    pub no_verify: bool,
    /// Post-copy: how long a lost link may stay down before a migration gives up (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = parse_ms)]
    pub postcopy_timeout: f64,
    /// Compression of the full pages sent, as `perfplus migrate --compression` (auto, zstd, off).
    #[arg(long, default_value = "auto")]
    pub compression: perfplus_protocol::Compression,
    /// Print the report as one JSON object (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

use super::parse_ms;

/// Runs the drain, prints its report (a table, or JSON with `--json`) and fails unless every VM ended
/// running on a destination with nothing lost.
pub async fn run(args: DrainArgs, credentials: &Credentials) -> anyhow::Result<()> {
    let json = args.json;
    let report = drain(args, credentials).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.ok() {
        let not_ok: Vec<String> = report
            .vms
            .iter()
            .filter(|v| !v.ok())
            .map(|v| format!("{} ({})", v.vm, v.runs_on.map_or("?", RunsOn::name)))
            .collect();
        bail!(
            "the drain of {} is incomplete: {} of {} VMs run on a destination; not: {}{}",
            report.source,
            report.total.on_destination,
            report.total.vms,
            not_ok.join(", "),
            if report.left_on_source.is_empty() {
                String::new()
            } else {
                format!("; still on the source: {}", report.left_on_source.join(", "))
            }
        );
    }
    Ok(())
}

/// What the progress display knows of one VM.
#[derive(Clone, Debug, Default)]
struct Live {
    started: Option<Instant>,
    round: u32,
    full: u64,
    held: u64,
    zero: u64,
    bytes: u64,
    done: Option<String>,
}

impl Live {
    fn add_round(&mut self, r: &RoundReport) {
        self.round = r.round;
        self.full += r.sent_pages;
        self.held += r.skipped_held;
        self.zero += r.skipped_zero;
        self.bytes += r.bytes_on_wire;
    }
}

/// The drain, without printing its report.
pub async fn drain(args: DrainArgs, credentials: &Credentials) -> anyhow::Result<DrainReport> {
    let drain_start = Instant::now();
    let source = args.from.clone();
    let vms = AgentClient::connect(&source, credentials)
        .await
        .with_context(|| format!("asking {source} for its VMs"))?
        .list()
        .await?;
    let mut hosted = Vec::with_capacity(args.to.len());
    for to in &args.to {
        let there = AgentClient::connect(to, credentials)
            .await
            .with_context(|| format!("asking destination {to} what it hosts"))?
            .list()
            .await?;
        hosted.push(there.iter().map(|v| v.memory_bytes).sum::<u64>());
    }
    let parallel = args.parallel.unwrap_or_else(|| plan::default_parallel(args.to.len()));
    anyhow::ensure!(parallel >= 1, "--parallel must be at least 1");
    let mut report = DrainReport {
        source: source.clone(),
        destinations: args.to.clone(),
        parallel,
        hashing: !args.no_hashing,
        ..Default::default()
    };
    if vms.is_empty() {
        eprintln!("{source} hosts no VM: nothing to drain");
        report.total_up(drain_start.elapsed().as_secs_f64());
        return Ok(report);
    }

    // Dirty rates, all VMs at once (each tracking holds only its own VM).
    let rates: Vec<Option<f64>> = if args.measure > 0.0 {
        eprintln!(
            "measuring the dirty rate of {} VMs on {source} for {:.0} ms ...",
            vms.len(),
            args.measure
        );
        let mut set = JoinSet::new();
        for (i, vm) in vms.iter().enumerate() {
            let (source, credentials, name, ms) = (source.clone(), credentials.clone(), vm.name.clone(), args.measure);
            set.spawn(async move { (i, dirty_rate(&source, &credentials, &name, ms).await) });
        }
        let mut rates = vec![None; vms.len()];
        while let Some(joined) = set.join_next().await {
            let (i, rate) = joined.context("measuring task")?;
            match rate {
                Ok(rate) => rates[i] = Some(rate),
                Err(err) => eprintln!("  {}: dirty rate not measured ({err:#}); taken as 0", vms[i].name),
            }
        }
        rates
    } else {
        vec![None; vms.len()]
    };
    let facts: Vec<VmFacts> = vms
        .iter()
        .zip(rates)
        .map(|(vm, rate)| VmFacts {
            name: vm.name.clone(),
            memory_bytes: vm.memory_bytes,
            dirty_pages_per_s: rate,
        })
        .collect();
    let link_pages_per_s = args.link / 8.0 / PAGE_SIZE as f64;
    let planned = plan::plan(facts, &hosted, link_pages_per_s);
    for p in &planned {
        eprintln!(
            "  {:<16} {:>6} MiB  dirty {:>8}  predicted {:>6.1} s  → {}",
            p.vm.name,
            p.vm.memory_bytes >> 20,
            p.vm.dirty_pages_per_s.map_or("?".to_string(), |r| format!("{r:.0}/s")),
            p.predicted_s,
            args.to[p.destination]
        );
    }
    let options = MigrateOptions {
        downtime_target_ms: args.downtime_target,
        max_rounds: args.max_rounds,
        hashing: !args.no_hashing,
        verify_guest: !args.no_verify,
        hot_last: true,
        mode: args.mode,
        tracker: None,
        postcopy_timeout_ms: args.postcopy_timeout.round().max(1.0) as u64,
        compression: args.compression,
    };

    let live: Arc<Mutex<Vec<Live>>> = Arc::new(Mutex::new(vec![Live::default(); planned.len()]));
    let mut display = Display::new(&planned, &args.to);
    let mut results: Vec<Option<anyhow::Result<MigrationReport>>> = (0..planned.len()).map(|_| None).collect();
    let mut started_at: Vec<Option<f64>> = vec![None; planned.len()];
    let mut ended_at: Vec<Option<f64>> = vec![None; planned.len()];
    let mut pending: Vec<usize> = (0..planned.len()).collect();
    let mut in_flight = vec![0usize; args.to.len()];
    let mut running: JoinSet<(usize, anyhow::Result<MigrationReport>)> = JoinSet::new();
    let mut interrupted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(if display.tty { 250 } else { 2000 }));
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    loop {
        // Fill the free slots.
        while !interrupted && running.len() < parallel && !pending.is_empty() {
            let candidates: Vec<&Planned> = pending.iter().map(|&i| &planned[i]).collect();
            let pick = plan::next_to_start(&candidates, &in_flight).expect("pending is not empty");
            let i = pending.remove(pick);
            let p = &planned[i];
            in_flight[p.destination] += 1;
            started_at[i] = Some(drain_start.elapsed().as_secs_f64());
            live.lock().expect("progress lock")[i].started = Some(Instant::now());
            let request = MigrateRequest {
                vm: p.vm.name.clone(),
                destination: args.to[p.destination].clone(),
                destination_agent: None,
                options: options.clone(),
            };
            let (source, credentials, live) = (source.clone(), credentials.clone(), live.clone());
            running.spawn(async move {
                let result = async {
                    AgentClient::connect(&source, &credentials)
                        .await?
                        .migrate(request, |round| live.lock().expect("progress lock")[i].add_round(round))
                        .await
                }
                .await;
                (i, result)
            });
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            joined = running.join_next() => {
                let (i, result) = joined.expect("a migration runs").context("migration task")?;
                in_flight[planned[i].destination] -= 1;
                ended_at[i] = Some(drain_start.elapsed().as_secs_f64());
                let line = match &result {
                    Ok(r) => format!(
                        "{}: {} rounds, downtime {:.1} ms, guest stall {}, {:.1} MB, {:.1} s",
                        r.outcome.name(),
                        r.rounds.len(),
                        r.downtime_ms,
                        r.guest_max_stall_ms.map_or("?".to_string(), |s| format!("{s:.1} ms")),
                        r.bytes_on_wire as f64 / 1e6,
                        r.total_ms / 1e3
                    ),
                    Err(err) => format!("failed: {err:#}"),
                };
                live.lock().expect("progress lock")[i].done = Some(line);
                results[i] = Some(result);
                display.draw(&live.lock().expect("progress lock"), Some(i));
            }
            _ = tick.tick() => display.draw(&live.lock().expect("progress lock"), None),
            _ = &mut ctrl_c => {
                ctrl_c = Box::pin(tokio::signal::ctrl_c());
                if interrupted {
                    eprintln!("interrupted again: leaving; the migrations under way go on in their agents");
                    std::process::exit(130);
                }
                interrupted = true;
                eprintln!("\ninterrupted: no more migrations start; cancelling those in their pre-copy rounds (Ctrl-C again to leave at once)");
                let under_way: Vec<String> = (0..planned.len())
                    .filter(|&i| started_at[i].is_some() && results[i].is_none())
                    .map(|i| planned[i].vm.name.clone())
                    .collect();
                for name in under_way {
                    let (source, credentials) = (source.clone(), credentials.clone());
                    tokio::spawn(async move {
                        let what = cancel_migration(&source, &credentials, &name).await;
                        eprintln!("  {name}: {what}");
                    });
                }
            }
        }
    }
    display.finish(&live.lock().expect("progress lock"));
    report.interrupted = interrupted;

    // The report, in the order the VMs started (never started last).
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| started_at[i].unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    for i in order {
        let p = &planned[i];
        let destination = args.to[p.destination].clone();
        let mut vm = VmDrain {
            vm: p.vm.name.clone(),
            memory_bytes: p.vm.memory_bytes,
            destination: destination.clone(),
            dirty_pages_per_s: p.vm.dirty_pages_per_s,
            predicted_s: p.predicted_s,
            started_s: started_at[i],
            ended_s: ended_at[i],
            ..Default::default()
        };
        match results[i].take() {
            Some(Ok(migration)) => vm.record_report(migration),
            Some(Err(err)) => {
                vm.outcome = "failed".into();
                let (runs_on, note) = whereabouts(&source, &destination, &p.vm.name, credentials).await;
                vm.runs_on = Some(runs_on);
                vm.downtime_ms = None;
                vm.sla_percent = match runs_on {
                    RunsOn::Nowhere | RunsOn::SourcePaused => None,
                    _ => Some(100.0),
                };
                vm.detail = Some(match note {
                    Some(note) => format!("{err:#}; {note}"),
                    None => format!("{err:#}"),
                });
            }
            None => {
                vm.outcome = "not-started".into();
                vm.runs_on = Some(RunsOn::Source);
                vm.sla_percent = Some(100.0);
                vm.detail = Some("the drain was interrupted before it started".into());
            }
        }
        report.vms.push(vm);
    }
    report.left_on_source = match AgentClient::connect(&source, credentials).await {
        Ok(client) => client.list().await?.into_iter().map(|v| v.name).collect(),
        Err(err) => {
            eprintln!("could not ask {source} what it still hosts: {err:#}");
            Vec::new()
        }
    };
    report.total_up(drain_start.elapsed().as_secs_f64());
    Ok(report)
}

/// Dirty pages per second of `vm` on `agent`, over one tracking interval of `ms`.
async fn dirty_rate(agent: &str, credentials: &Credentials, vm: &str, ms: f64) -> anyhow::Result<f64> {
    let mut conn = Connection::connect(agent, Role::Control, credentials).await?;
    conn.send(&Message::Track(TrackRequest {
        vm: vm.to_string(),
        interval_ms: ms.round().clamp(10.0, u32::MAX as f64) as u32,
        intervals: 1,
        ebpf: false,
    }))
    .await?;
    let mut rate = None;
    loop {
        match conn.recv().await? {
            Message::TrackSample(s) if s.interval_s > 0.0 => rate = Some(s.dirty_pages as f64 / s.interval_s),
            Message::TrackSample(_) => {}
            Message::Done => break,
            other => bail!("agent {agent} sent {} while tracking", other.describe()),
        }
    }
    rate.ok_or_else(|| anyhow::anyhow!("the agent measured no interval"))
}

/// Cancels the migration of `vm` on the source if it is still in its pre-copy rounds (the guest runs
/// there); returns what happened, in words.
async fn cancel_migration(source: &str, credentials: &Credentials, vm: &str) -> String {
    // The id is in the VM's note once the agent has set the migration up: wait for it a little.
    for _ in 0..50 {
        let info = match AgentClient::connect(source, credentials).await {
            Ok(client) => client.status(vm).await,
            Err(err) => Err(err),
        };
        let info = match info {
            Ok(info) => info,
            Err(err) => return format!("not cancelled: {err:#}"),
        };
        if info.run_state != "running" {
            return format!(
                "not cancelled: the guest is {} on {source} (stop-and-copy or post-copy): left to finish",
                info.run_state
            );
        }
        if let Some(id) = info.note.as_deref().and_then(migration_id_of_note) {
            return match AgentClient::connect(source, credentials).await {
                Ok(client) => match client.cancel(&id).await {
                    Ok(what) => format!("cancelled migration {id}: {what}"),
                    Err(err) => format!("cancelling migration {id}: {err:#}"),
                },
                Err(err) => format!("cancelling migration {id}: {err:#}"),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    "not cancelled: its migration id did not appear on the source".to_string()
}

/// The migration id in a source's note "migrating to B (migration ID)".
fn migration_id_of_note(note: &str) -> Option<String> {
    let rest = note.strip_prefix("migrating to ")?;
    let id = rest.rsplit_once("(migration ")?.1.strip_suffix(')')?;
    (!id.is_empty()).then(|| id.to_string())
}

/// Where `vm` runs after its migration ended in an error: asked from the source, then the destination.
async fn whereabouts(source: &str, destination: &str, vm: &str, credentials: &Credentials) -> (RunsOn, Option<String>) {
    let ask = |agent: String| async move { AgentClient::connect(&agent, credentials).await?.status(vm).await };
    if let Ok(info) = ask(source.to_string()).await {
        let runs = if info.run_state == "running" {
            RunsOn::Source
        } else {
            RunsOn::SourcePaused
        };
        let note = info.note.map(|n| format!("{source}: {n}"));
        return (runs, note);
    }
    match ask(destination.to_string()).await {
        Ok(info) if info.run_state == "running" => (
            RunsOn::DestinationUnconfirmed,
            Some(format!("{destination} runs it, unconfirmed")),
        ),
        Ok(info) => (
            RunsOn::Nowhere,
            Some(format!(
                "{destination} holds it {}{}",
                info.run_state,
                info.note.map_or(String::new(), |n| format!(": {n}"))
            )),
        ),
        Err(_) => (
            RunsOn::Nowhere,
            Some(format!("neither {source} nor {destination} has it")),
        ),
    }
}

/// Progress on stderr: on a terminal one line per VM, rewritten in place; otherwise a line per VM
/// under way every two seconds and one when each VM starts and ends.
struct Display {
    tty: bool,
    labels: Vec<String>,
    predicted: Vec<f64>,
    drawn: usize,
    /// Non-terminal: whether each VM's start and end were printed.
    said_start: Vec<bool>,
    said_end: Vec<bool>,
}

impl Display {
    fn new(planned: &[Planned], to: &[String]) -> Display {
        Display {
            tty: std::io::stderr().is_terminal(),
            labels: planned
                .iter()
                .map(|p| format!("{:<16} → {:<22}", p.vm.name, to[p.destination]))
                .collect(),
            predicted: planned.iter().map(|p| p.predicted_s).collect(),
            drawn: 0,
            said_start: vec![false; planned.len()],
            said_end: vec![false; planned.len()],
        }
    }

    fn line(&self, i: usize, live: &Live) -> String {
        let state = match (&live.done, live.started) {
            (Some(done), _) => done.clone(),
            (None, None) => format!("waiting (predicted {:.1} s)", self.predicted[i]),
            (None, Some(t)) if live.round == 0 => format!("first pass, {:.1} s", t.elapsed().as_secs_f64()),
            (None, Some(t)) => format!(
                "round {} done: {} full, {} held, {} zero pages, {:.1} MB, {:.1} s",
                live.round,
                live.full,
                live.held,
                live.zero,
                live.bytes as f64 / 1e6,
                t.elapsed().as_secs_f64()
            ),
        };
        format!("{} {state}", self.labels[i])
    }

    /// Redraws (terminal) or prints what is due (otherwise); `ended` is a VM that just finished.
    fn draw(&mut self, live: &[Live], ended: Option<usize>) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for (i, l) in live.iter().enumerate() {
                let _ = writeln!(err, "\x1b[2K{}", self.line(i, l));
            }
            self.drawn = live.len();
            return;
        }
        for (i, l) in live.iter().enumerate() {
            if l.started.is_some() && !self.said_start[i] {
                self.said_start[i] = true;
                let _ = writeln!(err, "{} started", self.labels[i]);
            }
            let finished = l.done.is_some();
            if finished && !self.said_end[i] {
                self.said_end[i] = true;
                let _ = writeln!(err, "{}", self.line(i, l));
            } else if !finished && l.started.is_some() && ended.is_none() {
                let _ = writeln!(err, "{}", self.line(i, l));
            }
        }
    }

    fn finish(&mut self, live: &[Live]) {
        self.draw(live, Some(usize::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_id_is_read_from_the_source_note() {
        assert_eq!(
            migration_id_of_note("migrating to 10.0.0.2:7001 (migration 5f3a9c)").as_deref(),
            Some("5f3a9c")
        );
        assert_eq!(migration_id_of_note("kept after migration 5f3a9c to b ended"), None);
        assert_eq!(migration_id_of_note("migrating to b (migration )"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_ms("30ms"), Ok(30.0));
        assert_eq!(parse_ms("0.5s"), Ok(500.0));
        assert_eq!(parse_ms("0"), Ok(0.0));
        assert!(parse_ms("-1").is_err());
        assert!(parse_ms("soon").is_err());
    }
}
