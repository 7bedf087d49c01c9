//! Restoring state when partitions are assigned: each assigned partition number's
//! changelog partition is read from its beginning to its end on a thread of its own,
//! while that number's input partitions stay paused and every other partition keeps
//! flowing. Restored customers go straight into the store; their timers, and which of
//! their events are already applied, go to the consume loop, which then resumes the
//! partition. `/readyz` answers "ready" once every owned partition is restored.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::changelog::DICTIONARY_PREFIX;
use crate::config::Config;
use crate::engine::Engine;
use crate::state::CustomerState;
use crate::state::codec::{
    DecodeError, RulesDictionary, Summary, Translation, Translator, decode, decode_state,
    read_record,
};
use crate::telemetry::Metrics;
use crate::time::Millis;

/// The maps a restore fills per customer: hashed fast (their keys are not hostile: they
/// come from our own changelog).
type FastHash = foldhash::fast::RandomState;

/// How long a metadata or offsets request of a restore may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the instance can serve: it has been assigned partitions, and none of them is
/// still restoring.
#[derive(Debug, Default)]
pub struct Readiness {
    assigned: AtomicBool,
    restoring: AtomicUsize,
}

impl Readiness {
    /// `Ok` when ready, else why not.
    pub fn status(&self) -> Result<(), &'static str> {
        if !self.assigned.load(Ordering::Relaxed) {
            Err("no partitions assigned yet")
        } else if self.restoring.load(Ordering::Relaxed) > 0 {
            Err("restoring state from the changelog")
        } else {
            Ok(())
        }
    }

    /// Partitions were assigned.
    pub fn assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }
}

/// Customers whose stored state already includes input messages the group has not
/// committed: those messages are read again, and must not be applied twice.
#[derive(Debug, Default)]
pub struct AlreadyApplied {
    /// Per customer, per input topic: the last offset its state includes.
    customers: HashMap<Box<str>, Vec<(Box<str>, i64)>>,
    /// Per input topic, the highest of those offsets: messages not yet read past it.
    horizon: HashMap<Box<str>, i64>,
}

impl AlreadyApplied {
    /// Whether `customer`'s state includes message `offset` of `topic`.
    pub fn includes(&self, customer: &str, topic: &str, offset: i64) -> bool {
        self.customers.get(customer).is_some_and(|positions| {
            positions
                .iter()
                .any(|(t, position)| **t == *topic && offset <= *position)
        })
    }

    /// Whether no customer is listed.
    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
    }

    /// Message `offset` of `topic` was read: returns `true` once every topic has been
    /// read past every listed position, so the list is no longer needed.
    pub fn read(&mut self, topic: &str, offset: i64) -> bool {
        if self.horizon.get(topic).is_some_and(|&last| offset >= last) {
            self.horizon.remove(topic);
        }
        self.horizon.is_empty()
    }

    /// Computes the horizon once every customer is listed.
    fn seal(&mut self) {
        for (topic, position) in self.customers.values().flatten() {
            let last = self.horizon.entry(topic.clone()).or_insert(*position);
            *last = (*last).max(*position);
        }
        self.customers.shrink_to_fit();
    }
}

/// A partition's finished restore, for the consume loop.
pub struct Restored {
    /// The partition number.
    pub number: i32,
    generation: u64,
    /// Restored customers' pending timers.
    pub timers: Vec<(Box<str>, Millis)>,
    /// Which re-read messages are already applied.
    pub applied: AlreadyApplied,
    /// How many customer states were read.
    pub records: u64,
    /// The committed offsets `applied` was computed against: the partition's input must
    /// resume exactly there (a commit landing between the assignment and the restore —
    /// a killed predecessor's last one — would otherwise make them disagree).
    pub resume_at: BTreeMap<String, i64>,
}

/// Where and how restores read.
struct Settings {
    client: ClientConfig,
    /// For the end marker each restore writes.
    producer: ClientConfig,
    topic: String,
    input_topics: Vec<String>,
}

