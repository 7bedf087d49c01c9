//! Input formats → one typed [`Event`].
//!
//! Two JSON formats arrive on the same topics and are told apart per message
//! ([`parse_event`]): segmentd's native format ([`native`]) and the Segment/RudderStack
//! spec ([`segment_spec`]). Both become the same [`Event`], so nothing downstream knows
//! which format a customer's events came in.
//!
//! Bad input is a value, not a panic: [`InvalidEvent`] carries a [`InvalidReason`] (a
//! bounded label for metrics and dead-letter headers) and a precise human message.

pub mod json;
pub mod native;
mod scan;
pub mod segment_spec;

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::json::{Json, Object};

use crate::time::{self, Millis};

/// Longest customer id accepted, in bytes. Ids are map keys and Kafka keys: an id longer
/// than this is almost certainly a bug upstream, and would bloat memory.
pub const MAX_CUSTOMER_ID_BYTES: usize = 256;

/// One customer event in the engine's own terms, whichever format it came in.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The producer's id for the event (`event_id` / `messageId`), if it sent one.
    pub event_id: Option<Text>,
    /// A stable 64-bit hash of `event_id` (or of the raw message when there is none): what
    /// replay detection compares, so a duplicate costs eight bytes of state, not a string.
    pub dedup_key: u64,
    /// The event type in lower snake case (`add_to_cart`, `purchase`, `newsletter_signup`).
    pub event_type: Text,
    /// Whose event this is: the key of all per-customer state.
    pub customer_id: Text,
    /// Event time, from the producer's timestamp.
    pub ts: Millis,
    /// The browsing session the producer assigned, if any.
    pub session_id: Option<Text>,
    /// Flat scalar properties (`product_id`, `category`, `price`, …). Nested objects and
    /// arrays other than `items` are not kept: no rule can address them.
    pub properties: Props,
    /// Line items of a purchase or refund (`items`, or `products` in the Segment spec);
    /// empty for other types.
    pub items: Vec<Item>,
    /// Where the event came from: device, country, city, utm_source, user agent, ….
    pub context: Context,
    /// Profile traits sent with `identify`.
    pub traits: Props,
    /// Money of a purchase or refund: `revenue`, else `total`, else the sum of its items.
    pub revenue: Option<f64>,
    /// The number of the input partition it was read from (0 when read from a file): its
    /// customer's state belongs to that partition, and moves with it.
    pub partition: i32,
}

impl Event {
    /// The value of a scalar property, if the event has it.
    pub fn property(&self, key: &str) -> Option<&PropValue> {
        lookup(&self.properties, key)
    }
}

/// An event's context: where it came from (device, country, city, …).
#[derive(Clone, Debug)]
pub enum Context {
    /// Its members, read with the rest of the event (a document: the Segment spec, or a
    /// native event out of the common case).
    Members(Props),
    /// A native event's context as written — a flat JSON object of scalars, checked when
    /// the event was read — and a digest of that text. Its members are read only if a
    /// customer's state takes them: most events repeat their customer's context, and a
    /// state skips the one it applied last ([`ContextDigest`]). A key written twice keeps
    /// its first place and its last value, as in a document.
    Text {
        /// The object's JSON text.
        json: Box<str>,
        /// [`stable_hash`] of `json`.
        digest: u64,
    },
}

impl Context {
    /// The members, in order (read from the text when kept as text).
    pub fn members(&self) -> Cow<'_, Props> {
        match self {
            Context::Members(props) => Cow::Borrowed(props),
            Context::Text { json, .. } => Cow::Owned(native::context_members(json)),
        }
    }

    /// The digest of the text as written, or 0 when it was not kept.
    pub fn digest(&self) -> u64 {
        match self {
            Context::Members(_) => 0,
            Context::Text { digest, .. } => *digest,
        }
    }
}

impl Default for Context {
    fn default() -> Context {
        Context::Members(Props::new())
    }
}

/// Two contexts are equal when their members are, however each was kept.
impl PartialEq for Context {
    fn eq(&self, other: &Self) -> bool {
        self.members() == other.members()
    }
}

/// The digest of the context a customer's state applied last as the latest
/// ([`Context::digest`]; 0: none). Applying an equal context again (each key looked up
/// in the state, its value compared) would change nothing, so the state skips it. Derived
/// from the context: two states equal in everything else are equal whatever it says.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextDigest(pub u64);

