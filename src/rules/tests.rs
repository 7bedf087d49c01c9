//! Tests of the rule language as a whole: load-time errors and property tests of
//! precedence and evaluation against a Rust oracle.

use proptest::prelude::*;

use super::eval::{Scope, eval};
use super::*;
use crate::state::CustomerState;

fn one_error(defs: &[SegmentDef]) -> RuleError {
    let errors = RuleSet::compile(defs).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn every_spec_example_compiles() {
    let defs = [
        SegmentDef {
            id: "high_value".into(),
            enter: "sum(purchase.revenue, 90d) >= 500".into(),
            exit: Some("sum(purchase.revenue, 90d) < 400".into()),
            ..SegmentDef::default()
        },
        SegmentDef::new(
            "cart_abandoner",
            "cart.items > 0 and idle(cart.updated_at) >= 30m",
        ),
        SegmentDef::new(
            "exit_intent_with_cart",
            "within(last(exit_intent), 2m) and cart.value > 0",
        ),
        SegmentDef::new(
            "browsers_not_buyers",
            "count(product_view, 7d) >= 20 and count(purchase, 30d) == 0",
        ),
        SegmentDef::new(
            "lapsed_buyer",
            "count(purchase) >= 1 and idle(last(purchase)) > 60d",
        ),
        SegmentDef::new(
            "vip_mobile_de",
            "in_segment(high_value) and context.device == 'mobile' and context.country == 'DE'",
        ),
        SegmentDef::new(
            "abandoned_product",
            "not_followed(add_to_cart, purchase, 1h, by = product_id)",
        ),
        SegmentDef::new("runner", "top(product_view.category, 30d) == 'running'"),
        SegmentDef::new(
            "shoe_fan",
            "count(product_view where category == 'shoes', 7d) >= 3",
        ),
        SegmentDef::new(
            "big_spender",
            "avg(purchase.revenue) > 100 or max(purchase.revenue, 30d) > 300",
        ),
        SegmentDef::new("explorer", "distinct(product_view.category, 30d) >= 4"),
        SegmentDef::new(
            "engaged",
            "session.page_views >= 5 and customer.events > 10",
        ),
        SegmentDef::new(
            "b2b",
            "traits.company_size in ['50-200', '200+'] or traits.industry == 'retail'",
        ),
        SegmentDef::new(
            "loyal",
            "followed(add_to_cart, purchase, 1h) and first(purchase) < customer.last_seen - 30d",
        ),
    ];
    let rules = RuleSet::compile(&defs).unwrap();
    assert_eq!(rules.segments.len(), defs.len());
    assert!(rules.version.starts_with("sha256:"));
    // `vip_mobile_de` reads `high_value`, so it is evaluated after it on a purchase.
    let purchase = rules.types.id_of("purchase");
    let plan = &rules.eval_plan[usize::from(purchase)];
    let pos = |id: &str| {
        plan.iter()
            .position(|&s| s == rules.segment_index(id).unwrap())
    };
    assert!(pos("high_value").unwrap() < pos("vip_mobile_de").unwrap());
    // Equal aggregates share a slot.
    let again = RuleSet::compile(&[
        SegmentDef::new("a", "count(purchase, 30d) > 1"),
        SegmentDef::new("b", "count(purchase, 30d) > 2"),
    ])
    .unwrap();
    assert_eq!(again.slots.len(), 1);
}

#[test]
fn an_event_only_re_evaluates_the_segments_it_can_change() {
    let rules = RuleSet::compile(&[
        SegmentDef::new("buyer", "count(purchase) >= 1"),
        SegmentDef::new("carted", "cart.items > 0"),
        SegmentDef::new("identified", "traits.email != 'x'"),
    ])
    .unwrap();
    let plan_of = |t: &str| -> Vec<&str> {
        rules.eval_plan[usize::from(rules.types.id_of(t))]
            .iter()
            .map(|&s| &*rules.segments[usize::from(s)].id)
            .collect()
    };
    assert_eq!(plan_of("purchase"), ["buyer", "carted"]);
    assert_eq!(plan_of("page_view"), Vec::<&str>::new());
    assert_eq!(plan_of("identify"), ["identified"]);
    assert_eq!(plan_of("some_custom_event"), Vec::<&str>::new());
}

#[test]
fn time_arithmetic_that_cannot_be_timed_is_refused_and_linear_arithmetic_is_not() {
    for text in [
        "idle(last(purchase)) / 1d * idle(last(page_view)) > 1h",
        "1h / idle(last(purchase)) > 2",
    ] {
        let err = one_error(&[SegmentDef::new("s", text)]);
        assert!(
            err.message.contains("cannot multiply two `idle` values"),
            "{text}: {err}"
        );
    }
    RuleSet::compile(&[SegmentDef::new(
        "s",
        "idle(last(purchase)) * 2 - idle(last(page_view)) / 3 > 1h",
    )])
    .expect("sums and scalings of idle values are timed exactly");
}

#[test]
fn an_unknown_name_is_an_error_with_line_and_column() {
    let err = one_error(&[SegmentDef::new("s", "cart.items > 0 and cart.itemz > 1")]);
    assert_eq!(
        (err.segment.as_str(), err.part, err.line, err.column),
        ("s", RulePart::Enter, 1, 20)
    );
    assert!(
        err.message.contains("unknown name `cart.itemz`"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("cart.items"),
        "the message lists what exists: {}",
        err.message
    );
    let shown = err.to_string();
    assert!(
        shown.contains("                       ^"),
        "caret under the name:\n{shown}"
    );
}

#[test]
fn errors_are_placed_in_file_coordinates_when_the_origin_is_known() {
    let def = SegmentDef {
        id: "s".into(),
        enter: RuleText {
            text: "count(purchase) > 'x'".into(),
            origin: Some((12, 9)),
        },
        ..SegmentDef::default()
    };
    let err = one_error(&[def]);
    assert_eq!((err.line, err.column), (12, 9));
    assert!(
        err.message.contains("cannot compare a number with text"),
        "{}",
        err.message
    );
}

#[test]
fn misuse_of_each_construct_is_rejected_precisely() {
    let cases = [
        ("frobnicate(purchase) > 1", "unknown function `frobnicate`"),
        ("count(purchase, 7) > 1", "positive duration"),
        ("sum(purchase, 7d) > 1", "needs a field"),
        ("count(purchase.revenue) > 1", "takes an event type"),
        ("idle(cart.items) > 1m", "idle() needs a time"),
        ("within(last(exit_intent), 5) ", "needs a duration"),
        ("cart.items", "must be true or false"),
        ("cart.items > 0 and 5", "`and` needs true or false"),
        ("in_segment(nowhere)", "unknown segment `nowhere`"),
        (
            "not_followed(add_to_cart, purchase, 1h, per = product_id)",
            "`by = field`",
        ),
        ("purchase > 1", "count(purchase)"),
        (
            "count(product_view where last(x) > 1) > 1",
            "cannot call functions",
        ),
        (
            "idle(last(purchase)) > 5",
            "cannot compare a duration with a number",
        ),
        ("cart.value in [1, 'a']", "holds text"),
        ("count(cart) > 1", "is state, not an event type"),
        ("cart.items >", "expected"),
    ];
    for (rule, expected) in cases {
        let errors = RuleSet::compile(&[SegmentDef::new("s", rule)])
            .unwrap_err()
            .0;
        assert!(
            errors[0].message.contains(expected),
            "{rule}: {}",
            errors[0].message
        );
    }
}

#[test]
fn a_cycle_between_segments_is_rejected_naming_them() {
    let err = one_error(&[
        SegmentDef::new("a", "in_segment(b)"),
        SegmentDef::new("b", "in_segment(c) or cart.items > 0"),
        SegmentDef::new("c", "in_segment(a)"),
    ]);
    assert!(err.message.contains("a → b → c → a"), "{}", err.message);
    let err = one_error(&[SegmentDef::new("self_ref", "in_segment(self_ref)")]);
    assert!(err.message.contains("cycle"), "{}", err.message);
}

#[test]
fn bad_and_duplicate_ids_are_rejected_and_all_errors_are_reported() {
    let errors = RuleSet::compile(&[
        SegmentDef::new("Bad Id", "cart.items > 0"),
        SegmentDef::new("twice", "cart.items > 0"),
        SegmentDef::new("twice", "cart.items > 1"),
        SegmentDef::new("broken", "cart.nope > 0"),
    ])
    .unwrap_err()
    .0;
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].message.contains("lower-case"));
    assert!(errors[1].message.contains("defined twice"));
    assert!(errors[2].message.contains("cart.nope"));
}

