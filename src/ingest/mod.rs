//! The service: a Kafka consumer group over the input topics feeding the engine, a
//! producer for changes and dead letters, and the HTTP endpoint.
//!
//! # Delivery (at-least-once)
//!
//! Offsets are stored by hand (`enable.auto.offset.store=false`) and committed by the
//! client every `kafka.commit_interval`. Each input message is registered in the
//! [`offsets::OffsetTracker`] with the number of records it caused (changes and
//! dead-letter copy) before they are sent; the producer's delivery callback
//! ([`delivery::Acknowledger`]) counts acknowledgements and stores an offset once it and
//! every earlier message of its partition are fully acknowledged. So a committed offset
//! never runs ahead of an unacknowledged output. A record the producer finally fails to
//! deliver stops the service with an error, and its offset is never stored: a restart
//! re-reads it.
//!
//! # Exactly-once
//!
//! With `delivery.mode = "exactly_once"` the same bookkeeping decides which offsets are
//! complete, but they are committed by a Kafka transaction per commit interval together
//! with the outputs and changelog checkpoints; an aborted transaction rewinds every owned
//! partition to the last commit ([`transaction`]).
//!
//! # Rebalances and shutdown: draining
//!
//! When partitions are revoked, the rebalance callback blocks the consumer (no new
//! messages) until the revoked partitions have nothing in flight, then commits
//! synchronously, so their next owner starts exactly after the last acknowledged message.
//! Shutdown does the same for every partition: stop fetching, flush the producer, drain,
//! commit, leave the group. A drain that cannot finish within [`DRAIN_TIMEOUT`] abandons
//! the rest: those offsets are not committed and the messages are read again.

mod changelog;
mod consumer;
mod delivery;
pub mod offsets;
mod rekey;
pub mod restore;
mod sweeper;
pub mod topics;
mod transaction;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::config::{Config, DeliveryMode};
use crate::emit::change::SegmentChange;
use crate::emit::producer::{change_payload, create_producer, dead_letter_headers, send};
use crate::engine::{Engine, Outcome};
use crate::event::{Event, parse_event};
use crate::rules::RuleSet;
use crate::state::new_store;
use crate::telemetry::{InvalidEventReceived, Metrics};
use crate::time::WallClock;
use crate::time::partition::{PartitionTime, Released, TimeSettings};

use changelog::{Changelog, TIMER_TOPIC};
use consumer::Durable;
use delivery::{Acknowledger, DeliveryFailure, Ticket};
use offsets::{OffsetTracker, PartitionKey};
use restore::{AlreadyApplied, Restored, Restorer};
use transaction::{TransactionFailure, Transactions};

pub use consumer::IngestContext;
pub use restore::Readiness;

/// How long a drain (rebalance or shutdown) waits for in-flight records.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A Kafka client could not be created or subscribed (bad brokers, bad properties).
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    /// The topics are missing or unusable (not co-partitioned, changelog not compacted).
    #[error(transparent)]
    Topics(#[from] topics::TopicError),
    /// The HTTP port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An output record could not be delivered; its input offset was not committed.
    #[error(
        "delivery to the brokers failed (input offset not committed, a restart re-reads it): {0}"
    )]
    Delivery(KafkaError),
    /// Exactly-once: the transactional producer cannot go on — fenced (another instance
    /// started with the same transactional id, or the group gave this member's
    /// partitions to another) or a fatal broker error. Nothing after the last committed
    /// transaction is visible to `read_committed` readers.
    #[error(
        "exactly-once transactions cannot go on (nothing after the last commit is visible; a restart resumes from it): {0}"
    )]
    Transactions(KafkaError),
    /// The service's task ended without reporting (it panicked, or ended before it
    /// started without an error).
    #[error("the service task ended unexpectedly: {0}")]
    Task(String),
    /// The changelog's sender thread could not be started (the system's thread limit).
    #[error("cannot start the changelog sender thread: {0}")]
    SenderThread(std::io::Error),
}

