//! At-least-once delivery under faults, against the embedded broker: a change that cannot
//! be delivered stops the service without committing its input, and a rebalance between
//! two instances drains and commits before partitions move.

mod common;

use std::time::Duration;

use common::{
    DEAD, INPUT, OUTPUT, Service, committed_offset, embedded_broker, http_get, partition_size,
    produce, producer, read_records, test_config, wait_for,
};
use rdkafka::mocking::MockCoordinator;
use segmentd::config::SegmentConfig;

/// Customer c-10's `n`th event in the scripted case: an add to cart, an exit intent, then
/// a page view 31 minutes later (which catches up two timers: two changes).
fn cart_event(n: usize) -> String {
    std::fs::read_to_string("tests/golden/cart_exit_intent_abandoned_product/events.jsonl")
        .unwrap()
        .lines()
        .filter(|line| line.contains("\"c-10\""))
        .nth(n)
        .unwrap()
        .to_owned()
}

/// Proves "commit after delivery": while the output topic's broker is down, the change an
/// input message causes cannot be delivered; the service stops with a delivery error and
/// the group's committed offset stays before that message, so a restart reads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_change_stops_the_service_without_committing_its_input() {
    let mock = embedded_broker(2, 1);
    let brokers = mock.bootstrap_servers();
    let group = "undeliverable";
    // Input, dead letters and the group on broker 1; output alone on broker 2.
    mock.partition_leader(INPUT, 0, Some(1)).unwrap();
    mock.partition_leader(DEAD, 0, Some(1)).unwrap();
    mock.partition_leader(OUTPUT, 0, Some(2)).unwrap();
    mock.coordinator(MockCoordinator::Group(group.into()), 1)
        .unwrap();

    let mut config = test_config(&brokers, INPUT, group);
    config
        .kafka
        .producer
        .insert("message.timeout.ms".into(), "3000".into());
    let service = Service::start(config).await;
    service.ready().await;

    // add_to_cart, then exit_intent: one change, delivered; offsets 0 and 1 committed.
    let producer = producer(&brokers);
    for n in 0..2 {
        produce(&producer, INPUT, Some("c-10"), cart_event(n).as_bytes()).await;
    }
    read_records(&brokers, OUTPUT, 1, Duration::from_secs(30)).await;
    wait_for("offset 2 committed", Duration::from_secs(30), async || {
        (committed_offset(&brokers, group, INPUT, 0) == Some(2)).then_some(())
    })
    .await;

    // The output's broker goes down; the next event causes two changes that cannot go out.
    mock.broker_down(2).unwrap();
    produce(&producer, INPUT, Some("c-10"), cart_event(2).as_bytes()).await;
    let outcome = tokio::time::timeout(Duration::from_secs(60), service.stopped())
        .await
        .expect("the service stops");
    let err = outcome.expect_err("a delivery failure is an error");
    assert!(
        err.to_string().contains("delivery to the brokers failed"),
        "{err}"
    );
    assert_eq!(
        committed_offset(&brokers, group, INPUT, 0),
        Some(2),
        "the undelivered input is not committed"
    );
}

