//! When to stop iterating, what to expect, and in which order to send a round.
//!
//! **Stop rule.** After each round the source knows how many pages are dirty now and how fast it
//! processed pages in the rounds so far (read, hash, send, acknowledged; pages known to be zero
//! without being read, the holes of round 1, do not count: the next rounds have none). If the dirty set can be sent
//! within the downtime target at that rate, the next round is the stop-and-copy. The rate used is the
//! lower of the last round's and the average, so a round made cheap by zero pages does not make the
//! engine stop too early. Once the dirty set fits, the engine still goes on while another round is
//! expected to take [`MIN_ROUND_GAIN_MS`] or more off the downtime (the dirty set shrinking as it did
//! in the last round): a live round costs the guest nothing, the stop-and-copy stops it.
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
//! hot pages last. Round 1 has no heat yet: it watches the guest as it goes instead ([`FirstRound`]),
//! and a page the guest writes before round 1 has sent it is sent at the end of round 1.

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
/// Once the dirty set fits the target, another live round is worth it while it is expected to take at
/// least this much off the downtime. Below it a round gains about what its own overheads make the
/// last one cost again: a collect of the dirty log and a round trip to the destination (~1 ms here),
/// and the pages the guest writes meanwhile (at 10k writes/s, 10 a ms). Measured on the shaped bench's
/// moderate workload (1 Gbit/s, 10k writes/s), the stop rule that went on only while rounds halved the
/// set stopped at 90-175 pages (3-9 ms of downtime); the set goes on shrinking to ~40 pages.
pub const MIN_ROUND_GAIN_MS: f64 = 1.0;

