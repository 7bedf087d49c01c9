//! One customer's built-in behavioural state and how each event updates it.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::recent::{RECENT_EVENT_IDS, RecentKeys};
use super::slots::SlotState;
use crate::event::{ContextDigest, Event, Item, Props, Text, lookup, upsert};
use crate::time::{Millis, format_timestamp};

/// The bits of an event's dedup key a customer keeps: 49, the most a 7-byte varint holds
/// (a whole 64-bit hash takes 10), so the 16 keys take 112 bytes of every encoding of the
/// state instead of 160. Two different events of one customer pass for each other with
/// probability 16 / 2^49 per event: about once a year at a million events a second.
const KEPT_KEY_MASK: u64 = (1 << 49) - 1;
/// Most distinct products a cart holds; adding another product to a full cart is
/// ignored. Bounds memory and the size of output records whatever the input.
pub const MAX_CART_LINES: usize = 200;
/// Most distinct keys kept in `traits` and in `context`; new keys beyond are ignored.
pub const MAX_PROPS: usize = 64;
/// [`TimerBasis::segment`] when no time-dependent segment has a next change.
pub const NO_TIMED_SEGMENT: u16 = u16::MAX;

/// What is known of the next changes behind a customer's timer, so that an event need not
/// recompute every time-dependent segment's: only those it re-evaluates, as long as these
/// facts show that none of the others' can come first. Derived from the rest of the state:
/// not stored, and two states equal in everything else are equal whatever it says.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerBasis {
    /// Which time-dependent segment `timer` is the next change of ([`NO_TIMED_SEGMENT`]:
    /// none has one); `None` when not known (a state decoded or restored).
    pub segment: Option<u16>,
    /// [`TimerBasis::others_not_before`] in whole seconds, rounded down (0: not known,
    /// `u32::MAX`: never): with the segment, 8 bytes, which fit in the state's padding
    /// where milliseconds would not.
    others_not_before_s: u32,
}

impl TimerBasis {
    /// A basis: the timer is `segment`'s next change, and no other time-dependent segment
    /// can change before `others_not_before` (`Millis::MAX`: none has a next change).
    pub fn new(segment: u16, others_not_before: Millis) -> TimerBasis {
        let seconds = if others_not_before == Millis::MAX {
            u32::MAX
        } else {
            // Rounded down, and clamped below `u32::MAX`: still a lower bound.
            u32::try_from(others_not_before.div_euclid(1000).max(0))
                .map_or(u32::MAX - 1, |s| s.min(u32::MAX - 1))
        };
        TimerBasis {
            segment: Some(segment),
            others_not_before_s: seconds,
        }
    }

    /// No time-dependent segment other than [`TimerBasis::segment`] can change before this
    /// instant: a lower bound of their next changes, exact to the second when all were
    /// last computed, lower after events moved some (`Millis::MAX`: none has one;
    /// `Millis::MIN`: nothing known).
    pub fn others_not_before(self) -> Millis {
        match self.others_not_before_s {
            0 => Millis::MIN,
            u32::MAX => Millis::MAX,
            seconds => Millis::from(seconds) * 1000,
        }
    }
}

