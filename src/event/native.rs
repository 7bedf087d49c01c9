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

use super::json::Object;
use super::{
    Event, InvalidEvent, InvalidReason, carries_money, customer_id, items, opt_object, opt_str,
    revenue, scalar_props, stable_hash, timestamp,
};

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
        context: scalar_props(opt_object(&object, "context")?),
        traits: scalar_props(traits),
        revenue,
        partition: 0,
    })
}

#[cfg(test)]
mod tests {
    use crate::event::{InvalidReason, PropValue, parse_event};
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
            crate::event::lookup(&event.context, "country"),
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