/// A restore in progress.
struct Running {
    generation: u64,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

/// Starts, cancels and completes restores; shared by the rebalance callback and the
/// consume loop.
pub struct Restorer {
    settings: Arc<Settings>,
    engine: Engine,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    running: Mutex<HashMap<i32, Running>>,
    done: UnboundedSender<Restored>,
    generations: AtomicU64,
    committed: std::sync::OnceLock<CommittedReader>,
}

/// Reads the group's committed offsets of a partition number's input partitions.
pub type CommittedReader =
    Arc<dyn Fn(i32) -> Result<BTreeMap<String, i64>, KafkaError> + Send + Sync>;

impl Restorer {
    /// A restorer reading `config`'s changelog topic into `engine`, reporting finished
    /// restores on `done`.
    pub fn new(
        config: &Config,
        engine: Engine,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        done: UnboundedSender<Restored>,
    ) -> Self {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.kafka.brokers)
            .set(
                "fetch.queue.backoff.ms",
                super::consumer::FETCH_QUEUE_BACKOFF_MS,
            )
            .set("enable.partition.eof", "false");
        for (key, value) in &config.kafka.consumer {
            client.set(key, value);
        }
        // Restores read by assignment and never touch the service's group (a broker may
        // take a consumer with its id, closing, for a member leaving): librdkafka wants a
        // group id to assign, so they get one of their own, never joined or committed.
        client
            .remove("group.instance.id")
            .set("group.id", format!("{}.restore", config.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "10")
            // A restore reads a backlog: large fetches (a broker may otherwise answer each
            // fetch with one small batch as soon as it has any).
            .set("fetch.min.bytes", "1048576")
            .set("max.partition.fetch.bytes", "8388608");
        let mut producer = ClientConfig::new();
        producer.set("bootstrap.servers", &config.kafka.brokers);
        for (key, value) in &config.kafka.producer {
            producer.set(key, value);
        }
        producer.set("acks", "all").set("linger.ms", "0");
        Restorer {
            settings: Arc::new(Settings {
                client,
                producer,
                topic: config.kafka.changelog_topic.clone(),
                input_topics: config.kafka.input_topics.clone(),
            }),
            engine,
            metrics,
            readiness,
            running: Mutex::default(),
            done,
            generations: AtomicU64::new(1),
            committed: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the restorer how to read the group's committed offsets of a partition
    /// number's input partitions (through the group consumer, created after it).
    pub fn read_committed_with(&self, read: CommittedReader) {
        let _ = self.committed.set(read);
    }

    /// Starts restoring partition `number` (whose input partitions the caller paused).
    pub fn start(&self, number: i32) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("restore-{number}"))
            .spawn({
                let committed = self.committed.get().cloned();
                let (settings, engine, metrics, done, cancel) = (
                    self.settings.clone(),
                    self.engine.clone(),
                    self.metrics.clone(),
                    self.done.clone(),
                    cancel.clone(),
                );
                move || {
                    if let Some(mut restored) =
                        restore_until_done(&settings, &engine, &metrics, number, committed, &cancel)
                    {
                        restored.generation = generation;
                        let _ = done.send(restored);
                    }
                }
            })
            .expect("a thread can be spawned");
        let previous = self.lock().insert(
            number,
            Running {
                generation,
                cancel,
                thread: Some(thread),
                started: Instant::now(),
            },
        );
        if previous.is_none() {
            self.readiness.restoring.fetch_add(1, Ordering::Relaxed);
            self.metrics.restoring.inc();
        }
        tracing::info!(partition = number, "Restoring state from the changelog.");
    }

    /// Whether partition `number` is being restored.
    pub fn is_restoring(&self, number: i32) -> bool {
        self.lock().contains_key(&number)
    }

    /// Stops restoring partition `number` (revoked), waiting for its thread to end.
    pub fn cancel(&self, number: i32) {
        let Some(mut running) = self.lock().remove(&number) else {
            return;
        };
        running.cancel.store(true, Ordering::Relaxed);
        if let Some(thread) = running.thread.take() {
            let _ = thread.join();
        }
        self.ended(number);
    }

    /// Stops every restore (shutdown).
    pub fn cancel_all(&self) {
        let numbers: Vec<i32> = self.lock().keys().copied().collect();
        for number in numbers {
            self.cancel(number);
        }
    }

    /// Takes in a finished restore. Returns `false` when it is stale (the partition was
    /// revoked, or assigned again, meanwhile) and must be ignored.
    pub fn finish(&self, restored: &Restored) -> bool {
        let mut running = self.lock();
        let current = running
            .get(&restored.number)
            .is_some_and(|r| r.generation == restored.generation);
        if !current {
            return false;
        }
        let entry = running.remove(&restored.number).expect("checked above");
        drop(running);
        let seconds = entry.started.elapsed().as_secs_f64();
        self.metrics.restore_seconds.observe(seconds);
        tracing::info!(
            partition = restored.number,
            records = restored.records,
            resume_at = ?restored.resume_at,
            seconds,
            "Restored state from the changelog."
        );
        self.ended(restored.number);
        true
    }

    fn ended(&self, number: i32) {
        self.readiness.restoring.fetch_sub(1, Ordering::Relaxed);
        self.metrics.restoring.dec();
        let _ = self
            .metrics
            .restore_remaining
            .remove_label_values(&[&number.to_string()]);
    }

