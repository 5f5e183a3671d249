//! The handshake that opens every connection, the cluster key it proves, and the bytes of its two
//! messages ([`Hello::to_bytes`], [`Auth`]). No sockets and no frames here: [`Handshake`] is a small
//! state machine that [`super::connection`] drives over the stream, and [`super::frame`] wraps the
//! Hello and Auth bytes in frames.
//!
//! ## Exchange
//! ```text
//! initiator (A)                                   responder (B)
//! |-- Hello{PERFPLUS, min..=max, role, nonce_a} -->|
//! |<-- Hello{PERFPLUS, min..=max, role, nonce_b} --|  both: the version ranges overlap, B echoes the role
//! |-- Auth{HMAC(k, "a" || hello_a || hello_b)} --->|  B checks A's proof before giving its own
//! |<-- Auth{HMAC(k, "b" || hello_b || hello_a)} ---|  A checks B's proof
//! ```
//! `k` is [`ClusterKey::derive`]`("perfplus handshake v1")`, `hello_x` the [`HELLO_LEN`] bytes of that
//! side's Hello as [`Hello::to_bytes`] lays them out (the payload of its Hello frame): each proof covers both nonces (fresh, so a proof cannot be replayed),
//! both version ranges and the role (so they cannot be altered in flight), and names the side that made it
//! (so a proof reflected back at its author does not verify). The proofs are compared in constant time.
//!
//! The agreed version is the highest both ranges contain. A side that refuses the peer (versions, key)
//! sends an `Error` frame that says why, then closes the connection.
//!
//! This authenticates the two ends when the connection opens; it does not encrypt or authenticate the
//! frames that follow (run the cluster on a trusted network or under a tunnel).

use std::fmt;
use std::path::Path;

use anyhow::Context as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use super::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

type HmacSha256 = Hmac<Sha256>;

/// First 8 bytes of every Hello payload.
pub const HELLO_MAGIC: &[u8; 8] = b"PERFPLUS";
/// Bytes of a Hello: magic, two versions, role, nonce (see [`Hello::to_bytes`]).
pub const HELLO_LEN: usize = 8 + 2 + 2 + 1 + 32;
/// Bytes of an Auth: the HMAC-SHA256 proof.
pub const AUTH_LEN: usize = 32;

/// Shortest cluster key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Length of a generated cluster key, in bytes.
pub const GENERATED_KEY_LEN: usize = 32;

/// Label of the key the handshake proofs are made with.
const HANDSHAKE_LABEL: &str = "perfplus handshake v1";
/// Label of the key whose prefix is the fingerprint.
const FINGERPRINT_LABEL: &str = "perfplus key fingerprint v1";

/// What an `Error` frame says to a peer whose proof did not verify.
pub const AUTH_FAILED_MESSAGE: &str = "authentication failed: the peer does not hold this cluster's key";

/// The secret every agent and CLI of a cluster holds. Never sent, never printed: `Debug` shows only the
/// [`fingerprint`](Self::fingerprint).
#[derive(Clone)]
pub struct ClusterKey {
    bytes: Vec<u8>,
}

/// Why a text is not a cluster key.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the cluster key is not hex: {0}")]
    NotHex(String),
    #[error(
        "the cluster key is {len} bytes; at least {MIN_KEY_LEN} are required (generate one: 32 random bytes as hex)"
    )]
    TooShort { len: usize },
}

impl ClusterKey {
    /// Reads a key file: hex text, surrounding whitespace ignored, at least [`MIN_KEY_LEN`] bytes.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<ClusterKey> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("cluster key file {} does not exist", path.display())
            }
            _ => anyhow::Error::new(e).context(format!("cannot read cluster key file {}", path.display())),
        })?;
        ClusterKey::from_hex(&text).with_context(|| format!("cluster key file {}", path.display()))
    }

    /// Parses a key from hex text (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<ClusterKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|e| KeyError::NotHex(e.to_string()))?;
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        Ok(ClusterKey { bytes })
    }

    /// A new random key of [`GENERATED_KEY_LEN`] bytes from the operating system's generator.
    ///
    /// # Panics
    /// If the operating system cannot provide random bytes, which leaves no way to make a key.
    pub fn generate() -> ClusterKey {
        let mut bytes = vec![0u8; GENERATED_KEY_LEN];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        ClusterKey { bytes }
    }

    /// The key as hex text, as [`from_hex`](Self::from_hex) and key files take it.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.bytes)
    }

    /// A key for one purpose: HMAC-SHA256(cluster key, `label`). Different labels give independent keys,
    /// e.g. `derive("perfplus page digest v1")` for page digests.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A short name for the key (16 hex digits of a derived key) that tells keys apart in logs and
    /// errors without revealing anything about the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive(FINGERPRINT_LABEL)[..8])
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.bytes).expect("HMAC takes keys of any length")
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// What a connection is for; each side states it in its Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A CLI talking to an agent.
    Control,
    /// Two agents migrating a VM.
    Peer,
}

