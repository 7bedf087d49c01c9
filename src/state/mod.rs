//! Per-customer state: the built-in facts ([`customer`]), the recent events' dedup keys
//! ([`recent`]), the rule-specific slots ([`slots`]), sliding windows ([`window`]), the
//! concurrent map that holds every customer, active or (encoded) idle ([`CustomerStore`]),
//! the encodings ([`codec`]) and the compression of idle ones ([`pack`]).
//!
//! Pure data and arithmetic: no I/O, no clock. The engine decides what time it is. Every
//! piece of state derives serde's traits, so a customer can be written out and read back
//! whole (a changelog, a dump).

pub mod codec;
pub mod customer;
pub mod pack;
pub mod prefetch;
pub mod recent;
pub mod slots;
pub mod store;
pub mod window;

pub use customer::CustomerState;
pub use store::CustomerStore;

/// An empty store.
pub fn new_store() -> CustomerStore {
    CustomerStore::new()
}
