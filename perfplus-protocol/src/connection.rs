//! Connections: TLS 1.3 over TCP, buffered into frames, opened by the TLS handshake (mutual, the
//! cluster CA) and then the perfplus handshake (version and role).
//!
//! [`Connection::connect`] (initiator) and [`Connection::accept`] (responder) run both handshakes under
//! a time limit, so a silent or slow peer cannot hold a connection open; after them,
//! [`Connection::send`] and [`Connection::recv`] move [`Message`]s, and [`Connection::peer_identity`]
//! says who the peer is (its certificate's [`Identity`]).
//!
//! - TLS ([`crate::tls`]): both sides present a certificate and verify the other's chain to the
//!   cluster CA. The initiator then checks the responder is an agent (for a migration: the agent
//!   asked for, and one its allow-list admits, [`Credentials::check_responder`]); the responder
//!   admits a peer (agent-to-agent) connection only from an agent's certificate. Everything after the
//!   TLS handshake, the perfplus Hello included, is encrypted and authenticated in TLS records bound to
//!   that handshake: a record altered, replayed, reordered or injected on the way fails authentication
//!   and ends the connection ([`ConnectionError::Tampered`]); nothing of it reaches the caller.
//! - A responder peeks at the first byte: a peer that does not open with a TLS handshake record is
//!   answered in clear with one `Error` frame if it speaks the old (version 3, clear) perfplus
//!   protocol, and refused either way.
//! - Reading: the 8-byte header first; its type, flags and length limit are checked before the payload
//!   buffer is allocated (until the perfplus handshake completes, only Hello and a short `Error` pass:
//!   [`FrameHeader::check_before_handshake`]); then exactly the payload is read into a buffer of that
//!   size (large payloads go straight from the TLS layer into it) and handed to [`frame::decode_payload`],
//!   which keeps a `Pages` or `VmState` payload without copying it. `recv` keeps partial progress in
//!   the reader, so it is cancel-safe (it may be used in `tokio::select!`).
//! - Writing: messages are encoded into a write buffer; [`Connection::feed`] queues one,
//!   [`Connection::flush`] puts the queue on the wire, [`Connection::send`] does both. A `Pages` frame's
//!   items are not copied into the buffer: the header and the batch bytes go to TLS in one vectored
//!   write (TLS encrypts them into records of 16 KiB). `TCP_NODELAY` is set, and every write is
//!   flushed through TLS to the socket, so each leaves at once. With compression on
//!   ([`Connection::set_compression`]), a batch may leave as a `PagesZstd` frame, or, in adaptive
//!   mode, split in two frames in the same write: a `Pages` frame of the pages that look
//!   incompressible, then the rest, compressed or not ([`frame::Compressor::plan_pages`]); the
//!   receiver gets each frame as a [`Message::Pages`] of its own.
//! - Errors: an `Error` frame from the peer becomes an `Err` (`"<peer> reported: <message>"`), an end
//!   of stream becomes `"connection closed by <peer>"`; both are [`ConnectionError`]s inside the
//!   `anyhow::Error`, for callers that need to tell them apart.
//! - Byte counters count frames (headers and the Hellos included), not TLS's own bytes: the TLS
//!   handshake (~2 KiB each way) and 22 bytes per record of up to 16 KiB (0.13 %) come on top.
//! - Memory before the perfplus handshake: it runs with read and write buffers of a few hundred bytes
//!   and admits no frame larger than [`frame::HANDSHAKE_ERROR_MAX`]; the full-size buffers come after.
//!
//! [`Connection::into_split`] gives a reader and a writer half that can live in different tasks
//! (e.g. streaming pages while another task reads acknowledgements); they share the byte counters.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use super::frame::{
    self, CompressionMode, CompressionStats, Compressor, Frame, FrameError, FrameHeader, FrameType, LinkRate, SendPlan,
    ERROR_MAX, HANDSHAKE_ERROR_MAX, HEADER_LEN,
};
use super::handshake::{Established, Handshake, Side};
use super::tls::{self, CertRole, Credentials, Identity, Integrity, Witness};
use super::{Message, Role, PROTOCOL_VERSION};

/// How long connecting plus the handshakes may take before the connection is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Connection::send_error`] tries before giving up on a peer that does not read.
const SEND_ERROR_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer: small frames are read many at a time; larger payloads bypass it.
const READ_BUFFER: usize = 64 * 1024;
/// Read and write buffers during the perfplus handshake (a Hello frame is 21 bytes).
const HANDSHAKE_BUFFER: usize = 256;
/// [`Connection::feed`] writes the queue out once it holds this much.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A write buffer that grew past this (a large frame) is released after the write.
const WRITE_BUFFER_KEEP: usize = 4 * 1024 * 1024;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Read buffer below TLS, once the peer's certificate is verified: rustls reads the socket at most
/// 4 KiB at a time, so without it a 4 MiB page batch costs a thousand `read` calls.
const SOCKET_READ_BUFFER: usize = 256 * 1024;
/// TLS records rustls may hold encrypted and not yet written (its default is 64 KiB): larger writes,
/// fewer of them, for the page stream.
const TLS_SEND_BUFFER: usize = 1024 * 1024;

/// The TCP stream TLS runs on: reads go through a buffer of its own, empty (no buffering, nothing
/// allocated) until [`Socket::grow`] after the peer is authenticated; writes pass straight through.
struct Socket {
    tcp: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Socket {
    fn new(tcp: TcpStream) -> Socket {
        Socket {
            tcp,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    fn grow(&mut self, capacity: usize) {
        if self.buf.len() < capacity {
            self.buf.resize(capacity, 0);
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if this.buf.is_empty() || out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            this.start = 0;
            this.end = fill.filled().len();
            if this.end == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

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
        /// The header bytes as received.
        raw_header: [u8; HEADER_LEN],
    },
    #[error(
        "data from {peer} failed authentication: altered, replayed or injected on the way (a TLS record did \
         not verify); the connection is dropped and nothing of that record was used"
    )]
    Tampered { peer: SocketAddr },
    #[error(
        "{peer} refused this side's data: it failed authentication there (altered, replayed or injected on the \
         way); the connection is dropped"
    )]
    RefusedByPeer { peer: SocketAddr },
    #[error("reading from {peer}: {error}")]
    Io { peer: SocketAddr, error: io::Error },
}

impl ConnectionError {
    /// A read error from the TLS stream, named.
    fn from_io(peer: SocketAddr, error: io::Error) -> ConnectionError {
        match tls::integrity_failure(&error) {
            Some(Integrity::Received) => ConnectionError::Tampered { peer },
            Some(Integrity::RefusedByPeer) => ConnectionError::RefusedByPeer { peer },
            None => ConnectionError::Io { peer, error },
        }
    }
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
    peer_identity: Identity,
}

/// The receiving half of a [`Connection`].
pub struct ConnectionReader {
    stream: BufReader<ReadStream>,
    peer: SocketAddr,
    peer_identity: Identity,
    counters: Arc<Counters>,
    /// Header bytes received so far of the frame being read.
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The frame being read, once its header is checked: its payload so far.
    payload: Option<(FrameHeader, Vec<u8>)>,
    /// The perfplus handshake completed: every frame type may come, up to its own limit. Before, only
    /// the handshake's frames ([`FrameHeader::check_before_handshake`]).
    authenticated: bool,
}