impl PartialEq for TimerBasis {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Most categories counted for interest; new categories beyond are ignored.
pub const MAX_CATEGORIES: usize = 64;

/// Everything segmentd knows about one customer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Lifetime facts: first/last seen, events, purchases, revenue.
    pub customer: Lifetime,
    /// The current cart.
    pub cart: Cart,
    /// The current (or last) browsing session.
    pub session: Session,
    /// Profile traits from `identify`; the latest value of each wins.
    pub traits: Props,
    /// When the latest `identify` happened: an older one arriving later fills only
    /// traits not yet known.
    pub traits_at: Option<Millis>,
    /// The latest context seen (device, country, city, utm_source, …); latest wins per key
    /// (by event time: an out-of-order event fills only keys not yet known).
    pub context: Props,
    /// The digest of the context applied last as the latest, while `context` holds all
    /// of it (0: none known); not stored.
    #[serde(skip)]
    pub context_digest: ContextDigest,
    /// How often each category was viewed or added to the cart.
    pub categories: Vec<(Text, u32)>,
    /// Dedup keys of the most recent events (their low bits: `KEPT_KEY_MASK`), a ring: a
    /// replayed event is recognised and changes nothing.
    pub recent_events: RecentKeys,
    /// Where the next dedup key goes in `recent_events`.
    pub recent_cursor: u8,
    /// The rule-specific state, one entry per slot of the loaded rules.
    pub slots: Vec<SlotState>,
    /// The segments the customer is in now, each with when it was entered.
    pub segments: Vec<Membership>,
    /// How many segment changes this customer has had: the `seq` of the last change.
    pub seq: u64,
    /// The customer's evaluation time: the latest event time or fired timer. Rules are
    /// never evaluated before it, so a customer's changes never go back in time.
    pub clock: Millis,
    /// When the rules may next change with time alone: the one pending timer.
    pub timer: Option<Millis>,
    /// Which segment `timer` is the next change of, and when the others' may come (see
    /// [`TimerBasis`]).
    #[serde(skip)]
    pub timer_basis: TimerBasis,
    /// The input partition number the customer's events come from: the state is dropped
    /// when that partition moves to another instance. Not stored: the changelog
    /// partition says it.
    #[serde(skip)]
    pub partition: i32,
}

/// Lifetime facts about a customer (`customer.*` in rules).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lifetime {
    /// Time of the earliest event.
    pub first_seen: Millis,
    /// Time of the latest event.
    pub last_seen: Millis,
    /// Events applied.
    pub events: u64,
    /// Purchases made.
    pub purchases: u32,
    /// Revenue of purchases, less refunds.
    pub revenue: f64,
    /// Time of the first purchase.
    pub first_purchase_at: Option<Millis>,
    /// Time of the latest purchase.
    pub last_purchase_at: Option<Millis>,
}

/// The cart (`cart.*` in rules).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    /// One line per product.
    pub lines: Vec<Item>,
    /// When the cart last changed.
    pub updated_at: Option<Millis>,
    /// When a purchase last emptied it: a cart change from before then, arriving late, was
    /// settled by that purchase and is ignored.
    pub emptied_at: Option<Millis>,
}

impl Cart {
    /// Units in the cart.
    pub fn items(&self) -> f64 {
        // A fold from +0.0: `Sum` for floats starts at -0.0, which would print as `-0`.
        self.lines.iter().fold(0.0, |total, l| total + l.quantity)
    }

    /// Value of the cart: the sum of price × quantity.
    pub fn value(&self) -> f64 {
        self.lines
            .iter()
            .fold(0.0, |total, l| total + l.price * l.quantity)
    }

    /// The cart lines as JSON, as output records and the HTTP API show them.
    pub fn lines_json(&self) -> Value {
        Value::Array(
            self.lines
                .iter()
                .map(|l| json!({"product_id": &*l.product_id, "quantity": l.quantity, "price": l.price}))
                .collect(),
        )
    }
}

/// The browsing session (`session.*` in rules).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The producer's session id, if it sends one.
    pub id: Option<crate::event::Text>,
    /// When the session started.
    pub started_at: Millis,
    /// When the customer was last active in it.
    pub last_activity: Millis,
    /// Page views in the session.
    pub page_views: u32,
    /// Events in the session.
    pub events: u32,
}

/// Membership of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The segment's index in the loaded rules.
    pub segment: u16,
    /// When the customer entered it.
    pub entered_at: Millis,
}