/// What a started service exposes to its caller.
#[derive(Clone)]
pub struct Started {
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// The engine (for lookups and member counts).
    pub engine: Engine,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// Runs the service until `shutdown` completes (or a delivery fails). `started` is
/// called once the HTTP port is bound and the consumer subscribed.
pub async fn run(
    config: Config,
    rules: RuleSet,
    clock: WallClock,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(Started),
) -> Result<(), ServiceError> {
    let metrics = Metrics::new();
    metrics.register_segments(&rules);
    let engine = Engine::new(
        Arc::new(rules),
        new_store(),
        config.time.session_gap.millis(),
    );
    let readiness = Arc::new(Readiness::default());
    let tracker = OffsetTracker::new();
    let partitions: Partitions = Arc::default();
    let (restored_tx, mut restored_rx) = tokio::sync::mpsc::unbounded_channel();
    let transactions = (config.delivery.mode == DeliveryMode::ExactlyOnce)
        .then(|| Transactions::new(&config.transactional_id(), metrics.clone()));
    let durable = (!config.kafka.changelog_topic.is_empty()).then(|| Durable {
        changelog: Changelog::new(&config.kafka.changelog_topic, &engine),
        restorer: Arc::new(Restorer::new(
            &config,
            engine.clone(),
            metrics.clone(),
            readiness.clone(),
            restored_tx,
        )),
        producer: OnceLock::new(),
        transactions: transactions.clone(),
    });
    let context = IngestContext::new(
        metrics.clone(),
        readiness.clone(),
        tracker.clone(),
        partitions.clone(),
        engine.clone(),
        config.kafka.input_topics.clone(),
        durable,
    );
    let consumer = Arc::new(consumer::create_consumer(&config, context)?);
    let changelog = consumer.context().durable().map(|d| d.changelog.clone());
    let restorer = consumer.context().durable().map(|d| d.restorer.clone());
    if let Some(restorer) = &restorer {
        // Through the group consumer, from the restore threads (a blocking request, kept
        // out of the rebalance callback); weak, so the consumer can still be dropped.
        let group = Arc::downgrade(&consumer);
        let inputs = config.kafka.input_topics.clone();
        restorer.read_committed_with(Arc::new(move |number| match group.upgrade() {
            Some(consumer) => restore::committed_offsets(consumer.as_ref(), &inputs, number),
            None => Err(KafkaError::Canceled),
        }));
    }
    let failure = Arc::new(DeliveryFailure::default());
    let acknowledger = Acknowledger {
        tracker: tracker.clone(),
        consumer: Arc::downgrade(&consumer),
        metrics: metrics.clone(),
        failure: failure.clone(),
        changelog: changelog.clone(),
    };
    let mut producer_settings = config.kafka.producer.clone();
    if transactions.is_some() {
        producer_settings.insert("transactional.id".into(), config.transactional_id());
        // A crashed instance's open transaction blocks `read_committed` readers of its
        // partitions until it times out (unless it restarts with the same id first).
        let timeout = producer_settings
            .entry("transaction.timeout.ms".into())
            .or_insert_with(|| "10000".into())
            .clone();
        // librdkafka wants a record given up on within its transaction's timeout.
        producer_settings
            .entry("message.timeout.ms".into())
            .or_insert(timeout);
    }
    let producer = Arc::new(create_producer(
        &config.kafka.brokers,
        &producer_settings,
        acknowledger,
    )?);
    if let Some(durable) = consumer.context().durable() {
        durable
            .changelog
            .start_sender(producer.clone())
            .map_err(ServiceError::SenderThread)?;
        let _ = durable.producer.set(producer.clone());
    }
    if let Some(transactions) = &transactions {
        let (transactions, producer) = (transactions.clone(), producer.clone());
        tokio::task::spawn_blocking(move || transactions.start(&producer))
            .await
            .map_err(|err| ServiceError::Task(err.to_string()))?
            .map_err(ServiceError::Transactions)?;
    }
    topics::prepare(&config).await?;
    // The group assigns the first input topic's partitions; the others follow them.
    consumer.subscribe(&[config.kafka.input_topics[0].as_str()])?;

    let queue_producer = producer.clone();
    let queue_metrics = metrics.clone();
    let http = crate::http::serve(
        config.http.listen,
        crate::http::AppState {
            engine: engine.clone(),
            metrics: metrics.clone(),
            ready: readiness.clone(),
            on_scrape: Arc::new(move || {
                queue_metrics
                    .producer_queue
                    .set(i64::from(queue_producer.in_flight_count()))
            }),
        },
    )
    .await
    .map_err(|source| ServiceError::Http {
        addr: config.http.listen,
        source,
    })?;
    let http_addr = http.addr;
    started(Started {
        http_addr,
        engine: engine.clone(),
        metrics: metrics.clone(),
    });
    tracing::info!(topics = ?config.kafka.input_topics, brokers = %config.kafka.brokers, "Consuming.");
    let sweeper = sweeper::Sweeper::start(
        engine.store().clone(),
        config.state.idle_after.as_std(),
        metrics.clone(),
    );
    let rekeying = if config.kafka.rekey_topics.is_empty() {
        None
    } else {
        match rekey::start(&config, metrics.clone(), failure.clone()) {
            Ok(rekeying) => Some(rekeying),
            Err(err) => {
                http.stop().await;
                if let Some(sweeper) = sweeper {
                    sweeper.stop();
                }
                return Err(err.into());
            }
        }
    };

    let topics = config
        .kafka
        .input_topics
        .iter()
        .map(|t| InputTopic::new(t, &metrics, engine.rules()))
        .collect();
    let pipeline = Pipeline {
        engine,
        producer: producer.clone(),
        consumer: consumer.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        topics,
        output_topic: config.kafka.output_topic.clone(),
        dead_letter_topic: config.kafka.dead_letter_topic.clone(),
        max_event_bytes: config.limits.max_event_bytes,
        partitions,
        time: config.time.live(),
        clock,
        changelog,
        restorer,
        applied: Mutex::default(),
        timer_batches: std::sync::atomic::AtomicI64::new(0),
        rewinding: Mutex::default(),
    };
    // Exactly-once: why the transactions stopped the service, if they did.
    let mut fatal = None;
    tokio::pin!(shutdown);
    // Reused for every message: the changes it causes, and the events it lets apply.
    let mut changes = Vec::new();
    let mut released = Vec::new();
    let mut timer_tick = tokio::time::interval(TIMER_TICK);
    timer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At least once, a tick takes the checkpoints of one slice of the partitions (by
    // number), `CHECKPOINT_SLICES` ticks per commit interval: every partition once per
    // interval, and the encoding of one slice's changed customers at a time.
    // Exactly once, a tick commits every partition's transaction together.
    let slices = if transactions.is_some() {
        1
    } else {
        CHECKPOINT_SLICES
    };
    let mut slice = 0;
    let mut checkpoint_tick = tokio::time::interval(Duration::from_millis(
        (config.kafka.commit_interval.millis().max(1) as u64 / slices as u64).max(1),
    ));
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("Shutting down: finishing in-flight work.");
                break;
            }
            () = failure.notify.notified() => break,
            Some(restored) = restored_rx.recv() => pipeline.take_restored(restored),
            _ = timer_tick.tick() => {
                let result = match pipeline.fire_idle_timers(&mut changes).await {
                    Ok(()) => pipeline.send_checkpoints(),
                    err => err,
                };
                if let Err(err) = result {
                    failure.record(err);
                    break;
                }
            }
            _ = checkpoint_tick.tick(), if pipeline.changelog.is_some() => {
                if transactions.is_some() {
                    if let Err(err) = pipeline.commit_transaction().await {
                        fatal = Some(err);
                        break;
                    }
                } else {
                    pipeline.checkpoint(|number| number.rem_euclid(slices) == slice, true);
                    slice = (slice + 1) % slices;
                    if let Err(err) = pipeline.send_checkpoints() {
                        failure.record(err);
                        break;
                    }
                }
            }
            message = consumer.recv() => match message {
                Ok(message) => {
                    if let Some(transactions) = &transactions {
                        // The rebalance callback met an abort or a fatal error.
                        if let Some(err) = transactions.take_failure() {
                            fatal = Some(err);
                            break;
                        }
                        if transactions.take_rewind() {
                            pipeline.rewind();
                            continue; // read again from the committed offset
                        }
                    }
                    // Fetched before a rewind: read again from the committed offset.
                    let stale = transactions.is_some() && pipeline.is_rewinding(message.partition());
                    // A message of a partition still restoring (fetched before it was
                    // paused) waits for the restore.
                    while pipeline.is_restoring(message.partition()) {
                        match restored_rx.recv().await {
                            Some(restored) => pipeline.take_restored(restored),
                            None => break,
                        }
                    }
                    if stale {
                        continue;
                    }
                    if let Err(err) = pipeline.process(&message, &mut changes, &mut released).await {
                        failure.record(err);
                        break;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "Consumer error; continuing."),
            },
        }
    }

