//! `perfplus`: the agent daemon and the CLI that drives it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use perfplus::cli::client::AgentClient;
use perfplus::service::settings::parse_size;
use perfplus_protocol::report::Outcome;
use perfplus_protocol::{CertRole, Identity, KernelSource, MigrateOptions, MigrateRequest, VmInfo, VmStartRequest};
use perfplus_vmm::tracking::TrackerKind;

/// Live migration of KVM guests between perfplus agents, with Perf+ page hashing.
///
/// Run one agent per host (`perfplus agent`), start VMs on it (`perfplus vm start`), and move them
/// live (`perfplus migrate`). Every connection is TLS 1.3 with a certificate on both sides from the
/// cluster's CA: `perfplus ca init` makes the CA, `perfplus cert issue` each agent's and operator's
/// credentials (a directory, `--tls-dir`).
#[derive(Parser)]
#[command(name = "perfplus", version)]
struct Cli {
    /// Directory of this side's TLS credentials, as `perfplus cert issue` writes it: ca.pem (the
    /// cluster CA), cert.pem and key.pem (this agent's, operator's or reader's certificate and key),
    /// and for an agent page.key (the cluster's page-digest secret).
    #[arg(long, global = true, env = "PERFPLUS_TLS_DIR", default_value = "/etc/perfplus")]
    tls_dir: PathBuf,

