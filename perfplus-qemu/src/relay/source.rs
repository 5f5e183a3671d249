//! The source side: QEMU's stream in, the relay dialect out, with the Perf+ decision per RAM record.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite};

use super::pump::{self, RelayError};
use super::{Held, RelayConfig, RelayStats};
use crate::digest::PageDigester;
use crate::stream::{self, Dialect, Digest, Item, RamBody, RamRecord, PAGE_SIZE};

/// The decision per RAM record, without I/O: items in, the bytes for the link out.
pub struct Filter<'d> {
    digester: &'d dyn PageDigester,
    /// Digest of what the destination QEMU has at (block, offset), for every page the relay passed on.
    at_destination: HashMap<(usize, u64), Digest>,
    /// What the destination agent holds (the mirror of its store).
    held: Held<()>,
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
            zero_digest: digester.digest(&[0; PAGE_SIZE]),
            block_names: Vec::new(),
            link_block: None,
            stats: RelayStats::default(),
        }
    }

    /// Writes what the link gets for `item` to `out`.
    pub fn step(&mut self, item: Item, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match item {
            Item::Ram(record) => return self.ram(record, out),
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

    fn ram(&mut self, record: RamRecord, out: &mut Vec<u8>) -> Result<(), RelayError> {
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
                let digest = self.digester.digest(&page);
                if self.at_destination.get(&address) == Some(&digest) {
                    self.stats.counts().unchanged += 1;
                    return Ok(());
                }
                if self.held.contains(&digest) {
                    self.stats.counts().referenced += 1;
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
        let record = RamRecord {
            block_name,
            body,
            ..record
        };
        stream::write(&Item::Ram(record), out);
        Ok(())
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
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
    let mut filter = Filter::new(digester, config);
    let moved = pump::run(qemu, link, Dialect::Qemu, |item, out| filter.step(item, out)).await?;
    let mut stats = filter.stats;
    stats.bytes_in = moved.forward_in;
    stats.bytes_out = moved.forward_out;
    stats.return_path_bytes = moved.backward;
    Ok(stats)
}
