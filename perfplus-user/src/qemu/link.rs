//! The relay's byte stream over a perfplus connection: what the local relay writes goes out as
//! `QemuStream` frames, what comes in as `QemuStream` frames is written for the local relay to read;
//! an empty frame ends its direction (a half-close, as on a socket).

use anyhow::bail;
use perfplus_protocol::connection::{ConnectionReader, ConnectionWriter};
use perfplus_protocol::message::QEMU_STREAM_CHUNK_MAX;
use perfplus_protocol::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bytes buffered between the relay and the connection.
pub(crate) const PIPE: usize = 1 << 20;

/// A pipe: one end for the relay, the other for [`carry`].
pub(crate) fn pipe() -> (DuplexStream, DuplexStream) {
    tokio::io::duplex(PIPE)
}

/// Carries `local`'s bytes over the connection both ways until both directions have ended.
pub(crate) async fn carry(
    reader: &mut ConnectionReader,
    writer: &mut ConnectionWriter,
    local: DuplexStream,
) -> anyhow::Result<()> {
    let (mut from_relay, mut to_relay) = tokio::io::split(local);
    let outgoing = async {
        let mut buf = vec![0u8; QEMU_STREAM_CHUNK_MAX.min(256 << 10)];
        loop {
            let n = from_relay.read(&mut buf).await?;
            writer.send(&Message::QemuStream(buf[..n].to_vec())).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
        }
    };
    let incoming = async {
        loop {
            match reader.recv().await? {
                Message::QemuStream(bytes) if bytes.is_empty() => {
                    to_relay.shutdown().await?;
                    return anyhow::Ok(());
                }
                Message::QemuStream(bytes) => to_relay.write_all(&bytes).await?,
                other => bail!("the peer sent {} in a QEMU stream", other.describe()),
            }
        }
    };
    tokio::try_join!(outgoing, incoming)?;
    Ok(())
}
