//! Sliding windows by buckets.
//!
//! A window of length `W` is kept as buckets of width `g` = [`granularity`]`(W)`
//! (`W / 64`, at least one second). An event at time `t` falls in bucket
//! `floor(t / g)`; that bucket stays in the window while `bucket_end + W > now`. So an
//! event counts for **at least `W` and less than `W + g`** after it happened: a window
//! never drops an event early, and holds it late by at most 1/64 of its length (a 7-day
//! window by at most 2h38m, a 30-minute one by at most 28s). A window keeps only its
//! non-empty buckets, at most 65 live ones, so its cost is bounded by the window's
//! shape, not by the number of events.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

use crate::time::{Millis, SECOND};

/// How many buckets a window is split into.
pub const BUCKETS_PER_WINDOW: Millis = 64;

/// The bucket width for a window of length `window`: `window / 64`, at least one second.
pub fn granularity(window: Millis) -> Millis {
    (window / BUCKETS_PER_WINDOW).max(SECOND)
}

/// Whether the bucket `index` (of width `g`) is inside a window of length `window` at
/// `now`: its end plus the window length lies after `now`.
pub fn bucket_is_live(index: i64, g: Millis, window: Millis, now: Millis) -> bool {
    (index + 1).saturating_mul(g).saturating_add(window) > now
}

/// The bucket an instant falls in.
pub fn bucket_of(at: Millis, g: Millis) -> i64 {
    at.div_euclid(g)
}

/// Something a bucket accumulates: numeric statistics, or a plain count.
pub trait Accumulate: Clone + Default {
    /// Folds `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// Count, sum, min and max of a numeric field: enough for `count`, `sum`, `avg`, `min`
/// and `max` over the same events.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// How many events.
    pub count: u64,
    /// Sum of their values.
    pub sum: f64,
    /// Smallest value (`+inf` when empty).
    pub min: f64,
    /// Largest value (`-inf` when empty).
    pub max: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Stats {
    /// Statistics of a single event carrying `value`.
    pub fn one(value: f64) -> Self {
        Stats {
            count: 1,
            sum: value,
            min: value,
            max: value,
        }
    }
}

impl Accumulate for Stats {
    fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

impl Accumulate for u32 {
    fn merge(&mut self, other: &Self) {
        *self = self.saturating_add(*other);
    }
}

/// A sliding window's non-empty buckets, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BucketWindow<A> {
    buckets: VecDeque<(i64, A)>,
}

impl<A: Accumulate> BucketWindow<A> {
    /// Adds `value` at time `at` to a window of length `window`, and drops the buckets that
    /// have left the window as of `now`. A late event lands in its own (older) bucket.
    pub fn add(&mut self, at: Millis, value: &A, window: Millis, now: Millis) {
        let g = granularity(window);
        let index = bucket_of(at, g);
        self.expire(window, now);
        if !bucket_is_live(index, g, window, now) {
            return;
        }
        match self.buckets.iter().rposition(|(i, _)| *i <= index) {
            Some(pos) if self.buckets[pos].0 == index => self.buckets[pos].1.merge(value),
            Some(pos) => self.buckets.insert(pos + 1, (index, value.clone())),
            None => self.buckets.push_front((index, value.clone())),
        }
    }

    /// Drops buckets that are no longer live at `now`.
    pub fn expire(&mut self, window: Millis, now: Millis) {
        let g = granularity(window);
        while self
            .buckets
            .front()
            .is_some_and(|(i, _)| !bucket_is_live(*i, g, window, now))
        {
            self.buckets.pop_front();
        }
    }

    /// The accumulated value of every bucket live at `now` (and not after `now`).
    pub fn total(&self, window: Millis, now: Millis) -> A {
        let g = granularity(window);
        let mut total = A::default();
        for (index, value) in &self.buckets {
            if bucket_is_live(*index, g, window, now) && index.saturating_mul(g) <= now {
                total.merge(value);
            }
        }
        total
    }

