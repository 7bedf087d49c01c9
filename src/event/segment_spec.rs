//! The Segment / RudderStack spec: `track`, `identify` and `page` calls, including the
//! e-commerce v2 events.
//!
//! Fields: `messageId`, `type`, `event`, `userId` (else `anonymousId`), `timestamp`,
//! `properties`, `traits`, `context`. Event names map onto segmentd's built-in types
//! (`Product Added` → `add_to_cart`, …); any other `track` name is lower-snake-cased.

use super::Text;
use super::json::Object;
use super::{
    Context, Event, InvalidEvent, InvalidReason, Props, carries_money, customer_id, items,
    opt_object, opt_str, revenue, scalar_props, stable_hash, timestamp,
};

/// Whether an object is a Segment-spec call rather than a native event. The spec's
/// camel-case identity keys never occur in the native format.
pub fn looks_like(object: &Object<'_>) -> bool {
    !object.contains_key("customer_id")
        && ["userId", "anonymousId", "messageId", "timestamp"]
            .iter()
            .any(|key| object.contains_key(key))
}

/// Builds an [`Event`] from a Segment-spec object.
pub fn from_object(object: Object<'_>) -> Result<Event, InvalidEvent> {
    let call = match opt_str(&object, "type")? {
        Some(t) if !t.trim().is_empty() => t,
        _ => {
            return Err(InvalidEvent::new(
                InvalidReason::MissingType,
                "the call has no `type`",
            ));
        }
    };
    let event_type = match call {
        "track" => match opt_str(&object, "event")? {
            Some(name) if !name.trim().is_empty() => track_event_type(name),
            _ => {
                return Err(InvalidEvent::new(
                    InvalidReason::MissingType,
                    "a `track` call has no `event` name",
                ));
            }
        },
        "page" => "page_view".to_owned(),
        other => snake_case(other),
    };
    let id = match opt_str(&object, "userId")? {
        Some(user) if !user.trim().is_empty() => Some(user),
        _ => opt_str(&object, "anonymousId")?,
    };
    let customer_id = customer_id(id, "userId` or `anonymousId")?;
    let ts = timestamp(&object, "timestamp")?;
    let message_id = opt_str(&object, "messageId")?;
    let properties = opt_object(&object, "properties")?;
    let context = opt_object(&object, "context")?;
    let (items, revenue) = if carries_money(&event_type) {
        let items = match items(properties, "products")? {
            products if products.is_empty() => items(properties, "items")?,
            products => products,
        };
        let revenue = revenue(properties, &items)?;
        (items, revenue)
    } else {
        (Vec::new(), None)
    };
    Ok(Event {
        event_id: message_id.map(Into::into),
        dedup_key: message_id.map_or(0, |id| stable_hash(id.as_bytes())),
        event_type: event_type.into(),
        customer_id,
        ts,
        session_id: session_id(properties, context)?,
        properties: scalar_props(properties),
        items,
        context: Context::Members(flat_context(context)?),
        traits: scalar_props(opt_object(&object, "traits")?),
        revenue,
        partition: 0,
    })
}

/// Maps a `track` event name to segmentd's type: the e-commerce v2 names with built-in
/// meaning, else the name in lower snake case.
pub fn track_event_type(name: &str) -> String {
    match name {
        "Product Viewed" => "product_view".to_owned(),
        "Product Added" => "add_to_cart".to_owned(),
        "Product Removed" => "remove_from_cart".to_owned(),
        "Checkout Started" => "checkout_started".to_owned(),
        "Order Completed" => "purchase".to_owned(),
        "Order Refunded" => "refund".to_owned(),
        "Products Searched" => "search".to_owned(),
        other => snake_case(other),
    }
}

