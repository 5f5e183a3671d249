//! Fault injection for the end-to-end fault matrix (`tests/fault_matrix.rs`): an agent started with
//! `PERFPLUS_FAULT_AT=<point>` dies by SIGKILL (what `kill -9` does) the first time one of its
//! migrations reaches that point; with `<point>:pause=<ms>` it logs `fault point <point> reached` and
//! holds that migration there for that long; with `<point>:until=<path>` it logs the same and holds it
//! until the file `<path>` exists (the test cuts the link, then creates the file). Without the variable nothing happens; the check costs one comparison per phase.
//!
//! Points: `source:` or `dest:` followed by `begin` (after the handshake and `MigrateBegin`),
//! `round-N` (after round N was sent / acknowledged), `stop-and-copy` (source guest paused), `state`
//! (before the VM state is sent / restored), `restored` (destination said `Restored`, no `Commit`
//! yet), `commit` (`Commit` sent / received, before the destination runs the guest), `running` (after
//! `Running`, before the page checksums), `postcopy-push` (first pushed batch), `postcopy-demand`
//! (first demanded page), `postcopy-resume` (a post-copy link came back).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that arms a fault point.
pub const FAULT_AT_VAR: &str = "PERFPLUS_FAULT_AT";

#[derive(Debug, PartialEq)]
enum Action {
    Kill,
    Pause(Duration),
    Until(std::path::PathBuf),
}

struct Armed {
    point: String,
    action: Action,
    fired: AtomicBool,
}

fn parse(spec: &str) -> Option<(String, Action)> {
    if let Some((point, ms)) = spec.split_once(":pause=") {
        return Some((
            point.to_string(),
            Action::Pause(Duration::from_millis(ms.parse().ok()?)),
        ));
    }
    if let Some((point, path)) = spec.split_once(":until=") {
        return Some((point.to_string(), Action::Until(path.into())));
    }
    (!spec.is_empty() && !spec.contains('=')).then(|| (spec.to_string(), Action::Kill))
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAULT_AT_VAR).ok()?;
            let Some((point, action)) = parse(&spec) else {
                tracing::error!("{FAULT_AT_VAR}={spec:?} is not <point> or <point>:pause=<ms>; ignored");
                return None;
            };
            tracing::warn!("fault injection armed: {point} ({action:?})");
            Some(Armed {
                point,
                action,
                fired: AtomicBool::new(false),
            })
        })
        .as_ref()
}

/// Marks that a migration reached `point`: acts if it is the armed one (the first time only).
pub async fn reached(point: &str) {
    let Some(armed) = armed() else { return };
    if armed.point != point || armed.fired.swap(true, Ordering::AcqRel) {
        return;
    }
    match &armed.action {
        Action::Kill => {
            eprintln!("fault point {point} reached: killing this agent (SIGKILL)");
            // SAFETY: kill(2) on our own pid with a valid signal number has no memory-safety
            // preconditions; SIGKILL ends the process here, as `kill -9` from outside would.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        &Action::Pause(duration) => {
            tracing::warn!("fault point {point} reached: holding this migration for {duration:?}");
            tokio::time::sleep(duration).await;
            tracing::warn!("fault point {point}: going on");
        }
        Action::Until(path) => {
            tracing::warn!(
                "fault point {point} reached: holding this migration until {} exists",
                path.display()
            );
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::warn!("fault point {point}: going on");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_point_and_an_action() {
        assert_eq!(parse("source:commit"), Some(("source:commit".into(), Action::Kill)));
        assert_eq!(
            parse("dest:round-2:pause=1500"),
            Some(("dest:round-2".into(), Action::Pause(Duration::from_millis(1500))))
        );
        assert_eq!(parse("dest:round-2:pause=soon"), None);
        assert_eq!(
            parse("source:commit:until=/tmp/go"),
            Some(("source:commit".into(), Action::Until("/tmp/go".into())))
        );
        assert_eq!(parse(""), None);
    }
}
