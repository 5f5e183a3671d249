//! Letting connections in without letting them hurt the agent: a failed `accept` (out of file
//! descriptors, a connection aborted before it was taken) is logged and retried, never fatal, and the
//! connections that have not yet proven the cluster key are capped, in all and per source address, so
//! that nobody without the key can hold more than a few of the agent's descriptors. Connections over
//! a cap are closed at once; the handshake's own time limit (`HANDSHAKE_TIMEOUT`) ends the admitted
//! ones that stall. What such connections make the agent log is rate-limited, so that they cannot fill
//! its disk either.
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the accept loop waits after an `accept` that failed for lack of a resource (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM): long enough not to spin, short enough that a freed descriptor is used soon.
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Each kind of repeated event (accept errors, refusals, failed handshakes) is logged at most
/// [`LOG_BURST`] times per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

/// The connections in the handshake, by source.
pub(super) struct Admission {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
    /// Log of the handshakes that failed (connections of peers without the key, scanners, attackers).
    failures: Mutex<RateLimited>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; given back when dropped (when the handshake ended, either way).
pub(super) struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    Total(usize),
    PerSource(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total(max) => write!(f, "{max} connections are already in the handshake"),
            Refused::PerSource(max) => {
                write!(f, "{max} connections from that address are already in the handshake")
            }
        }
    }
}

impl Admission {
    pub(super) fn new(max_total: usize, max_per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_source,
            counts: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    /// Logs a failed handshake (rate-limited).
    pub(super) fn handshake_failed(&self, peer: std::net::SocketAddr, err: &anyhow::Error) {
        let due = self.failures.lock().expect("admission log lock").due();
        if let Some(left_out) = due {
            tracing::warn!(%peer, left_out, "connection ended with an error: {err:#}");
        }
    }

    /// A place for a connection from `ip` until its handshake ends, or why there is none.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        let source = source_of(ip);
        let mut counts = self.counts.lock().expect("admission lock");
        if counts.total >= self.max_total {
            return Err(Refused::Total(self.max_total));
        }
        let from_source = counts.by_source.entry(source).or_insert(0);
        if *from_source >= self.max_per_source {
            return Err(Refused::PerSource(self.max_per_source));
        }
        *from_source += 1;
        counts.total += 1;
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }

    /// Connections in the handshake now.
    #[cfg(test)]
    fn in_handshake(&self) -> usize {
        self.counts.lock().expect("admission lock").total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.admission.counts.lock().expect("admission lock");
        counts.total -= 1;
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// The source a connection counts against: the IPv4 address, or the /64 of an IPv6 address (one host
/// commonly has a whole /64).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Whether a failed `accept` means the agent lacks a resource (wait before trying again) rather than
/// that one pending connection went away (try the next at once).
pub(super) fn needs_backoff(err: &io::Error) -> bool {
    !matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// A log line that may repeat many times a second under attack: at most [`LOG_BURST`] are written per
/// [`LOG_INTERVAL`]; the first one after a quiet spell says how many were left out.
#[derive(Default)]
pub(super) struct RateLimited {
    /// Start of the current interval, and lines written in it.
    window: Option<(Instant, u32)>,
    left_out: u64,
}

impl RateLimited {
    /// `Some(n)` when a line may be written now (`n` lines were left out before it), else `None`.
    pub(super) fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        match &mut self.window {
            Some((start, written)) if now.duration_since(*start) < LOG_INTERVAL => {
                if *written >= LOG_BURST {
                    self.left_out += 1;
                    return None;
                }
                *written += 1;
            }
            _ => self.window = Some((now, 1)),
        }
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn caps_in_all_and_per_source_and_places_come_back() {
        let admission = Admission::new(4, 2);
        let a1 = admission.admit(ip("10.0.0.1")).unwrap();
        let _a2 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(admission.admit(ip("10.0.0.1")).err(), Some(Refused::PerSource(2)));
        // The same host over IPv4-mapped IPv6 is the same source.
        assert_eq!(
            admission.admit(ip("::ffff:10.0.0.1")).err(),
            Some(Refused::PerSource(2))
        );
        let _b1 = admission.admit(ip("2001:db8::1")).unwrap();
        // Another address of the same /64 is the same source.
        let _b2 = admission.admit(ip("2001:db8::2:3")).unwrap();
        assert_eq!(admission.admit(ip("10.0.0.9")).err(), Some(Refused::Total(4)));
        drop(a1);
        assert_eq!(admission.in_handshake(), 3);
        let _a3 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(admission.admit(ip("2001:db8::7")).err(), Some(Refused::Total(4)));
        assert_eq!(
            Refused::Total(64).to_string(),
            "64 connections are already in the handshake"
        );
    }

    #[test]
    fn only_lack_of_resources_backs_off() {
        assert!(needs_backoff(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(needs_backoff(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(needs_backoff(&io::Error::from_raw_os_error(libc::ENOBUFS)));
        assert!(!needs_backoff(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }

    #[test]
    fn a_repeated_line_is_written_a_few_times_then_counted() {
        let mut log = RateLimited::default();
        for _ in 0..LOG_BURST {
            assert_eq!(log.due(), Some(0));
        }
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        assert_eq!(log.left_out, 2);
        // Once the interval passed, the next line says how many were left out.
        let long_ago = Instant::now().checked_sub(LOG_INTERVAL).unwrap();
        log.window = Some((long_ago, LOG_BURST));
        assert_eq!(log.due(), Some(2));
        assert_eq!(log.due(), Some(0));
    }
}
