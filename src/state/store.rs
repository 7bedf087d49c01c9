//! The customer store: every customer's state in a sharded concurrent map, shared between
//! the engine (which writes) and the HTTP lookups (which read).
//!
//! # Active and idle customers
//!
//! Most customers are quiet most of the time, and a decoded state — its slots, windows,
//! cart and context in vectors and strings of their own — takes several times the room of
//! its compact encoding. So a customer not used between two [sweeps](CustomerStore::compact_idle)
//! is kept *idle*: encoded in one allocation (postcard, about 250 bytes for the
//! reference rules). Its next event or timer decodes it back (about a microsecond) and
//! it is *active* again. The sweep is a second-chance scan: the first pass over an
//! active customer clears its `used` mark, the next one finds it unmarked and encodes it.
//! Encoding takes the map's lock of one customer at a time, so the consume loop never
//! waits for more than one encoding.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::one::MappedRefMut;

use super::CustomerState;

/// The map's hasher.
type Hasher = foldhash::fast::RandomState;

/// A customer as the store holds it.
pub enum Stored {
    /// Decoded, ready for events. `used`: touched since the last sweep.
    Active {
        /// The state (boxed: the map keeps spare slots, and an empty one then costs a
        /// pointer, not a state).
        state: Box<CustomerState>,
        /// Whether the state was used since the last sweep.
        used: bool,
    },
    /// Encoded: the input partition number (4 bytes, little-endian), then the state in
    /// postcard. Written and read by this module only.
    Idle(Box<[u8]>),
}

impl Stored {
    /// The input partition number of the customer (without decoding an idle one).
    fn partition(&self) -> i32 {
        match self {
            Stored::Active { state, .. } => state.partition,
            Stored::Idle(bytes) => {
                i32::from_le_bytes(bytes[..4].try_into().expect("idle states start with it"))
            }
        }
    }

    /// The state, decoded if idle (the store holds it active from now on).
    fn activate(&mut self) -> &mut CustomerState {
        if let Stored::Idle(bytes) = self {
            *self = Stored::Active {
                state: Box::new(decode_idle(bytes)),
                used: true,
            };
        }
        match self {
            Stored::Active { state, used } => {
                *used = true;
                state
            }
            Stored::Idle(_) => unreachable!("activated above"),
        }
    }
}

/// An idle customer's encoding.
fn encode_idle(state: &CustomerState) -> Box<[u8]> {
    // Sized like a changelog record, so the buffer rarely grows while written; the box
    // then keeps the exact length.
    let mut bytes = Vec::with_capacity(super::codec::ENCODED_CAPACITY);
    bytes.extend_from_slice(&state.partition.to_le_bytes());
    // Plain structs, vectors, strings and numbers: serializing them cannot fail.
    postcard::to_extend(state, bytes)
        .expect("state types always serialize")
        .into_boxed_slice()
}

/// Decodes an idle customer (written by [`encode_idle`], or a changelog record's state
/// bytes). Bytes that do not decode — only a corrupt or hostile changelog record can
/// hold them — give an empty state, logged: the customer starts again rather than the
/// process stopping.
fn decode_idle(bytes: &[u8]) -> CustomerState {
    let partition = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    let mut state = super::codec::decode_state(&bytes[4..]).unwrap_or_else(|err| {
        tracing::error!(error = %err, partition, "A restored customer's state does not decode; it starts again empty.");
        CustomerState::default()
    });
    state.partition = partition;
    state
}

/// A customer's state borrowed for writing (the map's lock of its shard held).
pub type StateMut<'a> = MappedRefMut<'a, Box<str>, Stored, CustomerState>;

/// Every customer's state (see the module documentation). Cloning shares the map.
#[derive(Clone, Default)]
pub struct CustomerStore {
    map: Arc<DashMap<Box<str>, Stored, Hasher>>,
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Customers encoded by this sweep.
    pub encoded: usize,
    /// Customers idle after it.
    pub idle: usize,
    /// Customers in the store.
    pub customers: usize,
}

