//! Connections: a tokio TCP stream buffered into frames, opened by the handshake.
//!
//! [`Connection::connect`] (initiator) and [`Connection::accept`] (responder) run the handshake of
//! [`super::handshake`] under a time limit, so a silent or slow peer cannot hold a connection open;
//! after it, [`Connection::send`] and [`Connection::recv`] move [`Message`]s.
//!
//! - Reading: the 8-byte header first; its type, flags and length limit are checked before the payload
//!   buffer is allocated; then exactly the payload is read into a buffer of that size (large payloads go
//!   straight from the socket into it) and handed to [`frame::decode_payload`], which keeps a `Pages` or
//!   `VmState` payload without copying it. `recv` keeps partial progress in the reader, so it is
//!   cancel-safe (it may be used in `tokio::select!`).
//! - Writing: messages are encoded into a write buffer; [`Connection::feed`] queues one,
//!   [`Connection::flush`] puts the queue on the wire, [`Connection::send`] does both. A `Pages` frame's
//!   items are not copied into the buffer: the header and the batch bytes go out in one vectored write.
//!   `TCP_NODELAY` is set, so each flush leaves at once.
//! - Errors: an `Error` frame from the peer becomes an `Err` ("<peer> reported: <message>"), an end of
//!   stream becomes "connection closed by <peer>"; both are [`ConnectionError`]s inside the
//!   `anyhow::Error`, for callers that need to tell them apart.
//!
//! [`Connection::into_split`] gives a reader and a writer half that can live in different tasks
//! (e.g. streaming pages while another task reads acknowledgements); they share the byte counters.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::frame::{self, Frame, FrameError, FrameHeader, FrameType, ERROR_MAX, HEADER_LEN};
use super::handshake::{Established, Handshake, HandshakeError, Side, AUTH_FAILED_MESSAGE};
use super::{ClusterKey, Message, Role};

/// How long connecting plus the handshake may take before the connection is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Connection::send_error`] tries before giving up on a peer that does not read.
const SEND_ERROR_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer: small frames are read many at a time; larger payloads bypass it.
const READ_BUFFER: usize = 64 * 1024;
/// [`Connection::feed`] writes the queue out once it holds this much.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A write buffer that grew past this (a large frame) is released after the write.
const WRITE_BUFFER_KEEP: usize = 4 * 1024 * 1024;

/// Errors of an established connection that callers may want to tell apart (downcast the
/// `anyhow::Error`).
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("connection closed by {peer}")]
    Closed { peer: SocketAddr },
    #[error("connection closed by {peer} in the middle of a frame ({detail})")]
    Truncated { peer: SocketAddr, detail: String },
    #[error("{peer} reported: {message}")]
    PeerReported { peer: SocketAddr, message: String },
    #[error("{peer} sent a bad frame: {error}")]
    BadFrame {
        peer: SocketAddr,
        error: FrameError,
        /// The header bytes as received (what a non-perfplus peer sent first).
        raw_header: [u8; HEADER_LEN],
    },
    #[error("reading from {peer}: {error}")]
    Io { peer: SocketAddr, error: io::Error },
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// An authenticated connection to a peer.
pub struct Connection {
    reader: ConnectionReader,
    writer: ConnectionWriter,
    version: u16,
}

/// The receiving half of a [`Connection`].
pub struct ConnectionReader {
    stream: BufReader<OwnedReadHalf>,
    peer: SocketAddr,
    counters: Arc<Counters>,
    /// Header bytes received so far of the frame being read.
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The frame being read, once its header is checked: its payload so far.
    payload: Option<(FrameHeader, Vec<u8>)>,
}

/// The sending half of a [`Connection`].
pub struct ConnectionWriter {
    stream: OwnedWriteHalf,
    peer: SocketAddr,
    counters: Arc<Counters>,
    /// Encoded frames not yet written.
    buf: Vec<u8>,
}