/// A boolean expression over integer arithmetic, for the oracle.
#[derive(Clone, Debug)]
enum B {
    Lit(bool),
    Cmp(u8, N, N),
    And(Box<B>, Box<B>),
    Or(Box<B>, Box<B>),
    Not(Box<B>),
}

#[derive(Clone, Debug)]
enum N {
    Lit(u8),
    Add(Box<N>, Box<N>),
    Sub(Box<N>, Box<N>),
    Mul(Box<N>, Box<N>),
}

const CMP: [&str; 6] = ["==", "!=", "<", "<=", ">", ">="];

fn num() -> impl Strategy<Value = N> {
    any::<u8>()
        .prop_map(N::Lit)
        .prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| N::Add(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| N::Sub(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| N::Mul(Box::new(a), Box::new(b))),
            ]
        })
}

fn boolean() -> impl Strategy<Value = B> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(B::Lit),
        (0u8..6, num(), num()).prop_map(|(op, a, b)| B::Cmp(op, a, b))
    ];
    leaf.prop_recursive(4, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| B::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| B::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|a| B::Not(Box::new(a))),
        ]
    })
}

fn n_value(n: &N) -> f64 {
    match n {
        N::Lit(v) => f64::from(*v),
        N::Add(a, b) => n_value(a) + n_value(b),
        N::Sub(a, b) => n_value(a) - n_value(b),
        N::Mul(a, b) => n_value(a) * n_value(b),
    }
}

