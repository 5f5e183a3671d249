//! `perfplus vm console`: a VM's serial console on the terminal. The guest's bytes are escaped before a
//! terminal sees them (a hostile guest could otherwise move the cursor, retitle the window or worse):
//! printable ASCII, newline and tab pass; every other byte is shown as `\xNN` (a carriage return
//! before a newline is dropped). `--raw` writes the bytes as they are.
use std::io::Write;

use perfplus_protocol::Credentials;

use super::client::AgentClient;

/// Streams VM `name`'s console from `agent` to standard output until the VM leaves the agent (or,
/// without `follow`, after what the agent keeps); Ctrl-C ends it.
pub async fn console(
    agent: &str,
    credentials: &Credentials,
    name: &str,
    follow: bool,
    raw: bool,
) -> anyhow::Result<()> {
    let client = AgentClient::connect(agent, credentials).await?;
    if follow {
        eprintln!("console of {name} on {agent} (read-only; Ctrl-C ends it)");
    }
    let mut pending_cr = false;
    client
        .console(name, follow, |lost, bytes| {
            let mut out = std::io::stdout().lock();
            if lost > 0 {
                writeln!(out, "\n[perfplus: {lost} bytes of console output were lost]")?;
            }
            if raw {
                out.write_all(bytes)?;
            } else {
                out.write_all(&escape(bytes, &mut pending_cr))?;
            }
            out.flush()?;
            Ok(())
        })
        .await?;
    if follow {
        eprintln!("\n{name} left {agent}: console closed");
    }
    Ok(())
}

/// The bytes made safe for a terminal. `pending_cr` carries a carriage return at the end of one chunk
/// over to the next (it is dropped if a newline follows).
pub fn escape(bytes: &[u8], pending_cr: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &byte in bytes {
        if std::mem::take(pending_cr) && byte != b'\n' {
            out.extend_from_slice(b"\\x0d");
        }
        match byte {
            b'\r' => *pending_cr = true,
            b'\n' | b'\t' | 0x20..=0x7e => out.push(byte),
            other => out.extend_from_slice(format!("\\x{other:02x}").as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let mut cr = false;
        assert_eq!(
            escape(b"ok\r\n\x1b[2J\x07\xff\ttab", &mut cr),
            b"ok\n\\x1b[2J\\x07\\xff\ttab".to_vec()
        );
        assert_eq!(escape(b"a\r", &mut cr), b"a".to_vec());
        assert!(cr, "a carriage return at the end waits for the next chunk");
        assert_eq!(escape(b"\nb\rc", &mut cr), b"\nb\\x0dc".to_vec());
    }
}
