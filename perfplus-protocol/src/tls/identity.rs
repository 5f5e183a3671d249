//! Who a certificate names: a role and a name, carried in the certificate as one URI subject
//! alternative name, `perfplus:<role>:<name>` (e.g. `perfplus:agent:hostB`). The common name repeats
//! it for people (`openssl x509 -text`); only the URI counts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix of the URI name that carries the identity.
pub const URI_PREFIX: &str = "perfplus:";
/// Longest name accepted.
pub const NAME_MAX: usize = 64;

/// What a certificate's holder may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CertRole {
    /// An agent (one per host): accepts and opens migrations (peer connections), serves the CLI. Its
    /// certificate is good for TLS server and client authentication. On a control connection it may only
    /// read (list, status): a host that is broken into cannot start, stop or move guests elsewhere.
    Agent,
    /// An operator: every control request (start, stop, resume, migrate, cancel, track) besides reading.
    Operator,
    /// Read-only: `vm list` and `vm status`.
    Reader,
}

impl CertRole {
    pub fn name(self) -> &'static str {
        match self {
            CertRole::Agent => "agent",
            CertRole::Operator => "operator",
            CertRole::Reader => "reader",
        }
    }

    /// Whether a control request that needs `access` is allowed to this role.
    pub fn allows(self, access: crate::Access) -> bool {
        match (self, access) {
            (CertRole::Operator, _) => true,
            (CertRole::Agent | CertRole::Reader, crate::Access::Read) => true,
            (CertRole::Agent | CertRole::Reader, crate::Access::Operate) => false,
        }
    }

    fn from_name(name: &str) -> Option<CertRole> {
        match name {
            "agent" => Some(CertRole::Agent),
            "operator" => Some(CertRole::Operator),
            "reader" => Some(CertRole::Reader),
            _ => None,
        }
    }
}

/// A certificate's holder: role and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub role: CertRole,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role.name(), self.name)
    }
}

/// Checks a name for a certificate: 1 to [`NAME_MAX`] characters of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(format!(
            "a certificate name has 1 to {NAME_MAX} characters, not {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "a certificate name has only letters, digits, '.', '_' and '-', not {bad:?} (in {name:?})"
        ));
    }
    Ok(())
}

impl Identity {
    pub fn new(role: CertRole, name: &str) -> Result<Identity, String> {
        check_name(name)?;
        Ok(Identity {
            role,
            name: name.to_string(),
        })
    }

    /// The URI name that carries the identity in a certificate.
    pub fn to_uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.role.name(), self.name)
    }

    /// Parses [`to_uri`](Self::to_uri)'s form; None for any other URI.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let (role, name) = uri.strip_prefix(URI_PREFIX)?.split_once(':')?;
        let role = CertRole::from_name(role)?;
        check_name(name).ok()?;
        Some(Identity {
            role,
            name: name.to_string(),
        })
    }

    /// The identity in a DER certificate: its one `perfplus:` URI name. Parses only; whether the
    /// certificate is genuine is for the verifier. Errors say what is missing.
    pub fn of_certificate(der: &[u8]) -> Result<Identity, String> {
        let der = rustls::pki_types::CertificateDer::from(der);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("not a certificate: {e}"))?;
        let mut found = cert.valid_uri_names().filter(|uri| uri.starts_with(URI_PREFIX));
        match (found.next(), found.next()) {
            (Some(uri), None) => Identity::from_uri(uri).ok_or_else(|| format!("unknown perfplus identity {uri:?}")),
            (None, _) => Err("the certificate names no perfplus identity (not issued by `perfplus cert issue`)".into()),
            (Some(_), Some(_)) => Err("the certificate names more than one perfplus identity".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_names() {
        let id = Identity::new(CertRole::Agent, "hostB").unwrap();
        assert_eq!(id.to_uri(), "perfplus:agent:hostB");
        assert_eq!(Identity::from_uri("perfplus:agent:hostB"), Some(id.clone()));
        assert_eq!(id.to_string(), "agent \"hostB\"");
        assert_eq!(Identity::from_uri("perfplus:admin:x"), None);
        assert_eq!(Identity::from_uri("perfplus:agent:a b"), None);
        assert_eq!(Identity::from_uri("https://agent/x"), None);
        assert!(check_name("node-1.example_2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert_eq!(
            check_name("a/b").unwrap_err(),
            "a certificate name has only letters, digits, '.', '_' and '-', not '/' (in \"a/b\")"
        );
    }
}
