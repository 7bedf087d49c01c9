//! A hierarchical timer wheel: at most one pending timer per customer, scheduled,
//! moved and cancelled in O(1), and fired in deadline order as a watermark advances.
//!
//! Level `L` has 64 slots, each `64^L` ms wide; a timer sits at the level of the highest
//! bit in which its deadline differs from the wheel's current time, so level 0 holds
//! the next 64 ms at millisecond precision and eleven levels cover every `i64` instant.
//! Advancing takes the earliest occupied slot: a level-0 slot fires (all its timers
//! share one deadline), a higher one is re-sorted into lower levels. So a timer is
//! touched at most once per level on its way down — the cost per timer does not grow
//! with the number pending, and advancing over an empty stretch of time costs nothing.
//!
//! Timers live in a slab of doubly linked nodes (a slot is a list), and a hash table of
//! node indexes, hashed and compared by their nodes' customer ids, gives the O(1)
//! reschedule and cancel (4 bytes an entry, where a map from id to index would hold the
//! id a second time: 24). A node is 32 bytes: the id, the deadline and its two links. Its
//! slot is not kept: the time moves only forward to the start of the earliest slot (whose
//! timers are then re-sorted) or to a watermark short of every slot, and neither changes
//! where any other timer belongs, so [`TimerWheel::position`] finds it from the deadline.

use std::borrow::Cow;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::time::Millis;

const LEVELS: usize = 11;
const SLOT_BITS: u32 = 6;
const SLOTS: u64 = 1 << SLOT_BITS;
const NONE: u32 = u32::MAX;

/// Order-preserving map of an instant onto the wheel's unsigned time line.
fn tick(at: Millis) -> u64 {
    (at as u64) ^ (1 << 63)
}

/// The instant of a point on the wheel's time line.
fn instant(tick: u64) -> Millis {
    (tick ^ (1 << 63)) as Millis
}