impl CustomerState {
    /// Starts loading the vectors the state points to into the CPU's cache
    /// ([`prefetch`](super::prefetch)); see
    /// [`CustomerStore::prefetch`](super::CustomerStore::prefetch).
    pub fn prefetch_parts(&self) {
        use super::prefetch::slice;
        slice(&self.slots);
        slice(&self.segments);
        slice(&self.cart.lines);
        slice(&self.context);
        slice(&self.traits);
        slice(&self.categories);
    }

    /// Whether an event with this dedup key was applied recently; if not, remembers it.
    /// Returns `true` for a replay.
    pub fn check_and_remember(&mut self, dedup_key: u64) -> bool {
        let dedup_key = dedup_key & KEPT_KEY_MASK;
        // Whole keys, kept before keys were shortened, still match.
        if self
            .recent_events
            .as_slice()
            .iter()
            .any(|&kept| kept & KEPT_KEY_MASK == dedup_key)
        {
            return true;
        }
        if !self.recent_events.is_full() {
            self.recent_events.push(dedup_key);
        } else {
            self.recent_events
                .set(usize::from(self.recent_cursor), dedup_key);
            self.recent_cursor = ((usize::from(self.recent_cursor) + 1) % RECENT_EVENT_IDS) as u8;
        }
        false
    }

    /// Applies an event's built-in meaning: lifetime facts, session, cart, traits, context
    /// and category interest. `session_gap` is the inactivity that starts a new session.
    pub fn apply_builtin(&mut self, event: &Event, session_gap: Millis) {
        let c = &mut self.customer;
        if c.events == 0 {
            c.first_seen = event.ts;
            c.last_seen = event.ts;
        }
        let latest = event.ts >= c.last_seen;
        c.first_seen = c.first_seen.min(event.ts);
        c.last_seen = c.last_seen.max(event.ts);
        c.events += 1;

        self.update_session(event, session_gap);
        // The context applied last as the latest, again (whatever this event's time):
        // every key is there with that value, and applying it would change nothing.
        let digest = event.context.digest();
        if digest == 0 || digest != self.context_digest.0 {
            for (key, value) in event.context.members().iter() {
                remember(&mut self.context, key, value, latest);
            }
            // An older event only fills keys in, so the latest's digest still holds.
            if latest {
                self.context_digest = ContextDigest(digest);
            }
        }
        match &*event.event_type {
            "add_to_cart" => self.add_to_cart(event),
            "remove_from_cart" => self.remove_from_cart(event),
            "purchase" => self.purchase(event),
            "refund" => self.customer.revenue -= event.revenue.unwrap_or(0.0),
            "identify" => {
                let newer = self.traits_at.is_none_or(|at| event.ts >= at);
                self.traits_at = Some(self.traits_at.map_or(event.ts, |t| t.max(event.ts)));
                for (key, value) in &event.traits {
                    remember(&mut self.traits, key, value, newer);
                }
            }
            _ => {}
        }
        if matches!(&*event.event_type, "product_view" | "add_to_cart")
            && let Some(category) = event.property("category").and_then(|c| c.as_str())
        {
            self.note_category(category);
        }
    }

    fn update_session(&mut self, event: &Event, session_gap: Millis) {
        let s = &mut self.session;
        let new_id = event.session_id.is_some() && event.session_id != s.id;
        let gap = event.ts - s.last_activity > session_gap;
        if s.events == 0 || new_id || gap {
            *s = Session {
                id: event.session_id.clone(),
                started_at: event.ts,
                ..Session::default()
            };
        }
        s.last_activity = s.last_activity.max(event.ts);
        s.started_at = s.started_at.min(event.ts);
        s.events += 1;
        if &*event.event_type == "page_view" {
            s.page_views += 1;
        }
    }

    /// Whether a cart change at `at` came before the purchase that last emptied the cart.
    fn settled_by_purchase(&self, at: Millis) -> bool {
        self.cart.emptied_at.is_some_and(|emptied| at < emptied)
    }