impl Connection {
    /// Connects to `addr` (host:port) and runs the handshake as initiator, asking for `role`.
    /// Connecting and the handshake together may take at most [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(addr: &str, role: Role, key: &ClusterKey) -> anyhow::Result<Connection> {
        Connection::connect_timeout(addr, role, key, HANDSHAKE_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with another time limit.
    pub async fn connect_timeout(
        addr: &str,
        role: Role,
        key: &ClusterKey,
        limit: Duration,
    ) -> anyhow::Result<Connection> {
        let attempt = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| anyhow!("cannot connect to {addr}: {e}"))?;
            let (conn, _) = Connection::handshake(stream, Side::Initiator, role, key).await?;
            Ok(conn)
        };
        tokio::time::timeout(limit, attempt).await.map_err(|_| {
            anyhow!(
                "connecting to {addr} timed out after {:.1} s (no complete handshake)",
                limit.as_secs_f64()
            )
        })?
    }

    /// Runs the handshake as responder on an accepted stream; returns the connection and the role the
    /// peer asked for. The handshake may take at most [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(stream: TcpStream, key: &ClusterKey) -> anyhow::Result<(Connection, Role)> {
        Connection::accept_timeout(stream, key, HANDSHAKE_TIMEOUT).await
    }

    /// [`accept`](Self::accept) with another time limit.
    pub async fn accept_timeout(
        stream: TcpStream,
        key: &ClusterKey,
        limit: Duration,
    ) -> anyhow::Result<(Connection, Role)> {
        let peer = stream
            .peer_addr()
            .context("accepted connection has no peer address")?;
        // The responder echoes the initiator's role; the one passed here is replaced.
        let handshake = Connection::handshake(stream, Side::Responder, Role::Peer, key);
        tokio::time::timeout(limit, handshake).await.map_err(|_| {
            anyhow!(
                "handshake with {peer} timed out after {:.1} s",
                limit.as_secs_f64()
            )
        })?
    }

    /// Sends `msg` and flushes.
    pub async fn send(&mut self, msg: &Message) -> anyhow::Result<()> {
        self.writer.send(msg).await
    }

    /// Queues `msg`; it goes out with the next [`flush`](Self::flush) (or earlier, when the queue is
    /// large or `msg` is a page batch).
    pub async fn feed(&mut self, msg: &Message) -> anyhow::Result<()> {
        self.writer.feed(msg).await
    }

    /// Writes out every queued message.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.writer.flush().await
    }

    /// Receives the next message. An `Error` frame from the peer is returned as an `Err`
    /// ("<peer> reported: <message>"), the end of the stream as "connection closed by <peer>".
    /// Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Message> {
        self.reader.recv().await
    }

    /// Tells the peer what went wrong, best effort: errors are ignored, and a peer that does not read
    /// is given up on after 2 s. Messages longer than an `Error` frame allows are cut.
    pub async fn send_error(&mut self, message: &str) {
        self.writer.send_error(message).await
    }

    /// Bytes written to the socket, headers and handshake included.
    pub fn bytes_sent(&self) -> u64 {
        self.writer.bytes_sent()
    }

    /// Bytes read from the socket, headers and handshake included.
    pub fn bytes_received(&self) -> u64 {
        self.reader.bytes_received()
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.reader.peer
    }

    /// The protocol version agreed in the handshake.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Splits the connection into a reader and a writer that can be used from different tasks.
    pub fn into_split(self) -> (ConnectionReader, ConnectionWriter) {
        (self.reader, self.writer)
    }

    async fn handshake(
        stream: TcpStream,
        side: Side,
        role: Role,
        key: &ClusterKey,
    ) -> anyhow::Result<(Connection, Role)> {
        let peer = stream
            .peer_addr()
            .context("connected socket has no peer address")?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("setting TCP_NODELAY on the connection to {peer}"))?;
        let counters = Arc::new(Counters::default());
        let (read, write) = stream.into_split();
        let mut reader = ConnectionReader {
            stream: BufReader::with_capacity(READ_BUFFER, read),
            peer,
            counters: counters.clone(),
            header: [0; HEADER_LEN],
            header_len: 0,
            payload: None,
        };
        let mut writer = ConnectionWriter {
            stream: write,
            peer,
            counters,
            buf: Vec::with_capacity(READ_BUFFER),
        };
        let established = run_handshake(&mut reader, &mut writer, side, role, key).await?;
        let conn = Connection {
            reader,
            writer,
            version: established.version,
        };
        Ok((conn, established.role))
    }
}

