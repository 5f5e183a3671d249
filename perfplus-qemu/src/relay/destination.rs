//! The destination side: the relay dialect in, a valid QEMU stream out (references expanded and
//! verified, every other item as it came).

use std::collections::{HashMap, HashSet};

use tokio::io::{AsyncRead, AsyncWrite};

use super::pump::{self, RelayError};
use super::{Held, HostPages, PageTee, RelayConfig, RelayStats, Relayed};
use crate::digest::PageDigester;
use crate::stream::{self, Dialect, Digest, Item, RamBody, RamRecord, PAGE_SIZE};

/// Expands references, without I/O: items in, the bytes for QEMU out.
pub struct Expander<'d> {
    digester: &'d dyn PageDigester,
    held: Held<Box<[u8; PAGE_SIZE]>>,
    /// What the host held before this migration, for references [`Held`] cannot resolve.
    host: Option<Box<dyn HostPages + 'd>>,
    /// Copies of the pages that came whole, for this agent's page store.
    tee: Option<Box<dyn PageTee + 'd>>,
    /// With a tee: the digest of the last non-zero page written at each address.
    at_qemu: HashMap<(usize, u64), Digest>,
    stats: RelayStats,
}

impl<'d> Expander<'d> {
    pub fn new(digester: &'d dyn PageDigester, config: RelayConfig) -> Expander<'d> {
        Expander {
            digester,
            held: Held::new(config.held_pages),
            host: None,
            tee: None,
            at_qemu: HashMap::new(),
            stats: RelayStats::default(),
        }
    }

    /// References this migration's pages do not resolve are asked of `host`.
    pub fn with_host(mut self, host: Box<dyn HostPages + 'd>) -> Self {
        self.host = Some(host);
        self
    }

    /// Every page that comes whole is handed to `tee` after it is written for QEMU, and the expander
    /// remembers what QEMU got at each address ([`Expander::last_pages`]).
    pub fn with_tee(mut self, tee: Box<dyn PageTee + 'd>) -> Self {
        self.tee = Some(tee);
        self
    }

    /// Writes what QEMU gets for `item` to `out`.
    pub fn step(&mut self, item: Item, out: &mut Vec<u8>) -> Result<(), RelayError> {
        self.step_with(item, None, out)
    }

    /// [`Expander::step`] with the digest of the item's page if the caller has it already (the pump
    /// hashes the pages of a chunk together); it must be this expander's digester's.
    pub fn step_with(&mut self, item: Item, digest: Option<Digest>, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match item {
            Item::Ram(record) => return self.ram(record, digest, out),
            Item::SectionStart { .. } | Item::SectionPart { .. } | Item::SectionEnd { .. } => {
                self.stats.section(&item);
            }
            Item::Tail(ref bytes) => self.stats.tail_bytes += bytes.len() as u64,
            _ => {}
        }
        stream::write(&item, out);
        Ok(())
    }

    fn ram(&mut self, record: RamRecord, known: Option<Digest>, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let address = (record.block, record.offset);
        match record.body {
            RamBody::Page(page) => {
                let digest = known.unwrap_or_else(|| self.digester.digest(&page));
                let item = Item::Ram(RamRecord {
                    body: RamBody::Page(page),
                    ..record
                });
                stream::write(&item, out);
                if let Item::Ram(RamRecord {
                    body: RamBody::Page(page),
                    ..
                }) = item
                {
                    if let Some(tee) = self.tee.as_mut() {
                        tee.page(digest, page.clone());
                        self.at_qemu.insert(address, digest);
                    }
                    self.held.offer(digest, || page);
                }
                self.stats.counts().full += 1;
            }
            RamBody::Ref(digest) => {
                let (page, from_host) = match self.held.get(&digest) {
                    Some(page) => (page.clone(), false),
                    None => {
                        let mut page = Box::new([0u8; PAGE_SIZE]);
                        let found = self.host.as_mut().is_some_and(|host| host.fetch(&digest, &mut page));
                        if !found {
                            return Err(RelayError::MissingReference(hex(&digest)));
                        }
                        (page, true)
                    }
                };
                // Re-hash before use: what goes into the guest is what the digest names.
                if self.digester.digest(&page) != digest {
                    return Err(RelayError::DigestMismatch(hex(&digest)));
                }
                if from_host {
                    // Kept as if it had come whole: the source applies the same rule.
                    self.held.offer(digest, || page.clone());
                    self.stats.counts().host_referenced += 1;
                } else {
                    self.stats.counts().referenced += 1;
                }
                if self.tee.is_some() {
                    self.at_qemu.insert(address, digest);
                }
                let record = RamRecord {
                    body: RamBody::Page(page),
                    ..record
                };
                stream::write(&Item::Ram(record), out);
            }
            RamBody::Zero(_) => {
                if self.tee.is_some() {
                    self.at_qemu.remove(&address);
                }
                stream::write(&Item::Ram(record), out);
                self.stats.counts().zero += 1;
            }
        }
        Ok(())
    }
}

impl Expander<'_> {
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// With a tee: the distinct digests of the last non-zero page written at each address (what the
    /// destination QEMU's memory holds once the stream is complete). Empty without one.
    pub fn last_pages(&self) -> Vec<Digest> {
        let distinct: HashSet<&Digest> = self.at_qemu.values().collect();
        distinct.into_iter().copied().collect()
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Relays one migration on the destination: `link` is the connection from the source agent, `qemu`
/// the connection to the destination QEMU's `-incoming` socket. Returns when both directions are closed.
pub async fn run<L, Q>(
    link: L,
    qemu: Q,
    digester: &dyn PageDigester,
    config: RelayConfig,
) -> Result<RelayStats, RelayError>
where
    L: AsyncRead + AsyncWrite + Unpin,
    Q: AsyncRead + AsyncWrite + Unpin,
{
    Ok(run_expander(link, qemu, Expander::new(digester, config)).await?.stats)
}

/// [`run`] with an expander set up by the caller (the host's pages, a tee); the expander's tee is
/// dropped when this returns.
pub async fn run_expander<L, Q>(link: L, qemu: Q, mut expander: Expander<'_>) -> Result<Relayed, RelayError>
where
    L: AsyncRead + AsyncWrite + Unpin,
    Q: AsyncRead + AsyncWrite + Unpin,
{
    let digester = expander.digester;
    let moved = pump::run(link, qemu, Dialect::Relay, digester, |item, digest, out| {
        expander.step_with(item, digest, out)
    })
    .await?;
    expander.tee = None;
    let last_pages = expander.last_pages();
    let mut stats = expander.stats;
    stats.bytes_in = moved.forward_in;
    stats.bytes_out = moved.forward_out;
    stats.return_path_bytes = moved.backward;
    Ok(Relayed { stats, last_pages })
}
