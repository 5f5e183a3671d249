//! TLS 1.3 with mutual authentication under a cluster CA: what every connection runs on (protocol
//! version 4 on).
//!
//! - [`pki`]: the cluster CA, issuing certificates, the page-digest secret derived from the CA key.
//! - [`identity`]: what a certificate names ([`Identity`]: a [`CertRole`] and a name).
//! - [`Credentials`] (here): one side's CA, certificate and key, loaded from a directory, and the
//!   per-connection TLS configurations with verifiers that remember what the peer presented, so that
//!   a refusal names it. [`describe_tls_error`] turns what rustls reports into a sentence.
//!
//! Both ends present a certificate and verify the other's chain to the cluster CA, at the current time;
//! there is no server-name check: a peer is who its certificate's [`Identity`] says, and each use
//! checks that identity (an agent for migrations, the agent the operator named, the allow-list, the
//! role of a CLI). Only TLS 1.3 is compiled in (AES-128-GCM preferred, AES-256-GCM, ChaCha20-Poly1305);
//! no session resumption, no early data. ALPN `perfplus` keeps other TLS services from being mistaken
//! for an agent.

pub mod identity;
pub mod pki;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub use identity::{CertRole, Identity};

/// The ALPN protocol name both sides require.
pub const ALPN: &[u8] = b"perfplus";
/// File names in a credentials directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The page-digest secret (agents only).
pub const PAGE_KEY_FILE: &str = "page.key";

/// The crypto this build uses: ring, TLS 1.3 suites only, AES-128-GCM first (the cheapest per byte
/// with AES-NI).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// What the other end must be, checked by the side that opens a connection once TLS is up (the
/// chain to the CA is checked during the TLS handshake, by both sides).
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    /// Agents this side may open peer (migration) connections to; None: any agent of the cluster.
    pub allowed_agents: Option<Vec<String>>,
    /// The one agent an operator named for this migration (`perfplus migrate --to-agent`).
    pub expected_agent: Option<String>,
}

/// One side's TLS credentials: the cluster CA, its certificate and key, its identity, and what it
/// requires of the peers it connects to. Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    loaded: Arc<Loaded>,
    policy: PeerPolicy,
}

struct Loaded {
    identity: Identity,
    cluster: String,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.loaded.identity)
            .field("cluster", &self.loaded.cluster)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The certificates in a PEM text.
fn certs_of(pem: &[u8], what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{what} is not PEM: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "{what} holds no certificate");
    Ok(certs)
}

