//! Guest serial consoles: streaming one to a CLI (`VmConsole`, `perfplus vm console`), and a log file
//! per VM in the state directory (`STATE_DIR/console/NAME.log`, mode 0600, at most the configured size:
//! then it moves to `NAME.log.1`, replacing the one before, and a new file starts).
//!
//! Both read the console by position from the VMM ([`Vm::console_since`]), which keeps the last 64 KiB:
//! a reader that falls further behind is told how many bytes it missed. The bytes are the guest's,
//! unfiltered: the CLI escapes them for a terminal, the file keeps them as written. (The agent's own
//! log, where the VMM also forwards console lines, is a separate path.)
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::CONSOLE_CHUNK_MAX;
use perfplus_protocol::{ConsoleOutput, ConsoleRequest, Message};
use perfplus_vmm::vm::Vm;

use super::AgentState;

/// How often a console is read for a following CLI and for the log files.
const POLL: Duration = Duration::from_millis(100);
const LOG_POLL: Duration = Duration::from_millis(250);

/// `VmConsole`: sends what the VM's console holds, then, when following, its new output until the
/// CLI hangs up or the VM leaves this agent (stopped, migrated away): then `Done`.
pub(super) async fn stream(state: &Arc<AgentState>, conn: &mut Connection, req: ConsoleRequest) -> anyhow::Result<()> {
    let Some(first) = state.vms.get(&req.name) else {
        return Err(state.no_such_vm(&req.name));
    };
    // The VM streamed is this one: a VM of the same name that arrives later is another.
    let streamed: Weak<Vm> = Arc::downgrade(&first.value.vm);
    drop(first);
    let mut position = 0;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let current = state
            .vms
            .get(&req.name)
            .filter(|hosted| Weak::ptr_eq(&streamed, &Arc::downgrade(&hosted.value.vm)));
        let Some(current) = current else {
            break; // the VM left
        };
        // Off the runtime: the snapshot may hold the last reference to a VM stopped meanwhile.
        let chunk = tokio::task::spawn_blocking(move || current.value.vm.console_since(position)).await?;
        position = chunk.next;
        let mut lost = chunk.lost;
        for bytes in chunk.bytes.chunks(CONSOLE_CHUNK_MAX) {
            let output = ConsoleOutput {
                lost,
                bytes: bytes.to_vec(),
            };
            conn.send(&Message::ConsoleOutput(output)).await?;
            lost = 0;
        }
        if !req.follow {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            // The CLI sends nothing more: whatever comes (its end of stream, mostly) ends the stream.
            _ = conn.recv() => return Ok(()),
        }
    }
    conn.send(&Message::Done).await
}

/// Keeps every hosted VM's console in its log file until the agent ends. `max_bytes` 0: no logs.
pub(super) async fn keep_logs(state: Arc<AgentState>, dir: PathBuf, max_bytes: u64) {
    if max_bytes == 0 {
        return;
    }
    if let Err(err) = crate::private_files::own_dir(&dir) {
        tracing::warn!("console logs off: {err:#}");
        return;
    }
    let mut logs = ConsoleLogs {
        dir,
        max_bytes,
        vms: HashMap::new(),
    };
    let mut tick = tokio::time::interval(LOG_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let hosted = state.vms.list();
        // File writes, and the snapshots' drop (one may hold the last reference to a stopped VM),
        // off the runtime.
        let result = tokio::task::spawn_blocking(move || {
            logs.update(hosted.iter().map(|h| (h.name.as_str(), &h.value.vm)));
            drop(hosted);
            logs
        })
        .await;
        logs = match result {
            Ok(logs) => logs,
            Err(err) => {
                tracing::error!("console logs stopped: {err}");
                return;
            }
        };
    }
}

/// The console log files and how far each VM's console was written to its file.
struct ConsoleLogs {
    dir: PathBuf,
    max_bytes: u64,
    vms: HashMap<String, Logged>,
}

struct Logged {
    vm: Weak<Vm>,
    position: u64,
    /// Why the last write failed (logged once, until a write succeeds).
    failing: Option<String>,
}

impl ConsoleLogs {
    /// Appends what each VM wrote since the last time; forgets VMs no longer hosted.
    fn update<'a>(&mut self, hosted: impl Iterator<Item = (&'a str, &'a Arc<Vm>)>) {
        let mut seen = Vec::new();
        for (name, vm) in hosted {
            seen.push(name.to_string());
            let logged = self.vms.entry(name.to_string()).or_insert_with(|| Logged {
                vm: Weak::new(),
                position: 0,
                failing: None,
            });
            let mut header = None;
            if !Weak::ptr_eq(&logged.vm, &Arc::downgrade(vm)) {
                // A VM booted or arrived here under this name: its console starts at 0.
                *logged = Logged {
                    vm: Arc::downgrade(vm),
                    position: 0,
                    failing: None,
                };
                header = Some(format!(
                    "\n--- perfplus: console of VM {name} on this agent from {} ---\n",
                    crate::migration::signals::time_of_day()
                ));
            }
            let chunk = vm.console_since(logged.position);
            if chunk.bytes.is_empty() && header.is_none() {
                continue;
            }
            let mut text = header.map(String::into_bytes).unwrap_or_default();
            if chunk.lost > 0 {
                text.extend_from_slice(
                    format!("\n--- perfplus: {} bytes of console output lost ---\n", chunk.lost).as_bytes(),
                );
            }
            text.extend_from_slice(&chunk.bytes);
            match append(&self.dir.join(format!("{name}.log")), &text, self.max_bytes) {
                Ok(()) => {
                    logged.position = chunk.next;
                    logged.failing = None;
                }
                Err(err) => {
                    let why = format!("{err:#}");
                    if logged.failing.as_deref() != Some(why.as_str()) {
                        tracing::warn!(vm = %name, "console log: {why}");
                        logged.failing = Some(why);
                    }
                    logged.position = chunk.next; // what could not be written is dropped, not retried forever
                }
            }
        }
        self.vms.retain(|name, _| seen.contains(name));
    }
}

/// Appends `bytes` to the log `path`, first moving a file that would grow past `max_bytes` to
/// `path.1` (replacing it). A single write larger than `max_bytes` keeps only its end.
fn append(path: &Path, bytes: &[u8], max_bytes: u64) -> anyhow::Result<()> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size > 0 && size + bytes.len() as u64 > max_bytes {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        std::fs::rename(path, &rotated).with_context(|| format!("rotating {}", path.display()))?;
    }
    let keep = bytes.len().saturating_sub(max_bytes as usize);
    let mut file = crate::private_files::open_own_file(path)?;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::End(0))?;
    file.write_all(&bytes[keep..])
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_would_grow_past_its_size_moves_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        append(&path, b"0123456789", 16).unwrap();
        append(&path, b"abcde", 16).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789abcde");
        append(&path, b"XY", 16).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"XY");
        assert_eq!(std::fs::read(dir.path().join("vm.log.1")).unwrap(), b"0123456789abcde");
        append(&path, &[b'z'; 40], 16).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [b'z'; 16]);
        assert_eq!(std::fs::read(dir.path().join("vm.log.1")).unwrap(), b"XY");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
