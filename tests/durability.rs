//! State durability against a real Kafka-protocol broker on loopback (librdkafka's mock
//! cluster): customers' state is written to the changelog topic, moves with its partition
//! when the group rebalances, and is restored after a restart — so the changes published
//! are those of one uninterrupted replay.

mod common;

use std::time::Duration;

use common::{
    CHANGELOG, INPUT, OUTPUT, Service, TRAFFIC_START, changes_by_customer, committed_total,
    embedded_broker, generated_messages, http_get, producer, read_unique_changes, replay_changes,
    test_config, wait_for,
};
use segmentd::time::{DAY, WallClock};

const GROUP: &str = "durability";
const PARTITIONS: i32 = 4;

/// Proves that state survives rebalances and restarts: instance A processes the first
/// third of the traffic alone; B joins (A's revoked partitions are checkpointed and B
/// restores them); both process the second third; A stops (B restores the rest); B
/// processes the last third alone, then time runs on so every timer fires. Each
/// customer's changes on the output topic (deduplicated by `id`) equal one uninterrupted
/// replay's exactly — `seq`, `at`, windows and timers continue where they were — and B's
/// final state of every customer equals the replay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_moves_with_its_partition_and_survives_a_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mock = embedded_broker(1, PARTITIONS);
    let brokers = mock.bootstrap_servers();
    let mut config = test_config(&brokers, INPUT, GROUP);
    // Short session timeouts: the embedded broker waits that long for members to rejoin.
    for (key, value) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ] {
        config.kafka.consumer.insert(key.into(), value.into());
    }
    let messages = generated_messages(8, 80, 3_000);
    let until = TRAFFIC_START + 3_000 * 20_000 + 100 * DAY;
    let (expected, replay) = replay_changes(&config, &messages, until);
    let total: usize = expected.values().map(Vec::len).sum();

    let producer = producer(&brokers);
    let send_part = async |part: std::ops::Range<usize>| {
        common::produce_generated(&producer, INPUT, &messages[part.clone()]).await;
        wait_for(
            "the part processed and committed",
            Duration::from_secs(60),
            async || {
                let committed = committed_total(&brokers, GROUP, INPUT, PARTITIONS);
                (committed == part.end as i64).then_some(())
            },
        )
        .await;
    };

    let clock = WallClock::manual(0);
    let a = Service::start_with_clock(config.clone(), clock.clone()).await;
    a.ready().await;
    send_part(0..1_000).await;

    let b = Service::start_with_clock(config.clone(), clock.clone()).await;
    let http_b = b.http;
    wait_for(
        "B to restore the partitions it took over",
        Duration::from_secs(60),
        async || {
            let (status, _) = http_get(http_b, "/readyz").await;
            let (_, metrics) = http_get(http_b, "/metrics").await;
            let restored = metric(&metrics, "segmentd_state_restored_customers_total");
            (status == 200 && restored > 0.0).then_some(())
        },
    )
    .await;
    send_part(1_000..2_000).await;

    a.stop().await.expect("A stops cleanly");
    // B takes A's partitions over (restoring them first): the last part is committed
    // only once B has processed all of it.
    send_part(2_000..3_000).await;
    clock.set(until + config.time.allowed_lateness.millis());

    let records = read_unique_changes(&brokers, OUTPUT, total, Duration::from_secs(60)).await;
    assert_eq!(changes_by_customer(&records), expected);
    replay.store().for_each(|id, expected| {
        let mut restored = b
            .engine
            .store()
            .read(id, Clone::clone)
            .unwrap_or_else(|| panic!("{id} is in B's state"));
        restored.partition = 0;
        assert_eq!(&restored, expected, "{id}");
    });
    assert!(
        common::partition_size(&brokers, CHANGELOG, 0) > 0,
        "states were written to the changelog"
    );
    b.stop().await.expect("B stops cleanly");
}

/// A metric's value in a Prometheus text exposition (0 when absent).
fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
