//! The engine: one event in, the segment changes it causes out. Pure — no I/O, no clock,
//! no tokio — so `run`, `replay`, the tests and the benches all drive the same code.
//!
//! Per event: find (or create) the customer, drop it if its id was seen recently, fire
//! its timer if due by the event's time, apply its built-in meaning, feed the rule slots
//! its type feeds, then re-evaluate only the segments its type can affect (the plans of
//! [`RuleSet`]), in dependency order so that `in_segment` sees this event's changes, and
//! recompute the customer's next deadline if one of them reads time. A time-dependent
//! rule is not re-evaluated by events that do not feed it: its deadline marks the first
//! instant time alone may change it, and a due timer fires before the event. Evaluation
//! time is the event's time, or the customer's latest event time if this one arrived late,
//! so a customer's changes never go back in time and the answer does not depend on
//! partitioning.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::emit::change::{Cause, SegmentChange, Transition};
use crate::event::Event;
use crate::rules::RuleSet;
use crate::rules::deadline::{At, next_change, value_and_next_change};
use crate::rules::eval::{Scope, eval, feed_slot, passes};
use crate::state::codec::Summary;
use crate::state::customer::{Membership, NO_TIMED_SEGMENT, TimerBasis};
use crate::state::slots::SlotState;
use crate::state::{CustomerState, CustomerStore};
use crate::time::wheel::TimerWheel;
use crate::time::{Millis, format_timestamp};

use serde_json::{Value, json};

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; its changes (possibly none) were appended.
    Applied {
        /// The event's type id in the rules' registry (for per-type metrics).
        event_type: u16,
        /// The customer's timer, if the event moved, set or cancelled it: the caller
        /// updates its [`TimerWheel`].
        timer: TimerUpdate,
        /// Timers of this customer that were due by the event's time and fired before it.
        timers_fired: u32,
    },
    /// Its id was applied before: nothing changed.
    Duplicate,
}

/// Whether an event changed its customer's pending timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerUpdate {
    /// The pending timer (or its absence) is as before.
    Unchanged,
    /// The timer is now due at this instant (`Some`) or cancelled (`None`).
    Set(Option<Millis>),
}

/// The first of some segments' next changes (its instant and segment), and the instant of
/// the next after it (`Millis::MAX`: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Earliest {
    first: Option<(Millis, u16)>,
    second: Millis,
}

impl Earliest {
    /// No next change.
    const NONE: Earliest = Earliest {
        first: None,
        second: Millis::MAX,
    };

    /// Adds `segment`'s next change, if it has one.
    fn add(&mut self, next: Option<Millis>, segment: u16) {
        let Some(next) = next else { return };
        match self.first {
            Some(first) if first <= (next, segment) => self.second = self.second.min(next),
            _ => {
                if let Some((previous, _)) = self.first {
                    self.second = previous;
                }
                self.first = Some((next, segment));
            }
        }
    }

    /// The earliest of both sets' next changes.
    fn merge(mut self, other: Earliest) -> Earliest {
        if let Some((next, segment)) = other.first {
            self.add(Some(next), segment);
        }
        self.second = self.second.min(other.second);
        self
    }
}

/// Sets the customer's timer to the first of `found` (the next changes of every
/// time-dependent segment), and its [`TimerBasis`] from them.
fn set_timer(state: &mut CustomerState, found: Earliest) {
    state.timer = found.first.map(|(at, _)| at);
    state.timer_basis = TimerBasis::new(
        found.first.map_or(NO_TIMED_SEGMENT, |(_, segment)| segment),
        found.second,
    );
}

/// Applies events to customer state and evaluates the rules.
#[derive(Clone)]
pub struct Engine {
    rules: Arc<RuleSet>,
    store: CustomerStore,
    session_gap: Millis,
    /// Members per segment, kept as changes happen so `/segments` and the
    /// `segmentd_segment_members` gauge never scan the store.
    members: Arc<[AtomicI64]>,
}

