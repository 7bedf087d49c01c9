//! The segment rule language: parse ([`parser`]), type-check and compile ([`compile`]),
//! evaluate ([`eval`]). [`RuleSet::compile`] turns the config's segment definitions into
//! everything the engine needs: compiled rules in dependency order, the slots customers
//! keep, and per event type the plan of which slots to feed and which segments to
//! re-evaluate.
//!
//! # The language
//!
//! - literals: numbers, `'text'` or `"text"`, `true`/`false`, durations `250ms 90s 30m
//!   12h 7d 2w`; operators `or`, `and`, `not`, `== != < <= > >=`, `in [..]`, `+ - * /`,
//!   parentheses. Precedence from loosest: `or`, `and`, `not`, comparisons, `+ -`, `* /`.
//! - aggregates over an event type, lifetime or over a sliding window, optionally
//!   filtered on the event's properties: `count(type[, window])`, `sum(type.field[,
//!   window])`, `avg`, `min`, `max`, `distinct`, `top`;
//!   `count(product_view where category == 'shoes', 7d)`.
//! - times: `last(type)`, `first(type)`, `idle(t)` = now − t, `within(t, d)`.
//! - sequences: `followed(a, b, d[, by = field])`, `not_followed(a, b, d[, by = field])`.
//! - state: `cart.*`, `session.*`, `customer.*` (see [`compile::STATE_FIELDS`]),
//!   `traits.KEY`, `context.KEY`; `in_segment(id)`.
//!
//! Errors are found at load and name the segment, the rule (`enter`/`exit`), and the line
//! and column.

pub mod ast;
pub mod compile;
pub mod deadline;
pub mod eval;
pub mod parser;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use compile::{Deps, Fact, Node, SlotSpec, TypeRegistry};

/// One segment as the config defines it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentDef {
    /// Unique id: lower-case letters, digits and `_`.
    pub id: String,
    /// What the segment means, for people.
    pub description: Option<String>,
    /// When a customer enters.
    pub enter: RuleText,
    /// When a member leaves; without it, when `enter` becomes false.
    pub exit: Option<RuleText>,
}

impl SegmentDef {
    /// A segment with only an id and an `enter` rule (no description, no `exit`), as
    /// tools and tests write them.
    pub fn new(id: &str, enter: &str) -> Self {
        SegmentDef {
            id: id.to_owned(),
            enter: enter.into(),
            ..SegmentDef::default()
        }
    }
}

/// A rule's text and where it starts in its file, so errors point into the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleText {
    /// The rule.
    pub text: String,
    /// 1-based line and column of the rule's first character in the config file, when
    /// known; errors are then given in file coordinates.
    pub origin: Option<(usize, usize)>,
}

impl From<&str> for RuleText {
    fn from(text: &str) -> Self {
        RuleText {
            text: text.to_owned(),
            origin: None,
        }
    }
}

/// Which part of a segment an error is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RulePart {
    /// The segment's id.
    Id,
    /// The `enter` rule.
    Enter,
    /// The `exit` rule.
    Exit,
}

/// A rule that does not load: which segment, which rule, where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// The segment's id.
    pub segment: String,
    /// Which rule of it.
    pub part: RulePart,
    /// 1-based line (in the config file when the origin is known, else in the rule).
    pub line: usize,
    /// 1-based column, likewise.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// The offending rule's text, for the caret display.
    pub text: String,
    /// Byte offset of the error in `text`.
    pub offset: usize,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = match self.part {
            RulePart::Id => "id",
            RulePart::Enter => "enter",
            RulePart::Exit => "exit",
        };
        writeln!(
            f,
            "segment `{}` ({part}), line {}, column {}: {}",
            self.segment, self.line, self.column, self.message
        )?;
        if !self.text.is_empty() {
            let line_start = self.text[..self.offset].rfind('\n').map_or(0, |i| i + 1);
            let line_end = self.text[self.offset..]
                .find('\n')
                .map_or(self.text.len(), |i| self.offset + i);
            let caret = self.text[line_start..self.offset].chars().count();
            writeln!(f, "    {}", &self.text[line_start..line_end])?;
            write!(f, "    {}^", " ".repeat(caret))?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

/// All the errors of a rule set, shown together so one run finds them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleErrors {}

/// A compiled rule.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    /// The rule as written.
    pub text: String,
    /// The evaluable tree.
    pub node: Node,
    /// What it reads.
    pub deps: Deps,
    /// Sub-expressions reported as `facts` when it changes a membership.
    pub facts: Vec<Fact>,
}

/// A compiled segment.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Its id, shared by every output record that names it.
    pub id: Arc<str>,
    /// What it means.
    pub description: Option<String>,
    /// When a customer enters.
    pub enter: CompiledRule,
    /// When a member leaves (`None`: when `enter` is false).
    pub exit: Option<CompiledRule>,
    /// What `enter` and `exit` read together.
    pub deps: Deps,
}