    /// The input partitions of `number`, for pausing and resuming.
    pub fn inputs_of(&self, number: i32) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for topic in &self.settings.input_topics {
            list.add_partition(topic, number);
        }
        list
    }
}

/// Restores partition `number`, retrying after errors (a broker restarting) until it
/// succeeds or is cancelled (`None`).
fn restore_until_done(
    settings: &Settings,
    engine: &Engine,
    metrics: &Metrics,
    number: i32,
    committed: Option<CommittedReader>,
    cancel: &AtomicBool,
) -> Option<Restored> {
    loop {
        // Without them every restored customer's positions are checked (safe, larger).
        let offsets = match committed.as_ref().map(|read| read(number)) {
            Some(Ok(offsets)) => offsets,
            Some(Err(err)) => {
                tracing::warn!(error = %err, partition = number, "Cannot read the committed offsets; checking every restored customer's positions.");
                BTreeMap::new()
            }
            None => BTreeMap::new(),
        };
        match restore(settings, engine, metrics, number, offsets, cancel) {
            Ok(restored) => return restored,
            Err(err) => {
                tracing::warn!(error = %err, partition = number, "Restore failed; retrying.");
                for _ in 0..10 {
                    if cancel.load(Ordering::Relaxed) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Reads changelog partition `number` from its beginning to its end into the store.
fn restore(
    settings: &Settings,
    engine: &Engine,
    metrics: &Metrics,
    number: i32,
    committed: BTreeMap<String, i64>,
    cancel: &AtomicBool,
) -> Result<Option<Restored>, KafkaError> {
    let consumer: BaseConsumer = settings.client.create()?;
    let (low, _) = consumer.fetch_watermarks(&settings.topic, number, REQUEST_TIMEOUT)?;
    // The end is the marker written now, not the broker's high watermark: a broker may
    // report that behind records it has acknowledged (Tansu 0.6 does, by a batch).
    let high = write_end_marker(settings, number)?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&settings.topic, number, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    let mut loader = Loader::new(engine, number, committed.clone());
    let remaining = metrics
        .restore_remaining
        .with_label_values(&[&number.to_string()]);
    let mut next = low;
    while next < high {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        next = message.offset() + 1;
        if next % 4096 == 0 {
            remaining.set(high - next);
        }
        if let (Some(key), Some(value)) = (message.key(), message.payload()) {
            loader.load(key, value, message.offset());
        }
    }
    remaining.set(0);
    let mut restored = loader.finish();
    restored.resume_at = committed;
    metrics.restored_customers.inc_by(restored.records);
    Ok(Some(restored))
}

/// Loads changelog records of one partition into the store: the pure part of a restore
/// (no broker), so it can be measured alone.
pub struct Loader<'a> {
    engine: &'a Engine,
    number: i32,
    /// The group's committed offset per input topic: states including messages at or
    /// after it are listed in [`AlreadyApplied`].
    committed: BTreeMap<String, i64>,
    translator: Translator,
    /// Per customer: how far its kept state got (the sum of its input positions; every
    /// position only grows along a partition's history), and its pending timer.
    kept: HashMap<Box<str>, (i64, Option<Millis>), FastHash>,
    restored: Restored,
}

impl<'a> Loader<'a> {
    /// A loader into `engine`'s store for partition `number`, given the group's
    /// committed offsets of its input partitions.
    pub fn new(engine: &'a Engine, number: i32, committed: BTreeMap<String, i64>) -> Self {
        Loader {
            engine,
            number,
            committed,
            translator: Translator::new(engine.rules()),
            kept: HashMap::default(),
            restored: Restored {
                number,
                // Stamped by the restorer.
                generation: 0,
                timers: Vec::new(),
                applied: AlreadyApplied::default(),
                records: 0,
                resume_at: BTreeMap::new(),
            },
        }
    }

    /// Takes one record (at `offset`, for log lines): a customer's state, a rules
    /// dictionary, or an end marker. Unreadable records are logged and skipped.
    pub fn load(&mut self, key: &[u8], value: &[u8], offset: i64) {
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(
                offset,
                "Changelog record with a key that is not UTF-8; skipped."
            );
            return;
        };
        if key == END_MARKER_KEY {
            return;
        }
        if key.starts_with(DICTIONARY_PREFIX) {
            match decode::<RulesDictionary>(value) {
                Ok(dictionary) => self.translator.learn(&dictionary),
                Err(err) => {
                    tracing::warn!(error = %err, key, "Unreadable rules dictionary; states written under those rules lose their segments.")
                }
            }
            return;
        }
        let unreadable = |err: DecodeError| {
            tracing::warn!(error = %err, customer = key, offset, "Unreadable changelog record; the customer's previous state is kept.");
        };
        let record = match read_record(value) {
            Ok(record) => record,
            Err(err) => return unreadable(err),
        };
        // The most advanced state wins, not the last written: an instance that lost its
        // partition without noticing (a broker's group hiccup) may still have written an
        // older one after its successor's newer ones.
        let progress: i64 = record.positions.iter().map(|(_, position)| *position).sum();
        if self.kept.get(key).is_some_and(|kept| kept.0 > progress) {
            return;
        }
        // A record of these rules is kept encoded as it is; others are decoded (and
        // translated).
        let segments = self.engine.rules().segments.len();
        let prepared = match &record.summary {
            Some(summary)
                if record.rules == self.engine.rules().fingerprint
                    && summary.segments.iter().all(|&s| usize::from(s) < segments) =>
            {
                Prepared::Encoded(summary)
            }
            _ => match decode_state(record.state) {
                Ok(mut state) => {
                    let translated =
                        self.translator.translate(record.rules, &mut state) != Translation::Same;
                    state.partition = self.number;
                    Prepared::Decoded(Box::new(state), translated)
                }
                Err(err) => return unreadable(err),
            },
        };
        // The key is copied only for a customer not seen before in this restore.
        let kept = match self.kept.get_mut(key) {
            Some(kept) => kept,
            None => self.kept.entry(key.into()).or_insert((progress, None)),
        };
        kept.0 = progress;
        let positions = record.positions;
        let committed = &self.committed;
        let applied_ahead = positions.iter().any(|(topic, position)| {
            committed
                .get(&**topic)
                .is_none_or(|&next_to_read| *position >= next_to_read)
        });
        let applied = &mut self.restored.applied.customers;
        if applied_ahead {
            applied.insert(key.into(), positions);
        } else {
            applied.remove(key);
        }
        kept.1 = match prepared {
            Prepared::Encoded(summary) => {
                self.engine
                    .restore_encoded(key.into(), self.number, summary, record.state)
            }
            // A translated state changed: the record's encoding no longer describes it.
            Prepared::Decoded(state, translated) => {
                let encoded = (!translated).then_some(record.state);
                self.engine.restore(key.into(), *state, translated, encoded)
            }
        };
        self.restored.records += 1;
    }

    /// The restore's result, once every record is loaded.
    pub fn finish(mut self) -> Restored {
        self.restored.applied.seal();
        self.restored.timers = self
            .kept
            .into_iter()
            .filter_map(|(customer, (_, timer))| Some((customer, timer?)))
            .collect();
        self.restored
    }
}

/// A state record ready to restore: kept encoded (with its summary), or decoded (and
/// whether it was translated from other rules).
enum Prepared<'a> {
    Encoded(&'a Summary),
    Decoded(Box<CustomerState>, bool),
}

/// The key of restores' end markers: one key, so compaction keeps one marker.
const END_MARKER_KEY: &str = "\u{0}restore";

/// Remembers the offset of the marker record once the broker acknowledges it.
#[derive(Default)]
struct MarkerDelivery(Mutex<Option<KafkaResult<i64>>>);

impl ClientContext for MarkerDelivery {}

impl ProducerContext for MarkerDelivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = match result {
            Ok(message) => Ok(message.offset()),
            Err((err, _)) => Err(err.clone()),
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    }
}

/// Writes an end marker to changelog partition `number` and returns the offset to read
/// up to (one past it): every state acknowledged before is before it.
fn write_end_marker(settings: &Settings, number: i32) -> Result<i64, KafkaError> {
    let producer: BaseProducer<MarkerDelivery> = settings
        .producer
        .create_with_context(MarkerDelivery::default())?;
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        crate::time::WallClock::system().now()
    );
    producer
        .send(
            BaseRecord::to(&settings.topic)
                .partition(number)
                .key(END_MARKER_KEY)
                .payload(&nonce),
        )
        .map_err(|(err, _)| err)?;
    producer.flush(REQUEST_TIMEOUT)?;
    let outcome = producer
        .context()
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match outcome {
        Some(Ok(offset)) => Ok(offset + 1),
        Some(Err(err)) => Err(err),
        None => Err(KafkaError::Flush(
            rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
        )),
    }
}

/// The group's committed offset (the next message to read) of each input partition of
/// `number` that has one.
pub fn committed_offsets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &[String],
    number: i32,
) -> Result<BTreeMap<String, i64>, KafkaError> {
    let mut list = TopicPartitionList::new();
    for topic in topics {
        list.add_partition(topic, number);
    }
    let committed = consumer.committed_offsets(list, REQUEST_TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(next) => Some((e.topic().to_owned(), next)),
            _ => None,
        })
        .collect())
}
