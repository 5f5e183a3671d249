//! The perfplus handshake that opens every connection once TLS is up: which protocol version and what
//! the connection is for. No sockets and no frames here: [`Handshake`] is a small state machine that
//! [`super::connection`] drives over the (TLS) stream, and [`super::frame`] wraps the Hello bytes in a
//! frame.
//!
//! ## Exchange (inside TLS 1.3, both ends authenticated by their certificates)
//! ```text
//! initiator (A)                           responder (B)
//! |-- Hello{PERFPLUS, min..=max, role} -->|
//! |<-- Hello{PERFPLUS, min..=max, role} --|  both: the version ranges overlap; B echoes the role
//! |                                        |  (or an Error frame: versions, or a role B's policy refuses)
//! ```
//! Authentication is TLS's (mutual, certificates of the cluster CA, see [`crate::tls`]); every byte of
//! the Hellos and of what follows is encrypted and authenticated by TLS and bound to its handshake, so
//! nothing here needs a nonce or a proof. The agreed version is the highest both ranges contain.
//! A side that refuses the peer sends an `Error` frame that says why, then closes the connection.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// First 8 bytes of every Hello payload.
pub const HELLO_MAGIC: &[u8; 8] = b"PERFPLUS";
/// Bytes of a Hello: magic, two versions, role (see [`Hello::to_bytes`]).
pub const HELLO_LEN: usize = 8 + 2 + 2 + 1;

/// What a connection is for; each side states it in its Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A CLI talking to an agent.
    Control,
    /// Two agents migrating a VM.
    Peer,
}

/// A Hello: what a side speaks and wants. The magic is implied: [`Hello::to_bytes`] writes it and
/// [`Hello::from_bytes`] checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub role: Role,
}

/// Why [`HELLO_LEN`] bytes are not a Hello.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HelloError {
    #[error(
        "magic \"{found}\" instead of \"{expected}\"",
        found = found.escape_ascii(),
        expected = HELLO_MAGIC.escape_ascii()
    )]
    BadMagic { found: [u8; 8] },
    #[error("version range {min}..={max} is empty")]
    EmptyVersionRange { min: u16, max: u16 },
    #[error("unknown role {0}")]
    UnknownRole(u8),
}

impl Hello {
    /// The Hello's bytes: what the Hello frame carries. All integers little-endian; from version 4 on
    /// this layout never changes between versions, since it is what negotiates them:
    /// ```text
    /// offset 0   [u8; 8]   magic "PERFPLUS"
    /// offset 8   u16       min_version
    /// offset 10  u16       max_version
    /// offset 12  u8        role (0 Control, 1 Peer)
    /// ```
    pub fn to_bytes(&self) -> [u8; HELLO_LEN] {
        let mut p = [0u8; HELLO_LEN];
        p[0..8].copy_from_slice(HELLO_MAGIC);
        p[8..10].copy_from_slice(&self.min_version.to_le_bytes());
        p[10..12].copy_from_slice(&self.max_version.to_le_bytes());
        p[12] = match self.role {
            Role::Control => 0,
            Role::Peer => 1,
        };
        p
    }

    /// Parses what [`to_bytes`](Self::to_bytes) writes, checking the magic, that the version range is
    /// not empty, and the role.
    pub fn from_bytes(bytes: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8-byte slice");
        if &magic != HELLO_MAGIC {
            return Err(HelloError::BadMagic { found: magic });
        }
        let min_version = u16::from_le_bytes([bytes[8], bytes[9]]);
        let max_version = u16::from_le_bytes([bytes[10], bytes[11]]);
        if min_version > max_version {
            return Err(HelloError::EmptyVersionRange {
                min: min_version,
                max: max_version,
            });
        }
        let role = match bytes[12] {
            0 => Role::Control,
            1 => Role::Peer,
            other => return Err(HelloError::UnknownRole(other)),
        };
        Ok(Hello {
            min_version,
            max_version,
            role,
        })
    }
}

/// Which end of the connection this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opened the connection; speaks first.
    Initiator,
    /// Accepted it.
    Responder,
}

/// Why the handshake refused the peer. The texts are from this side's point of view; "the peer" is
/// the other end.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("incompatible protocol versions: this side speaks {ours_min}..={ours_max}, the peer speaks {theirs_min}..={theirs_max}")]
    IncompatibleVersions {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },
    #[error("the peer answered a {asked:?} connection with role {answered:?}")]
    RoleMismatch { asked: Role, answered: Role },
}

