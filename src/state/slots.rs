//! Per-customer state that exists only because a rule asks for it: the aggregates,
//! first/last times and sequences of the loaded rules.
//!
//! The rule compiler turns each distinct aggregate in the rules into one *slot* (two
//! rules reading `count(purchase, 30d)` share one). A customer keeps one [`SlotState`]
//! per slot, in slot order; the engine updates the slots an event can change and the
//! rules read them. Every slot is bounded in size whatever the traffic (the caps are
//! the constants below, documented in the README).

use super::window::{BucketWindow, Stats, bucket_is_live, bucket_of, granularity};
use crate::time::Millis;
use serde::{Deserialize, Serialize};

/// Most values a `distinct` slot tells apart; past this the count saturates.
pub const MAX_DISTINCT_VALUES: usize = 256;
/// Most values a `top` slot tracks; past this the least frequent (then oldest) is dropped.
pub const MAX_TOP_VALUES: usize = 32;
/// Most distinct `by` keys a sequence slot waits on; past this the oldest is dropped.
pub const MAX_PENDING_KEYS: usize = 32;

/// The state of one slot for one customer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum SlotState {
    /// No event has touched the slot yet.
    #[default]
    Empty,
    /// `count/sum/avg/min/max` over the customer's lifetime.
    Lifetime(Stats),
    /// `count/sum/avg/min/max` over a sliding window.
    Windowed(BucketWindow<Stats>),
    /// `distinct` values: hashes of the values, each with the bucket it was last seen in
    /// (lifetime slots store bucket 0 and never expire).
    Distinct(Vec<(u64, i64)>),
    /// `top` values with their counts.
    Top(Vec<TopEntry>),
    /// `first` or `last`: one instant.
    Instant(Millis),
    /// `followed` / `not_followed`.
    Sequence(Sequence),
}

/// One value of a `top` slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopEntry {
    /// The value as text.
    pub value: Box<str>,
    /// When it was last seen: breaks ties in favour of the most recent.
    pub last_seen: Millis,
    /// Lifetime count (lifetime slots).
    pub count: u32,
    /// Windowed counts (windowed slots).
    pub window: BucketWindow<u32>,
}

/// The pending state of a `followed(a, b, d, by)` / `not_followed` slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    /// The latest unresolved `a` per `by` key (hash of the key): waiting for a `b`.
    pub pending: Vec<(u64, Millis)>,
    /// When a `b` last followed an `a` within the deadline.
    pub followed_at: Option<Millis>,
}

impl SlotState {
    /// Adds one value to a numeric slot; `window` is `None` for lifetime slots.
    pub fn add_number(&mut self, at: Millis, value: f64, window: Option<Millis>, now: Millis) {
        match (window, &mut *self) {
            (None, SlotState::Lifetime(stats)) => stats.merge_one(value),
            (None, _) => *self = SlotState::Lifetime(Stats::one(value)),
            (Some(w), SlotState::Windowed(buckets)) => buckets.add(at, &Stats::one(value), w, now),
            (Some(w), _) => {
                let mut buckets = BucketWindow::default();
                buckets.add(at, &Stats::one(value), w, now);
                *self = SlotState::Windowed(buckets);
            }
        }
    }

    /// The statistics of a numeric slot at `now`.
    pub fn stats(&self, window: Option<Millis>, now: Millis) -> Stats {
        match (self, window) {
            (SlotState::Lifetime(stats), _) => *stats,
            (SlotState::Windowed(buckets), Some(w)) => buckets.total(w, now),
            _ => Stats::default(),
        }
    }

    /// Records a value (by hash) in a `distinct` slot.
    pub fn add_distinct(&mut self, at: Millis, hash: u64, window: Option<Millis>, now: Millis) {
        if !matches!(self, SlotState::Distinct(_)) {
            *self = SlotState::Distinct(Vec::new());
        }
        let SlotState::Distinct(values) = self else {
            unreachable!()
        };
        let index = window.map_or(0, |w| bucket_of(at, granularity(w)));
        if let Some(w) = window {
            let g = granularity(w);
            values.retain(|(_, i)| bucket_is_live(*i, g, w, now));
            if !bucket_is_live(index, g, w, now) {
                return;
            }
        }
        match values.iter().position(|(h, _)| *h == hash) {
            Some(pos) => values[pos].1 = values[pos].1.max(index),
            None if values.len() < MAX_DISTINCT_VALUES => values.push((hash, index)),
            None => {}
        }
    }

