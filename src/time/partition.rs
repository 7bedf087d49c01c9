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

/// A partition's watermark and the timers of its customers.
#[derive(Debug)]
pub struct PartitionTime {
    /// Event-time progress.
    pub watermark: Watermark,
    /// One pending timer per customer of the partition that has one.
    pub timers: TimerWheel,
}

/// What [`PartitionTime::apply`] did with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// What the engine did with it.
    pub outcome: Outcome,
    /// It was older than the watermark.
    pub late: bool,
    /// Timers fired: the event's customer's, due by its time, and others' that the
    /// advanced watermark made due.
    pub timers_fired: u64,
}

impl PartitionTime {
    /// A partition with no events yet.
    pub fn new(settings: TimeSettings, wall_now: Millis) -> Self {
        PartitionTime {
            watermark: Watermark::new(settings, wall_now),
            timers: TimerWheel::new(),
        }
    }

    /// Applies one event: advances the watermark, applies the event (whose customer's
    /// due timers fire first), reschedules its customer's timer, then fires every timer
    /// the new watermark makes due. All changes are appended to `out` in order.
    pub fn apply(
        &mut self,
        engine: &Engine,
        event: &Event,
        wall_now: Millis,
        out: &mut Vec<SegmentChange>,
    ) -> Applied {
        let late = self.watermark.observe(event.ts, wall_now);
        let outcome = engine.apply(event, out);
        let mut timers_fired = 0;
        if let Outcome::Applied {
            timer,
            timers_fired: caught_up,
            ..
        } = outcome
        {
            timers_fired += u64::from(caught_up);
            if let TimerUpdate::Set(deadline) = timer {
                self.timers.schedule(&event.customer_id, deadline);
            }
        }
        timers_fired += engine.fire_due(&mut self.timers, self.watermark.current(), out);
        Applied {
            outcome,
            late,
            timers_fired,
        }
    }

    /// Ends a replay: moves the watermark to `until` and fires every timer due by then.
    /// Returns how many fired.
    pub fn finish(&mut self, engine: &Engine, until: Millis, out: &mut Vec<SegmentChange>) -> u64 {
        let watermark = self.watermark.advance_to(until);
        engine.fire_due(&mut self.timers, watermark, out)
    }

    /// Fires the timers due at the watermark as of `wall_now` (which an idle partition's
    /// watermark follows). Returns how many fired.
    pub fn tick(&mut self, engine: &Engine, wall_now: Millis, out: &mut Vec<SegmentChange>) -> u64 {
        let watermark = self.watermark.advance(wall_now);
        engine.fire_due(&mut self.timers, watermark, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SECOND;

    const LIVE: TimeSettings = TimeSettings {
        allowed_lateness: 5 * SECOND,
        idle_timeout: Some(10 * SECOND),
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
