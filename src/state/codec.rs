//! The changelog's binary encoding of a customer's state, and of the rules it refers to.
//!
//! A customer record is one version byte ([`FORMAT_VERSION`]) followed by a compact
//! serde encoding (postcard: varints, no field names) of [`Snapshot`]: the fingerprint
//! of the rules the state was built with, the input positions it includes, a
//! [`Summary`] (the pending timer and the segments: what a restore needs without
//! decoding the state), and the state itself — whose bytes a restore keeps as they are
//! for an idle customer ([`read_record`]). Version 1 records (no summary) are still
//! read. State refers to segments and rule slots by index, which only means
//! something under the same rules; so each set of rules is written once as a
//! [`RulesDictionary`] (its segment ids and slot descriptions, in index order), and a
//! state written under other rules is translated on restore: memberships by segment id,
//! slots by description, anything the current rules no longer have dropped.
//!
//! Decoding never panics: truncated, corrupt or future-version bytes are an error.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::CustomerState;
use super::slots::SlotState;
use crate::rules::RuleSet;

/// The first byte of every record; bumped whenever the encoding changes incompatibly.
pub const FORMAT_VERSION: u8 = 2;

/// Version 1: state records without a [`Summary`]; everything else as version 2.
const VERSION_WITHOUT_SUMMARY: u8 = 1;

/// Why a changelog record could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The record is empty.
    #[error("empty record")]
    Empty,
    /// Written by a newer (or unknown) encoding.
    #[error("unknown format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u8),
    /// The bytes after the version do not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// A customer's state as the changelog holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`RuleSet::fingerprint`] of the rules `state` was built with.
    pub rules: u64,
    /// For each input topic, the offset of the last message of the customer's partition
    /// the state includes: after a restart, the customer's events at or before it are
    /// already applied and are skipped.
    pub positions: Vec<(Box<str>, i64)>,
    /// What a restore needs of the state without decoding it.
    pub summary: Summary,
    /// The state.
    pub state: CustomerState,
}

/// The parts of a state a restore needs at once: the pending timer, and the segments
/// (by index) for the member counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The state's pending timer.
    pub timer: Option<crate::time::Millis>,
    /// The segments it is in, by index.
    pub segments: Vec<u16>,
}

impl Summary {
    /// The summary of `state`.
    pub fn of(state: &CustomerState) -> Self {
        Summary {
            timer: state.timer,
            segments: state.segments.iter().map(|m| m.segment).collect(),
        }
    }
}

impl Snapshot {
    /// A record of `state`, built under the rules `rules`, including `positions`.
    pub fn new(rules: u64, positions: Vec<(Box<str>, i64)>, state: CustomerState) -> Self {
        Snapshot {
            rules,
            positions,
            summary: Summary::of(&state),
            state,
        }
    }
}

/// What the indexes in states written under one set of rules mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RulesDictionary {
    /// The rules' fingerprint.
    pub rules: u64,
    /// Segment ids in index order.
    pub segments: Vec<Box<str>>,
    /// Slot descriptions in index order.
    pub slots: Vec<Box<str>>,
}

impl RulesDictionary {
    /// The dictionary of `rules`.
    pub fn of(rules: &RuleSet) -> Self {
        RulesDictionary {
            rules: rules.fingerprint,
            segments: rules.segments.iter().map(|s| (*s.id).into()).collect(),
            slots: rules
                .slots
                .iter()
                .map(|s| s.describe.as_str().into())
                .collect(),
        }
    }
}

/// Encodes `value` behind the version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Sized for a typical customer's state, so the vector rarely grows while written.
    let mut bytes = Vec::with_capacity(ENCODED_CAPACITY);
    bytes.push(FORMAT_VERSION);
    append(value, bytes)
}

/// Appends `value`'s postcard encoding to `bytes`: a record's, an idle customer's.
pub fn append<T: Serialize + ?Sized>(value: &T, bytes: Vec<u8>) -> Vec<u8> {
    // Writing to a vector fails only on a serde error, and the types encoded here (plain
    // structs, vectors, strings, numbers) have none.
    postcard::serialize_with_flavor(value, Appended(bytes)).expect("state types always serialize")
}

