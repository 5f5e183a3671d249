//! Connections: a tokio TCP stream buffered into frames, opened by the handshake.
//!
//! [`Connection::connect`] (initiator) and [`Connection::accept`] (responder) run the handshake of
//! [`super::handshake`] under a time limit, so a silent or slow peer cannot hold a connection open;
//! after it, [`Connection::send`] and [`Connection::recv`] move [`Message`]s.
//!
//! - Reading: the 8-byte header first; its type, flags and length limit are checked before the payload
//!   buffer is allocated (until the handshake completes, only Hello, Auth and a short `Error` pass:
//!   [`FrameHeader::check_before_handshake`]); then exactly the payload is read into a buffer of that
//!   size (large payloads go straight from the socket into it) and handed to [`frame::decode_payload`],
//!   which keeps a `Pages` or `VmState` payload without copying it. `recv` keeps partial progress in the reader, so it is
//!   cancel-safe (it may be used in `tokio::select!`).
//! - Writing: messages are encoded into a write buffer; [`Connection::feed`] queues one,
//!   [`Connection::flush`] puts the queue on the wire, [`Connection::send`] does both. A `Pages` frame's
//!   items are not copied into the buffer: the header and the batch bytes go out in one vectored write.
//!   `TCP_NODELAY` is set, so each flush leaves at once.
//! - Errors: an `Error` frame from the peer becomes an `Err` (`"<peer> reported: <message>"`), an end
//!   of stream becomes `"connection closed by <peer>"`; both are [`ConnectionError`]s inside the
//!   `anyhow::Error`, for callers that need to tell them apart.
//!
//! - Memory before authentication: the handshake runs with read and write buffers of a few hundred
//!   bytes and admits no frame larger than [`frame::HANDSHAKE_ERROR_MAX`], so a peer without the
//!   cluster key costs the responder about a KiB; the full-size buffers come after the handshake.
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

use super::frame::{self, Frame, FrameError, FrameHeader, FrameType, ERROR_MAX, HANDSHAKE_ERROR_MAX, HEADER_LEN};
use super::handshake::{Established, Handshake, HandshakeError, Side, AUTH_FAILED_MESSAGE};
use super::{ClusterKey, Message, Role};