/// The downtime another round takes off, expected: `predicted_ms` now, `shrink` times that after it.
fn round_gain_ms(predicted_ms: f64, shrink: f64) -> f64 {
    predicted_ms * (1.0 - shrink.min(1.0))
}

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
        // Within the target, but another round that shrinks the set as this one did would still
        // take a millisecond or more off the downtime: go on until the gain flattens.
        let shrink = dirty_now as f64 / round.dirty_pages.max(1) as f64;
        let worth_another = round_gain_ms(predicted_ms, shrink) >= MIN_ROUND_GAIN_MS && round.round < self.max_rounds;
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
        // As the stop rule does: within the target, rounds that still gain go on.
        while round_gain_ms(n / rate * 1e3, q) >= MIN_ROUND_GAIN_MS && rounds < self.max_rounds {
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

/// Round 1's sending order as it goes: hot last without heat. Round 1 sends every page once in a
/// fixed order (address order) while the guest runs; the source collects the tracker every few hundred
/// ms meanwhile and hands the result to [`FirstRound::found_dirty`]. A page found written that round 1
/// has not sent yet is *deferred*: moved to the end of the round, since it is hot and sending it now
/// would likely be wasted. A page found written that round 1 has already sent goes to round 2's dirty
/// set, as after any round. Without deferral (`defer` false: address order asked for, or hybrid's
/// early-switch watch alone) every page found written goes to round 2's set, as before.
///
/// **No write is lost.** The trackers guarantee (`perfplus_vmm::tracking`, each module's "ordering
/// guarantee") that every guest write to a page is reported by some collect, and that a read of the
/// page that starts after that collect returned sees the write or newer content (newer writes are
/// reported again, by a later collect). So it is enough that for every collect and every page it
/// reports, the page is read again after that collect returned and what is read is sent. Each page a
/// round-1 collect reports is, in [`FirstRound::found_dirty`]:
/// - already handed out by [`FirstRound::next_chunk`]: into round 2's set, read in round 2, after the
///   collect. Counted as dirty again (hybrid's rule), once;
/// - not handed out yet, and not a hole: deferred (or left where it is if already deferred). It is
///   handed out later in round 1 and read then, after the collect: its content is at least as new as
///   every write the collect reported. It need *not* be in round 2's set, which saves a read and a
///   hash: a write after the collect's re-protection is reported by a later collect, during round 1
///   (the page is handed out by then, or deferred still, and the same two cases apply) or the one after
///   round 1 (round 2's set). This relies on one order of calls, which the source keeps: collect, then
///   `found_dirty`, then `next_chunk` and the reads of the pages it returns, then the next collect.
///   A page handed out counts as sent from that moment, even if its read comes later (the read then
///   also comes after any later collect: sending it again in round 2 is merely redundant);
/// - a hole (`known_zero`: holes are found after tracking started and round 1 sends them as zero
///   markers without reading them): into round 2's set wherever round 1 is, and it keeps its place.
///
/// If round 1 stops early (hybrid's switch to post-copy), the pages not handed out yet, deferred or
/// not, are still to send: [`FirstRound::into_rest`] returns them (holes aside) with round 2's set.
///
/// **Exactly once.** Each page of `order` is handed out once: a page is deferred only while it is
/// pending (not handed out), is then skipped where it stood in `order` and appended to the tail once;
/// the tail is handed out after `order` is exhausted. Round 1's report therefore still counts every
/// page once.
///
/// **Hot regions.** Writes cluster: a region of [`DEFER_REGION_PAGES`] pages (2 MiB) in which one
/// collect found [`HOT_REGION_PAGES`] or more pages written is deferred as a whole, its pages not
/// found written too (holes aside): they are likely written before round 1 would reach them. With
/// the benchmark's `read-heavy` guest (writes in the first quarter of memory, which round 1 passes in
/// its first 1.5 s of 6), deferring only the pages found written left most of the hot quarter to be
/// sent early and written again (a simulation: round 2 of ~34k pages; with regions, ~11k). Deferring a
/// page is safe whether or not it was written (it is still sent once in round 1, later), so this
/// changes the order, never what arrives.
///
/// **Cost.** A page is deferred at most once (one bit, one `u64` in the tail: at most 8 bytes a 4 KiB
/// page); handing out a page tests and sets a bit; `found_dirty` walks the collected bitmap and does
/// O(1) per page reported, plus a walk of each hot region's pages. Four bitmaps of `pages / 8` bytes.
/// Pages of a region that [`FirstRound`] defers as a whole: 2 MiB.
pub const DEFER_REGION_PAGES: u64 = 512;

/// Pages one collect must find written in a region for [`FirstRound`] to defer all of it.
pub const HOT_REGION_PAGES: u32 = 2;

pub struct FirstRound<'a> {
    order: &'a [u64],
    /// Pages per region deferred as a whole ([`DEFER_REGION_PAGES`]; 1: pages one by one).
    region_pages: u64,
    /// Index in `order` of the next page to consider.
    next: usize,
    /// Deferred pages, in the order they were deferred, and the index of the next one to hand out.
    tail: Vec<u64>,
    next_in_tail: usize,
    known_zero: Option<&'a PageSet>,
    defer: bool,
    /// Pages of `order` not handed out yet (deferred or not).
    pending: PageSet,
    deferred: PageSet,
    sent: PageSet,
    /// Round 2's dirty set so far.
    dirty: PageSet,
    handed_out: u64,
    dirty_again: u64,
    deferrals: u64,
    /// Pages found written before round 1 handed them out (each counted once).
    found_ahead: PageSet,
    written_ahead: u64,
}

impl<'a> FirstRound<'a> {
    /// Round 1 over `order` (pages of a memory of `pages` pages, each once); `known_zero`: the holes
    /// round 1 sends as zero markers without reading them; `defer`: move pages written ahead of the
    /// round to its end.
    pub fn new(order: &'a [u64], pages: u64, known_zero: Option<&'a PageSet>, defer: bool) -> Self {
        let mut pending = PageSet::new(pages);
        for &page in order {
            pending.insert(page);
        }
        Self {
            order,
            region_pages: DEFER_REGION_PAGES,
            next: 0,
            tail: Vec::new(),
            next_in_tail: 0,
            known_zero,
            defer,
            pending,
            deferred: PageSet::new(pages),
            sent: PageSet::new(pages),
            dirty: PageSet::new(pages),
            handed_out: 0,
            dirty_again: 0,
            deferrals: 0,
            found_ahead: PageSet::new(pages),
            written_ahead: 0,
        }
    }

