//! The engine against an independent computation: generated traffic (three weeks of a
//! shop, 300 customers) is replayed through the engine, and each customer's final
//! membership is recomputed from scratch from the raw events — windows by the documented
//! bucket rule, `top` with ties to the most recent, `distinct`, `avg`, `within` — and
//! compared segment by segment.

use std::collections::BTreeMap;
use std::sync::Arc;

use segmentd::engine::Engine;
use segmentd::event::{Event, PropValue, parse_event};
use segmentd::generate::{Format, Generator, GeneratorConfig};
use segmentd::rules::{RuleSet, SegmentDef};
use segmentd::state::new_store;
use segmentd::state::window::{bucket_is_live, bucket_of, granularity};
use segmentd::time::{DAY, MINUTE, Millis};

const SEGMENTS: &[(&str, &str)] = &[
    ("views_7d", "count(product_view, 7d) >= 15"),
    ("views_1d", "count(product_view, 1d) >= 4"),
    ("spent_1d", "sum(purchase.revenue, 1d) >= 100"),
    ("cheap_max_7d", "max(purchase.revenue, 7d) < 80"),
    ("spent_3d", "sum(purchase.revenue, 3d) >= 300"),
    ("runner_14d", "top(product_view.category, 14d) == 'running'"),
    ("curious_2d", "distinct(product_view.category, 2d) >= 4"),
    ("big_baskets", "avg(purchase.revenue) > 150"),
    ("leaving", "within(last(exit_intent), 10m)"),
    (
        "shoe_views_30d",
        "count(product_view where category == 'shoes', 30d) >= 3",
    ),
];

/// Whether an event at `at` is inside a window of `length` at `now`, by the documented
/// rule: its bucket (1/64 of the window, at least 1 s) ends less than `length` before now.
fn in_window(at: Millis, length: Millis, now: Millis) -> bool {
    let g = granularity(length);
    let index = bucket_of(at, g);
    bucket_is_live(index, g, length, now) && index * g <= now
}

fn category(event: &Event) -> Option<&str> {
    event.property("category").and_then(PropValue::as_str)
}

/// Each segment's answer for one customer at `now`, computed from the raw events.
fn oracle(events: &[Event], now: Millis) -> BTreeMap<&'static str, bool> {
    let of = |t: &'static str| events.iter().filter(move |e| &*e.event_type == t);
    let views_in = |length| of("product_view").filter(move |e| in_window(e.ts, length, now));
    let mut answers = BTreeMap::new();
    answers.insert("views_7d", views_in(7 * DAY).count() >= 15);
    answers.insert("views_1d", views_in(DAY).count() >= 4);
    let purchases_in = |length| of("purchase").filter(move |e| in_window(e.ts, length, now));
    answers.insert(
        "spent_1d",
        purchases_in(DAY).filter_map(|e| e.revenue).sum::<f64>() >= 100.0,
    );
    let max_7d = purchases_in(7 * DAY)
        .filter_map(|e| e.revenue)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    answers.insert("cheap_max_7d", max_7d.is_some_and(|m| m < 80.0));
    let spent: f64 = of("purchase")
        .filter(|e| in_window(e.ts, 3 * DAY, now))
        .filter_map(|e| e.revenue)
        .sum();

    answers.insert("spent_3d", spent >= 300.0);
    let mut tally: BTreeMap<&str, (usize, Millis)> = BTreeMap::new();
    for view in views_in(14 * DAY) {
        if let Some(c) = category(view) {
            let entry = tally.entry(c).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(view.ts);
        }
    }
    let top = tally
        .iter()
        .max_by_key(|(_, (count, last))| (*count, *last))
        .map(|(c, _)| *c);
    answers.insert("runner_14d", top == Some("running"));
    let mut seen: Vec<&str> = views_in(2 * DAY).filter_map(category).collect();
    seen.sort_unstable();
    seen.dedup();
    answers.insert("curious_2d", seen.len() >= 4);
    let revenues: Vec<f64> = of("purchase").filter_map(|e| e.revenue).collect();
    let average = revenues.iter().sum::<f64>() / revenues.len().max(1) as f64;
    answers.insert("big_baskets", !revenues.is_empty() && average > 150.0);
    let last_exit = of("exit_intent").map(|e| e.ts).max();
    answers.insert(
        "leaving",
        last_exit.is_some_and(|t| t <= now && now - t <= 10 * MINUTE),
    );
    answers.insert(
        "shoe_views_30d",
        views_in(30 * DAY)
            .filter(|e| category(e) == Some("shoes"))
            .count()
            >= 3,
    );
    answers
}

/// Compares every customer's membership of every segment with the oracle at the
/// customer's latest event; returns how many customers are in each segment.
fn compare(
    engine: &Engine,
    by_customer: &BTreeMap<String, Vec<Event>>,
) -> BTreeMap<&'static str, usize> {
    let mut members = BTreeMap::new();
    let mut mismatches = Vec::new();
    for (customer, events) in by_customer {
        let now = events.iter().map(|e| e.ts).max().unwrap();
        let state = engine.store().read(customer, Clone::clone).unwrap();
        for (segment, expected) in oracle(events, now) {
            let actual = state.is_member(engine.rules().segment_index(segment).unwrap());
            *members.entry(segment).or_default() += usize::from(actual);
            if actual != expected {
                mismatches.push(format!(
                    "{customer} {segment}: engine {actual}, oracle {expected}"
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    members
}

/// Proves that incremental state and evaluation agree with a from-scratch computation for
/// every customer and every segment, at a checkpoint and after three weeks of traffic.
#[test]
fn memberships_match_an_independent_computation() {
    let defs: Vec<SegmentDef> = SEGMENTS
        .iter()
        .map(|(id, enter)| SegmentDef::new(id, enter))
        .collect();
    let engine = Engine::new(
        Arc::new(RuleSet::compile(&defs).unwrap()),
        new_store(),
        30 * MINUTE,
    );
    let mut generator = Generator::new(GeneratorConfig {
        seed: 77,
        customers: 120,
        format: Format::Mixed,
        invalid_share: 0.0,
    });
    let start = 1_767_225_600_000;
    let mut by_customer: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    let mut changes = Vec::new();
    for i in 0..40_000 {
        // One event every 45 s: about three weeks, so every window slides.
        let message = generator.next_at(start + i * 45_000);
        let event = parse_event(&message.payload, 1 << 16).unwrap();
        engine.apply(&event, &mut changes);
        by_customer.entry(message.key).or_default().push(event);
        if i == 20_000 {
            compare(&engine, &by_customer);
        }
    }
    assert!(
        changes.len() > 1_000,
        "the traffic exercises the rules: {} changes",
        changes.len()
    );
    let members = compare(&engine, &by_customer);
    for (segment, _) in SEGMENTS {
        assert!(
            members.get(segment).copied().unwrap_or(0) > 0,
            "no customer ends in {segment}: {members:?}"
        );
    }
}
