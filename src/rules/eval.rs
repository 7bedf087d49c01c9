//! Evaluating compiled [`Node`]s against a customer's state at a given time, or against
//! an event's properties (aggregate filters).
//!
//! Missing values are `Null`: a trait never sent, `last(purchase)` of a customer who never
//! bought, `avg` of no events. Comparisons with `Null` are false except `!=`, which is
//! true; arithmetic with `Null` is `Null`; `and`/`or`/`not` treat `Null` as false. A
//! value of the wrong kind at run time (a text trait compared with a number) behaves like
//! `Null`. No evaluation allocates.

use serde_json::Value as Json;

use super::compile::{AggOp, ArithOp, CmpOp, Lit, Node, SlotKind, SlotSpec, StateField};
use crate::event::{Event, PropValue, lookup};
use crate::state::CustomerState;
use crate::state::slots::SlotState;
use crate::time::{Millis, format_duration, format_timestamp};

/// A run-time value, borrowing text from the state, the event or the rules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(f64),
    /// Text.
    Str(&'a str),
    /// An instant.
    Time(Millis),
    /// A duration.
    Dur(Millis),
}

impl Value<'_> {
    /// Truthiness for logic: only `true` is true.
    pub fn is_true(self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// The value as JSON for `facts`: times as RFC 3339, durations as `30m12s`.
    pub fn to_json(self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Num(n) => serde_json::Number::from_f64(tidy(n)).map_or(Json::Null, Json::Number),
            Value::Str(s) => Json::String(s.to_owned()),
            Value::Time(t) => Json::String(format_timestamp(t)),
            Value::Dur(d) => Json::String(format_duration(d)),
        }
    }
}

/// Rounds away binary floating-point residue (`700.1700000000001` → `700.17`) for
/// display: nine decimals are kept, far below any currency's unit.
fn tidy(n: f64) -> f64 {
    if n.abs() < 1e9 {
        (n * 1e9).round() / 1e9
    } else {
        n
    }
}

/// What a node is evaluated against.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// A rule: a customer's state at time `now`.
    Customer {
        /// The customer.
        state: &'a CustomerState,
        /// Evaluation time.
        now: Millis,
        /// The inactivity that closes a session (for `session.*`).
        session_gap: Millis,
    },
    /// An aggregate's filter: one event.
    Event(&'a Event),
}

static EMPTY_SLOT: SlotState = SlotState::Empty;

fn slot(state: &CustomerState, index: u16) -> &SlotState {
    state.slots.get(usize::from(index)).unwrap_or(&EMPTY_SLOT)
}

fn prop(value: Option<&PropValue>) -> Value<'_> {
    match value {
        None | Some(PropValue::Null) => Value::Null,
        Some(PropValue::Bool(b)) => Value::Bool(*b),
        Some(PropValue::Num(n)) => Value::Num(*n),
        Some(PropValue::Str(s)) => Value::Str(s),
    }
}

fn lit(lit: &Lit) -> Value<'_> {
    match lit {
        Lit::Num(n) => Value::Num(*n),
        Lit::Str(s) => Value::Str(s),
        Lit::Bool(b) => Value::Bool(*b),
        Lit::Dur(d) => Value::Dur(*d),
    }
}

/// Evaluates `node`. `slots` are the rule set's slot specs (for sequence keys and windows).
pub fn eval<'a>(node: &'a Node, scope: Scope<'a>, slots: &'a [SlotSpec]) -> Value<'a> {
    match node {
        Node::Lit(l) => lit(l),
        Node::Prop(key) => match scope {
            Scope::Event(event) => event_prop(event, key),
            Scope::Customer { .. } => Value::Null,
        },
        Node::Not(inner) => Value::Bool(!eval(inner, scope, slots).is_true()),
        Node::Neg(inner) => negate(eval(inner, scope, slots)),
        Node::And(l, r) => {
            Value::Bool(eval(l, scope, slots).is_true() && eval(r, scope, slots).is_true())
        }
        Node::Or(l, r) => {
            Value::Bool(eval(l, scope, slots).is_true() || eval(r, scope, slots).is_true())
        }
        Node::Cmp(op, l, r) => {
            Value::Bool(compare(*op, eval(l, scope, slots), eval(r, scope, slots)))
        }
        Node::Arith(op, l, r) => arith(*op, eval(l, scope, slots), eval(r, scope, slots)),
        Node::In(inner, items) => Value::Bool(in_list(eval(inner, scope, slots), items)),
        _ => match scope {
            Scope::Customer {
                state,
                now,
                session_gap,
            } => eval_customer(node, state, now, session_gap, slots),
            Scope::Event(_) => Value::Null,
        },
    }
}

