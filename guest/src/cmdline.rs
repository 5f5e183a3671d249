//! Parsing the workload parameters from the multiboot command line (keys in
//! `perfplus_common::guest_abi::cmdline`). Unknown keys and words without `=` are ignored (loaders add
//! things: QEMU puts the kernel's file name first); a malformed value of a known key is an error.

use core::fmt::Write;

use perfplus_common::guest_abi::cmdline as key;

use crate::sys::Line;

/// Content kinds, in the order of [`Config::mix`].
pub const KIND_NAMES: [&str; 5] = ["unique", "dup", "zero", "same", "text"];

/// Workload parameters.
#[derive(Clone, Copy)]
pub struct Config {
    /// Requested working-set size in bytes.
    pub working_set: u64,
    /// Page writes per second; 0 = unpaced.
    pub rate: u64,
    /// Percentages of unique, dup, zero, same and text pages (sum 100).
    pub mix: [u8; 5],
    /// Hot set: (percent of the working set, percent of the writes).
    pub hot: Option<(u8, u8)>,
    /// TSC frequency in kHz from the VMM; 0 if absent.
    pub tsc_khz: u64,
    pub seed: u64,
    /// `hostile=console`: flood the console with hostile lines (see `guest_abi::cmdline::HOSTILE`).
    pub hostile_console: bool,
    /// `hostile=counters`: publish absurd counters.
    pub hostile_counters: bool,
    /// `progress=on|off`: the once-a-second progress line (on by default).
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            working_set: 64 << 20,
            rate: 10_000,
            mix: [40, 30, 10, 20, 0],
            hot: None,
            tsc_khz: 0,
            seed: 1,
            hostile_console: false,
            hostile_counters: false,
            progress: true,
        }
    }
}

fn bad(k: &str, v: &[u8], why: &str) -> Line {
    let mut l = Line::new();
    let v = core::str::from_utf8(v).unwrap_or("<not UTF-8>");
    let _ = write!(l, "bad command line value {k}={v}: {why}");
    l
}

/// Decimal or `0x` hexadecimal, no suffix.
fn number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// A number with an optional multiplier suffix taken from `suffixes` (matched case-insensitively,
/// optionally followed by `B` or `iB` for sizes).
fn scaled(s: &[u8], suffixes: &[(u8, u64)], size: bool) -> Option<u64> {
    let mut s = s;
    if size {
        if let Some(rest) = s.strip_suffix(b"iB").or_else(|| s.strip_suffix(b"B")) {
            s = rest;
        }
    }
    if let Some((&last, rest)) = s.split_last() {
        for &(c, mult) in suffixes {
            if last.eq_ignore_ascii_case(&c) {
                return number(rest)?.checked_mul(mult);
            }
        }
    }
    number(s)
}

fn percent(s: &[u8]) -> Option<u8> {
    number(s).filter(|&p| p <= 100).map(|p| p as u8)
}

fn parse_mix(v: &[u8]) -> Option<[u8; KIND_NAMES.len()]> {
    let mut mix = [0u8; KIND_NAMES.len()];
    let mut seen = [false; KIND_NAMES.len()];
    for item in v.split(|&c| c == b',') {
        let mut kv = item.splitn(2, |&c| c == b':');
        let name = kv.next()?;
        let pct = percent(kv.next()?)?;
        let i = KIND_NAMES.iter().position(|k| k.as_bytes() == name)?;
        if seen[i] {
            return None;
        }
        seen[i] = true;
        mix[i] = pct;
    }
    if mix.iter().map(|&p| u32::from(p)).sum::<u32>() != 100 {
        return None;
    }
    Some(mix)
}

fn parse_hot(v: &[u8]) -> Option<(u8, u8)> {
    let mut kv = v.splitn(2, |&c| c == b':');
    let p = percent(kv.next()?)?;
    let w = percent(kv.next()?)?;
    Some((p, w))
}

/// Parses the command line; `Err` holds the message for the status page.
// The error is a fixed-size line buffer (there is no allocator); it is returned once, at boot.
#[allow(clippy::result_large_err)]
pub fn parse(cmdline: &[u8]) -> Result<Config, Line> {
    let mut c = Config::default();
    for word in cmdline.split(|c| c.is_ascii_whitespace()) {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (k, v) = (&word[..eq], &word[eq + 1..]);
        let Ok(k) = core::str::from_utf8(k) else {
            continue;
        };
        match k {
            key::WORKING_SET => {
                let sizes = [(b'K', 1u64 << 10), (b'M', 1 << 20), (b'G', 1 << 30)];
                c.working_set =
                    scaled(v, &sizes, true).ok_or_else(|| bad(k, v, "expected a size like 64M (K/M/G suffix)"))?;
                if c.working_set < 4096 {
                    return Err(bad(k, v, "the working set must be at least one 4K page"));
                }
            }
            key::RATE => {
                c.rate = scaled(v, &[(b'k', 1000)], false)
                    .ok_or_else(|| bad(k, v, "expected page writes per second like 10k (0 = unpaced)"))?;
            }
            key::MIX => {
                c.mix = parse_mix(v).ok_or_else(|| {
                    bad(
                        k,
                        v,
                        "expected unique:P,dup:P,zero:P,same:P,text:P (any of them) with percentages adding up to 100",
                    )
                })?;
            }
            key::HOT => {
                c.hot = Some(parse_hot(v).ok_or_else(|| bad(k, v, "expected P:W, two percentages"))?);
            }
            key::TSC_KHZ => {
                c.tsc_khz = number(v).ok_or_else(|| bad(k, v, "expected a frequency in kHz"))?;
            }
            key::SEED => {
                c.seed = number(v).ok_or_else(|| bad(k, v, "expected a number"))?;
            }
            key::HOSTILE => {
                for item in v.split(|&c| c == b',') {
                    match item {
                        b"console" => c.hostile_console = true,
                        b"counters" => c.hostile_counters = true,
                        _ => return Err(bad(k, v, "expected console, counters or console,counters")),
                    }
                }
            }
            key::PROGRESS => {
                c.progress = match v {
                    b"on" => true,
                    b"off" => false,
                    _ => return Err(bad(k, v, "expected on or off")),
                };
            }
            _ => {}
        }
    }
    Ok(c)
}