impl CustomerStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many customers it holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds no customer.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The customer's state for an event or a timer, decoded if idle.
    pub fn get_mut(&self, id: &str) -> Option<StateMut<'_>> {
        Some(self.map.get_mut(id)?.map(Stored::activate))
    }

    /// The customer's state, a new empty one if unknown.
    pub fn get_or_default(&self, id: &str) -> StateMut<'_> {
        if let Some(state) = self.get_mut(id) {
            return state;
        }
        self.map
            .entry(Box::from(id))
            .or_insert_with(|| Stored::Active {
                state: Box::default(),
                used: true,
            })
            .map(Stored::activate)
    }

    /// Puts `state` in the store, active, replacing (and returning) any previous one.
    pub fn insert(&self, id: Box<str>, state: CustomerState) -> Option<CustomerState> {
        let stored = Stored::Active {
            state: Box::new(state),
            used: true,
        };
        self.map.insert(id, stored).map(into_state)
    }

    /// Puts `state` in the store idle (a restored customer: most stay quiet for a while),
    /// replacing (and returning) any previous one.
    pub fn insert_idle(&self, id: Box<str>, state: &CustomerState) -> Option<CustomerState> {
        self.map
            .insert(id, Stored::Idle(encode_idle(state)))
            .map(into_state)
    }

    /// Puts a customer in the store idle as `encoded` — a state's postcard encoding (a
    /// changelog record's tail), not decoded here — of input partition `partition`,
    /// replacing (and returning) any previous one. Bytes that do not decode are found out
    /// at the customer's next use, which then starts from an empty state.
    pub fn insert_encoded(
        &self,
        id: Box<str>,
        partition: i32,
        encoded: &[u8],
    ) -> Option<CustomerState> {
        let mut bytes = Vec::with_capacity(4 + encoded.len());
        bytes.extend_from_slice(&partition.to_le_bytes());
        bytes.extend_from_slice(encoded);
        self.map
            .insert(id, Stored::Idle(bytes.into_boxed_slice()))
            .map(into_state)
    }

    /// Calls `read` with the customer's state, if known (an idle one is decoded for the
    /// call and stays idle).
    pub fn read<R>(&self, id: &str, read: impl FnOnce(&CustomerState) -> R) -> Option<R> {
        let entry = self.map.get(id)?;
        Some(match entry.value() {
            Stored::Active { state, .. } => read(state),
            Stored::Idle(bytes) => read(&decode_idle(bytes)),
        })
    }

    /// Calls `visit` with every customer (idle ones decoded for the call).
    pub fn for_each(&self, mut visit: impl FnMut(&str, &CustomerState)) {
        for entry in self.map.iter() {
            match entry.value() {
                Stored::Active { state, .. } => visit(entry.key(), state),
                Stored::Idle(bytes) => visit(entry.key(), &decode_idle(bytes)),
            }
        }
    }

    /// Calls `visit` with every active customer, and returns the bytes of the idle ones'
    /// encodings (for memory diagnostics).
    pub fn for_each_active(&self, mut visit: impl FnMut(&str, &CustomerState)) -> usize {
        let mut idle_bytes = 0;
        for entry in self.map.iter() {
            match entry.value() {
                Stored::Active { state, .. } => visit(entry.key(), state),
                Stored::Idle(bytes) => idle_bytes += bytes.len(),
            }
        }
        idle_bytes
    }

    /// Removes the customers whose input partition `which` selects, calling `dropped`
    /// with each one's state. Returns how many were removed.
    pub fn drop_partitions(
        &self,
        which: impl Fn(i32) -> bool,
        mut dropped: impl FnMut(&CustomerState),
    ) -> usize {
        let before = self.map.len();
        self.map.retain(|_, stored| {
            let drop = which(stored.partition());
            if drop {
                match stored {
                    Stored::Active { state, .. } => dropped(state),
                    Stored::Idle(bytes) => dropped(&decode_idle(bytes)),
                }
            }
            !drop
        });
        before - self.map.len()
    }

    /// One sweep: customers unused since the previous sweep are encoded (idle), the
    /// others' marks cleared. Safe to run beside the engine (another thread).
    pub fn compact_idle(&self) -> Sweep {
        // Marks are cleared shard by shard; unmarked customers are collected, then each
        // encoded under its own lock, if still unused by then.
        let mut unused = Vec::new();
        let mut idle = 0;
        for mut entry in self.map.iter_mut() {
            match entry.value_mut() {
                Stored::Active {
                    used: used @ true, ..
                } => *used = false,
                Stored::Active { used: false, .. } => unused.push(entry.key().clone()),
                Stored::Idle(_) => idle += 1,
            }
        }
        let mut encoded = 0;
        for id in unused {
            if let Some(mut entry) = self.map.get_mut(&id)
                && let Stored::Active { state, used: false } = entry.value()
            {
                let bytes = encode_idle(state);
                *entry.value_mut() = Stored::Idle(bytes);
                encoded += 1;
            }
        }
        Sweep {
            encoded,
            idle: idle + encoded,
            customers: self.map.len(),
        }
    }
}

/// A replaced entry's state.
fn into_state(stored: Stored) -> CustomerState {
    match stored {
        Stored::Active { state, .. } => *state,
        Stored::Idle(bytes) => decode_idle(&bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(partition: i32, events: u64) -> CustomerState {
        let mut state = CustomerState {
            partition,
            ..CustomerState::default()
        };
        state.customer.events = events;
        state.categories.push(("shoes".into(), 3));
        state
    }

    #[test]
    fn an_unused_customer_goes_idle_after_two_sweeps_and_comes_back_whole() {
        let store = CustomerStore::new();
        store.insert("a".into(), state(2, 5));
        store.insert("b".into(), state(3, 7));
        assert_eq!(
            store.compact_idle().encoded,
            0,
            "first sweep only clears marks"
        );
        store.get_mut("b").unwrap().customer.events += 1; // b is used
        let sweep = store.compact_idle();
        assert_eq!((sweep.encoded, sweep.idle, sweep.customers), (1, 1, 2));
        assert!(matches!(*store.map.get("a").unwrap(), Stored::Idle(_)));
        // Read without waking it, then woken by use.
        assert_eq!(store.read("a", |s| s.customer.events), Some(5));
        assert!(matches!(*store.map.get("a").unwrap(), Stored::Idle(_)));
        let woken = store.get_mut("a").unwrap();
        assert_eq!(*woken, state(2, 5));
        drop(woken);
        assert!(matches!(
            *store.map.get("a").unwrap(),
            Stored::Active { .. }
        ));
    }

    #[test]
    fn partitions_are_dropped_idle_or_not() {
        let store = CustomerStore::new();
        store.insert("a".into(), state(1, 1));
        store.insert_idle("b".into(), &state(1, 2));
        let encoded = postcard::to_allocvec(&state(2, 4)).unwrap();
        store.insert_encoded("d".into(), 2, &encoded);
        assert_eq!(store.read("d", Clone::clone), Some(state(2, 4)));
        // Bytes that do not decode: an empty state, not a panic.
        store.insert_encoded("e".into(), 2, &[0xff; 7]);
        assert_eq!(store.get_mut("e").unwrap().customer.events, 0);
        store.insert("c".into(), state(2, 3));
        let mut seen = Vec::new();
        let dropped = store.drop_partitions(|p| p == 1, |s| seen.push(s.customer.events));
        seen.sort();
        assert_eq!((dropped, seen, store.len()), (2, vec![1, 2], 3));
    }
}
