//! The changelog writer: every customer whose state changed is written to the compacted
//! changelog topic (keyed by customer id, in the partition numbered like its input
//! partition), coalesced into one checkpoint per partition per commit interval.
//!
//! # Why checkpoints, and in what order
//!
//! A checkpoint is taken in the consume loop: the states of the partition's changed
//! customers as they are at that instant, and the *positions* they include — for each
//! input partition of the number, the last message read. Each state is written with
//! those positions, so that after a restart a restored customer's events at or before
//! them are recognised as applied and skipped.
//!
//! 1. A checkpoint is sent only once every output (changes, dead letters, idle timers'
//!    changes) of the messages up to its positions is acknowledged. So a stored state
//!    never includes an event whose changes could still be lost: skipping that event
//!    after a restart loses nothing.
//! 2. Input offsets are stored for commit only when a checkpoint's records are all
//!    acknowledged, in checkpoint order, up to its positions. So a committed offset
//!    never runs ahead of the stored states: nothing before it needs re-applying.
//!
//! A crash between the two re-reads messages that stored states already include (they
//! are skipped, per customer) and messages whose customers' states were not stored (they
//! are applied again, producing the same changes with the same ids).
//!
//! # Copies off the consume loop
//!
//! Encoding a partition's changed customers takes milliseconds per thousand (at 50,000
//! events/s, ≈ 8,000 customers and 30 ms per partition per second), and the consume loop
//! would stand still meanwhile. So the loop's own checkpoints only *freeze* the changed
//! customers (their ids, the positions) and a thread of lower CPU priority encodes them;
//! a customer written to before that thread reaches it is encoded first, by the store's
//! write hook, under the customer's lock — so every record holds the state as it was at
//! the checkpoint. A checkpoint is sent only once all of its customers are encoded. The
//! thread may fall [`ENCODER_LAG`] checkpoints of a partition behind; a checkpoint taken
//! beyond that has the loop encode the oldest one's rest (before, the loop encoded a
//! partition's leftovers at every checkpoint: at 50,000 events/s, half of the loop's
//! encoding). The checkpoints of revocations, transactions and shutdown are encoded at
//! once (after any frozen ones of their partitions).
//!
//! # Sends off the consume loop
//!
//! Handing a checkpoint's records to the producer costs a microsecond or two each: at
//! 50,000 events/s a partition's checkpoint holds tens of thousands, and the loop stood
//! still for 30–100 ms once a second while it sent them. So every checkpoint's records,
//! the loop's and the rebalance callback's alike, go to one thread (`changelog-send`)
//! that hands them to the producer in the order they came ([`Changelog::hand_off`]):
//! per partition, a later checkpoint's records never reach the topic before an earlier
//! one's. Like the encoder, it runs at nice 10. Acknowledgements arrive as before,
//! through the producer's delivery callback.
//!
//! Each process writes, before its first state in a partition, the dictionary of its
//! rules (segment ids and slot descriptions) under a key of its own, so that a restore
//! under changed rules can translate the indexes states use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak, mpsc};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use serde::Serialize;

use super::delivery::Ticket;
use super::offsets::{OffsetTracker, PartitionKey};
use super::{IngestContext, Partitions};
use crate::emit::producer::send_blocking;
use crate::engine::Engine;
use crate::state::CustomerState;
use crate::state::codec::{RulesDictionary, Summary, encode};

/// How long a checkpoint may wait for its messages' outputs before it is reported.
const STALLED: Duration = Duration::from_secs(10);

/// How many of a partition's checkpoints may still wait for the encoder thread when the
/// next is taken. The thread runs below the loop's priority, so on busy cores it falls
/// behind for a while; beyond this, the loop encodes the oldest waiting checkpoint's
/// customers itself, one checkpoint's worth per checkpoint taken, so the copies (and the
/// commits behind them) never lag far and the loop never stalls for more than that.
const ENCODER_LAG: usize = 2;

/// How long [`Changelog::encode_frozen`] waits for customers the encoder thread is
/// encoding at that moment (microseconds each; this bounds the wait should the thread be
/// kept off the CPU).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(1);

/// Shards of the frozen list ([`Changelog`]'s `frozen`). The loop's write hook and the
/// encoder thread both take entries out of it, and the encoder runs at a lower priority,
/// so it is sometimes preempted while it holds a lock the loop then waits for: with the
/// list in shards, only when both are at the same one. (The waits measured were for the
/// checkpoints' log, which the encoder held while encoding — 218–267 times in 5 s at
/// 50,000 events/s, BENCHMARKS.md; it no longer does. With that fixed, 8 of the loop's
/// switches in 5 s were at a shard of this list.)
const FROZEN_SHARDS: usize = 64;

/// The pseudo topic under which idle partitions' timer changes are tracked: they answer
/// to no input message, but a checkpoint must wait for them too.
pub const TIMER_TOPIC: &str = "(timer)";

/// The key prefix of rules dictionaries in the changelog (customer ids never start with
/// a NUL character: the parser refuses control characters in ids).
pub const DICTIONARY_PREFIX: &str = "\u{0}rules:";

/// What a state record holds; encodes exactly like [`crate::state::codec::Snapshot`],
/// without copying the state.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    rules: u64,
    positions: &'a [(Box<str>, i64)],
    summary: Summary,
    state: &'a CustomerState,
}

