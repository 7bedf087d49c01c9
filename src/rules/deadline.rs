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
//! Two refinements keep customers from waking for nothing: an `and` with a side that is
//! false and cannot change with time is false until the next event (and an `or` with a
//! stable true side true), and a windowed `count`/`distinct` only falls with time, so
//! `count(…) >= n` that is false now stays false.

use super::compile::{AggOp, ArithOp, CmpOp, Node, SlotSpec, StateField, grows_with_time};
use super::eval::{Scope, Value, compare, eval, session_open};
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
pub fn next_change(node: &Node, at: At<'_>) -> Option<Millis> {
    let now = at.now;
    let found = match node {
        Node::Lit(_)
        | Node::Trait(_)
        | Node::Context(_)
        | Node::Prop(_)
        | Node::InSegment(_)
        | Node::Instant(_)
        | Node::Followed(_) => None,
        Node::State(field) => match field {
            StateField::SessionId
            | StateField::SessionPageViews
            | StateField::SessionEvents
            | StateField::SessionActive
                if session_open(at.state, now, at.session_gap) =>
            {
                Some(at.state.session.last_activity + at.session_gap + 1)
            }
            _ => None,
        },
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
        } => at.slot(*slot).and_then(|s| s.next_expiry(*window, now)),
        Node::Agg { window: None, .. }
        | Node::Distinct { window: None, .. }
        | Node::Top { window: None, .. } => None,
        Node::NotFollowed { slot, within } => at
            .slot(*slot)
            .and_then(|s| s.sequence())
            .and_then(|s| s.next_overdue(*within, now)),
        Node::Idle(inner) | Node::Not(inner) | Node::Neg(inner) | Node::In(inner, _) => {
            next_change(inner, at)
        }
        Node::Within(instant, length) => {
            let crossing = match (at.value(instant), at.value(length)) {
                (Value::Time(t), Value::Dur(_)) if now < t => Some(t),
                (Value::Time(t), Value::Dur(d)) if now <= t.saturating_add(d) => {
                    Some(t.saturating_add(d).saturating_add(1))
                }
                _ => None,
            };
            earliest([crossing, next_change(instant, at), next_change(length, at)])
        }
        Node::And(l, r) | Node::Or(l, r) => {
            let settled = matches!(node, Node::Or(..));
            // A side that holds the whole answer and cannot change with time settles it;
            // the other side is then not looked at.
            let decides = |side: &Node, next: Option<Millis>| {
                next.is_none() && at.value(side).is_true() == settled
            };
            let ln = next_change(l, at);
            if decides(l, ln) {
                return None;
            }
            let rn = next_change(r, at);
            if decides(r, rn) {
                None
            } else {
                earliest([ln, rn])
            }
        }
        Node::Arith(_, l, r) => earliest([next_change(l, at), next_change(r, at)]),
        Node::Cmp(op, l, r) => compare_change(*op, l, r, at),
    };
    found.filter(|&t| t > now)
}

/// The next change of a comparison: a step of either side, or the moment a side that
/// grows with time crosses the other.
fn compare_change(op: CmpOp, l: &Node, r: &Node, at: At<'_>) -> Option<Millis> {
    let (ln, rn) = (next_change(l, at), next_change(r, at));
    if falling_settled(op, l, r, rn, at) || falling_settled(mirror(op), r, l, ln, at) {
        return None;
    }
    // Sides that do not grow with time are constant until the next step: no crossing,
    // and no need to evaluate them (a window's sum, a `top`) to find that out.
    if !grows_with_time(l) && !grows_with_time(r) {
        return earliest([ln, rn]);
    }
    let crossing = match (linear(l, at), linear(r, at)) {
        (Form::Linear(ls, li), Form::Linear(rs, ri)) if ls != rs => {
            // l − r = slope × t + offset crosses zero at x; past x its sign is settled.
            let (slope, offset) = (ls - rs, li - ri);
            let x = -offset / slope;
            let holds =
                |t: Millis| compare(op, Value::Num(slope * t as f64 + offset), Value::Num(0.0));
            if x.floor() > at.now as f64 {
                Some(x.floor() as Millis)
            } else if x >= at.now as f64 && holds(at.now + 1) != holds(at.now) {
                Some(at.now + 1)
            } else {
                None
            }
        }
        _ => None,
    };
    earliest([crossing, ln, rn])
}

/// Whether `count <op> bound` cannot change with time: a windowed count only falls, the
/// bound is fixed, and the comparison already says what falling keeps it saying
/// (`>=`/`>` false, `<`/`<=` true).
fn falling_settled(
    op: CmpOp,
    count: &Node,
    bound: &Node,
    bound_next: Option<Millis>,
    at: At<'_>,
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
    if !falling || bound_next.is_some() || grows_with_time(bound) {
        return false;
    }
    let holds = compare(op, at.value(count), at.value(bound));
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

/// The [`Form`] of a node around `at.now`.
fn linear(node: &Node, at: At<'_>) -> Form {
    match node {
        Node::Idle(instant) => match at.value(instant) {
            Value::Time(t) => Form::Linear(1.0, -(t as f64)),
            _ => Form::Missing,
        },
        Node::Neg(inner) => match linear(inner, at) {
            Form::Linear(s, i) => Form::Linear(-s, -i),
            other => other,
        },
        Node::Arith(op, l, r) => match (linear(l, at), linear(r, at)) {
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
        },
        _ => match at.value(node) {
            Value::Num(n) => Form::Linear(0.0, n),
            Value::Time(t) | Value::Dur(t) => Form::Linear(0.0, t as f64),
            _ => Form::Missing,
        },
    }
}

fn earliest<const N: usize>(candidates: [Option<Millis>; N]) -> Option<Millis> {
    candidates.into_iter().flatten().min()
}
