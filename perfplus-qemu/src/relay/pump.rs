//! The I/O of one relay side: the stream from `input` through the parser and a step function to
//! `output`, and the return path's raw bytes the other way, both at once.

use std::io::ErrorKind;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::stream::{Dialect, Item, Parser, StreamError};

/// How much is read from the input at once.
const CHUNK: usize = 64 << 10;
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

/// Runs the forward stream (parsed, each item through `step`) and the backward return path (copied
/// as it is) until both ends close. The forward direction's error is the one that counts; the return
/// path's peer may close first (QEMU closes its socket when it is done). A failure of either ends
/// both at once: both connections are dropped, so that QEMU, waiting for more of the stream or
/// writing its return path, sees them close (it would otherwise wait for the rest of a stream that
/// is never coming).
pub(crate) async fn run<F, B, S>(forward: F, backward: B, dialect: Dialect, step: S) -> Result<Moved, RelayError>
where
    F: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Item, &mut Vec<u8>) -> Result<(), RelayError>,
{
    let (forward_read, mut forward_reply) = tokio::io::split(forward);
    let (mut backward_reply, backward_write) = tokio::io::split(backward);
    let stream = pump(forward_read, backward_write, dialect, step);
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

async fn pump<R, W, S>(mut input: R, mut output: W, dialect: Dialect, mut step: S) -> Result<(u64, u64), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: FnMut(Item, &mut Vec<u8>) -> Result<(), RelayError>,
{
    let mut parser = Parser::new(dialect);
    let mut chunk = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(FLUSH_AT + CHUNK);
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
            step(item, &mut out)?;
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
