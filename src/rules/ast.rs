//! The syntax tree of one rule, as written, with the byte span of every node so that
//! type errors point at the exact text.

use crate::time::Millis;

/// A byte range in the rule text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// An expression node and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    /// What the node is.
    pub kind: ExprKind,
    /// Where it is in the rule text.
    pub span: Span,
}

/// A literal value written in the rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `42`, `59.90`.
    Num(f64),
    /// `'shoes'` or `"shoes"`.
    Str(String),
    /// `true` / `false`.
    Bool(bool),
    /// `90s`, `30m`, `7d`, as milliseconds.
    Dur(Millis),
}

/// The kinds of expression.
#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// A literal.
    Literal(Literal),
    /// `[ 'DE', 'AT' ]`: only as the right side of `in`.
    List(Vec<Literal>),
    /// A dotted name: `cart.items`, `context.country`, `product_view`, `category`.
    Path(Vec<String>),
    /// A function call: `count(product_view, 7d)`.
    Call {
        /// The function's name.
        name: String,
        /// Its arguments, in order.
        args: Vec<Arg>,
    },
    /// `not x`, `-x`.
    Unary(UnaryOp, Box<Expr>),
    /// `a op b`.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

/// A function argument.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// Any expression.
    Expr(Expr),
    /// An event source narrowed by a filter: `product_view where category == 'shoes'`.
    Filtered {
        /// The source (`type` or `type.field`).
        path: Vec<String>,
        /// Where the source is written.
        path_span: Span,
        /// The filter, evaluated against each event's properties.
        filter: Expr,
    },
    /// `by = product_id`.
    Named {
        /// The argument's name (`by`).
        name: String,
        /// Its value, a dotted name.
        value: Vec<String>,
        /// Where the whole argument is written.
        span: Span,
    },
}

impl Arg {
    /// Where the argument is written.
    pub fn span(&self) -> Span {
        match self {
            Arg::Expr(expr) => expr.span,
            Arg::Filtered {
                path_span, filter, ..
            } => Span {
                start: path_span.start,
                end: filter.span.end,
            },
            Arg::Named { span, .. } => *span,
        }
    }
}

/// Prefix operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// Logical negation.
    Not,
    /// Arithmetic negation.
    Neg,
}

/// Infix operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// Logical or.
    Or,
    /// Logical and.
    And,
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// Membership in a literal list.
    In,
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
}

impl BinaryOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "or",
            BinaryOp::And => "and",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::In => "in",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
        }
    }
}
