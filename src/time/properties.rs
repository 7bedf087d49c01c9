//! Property tests of time as a whole: deadlines are never late, and replay's answer does
//! not depend on how customers' events interleave within the lateness bound.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::partition::{PartitionTime, TimeSettings};
use super::{DAY, HOUR, MINUTE, Millis, SECOND};
use crate::emit::change::{Cause, SegmentChange};
use crate::engine::Engine;
use crate::event::parse_event;
use crate::rules::deadline::{At, value_and_next_change};
use crate::rules::eval::{Scope, eval};
use crate::rules::{RuleSet, SegmentDef};
use crate::state::{CustomerState, new_store};

const START: Millis = 1_780_000_000_000;
const SESSION_GAP: Millis = 30 * MINUTE;

/// Rules that read time in every way the language allows.
fn timed_rules() -> Vec<SegmentDef> {
    let mut high_value = SegmentDef::new("high_value", "sum(purchase.revenue, 90d) >= 100");
    high_value.exit = Some("sum(purchase.revenue, 90d) < 60".into());
    vec![
        high_value,
        SegmentDef::new(
            "cart_abandoner",
            "cart.items > 0 and idle(cart.updated_at) >= 30m",
        ),
        SegmentDef::new(
            "exit_intent_with_cart",
            "within(last(exit_intent), 2m) and cart.value > 0",
        ),
        SegmentDef::new(
            "browsers",
            "count(product_view, 7d) >= 4 and count(purchase, 30d) == 0",
        ),
        SegmentDef::new(
            "lapsed",
            "count(purchase) >= 1 and idle(last(purchase)) > 20d",
        ),
        SegmentDef::new(
            "abandoned_product",
            "not_followed(add_to_cart, purchase, 1h, by = product_id)",
        ),
        SegmentDef::new("runner", "top(product_view.category, 1d) == 'running'"),
        SegmentDef::new("engaged", "session.active and session.page_views >= 2"),
        SegmentDef::new("three_recent", "count(page_view, 10m) == 3"),
        SegmentDef::new("narrow", "distinct(product_view.category, 1h) < 2"),
        SegmentDef::new("slow_return", "idle(last(page_view)) * 2 > 1h"),
        SegmentDef::new("fresh", "customer.first_seen + 2h > customer.last_seen"),
        SegmentDef::new(
            "vip_lapsed",
            "in_segment(high_value) and in_segment(lapsed)",
        ),
    ]
}

fn engine() -> Engine {
    Engine::new(
        Arc::new(RuleSet::compile(&timed_rules()).unwrap()),
        new_store(),
        SESSION_GAP,
    )
}

/// One generated event: (customer, kind, product/category choice, gap before it).
type Step = (u8, u8, u8, Millis);

fn steps(customers: u8) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0..customers,
            0u8..7,
            0u8..3,
            prop_oneof![
                0i64..5 * SECOND,
                0i64..20 * MINUTE,
                0i64..3 * HOUR,
                0i64..25 * DAY
            ],
        ),
        1..60,
    )
}