    if let Some(rekeying) = rekeying {
        rekeying.stop().await;
    }
    if let Some(restorer) = &pipeline.restorer {
        restorer.cancel_all();
    }
    // Events still held for event-time order were not applied: their input is read again.
    abandon_held(&pipeline.partitions, &tracker, |_| true);
    if transactions.is_some() {
        if fatal.is_none() {
            // The last transaction: every partition's state, outputs and offsets.
            match pipeline.commit_transaction().await {
                Ok(()) => tracing::info!("Committed the last transaction."),
                Err(err) => fatal = Some(err),
            }
        }
    } else {
        // Drain: every acknowledged message's offset stored, then committed. Flushing
        // and waiting block, so they run off the async workers.
        let mut drained = drain(&producer, &tracker).await;
        if drained && pipeline.changelog.is_some() {
            // A last checkpoint of every partition: the next owner restores exactly this.
            pipeline.checkpoint(|_| true, false);
            drained = pipeline.send_checkpoints().is_ok() && pipeline.settle().await;
        }
        if drained {
            commit_final(&consumer, &tracker).await;
        } else {
            tracing::warn!(
                "Some output was not acknowledged in time: its input will be read again."
            );
        }
    }
    consumer.context().finish();
    consumer.unsubscribe();
    http.stop().await;
    if let Some(sweeper) = sweeper {
        sweeper.stop();
    }
    tracing::info!("Stopped.");
    if let Some(err) = fatal {
        return Err(ServiceError::Transactions(err));
    }
    match failure.get() {
        Some(err) => Err(ServiceError::Delivery(err)),
        None => Ok(()),
    }
}

