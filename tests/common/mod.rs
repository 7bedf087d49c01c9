//! Helpers shared by the integration tests: an embedded broker, the service started in
//! the test's runtime, an HTTP GET over a plain socket, and condition waits with deadlines.

#![allow(dead_code)]

pub mod process;
pub mod tansu;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use segmentd::config::Config;
use segmentd::engine::Engine;
use segmentd::telemetry::Metrics;
use segmentd::time::WallClock;
use serde_json::Value;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The input topic every test reads.
pub const INPUT: &str = "clickstream";
/// The output topic of the reference config.
pub const OUTPUT: &str = "segment-changes";
/// The dead-letter topic of the reference config.
pub const DEAD: &str = "segmentd-dead-letter";
/// The changelog topic of the reference config (the embedded broker cannot compact: its
/// records simply accumulate, which restores the same states).
pub const CHANGELOG: &str = "segmentd-changelog";

/// An embedded broker cluster (librdkafka's mock, on a loopback port) with the input,
/// output, dead-letter and changelog topics created, each with `partitions` partitions.
pub fn embedded_broker(
    brokers: i32,
    partitions: i32,
) -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(brokers).expect("embedded broker");
    for topic in [INPUT, OUTPUT, DEAD, CHANGELOG] {
        mock.create_topic(topic, partitions, 1).expect("topic");
    }
    mock
}

/// The reference config pointed at `brokers`, reading `input`, HTTP on a free port.
pub fn test_config(brokers: &str, input: &str, group: &str) -> Config {
    let text = std::fs::read_to_string("config/segmentd.toml").expect("the reference config");
    let mut config = Config::from_toml_only(&text, "config/segmentd.toml").expect("it parses");
    config.kafka.brokers = brokers.to_owned();
    config.kafka.input_topics = vec![input.to_owned()];
    config.kafka.group_id = group.to_owned();
    config.kafka.commit_interval = "200ms".parse().unwrap();
    config
        .kafka
        .consumer
        .insert("fetch.wait.max.ms".into(), "5".into());
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A running service and the means to stop it.
pub struct Service {
    pub http: SocketAddr,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    background: segmentd::ingest::Background,
}

impl Service {
    /// Starts the service and waits until its HTTP port is bound. Its wall clock stands
    /// still at the epoch, so event time advances by the events alone (as in `replay`)
    /// and the expected changes do not depend on how long the test takes.
    pub async fn start(config: Config) -> Service {
        Self::start_with_clock(config, WallClock::manual(0)).await
    }

    /// Starts the service reading `clock` as its wall clock (a manual one lets a test
    /// move idle partitions' watermarks without waiting).
    pub async fn start_with_clock(config: Config, clock: WallClock) -> Service {
        log_to_test_output();
        let rules = config.rule_set().expect("rules compile");
        let background = segmentd::ingest::spawn(config, rules, clock)
            .await
            .expect("the service starts");
        let started = background.started.clone();
        Service {
            http: started.http_addr,
            engine: started.engine,
            metrics: started.metrics,
            background,
        }
    }

    /// Waits until `/readyz` answers 200: partitions are assigned.
    pub async fn ready(&self) {
        let http = self.http;
        wait_for("readiness", Duration::from_secs(30), async || {
            (http_get(http, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Waits for the service to end on its own (an error), without signalling shutdown.
    pub async fn stopped(self) -> Result<(), segmentd::ingest::ServiceError> {
        self.background.stopped().await
    }

    /// Signals shutdown and returns how the service ended.
    pub async fn stop(self) -> Result<(), segmentd::ingest::ServiceError> {
        tokio::time::timeout(Duration::from_secs(30), self.background.stop())
            .await
            .expect("stops within 30s")
    }
}

/// Sends the service's log lines (info and above, or as `RUST_LOG` says) to the test's
/// output, which the test runner shows when the test fails or hangs. Once per process.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("segmentd=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `limit`.
pub async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw request text and reads the whole response: (status, body). Status 0 means
/// nothing listens there (yet), or nothing answered within 30 s.
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        Some(response)
    };
    let Ok(Some(response)) = tokio::time::timeout(Duration::from_secs(30), exchange).await else {
        return (0, String::new());
    };
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes chunked transfer encoding when present.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_owned();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// A producer to the embedded broker.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "1")
        .create()
        .expect("producer")
}

/// Produces one message and waits for its acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, key: Option<&str>, payload: &[u8]) {
    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("produced");
}

/// Produces generated `messages` to `topic`, each keyed by its customer id, one after the
/// other (each acknowledged before the next: the topic holds them in order).
pub async fn produce_generated(
    producer: &FutureProducer,
    topic: &str,
    messages: &[segmentd::generate::Generated],
) {
    for message in messages {
        produce(producer, topic, Some(&message.key), &message.payload).await;
    }
}

/// A record read back from a topic.
#[derive(Clone, Debug)]
pub struct Record {
    pub key: Option<String>,
    /// The partition it was read from.
    pub partition: i32,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("a JSON record")
    }
}

/// How many reads the test process has made: each reads in its own group.
static READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A consumer reading `topic` from its start in a group of its own: a test may read a
/// topic again, and a second member of one group would wait for the first to time out.
fn reader(brokers: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!(
                "reader-{topic}-{}-{}",
                std::process::id(),
                READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Reads exactly `count` records from `topic` (from the start), failing after `limit`,
/// then checks for a short while that no further record arrives.
pub async fn read_records(
    brokers: &str,
    topic: &str,
    count: usize,
    limit: Duration,
) -> Vec<Record> {
    let consumer = reader(brokers, topic);
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while records.len() < count {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} records on {topic} within {limit:?}",
                    records.len()
                )
            })
            .expect("consume");
        records.push(to_record(&message));
    }
    // Nothing more: a record beyond the expected ones would be a duplicate or a bug.
    if let Ok(Ok(extra)) = tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await
    {
        panic!(
            "an unexpected extra record on {topic}: {:?}",
            to_record(&extra)
        );
    }
    records
}