/// A checkpoint's positions as its state records hold them.
type Named = Arc<[(Box<str>, i64)]>;

/// A customer frozen for a checkpoint and not yet encoded.
struct Frozen {
    /// The partition number.
    number: i32,
    /// The checkpoint's id.
    checkpoint: u64,
    /// The checkpoint's positions as its state records hold them (named topics, no timer
    /// pseudo topic): the customer is encoded with them, without the log's lock.
    named: Named,
}

/// One partition's checkpoint.
struct Checkpoint {
    id: u64,
    /// Input partitions (and the timer pseudo partition) with the last message included.
    positions: Vec<(PartitionKey, i64)>,
    /// Records to write, `(key, value)`; taken when sent.
    records: Vec<(Box<str>, Vec<u8>)>,
    /// Customers frozen for it and not yet encoded: it is not sent before they are.
    unencoded: usize,
    sent: bool,
    /// Records sent and not yet acknowledged.
    outstanding: usize,
    /// When it was taken: one waiting far longer than a commit interval is reported.
    taken: Instant,
    reported: bool,
}

/// One partition number's checkpoints, oldest first.
#[derive(Default)]
struct PartitionLog {
    checkpoints: VecDeque<Checkpoint>,
    dictionary_written: bool,
    /// The positions of the last checkpoint taken: an idle partition (same positions, no
    /// customer changed) takes none.
    last_positions: Vec<(PartitionKey, i64)>,
}

/// Records ready to go to the changelog topic.
pub struct Outgoing {
    number: i32,
    checkpoint: u64,
    records: Vec<(Box<str>, Vec<u8>)>,
}

/// The changelog writer, shared by the consume loop (checkpoints, sends), the producer's
/// delivery callback (acknowledgements) and the rebalance callback (final checkpoints of
/// revoked partitions).
pub struct Changelog {
    topic: Arc<str>,
    fingerprint: u64,
    dictionary: (Box<str>, Vec<u8>),
    logs: Mutex<HashMap<i32, PartitionLog>>,
    settled: Condvar,
    next_id: std::sync::atomic::AtomicU64,
    /// Customers a checkpoint has frozen and not yet encoded, by customer id; in
    /// [`FROZEN_SHARDS`] shards (the write hook takes one on every write while any
    /// customer is frozen).
    frozen: DashMap<Box<str>, Frozen, foldhash::fast::RandomState>,
    /// How many are frozen (the write hook's test, without a lock or the changelog itself:
    /// shared with the hook). Raised before customers are frozen and lowered after they
    /// are taken, so it is never below the true count.
    frozen_count: Arc<AtomicUsize>,
    /// The engine whose customers it encodes.
    engine: Engine,
    /// Wakes the encoder thread ([`start_encoder`]); `None` if it could not start.
    /// Dropping the changelog drops it, which ends the thread.
    encoder: Option<mpsc::Sender<()>>,
    /// The sender thread's queue ([`Changelog::start_sender`]), set once the producer
    /// exists. Dropping the changelog drops it, which ends the thread.
    sender: OnceLock<mpsc::Sender<Outgoing>>,
    /// The first error the sender thread met handing a record to the producer, reported
    /// by the next [`Changelog::hand_off`].
    send_failure: Mutex<Option<KafkaError>>,
}