/// `Newsletter Signed Up` → `newsletter_signed_up`, `signUp` → `sign_up`: words split at
/// spaces, punctuation and lower-to-upper case changes, joined by one underscore.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut previous_lower = false;
    for ch in name.chars() {
        if ch.is_alphanumeric() {
            if ch.is_uppercase() && previous_lower && !out.ends_with('_') {
                out.push('_');
            }
            previous_lower = ch.is_lowercase() || ch.is_ascii_digit();
            out.extend(ch.to_lowercase());
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            previous_lower = false;
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// The session: `properties.session_id`, else `context.sessionId` (RudderStack's field).
fn session_id(
    properties: Option<&Object<'_>>,
    context: Option<&Object<'_>>,
) -> Result<Option<Text>, InvalidEvent> {
    if let Some(id) = properties
        .map(|p| opt_str(p, "session_id"))
        .transpose()?
        .flatten()
    {
        return Ok(Some(id.into()));
    }
    Ok(context
        .map(|c| opt_str(c, "sessionId"))
        .transpose()?
        .flatten()
        .map(Into::into))
}

/// Flattens the spec's nested context into the keys rules use: `device` (the device type),
/// `country` and `city` (from `location`), `utm_source` … (from `campaign`), `user_agent`,
/// `ip`, `locale`, plus any other scalar entry as it is.
fn flat_context(context: Option<&Object<'_>>) -> Result<Props, InvalidEvent> {
    let Some(context) = context else {
        return Ok(Props::new());
    };
    let mut flat = scalar_props(Some(context));
    flat.retain(|(key, _)| !matches!(&**key, "userAgent" | "sessionId"));
    let mut put = |key: &str, value: Option<&str>| {
        if let Some(value) = value {
            let value = super::PropValue::Str(value.into());
            super::upsert(&mut flat, key, &value, true, usize::MAX);
        }
    };
    put("user_agent", opt_str(context, "userAgent")?);
    if let Some(device) = opt_object(context, "device")? {
        put("device", opt_str(device, "type")?);
    }
    if let Some(location) = opt_object(context, "location")? {
        put("country", opt_str(location, "country")?);
        put("city", opt_str(location, "city")?);
    }
    if let Some(campaign) = opt_object(context, "campaign")? {
        for (spec_key, key) in [
            ("source", "utm_source"),
            ("medium", "utm_medium"),
            ("name", "utm_campaign"),
            ("term", "utm_term"),
            ("content", "utm_content"),
        ] {
            put(key, opt_str(campaign, spec_key)?);
        }
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{PropValue, lookup, parse_event};

    const LIMIT: usize = 64 * 1024;

    fn parse(payload: &str) -> Event {
        parse_event(payload.as_bytes(), LIMIT).unwrap()
    }

    #[test]
    fn ecommerce_v2_names_map_to_built_in_types() {
        for (name, expected) in [
            ("Product Viewed", "product_view"),
            ("Product Added", "add_to_cart"),
            ("Product Removed", "remove_from_cart"),
            ("Checkout Started", "checkout_started"),
            ("Order Completed", "purchase"),
            ("Newsletter Signed Up", "newsletter_signed_up"),
            ("signUp", "sign_up"),
            ("  Video -- Played!", "video_played"),
        ] {
            assert_eq!(track_event_type(name), expected, "{name}");
        }
    }

    #[test]
    fn an_order_completed_call_becomes_a_purchase_with_items() {
        let event = parse(
            r#"{"type":"track","event":"Order Completed","userId":"u-1","anonymousId":"a-1",
                "messageId":"m-1","timestamp":"2026-11-23T10:00:00Z",
                "properties":{"order_id":"o-1","total":30,"currency":"USD",
                  "products":[{"product_id":"p-1","price":10,"quantity":3,"category":"shoes"}]},
                "context":{"device":{"type":"mobile"},"location":{"country":"DE","city":"Berlin"},
                  "campaign":{"source":"email"},"userAgent":"Mozilla"}}"#,
        );
        assert_eq!(&*event.event_type, "purchase");
        assert_eq!(&*event.customer_id, "u-1");
        assert_eq!(event.event_id.as_deref(), Some("m-1"));
        assert_eq!(event.revenue, Some(30.0));
        assert_eq!(event.items[0].category.as_deref(), Some("shoes"));
        assert_eq!(
            lookup(&event.context.members(), "device"),
            Some(&PropValue::Str("mobile".into()))
        );
        assert_eq!(
            lookup(&event.context.members(), "country"),
            Some(&PropValue::Str("DE".into()))
        );
        assert_eq!(
            lookup(&event.context.members(), "utm_source"),
            Some(&PropValue::Str("email".into()))
        );
        assert_eq!(
            lookup(&event.context.members(), "user_agent"),
            Some(&PropValue::Str("Mozilla".into()))
        );
    }

    #[test]
    fn revenue_wins_over_total() {
        let event = parse(
            r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":"2026-11-23T10:00:00Z",
                "properties":{"revenue":25,"total":30}}"#,
        );
        assert_eq!(event.revenue, Some(25.0));
    }

    #[test]
    fn identify_keeps_traits_and_page_becomes_page_view() {
        let identify = parse(
            r#"{"type":"identify","anonymousId":"a-9","timestamp":"2026-11-23T10:00:00Z",
                "traits":{"age":31,"industry":"retail"}}"#,
        );
        assert_eq!(&*identify.event_type, "identify");
        assert_eq!(&*identify.customer_id, "a-9");
        assert_eq!(lookup(&identify.traits, "age"), Some(&PropValue::Num(31.0)));
        let page = parse(r#"{"type":"page","userId":"u","timestamp":"2026-11-23T10:00:00Z"}"#);
        assert_eq!(&*page.event_type, "page_view");
    }

    #[test]
    fn a_track_call_without_a_name_or_a_user_is_rejected() {
        let no_name = r#"{"type":"track","userId":"u","timestamp":"2026-11-23T10:00:00Z"}"#;
        let err = parse_event(no_name.as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.reason, InvalidReason::MissingType);
        let no_user =
            r#"{"type":"track","event":"X","messageId":"m","timestamp":"2026-11-23T10:00:00Z"}"#;
        let err = parse_event(no_user.as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.reason, InvalidReason::MissingCustomerId);
    }
}