/// The handshake over the two halves; see [`super::handshake`] for the exchange.
async fn run_handshake(
    reader: &mut ConnectionReader,
    writer: &mut ConnectionWriter,
    side: Side,
    role: Role,
    key: &ClusterKey,
) -> anyhow::Result<Established> {
    let peer = reader.peer;
    let mut handshake = Handshake::new(side, role, key)?;
    let peer_hello = match side {
        Side::Initiator => {
            writer.write_hello(&handshake).await?;
            reader.handshake_frame(FrameType::Hello).await?
        }
        Side::Responder => {
            let hello = reader.handshake_frame(FrameType::Hello).await?;
            handshake.answer_role(hello_of(&hello).role);
            writer.write_hello(&handshake).await?;
            hello
        }
    };
    let exchanged = match handshake.receive_hello(hello_of(&peer_hello)) {
        Ok(exchanged) => exchanged,
        Err(e) => {
            writer.send_error(&e.to_string()).await;
            bail!("handshake with {peer} refused: {}", local_view(&e, peer));
        }
    };
    let refuse = |e: HandshakeError| {
        anyhow!(
            "{} (this side's key fingerprint: {})",
            local_view(&e, peer),
            key.fingerprint()
        )
    };
    match side {
        Side::Initiator => {
            writer.write_auth(&exchanged).await?;
            let auth = reader.handshake_frame(FrameType::Auth).await?;
            match exchanged.verify(auth_of(&auth)) {
                Ok(established) => Ok(established),
                Err(e) => {
                    writer.send_error(AUTH_FAILED_MESSAGE).await;
                    Err(refuse(e))
                }
            }
        }
        Side::Responder => {
            let auth = reader.handshake_frame(FrameType::Auth).await?;
            match exchanged.verify(auth_of(&auth)) {
                Ok(established) => {
                    writer.write_auth(&exchanged).await?;
                    Ok(established)
                }
                Err(e) => {
                    writer.send_error(AUTH_FAILED_MESSAGE).await;
                    Err(refuse(e))
                }
            }
        }
    }
}

/// A handshake error as this side reports it, with the peer's address in place of "the peer".
fn local_view(e: &HandshakeError, peer: SocketAddr) -> String {
    match e {
        HandshakeError::AuthFailed => {
            format!("authentication failed: {peer} does not hold this cluster's key")
        }
        other => other
            .to_string()
            .replace("the peer", &format!("the peer {peer}")),
    }
}

fn hello_of(frame: &Frame) -> &super::handshake::Hello {
    match frame {
        Frame::Hello(hello) => hello,
        _ => unreachable!("handshake_frame(Hello) returns Hello frames only"),
    }
}

fn auth_of(frame: &Frame) -> &super::handshake::Auth {
    match frame {
        Frame::Auth(auth) => auth,
        _ => unreachable!("handshake_frame(Auth) returns Auth frames only"),
    }
}