/// A handshake in progress.
pub struct Handshake {
    side: Side,
    own: Hello,
}

/// The outcome of a successful handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Established {
    /// The protocol version both sides speak on this connection.
    pub version: u16,
    /// The role the initiator asked for (and the responder echoed).
    pub role: Role,
}

impl Handshake {
    /// Starts a handshake with this build's version range. The responder's `role` is ignored: it echoes
    /// the initiator's (pass any).
    pub fn new(side: Side, role: Role) -> Handshake {
        Handshake::with_versions(side, role, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    }

    /// Starts a handshake announcing the version range `min..=max` (tests, and builds that keep an older
    /// version alive). An empty range is made a single version (`max`).
    pub fn with_versions(side: Side, role: Role, min_version: u16, max_version: u16) -> Handshake {
        Handshake {
            side,
            own: Hello {
                min_version: min_version.min(max_version),
                max_version,
                role,
            },
        }
    }

    /// This side's Hello. The responder sends it after receiving the initiator's and setting its role
    /// with [`Handshake::answer_role`].
    pub fn hello(&self) -> &Hello {
        &self.own
    }

    /// Responder: echo the role the initiator asked for.
    pub fn answer_role(&mut self, role: Role) {
        self.own.role = role;
    }

    /// Checks the peer's Hello against this side's: version ranges overlap, roles agree.
    pub fn receive_hello(&self, peer: &Hello) -> Result<Established, HandshakeError> {
        let low = self.own.min_version.max(peer.min_version);
        let high = self.own.max_version.min(peer.max_version);
        if low > high {
            return Err(HandshakeError::IncompatibleVersions {
                ours_min: self.own.min_version,
                ours_max: self.own.max_version,
                theirs_min: peer.min_version,
                theirs_max: peer.max_version,
            });
        }
        if self.side == Side::Initiator && peer.role != self.own.role {
            return Err(HandshakeError::RoleMismatch {
                asked: self.own.role,
                answered: peer.role,
            });
        }
        Ok(Established {
            version: high,
            role: peer.role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_layout() {
        let hello = Hello {
            min_version: 0x0102,
            max_version: 0x0304,
            role: Role::Peer,
        };
        let bytes = hello.to_bytes();
        assert_eq!(&bytes[..], b"PERFPLUS\x02\x01\x04\x03\x01");
        assert_eq!(Hello::from_bytes(&bytes), Ok(hello));

        let mut bad = bytes;
        bad[..8].copy_from_slice(b"NOTPERFP");
        assert_eq!(
            Hello::from_bytes(&bad).unwrap_err().to_string(),
            "magic \"NOTPERFP\" instead of \"PERFPLUS\""
        );
        let mut bad = bytes;
        bad[12] = 9;
        assert_eq!(Hello::from_bytes(&bad), Err(HelloError::UnknownRole(9)));
        let mut bad = bytes;
        bad[8..10].copy_from_slice(&0x0405u16.to_le_bytes()); // min 1029 > max 772
        assert_eq!(
            Hello::from_bytes(&bad).unwrap_err().to_string(),
            "version range 1029..=772 is empty"
        );
    }

    #[test]
    fn version_ranges_and_roles() {
        let a = Handshake::with_versions(Side::Initiator, Role::Peer, 1, 3);
        let b = Handshake::with_versions(Side::Responder, Role::Peer, 2, 5);
        assert_eq!(
            a.receive_hello(b.hello()).unwrap(),
            Established {
                version: 3,
                role: Role::Peer
            }
        );

        let a = Handshake::with_versions(Side::Initiator, Role::Peer, 1, 1);
        let b = Handshake::with_versions(Side::Responder, Role::Peer, 2, 3);
        let err = a.receive_hello(b.hello()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "incompatible protocol versions: this side speaks 1..=1, the peer speaks 2..=3"
        );

        let a = Handshake::new(Side::Initiator, Role::Control);
        let b = Handshake::new(Side::Responder, Role::Peer);
        let err = a.receive_hello(b.hello()).err().unwrap();
        assert_eq!(err.to_string(), "the peer answered a Control connection with role Peer");

        // The responder takes the initiator's role.
        let a = Handshake::new(Side::Initiator, Role::Control);
        let mut b = Handshake::new(Side::Responder, Role::Peer);
        b.answer_role(a.hello().role);
        assert_eq!(b.receive_hello(a.hello()).unwrap().role, Role::Control);
        assert_eq!(a.receive_hello(b.hello()).unwrap().version, PROTOCOL_VERSION);
    }
}