    /// Defers regions of `pages` pages as a whole (1: only the pages found written).
    pub fn regions_of(mut self, pages: u64) -> Self {
        self.region_pages = pages.max(1);
        self
    }

    /// Appends to `out` the next pages to send, at most `max`: `order`'s less the deferred ones, then
    /// the deferred ones. The caller reads them before it calls [`FirstRound::found_dirty`] again.
    pub fn next_chunk(&mut self, out: &mut Vec<u64>, max: usize) {
        let mut taken = 0;
        while taken < max {
            let page = if let Some(&page) = self.order.get(self.next) {
                self.next += 1;
                // Deferred: handed out from the tail. Not pending: a repeat in `order`.
                if self.deferred.contains(page) || !self.pending.contains(page) {
                    continue;
                }
                page
            } else if let Some(&page) = self.tail.get(self.next_in_tail) {
                self.next_in_tail += 1;
                page
            } else {
                break;
            };
            self.pending.remove(page);
            self.sent.insert(page);
            self.handed_out += 1;
            out.push(page);
            taken += 1;
        }
    }

    /// Takes what a collect just returned (see the type's docs for why each case is safe). Returns
    /// how many pages it deferred.
    pub fn found_dirty(&mut self, collected: &PageSet) -> u64 {
        let before = self.deferrals;
        for page in collected.iter() {
            let hole = self.known_zero.is_some_and(|zero| zero.contains(page));
            if self.sent.contains(page) {
                if !self.dirty.contains(page) {
                    self.dirty.insert(page);
                    self.dirty_again += 1;
                }
                continue;
            }
            if self.pending.contains(page) && !self.found_ahead.contains(page) {
                self.found_ahead.insert(page);
                self.written_ahead += 1;
            }
            if !self.defer || hole || !self.pending.contains(page) {
                // Not read later in this round: a later round reads it.
                self.dirty.insert(page);
            } else {
                self.defer_page(page);
            }
        }
        if self.defer && self.region_pages > 1 {
            // `iter` is in page order, so a region's pages come together.
            let mut hot_regions = Vec::new();
            let (mut region, mut found) = (u64::MAX, 0);
            for page in collected.iter() {
                if page / self.region_pages != region {
                    (region, found) = (page / self.region_pages, 0);
                }
                found += 1;
                if found == HOT_REGION_PAGES {
                    hot_regions.push(region);
                }
            }
            for region in hot_regions {
                let start = region * self.region_pages;
                let end = (start + self.region_pages).min(self.pending.capacity());
                for page in start..end {
                    let hole = self.known_zero.is_some_and(|zero| zero.contains(page));
                    if self.pending.contains(page) && !hole {
                        self.defer_page(page);
                    }
                }
            }
        }
        self.deferrals - before
    }

    /// Moves a pending page to the end of the round (once).
    fn defer_page(&mut self, page: u64) {
        if !self.deferred.contains(page) {
            self.deferred.insert(page);
            self.tail.push(page);
            self.deferrals += 1;
        }
    }

    /// Pages handed out so far.
    pub fn handed_out(&self) -> u64 {
        self.handed_out
    }

    /// Pages found written after they were handed out (each counted once): round 2 sends them again.
    pub fn dirty_again(&self) -> u64 {
        self.dirty_again
    }

    /// Pages found written before round 1 handed them out (each counted once, deferred or not).
    /// With [`FirstRound::dirty_again`], what the guest wrote while round 1 went: hybrid's early switch
    /// compares that with what round 1 read (deferral must not hide a guest that writes faster than
    /// the link: its working set deferred, `dirty_again` alone grows only once the tail is sent).
    pub fn written_ahead(&self) -> u64 {
        self.written_ahead
    }

    /// Pages deferred to the end of the round so far.
    pub fn deferrals(&self) -> u64 {
        self.deferrals
    }

