//! Graceful shutdown lets go of the brokers: once the service has stopped, every Kafka
//! client it created is closed and destroyed. (Its own test binary: librdkafka counts
//! live clients process-wide, so no other test may hold one meanwhile.)

mod common;

use common::{INPUT, Service, embedded_broker, produce, producer, test_config, wait_for};
use std::time::Duration;

/// Proves the consumer and the producer are destroyed when the service stops. With the
/// changelog on, the consumer's context holds the producer and the producer's delivery
/// callback stores offsets through the consumer: two strong references kept both clients
/// alive, never closed, after the service ended. With the broker and the test's own
/// producer dropped too, librdkafka must count no client left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_service_destroys_its_kafka_clients() {
    let mock = embedded_broker(1, 2);
    let brokers = mock.bootstrap_servers();
    let service = Service::start(test_config(&brokers, INPUT, "shutdown")).await;
    service.ready().await;
    let input = producer(&brokers);
    let event = r#"{"event_id":"e1","type":"page_view","customer_id":"c-1","ts":1000}"#;
    produce(&input, INPUT, Some("c-1"), event.as_bytes()).await;
    let engine = service.engine.clone();
    wait_for("the event applied", Duration::from_secs(30), async || {
        engine.store().read("c-1", |_| ())
    })
    .await;
    drop(engine);
    service.stop().await.expect("a clean stop");
    drop(input);
    drop(mock);
    let left = tokio::task::spawn_blocking(|| {
        // SAFETY: takes a timeout and only reads librdkafka's count of live clients.
        unsafe { rdkafka::bindings::rd_kafka_wait_destroyed(10_000) }
    })
    .await
    .unwrap();
    assert_eq!(left, 0, "a Kafka client outlived the stopped service");
}