/// A Hello: what a side speaks and wants, and its nonce. The magic is implied: [`Hello::to_bytes`]
/// writes it and [`Hello::from_bytes`] checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub role: Role,
    pub nonce: [u8; 32],
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
    /// The Hello's bytes: what the Hello frame carries and what the proofs cover. All integers
    /// little-endian; this layout never changes between versions, since it is what negotiates them:
    /// ```text
    /// offset 0   [u8; 8]   magic "PERFPLUS"
    /// offset 8   u16       min_version
    /// offset 10  u16       max_version
    /// offset 12  u8        role (0 Control, 1 Peer)
    /// offset 13  [u8; 32]  nonce
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
        p[13..45].copy_from_slice(&self.nonce);
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
            nonce: bytes[13..45].try_into().expect("32-byte slice"),
        })
    }
}

/// An Auth: a side's proof that it holds the cluster key. Its bytes are the proof, [`AUTH_LEN`] of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Auth {
    pub mac: [u8; AUTH_LEN],
}

/// Which end of the connection this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opened the connection; speaks first.
    Initiator,
    /// Accepted it.
    Responder,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Initiator => b"a",
            Side::Responder => b"b",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Initiator => Side::Responder,
            Side::Responder => Side::Initiator,
        }
    }
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
    #[error("the peer sent this side's own nonce back (a connection to itself, or a reflection)")]
    ReflectedNonce,
    #[error("{AUTH_FAILED_MESSAGE}")]
    AuthFailed,
}

/// A handshake in progress, up to the exchange of Hellos.
pub struct Handshake {
    side: Side,
    key: [u8; 32],
    own: Hello,
}

/// A handshake whose Hellos were exchanged and agree; what is left is the proofs.
pub struct HelloExchanged {
    side: Side,
    key: [u8; 32],
    own: [u8; HELLO_LEN],
    peer: [u8; HELLO_LEN],
    version: u16,
    peer_role: Role,
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
    pub fn new(side: Side, role: Role, key: &ClusterKey) -> anyhow::Result<Handshake> {
        Handshake::with_versions(side, role, key, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    }

    /// Starts a handshake announcing the version range `min..=max` (tests, and builds that keep an older
    /// version alive).
    pub fn with_versions(
        side: Side,
        role: Role,
        key: &ClusterKey,
        min_version: u16,
        max_version: u16,
    ) -> anyhow::Result<Handshake> {
        anyhow::ensure!(
            min_version <= max_version,
            "empty protocol version range {min_version}..={max_version}"
        );
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("cannot draw a handshake nonce: {e}"))?;
        Ok(Handshake {
            side,
            key: key.derive(HANDSHAKE_LABEL),
            own: Hello {
                min_version,
                max_version,
                role,
                nonce,
            },
        })
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

    /// Checks the peer's Hello against this side's: version ranges overlap, roles agree, nonces differ.
    pub fn receive_hello(self, peer: &Hello) -> Result<HelloExchanged, HandshakeError> {
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
        if peer.nonce == self.own.nonce {
            return Err(HandshakeError::ReflectedNonce);
        }
        Ok(HelloExchanged {
            side: self.side,
            key: self.key,
            own: self.own.to_bytes(),
            peer: peer.to_bytes(),
            version: high,
            peer_role: peer.role,
        })
    }
}

impl HelloExchanged {
    /// This side's proof.
    pub fn auth(&self) -> Auth {
        Auth {
            mac: self
                .proof_mac(self.side, &self.own, &self.peer)
                .finalize()
                .into_bytes()
                .into(),
        }
    }

    /// Checks the peer's proof, in constant time.
    pub fn verify(&self, auth: &Auth) -> Result<Established, HandshakeError> {
        self.proof_mac(self.side.other(), &self.peer, &self.own)
            .verify_slice(&auth.mac)
            .map_err(|_| HandshakeError::AuthFailed)?;
        Ok(Established {
            version: self.version,
            role: self.peer_role,
        })
    }

    /// The MAC `side` computes: HMAC(k, side || its own Hello || the other Hello).
    fn proof_mac(&self, side: Side, own: &[u8], peer: &[u8]) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(side.label());
        mac.update(own);
        mac.update(peer);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_hex(&hex::encode([byte; 32])).unwrap()
    }

