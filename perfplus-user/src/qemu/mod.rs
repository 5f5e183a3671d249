//! `perfplus qemu migrate`: Perf+ on QEMU's own live migration (the `perfplus-qemu` crate's relay,
//! carried between hosts over an authenticated perfplus connection).
//!
//! - [`outbound`]: the source half, run by the source host's agent next to the source QEMU on a
//!   CLI's `QemuMigrate`: QMP set-up and checks, the relay from QEMU's socket to the destination
//!   agent, the report;
//! - `link`: the relay's bytes as `QemuStream` frames on a [`Connection`](perfplus_protocol::connection::Connection),
//!   both ways;
//! - [`report`]: what the operator sees.
//!
//! Both halves run in agents (`agent::qemu_out`, `agent::qemu_in`): only agents hold the page secret. Digests are the agent's own
//! ([`PageHasher`] under the cluster key's page-digest key), so a relayed stream and a perfplus
//! migration agree on what a page's digest is.

pub(crate) mod held;
pub(crate) mod link;
pub mod outbound;
pub mod report;

use perfplus_qemu::digest::PageDigester;
use perfplus_qemu::stream::Digest;

use crate::hashing::PageHasher;

impl PageDigester for PageHasher {
    fn digest(&self, page: &[u8; perfplus_qemu::stream::PAGE_SIZE]) -> Digest {
        PageHasher::digest(self, page)
    }

    fn digest_many(&self, pages: &[&[u8; perfplus_qemu::stream::PAGE_SIZE]]) -> Vec<Digest> {
        PageHasher::digest_many(self, pages)
    }
}

/// A connection to a QEMU migration address (`unix:PATH` or `tcp:HOST:PORT`).
pub(crate) enum QemuSocket {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl QemuSocket {
    pub(crate) async fn connect(uri: &str) -> anyhow::Result<QemuSocket> {
        use anyhow::Context;
        if let Some(path) = uri.strip_prefix("unix:") {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("connecting to QEMU's incoming socket {path}"))?;
            Ok(QemuSocket::Unix(s))
        } else if let Some(address) = uri.strip_prefix("tcp:") {
            let s = tokio::net::TcpStream::connect(address)
                .await
                .with_context(|| format!("connecting to QEMU's incoming address {address}"))?;
            Ok(QemuSocket::Tcp(s))
        } else {
            anyhow::bail!("QEMU incoming address {uri:?}: use unix:PATH or tcp:HOST:PORT")
        }
    }
}
