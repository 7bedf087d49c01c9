//! Which input offsets may be committed: the at-least-once bookkeeping.
//!
//! Every input message is registered with the number of records it caused (changes and
//! dead-letter copy) before they are sent. Each acknowledgement from the brokers counts
//! one down. Per partition, messages complete in consumption order: an offset becomes
//! committable only when it and every earlier message of its partition have all their
//! records acknowledged. A message that caused nothing completes as soon as those before
//! it have.
//!
//! Draining (rebalance, shutdown) waits until the chosen partitions have nothing in
//! flight. A failed delivery is recorded and never completes, so no later offset of that
//! partition is committed: a restart re-reads it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic and partition.
pub type PartitionKey = (Arc<str>, i32);

/// One input message with records in flight.
#[derive(Debug)]
struct InFlight {
    offset: i64,
    outstanding: u32,
    received: Instant,
    produced: bool,
}

/// What completed after an acknowledgement.
#[derive(Debug, Default, PartialEq)]
pub struct Completed {
    /// The offset to store now: the last input message whose records, and all earlier
    /// ones', are acknowledged.
    pub store: Option<i64>,
    /// For each completed message that produced records: time from reading it to now.
    pub latencies: Vec<Duration>,
}

/// One partition's bookkeeping.
#[derive(Debug, Default)]
struct PartitionState {
    /// Messages with records in flight, in consumption order.
    in_flight: VecDeque<InFlight>,
    /// The last message completed in order: what may be committed.
    completed: Option<i64>,
    /// The last message registered (and not abandoned): how far the partition was read.
    registered: Option<i64>,
}

/// Input messages in flight, per partition. Shared by the consume loop (which registers),
/// the producer's delivery callback (which acknowledges) and the rebalance callback (which
/// drains and commits).
#[derive(Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<PartitionKey, PartitionState>>,
    drained: Condvar,
    /// How many [`drain`](Self::drain)s wait on `drained`; changed and read only under the
    /// lock. A partition empties many times a second and a wake-up is a system call, so
    /// it is made only when someone waits.
    draining: AtomicUsize,
}

