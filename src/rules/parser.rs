//! Rule text → [`Expr`] syntax tree, with the pest grammar in `grammar.pest` and pest's
//! Pratt parser for operator precedence.

use std::sync::LazyLock;

use pest::Parser as _;
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};

use super::ast::{Arg, BinaryOp, Expr, ExprKind, Literal, Span, UnaryOp};
use crate::time::{DAY, HOUR, MINUTE, Millis, SECOND};

/// The generated parser lives in a private module: its `Rule` enum is an implementation
/// detail, not part of the crate's interface.
mod grammar {
    #[derive(pest_derive::Parser)]
    #[grammar = "rules/grammar.pest"]
    pub struct RuleGrammar;
}

use grammar::{Rule, RuleGrammar};

/// A syntax error: where (byte offset into the rule text) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Byte offset of the error in the rule text.
    pub offset: usize,
    /// What was expected or wrong.
    pub message: String,
}

/// Operator precedence, loosest first (each `.op` binds tighter than the one before).
static PRATT: LazyLock<PrattParser<Rule>> = LazyLock::new(|| {
    PrattParser::new()
        .op(Op::infix(Rule::or, Assoc::Left))
        .op(Op::infix(Rule::and, Assoc::Left))
        .op(Op::prefix(Rule::not))
        .op(Op::infix(Rule::eq, Assoc::Left)
            | Op::infix(Rule::ne, Assoc::Left)
            | Op::infix(Rule::lt, Assoc::Left)
            | Op::infix(Rule::le, Assoc::Left)
            | Op::infix(Rule::gt, Assoc::Left)
            | Op::infix(Rule::ge, Assoc::Left)
            | Op::infix(Rule::in_op, Assoc::Left))
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left))
        .op(Op::prefix(Rule::neg))
});

/// Parses one rule's text.
pub fn parse_rule(text: &str) -> Result<Expr, SyntaxError> {
    let mut pairs = RuleGrammar::parse(Rule::rule, text).map_err(syntax_error)?;
    let rule = pairs
        .next()
        .expect("the `rule` production always yields one pair");
    let expr = rule
        .into_inner()
        .next()
        .expect("a rule holds one expression");
    build_expr(expr)
}

fn syntax_error(err: pest::error::Error<Rule>) -> SyntaxError {
    let offset = match err.location {
        pest::error::InputLocation::Pos(pos) => pos,
        pest::error::InputLocation::Span((start, _)) => start,
    };
    let message = match &err.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut wanted: Vec<&str> = positives.iter().map(|r| describe(*r)).collect();
            wanted.sort_unstable();
            wanted.dedup();
            match wanted.as_slice() {
                [] => "unexpected text".to_owned(),
                [one] => format!("expected {one}"),
                [init @ .., last] => format!("expected {} or {last}", init.join(", ")),
            }
        }
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    SyntaxError { offset, message }
}

/// A grammar rule as a person would name it.
fn describe(grammar_rule: Rule) -> &'static str {
    match grammar_rule {
        Rule::EOI => "the end of the rule",
        Rule::expr | Rule::prefix | Rule::primary => "an expression",
        Rule::infix
        | Rule::or
        | Rule::and
        | Rule::eq
        | Rule::ne
        | Rule::le
        | Rule::ge
        | Rule::lt
        | Rule::gt
        | Rule::in_op
        | Rule::add
        | Rule::sub
        | Rule::mul
        | Rule::div => "an operator",
        Rule::not | Rule::neg => "an expression",
        Rule::call | Rule::ident | Rule::path | Rule::keyword => "a name",
        Rule::arg | Rule::named_arg | Rule::filtered => "an argument",
        Rule::where_kw => "`where`",
        Rule::list => "a list",
        Rule::literal | Rule::number | Rule::duration | Rule::boolean => "a value",
        Rule::string | Rule::single_inner | Rule::double_inner => "a closing quote",
        Rule::rule | Rule::WHITESPACE | Rule::COMMENT | Rule::ident_char => "an expression",
    }
}

fn span_of(pair: &Pair<Rule>) -> Span {
    Span {
        start: pair.as_span().start(),
        end: pair.as_span().end(),
    }
}

