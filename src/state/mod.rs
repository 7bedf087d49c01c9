//! Per-customer state: the built-in facts ([`customer`]), the rule-specific slots
//! ([`slots`]), sliding windows ([`window`]) and the concurrent map that holds every
//! customer ([`CustomerStore`]).
//!
//! Pure data and arithmetic: no I/O, no clock. The engine decides what time it is. Every
//! piece of state derives serde's traits, so a customer can be written out and read back
//! whole (a changelog, a dump).

pub mod codec;
pub mod customer;
pub mod slots;
pub mod window;

use std::sync::Arc;

use dashmap::DashMap;

pub use customer::CustomerState;

/// Every customer's state, shared between the engine (which writes) and the HTTP lookups
/// (which read). A sharded concurrent map: a lookup never waits for the whole map, only
/// for the one shard being written. States are boxed: a hash table keeps a share of its
/// slots empty (up to half, after it doubles), and an empty slot then costs the size of a
/// pointer, not of a whole state.
pub type CustomerStore = Arc<DashMap<Box<str>, Box<CustomerState>, foldhash::fast::RandomState>>;

/// An empty store.
pub fn new_store() -> CustomerStore {
    Arc::new(DashMap::with_hasher(foldhash::fast::RandomState::default()))
}
