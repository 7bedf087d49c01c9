//! `segmentd check`: validate a config and print what each rule needs.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{Config, DeliveryMode};
use crate::rules::compile::BUILTIN_TYPES;
use crate::rules::{CompiledRule, RuleSet};
use crate::time::format_duration;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let rules = config.rule_set()?;
    print!("{}", describe(&config, &rules));
    Ok(())
}

/// The report `check` prints: the Kafka wiring, then per segment what it reads, which
/// events make it re-evaluate, and the per-customer state it costs.
pub fn describe(config: &Config, rules: &RuleSet) -> String {
    let mut out = String::new();
    let k = &config.kafka;
    let _ = writeln!(
        out,
        "{}: OK, {} segments, rules {}",
        config.origin,
        rules.segments.len(),
        rules.version
    );
    let _ = writeln!(
        out,
        "kafka: brokers {} group {} reads {} writes {} dead letters {}",
        k.brokers,
        k.group_id,
        k.input_topics.join(", "),
        k.output_topic,
        k.dead_letter_topic
    );
    if !k.rekey_topics.is_empty() {
        let _ = writeln!(
            out,
            "re-keys: {} through {}",
            k.rekey_topics.join(", "),
            k.rekeyed_topic
        );
    }
    let _ = match config.delivery.mode {
        DeliveryMode::AtLeastOnce => writeln!(out, "delivery: at_least_once"),
        DeliveryMode::ExactlyOnce => writeln!(
            out,
            "delivery: exactly_once, transactional id {}",
            config.transactional_id()
        ),
    };
    let _ = writeln!(
        out,
        "state: changelog {}, idle customers encoded after {}",
        if k.changelog_topic.is_empty() {
            "(none: in memory only)"
        } else {
            &k.changelog_topic
        },
        format_duration(config.state.idle_after.millis())
    );
    let _ = writeln!(out, "http: {}\n", config.http.listen);
    for segment in &rules.segments {
        let _ = writeln!(out, "segment {}", segment.id);
        if let Some(description) = &segment.description {
            let _ = writeln!(out, "  {description}");
        }
        let _ = writeln!(out, "  enter: {}", segment.enter.text);
        match &segment.exit {
            Some(exit) => {
                let _ = writeln!(out, "  exit:  {}", exit.text);
            }
            None => {
                let _ = writeln!(out, "  exit:  when `enter` is false");
            }
        }
        let deps = &segment.deps;
        let triggers = if deps.any_event {
            "every event of the customer".to_owned()
        } else {
            let names: Vec<&str> = deps.types.iter().map(|t| rules.types.name(*t)).collect();
            if names.is_empty() {
                "nothing (constant)".to_owned()
            } else {
                names.join(", ")
            }
        };
        let _ = writeln!(out, "  re-evaluated on: {triggers}");
        if deps.time {
            let _ = writeln!(
                out,
                "  depends on time: its answer can change with no new event (its timer re-evaluates it)"
            );
        }
        if !deps.segments.is_empty() {
            let names: Vec<&str> = deps
                .segments
                .iter()
                .map(|s| &*rules.segments[usize::from(*s)].id)
                .collect();
            let _ = writeln!(out, "  reads segments: {}", names.join(", "));
        }
        let mut slots: Vec<&str> = Vec::new();
        for rule in std::iter::once(&segment.enter).chain(segment.exit.as_ref()) {
            collect_slots(rules, rule, &mut slots);
        }
        for slot in slots {
            let _ = writeln!(out, "  keeps per customer: {slot}");
        }
        let unknown: Vec<&str> = deps
            .types
            .iter()
            .map(|t| rules.types.name(*t))
            .filter(|name| !BUILTIN_TYPES.contains(name))
            .collect();
        if !unknown.is_empty() {
            let _ = writeln!(
                out,
                "  note: {} {} no built-in type; counted only if producers send {}",
                unknown.join(", "),
                if unknown.len() == 1 { "is" } else { "are" },
                if unknown.len() == 1 { "it" } else { "them" }
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "window granularity: a window of length W is kept in W/64 buckets (at least 1s): e.g. 7d → {}, 30m → {}",
        format_duration(crate::state::window::granularity(7 * crate::time::DAY)),
        format_duration(crate::state::window::granularity(30 * crate::time::MINUTE)),
    );
    out
}

fn collect_slots<'a>(rules: &'a RuleSet, rule: &CompiledRule, out: &mut Vec<&'a str>) {
    fn walk<'a>(rules: &'a RuleSet, node: &crate::rules::Node, out: &mut Vec<&'a str>) {
        use crate::rules::Node;
        let slot = match node {
            Node::Agg { slot, .. }
            | Node::Distinct { slot, .. }
            | Node::Top { slot, .. }
            | Node::Instant(slot)
            | Node::Followed(slot)
            | Node::NotFollowed { slot, .. } => Some(*slot),
            _ => None,
        };
        if let Some(slot) = slot {
            let text = rules.slots[usize::from(slot)].describe.as_str();
            if !out.contains(&text) {
                out.push(text);
            }
        }
        match node {
            Node::Idle(a) | Node::Not(a) | Node::Neg(a) | Node::In(a, _) => walk(rules, a, out),
            Node::Within(a, b)
            | Node::And(a, b)
            | Node::Or(a, b)
            | Node::Cmp(_, a, b)
            | Node::Arith(_, a, b) => {
                walk(rules, a, out);
                walk(rules, b, out);
            }
            _ => {}
        }
    }
    walk(rules, &rule.node, out);
}