    fn add_to_cart(&mut self, event: &Event) {
        let Ok(line) = product_of(event) else { return };
        if self.settled_by_purchase(event.ts) {
            return;
        }
        let lines = &mut self.cart.lines;
        match lines.iter().position(|l| l.product_id == line.product_id) {
            Some(pos) => {
                lines[pos].quantity += line.quantity;
                lines[pos].price = line.price;
            }
            None if lines.len() < MAX_CART_LINES => lines.push(line),
            None => return,
        }
        self.touch_cart(event.ts);
    }

    fn remove_from_cart(&mut self, event: &Event) {
        let Ok(line) = product_of(event) else { return };
        if self.settled_by_purchase(event.ts) {
            return;
        }
        let explicit_quantity = event.property("quantity").is_some();
        if let Some(pos) = self
            .cart
            .lines
            .iter()
            .position(|l| l.product_id == line.product_id)
        {
            let existing = &mut self.cart.lines[pos];
            existing.quantity -= line.quantity;
            if !explicit_quantity || existing.quantity <= 0.0 {
                self.cart.lines.remove(pos);
            }
        }
        self.touch_cart(event.ts);
    }

    fn purchase(&mut self, event: &Event) {
        let c = &mut self.customer;
        c.purchases += 1;
        c.revenue += event.revenue.unwrap_or(0.0);
        c.first_purchase_at = Some(c.first_purchase_at.map_or(event.ts, |t| t.min(event.ts)));
        c.last_purchase_at = Some(c.last_purchase_at.map_or(event.ts, |t| t.max(event.ts)));
        if self.cart.updated_at.is_none_or(|t| event.ts >= t) {
            self.cart.lines.clear();
            self.cart.emptied_at = Some(event.ts);
        } else {
            // A late purchase: the cart changed after it, so only the products it bought
            // leave the cart.
            self.cart
                .lines
                .retain(|l| !event.items.iter().any(|i| i.product_id == l.product_id));
        }
        self.touch_cart(event.ts);
        for item in &event.items {
            if let Some(category) = &item.category {
                self.note_category(category);
            }
        }
    }

    fn touch_cart(&mut self, at: Millis) {
        self.cart.updated_at = Some(self.cart.updated_at.map_or(at, |t| t.max(at)));
    }

    fn note_category(&mut self, category: &str) {
        match self.categories.iter().position(|(c, _)| &**c == category) {
            Some(pos) => self.categories[pos].1 = self.categories[pos].1.saturating_add(1),
            None if self.categories.len() < MAX_CATEGORIES => {
                self.categories.push((category.into(), 1))
            }
            None => {}
        }
    }

    /// Whether the customer is in segment `segment` now.
    pub fn is_member(&self, segment: u16) -> bool {
        self.segments.iter().any(|m| m.segment == segment)
    }

    /// The state summary that `--dump-state` and `GET /customers/{id}` show.
    pub fn state_json(&self) -> Value {
        let c = &self.customer;
        let props = |props: &Props| {
            Value::Object(
                props
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_json()))
                    .collect(),
            )
        };
        let time =
            |at: Option<Millis>| at.map_or(Value::Null, |t| Value::String(format_timestamp(t)));
        json!({
            "customer": {
                "first_seen": format_timestamp(c.first_seen),
                "last_seen": format_timestamp(c.last_seen),
                "events": c.events,
                "purchases": c.purchases,
                "revenue": c.revenue,
                "first_purchase_at": time(c.first_purchase_at),
                "last_purchase_at": time(c.last_purchase_at),
            },
            "cart": {
                "items": self.cart.items(),
                "value": self.cart.value(),
                "updated_at": time(self.cart.updated_at),
                "lines": self.cart.lines_json(),
            },
            "session": {
                "id": self.session.id.as_deref(),
                "started_at": format_timestamp(self.session.started_at),
                "last_activity": format_timestamp(self.session.last_activity),
                "page_views": self.session.page_views,
                "events": self.session.events,
            },
            "traits": props(&self.traits),
            "context": props(&self.context),
            "categories": Value::Object(
                self.categories.iter().map(|(k, n)| (k.to_string(), json!(n))).collect()
            ),
        })
    }
}

