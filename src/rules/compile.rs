//! Type-checking and compiling a rule's syntax tree into an evaluable [`Node`] tree, the
//! [`SlotSpec`]s it needs, and its dependencies ([`Deps`]).
//!
//! Every name is resolved here, at load: an unknown name, a function called wrongly or a
//! type mismatch is a [`CompileError`] pointing at the text, never a silent `false` at run
//! time.

use std::collections::{BTreeSet, HashMap};

use super::ast::{Arg, BinaryOp, Expr, ExprKind, Literal, Span, UnaryOp};
use crate::time::Millis;

/// The static type of an expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// `true` / `false`.
    Bool,
    /// A number.
    Num,
    /// Text.
    Str,
    /// An instant (`last(purchase)`, `cart.updated_at`).
    Time,
    /// A length of time (`30m`, `idle(…)`).
    Dur,
    /// Known only at run time: traits, context, event properties, `top`.
    Any,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Bool => "a boolean",
            Type::Num => "a number",
            Type::Str => "text",
            Type::Time => "a time",
            Type::Dur => "a duration",
            Type::Any => "a value",
        }
    }
}

/// A literal in compiled form.
#[derive(Clone, Debug, PartialEq)]
pub enum Lit {
    /// A number.
    Num(f64),
    /// Text.
    Str(Box<str>),
    /// A boolean.
    Bool(bool),
    /// A duration.
    Dur(Millis),
}

/// A built-in state value a rule can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateField {
    /// `cart.items`: units in the cart.
    CartItems,
    /// `cart.value`: price × quantity summed.
    CartValue,
    /// `cart.lines`: distinct products in the cart.
    CartLines,
    /// `cart.updated_at`: when the cart last changed.
    CartUpdatedAt,
    /// `session.id`.
    SessionId,
    /// `session.started_at` (also `session.start`).
    SessionStartedAt,
    /// `session.last_activity`.
    SessionLastActivity,
    /// `session.page_views`.
    SessionPageViews,
    /// `session.events`.
    SessionEvents,
    /// `session.duration`: last activity − start.
    SessionDuration,
    /// `session.active`: the session is open (its inactivity gap has not passed).
    SessionActive,
    /// `customer.first_seen`.
    FirstSeen,
    /// `customer.last_seen`.
    LastSeen,
    /// `customer.events`.
    Events,
    /// `customer.purchases`.
    Purchases,
    /// `customer.revenue`.
    Revenue,
    /// `customer.avg_order_value`.
    AvgOrderValue,
    /// `customer.first_purchase_at`.
    FirstPurchaseAt,
    /// `customer.last_purchase_at`.
    LastPurchaseAt,
}

/// Every readable `group.field`, its meaning and type: the single table that name
/// resolution, `segmentd check` and the README agree on.
pub const STATE_FIELDS: &[(&str, StateField, Type)] = &[
    ("cart.items", StateField::CartItems, Type::Num),
    ("cart.value", StateField::CartValue, Type::Num),
    ("cart.lines", StateField::CartLines, Type::Num),
    ("cart.updated_at", StateField::CartUpdatedAt, Type::Time),
    ("session.id", StateField::SessionId, Type::Str),
    (
        "session.started_at",
        StateField::SessionStartedAt,
        Type::Time,
    ),
    ("session.start", StateField::SessionStartedAt, Type::Time),
    (
        "session.last_activity",
        StateField::SessionLastActivity,
        Type::Time,
    ),
    (
        "session.page_views",
        StateField::SessionPageViews,
        Type::Num,
    ),
    ("session.events", StateField::SessionEvents, Type::Num),
    ("session.duration", StateField::SessionDuration, Type::Dur),
    ("session.active", StateField::SessionActive, Type::Bool),
    ("customer.first_seen", StateField::FirstSeen, Type::Time),
    ("customer.last_seen", StateField::LastSeen, Type::Time),
    ("customer.events", StateField::Events, Type::Num),
    ("customer.purchases", StateField::Purchases, Type::Num),
    ("customer.revenue", StateField::Revenue, Type::Num),
    (
        "customer.avg_order_value",
        StateField::AvgOrderValue,
        Type::Num,
    ),
    (
        "customer.first_purchase_at",
        StateField::FirstPurchaseAt,
        Type::Time,
    ),
    (
        "customer.last_purchase_at",
        StateField::LastPurchaseAt,
        Type::Time,
    ),
];