/// The sending half of a [`Connection`].
pub struct ConnectionWriter {
    stream: WriteStream,
    peer: SocketAddr,
    counters: Arc<Counters>,
    /// Encoded frames not yet written.
    buf: Vec<u8>,
    /// The protocol version agreed (compressed page batches from version 5 on, compressed QEMU stream
    /// chunks from version 6 on).
    version: u16,
    /// The TCP socket under the stream (for its kernel delivery-rate estimate), when there is one.
    /// The stream this writer owns keeps it open.
    tcp_fd: Option<RawFd>,
    /// Compression of `Pages` batches and `QemuStream` chunks, when asked for
    /// ([`set_compression`](Self::set_compression)).
    compressor: Option<Box<Compressor>>,
    /// The link's rate from the kernel's delivery-rate samples of this connection.
    link_rate: LinkRate,
}

impl Connection {
    /// Connects to `addr` (host:port) and runs the handshakes as initiator, asking for `role`.
    /// Connecting and the handshakes together may take at most [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(addr: &str, role: Role, credentials: &Credentials) -> anyhow::Result<Connection> {
        Connection::connect_timeout(addr, role, credentials, HANDSHAKE_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with another time limit.
    pub async fn connect_timeout(
        addr: &str,
        role: Role,
        credentials: &Credentials,
        limit: Duration,
    ) -> anyhow::Result<Connection> {
        let attempt = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| anyhow!("cannot connect to {addr}: {e}"))?;
            Connection::open(stream, role, credentials).await
        };
        tokio::time::timeout(limit, attempt).await.map_err(|_| {
            anyhow!(
                "connecting to {addr} timed out after {:.1} s (no complete handshake)",
                limit.as_secs_f64()
            )
        })?
    }

    /// Runs the handshakes as initiator on a connected stream (no time limit: the caller's).
    pub async fn open(stream: TcpStream, role: Role, credentials: &Credentials) -> anyhow::Result<Connection> {
        let peer = stream.peer_addr().context("connected socket has no peer address")?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("setting TCP_NODELAY on the connection to {peer}"))?;
        let witness = Witness::default();
        let connector = tokio_rustls::TlsConnector::from(credentials.client_config(&witness));
        let mut tls = connector
            .connect(Credentials::server_name(), Socket::new(stream))
            .await
            .map_err(|e| {
                anyhow!(tls::describe_tls_error(
                    &e,
                    &peer.to_string(),
                    witness.claimed(),
                    credentials
                ))
            })?;
        let identity = verified_identity(tls.get_ref().1.peer_certificates(), peer)?;
        if let Err(why) = credentials.check_responder(&identity, role == Role::Peer) {
            bail!("refusing {peer}: {why}");
        }
        // The peer's certificate is verified: the buffers for bulk traffic.
        let (socket, session) = tls.get_mut();
        socket.grow(SOCKET_READ_BUFFER);
        session.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let fd = socket.tcp.as_raw_fd();
        let (read, write) = tokio::io::split(tls);
        let (mut conn, _) = Connection::handshake(
            Box::new(read),
            Box::new(write),
            peer,
            identity,
            Side::Initiator,
            role,
            &|e: &io::Error| tls::describe_tls_error(e, &peer.to_string(), witness.claimed(), credentials),
        )
        .await?;
        conn.writer.tcp_fd = Some(fd);
        Ok(conn)
    }

    /// Runs the handshakes as responder on an accepted stream; returns the connection and the role the
    /// peer asked for. The handshakes may take at most [`HANDSHAKE_TIMEOUT`]. A peer connection
    /// ([`Role::Peer`]) is admitted only from an agent's certificate.
    pub async fn accept(stream: TcpStream, credentials: &Credentials) -> anyhow::Result<(Connection, Role)> {
        Connection::accept_timeout(stream, credentials, HANDSHAKE_TIMEOUT).await
    }

    /// [`accept`](Self::accept) with another time limit.
    pub async fn accept_timeout(
        stream: TcpStream,
        credentials: &Credentials,
        limit: Duration,
    ) -> anyhow::Result<(Connection, Role)> {
        let peer = stream.peer_addr().context("accepted connection has no peer address")?;
        tokio::time::timeout(limit, Connection::accept_inner(stream, peer, credentials))
            .await
            .map_err(|_| anyhow!("handshake with {peer} timed out after {:.1} s", limit.as_secs_f64()))?
    }

    async fn accept_inner(
        stream: TcpStream,
        peer: SocketAddr,
        credentials: &Credentials,
    ) -> anyhow::Result<(Connection, Role)> {
        stream
            .set_nodelay(true)
            .with_context(|| format!("setting TCP_NODELAY on the connection from {peer}"))?;
        let mut first = [0u8; 1];
        let n = stream
            .peek(&mut first)
            .await
            .with_context(|| format!("reading from {peer}"))?;
        if n == 0 {
            bail!("connection closed by {peer} during the handshake (before TLS)");
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Err(refuse_clear_peer(stream, peer).await);
        }
        let witness = Witness::default();
        let acceptor = tokio_rustls::TlsAcceptor::from(credentials.server_config(&witness));
        let mut tls = acceptor.accept(Socket::new(stream)).await.map_err(|e| {
            anyhow!(tls::describe_tls_error(
                &e,
                &peer.to_string(),
                witness.claimed(),
                credentials
            ))
        })?;
        let identity = verified_identity(tls.get_ref().1.peer_certificates(), peer)?;
        let (socket, session) = tls.get_mut();
        socket.grow(SOCKET_READ_BUFFER);
        session.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let fd = socket.tcp.as_raw_fd();
        let (read, write) = tokio::io::split(tls);
        let (mut conn, role) = Connection::handshake(
            Box::new(read),
            Box::new(write),
            peer,
            identity,
            Side::Responder,
            Role::Peer, // replaced by the initiator's
            &|e: &io::Error| tls::describe_tls_error(e, &peer.to_string(), witness.claimed(), credentials),
        )
        .await?;
        conn.writer.tcp_fd = Some(fd);
        Ok((conn, role))
    }

    /// Two connected ends over loopback TCP, TLS and handshake done, `role` agreed: the initiator first.
    /// A seam for tests of code that talks over a connection (the engine, the agent), with real sockets,
    /// real TLS and the real handshake rather than a stand-in. The certificates come from a throw-away
    /// CA: agents both, except that the initiator of a [`Role::Control`] pair is an operator.
    pub async fn pair(role: Role) -> anyhow::Result<(Connection, Connection)> {
        let initiator_role = match role {
            Role::Peer => CertRole::Agent,
            Role::Control => CertRole::Operator,
        };
        let (responder, ca) =
            Credentials::ephemeral(&Identity::new(CertRole::Agent, "pair-responder").expect("valid"))?;
        let initiator = Credentials::issued_by(&ca, &Identity::new(initiator_role, "pair-initiator").expect("valid"))?;
        Connection::pair_with(role, &initiator, &responder).await
    }

    /// [`pair`](Self::pair) with given credentials.
    pub async fn pair_with(
        role: Role,
        initiator: &Credentials,
        responder: &Credentials,
    ) -> anyhow::Result<(Connection, Connection)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback listener")?;
        let addr = listener.local_addr()?.to_string();
        let accept = async {
            let (stream, _) = listener.accept().await.context("accepting on loopback")?;
            Connection::accept(stream, responder).await
        };
        let (initiator, responder) = tokio::join!(Connection::connect(&addr, role, initiator), accept);
        let (responder, agreed) = responder?;
        anyhow::ensure!(agreed == role, "loopback pair agreed on {agreed:?}, not {role:?}");
        Ok((initiator?, responder))
    }

    /// A connection over `stream` WITHOUT TLS or handshake: frames in clear, nothing authenticated.
    /// Only for benchmarks that measure what TLS costs against the same framing in clear; no agent
    /// accepts such a connection. The peer is named `identity`.
    #[doc(hidden)]
    pub fn insecure_clear_for_benchmarks(stream: TcpStream, identity: Identity) -> anyhow::Result<Connection> {
        let peer = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        let fd = stream.as_raw_fd();
        let (read, write) = stream.into_split();
        let counters = Arc::new(Counters::default());
        Ok(Connection {
            reader: ConnectionReader {
                stream: BufReader::with_capacity(READ_BUFFER, Box::new(read)),
                peer,
                peer_identity: identity.clone(),
                counters: counters.clone(),
                header: [0; HEADER_LEN],
                header_len: 0,
                payload: None,
                authenticated: true,
            },
            writer: ConnectionWriter::new(Box::new(write), peer, counters, READ_BUFFER, Some(fd)),
            version: PROTOCOL_VERSION,
            peer_identity: identity,
        })
    }

    /// Sends `msg` and flushes. If the peer closed the connection, its reason comes with the error
    /// when it gave one (see [`explain`](Self::explain)).
    pub async fn send(&mut self, msg: &Message) -> anyhow::Result<()> {
        let result = self.writer.send(msg).await;
        self.explain(result).await
    }

    /// Queues `msg`; it goes out with the next [`flush`](Self::flush) (or earlier, when the queue is
    /// large or `msg` is a page batch).
    pub async fn feed(&mut self, msg: &Message) -> anyhow::Result<()> {
        let result = self.writer.feed(msg).await;
        self.explain(result).await
    }

    /// Writes out every queued message.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let result = self.writer.flush().await;
        self.explain(result).await
    }

    /// A write that failed on the socket ("Broken pipe") usually means the peer closed the connection,
    /// and a peer that refuses what it received says why first: an `Error` frame, or the TLS alert of
    /// a record that failed authentication there. Reads that reason (for at most 500 ms) and returns it
    /// with the write's error; anything else read is dropped (the connection is lost anyway).
    async fn explain(&mut self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        let Err(err) = result else {
            return Ok(());
        };
        if err.root_cause().downcast_ref::<io::Error>().is_none() {
            return Err(err);
        }
        let reason = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match self.reader.recv().await {
                    Ok(_) => continue,
                    Err(reason) => return reason,
                }
            }
        })
        .await;
        match reason {
            Ok(reason)
                if matches!(
                    reason.downcast_ref::<ConnectionError>(),
                    Some(
                        ConnectionError::PeerReported { .. }
                            | ConnectionError::RefusedByPeer { .. }
                            | ConnectionError::Tampered { .. }
                    )
                ) =>
            {
                Err(reason.context(format!("{err:#}")))
            }
            _ => Err(err),
        }
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

    /// Frame bytes written, headers and the Hello included (not TLS's own bytes).
    pub fn bytes_sent(&self) -> u64 {
        self.writer.bytes_sent()
    }

    /// Frame bytes read, headers and the Hello included (not TLS's own bytes).
    pub fn bytes_received(&self) -> u64 {
        self.reader.bytes_received()
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.reader.peer
    }

    /// Who the peer is: the identity in its certificate, which chains to the cluster CA.
    pub fn peer_identity(&self) -> &Identity {
        &self.peer_identity
    }

    /// The protocol version agreed in the handshake.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Compresses the `Pages` batches and `QemuStream` chunks this side sends from now on as `mode`
    /// says; see [`ConnectionWriter::set_compression`].
    pub fn set_compression(&mut self, mode: CompressionMode) -> anyhow::Result<()> {
        self.writer.set_compression(mode)
    }

    /// What compression did so far, if it is on.
    pub fn compression_stats(&self) -> Option<CompressionStats> {
        self.writer.compression_stats()
    }

    /// Splits the connection into a reader and a writer that can be used from different tasks.
    pub fn into_split(self) -> (ConnectionReader, ConnectionWriter) {
        (self.reader, self.writer)
    }

    /// The perfplus handshake over the (TLS) stream; the responder also applies the rule that only an
    /// agent opens peer connections.
    pub(crate) async fn handshake(
        read: ReadStream,
        write: WriteStream,
        peer: SocketAddr,
        identity: Identity,
        side: Side,
        role: Role,
        tls_view: &(dyn Fn(&io::Error) -> String + Sync),
    ) -> anyhow::Result<(Connection, Role)> {
        let counters = Arc::new(Counters::default());
        let mut reader = ConnectionReader {
            stream: BufReader::with_capacity(HANDSHAKE_BUFFER, read),
            peer,
            peer_identity: identity.clone(),
            counters: counters.clone(),
            header: [0; HEADER_LEN],
            header_len: 0,
            payload: None,
            authenticated: false,
        };
        let mut writer = ConnectionWriter::new(write, peer, counters, HANDSHAKE_BUFFER, None);
        let established = run_handshake(&mut reader, &mut writer, side, role, &identity, tls_view).await?;
        writer.buf.reserve(READ_BUFFER);
        writer.version = established.version;
        let conn = Connection {
            reader: reader.authenticated(),
            writer,
            version: established.version,
            peer_identity: identity,
        };
        Ok((conn, established.role))
    }
}