/// Proves that a rebalance loses nothing: a second instance joins the group while events
/// flow, each causing a change; the first drains and commits its revoked partitions before
/// they move, so the second re-reads nothing; in the end the group's committed offsets are
/// the end of every partition and every event's change was published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_drains_and_commits_before_partitions_move() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let mock = embedded_broker(1, 4);
    let brokers = mock.bootstrap_servers();
    let group = "rebalance";
    // Short session timeouts: the embedded broker waits that long for members to rejoin.
    // A segment that every event toggles, so each input message has output in flight
    // when partitions are revoked.
    let config = || {
        let mut config = test_config(&brokers, INPUT, group);
        config.segments = vec![SegmentConfig {
            id: "more_views_than_searches".into(),
            description: None,
            enter: "count(page_view) > count(search)".into(),
            exit: None,
        }];
        config
            .kafka
            .consumer
            .insert("session.timeout.ms".into(), "6000".into());
        config
            .kafka
            .consumer
            .insert("heartbeat.interval.ms".into(), "500".into());
        config
    };
    let first = Service::start(config()).await;
    first.ready().await;

    let producer = producer(&brokers);
    let mut produced = 0i64;
    let send_batch = async |from: i64, count: i64| {
        for i in from..from + count {
            let event = format!(
                r#"{{"event_id":"r-{i}","type":"{}","customer_id":"c-{}","ts":{}}}"#,
                if (i / 40) % 2 == 0 {
                    "page_view"
                } else {
                    "search"
                },
                i % 40,
                1_767_225_600_000 + i * 1_000
            );
            produce(
                &producer,
                INPUT,
                Some(&format!("c-{}", i % 40)),
                event.as_bytes(),
            )
            .await;
        }
        count
    };
    produced += send_batch(0, 200).await;
    let second = Service::start(config()).await;
    produced += send_batch(200, 200).await;
    wait_for(
        "both instances own partitions",
        Duration::from_secs(60),
        async || {
            let (a, b) = (
                http_get(first.http, "/readyz").await.0,
                http_get(second.http, "/readyz").await.0,
            );
            let moved = first.metrics.rebalances.get() >= 2;
            (a == 200 && b == 200 && moved).then_some(())
        },
    )
    .await;
    produced += send_batch(400, 200).await;

    // Everything consumed by one instance or the other, then both stop cleanly.
    let metrics = [first.metrics.clone(), second.metrics.clone()];
    let applied = || -> i64 {
        let per_type = |m: &segmentd::telemetry::Metrics, t: &str| {
            m.events.with_label_values(&[INPUT, t]).get()
        };
        metrics
            .iter()
            .map(|m| (per_type(m, "page_view") + per_type(m, "search")) as i64)
            .sum()
    };
    wait_for("all events applied", Duration::from_secs(60), async || {
        (applied() >= produced).then_some(())
    })
    .await;
    second.stop().await.expect("the second stops cleanly");
    first.stop().await.expect("the first stops cleanly");
    // Revoked partitions were drained and committed before they moved, so the new owner
    // re-read nothing: each event was applied, and its change published, exactly once.
    assert_eq!(
        applied(),
        produced,
        "no event was read twice across the rebalance"
    );
    let changes: i64 = (0..4).map(|p| partition_size(&brokers, OUTPUT, p)).sum();
    assert_eq!(changes, produced, "every event's change was published once");
    let total: i64 = (0..4)
        .map(|p| committed_offset(&brokers, group, INPUT, p).unwrap_or(0))
        .sum();
    assert_eq!(total, produced, "every partition committed to its end");
}

/// Proves that one message too large for the producer cannot stop a partition: its
/// dead-letter copy is cut to `limits.max_event_bytes` and marked with the original size,
/// and the events after it are processed and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_forward_is_dead_lettered_truncated() {
    let mock = embedded_broker(1, 1);
    let brokers = mock.bootstrap_servers();
    let group = "too-large";
    let mut config = test_config(&brokers, INPUT, group);
    config.limits.max_event_bytes = 1_000;
    config
        .kafka
        .producer
        .insert("message.max.bytes".into(), "3000".into());
    let service = Service::start(config).await;

    let producer = producer(&brokers);
    let huge = format!(
        r#"{{"type":"page_view","customer_id":"c-10","ts":0,"pad":"{}"}}"#,
        "x".repeat(10_000)
    );
    produce(&producer, INPUT, Some("c-10"), huge.as_bytes()).await;
    for n in 0..2 {
        produce(&producer, INPUT, Some("c-10"), cart_event(n).as_bytes()).await;
    }
    let dead = read_records(&brokers, DEAD, 1, Duration::from_secs(30)).await;
    assert_eq!(dead[0].header("reason"), Some("oversized"));
    assert_eq!(
        dead[0].header("truncated_from"),
        Some(huge.len().to_string().as_str())
    );
    assert_eq!(
        dead[0].payload,
        huge.as_bytes()[..1_000],
        "the first bytes, untouched"
    );
    let changes = read_records(&brokers, OUTPUT, 1, Duration::from_secs(30)).await;
    assert_eq!(
        changes[0].json()["segment"],
        "exit_intent_with_cart",
        "the partition kept flowing"
    );
    service.stop().await.expect("a clean shutdown");
    assert_eq!(committed_offset(&brokers, group, INPUT, 0), Some(3));
}
