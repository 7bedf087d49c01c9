//! A partition's event time: its watermark and its pending timers, and the one path by
//! which `run` and `replay` apply an event and fire what time makes due.
//!
//! The watermark is the highest event time seen minus `allowed_lateness`; it never goes
//! back. An event older than the watermark is *late*: it is still applied (its
//! aggregates land in their own buckets, evaluated at its customer's latest time) and
//! counted, but a timer that already fired is not revisited. When no event arrives for
//! `idle_timeout` of wall-clock time, the watermark follows the wall clock (minus the
//! same lateness), so a customer who never sends another event still gets the timer.
//!
//! Partitions are numbered across input topics (partition 3 of `clickstream` and of
//! `purchases` is one time line), as a customer's events on co-partitioned topics share
//! a partition number.

use std::collections::{BinaryHeap, HashSet};

use crate::emit::change::SegmentChange;
use crate::engine::{Engine, Outcome, TimerUpdate};
use crate::event::Event;
use crate::time::Millis;
use crate::time::wheel::TimerWheel;

/// How event time advances: the config's `[time]` lateness and idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeSettings {
    /// How far behind the highest event time the watermark stays.
    pub allowed_lateness: Millis,
    /// Wall-clock time without events after which the watermark follows the wall clock;
    /// `None` never (replay: time advances by the events alone).
    pub idle_timeout: Option<Millis>,
    /// Hold each event until the watermark passes it and apply in event-time order
    /// (`time.order = "event_time"`), instead of applying on arrival.
    pub hold: bool,
}

/// One partition's watermark.
#[derive(Clone, Debug)]
pub struct Watermark {
    settings: TimeSettings,
    /// The wall-clock time of the latest event (or of the assignment).
    last_arrival: Millis,
    current: Millis,
}

impl Watermark {
    /// A watermark before any event, its idle timeout counted from `wall_now`.
    pub fn new(settings: TimeSettings, wall_now: Millis) -> Self {
        Watermark {
            settings,
            last_arrival: wall_now,
            current: Millis::MIN,
        }
    }

    /// Records an event at `ts` arriving at `wall_now`; returns whether it is late
    /// (older than the watermark).
    pub fn observe(&mut self, ts: Millis, wall_now: Millis) -> bool {
        let late = ts < self.current;
        self.last_arrival = wall_now;
        self.current = self
            .current
            .max(ts.saturating_sub(self.settings.allowed_lateness));
        late
    }

    /// The watermark at `wall_now`: moved on by the wall clock if the partition has been
    /// idle for the idle timeout.
    pub fn advance(&mut self, wall_now: Millis) -> Millis {
        if let Some(idle) = self.settings.idle_timeout
            && wall_now.saturating_sub(self.last_arrival) >= idle
        {
            self.current = self
                .current
                .max(wall_now.saturating_sub(self.settings.allowed_lateness));
        }
        self.current
    }

    /// Moves the watermark to at least `to` (replay's `--until`).
    pub fn advance_to(&mut self, to: Millis) -> Millis {
        self.current = self.current.max(to);
        self.current
    }

    /// The current watermark.
    pub fn current(&self) -> Millis {
        self.current
    }
}

/// A partition's watermark, the timers of its customers and (in event-time order) the
/// events held until the watermark passes them. `T` is what the caller attaches to each
/// event (the input message, for its offset).
#[derive(Debug)]
pub struct PartitionTime<T = ()> {
    /// Event-time progress.
    pub watermark: Watermark,
    /// One pending timer per customer of the partition that has one.
    pub timers: TimerWheel,
    held: BinaryHeap<Held<T>>,
    arrivals: u64,
    /// Customers whose state changed since [`Self::take_changed`] last ran, when asked to
    /// [record them](Self::record_changes): whom the next changelog checkpoint writes.
    changed: Option<HashSet<Box<str>, foldhash::fast::RandomState>>,
}