/// The identity of a peer whose certificate the TLS handshake verified.
fn verified_identity(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    peer: SocketAddr,
) -> anyhow::Result<Identity> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("{peer} presented no certificate"))?;
    Identity::of_certificate(cert).map_err(|e| anyhow!("the certificate of {peer} is refused: {e}"))
}

/// A peer that did not open with TLS: if it speaks the clear perfplus protocol of versions 1 to 3, tell
/// it in one clear `Error` frame; either way, the error says what it sent.
async fn refuse_clear_peer(mut stream: TcpStream, peer: SocketAddr) -> anyhow::Error {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut header[got..])).await {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
    }
    let first = &header[..got];
    // The old protocol's Hello: type 1, no flags, 45 bytes.
    match header {
        [1, 0, 0, 0, 45, 0, 0, 0] => {
            let mut out = Vec::new();
            let text = format!(
                "this agent speaks perfplus protocol {PROTOCOL_VERSION} over TLS with certificates of the cluster CA; \
                 this side speaks the clear protocol of versions 1 to 3: upgrade it"
            );
            let _ = frame::encode(&Message::Error { message: text }, &mut out);
            // What else the peer sent is read and dropped first (a few KiB at most), so that closing
            // does not reset the connection before it reads the answer.
            let mut sink = [0u8; 1024];
            for _ in 0..4 {
                match stream.try_read(&mut sink) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            let _ = tokio::time::timeout(SEND_ERROR_TIMEOUT, stream.write_all(&out)).await;
            anyhow!(
                "{peer} speaks the perfplus protocol without TLS (version 3 or older, a cluster key): refused; \
                 it must be upgraded to protocol {PROTOCOL_VERSION}"
            )
        }
        _ => anyhow!(
            "{peer} does not speak the perfplus protocol (TLS 1.3): its first bytes were \"{}\"",
            first.escape_ascii()
        ),
    }
}

