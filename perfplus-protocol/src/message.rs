//! The messages of the protocol: every frame after the handshake is one [`Message`].
use serde::{Deserialize, Serialize};

use crate::frame;
use crate::report::{MigrationReport, RoundReport};
use perfplus_vmm::tracking::TrackerKind;

/// The content of a guest to create or migrate: either the built-in workload guest or a kernel file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelSource {
    /// The workload guest embedded in the perfplus binary.
    Builtin,
    /// A multiboot (v1) ELF kernel image, as bytes.
    Image(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStartRequest {
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub kernel: KernelSource,
    /// Kernel command line. For the built-in guest: the workload parameters (see
    /// `perfplus_common::guest_abi::cmdline`); the agent appends `tsc_khz=`.
    pub cmdline: String,
    /// The dirty tracker the VM is made for (a dirty-ring VM is created in ring mode); its migrations
    /// use it unless they name another.
    pub tracker: TrackerKind,
}

/// What an agent says about one of its VMs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    /// "running", "paused", "paused (migrating)", "halted", "failed: …".
    pub run_state: String,
    /// Why the VM is in that state, when there is more to say: a post-copy migration waiting for pages
    /// ("waiting for pages from A since 12:03:04 UTC …"), a paused copy a migration left here.
    pub note: Option<String>,
    pub cmdline: String,
    /// The built-in guest's status page, when the guest publishes one.
    pub guest: Option<perfplus_vmm::vm::GuestStatus>,
    /// Last lines of the guest's serial console.
    pub console_tail: String,
}

/// Options of one migration, chosen by the CLI and carried to both agents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Largest acceptable downtime: pre-copy iterates until the remaining dirty set fits it.
    pub downtime_target_ms: f64,
    /// Pre-copy rounds at most (the first full pass included) before the final stop-and-copy.
    pub max_rounds: u32,
    /// Perf+ hashing: skip unchanged pages and send references to held content (zero pages go as
    /// markers either way).
    /// Off = plain pre-copy: every dirty page is sent in full (the baseline benchmarks compare against).
    pub hashing: bool,
    /// Wait for the guest's self-check to complete a sweep on the destination before reporting.
    pub verify_guest: bool,
    /// Send the pages of a round cold first and hot (recently rewritten) last, instead of in address order.
    pub hot_last: bool,
    /// Pre-copy, post-copy, or pre-copy that switches to post-copy when it cannot converge.
    pub mode: MigrationMode,
    /// Dirty tracker of the pre-copy rounds. In a `Migrate` request, `None` means the one the VM was
    /// started with; the source agent always fills it in `MigrateBegin`, and the destination creates
    /// the VM in the mode that tracker needs, so that the VM can migrate on with it.
    pub tracker: Option<TrackerKind>,
    /// Post-copy: how long either side waits for a lost link to come back before it gives up (the
    /// source ends the migration as `postcopy-broken`; the destination pauses the guest and waits for
    /// the source or an operator's `MigrateCancel`).
    pub postcopy_timeout_ms: u64,
    /// Compression of the full pages the source sends (version 5).
    pub compression: Compression,
}

/// Whether the source compresses the page batches it sends, or, relaying a QEMU migration, the stream
/// chunks (zstd; the destination decodes either).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// When the link is slower than compressing would make it: decided per batch from the kernel's
    /// delivery rate of the connection and the measured zstd speed and ratio. A page batch's pages
    /// that look incompressible then go raw beside it (`frame::compression`).
    #[default]
    Auto,
    /// Every batch that shrinks.
    Zstd,
    /// Never.
    Off,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::Off => "off",
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compression::Auto),
            "zstd" | "on" => Ok(Compression::Zstd),
            "off" | "none" => Ok(Compression::Off),
            other => Err(format!("unknown compression {other:?}: use auto, zstd or off")),
        }
    }
}

impl Compression {
    /// The connection's mode for this choice.
    pub fn mode(self) -> crate::frame::CompressionMode {
        match self {
            Compression::Auto => crate::frame::CompressionMode::Adaptive,
            Compression::Zstd => crate::frame::CompressionMode::Always,
            Compression::Off => crate::frame::CompressionMode::Off,
        }
    }
}

/// Default of [`MigrateOptions::postcopy_timeout_ms`]: a minute.
pub const DEFAULT_POSTCOPY_TIMEOUT_MS: u64 = 60_000;

/// How a migration moves memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Rounds while the guest runs, then stop-and-copy.
    Precopy,
    /// Pause, move the vCPU state, resume on the destination at once; memory follows on demand and by
    /// background push.
    Postcopy,
    /// Pre-copy rounds while they make progress, then post-copy if they cannot converge.
    #[default]
    Hybrid,
}

