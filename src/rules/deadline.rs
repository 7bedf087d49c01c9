//! When a rule's answer can next change with time alone: the deadline of a customer's
//! timer.
//!
//! Between events a customer's state is fixed, so a rule's inputs move only in two
//! ways: piecewise-constant ones step (a window's oldest bucket leaves it, a session's
//! gap passes, a `not_followed` wait runs out) and `idle(t)` grows one millisecond per
//! millisecond — every value a rule computes from it is linear in time (the compiler
//! refuses anything else), so [`next_change`] returns the earliest instant after `now` at
//! which any step happens or a comparison with an `idle` value crosses its threshold,
//! solved exactly. It may be
//! early — the timer then fires, nothing changes, and the next deadline is computed
//! from there — but it is never late, which the property tests check by evaluating the
//! rule at every instant up to the deadline.
//!
//! The next change is found in one pass with the rule's value
//! ([`value_and_next_change`]): the refinements below and the crossings need most of
//! the rule's sub-values anyway, so the engine takes the value from there instead of
//! evaluating the rule a second time.
//!
//! Two refinements keep customers from waking for nothing: an `and` with a side that is
//! false and cannot change with time is false until the next event (and an `or` with a
//! stable true side true), and a windowed `count`/`distinct` only falls with time, so
//! `count(…) >= n` that is false now stays false.

use super::compile::{AggOp, ArithOp, CmpOp, Node, SlotSpec, StateField, grows_with_time};
use super::eval::{
    Scope, Value, arith, compare, eval, idle, in_list, negate, session_open, within,
};
use crate::state::CustomerState;
use crate::state::slots::SlotState;
use crate::time::Millis;

/// What a rule is evaluated against: the customer at `now`.
#[derive(Clone, Copy)]
pub struct At<'a> {
    /// The customer.
    pub state: &'a CustomerState,
    /// Evaluation time.
    pub now: Millis,
    /// The inactivity that closes a session.
    pub session_gap: Millis,
    /// The rule set's slots.
    pub slots: &'a [SlotSpec],
}

impl<'a> At<'a> {
    fn value(&self, node: &'a Node) -> Value<'a> {
        eval(
            node,
            Scope::Customer {
                state: self.state,
                now: self.now,
                session_gap: self.session_gap,
            },
            self.slots,
        )
    }

    fn slot(&self, index: u16) -> Option<&'a SlotState> {
        self.state.slots.get(usize::from(index))
    }
}

/// The earliest instant after `at.now` at which `node`'s value may change with no new
/// event, or `None` if only an event can change it.
pub fn next_change<'a>(node: &'a Node, at: At<'a>) -> Option<Millis> {
    walk(node, at).next
}

/// `node`'s value at `at.now` (as [`eval`] gives it) and its [`next_change`], in one pass:
/// finding the next change evaluates most of the rule anyway.
pub fn value_and_next_change<'a>(node: &'a Node, at: At<'a>) -> (Value<'a>, Option<Millis>) {
    let walked = walk(node, at);
    (walked.value, walked.next)
}

/// What [`walk`] finds of a node.
struct Walked<'a> {
    /// Its value at `now`.
    value: Value<'a>,
    /// Its next change after `now`.
    next: Option<Millis>,
    /// How it moves with time until then.
    form: Form,
}

