//! The source's plan for the post-copy push: which missing page goes next and when the next batch may
//! leave. No I/O and no clock of its own (every call that needs the time takes `now`), so the order and
//! the pacing are tested without a link.
//!
//! Per page: `NotNeeded` (the destination has it), `Needed` (missing there, not sent on the current
//! connection), `Sent`. Order: pages next to recent faults first (the [`PREFETCH`] after each requested
//! page), then address order. Pacing: at most a window of unacknowledged push bytes, `max(128 KiB,
//! rate × 4 ms)`, and batches spaced to 95 % of the best delivery rate seen (from `PushAck`s, or the
//! pre-copy rounds), so that the bottleneck queue stays short and a demanded page waits behind at most
//! ~4 ms of push traffic. All of it counts the bytes that cross the link (a batch's frames, compressed
//! or not), not the pages' payload: the destination acknowledges payload bytes, and the plan maps them
//! back to what their batches cost on the wire. Paced by payload, a compressed push would hold itself
//! to the link's rate in payload bytes and leave the link part idle (the shaped bench's hybrid took
//! 2.5 s instead of 1.9 s when its text pages started to go compressed).
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use perfplus_protocol::frame::FULL_ITEM_LEN;
use perfplus_vmm::PageSet;

/// Pages per pushed batch (64 KiB of content when full).
pub const PUSH_BATCH: usize = 16;
/// Pages after a requested one that the push sends next.
pub const PREFETCH: u64 = 32;
/// Most pages waiting in the prefetch queue.
const PRIORITY_MAX: usize = 4096;
/// Smallest window of unacknowledged push bytes.
pub const MIN_WINDOW: u64 = 2 * (PUSH_BATCH * FULL_ITEM_LEN) as u64;
/// Queue the push may build at the bottleneck, in seconds of link time. Measured on the shaped bench
/// (faster-than-link, 1 Gbit/s, 3 runs each): at 10 ms the longest demand fault took 10-11 ms (a
/// page behind a full window) and the guest's longest stall was 16.6-20.5 ms in hybrid; at 4 ms,
/// 4.7-9.0 ms and 10.8-14.7 ms, with the same total time (the push still fills the link).
const QUEUE_TARGET_S: f64 = 0.004;
/// The push paces itself to this share of the best delivery rate seen.
const PACE_SHARE: f64 = 0.95;
/// Shortest span of acknowledgements a delivery-rate sample is taken over.
const RATE_SAMPLE: Duration = Duration::from_millis(50);
/// How far behind its schedule the pacing may fall before the lost time is forgotten.
const PACE_SLACK: Duration = Duration::from_millis(5);

/// Where a page stands between the source and the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// The destination has it.
    NotNeeded,
    /// Missing there and not sent on the current connection.
    Needed,
    /// Sent on the current connection (pushed, demanded or eager): it arrives without being sent again.
    Sent,
}

pub struct PushPlan {
    state: Vec<PageState>,
    cursor: u64,
    priority: VecDeque<u64>,
    /// Bytes the push put on the link, and of those the destination acknowledged, on the current bulk
    /// connection.
    sent_bytes: u64,
    acked_bytes: u64,
    /// Payload bytes of the batches sent on it.
    sent_payload: u64,
    /// Batches sent and not acknowledged yet: (`sent_payload`, `sent_bytes`) after each.
    unacked: VecDeque<(u64, u64)>,
    /// Best delivery rate seen (bytes/s) and the last sample point.
    rate: Option<f64>,
    sample: (Instant, u64),
    next_send: Instant,
}

impl PushPlan {
    /// Every page of `missing` is needed; `link_rate` (bytes/s) is what pre-copy measured, if anything.
    pub fn new(missing: &PageSet, link_rate: Option<f64>, now: Instant) -> PushPlan {
        let state = (0..missing.capacity())
            .map(|p| {
                if missing.contains(p) {
                    PageState::Needed
                } else {
                    PageState::NotNeeded
                }
            })
            .collect();
        PushPlan {
            state,
            cursor: 0,
            priority: VecDeque::new(),
            sent_bytes: 0,
            acked_bytes: 0,
            sent_payload: 0,
            unacked: VecDeque::new(),
            rate: link_rate,
            sample: (now, 0),
            next_send: now,
        }
    }

    pub fn pages(&self) -> u64 {
        self.state.len() as u64
    }

    pub fn state(&self, page: u64) -> PageState {
        self.state[page as usize]
    }

    pub fn mark_sent(&mut self, page: u64) {
        self.state[page as usize] = PageState::Sent;
    }

    /// The next page to push, or None when every page needed has been sent.
    pub fn next_page(&mut self) -> Option<u64> {
        while let Some(p) = self.priority.pop_front() {
            if self.state[p as usize] == PageState::Needed {
                return Some(p);
            }
        }
        while (self.cursor as usize) < self.state.len() {
            let p = self.cursor;
            self.cursor += 1;
            if self.state[p as usize] == PageState::Needed {
                return Some(p);
            }
        }
        None
    }