    /// Pages not handed out yet.
    pub fn unsent(&self) -> u64 {
        self.pending.count()
    }

    /// Every page was handed out.
    pub fn is_done(&self) -> bool {
        self.next >= self.order.len() && self.next_in_tail >= self.tail.len()
    }

    /// What later rounds (or post-copy) must still send: round 2's set so far, and the pages not
    /// handed out (empty once the round ran to its end), holes aside, which are zero already.
    pub fn into_rest(self) -> PageSet {
        let mut rest = self.dirty;
        for page in self.pending.iter() {
            if !self.known_zero.is_some_and(|zero| zero.contains(page)) {
                rest.insert(page);
            }
        }
        rest
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
        // 90 pages: 0.9 ms, less than another round could take off (it costs about that itself).
        match c.after_round(&round(2, 10_000, 100.0), 90) {
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
        // 10k -> 5k -> 2.5k -> 1.25k -> 625 (fits 1000), then rounds that still take 1 ms or more
        // off: -> 312 (3.1 ms off) -> 156 (1.6 ms off), not -> 78 (0.8 ms): rounds 3 to 8 live, then
        // stop-and-copy.
        assert_eq!(p.rounds, Some(9));
        assert!((p.downtime_ms.unwrap() - 1.5625).abs() < 1e-9, "{p:?}");

        // q = 0.25: 5000 -> 1250 -> 312 fits 1000, and one more round takes 2.3 ms off (78, not
        // -> 20: 0.6 ms): rounds 3, 4, 5 live, then stop-and-copy.
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
    fn goes_on_while_another_round_takes_a_millisecond_off_the_downtime() {
        let mut c = Convergence::new(30.0, 30, false);
        // 100k pages/s: 2000 pages take 20 ms, within the target, but the round cut 10000 to 2000.
        assert_eq!(c.after_round(&round(2, 10_000, 100.0), 2_000), Decision::Continue);
        // 2000 -> 1500 (15 ms): another such round would take 3.75 ms off: on.
        assert_eq!(c.after_round(&round(3, 2_000, 20.0), 1_500), Decision::Continue);
        // 1500 -> 1450: the gain flattened (0.5 ms).
        assert!(matches!(
            c.after_round(&round(4, 1_500, 15.0), 1_450),
            Decision::StopAndCopy(_)
        ));
        // 200 pages (2 ms) from 10000: another round takes ~2 ms off: on. 90 pages: stop whatever
        // the trend.
        let mut c = Convergence::new(30.0, 30, false);
        assert_eq!(c.after_round(&round(2, 10_000, 100.0), 200), Decision::Continue);
        let mut c = Convergence::new(30.0, 30, false);
        assert!(matches!(
            c.after_round(&round(2, 10_000, 100.0), 90),
            Decision::StopAndCopy(_)
        ));
        // A round that did not shrink the set gains nothing.
        let mut c = Convergence::new(30.0, 30, false);
        c.after_round(&round(2, 10_000, 100.0), 1_000);
        assert!(matches!(
            c.after_round(&round(3, 1_000, 10.0), 1_200),
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

    fn set(pages: u64, of: &[u64]) -> PageSet {
        let mut set = PageSet::new(pages);
        for &page in of {
            set.insert(page);
        }
        set
    }

    /// Hands out the whole rest of the round, `max` at a time.
    fn drain(round: &mut FirstRound, max: usize) -> Vec<u64> {
        let mut all = Vec::new();
        loop {
            let before = all.len();
            round.next_chunk(&mut all, max);
            if all.len() == before {
                return all;
            }
            assert!(all.len() - before <= max);
        }
    }

    #[test]
    fn round_1_sends_pages_written_ahead_of_it_last_and_once() {
        let order: Vec<u64> = (0..16).collect();
        let mut round = FirstRound::new(&order, 16, None, true).regions_of(1);
        let mut sent = Vec::new();
        round.next_chunk(&mut sent, 4);
        assert_eq!(sent, [0, 1, 2, 3]);
        // 2 was sent: round 2's. 9 and 5 were not: deferred, in address order within one collect.
        assert_eq!(round.found_dirty(&set(16, &[2, 9, 5])), 2);
        round.next_chunk(&mut sent, 4);
        assert_eq!(sent[4..], [4, 6, 7, 8]);
        // 9 again while deferred: it stays where it is in the tail. 12 is deferred after it; 4 was sent.
        assert_eq!(round.found_dirty(&set(16, &[4, 9, 12])), 1);
        sent.extend(drain(&mut round, 4));
        assert_eq!(sent, [0, 1, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14, 15, 5, 9, 12]);
        assert!(round.is_done());
        assert_eq!((round.handed_out(), round.unsent(), round.deferrals()), (16, 0, 3));
        // Written again after it was sent: counted once however often found.
        round.found_dirty(&set(16, &[2, 5]));
        assert_eq!(
            round.dirty_again(),
            3,
            "2, 4 and 5 were found written after they were sent"
        );
        let rest: Vec<u64> = round.into_rest().iter().collect();
        assert_eq!(
            rest,
            [2, 4, 5],
            "the deferred pages were read after the collect that found them: not in round 2's set"
        );
    }

    #[test]
    fn a_region_with_pages_written_ahead_of_round_1_goes_last_as_a_whole() {
        let order: Vec<u64> = (0..32).collect();
        let holes = set(32, &[13]);
        let mut round = FirstRound::new(&order, 32, Some(&holes), true).regions_of(8);
        let mut sent = Vec::new();
        round.next_chunk(&mut sent, 2);
        // Region 8..16: two pages found written (13 a hole among them), so all of it that is pending
        // goes last; 13 keeps its place and is round 2's. Regions 0..8 and 24..32: one page each,
        // deferred alone. The tail: pages found, then the rest of the hot regions.
        assert_eq!(round.found_dirty(&set(32, &[5, 9, 13, 26])), 1 + 7 + 1);
        // 1 was sent already: round 2's; one page found in its region defers nothing.
        assert_eq!(round.found_dirty(&set(32, &[1])), 0);
        sent.extend(drain(&mut round, 5));
        let mut expected: Vec<u64> = vec![0, 1, 2, 3, 4, 6, 7, 13];
        expected.extend((16..32).filter(|&p| p != 26));
        expected.extend([5, 9, 26, 8, 10, 11, 12, 14, 15]);
        assert_eq!(sent, expected);
        assert_eq!((round.handed_out(), round.deferrals()), (32, 9));
        // Found ahead of the round: 5, 9, 13 and 26 (the region's other pages were not written).
        assert_eq!(round.written_ahead(), 4);
        assert_eq!(round.into_rest().iter().collect::<Vec<_>>(), [1, 13]);
    }

    #[test]
    fn holes_keep_their_place_and_go_to_round_2() {
        let order: Vec<u64> = (0..8).collect();
        let holes = set(8, &[5, 6]);
        let mut round = FirstRound::new(&order, 8, Some(&holes), true).regions_of(1);
        let mut sent = Vec::new();
        round.next_chunk(&mut sent, 2);
        // 6 is a hole ahead of the round: it is sent as a zero marker without a read, so the write
        // must be sent in round 2; 3 is deferred.
        assert_eq!(round.found_dirty(&set(8, &[3, 6])), 1);
        sent.extend(drain(&mut round, 3));
        assert_eq!(sent, [0, 1, 2, 4, 5, 6, 7, 3]);
        assert_eq!(round.dirty_again(), 0, "6 was found before round 1 passed it");
        assert_eq!(round.into_rest().iter().collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn without_deferral_every_page_found_goes_to_round_2() {
        let order: Vec<u64> = (0..8).collect();
        let mut round = FirstRound::new(&order, 8, None, false).regions_of(1);
        let mut sent = Vec::new();
        round.next_chunk(&mut sent, 3);
        assert_eq!(round.found_dirty(&set(8, &[1, 6])), 0);
        sent.extend(drain(&mut round, 8));
        assert_eq!(sent, (0..8).collect::<Vec<_>>(), "address order");
        assert_eq!(round.dirty_again(), 1);
        assert_eq!(round.into_rest().iter().collect::<Vec<_>>(), [1, 6]);
    }

    #[test]
    fn a_round_cut_short_leaves_every_unsent_page_to_send_holes_aside() {
        let order: Vec<u64> = (0..10).collect();
        let holes = set(10, &[8]);
        let mut round = FirstRound::new(&order, 10, Some(&holes), true).regions_of(1);
        let mut sent = Vec::new();
        round.next_chunk(&mut sent, 3);
        round.found_dirty(&set(10, &[1, 4]));
        round.next_chunk(&mut sent, 3);
        assert_eq!(sent, [0, 1, 2, 3, 5, 6]);
        assert_eq!(round.unsent(), 4);
        // Cut here: 4 (deferred), 7 and 9 are unsent; 8 is a hole, zero at the destination already.
        assert_eq!(round.into_rest().iter().collect::<Vec<_>>(), [1, 4, 7, 9]);
    }

    /// A model of round 1 and the rounds after it against a guest that writes between every two steps
    /// and a tracker with the dirty log's guarantee (a collect returns and clears the bits set since
    /// the last one): whatever the interleaving, the destination ends with every page's last version.
    #[test]
    fn no_write_is_lost_whatever_the_interleaving() {
        let pages = 64u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for trial in 0..300 {
            // Pages 0..48 hold data (version 1); 48..64 are holes, never written before the look, and
            // zero (version 0) like the destination's memory at the start.
            let mut version: Vec<u64> = (0..pages).map(|page| u64::from(page < 48)).collect();
            let holes = set(pages, &(48..64).collect::<Vec<_>>());
            let mut destination = vec![0u64; pages as usize];
            let mut logged = PageSet::new(pages);
            let hot = 1 + rand(pages);
            let write = |version: &mut Vec<u64>, logged: &mut PageSet, rand: &mut dyn FnMut(u64) -> u64| {
                for _ in 0..rand(4) {
                    let page = if rand(4) == 0 { rand(pages) } else { rand(hot) };
                    version[page as usize] += 1;
                    logged.insert(page);
                }
            };
            let collect = |logged: &mut PageSet| std::mem::replace(logged, PageSet::new(pages));
            let order: Vec<u64> = (0..pages).collect();
            // Pages one by one, or regions of 8 (holes among them).
            let mut round = FirstRound::new(&order, pages, Some(&holes), trial % 3 != 0)
                .regions_of(if trial % 2 == 0 { 1 } else { 8 });
            let mut chunk = Vec::new();
            let mut sent = 0;
            loop {
                write(&mut version, &mut logged, &mut rand);
                if rand(3) == 0 {
                    round.found_dirty(&collect(&mut logged));
                }
                chunk.clear();
                round.next_chunk(&mut chunk, 1 + rand(5) as usize);
                if chunk.is_empty() {
                    break;
                }
                for &page in &chunk {
                    sent += 1;
                    // Holes go as zero markers, unread; the rest is read now, one write possibly
                    // landing between two reads.
                    destination[page as usize] = if holes.contains(page) {
                        0
                    } else {
                        version[page as usize]
                    };
                    write(&mut version, &mut logged, &mut rand);
                }
            }
            assert_eq!(sent, pages, "every page once in round 1");
            // Round 2 (live), then the stop-and-copy (the guest paused: no write after its collect).
            write(&mut version, &mut logged, &mut rand);
            let mut dirty = collect(&mut logged);
            dirty.union_with(&round.into_rest());
            for page in dirty.iter() {
                destination[page as usize] = version[page as usize];
                write(&mut version, &mut logged, &mut rand);
            }
            for page in collect(&mut logged).iter() {
                destination[page as usize] = version[page as usize];
            }
            assert_eq!(destination, version, "trial {trial}");
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