impl PartialEq for ContextDigest {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A list of `(key, value)` pairs. Events and customers carry a handful of keys, where a
/// small vector is both smaller and faster than a hash map.
pub type Props = Vec<(Text, PropValue)>;

/// A short string kept inline (up to 24 bytes) and on the heap only when longer: property
/// keys and most values (`country`, `DE`, `mobile`, product ids) fit, so parsing an event
/// and keeping its context allocate nothing per key and value. Encodes like a `str`.
pub type Text = compact_str::CompactString;

/// Finds `key` in a [`Props`] list.
pub fn lookup<'a>(props: &'a Props, key: &str) -> Option<&'a PropValue> {
    props.iter().find(|(k, _)| &**k == key).map(|(_, v)| v)
}

/// Sets `key` in a [`Props`] list, in one pass over it: a key already there takes `value`
/// when `replace` (copied only when it changed: context and traits repeat on most events);
/// a new key is added while the list holds fewer than `max_keys`.
pub fn upsert(props: &mut Props, key: &str, value: &PropValue, replace: bool, max_keys: usize) {
    match props.iter().position(|(k, _)| &**k == key) {
        Some(at) if replace && props[at].1 != *value => props[at].1 = value.clone(),
        Some(_) => {}
        None if props.len() < max_keys => props.push((key.into(), value.clone())),
        None => {}
    }
}

/// A scalar JSON value kept from an event's properties, context or traits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PropValue {
    /// JSON `null`: the producer said "no value".
    Null,
    /// JSON `true` / `false`.
    Bool(bool),
    /// Any JSON number.
    Num(f64),
    /// A JSON string.
    Str(Text),
}

impl PropValue {
    /// Converts a parsed JSON value; `None` for arrays and objects, which rules cannot
    /// address.
    pub fn from_json(value: &Json<'_>) -> Option<PropValue> {
        match value {
            Json::Array(_) | Json::Object(_) => None,
            // A scalar is cheap to copy: its text, if any, nearly always borrows from the
            // payload (only text with escapes is owned).
            scalar => PropValue::from_json_owned(scalar.clone()).ok(),
        }
    }

    /// Like [`from_json`](Self::from_json), taking the value: an array or an object is
    /// handed back. A scalar taken apart leaves nothing to drop, which counts where every
    /// member of every event goes through here.
    pub fn from_json_owned(value: Json<'_>) -> Result<PropValue, Json<'_>> {
        Ok(match value {
            Json::Null => PropValue::Null,
            Json::Bool(b) => PropValue::Bool(b),
            Json::Num(n) => PropValue::Num(n.as_f64()),
            Json::Str(s) => PropValue::Str(Text::from(&*s)),
            nested @ (Json::Array(_) | Json::Object(_)) => return Err(nested),
        })
    }

    /// The value as JSON, for output records and the HTTP API.
    pub fn to_json(&self) -> Value {
        match self {
            PropValue::Null => Value::Null,
            PropValue::Bool(b) => Value::Bool(*b),
            PropValue::Num(n) => {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
            PropValue::Str(s) => Value::String(s.to_string()),
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PropValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One line of a purchase, a refund or a cart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The product's id (`product_id`, else `sku`, else `id`).
    pub product_id: Text,
    /// How many units; 1 when the producer did not say.
    pub quantity: f64,
    /// Unit price; 0 when the producer did not say.
    pub price: f64,
    /// The product's category, when given: feeds category interest.
    pub category: Option<Text>,
}

/// Why an input message was rejected. The label ([`InvalidReason::as_str`]) is the
/// `reason` of `segmentd_events_invalid_total` and of the dead-letter header, so the set is
/// small and fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// The message had no payload at all.
    Empty,
    /// The payload is larger than `limits.max_event_bytes`.
    Oversized,
    /// The payload is not valid JSON (or not UTF-8).
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// No customer id (`customer_id`, `userId`, `anonymousId`), or an empty one.
    MissingCustomerId,
    /// No event type.
    MissingType,
    /// No timestamp.
    MissingTimestamp,
    /// A timestamp that is not RFC 3339 text or epoch milliseconds.
    BadTimestamp,
    /// A known field with the wrong JSON type (a numeric customer id, a text price, …).
    WrongType,
}

impl InvalidReason {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [InvalidReason; 9] = [
        InvalidReason::Empty,
        InvalidReason::Oversized,
        InvalidReason::InvalidJson,
        InvalidReason::NotAnObject,
        InvalidReason::MissingCustomerId,
        InvalidReason::MissingType,
        InvalidReason::MissingTimestamp,
        InvalidReason::BadTimestamp,
        InvalidReason::WrongType,
    ];

    /// The label used in metrics and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Empty => "empty",
            InvalidReason::Oversized => "oversized",
            InvalidReason::InvalidJson => "invalid_json",
            InvalidReason::NotAnObject => "not_an_object",
            InvalidReason::MissingCustomerId => "missing_customer_id",
            InvalidReason::MissingType => "missing_type",
            InvalidReason::MissingTimestamp => "missing_timestamp",
            InvalidReason::BadTimestamp => "bad_timestamp",
            InvalidReason::WrongType => "wrong_type",
        }
    }
}

/// A rejected input message: the reason label and a message that names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct InvalidEvent {
    /// The bounded label, for metrics and headers.
    pub reason: InvalidReason,
    /// What exactly was wrong, for logs and the dead-letter `error` header.
    pub detail: String,
}