    /// `page` was requested: the pages after it are likely next, so they go first.
    pub fn prioritize_after(&mut self, page: u64) {
        let end = (page + 1 + PREFETCH).min(self.pages());
        for next in (page + 1..end).rev() {
            if self.state[next as usize] == PageState::Needed {
                self.priority.push_front(next);
            }
        }
        self.priority.truncate(PRIORITY_MAX);
    }

    /// Unacknowledged push bytes (on the link) allowed in flight.
    pub fn window(&self) -> u64 {
        self.rate
            .map_or(MIN_WINDOW, |r| ((r * QUEUE_TARGET_S) as u64).max(MIN_WINDOW))
    }

    /// The window has room for another batch.
    pub fn can_push(&self) -> bool {
        self.sent_bytes.saturating_sub(self.acked_bytes) < self.window()
    }

    /// When the next batch may leave.
    pub fn next_send(&self) -> Instant {
        self.next_send
    }

    /// The destination acknowledged `payload` bytes of push payload on this connection so far: the
    /// batches that make them up crossed the link.
    pub fn on_ack(&mut self, payload: u64, now: Instant) {
        while let Some(&(payload_end, bytes_end)) = self.unacked.front() {
            if payload_end > payload {
                break; // a part of a split batch: the rest is still on its way
            }
            self.acked_bytes = bytes_end;
            self.unacked.pop_front();
        }
        let bytes = self.acked_bytes;
        let (t0, b0) = self.sample;
        let dt = now.saturating_duration_since(t0);
        if dt >= RATE_SAMPLE {
            let r = bytes.saturating_sub(b0) as f64 / dt.as_secs_f64();
            if r > 0.0 && self.rate.is_none_or(|best| r > best) {
                self.rate = Some(r);
            }
            self.sample = (now, bytes);
        }
    }

    /// A batch of `payload` bytes left as `bytes` on the link (its frames: compressed, they are fewer):
    /// the next may leave once the link has carried them.
    pub fn after_send(&mut self, payload: u64, bytes: u64, now: Instant) {
        self.sent_payload += payload;
        self.sent_bytes += bytes;
        self.unacked.push_back((self.sent_payload, self.sent_bytes));
        if let Some(rate) = self.rate {
            let gap = Duration::from_secs_f64(bytes as f64 / (rate * PACE_SHARE));
            self.next_send = self.next_send.max(now.checked_sub(PACE_SLACK).unwrap_or(now)) + gap;
        }
    }

