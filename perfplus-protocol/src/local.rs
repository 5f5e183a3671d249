//! Local control connections: the CLI and the agent of one host over the agent's unix control socket
//! (`perfplus agent --control-socket PATH`, `perfplus ... --agent unix:PATH`).
//!
//! No TLS and no certificate: nothing leaves the host, the socket file's mode (0600, the agent's user)
//! says who may connect, and the kernel says who did (`SO_PEERCRED`); the agent turns that into the
//! identity it checks requests against (an operator's, for root or the agent's own user, see
//! `perfplus::agent`). The perfplus handshake (versions, role) runs as it does inside TLS, and a
//! connection that is not an agent's asks for [`Role::Peer`] in vain: only control requests come this
//! way. A local connection has no socket address; errors and logs name its peer [`LOCAL_PEER`].
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use anyhow::anyhow;
use tokio::net::UnixStream;

use crate::connection::{Connection, HANDSHAKE_TIMEOUT};
use crate::handshake::Side;
use crate::{CertRole, Identity, Role};

/// The address a local connection gives as its peer's: 127.0.0.1, port 0.
pub const LOCAL_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// How the CLI names the agent at the other end of a control socket.
pub const LOCAL_AGENT: &str = "local";

fn clear(e: &io::Error) -> String {
    e.to_string()
}

impl Connection {
    /// Connects to the agent's control socket at `path` and runs the perfplus handshake as initiator,
    /// within [`HANDSHAKE_TIMEOUT`]. The agent's identity is taken on the socket file's word: agent
    /// [`LOCAL_AGENT`].
    pub async fn connect_local(path: &Path, role: Role) -> anyhow::Result<Connection> {
        let attempt = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|e| anyhow!("cannot connect to the control socket {}: {e}", path.display()))?;
            let (read, write) = stream.into_split();
            let agent = Identity::new(CertRole::Agent, LOCAL_AGENT).map_err(|e| anyhow!(e))?;
            let (conn, _) = Connection::handshake(
                Box::new(read),
                Box::new(write),
                LOCAL_PEER,
                agent,
                Side::Initiator,
                role,
                &clear,
            )
            .await?;
            Ok(conn)
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
            .await
            .map_err(|_| anyhow!("the handshake over the control socket {} timed out", path.display()))?
    }

    /// Runs the perfplus handshake as responder on a connection accepted on a control socket, from a
    /// peer the caller has identified as `peer` (from its credentials); within [`HANDSHAKE_TIMEOUT`].
    /// Returns the connection and the role asked for ([`Role::Peer`] only from an agent's identity).
    pub async fn accept_local(stream: UnixStream, peer: Identity) -> anyhow::Result<(Connection, Role)> {
        let (read, write) = stream.into_split();
        let handshake = Connection::handshake(
            Box::new(read),
            Box::new(write),
            LOCAL_PEER,
            peer,
            Side::Responder,
            Role::Peer, // replaced by the initiator's
            &clear,
        );
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| anyhow!("handshake on the control socket timed out"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[tokio::test]
    async fn a_control_request_crosses_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let operator = Identity::new(CertRole::Operator, "local-uid-0").unwrap();
        let accept = async {
            let (stream, _) = listener.accept().await.unwrap();
            Connection::accept_local(stream, operator.clone()).await
        };
        let (client, server) = tokio::join!(Connection::connect_local(&path, Role::Control), accept);
        let (mut client, (mut server, role)) = (client.unwrap(), server.unwrap());
        assert_eq!(role, Role::Control);
        assert_eq!(server.peer_identity(), &operator);
        assert_eq!(client.peer_identity().name, LOCAL_AGENT);
        client.send(&Message::VmList).await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Message::VmList);
        server.send(&Message::Done).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::Done);
    }

    #[tokio::test]
    async fn a_local_peer_that_is_no_agent_cannot_open_a_peer_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let operator = Identity::new(CertRole::Operator, "local-uid-0").unwrap();
        let accept = async {
            let (stream, _) = listener.accept().await.unwrap();
            Connection::accept_local(stream, operator).await
        };
        let (client, server) = tokio::join!(Connection::connect_local(&path, Role::Peer), accept);
        assert!(server.is_err(), "the agent refuses a Peer connection from an operator");
        assert!(client.is_err());
    }
}
