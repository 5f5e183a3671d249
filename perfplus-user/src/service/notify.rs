//! Readiness for a service manager (systemd's `Type=notify`): `READY=1` and `STATUS=` in one datagram to
//! the unix socket `$NOTIFY_SOCKET` names (the `sd-notify` crate: a few dozen lines, no dependencies,
//! abstract and path sockets alike). Without `$NOTIFY_SOCKET` it does nothing.

/// Tells the service manager the agent is ready (it listens), with a one-line status. `NOTIFY_SOCKET`
/// stays set: it is also how the agent could report later states. A failure to send is logged, never
/// fatal: the agent serves either way.
pub fn ready(status: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let states = [sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)];
    match sd_notify::notify(false, &states) {
        Ok(()) => tracing::debug!(status, "READY=1 sent to the service manager"),
        Err(err) => tracing::warn!("telling the service manager we are ready (NOTIFY_SOCKET): {err}"),
    }
}
