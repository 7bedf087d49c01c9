//! The consumer: its configuration and its context (rebalance and statistics callbacks).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use super::Partitions;
use super::changelog::{Changelog, TIMER_TOPIC};
use super::delivery::Acknowledger;
use super::offsets::{OffsetTracker, PartitionKey};
use super::restore::{Readiness, Restorer};
use super::transaction::{TransactionFailure, Transactions};
use crate::config::{Config, DeliveryMode};
use crate::engine::Engine;
use crate::telemetry::Metrics;

/// Callbacks librdkafka makes on the consumer: rebalances (co-partitioned assignment,
/// draining and checkpointing before revocation, restoring after assignment, counted and
/// logged) and statistics (consumer lag per partition).
pub struct IngestContext {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    tracker: Arc<OffsetTracker>,
    partitions: Partitions,
    engine: Engine,
    /// The input topics; the group assigns the first one's partitions, and the others'
    /// partitions of the same numbers follow them.
    inputs: Vec<String>,
    /// Durable state, when a changelog topic is configured.
    durable: Option<Durable>,
    /// Set once the service has made its last drain, checkpoint and commit (or chose not
    /// to, after a failure): the revocation that closing the consumer then brings only
    /// drops state, so closing neither waits for a broker again nor writes anything, and
    /// an assignment then restores nothing.
    finished: AtomicBool,
    /// The partition numbers this member owns, as its rebalance callbacks assigned and
    /// revoked them. Kept here instead of asked of librdkafka: asking for the assignment
    /// from inside a callback can block for good while the consumer closes (seen: a
    /// shutdown hung in `rd_kafka_assignment` under the revocation that closing brings).
    owned: Mutex<BTreeSet<i32>>,
}

/// What revocation and assignment need when state is durable.
pub struct Durable {
    /// The changelog writer.
    pub changelog: Arc<Changelog>,
    /// Restores assigned partitions.
    pub restorer: Arc<Restorer>,
    /// The producer, set once created (it is created after the consumer, whose handle
    /// its delivery callback needs).
    pub producer: OnceLock<Arc<ThreadedProducer<Acknowledger>>>,
    /// In exactly-once mode, the transactions the producer writes in.
    pub transactions: Option<Arc<Transactions>>,
}

impl IngestContext {
    /// A context reporting into `metrics` and `readiness`, draining `tracker` for revoked
    /// partitions and dropping their timers from `partitions` and their customers from
    /// `engine`; with `durable`, checkpointing revoked partitions and restoring assigned
    /// ones.
    pub fn new(
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        tracker: Arc<OffsetTracker>,
        partitions: Partitions,
        engine: Engine,
        inputs: Vec<String>,
        durable: Option<Durable>,
    ) -> Self {
        IngestContext {
            metrics,
            readiness,
            tracker,
            partitions,
            engine,
            inputs,
            durable,
            finished: AtomicBool::new(false),
            owned: Mutex::default(),
        }
    }

    /// Marks the service's last drain and commit done: from now on a revocation (the
    /// consumer closing) only drops state.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    /// The durable-state parts, if any.
    pub fn durable(&self) -> Option<&Durable> {
        self.durable.as_ref()
    }