fn build_expr(pair: Pair<Rule>) -> Result<Expr, SyntaxError> {
    PRATT
        .map_primary(build_primary)
        .map_prefix(|op, operand| {
            let operand = operand?;
            let unary = if op.as_rule() == Rule::not {
                UnaryOp::Not
            } else {
                UnaryOp::Neg
            };
            let span = Span {
                start: op.as_span().start(),
                end: operand.span.end,
            };
            Ok(Expr {
                kind: ExprKind::Unary(unary, Box::new(operand)),
                span,
            })
        })
        .map_infix(|lhs, op, rhs| {
            let (lhs, rhs) = (lhs?, rhs?);
            let binary = match op.as_rule() {
                Rule::or => BinaryOp::Or,
                Rule::and => BinaryOp::And,
                Rule::eq => BinaryOp::Eq,
                Rule::ne => BinaryOp::Ne,
                Rule::lt => BinaryOp::Lt,
                Rule::le => BinaryOp::Le,
                Rule::gt => BinaryOp::Gt,
                Rule::ge => BinaryOp::Ge,
                Rule::in_op => BinaryOp::In,
                Rule::add => BinaryOp::Add,
                Rule::sub => BinaryOp::Sub,
                Rule::mul => BinaryOp::Mul,
                Rule::div => BinaryOp::Div,
                other => unreachable!("the grammar has no infix {other:?}"),
            };
            let span = Span {
                start: lhs.span.start,
                end: rhs.span.end,
            };
            Ok(Expr {
                kind: ExprKind::Binary(binary, Box::new(lhs), Box::new(rhs)),
                span,
            })
        })
        .parse(pair.into_inner())
}

fn build_primary(pair: Pair<Rule>) -> Result<Expr, SyntaxError> {
    let span = span_of(&pair);
    let kind = match pair.as_rule() {
        Rule::expr => return build_expr(pair),
        Rule::path => ExprKind::Path(split_path(pair.as_str())),
        Rule::list => ExprKind::List(
            pair.into_inner()
                .map(build_literal)
                .collect::<Result<_, _>>()?,
        ),
        Rule::call => {
            let mut inner = pair.into_inner();
            let name = inner
                .next()
                .expect("a call starts with its name")
                .as_str()
                .to_owned();
            let args = inner.map(build_arg).collect::<Result<_, _>>()?;
            ExprKind::Call { name, args }
        }
        _ => ExprKind::Literal(build_literal(pair)?),
    };
    Ok(Expr { kind, span })
}

fn build_arg(pair: Pair<Rule>) -> Result<Arg, SyntaxError> {
    let span = span_of(&pair);
    match pair.as_rule() {
        Rule::named_arg => {
            let mut inner = pair.into_inner();
            let name = inner.next().expect("name").as_str().to_owned();
            let value = split_path(inner.next().expect("value").as_str());
            Ok(Arg::Named { name, value, span })
        }
        Rule::filtered => {
            let mut inner = pair.into_inner();
            let path = inner.next().expect("source");
            let path_span = span_of(&path);
            inner.next().expect("the `where` keyword");
            let filter = build_expr(inner.next().expect("filter"))?;
            Ok(Arg::Filtered {
                path: split_path(path.as_str()),
                path_span,
                filter,
            })
        }
        _ => Ok(Arg::Expr(build_expr(pair)?)),
    }
}

fn build_literal(pair: Pair<Rule>) -> Result<Literal, SyntaxError> {
    let text = pair.as_str();
    let offset = pair.as_span().start();
    Ok(match pair.as_rule() {
        Rule::number => Literal::Num(text.parse().map_err(|_| SyntaxError {
            offset,
            message: format!("`{text}` is not a number"),
        })?),
        Rule::boolean => Literal::Bool(text == "true"),
        Rule::string => Literal::Str(
            pair.into_inner()
                .next()
                .map(|inner| inner.as_str().to_owned())
                .unwrap_or_default(),
        ),
        Rule::duration => Literal::Dur(parse_duration(text).ok_or_else(|| SyntaxError {
            offset,
            message: format!("`{text}` is too long a duration"),
        })?),
        other => unreachable!("the grammar has no literal {other:?}"),
    })
}

/// `90s`, `30m`, `12h`, `7d`, `2w`, `250ms` → milliseconds; `None` on overflow.
fn parse_duration(text: &str) -> Option<Millis> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let amount: Millis = text[..digits_end].parse().ok()?;
    let unit = match &text[digits_end..] {
        "ms" => 1,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        "w" => 7 * DAY,
        _ => return None,
    };
    amount.checked_mul(unit)
}

