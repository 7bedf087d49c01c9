//! segmentd's native input format:
//!
//! ```json
//! {"event_id": "e-9f1c", "type": "add_to_cart", "customer_id": "c-42",
//!  "ts": "2026-11-23T10:21:14.123Z", "session_id": "s-1",
//!  "properties": {"product_id": "p-7", "category": "shoes", "price": 59.90, "quantity": 1},
//!  "context": {"device": "mobile", "country": "DE"}}
//! ```
//!
//! `traits` (for `identify`) may stand at the top level or inside `properties`; purchase
//! lines are `properties.items`.

use std::borrow::Cow;

use super::json::{Json, Object};
use super::scan::Reader;
use super::{
    Context, Event, InvalidEvent, InvalidReason, PropValue, Props, carries_money, customer_id,
    item_lines, items, lookup, money, opt_object, opt_str, revenue, scalar_props, stable_hash,
    timestamp, upsert,
};
use crate::time;

/// Builds an [`Event`] from a native-format object.
pub fn from_object(object: Object<'_>) -> Result<Event, InvalidEvent> {
    let event_type = match opt_str(&object, "type")? {
        Some(t) if !t.trim().is_empty() => t,
        _ => {
            return Err(InvalidEvent::new(
                InvalidReason::MissingType,
                "the event has no `type`",
            ));
        }
    };
    let customer_id = customer_id(opt_str(&object, "customer_id")?, "customer_id")?;
    let ts = timestamp(&object, "ts")?;
    let event_id = opt_str(&object, "event_id")?;
    let properties = opt_object(&object, "properties")?;
    let traits = match opt_object(&object, "traits")? {
        Some(traits) => Some(traits),
        None => properties
            .map(|p| opt_object(p, "traits"))
            .transpose()?
            .flatten(),
    };
    let (items, revenue) = if carries_money(event_type) {
        let items = items(properties, "items")?;
        let revenue = revenue(properties, &items)?;
        (items, revenue)
    } else {
        (Vec::new(), None)
    };
    Ok(Event {
        event_id: event_id.map(Into::into),
        dedup_key: event_id.map_or(0, |id| stable_hash(id.as_bytes())),
        event_type: event_type.into(),
        customer_id,
        ts,
        session_id: opt_str(&object, "session_id")?.map(Into::into),
        properties: scalar_props(properties),
        items,
        context: Context::Members(scalar_props(opt_object(&object, "context")?)),
        traits: scalar_props(traits),
        revenue,
        partition: 0,
    })
}