impl MigrationMode {
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" | "pre-copy" => Ok(MigrationMode::Precopy),
            "postcopy" | "post-copy" => Ok(MigrationMode::Postcopy),
            "hybrid" => Ok(MigrationMode::Hybrid),
            other => Err(format!("unknown mode {other:?}: use precopy, postcopy or hybrid")),
        }
    }
}

/// Which connection of a post-copy migration a `PostcopyAttach` opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// A new bulk connection after the old one was lost (a resume).
    Bulk,
    /// The demand channel (page requests and their answers, keepalives).
    Demand,
}

/// First message of a connection that joins post-copy migration `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyAttach {
    pub id: String,
    pub channel: Channel,
    /// The migration's [`MigrateBegin::attach_secret`]: the id alone (shown in `vm status`, logs and
    /// reports) does not let a connection join a migration.
    pub secret: AttachSecret,
}

/// A per-migration secret, drawn by the source for each migration and sent only inside its (TLS)
/// `MigrateBegin`; a post-copy connection must present it to attach.
pub type AttachSecret = [u8; 32];

/// `perfplus qemu migrate` to the source host's agent: migrate the QEMU behind `qmp` (on that host)
/// to the QEMU waiting at `incoming` on the host of agent `to`, through both agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuMigrateRequest {
    /// The source QEMU's QMP socket on the source agent's host.
    pub qmp: String,
    /// The destination agent (host:port).
    pub to: String,
    /// The agent the destination must be (its certificate's name), if the operator names one.
    pub destination_agent: Option<String>,
    /// The destination QEMU's `-incoming` address and QMP socket on the destination host.
    pub incoming: String,
    pub destination_qmp: Option<String>,
    /// QEMU's `downtime-limit` (ms) and `max-bandwidth` (bytes/s), when the operator sets them.
    pub downtime_limit_ms: Option<u64>,
    pub max_bandwidth: Option<u64>,
    /// Distinct pages the destination agent keeps to expand references.
    pub held_pages: u64,
    /// Compression of the relayed stream on its way to the destination agent (version 6): chunks go
    /// as `QemuStreamZstd` as this says (the return path goes as it is).
    pub compression: Compression,
}

/// First message of a peer connection that relays a QEMU migration stream (`perfplus qemu migrate`):
/// where the destination agent feeds it, and how many pages it must hold for references. Answered
/// with `MigrateReady{held}` (the digest prefixes the destination host holds, as for a perfplus
/// migration) or `Error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuRelayBegin {
    /// The destination QEMU's `-incoming` address on the destination host: `unix:PATH` or `tcp:HOST:PORT`.
    pub incoming: String,
    /// The destination QEMU's QMP socket, if the agent should check its version and report its status.
    pub qmp: Option<String>,
    /// Distinct pages the destination agent keeps to expand references (both sides apply one rule).
    pub held_pages: u64,
}

/// The destination agent's last word on a relayed QEMU migration: what it wrote into the destination
/// QEMU's stream and what that QEMU says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuRelayDone {
    /// Pages written into the stream as they came, and expanded from references to pages of this
    /// migration (re-hashed first).
    pub pages_full: u64,
    pub pages_expanded: u64,
    pub zero_records: u64,
    /// Bytes of the relay stream received, and of the QEMU stream written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The destination QEMU's `query-migrate` status and `query-status` run state, with `qmp` given.
    pub qemu_migration_status: Option<String>,
    pub qemu_run_state: Option<String>,
    /// Pages expanded from references to what the destination host held before the migration (its
    /// page store, its VMs; re-hashed first).
    pub pages_expanded_host: u64,
    /// Pages the destination agent put into its page store once the stream was written whole, and
    /// pages its archive skipped (it never slows the relay).
    pub pages_archived: u64,
    pub archive_skipped: u64,
}

/// Largest `QemuStream` chunk.
pub const QEMU_STREAM_CHUNK_MAX: usize = 1 << 20;

/// Longest migration id accepted.
pub const MIGRATION_ID_MAX: usize = 64;