/// Flushes the producer and waits until nothing is in flight, off the async workers.
/// Returns whether everything was acknowledged in time.
async fn drain(
    producer: &Arc<ThreadedProducer<Acknowledger>>,
    tracker: &Arc<OffsetTracker>,
) -> bool {
    tokio::task::spawn_blocking({
        let (producer, tracker) = (producer.clone(), tracker.clone());
        move || {
            let _ = producer.flush(DRAIN_TIMEOUT);
            tracker.drain(|_| true, DRAIN_TIMEOUT)
        }
    })
    .await
    .unwrap_or(false)
}

/// A service running in the background (the demo, tests): what it exposes, and the means
/// to stop it.
pub struct Background {
    /// The started service's address, engine and metrics.
    pub started: Started,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServiceError>>,
}

impl Background {
    /// Signals shutdown and waits for the graceful stop.
    pub async fn stop(self) -> Result<(), ServiceError> {
        let _ = self.stop.send(());
        joined(self.task.await)
    }

    /// Waits for the service to end on its own (a failure), without signalling shutdown.
    pub async fn stopped(self) -> Result<(), ServiceError> {
        let Background { stop, task, .. } = self;
        let result = joined(task.await);
        drop(stop);
        result
    }
}

/// Starts [`run`] on a task and returns once its HTTP port is bound and the consumer
/// subscribed, or with the error that stopped it before that. `clock` is the wall clock
/// the service reads (a manual one in tests).
pub async fn spawn(
    config: Config,
    rules: RuleSet,
    clock: WallClock,
) -> Result<Background, ServiceError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(run(config, rules, clock, shutdown, move |started| {
        let _ = started_tx.send(started);
    }));
    match started_rx.await {
        Ok(started) => Ok(Background {
            started,
            stop,
            task,
        }),
        // It ended before it started: its own error says why.
        Err(_) => Err(joined(task.await)
            .err()
            .unwrap_or_else(|| ServiceError::Task("ended before it started".into()))),
    }
}

/// How a service task ended, a panic included.
fn joined(
    result: Result<Result<(), ServiceError>, tokio::task::JoinError>,
) -> Result<(), ServiceError> {
    result.unwrap_or_else(|err| Err(ServiceError::Task(err.to_string())))
}

/// The last commit before leaving the group: every partition's completed offset, retried
/// while the group is rebalancing (another member leaving or joining at the same moment),
/// polling the consumer meanwhile so that it can rejoin.
/// A commit that cannot finish within [`DRAIN_TIMEOUT`] (brokers gone) is abandoned, so
/// that shutdown always ends.
async fn commit_final(
    consumer: &Arc<rdkafka::consumer::StreamConsumer<IngestContext>>,
    tracker: &OffsetTracker,
) {
    let released: Vec<(PartitionKey, i64)> = tracker
        .release(|_| true)
        .into_iter()
        .filter(|(key, _)| *key.0 != *TIMER_TOPIC)
        .collect();
    if released.is_empty() {
        return;
    }
    let offsets = consumer::commit_list(&released);
    for attempt in 1..=COMMIT_ATTEMPTS {
        let commit = tokio::task::spawn_blocking({
            let (consumer, offsets) = (consumer.clone(), offsets.clone());
            move || consumer.commit(&offsets, CommitMode::Sync)
        });
        let Ok(Ok(result)) = tokio::time::timeout(DRAIN_TIMEOUT, commit).await else {
            tracing::warn!(
                "Final commit did not finish in time; the group keeps the previous commit."
            );
            return;
        };
        match result {
            Ok(()) => {
                tracing::info!(partitions = released.len(), "Committed final offsets.");
                return;
            }
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress | RDKafkaErrorCode::IllegalGeneration,
            )) if attempt < COMMIT_ATTEMPTS => {
                // The consumer takes part in a rebalance only when polled. A message read
                // now is not processed, so its offset is not committed.
                let _ = tokio::time::timeout(Duration::from_millis(250), consumer.recv()).await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "Final commit failed; the group keeps the previous commit.");
                return;
            }
        }
    }
}

/// How often the final commit is tried while the group rebalances.
const COMMIT_ATTEMPTS: u32 = 20;

/// Into how many slices (by partition number) the at-least-once checkpoints of one commit
/// interval are spread: a checkpoint encodes its partitions' changed customers on the
/// consume loop's thread, and a quarter of them at a time keeps events from queueing
/// behind all of them at once.
const CHECKPOINT_SLICES: i32 = 4;

/// How often idle partitions' watermarks are moved on by the wall clock and their due
/// timers fired: a timer fires at most this long after the watermark passes it.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// The event time of each owned partition (by number, across input topics): shared with
/// the rebalance callback, which drops a partition's timers and held events when it is
/// revoked.
pub type Partitions = Arc<Mutex<BTreeMap<i32, PartitionTime<Source>>>>;

/// The input message an event came from: what its changes answer to.
#[derive(Clone, Debug)]
pub struct Source {
    /// Its topic and partition.
    pub partition: PartitionKey,
    /// Its offset.
    pub offset: i64,
    /// Its topic's index among the input topics (for the per-type counters).
    topic: Option<usize>,
}