impl Changelog {
    /// A writer to `topic` for states built with `engine`'s rules; it hooks `engine`'s
    /// store to encode frozen customers before they change.
    pub fn new(topic: &str, engine: &Engine) -> Arc<Self> {
        let rules = engine.rules();
        let changelog = Arc::new_cyclic(|changelog| Changelog {
            topic: topic.into(),
            fingerprint: rules.fingerprint,
            dictionary: (
                dictionary_key(rules.fingerprint).into(),
                encode(&RulesDictionary::of(rules)),
            ),
            logs: Mutex::default(),
            settled: Condvar::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            frozen: DashMap::with_hasher_and_shard_amount(Default::default(), FROZEN_SHARDS),
            frozen_count: Arc::default(),
            engine: engine.clone(),
            encoder: start_encoder(changelog.clone()),
            sender: OnceLock::new(),
            send_failure: Mutex::default(),
        });
        // Every event passes the hook: with nothing frozen it reads one counter, without
        // reaching the changelog.
        let hooked = Arc::downgrade(&changelog);
        let frozen = changelog.frozen_count.clone();
        engine
            .store()
            .set_write_hook(Box::new(move |id: &str, state: &CustomerState| {
                if frozen.load(Ordering::Relaxed) > 0
                    && let Some(changelog) = hooked.upgrade()
                {
                    changelog.unfreeze(id, Some(state));
                }
            }));
        changelog
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Starts the thread (`changelog-send`) that hands checkpoints' records to
    /// `producer`, in the order [`Changelog::hand_off`] receives them, at the encoder's
    /// lower CPU priority: the records only gate offset commits, so on busy cores the
    /// loop, the clients' threads and the broker run first. Called once, when the
    /// producer exists; a second call changes nothing.
    pub fn start_sender<C>(
        self: &Arc<Self>,
        producer: Arc<ThreadedProducer<C>>,
    ) -> std::io::Result<()>
    where
        C: ProducerContext<DeliveryOpaque = Box<Ticket>> + 'static,
    {
        if self.sender.get().is_some() {
            return Ok(());
        }
        let (queue, queued) = mpsc::channel::<Outgoing>();
        // Neither is held between batches: the producer's delivery callback holds the
        // changelog, and the changelog this thread's queue, so a strong reference here
        // would keep the producer (and its broker connections) alive for ever.
        let changelog = Arc::downgrade(self);
        let producer = Arc::downgrade(&producer);
        std::thread::Builder::new()
            .name("changelog-send".into())
            .spawn(move || {
                lower_priority();
                while let Ok(outgoing) = queued.recv() {
                    let (Some(changelog), Some(producer)) =
                        (changelog.upgrade(), producer.upgrade())
                    else {
                        return;
                    };
                    changelog.send(&producer, &outgoing);
                }
            })?;
        let _ = self.sender.set(queue);
        Ok(())
    }

    /// Releases the checkpoints that are ready ([`Changelog::ready`]): stores on
    /// `consumer` the input offsets they make committable, and hands their records to the
    /// sender thread ([`Changelog::hand_off`], whose error this returns).
    pub fn release(
        &self,
        tracker: &OffsetTracker,
        consumer: &impl Consumer<IngestContext>,
    ) -> Result<(), KafkaError> {
        let (outgoing, committable) = self.ready(tracker);
        for (partition, offset) in committable {
            super::delivery::store(consumer, &partition, offset);
        }
        self.hand_off(outgoing)
    }

    /// Queues checkpoints' records (from [`Changelog::ready`]) for the sender thread.
    /// An error if it failed to hand an earlier record to the producer (that checkpoint
    /// never settles, so no offset passes it), or if it is not running.
    pub fn hand_off(&self, outgoing: Vec<Outgoing>) -> Result<(), KafkaError> {
        if let Some(err) = self
            .send_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(err);
        }
        if outgoing.is_empty() {
            return Ok(());
        }
        let sender = self.sender.get().ok_or(KafkaError::Canceled)?;
        for batch in outgoing {
            sender.send(batch).map_err(|_| KafkaError::Canceled)?;
        }
        Ok(())
    }

