//! The Kafka producer: segment-change records and dead-letter copies.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use super::change::SegmentChange;
use crate::event::InvalidEvent;

/// A producer for segmentd's output: idempotent (retries never reorder or duplicate a
/// customer's changes within a session) and acknowledged by all in-sync replicas, with
/// the user's librdkafka properties applied last. Acknowledgements go to `context`'s
/// delivery callback, on the producer's own polling thread.
pub fn create_producer<C: ProducerContext>(
    brokers: &str,
    overrides: &BTreeMap<String, String>,
    context: C,
) -> Result<ThreadedProducer<C>, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000");
    for (key, value) in overrides {
        config.set(key, value);
    }
    config.create_with_context(context)
}

/// Hands a record to the producer from a thread that may block (not the consume loop),
/// waiting while its queue is full (backpressure).
pub fn send_blocking<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> Result<(), KafkaError>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                // The queue drains as the brokers acknowledge; give them a moment.
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((err, _)) => return Err(err),
        }
    }
}

/// Hands a record to the producer, waiting while its queue is full (backpressure).
pub async fn send<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                // The queue drains as the brokers acknowledge; give them a moment.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

/// The payload and headers of a change record: JSON body, headers `segment` and
/// `transition` (and `id`, for consumers that dedupe without parsing).
pub fn change_payload(
    change: &SegmentChange,
    emitted_at: crate::time::Millis,
) -> (Vec<u8>, OwnedHeaders) {
    let record = change.record(emitted_at);
    let payload = serde_json::to_vec(&record).expect("change records always serialize");
    let id = record.id;
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "segment",
            value: Some(change.segment.as_bytes()),
        })
        .insert(Header {
            key: "transition",
            value: Some(change.transition.as_str().as_bytes()),
        })
        .insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        });
    (payload, headers)
}

/// Headers of a dead-letter copy: why it was rejected and where it came from. The key
/// and payload are the original's, untouched.
pub fn dead_letter_headers(
    rejection: &InvalidEvent,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    let partition = partition.to_string();
    let offset = offset.to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "reason",
            value: Some(rejection.reason.as_str().as_bytes()),
        })
        .insert(Header {
            key: "error",
            value: Some(rejection.detail.as_bytes()),
        })
        .insert(Header {
            key: "source_topic",
            value: Some(topic.as_bytes()),
        })
        .insert(Header {
            key: "source_partition",
            value: Some(partition.as_bytes()),
        })
        .insert(Header {
            key: "source_offset",
            value: Some(offset.as_bytes()),
        })
}