/// A property of the event for filters; `revenue` falls back to the purchase's money.
fn event_prop<'a>(event: &'a Event, key: &str) -> Value<'a> {
    match (event.property(key), key) {
        (None, "revenue") => event.revenue.map_or(Value::Null, Value::Num),
        (found, _) => prop(found),
    }
}

fn eval_customer<'a>(
    node: &'a Node,
    state: &'a CustomerState,
    now: Millis,
    session_gap: Millis,
    slots: &'a [SlotSpec],
) -> Value<'a> {
    let scope = Scope::Customer {
        state,
        now,
        session_gap,
    };
    match node {
        Node::State(field) => state_field(*field, state, session_open(state, now, session_gap)),
        Node::Trait(key) => prop(lookup(&state.traits, key)),
        Node::Context(key) => prop(lookup(&state.context, key)),
        Node::Agg {
            slot: index,
            op,
            window,
        } => {
            let stats = slot(state, *index).stats(*window, now);
            let empty = stats.count == 0;
            match op {
                AggOp::Count => Value::Num(stats.count as f64),
                AggOp::Sum => Value::Num(stats.sum),
                AggOp::Avg if !empty => Value::Num(stats.sum / stats.count as f64),
                AggOp::Min if !empty => Value::Num(stats.min),
                AggOp::Max if !empty => Value::Num(stats.max),
                _ => Value::Null,
            }
        }
        Node::Distinct {
            slot: index,
            window,
        } => Value::Num(slot(state, *index).distinct_count(*window, now) as f64),
        Node::Top {
            slot: index,
            window,
        } => slot(state, *index)
            .top(*window, now)
            .map_or(Value::Null, Value::Str),
        Node::Instant(index) => slot(state, *index)
            .instant()
            .map_or(Value::Null, Value::Time),
        Node::Followed(index) => Value::Bool(
            slot(state, *index)
                .sequence()
                .is_some_and(|s| s.followed_at.is_some()),
        ),
        Node::NotFollowed {
            slot: index,
            within,
        } => Value::Bool(
            slot(state, *index)
                .sequence()
                .is_some_and(|s| s.overdue(*within, now)),
        ),
        Node::InSegment(segment) => Value::Bool(state.is_member(*segment)),
        Node::Idle(at) => idle(eval(at, scope, slots), now),
        Node::Within(at, length) => Value::Bool(within(
            eval(at, scope, slots),
            eval(length, scope, slots),
            now,
        )),
        _ => {
            debug_assert!(false, "eval_customer called with a generic node");
            Value::Null
        }
    }
}

