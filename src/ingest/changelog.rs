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
//! # States encoded when they change
//!
//! Each partition's time records its changed customers with their states already
//! encoded, right after the event or timer that changed them, while the state is in the
//! CPU's cache ([`crate::state::changed`]). A checkpoint takes those encodings as they
//! are — the states as they were at its instant, since nothing changes a state without
//! being recorded — and puts its positions in front of each when it is sent. So taking
//! one costs the consume loop (or the rebalance callback, or an exactly-once commit)
//! next to nothing, whatever its size. (Earlier, checkpoints froze their customers and
//! a background thread encoded them from the store, cold: at 50,000 events/s five times
//! the cost per state, a lock the loop took on every write, and a thread competing for
//! the cores; BENCHMARKS.md.)
//!
//! # Sends off the consume loop
//!
//! Handing a checkpoint's records to the producer costs a microsecond or two each: at
//! 50,000 events/s a partition's checkpoint holds tens of thousands, and the loop stood
//! still for 30–100 ms once a second while it sent them. So every checkpoint's records,
//! the loop's and the rebalance callback's alike, go to one thread (`changelog-send`)
//! that hands them to the producer in the order they came ([`Changelog::hand_off`]):
//! per partition, a later checkpoint's records never reach the topic before an earlier
//! one's. It runs at nice 10: the records only gate offset commits, so on busy cores the
//! loop, the clients' threads and the broker run first. Acknowledgements arrive through
//! the producer's delivery callback.
//!
//! Each process writes, before its first state in a partition, the dictionary of its
//! rules (segment ids and slot descriptions) under a key of its own, so that a restore
//! under changed rules can translate the indexes states use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use super::delivery::Ticket;
use super::offsets::{OffsetTracker, PartitionKey};
use super::{IngestContext, Partitions};
use crate::emit::producer::send_blocking;
use crate::rules::RuleSet;
use crate::state::codec::{RulesDictionary, encode, record_head};

/// How long a checkpoint may wait for its messages' outputs before it is reported.
const STALLED: Duration = Duration::from_secs(10);

/// The pseudo topic under which idle partitions' timer changes are tracked: they answer
/// to no input message, but a checkpoint must wait for them too.
pub const TIMER_TOPIC: &str = "(timer)";

/// The key prefix of rules dictionaries in the changelog (customer ids never start with
/// a NUL character: the parser refuses control characters in ids).
pub const DICTIONARY_PREFIX: &str = "\u{0}rules:";

/// One partition's checkpoint.
struct Checkpoint {
    id: u64,
    /// Input partitions (and the timer pseudo partition) with the last message included.
    positions: Vec<(PartitionKey, i64)>,
    /// What its records are made of; taken when sent.
    records: StateRecords,
    sent: bool,
    /// Records sent and not yet acknowledged.
    outstanding: usize,
    /// When it was taken: one waiting far longer than a commit interval is reported.
    taken: Instant,
    reported: bool,
}

/// A checkpoint's state records, in parts: each record is the head followed by one
/// customer's state encoding.
#[derive(Default)]
struct StateRecords {
    /// [`record_head`]: the rules' fingerprint, and the positions as states record them
    /// (named topics, no timer pseudo topic).
    head: Vec<u8>,
    /// Customer ids and their states' encodings
    /// ([`encode_state_part`](crate::state::codec::encode_state_part)).
    states: Vec<(Box<str>, Box<[u8]>)>,
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

/// A checkpoint's records ready to go to the changelog topic.
pub struct Outgoing {
    number: i32,
    checkpoint: u64,
    /// The rules dictionary, before the partition's first states.
    dictionary: Option<(Box<str>, Vec<u8>)>,
    records: StateRecords,
}

impl Outgoing {
    /// How many records it holds.
    fn len(&self) -> usize {
        usize::from(self.dictionary.is_some()) + self.records.states.len()
    }

    /// Record `index`'s key and value, the value put together in `value` if it is a
    /// state's.
    fn record<'a>(&'a self, index: usize, value: &'a mut Vec<u8>) -> (&'a str, &'a [u8]) {
        let states = match &self.dictionary {
            Some((key, dictionary)) if index == 0 => return (key, dictionary),
            Some(_) => index - 1,
            None => index,
        };
        let (key, state) = &self.records.states[states];
        value.clear();
        value.extend_from_slice(&self.records.head);
        value.extend_from_slice(state);
        (key, value)
    }
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
    next_id: AtomicU64,
    /// The sender thread's queue ([`Changelog::start_sender`]), set once the producer
    /// exists. Dropping the changelog drops it, which ends the thread.
    sender: OnceLock<mpsc::Sender<Outgoing>>,
    /// The first error the sender thread met handing a record to the producer, reported
    /// by the next [`Changelog::hand_off`].
    send_failure: Mutex<Option<KafkaError>>,
}