fn to_record(message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|header| {
                    (
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        partition: message.partition(),
        payload: message.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

/// The golden case whose events the pipeline tests send through a broker.
pub const SCRIPT_CASE: &str = "tests/golden/cart_exit_intent_abandoned_product";

/// Malformed messages of every kind, each with the reason it must be dead-lettered for.
pub fn malformed_messages() -> Vec<(&'static str, Vec<u8>)> {
    let oversized = format!(
        r#"{{"type":"page_view","customer_id":"c-10","ts":0,"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    vec![
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
    ]
}

/// Produces the scripted case's events (keyed by customer) and then every malformed
/// message (keyed `c-10`); returns how many messages were produced.
pub async fn produce_script(producer: &FutureProducer, topic: &str) -> i64 {
    let events = std::fs::read_to_string(format!("{SCRIPT_CASE}/events.jsonl")).unwrap();
    let mut produced = 0;
    for line in events.lines() {
        let customer = serde_json::from_str::<Value>(line).unwrap()["customer_id"]
            .as_str()
            .unwrap()
            .to_owned();
        produce(producer, topic, Some(&customer), line.as_bytes()).await;
        produced += 1;
    }
    for (_, payload) in malformed_messages() {
        produce(producer, topic, Some("c-10"), &payload).await;
        produced += 1;
    }
    produced
}

/// Produces the script to `input` and checks what arrives on `output` and `dead`:
/// exactly the golden changes and every malformed message. Returns how many messages
/// were produced.
pub async fn script_round_trip(
    brokers: &str,
    input: &str,
    output: &str,
    dead: &str,
    limit: Duration,
) -> i64 {
    let produced = produce_script(&producer(brokers), input).await;
    check_changes(&read_records(brokers, output, expected_changes().len(), limit).await);
    check_dead_letters(
        &read_records(brokers, dead, malformed_messages().len(), limit).await,
        input,
    );
    produced
}

/// The scripted case's expected changes, in order.
pub fn expected_changes() -> Vec<Value> {
    std::fs::read_to_string(format!("{SCRIPT_CASE}/expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that change records are exactly the expected changes: keyed by customer, with
/// `segment`/`transition`/`id` headers, each customer's in `seq` order.
pub fn check_changes(records: &[Record]) {
    let expected = expected_changes();
    assert_eq!(records.len(), expected.len());
    let mut by_customer: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in records {
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
    let first = records
        .iter()
        .map(Record::json)
        .find(|c| c["customer_id"] == "c-10" && c["seq"] == 1)
        .unwrap();
    assert_eq!(
        first["cart"][0]["product_id"], "p-7",
        "the payload carries the cart"
    );
    assert_eq!(
        first["segments"],
        serde_json::json!(["exit_intent_with_cart"])
    );
}

/// Asserts that every malformed message is on the dead-letter topic, untouched, with its
/// reason and origin in headers.
pub fn check_dead_letters(records: &[Record], source_topic: &str) {
    let malformed = malformed_messages();
    assert_eq!(records.len(), malformed.len());
    for (reason, payload) in &malformed {
        let record = records
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
        assert_eq!(record.header("source_topic"), Some(source_topic));
        assert!(
            !record.header("error").unwrap_or_default().is_empty(),
            "{reason}: an error message"
        );
    }
}

/// The offset `group` committed on one partition of `topic`, if any.
pub fn committed_offset(brokers: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let checker: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let committed = checker
        .committed_offsets(list, Duration::from_secs(10))
        .ok()?;
    match committed.elements().first()?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// The low and high watermarks of one partition of `topic`.
pub fn watermarks(brokers: &str, topic: &str, partition: i32) -> (i64, i64) {
    let checker: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    checker
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .unwrap()
}

/// How many messages one partition of `topic` holds.
pub fn partition_size(brokers: &str, topic: &str, partition: i32) -> i64 {
    let (low, high) = watermarks(brokers, topic, partition);
    high - low
}

/// Asserts that `group` committed every partition of `topic` to its end, and that the
/// partitions hold `produced` messages in all.
pub fn check_committed(brokers: &str, group: &str, topic: &str, partitions: i32, produced: i64) {
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = watermarks(brokers, topic, partition);
        total += high - low;
        if high == 0 {
            continue; // no message was keyed to this partition
        }
        assert_eq!(
            committed_offset(brokers, group, topic, partition),
            Some(high),
            "partition {partition} committed to its end"
        );
    }
    assert_eq!(total, produced, "every produced message is in the topic");
}

/// Generated traffic (both formats, some malformed) for the run-versus-replay tests.
pub fn generated_messages(
    seed: u64,
    customers: u32,
    count: i64,
) -> Vec<segmentd::generate::Generated> {
    use segmentd::generate::{Format, Generator, GeneratorConfig};
    let mut generator = Generator::new(GeneratorConfig {
        seed,
        customers,
        format: Format::Mixed,
        invalid_share: 0.01,
    });
    (0..count)
        .map(|i| generator.next_at(TRAFFIC_START + i * 20_000))
        .collect()
}

/// When generated traffic starts.
pub const TRAFFIC_START: i64 = 1_767_225_600_000;

/// One change as the run-versus-replay tests compare it: segment, transition, `at`,
/// `seq`, `id`.
fn change_line(segment: &str, transition: &str, at: &str, seq: u64, id: &str) -> String {
    format!("{segment} {transition} {at} {seq} {id}")
}

/// What one uninterrupted `replay` of `messages` publishes, per customer, with time run
/// on to `until` so that pending timers fire; and the engine, holding the final states.
pub fn replay_changes(
    config: &Config,
    messages: &[segmentd::generate::Generated],
    until: i64,
) -> (BTreeMap<String, Vec<String>>, Engine) {
    use segmentd::time::partition::PartitionTime;
    let replay = Engine::new(
        Arc::new(config.rule_set().unwrap()),
        segmentd::state::new_store(),
        config.time.session_gap.millis(),
    );
    let mut replay_time = PartitionTime::new(config.time.replay(), 0);
    let mut changes = Vec::new();
    for message in messages {
        if let Ok(event) =
            segmentd::event::parse_event(&message.payload, config.limits.max_event_bytes)
        {
            replay_time.take(&replay, event, (), 0, &mut changes, &mut Vec::new());
        }
    }
    replay_time.finish(&replay, until, &mut changes, &mut Vec::new());
    assert!(
        changes
            .iter()
            .any(|c| c.cause == segmentd::emit::change::Cause::Timer),
        "timers fire"
    );
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for change in &changes {
        expected
            .entry(change.customer_id.to_string())
            .or_default()
            .push(change_line(
                &change.segment,
                change.transition.as_str(),
                &segmentd::time::format_timestamp(change.at),
                change.seq,
                &change.id(),
            ));
    }
    (expected, replay)
}

/// Generated traffic, and what one uninterrupted `replay` of it publishes with time run
/// on 100 days past it (so that every timer fires).
pub struct Scenario {
    /// The traffic, one message every 20 s of event time from [`TRAFFIC_START`].
    pub messages: Vec<segmentd::generate::Generated>,
    /// Where time is run on to.
    pub until: i64,
    /// The changes per customer.
    pub expected: BTreeMap<String, Vec<String>>,
    /// How many changes in all.
    pub total: usize,
    /// How many of the messages do not parse (dead-lettered, applied nowhere).
    pub invalid: usize,
}

/// The [`Scenario`] of `count` generated messages (seed `seed`, `customers` ids) under
/// `config`'s rules.
pub fn scenario(config: &Config, seed: u64, customers: u32, count: i64) -> Scenario {
    let messages = generated_messages(seed, customers, count);
    let until = TRAFFIC_START + count * 20_000 + 100 * segmentd::time::DAY;
    let (expected, _) = replay_changes(config, &messages, until);
    let total = expected.values().map(Vec::len).sum();
    let invalid = messages
        .iter()
        .filter(|m| {
            segmentd::event::parse_event(&m.payload, config.limits.max_event_bytes).is_err()
        })
        .count();
    Scenario {
        messages,
        until,
        expected,
        total,
        invalid,
    }
}

/// Output records per customer in the order published, each change once (at-least-once
/// delivery may repeat a change after a restart: a repeat carries the same `id`).
pub fn changes_by_customer(records: &[Record]) -> BTreeMap<String, Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut actual: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for record in records {
        let change = record.json();
        let id = change["id"].as_str().unwrap().to_owned();
        if !seen.insert(id.clone()) {
            continue;
        }
        actual
            .entry(change["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(change_line(
                change["segment"].as_str().unwrap(),
                change["transition"].as_str().unwrap(),
                change["at"].as_str().unwrap(),
                change["seq"].as_u64().unwrap(),
                &id,
            ));
    }
    actual
}

/// Reads `topic` from the start until it holds `unique` distinct change ids (or `limit`
/// passes: then what was read, for the caller's comparison to show what is missing); then
/// checks for a short while that no change with a new id follows.
/// Repeats of an id (at-least-once after a restart) are kept.
pub async fn read_unique_changes(
    brokers: &str,
    topic: &str,
    unique: usize,
    limit: Duration,
) -> Vec<Record> {
    let consumer = reader(brokers, topic);
    let mut records = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + limit;
    while ids.len() < unique {
        let Ok(message) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
            // Short: the caller's comparison says which changes are missing.
            eprintln!(
                "only {} of {unique} distinct changes on {topic} within {limit:?}",
                ids.len()
            );
            return records;
        };
        let message = message.expect("consume");
        let record = to_record(&message);
        ids.insert(record.json()["id"].as_str().unwrap().to_owned());
        records.push(record);
    }
    while let Ok(Ok(extra)) =
        tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await
    {
        let record = to_record(&extra);
        assert!(
            !ids.insert(record.json()["id"].as_str().unwrap().to_owned()),
            "an unexpected extra change on {topic}: {record:?}"
        );
        records.push(record);
    }
    records
}

/// The sum of the group's committed offsets over `partitions` partitions of `topic`.
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| committed_offset(brokers, group, topic, p).unwrap_or(0))
        .sum()
}
