//! The source side: QEMU's stream in, the relay dialect out, with the Perf+ decision per RAM record.

use std::collections::{HashMap, HashSet};

use tokio::io::{AsyncRead, AsyncWrite};

use super::pump::{self, RelayError};
use super::{digest_prefix, Held, PageTee, RelayConfig, RelayStats, Relayed};
use crate::digest::PageDigester;
use crate::stream::{self, Dialect, Digest, Item, RamBody, RamRecord, PAGE_SIZE};

/// The decision per RAM record, without I/O: items in, the bytes for the link out.
pub struct Filter<'d> {
    digester: &'d dyn PageDigester,
    /// Digest of what the destination QEMU has at (block, offset), for every page the relay passed on.
    at_destination: HashMap<(usize, u64), Digest>,
    /// What the destination agent holds of this migration (the mirror of its [`Held`]).
    held: Held<()>,
    /// Digest prefixes of what the destination host held when the migration began (its advertisement).
    host_held: HashSet<u64>,
    /// Copies of the pages that leave, for this agent's page store.
    tee: Option<Box<dyn PageTee + 'd>>,
    zero_digest: Digest,
    block_names: Vec<String>,
    /// The block of the last RAM record written to the link in this section.
    link_block: Option<usize>,
    stats: RelayStats,
}

impl<'d> Filter<'d> {
    pub fn new(digester: &'d dyn PageDigester, config: RelayConfig) -> Filter<'d> {
        Filter {
            digester,
            at_destination: HashMap::new(),
            held: Held::new(config.held_pages),
            host_held: HashSet::new(),
            tee: None,
            zero_digest: digester.digest(&[0; PAGE_SIZE]),
            block_names: Vec::new(),
            link_block: None,
            stats: RelayStats::default(),
        }
    }

    /// The destination host's advertisement: the [`digest_prefix`]es of what it holds. A page whose
    /// digest has one of them travels as a reference (a hint: the destination verifies, and a page it
    /// turns out not to hold fails the relay).
    pub fn with_host_held(mut self, prefixes: HashSet<u64>) -> Self {
        self.host_held = prefixes;
        self
    }

    /// Every non-zero page QEMU sent that is not already on its way (sent whole, or as a reference to
    /// what the destination host held) is handed to `tee`, after it is written to the link.
    pub fn with_tee(mut self, tee: Box<dyn PageTee + 'd>) -> Self {
        self.tee = Some(tee);
        self
    }

    /// Writes what the link gets for `item` to `out`.
    pub fn step(&mut self, item: Item, out: &mut Vec<u8>) -> Result<(), RelayError> {
        self.step_with(item, None, out)
    }

    /// [`Filter::step`] with the digest of the item's page if the caller has it already (the pump
    /// hashes the pages of a chunk together); it must be this filter's digester's.
    pub fn step_with(&mut self, item: Item, digest: Option<Digest>, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match item {
            Item::Ram(record) => return self.ram(record, digest, out),
            Item::SectionStart { .. } | Item::SectionPart { .. } | Item::SectionEnd { .. } => {
                self.link_block = None;
                self.stats.section(&item);
            }
            Item::RamBlock(ref block) => self.block_names.push(block.name.clone()),
            Item::Tail(ref bytes) => self.stats.tail_bytes += bytes.len() as u64,
            _ => {}
        }
        stream::write(&item, out);
        Ok(())
    }

    fn ram(&mut self, record: RamRecord, known: Option<Digest>, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let address = (record.block, record.offset);
        let (digest, body) = match record.body {
            RamBody::Zero(fill) => {
                let digest = if fill == 0 {
                    self.zero_digest
                } else {
                    self.digester.digest(&[fill; PAGE_SIZE])
                };
                if self.at_destination.get(&address) == Some(&digest) {
                    self.stats.counts().zero_unchanged += 1;
                    return Ok(());
                }
                self.stats.counts().zero += 1;
                (digest, RamBody::Zero(fill))
            }
            RamBody::Page(page) => {
                let digest = known.unwrap_or_else(|| self.digester.digest(&page));
                if self.at_destination.get(&address) == Some(&digest) {
                    self.stats.counts().unchanged += 1;
                    return Ok(());
                }
                if self.held.contains(&digest) {
                    // Its content went before, whole or as a host reference (and to the tee then).
                    self.stats.counts().referenced += 1;
                    (digest, RamBody::Ref(digest))
                } else if self.host_held.contains(&digest_prefix(&digest)) {
                    // The expander keeps what it resolves from the host as if it had come whole.
                    self.held.offer(digest, || ());
                    self.stats.counts().host_referenced += 1;
                    if let Some(tee) = self.tee.as_mut() {
                        tee.page(digest, page);
                    }
                    (digest, RamBody::Ref(digest))
                } else {
                    self.held.offer(digest, || ());
                    self.stats.counts().full += 1;
                    (digest, RamBody::Page(page))
                }
            }
            RamBody::Ref(_) => unreachable!("QEMU's dialect has no references"),
        };
        self.at_destination.insert(address, digest);
        let block_name = if self.link_block == Some(record.block) {
            None
        } else {
            Some(self.block_names[record.block].clone())
        };
        self.link_block = Some(record.block);
        let item = Item::Ram(RamRecord {
            block_name,
            body,
            ..record
        });
        stream::write(&item, out);
        if let (
            Some(tee),
            Item::Ram(RamRecord {
                body: RamBody::Page(page),
                ..
            }),
        ) = (self.tee.as_mut(), item)
        {
            tee.page(digest, page);
        }
        Ok(())
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// The distinct digests of the last non-zero content the relay let through for each address: the
    /// destination QEMU's memory once the stream is complete.
    pub fn last_pages(&self) -> Vec<Digest> {
        let distinct: HashSet<&Digest> = self
            .at_destination
            .values()
            .filter(|d| **d != self.zero_digest)
            .collect();
        distinct.into_iter().copied().collect()
    }
}

/// Relays one migration on the source: `qemu` is the connection the source QEMU migrates to, `link`
/// the connection to the destination agent. Returns when both directions are closed.
pub async fn run<Q, L>(
    qemu: Q,
    link: L,
    digester: &dyn PageDigester,
    config: RelayConfig,
) -> Result<RelayStats, RelayError>
where
    Q: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    Ok(run_filter(qemu, link, Filter::new(digester, config)).await?.stats)
}

/// [`run`] with a filter set up by the caller (what the destination host holds, a tee); the filter's
/// tee is dropped when this returns.
pub async fn run_filter<Q, L>(qemu: Q, link: L, mut filter: Filter<'_>) -> Result<Relayed, RelayError>
where
    Q: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let digester = filter.digester;
    let moved = pump::run(qemu, link, Dialect::Qemu, digester, |item, digest, out| {
        filter.step_with(item, digest, out)
    })
    .await?;
    filter.tee = None;
    let last_pages = filter.last_pages();
    let mut stats = filter.stats;
    stats.bytes_in = moved.forward_in;
    stats.bytes_out = moved.forward_out;
    stats.return_path_bytes = moved.backward;
    Ok(Relayed { stats, last_pages })
}