/// The perfplus handshake over the two halves; see [`super::handshake`] for the exchange.
async fn run_handshake(
    reader: &mut ConnectionReader,
    writer: &mut ConnectionWriter,
    side: Side,
    role: Role,
    identity: &Identity,
    tls_view: &(dyn Fn(&io::Error) -> String + Sync),
) -> anyhow::Result<Established> {
    let peer = reader.peer;
    let mut handshake = Handshake::new(side, role);
    match side {
        Side::Initiator => {
            writer.write_hello(&handshake).await?;
            let hello = reader.handshake_frame(tls_view).await?;
            handshake.receive_hello(&hello).map_err(|e| {
                anyhow!(
                    "handshake with {peer} refused: {}",
                    e.to_string().replace("the peer", &format!("the peer {peer}"))
                )
            })
        }
        Side::Responder => {
            let hello = reader.handshake_frame(tls_view).await?;
            handshake.answer_role(hello.role);
            match handshake.receive_hello(&hello) {
                Err(e) => {
                    // The Hello first, so that the peer learns this side's version range, then why.
                    writer.write_hello(&handshake).await?;
                    writer.send_error_within(&e.to_string(), HANDSHAKE_ERROR_MAX).await;
                    bail!(
                        "handshake with {peer} refused: {}",
                        e.to_string().replace("the peer", &format!("the peer {peer}"))
                    )
                }
                Ok(_) if hello.role == Role::Peer && identity.role != CertRole::Agent => {
                    let text = format!(
                        "a peer (agent-to-agent) connection needs an agent's certificate; this side presented the \
                         certificate of {identity}"
                    );
                    writer.send_error_within(&text, HANDSHAKE_ERROR_MAX).await;
                    bail!(
                        "handshake with {peer} refused: the {identity} there asked for a peer connection, which only \
                         agents may open"
                    )
                }
                Ok(established) => {
                    writer.write_hello(&handshake).await?;
                    Ok(established)
                }
            }
        }
    }
}