/// What the destination measured of the post-copy phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Guest (or agent) faults that needed a page from the source.
    pub demand_faults: u64,
    /// Faults resolved locally (pages known to be zero).
    pub local_faults: u64,
    /// Fault to page installed, for the faults that went to the source, in microseconds.
    pub fault_latency_us: crate::report::Latency,
    /// From the resume until every page was present.
    pub postcopy_ms: f64,
    /// Times the migration resumed after a lost connection.
    pub reconnects: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_target_ms: 30.0,
            max_rounds: 30,
            hashing: true,
            verify_guest: true,
            hot_last: true,
            mode: MigrationMode::Hybrid,
            tracker: None,
            postcopy_timeout_ms: DEFAULT_POSTCOPY_TIMEOUT_MS,
            compression: Compression::Auto,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub vm: String,
    /// The destination agent's address (host:port).
    pub destination: String,
    /// The agent the destination must be (its certificate's name), if the operator named one
    /// (`perfplus migrate --to-agent`); otherwise any agent of the cluster the source may migrate to.
    pub destination_agent: Option<String>,
    pub options: MigrateOptions,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateBegin {
    pub vm: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub cmdline: String,
    pub options: MigrateOptions,
    /// Names this migration for post-copy attach and resume (empty: pre-copy only).
    pub migration_id: String,
    /// What a post-copy connection of this migration must present ([`PostcopyAttach::secret`]).
    pub attach_secret: AttachSecret,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReady {
    /// First 8 bytes (little-endian) of every page digest the destination's content index holds.
    /// A hint: a reference to a digest the destination turns out not to hold is answered in
    /// `RoundAck::missing` and sent again in full.
    pub held: Vec<u64>,
}

/// What the destination saw of the guest's own self-check after resuming it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestCheck {
    /// Status page read right after the resume (None: the guest publishes none).
    pub at_resume: Option<perfplus_vmm::vm::GuestStatus>,
    /// Status page once the guest completed a full verification sweep after the resume (or the wait
    /// timed out).
    pub after: Option<perfplus_vmm::vm::GuestStatus>,
    /// A full sweep completed after the resume and found no mismatch.
    pub verified: bool,
    /// CPU time the destination agent spent on this migration.
    pub cpu_ms: f64,
    /// Pages the destination resolved from its content index, by where it found them.
    pub held_from_store: u64,
    pub held_from_hosted_vms: u64,
    pub held_from_this_migration: u64,
    /// Post-copy measurements (None for a pre-copy migration).
    pub postcopy: Option<PostcopyStats>,
}

/// `perfplus track --vm`: measure how a hosted VM writes its memory, interval by interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackRequest {
    pub vm: String,
    /// Length of one interval.
    pub interval_ms: u32,
    /// Intervals to measure (0: until the CLI hangs up).
    pub intervals: u32,
    /// Also attach the eBPF dirty-ring program (write heat per page, when the VM uses the dirty ring).
    pub ebpf: bool,
}

/// `perfplus vm console`: stream a VM's serial console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleRequest {
    pub name: String,
    /// Keep streaming new output until the CLI hangs up or the VM leaves; false: only what the agent
    /// keeps (the last 64 KiB), then `Done`.
    pub follow: bool,
}

/// Guest console output, raw bytes as the guest wrote them (the CLI escapes them for a terminal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleOutput {
    /// Bytes the guest wrote before these that the agent no longer kept (the CLI fell behind by more
    /// than the agent keeps).
    pub lost: u64,
    /// At most [`frame::CONSOLE_CHUNK_MAX`] bytes.
    pub bytes: Vec<u8>,
}

/// A range of guest memory and the writes seen in it during one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackRegion {
    /// Guest-physical address of the region's first byte.
    pub start: u64,
    /// Distinct pages written in the region.
    pub pages: u64,
    /// Write events in the region (the dirty log sees at most one per page and interval).
    pub writes: u64,
}

/// One interval of `perfplus track --vm`, measured by the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackSample {
    /// 1, 2, 3, ...
    pub interval: u32,
    /// Seconds since tracking started, at the end of this interval.
    pub elapsed_s: f64,
    /// Measured length of this interval, in seconds.
    pub interval_s: f64,
    /// "dirty-log" (KVM's dirty bitmap, exact) or "ebpf" (dirty-ring pushes only).
    pub source: String,
    /// Distinct pages the source reported written in the interval.
    pub dirty_pages: u64,
    /// Hottest 2 MiB regions, hottest first.
    pub hottest: Vec<TrackRegion>,
    /// Pages pushed to the VM's dirty rings in the interval (None: eBPF not attached).
    pub ebpf_events: Option<u64>,
    /// Distinct pages the eBPF program saw in the interval.
    pub ebpf_pages: Option<u64>,
    /// The guest's own `pages_written` counter advanced by this much (built-in guest only).
    pub guest_pages_written: Option<u64>,
    /// Why eBPF heat is missing, or anything else the operator should know.
    pub note: Option<String>,
}