/// Event types with built-in meaning. They always have type ids, whether rules name them
/// or not, because built-in state depends on them.
pub const BUILTIN_TYPES: &[&str] = &[
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "checkout_started",
    "purchase",
    "refund",
    "exit_intent",
    "identify",
];

/// Which numeric aggregate a node reads from a numeric slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggOp {
    /// Number of events.
    Count,
    /// Sum of the field.
    Sum,
    /// Mean of the field.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
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
}

/// Arithmetic operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
}

/// A compiled expression, evaluated by [`super::eval`].
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// A literal.
    Lit(Lit),
    /// A built-in state value.
    State(StateField),
    /// `traits.KEY`.
    Trait(Box<str>),
    /// `context.KEY`.
    Context(Box<str>),
    /// An event property, inside an aggregate's `where` filter.
    Prop(Box<str>),
    /// `count/sum/avg/min/max` from a numeric slot.
    Agg {
        /// The slot.
        slot: u16,
        /// Which aggregate.
        op: AggOp,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// `distinct(…)`.
    Distinct {
        /// The slot.
        slot: u16,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// `top(…)`.
    Top {
        /// The slot.
        slot: u16,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// `first(…)` / `last(…)`.
    Instant(u16),
    /// `followed(…)`.
    Followed(u16),
    /// `not_followed(…)`.
    NotFollowed {
        /// The slot.
        slot: u16,
        /// The deadline after an `a`.
        within: Millis,
    },
    /// `in_segment(id)`, by segment index.
    InSegment(u16),
    /// `idle(t)` = now − t.
    Idle(Box<Node>),
    /// `within(t, d)` = t is no more than d before now.
    Within(Box<Node>, Box<Node>),
    /// Logical not.
    Not(Box<Node>),
    /// Arithmetic negation.
    Neg(Box<Node>),
    /// Logical and, short-circuit.
    And(Box<Node>, Box<Node>),
    /// Logical or, short-circuit.
    Or(Box<Node>, Box<Node>),
    /// A comparison.
    Cmp(CmpOp, Box<Node>, Box<Node>),
    /// Arithmetic.
    Arith(ArithOp, Box<Node>, Box<Node>),
    /// Membership in a literal list.
    In(Box<Node>, Box<[Lit]>),
}

/// What a slot accumulates, beyond its event source.
#[derive(Clone, Debug, PartialEq)]
pub enum SlotKind {
    /// Count, sum, min and max of `field` (or just the count when `field` is `None`).
    Numeric {
        /// The property summed, if any.
        field: Option<Box<str>>,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// Distinct values of `field`.
    Distinct {
        /// The property.
        field: Box<str>,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// The most frequent value of `field`.
    Top {
        /// The property.
        field: Box<str>,
        /// The window, `None` for lifetime.
        window: Option<Millis>,
    },
    /// Time of the first matching event.
    First,
    /// Time of the last matching event.
    Last,
    /// A `source` event waiting for a `then` event.
    Sequence {
        /// The type id of the event that resolves the wait.
        then: u16,
        /// The deadline.
        within: Millis,
        /// The property both events must share (a purchase matches on any of its items).
        by: Option<Box<str>>,
    },
}

/// One slot: rule-specific state each customer keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotSpec {
    /// The type id of the events that feed it.
    pub event_type: u16,
    /// Only events passing this filter feed it.
    pub filter: Option<Node>,
    /// What it accumulates.
    pub kind: SlotKind,
    /// A readable description, also the key that lets equal aggregates share a slot.
    pub describe: String,
}

/// What a rule reads, so the engine evaluates it only when an input can have changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deps {
    /// Every event can change the answer (session, context, first/last seen).
    pub any_event: bool,
    /// The answer can change with time alone (`idle`, `within`, windows, `not_followed`):
    /// the customer's timer re-evaluates it then, not every event.
    pub time: bool,
    /// The event types whose arrival can change the answer.
    pub types: BTreeSet<u16>,
    /// The segments read through `in_segment`.
    pub segments: BTreeSet<u16>,
}

impl Deps {
    /// Adds another rule's dependencies.
    pub fn merge(&mut self, other: &Deps) {
        self.any_event |= other.any_event;
        self.time |= other.time;
        self.types.extend(&other.types);
        self.segments.extend(&other.segments);
    }
}

/// A rule error before it is placed in the config file: a span in the rule text and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    /// Where in the rule text.
    pub span: Span,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

fn error<T>(span: Span, message: impl Into<String>) -> Result<T, CompileError> {
    Err(CompileError {
        span,
        message: message.into(),
    })
}

/// Event type names ↔ small integer ids. Ids index the per-type plans, so the hot path
/// never compares type strings more than once per event.
#[derive(Clone, Debug, Default)]
pub struct TypeRegistry {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u16, foldhash::fast::RandomState>,
}

impl TypeRegistry {
    /// A registry holding the built-in types.
    pub fn with_builtins() -> Self {
        let mut registry = TypeRegistry::default();
        for name in BUILTIN_TYPES {
            registry.intern(name);
        }
        registry
    }

    /// The id of `name`, registering it if new.
    pub fn intern(&mut self, name: &str) -> u16 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u16;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// The id of an event's type: a registered id, or [`TypeRegistry::other`].
    pub fn id_of(&self, name: &str) -> u16 {
        self.ids.get(name).copied().unwrap_or_else(|| self.other())
    }

    /// The id shared by every type no rule names.
    pub fn other(&self) -> u16 {
        self.names.len() as u16
    }

    /// How many ids exist, counting [`TypeRegistry::other`]: the length of per-type plans.
    pub fn id_count(&self) -> usize {
        self.names.len() + 1
    }

    /// The name of a registered id.
    pub fn name(&self, id: u16) -> &str {
        self.names.get(usize::from(id)).map_or("(other)", |n| n)
    }
}

/// A compiled fact: a sub-expression worth showing when the rule changes, with its text.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    /// The sub-expression as written (`idle(cart.updated_at)`).
    pub label: Box<str>,
    /// How to compute it.
    pub node: Node,
}

/// Which names an expression resolves against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// A rule: state, aggregates, functions.
    Customer,
    /// An aggregate's `where` filter: the event's properties.
    Event,
}