/// postcard's output for [`append`]: a vector, to which a single byte is pushed rather
/// than copied. Most of what a state writes is a one-byte varint (small counts, lengths,
/// enum tags), and postcard's own vector output hands each write to `memcpy`, whose call
/// costs more than the byte: 15.6 % fewer instructions per encoded state (callgrind,
/// BENCHMARKS.md). The bytes are postcard's, whatever writes them.
struct Appended(Vec<u8>);

impl postcard::ser_flavors::Flavor for Appended {
    type Output = Vec<u8>;

    #[inline(always)]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        if let [byte] = bytes {
            self.0.push(*byte);
        } else {
            self.0.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Initial capacity of an encoded record: above the ~265 bytes of an average customer
/// of the reference rules.
pub const ENCODED_CAPACITY: usize = 512;

/// Decodes a record written by [`encode`] (a rules dictionary, or a state record of
/// this version; [`read_record`] reads state records of every version).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION && version != VERSION_WITHOUT_SUMMARY {
        return Err(DecodeError::Version(version));
    }
    postcard::from_bytes(body).map_err(corrupt)
}

fn corrupt(err: postcard::Error) -> DecodeError {
    DecodeError::Corrupt(err.to_string())
}

/// A state record read up to its state.
#[derive(Debug, PartialEq)]
pub struct Record<'a> {
    /// [`Snapshot::rules`].
    pub rules: u64,
    /// [`Snapshot::positions`].
    pub positions: Vec<(Box<str>, i64)>,
    /// [`Snapshot::summary`]; `None` in a version 1 record.
    pub summary: Option<Summary>,
    /// The state's own encoding (the record's tail: postcard writes a struct's fields one
    /// after the other), for [`decode_state`] — or to keep as an idle customer as is.
    pub state: &'a [u8],
}

/// Reads a state record of any version up to its state, which stays encoded.
pub fn read_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let (rules, rest) = postcard::take_from_bytes::<u64>(body).map_err(corrupt)?;
    let (positions, rest) = postcard::take_from_bytes(rest).map_err(corrupt)?;
    let (summary, state) = match version {
        FORMAT_VERSION => {
            let (summary, state) = postcard::take_from_bytes(rest).map_err(corrupt)?;
            (Some(summary), state)
        }
        VERSION_WITHOUT_SUMMARY => (None, rest),
        other => return Err(DecodeError::Version(other)),
    };
    Ok(Record {
        rules,
        positions,
        summary,
        state,
    })
}

/// Decodes a state's own encoding ([`Record::state`], or an idle customer's).
pub fn decode_state(bytes: &[u8]) -> Result<CustomerState, DecodeError> {
    postcard::from_bytes(bytes).map_err(corrupt)
}

/// Translates states written under other rules to the current ones.
pub struct Translator {
    current: RulesDictionary,
    /// Index maps from each known older rules' indexes to the current ones.
    known: HashMap<u64, IndexMap>,
}

/// For one older set of rules: each old segment's and slot's current index, if any.
struct IndexMap {
    segments: Vec<Option<u16>>,
    slots: Vec<Option<u16>>,
}

/// What became of a restored state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Written under the current rules: taken as it is.
    Same,
    /// Written under other, known rules: memberships and slots moved to the current
    /// indexes; those the current rules lack dropped.
    Translated,
    /// Written under rules whose dictionary was never seen: built-in facts kept,
    /// memberships and slots dropped.
    Unknown,
}

impl Translator {
    /// A translator to `rules`.
    pub fn new(rules: &RuleSet) -> Self {
        Translator {
            current: RulesDictionary::of(rules),
            known: HashMap::new(),
        }
    }

    /// Learns what an older set of rules' indexes mean.
    pub fn learn(&mut self, dictionary: &RulesDictionary) {
        let position = |list: &[Box<str>], name: &str| {
            list.iter()
                .position(|n| **n == *name)
                .and_then(|i| u16::try_from(i).ok())
        };
        let map = IndexMap {
            segments: dictionary
                .segments
                .iter()
                .map(|id| position(&self.current.segments, id))
                .collect(),
            slots: dictionary
                .slots
                .iter()
                .map(|d| position(&self.current.slots, d))
                .collect(),
        };
        self.known.insert(dictionary.rules, map);
    }

