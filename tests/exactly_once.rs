//! Exactly-once delivery (`delivery.mode = "exactly_once"`), against the embedded broker,
//! whose transactions follow the protocol (producer ids, epochs, fencing) but keep no
//! transaction markers: aborted records stay visible there, so these tests prove the
//! service's side — one transaction per commit interval, fencing, aborts and rewinds —
//! and read the output deduplicated only where a transaction was aborted.

mod common;

use std::time::Duration;

use common::{
    INPUT, OUTPUT, Scenario, Service, changes_by_customer, embedded_broker, http_get, producer,
    read_records, read_unique_changes, scenario, test_config, wait_for,
};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use segmentd::config::{Config, DeliveryMode};

/// The reference config in exactly-once mode under `transactional_id`.
fn exactly_once_config(brokers: &str, group: &str, transactional_id: &str) -> Config {
    let mut config = test_config(brokers, INPUT, group);
    config.delivery.mode = DeliveryMode::ExactlyOnce;
    config.delivery.transactional_id = transactional_id.to_owned();
    config
}

/// A counter's value in the service's `/metrics` (0 when absent).
async fn metric(service: &Service, series: &str) -> f64 {
    let (_, body) = http_get(service.http, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Proves the transactional path end to end: generated traffic on four partitions goes
/// through the service in exactly-once mode, transactions commit every interval, and the
/// output holds each customer's changes exactly once — no record more than one
/// uninterrupted `replay` publishes (`read_records` fails on any extra record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_publishes_each_change_once() {
    let mock = embedded_broker(1, 4);
    let brokers = mock.bootstrap_servers();
    let config = exactly_once_config(&brokers, "eos-run", "eos-run-1");
    let Scenario {
        messages,
        until,
        expected,
        total,
        invalid,
    } = scenario(&config, 5, 60, 2_000);

    let clock = segmentd::time::WallClock::manual(0);
    let service = Service::start_with_clock(config.clone(), clock.clone()).await;
    service.ready().await;
    let producer = producer(&brokers);
    common::produce_generated(&producer, INPUT, &messages).await;
    // Every valid message applied (or recognised as a repeat) before the clock moves: a
    // partition is idle only once its last message is behind it.
    let valid = (messages.len() - invalid) as f64;
    wait_for("every event applied", Duration::from_secs(60), async || {
        let events = metric_sum(&service, "segmentd_events_total{").await
            + metric(&service, "segmentd_events_duplicate_total").await;
        (events >= valid).then_some(())
    })
    .await;
    clock.set(until + config.time.allowed_lateness.millis());
    let records = read_records(&brokers, OUTPUT, total, Duration::from_secs(60)).await;
    assert_eq!(changes_by_customer(&records), expected);
    let committed = metric(
        &service,
        "segmentd_transactions_total{result=\"committed\"}",
    )
    .await;
    assert!(committed >= 1.0, "transactions committed: {committed}");
    assert_eq!(
        metric(&service, "segmentd_transactions_total{result=\"aborted\"}").await,
        0.0
    );
    service.stop().await.expect("a clean shutdown");
}

/// The sum of every series of a metric family whose line starts with `prefix`.
async fn metric_sum(service: &Service, prefix: &str) -> f64 {
    let (_, body) = http_get(service.http, "/metrics").await;
    body.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Proves that a fenced instance stops: the transaction coordinator answers the
/// service's commit with `PRODUCER_FENCED`, as it does once another instance registered
/// the same transactional id (the embedded broker does not fence by itself, so the test
/// injects its answer). The service ends with the transactions error instead of going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_instance_stops_with_a_clear_error() {
    let mock = embedded_broker(1, 1);
    let brokers = mock.bootstrap_servers();
    let service = Service::start(exactly_once_config(&brokers, "eos-fenced", "shared-id")).await;
    service.ready().await;
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let producer = producer(&brokers);
    let event = common::generated_messages(1, 1, 1).remove(0);
    common::produce(&producer, INPUT, Some(&event.key), &event.payload).await;

    let ended = tokio::time::timeout(Duration::from_secs(60), service.stopped())
        .await
        .expect("the fenced service stops on its own");
    let err = ended.expect_err("it stops with an error");
    assert!(
        matches!(err, segmentd::ingest::ServiceError::Transactions(_)),
        "{err}"
    );
    assert!(err.to_string().contains("fenced"), "{err}");
}

/// Proves abort and rewind: the brokers refuse some transaction commits (an abortable
/// error); the service aborts those transactions, rewinds its state to the last commit
/// (restoring from the changelog, reading the input again from the committed offsets)
/// and goes on. Each customer's changes, deduplicated by `id` (the embedded broker keeps
/// aborted records visible), equal one uninterrupted `replay`'s: nothing applied twice,
/// nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_rewinds_and_loses_nothing() {
    let mock = embedded_broker(1, 2);
    let brokers = mock.bootstrap_servers();
    let config = exactly_once_config(&brokers, "eos-abort", "eos-abort-1");
    let Scenario {
        messages,
        until,
        expected,
        total,
        ..
    } = scenario(&config, 9, 40, 1_500);

    let clock = segmentd::time::WallClock::manual(0);
    let service = Service::start_with_clock(config.clone(), clock.clone()).await;
    service.ready().await;
    let producer = producer(&brokers);
    let (first, second) = messages.split_at(messages.len() / 2);
    common::produce_generated(&producer, INPUT, first).await;
    let restores = metric(&service, "segmentd_state_restore_seconds_count").await;
    // The next commit fails with an error that leaves the transaction abortable.
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
    );
    wait_for(
        "a transaction aborted",
        Duration::from_secs(60),
        async || {
            let aborted = metric(&service, "segmentd_transactions_total{result=\"aborted\"}").await;
            (aborted >= 1.0).then_some(())
        },
    )
    .await;
    // The rewind restores both partitions again.
    wait_for(
        "both partitions restored again",
        Duration::from_secs(60),
        async || {
            let now = metric(&service, "segmentd_state_restore_seconds_count").await;
            (now >= restores + 2.0).then_some(())
        },
    )
    .await;
    common::produce_generated(&producer, INPUT, second).await;
    let committed_after = metric(
        &service,
        "segmentd_transactions_total{result=\"committed\"}",
    )
    .await;
    wait_for("commits go on", Duration::from_secs(60), async || {
        let now = metric(
            &service,
            "segmentd_transactions_total{result=\"committed\"}",
        )
        .await;
        (now >= committed_after + 3.0).then_some(())
    })
    .await;
    clock.set(until + config.time.allowed_lateness.millis());
    let records = read_unique_changes(&brokers, OUTPUT, total, Duration::from_secs(90)).await;
    assert_eq!(changes_by_customer(&records), expected);
    service.stop().await.expect("a clean shutdown");
}
