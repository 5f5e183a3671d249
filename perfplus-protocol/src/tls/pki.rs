//! The cluster's certificate authority: made once (`perfplus ca init`), then used to issue each agent's
//! and each operator's certificate (`perfplus cert issue`). ECDSA P-256 keys, X.509 v3 certificates.
//!
//! - The CA certificate names the cluster (`perfplus:cluster:<name>:<id>` as a URI name, and in its
//!   common name; `<id>`, 16 random hex digits, tells apart two clusters of the same name, whose
//!   certificates would otherwise name the same issuer); its key signs certificates and nothing else
//!   (key usage keyCertSign, cRLSign).
//! - An issued certificate carries its holder's [`Identity`] as a URI name; an agent's is good for TLS
//!   server and client authentication (it accepts and opens connections), an operator's and a reader's
//!   for client authentication only.
//! - The page-digest secret (what Perf+ digests are keyed with, [`ClusterKey`]) is derived from the CA's
//!   private key: `HMAC-SHA256(CA key (PKCS#8 DER), "perfplus page digest secret v1")`. Every agent
//!   issued by one CA gets the same secret (`page.key` beside its certificate) without a second file
//!   to distribute, operators never get it, and holding it reveals nothing of the CA key.

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use hmac::{Hmac, KeyInit, Mac};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::Sha256;
use time::OffsetDateTime;

use super::identity::{check_name, CertRole, Identity};
use crate::ClusterKey;

/// URI name prefix of a CA certificate: the cluster's name and id follow (`<name>:<id>`).
pub const CLUSTER_URI_PREFIX: &str = "perfplus:cluster:";
/// Label of the page-digest secret derived from the CA key.
const PAGE_SECRET_LABEL: &[u8] = b"perfplus page digest secret v1";
/// How long before "now" an issued certificate becomes valid (clocks of a cluster differ a little).
const BACKDATE: Duration = Duration::from_secs(3600);

/// A cluster CA: its certificate and its signing key.
pub struct Ca {
    cluster: String,
    id: String,
    cert_pem: String,
    key: KeyPair,
}

/// An issued certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(cluster: &str, id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "perfplus");
    dn.push(DnType::CommonName, format!("perfplus cluster CA {cluster} ({id})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes[0] &= 0x7f; // a positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn at(t: SystemTime) -> anyhow::Result<OffsetDateTime> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| anyhow!("time before 1970"))?
        .as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| anyhow!("time out of range: {e}"))
}

/// The cluster's name and id in a CA certificate.
pub fn cluster_of(cert: &webpki::EndEntityCert<'_>) -> Option<(String, String)> {
    cert.valid_uri_names().find_map(|uri| {
        let (name, id) = uri.strip_prefix(CLUSTER_URI_PREFIX)?.rsplit_once(':')?;
        Some((name.to_string(), id.to_string()))
    })
}

impl Ca {
    /// A new CA for cluster `cluster`, valid for `days` from now.
    pub fn create(cluster: &str, days: u32) -> anyhow::Result<Ca> {
        check_name(cluster).map_err(|e| anyhow!("cluster name: {e}"))?;
        let now = SystemTime::now();
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow!("random cluster id: {e}"))?;
        let id = hex::encode(id);
        let mut params = ca_params(cluster, &id);
        params.subject_alt_names = vec![SanType::URI(
            format!("{CLUSTER_URI_PREFIX}{cluster}:{id}")
                .try_into()
                .context("cluster URI")?,
        )];
        params.not_before = at(now - BACKDATE)?;
        params.not_after = at(now + Duration::from_secs(u64::from(days) * 86_400))?;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("signing the CA certificate")?;
        Ok(Ca {
            cluster: cluster.to_string(),
            id,
            cert_pem: cert.pem(),
            key,
        })
    }

    /// A CA from its certificate and key (PEM), as [`create`](Self::create) made them.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| anyhow!("the CA key is not a PEM private key: {e}"))?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| anyhow!("the CA certificate is not PEM: {e}"))?;
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| anyhow!("the CA certificate: {e}"))?;
        let (cluster, id) = cluster_of(&cert)
            .ok_or_else(|| anyhow!("the CA certificate is not a perfplus cluster CA (no {CLUSTER_URI_PREFIX} name)"))?;
        let spki = cert.subject_public_key_info();
        // The SubjectPublicKeyInfo ends with the public key's bit string, whose content is the raw key.
        if !spki.as_ref().ends_with(key.public_key_raw()) {
            bail!("the CA key does not belong to the CA certificate");
        }
        Ok(Ca {
            cluster,
            id,
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &std::path::Path) -> anyhow::Result<Ca> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} (made by `perfplus ca init`)", path.display()))
        };
        Ca::from_pem(&read("ca.pem")?, &read("ca.key")?).with_context(|| format!("the CA in {}", dir.display()))
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PKCS#8 PEM): keep it off the hosts.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `identity`, valid for `days` from now.
    pub fn issue(&self, identity: &Identity, days: u32) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        self.issue_between(
            identity,
            now - BACKDATE,
            now + Duration::from_secs(u64::from(days) * 86_400),
        )
    }

    /// A certificate for `identity` valid from `not_before` to `not_after` (tests make expired ones).
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("perfplus cluster {}", self.cluster));
        dn.push(
            DnType::CommonName,
            format!("{} {}", identity.role.name(), identity.name),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into().context("identity URI")?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role {
            CertRole::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            CertRole::Operator | CertRole::Reader => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a key")?;
        let issuer = Issuer::new(ca_params(&self.cluster, &self.id), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the certificate of {identity}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The cluster's page-digest secret (see the module documentation).
    pub fn page_secret(&self) -> ClusterKey {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.serialized_der())
            .expect("HMAC takes keys of any length");
        mac.update(PAGE_SECRET_LABEL);
        let bytes: [u8; 32] = mac.finalize().into_bytes().into();
        ClusterKey::from_hex(&hex::encode(bytes)).expect("32 bytes are a valid key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_what_the_original_would() {
        let ca = Ca::create("prod", 30).unwrap();
        assert_eq!(ca.cluster(), "prod");
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cluster(), "prod");
        assert_eq!(again.page_secret().to_hex(), ca.page_secret().to_hex());
        let other = Ca::create("prod", 30).unwrap();
        assert_ne!(other.page_secret().to_hex(), ca.page_secret().to_hex());
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).err().unwrap();
        assert_eq!(err.to_string(), "the CA key does not belong to the CA certificate");

        let id = Identity::new(CertRole::Agent, "hostB").unwrap();
        let issued = again.issue(&id, 1).unwrap();
        let der: rustls::pki_types::CertificateDer =
            rustls::pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::of_certificate(&der).unwrap(), id);
        // The certificate chains to the CA as first made (the reloaded issuer has the same name).
        let ca_der: rustls::pki_types::CertificateDer =
            rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
    }
}