impl ConnectionReader {
    /// The reader once the perfplus handshake completed: every frame type admitted, and the full-size
    /// read buffer (unless the peer already sent bytes past its handshake, which the small buffer then
    /// keeps).
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
            Frame::Hello(_) => Err(ConnectionError::BadFrame {
                peer,
                error: FrameError::HandshakeFrame(FrameType::Hello),
                raw_header: self.header,
            }
            .into()),
        }
    }

    /// Frame bytes read (shared with the writer half).
    pub fn bytes_received(&self) -> u64 {
        self.counters.received.load(Ordering::Relaxed)
    }

    /// Frame bytes written by the writer half.
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Who the peer is (its certificate's identity).
    pub fn peer_identity(&self) -> &Identity {
        &self.peer_identity
    }

    /// Reads one frame. Progress is kept in `self` between calls, so dropping the future loses nothing.
    async fn read_frame(&mut self) -> Result<Frame, ConnectionError> {
        let peer = self.peer;
        while self.payload.is_none() {
            if self.header_len < HEADER_LEN {
                let read = self.stream.read(&mut self.header[self.header_len..]).await;
                let n = match read {
                    Ok(n) => n,
                    // A TLS peer that closed without close_notify: an end of stream like any other (the
                    // protocol never takes an end of stream for success).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                    Err(e) => return Err(ConnectionError::from_io(peer, e)),
                };
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
            // buffer goes straight from the TLS layer into it.
            let n = match (&mut self.stream).take(want).read_buf(payload).await {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(ConnectionError::from_io(peer, e)),
            };
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

    /// Reads the peer's Hello, turning everything else into an error that says what the peer did
    /// instead. `tls_view` names TLS failures (e.g. the server's refusal of this side's certificate,
    /// which TLS 1.3 delivers after the client's handshake completed).
    async fn handshake_frame(
        &mut self,
        tls_view: &(dyn Fn(&io::Error) -> String + Sync),
    ) -> anyhow::Result<super::handshake::Hello> {
        let peer = self.peer;
        match self.read_frame().await {
            Ok(Frame::Hello(hello)) => Ok(hello),
            Ok(Frame::Message(Message::Error { message })) => Err(anyhow!("{peer} refused the handshake: {message}")),
            Ok(Frame::Message(msg)) => Err(anyhow!(
                "handshake with {peer} failed: it sent a {} frame where Hello was expected",
                FrameType::of(&msg)
            )),
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
            Err(ConnectionError::Io { error, .. }) if tls::rustls_error(&error).is_some() => {
                Err(anyhow!(tls_view(&error)))
            }
            Err(ConnectionError::Closed { .. }) => Err(anyhow!(
                "connection closed by {peer} during the handshake (waiting for its Hello)"
            )),
            Err(e) => Err(anyhow!("handshake with {peer} failed: {e}")),
        }
    }
}

impl ConnectionWriter {
    fn new(
        stream: WriteStream,
        peer: SocketAddr,
        counters: Arc<Counters>,
        buffer: usize,
        tcp_fd: Option<RawFd>,
    ) -> ConnectionWriter {
        ConnectionWriter {
            stream,
            peer,
            counters,
            buf: Vec::with_capacity(buffer),
            version: PROTOCOL_VERSION,
            tcp_fd,
            compressor: None,
            link_rate: LinkRate::default(),
        }
    }

    /// Sends the `Pages` batches and the `QemuStream` chunks that follow compressed as `mode` says
    /// ([`Compressor`]: one compressor, one rule, its figures for whichever this connection carries).
    /// A peer too old for a compressed frame gets the payload as it is.
    pub fn set_compression(&mut self, mode: CompressionMode) -> anyhow::Result<()> {
        self.compressor = match mode {
            CompressionMode::Off => None,
            mode => Some(Box::new(Compressor::new(mode).context("creating a zstd compressor")?)),
        };
        Ok(())
    }

    /// The compressed frame type for `msg`'s payload, if it has one and the peer decodes it.
    fn compressed_type(&self, msg: &Message) -> Option<FrameType> {
        match msg {
            Message::Pages(_) if self.version >= 5 => Some(FrameType::PagesZstd),
            Message::QemuStream(_) if self.version >= 6 => Some(FrameType::QemuStreamZstd),
            _ => None,
        }
    }

    /// What compression did so far, if it is on.
    pub fn compression_stats(&self) -> Option<CompressionStats> {
        self.compressor.as_ref().map(|c| c.stats())
    }

    /// The link's rate as the kernel measures it (TCP_INFO's delivery rate, see [`LinkRate`]), if this
    /// connection runs over TCP.
    fn link_rate(&mut self) -> Option<f64> {
        if let Some((rate, app_limited)) = self.tcp_fd.and_then(tcp_delivery_rate) {
            self.link_rate.observe(rate, app_limited);
        }
        self.link_rate.estimate()
    }

    /// Sends `msg` and flushes.
    pub async fn send(&mut self, msg: &Message) -> anyhow::Result<()> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Queues `msg`; see [`Connection::feed`].
    pub async fn feed(&mut self, msg: &Message) -> anyhow::Result<()> {
        let peer = self.peer;
        let frame_type = FrameType::of(msg);
        let pages_header = match msg {
            Message::Pages(batch) => {
                Some(frame::pages_header(batch).map_err(|e| anyhow!("cannot send {frame_type} to {peer}: {e}"))?)
            }
            _ => None,
        };
        if let Some(zstd_type) = self.compressor.is_some().then(|| self.compressed_type(msg)).flatten() {
            let link_rate = self.link_rate();
            let compressor = self.compressor.as_mut().expect("checked above");
            let plan = match msg {
                Message::Pages(batch) => compressor.plan_pages(batch, link_rate),
                Message::QemuStream(bytes) => match compressor.compress(bytes, link_rate) {
                    Some(payload) => SendPlan::Compressed(payload),
                    None => SendPlan::AsIs,
                },
                _ => unreachable!("compressed_type has a frame for these only"),
            };
            // Queued messages first, then the frame(s), in one vectored write.
            let written = match plan {
                SendPlan::AsIs => None,
                SendPlan::Compressed(payload) => {
                    self.buf.extend_from_slice(&compressed_header(zstd_type, payload));
                    Some((
                        zstd_type,
                        write_all_vectored(&mut self.stream, &[&self.buf, payload]).await,
                    ))
                }
                SendPlan::Split {
                    first,
                    rest,
                    rest_compressed,
                } => {
                    // The pages that look incompressible as a `Pages` frame, then the rest compressed
                    // or not (see `frame::compression` for why the receiver ends the same).
                    let header =
                        |batch: &frame::PageBatch| frame::pages_header(batch).expect("part of a batch that passed");
                    self.buf.extend_from_slice(&header(first));
                    let (rest_header, rest_payload) = match rest_compressed {
                        Some(payload) => (compressed_header(zstd_type, payload), payload),
                        None => (header(rest), rest.as_bytes()),
                    };
                    let parts = [&self.buf[..], first.as_bytes(), &rest_header, rest_payload];
                    Some((frame_type, write_all_vectored(&mut self.stream, &parts).await))
                }
            };
            if let Some((sent_type, written)) = written {
                self.buf.clear();
                self.account(written)
                    .with_context(|| format!("sending {sent_type} to {peer}"))?;
                return Ok(());
            }
        }
        if let (Some(header), Message::Pages(batch)) = (pages_header, msg) {
            self.buf.extend_from_slice(&header);
            let written = write_all_vectored(&mut self.stream, &[&self.buf, batch.as_bytes()]).await;
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
        self.write_buffer().await.with_context(|| format!("sending to {peer}"))
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

    /// Frame bytes written (shared with the reader half).
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// Frame bytes read by the reader half.
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

    /// Writes the whole buffer, counting what went out, and empties it.
    async fn write_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = write_all_vectored(&mut self.stream, &[&self.buf]).await;
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

/// The delivery rate (bytes/s) the kernel estimates for the TCP connection on `fd`, if it has one,
/// and whether the sample was application-limited.
fn tcp_delivery_rate(fd: RawFd) -> Option<(f64, bool)> {
    // struct tcp_info (include/uapi/linux/tcp.h) up to and past tcpi_delivery_rate, a u64 at byte
    // 160 (kernel 4.9 on); libc's struct stops before it, so the bytes are read by offset. The
    // sample's app-limited flag is bit 0 of byte 7 (`tcpi_delivery_rate_app_limited:1`, the first
    // bit-field after `tcpi_snd_wscale`/`tcpi_rcv_wscale`), also 4.9 on.
    const DELIVERY_RATE: usize = 160;
    const APP_LIMITED_BYTE: usize = 7;
    let mut info = [0u64; 32];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call, and `len` tells the
    // kernel its size; the kernel writes at most that many bytes and stores how many in `len`. A
    // closed or non-TCP fd only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < DELIVERY_RATE + 8 {
        return None;
    }
    let rate = info[DELIVERY_RATE / 8];
    let app_limited = info[0].to_le_bytes()[APP_LIMITED_BYTE] & 1 == 1;
    (rate > 0).then_some((rate as f64, app_limited))
}

/// The header of a compressed frame of type `zstd_type` around `payload`. Its length is within the
/// frame's limit: a compressed payload is sent only if it is smaller than the raw payload, which was.
fn compressed_header(zstd_type: FrameType, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..2].copy_from_slice(&(zstd_type as u16).to_le_bytes());
    header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header
}

/// Most parts [`write_all_vectored`] takes: queued frames, then at most two frames of header and payload.
const WRITE_PARTS: usize = 4;

/// Writes `parts` (at most [`WRITE_PARTS`]) in order with as few writes as the stream allows, then
/// flushes it (TLS keeps the last records it encrypted until flushed); returns the bytes written and
/// the outcome.
async fn write_all_vectored(stream: &mut WriteStream, parts: &[&[u8]]) -> (usize, io::Result<()>) {
    assert!(parts.len() <= WRITE_PARTS, "{} parts to write", parts.len());
    let mut left: [&[u8]; WRITE_PARTS] = [&[]; WRITE_PARTS];
    let mut count = 0;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        left[count] = part;
        count += 1;
    }
    let mut next = 0;
    let mut total = 0;
    while next < count {
        let result = if next + 1 == count {
            stream.write(left[next]).await
        } else {
            let mut slices = [IoSlice::new(&[]); WRITE_PARTS];
            for (slice, part) in slices.iter_mut().zip(&left[next..count]) {
                *slice = IoSlice::new(part);
            }
            stream.write_vectored(&slices[..count - next]).await
        };
        let mut n = match result {
            Ok(0) => return (total, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (total, Err(e)),
        };
        total += n;
        while n > 0 {
            let done = n.min(left[next].len());
            left[next] = &left[next][done..];
            n -= done;
            if left[next].is_empty() {
                next += 1;
            }
        }
    }
    (total, stream.flush().await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, PageBatch, PageItem, PAGE_BATCH_MAX_ITEMS};
    use crate::handshake::{Hello, HELLO_LEN};
    use crate::tls::pki::Ca;
    use crate::MIN_PROTOCOL_VERSION;
    use std::time::SystemTime;
    use tokio::net::TcpListener;

    /// A test cluster: its CA, an agent's and an operator's credentials.
    struct TestCluster {
        ca: Ca,
        agent: Credentials,
        operator: Credentials,
    }

    fn cluster() -> TestCluster {
        let ca = Ca::create("test", 1).unwrap();
        TestCluster {
            agent: creds(&ca, CertRole::Agent, "hostA"),
            operator: creds(&ca, CertRole::Operator, "alice"),
            ca,
        }
    }

    fn creds(ca: &Ca, role: CertRole, name: &str) -> Credentials {
        Credentials::issued_by(ca, &Identity::new(role, name).unwrap()).unwrap()
    }

    async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    /// A handshaken pair: (client, server, role the server saw).
    async fn pair(role: Role) -> (Connection, Connection, Role) {
        let c = cluster();
        let client_creds = match role {
            Role::Peer => creds(&c.ca, CertRole::Agent, "hostB"),
            Role::Control => c.operator.clone(),
        };
        let (l, addr) = listener().await;
        let server_creds = c.agent.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            Connection::accept(stream, &server_creds).await
        });
        let client = Connection::connect(&addr, role, &client_creds).await.unwrap();
        let (server, seen) = server.await.unwrap().unwrap();
        (client, server, seen)
    }

    /// Accepts one connection with `creds` and returns the handshake's error text.
    async fn accept_error(l: TcpListener, creds: Credentials, limit: Duration) -> String {
        let (stream, _) = l.accept().await.unwrap();
        match Connection::accept_timeout(stream, &creds, limit).await {
            Ok(_) => panic!("handshake succeeded"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// A TLS client stream to `addr` with `creds`, to write raw frames inside TLS.
    async fn tls_client(addr: &str, creds: &Credentials) -> tokio_rustls::client::TlsStream<TcpStream> {
        let stream = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(creds.client_config(&Witness::default()))
            .connect(Credentials::server_name(), stream)
            .await
            .unwrap()
    }

    fn hello(min_version: u16, max_version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_hello(
            &Hello {
                min_version,
                max_version,
                role: Role::Peer,
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

    const HANDSHAKE_BYTES: u64 = (HEADER_LEN + HELLO_LEN) as u64;

    #[tokio::test]
    async fn handshake_then_messages_both_ways() {
        let (mut client, mut server, role) = pair(Role::Control).await;
        assert_eq!(role, Role::Control);
        assert_eq!(client.version(), PROTOCOL_VERSION);
        assert_eq!(server.version(), PROTOCOL_VERSION);
        assert_eq!(client.peer_identity().to_string(), "agent \"hostA\"");
        assert_eq!(server.peer_identity().to_string(), "operator \"alice\"");
        // A Hello each way, headers included.
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

        // Both ends count every frame byte, and agree.
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
    async fn certificates_of_another_cluster_are_refused_on_both_sides() {
        let ours = cluster();
        let theirs = cluster();
        // A client with a certificate of another cluster (that trusts this cluster's CA, which is no
        // secret): the agent refuses it, and the client learns why from the alert.
        let issued = theirs
            .ca
            .issue(&Identity::new(CertRole::Operator, "alice").unwrap(), 1)
            .unwrap();
        let stranger = Credentials::from_pem_unchecked(
            ours.ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .unwrap();
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, ours.agent.clone(), HANDSHAKE_TIMEOUT));
        let client_err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Control, &stranger)
                .await
                .err()
                .unwrap()
        );
        let server_err = server.await.unwrap();
        assert!(
            server_err.starts_with("the certificate of 127.0.0.1:")
                && server_err.ends_with(
                    "(operator \"alice\") is not issued by this cluster's CA (cluster \"test\"): a certificate of \
                     another cluster, or self-signed; refused"
                ),
            "{server_err}"
        );
        assert_eq!(
            client_err,
            format!(
                "{addr} refused this side's certificate (operator \"alice\"): it is not issued by the CA of its \
                 cluster"
            )
        );

        // An agent of another cluster, as seen by a client: refused before anything is sent.
        let (l, addr) = listener().await;
        let theirs_agent = theirs.agent.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            Connection::accept(stream, &theirs_agent)
                .await
                .err()
                .map(|e| format!("{e:#}"))
        });
        let client_err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Peer, &ours.agent).await.err().unwrap()
        );
        assert_eq!(
            client_err,
            format!(
                "the certificate of {addr} (agent \"hostA\") is not issued by this cluster's CA (cluster \"test\"): \
                 a certificate of another cluster, or self-signed; refused"
            )
        );
        let server_err = server.await.unwrap().unwrap();
        assert!(
            server_err.ends_with(
                "refused this side's certificate (agent \"hostA\"): it is not issued by the CA of its cluster"
            ),
            "{server_err}"
        );
    }

    #[tokio::test]
    async fn expired_certificates_are_refused_naming_the_date() {
        let c = cluster();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let identity = Identity::new(CertRole::Operator, "bob").unwrap();
        let issued = c.ca.issue_between(&identity, now - 10 * day, now - day).unwrap();
        // Loading expired credentials fails at once, with the date.
        let err = Credentials::from_pem(
            c.ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.starts_with("cert.pem (operator \"bob\"): expired on "), "{err}");
        // Presented anyway (a CLI whose clock is wrong), the agent refuses it.
        let stale = Credentials::from_pem_unchecked(
            c.ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .unwrap();
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let client_err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Control, &stale).await.err().unwrap()
        );
        let server_err = server.await.unwrap();
        assert!(
            server_err.contains("(operator \"bob\") expired on ") && server_err.ends_with("; refused"),
            "{server_err}"
        );
        assert_eq!(
            client_err,
            format!(
                "{addr} refused this side's certificate (operator \"bob\"): it has expired or is not valid yet (by \
                 that side's clock)"
            )
        );
    }

    #[tokio::test]
    async fn roles_and_destinations_are_checked() {
        let c = cluster();
        // An operator asking for a peer (agent-to-agent) connection.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let client_err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Peer, &c.operator).await.err().unwrap()
        );
        let server_err = server.await.unwrap();
        assert!(
            server_err.ends_with(
                "refused: the operator \"alice\" there asked for a peer connection, which only agents may open"
            ),
            "{server_err}"
        );
        assert_eq!(
            client_err,
            format!(
                "{addr} refused the handshake: a peer (agent-to-agent) connection needs an agent's certificate; \
                 this side presented the certificate of operator \"alice\""
            )
        );

        // A client that finds an operator's certificate where it expected an agent: the operator's
        // certificate is not for TLS servers, so the chain check already refuses it.
        let (l, addr) = listener().await;
        let operator = c.operator.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            let _ = Connection::accept(stream, &operator).await;
        });
        let err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Control, &c.agent).await.err().unwrap()
        );
        assert_eq!(
            err,
            format!(
                "the certificate of {addr} (operator \"alice\") is not for this use (an operator's or a reader's \
                 certificate cannot serve as an agent); refused"
            )
        );
        server.await.unwrap();

        // A migration to the wrong agent, or one the allow-list does not admit.
        for (policy, expected) in [
            (
                c.agent.clone().expecting_agent(Some("hostB".into())),
                "it is agent \"hostA\", not the agent \"hostB\" this migration was asked to go to",
            ),
            (
                c.agent
                    .clone()
                    .with_allowed_agents(Some(vec!["hostC".into(), "hostD".into()])),
                "agent \"hostA\" is not among the destinations this agent may migrate to (hostC, hostD)",
            ),
        ] {
            let (l, addr) = listener().await;
            let agent = c.agent.clone();
            let server = tokio::spawn(async move {
                let (stream, _) = l.accept().await.unwrap();
                let _ = Connection::accept(stream, &agent).await;
            });
            let err = format!(
                "{:#}",
                Connection::connect(&addr, Role::Peer, &policy).await.err().unwrap()
            );
            assert_eq!(err, format!("refusing {addr}: {expected}"));
            server.await.unwrap();
        }
        // The allow-list applies to migrations only: the same credentials may still be a CLI's.
        let allowed = c.agent.clone().with_allowed_agents(Some(vec!["hostA".into()]));
        let (l, addr) = listener().await;
        let agent = c.agent.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            Connection::accept(stream, &agent).await.map(|(_, role)| role).unwrap()
        });
        let conn = Connection::connect(&addr, Role::Peer, &allowed).await.unwrap();
        assert_eq!(conn.peer_identity().name, "hostA");
        assert_eq!(server.await.unwrap(), Role::Peer);
    }

    #[tokio::test]
    async fn http_clear_and_garbage_peers_are_refused() {
        let c = cluster();
        // An HTTP client talking to an agent.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let err = server.await.unwrap();
        assert!(
            err.ends_with("does not speak the perfplus protocol (TLS 1.3): its first bytes were \"GET / HT\""),
            "{err}"
        );

        // A perfplus of protocol 3 (clear, cluster key): told in clear, in its own framing.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        let client_addr = raw.local_addr().unwrap();
        let mut old_hello = Vec::new();
        old_hello.extend_from_slice(&(FrameType::Hello as u16).to_le_bytes());
        old_hello.extend_from_slice(&0u16.to_le_bytes());
        old_hello.extend_from_slice(&45u32.to_le_bytes());
        old_hello.extend_from_slice(b"PERFPLUS\x03\x00\x03\x00\x00");
        old_hello.extend_from_slice(&[0x42; 32]);
        raw.write_all(&old_hello).await.unwrap();
        let err = server.await.unwrap();
        assert_eq!(
            err,
            format!(
                "{client_addr} speaks the perfplus protocol without TLS (version 3 or older, a cluster key): refused; \
                 it must be upgraded to protocol {PROTOCOL_VERSION}"
            )
        );
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).await.unwrap();
        let Frame::Message(Message::Error { message }) = &frames(&reply)[0] else {
            panic!("{reply:?}")
        };
        assert!(
            message.starts_with(&format!(
                "this agent speaks perfplus protocol {PROTOCOL_VERSION} over TLS"
            )),
            "{message}"
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
            Connection::connect(&addr, Role::Control, &c.operator)
                .await
                .err()
                .unwrap()
        );
        assert!(
            err.starts_with(&format!("{addr} did not answer with TLS 1.3 ("))
                && err.ends_with("or not a perfplus agent"),
            "{err}"
        );

        // A peer that connects and closes.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        drop(TcpStream::connect(&addr).await.unwrap());
        let err = server.await.unwrap();
        assert!(err.ends_with("during the handshake (before TLS)"), "{err}");
    }

    #[tokio::test]
    async fn a_large_frame_before_the_handshake_is_refused_from_its_header() {
        // The issue's attacker, now with a valid certificate: a 128 MiB VmStart announced inside TLS
        // before the Hello, then its data.
        let c = cluster();
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut tls = tls_client(&addr, &c.operator).await;
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&(FrameType::VmStart as u16).to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&(frame::BULK_MAX as u32).to_le_bytes());
        tls.write_all(&header).await.unwrap();
        let _ = tls.write_all(&[0x55; 64 * 1024]).await;
        let _ = tls.flush().await;
        let err = server.await.unwrap();
        assert_eq!(
            err,
            format!(
                "handshake with {client_addr} refused: it sent a frame VmStart (134217728 bytes announced) before \
                 the handshake completed; only Hello and Error frames of at most 1024 bytes may come first"
            )
        );

        // A message right after a valid Hello is fine only once the Hello is answered; a VmList
        // instead of the Hello is refused.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut tls = tls_client(&addr, &c.operator).await;
        let mut list = Vec::new();
        frame::encode(&Message::VmList, &mut list).unwrap();
        tls.write_all(&list).await.unwrap();
        tls.flush().await.unwrap();
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
    async fn a_compressing_writer_sends_qemu_stream_chunks_compressed_and_they_arrive_as_they_were() {
        let (mut client, mut server, _) = pair(Role::Peer).await;
        client.set_compression(CompressionMode::Always).unwrap();
        // 256 KiB of a stream of few distinct bytes (compresses), then random bytes (does not),
        // then the end of the direction.
        let text: Vec<u8> = (0..256u32 << 10)
            .map(|i| b"eeettaoin s"[(i * 7 % 11) as usize])
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let before = client.bytes_sent();
        for chunk in [&text, &random, &Vec::new()] {
            client.send(&Message::QemuStream(chunk.clone())).await.unwrap();
            assert_eq!(server.recv().await.unwrap(), Message::QemuStream(chunk.clone()));
        }
        let stats = client.compression_stats().unwrap();
        assert_eq!((stats.batches, stats.raw_bytes), (1, text.len() as u64));
        assert_eq!(stats.probes_unused, 1, "the random chunk was tried and sent as it was");
        assert_eq!(
            client.bytes_sent() - before,
            (3 * HEADER_LEN + random.len()) as u64 + stats.compressed_bytes
        );
        assert_eq!(client.bytes_sent(), server.bytes_received());
        // The other direction is the peer's own choice: it sends as is.
        server.send(&Message::QemuStream(text.clone())).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::QemuStream(text.clone()));
        assert_eq!(server.compression_stats(), None);
    }

    #[tokio::test]
    async fn a_mixed_page_batch_crosses_as_its_random_pages_raw_and_the_rest_compressed() {
        use crate::frame::test_support::{guest_text_page, interleave_to, random_page};
        let digest = |p: u64| {
            let mut d = [0xd1; 16];
            d[..8].copy_from_slice(&p.to_le_bytes());
            d
        };
        let (mut client, mut server, _) = pair(Role::Peer).await;
        client.set_compression(CompressionMode::Adaptive).unwrap();
        // A link of 1 MB/s, whatever loopback's delivery rate says: compressing text-like pages pays.
        client.writer.tcp_fd = None;
        client.writer.link_rate.observe(1e6, false);
        // Full pages 70 % random and 30 % text-like (the guest's alphabet), zero markers, and
        // references to the page before (random or text-like).
        let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for p in 0..400u64 {
            match p % 10 {
                0 | 3 | 6 => batch.push_full(p, &digest(p), &guest_text_page(p)),
                4 | 7 => batch.push_ref(p, &digest(p - 1)),
                9 => batch.push_zero(p),
                _ => batch.push_full(p, &digest(p), &random_page(p)),
            }
        }
        let before = client.bytes_sent();
        let sent = Message::Pages(batch.clone());
        let client_task = tokio::spawn(async move {
            client.send(&sent).await.unwrap();
            client
        });
        let Message::Pages(first) = server.recv().await.unwrap() else {
            panic!("not Pages")
        };
        let Message::Pages(rest) = server.recv().await.unwrap() else {
            panic!("not Pages")
        };
        let mut client = client_task.await.unwrap();
        // Every item arrived, as it was, each frame in the batch's order: the random pages and the
        // references to them first, the text-like pages (and everything after the first reference to
        // one, here item 4) compressed after them.
        assert!(interleave_to(&batch, &first, &rest));
        let pages = |b: &PageBatch| b.iter().map(|i| i.unwrap().page()).collect::<Vec<_>>();
        assert_eq!(pages(&first), [1, 2]);
        let stats = client.compression_stats().unwrap();
        assert_eq!((stats.batches, stats.raw_bytes), (1, rest.payload_len() as u64));
        let wire = client.bytes_sent() - before;
        assert_eq!(
            wire,
            (2 * HEADER_LEN + first.payload_len()) as u64 + stats.compressed_bytes
        );
        assert_eq!(client.bytes_sent(), server.bytes_received());

        // The same content with the references to text-like pages pointing at random ones: the
        // split goes through the whole batch.
        let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for p in 0..400u64 {
            match p % 10 {
                0 | 3 | 6 => batch.push_full(p, &digest(p), &guest_text_page(p)),
                4 | 7 => batch.push_ref(p, &digest(p - 2)),
                9 => batch.push_zero(p),
                _ => batch.push_full(p, &digest(p), &random_page(p)),
            }
        }
        let before = (client.bytes_sent(), client.compression_stats().unwrap());
        client.send(&Message::Pages(batch.clone())).await.unwrap();
        let Message::Pages(first) = server.recv().await.unwrap() else {
            panic!("not Pages")
        };
        let Message::Pages(rest) = server.recv().await.unwrap() else {
            panic!("not Pages")
        };
        assert!(interleave_to(&batch, &first, &rest));
        let random = |b: &PageBatch| {
            b.iter()
                .filter(|i| matches!(i, Ok(PageItem::Full { page, .. }) if !matches!(page % 10, 0 | 3 | 6)))
                .count()
        };
        assert_eq!((random(&first), random(&rest)), (160, 0));
        assert_eq!(rest.len(), 120, "the text-like pages only");
        let stats = client.compression_stats().unwrap();
        let compressed = stats.compressed_bytes - before.1.compressed_bytes;
        let wire = client.bytes_sent() - before.0;
        assert_eq!(wire, (2 * HEADER_LEN + first.payload_len()) as u64 + compressed);
        // Fewer bytes than the batch as it was: its text-like pages (43 % of the full ones) about halved.
        assert!(
            wire * 100 < (HEADER_LEN + batch.payload_len()) as u64 * 85,
            "{wire} bytes for {}",
            batch.payload_len()
        );

        // A batch of random pages, zero markers and references goes as it is, in one frame, and zstd
        // does not run.
        let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for p in 0..100u64 {
            match p % 4 {
                0 => batch.push_zero(p),
                1 => batch.push_ref(p, &digest(p - 1)),
                _ => batch.push_full(p, &digest(p), &random_page(p)),
            }
        }
        let before = (client.bytes_sent(), client.compression_stats().unwrap());
        client.send(&Message::Pages(batch.clone())).await.unwrap();
        client.send(&Message::Ping).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::Pages(batch.clone()));
        assert_eq!(server.recv().await.unwrap(), Message::Ping);
        let stats = client.compression_stats().unwrap();
        assert_eq!(
            (stats.batches, stats.raw_bytes, stats.probes_unused),
            (before.1.batches, before.1.raw_bytes, before.1.probes_unused)
        );
        assert_eq!(
            client.bytes_sent() - before.0,
            (2 * HEADER_LEN + batch.payload_len()) as u64
        );
    }

    #[tokio::test]
    async fn wrong_magic_is_refused() {
        let c = cluster();
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut tls = tls_client(&addr, &c.operator).await;
        let mut h = hello(4, 4);
        h[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(b"NOTPERFP");
        tls.write_all(&h).await.unwrap();
        tls.flush().await.unwrap();
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
        let c = cluster();
        // A newer client, talking to this build as a server.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), HANDSHAKE_TIMEOUT));
        let mut tls = tls_client(&addr, &c.agent).await;
        tls.write_all(&hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3))
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let err = server.await.unwrap();
        assert_eq!(
            err,
            format!(
                "handshake with {client_addr} refused: incompatible protocol versions: this side \
                 speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer {client_addr} speaks {}..={}",
                PROTOCOL_VERSION + 1,
                PROTOCOL_VERSION + 3
            )
        );
        // The server answered with its Hello (so the client learns its range), then an Error frame.
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply).await;
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
                     {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer speaks {}..={}",
                    PROTOCOL_VERSION + 1,
                    PROTOCOL_VERSION + 3
                )
            })
        );

        // This build as a client, talking to a newer server.
        let (l, addr) = listener().await;
        let agent = c.agent.clone();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = tokio_rustls::TlsAcceptor::from(agent.server_config(&Witness::default()))
                .accept(s)
                .await
                .unwrap();
            let mut first = [0u8; HEADER_LEN + HELLO_LEN];
            s.read_exact(&mut first).await.unwrap();
            s.write_all(&hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3))
                .await
                .unwrap();
            s.flush().await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let err = format!(
            "{:#}",
            Connection::connect(&addr, Role::Peer, &c.agent).await.err().unwrap()
        );
        assert_eq!(
            err,
            format!(
                "handshake with {addr} refused: incompatible protocol versions: this side speaks \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer {addr} speaks {}..={}",
                PROTOCOL_VERSION + 1,
                PROTOCOL_VERSION + 3
            )
        );
    }

    #[tokio::test]
    async fn silent_peers_time_out() {
        let c = cluster();
        let limit = Duration::from_millis(200);
        // A client that connects and says nothing.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), limit));
        let raw = TcpStream::connect(&addr).await.unwrap();
        let client_addr = raw.local_addr().unwrap();
        let err = server.await.unwrap();
        assert_eq!(err, format!("handshake with {client_addr} timed out after 0.2 s"));
        drop(raw);

        // A client that completes TLS and then says nothing.
        let (l, addr) = listener().await;
        let server = tokio::spawn(accept_error(l, c.agent.clone(), limit));
        let tls = tls_client(&addr, &c.operator).await;
        let client_addr = tls.get_ref().0.local_addr().unwrap();
        let err = server.await.unwrap();
        assert_eq!(err, format!("handshake with {client_addr} timed out after 0.2 s"));
        drop(tls);

        // A server that accepts and says nothing.
        let (l, addr) = listener().await;
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let err = Connection::connect_timeout(&addr, Role::Peer, &c.agent, limit)
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
        let err = Connection::connect(&addr, Role::Peer, &c.agent).await.err().unwrap();
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
        client.writer.stream.flush().await.unwrap();
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
        client.writer.stream.flush().await.unwrap();
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
        client.writer.stream.flush().await.unwrap();
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
        client.writer.stream.flush().await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), server.recv())
            .await
            .is_err());
        client.writer.stream.write_all(&bytes[5..100]).await.unwrap();
        client.writer.stream.flush().await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), server.recv())
            .await
            .is_err());
        client.writer.stream.write_all(&bytes[100..]).await.unwrap();
        client.writer.stream.flush().await.unwrap();
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

    /// What the relay does to the first client-to-server TLS record after it is armed.
    #[derive(Clone, Copy)]
    enum Tamper {
        /// Flip one bit of its ciphertext.
        FlipBit,
        /// Forward it twice (a replay).
        Replay,
    }

    /// A relay on the path between a client and `upstream`: forwards whole TLS records both ways, and
    /// applies `tamper` to the first client-to-server record once `armed` is set. Returns its address.
    async fn relay(upstream: String, tamper: Tamper, armed: Arc<std::sync::atomic::AtomicBool>) -> String {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (client, _) = l.accept().await.unwrap();
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let back = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            let mut done = false;
            loop {
                let mut header = [0u8; 5];
                if cr.read_exact(&mut header).await.is_err() {
                    break;
                }
                let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                let mut record = header.to_vec();
                record.resize(5 + len, 0);
                if cr.read_exact(&mut record[5..]).await.is_err() {
                    break;
                }
                let mut copies = 1;
                if !done && armed.load(Ordering::SeqCst) {
                    done = true;
                    match tamper {
                        Tamper::FlipBit => record[5 + len / 2] ^= 0x10,
                        Tamper::Replay => copies = 2,
                    }
                }
                for _ in 0..copies {
                    if sw.write_all(&record).await.is_err() {
                        break;
                    }
                }
            }
            back.abort();
        });
        addr
    }

    /// A pair through a [`relay`]: (client, server, the relay's trigger).
    async fn relayed_pair(tamper: Tamper) -> (Connection, Connection, Arc<std::sync::atomic::AtomicBool>) {
        let c = cluster();
        let (l, upstream) = listener().await;
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = relay(upstream, tamper, armed.clone()).await;
        let agent = c.agent.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = l.accept().await.unwrap();
            Connection::accept(stream, &agent).await.unwrap().0
        });
        let mut client = Connection::connect(&addr, Role::Peer, &creds(&c.ca, CertRole::Agent, "hostB"))
            .await
            .unwrap();
        let mut server = server.await.unwrap();
        // One round trip: every handshake record has passed the relay before it is armed.
        client.send(&Message::Ping).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::Ping);
        server.send(&Message::Ping).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::Ping);
        (client, server, armed)
    }

    #[tokio::test]
    async fn a_flipped_bit_or_a_replayed_record_ends_the_connection_on_both_sides() {
        for tamper in [Tamper::FlipBit, Tamper::Replay] {
            // A page batch whose first record is altered (or replayed) on the way.
            let (mut client, mut server, armed) = relayed_pair(tamper).await;
            let client_addr = server.peer();
            let server_addr = client.peer();
            armed.store(true, Ordering::SeqCst);
            let mut batch = PageBatch::with_capacity(64);
            for p in 0..64u64 {
                batch.push_full(p, &[3; 16], &[p as u8; 4096]);
            }
            let _ = client.send(&Message::Pages(batch)).await;
            // A flipped bit fails the record's tag; a replayed record arrives where the next is due, and
            // TLS's record numbers (in the nonce) make it fail the same way.
            let err = server.recv().await.unwrap_err();
            assert!(
                matches!(
                    err.downcast_ref::<ConnectionError>(),
                    Some(ConnectionError::Tampered { .. })
                ),
                "{err:#}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "data from {client_addr} failed authentication: altered, replayed or injected on the way (a TLS \
                     record did not verify); the connection is dropped and nothing of that record was used"
                )
            );
            // The sender learns it from the peer's alert.
            let err = client.recv().await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{server_addr} refused this side's data: it failed authentication there (altered, replayed or \
                     injected on the way); the connection is dropped"
                )
            );
        }

        // A control request rewritten on the way (the issue's `vm list` into `vm stop`): one bit of the
        // record is enough to be caught, whatever it changes.
        let (mut client, mut server, armed) = relayed_pair(Tamper::FlipBit).await;
        armed.store(true, Ordering::SeqCst);
        client.send(&Message::VmList).await.unwrap();
        let err = server.recv().await.unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<ConnectionError>(),
                Some(ConnectionError::Tampered { .. })
            ),
            "{err:#}"
        );
    }
}