    /// The transactions, in exactly-once mode.
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        self.durable.as_ref()?.transactions.as_ref()
    }

    /// Exactly-once: checkpoints every partition, waits until the changelog holds the
    /// checkpoints (so every offset they complete is stored for the transaction), and
    /// commits the transaction — or aborts it if any of that fails. Called where no event
    /// is being applied (the consume loop, or the rebalance callback, which blocks it).
    /// Blocking.
    pub fn commit_transaction(
        &self,
        consumer: &impl Consumer<Self>,
    ) -> Result<(), TransactionFailure> {
        let (Some(durable), Some(transactions)) = (&self.durable, self.transactions()) else {
            return Ok(());
        };
        let Some(producer) = durable.producer.get() else {
            return Ok(());
        };
        let numbers: Vec<i32> = {
            let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            partitions.keys().copied().collect()
        };
        // Every output acknowledged first: a checkpoint is written only after the outputs
        // of the messages it includes.
        let prepared = producer
            .flush(super::DRAIN_TIMEOUT)
            .map_err(|err| format!("outputs not acknowledged in time: {err}"))
            .and_then(|()| {
                if self.final_checkpoint(consumer, durable, &numbers) {
                    Ok(())
                } else {
                    Err("the changelog checkpoint was not acknowledged in time".to_owned())
                }
            });
        transactions.commit(producer, consumer.group_metadata(), prepared)
    }

    /// The group's assignment of the first input topic, with the same partition numbers
    /// of every other input topic: a customer's events from all of them meet on one
    /// instance.
    fn co_partitioned(&self, assigned: &TopicPartitionList) -> (TopicPartitionList, Vec<i32>) {
        let numbers: Vec<i32> = assigned
            .elements()
            .iter()
            .filter(|p| self.inputs.first().is_some_and(|t| t == p.topic()))
            .map(|p| p.partition())
            .collect();
        let mut list = assigned.clone();
        for topic in self.inputs.iter().skip(1) {
            for &number in &numbers {
                if list.find_partition(topic, number).is_none() {
                    list.add_partition(topic, number);
                }
            }
        }
        (list, numbers)
    }

    /// The partition numbers this member owns now.
    fn owned(&self) -> BTreeSet<i32> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Updates the owned partition numbers with `change` and counts them in
    /// `segmentd_assigned_partitions`; returns them.
    fn update_owned(&self, change: impl FnOnce(&mut BTreeSet<i32>)) -> BTreeSet<i32> {
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut owned);
        self.metrics.assigned_partitions.set(owned.len() as i64);
        owned.clone()
    }

    /// Drops the watermark and timers of partition numbers no longer `owned`: their
    /// customers' timers are now another instance's to fire.
    fn forget_revoked(&self, owned: &BTreeSet<i32>) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions.retain(|number, _| {
            let keep = owned.contains(number);
            if !keep {
                let _ = self
                    .metrics
                    .watermark
                    .remove_label_values(&[&number.to_string()]);
            }
            keep
        });
    }

    /// Before partitions go: stop their restores, wait until their in-flight records
    /// are acknowledged, write a last checkpoint of their customers and wait for it, then
    /// commit, so the next owner restores exactly what was applied and starts right
    /// after it. Their customers are then dropped.
    ///
    /// Partitions *lost* (the group gave them to another member without asking this one:
    /// a missed session, a broker's hiccup) are only dropped: their new owner may already
    /// be reading them, so neither their states nor their offsets are written from here —
    /// a late write could put the group's position ahead of what the new owner restored.
    /// The new owner re-reads from the last commit.
    fn revoke(&self, consumer: &BaseConsumer<Self>, numbers: &[i32], lost: bool) {
        let is_revoked = |key: &PartitionKey| numbers.contains(&key.1);
        if let Some(durable) = &self.durable {
            for &number in numbers {
                durable.restorer.cancel(number);
            }
        }
        super::abandon_held(&self.partitions, &self.tracker, is_revoked);
        if lost {
            tracing::warn!(partitions = ?numbers, "Partitions lost to another member: dropped without a last checkpoint or commit.");
        }
        // After the service's own end everything was written (or deliberately not).
        if !self.finished.load(Ordering::Relaxed) {
            self.hand_over(consumer, numbers, lost);
        }
        self.tracker.release(is_revoked);
        if let Some(durable) = &self.durable {
            durable.changelog.forget(|number| numbers.contains(&number));
        }
        let dropped = self
            .engine
            .drop_partitions(|number| numbers.contains(&number));
        tracing::info!(partitions = ?numbers, customers = dropped, "Dropped the revoked partitions' state.");
    }

    /// What revoked partitions leave behind for their next owner. Exactly-once: one
    /// commit of everything (the revoked partitions' last states and offsets, and what
    /// the others did in the open transaction), so that the next owner restores exactly
    /// what was committed; lost partitions' outputs must not become visible, so the
    /// transaction is aborted and the rest rewound. At least once: their last checkpoint
    /// and commit, unless they were lost.
    fn hand_over(&self, consumer: &BaseConsumer<Self>, numbers: &[i32], lost: bool) {
        if let Some(transactions) = self.transactions() {
            if lost {
                transactions.poison();
            }
            match self.commit_transaction(consumer) {
                Ok(()) => {}
                Err(TransactionFailure::Aborted(_)) => transactions.request_rewind(),
                Err(TransactionFailure::Fatal(err)) => transactions.fail(err),
            }
        } else if !lost {
            self.drain_and_commit(consumer, numbers);
        }
    }

    /// At-least-once revocation: waits until the revoked partitions' outputs are
    /// acknowledged and their last checkpoint written, then commits their offsets.
    fn drain_and_commit(&self, consumer: &BaseConsumer<Self>, numbers: &[i32]) {
        let is_revoked = |key: &PartitionKey| numbers.contains(&key.1);
        let drained = self.tracker.drain(is_revoked, super::DRAIN_TIMEOUT);
        if !drained {
            tracing::warn!(
                "Revoked partitions still had unacknowledged output: their input will be read again."
            );
        }
        let mut committable = drained;
        if let Some(durable) = &self.durable {
            // Not after a failed drain: the states would include events whose changes
            // may be lost, and a restore would skip those events.
            committable = committable && self.final_checkpoint(consumer, durable, numbers);
        }
        if committable && let Err(err) = commit_released(consumer, &self.tracker, is_revoked) {
            tracing::warn!(error = %err, "Commit before revocation failed: the next owner re-reads from the last commit.");
        }
    }

    /// Checkpoints the revoked partitions' changed customers and waits until the
    /// changelog has them. Returns whether it does (else nothing is committed).
    fn final_checkpoint(
        &self,
        consumer: &impl Consumer<Self>,
        durable: &Durable,
        numbers: &[i32],
    ) -> bool {
        // No producer yet: nothing can be written.
        if durable.producer.get().is_none() {
            return false;
        }
        let changelog = &durable.changelog;
        changelog.checkpoint(numbers, &self.partitions, &self.tracker, false);
        if let Err(err) = changelog.release(&self.tracker, consumer) {
            tracing::warn!(error = %err, "Changelog write before revocation failed.");
            return false;
        }
        let settled = changelog.wait_settled(numbers, super::DRAIN_TIMEOUT);
        if !settled {
            tracing::warn!(
                "The revoked partitions' last changelog checkpoint was not acknowledged in time: their input will be read again."
            );
        }
        settled
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // librdkafka reports the internal partition -1 and -1 for unknown lag.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    /// Applies the group's assignment extended to every input topic (see
    /// [`IngestContext::co_partitioned`]), with the usual callbacks around it.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        assignment: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let (mut list, mut numbers) = self.co_partitioned(assignment);
        if cooperative && err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            // A partition assigned again while still owned (some brokers repeat an
            // assignment) keeps its state and position: neither assigned nor restored anew.
            let owned = self.owned();
            if numbers.iter().any(|n| owned.contains(n)) {
                tracing::info!(partitions = ?numbers, "Some assigned partitions are already owned; keeping them as they are.");
                numbers.retain(|n| !owned.contains(n));
                let mut fresh = TopicPartitionList::new();
                for element in list.elements() {
                    if !owned.contains(&element.partition()) {
                        fresh.add_partition(element.topic(), element.partition());
                    }
                }
                list = fresh;
            }
        }
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let result = if cooperative {
                    consumer.incremental_assign(&list)
                } else {
                    consumer.assign(&list)
                };
                if let Err(err) = result {
                    tracing::error!(error = %err, "Cannot take the assigned partitions.");
                    return;
                }
                self.metrics.rebalances.inc();
                self.update_owned(|owned| {
                    if !cooperative {
                        owned.clear();
                    }
                    owned.extend(&numbers);
                });
                self.readiness.assigned();
                // Assigned while the consumer closes (a broker may still hand partitions
                // out then): nothing will read them, so nothing is restored.
                if let Some(durable) = &self.durable
                    && !self.finished.load(Ordering::Relaxed)
                {
                    for &number in &numbers {
                        let inputs = durable.restorer.inputs_of(number);
                        if let Err(err) = consumer.pause(&inputs) {
                            tracing::warn!(error = %err, partition = number, "Cannot pause a partition being restored.");
                        }
                        durable.restorer.start(number);
                    }
                }
                tracing::info!(partitions = ?numbers, "Partitions assigned.");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, &numbers, consumer.assignment_lost());
                let result = if cooperative {
                    consumer.incremental_unassign(&list)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = result {
                    tracing::warn!(error = %err, "Cannot release the revoked partitions.");
                }
                let owned = self.update_owned(|owned| {
                    if cooperative {
                        owned.retain(|n| !numbers.contains(n));
                    } else {
                        owned.clear();
                    }
                });
                self.forget_revoked(&owned);
                self.metrics.rebalances.inc();
                tracing::info!(partitions = ?numbers, "Partitions revoked.");
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(error = %code, "Rebalance failed.");
            }
        }
    }
}