/// Reads a native-format event straight from its text, building the [`Event`] as the
/// members go by instead of reading a document first (`parse/native` in `benches/engine.rs`
/// measures both). Only for the common case — the payload within what [`Reader`] reads,
/// every field of its expected type, no key repeated, nothing wrong — and `None` for
/// anything else, every invalid event included: the caller then reads a document and calls
/// [`from_object`], which gives the same event or the precise error. A property test holds
/// the two ways to the same events.
pub(super) fn read_direct(text: &str) -> Option<Event> {
    let mut reader = Reader::new(text);
    let mut seen = 0u8;
    let mut event_type = None;
    let mut customer = None;
    let mut ts = None;
    let mut event_id = None;
    let mut session_id = None;
    let mut properties = Properties::default();
    let mut context = Context::default();
    let mut traits = None;
    reader.members(1, |reader, key| {
        let bit = match key {
            "type" => 1,
            "customer_id" => 2,
            "ts" => 4,
            "event_id" => 8,
            "session_id" => 16,
            "properties" => 32,
            "context" => 64,
            "traits" => 128,
            // A Segment-spec event (no `customer_id` before its own keys): left at once to
            // the document, which tells the formats apart.
            "userId" | "anonymousId" | "messageId" | "timestamp" if customer.is_none() => {
                return None;
            }
            _ => return reader.value(1).map(drop),
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match key {
            "type" => event_type = Some(string_at(reader)?),
            "customer_id" => customer = Some(string_at(reader)?),
            "ts" => {
                ts = Some(if reader.peek()? == b'"' {
                    time::parse_timestamp(reader.string()?)?
                } else {
                    match reader.value(1)? {
                        Json::Num(n) => n.as_i64().filter(|ms| *ms >= 0)?,
                        _ => return None,
                    }
                });
            }
            "event_id" => event_id = optional_string_at(reader)?,
            "session_id" => session_id = optional_string_at(reader)?,
            "properties" => {
                let (mut items, mut nested_traits) = (None, None);
                let scalars = scalar_members(reader, |key, value| {
                    match key {
                        "items" => items = Some(value),
                        "traits" => nested_traits = Some(value),
                        // Money in a container is an error for a purchase: left to from_object.
                        "revenue" | "total" => return None,
                        _ => {}
                    }
                    Some(())
                })?;
                properties = Properties {
                    scalars: scalars.unwrap_or_default(),
                    items,
                    traits: nested_traits,
                };
            }
            // Native context and traits are flat; nested ones are usually the Segment spec's
            // (whose context comes first), and are left to the document as soon as seen.
            // The context is checked here, and its members read only if a customer's state
            // takes them (`Context::Text`).
            "context" => {
                reader.peek()?;
                let start = reader.offset();
                if walk_members(reader, |_, value| (!is_container(&value)).then_some(()))? {
                    let json = reader.text_since(start);
                    context = Context::Text {
                        digest: stable_hash(json.as_bytes()),
                        json: json.into(),
                    };
                }
            }
            _ => traits = scalar_members(reader, |_, _| None)?,
        }
        Some(())
    })?;
    if !reader.finished() {
        return None;
    }
    let event_type = event_type.filter(|t| !t.trim().is_empty())?;
    let customer_id = customer_id(customer, "customer_id").ok()?;
    let traits = match (traits, properties.traits) {
        (Some(traits), _) => traits,
        (None, Some(Json::Object(nested))) => scalar_props(Some(&nested)),
        (None, Some(_)) => return None,
        (None, None) if is_set(&properties.scalars, "traits") => return None,
        (None, None) => Props::new(),
    };
    let (items, revenue) = if carries_money(event_type) {
        if is_set(&properties.scalars, "items") {
            return None;
        }
        let items = match &properties.items {
            Some(lines) => item_lines(lines, "items").ok()?,
            None => Vec::new(),
        };
        let amount = |key: &str| match lookup(&properties.scalars, key) {
            None | Some(PropValue::Null) => Ok(None),
            Some(PropValue::Num(money)) => Ok(Some(*money)),
            // Text or a boolean: an error for a purchase, worded by from_object.
            Some(_) => Err(()),
        };
        let revenue = money(amount, &items).ok()?;
        (items, revenue)
    } else {
        (Vec::new(), None)
    };
    Some(Event {
        event_id: event_id.map(Into::into),
        dedup_key: event_id.map_or(0, |id| stable_hash(id.as_bytes())),
        event_type: event_type.into(),
        customer_id,
        ts: ts?,
        session_id: session_id.map(Into::into),
        properties: properties.scalars,
        items,
        context,
        traits,
        revenue,
        partition: 0,
    })
}

/// What [`read_direct`] keeps of `properties`: its scalars, and the containers the event
/// reads (`items`, and `traits` when they are not at the top level).
#[derive(Default)]
struct Properties<'a> {
    scalars: Props,
    items: Option<Json<'a>>,
    traits: Option<Json<'a>>,
}

/// The most members [`scalar_members`] reads in one object (more: left to the document).
const MAX_DIRECT_MEMBERS: usize = 32;

/// Walks the value at `reader` as an object of properties (two levels deep), handing
/// `each` every member's key and value as written (a key may repeat). `Some(true)` for an
/// object, `Some(false)` for `null`; `None` for anything else, more than
/// [`MAX_DIRECT_MEMBERS`] members, or a `None` from `each`.
fn walk_members<'a>(
    reader: &mut Reader<'a>,
    mut each: impl FnMut(&'a str, Json<'a>) -> Option<()>,
) -> Option<bool> {
    if reader.peek()? == b'n' {
        return matches!(reader.value(1)?, Json::Null).then_some(false);
    }
    let mut count = 0;
    reader.members(2, |reader, key| {
        count += 1;
        if count > MAX_DIRECT_MEMBERS {
            return None;
        }
        // Text, most values, read without going through every JSON type.
        let value = if reader.peek()? == b'"' {
            Json::Str(Cow::Borrowed(reader.string()?))
        } else {
            reader.value(2)?
        };
        each(key, value)
    })?;
    Some(true)
}

