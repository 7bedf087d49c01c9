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
//! A customer is encoded from a copy, outside the map's locks (each covers a whole shard
//! of the map), and the encoding swapped in only if the customer is still unused, so the
//! consume loop waits at most for a copy.
//!
//! Once a sweep has seen enough idle encodings it trains a compression dictionary on them
//! ([`pack`](super::pack)); from then on sweeps keep idle customers *packed* (about half
//! the bytes), including those restored or encoded before. Once the states have grown
//! well past the ones it learned from, a second dictionary is trained and sweeps repack
//! the first one's customers with it. Waking a packed customer decompresses it first
//! (about a microsecond more).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use dashmap::mapref::one::MappedRefMut;

use super::CustomerState;
use super::pack::{self, Dictionaries, Packer};
use crate::event::Text;

/// The map's hasher.
type Hasher = foldhash::fast::RandomState;

/// A customer as the store holds it: 16 bytes in the map's slot (two variants, each a
/// pointer; a third would take 24), so the map's spare slots cost little.
pub enum Stored {
    /// Decoded, ready for events.
    Active(Box<Active>),
    /// Encoded: a [`Header`], then the state — in postcard, or [`Packer::pack`]'s output
    /// of it. Written and read by this module only.
    Idle(Box<[u8]>),
}

/// A decoded customer.
pub struct Active {
    /// The state.
    state: CustomerState,
    /// Whether the state was used since the last sweep.
    used: bool,
}

/// What an idle customer's bytes start with: its input partition number, and the
/// dictionary the state after it is packed with (0: plain postcard) — as one varint,
/// `partition << 2 | dictionary` (one byte for the first 32 partitions).
#[derive(Clone, Copy)]
struct Header {
    partition: i32,
    dictionary: u8,
    /// The header's length in bytes.
    len: usize,
}

impl Header {
    /// The header `bytes` start with.
    fn of(bytes: &[u8]) -> Header {
        let (value, rest) =
            postcard::take_from_bytes::<u32>(bytes).expect("idle states start with a header");
        Header {
            partition: (value >> 2) as i32,
            dictionary: (value & 3) as u8,
            len: bytes.len() - rest.len(),
        }
    }

    /// Appends the header of a state of `partition` (never negative), packed with
    /// `dictionary` (0: plain).
    fn write(partition: i32, dictionary: u8, bytes: Vec<u8>) -> Vec<u8> {
        let value = (partition as u32) << 2 | u32::from(dictionary);
        postcard::to_extend(&value, bytes).expect("a number always serializes")
    }
}

impl Stored {
    /// A decoded customer, marked used.
    fn active(state: CustomerState) -> Stored {
        Stored::Active(Box::new(Active { state, used: true }))
    }

    /// The input partition number of the customer (without decoding an idle one).
    fn partition(&self) -> i32 {
        match self {
            Stored::Active(active) => active.state.partition,
            Stored::Idle(bytes) => Header::of(bytes).partition,
        }
    }

    /// The state, decoded if idle (the store holds it active from now on).
    fn activate(&mut self, dictionaries: &Dictionaries) -> &mut CustomerState {
        if let Stored::Idle(_) = self {
            *self = Stored::active(self.state(dictionaries).into_owned());
        }
        match self {
            Stored::Active(active) => {
                active.used = true;
                &mut active.state
            }
            Stored::Idle(_) => unreachable!("activated above"),
        }
    }

    /// Calls `visit` with the state (an idle one decoded for the call).
    fn visit<R>(&self, dictionaries: &Dictionaries, visit: impl FnOnce(&CustomerState) -> R) -> R {
        visit(&self.state(dictionaries))
    }

    /// The state: an active one borrowed, an idle one decoded.
    fn state(&self, dictionaries: &Dictionaries) -> Cow<'_, CustomerState> {
        match self {
            Stored::Active(active) => Cow::Borrowed(&active.state),
            Stored::Idle(bytes) => {
                let header = Header::of(bytes);
                Cow::Owned(match header.dictionary {
                    0 => decode_state_bytes(header.partition, &bytes[header.len..]),
                    _ => unpack_idle(bytes, header, dictionaries),
                })
            }
        }
    }
}