/// Every message after the handshake.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    // ---- control: CLI → agent, and the agent's replies
    VmStart(VmStartRequest),
    VmList,
    VmStatus {
        name: String,
    },
    VmStop {
        name: String,
    },
    /// Resume a paused VM (e.g. one kept paused after a migration that failed past its commit);
    /// answered with `Vm`.
    VmResume {
        name: String,
    },
    Migrate(MigrateRequest),
    /// Resume post-copy migration `id` now (after a lost connection); streams like `Migrate`.
    MigrateResume {
        id: String,
    },
    /// Give up migration `id` (outgoing or incoming post-copy) on the agent it is sent to; answered
    /// with `Cancelled` (an `Error` if there is no such migration here).
    MigrateCancel {
        id: String,
    },
    /// Reply to `MigrateCancel`: what became of the guest.
    Cancelled {
        what_happened: String,
    },
    /// Reply to VmStart / VmStatus.
    Vm(VmInfo),
    /// Reply to VmList.
    Vms(Vec<VmInfo>),
    /// Reply to VmStop.
    Done,
    /// One finished round of a migration the CLI asked for.
    Progress(RoundReport),
    /// The migration the CLI asked for completed.
    MigrateDone(Box<MigrationReport>),
    /// Stream a VM's serial console; answered by `ConsoleOutput`s, then `Done` (not following, or
    /// the VM left) or `Error`.
    VmConsole(ConsoleRequest),
    /// Console output of the VM a `VmConsole` named.
    ConsoleOutput(ConsoleOutput),
    /// Measure a VM's writes (`perfplus track --vm`); answered by `TrackSample`s, then `Done`.
    Track(TrackRequest),
    /// One measured interval of a `Track`.
    TrackSample(Box<TrackSample>),

    // ---- migration: source agent → destination agent, and replies
    MigrateBegin(MigrateBegin),
    MigrateReady(MigrateReady),
    Pages(frame::PageBatch),
    RoundEnd {
        round: u32,
    },
    RoundAck {
        round: u32,
        missing: Vec<u64>,
    },
    /// `postcard` encoding of [`perfplus_vmm::vm::VmState`].
    VmState(Vec<u8>),
    /// The destination restored the vCPU and device state and holds the guest paused, ready to run it.
    /// The source still owns the guest.
    Restored,
    /// The source hands the guest over: from now on it never resumes its own copy by itself.
    Commit,
    /// The destination runs the guest (after `Commit`; sent first, so that the source can time the
    /// downtime).
    Running,
    /// The xxh3-64 of destination pages as they were at resume: of every page `i` in order, or (the
    /// answer to [`PageChecksumsWanted`](Message::PageChecksumsWanted)) of the pages of the groups
    /// asked for, group after group in the order asked.
    PageChecksums {
        checksums: Vec<u64>,
    },
    /// What the destination sends after the resume (version 7): `checksums[g]` is the checksum of
    /// group `g`, the [`CHECKSUM_GROUP_PAGES`] pages from `g × CHECKSUM_GROUP_PAGES` (the last group
    /// may be shorter): the xxh3-64 of their page checksums, little-endian, one after the other
    /// (`perfplus::hashing::group_checksum`). 32 KiB a GiB of guest memory instead of 2 MiB.
    GroupChecksums {
        checksums: Vec<u64>,
    },
    /// The source's answer to a group whose checksum differs from its own: the page checksums of these
    /// groups, please (each below the number of groups, none twice), so that it can count the lost
    /// pages exactly. The destination answers with [`PageChecksums`](Message::PageChecksums).
    PageChecksumsWanted {
        groups: Vec<u64>,
    },
    /// The guest's self-check on the destination after the resume.
    GuestCheck(Box<GuestCheck>),
    /// The source's final word: the report, so that the destination can log it too.
    Complete(Box<MigrationReport>),
    /// Post-copy switch: bitmap (bit `i % 64` of word `i / 64`) of the pages the destination lacks.
    PostcopyBegin {
        missing: Vec<u64>,
    },
    /// First message of a post-copy connection that is not the one `MigrateBegin` opened.
    PostcopyAttach(PostcopyAttach),
    /// Destination → source on the demand channel: pages faults wait for. `full`: pages whose `Ref`
    /// could not be resolved, to be sent in full.
    PageRequest {
        full: bool,
        pages: Vec<u64>,
    },
    /// Destination → source on the bulk channel: payload bytes of pushed page batches applied on this
    /// connection so far, and pages present in all.
    PushAck {
        bytes: u64,
        present: u64,
    },
    /// Every page is present on the destination.
    AllPresent,
    /// Answer to a resumed bulk connection: bitmap of the pages still missing.
    ResumeState {
        missing: Vec<u64>,
    },
    /// Keepalive on the demand channel.
    Ping,

    // ---- relaying a QEMU migration (`perfplus qemu migrate` → destination agent)
    QemuRelayBegin(QemuRelayBegin),
    /// Bytes of the relay stream (source → destination) or of QEMU's return path (destination →
    /// source); an empty one ends its direction.
    QemuStream(Vec<u8>),
    QemuRelayDone(QemuRelayDone),
    /// Control: relay a QEMU migration from this agent's host (answered by `QemuMigrateDone` or `Error`).
    QemuMigrate(QemuMigrateRequest),
    /// The report of a relayed QEMU migration, as JSON (`perfplus::qemu::report::QemuReport`).
    QemuMigrateDone {
        report_json: String,
    },

    // ---- both
    /// Ends whatever was going on; the text says what went wrong.
    Error {
        message: String,
    },
}

