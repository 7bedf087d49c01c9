//! The segment-change event (SPEC §3): what the engine produces and what goes, as one JSON
//! message per change, onto the output topic.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::Text;
use crate::time::{Millis, format_timestamp};

/// The `schema` field of every change record.
pub const SCHEMA: &str = "segmentd.segment_change.v1";

/// A customer entered or left a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The customer became a member.
    Entered,
    /// The customer stopped being a member.
    Exited,
}

impl Transition {
    /// The word used in JSON, headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Entered => "entered",
            Transition::Exited => "exited",
        }
    }
}

/// What caused a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// An input event.
    Event {
        /// The event's id, if the producer sent one.
        event_id: Option<Text>,
        /// The event's type.
        event_type: Text,
    },
    /// Time alone (a deadline passed).
    Timer,
    /// The rules were changed and re-evaluated.
    RulesChanged,
}

/// One segment change of one customer.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentChange {
    /// Whose membership changed; also the Kafka key.
    pub customer_id: Box<str>,
    /// Which segment.
    pub segment: Arc<str>,
    /// In or out.
    pub transition: Transition,
    /// Event time at which the change became true.
    pub at: Millis,
    /// Why it was evaluated.
    pub cause: Cause,
    /// The customer's change counter: +1 per change, so consumers can order and dedupe.
    pub seq: u64,
    /// The customer's full membership after the change, sorted.
    pub segments: Vec<Arc<str>>,
    /// The values the rule read, by the sub-expression's text.
    pub facts: Vec<(Box<str>, Value)>,
    /// The cart lines at the time of the change.
    pub cart: Value,
    /// Which rules produced it.
    pub rules_version: Arc<str>,
}

impl SegmentChange {
    /// The change's id, derived from (customer, seq) alone so that a change re-emitted
    /// after a crash carries the same id and consumers can drop it.
    pub fn id(&self) -> String {
        change_id(&self.customer_id, self.seq)
    }

    /// The JSON record, with `emitted_at` set to the moment it is sent: serialized
    /// straight from the change (no intermediate JSON tree), with the fields in the order
    /// of their names, as consumers have always seen them.
    pub fn record(&self, emitted_at: Millis) -> ChangeRecord<'_> {
        let cause = match &self.cause {
            Cause::Event {
                event_id,
                event_type,
            } => CauseRecord {
                event_id: Some(event_id.as_deref()),
                kind: "event",
                event_type: Some(event_type.as_str()),
            },
            Cause::Timer => CauseRecord::kind("timer"),
            Cause::RulesChanged => CauseRecord::kind("rules_changed"),
        };
        ChangeRecord {
            at: format_timestamp(self.at),
            cart: &self.cart,
            cause,
            customer_id: &self.customer_id,
            emitted_at: format_timestamp(emitted_at),
            // Sorted by text; a text listed twice keeps its last value.
            facts: self.facts.iter().map(|(k, v)| (&**k, v)).collect(),
            id: self.id(),
            rules_version: &self.rules_version,
            schema: SCHEMA,
            segment: &self.segment,
            segments: self.segments.iter().map(|s| &**s).collect(),
            seq: self.seq,
            transition: self.transition.as_str(),
        }
    }

    /// The JSON record as a value (tests, tools).
    pub fn to_json(&self, emitted_at: Millis) -> Value {
        serde_json::to_value(self.record(emitted_at)).expect("change records always serialize")
    }
}

/// A change as its JSON record (SPEC §3), borrowing from the change.
#[derive(Debug, Serialize)]
pub struct ChangeRecord<'a> {
    at: String,
    cart: &'a Value,
    cause: CauseRecord<'a>,
    customer_id: &'a str,
    emitted_at: String,
    facts: BTreeMap<&'a str, &'a Value>,
    /// The change's id (also sent as a header).
    pub id: String,
    rules_version: &'a str,
    schema: &'static str,
    segment: &'a str,
    segments: Vec<&'a str>,
    seq: u64,
    transition: &'static str,
}

/// `cause`: `{"kind": "timer"}`, or with the event's `event_id` (possibly null) and `type`.
#[derive(Debug, Serialize)]
struct CauseRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<Option<&'a str>>,
    kind: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
}

impl CauseRecord<'_> {
    fn kind(kind: &'static str) -> Self {
        CauseRecord {
            event_id: None,
            kind,
            event_type: None,
        }
    }
}

/// `sc-` and 32 hex digits of SHA-256 over the customer id and the sequence number.
pub fn change_id(customer_id: &str, seq: u64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(customer_id.as_bytes());
    hasher.update([0]);
    hasher.update(seq.to_be_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(35);
    id.push_str("sc-");
    for byte in &digest[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_record_serializes_with_sorted_keys_and_a_null_event_id() {
        let change = SegmentChange {
            customer_id: "c-1".into(),
            segment: "s".into(),
            transition: Transition::Exited,
            at: 0,
            cause: Cause::Event {
                event_id: None,
                event_type: "page_view".into(),
            },
            seq: 2,
            segments: vec![],
            facts: vec![
                ("b".into(), json!(1)),
                ("a".into(), json!(2)),
                ("b".into(), json!(3)),
            ],
            cart: json!([]),
            rules_version: "v".into(),
        };
        let text = serde_json::to_string(&change.record(0)).unwrap();
        assert!(
            text.starts_with(r#"{"at":"1970-01-01T00:00:00.000Z","cart":[],"cause":{"event_id":null,"kind":"event","type":"page_view"},"customer_id":"c-1","#),
            "{text}"
        );
        assert!(
            text.contains(r#""facts":{"a":2,"b":3},"id":"sc-"#),
            "{text}"
        );
        assert!(
            text.ends_with(r#""segments":[],"seq":2,"transition":"exited"}"#),
            "{text}"
        );
        let timer = SegmentChange {
            cause: Cause::Timer,
            ..change
        };
        assert_eq!(timer.to_json(0)["cause"], json!({"kind": "timer"}));
    }

    #[test]
    fn the_id_depends_only_on_customer_and_seq() {
        assert_eq!(change_id("c-42", 18), change_id("c-42", 18));
        assert_ne!(change_id("c-42", 18), change_id("c-42", 19));
        assert_ne!(change_id("c-42", 18), change_id("c-4", 218));
        assert_eq!(change_id("c-42", 18).len(), 35);
    }

    #[test]
    fn the_record_has_every_spec_field() {
        let change = SegmentChange {
            customer_id: "c-42".into(),
            segment: "cart_abandoner".into(),
            transition: Transition::Entered,
            at: 0,
            cause: Cause::Event {
                event_id: Some("e-1".into()),
                event_type: "add_to_cart".into(),
            },
            seq: 1,
            segments: vec!["cart_abandoner".into()],
            facts: vec![("cart.items".into(), json!(3))],
            cart: json!([]),
            rules_version: "sha256:00".into(),
        };
        let record = change.to_json(5);
        for key in [
            "id",
            "schema",
            "customer_id",
            "segment",
            "transition",
            "at",
            "emitted_at",
            "cause",
            "seq",
            "segments",
            "facts",
            "cart",
            "rules_version",
        ] {
            assert!(record.get(key).is_some(), "missing {key}");
        }
        assert_eq!(record["cause"]["kind"], "event");
        assert_eq!(record["facts"]["cart.items"], 3);
        assert_eq!(record["at"], "1970-01-01T00:00:00.000Z");
    }
}
