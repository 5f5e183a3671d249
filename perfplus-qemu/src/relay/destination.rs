//! The destination side: the relay dialect in, a valid QEMU stream out (references expanded and
//! verified, every other item as it came).

use tokio::io::{AsyncRead, AsyncWrite};

use super::pump::{self, RelayError};
use super::{Held, RelayConfig, RelayStats};
use crate::digest::PageDigester;
use crate::stream::{self, Dialect, Item, RamBody, RamRecord, PAGE_SIZE};

/// Expands references, without I/O: items in, the bytes for QEMU out.
pub struct Expander<'d> {
    digester: &'d dyn PageDigester,
    held: Held<Box<[u8; PAGE_SIZE]>>,
    stats: RelayStats,
}

impl<'d> Expander<'d> {
    pub fn new(digester: &'d dyn PageDigester, config: RelayConfig) -> Expander<'d> {
        Expander {
            digester,
            held: Held::new(config.held_pages),
            stats: RelayStats::default(),
        }
    }

    /// Writes what QEMU gets for `item` to `out`.
    pub fn step(&mut self, item: Item, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match item {
            Item::Ram(record) => return self.ram(record, out),
            Item::SectionStart { .. } | Item::SectionPart { .. } | Item::SectionEnd { .. } => {
                self.stats.section(&item);
            }
            Item::Tail(ref bytes) => self.stats.tail_bytes += bytes.len() as u64,
            _ => {}
        }
        stream::write(&item, out);
        Ok(())
    }

    fn ram(&mut self, record: RamRecord, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match record.body {
            RamBody::Page(page) => {
                let digest = self.digester.digest(&page);
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
                    self.held.offer(digest, || page);
                }
                self.stats.counts().full += 1;
            }
            RamBody::Ref(digest) => {
                let page = self
                    .held
                    .get(&digest)
                    .ok_or_else(|| RelayError::MissingReference(hex(&digest)))?;
                // Re-hash before use: what goes into the guest is what the digest names.
                if self.digester.digest(page) != digest {
                    return Err(RelayError::DigestMismatch(hex(&digest)));
                }
                let record = RamRecord {
                    body: RamBody::Page(page.clone()),
                    ..record
                };
                stream::write(&Item::Ram(record), out);
                self.stats.counts().referenced += 1;
            }
            RamBody::Zero(_) => {
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
    let mut expander = Expander::new(digester, config);
    let moved = pump::run(link, qemu, Dialect::Relay, |item, out| expander.step(item, out)).await?;
    let mut stats = expander.stats;
    stats.bytes_in = moved.forward_in;
    stats.bytes_out = moved.forward_out;
    stats.return_path_bytes = moved.backward;
    Ok(stats)
}
