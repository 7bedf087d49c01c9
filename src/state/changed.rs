//! The customers whose state changed since the last changelog checkpoint, each with its
//! state encoded as it was after its last change.
//!
//! A state is encoded right after the event or timer that changed it, while it is still
//! in the CPU's cache: at 50,000 events/s a customer's state read back at the checkpoint
//! is usually not, and encoding it then cost four to six times as much (BENCHMARKS.md,
//! "the changelog's encoding waits on memory"). A customer changed again before the
//! checkpoint is encoded again; the checkpoint takes the last encoding of each.

use std::collections::HashMap;

use super::CustomerStore;
use super::codec::encode_state_part;

/// Changed customers and their states' encodings ([`encode_state_part`]), by id.
#[derive(Debug, Default)]
pub struct ChangedStates {
    encoded: HashMap<Box<str>, Box<[u8]>, foldhash::fast::RandomState>,
    /// Reused for every encoding; each is then copied out at its exact length.
    scratch: Vec<u8>,
}

impl ChangedStates {
    /// Nothing changed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `customer`'s state in `store` has just changed: encodes it, replacing any earlier
    /// encoding. A customer no longer in the store is forgotten (nothing to write).
    pub fn note(&mut self, store: &CustomerStore, customer: &str) {
        self.scratch.clear();
        let scratch = &mut self.scratch;
        let found = store.read(customer, |state| encode_state_part(state, scratch));
        if found.is_none() {
            self.encoded.remove(customer);
            return;
        }
        let bytes: Box<[u8]> = self.scratch.as_slice().into();
        match self.encoded.get_mut(customer) {
            Some(encoded) => *encoded = bytes,
            None => {
                self.encoded.insert(customer.into(), bytes);
            }
        }
    }

    /// How many customers changed.
    pub fn len(&self) -> usize {
        self.encoded.len()
    }

    /// Whether none did.
    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    /// The changed customers and their encodings, in no particular order; none is left.
    pub fn take(&mut self) -> Vec<(Box<str>, Box<[u8]>)> {
        self.encoded.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CustomerState;
    use crate::state::codec::{Summary, decode_state};

    fn state(events: u64) -> CustomerState {
        let mut state = CustomerState::default();
        state.customer.events = events;
        state
    }

    /// Each customer is taken once, with its state as at its last change (the summary,
    /// then the state); a customer that left the store is not taken.
    #[test]
    fn the_last_change_of_each_customer_is_taken_once() {
        let store = CustomerStore::new();
        let mut changed = ChangedStates::new();
        store.insert("a".into(), state(1));
        store.insert("b".into(), state(1));
        changed.note(&store, "a");
        changed.note(&store, "b");
        store.insert("a".into(), state(2));
        changed.note(&store, "a");
        changed.note(&store, "gone");
        assert_eq!(changed.len(), 2);

        let mut taken = changed.take();
        taken.sort();
        assert!(changed.is_empty());
        let events: Vec<(&str, u64)> = taken
            .iter()
            .map(|(id, bytes)| {
                let (summary, rest) = postcard::take_from_bytes::<Summary>(bytes).unwrap();
                assert_eq!(summary, Summary::default());
                (&**id, decode_state(rest).unwrap().customer.events)
            })
            .collect();
        assert_eq!(events, [("a", 2), ("b", 1)]);
    }
}