    /// How many distinct values a `distinct` slot holds at `now`.
    pub fn distinct_count(&self, window: Option<Millis>, now: Millis) -> usize {
        let SlotState::Distinct(values) = self else {
            return 0;
        };
        match window {
            None => values.len(),
            Some(w) => {
                let g = granularity(w);
                values
                    .iter()
                    .filter(|(_, i)| bucket_is_live(*i, g, w, now) && i * g <= now)
                    .count()
            }
        }
    }

    /// Counts one occurrence of `value` in a `top` slot.
    pub fn add_top(&mut self, at: Millis, value: &str, window: Option<Millis>, now: Millis) {
        if !matches!(self, SlotState::Top(_)) {
            *self = SlotState::Top(Vec::new());
        }
        let SlotState::Top(entries) = self else {
            unreachable!()
        };
        if let Some(w) = window {
            for entry in entries.iter_mut() {
                entry.window.expire(w, now);
            }
            entries.retain(|e| !e.window.is_empty());
        }
        let position = match entries.iter().position(|e| &*e.value == value) {
            Some(position) => position,
            None => {
                if entries.len() >= MAX_TOP_VALUES {
                    let weakest = (0..entries.len())
                        .min_by_key(|&i| (entries[i].weight(window, now), entries[i].last_seen))
                        .expect("a full slot is not empty");
                    entries.swap_remove(weakest);
                }
                entries.push(TopEntry {
                    value: value.into(),
                    last_seen: at,
                    count: 0,
                    window: BucketWindow::default(),
                });
                entries.len() - 1
            }
        };
        let entry = &mut entries[position];
        entry.last_seen = entry.last_seen.max(at);
        match window {
            None => entry.count = entry.count.saturating_add(1),
            Some(w) => entry.window.add(at, &1, w, now),
        }
    }

    /// The most frequent value of a `top` slot at `now`; ties go to the most recent.
    pub fn top(&self, window: Option<Millis>, now: Millis) -> Option<&str> {
        let SlotState::Top(entries) = self else {
            return None;
        };
        entries
            .iter()
            .map(|e| (e.weight(window, now), e.last_seen, e))
            .filter(|(weight, _, _)| *weight > 0)
            .max_by_key(|(weight, last_seen, _)| (*weight, *last_seen))
            .map(|(_, _, e)| &*e.value)
    }

    /// Records an instant for `first` (`keep_earliest`) or `last`.
    pub fn add_instant(&mut self, at: Millis, keep_earliest: bool) {
        *self = SlotState::Instant(match self {
            SlotState::Instant(old) if keep_earliest => (*old).min(at),
            SlotState::Instant(old) => (*old).max(at),
            _ => at,
        });
    }

    /// The first instant after `now` at which a windowed slot's value changes with no new
    /// event: when its oldest live bucket leaves the window. `None` for lifetime slots.
    pub fn next_expiry(&self, window: Millis, now: Millis) -> Option<Millis> {
        let g = granularity(window);
        let expiry = |index: i64| (index + 1).saturating_mul(g).saturating_add(window);
        let first = match self {
            SlotState::Windowed(buckets) => buckets.oldest_live(window, now),
            SlotState::Distinct(values) => values
                .iter()
                .map(|(_, i)| *i)
                .filter(|&i| bucket_is_live(i, g, window, now))
                .min(),
            SlotState::Top(entries) => entries
                .iter()
                .filter_map(|e| e.window.oldest_live(window, now))
                .min(),
            _ => None,
        };
        first.map(expiry)
    }

    /// The instant of a `first`/`last` slot.
    pub fn instant(&self) -> Option<Millis> {
        match self {
            SlotState::Instant(at) => Some(*at),
            _ => None,
        }
    }