impl Changelog {
    /// A writer to `topic` for states built with `rules`.
    pub fn new(topic: &str, rules: &RuleSet) -> Arc<Self> {
        Arc::new(Changelog {
            topic: topic.into(),
            fingerprint: rules.fingerprint,
            dictionary: (
                dictionary_key(rules.fingerprint).into(),
                encode(&RulesDictionary::of(rules)),
            ),
            logs: Mutex::default(),
            settled: Condvar::new(),
            next_id: AtomicU64::new(1),
            sender: OnceLock::new(),
            send_failure: Mutex::default(),
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Starts the thread (`changelog-send`) that hands checkpoints' records to
    /// `producer`, in the order [`Changelog::hand_off`] receives them, at a lower CPU
    /// priority (see the module documentation). Called once, when the producer exists;
    /// a second call changes nothing.
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
        // Each value is put together here and copied by the producer.
        let mut value = Vec::new();
        for index in 0..outgoing.len() {
            let (key, payload) = outgoing.record(index, &mut value);
            if let Err(err) = send_blocking(producer, self.record(outgoing, key, payload)) {
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
    /// states now (as encoded when they changed), and the positions those states include
    /// (the last message read of each of their input partitions; in event-time order, the
    /// last before the first event still held). Called where no event is being applied
    /// (the consume loop, or the rebalance callback, which blocks it).
    pub fn checkpoint(&self, numbers: &[i32], partitions: &Partitions, tracker: &OffsetTracker) {
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
            let states = time.take_changed();
            {
                let mut logs = self.lock();
                let log = logs.entry(number).or_default();
                if states.is_empty() && positions == log.last_positions {
                    continue;
                }
                log.last_positions = positions.clone();
            }
            let named: Vec<(Box<str>, i64)> = positions
                .iter()
                .filter(|(key, _)| *key.0 != *TIMER_TOPIC)
                .map(|(key, offset)| ((*key.0).into(), *offset))
                .collect();
            let checkpoint = Checkpoint {
                id: self
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                positions,
                records: StateRecords {
                    head: record_head(self.fingerprint, &named),
                    states,
                },
                sent: false,
                outstanding: 0,
                taken: Instant::now(),
                reported: false,
            };
            self.lock()
                .entry(number)
                .or_default()
                .checkpoints
                .push_back(checkpoint);
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
                let records = std::mem::take(&mut checkpoint.records);
                if records.states.is_empty() {
                    continue;
                }
                let dictionary = (!log.dictionary_written).then(|| self.dictionary.clone());
                log.dictionary_written = true;
                let batch = Outgoing {
                    number,
                    checkpoint: checkpoint.id,
                    dictionary,
                    records,
                };
                checkpoint.outstanding = batch.len();
                outgoing.push(batch);
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
        self.lock().retain(|&number, _| !which(number));
        self.settled.notify_all();
    }

    /// A record of `outgoing`, with `key` and `value`, to hand to the producer.
    fn record<'a>(
        &'a self,
        outgoing: &Outgoing,
        key: &'a str,
        value: &'a [u8],
    ) -> BaseRecord<'a, [u8], [u8], Box<Ticket>> {
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
        .payload(value)
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

/// Lowers the calling thread's CPU priority (nice 10; on Linux, nice is per thread): the
/// changelog's sender thread.
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
            tracing::debug!(error = %std::io::Error::last_os_error(), "Could not lower the changelog sender's priority.");
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
    use crate::engine::Engine;
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

    /// A checkpoint as its records read: their positions, and each customer's recorded
    /// count of events.
    type Recorded = (Vec<(Box<str>, i64)>, HashMap<Box<str>, u64>);

    /// The checkpoints ready to send by `tracker`'s acknowledgements, oldest first.
    fn recorded(changelog: &Changelog, tracker: &OffsetTracker) -> Vec<Recorded> {
        let (outgoing, _) = changelog.ready(tracker);
        let mut value = Vec::new();
        outgoing
            .iter()
            .map(|batch| {
                let mut positions = Vec::new();
                let mut events = HashMap::new();
                for index in 0..batch.len() {
                    let (key, value) = batch.record(index, &mut value);
                    if key.starts_with('\u{0}') {
                        continue;
                    }
                    let record = read_record(value).unwrap();
                    positions = record.positions;
                    let state = decode_state(record.state).unwrap();
                    events.insert(key.into(), state.customer.events);
                }
                (positions, events)
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
        let changelog = Changelog::new("changelog", engine.rules());
        (engine, changelog)
    }

    /// Each checkpoint records its changed customers as they were at it, with its
    /// positions, though they changed again before it was sent; a customer not changed
    /// since the previous checkpoint is not in the next.
    #[test]
    fn a_checkpoint_records_its_customers_as_they_were_at_it() {
        let customers: Vec<String> = (0..2_000).map(|i| format!("c-{i}")).collect();
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        let half = &customers[..1_000];
        let (engine, changelog) = seen_engine();
        let partitions: Partitions = Arc::default();
        let tracker = OffsetTracker::new();
        let input: PartitionKey = ("in".into(), 0);
        for (ts, written) in [(1_000, &customers[..]), (2_000, half)] {
            page_views(&engine, &partitions, written, ts);
            tracker.begin(&input, ts, 0, Instant::now());
            changelog.checkpoint(&[0], &partitions, &tracker);
        }
        page_views(&engine, &partitions, half, 3_000);

        let checkpoints = recorded(&changelog, &tracker);
        assert_eq!(checkpoints.len(), 2, "two checkpoints");
        let (positions, events) = &checkpoints[0];
        assert_eq!(*positions, [("in".into(), 1_000)]);
        assert_eq!(events.len(), customers.len());
        assert!(events.values().all(|&e| e == 1), "{events:?}");
        let (positions, events) = &checkpoints[1];
        assert_eq!(*positions, [("in".into(), 2_000)]);
        assert_eq!(events.len(), half.len());
        assert!(events.values().all(|&e| e == 2), "{events:?}");

        // The next holds the third page views.
        tracker.begin(&input, 3_000, 0, Instant::now());
        changelog.checkpoint(&[0], &partitions, &tracker);
        let checkpoints = recorded(&changelog, &tracker);
        assert_eq!(checkpoints.len(), 1);
        let (_, events) = &checkpoints[0];
        assert_eq!(events.len(), half.len());
        assert!(events.values().all(|&e| e == 3), "{events:?}");
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
            changelog.checkpoint(&[0], &partitions, &tracker);
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
        changelog.checkpoint(&[0], &partitions, &OffsetTracker::new());
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