/// Decodes a packed customer. Bytes that do not unpack (only a bug could cause it: they
/// are this process's own) give an empty state, logged, as in [`decode_state_bytes`].
fn unpack_idle(bytes: &[u8], header: Header, dictionaries: &Dictionaries) -> CustomerState {
    let Header {
        partition,
        dictionary,
        len,
    } = header;
    let unpacked = dictionaries
        .get(dictionary)
        .ok_or_else(|| format!("the store has no dictionary {dictionary}"))
        .and_then(|packer| {
            packer
                .unpack(bytes, len, |raw| decode_state_bytes(partition, raw))
                .map_err(|err| err.to_string())
        });
    unpacked.unwrap_or_else(|err| {
        tracing::error!(error = %err, partition, "An idle customer's state does not decompress; it starts again empty.");
        CustomerState {
            partition,
            ..CustomerState::default()
        }
    })
}

/// `bytes` (an idle customer, plain or packed with an older dictionary) packed with
/// `packer`, dictionary number `number`; `None` if it cannot be (then it stays as it is).
fn pack_idle(
    dictionaries: &Dictionaries,
    packer: &Packer,
    number: u8,
    bytes: &[u8],
) -> Option<Box<[u8]>> {
    let header = Header::of(bytes);
    let packed_header = Header::write(header.partition, number, Vec::new());
    if header.dictionary == 0 {
        return packer.pack(&packed_header, &bytes[header.len..]);
    }
    let old = dictionaries.get(header.dictionary)?;
    old.unpack(bytes, header.len, |raw| packer.pack(&packed_header, raw))
        .ok()
        .flatten()
}

/// The postcard encoding in an unpacked idle customer's bytes.
fn unpacked_state(bytes: &[u8]) -> &[u8] {
    &bytes[Header::of(bytes).len..]
}

/// An idle customer's encoding.
fn encode_idle(state: &CustomerState) -> Box<[u8]> {
    // Sized like a changelog record, so the buffer rarely grows while written; the box
    // then keeps the exact length.
    let bytes = Vec::with_capacity(super::codec::ENCODED_CAPACITY);
    let bytes = Header::write(state.partition, 0, bytes);
    super::codec::append(state, bytes).into_boxed_slice()
}

/// Decodes a state of input partition `partition`. Bytes that do not decode — only a
/// corrupt or hostile changelog record can hold them — give an empty state, logged: the
/// customer starts again rather than the process stopping.
fn decode_state_bytes(partition: i32, bytes: &[u8]) -> CustomerState {
    let mut state = super::codec::decode_state(bytes).unwrap_or_else(|err| {
        tracing::error!(error = %err, partition, "A restored customer's state does not decode; it starts again empty.");
        CustomerState::default()
    });
    state.partition = partition;
    state
}

/// A customer's state borrowed for writing (the map's lock of its shard held).
pub type StateMut<'a> = MappedRefMut<'a, Text, Stored, CustomerState>;

/// Called with a customer's id and state each time the state is borrowed for writing,
/// before the borrower sees it, under the customer's lock: a changelog checkpoint that
/// has not yet copied the state takes it here, as it was at the checkpoint.
pub type WriteHook = Box<dyn Fn(&str, &CustomerState) + Send + Sync>;

/// Shards of the store's map, each behind a lock of its own. DashMap's default is four
/// per core, 8 on two cores; but the changelog's encoder reads a customer under its
/// shard's lock while it encodes it (a few microseconds, tens of thousands of times a
/// second, at a lower priority than the consume loop, so sometimes preempted while
/// holding it), and a write of the loop to the same shard waits. With 8 shards, at 50,000
/// events/s, the loop waited for a shard 419 times in 5 s (perf, BENCHMARKS.md).
const SHARDS: usize = 256;

/// Every customer's state (see the module documentation). Cloning shares the map.
#[derive(Clone)]
pub struct CustomerStore {
    /// Keyed by customer id, held inline when short (most ids are): a lookup compares the
    /// id without following a pointer to it.
    map: Arc<DashMap<Text, Stored, Hasher>>,
    /// The dictionaries packed customers are compressed with, as sweeps train them.
    dictionaries: Arc<Dictionaries>,
    /// Called before every write (see [`WriteHook`]), once set.
    write_hook: Arc<OnceLock<WriteHook>>,
}