    /// On the sender thread: hands `outgoing`'s records to `producer`, waiting while its
    /// queue is full. A checkpoint of a partition revoked since is dropped: its next owner
    /// writes the partition's states.
    fn send<C>(&self, producer: &ThreadedProducer<C>, outgoing: &Outgoing)
    where
        C: ProducerContext<DeliveryOpaque = Box<Ticket>>,
    {
        let pending = self.lock().get(&outgoing.number).is_some_and(|log| {
            log.checkpoints
                .iter()
                .any(|checkpoint| checkpoint.id == outgoing.checkpoint)
        });
        if !pending {
            return;
        }
        for index in 0..outgoing.records.len() {
            if let Err(err) = send_blocking(producer, self.record(outgoing, index)) {
                tracing::warn!(error = %err, partition = outgoing.number, "A changelog record could not be handed to the producer.");
                self.send_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(err);
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, PartitionLog>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a checkpoint of the partitions `numbers` names: their changed customers'
    /// states now, and the positions those states include (the last message read of
    /// each of their input partitions; in event-time order, the last before the first
    /// event still held). Called where no event is being applied (the consume loop, or
    /// the rebalance callback, which blocks it). `deferred`: the customers are frozen and
    /// encoded by the encoder thread (see the module documentation); else encoded now,
    /// after any customers of these partitions still frozen.
    pub fn checkpoint(
        self: &Arc<Self>,
        numbers: &[i32],
        partitions: &Partitions,
        tracker: &OffsetTracker,
        deferred: bool,
    ) {
        if !deferred {
            self.encode_frozen(|number, _| numbers.contains(&number));
        }
        let mut froze = false;
        let mut partitions = partitions.lock().unwrap_or_else(|p| p.into_inner());
        for &number in numbers {
            let Some(time) = partitions.get_mut(&number) else {
                continue;
            };
            let mut positions = tracker.registered(|key| key.1 == number);
            for source in time.held() {
                if let Some(position) = positions.iter_mut().find(|(k, _)| *k == source.partition) {
                    position.1 = position.1.min(source.offset - 1);
                }
            }
            // Nothing of an input partition applied yet: no position for it.
            positions.retain(|(_, offset)| *offset >= 0);
            positions.sort_unstable();
            let mut changed = time.take_changed();
            if changed.is_empty() {
                let mut logs = self.lock();
                let log = logs.entry(number).or_default();
                if positions == log.last_positions {
                    continue;
                }
                log.last_positions = positions.clone();
            } else {
                self.lock().entry(number).or_default().last_positions = positions.clone();
            }
            let named: Named = positions
                .iter()
                .filter(|(key, _)| *key.0 != *TIMER_TOPIC)
                .map(|(key, offset)| ((*key.0).into(), *offset))
                .collect();
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut checkpoint = Checkpoint {
                id,
                positions,
                records: Vec::new(),
                unencoded: 0,
                sent: false,
                outstanding: 0,
                taken: Instant::now(),
                reported: false,
            };
            if !deferred {
                let mut records = Vec::with_capacity(changed.len());
                let store = self.engine.store();
                store.with_prefetch(&mut changed, |customer| {
                    let value = store.read(customer, |state| self.encode_state(&named, state));
                    if let Some(value) = value {
                        records.push((std::mem::take(customer), value));
                    }
                });
                checkpoint.records = records;
                self.push(number, checkpoint);
                continue;
            }
            // The encoder thread too far behind (ENCODER_LAG), or none: the oldest
            // waiting checkpoint's customers are encoded here. (None of them is in this
            // checkpoint: one written since is no longer frozen, the hook took it.)
            let lag = if self.encoder.is_some() {
                ENCODER_LAG
            } else {
                1
            };
            if let Some(oldest) = self.oldest_encoding(number, lag) {
                self.encode_frozen(|n, checkpoint| n == number && checkpoint == oldest);
            }
            // In the log before its customers are frozen, so a copy always finds it.
            checkpoint.unencoded = changed.len();
            self.push(number, checkpoint);
            self.frozen_count
                .fetch_add(changed.len(), Ordering::Relaxed);
            for customer in changed {
                let frozen = Frozen {
                    number,
                    checkpoint: id,
                    named: named.clone(),
                };
                if self.frozen.insert(customer, frozen).is_some() {
                    // Frozen already (it cannot be: a write unfreezes a customer first).
                    self.frozen_count.fetch_sub(1, Ordering::Relaxed);
                }
            }
            froze = true;
        }
        drop(partitions);
        if froze && let Some(wake) = &self.encoder {
            // Sending fails only if the thread is gone; the loop's hook and the later
            // checkpoints then encode them.
            let _ = wake.send(());
        }
    }

    /// Appends `checkpoint` to partition `number`'s log.
    fn push(&self, number: i32, checkpoint: Checkpoint) {
        self.lock()
            .entry(number)
            .or_default()
            .checkpoints
            .push_back(checkpoint);
    }

    /// A state record of `state`, including `positions`.
    fn encode_state(&self, positions: &[(Box<str>, i64)], state: &CustomerState) -> Vec<u8> {
        encode(&SnapshotRef {
            rules: self.fingerprint,
            positions,
            summary: Summary::of(state),
            state,
        })
    }

    /// If `customer` is still frozen: no longer, and its checkpoint gets a record of
    /// `state` (`None`: it left the store, nothing to write). Called with the customer's
    /// lock held, before the frozen list's. The state is encoded before the log's lock
    /// is taken: the encoder thread, preempted while encoding under it, kept the loop's
    /// write hook waiting (BENCHMARKS.md).
    fn unfreeze(&self, customer: &str, state: Option<&CustomerState>) {
        let Some((customer, frozen)) = self.frozen.remove(customer) else {
            return;
        };
        self.frozen_count.fetch_sub(1, Ordering::Relaxed);
        let value = state.map(|state| self.encode_state(&frozen.named, state));
        let (number, id) = (frozen.number, frozen.checkpoint);
        let mut logs = self.lock();
        let Some(checkpoint) = logs
            .get_mut(&number)
            .and_then(|log| log.checkpoints.iter_mut().find(|c| c.id == id))
        else {
            // Forgotten meanwhile (the partition was revoked).
            return;
        };
        checkpoint.unencoded = checkpoint.unencoded.saturating_sub(1);
        if let Some(value) = value {
            checkpoint.records.push((customer, value));
        }
        if checkpoint.unencoded == 0 {
            // Whole: `encode_frozen` may be waiting for it.
            self.settled.notify_all();
        }
    }

    /// The id of partition `number`'s oldest checkpoint still being encoded, if at least
    /// `count` of its checkpoints are.
    fn oldest_encoding(&self, number: i32, count: usize) -> Option<u64> {
        let logs = self.lock();
        let mut encoding = logs
            .get(&number)?
            .checkpoints
            .iter()
            .filter(|checkpoint| checkpoint.unencoded > 0);
        let oldest = encoding.next()?.id;
        (1 + encoding.count() >= count).then_some(oldest)
    }

    /// Encodes the frozen customers that `which` selects by partition number and
    /// checkpoint id, now (each under its own lock, like the write hook, so the two never
    /// encode one twice); returns once those checkpoints are whole. A customer the encoder
    /// thread had already taken from the frozen list is still being encoded by it: that
    /// is waited for (a few microseconds, unless the thread was preempted), for at most
    /// [`IN_FLIGHT_WAIT`].
    fn encode_frozen(&self, which: impl Fn(i32, u64) -> bool) {
        if self.frozen_count.load(Ordering::Relaxed) > 0 {
            let mut frozen = self.frozen_ids(&which, usize::MAX);
            let store = self.engine.store();
            store.with_prefetch(&mut frozen, |customer| self.encode_one(customer));
        }
        let deadline = Instant::now() + IN_FLIGHT_WAIT;
        let mut logs = self.lock();
        while logs.iter().any(|(&number, log)| {
            log.checkpoints
                .iter()
                .any(|checkpoint| checkpoint.unencoded > 0 && which(number, checkpoint.id))
        }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "A changelog checkpoint was still being encoded after {IN_FLIGHT_WAIT:?}; it is sent once whole."
                );
                return;
            }
            logs = self
                .settled
                .wait_timeout(logs, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Up to `limit` frozen customers that `which` selects by partition number and
    /// checkpoint id (copied out, so the list is not locked while they are encoded).
    fn frozen_ids(&self, which: impl Fn(i32, u64) -> bool, limit: usize) -> Vec<Box<str>> {
        self.frozen
            .iter()
            .filter(|entry| which(entry.number, entry.checkpoint))
            .take(limit)
            .map(|entry| entry.key().clone())
            .collect()
    }

    /// Encodes frozen customer `customer`, if it still is frozen.
    fn encode_one(&self, customer: &str) {
        // Under the customer's lock, like the write hook: the two never encode one twice.
        let store = self.engine.store();
        if store
            .read(customer, |state| self.unfreeze(customer, Some(state)))
            .is_none()
        {
            self.unfreeze(customer, None);
        }
    }

    /// The checkpoints whose messages' outputs are all acknowledged, in order per
    /// partition, marked sent; and the input offsets now committable (checkpoints with
    /// nothing to write complete at once).
    pub fn ready(&self, tracker: &OffsetTracker) -> (Vec<Outgoing>, Vec<(PartitionKey, i64)>) {
        let mut logs = self.lock();
        let mut outgoing = Vec::new();
        let mut committable = Vec::new();
        for (&number, log) in logs.iter_mut() {
            for checkpoint in log.checkpoints.iter_mut().filter(|c| !c.sent) {
                if checkpoint.unencoded > 0 {
                    // Still being encoded; later checkpoints wait behind it.
                    break;
                }
                let acknowledged = checkpoint
                    .positions
                    .iter()
                    .all(|(key, offset)| tracker.completed_through(key, *offset));
                if !acknowledged {
                    if !checkpoint.reported && checkpoint.taken.elapsed() > STALLED {
                        checkpoint.reported = true;
                        let waits: Vec<String> = checkpoint
                            .positions
                            .iter()
                            .map(|(key, offset)| {
                                format!(
                                    "{}/{} to {offset}: {}",
                                    key.0,
                                    key.1,
                                    tracker.progress(key)
                                )
                            })
                            .collect();
                        tracing::warn!(partition = number, waits = ?waits, "A changelog checkpoint has waited long for its messages' output to be acknowledged.");
                    }
                    // Later checkpoints include these messages too.
                    break;
                }
                checkpoint.sent = true;
                let mut records = std::mem::take(&mut checkpoint.records);
                if !records.is_empty() && !log.dictionary_written {
                    log.dictionary_written = true;
                    records.insert(0, (self.dictionary.0.clone(), self.dictionary.1.clone()));
                }
                checkpoint.outstanding = records.len();
                if !records.is_empty() {
                    outgoing.push(Outgoing {
                        number,
                        checkpoint: checkpoint.id,
                        records,
                    });
                }
            }
            committable.extend(settle(log));
        }
        if !committable.is_empty() {
            self.settled.notify_all();
        }
        (outgoing, committable)
    }

    /// One record of checkpoint `id` of partition `number` was acknowledged. Returns the
    /// input offsets now committable.
    pub fn acknowledged(&self, number: i32, id: u64) -> Vec<(PartitionKey, i64)> {
        let mut logs = self.lock();
        let Some(log) = logs.get_mut(&number) else {
            return Vec::new();
        };
        if let Some(checkpoint) = log.checkpoints.iter_mut().find(|c| c.id == id) {
            checkpoint.outstanding = checkpoint.outstanding.saturating_sub(1);
        }
        let committable = settle(log);
        if !committable.is_empty() || log.checkpoints.is_empty() {
            self.settled.notify_all();
        }
        committable
    }

    /// Waits until the partitions `numbers` names have no checkpoint outstanding, at most
    /// `timeout`. Returns whether they settled.
    pub fn wait_settled(&self, numbers: &[i32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut logs = self.lock();
        loop {
            let pending = numbers
                .iter()
                .any(|n| logs.get(n).is_some_and(|log| !log.checkpoints.is_empty()));
            if !pending {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            logs = self
                .settled
                .wait_timeout(logs, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Forgets the partitions `which` selects (revoked): their unsent checkpoints are
    /// dropped, and a later owner writes its own dictionary.
    pub fn forget(&self, which: impl Fn(i32) -> bool) {
        self.frozen.retain(|_, frozen| {
            let keep = !which(frozen.number);
            if !keep {
                self.frozen_count.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
        self.lock().retain(|&number, _| !which(number));
        self.settled.notify_all();
    }

    /// A record of `outgoing` to hand to the producer.
    fn record<'a>(
        &'a self,
        outgoing: &'a Outgoing,
        index: usize,
    ) -> BaseRecord<'a, [u8], [u8], Box<Ticket>> {
        let (key, value) = &outgoing.records[index];
        BaseRecord::with_opaque_to(
            &self.topic,
            Box::new(Ticket {
                partition: (self.topic.clone(), outgoing.number),
                offset: None,
                dead_letter: None,
                checkpoint: Some(outgoing.checkpoint),
            }),
        )
        .partition(outgoing.number)
        .key(key.as_bytes())
        .payload(value.as_slice())
    }
}

/// Pops the partition's settled checkpoints (sent, all acknowledged), oldest first, and
/// returns the offsets they make committable.
fn settle(log: &mut PartitionLog) -> Vec<(PartitionKey, i64)> {
    let mut committable = Vec::new();
    while log
        .checkpoints
        .front()
        .is_some_and(|c| c.sent && c.outstanding == 0)
    {
        let checkpoint = log.checkpoints.pop_front().expect("checked above");
        committable.extend(
            checkpoint
                .positions
                .into_iter()
                .filter(|(key, _)| *key.0 != *TIMER_TOPIC),
        );
    }
    committable
}

/// Encodes every frozen customer, a few at a time (the consume loop's write hook takes
/// any it reaches first).
fn encode_in_background(changelog: &Weak<Changelog>) {
    const BATCH: usize = 256;
    loop {
        let Some(changelog) = changelog.upgrade() else {
            return;
        };
        let batch = changelog.frozen_ids(|_, _| true, BATCH);
        if batch.is_empty() {
            return;
        }
        // One at a time, without asking for the next ones' memory ahead as the encodings
        // waited for do (`CustomerStore::with_prefetch`): here nobody waits, and prefetching
        // made the service slower — at 50,000 events/s its p99 rose from 40 to 54 ms
        // (BENCHMARKS.md).
        for customer in batch {
            changelog.encode_one(&customer);
        }
    }
}

/// Starts the thread (`changelog-enc`) that encodes deferred checkpoints' frozen
/// customers of `changelog`, at a lower CPU priority than the consume loop: the copies
/// are not urgent (a customer written to first is encoded by the loop's write hook, and
/// a checkpoint taken while [`ENCODER_LAG`] of its partition's wait encodes the oldest's
/// rest), so on busy cores the loop and the clients' threads run first. Returns what
/// wakes it, or `None` if no thread could be started (checkpoints are then encoded on the
/// consume loop).
fn start_encoder(changelog: Weak<Changelog>) -> Option<mpsc::Sender<()>> {
    let (wake, woken) = mpsc::channel::<()>();
    let started = std::thread::Builder::new()
        .name("changelog-enc".into())
        .spawn(move || {
            lower_priority();
            while woken.recv().is_ok() {
                // Wake-ups that came meanwhile are served by this round.
                while woken.try_recv().is_ok() {}
                encode_in_background(&changelog);
            }
        });
    match started {
        Ok(_) => Some(wake),
        Err(err) => {
            tracing::warn!(error = %err, "Could not start the changelog encoder thread: checkpoints are encoded on the consume loop.");
            None
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10; on Linux, nice is per thread): the
/// changelog's encoder and sender threads.
/// Best effort: where it fails, the thread runs at the process's priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take and return plain integers; no memory is
        // shared with the kernel.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10)
        };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "Could not lower the changelog encoder's priority.");
        }
    }
}

/// The changelog key of the rules dictionary with `fingerprint`.
pub fn dictionary_key(fingerprint: u64) -> String {
    format!("{DICTIONARY_PREFIX}{fingerprint:016x}")
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::Producer;

    use super::*;
    use crate::ingest::Source;
    use crate::rules::{RuleSet, SegmentDef};
    use crate::state::codec::{decode_state, read_record};
    use crate::state::new_store;
    use crate::time::partition::{PartitionTime, TimeSettings};

    const SETTINGS: TimeSettings = TimeSettings {
        allowed_lateness: 0,
        idle_timeout: None,
        hold: false,
    };

    /// Applies a page view of each of `customers` at `ts` to partition 0.
    fn page_views(engine: &Engine, partitions: &Partitions, customers: &[&str], ts: i64) {
        let mut partitions = partitions.lock().unwrap();
        let time = partitions
            .entry(0)
            .or_insert_with(|| PartitionTime::new(SETTINGS, 0).record_changes());
        let (mut out, mut released) = (Vec::new(), Vec::new());
        for customer in customers {
            let json = format!(
                r#"{{"event_id":"{customer}-{ts}","type":"page_view","customer_id":"{customer}","ts":{ts}}}"#
            );
            let event = crate::event::parse_event(json.as_bytes(), 4096).unwrap();
            let tag = Source {
                partition: ("in".into(), 0),
                offset: ts,
                topic: None,
            };
            time.take(engine, event, tag, 0, &mut out, &mut released);
        }
    }

    /// Per checkpoint ready to send, oldest first: each customer's recorded count of
    /// events.
    fn recorded_events(changelog: &Changelog) -> Vec<HashMap<Box<str>, u64>> {
        let (outgoing, _) = changelog.ready(&OffsetTracker::new());
        outgoing
            .iter()
            .map(|batch| {
                batch
                    .records
                    .iter()
                    .filter(|(key, _)| !key.starts_with('\u{0}'))
                    .map(|(key, value)| {
                        let record = read_record(value).unwrap();
                        (
                            key.clone(),
                            decode_state(record.state).unwrap().customer.events,
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Asserts that this process has a thread named `name`, and that every such thread
    /// runs at nice 10 or more (Linux: `/proc/self/task`; elsewhere nothing is checked).
    fn assert_runs_below_normal_priority(name: &str) {
        #[cfg(target_os = "linux")]
        {
            let niceness: Vec<i64> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| {
                    let path = task.ok()?.path();
                    let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                    let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                    // Field 19 is the nice value; fields after the `)` closing the name.
                    let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?;
                    (comm.trim() == name).then(|| nice.parse().ok())?
                })
                .collect();
            assert!(!niceness.is_empty(), "no thread {name} found");
            assert!(niceness.iter().all(|&n| n >= 10), "{name}: {niceness:?}");
        }
    }

    /// An engine with one rule, `seen` (any page view), and a changelog writer for it.
    fn seen_engine() -> (Engine, Arc<Changelog>) {
        let rules = RuleSet::compile(&[SegmentDef::new("seen", "count(page_view) >= 1")]).unwrap();
        let engine = Engine::new(Arc::new(rules), new_store(), 30 * 60 * 1000);
        let changelog = Changelog::new("changelog", &engine);
        (engine, changelog)
    }

    /// A deferred checkpoint is encoded by the encoder thread alone, with no write to
    /// its customers and no later checkpoint, and that thread runs at nice 10 or lower
    /// priority (Linux: `/proc/self/task/*/stat`).
    #[test]
    fn the_encoder_thread_encodes_deferred_checkpoints_at_a_lower_priority() {
        let customers: Vec<String> = (0..500).map(|i| format!("c-{i}")).collect();
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        let (engine, changelog) = seen_engine();
        let partitions: Partitions = Arc::default();
        page_views(&engine, &partitions, &customers, 1_000);
        changelog.checkpoint(&[0], &partitions, &OffsetTracker::new(), true);
        let deadline = Instant::now() + Duration::from_secs(10);
        let recorded = loop {
            let recorded = recorded_events(&changelog);
            if !recorded.is_empty() || Instant::now() > deadline {
                break recorded;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            recorded.len(),
            1,
            "the checkpoint was not encoded within 10 s"
        );
        assert_eq!(recorded[0].len(), customers.len());

        assert_runs_below_normal_priority("changelog-enc");
    }

    /// The encoder thread may fall behind by [`ENCODER_LAG`] of a partition's checkpoints,
    /// no more: taking one beyond that has the loop encode the oldest waiting one. The
    /// first checkpoint is large, so the thread is still at it while three small ones
    /// follow; each round's customers are new, so no write hook encodes an earlier one's.
    #[test]
    fn no_more_checkpoints_than_the_lag_wait_for_the_encoder() {
        let (engine, changelog) = seen_engine();
        let partitions: Partitions = Arc::default();
        let tracker = OffsetTracker::new();
        let sizes = [20_000, 1, 1, 1];
        for (round, size) in (1..).zip(sizes) {
            let customers: Vec<String> = (0..size).map(|i| format!("c-{round}-{i}")).collect();
            let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
            page_views(&engine, &partitions, &customers, round * 1_000);
            changelog.checkpoint(&[0], &partitions, &tracker, true);
            assert!(
                changelog.oldest_encoding(0, ENCODER_LAG + 1).is_none(),
                "round {round}: more than {ENCODER_LAG} checkpoints wait"
            );
        }
        changelog.encode_frozen(|_, _| true);
        let recorded = recorded_events(&changelog);
        let recorded: Vec<usize> = recorded.iter().map(HashMap::len).collect();
        assert_eq!(recorded, sizes, "every checkpoint whole");
    }

    /// The count the write hook reads follows the frozen list exactly, while the encoder
    /// thread takes customers from it: back to zero once a revocation forgets them, and
    /// once a checkpoint is encoded.
    #[test]
    fn the_count_of_frozen_customers_follows_the_list() {
        let (engine, changelog) = seen_engine();
        let partitions: Partitions = Arc::default();
        let tracker = OffsetTracker::new();
        let frozen = |changelog: &Changelog| {
            (
                changelog.frozen.len(),
                changelog.frozen_count.load(Ordering::Relaxed),
            )
        };
        for (round, size) in [(1, 20_000), (2, 2_000)] {
            let customers: Vec<String> = (0..size).map(|i| format!("c-{round}-{i}")).collect();
            let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
            page_views(&engine, &partitions, &customers, round * 1_000);
            changelog.checkpoint(&[0], &partitions, &tracker, true);
            if round == 1 {
                changelog.forget(|_| true);
            } else {
                changelog.encode_frozen(|_, _| true);
            }
            assert_eq!(frozen(&changelog), (0, 0), "round {round}");
        }
    }

    /// Deferred checkpoints' records hold each customer as it was at its checkpoint,
    /// whether the background copy or the write hook (a customer written to first)
    /// encoded it — also when the next checkpoint comes before the copy is done; a
    /// checkpoint goes out only once all its customers are encoded.
    #[test]
    fn deferred_checkpoints_record_their_customers_as_they_were_at_them() {
        let customers: Vec<String> = (0..2_000).map(|i| format!("c-{i}")).collect();
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        let mut reversed = customers.clone();
        reversed.reverse();
        let (engine, changelog) = seen_engine();
        let partitions: Partitions = Arc::default();
        let tracker = OffsetTracker::new();
        page_views(&engine, &partitions, &customers, 1_000);
        changelog.checkpoint(&[0], &partitions, &tracker, true);
        // Half written to while the copy runs (the last ones most likely before it gets
        // there), then the next checkpoint at once, then those written to again.
        let half = &reversed[..1_000];
        page_views(&engine, &partitions, half, 2_000);
        changelog.checkpoint(&[0], &partitions, &tracker, true);
        page_views(&engine, &partitions, half, 3_000);
        changelog.encode_frozen(|_, _| true);
        let recorded = recorded_events(&changelog);
        assert_eq!(recorded.len(), 2, "two checkpoints");
        assert_eq!(recorded[0].len(), customers.len());
        assert!(recorded[0].values().all(|&e| e == 1), "{:?}", recorded[0]);
        assert_eq!(recorded[1].len(), half.len());
        assert!(recorded[1].values().all(|&e| e == 2), "{:?}", recorded[1]);

        // One taken at once holds the third page views.
        changelog.checkpoint(&[0], &partitions, &tracker, false);
        let recorded = recorded_events(&changelog);
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].len(), half.len());
        assert!(recorded[0].values().all(|&events| events == 3));
    }

    /// A producer context recording each delivered changelog record's key and
    /// checkpoint, in the order of the deliveries.
    #[derive(Default)]
    struct Recording(Mutex<Vec<(String, u64)>>);

    impl rdkafka::ClientContext for Recording {}

    impl ProducerContext for Recording {
        type DeliveryOpaque = Box<Ticket>;

        fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, ticket: Box<Ticket>) {
            use rdkafka::Message;
            let message = result
                .as_ref()
                .expect("the embedded broker takes every record");
            let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            let checkpoint = ticket.checkpoint.expect("a changelog record");
            self.0.lock().unwrap().push((key, checkpoint));
        }
    }

    /// A producer to a fresh embedded broker (librdkafka's, on a loopback port) with a
    /// one-partition topic `changelog`; the broker must outlive the producer.
    fn embedded_producer() -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        Arc<ThreadedProducer<Recording>>,
    ) {
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("changelog", 1, 1).unwrap();
        let producer = crate::emit::producer::create_producer(
            &mock.bootstrap_servers(),
            &Default::default(),
            Recording::default(),
        )
        .unwrap();
        (mock, Arc::new(producer))
    }

    /// Two checkpoints handed off one after the other reach the topic in that order
    /// through the sender thread: every record of the first (after the rules
    /// dictionary) before any of the second, so compaction keeps the later states. The
    /// thread runs at nice 10 or lower priority.
    #[test]
    fn the_sender_thread_writes_checkpoints_in_the_order_handed_off() {
        let customers: Vec<String> = (0..500).map(|i| format!("c-{i}")).collect();
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        let (engine, changelog) = seen_engine();
        let (_mock, producer) = embedded_producer();
        changelog.start_sender(producer.clone()).unwrap();
        let partitions: Partitions = Arc::default();
        let tracker = OffsetTracker::new();
        let mut ids = Vec::new();
        for ts in [1_000, 2_000] {
            page_views(&engine, &partitions, &customers, ts);
            changelog.checkpoint(&[0], &partitions, &tracker, false);
            let (outgoing, _) = changelog.ready(&tracker);
            ids.extend(outgoing.iter().map(|batch| batch.checkpoint));
            changelog.hand_off(outgoing).unwrap();
        }
        assert_eq!(ids.len(), 2, "one batch per checkpoint");
        let expected = 1 + 2 * customers.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while producer.context().0.lock().unwrap().len() < expected {
            assert!(
                Instant::now() < deadline,
                "the records were not all delivered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let delivered = producer.context().0.lock().unwrap().clone();
        assert_eq!(delivered.len(), expected);
        assert_eq!(delivered[0].0, dictionary_key(engine.rules().fingerprint));
        let order: Vec<u64> = delivered
            .iter()
            .map(|(_, checkpoint)| *checkpoint)
            .collect();
        let split = 1 + customers.len();
        assert!(order[..split].iter().all(|&id| id == ids[0]), "{order:?}");
        assert!(order[split..].iter().all(|&id| id == ids[1]), "{order:?}");
        assert!(changelog.hand_off(Vec::new()).is_ok(), "no send failed");
        assert_runs_below_normal_priority("changelog-send");
    }

    /// A checkpoint of a partition revoked (forgotten) after it was handed off is not
    /// written: the partition's next owner writes its states, and an older copy must
    /// not land after them.
    #[test]
    fn a_checkpoint_of_a_revoked_partition_is_not_written() {
        let (engine, changelog) = seen_engine();
        let (_mock, producer) = embedded_producer();
        let partitions: Partitions = Arc::default();
        page_views(&engine, &partitions, &["c-1", "c-2"], 1_000);
        changelog.checkpoint(&[0], &partitions, &OffsetTracker::new(), false);
        let (outgoing, _) = changelog.ready(&OffsetTracker::new());
        assert_eq!(outgoing.len(), 1);
        changelog.forget(|_| true);
        changelog.send(&producer, &outgoing[0]);
        assert_eq!(
            producer.in_flight_count(),
            0,
            "nothing was handed to the producer"
        );
        assert!(producer.context().0.lock().unwrap().is_empty());
    }
}
