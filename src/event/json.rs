//! A JSON document that borrows from the message it was parsed from.
//!
//! Parsing into `serde_json::Value` allocates a `String` for every key and every string and
//! a B-tree for every object, then the event's fields are copied out again. An input event
//! has a dozen keys, read once each: here strings without escapes stay slices of the
//! payload and an object is a small vector of pairs, so parsing allocates one vector per
//! object and the copies into [`Event`](super::Event) are the only ones made. The common
//! forms are read by a reader of our own ([`super::scan`]); everything else — escapes,
//! rare numbers, syntax errors, deep nesting — by serde_json, so errors, number range
//! checks and the nesting limit are exactly its own.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value, borrowing its strings from the payload where it can.
#[derive(Clone, Debug, PartialEq)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, as JSON wrote it (integer or not).
    Num(Number),
    /// A string: a slice of the payload unless it had escapes.
    Str(Cow<'a, str>),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object.
    Object(Object<'a>),
}

/// A JSON number: integers stay exact, anything else is an `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    /// A negative integer.
    Negative(i64),
    /// A non-negative integer.
    Positive(u64),
    /// A number with a fraction or an exponent.
    Float(f64),
}

impl Number {
    /// The number as a float (integers beyond 2^53 round, as in every JSON reader).
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Negative(n) => n as f64,
            Number::Positive(n) => n as f64,
            Number::Float(f) => f,
        }
    }

    /// The number as an `i64`, if it is an integer that fits.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Number::Negative(n) => Some(n),
            Number::Positive(n) => i64::try_from(n).ok(),
            Number::Float(_) => None,
        }
    }
}

impl fmt::Display for Number {
    /// The number as JSON would write it back (`7`, `-2`, `1.5`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Negative(n) => write!(f, "{n}"),
            Number::Positive(n) => write!(f, "{n}"),
            Number::Float(x) => match serde_json::Number::from_f64(*x) {
                Some(number) => write!(f, "{number}"),
                None => write!(f, "{x}"),
            },
        }
    }
}

/// A JSON object: its members in the order written. A key written twice keeps its last
/// value, as with serde_json's own map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Object<'a> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// How many members it has (to size what is built from it).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// The members, each key once with its last value, in the order first written.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(key, value)| (&**key, value))
    }

    /// Builds an object from its members as written: a key written again replaces the
    /// value where the key first stood. Linear in the members, also for hostile payloads
    /// of thousands of keys.
    pub(super) fn from_members(members: Vec<(Cow<'a, str>, Json<'a>)>) -> Object<'a> {
        let repeats = if members.len() <= 16 {
            (1..members.len()).any(|i| members[..i].iter().any(|(k, _)| *k == members[i].0))
        } else {
            let mut seen = HashSet::with_capacity(members.len());
            !members.iter().all(|(k, _)| seen.insert(&**k))
        };
        if !repeats {
            return Object(members);
        }
        let mut first_at: HashMap<Cow<'a, str>, usize> = HashMap::with_capacity(members.len());
        let mut unique: Vec<(Cow<'a, str>, Json<'a>)> = Vec::with_capacity(members.len());
        for (key, value) in members {
            match first_at.get(&key) {
                Some(&at) => unique[at].1 = value,
                None => {
                    first_at.insert(key.clone(), unique.len());
                    unique.push((key, value));
                }
            }
        }
        Object(unique)
    }
}

impl<'a> Json<'a> {
    /// Parses a payload: by [`super::scan`] when it can, else by serde_json; errors are
    /// serde_json's own (position included).
    pub fn parse(payload: &'a [u8]) -> Result<Json<'a>, serde_json::Error> {
        // One check of the whole payload is cheaper than serde_json's check of each string
        // read from bytes; a payload that fails it is read as bytes, for serde_json's
        // error with its position.
        match std::str::from_utf8(payload) {
            Ok(text) => Json::parse_text(text),
            Err(_) => serde_json::from_slice(payload),
        }
    }

    /// [`Json::parse`] for a payload already known to be UTF-8.
    pub fn parse_text(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        match super::scan::document(text) {
            Some(document) => Ok(document),
            None => serde_json::from_str(text),
        }
    }

    /// The value's kind for error messages ("a number", "an array", …).
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Num(_) => "a number",
            Json::Str(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Json::Num(if n < 0 {
            Number::Negative(n)
        } else {
            Number::Positive(n as u64)
        }))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Json::Num(Number::Positive(n)))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Self::Value, E> {
        Ok(Json::Num(Number::Float(x)))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(value) = seq.next_element()? {
            values.push(value);
        }
        Ok(Json::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(16));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            members.push((key.0, map.next_value()?));
        }
        Ok(Json::Object(Object::from_members(members)))
    }
}

/// An object key, borrowed from the payload unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescaped_strings_borrow_and_escaped_ones_are_decoded() {
        let payload = br#"{"a": "plain", "b\u0021": "tab\tbed", "n": [1, -2, 1.5, null, true]}"#;
        let Json::Object(object) = Json::parse(payload).unwrap() else {
            panic!("an object");
        };
        assert!(matches!(
            object.get("a"),
            Some(Json::Str(Cow::Borrowed("plain")))
        ));
        assert_eq!(object.get("b!"), Some(&Json::Str("tab\tbed".into())));
        assert_eq!(
            object.get("n"),
            Some(&Json::Array(vec![
                Json::Num(Number::Positive(1)),
                Json::Num(Number::Negative(-2)),
                Json::Num(Number::Float(1.5)),
                Json::Null,
                Json::Bool(true),
            ]))
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_once() {
        let Json::Object(object) = Json::parse(br#"{"k": 1, "j": 2, "k": 3}"#).unwrap() else {
            panic!("an object");
        };
        assert_eq!(object.get("k"), Some(&Json::Num(Number::Positive(3))));
        let members: Vec<&str> = object.iter().map(|(k, _)| k).collect();
        assert_eq!(members, ["k", "j"]);

        let many: Vec<String> = (0..40).map(|i| format!("\"k{}\": {i}", i % 30)).collect();
        let payload = format!("{{{}}}", many.join(","));
        let Json::Object(object) = Json::parse(payload.as_bytes()).unwrap() else {
            panic!("an object");
        };
        assert_eq!(object.iter().count(), 30);
        assert_eq!(object.get("k3"), Some(&Json::Num(Number::Positive(33))));
    }

    #[test]
    fn numbers_convert_exactly_where_they_can() {
        assert_eq!(Number::Positive(u64::MAX).as_i64(), None);
        assert_eq!(Number::Negative(-5).as_i64(), Some(-5));
        assert_eq!(Number::Float(2.0).as_i64(), None);
        assert_eq!(Number::Float(1.5).to_string(), "1.5");
        assert_eq!(Number::Positive(42).to_string(), "42");
    }

    #[test]
    fn syntax_errors_and_deep_nesting_are_serde_json_errors() {
        assert!(Json::parse(b"{\"a\":").is_err());
        assert!(Json::parse("[".repeat(10_000).as_bytes()).is_err());
        assert!(Json::parse(b"1e400").is_err());
    }
}