    #[test]
    fn key_from_hex_trims_and_checks() {
        let k = ClusterKey::from_hex("  00112233445566778899aabbccddeeff\n").unwrap();
        assert_eq!(k.to_hex(), "00112233445566778899aabbccddeeff");
        assert_eq!(
            ClusterKey::from_hex("zz112233445566778899aabbccddeeff").unwrap_err(),
            KeyError::NotHex("Invalid character 'z' at position 0".into())
        );
        let short = ClusterKey::from_hex("0011").unwrap_err();
        assert_eq!(short, KeyError::TooShort { len: 2 });
        assert!(short.to_string().contains("at least 16"), "{short}");
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("perfplus-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        let generated = ClusterKey::generate();
        std::fs::write(&good, format!("{}\n", generated.to_hex())).unwrap();
        let read = ClusterKey::from_file(&good).unwrap();
        assert_eq!(read.to_hex(), generated.to_hex());
        assert_eq!(read.to_hex().len(), 64);

        let missing = ClusterKey::from_file(dir.join("missing")).unwrap_err();
        assert!(format!("{missing:#}").contains("missing does not exist"), "{missing:#}");
        let bad = dir.join("bad");
        std::fs::write(&bad, "not a key").unwrap();
        let err = format!("{:#}", ClusterKey::from_file(&bad).unwrap_err());
        assert!(err.contains("bad: the cluster key is not hex"), "{err}");
        let short = dir.join("short");
        std::fs::write(&short, "abcd").unwrap();
        let err = format!("{:#}", ClusterKey::from_file(&short).unwrap_err());
        assert!(err.contains("is 2 bytes; at least 16"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_them() {
        let a = ClusterKey::generate();
        let b = ClusterKey::generate();
        assert_ne!(a.to_hex(), b.to_hex());
        let debug = format!("{a:?}");
        assert!(!debug.contains(&a.to_hex()[..8]), "{debug}");
        assert!(debug.contains(&a.fingerprint()), "{debug}");
        assert_eq!(a.fingerprint().len(), 16);
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn derive_is_hmac_sha256_of_the_label() {
        let k = key(0x0b);
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&[0x0b; 32]).unwrap();
        mac.update(b"perfplus page digest v1");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(k.derive("perfplus page digest v1"), expected);
        assert_ne!(k.derive("a"), k.derive("b"));
        assert_ne!(key(1).derive("a"), key(2).derive("a"));
    }

    #[test]
    fn hello_layout() {
        let hello = Hello {
            min_version: 0x0102,
            max_version: 0x0304,
            role: Role::Peer,
            nonce: [7; 32],
        };
        let bytes = hello.to_bytes();
        assert_eq!(&bytes[..13], b"PERFPLUS\x02\x01\x04\x03\x01");
        assert_eq!(bytes[13..], [7; 32]);
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

    fn run(a_key: &ClusterKey, b_key: &ClusterKey) -> (Result<Established, HandshakeError>, bool) {
        let a = Handshake::new(Side::Initiator, Role::Peer, a_key).unwrap();
        let mut b = Handshake::new(Side::Responder, Role::Control, b_key).unwrap();
        b.answer_role(a.hello().role);
        let b_hello = *b.hello();
        let b = b.receive_hello(a.hello()).unwrap();
        let a = a.receive_hello(&b_hello).unwrap();
        match b.verify(&a.auth()) {
            Ok(est) => {
                assert_eq!(est.role, Role::Peer);
                (a.verify(&b.auth()), true)
            }
            Err(e) => (Err(e), false),
        }
    }

    #[test]
    fn same_key_verifies_other_key_does_not() {
        let (a, b_ok) = run(&key(1), &key(1));
        assert!(b_ok);
        assert_eq!(
            a.unwrap(),
            Established {
                version: PROTOCOL_VERSION,
                role: Role::Peer
            }
        );
        let (err, b_ok) = run(&key(1), &key(2));
        assert!(!b_ok);
        assert_eq!(err.unwrap_err().to_string(), AUTH_FAILED_MESSAGE);
    }

    #[test]
    fn reflected_proof_does_not_verify() {
        // A responder that sends the initiator's own proof back must fail, even with identical Hellos
        // apart from the nonce.
        let k = key(3);
        let a = Handshake::new(Side::Initiator, Role::Peer, &k).unwrap();
        let mut b = Handshake::new(Side::Responder, Role::Peer, &k).unwrap();
        b.answer_role(Role::Peer);
        let b_hello = *b.hello();
        let a = a.receive_hello(&b_hello).unwrap();
        assert_eq!(a.verify(&a.auth()), Err(HandshakeError::AuthFailed));
    }

    #[test]
    fn version_ranges_and_roles() {
        let k = key(4);
        let a = Handshake::with_versions(Side::Initiator, Role::Peer, &k, 1, 3).unwrap();
        let b = Handshake::with_versions(Side::Responder, Role::Peer, &k, 2, 5).unwrap();
        assert_eq!(a.receive_hello(b.hello()).unwrap().version, 3);

        let a = Handshake::with_versions(Side::Initiator, Role::Peer, &k, 1, 1).unwrap();
        let b = Handshake::with_versions(Side::Responder, Role::Peer, &k, 2, 3).unwrap();
        let err = a.receive_hello(b.hello()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "incompatible protocol versions: this side speaks 1..=1, the peer speaks 2..=3"
        );

        let a = Handshake::new(Side::Initiator, Role::Control, &k).unwrap();
        let b = Handshake::new(Side::Responder, Role::Peer, &k).unwrap();
        let err = a.receive_hello(b.hello()).err().unwrap();
        assert_eq!(err.to_string(), "the peer answered a Control connection with role Peer");

        let a = Handshake::new(Side::Initiator, Role::Peer, &k).unwrap();
        let own = *a.hello();
        assert_eq!(a.receive_hello(&own).err().unwrap(), HandshakeError::ReflectedNonce);
        assert!(Handshake::with_versions(Side::Initiator, Role::Peer, &k, 3, 2).is_err());
    }
}