/// Reads the value at `reader` as an object of properties ([`walk_members`]), keeping its
/// scalar members in order and handing each container member to `container`. `Some(None)`
/// for `null`; `None` where a key repeats.
fn scalar_members<'a>(
    reader: &mut Reader<'a>,
    mut container: impl FnMut(&'a str, Json<'a>) -> Option<()>,
) -> Option<Option<Props>> {
    // Room for the usual few members at once: growing from empty costs more.
    let mut props = Props::with_capacity(4);
    let mut keys = [""; MAX_DIRECT_MEMBERS];
    let mut count = 0;
    let object = walk_members(reader, |key, value| {
        if keys[..count].contains(&key) {
            return None;
        }
        keys[count] = key;
        count += 1;
        match PropValue::from_json_owned(value) {
            Ok(scalar) => {
                props.push((key.into(), scalar));
                Some(())
            }
            Err(nested) => container(key, nested),
        }
    })?;
    Some(object.then_some(props))
}

/// The members of a context kept as text ([`Context::Text`]; [`read_direct`] checked it:
/// a flat object of scalars). A key written again replaces the value where the key first
/// stood, as in a document.
pub(super) fn context_members(json: &str) -> Props {
    let mut props = Props::new();
    walk_members(&mut Reader::new(json), |key, value| {
        let scalar = PropValue::from_json_owned(value).ok()?;
        upsert(&mut props, key, &scalar, true, MAX_DIRECT_MEMBERS);
        Some(())
    });
    props
}

/// Whether a value is an array or an object.
fn is_container(value: &Json<'_>) -> bool {
    matches!(value, Json::Array(_) | Json::Object(_))
}

/// A string value at `reader`, read straight from the text (not built as a [`Json`] to be
/// taken apart and dropped); `None` for another type.
fn string_at<'a>(reader: &mut Reader<'a>) -> Option<&'a str> {
    match reader.peek()? {
        b'"' => reader.string(),
        _ => None,
    }
}

/// An optional string field at `reader`: `Some(None)` for `null`, `None` for another type.
fn optional_string_at<'a>(reader: &mut Reader<'a>) -> Option<Option<&'a str>> {
    match reader.peek()? {
        b'"' => reader.string().map(Some),
        _ => matches!(reader.value(1)?, Json::Null).then_some(None),
    }
}

