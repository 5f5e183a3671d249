//! `perfplus ca init` and `perfplus cert issue`: the files of a cluster's CA and of each agent's and
//! operator's credentials, with private modes. Loading them is [`load`] (every other command).
//!
//! ```text
//! CA directory (keep it off the hosts)     credentials directory (one per agent / operator / reader)
//!   ca.pem   the CA certificate (public)      ca.pem    the CA certificate (copied)
//!   ca.key   its private key (0600)           cert.pem  this holder's certificate
//!                                             key.pem   its private key (0600)
//!                                             page.key  agents only: the page-digest secret (0600)
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::Context;
use perfplus_protocol::tls::pki::Ca;
use perfplus_protocol::tls::{self, CertRole, Identity};
use perfplus_protocol::{ClusterKey, Credentials};

/// Files of a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Creates `path` with `mode` and `content`; an existing file is left alone and is an error (a key is
/// never overwritten by accident).
fn write_new(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(content.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Creates directory `dir` (mode 0700) if it does not exist.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// `perfplus ca init`: a new cluster CA in `dir` (`ca.pem`, `ca.key`).
pub fn ca_init(dir: &Path, cluster: &str, days: u32) -> anyhow::Result<String> {
    let ca = Ca::create(cluster, days)?;
    private_dir(dir)?;
    write_new(&dir.join(tls::CA_FILE), ca.cert_pem(), 0o644)?;
    write_new(&dir.join(CA_KEY_FILE), &ca.key_pem(), 0o600)?;
    Ok(format!(
        "cluster {cluster:?}: CA certificate {} and key {} (valid {days} days); keep the key off the hosts",
        dir.join(tls::CA_FILE).display(),
        dir.join(CA_KEY_FILE).display()
    ))
}

/// `perfplus cert issue`: credentials for `identity` in `out`, from the CA in `ca_dir`.
pub fn cert_issue(ca_dir: &Path, identity: &Identity, days: u32, out: &Path) -> anyhow::Result<String> {
    let ca = Ca::load(ca_dir)?;
    let issued = ca.issue(identity, days)?;
    private_dir(out)?;
    write_new(&out.join(tls::KEY_FILE), &issued.key_pem, 0o600)?;
    write_new(&out.join(tls::CERT_FILE), &issued.cert_pem, 0o644)?;
    write_new(&out.join(tls::CA_FILE), ca.cert_pem(), 0o644)?;
    if identity.role == CertRole::Agent {
        write_new(
            &out.join(tls::PAGE_KEY_FILE),
            &format!("{}\n", ca.page_secret().to_hex()),
            0o600,
        )?;
    }
    Ok(format!(
        "{identity} of cluster {:?}: {} (valid {days} days); copy the directory to {}",
        ca.cluster(),
        out.display(),
        match identity.role {
            CertRole::Agent => "the agent's host (--tls-dir, default /etc/perfplus)",
            _ => "where the CLI runs (--tls-dir or PERFPLUS_TLS_DIR)",
        }
    ))
}

/// The credentials in `dir`, with a warning if the private key is readable by others.
pub fn load(dir: &Path) -> anyhow::Result<Credentials> {
    let credentials =
        Credentials::load(dir).context("reading the TLS credentials (see `perfplus cert issue`, --tls-dir)")?;
    crate::private_files::warn_if_readable_by_others(&dir.join(tls::KEY_FILE), "private key");
    Ok(credentials)
}

/// The CLI's credentials from `dir`. A command that talks to its agent over the agent's control socket
/// (`--agent unix:PATH`) needs none: when `dir` cannot be read and `local_agent` (the command line
/// names a `unix:` agent), the CLI runs with throw-away credentials of no cluster, which only a control
/// socket accepts (every agent's TLS port refuses them, so a TCP agent named too is refused clearly).
pub fn load_for_cli(dir: &Path, local_agent: bool) -> anyhow::Result<Credentials> {
    match load(dir) {
        Ok(credentials) => Ok(credentials),
        Err(err) if local_agent => {
            tracing::debug!("no TLS credentials ({err:#}): a control socket needs none");
            let identity = Identity::new(CertRole::Operator, "no-credentials").map_err(|e| anyhow::anyhow!(e))?;
            Ok(Credentials::ephemeral(&identity)?.0)
        }
        Err(err) => Err(err),
    }
}

/// The page-digest secret of an agent (`page.key` in `dir`).
pub fn page_key(dir: &Path) -> anyhow::Result<ClusterKey> {
    let path = dir.join(tls::PAGE_KEY_FILE);
    let key = ClusterKey::from_file(&path)
        .context("reading the page-digest secret (`perfplus cert issue --agent` writes it)")?;
    crate::private_files::warn_if_readable_by_others(&path, "page-digest secret");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_and_credentials_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca_init(&ca_dir, "prod", 30).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
        // A second init does not overwrite the CA.
        let again = ca_init(&ca_dir, "prod", 30).unwrap_err();
        assert!(format!("{again:#}").contains("it must not exist yet"), "{again:#}");

        let a = dir.path().join("hostA");
        let b = dir.path().join("hostB");
        let op = dir.path().join("alice");
        cert_issue(&ca_dir, &Identity::new(CertRole::Agent, "hostA").unwrap(), 1, &a).unwrap();
        cert_issue(&ca_dir, &Identity::new(CertRole::Agent, "hostB").unwrap(), 1, &b).unwrap();
        cert_issue(&ca_dir, &Identity::new(CertRole::Operator, "alice").unwrap(), 1, &op).unwrap();
        assert_eq!(mode(&a.join(tls::KEY_FILE)), 0o600);
        assert_eq!(mode(&a.join(tls::PAGE_KEY_FILE)), 0o600);
        assert!(
            !op.join(tls::PAGE_KEY_FILE).exists(),
            "operators do not get the page secret"
        );
        // Every agent of the cluster has the same page secret.
        assert_eq!(page_key(&a).unwrap().to_hex(), page_key(&b).unwrap().to_hex());
        let creds = load(&op).unwrap();
        assert_eq!(creds.identity().to_string(), "operator \"alice\"");
        assert_eq!(creds.cluster(), "prod");
        let missing = load(&dir.path().join("nobody")).unwrap_err();
        assert!(format!("{missing:#}").contains("ca.pem does not exist"), "{missing:#}");
    }
}