impl Segment {
    /// The rule whose answer decides a customer's next change: the exit rule for a member
    /// (when there is one; else `enter`, whose turning false means leaving), `enter` for
    /// everyone else.
    pub fn rule_for(&self, member: bool) -> &CompiledRule {
        match (member, &self.exit) {
            (true, Some(exit)) => exit,
            _ => &self.enter,
        }
    }
}

/// Everything the engine needs from the rules.
#[derive(Debug)]
pub struct RuleSet {
    /// The segments, in config order; indices are segment numbers.
    pub segments: Vec<Segment>,
    /// The slots every customer keeps.
    pub slots: Vec<SlotSpec>,
    /// Event type ids.
    pub types: TypeRegistry,
    /// Per event type id: the segments to re-evaluate, dependencies first.
    pub eval_plan: Vec<Vec<u16>>,
    /// Every segment, dependencies first: what a customer's first event evaluates, since
    /// a rule may already hold for a customer with no history (`traits.tier != 'gold'`).
    pub full_plan: Vec<u16>,
    /// Per event type id: the segments of `timed` its plan re-evaluates, the only ones
    /// whose next change the event can move: the other timed rules' inputs and
    /// memberships are as they were when the customer's deadline was computed.
    pub deadline_plan: Vec<Vec<u16>>,
    /// Per event type id: the slots to feed.
    pub slot_plan: Vec<Vec<u16>>,
    /// The segments whose answer can change with time alone, and those built on them
    /// through `in_segment`, dependencies first: what a timer re-evaluates.
    pub timer_plan: Vec<u16>,
    /// The segments whose own rules read time (`idle`, `within`, windows,
    /// `not_followed`, open sessions): where a customer's next deadline comes from.
    pub timed: Vec<u16>,
    /// `sha256:` of the rule definitions: stamped on every output record.
    pub version: Arc<str>,
    /// A 64-bit hash of `version`: which rules a stored state was built with (the
    /// changelog records it with every state, so it must stay small).
    pub fingerprint: u64,
}

impl RuleSet {
    /// Compiles segment definitions; every error found is returned, not just the first.
    pub fn compile(defs: &[SegmentDef]) -> Result<RuleSet, RuleErrors> {
        let mut errors = Vec::new();
        let mut ids = HashMap::new();
        for (index, def) in defs.iter().enumerate() {
            let problem = if !valid_id(&def.id) {
                Some("a segment id is 1 to 64 lower-case letters, digits and `_`, starting with a letter".to_owned())
            } else if ids.contains_key(&def.id) {
                Some(format!("segment `{}` is defined twice", def.id))
            } else if index >= usize::from(u16::MAX) {
                Some("too many segments".to_owned())
            } else {
                None
            };
            match problem {
                Some(message) => errors.push(RuleError {
                    segment: def.id.clone(),
                    part: RulePart::Id,
                    line: def.enter.origin.map_or(1, |o| o.0),
                    column: 1,
                    message,
                    text: String::new(),
                    offset: 0,
                }),
                None => {
                    ids.insert(def.id.clone(), index as u16);
                }
            }
        }
        let mut types = TypeRegistry::with_builtins();
        let mut slots = Vec::new();
        let mut segments = Vec::new();
        {
            let mut compiler = compile::Compiler {
                segments: &ids,
                types: &mut types,
                slots: &mut slots,
            };
            for def in defs {
                let enter = compile_rule(&mut compiler, def, RulePart::Enter, &def.enter);
                let exit = def
                    .exit
                    .as_ref()
                    .map(|exit| compile_rule(&mut compiler, def, RulePart::Exit, exit));
                match (enter, exit.transpose()) {
                    (Ok(enter), Ok(exit)) => {
                        let mut deps = enter.deps.clone();
                        if let Some(exit) = &exit {
                            deps.merge(&exit.deps);
                        }
                        segments.push(Segment {
                            id: def.id.as_str().into(),
                            description: def.description.clone(),
                            enter,
                            exit,
                            deps,
                        });
                    }
                    (enter, exit) => errors.extend(enter.err().into_iter().chain(exit.err())),
                }
            }
        }
        if !errors.is_empty() {
            return Err(RuleErrors(errors));
        }
        let order = dependency_order(&segments, defs).map_err(|e| RuleErrors(vec![e]))?;
        let eval_plan: Vec<Vec<u16>> = (0..types.id_count())
            .map(|t| {
                let t = t as u16;
                plan_where(&segments, &order, |deps| {
                    deps.any_event || deps.types.contains(&t)
                })
            })
            .collect();
        let timer_plan = plan_where(&segments, &order, |deps| deps.time);
        let timed: Vec<u16> = order
            .iter()
            .copied()
            .filter(|&s| segments[usize::from(s)].deps.time)
            .collect();
        let deadline_plan = eval_plan
            .iter()
            .map(|plan| timed.iter().copied().filter(|s| plan.contains(s)).collect())
            .collect();
        let slot_plan = (0..types.id_count())
            .map(|t| {
                let t = t as u16;
                (0..slots.len() as u16)
                    .filter(|&s| {
                        let spec: &SlotSpec = &slots[usize::from(s)];
                        spec.event_type == t || matches!(spec.kind, compile::SlotKind::Sequence { then, .. } if then == t)
                    })
                    .collect()
            })
            .collect();
        let version = version_of(defs);
        Ok(RuleSet {
            fingerprint: crate::event::stable_hash(version.as_bytes()),
            version: version.into(),
            segments,
            slots,
            types,
            eval_plan,
            deadline_plan,
            full_plan: order,
            slot_plan,
            timer_plan,
            timed,
        })
    }

