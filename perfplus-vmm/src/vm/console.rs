//! What a guest writes to its console, made safe to log and to show: [`escape`] turns every byte that
//! could act on a terminal or a log (control characters, ANSI escape sequences, newlines that would
//! forge log lines, invalid UTF-8, Unicode that reorders or hides text) into visible text, and
//! [`LogBudget`] bounds the bytes per second a VM's console puts into the agent's log, counting what
//! it drops.
use std::fmt::Write;
use std::time::{Duration, Instant};

/// Console bytes per second one VM may put into the agent's log, over time.
pub const LOG_BYTES_PER_SEC: u64 = 4096;
/// Console bytes one VM may log at once, after a quiet time (a boot banner, a burst of errors).
pub const LOG_BURST_BYTES: u64 = 16 * 1024;

/// Unicode characters that are not control characters but change how the text around them shows:
/// bidirectional overrides and isolates, zero-width characters, line and paragraph separators.
fn is_deceptive(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// `bytes` as text that shows every byte and acts on nothing: printable UTF-8 stays as it is, a
/// backslash is doubled, `\t`, `\r`, `\n` and ESC read `\t`, `\r`, `\n`, `\e`, other control
/// characters and bytes that are not UTF-8 read `\xNN`, and C1 controls and text-reordering or
/// invisible characters read `\u{NNNN}`. The result is one line: no byte of it is a control character.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\n' => out.push_str("\\n"),
                '\u{1b}' => out.push_str("\\e"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_deceptive(c) => {
                    let _ = write!(out, "\\u{{{:04x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Console lines dropped from the log since the last line that was logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub lines: u64,
    pub bytes: u64,
    /// How long the dropping went on (from the first line dropped to now).
    pub over: Duration,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it; if lines were dropped before it, say so first.
    Log { dropped: Option<Dropped> },
    /// Drop it; `first` is true for the first line of a run of dropped lines (say that dropping
    /// begins, once).
    Drop { first: bool },
}

/// A token bucket of log bytes for one VM's console: [`LOG_BURST_BYTES`] at most, refilled at
/// [`LOG_BYTES_PER_SEC`]. Over any interval of `t` seconds the lines it admits hold at most
/// `burst + rate * t` bytes. Time is passed in, so that the rule is tested without waiting.
#[derive(Debug)]
pub struct LogBudget {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Refill not yet turned into a whole token, in billionths of a token.
    carry: u128,
    last: Instant,
    dropped: Dropped,
    dropping_since: Option<Instant>,
    /// Every byte and line ever dropped.
    pub total_dropped: Dropped,
}

impl LogBudget {
    pub fn new(rate: u64, burst: u64, now: Instant) -> LogBudget {
        LogBudget {
            rate,
            burst,
            tokens: burst,
            carry: 0,
            last: now,
            dropped: Dropped::default(),
            dropping_since: None,
            total_dropped: Dropped::default(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_ns = now.saturating_duration_since(self.last).as_nanos();
        self.last = now.max(self.last);
        let refill = elapsed_ns * u128::from(self.rate) + self.carry;
        self.carry = refill % 1_000_000_000;
        self.tokens = (u128::from(self.tokens) + refill / 1_000_000_000).min(u128::from(self.burst)) as u64;
    }

    /// Decides about a line of `bytes` bytes (as it will be logged) at `now`.
    pub fn admit(&mut self, bytes: usize, now: Instant) -> Admit {
        self.refill(now);
        let cost = bytes as u64;
        if cost <= self.tokens {
            self.tokens -= cost;
            let dropped = self.dropping_since.take().map(|since| Dropped {
                over: now.saturating_duration_since(since),
                ..self.dropped
            });
            self.dropped = Dropped::default();
            return Admit::Log { dropped };
        }
        let first = self.dropping_since.is_none();
        if first {
            self.dropping_since = Some(now);
        }
        self.dropped.lines += 1;
        self.dropped.bytes += cost;
        self.total_dropped.lines += 1;
        self.total_dropped.bytes += cost;
        Admit::Drop { first }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_shows_what_would_act_on_a_terminal_or_a_log() {
        assert_eq!(
            escape(b"plain text, \xc3\xa9t\xc3\xa9 \xe2\x9c\x93"),
            "plain text, été ✓"
        );
        // ANSI: clear the screen, move the cursor, colours.
        assert_eq!(escape(b"\x1b[2J\x1b[1;1H\x1b[31mred"), "\\e[2J\\e[1;1H\\e[31mred");
        // A forged log line after a newline, a carriage return to overwrite the line.
        assert_eq!(
            escape(b"ok\n2026-01-01T00:00:00Z  INFO perfplus: migration completed\r"),
            "ok\\n2026-01-01T00:00:00Z  INFO perfplus: migration completed\\r"
        );
        // Other controls, DEL, invalid UTF-8 (a lone continuation byte, a truncated sequence).
        assert_eq!(escape(b"\x00\x07\x08\x7f\t"), "\\x00\\x07\\x08\\x7f\\t");
        assert_eq!(escape(b"a\x80b\xe2\x9c"), "a\\x80b\\xe2\\x9c");
        // A backslash is doubled, so that escaped text cannot be faked by the guest.
        assert_eq!(escape(b"\\x1b"), "\\\\x1b");
        // C1 controls (CSI as U+009B), bidi overrides, zero-width characters.
        assert_eq!(escape("\u{9b}2J".as_bytes()), "\\u{009b}2J");
        assert_eq!(escape("abc\u{202e}fed".as_bytes()), "abc\\u{202e}fed");
        assert_eq!(escape("a\u{200b}b\u{2028}".as_bytes()), "a\\u{200b}b\\u{2028}");
        // Whatever the input, the output has no control character.
        let all: Vec<u8> = (0..=255u8).collect();
        assert!(!escape(&all).chars().any(|c| c.is_control()));
    }

    #[test]
    fn the_budget_bounds_logged_bytes_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(1000, 4000, t0);
        // The burst: four 1000-byte lines at once, then the fifth is dropped.
        for _ in 0..4 {
            assert_eq!(b.admit(1000, t0), Admit::Log { dropped: None });
        }
        assert_eq!(b.admit(1000, t0), Admit::Drop { first: true });
        assert_eq!(b.admit(10, t0), Admit::Drop { first: false });
        // Half a second refills 500 bytes: a 1000-byte line still waits, a 400-byte one passes and
        // reports what was dropped before it.
        let t = t0 + Duration::from_millis(500);
        assert_eq!(b.admit(1000, t), Admit::Drop { first: false });
        assert_eq!(
            b.admit(400, t),
            Admit::Log {
                dropped: Some(Dropped {
                    lines: 3,
                    bytes: 2010,
                    over: Duration::from_millis(500)
                })
            }
        );
        assert_eq!(b.total_dropped.lines, 3);

        // A guest printing 100 000 bytes/s for 10 s (simulated): what is logged stays within
        // burst + rate * t, and everything else is counted.
        let mut b = LogBudget::new(1000, 4000, t0);
        let (mut logged, mut dropped) = (0u64, 0u64);
        for i in 1..=10_000u64 {
            let now = t0 + Duration::from_millis(i);
            match b.admit(100, now) {
                Admit::Log { .. } => logged += 100,
                Admit::Drop { .. } => dropped += 100,
            }
        }
        assert!(logged <= 4000 + 1000 * 10, "{logged}");
        assert!(logged >= 1000 * 10, "the rate is granted, not only the burst: {logged}");
        assert_eq!(logged + dropped, 1_000_000);
        assert_eq!(b.total_dropped.bytes, dropped);
    }
}