fn b_value(b: &B) -> bool {
    match b {
        B::Lit(v) => *v,
        B::Cmp(op, x, y) => {
            let (x, y) = (n_value(x), n_value(y));
            [x == y, x != y, x < y, x <= y, x > y, x >= y][usize::from(*op)]
        }
        B::And(x, y) => b_value(x) && b_value(y),
        B::Or(x, y) => b_value(x) || b_value(y),
        B::Not(x) => !b_value(x),
    }
}

/// Renders with the fewest parentheses the documented precedence allows. Precedence
/// levels: or 1, and 2, not 3, comparison 4, + - 5, * 6, literal 7.
fn render_n(n: &N, parent: u8, right: bool) -> String {
    let (text, level) = match n {
        N::Lit(v) => (v.to_string(), 7),
        N::Add(a, b) => (
            format!("{} + {}", render_n(a, 5, false), render_n(b, 5, true)),
            5,
        ),
        N::Sub(a, b) => (
            format!("{} - {}", render_n(a, 5, false), render_n(b, 5, true)),
            5,
        ),
        N::Mul(a, b) => (
            format!("{} * {}", render_n(a, 6, false), render_n(b, 6, true)),
            6,
        ),
    };
    if level < parent || (right && level == parent) {
        format!("({text})")
    } else {
        text
    }
}

fn render_b(b: &B, parent: u8, right: bool) -> String {
    let (text, level) = match b {
        B::Lit(v) => (v.to_string(), 7),
        B::Cmp(op, x, y) => (
            format!(
                "{} {} {}",
                render_n(x, 5, false),
                CMP[usize::from(*op)],
                render_n(y, 5, true)
            ),
            4,
        ),
        B::And(x, y) => (
            format!("{} and {}", render_b(x, 2, false), render_b(y, 2, true)),
            2,
        ),
        B::Or(x, y) => (
            format!("{} or {}", render_b(x, 1, false), render_b(y, 1, true)),
            1,
        ),
        B::Not(x) => (format!("not {}", render_b(x, 3, false)), 3),
    };
    if level < parent || (right && level == parent) {
        format!("({text})")
    } else {
        text
    }
}

fn evaluate(text: &str) -> bool {
    let rules =
        RuleSet::compile(&[SegmentDef::new("s", text)]).unwrap_or_else(|e| panic!("{text}: {e}"));
    let state = CustomerState::default();
    eval(
        &rules.segments[0].enter.node,
        Scope::Customer {
            state: &state,
            now: 0,
            session_gap: 0,
        },
        &rules.slots,
    )
    .is_true()
}

proptest! {
    /// Any expression, written with the fewest parentheses, parses with the documented
    /// precedence and evaluates as Rust evaluates it.
    #[test]
    fn precedence_and_evaluation_match_the_oracle(b in boolean()) {
        let text = render_b(&b, 0, false);
        prop_assert_eq!(evaluate(&text), b_value(&b), "{}", text);
    }

    /// Arbitrary text never panics the loader: it compiles or returns located errors.
    #[test]
    fn arbitrary_text_never_panics(text in "[a-z_().,'<>=! 0-9\\[\\]]{0,40}") {
        if let Err(errors) = RuleSet::compile(&[SegmentDef::new("s", &text)]) {
            for err in errors.0 {
                prop_assert!(err.line >= 1 && err.column >= 1);
                prop_assert!(err.offset <= text.len());
            }
        }
    }
}
