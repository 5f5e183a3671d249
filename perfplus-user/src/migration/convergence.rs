//! When to stop iterating, what to expect, and in which order to send a round.
//!
//! **Stop rule.** After each round the source knows how many pages are dirty now and how fast it
//! processed pages in the rounds so far (read, hash, send, acknowledged; pages known to be zero
//! without being read, the holes of round 1, do not count: the next rounds have none). If the dirty set can be sent
//! within the downtime target at that rate, the next round is the stop-and-copy. The rate used is the
//! lower of the last round's and the average, so a round made cheap by zero pages does not make the
//! engine stop too early. Once the dirty set fits, the engine still goes on while each round halves
//! it (and it is above a quarter of the target): such rounds are cheap and shorten the downtime.
//!
//! **Switch to post-copy (hybrid mode).** After any round, if it left more than half of the pages it
//! read dirty again (round 1 reads every page that holds data), or if the rate at which the dirty set shrinks cannot reach the target within the
//! round limit, the engine switches to post-copy instead of iterating. At a shrink of `q` per round,
//! the rounds still to come would send `q + q² + … = q / (1 - q)` times the pages dirty now, which from
//! `q = 0.5` on is more than post-copy sends (each of them once): more rounds would only make the
//! migration longer. (Measured at 50k writes/s in 256 MiB over 1 Gbit/s: round 1 left 56k of its 59k
//! pages dirty, and rounds 2 to 9 shrank the set by 0.55 to 0.77 each, taking 3.1 s to reach 3.6k
//! pages.) Without hybrid mode, pre-copy goes on to the
//! round limit and then stops and copies.
//!
//! **Prediction.** After round 2 the source has a dirty rate (pages dirtied per second while a round ran)
//! and a processing rate. Each round then lasts `n / rate` and leaves `dirty_rate * n / rate` pages:
//! a geometric series of ratio `q = dirty_rate / rate`. If `q < 1`, the number of rounds until the
//! dirty set fits the target and the final downtime follow; if not, pre-copy will run to the round
//! limit. The report shows that prediction next to what happened.
//!
//! **Order (hot last).** A page written in many recent rounds will likely be written again: sending it
//! early in a round is wasted when it is dirtied before the round ends. Each page keeps a small heat
//! score (halved every round, raised when the page is dirty), and a round sends cold pages first and
//! hot pages last.

use crate::report::RoundReport;
use perfplus_vmm::PageSet;

/// What the rounds so far say about the next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Another live round.
    Continue,
    /// Pause the guest and send the rest; the text says why.
    StopAndCopy(String),
    /// Pause the guest, resume it on the destination and send the rest after (hybrid mode).
    SwitchToPostcopy(String),
}

/// The first forecast the engine made (after round 2), to compare with the outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Rounds in all, the stop-and-copy included; `None` when pre-copy is not expected to converge.
    pub rounds: Option<u32>,
    /// Expected downtime (the stop-and-copy round) in ms.
    pub downtime_ms: Option<f64>,
}

/// Hybrid mode switches to post-copy once a round leaves more than this share of its pages dirty.
const HYBRID_SHRINK: f64 = 0.5;

/// The hybrid rule on pages sent so far: more than half of them are dirty again, so pre-copy would
/// send more than post-copy. Also applied while round 1 runs (`source`), which can then stop early.
pub fn too_dirty_to_iterate(sent: u64, dirty_again: u64) -> bool {
    dirty_again as f64 > HYBRID_SHRINK * sent.max(1) as f64
}

pub struct Convergence {
    target_ms: f64,
    max_rounds: u32,
    hybrid: bool,
    processed_pages: u64,
    processing_secs: f64,
    last_rate: f64,
    prediction: Option<Prediction>,
}

impl Convergence {
    /// `hybrid`: switch to post-copy instead of iterating in vain.
    pub fn new(target_ms: f64, max_rounds: u32, hybrid: bool) -> Self {
        Self {
            target_ms,
            max_rounds,
            hybrid,
            processed_pages: 0,
            processing_secs: 0.0,
            last_rate: 0.0,
            prediction: None,
        }
    }