/// How long connecting plus the handshake may take before the connection is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Connection::send_error`] tries before giving up on a peer that does not read.
const SEND_ERROR_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer: small frames are read many at a time; larger payloads bypass it.
const READ_BUFFER: usize = 64 * 1024;
/// Read and write buffers during the handshake (a Hello frame is 53 bytes, an Auth 40): a peer that
/// has not authenticated does not get the full-size buffers.
const HANDSHAKE_BUFFER: usize = 256;
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
    /// The handshake completed: every frame type may come, up to its own limit. Before, only the
    /// handshake's frames ([`FrameHeader::check_before_handshake`]).
    authenticated: bool,
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
        let peer = stream.peer_addr().context("accepted connection has no peer address")?;
        // The responder echoes the initiator's role; the one passed here is replaced.
        let handshake = Connection::handshake(stream, Side::Responder, Role::Peer, key);
        tokio::time::timeout(limit, handshake)
            .await
            .map_err(|_| anyhow!("handshake with {peer} timed out after {:.1} s", limit.as_secs_f64()))?
    }

    /// Two connected ends over loopback TCP, handshake done, `role` agreed: the initiator first. A seam
    /// for tests of code that talks over a connection (the engine, the agent), with real sockets and
    /// the real handshake rather than a stand-in.
    pub async fn pair(role: Role, key: &ClusterKey) -> anyhow::Result<(Connection, Connection)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback listener")?;
        let addr = listener.local_addr()?.to_string();
        let accept = async {
            let (stream, _) = listener.accept().await.context("accepting on loopback")?;
            Connection::accept(stream, key).await
        };
        let (initiator, responder) = tokio::join!(Connection::connect(&addr, role, key), accept);
        let (responder, agreed) = responder?;
        anyhow::ensure!(agreed == role, "loopback pair agreed on {agreed:?}, not {role:?}");
        Ok((initiator?, responder))
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
    /// (`"<peer> reported: <message>"`), the end of the stream as `"connection closed by <peer>"`.
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
        let peer = stream.peer_addr().context("connected socket has no peer address")?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("setting TCP_NODELAY on the connection to {peer}"))?;
        let counters = Arc::new(Counters::default());
        let (read, write) = stream.into_split();
        let mut reader = ConnectionReader {
            stream: BufReader::with_capacity(HANDSHAKE_BUFFER, read),
            peer,
            counters: counters.clone(),
            header: [0; HEADER_LEN],
            header_len: 0,
            payload: None,
            authenticated: false,
        };
        let mut writer = ConnectionWriter {
            stream: write,
            peer,
            counters,
            buf: Vec::with_capacity(HANDSHAKE_BUFFER),
        };
        let established = run_handshake(&mut reader, &mut writer, side, role, key).await?;
        writer.buf.reserve(READ_BUFFER);
        let conn = Connection {
            reader: reader.authenticated(),
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
            writer.send_error_within(&e.to_string(), HANDSHAKE_ERROR_MAX).await;
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
                    writer.send_error_within(AUTH_FAILED_MESSAGE, HANDSHAKE_ERROR_MAX).await;
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
                    writer.send_error_within(AUTH_FAILED_MESSAGE, HANDSHAKE_ERROR_MAX).await;
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
        other => other.to_string().replace("the peer", &format!("the peer {peer}")),
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
    /// The reader once the handshake completed: every frame type admitted, and the full-size read
    /// buffer (unless the peer already sent bytes past its handshake, which the small buffer then keeps;
    /// the protocol never does: the initiator sends nothing before the responder's Auth, and the
    /// responder nothing before the initiator's first request).
    fn authenticated(mut self) -> ConnectionReader {
        self.authenticated = true;
        if self.stream.buffer().is_empty() {
            self.stream = BufReader::with_capacity(READ_BUFFER, self.stream.into_inner());
        }
        self
    }

    /// Receives the next message; see [`Connection::recv`]. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Message> {
        let peer = self.peer;
        match self.read_frame().await? {
            Frame::Message(Message::Error { message }) => Err(ConnectionError::PeerReported { peer, message }.into()),
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
                self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
                self.header_len += n;
                continue;
            }
            // The limit is checked here, before the payload buffer exists; before the handshake
            // completed, only the handshake's own small frames pass.
            let header = FrameHeader::parse(&self.header)
                .and_then(|header| {
                    if self.authenticated {
                        Ok(header)
                    } else {
                        header.check_before_handshake()
                    }
                })
                .map_err(|error| ConnectionError::BadFrame {
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
            self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
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
            Ok(Frame::Message(Message::Error { message })) if message == AUTH_FAILED_MESSAGE => Err(anyhow!(
                "authentication failed: {peer} refused this side's proof ({peer} reported: \
                     {message})"
            )),
            Ok(Frame::Message(Message::Error { message })) => Err(anyhow!("{peer} refused the handshake: {message}")),
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
                error: error @ FrameError::BeforeHandshake { .. },
                ..
            }) => Err(anyhow!("handshake with {peer} refused: it sent a {error}")),
            Err(ConnectionError::BadFrame { error, raw_header, .. }) => {
                let what = match error {
                    FrameError::UnknownType(_) | FrameError::BadFlags { .. } => {
                        format!("{error}; its first bytes were \"{}\"", raw_header.escape_ascii())
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
            let header = frame::pages_header(batch).map_err(|e| anyhow!("cannot send {frame_type} to {peer}: {e}"))?;
            self.buf.extend_from_slice(&header);
            let written = write_all_vectored(&mut self.stream, &self.buf, batch.as_bytes()).await;
            self.buf.clear();
            self.account(written)
                .with_context(|| format!("sending {frame_type} to {peer}"))?;
            return Ok(());
        }
        frame::encode(msg, &mut self.buf).map_err(|e| anyhow!("cannot send {frame_type} to {peer}: {e}"))?;
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
        self.stream.flush().await.with_context(|| format!("sending to {peer}"))
    }

    /// Tells the peer what went wrong, best effort; see [`Connection::send_error`].
    pub async fn send_error(&mut self, message: &str) {
        self.send_error_within(message, ERROR_MAX).await
    }

    /// [`send_error`](Self::send_error) with the message cut to `max` bytes.
    async fn send_error_within(&mut self, message: &str, max: usize) {
        let mut end = message.len().min(max);
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

    async fn write_auth(&mut self, exchanged: &super::handshake::HelloExchanged) -> anyhow::Result<()> {
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
        self.counters.sent.fetch_add(written.0 as u64, Ordering::Relaxed);
        written.1
    }
}

/// Writes `a` then `b` with as few system calls as the socket allows; returns the bytes written and
/// the outcome.
async fn write_all_vectored(stream: &mut OwnedWriteHalf, mut a: &[u8], mut b: &[u8]) -> (usize, io::Result<()>) {
    let mut total = 0;
    while !a.is_empty() || !b.is_empty() {
        let result = if a.is_empty() {
            stream.write(b).await
        } else if b.is_empty() {
            stream.write(a).await
        } else {
            stream.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, PageBatch, PageItem, PAGE_BATCH_MAX_ITEMS};
    use crate::handshake::{Hello, AUTH_LEN, HELLO_LEN};
    use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    use tokio::net::TcpListener;

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_hex(&hex::encode([byte; 32])).unwrap()
    }

    async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    /// A handshaken pair: (client, server, role the server saw).
    async fn pair(role: Role) -> (Connection, Connection, Role) {
        let (l, addr) = listener().await;
        let k = key(1);
        let k2 = k.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            Connection::accept(stream, &k2).await
        });
        let client = Connection::connect(&addr, role, &k).await.unwrap();
        let (server, seen) = server.await.unwrap().unwrap();
        (client, server, seen)
    }

    /// Accepts one connection with `key` and returns the handshake's error text.
    async fn accept_error(l: TcpListener, key: ClusterKey, limit: Duration) -> String {
        let (stream, _) = l.accept().await.unwrap();
        match Connection::accept_timeout(stream, &key, limit).await {
            Ok(_) => panic!("handshake succeeded"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn hello(min_version: u16, max_version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_hello(
            &Hello {
                min_version,
                max_version,
                role: Role::Peer,
                nonce: [0x42; 32],
            },
            &mut out,
        );
        out
    }

    /// Every frame in `bytes`.
    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some((f, used)) = decode_frame(bytes).unwrap() {
            out.push(f);
            bytes = &bytes[used..];
        }
        assert!(bytes.is_empty(), "{} stray bytes", bytes.len());
        out
    }

    const HANDSHAKE_BYTES: u64 = (2 * HEADER_LEN + HELLO_LEN + AUTH_LEN) as u64;

    #[tokio::test]
    async fn handshake_then_messages_both_ways() {
        let (mut client, mut server, role) = pair(Role::Control).await;
        assert_eq!(role, Role::Control);
        assert_eq!(client.version(), PROTOCOL_VERSION);
        assert_eq!(server.version(), PROTOCOL_VERSION);
        assert_eq!(client.peer(), server.writer.stream.local_addr().unwrap());
        assert_eq!(server.peer(), client.writer.stream.local_addr().unwrap());
        // Hello + Auth each way, headers included.
        assert_eq!(client.bytes_sent(), HANDSHAKE_BYTES);
        assert_eq!(client.bytes_received(), HANDSHAKE_BYTES);
        assert_eq!(server.bytes_sent(), HANDSHAKE_BYTES);

        client.send(&Message::VmStatus { name: "web".into() }).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::VmStatus { name: "web".into() });
        server.send(&Message::Done).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::Done);

        // Several queued messages go out with one flush, in order.
        client.feed(&Message::RoundEnd { round: 1 }).await.unwrap();
        client.feed(&Message::VmList).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::RoundEnd { round: 1 });
        assert_eq!(server.recv().await.unwrap(), Message::VmList);

        // A full 4 MiB page batch.
        let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for i in 0..PAGE_BATCH_MAX_ITEMS as u64 {
            let mut data = [0u8; 4096];
            data[..8].copy_from_slice(&i.to_le_bytes());
            batch.push_full(i, &[i as u8; 16], &data);
        }
        let sent = Message::Pages(batch);
        let client_task = tokio::spawn(async move {
            client.send(&sent).await.unwrap();
            (client, sent)
        });
        let got = server.recv().await.unwrap();
        let (client, sent) = client_task.await.unwrap();
        assert_eq!(got, sent);
        let Message::Pages(got) = got else { unreachable!() };
        let PageItem::Full { page, data, .. } = got.iter().nth(1000).unwrap().unwrap() else {
            panic!("item 1000 is not full");
        };
        assert_eq!((page, &data[..8]), (1000, &1000u64.to_le_bytes()[..]));

        // Both ends count every byte, and agree.
        assert_eq!(client.bytes_sent(), server.bytes_received());
        assert_eq!(client.bytes_received(), server.bytes_sent());
        let frames_sent = [
            HEADER_LEN + 4,                 // VmStatus "web" (postcard: len + 3 bytes)
            HEADER_LEN + 4,                 // RoundEnd
            HEADER_LEN,                     // VmList
            HEADER_LEN + got.payload_len(), // Pages
        ];
        assert_eq!(
            client.bytes_sent(),
            HANDSHAKE_BYTES + frames_sent.iter().sum::<usize>() as u64
        );
    }

    #[tokio::test]
    async fn peer_errors_and_close_become_errors() {
        let (mut client, mut server, role) = pair(Role::Peer).await;
        assert_eq!(role, Role::Peer);
        let server_addr = client.peer();
        server.send_error("no VM named \"x\"").await;
        let err = client.recv().await.unwrap_err();
        assert_eq!(err.to_string(), format!("{server_addr} reported: no VM named \"x\""));
        assert!(matches!(
            err.downcast_ref::<ConnectionError>(),
            Some(ConnectionError::PeerReported { message, .. }) if message == "no VM named \"x\""
        ));
        // An over-long error message is cut to fit its frame rather than lost.
        server.send_error(&"é".repeat(ERROR_MAX)).await;
        let err = client.recv().await.unwrap_err().to_string();
        assert_eq!(err.len(), format!("{server_addr} reported: ").len() + ERROR_MAX);

        drop(server);
        let err = client.recv().await.unwrap_err();
        assert_eq!(err.to_string(), format!("connection closed by {server_addr}"));
    }

    #[tokio::test]
    async fn different_keys_are_refused_on_both_sides() {
        let (l, addr) = listener().await;
        let server_key = key(2);
        let server_fp = server_key.fingerprint();
        let server = tokio::spawn(accept_error(l, server_key, HANDSHAKE_TIMEOUT));
        let client_key = key(1);
        let client_err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Control, &client_key)
                .await
                .err()
                .unwrap()
        );
        let server_err = server.await.unwrap();
        assert!(
            server_err.starts_with("authentication failed: 127.0.0.1:")
                && server_err.contains(&format!(
                    "does not hold this cluster's key (this side's key fingerprint: {server_fp})"
                )),
            "{server_err}"
        );
        assert_eq!(
            client_err,
            format!(
                "authentication failed: {addr} refused this side's proof ({addr} reported: \
                 authentication failed: the peer does not hold this cluster's key)"
            )
        );
    }

    #[tokio::test]
    async fn http_and_garbage_peers_are_refused() {
        // An HTTP client talking to an agent.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let err = server.await.unwrap();
        assert!(
            err.ends_with(
                "does not speak the perfplus protocol (or not this version): unknown frame type \
                 17735 (0x4547); its first bytes were \"GET / HT\""
            ),
            "{err}"
        );

        // The CLI pointed at a web server.
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
            let mut sink = [0u8; 1024];
            while s.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        let err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Control, &key(1)).await.err().unwrap()
        );
        assert_eq!(
            err,
            format!(
                "{addr} does not speak the perfplus protocol (or not this version): unknown \
                 frame type 21576 (0x5448); its first bytes were \"HTTP/1.1\""
            )
        );

        // Random bytes whose first two happen to be a known type announce an absurd length.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(&[0x03, 0x02, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .await
            .unwrap();
        let err = server.await.unwrap();
        assert!(
            err.ends_with(
                "does not speak the perfplus protocol (or not this version): payload of \
                 4022250974 bytes exceeds the limit 4219904 for frame Pages"
            ),
            "{err}"
        );

        // A peer that closes after a few bytes.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(&[1, 0, 0]).await.unwrap();
        drop(raw);
        let err = server.await.unwrap();
        assert!(
            err.contains("connection closed by 127.0.0.1:")
                && err.ends_with("in the middle of a frame (3 of the 8 header bytes arrived)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_large_frame_before_the_handshake_is_refused_from_its_header() {
        // The attacker: a 128 MiB VmStart announced before any handshake, then its data.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        let client_addr = raw.local_addr().unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&(FrameType::VmStart as u16).to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&(frame::BULK_MAX as u32).to_le_bytes());
        raw.write_all(&header).await.unwrap();
        // Some of the payload, and the connection kept open: a server that waited for the rest would
        // end with the handshake's timeout instead of this refusal.
        let _ = raw.write_all(&[0x55; 64 * 1024]).await;
        let err = server.await.unwrap();
        assert_eq!(
            err,
            format!(
                "handshake with {client_addr} refused: it sent a frame VmStart (134217728 bytes \
                 announced) before the handshake completed; only Hello, Auth and Error frames of at \
                 most 1024 bytes may come first"
            )
        );

        // An Error frame longer than a handshake refusal needs is refused the same way.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        let mut error = Vec::new();
        frame::encode(
            &Message::Error {
                message: "x".repeat(HANDSHAKE_ERROR_MAX + 1),
            },
            &mut error,
        )
        .unwrap();
        raw.write_all(&error).await.unwrap();
        let err = server.await.unwrap();
        assert!(err.contains("it sent a frame Error (1025 bytes announced)"), "{err}");

        // A message right after a valid Hello, before Auth: refused too (the handshake is not done).
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(&hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))
            .await
            .unwrap();
        let mut list = Vec::new();
        frame::encode(&Message::VmList, &mut list).unwrap();
        raw.write_all(&list).await.unwrap();
        let err = server.await.unwrap();
        assert!(
            err.contains("it sent a frame VmList (0 bytes announced) before the handshake completed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn after_the_handshake_every_frame_type_passes_with_full_buffers() {
        let (mut client, mut server, _) = pair(Role::Peer).await;
        for conn in [&client, &server] {
            assert!(conn.reader.authenticated);
            assert!(conn.writer.buf.capacity() >= READ_BUFFER);
        }
        let batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        client.send(&Message::Pages(batch.clone())).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::Pages(batch));
    }

    #[tokio::test]
    async fn wrong_magic_is_refused() {
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        let mut h = hello(1, 1);
        h[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(b"NOTPERFP");
        raw.write_all(&h).await.unwrap();
        let err = server.await.unwrap();
        assert!(
            err.ends_with(
                "does not speak the perfplus protocol (or not this version): Hello frame carries \
                 magic \"NOTPERFP\" instead of \"PERFPLUS\""
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn incompatible_versions_are_refused_on_both_sides() {
        // A newer client, talking to this build as a server.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(&hello(7, 9)).await.unwrap();
        let client_addr = raw.local_addr().unwrap();
        let err = server.await.unwrap();
        assert_eq!(
            err,
            format!(
                "handshake with {client_addr} refused: incompatible protocol versions: this side \
                 speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer {client_addr} speaks 7..=9"
            )
        );
        // The server answered with its Hello (so the client learns its range), then an Error frame.
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).await.unwrap();
        let reply = frames(&reply);
        assert_eq!(reply.len(), 2, "{reply:?}");
        let Frame::Hello(server_hello) = &reply[0] else {
            panic!("{reply:?}")
        };
        assert_eq!(
            (server_hello.min_version, server_hello.max_version),
            (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
        );
        assert_eq!(
            reply[1],
            Frame::Message(Message::Error {
                message: format!(
                    "incompatible protocol versions: this side speaks \
                     {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer speaks 7..=9"
                )
            })
        );

        // This build as a client, talking to a newer server.
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut first = [0u8; HEADER_LEN + HELLO_LEN];
            s.read_exact(&mut first).await.unwrap();
            s.write_all(&hello(7, 9)).await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Peer, &key(1)).await.err().unwrap()
        );
        assert_eq!(
            err,
            format!(
                "handshake with {addr} refused: incompatible protocol versions: this side speaks \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer {addr} speaks 7..=9"
            )
        );
    }

    #[tokio::test]
    async fn silent_peers_time_out() {
        let limit = Duration::from_millis(200);
        // A client that connects and says nothing.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, key(1), limit));
        let raw = TcpStream::connect(&addr).await.unwrap();
        let client_addr = raw.local_addr().unwrap();
        let started = std::time::Instant::now();
        let err = server.await.unwrap();
        assert_eq!(err, format!("handshake with {client_addr} timed out after 0.2 s"));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(raw);

        // A server that accepts and says nothing.
        let (l, addr) = listener().await;
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let err = Connection::connect_timeout(&addr, Role::Peer, &key(1), limit)
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            format!("connecting to {addr} timed out after 0.2 s (no complete handshake)")
        );
        hold.abort();

        // Nobody listening.
        let (l, addr) = listener().await;
        drop(l);
        let err = Connection::connect(&addr, Role::Peer, &key(1)).await.err().unwrap();
        assert!(
            err.to_string().starts_with(&format!("cannot connect to {addr}: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_from_its_header() {
        let (mut client, mut server, _) = pair(Role::Peer).await;
        let client_addr = server.peer();
        // Announce 4 GiB - 1 of pages and send nothing more: the server must not wait for (or
        // allocate) the payload.
        let mut header = Vec::new();
        header.extend_from_slice(&(FrameType::Pages as u16).to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        client.writer.stream.write_all(&header).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), server.recv())
            .await
            .expect("refused at once")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{client_addr} sent a bad frame: payload of 4294967295 bytes exceeds the limit \
                 4219904 for frame Pages"
            )
        );
    }

    #[tokio::test]
    async fn stray_handshake_frame_and_truncated_frame() {
        let (mut client, mut server, _) = pair(Role::Peer).await;
        let client_addr = server.peer();
        client.writer.stream.write_all(&hello(1, 1)).await.unwrap();
        assert_eq!(
            server.recv().await.unwrap_err().to_string(),
            format!("{client_addr} sent a bad frame: unexpected handshake frame Hello after the handshake")
        );

        let (mut client, mut server, _) = pair(Role::Peer).await;
        let client_addr = server.peer();
        let mut round_end = Vec::new();
        frame::encode(&Message::RoundEnd { round: 5 }, &mut round_end).unwrap();
        client
            .writer
            .stream
            .write_all(&round_end[..HEADER_LEN + 2])
            .await
            .unwrap();
        drop(client);
        assert_eq!(
            server.recv().await.unwrap_err().to_string(),
            format!(
                "connection closed by {client_addr} in the middle of a frame (2 of the 4 payload \
                 bytes of frame RoundEnd arrived)"
            )
        );
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (mut client, mut server, _) = pair(Role::Peer).await;
        let mut bytes = Vec::new();
        let msg = Message::RoundAck {
            round: 3,
            missing: (0..1000).collect(),
        };
        frame::encode(&msg, &mut bytes).unwrap();
        // Header and part of the payload, then a recv that gives up, then the rest.
        client.writer.stream.write_all(&bytes[..5]).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), server.recv())
            .await
            .is_err());
        client.writer.stream.write_all(&bytes[5..100]).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), server.recv())
            .await
            .is_err());
        client.writer.stream.write_all(&bytes[100..]).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), msg);
    }

    #[tokio::test]
    async fn split_halves_stream_and_ack_concurrently() {
        let (client, mut server, _) = pair(Role::Peer).await;
        // Server: acknowledges every batch with its item count, then echoes RoundEnd.
        let server_task = tokio::spawn(async move {
            loop {
                match server.recv().await.unwrap() {
                    Message::Pages(b) => {
                        let items = b.iter().filter(|i| i.is_ok()).count() as u32;
                        server
                            .send(&Message::RoundAck {
                                round: items,
                                missing: vec![],
                            })
                            .await
                            .unwrap();
                    }
                    Message::RoundEnd { round } => {
                        server.send(&Message::RoundEnd { round }).await.unwrap();
                        return server;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let (mut reader, mut writer) = client.into_split();
        let batches = 40u32;
        let writer_task = tokio::spawn(async move {
            for n in 1..=batches {
                let mut b = PageBatch::with_capacity(n as usize);
                for p in 0..n as u64 {
                    match p % 3 {
                        0 => b.push_full(p, &[1; 16], &[p as u8; 4096]),
                        1 => b.push_zero(p),
                        _ => b.push_ref(p, &[2; 16]),
                    }
                }
                writer.send(&Message::Pages(b)).await.unwrap();
            }
            writer.send(&Message::RoundEnd { round: 99 }).await.unwrap();
            writer
        });
        let mut acks = Vec::new();
        loop {
            match reader.recv().await.unwrap() {
                Message::RoundAck { round, .. } => acks.push(round),
                Message::RoundEnd { round } => {
                    assert_eq!(round, 99);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acks, (1..=batches).collect::<Vec<_>>());
        let writer = writer_task.await.unwrap();
        let server = server_task.await.unwrap();
        assert_eq!(writer.bytes_sent(), server.bytes_received());
        assert_eq!(reader.bytes_received(), server.bytes_sent());
        assert_eq!(reader.bytes_sent(), writer.bytes_sent());
        assert_eq!(reader.peer(), writer.peer());
    }
}
