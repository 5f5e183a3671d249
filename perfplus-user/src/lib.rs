//! perfplus: live migration of KVM guests with Perf+ page hashing.
//!
//! The data flow, upstream to downstream (see ARCHITECTURE.md):
//! [`tracking`] (which pages changed) → [`hashing`] (what they contain, what the destination holds)
//! → [`migration`] (order, rounds, convergence) → [`protocol`] (the wire) → [`migration::receiver`]
//! (write, resolve references) → [`memory`] of the destination guest; [`report`] is fed by every stage.
//! [`vm`] is the small KVM VMM that runs guests, [`agent`] the per-host daemon that owns them.

pub mod agent;
pub mod client;
pub mod content_index;
pub mod hashing;
pub mod memory;
pub mod migration;
pub mod page_store;
pub mod protocol;
pub mod report;
pub mod track;
pub mod tracking;
pub mod vm;
