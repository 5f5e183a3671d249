//! The perfplus wire protocol: CLI ⇄ agent (control) and agent ⇄ agent (migration), over TLS 1.3
//! on TCP.
//!
//! Layers, each knowing nothing of the ones above it:
//! - [`tls`] (`tls/`): the cluster CA and certificates ([`tls::pki`]), the identity a certificate
//!   carries ([`Identity`]: a [`CertRole`] and a name), one side's [`Credentials`] and the rustls
//!   configurations and verifiers built from them.
//! - [`handshake`] (`handshake.rs`): the perfplus handshake inside TLS (versions, role) as a state
//!   machine without I/O, and the bytes of its Hello. Knows nothing of frames or sockets.
//! - [`frame`] (`frame/`): one frame ⇄ bytes, no sockets. `header.rs`: the table of frame types and
//!   their payload limits, the 8-byte header; `codec.rs`: every [`Message`] ⇄ its payload, and the
//!   handshake's Hello wrapped in its frame; `page_batch.rs`: the `Pages` payload
//!   ([`PageBatch`](frame::PageBatch)); `compression.rs`: the compressed `PagesZstd` and
//!   `QemuStreamZstd` payloads, the rule that decides when to send them, and the split of a page
//!   batch into its incompressible pages (raw) and the rest.
//! - [`connection`] (`connection.rs`): TLS on a tokio TCP stream, buffered into frames; it runs the
//!   TLS handshake and the perfplus handshake when it opens, checks who the peer is, then moves
//!   [`Message`]s.
//! - [`local`] (`local.rs`): the same connection over an agent's unix control socket, for the operators
//!   of its host: no TLS, the peer known from the kernel (`SO_PEERCRED`), control requests only.
//! - [`cluster_key`]: the cluster's page-digest secret (agents only; authenticates nothing).
//! - the migration engine and the agent apply [`Message`]s; they never see bytes.
//!
//! What the layers carry: [`message`] (`message.rs`: [`Message`] and its payload types) and
//! [`report`] (`report.rs`: the migration report and its rounds).
//!
//! ## Opening a connection (both roles)
//! ```text
//! A (initiator)                                  B (responder)
//! |== TLS 1.3 handshake, ALPN "perfplus" ========|  both present a certificate; each checks the other's
//! |                                              |  chain to the cluster CA, valid now (no resumption,
//! |                                              |  no early data, no SNI)
//! |   A: B's certificate is an agent's (for Peer: the agent asked for, one A's allow-list admits)
//! |-- Hello{"PERFPLUS", min..=max, role} ------->|  B: a Peer connection only from an agent's certificate
//! |<-- Hello{"PERFPLUS", min..=max, role} -------|  both check the version ranges overlap; B echoes the role
//! ```
//! The agreed version is the highest in both ranges; from version 4 on the Hello layout never changes.
//! Everything from the Hello on travels in TLS records (AES-128-GCM preferred) bound to that handshake:
//! a record altered, replayed, reordered or injected on the way fails authentication and ends the
//! connection; nothing of it is used. Who the peer is comes from its certificate's identity
//! (`perfplus:<agent|operator|reader>:<name>`), never from the Hello. The whole opening is time-limited
//! (10 s); until the Hello is exchanged only the Hello and a short `Error` frame are admitted. A
//! refusal says why: a TLS alert (certificate of another cluster, expired, not an agent's) or an `Error`
//! frame (versions, role). A peer that speaks the clear protocol of versions 1 to 3 gets one clear
//! `Error` frame telling it to upgrade.
//!
//! What a certificate may ask on a control connection ([`Message::control_access`]): `VmList`,
//! `VmStatus` and `VmConsole` any certificate of the cluster (reading the console is reading: `VmStatus`
//! has always carried its last 64 KiB); every other request only an operator's.
//!
//! ## Migration (source agent → destination agent, role Peer)
//! ```text
//! source                                        destination
//! |-- MigrateBegin{vm, memory, vcpus, options,    |  creates an empty VM (not running)
//! |     migration id, attach secret} ------------->|
//! |<-- MigrateReady{held digest prefixes} --------|  what its content index holds
//! |   round r = 1 (every page), 2, 3 … while the guest runs:
//! |-- Pages{Full|Zero|Ref …} ×N ----------------->|  writes pages, resolves references
//! |-- RoundEnd{r} ------------------------------->|
//! |<-- RoundAck{r, missing refs} -----------------|  source re-sends the missing pages in full
//! |   final round (source guest paused):
//! |-- Pages … RoundEnd … RoundAck (no missing) -->|
//! |-- VmState{vcpu + device state} -------------->|  restores the guest, keeps it paused
//! |<-- Restored ---------------------------------|  ready to run it; the source still owns the guest
//! |-- Commit ------------------------------------>|  the guest is the destination's from here on
//! |<-- Running ----------------------------------|  the destination runs it
//! |<-- GroupChecksums{per 64 pages at resume} ----|  source compares with its own (version 7)
//! |-- PageChecksumsWanted{groups} (only if any -->|  differs: then the lost pages are counted
//! |<-- GuestCheck{self-check after the resume} ---|
//! |<-- PageChecksums{xxh3 of those groups' pages}-|  (answer to PageChecksumsWanted)
//! |-- Complete{report} --------------------------->|
//! ```
//! An `Error` frame may come from either side at any time and ends the migration with its message.
//!
//! ## Who owns the guest: the switch-over (version 2)
//! One side owns the guest at every instant, and only the owner may run it. `Commit` is the one message
//! that moves ownership, and the destination never runs the guest before it has it.
//! ```text
//!  source                                          destination
//!  Owner (guest running, then paused)              Preparing (empty VM, pages arrive)
//!    │ any failure: resume the guest here            │ any failure: destroy the VM (it never ran)
//!    │── VmState ─────────────────────────────────►  Restored (vCPU state loaded, paused)
//!    │ ◄──────────────────────────────── Restored ───│ no Commit within the peer timeout, or the
//!    │                                                │ connection lost: destroy the VM
//!  Committed ── Commit ───────────────────────────►  Owner: start the guest
//!    │ never resumes its copy by itself              │── Running ──► (lost: the guest still runs here)
//!    │ Running arrives: Handed over                  │
//!    │ no Running (pre-copy): keeps its paused copy,  │
//!    │   fails with "committed, not confirmed"       │
//!    │ no Running (post-copy): serves pages anyway    │
//! ```
//! A source that lost the link after `Commit` cannot know whether the destination runs the guest, so it
//! keeps its copy paused (never two running copies); `perfplus vm resume` lets an operator who knows that
//! the destination does not run it take it back.
//!
//! ## Post-copy and hybrid (`MigrateOptions::mode`)
//! Two connections: the one above (*bulk*: rounds, the switch, the background push, acks, the end) and
//! a *demand* channel the source opens right after `MigrateReady` (`PostcopyAttach{id, Demand, secret}`
//! as its first message), so that a faulting vCPU never waits behind bulk traffic. The destination
//! attaches a connection only if it comes from the agent that sent the `MigrateBegin` and presents that
//! migration's secret (the id alone, shown in `vm status` and reports, is no credential).
//! ```text
//! source                                        destination
//! |   hybrid: pre-copy rounds as above while the dirty set shrinks; postcopy: none
//! |   (guest paused)
//! |-- PostcopyBegin{bitmap of pages missing} ---->|  drops those pages, registers RAM with userfaultfd
//! |-- Pages{status page …} (eager) -------------->|
//! |-- VmState ----------------------------------->|  restores (paused)
//! |<-- Restored ---------------------------------|
//! |-- Commit ------------------------------------>|  starts the guest: faults on missing pages
//! |<-- Running ----------------------------------|
//! |<== PageRequest{pages} ======================= |  demand channel: a fault (or an unresolvable Ref)
//! |=== Pages{requested pages} ==================> |  demand channel
//! |-- Pages{pushed pages, address order} -------->|  bulk: every missing page, paced under the link
//! |<-- PushAck{bytes applied, pages present} -----|  rate; a page crosses at most once
//! |<== Ping ==> (both ways, every 250 ms, demand channel; silence for 2 s = link lost)
//! |<-- AllPresent --------------------------------|  only now may the source release the guest's memory
//! |<-- GroupChecksums (as installed), then as above
//! |<-- GuestCheck --------------------------------|
//! |-- Complete{report} -------------------------->|
//! ```
//! After `Running` neither side holds the whole guest. A lost connection ends nothing: the destination's
//! vCPUs wait on their faults, the source keeps every page and reconnects with back-off (or at once on
//! `MigrateResume{id}` from a CLI): new bulk connection `PostcopyAttach{id, Bulk, secret}` ⇒ `ResumeState{bitmap
//! of pages still missing}`, then a new demand connection; outstanding requests are sent again.
//!
//! A link that stays down (version 3): after `MigrateOptions::postcopy_timeout_ms` without one, or on an
//! operator's `MigrateCancel{id}`, each side ends its half on its own, and never by letting a missing
//! page read as zeros (the destination keeps its userfaultfd registration until every page is present):
//! ```text
//!  source (guest paused, every page kept)        destination (guest running, pages missing)
//!    │ link down: reconnect with back-off            │ link down: vCPUs wait on their faults;
//!    │                                               │   status "waiting for pages from A since T"
//!    │ limit passed, or MigrateCancel:               │ limit passed, or the source's Error:
//!    │   ends `postcopy-broken`: Error to the peer,  │   Stalled: the guest is paused (vCPUs park;
//!    │   its copy stays paused here (stale since     │   one blocked on a page stays blocked), and
//!    │   the switch; `vm resume` if B is gone)       │   resumes if the source reconnects
//!    │                                               │ MigrateCancel: the incomplete copy is destroyed
//! ```
//! Neither side runs the guest after the source gives up: an operator chooses (cancel on the
//! destination, `vm resume` of the stale copy on the source).
//!
//! ## Relaying a QEMU migration (`perfplus qemu migrate`)
//! The CLI asks the source host's agent (`QemuMigrate{qmp, to, incoming, compression, …}`, role
//! Control, operator);
//! that agent runs the source half of the relay next to the source QEMU and answers
//! `QemuMigrateDone{report as JSON}` (or `Error`). Between the agents (role Peer) the bytes are
//! `perfplus_qemu`'s relay dialect (QEMU's stream with dropped pages left out and held ones as
//! references), chunked into `QemuStream` frames; the destination agent feeds the destination QEMU.
//! From version 6 the source agent may send a chunk as `QemuStreamZstd` instead (zstd, as
//! `QemuMigrateRequest::compression` asks, by the rule page batches follow: while the link is slower
//! than compressing would make it); it decodes to the same `QemuStream`. The return path travels as
//! it is.
//! ```text
//! source agent                                   destination agent
//! |-- QemuRelayBegin{incoming, qmp, held_pages} -->|  checks QEMU 7.2 (if qmp), connects to incoming
//! |<-- MigrateReady{held: digest prefixes} --------|  what its host holds (page store, hosted VMs)
//! |== QemuStream{relay dialect} … QemuStream{} ==> |  expands references (re-hashed), feeds QEMU;
//! |     (a chunk may be QemuStreamZstd instead)     |  one it cannot resolve: Error, the stream stops
//! |<= QemuStream{QEMU's return path} … {} ======== |
//! |<-- QemuRelayDone{counts, QEMU's status} -------|  (or Error)
//! ```
//! References to what the destination host held are a hint like a perfplus migration's, but the
//! stream cannot be rewound: one the destination can no longer resolve (evicted, corrupt) ends the
//! relay with `Error` before QEMU gets anything more, and with QEMU's return path on (the source
//! agent turns it on) the source QEMU fails its migration and keeps running the guest.
//!
//! ## Control (CLI → agent, role Control)
//! One request, then one reply, except `Migrate`, which streams `Progress` frames and ends with
//! `MigrateDone` (or `Error`), `Track`, which streams one `TrackSample` per interval and ends
//! with `Done` (or `Error`; the CLI may also just hang up), and `VmConsole`:
//! ```text
//! CLI                                           agent
//! |-- VmConsole{name, follow} ------------------>|
//! |<-- ConsoleOutput{lost, bytes ≤ 64 KiB} ------|  what it keeps of the console (the last 64 KiB)
//! |<-- ConsoleOutput … (as the guest writes) ----|  following: new output as it comes; `lost` counts
//! |<-- Done -------------------------------------|  bytes it no longer had; Done: not following, or
//! |                                              |  the VM left (stopped, migrated away)
//! ```
//! The CLI may hang up at any time. The bytes are the guest's, unfiltered: a CLI escapes control
//! characters before a terminal sees them.