#[derive(Debug)]
struct Node {
    customer: Box<str>,
    deadline: Millis,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
struct Level {
    /// Bit `s` is set when slot `s` holds a timer.
    occupied: u64,
    heads: [u32; SLOTS as usize],
}

/// Pending timers of one partition, keyed by customer.
#[derive(Debug)]
pub struct TimerWheel {
    /// The wheel's time: every timer due at or before it has been handed out.
    elapsed: u64,
    levels: Vec<Level>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// The linked nodes' indexes, by their customer ids.
    by_customer: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Default for TimerWheel {
    fn default() -> Self {
        TimerWheel {
            elapsed: 0,
            levels: (0..LEVELS)
                .map(|_| Level {
                    occupied: 0,
                    heads: [NONE; SLOTS as usize],
                })
                .collect(),
            nodes: Vec::new(),
            free: Vec::new(),
            by_customer: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl TimerWheel {
    /// An empty wheel.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many timers are pending.
    pub fn len(&self) -> usize {
        self.by_customer.len()
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.by_customer.is_empty()
    }

    /// The pending deadline of `customer`, if any.
    pub fn deadline_of(&self, customer: &str) -> Option<Millis> {
        self.find(customer).map(|n| self.nodes[n as usize].deadline)
    }

    /// Sets (`Some`) or cancels (`None`) the one timer of `customer`, replacing any
    /// pending one. A deadline already passed fires at the next [`pop_due`](Self::pop_due).
    pub fn schedule(&mut self, customer: &str, deadline: Option<Millis>) {
        self.schedule_id(Cow::Borrowed(customer), deadline);
    }

    /// [`schedule`](Self::schedule) for a customer id the caller owns (one just handed out
    /// by [`pop_due`](Self::pop_due)): a new timer keeps it instead of copying the id.
    pub fn reschedule(&mut self, customer: Box<str>, deadline: Option<Millis>) {
        self.schedule_id(Cow::Owned(customer.into_string()), deadline);
    }

    fn schedule_id(&mut self, customer: Cow<'_, str>, deadline: Option<Millis>) {
        match (self.find(&customer), deadline) {
            (None, None) => {}
            (Some(node), None) => {
                self.unlink(node);
                self.forget(node);
                self.release(node);
            }
            (Some(node), Some(deadline)) => {
                if self.nodes[node as usize].deadline != deadline {
                    self.unlink(node);
                    self.nodes[node as usize].deadline = deadline;
                    self.link(node);
                }
            }
            (None, Some(deadline)) => {
                let hash = self.hasher.hash_one(&*customer);
                // A `String` made from a `Box<str>` has no spare capacity: no copy here.
                let node = self.allocate(customer.into_owned().into_boxed_str(), deadline);
                self.link(node);
                let (nodes, hasher) = (&self.nodes, &self.hasher);
                self.by_customer.insert_unique(hash, node, |&n| {
                    hasher.hash_one(&*nodes[n as usize].customer)
                });
            }
        }
    }

    /// The node of `customer`'s timer.
    fn find(&self, customer: &str) -> Option<u32> {
        let nodes = &self.nodes;
        self.by_customer
            .find(self.hasher.hash_one(customer), |&n| {
                *nodes[n as usize].customer == *customer
            })
            .copied()
    }

    /// Takes `node` out of the table (it stays in the slab).
    fn forget(&mut self, node: u32) {
        let hash = self.hasher.hash_one(&*self.nodes[node as usize].customer);
        if let Ok(entry) = self.by_customer.find_entry(hash, |&n| n == node) {
            entry.remove();
        }
    }

    /// Removes and returns the earliest timer due at or before `to` (the watermark), with
    /// its deadline; `None` when no timer is due. Timers come out in deadline order,
    /// except those scheduled with a deadline the wheel had already passed: they come out
    /// first, at the next call.
    pub fn pop_due(&mut self, to: Millis) -> Option<(Box<str>, Millis)> {
        let to = tick(to);
        loop {
            let Some((level, slot, start)) = self.next_expiration().filter(|e| e.2 <= to) else {
                // Nothing more is due: the wheel's time moves to the watermark (every
                // pending slot lies after it, so no timer changes level).
                self.elapsed = self.elapsed.max(to);
                return None;
            };
            self.elapsed = self.elapsed.max(start);
            let head = self.levels[level].heads[slot];
            if level == 0 {
                // Every timer in a level-0 slot is due at its start.
                self.unlink(head);
                let deadline = self.nodes[head as usize].deadline;
                self.forget(head);
                return Some((self.release(head), deadline));
            }
            // Sort the slot's timers into the levels below, relative to the new time.
            self.levels[level].heads[slot] = NONE;
            self.levels[level].occupied &= !(1 << slot);
            let mut node = head;
            while node != NONE {
                let next = self.nodes[node as usize].next;
                self.link(node);
                node = next;
            }
        }
    }

    /// The earliest occupied slot: `(level, slot, its first tick)`. The lowest level with
    /// a timer holds the earliest one, since a level's slots all lie before the next
    /// level's next slot.
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for (level, state) in self.levels.iter().enumerate() {
            if state.occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS * level as u32;
            let position = (self.elapsed >> shift) & (SLOTS - 1);
            let distance = u64::from(
                state
                    .occupied
                    .rotate_right(position as u32)
                    .trailing_zeros(),
            );
            let slot = (position + distance) & (SLOTS - 1);
            let span = shift + SLOT_BITS;
            let level_start = if span >= 64 {
                0
            } else {
                self.elapsed & !((1u64 << span) - 1)
            };
            return Some((level, slot as usize, level_start + (slot << shift)));
        }
        None
    }

    /// The level and slot a timer due at `deadline` belongs in at the current time (one
    /// already due: the current time's own level-0 slot).
    fn position(&self, deadline: Millis) -> (usize, usize) {
        let when = tick(deadline).max(self.elapsed);
        let significant = 63 - ((self.elapsed ^ when) | (SLOTS - 1)).leading_zeros();
        let level = (significant / SLOT_BITS) as usize;
        let slot = ((when >> (SLOT_BITS * level as u32)) & (SLOTS - 1)) as usize;
        (level, slot)
    }

    /// Puts a node in the slot its deadline belongs to, relative to the current time.
    fn link(&mut self, node: u32) {
        let (level, slot) = self.position(self.nodes[node as usize].deadline);
        let head = self.levels[level].heads[slot];
        let n = &mut self.nodes[node as usize];
        n.prev = NONE;
        n.next = head;
        if head != NONE {
            self.nodes[head as usize].prev = node;
        }
        self.levels[level].heads[slot] = node;
        self.levels[level].occupied |= 1 << slot;
    }

    /// Takes a node out of its slot's list.
    fn unlink(&mut self, node: u32) {
        let Node {
            prev,
            next,
            deadline,
            ..
        } = self.nodes[node as usize];
        if prev == NONE {
            let (level, slot) = self.position(deadline);
            debug_assert_eq!(
                self.levels[level].heads[slot], node,
                "a head's slot is found"
            );
            self.levels[level].heads[slot] = next;
            if next == NONE {
                self.levels[level].occupied &= !(1 << slot);
            }
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next != NONE {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn allocate(&mut self, customer: Box<str>, deadline: Millis) -> u32 {
        let node = Node {
            customer,
            deadline,
            prev: NONE,
            next: NONE,
        };
        match self.free.pop() {
            Some(index) => {
                self.nodes[index as usize] = node;
                index
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Frees an unlinked node, returning its customer.
    fn release(&mut self, node: u32) -> Box<str> {
        self.free.push(node);
        std::mem::take(&mut self.nodes[node as usize].customer)
    }

    /// The wheel's time: the latest watermark it was advanced to.
    pub fn now(&self) -> Millis {
        instant(self.elapsed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_once_the_watermark_passes() {
        let mut wheel = TimerWheel::new();
        wheel.schedule("b", Some(1_800_000));
        wheel.schedule("a", Some(5));
        wheel.schedule("c", Some(86_400_000 * 60));
        assert_eq!(wheel.len(), 3);
        assert_eq!(wheel.pop_due(4), None);
        assert_eq!(wheel.pop_due(1_800_000), Some(("a".into(), 5)));
        assert_eq!(wheel.pop_due(1_800_000), Some(("b".into(), 1_800_000)));
        assert_eq!(wheel.pop_due(1_800_000), None);
        assert_eq!(wheel.pop_due(i64::MAX), Some(("c".into(), 86_400_000 * 60)));
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_customer_has_one_timer_moved_or_cancelled_by_schedule() {
        let mut wheel = TimerWheel::new();
        wheel.schedule("a", Some(100));
        wheel.schedule("a", Some(50));
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.deadline_of("a"), Some(50));
        wheel.schedule("a", None);
        assert_eq!(wheel.pop_due(1_000), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_deadline_already_passed_fires_at_the_next_pop() {
        let mut wheel = TimerWheel::new();
        wheel.schedule("x", Some(1_000));
        assert_eq!(wheel.pop_due(2_000), Some(("x".into(), 1_000)));
        wheel.schedule("y", Some(10));
        assert_eq!(wheel.pop_due(2_000), Some(("y".into(), 10)));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Schedule(u8, Option<i64>),
        Advance(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..40, prop::option::weighted(0.8, -1_000i64..100_000_000)).prop_map(|(c, d)| Op::Schedule(c, d)),
            1 => (0i64..10_000_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// The wheel fires exactly what a sorted map of (deadline, customer) would: every
        /// timer due at the watermark, in deadline order, each once, none early.
        #[test]
        fn wheel_matches_a_sorted_map(start in -5_000_000i64..5_000_000, ops in prop::collection::vec(op(), 1..200)) {
            let mut wheel = TimerWheel::new();
            // Customer → (deadline, whether it was already due when scheduled).
            let mut oracle: BTreeMap<String, (i64, bool)> = BTreeMap::new();
            let mut watermark = start;
            while wheel.pop_due(watermark).is_some() {}
            for op in ops {
                match op {
                    Op::Schedule(c, deadline) => {
                        let customer = format!("c{c}");
                        wheel.schedule(&customer, deadline);
                        match deadline {
                            Some(d) => oracle.insert(customer, (d, d <= watermark)),
                            None => oracle.remove(&customer),
                        };
                    }
                    Op::Advance(by) => {
                        watermark += by;
                        let mut fired = Vec::new();
                        while let Some((customer, deadline)) = wheel.pop_due(watermark) {
                            fired.push((deadline, customer.to_string()));
                        }
                        let mut due: Vec<(i64, String)> = oracle
                            .iter()
                            .filter(|(_, (d, _))| *d <= watermark)
                            .map(|(c, (d, _))| (*d, c.clone()))
                            .collect();
                        due.sort();
                        let deadlines: Vec<i64> = fired
                            .iter()
                            .filter(|(_, c)| !oracle[c].1)
                            .map(|f| f.0)
                            .collect();
                        oracle.retain(|_, (d, _)| *d > watermark);
                        prop_assert!(deadlines.windows(2).all(|w| w[0] <= w[1]), "in deadline order");
                        fired.sort();
                        prop_assert_eq!(fired, due);
                    }
                }
                prop_assert_eq!(wheel.len(), oracle.len());
            }
        }
    }
}