/// Compiles the rules of one rule set, sharing slots and type ids across rules.
pub struct Compiler<'a> {
    /// Segment ids → index, for `in_segment`.
    pub segments: &'a HashMap<String, u16>,
    /// Event type ids.
    pub types: &'a mut TypeRegistry,
    /// The slots so far.
    pub slots: &'a mut Vec<SlotSpec>,
}

/// The result of compiling one rule.
pub struct CompiledExpr {
    /// The evaluable tree.
    pub node: Node,
    /// What it depends on.
    pub deps: Deps,
    /// The sub-expressions shown as `facts` when it changes a membership.
    pub facts: Vec<Fact>,
}

struct RuleCompiler<'c, 'a> {
    compiler: &'c mut Compiler<'a>,
    text: &'c str,
    deps: Deps,
    facts: Vec<Fact>,
    /// How deep inside a function call or fact we are: facts are only the outermost.
    nesting: u32,
}

impl<'a> Compiler<'a> {
    /// Type-checks and compiles one rule (`text` is its source, for fact labels). The rule
    /// must be a boolean.
    pub fn compile(&mut self, expr: &Expr, text: &str) -> Result<CompiledExpr, CompileError> {
        let mut rule = RuleCompiler {
            compiler: self,
            text,
            deps: Deps::default(),
            facts: Vec::new(),
            nesting: 0,
        };
        let (node, ty) = rule.expr(expr, Scope::Customer)?;
        if !matches!(ty, Type::Bool | Type::Any) {
            return error(
                expr.span,
                format!("a rule must be true or false, but this is {}", ty.name()),
            );
        }
        // A rule that reads time is not re-evaluated by every event for that reason: its
        // deadline (`rules::deadline`) is never later than the first instant its answer
        // can change with time alone, and `Engine::apply` fires a due timer before the
        // event, so between its inputs' events the answer stays as last evaluated.
        Ok(CompiledExpr {
            node,
            deps: rule.deps,
            facts: rule.facts,
        })
    }
}