/// Whose timers' changes follow the released events': the message being processed
/// (its offset then waits for them), or an idle partition's tick (no message).
enum TimerChanges {
    Of(PartitionKey, i64),
    Idle(i32),
}

/// A produced record's ticket.
fn ticket_for(partition: PartitionKey, offset: Option<i64>) -> Box<Ticket> {
    Box::new(Ticket {
        partition,
        offset,
        dead_letter: None,
        checkpoint: None,
    })
}

/// Drops the held events of the partitions `which` selects (a revocation, a shutdown):
/// they were not applied, so their messages — and every later one of their partition —
/// stop being tracked, are not committed, and are read again by the next owner.
pub fn abandon_held(
    partitions: &Partitions,
    tracker: &OffsetTracker,
    which: impl Fn(&PartitionKey) -> bool,
) {
    let mut partitions = partitions.lock().unwrap_or_else(|p| p.into_inner());
    for time in partitions.values_mut() {
        for source in time.drop_held_where(|source| which(&source.partition)) {
            tracker.abandon_from(&source.partition, source.offset);
        }
    }
}

/// The per-message work of the consume loop.
struct Pipeline {
    engine: Engine,
    producer: Arc<ThreadedProducer<Acknowledger>>,
    consumer: Arc<rdkafka::consumer::StreamConsumer<IngestContext>>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    /// The input topics, with their per-event-type counters.
    topics: Vec<InputTopic>,
    output_topic: String,
    dead_letter_topic: String,
    max_event_bytes: usize,
    /// Watermarks and timers per partition.
    partitions: Partitions,
    time: TimeSettings,
    clock: WallClock,
    /// The changelog writer, when state is durable.
    changelog: Option<Arc<Changelog>>,
    /// Restores assigned partitions, when state is durable.
    restorer: Option<Arc<Restorer>>,
    /// Per restored partition: the re-read messages its stored states already include.
    applied: Mutex<BTreeMap<i32, AlreadyApplied>>,
    /// Numbers the idle timers' batches of changes in the offset tracker.
    timer_batches: std::sync::atomic::AtomicI64,
    /// Partitions rewound after an aborted transaction, until their restore finishes:
    /// their input then starts again at the committed offsets (from the beginning where
    /// none is committed), and what was fetched before is dropped.
    rewinding: Mutex<std::collections::BTreeSet<i32>>,
}

/// An input topic: its name, shared by every in-flight record's ticket, and its
/// `segmentd_events_total` counter per event type id, resolved once instead of per event.
struct InputTopic {
    name: Arc<str>,
    events: Vec<IntCounter>,
}

impl InputTopic {
    fn new(name: &str, metrics: &Metrics, rules: &RuleSet) -> Self {
        let events = (0..rules.types.id_count())
            .map(|t| {
                metrics
                    .events
                    .with_label_values(&[name, rules.types.name(t as u16)])
            })
            .collect();
        InputTopic {
            name: name.into(),
            events,
        }
    }
}

impl Pipeline {
    /// A new partition's time: its changed customers recorded when state is durable.
    fn new_partition_time(&self, wall_now: crate::time::Millis) -> PartitionTime<Source> {
        let time = PartitionTime::new(self.time, wall_now);
        if self.changelog.is_some() {
            time.record_changes()
        } else {
            time
        }
    }

    /// The shared name of input topic `topic` (as tickets and the tracker hold it).
    fn topic_name(&self, topic: &str) -> Arc<str> {
        self.topics
            .iter()
            .find(|t| *t.name == *topic)
            .map_or_else(|| Arc::from(topic), |t| t.name.clone())
    }

    /// Whether partition `number` is being restored (its events must wait).
    fn is_restoring(&self, number: i32) -> bool {
        self.restorer
            .as_ref()
            .is_some_and(|restorer| restorer.is_restoring(number))
    }