    /// The index of the oldest bucket still live at `now`: the next to leave the window.
    pub fn oldest_live(&self, window: Millis, now: Millis) -> Option<i64> {
        let g = granularity(window);
        self.buckets
            .iter()
            .map(|(i, _)| *i)
            .find(|&i| bucket_is_live(i, g, window, now))
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The held buckets, oldest first: `(bucket index, accumulated value)`.
    #[cfg(test)]
    pub fn buckets(&self) -> impl Iterator<Item = &(i64, A)> {
        self.buckets.iter()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::time::{DAY, MINUTE};

    /// The brute-force oracle: every event kept with its time, judged one by one by the
    /// documented rule (its bucket's end plus the window lies after `now`).
    fn oracle(events: &[(Millis, f64)], window: Millis, now: Millis) -> Stats {
        let g = granularity(window);
        let mut stats = Stats::default();
        for (at, value) in events {
            let index = bucket_of(*at, g);
            if bucket_is_live(index, g, window, now) && index * g <= now {
                stats.merge(&Stats::one(*value));
            }
        }
        stats
    }

    #[test]
    fn an_event_counts_for_at_least_the_window_and_less_than_one_bucket_more() {
        let window = 30 * MINUTE;
        let g = granularity(window);
        let mut w = BucketWindow::<u32>::default();
        let at = 1_000_000_007;
        w.add(at, &1, window, at);
        assert_eq!(w.total(window, at), 1);
        assert_eq!(
            w.total(window, at + window - 1),
            1,
            "never dropped before W"
        );
        let bucket_end = (bucket_of(at, g) + 1) * g;
        assert_eq!(w.total(window, bucket_end + window - 1), 1);
        assert_eq!(
            w.total(window, bucket_end + window),
            0,
            "gone once bucket end + W passed"
        );
        assert!(bucket_end + window - at <= window + g);
    }

    #[test]
    fn granularity_is_a_64th_of_the_window_and_at_least_a_second() {
        assert_eq!(granularity(7 * DAY), 7 * DAY / 64);
        assert_eq!(granularity(10 * SECOND), SECOND);
    }

    proptest! {
        /// Windows agree with the oracle for any events, in any order, at any later time.
        #[test]
        fn window_matches_brute_force(
            window in prop_oneof![Just(10 * SECOND), Just(30 * MINUTE), Just(7 * DAY), 1_000i64..10_000_000],
            mut events in prop::collection::vec((0i64..20_000_000, -100.0f64..100.0), 0..60),
            shuffle_seed in any::<u64>(),
            later in 0i64..20_000_000,
        ) {
            // Arrival order: a deterministic shuffle of the events; `now` at each arrival is
            // the highest time seen so far, as the engine does.
            let n = events.len();
            if n > 1 {
                let mut s = shuffle_seed;
                for i in (1..n).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    events.swap(i, (s >> 33) as usize % (i + 1));
                }
            }
            let mut w = BucketWindow::<Stats>::default();
            let mut now = 0;
            let mut seen = Vec::new();
            for (at, value) in &events {
                now = now.max(*at);
                w.add(*at, &Stats::one(*value), window, now);
                seen.push((*at, *value));
                let got = w.total(window, now);
                let want = oracle(&seen, window, now);
                prop_assert_eq!(got.count, want.count);
                prop_assert!((got.sum - want.sum).abs() < 1e-6);
                prop_assert_eq!(got.min, want.min);
                prop_assert_eq!(got.max, want.max);
            }
            let end = now + later;
            let got = w.total(window, end);
            let want = oracle(&seen, window, end);
            prop_assert_eq!(got.count, want.count);
        }

        /// Against an oracle that keeps every event's exact time, at and around every edge
        /// (each event's time plus W − 1, W, W + g − 1 and W + g): the window counts every
        /// event less than W old and none W + g old or older.
        #[test]
        fn window_edges_against_exact_timestamps(
            window in prop_oneof![Just(10 * SECOND), Just(30 * MINUTE), Just(7 * DAY), 1_000i64..100_000_000],
            mut times in prop::collection::vec(0i64..1_000_000_000, 1..40),
        ) {
            times.sort_unstable();
            let g = granularity(window);
            let mut w = BucketWindow::<u32>::default();
            for &at in &times {
                w.add(at, &1, window, at);
            }
            let latest = *times.last().unwrap();
            let mut probes: Vec<Millis> = times
                .iter()
                .flat_map(|&at| [at + window - 1, at + window, at + window + g - 1, at + window + g])
                .filter(|&now| now >= latest)
                .collect();
            probes.push(latest);
            for now in probes {
                let younger_than = |age: Millis| times.iter().filter(|&&at| at <= now && now - at < age).count() as u32;
                let got = w.total(window, now);
                prop_assert!(got >= younger_than(window), "an event dropped early at {now}");
                prop_assert!(got <= younger_than(window + g), "an event held a bucket too long at {now}");
            }
        }

        /// At most 65 buckets are ever live, however many events arrive.
        #[test]
        fn live_buckets_are_bounded(times in prop::collection::vec(0i64..100_000_000, 1..500)) {
            let window = 10 * MINUTE;
            let mut w = BucketWindow::<u32>::default();
            let mut sorted = times.clone();
            sorted.sort_unstable();
            for at in sorted {
                w.add(at, &1, window, at);
                prop_assert!(w.buckets().count() as Millis <= BUCKETS_PER_WINDOW + 1);
            }
        }
    }
}
