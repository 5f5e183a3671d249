//! The unix control socket (`--control-socket PATH`, e.g. /run/perfplus/control.sock): the operators of
//! this host reach the agent without a certificate (`perfplus ... --agent unix:PATH`).
//!
//! The socket file is made mode 0600 (its parent, if missing, 0700), so only its owner (the agent's
//! user) and root can connect; the kernel's word on who connected (`SO_PEERCRED`) is checked again:
//! uid 0 or the socket's owner, else the connection is closed unanswered. Such a peer is a local
//! operator (`operator "local-uid-N"`): every control request, and no peer (migration) connection. The
//! requests are the TLS port's own ([`super::handle`]).
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::{CertRole, Identity};
use tokio::net::{UnixListener, UnixStream};

use super::admission::RateLimited;
use super::AgentState;

/// A bound control socket.
pub(super) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's owner: the one user besides root who may connect.
    owner: u32,
}

/// Binds the control socket at `path`. A socket file left by an agent that is gone is replaced; one
/// another process still serves, or a file that is no socket, is an error.
pub(super) fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        crate::private_files::own_dir(parent)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("control socket {}: the path exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "control socket {}: another process serves it (another agent?)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale control socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making the control socket {} mode 0600", path.display()))?;
    let owner = std::fs::metadata(path)?.uid();
    Ok(ControlSocket {
        listener,
        path: path.to_path_buf(),
        owner,
    })
}

impl ControlSocket {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Serves local operators until the process ends.
    pub(super) async fn serve(self, state: Arc<AgentState>) {
        let mut refusals = RateLimited::default();
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    if let Some(left_out) = refusals.due() {
                        tracing::warn!(left_out, "control socket: accepting: {err} (retrying)");
                    }
                    tokio::time::sleep(super::admission::ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let identity = match self.identify(&stream) {
                Ok(identity) => identity,
                Err(why) => {
                    if let Some(left_out) = refusals.due() {
                        tracing::warn!(left_out, "control socket: connection closed unanswered: {why}");
                    }
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                match Connection::accept_local(stream, identity.clone()).await {
                    Err(err) => tracing::debug!(%identity, "control socket: handshake failed: {err:#}"),
                    Ok((conn, role)) => {
                        if let Err(err) = super::handle(state, conn, role).await {
                            tracing::warn!(%identity, "control socket: connection ended with an error: {err:#}");
                        }
                    }
                }
            });
        }
    }

    /// Who connected: a local operator if the kernel says uid 0 or the socket's owner.
    fn identify(&self, stream: &UnixStream) -> Result<Identity, String> {
        let credentials = stream.peer_cred().map_err(|e| format!("no peer credentials: {e}"))?;
        let uid = credentials.uid();
        if uid != 0 && uid != self.owner {
            return Err(format!(
                "uid {uid} (pid {:?}) is neither root nor the socket's owner (uid {})",
                credentials.pid(),
                self.owner
            ));
        }
        Identity::new(CertRole::Operator, &format!("local-uid-{uid}"))
    }
}