    /// The index of a segment by id.
    pub fn segment_index(&self, id: &str) -> Option<u16> {
        self.segments
            .iter()
            .position(|s| &*s.id == id)
            .map(|i| i as u16)
    }
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn compile_rule(
    compiler: &mut compile::Compiler,
    def: &SegmentDef,
    part: RulePart,
    rule: &RuleText,
) -> Result<CompiledRule, RuleError> {
    let located = |offset: usize, message: String| {
        let (line, column) = position(&rule.text, offset, rule.origin);
        RuleError {
            segment: def.id.clone(),
            part,
            line,
            column,
            message,
            text: rule.text.clone(),
            offset,
        }
    };
    let expr = parser::parse_rule(&rule.text).map_err(|e| located(e.offset, e.message))?;
    let compiled = compiler
        .compile(&expr, &rule.text)
        .map_err(|e| located(e.span.start, e.message))?;
    Ok(CompiledRule {
        text: rule.text.clone(),
        node: compiled.node,
        deps: compiled.deps,
        facts: compiled.facts,
    })
}

/// 1-based line and column of byte `offset` of `text`, shifted to file coordinates when
/// the text's origin in the file is known.
fn position(text: &str, offset: usize, origin: Option<(usize, usize)>) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before, |i| &before[i + 1..])
        .chars()
        .count()
        + 1;
    match origin {
        Some((origin_line, origin_column)) if line == 1 => {
            (origin_line, origin_column + column - 1)
        }
        Some((origin_line, _)) => (origin_line + line - 1, column),
        None => (line, column),
    }
}

/// Orders segments so that every segment comes after those it reads with `in_segment`;
/// a cycle is an error naming the segments in it.
fn dependency_order(segments: &[Segment], defs: &[SegmentDef]) -> Result<Vec<u16>, RuleError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Visiting,
        Done,
    }
    fn visit(
        i: usize,
        segments: &[Segment],
        marks: &mut [Mark],
        order: &mut Vec<u16>,
        path: &mut Vec<usize>,
    ) -> Result<(), Vec<usize>> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Visiting => {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                return Err(path[start..].to_vec());
            }
            Mark::New => {}
        }
        marks[i] = Mark::Visiting;
        path.push(i);
        for dep in &segments[i].deps.segments {
            visit(usize::from(*dep), segments, marks, order, path)?;
        }
        path.pop();
        marks[i] = Mark::Done;
        order.push(i as u16);
        Ok(())
    }
    let mut marks = vec![Mark::New; segments.len()];
    let mut order = Vec::with_capacity(segments.len());
    for i in 0..segments.len() {
        if let Err(cycle) = visit(i, segments, &mut marks, &mut order, &mut Vec::new()) {
            let names: Vec<&str> = cycle.iter().map(|&c| &*segments[c].id).collect();
            let first = &defs[cycle[0]];
            let rule = &first.enter;
            let offset = rule.text.find("in_segment").unwrap_or(0);
            let (line, column) = position(&rule.text, offset, rule.origin);
            return Err(RuleError {
                segment: first.id.clone(),
                part: RulePart::Enter,
                line,
                column,
                message: format!(
                    "segments depend on each other in a cycle: {} → {}",
                    names.join(" → "),
                    names[0]
                ),
                text: rule.text.clone(),
                offset,
            });
        }
    }
    Ok(order)
}

/// The segments to re-evaluate when an event of type `t` arrives, in dependency order: a
/// segment is in when `t` can change one of its inputs or one of the segments it reads.
/// The segments `touched` selects, and every segment built on one of them through
/// `in_segment`, in dependency order.
fn plan_where(segments: &[Segment], order: &[u16], touched: impl Fn(&Deps) -> bool) -> Vec<u16> {
    let mut affected = vec![false; segments.len()];
    let mut plan = Vec::new();
    for &s in order {
        let deps = &segments[usize::from(s)].deps;
        let hit = touched(deps) || deps.segments.iter().any(|d| affected[usize::from(*d)]);
        if hit {
            affected[usize::from(s)] = true;
            plan.push(s);
        }
    }
    plan
}

fn version_of(defs: &[SegmentDef]) -> String {
    let mut hasher = Sha256::new();
    for def in defs {
        hasher.update(def.id.as_bytes());
        hasher.update([0]);
        hasher.update(def.enter.text.as_bytes());
        hasher.update([0]);
        if let Some(exit) = &def.exit {
            hasher.update(exit.text.as_bytes());
        }
        hasher.update([1]);
    }
    let digest = hasher.finalize();
    let mut text = String::from("sha256:");
    for byte in digest.iter() {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

#[cfg(test)]
mod tests;