/// `node`'s value, next change and form at `at.now`, from its children's.
fn walk<'a>(node: &'a Node, at: At<'a>) -> Walked<'a> {
    let now = at.now;
    let (value, next, form) = match node {
        Node::Lit(_)
        | Node::Trait(_)
        | Node::Context(_)
        | Node::Prop(_)
        | Node::InSegment(_)
        | Node::Instant(_)
        | Node::Followed(_) => leaf(at.value(node), None),
        Node::State(field) => {
            let next = match field {
                StateField::SessionId
                | StateField::SessionPageViews
                | StateField::SessionEvents
                | StateField::SessionActive
                    if session_open(at.state, now, at.session_gap) =>
                {
                    Some(at.state.session.last_activity + at.session_gap + 1)
                }
                _ => None,
            };
            leaf(at.value(node), next)
        }
        Node::Agg {
            slot,
            window: Some(window),
            ..
        }
        | Node::Distinct {
            slot,
            window: Some(window),
        }
        | Node::Top {
            slot,
            window: Some(window),
        } => leaf(
            at.value(node),
            at.slot(*slot).and_then(|s| s.next_expiry(*window, now)),
        ),
        Node::Agg { window: None, .. }
        | Node::Distinct { window: None, .. }
        | Node::Top { window: None, .. } => leaf(at.value(node), None),
        Node::NotFollowed { slot, within } => leaf(
            at.value(node),
            at.slot(*slot)
                .and_then(|s| s.sequence())
                .and_then(|s| s.next_overdue(*within, now)),
        ),
        Node::Not(inner) => {
            let inner = walk(inner, at);
            (
                Value::Bool(!inner.value.is_true()),
                inner.next,
                Form::Missing,
            )
        }
        Node::In(inner, items) => {
            let inner = walk(inner, at);
            let found = in_list(inner.value, items);
            (Value::Bool(found), inner.next, Form::Missing)
        }
        Node::Neg(inner) => {
            let inner = walk(inner, at);
            let form = match inner.form {
                Form::Linear(s, i) => Form::Linear(-s, -i),
                Form::Missing => Form::Missing,
            };
            (negate(inner.value), inner.next, form)
        }
        Node::Idle(instant) => {
            let instant = walk(instant, at);
            let form = match instant.value {
                Value::Time(t) => Form::Linear(1.0, -(t as f64)),
                _ => Form::Missing,
            };
            (idle(instant.value, now), instant.next, form)
        }
        Node::Within(instant, length) => {
            let (instant, length) = (walk(instant, at), walk(length, at));
            let crossing = match (instant.value, length.value) {
                (Value::Time(t), Value::Dur(_)) if now < t => Some(t),
                (Value::Time(t), Value::Dur(d)) if now <= t.saturating_add(d) => {
                    Some(t.saturating_add(d).saturating_add(1))
                }
                _ => None,
            };
            let value = within(instant.value, length.value, now);
            let next = earliest([crossing, instant.next, length.next]);
            (Value::Bool(value), next, Form::Missing)
        }
        Node::And(l, r) | Node::Or(l, r) => {
            // `or` is settled by a true side, `and` by a false one.
            let settled = matches!(node, Node::Or(..));
            // A side that holds the whole answer and cannot change with time settles it;
            // the other side is then not looked at.
            let l = walk(l, at);
            if l.next.is_none() && l.value.is_true() == settled {
                return Walked {
                    value: Value::Bool(settled),
                    next: None,
                    form: Form::Missing,
                };
            }
            let r = walk(r, at);
            let value = if settled {
                l.value.is_true() || r.value.is_true()
            } else {
                l.value.is_true() && r.value.is_true()
            };
            let next = if r.next.is_none() && r.value.is_true() == settled {
                None
            } else {
                earliest([l.next, r.next])
            };
            (Value::Bool(value), next, Form::Missing)
        }
        Node::Arith(op, l, r) => {
            let (lw, rw) = (walk(l, at), walk(r, at));
            let value = arith(*op, lw.value, rw.value);
            let form = combine(*op, lw.form, rw.form);
            (value, earliest([lw.next, rw.next]), form)
        }
        Node::Cmp(op, l, r) => {
            let (lw, rw) = (walk(l, at), walk(r, at));
            let value = Value::Bool(compare(*op, lw.value, rw.value));
            (
                value,
                compare_change(*op, (l, &lw), (r, &rw), now),
                Form::Missing,
            )
        }
    };
    Walked {
        value,
        next: next.filter(|&t| t > now),
        form,
    }
}

