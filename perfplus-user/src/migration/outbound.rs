//! [`Outbound`]: everything the source side of a migration needs to move one VM, handed from the agent
//! to the engine (pre-copy rounds in `source`, the post-copy supply in `postcopy::supply`).
use std::sync::Arc;

use perfplus_protocol::{AttachSecret, Credentials, MigrateOptions};
use perfplus_vmm::vm::Vm;
use tokio::sync::Notify;

use super::signals::CancelSignal;
use crate::hashing::PageHasher;

/// Shared between the agent and a migration in post-copy: wakes its reconnection loop.
pub type ResumeSignal = Arc<Notify>;

/// What the source needs to move one VM.
pub struct Outbound {
    pub vm: Arc<Vm>,
    pub vm_name: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub cmdline: String,
    pub source_name: String,
    pub destination: String,
    pub options: MigrateOptions,
    /// This agent's TLS credentials, with what the destination must be (an agent of the cluster; the
    /// one the operator named; one the allow-list admits).
    pub credentials: Credentials,
    pub hasher: PageHasher,
    /// Names the migration (post-copy attach and resume).
    pub migration_id: String,
    /// What the migration's post-copy connections present to attach (sent only in `MigrateBegin`).
    pub attach_secret: AttachSecret,
    /// Wakes a post-copy migration's reconnection loop at once (`perfplus migrate --resume`).
    pub resume: ResumeSignal,
    /// An operator's `perfplus migrate --cancel`: before the commit the guest keeps running here; in
    /// post-copy the supply stops and the migration ends `postcopy-broken`.
    pub cancel: CancelSignal,
}
