//! The cluster's page-digest secret: what Perf+ page digests are keyed with. Every agent of a cluster
//! holds the same one (`page.key` beside its certificate, derived from the CA key by
//! [`crate::tls::pki::Ca::page_secret`]); CLIs do not need it. It never travels and authenticates no
//! connection (TLS does that, [`crate::tls`]).

use std::fmt;
use std::path::Path;

use anyhow::Context as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Length of a generated key, in bytes.
pub const GENERATED_KEY_LEN: usize = 32;

/// Label of the key whose prefix is the fingerprint.
const FINGERPRINT_LABEL: &str = "perfplus key fingerprint v1";

/// The secret every agent of a cluster holds for page digests. Never sent, never printed: `Debug` shows only the
/// [`fingerprint`](Self::fingerprint).
#[derive(Clone)]
pub struct ClusterKey {
    bytes: Vec<u8>,
}

/// Why a text is not a page key.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the page key is not hex: {0}")]
    NotHex(String),
    #[error("the page key is {len} bytes; at least {MIN_KEY_LEN} are required (generate one: 32 random bytes as hex)")]
    TooShort { len: usize },
}

impl ClusterKey {
    /// Reads a key file: hex text, surrounding whitespace ignored, at least [`MIN_KEY_LEN`] bytes.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<ClusterKey> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("page key file {} does not exist", path.display())
            }
            _ => anyhow::Error::new(e).context(format!("cannot read page key file {}", path.display())),
        })?;
        ClusterKey::from_hex(&text).with_context(|| format!("page key file {}", path.display()))
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

    /// A key for one purpose: HMAC-SHA256(this key, `label`). Different labels give independent keys,
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
        assert!(err.contains("bad: the page key is not hex"), "{err}");
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
}