impl InvalidEvent {
    /// Builds a rejection.
    pub fn new(reason: InvalidReason, detail: impl Into<String>) -> Self {
        InvalidEvent {
            reason,
            detail: detail.into(),
        }
    }
}

/// Parses one input message (either format) into an [`Event`], or says precisely why not.
/// `max_bytes` bounds the payload size before any parsing work is done.
pub fn parse_event(payload: &[u8], max_bytes: usize) -> Result<Event, InvalidEvent> {
    if payload.is_empty() {
        return Err(InvalidEvent::new(
            InvalidReason::Empty,
            "the message has no payload",
        ));
    }
    if payload.len() > max_bytes {
        return Err(InvalidEvent::new(
            InvalidReason::Oversized,
            format!(
                "the message is {} bytes; the limit is {max_bytes}",
                payload.len()
            ),
        ));
    }
    // Nearly every event is read directly; the rest (another format, rare JSON forms,
    // anything invalid) through a document, which also words the errors.
    let mut event = match std::str::from_utf8(payload) {
        Ok(text) => match native::read_direct(text) {
            Some(event) => event,
            None => from_document(Json::parse_text(text))?,
        },
        Err(_) => from_document(Json::parse(payload))?,
    };
    if event.dedup_key == 0 {
        event.dedup_key = stable_hash(payload);
    }
    Ok(event)
}

/// Reads a parsed payload as whichever format it is in.
fn from_document(document: Result<Json<'_>, serde_json::Error>) -> Result<Event, InvalidEvent> {
    let value =
        document.map_err(|err| InvalidEvent::new(InvalidReason::InvalidJson, err.to_string()))?;
    let Json::Object(object) = value else {
        return Err(InvalidEvent::new(
            InvalidReason::NotAnObject,
            format!("expected a JSON object, got {}", value.kind()),
        ));
    };
    if segment_spec::looks_like(&object) {
        segment_spec::from_object(object)
    } else {
        native::from_object(object)
    }
}

/// A 64-bit hash that is the same in every process and every run (fixed seed), so dedup
/// keys survive restarts. Never returns 0, which marks "not yet computed".
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hasher = foldhash::fast::FixedState::with_seed(0x5e9_3e47).build_hasher();
    hasher.write(bytes);
    hasher.finish().max(1)
}

/// Reads an optional string field; present with another type is [`InvalidReason::WrongType`].
pub(crate) fn opt_str<'b>(
    object: &'b Object<'_>,
    key: &str,
) -> Result<Option<&'b str>, InvalidEvent> {
    match object.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Str(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

/// Reads an optional number field; present with another type is [`InvalidReason::WrongType`].
pub(crate) fn opt_num(object: &Object<'_>, key: &str) -> Result<Option<f64>, InvalidEvent> {
    match object.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Num(n)) => Ok(Some(n.as_f64())),
        Some(other) => Err(wrong_type(key, "a number", other)),
    }
}

/// Reads an optional object field; present with another type is [`InvalidReason::WrongType`].
pub(crate) fn opt_object<'b, 'a>(
    object: &'b Object<'a>,
    key: &str,
) -> Result<Option<&'b Object<'a>>, InvalidEvent> {
    match object.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(inner)) => Ok(Some(inner)),
        Some(other) => Err(wrong_type(key, "an object", other)),
    }
}

/// The rejection for a field of the wrong JSON type.
pub(crate) fn wrong_type(key: &str, expected: &str, got: &Json<'_>) -> InvalidEvent {
    InvalidEvent::new(
        InvalidReason::WrongType,
        format!("`{key}` must be {expected}, got {}", got.kind()),
    )
}

