//! The dedup keys of a customer's most recent events, kept inside the state itself.
//!
//! Every event reads them first (is it a replay?), so they sit in the state's own
//! memory rather than behind a pointer of their own: a warm customer's keys are then
//! fetched with the state instead of by a second, dependent cache miss (the warm engine
//! bench: the read of the keys' heap block was 3 % of all its time). They encode exactly
//! as the `Vec<u64>` they replace, so stored states read the same.

use std::fmt;

use serde::de::{Error, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many recent event keys a customer remembers to recognise a replayed event.
pub const RECENT_EVENT_IDS: usize = 16;

/// Up to [`RECENT_EVENT_IDS`] keys, in the order they were first written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentKeys {
    keys: [u64; RECENT_EVENT_IDS],
    len: u8,
}

impl RecentKeys {
    /// The keys held.
    pub fn as_slice(&self) -> &[u64] {
        &self.keys[..usize::from(self.len)]
    }

    /// Whether all [`RECENT_EVENT_IDS`] places are taken.
    pub fn is_full(&self) -> bool {
        usize::from(self.len) == RECENT_EVENT_IDS
    }

    /// Adds `key` in the next free place; ignored when full (the caller overwrites then).
    pub fn push(&mut self, key: u64) {
        if !self.is_full() {
            self.keys[usize::from(self.len)] = key;
            self.len += 1;
        }
    }

    /// Overwrites the key at `index` (of those held).
    pub fn set(&mut self, index: usize, key: u64) {
        if index < usize::from(self.len) {
            self.keys[index] = key;
        }
    }
}

impl Serialize for RecentKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(usize::from(self.len)))?;
        for key in self.as_slice() {
            seq.serialize_element(key)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for RecentKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = RecentKeys;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "at most {RECENT_EVENT_IDS} recent event keys")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RecentKeys, A::Error> {
                let mut recent = RecentKeys::default();
                while let Some(key) = seq.next_element()? {
                    if recent.is_full() {
                        return Err(A::Error::invalid_length(RECENT_EVENT_IDS + 1, &self));
                    }
                    recent.push(key);
                }
                Ok(recent)
            }
        }
        deserializer.deserialize_seq(Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_encode_as_the_vector_they_replace() {
        for count in [0, 1, 7, RECENT_EVENT_IDS] {
            let keys: Vec<u64> = (0..count as u64).map(|k| k * 0x1_0000_0001).collect();
            let mut recent = RecentKeys::default();
            keys.iter().for_each(|&k| recent.push(k));
            let encoded = postcard::to_allocvec(&recent).unwrap();
            assert_eq!(encoded, postcard::to_allocvec(&keys).unwrap());
            assert_eq!(
                postcard::from_bytes::<RecentKeys>(&encoded).unwrap(),
                recent
            );
        }
    }

    #[test]
    fn more_keys_than_kept_are_an_error_not_a_panic() {
        let too_many: Vec<u64> = (0..=RECENT_EVENT_IDS as u64).collect();
        let encoded = postcard::to_allocvec(&too_many).unwrap();
        assert!(postcard::from_bytes::<RecentKeys>(&encoded).is_err());
    }

    #[test]
    fn a_full_set_takes_no_more_and_overwrites_in_place() {
        let mut recent = RecentKeys::default();
        (0..20).for_each(|k| recent.push(k));
        assert_eq!(recent.as_slice(), (0..16).collect::<Vec<u64>>());
        recent.set(3, 99);
        assert_eq!(recent.as_slice()[3], 99);
    }
}