/// Whether `props` holds `key` with a value other than `null`.
fn is_set(props: &Props, key: &str) -> bool {
    lookup(props, key).is_some_and(|value| *value != PropValue::Null)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::read_direct;
    use crate::event::json::Json;
    use crate::event::{Context, InvalidReason, PropValue, from_document, parse_event};
    use crate::generate::{Format, Generator, GeneratorConfig};
    use crate::time::parse_timestamp;

    const LIMIT: usize = 64 * 1024;

    #[test]
    fn the_spec_example_parses_into_every_field() {
        let payload = br#"{"event_id": "e-9f1c", "type": "add_to_cart", "customer_id": "c-42",
            "ts": "2026-11-23T10:21:14.123Z", "session_id": "s-1",
            "properties": {"product_id": "p-7", "category": "shoes", "price": 59.90, "quantity": 1},
            "context": {"device": "mobile", "country": "DE", "city": "Berlin",
                        "utm_source": "email", "user_agent": "Mozilla/5.0 ..."}}"#;
        let event = parse_event(payload, LIMIT).unwrap();
        assert_eq!(event.event_id.as_deref(), Some("e-9f1c"));
        assert_eq!(&*event.event_type, "add_to_cart");
        assert_eq!(&*event.customer_id, "c-42");
        assert_eq!(
            event.ts,
            parse_timestamp("2026-11-23T10:21:14.123Z").unwrap()
        );
        assert_eq!(event.session_id.as_deref(), Some("s-1"));
        assert_eq!(event.property("price"), Some(&PropValue::Num(59.90)));
        assert_eq!(
            event.property("category").and_then(PropValue::as_str),
            Some("shoes")
        );
        assert_eq!(
            crate::event::lookup(&event.context.members(), "country"),
            Some(&PropValue::Str("DE".into()))
        );
    }

    #[test]
    fn a_purchase_takes_revenue_then_total_then_its_items() {
        let with_revenue = br#"{"type":"purchase","customer_id":"c","ts":0,
            "properties":{"order_id":"o-1","revenue":120.5,"total":999,"currency":"EUR",
            "items":[{"product_id":"p-1","quantity":2,"price":10}]}}"#;
        let event = parse_event(with_revenue, LIMIT).unwrap();
        assert_eq!(event.revenue, Some(120.5));
        assert_eq!(event.items.len(), 1);
        assert_eq!(event.items[0].quantity, 2.0);

        let from_items = br#"{"type":"purchase","customer_id":"c","ts":0,
            "properties":{"items":[{"product_id":"p-1","quantity":2,"price":10},{"sku":"p-2","price":5}]}}"#;
        let event = parse_event(from_items, LIMIT).unwrap();
        assert_eq!(event.revenue, Some(25.0));
        assert_eq!(&*event.items[1].product_id, "p-2");
    }

    #[test]
    fn each_broken_field_has_its_own_reason() {
        let cases = [
            (r#"{"customer_id":"c","ts":0}"#, InvalidReason::MissingType),
            (
                r#"{"type":"","customer_id":"c","ts":0}"#,
                InvalidReason::MissingType,
            ),
            (r#"{"type":"x","ts":0}"#, InvalidReason::MissingCustomerId),
            (
                r#"{"type":"x","customer_id":"  ","ts":0}"#,
                InvalidReason::MissingCustomerId,
            ),
            (
                r#"{"type":"x","customer_id":42,"ts":0}"#,
                InvalidReason::WrongType,
            ),
            (
                r#"{"type":7,"customer_id":"c","ts":0}"#,
                InvalidReason::WrongType,
            ),
            (
                r#"{"type":"x","customer_id":"c"}"#,
                InvalidReason::MissingTimestamp,
            ),
            (
                r#"{"type":"x","customer_id":"c","ts":"last tuesday"}"#,
                InvalidReason::BadTimestamp,
            ),
            (
                r#"{"type":"x","customer_id":"c","ts":-5}"#,
                InvalidReason::BadTimestamp,
            ),
            (
                r#"{"type":"x","customer_id":"c","ts":1.5}"#,
                InvalidReason::BadTimestamp,
            ),
            (
                r#"{"type":"x","customer_id":"c","ts":true}"#,
                InvalidReason::WrongType,
            ),
            (
                r#"{"type":"x","customer_id":"c","ts":0,"properties":[]}"#,
                InvalidReason::WrongType,
            ),
            (
                r#"{"type":"purchase","customer_id":"c","ts":0,"properties":{"revenue":"12"}}"#,
                InvalidReason::WrongType,
            ),
            (
                r#"{"type":"purchase","customer_id":"c","ts":0,"properties":{"items":[1]}}"#,
                InvalidReason::WrongType,
            ),
        ];
        for (payload, expected) in cases {
            let err = parse_event(payload.as_bytes(), LIMIT).unwrap_err();
            assert_eq!(err.reason, expected, "{payload}: {err}");
        }
    }

    /// Generated native traffic, purchases and identifies included, takes the direct way.
    #[test]
    fn generated_events_are_read_directly_as_the_document_reads_them() {
        let mut generator = Generator::new(GeneratorConfig {
            seed: 3,
            customers: 500,
            format: Format::Native,
            invalid_share: 0.0,
        });
        let mut types = std::collections::BTreeSet::new();
        for i in 0..5_000 {
            let payload = generator.next_at(1_767_225_600_000 + i * 10).payload;
            let text = std::str::from_utf8(&payload).unwrap();
            let direct = read_direct(text).unwrap_or_else(|| panic!("not read directly: {text}"));
            assert_eq!(
                Ok(&direct),
                from_document(Json::parse(&payload)).as_ref(),
                "{text}"
            );
            types.insert(direct.event_type.to_string());
        }
        for kind in ["purchase", "identify", "add_to_cart", "page_view"] {
            assert!(types.contains(kind), "no {kind} among {types:?}");
        }
    }

    /// A JSON value for a member of a hostile native event: every type, right and wrong.
    fn member_value() -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("\"\"".to_owned()),
            Just("\" \"".to_owned()),
            Just("\"purchase\"".to_owned()),
            Just("\"refund\"".to_owned()),
            Just("\"page_view\"".to_owned()),
            Just("\"c-1\"".to_owned()),
            Just(format!("\"{}\"", "c".repeat(300))),
            Just("\"2026-11-23T10:21:14.123Z\"".to_owned()),
            Just("\"yesterday\"".to_owned()),
            Just("\"tab\\tbed\"".to_owned()),
            (-5i64..5).prop_map(|n| n.to_string()),
            Just("1767225600000".to_owned()),
            Just("12.5".to_owned()),
        ];
        scalar.prop_recursive(3, 24, 6, |inner| {
            let key = prop_oneof![
                Just("items"),
                Just("traits"),
                Just("revenue"),
                Just("total"),
                Just("price"),
                Just("quantity"),
                Just("product_id"),
                Just("category"),
                Just("sku"),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((key, inner), 0..5).prop_map(|members| {
                    let members: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest! {
        // Enough cases that a context with a repeated key, a rare draw, is read directly.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the direct way reads, the document way reads the same; what it leaves,
        /// the document way reads or rejects on its own.
        #[test]
        fn the_direct_way_reads_what_the_document_reads(
            members in prop::collection::vec(
                (
                    prop_oneof![
                        Just("type"), Just("customer_id"), Just("ts"), Just("event_id"),
                        Just("session_id"), Just("properties"), Just("context"),
                        Just("traits"), Just("userId"), Just("other"),
                    ],
                    prop_oneof![
                        3 => member_value(),
                        1 => prop_oneof![
                            Just(r#"{"items":[{"product_id":"p-1","price":10,"quantity":2}]}"#),
                            Just(r#"{"items":[{"sku":"p-2","price":5}],"revenue":null,"total":7}"#),
                            Just(r#"{"items":[{"id":3}],"traits":{"plan":"pro"},"revenue":"x"}"#),
                            Just(r#"{"items":null,"traits":null,"category":"shoes"}"#),
                            Just(r#"{"items":[1],"traits":[],"price":59.9}"#),
                            Just(r#"{"items":"none","revenue":12,"total":"no"}"#),
                            // Flat, a key repeated: a context kept as text.
                            Just(r#"{"device":"mobile","country":"DE","device":"desktop"}"#),
                            Just(r#"{"n":1,"m":true,"n":null,"m":"x"}"#),
                        ].prop_map(str::to_owned),
                    ],
                ),
                0..6,
            ),
            base in prop_oneof![
                Just(r#""type":"purchase","customer_id":"c-1","ts":5"#),
                Just(r#""type":"page_view","customer_id":"c-2","ts":"2026-11-23T10:21:14Z""#),
                Just(""),
            ],
        ) {
            let mut parts: Vec<String> =
                members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            if !base.is_empty() {
                parts.insert(parts.len() / 2, base.to_owned());
            }
            let text = format!("{{{}}}", parts.join(","));
            if let Some(direct) = read_direct(&text) {
                prop_assert_eq!(Ok(direct), from_document(Json::parse_text(&text)), "{}", text);
            }
        }
    }

    /// A context is kept as its text and read only when needed; a key written twice
    /// keeps its first place and its last value, as the document reads it.
    #[test]
    fn a_context_kept_as_text_reads_as_the_document_reads_it() {
        let text = r#"{"type":"page_view","customer_id":"c","ts":0,
            "context":{"device":"mobile","country":"DE","device":"desktop","n":1.5,"ok":null}}"#;
        let direct = read_direct(text).expect("read directly");
        assert!(
            matches!(&direct.context, Context::Text { digest, .. } if *digest != 0),
            "{:?}",
            direct.context
        );
        let members = direct.context.members();
        let keys: Vec<&str> = members.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["device", "country", "n", "ok"]);
        assert_eq!(members[0].1, PropValue::Str("desktop".into()));
        assert_eq!(Ok(&direct), from_document(Json::parse_text(text)).as_ref());

        let nested = r#"{"type":"page_view","customer_id":"c","ts":0,"context":{"app":{"v":1}}}"#;
        assert_eq!(
            read_direct(nested),
            None,
            "a nested context is the document's"
        );
    }

    #[test]
    fn an_overlong_customer_id_is_oversized() {
        let payload = format!(
            r#"{{"type":"x","customer_id":"{}","ts":0}}"#,
            "c".repeat(300)
        );
        let err = parse_event(payload.as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.reason, InvalidReason::Oversized);
    }
}