/// What a control request needs of the certificate of the CLI that sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading what an agent hosts: `VmList`, `VmStatus`, `VmConsole` (the console is read access:
    /// `VmStatus` already carries its last 64 KiB).
    Read,
    /// Changing it: starting, stopping, resuming, migrating, cancelling, tracking.
    Operate,
}

impl Message {
    /// What this message needs as a control request; None for a message that is not one.
    pub fn control_access(&self) -> Option<Access> {
        match self {
            Message::VmList | Message::VmStatus { .. } | Message::VmConsole(..) => Some(Access::Read),
            Message::VmStart(..)
            | Message::VmStop { .. }
            | Message::VmResume { .. }
            | Message::Migrate(..)
            | Message::MigrateResume { .. }
            | Message::MigrateCancel { .. }
            | Message::Track(..)
            | Message::QemuMigrate(..) => Some(Access::Operate),
            _ => None,
        }
    }

    /// The message's name, as the protocol documents it (`"MigrateBegin"`, `"Pages"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Message::VmStart(..) => "VmStart",
            Message::VmList => "VmList",
            Message::VmStatus { .. } => "VmStatus",
            Message::VmStop { .. } => "VmStop",
            Message::VmResume { .. } => "VmResume",
            Message::Migrate(..) => "Migrate",
            Message::MigrateResume { .. } => "MigrateResume",
            Message::MigrateCancel { .. } => "MigrateCancel",
            Message::Cancelled { .. } => "Cancelled",
            Message::Vm(..) => "Vm",
            Message::Vms(..) => "Vms",
            Message::Done => "Done",
            Message::Progress(..) => "Progress",
            Message::MigrateDone(..) => "MigrateDone",
            Message::VmConsole(..) => "VmConsole",
            Message::ConsoleOutput(..) => "ConsoleOutput",
            Message::Track(..) => "Track",
            Message::TrackSample(..) => "TrackSample",
            Message::MigrateBegin(..) => "MigrateBegin",
            Message::MigrateReady(..) => "MigrateReady",
            Message::Pages(..) => "Pages",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundAck { .. } => "RoundAck",
            Message::VmState(..) => "VmState",
            Message::Restored => "Restored",
            Message::Commit => "Commit",
            Message::Running => "Running",
            Message::PageChecksums { .. } => "PageChecksums",
            Message::GroupChecksums { .. } => "GroupChecksums",
            Message::PageChecksumsWanted { .. } => "PageChecksumsWanted",
            Message::GuestCheck(..) => "GuestCheck",
            Message::Complete(..) => "Complete",
            Message::PostcopyBegin { .. } => "PostcopyBegin",
            Message::PostcopyAttach(..) => "PostcopyAttach",
            Message::PageRequest { .. } => "PageRequest",
            Message::PushAck { .. } => "PushAck",
            Message::AllPresent => "AllPresent",
            Message::ResumeState { .. } => "ResumeState",
            Message::Ping => "Ping",
            Message::QemuRelayBegin(..) => "QemuRelayBegin",
            Message::QemuStream(..) => "QemuStream",
            Message::QemuRelayDone(..) => "QemuRelayDone",
            Message::QemuMigrate(..) => "QemuMigrate",
            Message::QemuMigrateDone { .. } => "QemuMigrateDone",
            Message::Error { .. } => "Error",
        }
    }

    /// How an error names a message that came when another was expected: "an unexpected Pages
    /// message", or for an `Error` frame the peer's own words ("an error: ...").
    pub fn describe(&self) -> String {
        match self {
            Message::Error { message } => format!("an error: {message}"),
            other => format!("an unexpected {} message", other.name()),
        }
    }
}