/// Validates a customer id taken from `key`.
pub(crate) fn customer_id(id: Option<&str>, key: &str) -> Result<Text, InvalidEvent> {
    match id {
        None => Err(InvalidEvent::new(
            InvalidReason::MissingCustomerId,
            format!("the event has no `{key}`"),
        )),
        Some(id) if id.trim().is_empty() => Err(InvalidEvent::new(
            InvalidReason::MissingCustomerId,
            format!("`{key}` is empty"),
        )),
        Some(id) if id.len() > MAX_CUSTOMER_ID_BYTES => Err(InvalidEvent::new(
            InvalidReason::Oversized,
            format!(
                "`{key}` is {} bytes; the limit is {MAX_CUSTOMER_ID_BYTES}",
                id.len()
            ),
        )),
        // Control characters are never part of a real id, and a leading NUL marks
        // segmentd's own records in the changelog.
        Some(id) if id.chars().any(char::is_control) => Err(InvalidEvent::new(
            InvalidReason::WrongType,
            format!("`{key}` contains a control character"),
        )),
        Some(id) => Ok(id.into()),
    }
}

/// Reads the event time from `key`: RFC 3339 text or integer epoch milliseconds.
pub(crate) fn timestamp(object: &Object<'_>, key: &str) -> Result<Millis, InvalidEvent> {
    match object.get(key) {
        None | Some(Json::Null) => Err(InvalidEvent::new(
            InvalidReason::MissingTimestamp,
            format!("the event has no `{key}`"),
        )),
        Some(Json::Str(text)) => time::parse_timestamp(text).ok_or_else(|| {
            InvalidEvent::new(
                InvalidReason::BadTimestamp,
                format!("`{key}` = {text:?} is not an RFC 3339 timestamp"),
            )
        }),
        Some(Json::Num(n)) => n.as_i64().filter(|ms| *ms >= 0).ok_or_else(|| {
            InvalidEvent::new(
                InvalidReason::BadTimestamp,
                format!("`{key}` = {n} is not a non-negative integer of epoch milliseconds"),
            )
        }),
        Some(other) => Err(wrong_type(key, "a timestamp string", other)),
    }
}

/// Keeps the scalar entries of a JSON object as [`Props`].
pub(crate) fn scalar_props(object: Option<&Object<'_>>) -> Props {
    let Some(object) = object else {
        return Props::new();
    };
    // Sized once: collecting from a filter would grow the vector step by step.
    let mut props = Props::with_capacity(object.len());
    props.extend(
        object
            .iter()
            .filter_map(|(k, v)| Some((k.into(), PropValue::from_json(v)?))),
    );
    props
}

/// Whether events of this type carry line items and money (`items`, `revenue`): purchases
/// and refunds. Elsewhere `items` or `revenue` are ordinary properties.
pub(crate) fn carries_money(event_type: &str) -> bool {
    matches!(event_type, "purchase" | "refund")
}

/// Reads line items from an array field (`items` or `products`).
pub(crate) fn items(properties: Option<&Object<'_>>, key: &str) -> Result<Vec<Item>, InvalidEvent> {
    match properties.and_then(|p| p.get(key)) {
        None => Ok(Vec::new()),
        Some(value) => item_lines(value, key),
    }
}

/// Reads line items from the value of the array field `key`; `null` is none.
pub(crate) fn item_lines(value: &Json<'_>, key: &str) -> Result<Vec<Item>, InvalidEvent> {
    let lines = match value {
        Json::Null => return Ok(Vec::new()),
        Json::Array(lines) => lines,
        other => return Err(wrong_type(key, "an array", other)),
    };
    lines
        .iter()
        .map(|line| {
            let Json::Object(line) = line else {
                return Err(wrong_type(key, "an array of objects", line));
            };
            item(line)
        })
        .collect()
}

/// Reads one product line (an item, or the product of an `add_to_cart`).
pub(crate) fn item(line: &Object<'_>) -> Result<Item, InvalidEvent> {
    let product_id = match ["product_id", "sku", "id"].iter().find_map(|k| line.get(k)) {
        Some(Json::Str(s)) => (&**s).into(),
        Some(Json::Num(n)) => n.to_string().into(),
        _ => "".into(),
    };
    Ok(Item {
        product_id,
        quantity: opt_num(line, "quantity")?.unwrap_or(1.0),
        price: opt_num(line, "price")?.unwrap_or(0.0),
        category: opt_str(line, "category")?.map(Into::into),
    })
}

/// The money of a purchase or refund: `revenue`, else `total`, else the sum of its items.
pub(crate) fn revenue(
    properties: Option<&Object<'_>>,
    items: &[Item],
) -> Result<Option<f64>, InvalidEvent> {
    money(
        |key| properties.map_or(Ok(None), |p| opt_num(p, key)),
        items,
    )
}