impl ConnectionReader {
    /// Receives the next message; see [`Connection::recv`]. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Message> {
        let peer = self.peer;
        match self.read_frame().await? {
            Frame::Message(Message::Error { message }) => {
                Err(ConnectionError::PeerReported { peer, message }.into())
            }
            Frame::Message(msg) => Ok(msg),
            frame @ (Frame::Hello(_) | Frame::Auth(_)) => {
                let frame_type = match frame {
                    Frame::Hello(_) => FrameType::Hello,
                    _ => FrameType::Auth,
                };
                Err(ConnectionError::BadFrame {
                    peer,
                    error: FrameError::HandshakeFrame(frame_type),
                    raw_header: self.header,
                }
                .into())
            }
        }
    }

    /// Bytes read from the socket, headers and handshake included (shared with the writer half).
    pub fn bytes_received(&self) -> u64 {
        self.counters.received.load(Ordering::Relaxed)
    }

    /// Bytes written to the socket by the writer half.
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Reads one frame. Progress is kept in `self` between calls, so dropping the future loses nothing.
    async fn read_frame(&mut self) -> Result<Frame, ConnectionError> {
        let peer = self.peer;
        let io_error = |error| ConnectionError::Io { peer, error };
        while self.payload.is_none() {
            if self.header_len < HEADER_LEN {
                let n = self
                    .stream
                    .read(&mut self.header[self.header_len..])
                    .await
                    .map_err(io_error)?;
                if n == 0 {
                    return Err(match self.header_len {
                        0 => ConnectionError::Closed { peer },
                        got => ConnectionError::Truncated {
                            peer,
                            detail: format!("{got} of the {HEADER_LEN} header bytes arrived"),
                        },
                    });
                }
                self.counters
                    .received
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.header_len += n;
                continue;
            }
            // The limit is checked here, before the payload buffer exists.
            let header =
                FrameHeader::parse(&self.header).map_err(|error| ConnectionError::BadFrame {
                    peer,
                    error,
                    raw_header: self.header,
                })?;
            self.payload = Some((header, Vec::with_capacity(header.payload_len)));
        }
        let Some((header, payload)) = &mut self.payload else {
            unreachable!("the loop above ends with a payload buffer");
        };
        while payload.len() < header.payload_len {
            let want = (header.payload_len - payload.len()) as u64;
            // read_buf fills the vector's spare capacity (no zeroing); a payload larger than the read
            // buffer goes straight from the socket into it.
            let n = (&mut self.stream)
                .take(want)
                .read_buf(payload)
                .await
                .map_err(io_error)?;
            if n == 0 {
                return Err(ConnectionError::Truncated {
                    peer,
                    detail: format!(
                        "{} of the {} payload bytes of frame {} arrived",
                        payload.len(),
                        header.payload_len,
                        header.frame_type
                    ),
                });
            }
            self.counters
                .received
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let (header, payload) = self.payload.take().expect("payload checked above");
        self.header_len = 0;
        frame::decode_payload(header, payload).map_err(|error| ConnectionError::BadFrame {
            peer,
            error,
            raw_header: self.header,
        })
    }

    /// Reads a handshake frame of type `want` (Hello or Auth), turning everything else into an error
    /// that says what the peer did instead.
    async fn handshake_frame(&mut self, want: FrameType) -> anyhow::Result<Frame> {
        let peer = self.peer;
        match self.read_frame().await {
            Ok(frame @ Frame::Hello(_)) if want == FrameType::Hello => Ok(frame),
            Ok(frame @ Frame::Auth(_)) if want == FrameType::Auth => Ok(frame),
            Ok(Frame::Message(Message::Error { message })) if message == AUTH_FAILED_MESSAGE => {
                Err(anyhow!(
                    "authentication failed: {peer} refused this side's proof ({peer} reported: \
                     {message})"
                ))
            }
            Ok(Frame::Message(Message::Error { message })) => {
                Err(anyhow!("{peer} refused the handshake: {message}"))
            }
            Ok(other) => {
                let got = match &other {
                    Frame::Hello(_) => FrameType::Hello,
                    Frame::Auth(_) => FrameType::Auth,
                    Frame::Message(msg) => FrameType::of(msg),
                };
                Err(anyhow!(
                    "handshake with {peer} failed: it sent a {got} frame where {want} was expected"
                ))
            }
            Err(ConnectionError::BadFrame {
                error, raw_header, ..
            }) => {
                let what = match error {
                    FrameError::UnknownType(_) | FrameError::BadFlags { .. } => {
                        format!(
                            "{error}; its first bytes were \"{}\"",
                            raw_header.escape_ascii()
                        )
                    }
                    other => other.to_string(),
                };
                Err(anyhow!(
                    "{peer} does not speak the perfplus protocol (or not this version): {what}"
                ))
            }
            Err(ConnectionError::Closed { .. }) => Err(anyhow!(
                "connection closed by {peer} during the handshake (waiting for its {want})"
            )),
            Err(e) => Err(anyhow!("handshake with {peer} failed: {e}")),
        }
    }
}