/// The events of `steps`, in time order, as JSON.
fn events(steps: &[Step]) -> Vec<(Millis, String)> {
    let mut ts = START;
    steps
        .iter()
        .enumerate()
        .map(|(i, &(customer, kind, choice, gap))| {
            ts += gap;
            let product = ["p-1", "p-2", "p-3"][usize::from(choice)];
            let category = ["running", "tennis", "bags"][usize::from(choice)];
            let body = match kind {
                0 => r#""type":"page_view""#.to_owned(),
                1 => format!(
                    r#""type":"product_view","properties":{{"product_id":"{product}","category":"{category}"}}"#
                ),
                2 => format!(
                    r#""type":"add_to_cart","properties":{{"product_id":"{product}","price":30}}"#
                ),
                3 => format!(
                    r#""type":"purchase","properties":{{"revenue":70,"items":[{{"product_id":"{product}","price":70}}]}}"#
                ),
                4 => r#""type":"exit_intent""#.to_owned(),
                5 => format!(r#""type":"remove_from_cart","properties":{{"product_id":"{product}"}}"#),
                _ => r#""type":"search""#.to_owned(),
            };
            (
                ts,
                format!(r#"{{"event_id":"e{i}","customer_id":"c{customer}","ts":{ts},{body}}}"#),
            )
        })
        .collect()
}

/// Each customer's changes: (segment, transition, at, seq, cause kind), in order.
fn per_customer(changes: &[SegmentChange]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in changes {
        let cause = match &c.cause {
            Cause::Event { event_id, .. } => format!("event {event_id:?}"),
            other => format!("{other:?}"),
        };
        out.entry(c.customer_id.to_string())
            .or_default()
            .push(format!(
                "{} {:?} {} {} {cause}",
                c.segment, c.transition, c.at, c.seq
            ));
    }
    out
}

fn replay(
    events: &[(Millis, String)],
    lateness: Millis,
    hold: bool,
    until: Millis,
) -> Vec<SegmentChange> {
    let engine = engine();
    let mut time = PartitionTime::new(
        TimeSettings {
            allowed_lateness: lateness,
            idle_timeout: None,
            hold,
        },
        0,
    );
    let mut out = Vec::new();
    let mut released = Vec::new();
    for (_, json) in events {
        let event = parse_event(json.as_bytes(), 1 << 16).unwrap();
        let step = time.take(&engine, event, (), 0, &mut out, &mut released);
        assert!(!step.late, "the generated streams stay within the bound");
    }
    time.finish(&engine, until, &mut out, &mut released);
    assert_eq!(released.len(), events.len(), "every event applied");
    out
}

/// Swaps neighbouring events at the chosen places where both stay within `lateness` of
/// the highest time before them (so none is late) and `allowed` says the pair may swap.
/// Returns the stream and how many swaps were made.
fn shuffle_within(
    sorted: &[(Millis, String)],
    swaps: &[prop::sample::Index],
    lateness: Millis,
    allowed: impl Fn(&(Millis, String), &(Millis, String)) -> bool,
) -> (Vec<(Millis, String)>, usize) {
    let mut shuffled = sorted.to_vec();
    let mut swapped = 0;
    for swap in swaps {
        let i = swap.index(shuffled.len().max(2) - 1);
        if i + 1 >= shuffled.len() {
            continue;
        }
        let (a, b) = (&shuffled[i], &shuffled[i + 1]);
        let highest_before = shuffled[..i]
            .iter()
            .map(|e| e.0)
            .max()
            .unwrap_or(Millis::MIN);
        let fits = b.0.max(highest_before) - a.0 <= lateness
            && highest_before.saturating_sub(b.0) <= lateness;
        if fits && allowed(a, b) {
            shuffled.swap(i, i + 1);
            swapped += 1;
        }
    }
    (shuffled, swapped)
}

fn customer(json: &str) -> &str {
    json.split("customer_id\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
}

/// Applies `steps`' events one by one to a fresh engine with [`timed_rules`], handing
/// `check` the rules and the event's customer's state after each.
fn after_each_event(
    steps: &[Step],
    mut check: impl FnMut(&RuleSet, &CustomerState) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let engine = engine();
    let rules = engine.rules().clone();
    let mut out = Vec::new();
    for (_, json) in events(steps) {
        let event = parse_event(json.as_bytes(), 1 << 16).unwrap();
        engine.apply(&event, &mut out);
        let state = engine
            .store()
            .read(&event.customer_id, Clone::clone)
            .unwrap();
        check(&rules, &state)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A customer's deadline is never late: at every instant before it, each time-dependent
    /// rule the customer is subject to has the answer it had when the deadline was set.
    #[test]
    fn no_rule_changes_before_the_deadline(steps in steps(1), probes in prop::collection::vec(0.0f64..1.0, 8)) {
        after_each_event(&steps, |rules, state| {
            let now = state.clock;
            let horizon = state.timer.unwrap_or(now + 200 * DAY);
            prop_assert!(horizon > now);
            let answers = |at: Millis| -> Vec<bool> {
                rules.timed.iter().map(|&index| {
                    let rule = rules.segments[usize::from(index)].rule_for(state.is_member(index));
                    let scope = Scope::Customer { state, now: at, session_gap: SESSION_GAP };
                    eval(&rule.node, scope, &rules.slots).is_true()
                }).collect()
            };
            let at_now = answers(now);
            let mut instants: Vec<Millis> = probes
                .iter()
                .map(|p| now + 1 + ((horizon - now - 1) as f64 * p) as Millis)
                .collect();
            instants.push(horizon - 1);
            for at in instants.into_iter().filter(|&t| t > now && t < horizon) {
                prop_assert_eq!(answers(at), at_now.clone(), "changed at {} before the deadline {:?} (now {})", at, state.timer, now);
            }
            Ok(())
        })?;
    }

    /// Finding a rule's next change evaluates the rule on the way (the engine takes that
    /// value, not a second evaluation): it is the value evaluation gives, for both rules of
    /// every segment, at every instant probed.
    #[test]
    fn the_value_found_with_the_next_change_is_the_rules_value(steps in steps(1), probes in prop::collection::vec(0.0f64..1.0, 8)) {
        after_each_event(&steps, |rules, state| {
            let now = state.clock;
            // Now, either side of the deadline (where thresholds are crossed), and over 40 days.
            let around_deadline = state.timer.into_iter().flat_map(|t| [t - 1, t]);
            let instants = [now].into_iter().chain(around_deadline).chain(probes.iter().map(|p| now + (40.0 * DAY as f64 * p) as Millis));
            for at in instants {
                for segment in &rules.segments {
                    for rule in std::iter::once(&segment.enter).chain(&segment.exit) {
                        let scope = Scope::Customer { state, now: at, session_gap: SESSION_GAP };
                        let evaluated = eval(&rule.node, scope, &rules.slots);
                        let found = At { state, now: at, session_gap: SESSION_GAP, slots: &rules.slots };
                        prop_assert_eq!(value_and_next_change(&rule.node, found).0, evaluated, "{} at {}", &*segment.id, at);
                    }
                }
            }
            Ok(())
        })?;
    }

    /// Interleaving customers' events differently — each moved by no more than the allowed
    /// lateness, each customer's own order kept — gives every customer exactly the same
    /// changes as the time-ordered stream: timers that fire on the watermark fire the same
    /// way as those a customer's next event catches up.
    #[test]
    fn interleaving_within_the_lateness_bound_changes_nothing(
        steps in steps(4),
        swaps in prop::collection::vec(any::<prop::sample::Index>(), 0..200),
    ) {
        let lateness = 10 * MINUTE;
        let sorted = events(&steps);
        let (shuffled, swapped) = shuffle_within(&sorted, &swaps, lateness, |a, b| {
            customer(&a.1) != customer(&b.1)
        });
        prop_assume!(swapped > 0, "the stream is actually reordered");
        let until = sorted.last().unwrap().0 + 90 * DAY;
        prop_assert_eq!(
            per_customer(&replay(&shuffled, lateness, false, until)),
            per_customer(&replay(&sorted, lateness, false, until))
        );
    }

    /// In event-time order (`time.order = "event_time"`), any shuffle within the lateness
    /// bound — one customer's own events included — gives exactly the changes of the
    /// time-ordered stream (events with equal times keep their arrival order, so only
    /// events with different times are swapped).
    #[test]
    fn event_time_order_undoes_any_shuffle_within_the_lateness_bound(
        steps in steps(3),
        swaps in prop::collection::vec(any::<prop::sample::Index>(), 0..200),
    ) {
        let lateness = 10 * MINUTE;
        let sorted = events(&steps);
        let (shuffled, swapped) = shuffle_within(&sorted, &swaps, lateness, |a, b| a.0 != b.0);
        prop_assume!(swapped > 0, "the stream is actually reordered");
        let until = sorted.last().unwrap().0 + 90 * DAY;
        prop_assert_eq!(
            per_customer(&replay(&shuffled, lateness, true, until)),
            per_customer(&replay(&sorted, lateness, true, until))
        );
    }
}