    /// Makes `state`, written under the rules with fingerprint `rules`, refer to the
    /// current rules.
    pub fn translate(&self, rules: u64, state: &mut CustomerState) -> Translation {
        if rules == self.current.rules {
            return Translation::Same;
        }
        let Some(map) = self.known.get(&rules) else {
            state.segments.clear();
            state.slots.clear();
            // Rules that no longer exist set it: the next event computes a new one.
            state.timer = None;
            return Translation::Unknown;
        };
        state.segments.retain_mut(|m| {
            match map.segments.get(usize::from(m.segment)).copied().flatten() {
                Some(index) => {
                    m.segment = index;
                    true
                }
                None => false,
            }
        });
        let mut slots = vec![SlotState::Empty; self.current.slots.len()];
        for (old, slot) in std::mem::take(&mut state.slots).into_iter().enumerate() {
            if let Some(index) = map.slots.get(old).copied().flatten() {
                slots[usize::from(index)] = slot;
            }
        }
        state.slots = slots;
        state.timer = None;
        Translation::Translated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Engine;
    use crate::event::parse_event;
    use crate::generate::{Format, Generator, GeneratorConfig};
    use crate::rules::SegmentDef;
    use crate::state::new_store;
    use std::sync::Arc;

    fn rules_from(defs: &[(&str, &str)]) -> RuleSet {
        let defs: Vec<SegmentDef> = defs
            .iter()
            .map(|(id, enter)| SegmentDef::new(id, enter))
            .collect();
        RuleSet::compile(&defs).expect("rules compile")
    }

    fn reference_rules() -> RuleSet {
        let text = std::fs::read_to_string("config/segmentd.toml").expect("shipped config");
        let config = Config::from_toml_only(&text, "config/segmentd.toml").expect("parses");
        config.rule_set().expect("rules compile")
    }

    /// Every customer of generated traffic, under the reference rules.
    fn generated_states(rules: RuleSet) -> Vec<(Box<str>, CustomerState)> {
        let engine = Engine::new(Arc::new(rules), new_store(), 30 * 60 * 1000);
        let mut generator = Generator::new(GeneratorConfig {
            customers: 300,
            seed: 11,
            format: Format::Mixed,
            invalid_share: 0.0,
        });
        let mut out = Vec::new();
        for i in 0..20_000 {
            let message = generator.next_at(1_767_225_600_000 + i * 1_000);
            if let Ok(event) = parse_event(&message.payload, 1 << 20) {
                engine.apply(&event, &mut out);
            }
        }
        let mut states = Vec::new();
        engine
            .store()
            .for_each(|id, state| states.push((id.into(), state.clone())));
        states
    }

    #[test]
    fn every_generated_customer_round_trips_exactly() {
        let rules = reference_rules();
        let fingerprint = rules.fingerprint;
        let states = generated_states(rules);
        assert!(states.len() > 200);
        for (id, state) in states {
            let positions = vec![("clickstream".into(), 41), ("purchases".into(), -1)];
            let snapshot = Snapshot::new(fingerprint, positions.clone(), state);
            let bytes = encode(&snapshot);
            assert_eq!(bytes[0], FORMAT_VERSION);
            // The same bytes as postcard's own output: records stay readable both ways.
            assert_eq!(
                bytes[1..],
                postcard::to_allocvec(&snapshot).unwrap(),
                "{id}"
            );
            let back: Snapshot = decode(&bytes).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(back, snapshot, "{id}");
            // Read without decoding the state: the summary, and the state's own bytes.
            let record = read_record(&bytes).unwrap();
            assert_eq!(record.summary.as_ref(), Some(&snapshot.summary));
            assert_eq!((record.rules, &record.positions), (fingerprint, &positions));
            assert_eq!(decode_state(record.state).unwrap(), snapshot.state, "{id}");
        }
    }

    #[test]
    fn version_1_records_are_still_read() {
        let (id, state) = generated_states(reference_rules()).remove(0);
        let positions: Vec<(Box<str>, i64)> = vec![("clickstream".into(), 9)];
        let mut bytes = vec![VERSION_WITHOUT_SUMMARY];
        bytes = postcard::to_extend(&(5u64, &positions, &state), bytes).unwrap();
        let record = read_record(&bytes).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(
            (record.rules, record.positions, record.summary),
            (5, positions, None)
        );
        assert_eq!(decode_state(record.state).unwrap(), state);
    }

    #[test]
    fn the_encoding_is_compact() {
        let states = generated_states(reference_rules());
        let total: usize = states
            .iter()
            .map(|(_, state)| encode(&Snapshot::new(1, vec![], state.clone())).len())
            .sum();
        let json: usize = states
            .iter()
            .map(|(_, s)| serde_json::to_vec(s).expect("json").len())
            .sum();
        // Far smaller than the same states as JSON.
        assert!(total * 2 < json, "binary {total} bytes vs JSON {json}");
    }

    #[test]
    fn truncated_corrupt_and_future_records_are_errors_not_panics() {
        let states = generated_states(reference_rules());
        let bytes = encode(&Snapshot::new(
            7,
            vec![("t".into(), 3)],
            states[0].1.clone(),
        ));
        assert_eq!(decode::<Snapshot>(&[]), Err(DecodeError::Empty));
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<Snapshot>(&future),
            Err(DecodeError::Version(v)) if v == FORMAT_VERSION + 1
        ));
        for cut in 1..bytes.len() {
            assert!(decode::<Snapshot>(&bytes[..cut]).is_err(), "cut at {cut}");
            let read = read_record(&bytes[..cut]).and_then(|r| decode_state(r.state));
            assert!(read.is_err(), "cut at {cut}");
        }
        // Arbitrary bytes after a valid version byte: an error or some state, never a panic.
        let mut noise = bytes.clone();
        for (i, byte) in noise.iter_mut().enumerate().skip(1) {
            *byte = byte.wrapping_mul(31).wrapping_add(i as u8);
        }
        let _ = decode::<Snapshot>(&noise);
        let _ = read_record(&noise).and_then(|r| decode_state(r.state));
    }

    #[test]
    fn a_state_from_older_rules_keeps_what_the_current_rules_still_have() {
        let old = rules_from(&[
            ("buyer", "count(purchase, 30d) >= 1"),
            ("browser", "count(page_view, 1d) >= 1"),
        ]);
        let new = rules_from(&[
            ("browser", "count(page_view, 1d) >= 1"),
            ("fan", "count(add_to_cart, 1d) >= 3"),
        ]);
        let mut state = CustomerState::default();
        state.segments = vec![
            crate::state::customer::Membership {
                segment: 0,
                entered_at: 5,
            },
            crate::state::customer::Membership {
                segment: 1,
                entered_at: 6,
            },
        ];
        state.slots = vec![SlotState::Instant(10), SlotState::Instant(20)];
        state.timer = Some(99);
        let mut translator = Translator::new(&new);
        let mut unknown = state.clone();
        assert_eq!(
            translator.translate(old.fingerprint, &mut unknown),
            Translation::Unknown
        );
        assert!(unknown.segments.is_empty() && unknown.slots.is_empty());

        translator.learn(&RulesDictionary::of(&old));
        assert_eq!(
            translator.translate(old.fingerprint, &mut state),
            Translation::Translated
        );
        // "browser" was index 1 and is now 0; "buyer" is gone.
        assert_eq!(state.segments.len(), 1);
        assert_eq!(
            (state.segments[0].segment, state.segments[0].entered_at),
            (0, 6)
        );
        let browser_slot = new
            .slots
            .iter()
            .position(|s| s.describe.contains("page_view"))
            .expect("page_view slot");
        assert_eq!(state.slots.len(), new.slots.len());
        assert_eq!(state.slots[browser_slot], SlotState::Instant(20));
        assert_eq!(state.timer, None);

        let mut same = CustomerState::default();
        assert_eq!(
            translator.translate(new.fingerprint, &mut same),
            Translation::Same
        );
    }
}
