//! The whole service against a real Kafka-protocol broker on loopback (librdkafka's mock
//! cluster): events in, segment changes and dead letters out, offsets committed, HTTP.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    Service, http_get, http_request, produce, producer, read_records, test_config, wait_for,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

const INPUT: &str = "clickstream";
const OUTPUT: &str = "segment-changes";
const DEAD: &str = "segmentd-dead-letter";

/// Proves the at-least-once pipeline end to end: the scripted events of the golden cart
/// case produce exactly the golden changes on the output topic (keyed by customer, with
/// `segment`/`transition` headers, in per-customer `seq` order); every malformed message
/// is copied untouched to the dead-letter topic with its reason; the replayed event changes
/// nothing; HTTP serves the state; and after a graceful shutdown the group's committed
/// offsets are the end of every input partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_changes_and_dead_letters_out_offsets_committed() {
    let mock = MockCluster::new(1).expect("embedded broker");
    let brokers = mock.bootstrap_servers();
    for topic in [INPUT, OUTPUT, DEAD] {
        mock.create_topic(topic, 2, 1).expect("topic");
    }
    let service = Service::start(test_config(&brokers, INPUT, "pipeline-test")).await;
    wait_for("readiness", Duration::from_secs(30), async || {
        (http_get(service.http, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    let producer = producer(&brokers);
    let events =
        std::fs::read_to_string("tests/golden/cart_exit_intent_abandoned_product/events.jsonl")
            .unwrap();
    let mut produced = 0;
    for line in events.lines() {
        let customer = serde_json::from_str::<Value>(line).unwrap()["customer_id"]
            .as_str()
            .unwrap()
            .to_owned();
        produce(&producer, INPUT, Some(&customer), line.as_bytes()).await;
        produced += 1;
    }
    let oversized = format!(
        r#"{{"type":"page_view","customer_id":"c-10","ts":0,"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{\"type\": \"page_view\", ".to_vec()),
        (
            "missing_customer_id",
            br#"{"type":"page_view","ts":"2026-03-01T10:00:00Z"}"#.to_vec(),
        ),
        (
            "bad_timestamp",
            br#"{"type":"page_view","customer_id":"c-10","ts":"soon"}"#.to_vec(),
        ),
        (
            "wrong_type",
            br#"{"type":"page_view","customer_id":10,"ts":"2026-03-01T10:00:00Z"}"#.to_vec(),
        ),
        ("not_an_object", b"[1,2,3]".to_vec()),
        ("empty", Vec::new()),
        ("oversized", oversized.into_bytes()),
    ];
    for (_, payload) in &malformed {
        produce(&producer, INPUT, Some("c-10"), payload).await;
        produced += 1;
    }

    let expected: Vec<Value> =
        std::fs::read_to_string("tests/golden/cart_exit_intent_abandoned_product/expected.jsonl")
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let changes = read_records(&brokers, OUTPUT, expected.len(), Duration::from_secs(30)).await;
    let mut by_customer: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in &changes {
        let change = record.json();
        assert_eq!(
            record.key.as_deref(),
            change["customer_id"].as_str(),
            "keyed by customer"
        );
        assert_eq!(record.header("segment"), change["segment"].as_str());
        assert_eq!(record.header("transition"), change["transition"].as_str());
        assert_eq!(record.header("id"), change["id"].as_str());
        assert_eq!(change["schema"], "segmentd.segment_change.v1");
        assert!(
            change["rules_version"]
                .as_str()
                .unwrap()
                .starts_with("sha256:")
        );
        by_customer
            .entry(change["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(change);
    }
    for want in &expected {
        let customer = want["customer_id"].as_str().unwrap();
        let got = by_customer
            .get_mut(customer)
            .expect("changes for every customer");
        let change = got.remove(0);
        for key in ["segment", "transition", "at", "seq", "cause"] {
            assert_eq!(change[key], want[key], "{customer}: `{key}` of {change}");
        }
    }
    let c10 = &changes
        .iter()
        .map(|r| r.json())
        .find(|c| c["customer_id"] == "c-10" && c["seq"] == 1)
        .unwrap();
    assert_eq!(
        c10["cart"][0]["product_id"], "p-7",
        "the payload carries the cart"
    );
    assert_eq!(
        c10["segments"],
        serde_json::json!(["exit_intent_with_cart"])
    );

    let dead = read_records(&brokers, DEAD, malformed.len(), Duration::from_secs(30)).await;
    for (reason, payload) in &malformed {
        let record = dead
            .iter()
            .find(|r| r.header("reason") == Some(reason))
            .unwrap_or_else(|| panic!("no dead letter for {reason}"));
        assert_eq!(
            &record.payload, payload,
            "{reason}: the payload is forwarded untouched"
        );
        assert_eq!(
            record.key.as_deref(),
            Some("c-10"),
            "{reason}: the key is kept"
        );
        assert_eq!(record.header("source_topic"), Some(INPUT));
        assert!(
            !record.header("error").unwrap_or_default().is_empty(),
            "{reason}: an error message"
        );
    }

    // HTTP: lookups, segments, metrics, errors.
    let (status, body) = http_get(service.http, "/customers/c-11").await;
    assert_eq!(status, 200, "{body}");
    let customer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(customer["segments"][0]["segment"], "abandoned_product");
    assert_eq!(
        customer["segments"][0]["entered_at"],
        "2026-03-01T11:10:00.000Z"
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
    let (status, body) = http_request(service.http, "GARBAGE\r\n\r\n").await;
    assert!(
        status == 400 || body.is_empty(),
        "a malformed request is refused, not served: {status}"
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

    service.stop().await.expect("a clean shutdown");

    // Every input message was processed and acknowledged: the committed offsets are the
    // end of each partition.
    let checker: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "pipeline-test")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for p in 0..2 {
        partitions.add_partition(INPUT, p);
    }
    let committed = checker
        .committed_offsets(partitions, Duration::from_secs(10))
        .unwrap();
    let mut total = 0;
    for element in committed.elements() {
        let (_, high) = checker
            .fetch_watermarks(INPUT, element.partition(), Duration::from_secs(10))
            .unwrap();
        if high == 0 {
            continue; // no message was keyed to this partition
        }
        let Offset::Offset(offset) = element.offset() else {
            panic!("no commit for partition {}", element.partition())
        };
        assert_eq!(
            offset,
            high,
            "partition {} committed to its end",
            element.partition()
        );
        total += offset;
    }
    assert_eq!(total, produced);
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
    let result = segmentd::ingest::run(config, rules, std::future::pending(), |_| {}).await;
    let err = result.expect_err("refused");
    assert!(err.to_string().contains("no.such.property"), "{err}");
}