/// An event waiting for the watermark, ordered by (time, arrival) — earliest first.
#[derive(Debug)]
struct Held<T> {
    ts: Millis,
    arrival: u64,
    event: Event,
    tag: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.ts, self.arrival) == (other.ts, other.arrival)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: `BinaryHeap` pops its greatest, and the earliest must come first.
        (other.ts, other.arrival).cmp(&(self.ts, self.arrival))
    }
}

/// An event the engine applied, with its tag; its changes end at `changes_end` in the
/// output (and start where the previous one's ended).
#[derive(Debug)]
pub struct Released<T> {
    /// The caller's tag of the event.
    pub tag: T,
    /// What the engine did with it.
    pub outcome: Outcome,
    /// One past the index of its last change in the output vector.
    pub changes_end: usize,
}

/// What taking one event in (or a tick) did, beyond the events it released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// The event was older than the watermark.
    pub late: bool,
    /// Timers fired: customers' own, due by their events' times, and those the advanced
    /// watermark made due (whose changes follow the released events' in the output).
    pub timers_fired: u64,
}

impl<T> PartitionTime<T> {
    /// A partition with no events yet.
    pub fn new(settings: TimeSettings, wall_now: Millis) -> Self {
        PartitionTime {
            watermark: Watermark::new(settings, wall_now),
            timers: TimerWheel::new(),
            held: BinaryHeap::new(),
            arrivals: 0,
            changed: None,
        }
    }

    /// From now on, remembers which customers' state changes (events applied, timers
    /// fired), for [`Self::take_changed`].
    pub fn record_changes(mut self) -> Self {
        self.changed = Some(HashSet::default());
        self
    }

    /// The customers whose state changed since the last call (none unless
    /// [recording](Self::record_changes)).
    pub fn take_changed(&mut self) -> Vec<Box<str>> {
        self.changed
            .as_mut()
            .map(|changed| changed.drain().collect())
            .unwrap_or_default()
    }

    /// The tags of the events held for event-time order.
    pub fn held(&self) -> impl Iterator<Item = &T> {
        self.held.iter().map(|held| &held.tag)
    }

    /// Takes one event in: advances the watermark, then applies the event at once (on
    /// arrival, or when it is late) or holds it until the watermark passes it (event-time
    /// order), applying every held event the watermark has passed in time order. Each
    /// applied event's customer's due timers fire first and its timer is rescheduled;
    /// then every timer the watermark makes due fires. Changes go to `out` in order;
    /// each applied event is reported in `released`, the timers' changes after them.
    pub fn take(
        &mut self,
        engine: &Engine,
        event: Event,
        tag: T,
        wall_now: Millis,
        out: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<T>>,
    ) -> Step {
        let late = self.watermark.observe(event.ts, wall_now);
        let mut step = Step {
            late,
            timers_fired: 0,
        };
        if self.watermark.settings.hold && !late {
            self.arrivals += 1;
            self.held.push(Held {
                ts: event.ts,
                arrival: self.arrivals,
                event,
                tag,
            });
        } else {
            step.timers_fired += self.apply_one(engine, &event, tag, out, released);
        }
        step.timers_fired += self.release_and_fire(engine, self.watermark.current(), out, released);
        step
    }

    /// Ends a replay: applies every held event, moves the watermark to `until` and fires
    /// every timer due by then. Returns how many timers fired.
    pub fn finish(
        &mut self,
        engine: &Engine,
        until: Millis,
        out: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<T>>,
    ) -> u64 {
        self.watermark.advance_to(until);
        self.release_and_fire(engine, Millis::MAX, out, released)
    }

    /// Moves the watermark on by the wall clock (if the partition is idle), applies the
    /// held events it passes and fires the timers it makes due. Returns how many fired.
    pub fn tick(
        &mut self,
        engine: &Engine,
        wall_now: Millis,
        out: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<T>>,
    ) -> u64 {
        let watermark = self.watermark.advance(wall_now);
        self.release_and_fire(engine, watermark, out, released)
    }