impl Engine {
    /// An engine over `store` with `rules`; `session_gap` is the inactivity that starts a
    /// new session.
    pub fn new(rules: Arc<RuleSet>, store: CustomerStore, session_gap: Millis) -> Self {
        let members = rules.segments.iter().map(|_| AtomicI64::new(0)).collect();
        Engine {
            rules,
            store,
            session_gap,
            members,
        }
    }

    /// The loaded rules.
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// The customer store.
    pub fn store(&self) -> &CustomerStore {
        &self.store
    }

    /// Current member count of each segment, in segment order.
    pub fn member_counts(&self) -> Vec<i64> {
        self.members
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .collect()
    }

    /// Puts a customer's restored state in the store (replacing any it had), counting its
    /// memberships. With `new_timer` (a state translated from other rules) its timer is
    /// computed afresh. `encoded` is the state's encoding as read (kept as is unless the
    /// state changes here). Returns its pending timer.
    pub fn restore(
        &self,
        id: Box<str>,
        mut state: CustomerState,
        new_timer: bool,
        mut encoded: Option<&[u8]>,
    ) -> Option<Millis> {
        if new_timer {
            let now = state.clock;
            self.reset_timer(&mut state, now);
            encoded = None;
        }
        self.count(state.segments.iter().map(|m| m.segment), 1);
        let timer = state.timer;
        // Idle: a restored customer is held encoded, its decoded form dropped.
        let old = match encoded {
            Some(encoded) => self.store.insert_encoded(id, state.partition, encoded),
            None => self.store.insert_idle(id, &state),
        };
        if let Some(old) = old {
            self.uncount(&old);
        }
        timer
    }

    /// Puts a customer's restored state in the store as its encoding (`encoded`, a
    /// changelog record's state bytes, with the record's `summary`), without decoding
    /// it; counts its memberships. Returns its pending timer.
    pub fn restore_encoded(
        &self,
        id: Box<str>,
        partition: i32,
        summary: &Summary,
        encoded: &[u8],
    ) -> Option<Millis> {
        self.count(summary.segments.iter().copied(), 1);
        if let Some(old) = self.store.insert_encoded(id, partition, encoded) {
            self.uncount(&old);
        }
        summary.timer
    }

