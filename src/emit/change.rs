//! The segment-change event (SPEC §3): what the engine produces and what goes, as one JSON
//! message per change, onto the output topic.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

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
        event_id: Option<Box<str>>,
        /// The event's type.
        event_type: Box<str>,
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

    /// The JSON record, with `emitted_at` set to the moment it is sent.
    pub fn to_json(&self, emitted_at: Millis) -> Value {
        let cause = match &self.cause {
            Cause::Event {
                event_id,
                event_type,
            } => {
                json!({"kind": "event", "event_id": event_id.as_deref(), "type": &**event_type})
            }
            Cause::Timer => json!({"kind": "timer"}),
            Cause::RulesChanged => json!({"kind": "rules_changed"}),
        };
        let facts: Map<String, Value> = self
            .facts
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        json!({
            "id": self.id(),
            "schema": SCHEMA,
            "customer_id": &*self.customer_id,
            "segment": &*self.segment,
            "transition": self.transition.as_str(),
            "at": format_timestamp(self.at),
            "emitted_at": format_timestamp(emitted_at),
            "cause": cause,
            "seq": self.seq,
            "segments": self.segments.iter().map(|s| &**s).collect::<Vec<_>>(),
            "facts": facts,
            "cart": self.cart,
            "rules_version": &*self.rules_version,
        })
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
