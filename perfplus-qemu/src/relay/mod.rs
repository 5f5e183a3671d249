//! The relay between two agents: QEMU's stream in on the source, a valid QEMU stream out on the
//! destination, Perf+ in between.
//!
//! ```text
//!  source QEMU ──stream──► source::run ──relay dialect──► destination::run ──stream──► destination QEMU
//!              ◄──────────── return path (raw bytes) ◄──────────────────────────────── (if QEMU opens it)
//! ```
//!
//! Per RAM record the source decides ([`source::Filter`]):
//! * the destination QEMU already has this content at this address (same keyed digest as the last
//!   record the relay let through for it) → dropped: QEMU keeps the page it has;
//! * the destination agent holds a page with this digest ([`Held`]: pages of this migration it
//!   passed on) → a reference of 16 bytes, which [`destination::Expander`] replaces by the page after
//!   re-hashing it;
//! * otherwise the page itself; zero records stay zero records (dropped too when unchanged).
//!
//! Both sides apply one deterministic rule to what the destination holds ([`Held::offer`], in stream
//! order, up to [`RelayConfig::held_pages`]), so the source knows it without a message back. A RAM
//! record names its block whenever the previous record *on the link* was of another block or the
//! section just began, whatever QEMU wrote: dropping a record never leaves a `CONTINUE` pointing at
//! the wrong block. Everything that is not a RAM record passes through byte for byte.

pub mod destination;
mod held;
mod pump;
pub mod source;

pub use held::Held;
pub use pump::RelayError;

/// How much the destination agent keeps to resolve references.
#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    /// The most distinct pages the destination agent holds (4 KiB each); both sides must agree.
    pub held_pages: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        // 256 MiB of distinct contents.
        RelayConfig { held_pages: 65536 }
    }
}

/// What became of the RAM records of one round (one RAM section: QEMU's start, a pre-copy pass,
/// the stop-and-copy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Pages sent whole.
    pub full: u64,
    /// Pages sent as a reference to a page the destination agent holds.
    pub referenced: u64,
    /// Pages dropped: the destination QEMU has this content at this address.
    pub unchanged: u64,
    /// Zero records passed on.
    pub zero: u64,
    /// Zero records dropped (the page is zero there already).
    pub zero_unchanged: u64,
}

impl RoundStats {
    /// RAM records QEMU sent in this round.
    pub fn records(&self) -> u64 {
        self.full + self.referenced + self.unchanged + self.zero + self.zero_unchanged
    }

    fn add(&mut self, other: &RoundStats) {
        self.full += other.full;
        self.referenced += other.referenced;
        self.unchanged += other.unchanged;
        self.zero += other.zero;
        self.zero_unchanged += other.zero_unchanged;
    }
}

/// What one side of the relay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// One entry per RAM section (the first is QEMU's set-up, which has no pages).
    pub rounds: Vec<RoundStats>,
    /// Bytes read from the stream's input (QEMU on the source, the link on the destination).
    pub bytes_in: u64,
    /// Bytes written to the output (the link on the source, QEMU on the destination).
    pub bytes_out: u64,
    /// Bytes of the device-state tail passed through.
    pub tail_bytes: u64,
    /// Bytes relayed on the return path (destination QEMU to source QEMU).
    pub return_path_bytes: u64,
}

impl RelayStats {
    /// The rounds added up.
    pub fn total(&self) -> RoundStats {
        let mut total = RoundStats::default();
        for round in &self.rounds {
            total.add(round);
        }
        total
    }

    pub(crate) fn round(&mut self) -> &mut RoundStats {
        if self.rounds.is_empty() {
            self.rounds.push(RoundStats::default());
        }
        self.rounds.last_mut().expect("a round")
    }
}

#[cfg(test)]
mod tests;
