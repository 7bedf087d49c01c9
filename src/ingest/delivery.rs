//! The producer's delivery callback: each acknowledgement completes its input message in
//! the [`OffsetTracker`], and completed offsets are stored on the consumer for the next
//! commit. A failed delivery is recorded and wakes the consume loop, which stops.

use std::sync::{Arc, Mutex, Weak};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

use super::changelog::{Changelog, TIMER_TOPIC};
use super::consumer::IngestContext;
use super::offsets::{Completed, OffsetTracker, PartitionKey};
use crate::telemetry::Metrics;

/// What each produced record carries back to its delivery callback.
pub struct Ticket {
    /// The input partition of the message that caused the record; for a change fired by
    /// an idle partition's timer, `("(timer)", partition number)` (used in logs only).
    pub partition: PartitionKey,
    /// That message's offset; `None` for a change fired by an idle partition's timer,
    /// which answers to no input message.
    pub offset: Option<i64>,
    /// For a dead-letter copy: the rejection reason (for its metric).
    pub dead_letter: Option<&'static str>,
    /// For a changelog record: its checkpoint (`partition` is then the changelog
    /// partition).
    pub checkpoint: Option<u64>,
}

/// The first delivery failure, and a wake-up for the consume loop.
#[derive(Default)]
pub struct DeliveryFailure {
    error: Mutex<Option<KafkaError>>,
    /// Notified once when a failure is recorded.
    pub notify: Notify,
}

impl DeliveryFailure {
    /// Records a failure (the first one is kept) and wakes the consume loop.
    pub fn record(&self, error: KafkaError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(error);
            self.notify.notify_one();
        }
    }

    /// The recorded failure, if any.
    pub fn get(&self) -> Option<KafkaError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The producer context: turns acknowledgements into stored offsets.
pub struct Acknowledger {
    /// In-flight input messages.
    pub tracker: Arc<OffsetTracker>,
    /// Where completed offsets are stored. Weak: the consumer's context holds the
    /// producer, whose context this is, so a strong reference would keep both clients
    /// alive for ever (never closed, never destroyed) after the service stops.
    pub consumer: Weak<StreamConsumer<IngestContext>>,
    /// Latency and dead-letter counters.
    pub metrics: Arc<Metrics>,
    /// Where a failure is reported.
    pub failure: Arc<DeliveryFailure>,
    /// The changelog writer, if state is durable: its checkpoints decide which offsets
    /// are stored.
    pub changelog: Option<Arc<Changelog>>,
}

impl ClientContext for Acknowledger {}

impl ProducerContext for Acknowledger {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        // Gone only once the service has stopped: there is no offset left to store.
        let Some(consumer) = self.consumer.upgrade() else {
            return;
        };
        if let (Err((error, _)), Some(transactions)) = (result, consumer.context().transactions()) {
            // Exactly-once: a refused record makes its transaction abort (and the state
            // rewind); records purged by an abort were already given up.
            if !matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
            ) {
                tracing::warn!(
                    error = %error,
                    topic = %ticket.partition.0,
                    partition = ticket.partition.1,
                    "An output record was refused; its transaction will be aborted."
                );
                transactions.poison();
            }
            return;
        }
        if let Err((error, _)) = result {
            tracing::error!(
                error = %error,
                topic = %ticket.partition.0,
                partition = ticket.partition.1,
                offset = ?ticket.offset,
                "An output record was not delivered; stopping without committing its input."
            );
            self.failure.record(error.clone());
            return;
        }
        if let Some(checkpoint) = ticket.checkpoint {
            self.metrics.changelog_records.inc();
            if let Some(changelog) = &self.changelog {
                for (partition, offset) in changelog.acknowledged(ticket.partition.1, checkpoint) {
                    store(consumer.as_ref(), &partition, offset);
                }
            }
            return;
        }
        if let Some(reason) = ticket.dead_letter {
            self.metrics.dead_letters.with_label_values(&[reason]).inc();
        }
        let Some(offset) = ticket.offset else { return };
        let completed = self.tracker.acknowledged(&ticket.partition, offset);
        messages_completed(
            consumer.as_ref(),
            self.changelog.is_some(),
            &self.metrics,
            &ticket.partition,
            completed,
        );
    }
}

/// Input messages of `partition` completed (their records, and every earlier message's,
/// acknowledged): their latencies are observed and, without a changelog, the offset is
/// stored. With a changelog it is not: settled checkpoints store offsets, so that a
/// committed offset never runs ahead of the stored states (see [`super::changelog`]).
pub fn messages_completed(
    consumer: &impl Consumer<IngestContext>,
    changelog: bool,
    metrics: &Metrics,
    partition: &PartitionKey,
    completed: Completed,
) {
    if *partition.0 == *TIMER_TOPIC {
        // Idle timers' changes: tracked so that checkpoints wait for them, but they
        // answer to no input message (no latency, no offset).
        return;
    }
    for latency in completed.latencies {
        metrics.event_to_emit.observe(latency.as_secs_f64());
    }
    if let (Some(offset), false) = (completed.store, changelog) {
        store(consumer, partition, offset);
    }
}

/// Stores an input offset for the next commit (the next message to read is `offset + 1`):
/// on the consumer, for its auto-commit; in exactly-once mode, for the next transaction.
pub fn store(consumer: &impl Consumer<IngestContext>, partition: &PartitionKey, offset: i64) {
    if *partition.0 == *TIMER_TOPIC {
        return; // idle timers' changes answer to no input message
    }
    if let Some(transactions) = consumer.context().transactions() {
        transactions.store(partition, offset);
    } else if let Err(err) = consumer.store_offset(&partition.0, partition.1, offset) {
        // The partition was revoked meanwhile: its new owner re-reads from the last commit.
        tracing::debug!(error = %err, topic = %partition.0, partition = partition.1, "Offset not stored.");
    }
}
