//! The service: a Kafka consumer group over the input topics feeding the engine, a
//! producer for changes and dead letters, and the HTTP endpoint.
//!
//! # Delivery (at-least-once)
//!
//! Offsets are stored by hand (`enable.auto.offset.store=false`) and committed by the
//! client every `kafka.commit_interval`. For each input message the consume loop hands
//! the acknowledgement futures of every record it caused (changes and dead-letter copy)
//! to the acknowledger, in consumption order. The acknowledger awaits them in that order
//! and only then stores the message's offset, so a committed offset never runs ahead of
//! an unacknowledged output. A record that the producer finally fails to deliver stops
//! the service with an error and its offset is never stored: a restart re-reads it.
//!
//! # Shutdown
//!
//! On the shutdown signal: stop fetching, let the acknowledger drain (every in-flight
//! record acknowledged, its offset stored), commit synchronously, leave the group.

mod consumer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::emit::producer::{change_payload, create_producer, dead_letter_headers, send};
use crate::engine::{Engine, Outcome};
use crate::event::parse_event;
use crate::rules::RuleSet;
use crate::state::new_store;
use crate::telemetry::{InvalidEventReceived, Metrics};
use crate::time::wall_clock_now;

pub use consumer::IngestContext;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A Kafka client could not be created or subscribed (bad brokers, bad properties).
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
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
}

/// What a started service exposes to its caller.
pub struct Started {
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// The engine (for lookups and member counts).
    pub engine: Engine,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// How many input messages may await acknowledgement before consumption pauses.
const MAX_IN_FLIGHT_MESSAGES: usize = 50_000;

/// The records one input message caused, awaiting acknowledgement.
struct AckJob {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    received: Instant,
    changes: Vec<DeliveryFuture>,
    dead_letter: Option<(DeliveryFuture, &'static str)>,
}

/// Runs the service until `shutdown` completes (or a fatal error). `started` is called
/// once the HTTP port is bound and the consumer subscribed.
pub async fn run(
    config: Config,
    rules: RuleSet,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(&Started),
) -> Result<(), ServiceError> {
    let metrics = Metrics::new();
    metrics.register_segments(&rules);
    let engine = Engine::new(
        Arc::new(rules),
        new_store(),
        config.time.session_gap.millis(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = Arc::new(consumer::create_consumer(
        &config,
        IngestContext::new(metrics.clone(), ready.clone()),
    )?);
    let producer = create_producer(&config.kafka.brokers, &config.kafka.producer)?;
    let topics: Vec<&str> = config
        .kafka
        .input_topics
        .iter()
        .map(String::as_str)
        .collect();
    consumer.subscribe(&topics)?;

    let (listener, http_addr) = crate::http::bind(config.http.listen)
        .await
        .map_err(|source| ServiceError::Http {
            addr: config.http.listen,
            source,
        })?;
    let (stop_http, mut http_stopped) = watch::channel(false);
    let queue_producer = producer.clone();
    let queue_metrics = metrics.clone();
    let app = crate::http::router(crate::http::AppState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        on_scrape: Arc::new(move || {
            queue_metrics
                .producer_queue
                .set(i64::from(queue_producer.in_flight_count()))
        }),
    });
    let http = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stopped.wait_for(|stopped| *stopped).await;
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %err, "HTTP server failed.");
        }
    });
    started(&Started {
        http_addr,
        engine: engine.clone(),
        metrics: metrics.clone(),
    });
    tracing::info!(topics = ?config.kafka.input_topics, brokers = %config.kafka.brokers, "Consuming.");

    let (ack_tx, ack_rx) = mpsc::channel(MAX_IN_FLIGHT_MESSAGES);
    let mut acknowledger = tokio::spawn(acknowledge(ack_rx, consumer.clone(), metrics.clone()));
    let pipeline = Pipeline {
        engine,
        producer: producer.clone(),
        metrics: metrics.clone(),
        output_topic: config.kafka.output_topic.clone(),
        dead_letter_topic: config.kafka.dead_letter_topic.clone(),
        max_event_bytes: config.limits.max_event_bytes,
    };

    tokio::pin!(shutdown);
    let mut changes = Vec::new();
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("Shutting down: finishing in-flight work.");
                break;
            }
            acked = &mut acknowledger => {
                // The acknowledger only ends early on a failed delivery: stop, commit nothing more.
                let _ = stop_http.send(true);
                let _ = http.await;
                return acked.unwrap_or(Err(ServiceError::Delivery(KafkaError::Canceled)));
            }
            message = consumer.recv() => match message {
                Ok(message) => {
                    let job = pipeline.process(&message, &mut changes).await;
                    match job {
                        Ok(job) => {
                            if ack_tx.send(job).await.is_err() {
                                break;
                            }
                        }
                        Err(err) => {
                            outcome = Err(ServiceError::Delivery(err));
                            break;
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "Consumer error; continuing."),
            },
        }
    }

    // Drain: every record handed over is acknowledged and its offset stored.
    drop(ack_tx);
    let drained = acknowledger
        .await
        .unwrap_or(Err(ServiceError::Delivery(KafkaError::Canceled)));
    if outcome.is_ok() {
        outcome = drained;
    }
    let _ = producer.flush(Duration::from_secs(10));
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("Committed final offsets."),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(err) => {
            tracing::warn!(error = %err, "Final commit failed; the group keeps the previous commit.")
        }
    }
    consumer.unsubscribe();
    let _ = stop_http.send(true);
    let _ = http.await;
    tracing::info!("Stopped.");
    outcome
}