impl ConnectionWriter {
    /// Sends `msg` and flushes.
    pub async fn send(&mut self, msg: &Message) -> anyhow::Result<()> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Queues `msg`; see [`Connection::feed`].
    pub async fn feed(&mut self, msg: &Message) -> anyhow::Result<()> {
        let peer = self.peer;
        let frame_type = FrameType::of(msg);
        if let Message::Pages(batch) = msg {
            let header = frame::pages_header(batch)
                .map_err(|e| anyhow!("cannot send {frame_type} to {peer}: {e}"))?;
            self.buf.extend_from_slice(&header);
            let written = write_all_vectored(&mut self.stream, &self.buf, batch.as_bytes()).await;
            self.buf.clear();
            self.account(written)
                .with_context(|| format!("sending {frame_type} to {peer}"))?;
            return Ok(());
        }
        frame::encode(msg, &mut self.buf)
            .map_err(|e| anyhow!("cannot send {frame_type} to {peer}: {e}"))?;
        if self.buf.len() >= WRITE_HIGH_WATER {
            self.write_buffer()
                .await
                .with_context(|| format!("sending {frame_type} to {peer}"))?;
        }
        Ok(())
    }

    /// Writes out every queued message.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let peer = self.peer;
        self.write_buffer()
            .await
            .with_context(|| format!("sending to {peer}"))?;
        self.stream
            .flush()
            .await
            .with_context(|| format!("sending to {peer}"))
    }

    /// Tells the peer what went wrong, best effort; see [`Connection::send_error`].
    pub async fn send_error(&mut self, message: &str) {
        let mut end = message.len().min(ERROR_MAX);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = Message::Error {
            message: message[..end].to_string(),
        };
        let _ = tokio::time::timeout(SEND_ERROR_TIMEOUT, self.send(&msg)).await;
    }

    /// Bytes written to the socket, headers and handshake included (shared with the reader half).
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from the socket by the reader half.
    pub fn bytes_received(&self) -> u64 {
        self.counters.received.load(Ordering::Relaxed)
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    async fn write_hello(&mut self, handshake: &Handshake) -> anyhow::Result<()> {
        frame::encode_hello(handshake.hello(), &mut self.buf);
        self.write_buffer()
            .await
            .with_context(|| format!("sending Hello to {}", self.peer))
    }

    async fn write_auth(
        &mut self,
        exchanged: &super::handshake::HelloExchanged,
    ) -> anyhow::Result<()> {
        frame::encode_auth(&exchanged.auth(), &mut self.buf);
        self.write_buffer()
            .await
            .with_context(|| format!("sending Auth to {}", self.peer))
    }

    /// Writes the whole buffer, counting what went out, and empties it.
    async fn write_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = write_all_vectored(&mut self.stream, &self.buf, &[]).await;
        self.buf.clear();
        if self.buf.capacity() > WRITE_BUFFER_KEEP {
            self.buf = Vec::with_capacity(READ_BUFFER);
        }
        self.account(written)
    }

    fn account(&self, written: (usize, io::Result<()>)) -> io::Result<()> {
        self.counters
            .sent
            .fetch_add(written.0 as u64, Ordering::Relaxed);
        written.1
    }
}

/// Writes `a` then `b` with as few system calls as the socket allows; returns the bytes written and
/// the outcome.
async fn write_all_vectored(
    stream: &mut OwnedWriteHalf,
    mut a: &[u8],
    mut b: &[u8],
) -> (usize, io::Result<()>) {
    let mut total = 0;
    while !a.is_empty() || !b.is_empty() {
        let result = if a.is_empty() {
            stream.write(b).await
        } else if b.is_empty() {
            stream.write(a).await
        } else {
            stream
                .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                .await
        };
        let n = match result {
            Ok(0) => return (total, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (total, Err(e)),
        };
        total += n;
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    (total, Ok(()))
}
