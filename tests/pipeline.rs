//! The whole service against a real Kafka-protocol broker on loopback (librdkafka's mock
//! cluster): events in, segment changes and dead letters out, offsets committed, HTTP.

mod common;

use std::time::Duration;

use common::{
    DEAD, INPUT, OUTPUT, Service, TRAFFIC_START, changes_by_customer, check_committed,
    committed_total, embedded_broker, generated_messages, http_get, http_request, producer,
    read_records, replay_changes, script_round_trip, test_config, wait_for,
};
use serde_json::Value;

/// Proves the at-least-once pipeline end to end: the scripted events of the golden cart
/// case produce exactly the golden changes on the output topic (keyed by customer, with
/// `segment`/`transition` headers, in per-customer `seq` order); every malformed message
/// is copied untouched to the dead-letter topic with its reason; the replayed event changes
/// nothing; HTTP serves the state; and after a graceful shutdown the group's committed
/// offsets are the end of every input partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_changes_and_dead_letters_out_offsets_committed() {
    let mock = embedded_broker(1, 2);
    let brokers = mock.bootstrap_servers();
    let service = Service::start(test_config(&brokers, INPUT, "pipeline-test")).await;
    service.ready().await;

    let produced = script_round_trip(&brokers, INPUT, OUTPUT, DEAD, Duration::from_secs(30)).await;

    // HTTP: lookups, segments, metrics, errors.
    let (status, body) = http_get(service.http, "/customers/c-11").await;
    assert_eq!(status, 200, "{body}");
    let customer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(customer["segments"][0]["segment"], "abandoned_product");
    assert_eq!(
        customer["segments"][0]["entered_at"], "2026-03-01T11:01:00.001Z",
        "by timer, an hour after p-2 was added"
    );
    assert_eq!(customer["state"]["customer"]["purchases"], 1);
    let (status, body) = http_get(service.http, "/customers/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "customer not found"
    );
    let (status, _) = http_get(service.http, &format!("/customers/{}", "x".repeat(300))).await;
    assert_eq!(status, 400);
    let (status, body) = http_get(service.http, "/nowhere").await;
    assert_eq!(status, 404);
    assert!(body.contains("no such endpoint"));
    let (status, _) = http_request(
        service.http,
        "POST /segments HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    let (status, _) = http_request(service.http, "GARBAGE\r\n\r\n").await;
    assert_eq!(
        status, 400,
        "a malformed request is refused, and the server stays up"
    );
    let (_, body) = http_get(service.http, "/segments").await;
    let segments: Value = serde_json::from_str(&body).unwrap();
    let members = |id: &str| {
        segments["segments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["members"]
            .clone()
    };
    assert_eq!(members("abandoned_product"), 1, "c-11 is in, c-10 left");
    assert_eq!(members("cart_abandoner"), 0);
    let (_, metrics) = http_get(service.http, "/metrics").await;
    for line in [
        "segmentd_events_duplicate_total 1",
        "segmentd_events_invalid_total{reason=\"invalid_json\"} 1",
        "segmentd_events_invalid_total{reason=\"oversized\"} 1",
        "segmentd_segment_transitions_total{segment=\"abandoned_product\",transition=\"entered\"} 2",
        "segmentd_segment_members{segment=\"abandoned_product\"} 1",
        "segmentd_customers 2",
        "segmentd_events_total{topic=\"clickstream\",type=\"purchase\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }

    // Consumer lag comes from librdkafka's statistics, every 5 s: caught up, it is 0.
    wait_for(
        "consumer lag in /metrics",
        Duration::from_secs(20),
        async || {
            let (_, metrics) = http_get(service.http, "/metrics").await;
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("segmentd_consumer_lag{")
                        && l.contains("topic=\"clickstream\"")
                        && l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;

    service.stop().await.expect("a clean shutdown");

    // Every input message was processed and acknowledged: the committed offsets are the
    // end of each partition.
    check_committed(&brokers, "pipeline-test", INPUT, 2, produced);
}

/// Proves that an unreachable broker list and a bad librdkafka property are reported as
/// errors at start, not a hang or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_client_property_is_an_error_at_start() {
    let mut config = test_config("127.0.0.1:1", INPUT, "bad");
    config
        .kafka
        .consumer
        .insert("no.such.property".into(), "1".into());
    let rules = config.rule_set().unwrap();
    let result = segmentd::ingest::run(
        config,
        rules,
        segmentd::time::WallClock::system(),
        std::future::pending(),
        |_| {},
    )
    .await;
    let err = result.expect_err("refused");
    assert!(err.to_string().contains("no.such.property"), "{err}");
}

/// Proves that `run` over a partitioned topic and `replay` over the same events give the
/// same changes: generated traffic (both formats, some malformed) goes through the service
/// on four partitions, and each customer's sequence of changes on the output topic —
/// segment, transition, `at`, `seq`, `id` — equals the engine's over the events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_partitions_equals_replay() {
    let mock = embedded_broker(1, 4);
    let brokers = mock.bootstrap_servers();
    let config = test_config(&brokers, INPUT, "run-equals-replay");
    let messages = generated_messages(3, 60, 3_000);
    // Time runs on 100 days past the traffic, so that every timer (lapsed buyers
    // included) fires: in replay by `--until`, in `run` by the wall clock of idle partitions.
    let until = TRAFFIC_START + 3_000 * 20_000 + 100 * segmentd::time::DAY;
    let (expected, _) = replay_changes(&config, &messages, until);
    let total: usize = expected.values().map(Vec::len).sum();
    assert!(total > 100, "the traffic causes changes: {total}");

    let clock = segmentd::time::WallClock::manual(0);
    let service = Service::start_with_clock(config.clone(), clock.clone()).await;
    let producer = producer(&brokers);
    common::produce_generated(&producer, INPUT, &messages).await;
    // Every message processed (its offset committed) before the clock moves: a partition
    // is idle only once its last message is behind it.
    wait_for(
        "every message processed",
        Duration::from_secs(60),
        async || {
            let committed = committed_total(&brokers, "run-equals-replay", INPUT, 4);
            (committed == messages.len() as i64).then_some(())
        },
    )
    .await;
    clock.set(until + config.time.allowed_lateness.millis());
    let records = read_records(&brokers, OUTPUT, total, Duration::from_secs(60)).await;
    let actual = changes_by_customer(&records);
    assert_eq!(actual, expected);
    service.stop().await.expect("a clean shutdown");
}