/// The per-message work of the consume loop.
struct Pipeline {
    engine: Engine,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    output_topic: String,
    dead_letter_topic: String,
    max_event_bytes: usize,
}

impl Pipeline {
    /// Parses, applies and produces the outputs of one input message.
    async fn process(
        &self,
        message: &BorrowedMessage<'_>,
        changes: &mut Vec<crate::emit::change::SegmentChange>,
    ) -> Result<AckJob, KafkaError> {
        let received = Instant::now();
        let topic = message.topic();
        let mut job = AckJob {
            topic: topic.into(),
            partition: message.partition(),
            offset: message.offset(),
            received,
            changes: Vec::new(),
            dead_letter: None,
        };
        let payload = message.payload().unwrap_or_default();
        match parse_event(payload, self.max_event_bytes) {
            Err(rejection) => {
                InvalidEventReceived {
                    reason: rejection.reason,
                    detail: &rejection.detail,
                    topic,
                    partition: job.partition,
                    offset: job.offset,
                }
                .emit(&self.metrics);
                let headers = dead_letter_headers(&rejection, topic, job.partition, job.offset);
                let mut record = FutureRecord::<[u8], [u8]>::to(&self.dead_letter_topic)
                    .payload(payload)
                    .headers(headers);
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                job.dead_letter = Some((
                    send(&self.producer, record).await?,
                    rejection.reason.as_str(),
                ));
            }
            Ok(event) => {
                changes.clear();
                match self.engine.apply(&event, changes) {
                    Outcome::Duplicate => self.metrics.events_duplicate.inc(),
                    Outcome::Applied => {
                        let rules = self.engine.rules();
                        let type_label = rules.types.name(rules.types.id_of(&event.event_type));
                        self.metrics
                            .events
                            .with_label_values(&[topic, type_label])
                            .inc();
                    }
                }
                let emitted_at = wall_clock_now();
                for change in changes.iter() {
                    let (payload, headers) = change_payload(change, emitted_at);
                    let record = FutureRecord::<[u8], [u8]>::to(&self.output_topic)
                        .key(change.customer_id.as_bytes())
                        .payload(&payload)
                        .headers(headers);
                    job.changes.push(send(&self.producer, record).await?);
                    self.metrics
                        .transitions
                        .with_label_values(&[&*change.segment, change.transition.as_str()])
                        .inc();
                }
            }
        }
        Ok(job)
    }
}

/// Awaits each message's records in consumption order, then stores its offset.
async fn acknowledge(
    mut jobs: mpsc::Receiver<AckJob>,
    consumer: Arc<StreamConsumer<IngestContext>>,
    metrics: Arc<Metrics>,
) -> Result<(), ServiceError> {
    while let Some(job) = jobs.recv().await {
        let produced = !job.changes.is_empty();
        for delivery in job.changes {
            delivered(delivery.await)?;
        }
        if let Some((delivery, reason)) = job.dead_letter {
            delivered(delivery.await)?;
            metrics.dead_letters.with_label_values(&[reason]).inc();
        }
        if produced {
            metrics
                .event_to_emit
                .observe(job.received.elapsed().as_secs_f64());
        }
        if let Err(err) = consumer.store_offset(&job.topic, job.partition, job.offset) {
            // The partition was revoked meanwhile: its new owner re-reads from the last commit.
            tracing::debug!(error = %err, topic = %job.topic, partition = job.partition, "Offset not stored.");
        }
    }
    Ok(())
}

fn delivered<E>(
    result: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<(), ServiceError> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => {
            tracing::error!(error = %err, "An output record was not delivered; stopping without committing it.");
            Err(ServiceError::Delivery(err))
        }
        // The producer was dropped with the record in flight.
        Err(_) => Err(ServiceError::Delivery(KafkaError::Canceled)),
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
