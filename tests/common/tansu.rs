//! A standalone Tansu broker for the tests that run the real binary: started on a free
//! loopback port, stopped when its guard drops, however the test ends.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use super::process::{Guard, spawn_tansu};
use super::wait_for;

/// Starts Tansu on a free loopback port and waits until it answers metadata requests.
pub async fn start_tansu(log: &std::path::Path) -> (Guard, String) {
    let (guard, brokers) = spawn_tansu(log);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    wait_for(
        "the Tansu broker to answer",
        Duration::from_secs(30),
        async || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_millis(500))
                .ok()
                .map(|_| ())
        },
    )
    .await;
    (guard, brokers)
}

/// Creates topics `(name, partitions)` on the broker at `brokers`.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        result.unwrap_or_else(|(topic, err)| panic!("cannot create {topic}: {err:?}"));
    }
}
