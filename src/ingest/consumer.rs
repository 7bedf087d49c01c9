//! The consumer: its configuration and its context (rebalance and statistics callbacks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::Partitions;
use super::offsets::{OffsetTracker, PartitionKey};
use crate::config::Config;
use crate::telemetry::Metrics;

/// Callbacks librdkafka makes on the consumer: rebalances (drained before revocation,
/// counted, logged, and the readiness flag) and statistics (consumer lag per partition).
pub struct IngestContext {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    tracker: Arc<OffsetTracker>,
    partitions: Partitions,
}

impl IngestContext {
    /// A context reporting into `metrics`, raising `ready` at the first assignment,
    /// draining `tracker` for revoked partitions and dropping their timers from
    /// `partitions`.
    pub fn new(
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
        tracker: Arc<OffsetTracker>,
        partitions: Partitions,
    ) -> Self {
        IngestContext {
            metrics,
            ready,
            tracker,
            partitions,
        }
    }

    /// Drops the watermark and timers of partition numbers no longer assigned on any
    /// input topic: their customers' timers are now another instance's to fire.
    fn forget_revoked(&self, consumer: &BaseConsumer<Self>) {
        let assigned: std::collections::BTreeSet<i32> = match consumer.assignment() {
            Ok(list) => list.elements().iter().map(|p| p.partition()).collect(),
            Err(err) => {
                tracing::warn!(error = %err, "Cannot read the assignment; keeping every partition's timers.");
                return;
            }
        };
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions.retain(|number, _| {
            let keep = assigned.contains(number);
            if !keep {
                let _ = self
                    .metrics
                    .watermark
                    .remove_label_values(&[&number.to_string()]);
            }
            keep
        });
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
    /// Before partitions go: wait until their in-flight records are acknowledged (their
    /// offsets stored), then commit, so the next owner starts right after them.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        let revoked: Vec<(String, i32)> = partitions
            .elements()
            .iter()
            .map(|p| (p.topic().to_owned(), p.partition()))
            .collect();
        let is_revoked = |(topic, partition): &PartitionKey| {
            revoked
                .iter()
                .any(|(t, p)| **topic == **t && partition == p)
        };
        super::abandon_held(&self.partitions, &self.tracker, is_revoked);
        let drained = self.tracker.drain(is_revoked, super::DRAIN_TIMEOUT);
        if !drained {
            tracing::warn!(
                "Revoked partitions still had unacknowledged output: their input will be read again."
            );
        }
        if let Err(err) = commit_released(consumer, &self.tracker, is_revoked) {
            tracing::warn!(error = %err, "Commit before revocation failed: the next owner re-reads from the last commit.");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.metrics.rebalances.inc();
                self.ready.store(true, Ordering::Relaxed);
                tracing::info!(partitions = partitions.count(), "Partitions assigned.");
            }
            Rebalance::Revoke(partitions) => {
                self.forget_revoked(consumer);
                self.metrics.rebalances.inc();
                tracing::info!(partitions = partitions.count(), "Partitions revoked.");
            }
            Rebalance::Error(err) => tracing::warn!(error = %err, "Rebalance failed."),
        }
    }
}

/// A group consumer over the input topics: offsets stored by hand after delivery and
/// committed every `commit_interval`, cooperative-sticky assignment, lag statistics
/// every 5 s; the user's librdkafka properties applied last.
pub fn create_consumer(
    config: &Config,
    context: IngestContext,
) -> Result<StreamConsumer<IngestContext>, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            config.kafka.commit_interval.millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000")
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
    let released = tracker.release(which);
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