pub mod cluster_key;
pub mod connection;
pub mod frame;
pub mod handshake;
pub mod local;
pub mod message;
pub mod report;
pub mod tls;

pub use cluster_key::ClusterKey;
pub use handshake::Role;
pub use message::*;
pub use tls::{CertRole, Credentials, Identity};

/// Protocol version this build speaks. A peer whose range does not include it is refused.
/// 2: the switch-over commits (`Restored`, `Commit`) before the destination runs the guest.
/// 3: post-copy has a time limit for a lost link (`MigrateOptions::postcopy_timeout_ms`) and can be
/// cancelled (`MigrateCancel`).
/// 4: every connection is TLS 1.3 with certificates of a cluster CA (the cluster-key proof is gone);
/// post-copy connections attach with the migration's secret (`MigrateBegin::attach_secret`).
/// 5: page batches may travel compressed (`PagesZstd`), as `MigrateOptions::compression` asks.
/// 6: a relayed QEMU stream may travel compressed too (`QemuStreamZstd`), as
/// `QemuMigrateRequest::compression` asks.
/// 7: after the resume the destination sends a checksum per group of pages (`GroupChecksums`), and
/// the page checksums of a group only when the source asks (`PageChecksumsWanted`).
pub const PROTOCOL_VERSION: u16 = 7;
/// Oldest version this build still accepts (a version-3 peer speaks without TLS; version 4 does not
/// know `MigrateOptions::compression`; version 5 neither decodes `QemuStreamZstd` nor knows
/// `QemuMigrateRequest::compression`; version 6 sends every page's checksum and does not answer
/// `PageChecksumsWanted`).
pub const MIN_PROTOCOL_VERSION: u16 = 7;

/// Pages per group of [`Message::GroupChecksums`]: 64 (256 KiB of guest memory, 8 bytes of checksum).
pub const CHECKSUM_GROUP_PAGES: usize = 64;