/// `fetch.queue.backoff.ms` for segmentd's consumers, in milliseconds: how long librdkafka
/// waits before fetching a partition again once its local queue holds
/// `queued.min.messages` records. Its default, 1 s, leaves a consumer that drains its queue
/// faster than that idle while a backlog waits in the broker (the end-to-end harness
/// through Tansu: about 117,000 events/s with the default, 200,000 with 10 ms).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// A group consumer over the input topics: offsets stored by hand after delivery and
/// committed every `commit_interval` (in exactly-once mode, by the transactions instead),
/// committed records only, cooperative-sticky assignment, lag statistics every 5 s, a
/// short fetch backoff ([`FETCH_QUEUE_BACKOFF_MS`]); the user's librdkafka properties
/// applied last.
pub fn create_consumer(
    config: &Config,
    context: IngestContext,
) -> Result<StreamConsumer<IngestContext>, KafkaError> {
    let exactly_once = config.delivery.mode == DeliveryMode::ExactlyOnce;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        // Exactly-once: offsets are committed by the transactions, and only committed
        // records are read.
        .set("enable.auto.commit", (!exactly_once).to_string())
        .set("isolation.level", "read_committed")
        .set(
            "auto.commit.interval.ms",
            config.kafka.commit_interval.millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("enable.partition.eof", "false");
    for (key, value) in &config.kafka.consumer {
        client.set(key, value);
    }
    client.create_with_context(context)
}

/// Commits, synchronously, the offsets completed in order for the partitions chosen by
/// `which`, and forgets those partitions: the explicit commit of a drain. Returns how
/// many partitions were committed.
pub fn commit_released<X: ConsumerContext>(
    consumer: &impl Consumer<X>,
    tracker: &OffsetTracker,
    which: impl Fn(&PartitionKey) -> bool,
) -> Result<usize, KafkaError> {
    let released: Vec<(PartitionKey, i64)> = tracker
        .release(which)
        .into_iter()
        .filter(|(key, _)| *key.0 != *TIMER_TOPIC)
        .collect();
    if released.is_empty() {
        return Ok(0);
    }
    let offsets = commit_list(&released);
    consumer.commit(&offsets, CommitMode::Sync)?;
    Ok(released.len())
}

/// The offsets to commit for completed messages: the next message to read in each
/// partition.
pub fn commit_list(completed: &[(PartitionKey, i64)]) -> TopicPartitionList {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), offset) in completed {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
            .expect("a plain offset is always accepted");
    }
    offsets
}