    /// Pages per second the engine processes, conservatively.
    pub fn rate(&self) -> f64 {
        let average = self.processed_pages as f64 / self.processing_secs.max(1e-6);
        if self.last_rate > 0.0 {
            average.min(self.last_rate)
        } else {
            average
        }
    }

    /// Takes the round that just finished and the dirty set found after it.
    pub fn after_round(&mut self, round: &RoundReport, dirty_now: u64) -> Decision {
        // The rate counts the pages the round had to read: pages known to be zero cost nothing, and
        // every page of a later round will have to be read.
        let secs = (round.duration_ms / 1e3).max(1e-6);
        let work = round.read_pages.max(1);
        self.processed_pages += work;
        self.processing_secs += secs;
        self.last_rate = work as f64 / secs;
        let rate = self.rate();
        if round.round == 2 && self.prediction.is_none() {
            let dirty_rate = dirty_now as f64 / secs;
            self.prediction = Some(self.predict(dirty_now, dirty_rate, rate, round.round));
        }
        let predicted_ms = dirty_now as f64 / rate * 1e3;
        // Within the target, but another round still halves the dirty set: it costs little and
        // shortens the downtime, so go on until the gain flattens (or a quarter of the target).
        let shrink = dirty_now as f64 / round.dirty_pages.max(1) as f64;
        let worth_another = shrink < 0.5 && predicted_ms > self.target_ms / 4.0 && round.round < self.max_rounds;
        if predicted_ms <= self.target_ms && !worth_another {
            return Decision::StopAndCopy(format!(
                "converged: {dirty_now} dirty pages fit the {} ms target ({predicted_ms:.1} ms at {rate:.0} pages/s)",
                self.target_ms
            ));
        }
        if self.hybrid {
            let previous = round.read_pages.max(1) as f64;
            let shrink = dirty_now as f64 / previous;
            if too_dirty_to_iterate(round.read_pages, dirty_now) {
                return Decision::SwitchToPostcopy(format!(
                    "pre-copy converges too slowly: round {} read {previous:.0} pages and {dirty_now} are dirty again (more than half: further rounds would send more than post-copy); switched to post-copy",
                    round.round
                ));
            }
            let target_pages = (self.target_ms / 1e3 * rate).max(1.0);
            let rounds_needed = (target_pages / dirty_now as f64).ln() / shrink.ln();
            if f64::from(round.round) + rounds_needed > f64::from(self.max_rounds) {
                return Decision::SwitchToPostcopy(format!(
                    "pre-copy would need {rounds_needed:.1} more rounds (dirty set x{shrink:.2} per round) to reach the {} ms target, past the round limit {}; switched to post-copy",
                    self.target_ms, self.max_rounds
                ));
            }
        }
        if round.round >= self.max_rounds {
            let why = format!(
                "round limit {} reached with {dirty_now} dirty pages ({predicted_ms:.1} ms predicted)",
                self.max_rounds
            );
            return if self.hybrid {
                Decision::SwitchToPostcopy(format!("{why}; switched to post-copy"))
            } else {
                Decision::StopAndCopy(why)
            };
        }
        Decision::Continue
    }

    fn predict(&self, dirty_now: u64, dirty_rate: f64, rate: f64, rounds_done: u32) -> Prediction {
        let fits = rate * self.target_ms / 1e3;
        let q = dirty_rate / rate;
        let mut n = dirty_now as f64;
        let mut rounds = rounds_done;
        while n > fits && rounds < self.max_rounds {
            if q >= 1.0 {
                return Prediction {
                    rounds: None,
                    downtime_ms: None,
                };
            }
            n *= q;
            rounds += 1;
        }
        // As the stop rule does: within the target, rounds that still halve the set go on.
        while q < 0.5 && n > fits / 4.0 && rounds < self.max_rounds {
            n *= q;
            rounds += 1;
        }
        // The last live round is followed by the stop-and-copy.
        Prediction {
            rounds: Some(rounds + 1),
            downtime_ms: Some(n / rate * 1e3),
        }
    }

    pub fn prediction(&self) -> Option<Prediction> {
        self.prediction
    }
}