    /// The sequence state, created on first use.
    pub fn sequence_mut(&mut self) -> &mut Sequence {
        if !matches!(self, SlotState::Sequence(_)) {
            *self = SlotState::Sequence(Sequence::default());
        }
        let SlotState::Sequence(sequence) = self else {
            unreachable!()
        };
        sequence
    }

    /// The sequence state, if any event touched it.
    pub fn sequence(&self) -> Option<&Sequence> {
        match self {
            SlotState::Sequence(sequence) => Some(sequence),
            _ => None,
        }
    }
}

impl Stats {
    /// Folds one value in.
    pub fn merge_one(&mut self, value: f64) {
        use super::window::Accumulate;
        self.merge(&Stats::one(value));
    }
}

impl TopEntry {
    fn weight(&self, window: Option<Millis>, now: Millis) -> u32 {
        match window {
            None => self.count,
            Some(w) => self.window.total(w, now),
        }
    }
}

impl Sequence {
    /// An `a` with key `key` happened at `at`: it now waits for a `b`.
    pub fn start(&mut self, key: u64, at: Millis) {
        match self.pending.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = entry.1.max(at),
            None => {
                if self.pending.len() >= MAX_PENDING_KEYS {
                    let oldest = (0..self.pending.len())
                        .min_by_key(|&i| self.pending[i].1)
                        .expect("a full list is not empty");
                    self.pending.swap_remove(oldest);
                }
                self.pending.push((key, at));
            }
        }
    }

    /// A `b` with key `key` happened at `at`: it resolves the waiting `a` of that key that
    /// came before it, and counts as "followed" if it came within `within`.
    pub fn finish(&mut self, key: u64, at: Millis, within: Millis) {
        if let Some(pos) = self
            .pending
            .iter()
            .position(|(k, started)| *k == key && *started <= at)
        {
            let (_, started) = self.pending.swap_remove(pos);
            if at - started <= within {
                self.followed_at = Some(self.followed_at.map_or(at, |old| old.max(at)));
            }
        }
    }

    /// Whether some `a` has waited longer than `within` at `now` without its `b` (a `b`
    /// exactly `within` after its `a` still counts as following it).
    pub fn overdue(&self, within: Millis, now: Millis) -> bool {
        self.pending
            .iter()
            .any(|(_, started)| started.saturating_add(within) < now)
    }

    /// When the first waiting `a` becomes overdue, if that is after `now`.
    pub fn next_overdue(&self, within: Millis, now: Millis) -> Option<Millis> {
        self.pending
            .iter()
            .map(|(_, started)| started.saturating_add(within).saturating_add(1))
            .filter(|&at| at > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_breaks_ties_by_the_most_recent_value() {
        let mut slot = SlotState::Empty;
        slot.add_top(1, "running", None, 1);
        slot.add_top(2, "tennis", None, 2);
        assert_eq!(slot.top(None, 2), Some("tennis"));
        slot.add_top(3, "running", None, 3);
        assert_eq!(slot.top(None, 3), Some("running"));
    }

    #[test]
    fn distinct_saturates_at_its_cap() {
        let mut slot = SlotState::Empty;
        for hash in 0..(MAX_DISTINCT_VALUES as u64 + 50) {
            slot.add_distinct(0, hash, None, 0);
        }
        assert_eq!(slot.distinct_count(None, 0), MAX_DISTINCT_VALUES);
    }

    #[test]
    fn a_sequence_is_overdue_until_its_key_is_resolved() {
        let mut seq = Sequence::default();
        seq.start(7, 0);
        seq.start(8, 0);
        assert!(
            !seq.overdue(100, 100),
            "a `b` may still come at exactly 100"
        );
        assert_eq!(seq.next_overdue(100, 100), Some(101));
        seq.finish(8, 50, 100);
        assert_eq!(seq.followed_at, Some(50));
        assert!(seq.overdue(100, 101), "key 7 was never followed");
        assert_eq!(seq.next_overdue(100, 101), None, "already overdue");
        seq.finish(7, 500, 100);
        assert!(
            !seq.overdue(100, 1000),
            "a late `b` still resolves the wait"
        );
        assert_eq!(
            seq.followed_at,
            Some(50),
            "but a late `b` is not `followed`"
        );
    }
}