    /// Adds `delta` to the member counts of `segments` (indexes the rules do not have, in
    /// a hostile record, are ignored).
    fn count(&self, segments: impl Iterator<Item = u16>, delta: i64) {
        for segment in segments {
            if let Some(members) = self.members.get(usize::from(segment)) {
                members.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// Drops the customers of the partitions `which` selects (they moved to another
    /// instance), uncounting their memberships. Returns how many were dropped.
    pub fn drop_partitions(&self, which: impl Fn(i32) -> bool) -> usize {
        self.store
            .drop_partitions(which, |state| self.uncount(state))
    }

    fn uncount(&self, state: &CustomerState) {
        self.count(state.segments.iter().map(|m| m.segment), -1);
    }

    /// Applies one event, appending the segment changes it causes to `out` in order.
    pub fn apply(&self, event: &Event, out: &mut Vec<SegmentChange>) -> Outcome {
        let rules = &*self.rules;
        let type_id = rules.types.id_of(&event.event_type);
        let mut entry = self.store.get_or_default(&event.customer_id);
        let state = &mut *entry;
        if state.check_and_remember(event.dedup_key) {
            return Outcome::Duplicate;
        }
        let first_event = state.customer.events == 0;
        let timer_before = state.timer;
        // Timers due by this event's time fire first, as they would have in time order,
        // whether or not the watermark reached them yet: so a customer's changes do not
        // depend on how partitions interleave.
        let mut timers_fired = 0;
        while let Some(deadline) = state.timer.filter(|&d| d <= event.ts) {
            self.fire_at(&event.customer_id, state, deadline, out);
            timers_fired += 1;
        }
        let now = if first_event {
            event.ts
        } else {
            event.ts.max(state.clock)
        };
        state.clock = now;
        state.partition = event.partition;
        self.update_state(state, event, type_id, now);
        // Built only if something changes: most events change nothing.
        let cause = || Cause::Event {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
        };
        let plan = if first_event {
            &rules.full_plan
        } else {
            &rules.eval_plan[usize::from(type_id)]
        };
        let found = self.evaluate(&event.customer_id, state, plan, now, &cause, out);
        let touched = &rules.deadline_plan[usize::from(type_id)];
        if first_event {
            // The full plan evaluated every time-dependent segment.
            set_timer(state, found);
        } else if !touched.is_empty() {
            self.update_timer(state, touched, found, now);
        }
        Outcome::Applied {
            event_type: type_id,
            timer: if state.timer == timer_before {
                TimerUpdate::Unchanged
            } else {
                TimerUpdate::Set(state.timer)
            },
            timers_fired,
        }
    }

    /// Brings `state` up to date with `event` (of type id `type_id`, applied at `now`): the
    /// built-in state and the aggregate slots the rules keep. No rule is evaluated: this
    /// is the state half of [`Engine::apply`], public so that the benches can time it
    /// alone.
    pub fn update_state(
        &self,
        state: &mut CustomerState,
        event: &Event,
        type_id: u16,
        now: Millis,
    ) {
        let rules = &*self.rules;
        state.apply_builtin(event, self.session_gap);
        if state.slots.len() < rules.slots.len() {
            state.slots.resize(rules.slots.len(), SlotState::Empty);
        }
        for &index in &rules.slot_plan[usize::from(type_id)] {
            let spec = &rules.slots[usize::from(index)];
            if spec.event_type == type_id && !passes(spec.filter.as_ref(), event, &rules.slots) {
                continue;
            }
            feed_slot(
                spec,
                type_id,
                &mut state.slots[usize::from(index)],
                event,
                now,
            );
        }
    }

    /// Fires the timer of `customer` due at `deadline` (cause `timer`, `at` = the
    /// deadline), appending its changes to `out`; returns the customer's next deadline.
    /// A deadline that is no longer the customer's (moved by an event meanwhile) fires
    /// nothing.
    pub fn fire(
        &self,
        customer: &str,
        deadline: Millis,
        out: &mut Vec<SegmentChange>,
    ) -> Option<Millis> {
        let mut entry = self.store.get_mut(customer)?;
        let state = &mut *entry;
        if state.timer == Some(deadline) {
            self.fire_at(customer, state, deadline, out);
        }
        state.timer
    }

    /// Fires every timer in `timers` due at `watermark`, in deadline order, rescheduling
    /// each customer's next one (which may itself be due); `on_fire` hears of each
    /// customer fired. Returns how many fired.
    pub fn fire_due(
        &self,
        timers: &mut TimerWheel,
        watermark: Millis,
        out: &mut Vec<SegmentChange>,
        mut on_fire: impl FnMut(&str),
    ) -> u64 {
        let mut fired = 0;
        while let Some((customer, deadline)) = timers.pop_due(watermark) {
            on_fire(&customer);
            let next = self.fire(&customer, deadline, out);
            timers.reschedule(customer, next);
            fired += 1;
        }
        fired
    }

    /// Re-evaluates the time-dependent segments (and those built on them) at `deadline`.
    fn fire_at(
        &self,
        customer: &str,
        state: &mut CustomerState,
        deadline: Millis,
        out: &mut Vec<SegmentChange>,
    ) {
        let now = deadline.max(state.clock);
        state.clock = now;
        let found = self.evaluate(
            customer,
            state,
            &self.rules.timer_plan,
            now,
            &|| Cause::Timer,
            out,
        );
        // The timer plan holds every time-dependent segment.
        set_timer(state, found);
    }

    /// Sets the customer's timer to the earliest instant after `now` at which a
    /// time-dependent rule it is subject to (its segments' exit rules, the others' enter
    /// rules) may change, and its [`TimerBasis`]: which segment's that is, and the next
    /// change of the others.
    fn reset_timer(&self, state: &mut CustomerState, now: Millis) {
        let found = self.next_deadlines_of(self.rules.timed.iter().copied(), state, now);
        set_timer(state, found);
    }

    /// Brings the customer's timer up to date after an event that re-evaluated the
    /// time-dependent segments `touched` (and no other: the others' inputs and
    /// memberships are as they were when their next changes were computed); `found` holds
    /// the touched ones' next changes, from the evaluation. The others' are computed only
    /// if what the [`TimerBasis`] knows of them cannot show that none comes first.
    fn update_timer(
        &self,
        state: &mut CustomerState,
        touched: &[u16],
        found: Earliest,
        now: Millis,
    ) {
        let basis = state.timer_basis;
        let others_not_before = basis.others_not_before();
        let first_at = found.first.map_or(Millis::MAX, |(at, _)| at);
        match basis.segment {
            // The timer's segment keeps its next change, the timer; the untouched others
            // theirs, none before `others_not_before`.
            Some(segment) if !touched.contains(&segment) => match found.first {
                Some((at, first)) if state.timer.is_none_or(|timer| at < timer) => {
                    let timer = state.timer.unwrap_or(Millis::MAX);
                    state.timer = Some(at);
                    state.timer_basis =
                        TimerBasis::new(first, others_not_before.min(timer).min(found.second));
                }
                _ => state.timer_basis = TimerBasis::new(segment, others_not_before.min(first_at)),
            },
            // The timer's segment was re-evaluated, and the first of the touched comes no
            // later than any of the others can.
            Some(_) if first_at <= others_not_before => {
                set_timer(
                    state,
                    Earliest {
                        second: found.second.min(others_not_before),
                        ..found
                    },
                );
            }
            // Not known, or the others might come first: theirs are computed.
            _ => {
                let others = self
                    .rules
                    .timed
                    .iter()
                    .copied()
                    .filter(|index| !touched.contains(index));
                let all = found.merge(self.next_deadlines_of(others, state, now));
                set_timer(state, all);
            }
        }
    }

    /// The earliest instant after `now` at which one of `segments` (time-dependent ones)
    /// may change for the customer, with that segment, and the next of the others'.
    fn next_deadlines_of(
        &self,
        segments: impl IntoIterator<Item = u16>,
        state: &CustomerState,
        now: Millis,
    ) -> Earliest {
        let rules = &*self.rules;
        let at = self.at(state, now);
        let mut found = Earliest::NONE;
        for index in segments {
            let rule = rules.segments[usize::from(index)].rule_for(state.is_member(index));
            found.add(next_change(&rule.node, at), index);
        }
        found
    }

    /// Re-evaluates `plan`'s segments for one customer at `now`, recording each change.
    /// Returns the next changes of the plan's time-dependent segments (under the rule
    /// each is subject to after the evaluation), found in the same pass.
    fn evaluate(
        &self,
        customer_id: &str,
        state: &mut CustomerState,
        plan: &[u16],
        now: Millis,
        cause: &dyn Fn() -> Cause,
        out: &mut Vec<SegmentChange>,
    ) -> Earliest {
        let rules = &*self.rules;
        let mut found = Earliest::NONE;
        for &index in plan {
            let segment = &rules.segments[usize::from(index)];
            let member = state.is_member(index);
            let scope = Scope::Customer {
                state,
                now,
                session_gap: self.session_gap,
            };
            let rule = segment.rule_for(member);
            let (value, next) = if segment.deps.time {
                value_and_next_change(&rule.node, self.at(state, now))
            } else {
                (eval(&rule.node, scope, &rules.slots), None)
            };
            // A member without an exit rule leaves when `enter` turns false.
            let leaves_on_false = member && segment.exit.is_none();
            if value.is_true() == leaves_on_false {
                found.add(next, index);
                continue;
            }
            let facts = rule
                .facts
                .iter()
                .map(|fact| {
                    (
                        fact.label.clone(),
                        eval(&fact.node, scope, &rules.slots).to_json(),
                    )
                })
                .collect();
            let transition = if member {
                state.segments.retain(|m| m.segment != index);
                self.members[usize::from(index)].fetch_sub(1, Ordering::Relaxed);
                Transition::Exited
            } else {
                state.segments.push(Membership {
                    segment: index,
                    entered_at: now,
                });
                self.members[usize::from(index)].fetch_add(1, Ordering::Relaxed);
                Transition::Entered
            };
            state.seq += 1;
            out.push(SegmentChange {
                customer_id: customer_id.into(),
                segment: segment.id.clone(),
                transition,
                at: now,
                cause: cause(),
                seq: state.seq,
                segments: self.segment_ids(state),
                facts,
                cart: state.cart.lines_json(),
                rules_version: rules.version.clone(),
            });
            if segment.deps.time {
                // A segment with an exit rule is now subject to the other rule.
                let next = match segment.exit {
                    Some(_) => next_change(&segment.rule_for(!member).node, self.at(state, now)),
                    None => next,
                };
                found.add(next, index);
            }
        }
        found
    }

    /// What a rule is evaluated against for a deadline: `state` at `now`.
    fn at<'a>(&'a self, state: &'a CustomerState, now: Millis) -> At<'a> {
        At {
            state,
            now,
            session_gap: self.session_gap,
            slots: &self.rules.slots,
        }
    }

    /// A customer's segments (with entered-at), change counter and state summary: the
    /// shape shared by `replay --dump-state` and `GET /customers/{id}`.
    pub fn customer_json(&self, id: &str, state: &CustomerState) -> Value {
        let mut segments: Vec<(&str, Millis)> = state
            .segments
            .iter()
            .map(|m| {
                (
                    &*self.rules.segments[usize::from(m.segment)].id,
                    m.entered_at,
                )
            })
            .collect();
        segments.sort_unstable();
        let segments: Vec<Value> = segments
            .into_iter()
            .map(|(segment, at)| json!({"segment": segment, "entered_at": format_timestamp(at)}))
            .collect();
        json!({"customer_id": id, "segments": segments, "seq": state.seq, "state": state.state_json()})
    }

    /// The ids of the segments a customer is in, sorted.
    pub fn segment_ids(&self, state: &CustomerState) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = state
            .segments
            .iter()
            .map(|m| self.rules.segments[usize::from(m.segment)].id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;
    use crate::generate::{Format, Generator, GeneratorConfig};
    use crate::rules::SegmentDef;
    use crate::state::new_store;
    use crate::time::MINUTE;

    fn engine(defs: &[(&str, &str)]) -> Engine {
        let defs: Vec<SegmentDef> = defs
            .iter()
            .map(|(id, enter)| SegmentDef::new(id, enter))
            .collect();
        Engine::new(
            Arc::new(RuleSet::compile(&defs).unwrap()),
            new_store(),
            30 * MINUTE,
        )
    }

    fn apply(engine: &Engine, json: &str) -> (Outcome, Vec<SegmentChange>) {
        let mut changes = Vec::new();
        let outcome = engine.apply(
            &parse_event(json.as_bytes(), 1 << 16).unwrap(),
            &mut changes,
        );
        (outcome, changes)
    }

    #[test]
    fn a_rule_that_stays_true_publishes_nothing_and_seq_counts_changes() {
        let engine = engine(&[("viewer", "count(page_view) >= 1")]);
        let page = |id: &str, ts: i64| {
            format!(r#"{{"event_id":"{id}","type":"page_view","customer_id":"c","ts":{ts}}}"#)
        };
        let (_, changes) = apply(&engine, &page("a", 1));
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].seq, changes[0].transition),
            (1, Transition::Entered)
        );
        assert!(
            apply(&engine, &page("b", 2)).1.is_empty(),
            "still true: nothing published"
        );
        assert_eq!(engine.member_counts(), vec![1]);
    }

    #[test]
    fn a_rule_true_for_a_customer_without_history_holds_from_the_first_event() {
        // `traits` only changes on identify, but a new customer has no tier yet.
        let engine = engine(&[("not_gold", "traits.tier != 'gold'")]);
        let (_, changes) = apply(&engine, r#"{"type":"page_view","customer_id":"c","ts":1}"#);
        assert_eq!(
            changes.len(),
            1,
            "entered on the first event, whatever its type"
        );
        assert!(
            apply(&engine, r#"{"type":"page_view","customer_id":"c","ts":2}"#)
                .1
                .is_empty()
        );
        let (_, changes) = apply(
            &engine,
            r#"{"type":"identify","customer_id":"c","ts":3,"traits":{"tier":"gold"}}"#,
        );
        assert_eq!(changes[0].transition, Transition::Exited);
    }

    #[test]
    fn a_replayed_event_changes_nothing() {
        let engine = engine(&[("two_views", "count(page_view) >= 2")]);
        let page = r#"{"event_id":"same","type":"page_view","customer_id":"c","ts":1}"#;
        assert!(matches!(apply(&engine, page).0, Outcome::Applied { .. }));
        let (outcome, changes) = apply(&engine, page);
        assert_eq!(outcome, Outcome::Duplicate);
        assert!(changes.is_empty(), "the second copy is not counted");
        assert_eq!(engine.store().read("c", |s| s.customer.events), Some(1));
    }

    #[test]
    fn a_late_event_is_evaluated_at_the_customers_latest_time() {
        let engine = engine(&[(
            "carted_long_ago",
            "cart.items > 0 and idle(cart.updated_at) >= 10m",
        )]);
        apply(
            &engine,
            r#"{"type":"page_view","customer_id":"c","ts":1200000}"#,
        );
        let (_, changes) = apply(
            &engine,
            r#"{"type":"add_to_cart","customer_id":"c","ts":0,"properties":{"product_id":"p"}}"#,
        );
        assert_eq!(
            changes.len(),
            1,
            "idle is measured from the cart change to the latest time seen"
        );
        assert_eq!(
            changes[0].at, 1_200_000,
            "time never goes back for a customer"
        );
    }

    /// `Earliest` keeps the first next change (with its segment; on a tie, the lower
    /// segment, as a full recomputation's minimum gives) and the instant of the second,
    /// whichever order they are added in and however two sets are merged: the timer
    /// basis's bound is that second instant, and one kept too late would let a timer
    /// miss a change.
    #[test]
    fn earliest_keeps_the_first_next_change_and_the_second_instant() {
        let changes = [
            (Some(50), 3),
            (None, 0),
            (Some(20), 5),
            (Some(40), 1),
            (Some(20), 2),
        ];
        let mut one = Earliest::NONE;
        for (next, segment) in changes {
            one.add(next, segment);
        }
        assert_eq!(
            one,
            Earliest {
                first: Some((20, 2)),
                second: 20
            }
        );
        let mut reversed = Earliest::NONE;
        for (next, segment) in changes.into_iter().rev() {
            reversed.add(next, segment);
        }
        assert_eq!(reversed, one);
        // Split either way, then merged: the same.
        for split in 0..=changes.len() {
            let (left, right) = changes.split_at(split);
            let of = |part: &[(Option<Millis>, u16)]| {
                let mut found = Earliest::NONE;
                for &(next, segment) in part {
                    found.add(next, segment);
                }
                found
            };
            assert_eq!(of(left).merge(of(right)), one, "split at {split}");
            assert_eq!(
                of(right).merge(of(left)),
                one,
                "split at {split}, the other way"
            );
        }
        let mut single = Earliest::NONE;
        single.add(Some(7), 4);
        assert_eq!(
            single,
            Earliest {
                first: Some((7, 4)),
                second: Millis::MAX
            }
        );
    }

    /// An event that moves the timer's own segment later keeps only what it can prove
    /// first: here a cart change moves `idle_cart`'s next change past `exit_intent`'s,
    /// which an exit intent set — after the timer, and not a millisecond before the
    /// cart's new one — so the timer is `exit_intent`'s. (Both the lower bound kept of the
    /// other segments' next changes and its rounding to seconds are at stake: a bound not
    /// lowered by the exit intent, or rounded up, would keep the cart's.)
    #[test]
    fn a_timer_moved_later_by_an_event_gives_way_to_a_change_another_event_set() {
        let engine = engine(&[
            (
                "idle_cart",
                "cart.items > 0 and idle(cart.updated_at) >= 10m",
            ),
            ("exit_intent", "within(last(exit_intent), 11m)"),
        ]);
        let cart = |ts: i64| {
            format!(
                r#"{{"type":"add_to_cart","customer_id":"c","ts":{ts},"properties":{{"product_id":"p"}}}}"#
            )
        };
        let t0 = 1_767_225_600_000;
        apply(&engine, &cart(t0));
        let exit = format!(
            r#"{{"type":"exit_intent","customer_id":"c","ts":{}}}"#,
            t0 + MINUTE
        );
        apply(&engine, &exit);
        assert_eq!(
            engine.store().read("c", |s| s.timer),
            Some(Some(t0 + 10 * MINUTE)),
            "the cart's comes first"
        );
        // The cart's next change is now at 12m 500ms; the exit intent's at 12m 1ms.
        apply(&engine, &cart(t0 + 2 * MINUTE + 500));
        assert_eq!(
            engine.store().read("c", |s| s.timer),
            Some(Some(t0 + 12 * MINUTE + 1))
        );
    }

    /// The other way round: an exit intent brings the timer forward, then another moves
    /// `exit_intent`'s next change past the cart's, which the timer no longer is but must
    /// become again (the bound kept of the other segments' next changes includes the
    /// timer it replaced).
    #[test]
    fn a_timer_brought_forward_by_an_event_remembers_the_one_it_replaced() {
        let engine = engine(&[
            (
                "idle_cart",
                "cart.items > 0 and idle(cart.updated_at) >= 10m",
            ),
            ("exit_intent", "within(last(exit_intent), 5m)"),
        ]);
        let t0 = 1_767_225_600_000;
        let exit = |ts: i64| format!(r#"{{"type":"exit_intent","customer_id":"c","ts":{ts}}}"#);
        apply(
            &engine,
            &format!(
                r#"{{"type":"add_to_cart","customer_id":"c","ts":{t0},"properties":{{"product_id":"p"}}}}"#
            ),
        );
        apply(&engine, &exit(t0 + MINUTE));
        let timer = || engine.store().read("c", |s| s.timer).unwrap();
        assert_eq!(
            timer(),
            Some(t0 + 6 * MINUTE + 1),
            "the exit intent's comes first"
        );
        apply(&engine, &exit(t0 + 6 * MINUTE));
        assert_eq!(
            timer(),
            Some(t0 + 10 * MINUTE),
            "the cart's comes first again"
        );
    }

    /// An event that brings the timer forward and sets a second segment's next change
    /// too: a later event that moves the first past the second (and touches only the
    /// first) must find the second's, not the timer replaced, which came later.
    #[test]
    fn a_timer_brought_forward_remembers_the_next_change_set_beside_it() {
        let engine = engine(&[
            ("recent_exit", "within(last(exit_intent), 10m)"),
            (
                "idle_cart",
                "cart.items > 0 and idle(cart.updated_at) >= 5m",
            ),
            ("unbought", "not_followed(add_to_cart, purchase, 7m)"),
        ]);
        let t0 = 1_767_225_600_000;
        let event = |kind: &str, ts: i64, product: &str| {
            format!(
                r#"{{"type":"{kind}","customer_id":"c","ts":{ts},"properties":{{"product_id":"{product}"}}}}"#
            )
        };
        let timer_and_full_recomputation = || {
            engine
                .store()
                .read("c", |state| {
                    let full = engine.next_deadlines_of(
                        engine.rules.timed.iter().copied(),
                        state,
                        state.clock,
                    );
                    (state.timer, full.first.map(|(at, _)| at))
                })
                .unwrap()
        };
        apply(&engine, &event("exit_intent", t0, "p"));
        // Touches `idle_cart` (next change at 6m, before the exit's at 10m) and `unbought`
        // (at 8m).
        apply(&engine, &event("add_to_cart", t0 + MINUTE, "p"));
        let (timer, full) = timer_and_full_recomputation();
        assert_eq!(timer, Some(t0 + 6 * MINUTE));
        assert_eq!(timer, full);
        // Touches only `idle_cart`, whose next change moves to 9m, after `unbought`'s (a
        // product the cart does not hold: the cart keeps its item, and changes).
        apply(&engine, &event("remove_from_cart", t0 + 4 * MINUTE, "q"));
        let (timer, full) = timer_and_full_recomputation();
        assert!(timer < Some(t0 + 9 * MINUTE), "{timer:?}");
        assert_eq!(timer, full);
    }

    /// After every event, evaluating *every* segment for its customer changes nothing,
    /// and its timer is the one a full recomputation gives: the plans (an event
    /// re-evaluates only the segments its type can affect, a time-dependent one only
    /// through its timer, fired before a later event) miss no change, and computing after
    /// an event only the next changes of the time-dependent segments it touched keeps the
    /// right timer. Generated traffic over two weeks of event time, so windows slide,
    /// carts go idle and buyers lapse, under the reference, demo and 48 generated rules.
    #[test]
    fn after_every_event_evaluating_every_segment_changes_nothing() {
        let reference = std::fs::read_to_string("config/segmentd.toml").unwrap();
        let demo = std::fs::read_to_string("config/demo.toml").unwrap();
        let generated = crate::generate::rules_toml(48);
        for (name, text) in [
            ("reference", &reference),
            ("demo", &demo),
            ("generated", &generated),
        ] {
            let config = crate::config::Config::from_toml_only(text, name).unwrap();
            let engine = Engine::new(
                Arc::new(config.rule_set().unwrap()),
                new_store(),
                config.time.session_gap.millis(),
            );
            let mut generator = Generator::new(GeneratorConfig {
                seed: 17,
                customers: 150,
                format: Format::Mixed,
                invalid_share: 0.0,
            });
            let (mut changes, mut missed) = (Vec::new(), Vec::new());
            for i in 0..6_000 {
                let message = generator.next_at(1_767_225_600_000 + i * 200_000);
                let event = parse_event(&message.payload, 1 << 16).unwrap();
                engine.apply(&event, &mut changes);
                let mut state = engine
                    .store()
                    .read(&event.customer_id, Clone::clone)
                    .unwrap();
                let now = state.clock;
                assert_eq!(
                    state.timer,
                    engine
                        .next_deadlines_of(engine.rules.timed.iter().copied(), &state, now)
                        .first
                        .map(|(deadline, _)| deadline),
                    "{name} rules, event {i} ({}): the timer kept differs from a full recomputation",
                    event.event_type
                );
                engine.evaluate(
                    &event.customer_id,
                    &mut state,
                    &engine.rules.full_plan,
                    now,
                    &|| Cause::Timer,
                    &mut missed,
                );
                assert!(
                    missed.is_empty(),
                    "{name} rules, event {i} ({}): a full evaluation changes {:?}",
                    event.event_type,
                    missed
                        .iter()
                        .map(|c| (&*c.segment, c.transition))
                        .collect::<Vec<_>>()
                );
            }
            assert!(changes.len() > 100, "{name}: the traffic changes segments");
        }
    }

    #[test]
    fn state_round_trips_through_serde() {
        let text = std::fs::read_to_string("config/segmentd.toml").unwrap();
        let config = crate::config::Config::from_toml_only(&text, "config/segmentd.toml").unwrap();
        let engine = Engine::new(
            Arc::new(config.rule_set().unwrap()),
            new_store(),
            30 * MINUTE,
        );
        let mut generator = Generator::new(GeneratorConfig {
            seed: 5,
            customers: 200,
            format: Format::Mixed,
            invalid_share: 0.0,
        });
        let mut changes = Vec::new();
        for i in 0..5_000 {
            let message = generator.next_at(1_767_225_600_000 + i * 1_000);
            engine.apply(
                &parse_event(&message.payload, 1 << 16).unwrap(),
                &mut changes,
            );
        }
        assert!(!changes.is_empty());
        engine.store().for_each(|id, state| {
            let json = serde_json::to_string(state).unwrap();
            let back: CustomerState = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, state, "{id}");
        });
    }
}