impl RuleCompiler<'_, '_> {
    fn expr(&mut self, expr: &Expr, scope: Scope) -> Result<(Node, Type), CompileError> {
        let span = expr.span;
        match &expr.kind {
            ExprKind::Literal(lit) => Ok(literal(lit)),
            ExprKind::List(_) => error(
                span,
                "a list can only follow `in`, as in `context.country in ['DE', 'AT']`",
            ),
            ExprKind::Path(parts) => {
                let compiled = match scope {
                    Scope::Customer => self.state_path(parts, span)?,
                    Scope::Event => event_path(parts, span)?,
                };
                self.note_fact(scope, span, &compiled.0);
                Ok(compiled)
            }
            ExprKind::Call { name, args } => {
                if scope == Scope::Event {
                    return error(
                        span,
                        "a `where` filter compares the event's properties; it cannot call functions",
                    );
                }
                self.nesting += 1;
                let compiled = self.call(name, args, span);
                self.nesting -= 1;
                let compiled = compiled?;
                self.note_fact(scope, span, &compiled.0);
                Ok(compiled)
            }
            ExprKind::Unary(UnaryOp::Not, inner) => {
                let (node, ty) = self.expr(inner, scope)?;
                expect_bool(ty, inner.span, "`not`")?;
                Ok((Node::Not(Box::new(node)), Type::Bool))
            }
            ExprKind::Unary(UnaryOp::Neg, inner) => {
                let (node, ty) = self.expr(inner, scope)?;
                match ty {
                    Type::Num | Type::Dur | Type::Any => Ok((Node::Neg(Box::new(node)), ty)),
                    _ => error(inner.span, format!("cannot negate {}", ty.name())),
                }
            }
            ExprKind::Binary(op, lhs, rhs) => self.binary(*op, lhs, rhs, scope),
        }
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        lhs: &Expr,
        rhs: &Expr,
        scope: Scope,
    ) -> Result<(Node, Type), CompileError> {
        if op == BinaryOp::In {
            let (left, left_ty) = self.expr(lhs, scope)?;
            let ExprKind::List(items) = &rhs.kind else {
                return error(rhs.span, "`in` takes a list of values: `x in ['a', 'b']`");
            };
            let items: Vec<(Lit, Type)> = items.iter().map(literal_value).collect();
            for (_, ty) in &items {
                if !compatible(left_ty, *ty) {
                    return error(
                        rhs.span,
                        format!(
                            "this list holds {}, but the left side is {}",
                            ty.name(),
                            left_ty.name()
                        ),
                    );
                }
            }
            let items = items.into_iter().map(|(lit, _)| lit).collect();
            return Ok((Node::In(Box::new(left), items), Type::Bool));
        }
        let (left, lt) = self.expr(lhs, scope)?;
        let (right, rt) = self.expr(rhs, scope)?;
        let (l, r) = (Box::new(left), Box::new(right));
        match op {
            BinaryOp::And | BinaryOp::Or => {
                expect_bool(lt, lhs.span, &format!("`{}`", op.symbol()))?;
                expect_bool(rt, rhs.span, &format!("`{}`", op.symbol()))?;
                let node = if op == BinaryOp::And {
                    Node::And(l, r)
                } else {
                    Node::Or(l, r)
                };
                Ok((node, Type::Bool))
            }
            BinaryOp::Eq
            | BinaryOp::Ne
            | BinaryOp::Lt
            | BinaryOp::Le
            | BinaryOp::Gt
            | BinaryOp::Ge => {
                let cmp = match op {
                    BinaryOp::Eq => CmpOp::Eq,
                    BinaryOp::Ne => CmpOp::Ne,
                    BinaryOp::Lt => CmpOp::Lt,
                    BinaryOp::Le => CmpOp::Le,
                    BinaryOp::Gt => CmpOp::Gt,
                    _ => CmpOp::Ge,
                };
                if !compatible(lt, rt) {
                    return error(
                        Span {
                            start: lhs.span.start,
                            end: rhs.span.end,
                        },
                        format!("cannot compare {} with {}", lt.name(), rt.name()),
                    );
                }
                if !matches!(cmp, CmpOp::Eq | CmpOp::Ne) && (lt == Type::Bool || rt == Type::Bool) {
                    return error(lhs.span, "booleans can only be compared with `==` or `!=`");
                }
                Ok((Node::Cmp(cmp, l, r), Type::Bool))
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div => {
                let arith = match op {
                    BinaryOp::Add => ArithOp::Add,
                    BinaryOp::Sub => ArithOp::Sub,
                    BinaryOp::Mul => ArithOp::Mul,
                    _ => ArithOp::Div,
                };
                let ty = arith_type(arith, lt, rt).ok_or_else(|| CompileError {
                    span: Span {
                        start: lhs.span.start,
                        end: rhs.span.end,
                    },
                    message: format!(
                        "cannot apply `{}` to {} and {}",
                        op.symbol(),
                        lt.name(),
                        rt.name()
                    ),
                })?;
                let nonlinear = match arith {
                    ArithOp::Mul => grows_with_time(&l) && grows_with_time(&r),
                    ArithOp::Div => grows_with_time(&r),
                    ArithOp::Add | ArithOp::Sub => false,
                };
                if nonlinear {
                    return error(
                        Span {
                            start: lhs.span.start,
                            end: rhs.span.end,
                        },
                        "a rule cannot multiply two `idle` values or divide by one: its timer could not be \
                         computed; compare each `idle` with a duration instead",
                    );
                }
                Ok((Node::Arith(arith, l, r), ty))
            }
            BinaryOp::In => unreachable!("handled above"),
        }
    }

    fn note_fact(&mut self, scope: Scope, span: Span, node: &Node) {
        if scope == Scope::Customer && self.nesting == 0 && !matches!(node, Node::Lit(_)) {
            let label: Box<str> = self.text[span.start..span.end].into();
            if !self.facts.iter().any(|f| f.label == label) {
                self.facts.push(Fact {
                    label,
                    node: node.clone(),
                });
            }
        }
    }

    fn state_path(&mut self, parts: &[String], span: Span) -> Result<(Node, Type), CompileError> {
        let joined = parts.join(".");
        if let Some((_, field, ty)) = STATE_FIELDS.iter().find(|(name, _, _)| *name == joined) {
            self.deps.merge(&state_deps(*field, self.compiler.types));
            return Ok((Node::State(*field), *ty));
        }
        match parts {
            [group, key] if group == "traits" => {
                self.deps
                    .types
                    .insert(self.compiler.types.intern("identify"));
                Ok((Node::Trait(key.as_str().into()), Type::Any))
            }
            [group, key] if group == "context" => {
                self.deps.any_event = true;
                Ok((Node::Context(key.as_str().into()), Type::Any))
            }
            [group, ..] if matches!(group.as_str(), "cart" | "session" | "customer") => {
                let known: Vec<&str> = STATE_FIELDS
                    .iter()
                    .map(|(name, _, _)| *name)
                    .filter(|name| name.starts_with(&format!("{group}.")))
                    .collect();
                error(
                    span,
                    format!("unknown name `{joined}`; {group} has: {}", known.join(", ")),
                )
            }
            [single] => error(
                span,
                format!(
                    "unknown name `{single}`; rules read cart.*, session.*, customer.*, traits.*, context.*, \
                     or aggregate events with a function such as count({single})"
                ),
            ),
            _ => error(
                span,
                format!(
                    "unknown name `{joined}`; rules read cart.*, session.*, customer.*, traits.*, context.*"
                ),
            ),
        }
    }

    fn call(&mut self, name: &str, args: &[Arg], span: Span) -> Result<(Node, Type), CompileError> {
        match name {
            "count" | "sum" | "avg" | "min" | "max" | "distinct" | "top" => {
                self.aggregate(name, args, span)
            }
            "last" | "first" => {
                let [source] = args else {
                    return error(
                        span,
                        format!("{name}() takes one event type: {name}(purchase)"),
                    );
                };
                let source_ref = self.source(source, false, name)?;
                let kind = if name == "first" {
                    SlotKind::First
                } else {
                    SlotKind::Last
                };
                let slot = self.slot(source_ref, kind, source.span())?;
                Ok((Node::Instant(slot), Type::Time))
            }
            "idle" => {
                let [Arg::Expr(inner)] = args else {
                    return error(span, "idle() takes one time: idle(cart.updated_at)");
                };
                let (node, ty) = self.expr(inner, Scope::Customer)?;
                expect_type(ty, Type::Time, inner.span, "idle()")?;
                self.deps.time = true;
                Ok((Node::Idle(Box::new(node)), Type::Dur))
            }
            "within" => {
                let [Arg::Expr(at), Arg::Expr(length)] = args else {
                    return error(
                        span,
                        "within() takes a time and a duration: within(last(exit_intent), 2m)",
                    );
                };
                let (at_node, at_ty) = self.expr(at, Scope::Customer)?;
                expect_type(at_ty, Type::Time, at.span, "within()'s first argument")?;
                let (len_node, len_ty) = self.expr(length, Scope::Customer)?;
                expect_type(len_ty, Type::Dur, length.span, "within()'s second argument")?;
                self.deps.time = true;
                Ok((
                    Node::Within(Box::new(at_node), Box::new(len_node)),
                    Type::Bool,
                ))
            }
            "followed" | "not_followed" => self.sequence(name, args, span),
            "in_segment" => {
                let [
                    Arg::Expr(Expr {
                        kind: ExprKind::Path(parts),
                        span: id_span,
                    }),
                ] = args
                else {
                    return error(
                        span,
                        "in_segment() takes a segment id: in_segment(high_value)",
                    );
                };
                let id = parts.join(".");
                let Some(index) = self.compiler.segments.get(&id) else {
                    return error(*id_span, format!("unknown segment `{id}`"));
                };
                self.deps.segments.insert(*index);
                Ok((Node::InSegment(*index), Type::Bool))
            }
            other => error(
                span,
                format!(
                    "unknown function `{other}`; functions are count, sum, avg, min, max, distinct, top, \
                     last, first, idle, within, followed, not_followed, in_segment"
                ),
            ),
        }
    }

    fn aggregate(
        &mut self,
        name: &str,
        args: &[Arg],
        span: Span,
    ) -> Result<(Node, Type), CompileError> {
        let (source, window) = match args {
            [source] => (source, None),
            [source, window] => (source, Some(self.window(window)?)),
            _ => {
                let example = if name == "count" {
                    "count(product_view, 7d)"
                } else {
                    "sum(purchase.revenue, 90d)"
                };
                return error(
                    span,
                    format!("{name}() takes an event source and an optional window: {example}"),
                );
            }
        };
        let needs_field = name != "count";
        let mut source_ref = self.source(source, needs_field, name)?;
        let field = source_ref.field.take();
        if window.is_some() {
            self.deps.time = true;
        }
        Ok(match name {
            "distinct" | "top" => {
                let field = field.expect("checked by source()");
                let kind = if name == "top" {
                    SlotKind::Top { field, window }
                } else {
                    SlotKind::Distinct { field, window }
                };
                let slot = self.slot(source_ref, kind, source.span())?;
                if name == "top" {
                    (Node::Top { slot, window }, Type::Any)
                } else {
                    (Node::Distinct { slot, window }, Type::Num)
                }
            }
            _ => {
                let op = match name {
                    "count" => AggOp::Count,
                    "sum" => AggOp::Sum,
                    "avg" => AggOp::Avg,
                    "min" => AggOp::Min,
                    _ => AggOp::Max,
                };
                let slot = self.slot(
                    source_ref,
                    SlotKind::Numeric { field, window },
                    source.span(),
                )?;
                (Node::Agg { slot, op, window }, Type::Num)
            }
        })
    }

    fn sequence(
        &mut self,
        name: &str,
        args: &[Arg],
        span: Span,
    ) -> Result<(Node, Type), CompileError> {
        let usage = format!(
            "{name}() takes two event types, a duration and optionally `by = field`: {name}(add_to_cart, purchase, 1h, by = product_id)"
        );
        let (first, then, within, by) = match args {
            [a, b, d] => (a, b, d, None),
            [
                a,
                b,
                d,
                Arg::Named {
                    name: key,
                    value,
                    span: by_span,
                },
            ] => {
                if key != "by" || value.len() != 1 {
                    return error(
                        *by_span,
                        "the fourth argument is `by = field`, e.g. `by = product_id`",
                    );
                }
                (a, b, d, Some(value[0].as_str().into()))
            }
            _ => return error(span, usage),
        };
        let first_source = self.source(first, false, name)?;
        let then_source = self.source(then, false, name)?;
        if first_source.filter.is_some() || then_source.filter.is_some() {
            return error(span, usage);
        }
        let within = self.window(within)?;
        let kind = SlotKind::Sequence {
            then: then_source.event_type,
            within,
            by,
        };
        let slot = self.slot(first_source, kind, first.span())?;
        if name == "followed" {
            Ok((Node::Followed(slot), Type::Bool))
        } else {
            self.deps.time = true;
            Ok((Node::NotFollowed { slot, within }, Type::Bool))
        }
    }

    /// Reads an event source: `type`, `type.field`, either optionally `where filter`.
    fn source(
        &mut self,
        arg: &Arg,
        needs_field: bool,
        function: &str,
    ) -> Result<Source, CompileError> {
        let (parts, span, filter) = match arg {
            Arg::Expr(Expr {
                kind: ExprKind::Path(parts),
                span,
            }) => (parts, *span, None),
            Arg::Filtered {
                path,
                path_span,
                filter,
            } => (path, *path_span, Some(filter)),
            other => {
                return error(
                    other.span(),
                    format!("{function}() reads an event type here, such as `purchase`"),
                );
            }
        };
        let (event_type, field) = match (parts.as_slice(), needs_field) {
            ([event_type], false) => (event_type, None),
            ([event_type, field], true) => (event_type, Some(field.as_str().into())),
            ([event_type], true) => {
                return error(
                    span,
                    format!("{function}() needs a field: {function}({event_type}.FIELD, …)"),
                );
            }
            (_, false) => {
                return error(
                    span,
                    format!("{function}() takes an event type, not a field"),
                );
            }
            _ => return error(span, "an event source is `type` or `type.field`"),
        };
        if ["cart", "session", "customer", "traits", "context"].contains(&event_type.as_str()) {
            return error(
                span,
                format!(
                    "`{event_type}` is state, not an event type; read it directly, e.g. cart.items"
                ),
            );
        }
        let id = self.compiler.types.intern(event_type);
        self.deps.types.insert(id);
        let filter = match filter {
            Some(filter) => {
                let (node, ty) = self.expr(filter, Scope::Event)?;
                expect_bool(ty, filter.span, "a `where` filter")?;
                Some((
                    node,
                    self.text[filter.span.start..filter.span.end].to_owned(),
                ))
            }
            None => None,
        };
        Ok(Source {
            event_type: id,
            field,
            filter,
        })
    }

    fn window(&mut self, arg: &Arg) -> Result<Millis, CompileError> {
        match arg {
            Arg::Expr(Expr {
                kind: ExprKind::Literal(Literal::Dur(length)),
                ..
            }) if *length > 0 => Ok(*length),
            other => error(
                other.span(),
                "expected a positive duration such as `30m` or `7d`",
            ),
        }
    }

    fn slot(&mut self, source: Source, kind: SlotKind, span: Span) -> Result<u16, CompileError> {
        let describe = describe_slot(self.compiler.types, &source, &kind);
        if let Some(index) = self
            .compiler
            .slots
            .iter()
            .position(|s| s.describe == describe)
        {
            return Ok(index as u16);
        }
        if self.compiler.slots.len() >= usize::from(u16::MAX) {
            return error(span, "too many distinct aggregates in the rules");
        }
        let Source {
            event_type, filter, ..
        } = source;
        self.compiler.slots.push(SlotSpec {
            event_type,
            filter: filter.map(|(node, _)| node),
            kind,
            describe,
        });
        Ok((self.compiler.slots.len() - 1) as u16)
    }
}

/// An aggregate's event source: `type[.field] [where filter]`.
struct Source {
    event_type: u16,
    field: Option<Box<str>>,
    /// The compiled filter and its text.
    filter: Option<(Node, String)>,
}

/// A canonical, readable description of a slot: equal descriptions share one slot, and
/// `segmentd check` prints it.
fn describe_slot(types: &TypeRegistry, source: &Source, kind: &SlotKind) -> String {
    let mut text = types.name(source.event_type).to_owned();
    let window_text = |window: &Option<Millis>| match window {
        Some(w) => format!(" over {}", crate::time::format_duration(*w)),
        None => " over the lifetime".to_owned(),
    };
    let (word, field, suffix) = match kind {
        SlotKind::Numeric { field, window } => ("events", field.as_deref(), window_text(window)),
        SlotKind::Distinct { field, window } => {
            ("distinct values", Some(&**field), window_text(window))
        }
        SlotKind::Top { field, window } => {
            ("most frequent value", Some(&**field), window_text(window))
        }
        SlotKind::First => ("first", None, String::new()),
        SlotKind::Last => ("last", None, String::new()),
        SlotKind::Sequence { then, within, by } => (
            "sequence",
            None,
            format!(
                " then {} within {}{}",
                types.name(*then),
                crate::time::format_duration(*within),
                by.as_deref()
                    .map(|b| format!(" by {b}"))
                    .unwrap_or_default()
            ),
        ),
    };
    if let Some(field) = field {
        text = format!("{text}.{field}");
    }
    if let Some((_, filter)) = &source.filter {
        text = format!("{text} where {filter}");
    }
    format!("{word} of {text}{suffix}")
}

impl RuleCompiler<'_, '_> {}

fn event_path(parts: &[String], span: Span) -> Result<(Node, Type), CompileError> {
    match parts {
        [key] => Ok((Node::Prop(key.as_str().into()), Type::Any)),
        [group, key] if group == "properties" => Ok((Node::Prop(key.as_str().into()), Type::Any)),
        _ => error(
            span,
            "in a `where` filter, names are the event's properties, such as `category`",
        ),
    }
}

fn state_deps(field: StateField, types: &mut TypeRegistry) -> Deps {
    let mut deps = Deps::default();
    let mut on = |names: &[&str]| {
        for name in names {
            deps.types.insert(types.intern(name));
        }
    };
    match field {
        StateField::CartItems
        | StateField::CartValue
        | StateField::CartLines
        | StateField::CartUpdatedAt => {
            on(&["add_to_cart", "remove_from_cart", "purchase"]);
        }
        StateField::Purchases
        | StateField::FirstPurchaseAt
        | StateField::LastPurchaseAt
        | StateField::Revenue
        | StateField::AvgOrderValue => on(&["purchase", "refund"]),
        // An open session closes when its inactivity gap passes, with no event.
        StateField::SessionId
        | StateField::SessionPageViews
        | StateField::SessionEvents
        | StateField::SessionActive => {
            deps.any_event = true;
            deps.time = true;
        }
        // Session times, first/last seen and event counts change with every event.
        _ => deps.any_event = true,
    }
    deps
}

fn literal(lit: &Literal) -> (Node, Type) {
    let (lit, ty) = literal_value(lit);
    (Node::Lit(lit), ty)
}

fn literal_value(lit: &Literal) -> (Lit, Type) {
    match lit {
        Literal::Num(n) => (Lit::Num(*n), Type::Num),
        Literal::Str(s) => (Lit::Str(s.as_str().into()), Type::Str),
        Literal::Bool(b) => (Lit::Bool(*b), Type::Bool),
        Literal::Dur(d) => (Lit::Dur(*d), Type::Dur),
    }
}

fn compatible(a: Type, b: Type) -> bool {
    a == b || a == Type::Any || b == Type::Any
}

fn expect_bool(ty: Type, span: Span, what: &str) -> Result<(), CompileError> {
    match ty {
        Type::Bool | Type::Any => Ok(()),
        other => error(
            span,
            format!("{what} needs true or false, but this is {}", other.name()),
        ),
    }
}

fn expect_type(ty: Type, want: Type, span: Span, what: &str) -> Result<(), CompileError> {
    if compatible(ty, want) {
        Ok(())
    } else {
        error(
            span,
            format!("{what} needs {}, but this is {}", want.name(), ty.name()),
        )
    }
}

/// Whether a value grows with time between events: it reads `idle` (outside any
/// aggregate). A rule may add, subtract and scale such values — their timers are solved
/// exactly — but not multiply two of them or divide by one.
pub fn grows_with_time(node: &Node) -> bool {
    match node {
        Node::Idle(_) => true,
        Node::Neg(inner) => grows_with_time(inner),
        Node::Arith(_, l, r) => grows_with_time(l) || grows_with_time(r),
        _ => false,
    }
}

/// The result type of arithmetic, or `None` where it makes no sense.
fn arith_type(op: ArithOp, l: Type, r: Type) -> Option<Type> {
    use Type::*;
    match (op, l, r) {
        (_, Num, Num) | (_, Any, Num) | (_, Num, Any) | (_, Any, Any) => Some(Num),
        (ArithOp::Sub, Time, Time) => Some(Dur),
        (ArithOp::Add | ArithOp::Sub, Time, Dur) | (ArithOp::Add, Dur, Time) => Some(Time),
        (ArithOp::Add | ArithOp::Sub, Dur, Dur) => Some(Dur),
        (ArithOp::Mul, Dur, Num) | (ArithOp::Mul, Num, Dur) | (ArithOp::Div, Dur, Num) => Some(Dur),
        (ArithOp::Div, Dur, Dur) => Some(Num),
        _ => None,
    }
}