impl Credentials {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir` (as `perfplus cert issue` writes them).
    pub fn load(dir: &Path) -> anyhow::Result<Credentials> {
        let read = |file: &str| -> anyhow::Result<Vec<u8>> {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => anyhow!(
                    "{} does not exist (make the credentials with `perfplus ca init` and `perfplus cert issue`)",
                    path.display()
                ),
                _ => anyhow::Error::new(e).context(format!("reading {}", path.display())),
            })
        };
        Credentials::from_pem(&read(CA_FILE)?, &read(CERT_FILE)?, &read(KEY_FILE)?)
            .with_context(|| format!("the credentials in {}", dir.display()))
    }

    /// Credentials from PEM texts: the CA certificate, this side's certificate (chain) and its key.
    /// The certificate must chain to the CA and be valid now.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Credentials> {
        let loaded = Loaded::from_pem(ca_pem, cert_pem, key_pem)?;
        // This side's own certificate, checked as a peer would: a wrong CA or an expired certificate is
        // found when the agent starts or the CLI runs, not on the first connection.
        loaded.verify_own().map_err(|e| {
            anyhow!(
                "{CERT_FILE} ({}): {}",
                loaded.identity,
                certificate_problem(&e, &loaded.cluster)
            )
        })?;
        Ok(Credentials {
            loaded: Arc::new(loaded),
            policy: PeerPolicy::default(),
        })
    }

    /// [`from_pem`](Self::from_pem) without checking this side's own certificate against the CA: only
    /// for tests that present a certificate a peer must refuse (expired, of another cluster). Peers
    /// check it all the same.
    #[doc(hidden)]
    pub fn from_pem_unchecked(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Credentials> {
        Ok(Credentials {
            loaded: Arc::new(Loaded::from_pem(ca_pem, cert_pem, key_pem)?),
            policy: PeerPolicy::default(),
        })
    }

    /// Credentials for a new throw-away cluster: `identity`'s certificate from a new CA, plus the CA to
    /// issue more (tests and the loopback [`Connection::pair`](crate::connection::Connection::pair)).
    pub fn ephemeral(identity: &Identity) -> anyhow::Result<(Credentials, pki::Ca)> {
        let ca = pki::Ca::create("ephemeral", 1)?;
        let creds = Credentials::issued_by(&ca, identity)?;
        Ok((creds, ca))
    }

    /// A certificate for `identity` from `ca`, as credentials (tests).
    pub fn issued_by(ca: &pki::Ca, identity: &Identity) -> anyhow::Result<Credentials> {
        let issued = ca.issue(identity, 1)?;
        Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
    }

    /// Who this side is.
    pub fn identity(&self) -> &Identity {
        &self.loaded.identity
    }

    /// The cluster's name, from its CA certificate.
    pub fn cluster(&self) -> &str {
        &self.loaded.cluster
    }

    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// These credentials, opening peer connections only to the agents named (None: any of the cluster).
    pub fn with_allowed_agents(mut self, agents: Option<Vec<String>>) -> Credentials {
        self.policy.allowed_agents = agents;
        self
    }

    /// These credentials, opening peer connections only to the agent named `agent` (None: any).
    pub fn expecting_agent(mut self, agent: Option<String>) -> Credentials {
        self.policy.expected_agent = agent;
        self
    }

    /// The TLS configuration of one outgoing connection; `witness` learns what the server presented.
    pub(crate) fn client_config(&self, witness: &Witness) -> Arc<ClientConfig> {
        let verifier = Arc::new(AgentVerifier {
            roots: self.loaded.roots.clone(),
            provider: self.loaded.provider.clone(),
            witness: witness.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.loaded.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.loaded.certified.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }

    /// The TLS configuration of one accepted connection; `witness` learns what the client presented.
    pub(crate) fn server_config(&self, witness: &Witness) -> Arc<ServerConfig> {
        let verifier = Arc::new(ClientVerifier {
            inner: self.loaded.client_verifier.clone(),
            witness: witness.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.loaded.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.loaded.certified.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Arc::new(config)
    }

    /// The server name given to rustls: unused (the verifier checks identities, not names) and not sent
    /// (no SNI).
    pub(crate) fn server_name() -> ServerName<'static> {
        ServerName::try_from("perfplus-agent").expect("a valid DNS name")
    }

    /// Checks, on the side that opened a connection, that the peer may be talked to: an agent (the CLI
    /// and agents talk to agents only), and for a migration one this side may send guests to.
    pub(crate) fn check_responder(&self, peer: &Identity, migration: bool) -> Result<(), String> {
        if peer.role != CertRole::Agent {
            return Err(format!(
                "it presented the certificate of {peer}; only agents serve perfplus connections"
            ));
        }
        if !migration {
            return Ok(());
        }
        if let Some(expected) = &self.policy.expected_agent {
            if &peer.name != expected {
                return Err(format!(
                    "it is agent {:?}, not the agent {expected:?} this migration was asked to go to",
                    peer.name
                ));
            }
        }
        if let Some(allowed) = &self.policy.allowed_agents {
            if !allowed.iter().any(|a| a == &peer.name) {
                return Err(format!(
                    "agent {:?} is not among the destinations this agent may migrate to ({})",
                    peer.name,
                    allowed.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl Loaded {
    fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Loaded> {
        let provider = provider();
        let ca = certs_of(ca_pem, CA_FILE)?;
        anyhow::ensure!(ca.len() == 1, "{CA_FILE} must hold the cluster CA's certificate only");
        let cluster = webpki::EndEntityCert::try_from(&ca[0])
            .ok()
            .and_then(|c| pki::cluster_of(&c))
            .map(|(name, _id)| name)
            .ok_or_else(|| anyhow!("{CA_FILE} is not a perfplus cluster CA (made by `perfplus ca init`)"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca[0].clone())
            .map_err(|e| anyhow!("{CA_FILE}: not a usable CA certificate: {e}"))?;
        let roots = Arc::new(roots);
        let chain = certs_of(cert_pem, CERT_FILE)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow!("{KEY_FILE} is not a PEM private key: {e}"))?;
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow!("{KEY_FILE} is not the key of {CERT_FILE}"),
            other => anyhow!("{KEY_FILE}: {other}"),
        })?;
        let identity = Identity::of_certificate(&certified.cert[0]).map_err(|e| anyhow!("{CERT_FILE}: {e}"))?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| anyhow!("building the client verifier: {e}"))?;
        Ok(Loaded {
            identity,
            cluster,
            roots,
            certified: Arc::new(certified),
            provider,
            client_verifier,
        })
    }

    fn verify_own(&self) -> Result<(), rustls::Error> {
        let now = UnixTime::now();
        let (ee, rest) = self
            .certified
            .cert
            .split_first()
            .expect("a chain has a first certificate");
        self.client_verifier.verify_client_cert(ee, rest, now)?;
        if self.identity.role == CertRole::Agent {
            let parsed = ParsedCertificate::try_from(ee)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                rest,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(())
    }
}

/// What the peer presented in the TLS handshake, as its certificate claims (not yet or not at all
/// verified), so that a refusal can name it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Witness(Arc<Mutex<Option<Result<Identity, String>>>>);

impl Witness {
    fn record(&self, end_entity: &CertificateDer<'_>) {
        *self.0.lock().expect("witness lock") = Some(Identity::of_certificate(end_entity));
    }

    /// "agent \"hostB\"", or what is wrong with the certificate's identity, or None if the peer
    /// presented none.
    pub(crate) fn claimed(&self) -> Option<String> {
        self.0
            .lock()
            .expect("witness lock")
            .as_ref()
            .map(|claimed| match claimed {
                Ok(identity) => identity.to_string(),
                Err(why) => why.clone(),
            })
    }
}

/// The client's check of an agent's certificate: chain to the cluster CA, valid now, for TLS server
/// authentication. No name check: identities are checked once TLS is up ([`Credentials::check_responder`]).
#[derive(Debug)]
struct AgentVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    witness: Witness,
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.witness.record(end_entity);
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The agent's check of a client's certificate: rustls's WebPKI client verifier (chain to the cluster
/// CA, valid now, for TLS client authentication; a certificate is mandatory), remembering what was
/// presented.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    witness: Witness,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.witness.record(end_entity);
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A UNIX time as `2026-11-25 23:06:00 UTC`.
pub fn utc(secs: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} (UNIX time)"),
    }
}

/// What is wrong with a certificate that did not verify, in words ("is not issued by ...").
fn certificate_problem(error: &rustls::Error, cluster: &str) -> String {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer => format!(
                "is not issued by this cluster's CA (cluster {cluster:?}): a certificate of another cluster, or self-signed"
            ),
            #[allow(deprecated)]
            CertificateError::BadSignature => format!(
                "is not issued by this cluster's CA (cluster {cluster:?}): its signature does not verify (another \
                 cluster's CA of the same name?)"
            ),
            CertificateError::ExpiredContext { time, not_after } => format!(
                "expired on {} (it is {} now)",
                utc(not_after.as_secs()),
                utc(time.as_secs())
            ),
            CertificateError::Expired => "has expired".to_string(),
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "is not valid before {} (it is {} now: check the clocks)",
                utc(not_before.as_secs()),
                utc(time.as_secs())
            ),
            CertificateError::NotValidYet => "is not valid yet (check the clocks)".to_string(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "is not for this use (an operator's or a reader's certificate cannot serve as an agent)".to_string()
            }
            CertificateError::Revoked => "is revoked".to_string(),
            other => format!("is invalid: {other:?}"),
        },
        rustls::Error::InconsistentKeys(_) => "does not match its key".to_string(),
        other => format!("is invalid: {other}"),
    }
}

/// The rustls error inside an I/O error from a TLS stream, if any.
pub(crate) fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
}

/// Whether an I/O error from a TLS stream is a record that failed authentication, here
/// (`DecryptError`: altered, replayed or injected) or at the peer (its `bad_record_mac` alert).
pub(crate) enum Integrity {
    /// Data from the peer failed authentication here.
    Received,
    /// The peer says data from this side failed authentication there.
    RefusedByPeer,
}

pub(crate) fn integrity_failure(error: &io::Error) -> Option<Integrity> {
    match rustls_error(error)? {
        rustls::Error::DecryptError => Some(Integrity::Received),
        rustls::Error::AlertReceived(AlertDescription::BadRecordMac) => Some(Integrity::RefusedByPeer),
        _ => None,
    }
}

/// One side's view of a failed TLS handshake with `peer` (an address), in a sentence.
/// `claimed` is what the peer's certificate says it is (from its [`Witness`]).
pub(crate) fn describe_tls_error(error: &io::Error, peer: &str, claimed: Option<String>, own: &Credentials) -> String {
    let who = match &claimed {
        Some(c) => format!("the certificate of {peer} ({c})"),
        None => format!("the certificate of {peer}"),
    };
    let me = own.identity();
    let Some(tls) = rustls_error(error) else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof => format!(
                "connection closed by {peer} during the TLS handshake (it may have refused this side's certificate, \
                 {me}: its log says why; or it is an agent older than protocol 4)"
            ),
            _ => format!("TLS handshake with {peer} failed: {error}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(_) => {
            format!("{who} {}; refused", certificate_problem(tls, own.cluster()))
        }
        rustls::Error::NoCertificatesPresented => {
            format!("{peer} presented no certificate; every connection needs one from this cluster's CA")
        }
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => "it is not issued by the CA of its cluster".to_string(),
                AlertDescription::CertificateExpired => "it has expired or is not valid yet (by that side's clock)".to_string(),
                AlertDescription::CertificateRevoked => "it is revoked".to_string(),
                AlertDescription::UnsupportedCertificate => {
                    "it is not for this use (an operator's or a reader's certificate cannot serve as an agent)".to_string()
                }
                AlertDescription::DecryptError => {
                    "its signature does not verify there (issued by another cluster's CA of the same name?)".to_string()
                }
                AlertDescription::BadCertificate | AlertDescription::CertificateUnknown | AlertDescription::AccessDenied => {
                    format!("TLS alert {alert:?}")
                }
                AlertDescription::CertificateRequired => "it requires a certificate".to_string(),
                AlertDescription::NoApplicationProtocol => {
                    return format!("{peer} does not speak the perfplus protocol over TLS (no ALPN \"perfplus\")")
                }
                AlertDescription::ProtocolVersion => return format!("{peer} does not speak TLS 1.3"),
                AlertDescription::BadRecordMac => {
                    return format!(
                        "the TLS handshake with {peer} was altered on the way ({peer} could not authenticate this side's data)"
                    )
                }
                other => return format!("{peer} ended the TLS handshake: TLS alert {other:?}"),
            };
            format!("{peer} refused this side's certificate ({me}): {why}")
        }
        rustls::Error::DecryptError => {
            format!("the TLS handshake with {peer} was altered on the way (a record failed authentication)")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => format!(
            "{peer} did not answer with TLS 1.3 ({tls}): an agent older than protocol 4 (clear connections with a cluster key), \
             or not a perfplus agent"
        ),
        rustls::Error::PeerIncompatible(_) => format!("{peer} is not compatible: {tls}"),
        rustls::Error::NoApplicationProtocol => {
            format!("{peer} does not speak the perfplus protocol over TLS (no ALPN \"perfplus\")")
        }
        other => format!("TLS handshake with {peer} failed: {other}"),
    }
}

/// Where the credentials live by default.
pub fn default_dir() -> PathBuf {
    PathBuf::from("/etc/perfplus")
}
