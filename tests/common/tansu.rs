//! A standalone Tansu broker for the tests that run the real binary: started on a free
//! loopback port, stopped when its guard drops, however the test ends.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use super::wait_for;

/// A child process killed when the test ends, however it ends.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BINARY") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let in_cargo =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin/tansu"));
    on_path
        .into_iter()
        .chain(in_cargo)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the system test needs the Tansu broker: run ./scripts/test.sh, or \
             `cargo install tansu --version 0.6.0 --features dynostore --locked`"
            )
        })
}

/// Starts Tansu on a free loopback port and waits until it answers metadata requests.
pub async fn start_tansu(log: &std::path::Path) -> (Guard, String) {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let log_file = std::fs::File::create(log).unwrap();
    let child = Command::new(tansu_binary())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("tansu starts");
    let guard = Guard(child);
    let brokers = format!("127.0.0.1:{port}");
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
