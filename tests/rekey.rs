//! Re-keying (`kafka.rekey_topics`), against the embedded broker: events produced to a
//! topic keyed by something else than the customer go through the internal topic keyed by
//! customer id, and the service's changes equal one uninterrupted `replay`'s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{
    DEAD, OUTPUT, Scenario, Service, changes_by_customer, embedded_broker, partition_size,
    producer, read_records, scenario, test_config, wait_for,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The topic keyed by session, not by customer.
const BY_SESSION: &str = "by-session";
/// The internal topic (created beforehand: the embedded broker cannot create topics).
const REKEYED: &str = "rekey-test-rekeyed";

/// Every key in each partition of `topic`, read by assignment.
fn keys_by_partition(brokers: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "rekey-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut keys = BTreeMap::new();
    for partition in 0..partitions {
        let size = partition_size(brokers, topic, partition);
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let found: &mut Vec<String> = keys.entry(partition).or_default();
        while (found.len() as i64) < size {
            let message = consumer
                .poll(Duration::from_secs(10))
                .expect("a record within 10 s")
                .expect("readable");
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            found.push(key.unwrap_or_default());
        }
    }
    keys
}

/// The partition Java's default partitioner picks for `key` among `partitions`
/// (murmur2, made positive): where a Java producer of the other input topics puts the
/// customer's events.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().unwrap());
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

/// Proves re-keying: generated traffic (both formats, some malformed) is produced to a
/// one-partition topic under session-like keys; the service, configured to re-key that
/// topic, copies each message to a four-partition internal topic keyed by customer id —
/// every customer's events in the partition Java's partitioner picks for the id, the
/// unreadable ones without a key — and
/// each customer's changes equal one uninterrupted `replay`'s; the unreadable messages
/// are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_not_keyed_by_customer_is_rekeyed_through_the_internal_topic() {
    let mock = embedded_broker(1, 4);
    mock.create_topic(BY_SESSION, 1, 1).unwrap();
    mock.create_topic(REKEYED, 4, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let mut config = test_config(&brokers, "unused", "rekey-test");
    config.kafka.input_topics = vec![REKEYED.to_owned()];
    config.kafka.rekey_topics = vec![BY_SESSION.to_owned()];
    config.kafka.rekeyed_topic = REKEYED.to_owned();

    let Scenario {
        messages,
        until,
        expected,
        total,
        invalid,
    } = scenario(&config, 4, 50, 1_500);
    assert!(invalid > 0, "the traffic holds malformed messages");

    let clock = segmentd::time::WallClock::manual(0);
    let service = Service::start_with_clock(config.clone(), clock.clone()).await;
    service.ready().await;
    let producer = producer(&brokers);
    for (i, message) in messages.iter().enumerate() {
        let session = format!("session-{}", i % 7);
        common::produce(&producer, BY_SESSION, Some(&session), &message.payload).await;
    }
    wait_for(
        "every message copied",
        Duration::from_secs(60),
        async || {
            let copied: i64 = (0..4).map(|p| partition_size(&brokers, REKEYED, p)).sum();
            (copied >= messages.len() as i64).then_some(())
        },
    )
    .await;
    let keys = keys_by_partition(&brokers, REKEYED, 4);
    let mut partition_of: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
    for (partition, keys) in &keys {
        for key in keys.iter().filter(|k| !k.is_empty()) {
            partition_of.entry(key).or_default().insert(*partition);
        }
    }
    assert!(partition_of.len() > 10, "customers: {}", partition_of.len());
    for (customer, partitions) in &partition_of {
        assert_eq!(
            partitions.iter().collect::<Vec<_>>(),
            vec![&java_partition(customer.as_bytes(), 4)],
            "{customer} is in one partition, the one Java's partitioner picks"
        );
    }
    let unkeyed = keys.values().flatten().filter(|k| k.is_empty()).count();
    assert_eq!(
        unkeyed, invalid,
        "unreadable messages are copied without a key"
    );
    assert_eq!(
        (0..4)
            .map(|p| partition_size(&brokers, REKEYED, p))
            .sum::<i64>(),
        messages.len() as i64,
        "each message copied once"
    );

    // Every copy applied before the clock moves on past the traffic.
    wait_for(
        "every copy processed",
        Duration::from_secs(60),
        async || {
            let committed = common::committed_total(&brokers, "rekey-test", REKEYED, 4);
            (committed == messages.len() as i64).then_some(())
        },
    )
    .await;
    clock.set(until + config.time.allowed_lateness.millis());
    let records = read_records(&brokers, OUTPUT, total, Duration::from_secs(60)).await;
    assert_eq!(changes_by_customer(&records), expected);
    read_records(&brokers, DEAD, invalid, Duration::from_secs(30)).await;
    service.stop().await.expect("a clean shutdown");
    assert_eq!(
        common::committed_offset(&brokers, "rekey-test.rekey", BY_SESSION, 0),
        Some(messages.len() as i64),
        "the re-keying stage committed its source to the end"
    );
}