/// `-value`: numbers and durations; anything else has none.
pub(super) fn negate(value: Value<'_>) -> Value<'_> {
    match value {
        Value::Num(n) => Value::Num(-n),
        Value::Dur(d) => Value::Dur(-d),
        _ => Value::Null,
    }
}

/// Whether `value` equals one of `items` (`in [..]`).
pub(super) fn in_list(value: Value<'_>, items: &[Lit]) -> bool {
    items
        .iter()
        .any(|item| compare(CmpOp::Eq, value, lit(item)))
}

/// `idle(instant)` at `now`: the time since it, or nothing without an instant.
pub(super) fn idle(instant: Value<'_>, now: Millis) -> Value<'static> {
    match instant {
        Value::Time(t) => Value::Dur(now - t),
        _ => Value::Null,
    }
}

/// `within(instant, length)` at `now`: the instant has passed, by no more than `length`.
pub(super) fn within(instant: Value<'_>, length: Value<'_>, now: Millis) -> bool {
    match (instant, length) {
        (Value::Time(t), Value::Dur(d)) => t <= now && now - t <= d,
        _ => false,
    }
}

/// Whether the customer's session is open at `now`: it has had an event and its
/// inactivity gap has not passed. A closed session reads as no session (`session.id`
/// null, `page_views` and `events` 0, `active` false); its times stay readable.
pub fn session_open(state: &CustomerState, now: Millis, session_gap: Millis) -> bool {
    state.session.events > 0 && now - state.session.last_activity <= session_gap
}

fn state_field(field: StateField, state: &CustomerState, session_open: bool) -> Value<'_> {
    let c = &state.customer;
    let time = |t: Option<Millis>| t.map_or(Value::Null, Value::Time);
    match field {
        StateField::CartItems => Value::Num(state.cart.items()),
        StateField::CartValue => Value::Num(state.cart.value()),
        StateField::CartLines => Value::Num(state.cart.lines.len() as f64),
        StateField::CartUpdatedAt => time(state.cart.updated_at),
        StateField::SessionActive => Value::Bool(session_open),
        StateField::SessionId | StateField::SessionPageViews | StateField::SessionEvents
            if !session_open =>
        {
            match field {
                StateField::SessionId => Value::Null,
                _ => Value::Num(0.0),
            }
        }
        StateField::SessionId => state.session.id.as_deref().map_or(Value::Null, Value::Str),
        StateField::SessionStartedAt => Value::Time(state.session.started_at),
        StateField::SessionLastActivity => Value::Time(state.session.last_activity),
        StateField::SessionPageViews => Value::Num(f64::from(state.session.page_views)),
        StateField::SessionEvents => Value::Num(f64::from(state.session.events)),
        StateField::SessionDuration => {
            Value::Dur(state.session.last_activity - state.session.started_at)
        }
        StateField::FirstSeen => Value::Time(c.first_seen),
        StateField::LastSeen => Value::Time(c.last_seen),
        StateField::Events => Value::Num(c.events as f64),
        StateField::Purchases => Value::Num(f64::from(c.purchases)),
        StateField::Revenue => Value::Num(c.revenue),
        StateField::AvgOrderValue if c.purchases > 0 => {
            Value::Num(c.revenue / f64::from(c.purchases))
        }
        StateField::AvgOrderValue => Value::Null,
        StateField::FirstPurchaseAt => time(c.first_purchase_at),
        StateField::LastPurchaseAt => time(c.last_purchase_at),
    }
}

/// Compares two values; see the module doc for `Null` and mismatched kinds.
pub fn compare(op: CmpOp, l: Value, r: Value) -> bool {
    use std::cmp::Ordering;
    let ordering = match (l, r) {
        (Value::Num(a), Value::Num(b)) => a.partial_cmp(&b),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Time(a), Value::Time(b)) | (Value::Dur(a), Value::Dur(b)) => Some(a.cmp(&b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(&b)),
        (Value::Null, Value::Null) => {
            Some(Ordering::Equal).filter(|_| matches!(op, CmpOp::Eq | CmpOp::Ne))
        }
        _ => None,
    };
    match (op, ordering) {
        (CmpOp::Ne, None) => true,
        (_, None) => false,
        (CmpOp::Eq, Some(o)) => o == Ordering::Equal,
        (CmpOp::Ne, Some(o)) => o != Ordering::Equal,
        (CmpOp::Lt, Some(o)) => o == Ordering::Less,
        (CmpOp::Le, Some(o)) => o != Ordering::Greater,
        (CmpOp::Gt, Some(o)) => o == Ordering::Greater,
        (CmpOp::Ge, Some(o)) => o != Ordering::Less,
    }
}

pub(super) fn arith<'a>(op: ArithOp, l: Value<'a>, r: Value<'a>) -> Value<'a> {
    match (op, l, r) {
        (ArithOp::Add, Value::Num(a), Value::Num(b)) => Value::Num(a + b),
        (ArithOp::Sub, Value::Num(a), Value::Num(b)) => Value::Num(a - b),
        (ArithOp::Mul, Value::Num(a), Value::Num(b)) => Value::Num(a * b),
        (ArithOp::Div, Value::Num(_), Value::Num(0.0)) => Value::Null,
        (ArithOp::Div, Value::Num(a), Value::Num(b)) => Value::Num(a / b),
        (ArithOp::Sub, Value::Time(a), Value::Time(b)) => Value::Dur(a - b),
        (ArithOp::Add, Value::Time(t), Value::Dur(d))
        | (ArithOp::Add, Value::Dur(d), Value::Time(t)) => Value::Time(t.saturating_add(d)),
        (ArithOp::Sub, Value::Time(t), Value::Dur(d)) => Value::Time(t.saturating_sub(d)),
        (ArithOp::Add, Value::Dur(a), Value::Dur(b)) => Value::Dur(a.saturating_add(b)),
        (ArithOp::Sub, Value::Dur(a), Value::Dur(b)) => Value::Dur(a.saturating_sub(b)),
        (ArithOp::Mul, Value::Dur(d), Value::Num(n))
        | (ArithOp::Mul, Value::Num(n), Value::Dur(d)) => Value::Dur((d as f64 * n) as Millis),
        (ArithOp::Div, Value::Dur(_), Value::Num(0.0)) => Value::Null,
        (ArithOp::Div, Value::Dur(d), Value::Num(n)) => Value::Dur((d as f64 / n) as Millis),
        (ArithOp::Div, Value::Dur(_), Value::Dur(0)) => Value::Null,
        (ArithOp::Div, Value::Dur(a), Value::Dur(b)) => Value::Num(a as f64 / b as f64),
        _ => Value::Null,
    }
}

/// Whether an event passes an aggregate's filter (no filter passes everything).
pub fn passes(filter: Option<&Node>, event: &Event, slots: &[SlotSpec]) -> bool {
    filter.is_none_or(|f| eval(f, Scope::Event(event), slots).is_true())
}

/// Applies an event to one slot: the part of the engine that feeds rule-specific state.
/// `now` is the evaluation time (for window expiry).
pub fn feed_slot(
    spec: &SlotSpec,
    event_type: u16,
    state: &mut SlotState,
    event: &Event,
    now: Millis,
) {
    let at = event.ts;
    match &spec.kind {
        SlotKind::Numeric {
            field: None,
            window,
        } => state.add_number(at, 0.0, *window, now),
        SlotKind::Numeric {
            field: Some(field),
            window,
        } => {
            if let Value::Num(n) = event_prop(event, field) {
                state.add_number(at, n, *window, now);
            }
        }
        SlotKind::Distinct { field, window } => {
            if let Some(hash) = value_hash(event_prop(event, field)) {
                state.add_distinct(at, hash, *window, now);
            }
        }
        SlotKind::Top { field, window } => match event_prop(event, field) {
            Value::Str(s) => state.add_top(at, s, *window, now),
            Value::Num(n) => state.add_top(at, &n.to_string(), *window, now),
            Value::Bool(b) => state.add_top(at, if b { "true" } else { "false" }, *window, now),
            _ => {}
        },
        SlotKind::First => state.add_instant(at, true),
        SlotKind::Last => state.add_instant(at, false),
        SlotKind::Sequence { then, within, by } => {
            let sequence = state.sequence_mut();
            for_each_sequence_key(event, by.as_deref(), |key| {
                if event_type == spec.event_type {
                    sequence.start(key, at);
                }
                if event_type == *then {
                    sequence.finish(key, at, *within);
                }
            });
        }
    }
}

/// Calls `each` with the `by` keys of an event: its property, or for a purchase each of
/// its items' value of that field. Without `by`, one shared key.
fn for_each_sequence_key(event: &Event, by: Option<&str>, mut each: impl FnMut(u64)) {
    let Some(by) = by else { return each(0) };
    if let Some(hash) = value_hash(event_prop(event, by)) {
        return each(hash);
    }
    for item in &event.items {
        let value = match by {
            "product_id" | "sku" | "id" => Some(&*item.product_id),
            "category" => item.category.as_deref(),
            _ => None,
        };
        if let Some(value) = value {
            each(crate::event::stable_hash(value.as_bytes()));
        }
    }
}

fn value_hash(value: Value) -> Option<u64> {
    match value {
        Value::Str(s) => Some(crate::event::stable_hash(s.as_bytes())),
        Value::Num(n) => Some(crate::event::stable_hash(n.to_string().as_bytes())),
        Value::Bool(b) => Some(u64::from(b) + 1),
        _ => None,
    }
}