/// A node read straight from the state: its value, its own next change, and the form
/// its value gives.
fn leaf(value: Value<'_>, next: Option<Millis>) -> (Value<'_>, Option<Millis>, Form) {
    let form = match value {
        Value::Num(n) => Form::Linear(0.0, n),
        Value::Time(t) | Value::Dur(t) => Form::Linear(0.0, t as f64),
        _ => Form::Missing,
    };
    (value, next, form)
}

/// The next change of a comparison: a step of either side, or the moment a side that
/// grows with time crosses the other.
fn compare_change(
    op: CmpOp,
    (l, lw): (&Node, &Walked<'_>),
    (r, rw): (&Node, &Walked<'_>),
    now: Millis,
) -> Option<Millis> {
    if falling_settled(op, (l, lw), (r, rw)) || falling_settled(mirror(op), (r, rw), (l, lw)) {
        return None;
    }
    // Sides that do not grow with time are constant until the next step: no crossing.
    if !grows_with_time(l) && !grows_with_time(r) {
        return earliest([lw.next, rw.next]);
    }
    let crossing = match (lw.form, rw.form) {
        (Form::Linear(ls, li), Form::Linear(rs, ri)) if ls != rs => {
            // l − r = slope × t + offset crosses zero at x; past x its sign is settled.
            let (slope, offset) = (ls - rs, li - ri);
            let x = -offset / slope;
            let holds =
                |t: Millis| compare(op, Value::Num(slope * t as f64 + offset), Value::Num(0.0));
            if x.floor() > now as f64 {
                Some(x.floor() as Millis)
            } else if x >= now as f64 && holds(now + 1) != holds(now) {
                Some(now + 1)
            } else {
                None
            }
        }
        _ => None,
    };
    earliest([crossing, lw.next, rw.next])
}

/// Whether `count <op> bound` cannot change with time: a windowed count only falls, the
/// bound is fixed, and the comparison already says what falling keeps it saying
/// (`>=`/`>` false, `<`/`<=` true).
fn falling_settled(
    op: CmpOp,
    (count, count_walked): (&Node, &Walked<'_>),
    (bound, bound_walked): (&Node, &Walked<'_>),
) -> bool {
    let falling = matches!(
        count,
        Node::Agg {
            op: AggOp::Count,
            window: Some(_),
            ..
        } | Node::Distinct {
            window: Some(_),
            ..
        }
    );
    if !falling || bound_walked.next.is_some() || grows_with_time(bound) {
        return false;
    }
    let holds = compare(op, count_walked.value, bound_walked.value);
    match op {
        CmpOp::Ge | CmpOp::Gt => !holds,
        CmpOp::Lt | CmpOp::Le => holds,
        CmpOp::Eq | CmpOp::Ne => false,
    }
}

/// The comparison read from the other side: `a < b` is `b > a`.
fn mirror(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
        other => other,
    }
}

/// How a number, instant or duration node moves with time until its next step. Every
/// value a compiled rule can hold is linear in time: the compiler refuses products of two
/// growing values and division by one ([`grows_with_time`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    /// `slope × t + intercept`.
    Linear(f64, f64),
    /// No value (a missing instant, text, a division by zero): constant until an event.
    Missing,
}

/// The [`Form`] of `l op r` from its sides'.
fn combine(op: ArithOp, l: Form, r: Form) -> Form {
    match (l, r) {
        (Form::Linear(ls, li), Form::Linear(rs, ri)) => match op {
            ArithOp::Add => Form::Linear(ls + rs, li + ri),
            ArithOp::Sub => Form::Linear(ls - rs, li - ri),
            ArithOp::Mul if ls == 0.0 => Form::Linear(rs * li, ri * li),
            ArithOp::Mul if rs == 0.0 => Form::Linear(ls * ri, li * ri),
            ArithOp::Div if rs == 0.0 && ri != 0.0 => Form::Linear(ls / ri, li / ri),
            // Products of two growing values and division by one do not compile.
            ArithOp::Mul | ArithOp::Div => Form::Missing,
        },
        _ => Form::Missing,
    }
}

fn earliest<const N: usize>(candidates: [Option<Millis>; N]) -> Option<Millis> {
    candidates.into_iter().flatten().min()
}
