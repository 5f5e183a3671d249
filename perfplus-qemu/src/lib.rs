//! Perf+ for QEMU's own live migration.
//!
//! A source QEMU migrates to its local perfplus agent instead of straight to the destination QEMU;
//! the agent parses the stream ([`stream`]), drops the pages the destination already has at that
//! address, sends pages the destination agent holds elsewhere as references, and passes everything
//! else through ([`relay::source`]); the destination agent expands the references, checks them
//! against their keyed digests and feeds a valid QEMU stream to the destination QEMU
//! ([`relay::destination`]). [`qmp`] drives QEMU (version check, capabilities, `migrate`,
//! `query-migrate`).
//!
//! This crate knows nothing of perfplus's own VMM, wire protocol or agent: the relay is generic over
//! tokio's `AsyncRead`/`AsyncWrite`, and the keyed digest is a trait ([`digest::PageDigester`]) the
//! agent implements with its own hasher.

pub mod digest;
pub mod qmp;
pub mod relay;
pub mod stream;
