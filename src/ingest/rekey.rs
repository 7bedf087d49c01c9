//! Re-keying: input topics that are not keyed by customer id (`kafka.rekey_topics`) go
//! through an internal topic (`kafka.rekeyed_topic`) keyed by customer id, which the
//! service reads as one more input topic. Without it, one customer's events would be
//! spread over partitions, and so over instances, when the service scales out.
//!
//! The stage is a consumer group of its own (`{group_id}.rekey`, so instances share the
//! work) and a producer. Each message is parsed for its customer id and written, payload
//! and headers untouched, keyed by that id, with Java's partitioner (murmur2) so that it
//! lands in the partition number a Java producer of the other input topics would pick.
//! A message without a readable customer id is written without a key: the service then
//! dead-letters it with the precise reason, like any bad input.
//!
//! Delivery is at-least-once: a source offset is stored only once its copy, and every
//! earlier message's of its partition, is acknowledged ([`OffsetTracker`]). After a crash
//! a message may be copied twice; the engine skips an event whose id it already applied.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext};
use tokio::sync::oneshot;

use super::delivery::DeliveryFailure;
use super::offsets::{OffsetTracker, PartitionKey};
use crate::config::Config;
use crate::emit::producer::{create_producer, send};
use crate::event::parse_event;
use crate::telemetry::Metrics;

/// The re-keying stage running on a task of its own.
pub struct Rekeying {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Rekeying {
    /// Stops fetching, waits for the copies in flight and commits what they complete.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The stage's consumer: plain (no rebalance work: a copy acknowledged after its source
/// partition moved is simply copied again by the next owner).
type SourceConsumer = StreamConsumer<DefaultConsumerContext>;

/// Stores a source offset once its copy and every earlier one are acknowledged.
struct CopyAcknowledger {
    tracker: Arc<OffsetTracker>,
    consumer: Arc<SourceConsumer>,
    failure: Arc<DeliveryFailure>,
}

impl ClientContext for CopyAcknowledger {}

impl ProducerContext for CopyAcknowledger {
    type DeliveryOpaque = Box<(PartitionKey, i64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Self::DeliveryOpaque) {
        let (partition, offset) = *source;
        if let Err((error, _)) = result {
            tracing::error!(error = %error, topic = %partition.0, partition = partition.1, offset, "A re-keyed copy was not delivered; stopping without committing its source.");
            self.failure.record(error.clone());
            return;
        }
        if let Some(done) = self.tracker.acknowledged(&partition, offset).store
            && let Err(err) = self.consumer.store_offset(&partition.0, partition.1, done)
        {
            tracing::debug!(error = %err, topic = %partition.0, partition = partition.1, "Source offset not stored.");
        }
    }
}

/// Starts the stage for `config`'s `kafka.rekey_topics`; a copy that cannot be delivered
/// is recorded in `failure` (which stops the service).
pub fn start(
    config: &Config,
    metrics: Arc<Metrics>,
    failure: Arc<DeliveryFailure>,
) -> Result<Rekeying, KafkaError> {
    let kafka = &config.kafka;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            kafka.commit_interval.millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (key, value) in &kafka.consumer {
        client.set(key, value);
    }
    client
        .remove("group.instance.id")
        .set("group.id", format!("{}.rekey", kafka.group_id));
    let consumer: Arc<SourceConsumer> = Arc::new(client.create()?);
    let topics: Vec<&str> = kafka.rekey_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;

    let mut settings = kafka.producer.clone();
    settings.remove("transactional.id");
    // Java clients' partitioner: a customer's re-keyed events meet its other events.
    settings
        .entry("partitioner".into())
        .or_insert_with(|| "murmur2_random".into());
    let tracker = OffsetTracker::new();
    let producer = Arc::new(create_producer(
        &kafka.brokers,
        &settings,
        CopyAcknowledger {
            tracker: tracker.clone(),
            consumer: consumer.clone(),
            failure: failure.clone(),
        },
    )?);
    let (stop, stopped) = oneshot::channel();
    let copier = Copier {
        consumer,
        producer,
        tracker,
        metrics,
        target: kafka.rekeyed_topic.clone(),
        max_event_bytes: config.limits.max_event_bytes,
    };
    let task = tokio::spawn(copier.run(stopped, failure));
    tracing::info!(topics = ?kafka.rekey_topics, into = %kafka.rekeyed_topic, "Re-keying.");
    Ok(Rekeying { stop, task })
}

/// The stage's loop and what it needs.
struct Copier {
    consumer: Arc<SourceConsumer>,
    producer: Arc<rdkafka::producer::ThreadedProducer<CopyAcknowledger>>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    target: String,
    max_event_bytes: usize,
}

impl Copier {
    /// Copies until stopped, or until a copy cannot be handed to the producer (recorded
    /// in `failure`, which stops the service; a copy refused later by the brokers is
    /// recorded by the delivery callback).
    async fn run(self, mut stopped: oneshot::Receiver<()>, failure: Arc<DeliveryFailure>) {
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        if let Err(err) = self.copy(&message).await {
                            failure.record(err);
                            break;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "Re-keying consumer error; continuing."),
                },
            }
        }
        self.finish().await;
    }

    /// Writes one source message to the internal topic, keyed by its customer id.
    async fn copy(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<(), KafkaError> {
        let payload = message.payload().unwrap_or_default();
        let customer = parse_event(payload, self.max_event_bytes)
            .ok()
            .map(|event| event.customer_id);
        let partition: PartitionKey = (message.topic().into(), message.partition());
        let offset = message.offset();
        self.tracker.begin(&partition, offset, 1, Instant::now());
        let mut record = BaseRecord::<[u8], [u8], _>::with_opaque_to(
            &self.target,
            Box::new((partition, offset)),
        )
        .payload(payload);
        if let Some(customer) = &customer {
            record = record.key(customer.as_bytes());
        }
        if let Some(headers) = message.headers() {
            record = record.headers(headers.detach());
        }
        send(&self.producer, record).await?;
        let outcome = if customer.is_some() {
            "keyed"
        } else {
            "unkeyed"
        };
        self.metrics
            .rekeyed
            .with_label_values(&[message.topic(), outcome])
            .inc();
        Ok(())
    }

    /// Waits for the copies in flight and commits the source offsets they complete.
    async fn finish(self) {
        let Copier {
            consumer,
            producer,
            tracker,
            ..
        } = self;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = producer.flush(super::DRAIN_TIMEOUT);
            let completed = tracker.release(|_| true);
            if !completed.is_empty() {
                let offsets = super::consumer::commit_list(&completed);
                if let Err(err) = consumer.commit(&offsets, CommitMode::Sync) {
                    tracing::warn!(error = %err, "Re-keying's last commit failed: some messages will be copied again.");
                }
            }
            consumer.unsubscribe();
        })
        .await;
        tracing::info!("Re-keying stopped.");
    }
}