    /// Takes out the held events whose tag `which` selects (a revoked partition, a
    /// shutdown): they were not applied, and their tags say which input to read again.
    pub fn drop_held_where(&mut self, which: impl Fn(&T) -> bool) -> Vec<T> {
        let mut dropped = Vec::new();
        let kept: BinaryHeap<Held<T>> = std::mem::take(&mut self.held)
            .into_iter()
            .filter_map(|held| {
                if which(&held.tag) {
                    dropped.push(held.tag);
                    None
                } else {
                    Some(held)
                }
            })
            .collect();
        self.held = kept;
        dropped
    }

    /// Applies the held events at or before `upto` in time order, then fires the timers
    /// due at the watermark.
    fn release_and_fire(
        &mut self,
        engine: &Engine,
        upto: Millis,
        out: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<T>>,
    ) -> u64 {
        let mut fired = 0;
        while self.held.peek().is_some_and(|h| h.ts <= upto) {
            let Held { event, tag, .. } = self.held.pop().expect("peeked");
            fired += self.apply_one(engine, &event, tag, out, released);
        }
        let changed = &mut self.changed;
        fired
            + engine.fire_due(
                &mut self.timers,
                self.watermark.current(),
                out,
                |customer| note_change(changed, customer),
            )
    }

    /// Applies one event and reschedules its customer's timer. Returns the customer's
    /// timers that fired before it.
    fn apply_one(
        &mut self,
        engine: &Engine,
        event: &Event,
        tag: T,
        out: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<T>>,
    ) -> u64 {
        let outcome = engine.apply(event, out);
        let mut fired = 0;
        if let Outcome::Applied {
            timer,
            timers_fired,
            ..
        } = outcome
        {
            note_change(&mut self.changed, &event.customer_id);
            fired = u64::from(timers_fired);
            if let TimerUpdate::Set(deadline) = timer {
                self.timers.schedule(&event.customer_id, deadline);
            }
        }
        released.push(Released {
            tag,
            outcome,
            changes_end: out.len(),
        });
        fired
    }
}

/// Remembers that `customer`'s state changed, if changes are recorded.
fn note_change(
    changed: &mut Option<HashSet<Box<str>, foldhash::fast::RandomState>>,
    customer: &str,
) {
    if let Some(changed) = changed
        && !changed.contains(customer)
    {
        changed.insert(customer.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SECOND;

    const LIVE: TimeSettings = TimeSettings {
        allowed_lateness: 5 * SECOND,
        idle_timeout: Some(10 * SECOND),
        hold: false,
    };

    #[test]
    fn the_watermark_trails_the_highest_event_time_and_never_goes_back() {
        let mut w = Watermark::new(LIVE, 0);
        assert!(!w.observe(100 * SECOND, 0));
        assert_eq!(w.current(), 95 * SECOND);
        assert!(!w.observe(96 * SECOND, 0), "inside the lateness bound");
        assert!(w.observe(94 * SECOND, 0), "older than the watermark: late");
        assert_eq!(w.current(), 95 * SECOND);
    }

    #[test]
    fn an_idle_partition_follows_the_wall_clock_after_the_idle_timeout() {
        let mut w = Watermark::new(LIVE, 1_000 * SECOND);
        w.observe(100 * SECOND, 1_000 * SECOND);
        assert_eq!(w.advance(1_009 * SECOND), 95 * SECOND, "not idle yet");
        assert_eq!(w.advance(1_010 * SECOND), 1_005 * SECOND);
        let mut replay = Watermark::new(
            TimeSettings {
                idle_timeout: None,
                ..LIVE
            },
            0,
        );
        replay.observe(100 * SECOND, 0);
        assert_eq!(
            replay.advance(i64::MAX),
            95 * SECOND,
            "replay ignores the wall clock"
        );
    }
}