impl OffsetTracker {
    /// A tracker with nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(OffsetTracker::default())
    }

    /// Wakes the drains waiting, if any (called under the lock).
    fn wake_drains(&self) {
        if self.draining.load(Ordering::Relaxed) > 0 {
            self.drained.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PartitionKey, PartitionState>> {
        // A panic elsewhere while holding the lock leaves plain counters behind: still usable.
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers input message `offset` of `partition`, which caused `outputs` records.
    /// Returns the offset to store right away when nothing of the partition is in flight
    /// and the message caused nothing.
    pub fn begin(
        &self,
        partition: &PartitionKey,
        offset: i64,
        outputs: u32,
        received: Instant,
    ) -> Option<i64> {
        let mut partitions = self.lock();
        let state = partitions.entry(partition.clone()).or_default();
        state.registered = Some(offset);
        if outputs == 0 && state.in_flight.is_empty() {
            state.completed = Some(offset);
            return Some(offset);
        }
        state.in_flight.push_back(InFlight {
            offset,
            outstanding: outputs,
            received,
            produced: outputs > 0,
        });
        None
    }

    /// Registers input message `offset` of `partition` whose event is not applied yet:
    /// it stays in flight (with one placeholder record, acknowledged once the event is
    /// applied and its records [added](Self::add)).
    pub fn hold(&self, partition: &PartitionKey, offset: i64, received: Instant) {
        let mut partitions = self.lock();
        let state = partitions.entry(partition.clone()).or_default();
        state.registered = Some(offset);
        state.in_flight.push_back(InFlight {
            offset,
            outstanding: 1,
            received,
            produced: false,
        });
    }

    /// Input message `offset` of `partition` caused `outputs` more records (its event was
    /// applied after it was registered, or timers fired while it was processed).
    pub fn add(&self, partition: &PartitionKey, offset: i64, outputs: u32) {
        if outputs == 0 {
            return;
        }
        let mut partitions = self.lock();
        let Some(state) = partitions.get_mut(partition) else {
            return;
        };
        if let Ok(position) = state.in_flight.binary_search_by_key(&offset, |m| m.offset) {
            let message = &mut state.in_flight[position];
            message.outstanding += outputs;
            message.produced = true;
        }
    }

    /// Stops tracking input message `offset` of `partition` and every later one (events
    /// held back and never applied): none of them is committed, so they are read again.
    pub fn abandon_from(&self, partition: &PartitionKey, offset: i64) {
        let mut partitions = self.lock();
        if let Some(state) = partitions.get_mut(partition) {
            state.in_flight.retain(|m| m.offset < offset);
            if state.registered >= Some(offset) {
                state.registered = Some(offset - 1).filter(|&o| o >= 0);
            }
            if state.in_flight.is_empty() {
                self.wake_drains();
            }
        }
    }

    /// One record caused by input message `offset` of `partition` was acknowledged.
    pub fn acknowledged(&self, partition: &PartitionKey, offset: i64) -> Completed {
        let mut partitions = self.lock();
        let Some(state) = partitions.get_mut(partition) else {
            return Completed::default();
        };
        let queue = &mut state.in_flight;
        // Abandoned by a timed-out drain: nothing to do.
        let Ok(position) = queue.binary_search_by_key(&offset, |m| m.offset) else {
            return Completed::default();
        };
        let message = &mut queue[position];
        message.outstanding = message.outstanding.saturating_sub(1);
        let mut completed = Completed::default();
        while queue.front().is_some_and(|m| m.outstanding == 0) {
            let done = queue.pop_front().expect("checked above");
            completed.store = Some(done.offset);
            if done.produced {
                completed.latencies.push(done.received.elapsed());
            }
        }
        if completed.store.is_some() {
            state.completed = completed.store;
        }
        if state.in_flight.is_empty() {
            self.wake_drains();
        }
        completed
    }

    /// Messages with records in flight, in all partitions.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock()
            .values()
            .map(|state| state.in_flight.len())
            .sum()
    }

    /// Waits until the partitions chosen by `which` have nothing in flight, at most
    /// `timeout`. On timeout their in-flight messages are abandoned (their offsets will
    /// never be committed, so they are read again) and `false` is returned.
    pub fn drain(&self, which: impl Fn(&PartitionKey) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut partitions = self.lock();
        loop {
            if !partitions
                .iter()
                .any(|(key, state)| which(key) && !state.in_flight.is_empty())
            {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                for (key, state) in partitions.iter_mut().filter(|(key, _)| which(key)) {
                    if let Some(first) = state.in_flight.front() {
                        tracing::warn!(
                            topic = %key.0,
                            partition = key.1,
                            offset = first.offset,
                            outstanding = first.outstanding,
                            messages = state.in_flight.len(),
                            "Abandoning messages whose output was not acknowledged."
                        );
                    }
                    state.in_flight.clear();
                    state.registered = state.completed;
                }
                return false;
            }
            self.draining.fetch_add(1, Ordering::Relaxed);
            partitions = self
                .drained
                .wait_timeout(partitions, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            self.draining.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// For each partition `which` chooses, the last message registered (read and not
    /// abandoned): the position a changelog checkpoint of its customers stands for.
    pub fn registered(&self, which: impl Fn(&PartitionKey) -> bool) -> Vec<(PartitionKey, i64)> {
        self.lock()
            .iter()
            .filter(|(key, _)| which(key))
            .filter_map(|(key, state)| state.registered.map(|offset| (key.clone(), offset)))
            .collect()
    }

    /// Starts tracking `partition` at message `next` (a restored partition resuming
    /// there): earlier messages count as read and completed, so one delivered before the
    /// partition moved is recognised as [already read](Self::already_read).
    pub fn start_at(&self, partition: &PartitionKey, next: i64) {
        if next <= 0 {
            return;
        }
        let mut partitions = self.lock();
        let state = partitions.entry(partition.clone()).or_default();
        if state.registered.is_none() && state.in_flight.is_empty() {
            state.registered = Some(next - 1);
            state.completed = Some(next - 1);
        }
    }

    /// Whether message `offset` of `partition` was registered before (the consumer went
    /// back: a broker's group hiccup, a repeated assignment): its event is applied
    /// already, and must not be again.
    pub fn already_read(&self, partition: &PartitionKey, offset: i64) -> bool {
        self.lock()
            .get(partition)
            .is_some_and(|state| state.registered >= Some(offset))
    }

    /// The last message of `partition` registered, if any (to notice offsets that jump).
    pub fn last_registered(&self, partition: &PartitionKey) -> Option<i64> {
        self.lock()
            .get(partition)
            .and_then(|state| state.registered)
    }

    /// A partition's progress, for diagnostics: the last message registered, the last
    /// completed in order, and the oldest in flight with its outstanding records.
    pub fn progress(&self, partition: &PartitionKey) -> String {
        match self.lock().get(partition) {
            None => "not tracked".into(),
            Some(state) => format!(
                "registered {:?}, completed {:?}, oldest in flight {:?} of {}",
                state.registered,
                state.completed,
                state.in_flight.front().map(|m| (m.offset, m.outstanding)),
                state.in_flight.len()
            ),
        }
    }

    /// Whether message `offset` of `partition`, and every earlier one, has all its
    /// records acknowledged.
    pub fn completed_through(&self, partition: &PartitionKey, offset: i64) -> bool {
        self.lock()
            .get(partition)
            .is_some_and(|state| state.completed >= Some(offset))
    }

    /// Forgets the partitions chosen by `which` (they are leaving this instance) and
    /// returns, for each, the last offset completed in order: what to commit for it.
    pub fn release(&self, which: impl Fn(&PartitionKey) -> bool) -> Vec<(PartitionKey, i64)> {
        let mut partitions = self.lock();
        let leaving: Vec<PartitionKey> = partitions
            .keys()
            .filter(|key| which(key))
            .cloned()
            .collect();
        leaving
            .into_iter()
            .filter_map(|key| {
                let state = partitions.remove(&key)?;
                state.completed.map(|offset| (key, offset))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(partition: i32) -> PartitionKey {
        ("t".into(), partition)
    }

    #[test]
    fn a_held_message_waits_for_its_later_outputs_and_abandoning_it_keeps_it_uncommitted() {
        let tracker = OffsetTracker::new();
        let now = Instant::now();
        // Registered while its event is held (one placeholder), then applied: two changes.
        tracker.hold(&key(0), 5, now);
        tracker.add(&key(0), 5, 2);
        assert_eq!(tracker.acknowledged(&key(0), 5).store, None, "placeholder");
        assert_eq!(tracker.acknowledged(&key(0), 5).store, None);
        assert_eq!(tracker.acknowledged(&key(0), 5).store, Some(5));
        // Two more, the first still held when the partition is revoked.
        tracker.hold(&key(0), 6, now);
        tracker.hold(&key(0), 7, now);
        tracker.abandon_from(&key(0), 6);
        assert!(
            tracker.drain(|_| true, Duration::from_millis(10)),
            "nothing left to wait for"
        );
        assert_eq!(
            tracker.release(|_| true),
            vec![(key(0), 5)],
            "6 and 7 are read again"
        );
    }

    #[test]
    fn an_offset_is_stored_only_when_it_and_all_before_it_are_acknowledged() {
        let tracker = OffsetTracker::new();
        let now = Instant::now();
        assert_eq!(
            tracker.begin(&key(0), 10, 0, now),
            Some(10),
            "nothing in flight: store at once"
        );
        assert_eq!(tracker.begin(&key(0), 11, 2, now), None);
        assert_eq!(tracker.begin(&key(0), 12, 0, now), None, "waits behind 11");
        assert_eq!(tracker.begin(&key(0), 13, 1, now), None);
        assert_eq!(
            tracker.acknowledged(&key(0), 13).store,
            None,
            "13 is done but 11 is not"
        );
        assert_eq!(
            tracker.acknowledged(&key(0), 11).store,
            None,
            "11 still has one record out"
        );
        let completed = tracker.acknowledged(&key(0), 11);
        assert_eq!(completed.store, Some(13), "11, 12 and 13 complete together");
        assert_eq!(
            completed.latencies.len(),
            2,
            "11 and 13 produced records; 12 did not"
        );
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::new();
        let now = Instant::now();
        tracker.begin(&key(0), 5, 1, now);
        assert_eq!(
            tracker.begin(&key(1), 7, 0, now),
            Some(7),
            "partition 1 does not wait for 0"
        );
    }

    #[test]
    fn draining_waits_for_acknowledgements_and_abandons_on_timeout() {
        let tracker = OffsetTracker::new();
        let now = Instant::now();
        tracker.begin(&key(0), 1, 1, now);
        tracker.begin(&key(1), 1, 1, now);
        let acker = {
            let tracker = tracker.clone();
            std::thread::spawn(move || tracker.acknowledged(&key(0), 1))
        };
        assert!(
            tracker.drain(|k| k.1 == 0, Duration::from_secs(10)),
            "partition 0 drains"
        );
        assert_eq!(acker.join().unwrap().store, Some(1));
        assert!(
            !tracker.drain(|k| k.1 == 1, Duration::from_millis(20)),
            "partition 1 never acknowledges"
        );
        assert_eq!(tracker.in_flight(), 0, "abandoned");
        assert_eq!(
            tracker.acknowledged(&key(1), 1),
            Completed::default(),
            "a late acknowledgement is ignored"
        );
    }

    /// Wake-ups are made only while a drain waits: the one waiting is woken by the
    /// acknowledgement that empties its partition, not left to its timeout.
    #[test]
    fn a_waiting_drain_is_woken_by_the_acknowledgement_that_empties_it() {
        let tracker = OffsetTracker::new();
        tracker.begin(&key(0), 1, 1, Instant::now());
        let (done, finished) = std::sync::mpsc::channel();
        let drainer = {
            let tracker = tracker.clone();
            std::thread::spawn(move || {
                let drained = tracker.drain(|k| k.1 == 0, Duration::from_secs(3_600));
                done.send(drained).unwrap();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tracker.draining.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the drain never waited");
            std::thread::yield_now();
        }
        tracker.acknowledged(&key(0), 1);
        let drained = finished.recv_timeout(Duration::from_secs(30));
        assert_eq!(drained, Ok(true), "the drain was not woken");
        drainer.join().unwrap();
    }

    #[test]
    fn releasing_partitions_reports_what_to_commit_and_forgets_them() {
        let tracker = OffsetTracker::new();
        let now = Instant::now();
        tracker.begin(&key(0), 3, 0, now);
        tracker.begin(&key(0), 4, 1, now);
        tracker.begin(&key(1), 9, 0, now);
        assert_eq!(
            tracker.release(|k| k.1 == 0),
            vec![(key(0), 3)],
            "4 is not acknowledged: commit up to 3"
        );
        assert_eq!(tracker.release(|k| k.1 == 0), vec![], "forgotten");
        assert_eq!(tracker.release(|_| true), vec![(key(1), 9)]);
    }
}