    /// A new bulk connection after a lost one: `missing` is what the destination says it lacks. Returns
    /// how many pages are missing now and how many of them had been sent (lost in flight); `forget` is
    /// called for every missing page (the sender must send it whatever it thought the destination had).
    pub fn restart(&mut self, missing: &PageSet, now: Instant, mut forget: impl FnMut(u64)) -> (u64, u64) {
        let (mut now_missing, mut resent) = (0, 0);
        for p in 0..self.pages() {
            let slot = &mut self.state[p as usize];
            if missing.contains(p) {
                if *slot == PageState::Sent {
                    resent += 1;
                }
                *slot = PageState::Needed;
                forget(p);
                now_missing += 1;
            } else {
                *slot = PageState::NotNeeded;
            }
        }
        self.cursor = 0;
        self.priority.clear();
        self.sent_bytes = 0;
        self.acked_bytes = 0;
        self.sent_payload = 0;
        self.unacked.clear();
        self.sample = (now, 0);
        (now_missing, resent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(pages: u64, list: &[u64]) -> PageSet {
        let mut set = PageSet::new(pages);
        for &p in list {
            set.insert(p);
        }
        set
    }

    fn drain(plan: &mut PushPlan) -> Vec<u64> {
        std::iter::from_fn(|| {
            let p = plan.next_page()?;
            plan.mark_sent(p);
            Some(p)
        })
        .collect()
    }

    #[test]
    fn pushes_missing_pages_in_address_order_each_once() {
        let t = Instant::now();
        let mut plan = PushPlan::new(&missing(10, &[7, 2, 5]), None, t);
        plan.mark_sent(5); // eager
        assert_eq!(drain(&mut plan), [2, 7]);
        assert_eq!(plan.next_page(), None);
    }

    #[test]
    fn pages_after_a_fault_go_first() {
        let t = Instant::now();
        let all: Vec<u64> = (0..100).collect();
        let mut plan = PushPlan::new(&missing(100, &all), None, t);
        assert_eq!(plan.next_page(), Some(0));
        plan.mark_sent(0);
        plan.mark_sent(50); // demanded
        plan.prioritize_after(50);
        plan.mark_sent(52); // demanded too: skipped when its turn comes
        let order = drain(&mut plan);
        let expected: Vec<u64> = (51..83).filter(|&p| p != 52).chain(1..50).chain(83..100).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn the_prefetch_stops_at_the_end_of_memory() {
        let t = Instant::now();
        let mut plan = PushPlan::new(&missing(10, &[8, 9]), None, t);
        plan.prioritize_after(7);
        assert_eq!(drain(&mut plan), [8, 9]);
    }

    #[test]
    fn the_window_follows_the_best_delivery_rate() {
        let t = Instant::now();
        let mut plan = PushPlan::new(&missing(4, &[0]), None, t);
        assert_eq!(plan.window(), MIN_WINDOW);
        plan.after_send(MIN_WINDOW, MIN_WINDOW, t);
        assert!(!plan.can_push(), "a full window waits for an acknowledgement");
        // 10 MB acknowledged over 100 ms: 100 MB/s, a window of 400 kB (4 ms of link time).
        for batch in [10_000_000 - MIN_WINDOW, 500_000, 9_500_000] {
            plan.after_send(batch, batch, t);
        }
        plan.on_ack(10_000_000, t + Duration::from_millis(100));
        assert_eq!(plan.window(), 400_000);
        // A slower sample does not lower the best rate seen.
        plan.on_ack(10_500_000, t + Duration::from_millis(200));
        assert_eq!(plan.window(), 400_000);
        // Samples closer than 50 ms are not taken.
        plan.on_ack(20_000_000, t + Duration::from_millis(210));
        assert_eq!(plan.window(), 400_000);
        assert!(plan.can_push());
    }

    /// Compressed batches cost the link less than their payload: the window, the rate and the spacing
    /// count what crossed the link, and an acknowledgement credits whole batches only.
    #[test]
    fn the_pacing_counts_the_bytes_on_the_link_not_the_payload() {
        let t = Instant::now();
        let rate = 1e8; // bytes/s on the link: a window of 400 kB
        let mut plan = PushPlan::new(&missing(4, &[0]), Some(rate), t);
        // Batches of 200 kB of payload that cross as 100 kB: four fill the window, not two.
        for n in 1..=4 {
            assert!(plan.can_push(), "batch {n}");
            plan.after_send(200_000, 100_000, t);
        }
        assert!(!plan.can_push());
        // Spaced by their size on the link: 4 x 100 kB at 95 MB/s.
        let spacing = plan.next_send() - t;
        assert!(spacing.abs_diff(Duration::from_secs_f64(400_000.0 / 95e6)) < Duration::from_micros(1));
        // The first half of the first batch (a split batch's first frame): nothing is credited yet.
        plan.on_ack(100_000, t + Duration::from_millis(1));
        assert!(!plan.can_push());
        // The first batch whole: 100 kB of the link free again.
        plan.on_ack(200_000, t + Duration::from_millis(2));
        assert!(plan.can_push());
        // 800 kB of payload acknowledged 100 ms after the start: the link carried 400 kB, 4 MB/s, and
        // the best rate seen stays the pre-copy's.
        plan.on_ack(800_000, t + Duration::from_millis(100));
        assert_eq!(plan.window(), 400_000);
    }

    #[test]
    fn batches_are_spaced_to_just_under_the_link_rate() {
        let t = Instant::now();
        let rate = 1e8; // bytes/s
        let mut plan = PushPlan::new(&missing(4, &[0]), Some(rate), t);
        assert_eq!(plan.next_send(), t, "the first batch leaves at once");
        let bytes = 950_000; // 10 ms at 95 % of the rate
        plan.after_send(bytes, bytes, t);
        assert_eq!(plan.next_send(), t + Duration::from_millis(10));
        plan.after_send(bytes, bytes, t);
        assert_eq!(
            plan.next_send(),
            t + Duration::from_millis(20),
            "sent early: the gaps add up"
        );
        // Far behind schedule: at most 5 ms of lost time is made up.
        let late = t + Duration::from_millis(100);
        plan.after_send(bytes, bytes, late);
        assert_eq!(
            plan.next_send(),
            late - Duration::from_millis(5) + Duration::from_millis(10)
        );
    }

    #[test]
    fn a_restart_needs_what_the_destination_lacks_and_counts_pages_lost_in_flight() {
        let t = Instant::now();
        let mut plan = PushPlan::new(&missing(8, &[1, 2, 3, 4]), None, t);
        plan.mark_sent(1);
        plan.mark_sent(2);
        plan.after_send(1000, 1000, t);
        let mut forgotten = Vec::new();
        let (now_missing, resent) = plan.restart(&missing(8, &[2, 3, 6]), t, |p| forgotten.push(p));
        assert_eq!((now_missing, resent), (3, 1), "page 2 was sent and is missing again");
        assert_eq!(forgotten, [2, 3, 6]);
        assert_eq!(plan.state(1), PageState::NotNeeded);
        assert!(plan.can_push(), "a new connection starts with an empty window");
        assert_eq!(drain(&mut plan), [2, 3, 6]);
    }
}