/// Sets a trait or context key, ignoring new keys once [`MAX_PROPS`] are kept.
/// Keeps `key = value`: replacing an older value when `newer` (the event is the latest of
/// its kind), otherwise only filling a key not yet known — an out-of-order event does not
/// overwrite what a later one said.
fn remember(props: &mut Props, key: &str, value: &crate::event::PropValue, newer: bool) {
    upsert(props, key, value, newer, MAX_PROPS);
}

/// The product line an `add_to_cart` / `remove_from_cart` event names.
fn product_of(event: &Event) -> Result<Item, ()> {
    let product_id = match event
        .property("product_id")
        .or_else(|| event.property("sku"))
    {
        Some(crate::event::PropValue::Str(id)) => id.clone(),
        Some(crate::event::PropValue::Num(n)) => n.to_string().into(),
        _ => return Err(()),
    };
    let number = |key| match lookup(&event.properties, key) {
        Some(crate::event::PropValue::Num(n)) => Some(*n),
        _ => None,
    };
    Ok(Item {
        product_id,
        quantity: number("quantity").unwrap_or(1.0),
        price: number("price").unwrap_or(0.0),
        category: event
            .property("category")
            .and_then(|c| c.as_str())
            .map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Context, parse_event};
    use crate::time::MINUTE;

    fn event(json: &str) -> Event {
        parse_event(json.as_bytes(), 1 << 16).unwrap()
    }

    /// The bound a timer basis keeps is never above the instant it was given: rounded
    /// down to the second, "nothing known" below a second or before 1970, the most it
    /// can hold for instants past 2106, and "never" kept as never.
    #[test]
    fn a_timer_basis_keeps_a_lower_bound_of_the_instant_it_is_given() {
        let kept = |at: Millis| TimerBasis::new(0, at).others_not_before();
        assert_eq!(kept(1_767_225_612_345), 1_767_225_612_000);
        assert_eq!(kept(1_767_225_612_000), 1_767_225_612_000);
        assert_eq!(kept(999), Millis::MIN);
        assert_eq!(kept(-5_000), Millis::MIN);
        assert_eq!(kept(Millis::MIN), Millis::MIN);
        let far = 5_000_000_000_000_000;
        assert!(kept(far) <= far && kept(far) > 4_000_000_000_000);
        assert_eq!(kept(Millis::MAX), Millis::MAX);
        assert_eq!(
            kept(Millis::MAX - 1),
            kept(far),
            "below never: the most it holds"
        );
        assert_eq!(TimerBasis::default().segment, None);
        assert_eq!(TimerBasis::default().others_not_before(), Millis::MIN);
    }

    #[test]
    fn out_of_order_events_are_applied_where_they_belong() {
        let mut state = CustomerState::default();
        let gap = 30 * MINUTE;
        let apply = |state: &mut CustomerState, json: &str| state.apply_builtin(&event(json), gap);
        apply(
            &mut state,
            r#"{"type":"add_to_cart","customer_id":"c","ts":1000,"properties":{"product_id":"p-1","price":10}}"#,
        );
        apply(
            &mut state,
            r#"{"type":"purchase","customer_id":"c","ts":3000,"properties":{"items":[{"product_id":"p-1"}]}}"#,
        );
        // An add from before the purchase, arriving after it: already settled.
        apply(
            &mut state,
            r#"{"type":"add_to_cart","customer_id":"c","ts":2000,"properties":{"product_id":"p-2","price":5}}"#,
        );
        assert_eq!(
            state.cart.items(),
            0.0,
            "the purchase emptied the cart after it"
        );
        assert_eq!(state.cart.updated_at, Some(3000));
        // A late purchase removes only what it bought from a cart that changed since.
        apply(
            &mut state,
            r#"{"type":"add_to_cart","customer_id":"c","ts":5000,"properties":{"product_id":"p-3","price":5}}"#,
        );
        apply(
            &mut state,
            r#"{"type":"add_to_cart","customer_id":"c","ts":6000,"properties":{"product_id":"p-4","price":5}}"#,
        );
        apply(
            &mut state,
            r#"{"type":"purchase","customer_id":"c","ts":5500,"properties":{"items":[{"product_id":"p-3"}]}}"#,
        );
        let products: Vec<&str> = state.cart.lines.iter().map(|l| &*l.product_id).collect();
        assert_eq!(products, ["p-4"]);
        // Traits and context: the latest by event time wins, whatever the arrival order.
        apply(
            &mut state,
            r#"{"type":"identify","customer_id":"c","ts":9000,"traits":{"tier":"gold"},"context":{"country":"DE"}}"#,
        );
        apply(
            &mut state,
            r#"{"type":"identify","customer_id":"c","ts":8000,"traits":{"tier":"silver","age":40},"context":{"country":"FR","device":"mobile"}}"#,
        );
        assert_eq!(
            lookup(&state.traits, "tier").unwrap().as_str(),
            Some("gold")
        );
        assert!(
            lookup(&state.traits, "age").is_some(),
            "an unknown trait is still filled in"
        );
        assert_eq!(
            lookup(&state.context, "country").unwrap().as_str(),
            Some("DE")
        );
        assert_eq!(
            lookup(&state.context, "device").unwrap().as_str(),
            Some("mobile")
        );
    }

    #[test]
    fn the_cart_fills_empties_on_removal_and_clears_on_purchase() {
        let mut state = CustomerState::default();
        let gap = 30 * MINUTE;
        state.apply_builtin(
            &event(
                r#"{"type":"add_to_cart","customer_id":"c","ts":1000,
            "properties":{"product_id":"p-1","price":10,"quantity":2,"category":"shoes"}}"#,
            ),
            gap,
        );
        state.apply_builtin(
            &event(
                r#"{"type":"add_to_cart","customer_id":"c","ts":2000,
            "properties":{"product_id":"p-2","price":5}}"#,
            ),
            gap,
        );
        assert_eq!(state.cart.items(), 3.0);
        assert_eq!(state.cart.value(), 25.0);
        state.apply_builtin(
            &event(
                r#"{"type":"remove_from_cart","customer_id":"c","ts":3000,
            "properties":{"product_id":"p-1","quantity":1}}"#,
            ),
            gap,
        );
        assert_eq!(state.cart.items(), 2.0);
        assert_eq!(state.cart.updated_at, Some(3000));
        state.apply_builtin(
            &event(
                r#"{"type":"purchase","customer_id":"c","ts":4000,
            "properties":{"revenue":15}}"#,
            ),
            gap,
        );
        assert_eq!(state.cart.items(), 0.0);
        assert_eq!(state.customer.purchases, 1);
        assert_eq!(state.customer.revenue, 15.0);
        assert_eq!(state.customer.last_purchase_at, Some(4000));
        assert_eq!(state.categories, vec![("shoes".into(), 1)]);
    }

    #[test]
    fn carts_traits_and_context_stay_bounded_under_hostile_input() {
        let mut state = CustomerState::default();
        for i in 0..(MAX_CART_LINES + 50) {
            state.apply_builtin(
                &event(&format!(
                    r#"{{"type":"add_to_cart","customer_id":"c","ts":{i},"properties":{{"product_id":"p-{i}","price":1,"category":"k{i}"}},
                        "context":{{"key{i}":"v"}}}}"#
                )),
                MINUTE,
            );
        }
        assert_eq!(state.cart.lines.len(), MAX_CART_LINES);
        assert_eq!(state.context.len(), MAX_PROPS);
        assert_eq!(state.categories.len(), MAX_CATEGORIES);
        assert_eq!(
            state.cart.updated_at,
            Some(MAX_CART_LINES as i64 - 1),
            "ignored adds do not touch the cart"
        );
        state.apply_builtin(
            &event(r#"{"type":"add_to_cart","customer_id":"c","ts":9999,"properties":{"product_id":"p-0","price":1}}"#),
            MINUTE,
        );
        assert_eq!(
            state.cart.lines[0].quantity, 2.0,
            "a product already in a full cart still counts"
        );
    }

    #[test]
    fn a_session_restarts_after_the_inactivity_gap() {
        let mut state = CustomerState::default();
        let gap = 30 * MINUTE;
        let page = |ts: i64| {
            event(&format!(
                r#"{{"type":"page_view","customer_id":"c","ts":{ts}}}"#
            ))
        };
        state.apply_builtin(&page(0), gap);
        state.apply_builtin(&page(10 * MINUTE), gap);
        assert_eq!(state.session.page_views, 2);
        state.apply_builtin(&page(41 * MINUTE), gap);
        assert_eq!(state.session.page_views, 1);
        assert_eq!(state.session.started_at, 41 * MINUTE);
        assert_eq!(state.customer.events, 3);
    }

    #[test]
    fn a_replayed_event_is_recognised_within_the_recent_window() {
        let mut state = CustomerState::default();
        assert!(!state.check_and_remember(42));
        assert!(state.check_and_remember(42));
        for key in 100..(100 + RECENT_EVENT_IDS as u64) {
            assert!(!state.check_and_remember(key));
        }
        assert!(
            !state.check_and_remember(42),
            "forgotten after {RECENT_EVENT_IDS} newer events"
        );
    }

    #[test]
    fn kept_keys_are_short_and_whole_keys_from_older_states_still_match() {
        let whole = 0xfedc_ba98_7654_3210_u64;
        let mut state = CustomerState::default();
        assert!(!state.check_and_remember(whole));
        let kept = state.recent_events.as_slice()[0];
        assert!(kept < 1 << 49, "kept short");
        let encoded = postcard::to_allocvec(&kept).unwrap();
        assert!(encoded.len() <= 7, "{} bytes", encoded.len());

        let mut older = CustomerState::default();
        older.recent_events.push(whole);
        assert!(
            older.check_and_remember(whole),
            "a whole key written before"
        );
    }

    proptest::proptest! {
        /// A context skipped by its digest is one that would have changed nothing: events
        /// whose contexts repeat (a pool of four, one a subset of another), in any time
        /// order, leave the same context whether skipped or applied every time.
        #[test]
        fn a_context_skipped_by_its_digest_would_have_changed_nothing(
            events in proptest::collection::vec((0..4_usize, 0..40_i64), 1..40)
        ) {
            const CONTEXTS: [&str; 4] = [
                r#"{"device":"mobile","country":"DE"}"#,
                r#"{"device":"desktop","country":"DE"}"#,
                r#"{"country":"FR"}"#,
                r#"{"device":"mobile","country":"DE","city":"Berlin"}"#,
            ];
            let gap = 30 * MINUTE;
            let (mut skipping, mut applying) = (CustomerState::default(), CustomerState::default());
            for (i, (context, ts)) in events.into_iter().enumerate() {
                let mut event = event(&format!(
                    r#"{{"type":"page_view","customer_id":"c","event_id":"e-{i}","ts":{ts},"context":{}}}"#,
                    CONTEXTS[context]
                ));
                proptest::prop_assert_ne!(event.context.digest(), 0, "read directly");
                skipping.apply_builtin(&event, gap);
                event.context = Context::Members(event.context.members().into_owned());
                applying.apply_builtin(&event, gap);
                proptest::prop_assert_eq!(&skipping.context, &applying.context);
            }
        }
    }
}