/// [`revenue`] over any reading of the properties (a document's, or the direct reader's
/// scalars): `amount` reads one money field, `Ok(None)` when it is absent or `null`. The
/// one place that says which fields are money, in which order.
pub(crate) fn money<E>(
    mut amount: impl FnMut(&str) -> Result<Option<f64>, E>,
    items: &[Item],
) -> Result<Option<f64>, E> {
    for key in ["revenue", "total"] {
        if let Some(money) = amount(key)? {
            return Ok(Some(money));
        }
    }
    Ok((!items.is_empty()).then(|| {
        items
            .iter()
            .fold(0.0, |total, i| total + i.price * i.quantity)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn reason(payload: &str) -> InvalidReason {
        parse_event(payload.as_bytes(), LIMIT).unwrap_err().reason
    }

    #[test]
    fn hostile_payloads_are_rejected_with_their_reason() {
        assert_eq!(reason(""), InvalidReason::Empty);
        assert_eq!(reason("{\"type\":"), InvalidReason::InvalidJson);
        assert_eq!(reason("[1,2]"), InvalidReason::NotAnObject);
        assert_eq!(reason("\"x\""), InvalidReason::NotAnObject);
        assert_eq!(reason(&"[".repeat(10_000)), InvalidReason::InvalidJson);
        assert_eq!(
            parse_event(&[0xff, 0xfe, b'{'], LIMIT).unwrap_err().reason,
            InvalidReason::InvalidJson
        );
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(LIMIT));
        assert_eq!(reason(&big), InvalidReason::Oversized);
    }

    #[test]
    fn a_payload_that_is_not_utf8_is_invalid_json_with_the_position() {
        let mut payload = br#"{"type":"page_view","customer_id":"c-1","ts":1}"#.to_vec();
        assert!(parse_event(&payload, LIMIT).is_ok());
        // A lead byte without its continuation, inside the customer id.
        payload[36] = 0xC3;
        let err = parse_event(&payload, LIMIT).unwrap_err();
        assert_eq!(err.reason, InvalidReason::InvalidJson);
        assert!(
            err.to_string().contains("line 1 column"),
            "no position in: {err}"
        );
    }

    #[test]
    fn a_missing_event_id_is_replaced_by_a_hash_of_the_message() {
        let payload = br#"{"type":"page_view","customer_id":"c-1","ts":"2026-11-23T10:00:00Z"}"#;
        let a = parse_event(payload, LIMIT).unwrap();
        let b = parse_event(payload, LIMIT).unwrap();
        assert_eq!(a.event_id, None);
        assert_eq!(a.dedup_key, b.dedup_key);
        assert_ne!(a.dedup_key, 0);
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser: each message parses or is rejected.
        #[test]
        fn arbitrary_bytes_are_parsed_or_rejected(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_event(&bytes, LIMIT);
        }

        /// Objects with the right keys holding values of any JSON type never panic the
        /// parser, and a rejection always says which field is wrong.
        #[test]
        fn any_value_in_any_known_field_is_parsed_or_rejected(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "type", "customer_id", "ts", "event_id", "session_id", "properties", "context",
                        "traits", "userId", "anonymousId", "messageId", "timestamp", "event",
                    ]),
                    proptest::sample::select(vec![
                        "null", "true", "-1", "1e400", "0", "1.5", "\"\"", "\"x\"", "\"2026-01-01T00:00:00Z\"",
                        "[]", "[1]", "{}", "{\"items\": 3}", "{\"revenue\": \"9\"}", "{\"products\": [{}]}",
                    ]),
                ),
                0..8,
            )
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            let payload = format!("{{{}}}", body.join(", "));
            if let Err(err) = parse_event(payload.as_bytes(), LIMIT) {
                proptest::prop_assert!(!err.detail.is_empty());
            }
        }
    }

    #[test]
    fn a_customer_id_with_a_control_character_is_refused() {
        let payload = br#"{"type":"page_view","customer_id":"\u0000rules:1","ts":1}"#;
        let err = parse_event(payload, 1 << 16).unwrap_err();
        assert_eq!(err.reason, InvalidReason::WrongType);
        assert!(err.detail.contains("control character"), "{}", err.detail);
    }

    #[test]
    fn stable_hash_is_deterministic_and_distinguishes_ids() {
        assert_eq!(stable_hash(b"e-1"), stable_hash(b"e-1"));
        assert_ne!(stable_hash(b"e-1"), stable_hash(b"e-2"));
    }
}