/// Per-page write heat, from the dirty sets of the rounds so far.
pub struct Heat {
    score: Vec<u8>,
}

/// Pages at or above this score were dirty in at least two of the last few rounds.
const HOT: u8 = 96;

impl Heat {
    pub fn new(pages: u64) -> Self {
        Self {
            score: vec![0; pages as usize],
        }
    }

    /// Ages every page and warms the ones in `dirty`.
    pub fn update(&mut self, dirty: &PageSet) {
        for score in &mut self.score {
            *score /= 2;
        }
        for page in dirty.iter() {
            let score = &mut self.score[page as usize];
            *score = score.saturating_add(64);
        }
    }

    /// Warms pages by `(page, writes)` seen by another source (eBPF write counts): a page written
    /// several times in a round is hot whatever the dirty set says.
    pub fn warm(&mut self, writes: impl IntoIterator<Item = (u64, u64)>) {
        for (page, count) in writes {
            if let Some(score) = self.score.get_mut(page as usize) {
                *score = score.saturating_add((count.min(4) as u8) * 16);
            }
        }
    }

    pub fn is_hot(&self, page: u64) -> bool {
        self.score.get(page as usize).is_some_and(|&s| s >= HOT)
    }

    /// The pages of `dirty` in sending order: cold pages in address order, then hot ones.
    pub fn order(&self, dirty: &PageSet) -> Vec<u64> {
        let (mut cold, hot): (Vec<u64>, Vec<u64>) = dirty.iter().partition(|&p| !self.is_hot(p));
        cold.extend(hot);
        cold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(number: u32, dirty: u64, ms: f64) -> RoundReport {
        RoundReport {
            round: number,
            dirty_pages: dirty,
            read_pages: dirty,
            duration_ms: ms,
            ..Default::default()
        }
    }

    #[test]
    fn stops_when_the_dirty_set_fits_the_target() {
        let mut c = Convergence::new(30.0, 30, false);
        // 100k pages/s: 30 ms fits 3000 pages.
        assert_eq!(c.after_round(&round(1, 100_000, 1000.0), 10_000), Decision::Continue);
        match c.after_round(&round(2, 10_000, 100.0), 600) {
            Decision::StopAndCopy(why) => assert!(why.starts_with("converged"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn predicts_a_geometric_series_and_a_round_limit() {
        let mut c = Convergence::new(10.0, 30, false);
        c.after_round(&round(1, 100_000, 1000.0), 20_000);
        // Round 2: 20k pages in 200 ms (100k pages/s); 10k dirtied meanwhile (50k pages/s, q = 0.5).
        c.after_round(&round(2, 20_000, 200.0), 10_000);
        let p = c.prediction().unwrap();
        // 10k -> 5k -> 2.5k -> 1.25k -> 625 (fits 1000): rounds 3, 4, 5, 6 live, then stop-and-copy.
        assert_eq!(p.rounds, Some(7));
        assert!((p.downtime_ms.unwrap() - 6.25).abs() < 1e-9, "{p:?}");

        // q = 0.25: 5000 -> 1250 -> 312 fits 1000, yet is above a quarter of it (250), so one more
        // round (78): rounds 3, 4, 5 live, then stop-and-copy.
        let mut c = Convergence::new(10.0, 30, false);
        c.after_round(&round(1, 100_000, 1000.0), 20_000);
        c.after_round(&round(2, 20_000, 200.0), 5_000);
        let p = c.prediction().unwrap();
        assert_eq!(p.rounds, Some(6), "{p:?}");
        assert!((p.downtime_ms.unwrap() - 0.78125).abs() < 1e-9, "{p:?}");

        let mut c = Convergence::new(10.0, 5, false);
        c.after_round(&round(1, 100_000, 1000.0), 50_000);
        assert_eq!(c.after_round(&round(2, 50_000, 500.0), 60_000), Decision::Continue);
        assert_eq!(
            c.prediction().unwrap().rounds,
            None,
            "dirtier than the link: no convergence"
        );
        c.after_round(&round(3, 60_000, 600.0), 60_000);
        c.after_round(&round(4, 60_000, 600.0), 60_000);
        match c.after_round(&round(5, 60_000, 600.0), 60_000) {
            Decision::StopAndCopy(why) => assert!(why.starts_with("round limit 5"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn goes_on_while_rounds_still_halve_the_dirty_set() {
        let mut c = Convergence::new(30.0, 30, false);
        // 100k pages/s: 2000 pages take 20 ms, within the target, but the round cut 10000 to 2000.
        assert_eq!(c.after_round(&round(2, 10_000, 100.0), 2_000), Decision::Continue);
        // 2000 -> 1500: the gain flattened.
        assert!(matches!(
            c.after_round(&round(3, 2_000, 20.0), 1_500),
            Decision::StopAndCopy(_)
        ));
        // Under a quarter of the target: stop whatever the trend.
        let mut c = Convergence::new(30.0, 30, false);
        assert!(matches!(
            c.after_round(&round(2, 10_000, 100.0), 500),
            Decision::StopAndCopy(_)
        ));
    }

    #[test]
    fn pages_known_to_be_zero_do_not_inflate_the_rate() {
        let mut c = Convergence::new(30.0, 30, false);
        // Round 1: 100k pages in 100 ms, but only 1000 were read (the rest were holes): 10k pages/s.
        let first = RoundReport {
            read_pages: 1000,
            ..round(1, 100_000, 100.0)
        };
        // 1000 dirty pages would take 100 ms at the real rate: not within 30 ms.
        assert_eq!(c.after_round(&first, 1000), Decision::Continue);
    }

    #[test]
    fn hybrid_switches_when_the_dirty_set_stops_shrinking() {
        // Round 1 read 20k pages (the rest were holes) and left 15k of them dirty.
        let mut c = Convergence::new(10.0, 30, true);
        let first = RoundReport {
            read_pages: 20_000,
            ..round(1, 100_000, 200.0)
        };
        match c.after_round(&first, 15_000) {
            Decision::SwitchToPostcopy(why) => assert!(
                why.contains("round 1 read 20000 pages and 15000 are dirty again"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        let mut c = Convergence::new(10.0, 30, true);
        assert_eq!(c.after_round(&round(1, 100_000, 1000.0), 20_000), Decision::Continue);
        match c.after_round(&round(2, 20_000, 200.0), 19_000) {
            Decision::SwitchToPostcopy(why) => assert!(why.starts_with("pre-copy converges too slowly"), "{why}"),
            other => panic!("{other:?}"),
        }
        // More than half left dirty: further rounds would cost more than post-copy.
        let mut c = Convergence::new(10.0, 30, true);
        c.after_round(&round(1, 100_000, 1000.0), 20_000);
        match c.after_round(&round(2, 20_000, 200.0), 11_000) {
            Decision::SwitchToPostcopy(why) => assert!(why.starts_with("pre-copy converges too slowly"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Less than half: another round is worth it.
        let mut c = Convergence::new(10.0, 30, true);
        c.after_round(&round(1, 100_000, 1000.0), 20_000);
        assert_eq!(c.after_round(&round(2, 20_000, 200.0), 9_000), Decision::Continue);
        // Shrinking, but too slowly for the round limit.
        let mut c = Convergence::new(1.0, 4, true);
        c.after_round(&round(1, 100_000, 1000.0), 20_000);
        match c.after_round(&round(2, 20_000, 200.0), 9_000) {
            Decision::SwitchToPostcopy(why) => assert!(why.contains("past the round limit 4"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hot_pages_go_last() {
        let mut heat = Heat::new(8);
        let mut hot = PageSet::new(8);
        hot.insert(1);
        heat.update(&hot);
        heat.update(&hot);
        let mut dirty = PageSet::new(8);
        for p in [0, 1, 5] {
            dirty.insert(p);
        }
        assert_eq!(heat.order(&dirty), vec![0, 5, 1]);
        // A page that cooled down for a few rounds is cold again.
        let none = PageSet::new(8);
        heat.update(&none);
        heat.update(&none);
        assert!(!heat.is_hot(1));
    }
}