/// How far [`CustomerStore::prefetch`] reaches into a customer's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// The state itself.
    State,
    /// The vectors the state points to (slots, segments, cart, context, traits,
    /// categories).
    Parts,
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Customers encoded by this sweep.
    pub encoded: usize,
    /// Idle customers compressed by this sweep.
    pub packed: usize,
    /// Customers idle after it.
    pub idle: usize,
    /// Customers in the store.
    pub customers: usize,
}

impl Default for CustomerStore {
    fn default() -> Self {
        CustomerStore {
            map: Arc::new(DashMap::with_hasher_and_shard_amount(
                Hasher::default(),
                SHARDS,
            )),
            dictionaries: Arc::default(),
            write_hook: Arc::default(),
        }
    }
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

    /// Sets the hook called before every write (once; a second one is ignored).
    pub fn set_write_hook(&self, hook: WriteHook) {
        let _ = self.write_hook.set(hook);
    }

    /// The customer's state for an event or a timer, decoded if idle.
    pub fn get_mut(&self, id: &str) -> Option<StateMut<'_>> {
        let dictionaries = &*self.dictionaries;
        let state = self
            .map
            .get_mut(id)?
            .map(|stored| stored.activate(dictionaries));
        if let Some(hook) = self.write_hook.get() {
            hook(id, &state);
        }
        Some(state)
    }

    /// The customer's state, a new empty one if unknown.
    pub fn get_or_default(&self, id: &str) -> StateMut<'_> {
        if let Some(state) = self.get_mut(id) {
            return state;
        }
        let dictionaries = &*self.dictionaries;
        self.map
            .entry(Text::from(id))
            .or_insert_with(|| Stored::active(CustomerState::default()))
            .map(|stored| stored.activate(dictionaries))
    }

    /// Puts `state` in the store, active, replacing (and returning) any previous one.
    pub fn insert(&self, id: Box<str>, state: CustomerState) -> Option<CustomerState> {
        self.replace(id, Stored::active(state))
    }

    /// Puts `state` in the store idle (a restored customer: most stay quiet for a while),
    /// replacing (and returning) any previous one.
    pub fn insert_idle(&self, id: Box<str>, state: &CustomerState) -> Option<CustomerState> {
        self.replace(id, Stored::Idle(encode_idle(state)))
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
        let mut bytes = Header::write(partition, 0, Vec::with_capacity(5 + encoded.len()));
        bytes.extend_from_slice(encoded);
        self.replace(id, Stored::Idle(bytes.into_boxed_slice()))
    }

    /// Puts `stored` in the map; returns the state it replaced.
    fn replace(&self, id: Box<str>, stored: Stored) -> Option<CustomerState> {
        // Through `String`: a long id keeps its heap block, a short one moves inline.
        let previous = self.map.insert(Text::from(String::from(id)), stored)?;
        Some(match previous {
            Stored::Active(active) => active.state,
            idle => idle.state(&self.dictionaries).into_owned(),
        })
    }

    /// Calls `each` with every one of `ids` in turn, having asked the CPU for the memory of
    /// the customers a few places ahead ([`prefetch`](super::prefetch)): for a reader
    /// going through many customers cold in the cache — a changelog checkpoint someone
    /// waits for, whose customers changed up to a commit interval ago. Reading them waits
    /// on memory most of the time: `restore/encode_100k_customers_from_the_store` in
    /// `benches/engine.rs` takes about twice as long as its `_prefetched` twin.
    pub fn with_prefetch<T: AsRef<str>>(&self, ids: &mut [T], mut each: impl FnMut(&mut T)) {
        /// How many customers ahead the state is asked for; half as many, its vectors.
        const AHEAD: usize = 8;
        for i in 0..ids.len() {
            if let Some(ahead) = ids.get(i + AHEAD) {
                self.prefetch(ahead.as_ref(), Reach::State);
            }
            if let Some(near) = ids.get(i + AHEAD / 2) {
                self.prefetch(near.as_ref(), Reach::Parts);
            }
            each(&mut ids[i]);
        }
    }

    /// Starts loading a customer's memory into the CPU's cache without waiting for it.
    /// `Reach::State` asks for the state; `Reach::Parts` for the vectors it points to,
    /// found in the state — so ask for the state some customers earlier. Unknown and idle
    /// customers are left alone.
    fn prefetch(&self, id: &str, reach: Reach) {
        let Some(stored) = self.map.get(id) else {
            return;
        };
        if let Stored::Active(active) = &*stored {
            match reach {
                Reach::State => super::prefetch::value(&**active),
                Reach::Parts => active.state.prefetch_parts(),
            }
        }
    }

    /// Calls `read` with the customer's state, if known (an idle one is decoded for the
    /// call and stays idle).
    pub fn read<R>(&self, id: &str, read: impl FnOnce(&CustomerState) -> R) -> Option<R> {
        Some(self.map.get(id)?.visit(&self.dictionaries, read))
    }

    /// Calls `visit` with every customer (idle ones decoded for the call).
    pub fn for_each(&self, mut visit: impl FnMut(&str, &CustomerState)) {
        for entry in self.map.iter() {
            entry.visit(&self.dictionaries, |state| visit(entry.key(), state));
        }
    }

    /// Calls `visit` with every active customer, and returns the bytes of the idle ones'
    /// encodings, packed or not (for memory diagnostics).
    pub fn for_each_active(&self, mut visit: impl FnMut(&str, &CustomerState)) -> usize {
        let mut idle_bytes = 0;
        for entry in self.map.iter() {
            match entry.value() {
                Stored::Active(active) => visit(entry.key(), &active.state),
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
                stored.visit(&self.dictionaries, &mut dropped);
            }
            !drop
        });
        before - self.map.len()
    }

    /// A copy of customer `id`, if it is active and unused since its mark was cleared:
    /// what a sweep encodes, outside the map's lock.
    fn unused_copy(&self, id: &str) -> Option<CustomerState> {
        match self.map.get(id)?.value() {
            Stored::Active(active) if !active.used => Some(active.state.clone()),
            _ => None,
        }
    }

    /// Puts `idle` (the encoding of an [`unused_copy`](Self::unused_copy)) in place of
    /// customer `id` if it is still active and unused — then nothing wrote to it since
    /// the copy, which is what the store holds. Returns whether it did.
    fn idle_if_unused(&self, id: &str, idle: Box<[u8]>) -> bool {
        let Some(mut entry) = self.map.get_mut(id) else {
            return false;
        };
        if !matches!(entry.value(), Stored::Active(active) if !active.used) {
            return false;
        }
        *entry.value_mut() = Stored::Idle(idle);
        true
    }

    /// One sweep: customers unused since the previous sweep are encoded (idle), the
    /// others' marks cleared; with a dictionary, idle customers are packed (or repacked,
    /// if an older dictionary packed them) with the latest, and while a dictionary is still
    /// to be trained, the sweep's encodings are its samples ([`Dictionaries::learn`]).
    /// Safe to run beside the engine (another thread).
    pub fn compact_idle(&self) -> Sweep {
        // Marks are cleared shard by shard; unmarked customers and idle ones not packed
        // with the latest dictionary are collected, then each encoded (from a copy, outside
        // the lock) or repacked (under it), if still unused or idle by then.
        let mut unused = Vec::new();
        let mut stale = Vec::new();
        let mut samples = Vec::new();
        let mut idle = 0;
        let dictionaries = &*self.dictionaries;
        let latest = dictionaries.latest();
        let sampling = dictionaries.wants_samples();
        for mut entry in self.map.iter_mut() {
            match entry.value_mut() {
                Stored::Active(active) if active.used => active.used = false,
                Stored::Active(_) => unused.push(entry.key().clone()),
                Stored::Idle(bytes) => {
                    idle += 1;
                    let dictionary = Header::of(bytes).dictionary;
                    match latest {
                        Some((number, _)) if dictionary != number => {
                            stale.push(entry.key().clone())
                        }
                        Some(_) => {}
                        // No dictionary yet: every idle encoding is plain, and a sample.
                        None if samples.len() < pack::MAX_SAMPLES => {
                            samples.push(unpacked_state(bytes).to_vec())
                        }
                        None => {}
                    }
                }
            }
        }
        let mut sweep = Sweep::default();
        for id in unused {
            // Encoded and packed outside the map's lock, which covers a whole shard (the
            // consume loop would wait on it).
            let Some(copy) = self.unused_copy(&id) else {
                continue;
            };
            let bytes = encode_idle(&copy);
            let sample = (sampling && samples.len() < pack::MAX_SAMPLES)
                .then(|| unpacked_state(&bytes).to_vec());
            let packed = latest.and_then(|(number, p)| pack_idle(dictionaries, p, number, &bytes));
            let was_packed = packed.is_some();
            if self.idle_if_unused(&id, packed.unwrap_or(bytes)) {
                samples.extend(sample);
                sweep.packed += usize::from(was_packed);
                sweep.encoded += 1;
            }
        }
        if let Some((number, packer)) = latest {
            for id in stale {
                if let Some(mut entry) = self.map.get_mut(&id)
                    && let Stored::Idle(bytes) = entry.value()
                    && Header::of(bytes).dictionary != number
                    && let Some(packed) = pack_idle(dictionaries, packer, number, bytes)
                {
                    *entry.value_mut() = Stored::Idle(packed);
                    sweep.packed += 1;
                }
            }
        }
        if sampling && let Some(number) = dictionaries.learn(&samples) {
            tracing::debug!(
                samples = samples.len(),
                dictionary = number,
                "Trained a dictionary idle customers are packed with."
            );
        }
        sweep.idle = idle + sweep.encoded;
        sweep.customers = self.map.len();
        sweep
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
        assert!(matches!(*store.map.get("a").unwrap(), Stored::Active(_)));
    }

    /// Every id is handed over once, in order — the first few, the last few within the
    /// look-ahead, unknown ones — whatever memory is asked for meanwhile.
    #[test]
    fn with_prefetch_hands_over_every_id_in_order() {
        let store = CustomerStore::new();
        let mut ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        for id in ids.iter().step_by(2) {
            store.insert(id.as_str().into(), state(0, 1));
        }
        let expected = ids.clone();
        let mut seen = Vec::new();
        store.with_prefetch(&mut ids, |id| seen.push(std::mem::take(id)));
        assert_eq!(seen, expected);
        let mut none: Vec<String> = Vec::new();
        store.with_prefetch(&mut none, |_| panic!("no id to hand over"));
    }

    /// Asking for a customer's memory ahead is a hint and nothing more: an idle customer
    /// stays idle (not decoded), an active one unchanged and still unused for the next
    /// sweep, an unknown one unknown.
    #[test]
    fn prefetching_changes_nothing() {
        let store = CustomerStore::new();
        store.insert("a".into(), state(2, 5));
        store.insert("b".into(), state(3, 7));
        store.compact_idle();
        store.get_mut("b").unwrap().customer.events += 1;
        store.compact_idle(); // a idle, b active
        for reach in [Reach::State, Reach::Parts] {
            for id in ["a", "b", "unknown"] {
                store.prefetch(id, reach);
            }
        }
        assert!(matches!(*store.map.get("a").unwrap(), Stored::Idle(_)));
        assert_eq!(store.read("b", |s| s.customer.events), Some(8));
        assert_eq!(store.len(), 2);
        // b was not used since the last sweep: prefetching it did not count as a use.
        assert_eq!(store.compact_idle().encoded, 1);
    }

    /// A customer written to while a sweep encodes its copy stays active, with the write:
    /// the encoding is swapped in only if nothing used the customer since the copy.
    #[test]
    fn a_write_while_a_sweep_encodes_keeps_the_customer_active() {
        let store = CustomerStore::new();
        store.insert("a".into(), state(2, 5));
        store.compact_idle(); // clears the mark
        let copy = store.unused_copy("a").expect("unused since the sweep");
        store.get_mut("a").unwrap().customer.events += 1; // the consume loop, meanwhile
        assert!(!store.idle_if_unused("a", encode_idle(&copy)));
        assert!(matches!(*store.map.get("a").unwrap(), Stored::Active(_)));
        assert_eq!(store.read("a", |s| s.customer.events), Some(6));

        // Unused from then on: the next two sweeps make it idle, with the write.
        store.compact_idle();
        assert_eq!(store.compact_idle().encoded, 1);
        assert_eq!(store.read("a", |s| s.customer.events), Some(6));
    }

    #[test]
    fn once_enough_customers_are_idle_they_are_packed_and_come_back_whole() {
        let store = CustomerStore::new();
        let count = pack::MIN_SAMPLES + 200;
        let customer = |i: usize| {
            // Partitions 0, 100, 200 and 300: headers of one and two bytes.
            let mut state = state(i as i32 % 4 * 100, i as u64);
            state
                .categories
                .push((format!("category-{}", i % 17).into(), i as u32));
            state.customer.first_seen = 1_767_225_600_000 + i as i64 * 1_000;
            state
        };
        for i in 0..count {
            store.insert(format!("c-{i}").into(), customer(i));
        }
        store.compact_idle();
        let sweep = store.compact_idle();
        assert_eq!(
            (sweep.encoded, sweep.packed),
            (count, 0),
            "trained, not yet packed"
        );
        assert!(store.dictionaries.get(1).is_some());
        let sweep = store.compact_idle();
        assert_eq!((sweep.packed, sweep.idle), (count, count));
        let packed_bytes = store.for_each_active(|_, _| panic!("every customer is idle"));
        let raw_bytes: usize = (0..count).map(|i| encode_idle(&customer(i)).len()).sum();
        assert!(
            packed_bytes < raw_bytes,
            "{packed_bytes} packed, {raw_bytes} raw"
        );
        // Read without waking, woken by use, and an unused one encoded straight to packed.
        assert_eq!(store.read("c-7", Clone::clone), Some(customer(7)));
        assert_eq!(*store.get_mut("c-8").unwrap(), customer(8));
        store.compact_idle();
        let sweep = store.compact_idle();
        assert_eq!((sweep.encoded, sweep.packed), (1, 1));
        assert_eq!(store.read("c-8", Clone::clone), Some(customer(8)));
        let dropped = store.drop_partitions(|p| p == 100, |s| assert_eq!(s.partition, 100));
        assert_eq!(dropped, (0..count).filter(|i| i % 4 == 1).count());
    }

    #[test]
    fn grown_states_train_a_second_dictionary_and_are_repacked_with_it() {
        let store = CustomerStore::new();
        let count = pack::MIN_SAMPLES + 100;
        // Young states first, then the same customers with much more history.
        let customer = |i: usize, grown: bool| {
            let mut state = state(i as i32 % 3, i as u64);
            let categories = if grown { 24 } else { 1 };
            for c in 0..categories {
                state
                    .categories
                    .push((format!("category-{}", (i + c) % 29).into(), c as u32));
            }
            state
        };
        let idle_after_two_sweeps = |grown: bool| {
            for i in 0..count {
                store.insert(format!("c-{i}").into(), customer(i, grown));
            }
            store.compact_idle();
            store.compact_idle()
        };
        idle_after_two_sweeps(false);
        assert!(store.dictionaries.get(1).is_some(), "the first is trained");
        assert!(store.dictionaries.get(2).is_none());
        // The same young states again teach nothing new.
        idle_after_two_sweeps(false);
        assert!(store.dictionaries.get(2).is_none(), "no growth, no second");
        let sweep = idle_after_two_sweeps(true);
        assert_eq!(sweep.encoded, count);
        assert!(
            store.dictionaries.get(2).is_some(),
            "grown states train a second"
        );
        // The next sweep repacks every customer the first dictionary packed.
        let sweep = store.compact_idle();
        assert_eq!(sweep.packed, count);
        for mut entry in store.map.iter_mut() {
            let Stored::Idle(bytes) = entry.value_mut() else {
                panic!("every customer is idle");
            };
            assert_eq!(Header::of(bytes).dictionary, 2);
        }
        for i in (0..count).step_by(37) {
            assert_eq!(
                store.read(&format!("c-{i}"), Clone::clone),
                Some(customer(i, true))
            );
        }
        assert_eq!(
            *store.get_mut("c-5").unwrap(),
            customer(5, true),
            "woken whole"
        );
    }

    /// The map's slots (half of them spare after it grows) hold a key and this.
    #[test]
    fn a_stored_customer_takes_two_words() {
        assert_eq!(std::mem::size_of::<Stored>(), 16);
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
