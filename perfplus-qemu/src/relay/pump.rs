//! The I/O of one relay side: the stream from `input` through the parser and a step function to
//! `output`, and the return path's raw bytes the other way, both at once.

use std::io::ErrorKind;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::digest::PageDigester;
use crate::stream::{Dialect, Digest, Item, Parser, RamBody, RamRecord, StreamError};

/// How much is read from the input at once (up to 64 pages, hashed together).
const CHUNK: usize = 256 << 10;
/// Output is written when this much is pending, and at the end of every input chunk.
const FLUSH_AT: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    #[error("relay I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("reference to a page this agent does not hold (digest {0}): neither this migration's pages nor this host's page store and VMs have it (any more); the stream stops here, before QEMU gets a page that cannot be verified")]
    MissingReference(String),
    #[error("a held page no longer has its digest {0}: refusing to write it into the stream")]
    DigestMismatch(String),
}

/// Bytes the pump moved.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Moved {
    pub forward_in: u64,
    pub forward_out: u64,
    pub backward: u64,
}

/// Runs the forward stream (parsed, each item through `step` with the digest of its page if it
/// carries one whole, the pages of each chunk hashed together by `digester`) and the backward return path (copied
/// as it is) until both ends close. The forward direction's error is the one that counts; the return
/// path's peer may close first (QEMU closes its socket when it is done). A failure of either ends
/// both at once: both connections are dropped, so that QEMU, waiting for more of the stream or
/// writing its return path, sees them close (it would otherwise wait for the rest of a stream that
/// is never coming).
pub(crate) async fn run<F, B, S>(
    forward: F,
    backward: B,
    dialect: Dialect,
    digester: &dyn PageDigester,
    step: S,
) -> Result<Moved, RelayError>
where
    F: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Item, Option<Digest>, &mut Vec<u8>) -> Result<(), RelayError>,
{
    let (forward_read, mut forward_reply) = tokio::io::split(forward);
    let (mut backward_reply, backward_write) = tokio::io::split(backward);
    let stream = pump(forward_read, backward_write, dialect, digester, step);
    let return_path = async {
        let copied = tokio::io::copy(&mut backward_reply, &mut forward_reply).await;
        let _ = forward_reply.shutdown().await;
        match copied {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(RelayError::from(e)),
        }
    };
    let ((forward_in, forward_out), backward) = tokio::try_join!(stream, return_path)?;
    Ok(Moved {
        forward_in,
        forward_out,
        backward,
    })
}

/// The digest of every whole page among `items`, in order, hashed together.
fn page_digests(items: &[Item], digester: &dyn PageDigester) -> Vec<Digest> {
    let pages: Vec<&[u8; crate::stream::PAGE_SIZE]> = items
        .iter()
        .filter_map(|item| match item {
            Item::Ram(RamRecord {
                body: RamBody::Page(page),
                ..
            }) => Some(&**page),
            _ => None,
        })
        .collect();
    if pages.is_empty() {
        Vec::new()
    } else {
        digester.digest_many(&pages)
    }
}

async fn pump<R, W, S>(
    mut input: R,
    mut output: W,
    dialect: Dialect,
    digester: &dyn PageDigester,
    mut step: S,
) -> Result<(u64, u64), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: FnMut(Item, Option<Digest>, &mut Vec<u8>) -> Result<(), RelayError>,
{
    let mut parser = Parser::new(dialect);
    let mut chunk = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(FLUSH_AT + CHUNK);
    let mut items = Vec::new();
    let (mut read, mut written) = (0u64, 0u64);
    loop {
        let n = input.read(&mut chunk).await?;
        if n == 0 {
            parser.finish()?;
            break;
        }
        read += n as u64;
        parser.feed(&chunk[..n]);
        while let Some(item) = parser.next_item()? {
            items.push(item);
        }
        let mut digests = page_digests(&items, digester).into_iter();
        for item in items.drain(..) {
            let digest = match &item {
                Item::Ram(RamRecord {
                    body: RamBody::Page(_), ..
                }) => Some(digests.next().expect("one digest per whole page")),
                _ => None,
            };
            step(item, digest, &mut out)?;
            if out.len() >= FLUSH_AT {
                output.write_all(&out).await?;
                written += out.len() as u64;
                out.clear();
            }
        }
        if !out.is_empty() {
            output.write_all(&out).await?;
            written += out.len() as u64;
            out.clear();
        }
    }
    output.flush().await?;
    output.shutdown().await?;
    Ok((read, written))
}