    /// Takes in a finished restore: the restored customers' timers join the partition's
    /// wheel, the messages their states include are marked, and the partition's input
    /// resumes.
    fn take_restored(&self, restored: Restored) {
        let Some(restorer) = &self.restorer else {
            return;
        };
        if !restorer.finish(&restored) {
            return;
        }
        let number = restored.number;
        {
            let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let time = partitions
                .entry(number)
                .or_insert_with(|| self.new_partition_time(self.clock.now()));
            for (customer, deadline) in &restored.timers {
                time.timers.schedule(customer, Some(*deadline));
            }
        }
        if !restored.applied.is_empty() {
            self.applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(number, restored.applied);
        }
        let rewound = self
            .rewinding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&number);
        if rewound {
            // Nothing committed yet: the rewound input starts again at its beginning.
            for topic in &self.topics {
                if !restored.resume_at.contains_key(&*topic.name) {
                    let seek = self.consumer.seek(
                        &topic.name,
                        number,
                        rdkafka::Offset::Beginning,
                        Duration::from_secs(5),
                    );
                    if let Err(err) = seek {
                        tracing::warn!(error = %err, topic = %topic.name, partition = number, "Cannot move a rewound partition to its beginning.");
                    }
                }
            }
        }
        for (topic, offset) in &restored.resume_at {
            let seek = self.consumer.seek(
                topic,
                number,
                rdkafka::Offset::Offset(*offset),
                Duration::from_secs(5),
            );
            match seek {
                Ok(()) => {
                    let key: PartitionKey = (self.topic_name(topic), number);
                    self.tracker.start_at(&key, *offset);
                }
                Err(err) => {
                    tracing::warn!(error = %err, topic, partition = number, "Cannot move a restored partition to the offset its restore used.");
                }
            }
        }
        if let Err(err) = self.consumer.resume(&restorer.inputs_of(number)) {
            tracing::error!(error = %err, partition = number, "Cannot resume a restored partition.");
        }
    }

    /// Whether the event's customer's restored state already includes its message (read
    /// again after a crash): then it is not applied twice.
    fn already_applied(&self, event: &Event, partition: &PartitionKey, offset: i64) -> bool {
        if self.restorer.is_none() {
            return false;
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = applied.get_mut(&partition.1) else {
            return false;
        };
        let included = list.includes(&event.customer_id, &partition.0, offset);
        if list.read(&partition.0, offset) {
            applied.remove(&partition.1);
        }
        included
    }

    /// Exactly-once: commits the open transaction (off the async workers: it blocks);
    /// rewinds when it had to be aborted. Returns the fatal error that must stop the
    /// service.
    async fn commit_transaction(&self) -> Result<(), KafkaError> {
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.context().commit_transaction(&*consumer))
                .await
                .unwrap_or_else(|err| Err(TransactionFailure::Aborted(err.to_string())));
        match committed {
            Ok(()) => Ok(()),
            Err(TransactionFailure::Aborted(_)) => {
                self.rewind();
                Ok(())
            }
            Err(TransactionFailure::Fatal(err)) => Err(err),
        }
    }

    /// After an aborted transaction: the state of every owned partition is ahead of what
    /// was committed. Drops it all (customers, timers, held events, in-flight tracking,
    /// pending checkpoints) and restores each partition from the changelog, its input
    /// paused until then and read again from the committed offsets.
    fn rewind(&self) {
        let Some(restorer) = &self.restorer else {
            return;
        };
        let owned: std::collections::BTreeSet<i32> = match self.consumer.assignment() {
            Ok(list) => list.elements().iter().map(|p| p.partition()).collect(),
            Err(err) => {
                tracing::error!(error = %err, "Cannot read the assignment to rewind.");
                return;
            }
        };
        restorer.cancel_all();
        abandon_held(&self.partitions, &self.tracker, |_| true);
        self.tracker.release(|_| true);
        if let Some(changelog) = &self.changelog {
            changelog.forget(|_| true);
        }
        let dropped = self.engine.drop_partitions(|_| true);
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::warn!(partitions = ?owned, customers = dropped, "Rewinding to the last committed transaction: restoring state.");
        let mut rewinding = self.rewinding.lock().unwrap_or_else(|p| p.into_inner());
        for number in owned {
            if let Err(err) = self.consumer.pause(&restorer.inputs_of(number)) {
                tracing::warn!(error = %err, partition = number, "Cannot pause a rewound partition.");
            }
            rewinding.insert(number);
            restorer.start(number);
        }
    }

    /// Whether partition `number` is being rewound (what was fetched before is stale).
    fn is_rewinding(&self, number: i32) -> bool {
        self.rewinding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&number)
    }

    /// Takes a changelog checkpoint of the partitions `which` selects; `deferred`: their
    /// customers encoded off the loop (see [`changelog`]).
    fn checkpoint(&self, which: impl Fn(i32) -> bool, deferred: bool) {
        let Some(changelog) = &self.changelog else {
            return;
        };
        let numbers: Vec<i32> = {
            let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            partitions.keys().copied().filter(|&n| which(n)).collect()
        };
        changelog.checkpoint(&numbers, &self.partitions, &self.tracker, deferred);
    }

    /// Hands the checkpoints whose messages' outputs are acknowledged to the changelog's
    /// sender thread, and stores the offsets settled checkpoints make committable.
    fn send_checkpoints(&self) -> Result<(), KafkaError> {
        let Some(changelog) = &self.changelog else {
            return Ok(());
        };
        changelog.release(&self.tracker, self.consumer.as_ref())
    }

    /// At shutdown: waits until every checkpoint is sent and acknowledged. Returns
    /// whether they were in time.
    async fn settle(&self) -> bool {
        let Some(changelog) = &self.changelog else {
            return true;
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            if self.send_checkpoints().is_err() {
                return false;
            }
            let numbers: Vec<i32> = {
                let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
                partitions.keys().copied().collect()
            };
            let settled = tokio::task::spawn_blocking({
                let changelog = changelog.clone();
                move || changelog.wait_settled(&numbers, Duration::from_millis(100))
            })
            .await
            .unwrap_or(false);
            if settled {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Parses, applies and produces the outputs of one input message, registering them in
    /// the tracker before any can be acknowledged.
    async fn process(
        &self,
        message: &BorrowedMessage<'_>,
        changes: &mut Vec<SegmentChange>,
        released: &mut Vec<Released<Source>>,
    ) -> Result<(), KafkaError> {
        let received = Instant::now();
        let topic = message.topic();
        let partition: PartitionKey = (self.topic_name(topic), message.partition());
        let offset = message.offset();
        if tracing::enabled!(tracing::Level::DEBUG)
            && let Some(last) = self.tracker.last_registered(&partition)
            && offset > last + 1
        {
            // Normal on compacted or transactional topics (offsets without a message to
            // read); elsewhere a broker that skipped messages (Tansu 0.6 answers a fetch
            // starting inside a batch from the next batch on).
            tracing::debug!(
                topic,
                partition = partition.1,
                offset,
                last,
                "Input offsets jumped: the messages between were not delivered."
            );
        }
        if self.tracker.already_read(&partition, offset) {
            tracing::debug!(
                topic,
                partition = partition.1,
                offset,
                "Message read again without a rebalance; already applied."
            );
            self.metrics.events_duplicate.inc();
            return Ok(());
        }
        let payload = message.payload().unwrap_or_default();
        let ticket = |dead_letter| {
            Box::new(Ticket {
                partition: partition.clone(),
                offset: Some(offset),
                dead_letter,
                checkpoint: None,
            })
        };
        match parse_event(payload, self.max_event_bytes) {
            Err(rejection) => {
                InvalidEventReceived {
                    reason: rejection.reason,
                    detail: &rejection.detail,
                    topic,
                    partition: partition.1,
                    offset,
                }
                .emit(&self.metrics);
                self.tracker.hold(&partition, offset, received);
                let reason = rejection.reason.as_str();
                let full = self
                    .dead_letter(
                        message,
                        payload,
                        &rejection,
                        &partition,
                        ticket(Some(reason)),
                        None,
                    )
                    .await;
                match full {
                    // Larger than the producer accepts: forward the first bytes, marked, so
                    // that one huge message cannot stop the partition.
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                        let cut = &payload[..payload.len().min(self.max_event_bytes)];
                        let ticket = ticket(Some(reason));
                        self.dead_letter(
                            message,
                            cut,
                            &rejection,
                            &partition,
                            ticket,
                            Some(payload.len()),
                        )
                        .await?;
                    }
                    other => other?,
                }
            }
            Ok(mut event) => {
                event.partition = partition.1;
                if self.already_applied(&event, &partition, offset) {
                    tracing::debug!(
                        topic,
                        partition = partition.1,
                        offset,
                        customer = %event.customer_id,
                        "Event already in its customer's restored state; skipped."
                    );
                    self.metrics.events_duplicate.inc();
                    self.tracker.begin(&partition, offset, 0, received);
                    return Ok(());
                }
                changes.clear();
                let wall_now = self.clock.now();
                let source = Source {
                    partition: partition.clone(),
                    offset,
                    topic: self.topics.iter().position(|t| *t.name == *topic),
                };
                // The message is in flight until its event is applied (at once, or when
                // the watermark passes it in event-time order) and its changes delivered.
                self.tracker.hold(&partition, offset, received);
                released.clear();
                let step = {
                    let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
                    partitions
                        .entry(partition.1)
                        .or_insert_with(|| self.new_partition_time(wall_now))
                        .take(&self.engine, event, source, wall_now, changes, released)
                };
                if step.late {
                    self.metrics.events_late.inc();
                }
                self.metrics.timers_fired.inc_by(step.timers_fired);
                self.publish_released(changes, released, TimerChanges::Of(partition, offset))
                    .await?;
            }
        }
        Ok(())
    }

    /// Publishes the changes of applied events, each answering to its input message, then
    /// the timers' changes that follow them; completes each applied event's message once
    /// its changes are registered.
    async fn publish_released(
        &self,
        changes: &[SegmentChange],
        released: &[Released<Source>],
        timers: TimerChanges,
    ) -> Result<(), KafkaError> {
        // Each applied event's changes run from where the previous one's ended.
        let starts = std::iter::once(0).chain(released.iter().map(|e| e.changes_end));
        for event in released {
            self.count_event(&event.tag, event.outcome);
        }
        for (event, start) in released.iter().zip(starts.clone()) {
            let count = (event.changes_end - start) as u32;
            self.tracker
                .add(&event.tag.partition, event.tag.offset, count);
        }
        let timer_changes = &changes[released.last().map_or(0, |e| e.changes_end)..];
        if let TimerChanges::Of(partition, offset) = &timers {
            self.tracker
                .add(partition, *offset, timer_changes.len() as u32);
        }
        for (event, start) in released.iter().zip(starts) {
            let source = &event.tag;
            self.publish(&changes[start..event.changes_end], || {
                ticket_for(source.partition.clone(), Some(source.offset))
            })
            .await?;
        }
        match timers {
            TimerChanges::Of(partition, offset) => {
                self.publish(timer_changes, || {
                    ticket_for(partition.clone(), Some(offset))
                })
                .await?
            }
            TimerChanges::Idle(number) if !timer_changes.is_empty() => {
                // Tracked like a message, so that checkpoints wait for these changes.
                let source: PartitionKey = (Arc::from(TIMER_TOPIC), number);
                let batch = self
                    .timer_batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.tracker
                    .begin(&source, batch, timer_changes.len() as u32, Instant::now());
                self.publish(timer_changes, || ticket_for(source.clone(), Some(batch)))
                    .await?
            }
            TimerChanges::Idle(_) => {}
        }
        for event in released {
            let completed = self
                .tracker
                .acknowledged(&event.tag.partition, event.tag.offset);
            delivery::messages_completed(
                self.consumer.as_ref(),
                self.changelog.is_some(),
                &self.metrics,
                &event.tag.partition,
                completed,
            );
        }
        Ok(())
    }

    /// Counts an applied event in `segmentd_events_total` (or as a duplicate).
    fn count_event(&self, source: &Source, outcome: Outcome) {
        match outcome {
            Outcome::Duplicate => self.metrics.events_duplicate.inc(),
            Outcome::Applied {
                event_type: type_id,
                ..
            } => match source.topic {
                Some(index) => self.topics[index].events[usize::from(type_id)].inc(),
                None => {
                    let name = self.engine.rules().types.name(type_id);
                    self.metrics
                        .events
                        .with_label_values(&[&*source.partition.0, name])
                        .inc();
                }
            },
        }
    }

    /// Sends segment changes to the output topic, each with its ticket.
    async fn publish(
        &self,
        changes: &[SegmentChange],
        mut ticket: impl FnMut() -> Box<Ticket>,
    ) -> Result<(), KafkaError> {
        // Most events change nothing: no clock read for them.
        if changes.is_empty() {
            return Ok(());
        }
        let emitted_at = self.clock.now();
        for change in changes {
            let (payload, headers) = change_payload(change, emitted_at);
            let record = BaseRecord::<[u8], [u8], _>::with_opaque_to(&self.output_topic, ticket())
                .key(change.customer_id.as_bytes())
                .payload(&payload)
                .headers(headers);
            send(&self.producer, record).await?;
            self.metrics
                .transitions
                .with_label_values(&[&*change.segment, change.transition.as_str()])
                .inc();
        }
        Ok(())
    }

    /// Moves every partition's watermark on by the wall clock (where idle), applies the
    /// held events and fires the timers that makes due, publishes their changes and
    /// updates the time metrics.
    async fn fire_idle_timers(&self, changes: &mut Vec<SegmentChange>) -> Result<(), KafkaError> {
        let wall_now = self.clock.now();
        let mut steps = Vec::new();
        {
            let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = 0;
            for (&number, time) in partitions.iter_mut() {
                let mut out = Vec::new();
                let mut released = Vec::new();
                let fired = time.tick(&self.engine, wall_now, &mut out, &mut released);
                self.metrics.timers_fired.inc_by(fired);
                if !out.is_empty() || !released.is_empty() {
                    steps.push((number, out, released));
                }
                pending += time.timers.len();
                let watermark = time.watermark.current();
                if watermark != crate::time::Millis::MIN {
                    self.metrics
                        .watermark
                        .with_label_values(&[&number.to_string()])
                        .set(watermark as f64 / 1000.0);
                }
            }
            self.metrics.timers_pending.set(pending as i64);
        }
        for (number, out, released) in steps {
            *changes = out;
            self.publish_released(changes, &released, TimerChanges::Idle(number))
                .await?;
        }
        Ok(())
    }

    /// Copies a rejected message to the dead-letter topic: its key, `payload` (the
    /// original, or its first bytes when `truncated_from` gives the original size) and the
    /// headers that say why and where from.
    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        payload: &[u8],
        rejection: &crate::event::InvalidEvent,
        partition: &PartitionKey,
        ticket: Box<Ticket>,
        truncated_from: Option<usize>,
    ) -> Result<(), KafkaError> {
        let mut headers =
            dead_letter_headers(rejection, message.topic(), partition.1, message.offset());
        let original_size = truncated_from.map(|size| size.to_string());
        if let Some(size) = &original_size {
            headers = headers.insert(rdkafka::message::Header {
                key: "truncated_from",
                value: Some(size.as_bytes()),
            });
        }
        let mut record =
            BaseRecord::<[u8], [u8], _>::with_opaque_to(&self.dead_letter_topic, ticket)
                .payload(payload)
                .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send(&self.producer, record).await
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(error = %err, "Cannot watch SIGTERM; only Ctrl-C stops the service.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
    }
}