    /// Cluster keys were replaced by TLS certificates (protocol 4): refused, saying what to do.
    #[arg(long, global = true, hide = true)]
    cluster_key_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent of this host: it hosts VMs and migrates them to and from other agents. Its
    /// settings come from a TOML file (`--config`, default /etc/perfplus/agent.toml if it exists),
    /// overridden by these flags; `--print-config` shows the result.
    Agent(perfplus::service::AgentArgs),
    /// Start, list, inspect and stop VMs on an agent.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a running VM from one agent to another (hybrid by default: pre-copy, then post-copy
    /// if it cannot converge), then print the report.
    Migrate(MigrateArgs),
    /// Perf+ for QEMU's own live migration: relay a QEMU 7.2 migration through perfplus agents.
    #[command(subcommand)]
    Qemu(QemuCommand),
    /// Operations on a whole node (agent), e.g. emptying it for maintenance.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Watch how fast a process or a VM writes its memory (eBPF write faults, KVM dirty log), and
    /// whether pre-copy migration could keep up with it over a given link.
    Track(TrackArgs),
    /// Write the built-in workload guest (a multiboot ELF kernel) to a file, e.g. to boot it under
    /// QEMU with `-kernel FILE -append "working-set=64M rate=10k tsc_khz=..."`.
    GuestImage {
        #[arg(long)]
        out: PathBuf,
    },
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates of agents, operators and readers.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Replaced by `perfplus ca init` and `perfplus cert issue` (protocol 4).
    #[command(hide = true)]
    Keygen {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Live-migrate every VM of agent --from to the --to agents, a few at a time (shortest predicted
    /// migration first, balanced by memory), with progress per VM and a report per VM and for the
    /// event; exits non-zero unless every VM ended running on a destination with nothing lost.
    Drain(perfplus::cli::drain::DrainArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new cluster CA: DIR/ca.pem (its certificate) and DIR/ca.key (its key, mode 0600; keep it
    /// off the hosts, it signs every certificate of the cluster).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name (in the CA certificate and in refusals).
        #[arg(long, default_value = "perfplus")]
        cluster: String,
        /// Validity of the CA certificate, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue credentials from the CA in --ca-dir into the directory --out: ca.pem, cert.pem, key.pem
    /// (0600) and, for an agent, page.key (the cluster's page-digest secret, 0600). An agent's
    /// certificate lets it accept and open migrations and read status; an operator's every control
    /// command; a reader's `vm list` and `vm status` only.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Credentials of the agent NAME (one per host).
        #[arg(long, group = "holder", value_name = "NAME")]
        agent: Option<String>,
        /// Credentials of the operator NAME: every control command.
        #[arg(long, group = "holder", value_name = "NAME")]
        operator: Option<String>,
        /// Credentials of the reader NAME: `vm list` and `vm status` only.
        #[arg(long, group = "holder", value_name = "NAME")]
        reader: Option<String>,
        /// Where to write them (created mode 0700; existing files are not overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Validity, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Start a VM: the built-in workload guest (`--workload`) or a multiboot kernel (`--kernel`).
    Start(VmStartArgs),
    /// List the VMs an agent hosts.
    List {
        #[arg(long, default_value = "127.0.0.1:7001")]
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one VM: run state, the guest's own counters, the end of its serial console.
    Status {
        name: String,
        #[arg(long, default_value = "127.0.0.1:7001")]
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Stream a VM's serial console (read-only, like `virsh console`; Ctrl-C ends it). Control
    /// characters are escaped unless --raw. Any certificate of the cluster may read it.
    Console {
        name: String,
        #[arg(long, default_value = "127.0.0.1:7001")]
        agent: String,
        /// Print what the agent keeps of the console (the last 64 KiB) and exit.
        #[arg(long)]
        no_follow: bool,
        /// Write the guest's bytes as they are (escape sequences reach the terminal).
        #[arg(long)]
        raw: bool,
    },
    /// Stop a VM and free its memory.
    Stop {
        name: String,
        #[arg(long, default_value = "127.0.0.1:7001")]
        agent: String,
    },
    /// Resume a paused VM: one a migration left paused here after committing it to a destination that
    /// did not confirm running it. Only do this once you know the destination does not run the guest.
    Resume {
        name: String,
        #[arg(long, default_value = "127.0.0.1:7001")]
        agent: String,
    },
}

#[derive(Args)]
struct VmStartArgs {
    /// The agent to start the VM on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    agent: String,
    /// Name of the VM (A-Z a-z 0-9 - _ .), unique on its agent.
    #[arg(long)]
    name: String,
    /// Guest RAM (K/M/G suffix).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// The built-in self-checking workload guest:
    /// `dirtier[:working-set=SIZE,rate=N,mix=unique:40,dup:30,zero:10,same:20,hot=P:W,seed=N,progress=off]`.
    /// `rate` is page writes per second (k suffix allowed, 0 = flat out); `mix` gives the share of
    /// pages with fresh random content, content shared with other pages, zero content, and content
    /// rewritten unchanged; `hot=P:W` sends W % of the writes to the first P % of the working set;
    /// `progress=off` drops the guest's once-a-second progress line on the console.
    #[arg(long, conflicts_with = "kernel")]
    workload: Option<String>,
    /// A multiboot (v1) ELF kernel to boot instead of the built-in guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Command line for `--kernel`.
    #[arg(long, default_value = "", requires = "kernel")]
    cmdline: String,
    /// Dirty tracker the VM is made for: dirty-log (KVM bitmap), dirty-ring (KVM per-vCPU rings; the
    /// VM is created in ring mode, which excludes dirty-log) or uffd-wp (userfaultfd write-protect).
    /// Its migrations use it unless `migrate --tracker` names another.
    #[arg(long, default_value = "dirty-log")]
    tracker: TrackerKind,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MigrateArgs {
    /// Name of the VM to move.
    #[arg(required_unless_present_any = ["resume", "cancel"])]
    name: Option<String>,
    /// Agent that runs the VM now.
    #[arg(long, required_unless_present = "cancel")]
    from: Option<String>,
    /// Agent that should run it afterwards.
    #[arg(long, required_unless_present_any = ["resume", "cancel"])]
    to: Option<String>,
    /// The name the `--to` agent's certificate must carry: the migration is refused if another agent
    /// answers at that address. Without it, any agent of the cluster the source may migrate to.
    #[arg(long, value_name = "NAME", requires = "to")]
    to_agent: Option<String>,
    /// precopy (rounds, then stop-and-copy), postcopy (switch at once, memory follows on demand and by
    /// background push) or hybrid (pre-copy while it converges, then post-copy).
    #[arg(long, default_value = "hybrid")]
    mode: perfplus_protocol::MigrationMode,
    /// Resume the post-copy migration with this id (after a lost connection) on the `--from` agent
    /// now, and wait for its report. The id is in the report and in the source agent's log.
    #[arg(long, conflicts_with_all = ["name", "to"])]
    resume: Option<String>,
    /// Give up the migration with this id on the agent `--agent` names. On the source before the
    /// commit, the guest keeps running there. In post-copy, on the source: the supply stops and the
    /// destination's guest, lacking pages, is paused there; on the destination: its incomplete copy
    /// is destroyed, and the source's paused copy (stale since the switch) is what remains. The
    /// answer says which.
    #[arg(long, requires = "agent", conflicts_with_all = ["name", "to", "resume", "from"])]
    cancel: Option<String>,
    /// The agent to send `--cancel` to (the source or the destination).
    #[arg(long, requires = "cancel")]
    agent: Option<String>,
    /// Post-copy: how long either side waits for a lost link to come back before giving up (the
    /// destination then pauses the guest and waits for the source or a `--cancel`; the source ends
    /// the migration as `postcopy-broken`).
    #[arg(long, default_value = "60s", value_parser = parse_duration_ms)]
    postcopy_timeout: f64,
    /// Compression of the full pages sent (zstd): auto compresses while the link is slower than
    /// compressing would make it (the kernel's delivery rate of the connection against the measured
    /// zstd speed and ratio: on at 1 Gbit/s for text-like memory, off on loopback and for random
    /// pages); zstd compresses every batch that shrinks; off never does.
    #[arg(long, default_value = "auto")]
    compression: perfplus_protocol::Compression,
    /// Longest acceptable downtime (e.g. 30ms, 0.2s): pre-copy iterates until the remaining dirty
    /// pages can be sent within it at the rate measured so far.
    #[arg(long, default_value = "30ms", value_parser = parse_duration_ms)]
    downtime_target: f64,
    /// Most pre-copy rounds (the first full pass included) before the final stop-and-copy.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Turn Perf+ hashing off: every non-zero dirty page is sent in full, zero pages still as markers
    /// (the baseline to compare against).
    #[arg(long)]
    no_hashing: bool,
    /// Do not wait for the guest's self-check on the destination before reporting.
    #[arg(long)]
    no_verify: bool,
    /// Order of the pages within a round: `hot-last` sends pages rewritten in recent rounds last
    /// (they would likely be dirtied again before the round ends), and in round 1 moves the pages
    /// (and 2 MiB regions) the guest writes ahead of the round to its end; `address` sends in address
    /// order.
    #[arg(long, default_value = "hot-last", value_parser = ["hot-last", "address"])]
    order: String,
    /// Dirty tracker of the pre-copy rounds: dirty-log, dirty-ring or uffd-wp. Default: the one the
    /// VM was started with (`vm start --tracker`).
    #[arg(long)]
    tracker: Option<TrackerKind>,
    /// Print the report as one JSON object instead of a table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum QemuCommand {
    /// Live-migrate a running QEMU 7.2 guest to a QEMU waiting with `-incoming` on another host,
    /// through the two hosts' perfplus agents: pages the destination already has at that address are
    /// dropped, pages whose content it holds travel as references.
    /// Pre-copy over one channel only: multifd, xbzrle, compress and post-copy are refused.
    Migrate(QemuMigrateArgs),
}

#[derive(Args)]
struct QemuMigrateArgs {
    /// The source host's agent: it runs the source half of the relay (it holds the page secret).
    #[arg(long, default_value = "127.0.0.1:7001")]
    agent: String,
    /// The source QEMU's QMP socket on the source agent's host (`-qmp unix:PATH,server=on,wait=off`;
    /// QEMU serves one QMP client at a time: leave it free).
    #[arg(long)]
    qmp: PathBuf,
    /// The destination host's perfplus agent (host:port).
    #[arg(long)]
    to: String,
    /// The name the destination agent's certificate must carry (as `migrate --to-agent`).
    #[arg(long)]
    to_agent: Option<String>,
    /// The destination QEMU's `-incoming` address as the destination host reaches it: unix:PATH or
    /// tcp:HOST:PORT.
    #[arg(long)]
    incoming: String,
    /// The destination QEMU's QMP socket on the destination host: its agent then checks that it is
    /// QEMU 7.2 and reports its status at the end.
    #[arg(long)]
    destination_qmp: Option<String>,
    /// QEMU's downtime limit (e.g. 30ms, 0.3s); QEMU's own setting if absent.
    #[arg(long, value_parser = parse_duration_ms)]
    downtime_limit: Option<f64>,
    /// QEMU's bandwidth cap in bytes/s (K/M/G suffix); QEMU's own setting if absent (its default,
    /// 32M, is low for a fast link).
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// Distinct page contents the destination agent keeps to expand references (e.g. 256M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    held: u64,
    /// Compression of the relayed stream on its way to the destination agent (zstd, a chunk at a
    /// time; QEMU's return path goes as it is): auto compresses while the link is slower than
    /// compressing would make it (the kernel's delivery rate of the connection against the measured
    /// zstd speed and ratio, as `perfplus migrate --compression auto`: on at 1 Gbit/s for text-like
    /// memory, off on loopback and for random pages); zstd compresses every chunk that shrinks; off
    /// never does.
    #[arg(long, default_value = "auto")]
    compression: perfplus_protocol::Compression,
    /// Print the report as one JSON object instead of a table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["pid", "vm", "qmp"])))]
struct TrackArgs {
    /// Any process: count its write faults with eBPF (`exceptions:page_fault_user`); needs root. A
    /// KVM hypervisor's guest writes do not fault in the host: for a QEMU use --qmp, for a perfplus VM
    /// --vm (a KVM process is refused).
    #[arg(long)]
    pid: Option<u32>,
    /// A QEMU guest, through its QMP socket: QEMU measures it (`calc-dirty-rate`) once per interval
    /// (whole seconds in QEMU 7.2).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// How QEMU measures with --qmp: page-sampling hashes a sample of pages at both ends of the
    /// interval and counts those whose content changed (what Perf+ sends again); dirty-bitmap counts
    /// the pages KVM's dirty log reports (what plain QEMU pre-copy sends again: under some KVM flavours
    /// it includes pages the guest only read).
    #[arg(long, default_value = "page-sampling", requires = "qmp")]
    qmp_mode: perfplus::cli::track::QemuDirtyMode,
    /// A VM the agent hosts: the agent measures it with its dirty log, plus eBPF dirty-ring heat.
    #[arg(long)]
    vm: Option<String>,
    /// The agent that hosts `--vm`.
    #[arg(long, default_value = "127.0.0.1:7001")]
    agent: String,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long)]
    seconds: Option<f64>,
    /// Length of one interval (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration_ms)]
    interval: f64,
    /// Migration link to judge convergence against (e.g. 1gbit, 10gbit, 100mbit).
    #[arg(long, default_value = "1gbit", value_parser = perfplus::cli::track::parse_link)]
    link: f64,
    /// One JSON object per interval instead of lines.
    #[arg(long)]
    json: bool,
}

/// The built-in guest's workload when `--workload` names none: every kind of content, so that a
/// report shows every kind of skip.
const DEFAULT_WORKLOAD: &str = "working-set=64M rate=10k mix=unique:40,dup:30,zero:10,same:20";

fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Agent(args) = cli.command {
        // The agent is a service: its settings (file and flags), log and runtime are its own. A
        // --tls-dir given (flag or PERFPLUS_TLS_DIR) overrides the file's; the default does not.
        let tls_dir = (matches.value_source("tls_dir") != Some(ValueSource::DefaultValue)).then_some(cli.tls_dir);
        if let Err(err) = perfplus::service::run(args, tls_dir) {
            eprintln!("perfplus: error: {err:#}");
            std::process::exit(1);
        }
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(err) = runtime.block_on(run(cli)) {
        eprintln!("perfplus: error: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.cluster_key_file.is_some() || matches!(cli.command, Command::Keygen { .. }) {
        bail!(
            "cluster keys were replaced by TLS certificates in protocol 4: make a CA once (`perfplus ca init --dir \
             ca`), then credentials for each agent and operator (`perfplus cert issue --ca-dir ca --agent NAME --out \
             DIR`), and give the directory as --tls-dir (default /etc/perfplus)"
        );
    }
    match &cli.command {
        Command::Ca(CaCommand::Init { dir, cluster, days }) => {
            println!("{}", perfplus::cli::pki::ca_init(dir, cluster, *days)?);
            return Ok(());
        }
        Command::Cert(CertCommand::Issue {
            ca_dir,
            agent,
            operator,
            reader,
            out,
            days,
        }) => {
            let identity = match (agent, operator, reader) {
                (Some(name), _, _) => Identity::new(CertRole::Agent, name),
                (_, Some(name), _) => Identity::new(CertRole::Operator, name),
                (_, _, Some(name)) => Identity::new(CertRole::Reader, name),
                _ => bail!("name the holder: --agent NAME, --operator NAME or --reader NAME"),
            }
            .map_err(|e| anyhow::anyhow!(e))?;
            println!("{}", perfplus::cli::pki::cert_issue(ca_dir, &identity, *days, out)?);
            return Ok(());
        }
        Command::Track(TrackArgs {
            qmp: Some(qmp),
            qmp_mode,
            ..
        }) => {
            let options = track_options(match &cli.command {
                Command::Track(args) => args,
                _ => unreachable!("matched above"),
            })?;
            return perfplus::cli::track::track_qmp(qmp, *qmp_mode, options).await;
        }
        Command::Track(TrackArgs { pid: Some(pid), .. }) => {
            let options = track_options(match &cli.command {
                Command::Track(args) => args,
                _ => unreachable!("matched above"),
            })?;
            let pid = *pid;
            return tokio::task::spawn_blocking(move || perfplus::cli::track::track_pid(pid, options)).await?;
        }
        Command::GuestImage { out } => {
            std::fs::write(out, perfplus_vmm::vm::builtin_guest::IMAGE)
                .with_context(|| format!("writing the built-in guest to {}", out.display()))?;
            return Ok(());
        }
        _ => {}
    }
    // An agent reached over its control socket (`--agent unix:PATH`) needs no certificate.
    let local_agent = std::env::args().any(|arg| arg.starts_with("unix:") || arg.contains("=unix:"));
    let credentials = perfplus::cli::pki::load_for_cli(&cli.tls_dir, local_agent)?;
    match cli.command {
        Command::Keygen { .. } | Command::GuestImage { .. } | Command::Ca(_) | Command::Cert(_) => {
            unreachable!("handled above")
        }
        Command::Node(NodeCommand::Drain(args)) => perfplus::cli::drain::run(args, &credentials).await,
        Command::Track(args) => {
            let options = track_options(&args)?;
            let vm = args.vm.as_deref().expect("clap requires --pid or --vm");
            perfplus::cli::track::track_vm(&args.agent, &credentials, vm, options).await
        }
        Command::Qemu(QemuCommand::Migrate(args)) => {
            let request = perfplus_protocol::QemuMigrateRequest {
                qmp: args.qmp.display().to_string(),
                to: args.to.clone(),
                destination_agent: args.to_agent.clone(),
                incoming: args.incoming.clone(),
                destination_qmp: args.destination_qmp.clone(),
                downtime_limit_ms: args.downtime_limit.map(|ms| ms.round().max(1.0) as u64),
                max_bandwidth: args.max_bandwidth,
                held_pages: args.held / perfplus_common::PAGE_SIZE as u64,
                compression: args.compression,
            };
            eprintln!(
                "migrating the QEMU at {} ({}) to {} through {} ...",
                request.qmp, args.agent, request.incoming, request.to
            );
            let report = AgentClient::connect(&args.agent, &credentials)
                .await?
                .qemu_migrate(request)
                .await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
            if !report.succeeded() {
                bail!("the QEMU migration did not complete ({})", report.status);
            }
            Ok(())
        }
        Command::Agent(_) => unreachable!("perfplus::service runs the agent"),
        Command::Vm(VmCommand::Start(args)) => {
            let (kernel, cmdline) = match (&args.kernel, &args.workload) {
                (Some(path), _) => {
                    let image = std::fs::read(path).with_context(|| format!("reading kernel {}", path.display()))?;
                    (KernelSource::Image(image), args.cmdline.clone())
                }
                (None, workload) => (
                    KernelSource::Builtin,
                    workload_cmdline(workload.as_deref().unwrap_or("dirtier"))?,
                ),
            };
            let request = VmStartRequest {
                name: args.name,
                memory_bytes: args.memory,
                vcpus: args.vcpus,
                kernel,
                cmdline,
                tracker: args.tracker,
            };
            let info = AgentClient::connect(&args.agent, &credentials)
                .await?
                .start_vm(request)
                .await?;
            print_vm(&info, args.json)
        }
        Command::Vm(VmCommand::List { agent, json }) => {
            let vms = AgentClient::connect(&agent, &credentials).await?.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else if vms.is_empty() {
                println!("no VMs on {agent}");
            } else {
                for vm in &vms {
                    println!("{:<20} {:>8} MiB  {}", vm.name, vm.memory_bytes >> 20, vm.run_state);
                }
            }
            Ok(())
        }
        Command::Vm(VmCommand::Status { name, agent, json }) => {
            let info = AgentClient::connect(&agent, &credentials).await?.status(&name).await?;
            print_vm(&info, json)
        }
        Command::Vm(VmCommand::Console {
            name,
            agent,
            no_follow,
            raw,
        }) => perfplus::cli::console::console(&agent, &credentials, &name, !no_follow, raw).await,
        Command::Vm(VmCommand::Stop { name, agent }) => {
            AgentClient::connect(&agent, &credentials).await?.stop(&name).await?;
            println!("stopped {name} on {agent}");
            Ok(())
        }
        Command::Vm(VmCommand::Resume { name, agent }) => {
            let info = AgentClient::connect(&agent, &credentials)
                .await?
                .resume_vm(&name)
                .await?;
            println!("{name} on {agent}: {}", info.run_state);
            Ok(())
        }
        Command::Migrate(args) => {
            if let (Some(id), Some(agent)) = (&args.cancel, &args.agent) {
                let what_happened = AgentClient::connect(agent, &credentials).await?.cancel(id).await?;
                println!("migration {id} cancelled on {agent}: {what_happened}");
                return Ok(());
            }
            let from = args.from.clone().unwrap_or_default();
            let client = AgentClient::connect(&from, &credentials).await?;
            let report = if let Some(id) = &args.resume {
                eprintln!("resuming migration {id} on {from} ...");
                client.resume(id).await?
            } else {
                let (name, to) = (
                    args.name.clone().unwrap_or_default(),
                    args.to.clone().unwrap_or_default(),
                );
                let request = MigrateRequest {
                    vm: name.clone(),
                    destination: to.clone(),
                    destination_agent: args.to_agent.clone(),
                    options: MigrateOptions {
                        downtime_target_ms: args.downtime_target,
                        max_rounds: args.max_rounds,
                        hashing: !args.no_hashing,
                        verify_guest: !args.no_verify,
                        hot_last: args.order == "hot-last",
                        mode: args.mode,
                        tracker: args.tracker,
                        postcopy_timeout_ms: args.postcopy_timeout.round().max(1.0) as u64,
                        compression: args.compression,
                    },
                };
                eprintln!("migrating {name} from {from} to {to} ({}) ...", args.mode.name());
                client
                    .migrate(request, |round| {
                        eprintln!("  {}", perfplus::report::render::progress_line(round))
                    })
                    .await?
            };
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", perfplus::report::render::table(&report));
            }
            if report.outcome != Outcome::Completed {
                let runs = match report.outcome {
                    Outcome::PostcopyBroken => "the guest runs nowhere".to_string(),
                    _ => format!(
                        "the guest runs on {}, its paused copy stays on {}",
                        report.destination, report.source
                    ),
                };
                bail!(
                    "migration {}: {} ({runs})",
                    report.outcome.name(),
                    report.outcome_detail.as_deref().unwrap_or("no detail"),
                );
            }
            Ok(())
        }
    }
}

fn track_options(args: &TrackArgs) -> anyhow::Result<perfplus::cli::track::TrackOptions> {
    let duration = match args.seconds {
        Some(s) if !(s > 0.0 && s.is_finite()) => bail!("--seconds must be positive"),
        Some(s) => Some(std::time::Duration::from_secs_f64(s)),
        None => None,
    };
    Ok(perfplus::cli::track::TrackOptions {
        interval: std::time::Duration::from_secs_f64(args.interval / 1000.0),
        duration,
        json: args.json,
        link_bits_per_s: args.link,
    })
}

fn print_vm(info: &VmInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    println!(
        "{}: {} ({} MiB, {} vCPU)",
        info.name,
        info.run_state,
        info.memory_bytes >> 20,
        info.vcpus
    );
    if let Some(note) = &info.note {
        println!("  note: {note}");
    }
    println!("  cmdline: {}", info.cmdline);
    if let Some(g) = &info.guest {
        println!(
            "  guest: state {} written {} verified {} sweeps {} mismatches {} max stall {}",
            g.state,
            g.pages_written,
            g.pages_verified,
            g.verify_sweeps,
            g.mismatches,
            g.max_stall_ms().map_or("?".into(), |ms| format!("{ms:.2} ms"))
        );
    }
    if !info.console_tail.is_empty() {
        println!("  console:");
        for line in info.console_tail.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// `dirtier[:k=v,k=v,...]` → the built-in guest's command line (`k=v k=v`). Values of `mix` contain
/// commas themselves, so a part without `=` continues the previous value.
fn workload_cmdline(spec: &str) -> anyhow::Result<String> {
    let (kind, params) = spec.split_once(':').unwrap_or((spec, ""));
    if kind != "dirtier" {
        bail!("unknown workload {kind:?}: the built-in guest offers `dirtier`");
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in params.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => {
                const KNOWN: [&str; 7] = ["working-set", "rate", "mix", "hot", "seed", "hostile", "progress"];
                if !KNOWN.contains(&k) {
                    bail!("unknown workload parameter {k:?} (known: {})", KNOWN.join(", "));
                }
                pairs.push((k.to_string(), v.to_string()));
            }
            None => match pairs.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(part);
                }
                None => bail!("workload parameter {part:?} is not key=value"),
            },
        }
    }
    let mut cmdline: Vec<String> = DEFAULT_WORKLOAD
        .split(' ')
        .filter(|d| !pairs.iter().any(|(k, _)| d.starts_with(&format!("{k}="))))
        .map(str::to_string)
        .collect();
    cmdline.extend(pairs.into_iter().map(|(k, v)| format!("{k}={v}")));
    Ok(cmdline.join(" "))
}

/// A duration option that must be positive: `30ms`, `0.5s`, `30` (milliseconds) → milliseconds.
fn parse_duration_ms(text: &str) -> Result<f64, String> {
    match perfplus::cli::parse_ms(text)? {
        0.0 => Err(format!("{:?}: the duration must be positive", text.trim())),
        ms => Ok(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30ms"), Ok(30.0));
        assert_eq!(parse_duration_ms("0.5s"), Ok(500.0));
        assert!(parse_duration_ms("-1ms").is_err());
    }

    #[test]
    fn workload_specs_become_guest_command_lines() {
        assert_eq!(workload_cmdline("dirtier").unwrap(), DEFAULT_WORKLOAD);
        assert_eq!(
            workload_cmdline("dirtier:working-set=256M,rate=20k,mix=unique:10,dup:80,zero:10,same:0").unwrap(),
            "working-set=256M rate=20k mix=unique:10,dup:80,zero:10,same:0"
        );
        assert_eq!(
            workload_cmdline("dirtier:rate=1k,progress=off").unwrap(),
            "working-set=64M mix=unique:40,dup:30,zero:10,same:20 rate=1k progress=off"
        );
        assert!(workload_cmdline("dirtier:speed=3")
            .unwrap_err()
            .to_string()
            .contains("unknown workload parameter"));
        assert!(workload_cmdline("linux").is_err());
    }
}