fn split_path(text: &str) -> Vec<String> {
    text.split('.').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(expr: &Expr) -> String {
        match &expr.kind {
            ExprKind::Literal(Literal::Num(n)) => n.to_string(),
            ExprKind::Literal(Literal::Str(s)) => format!("'{s}'"),
            ExprKind::Literal(Literal::Bool(b)) => b.to_string(),
            ExprKind::Literal(Literal::Dur(d)) => format!("{d}ms"),
            ExprKind::List(items) => format!("[{}]", items.len()),
            ExprKind::Path(parts) => parts.join("."),
            ExprKind::Call { name, args } => {
                let args: Vec<String> = args
                    .iter()
                    .map(|arg| match arg {
                        Arg::Expr(e) => shape(e),
                        Arg::Filtered { path, filter, .. } => {
                            format!("{} where {}", path.join("."), shape(filter))
                        }
                        Arg::Named { name, value, .. } => format!("{name}={}", value.join(".")),
                    })
                    .collect();
                format!("{name}({})", args.join(", "))
            }
            ExprKind::Unary(UnaryOp::Not, e) => format!("(not {})", shape(e)),
            ExprKind::Unary(UnaryOp::Neg, e) => format!("(-{})", shape(e)),
            ExprKind::Binary(op, l, r) => format!("({} {} {})", shape(l), op.symbol(), shape(r)),
        }
    }

    fn parsed(text: &str) -> String {
        shape(&parse_rule(text).unwrap())
    }

    #[test]
    fn precedence_is_or_and_not_comparison_sum_product() {
        assert_eq!(parsed("a or b and c"), "(a or (b and c))");
        assert_eq!(parsed("not a == 1 and b"), "((not (a == 1)) and b)");
        assert_eq!(
            parsed("1 + 2 * 3 >= 4 - -5"),
            "((1 + (2 * 3)) >= (4 - (-5)))"
        );
        assert_eq!(parsed("(a or b) and c"), "((a or b) and c)");
    }

    #[test]
    fn every_spec_example_parses() {
        assert_eq!(
            parsed("sum(purchase.revenue, 90d) >= 500"),
            "(sum(purchase.revenue, 7776000000ms) >= 500)"
        );
        assert_eq!(
            parsed("count(product_view where category == 'shoes', 7d) > 2"),
            "(count(product_view where (category == 'shoes'), 604800000ms) > 2)"
        );
        assert_eq!(
            parsed("not_followed(add_to_cart, purchase, 1h, by = product_id)"),
            "not_followed(add_to_cart, purchase, 3600000ms, by=product_id)"
        );
        assert_eq!(
            parsed("context.country in ['DE', \"AT\"]"),
            "(context.country in [2])"
        );
        assert_eq!(
            parsed("within(last(exit_intent), 2m)"),
            "within(last(exit_intent), 120000ms)"
        );
        assert_eq!(
            parsed("idle(cart.updated_at) >= 30m # comment"),
            "(idle(cart.updated_at) >= 1800000ms)"
        );
    }

    #[test]
    fn keywords_are_not_names_but_may_start_names() {
        assert_eq!(
            parsed("order_count > 1 and android"),
            "((order_count > 1) and android)"
        );
        assert_eq!(parsed("notes == 'x'"), "(notes == 'x')");
    }

    #[test]
    fn syntax_errors_point_at_the_offending_byte() {
        let err = parse_rule("count(purchase) >= ").unwrap_err();
        assert_eq!(err.offset, 19);
        assert!(err.message.contains("expected"), "{}", err.message);
        let err = parse_rule("cart.items > 0 and and").unwrap_err();
        assert_eq!(err.offset, 19);
        let err = parse_rule("x == 'unclosed").unwrap_err();
        assert_eq!(err.offset, 5);
        assert!(parse_rule("").is_err());
        assert!(parse_rule("30min > 1").is_err());
    }

    #[test]
    fn spans_cover_the_written_text() {
        let text = "count(purchase) >= 1";
        let expr = parse_rule(text).unwrap();
        let ExprKind::Binary(_, lhs, _) = &expr.kind else {
            panic!("not binary")
        };
        assert_eq!(&text[lhs.span.start..lhs.span.end], "count(purchase)");
    }
}
