//! System test: the real `segmentd` binary against a standalone Kafka-compatible broker
//! (Tansu, in-memory storage) on loopback, started and stopped by this test.
//!
//! `scripts/test.sh` installs Tansu and points `TANSU_BINARY` at it; without it the
//! test looks for `tansu` on the PATH and in `~/.cargo/bin`, and fails with instructions
//! if there is none — it never passes without having run.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{Guard, free_port};
use common::tansu::{create_topics, start_tansu};
use common::{DEAD, INPUT, OUTPUT, check_committed, http_get, script_round_trip, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_segmentd");
const GROUP: &str = "segmentd-system-test";

/// Proves the product end to end as users run it: the real binary, configured by the
/// reference file plus environment overrides, against a standalone broker, turns the
/// scripted events into exactly the golden changes, dead-letters every malformed message
/// untouched with its reason, stops on SIGTERM with exit status 0, and leaves the group's
/// committed offsets at the end of every input partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_against_a_standalone_broker() {
    let dir = std::env::temp_dir().join(format!("segmentd-system-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_tansu, brokers) = start_tansu(&dir.join("tansu.log")).await;
    create_topics(&brokers, &[(INPUT, 2), (OUTPUT, 2), (DEAD, 1)]).await;

    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let service_log = dir.join("segmentd.log");
    let child = Command::new(BIN)
        .args(["run", "-c", "config/segmentd.toml"])
        .env("SEGMENTD_KAFKA__BROKERS", &brokers)
        .env("SEGMENTD_KAFKA__INPUT_TOPICS", format!("[{INPUT}]"))
        .env("SEGMENTD_KAFKA__GROUP_ID", GROUP)
        .env("SEGMENTD_KAFKA__COMMIT_INTERVAL", "200ms")
        // The scripted events are from March 2026: with the wall clock moving an idle
        // partition's watermark, timers due months later (a lapsed buyer) would fire too.
        // Event time alone, as in the other pipeline tests.
        .env("SEGMENTD_TIME__IDLE_TIMEOUT", "100000d")
        .env("SEGMENTD_HTTP__LISTEN", http.to_string())
        .stderr(std::fs::File::create(&service_log).unwrap())
        .spawn()
        .expect("segmentd starts");
    let mut service = Guard(child);
    let log = || std::fs::read_to_string(&service_log).unwrap_or_default();
    wait_for(
        "segmentd to be ready",
        Duration::from_secs(60),
        async || {
            if let Ok(Some(status)) = service.0.try_wait() {
                panic!("segmentd exited with {status}:\n{}", log());
            }
            (http_get(http, "/readyz").await.0 == 200).then_some(())
        },
    )
    .await;

    let produced = script_round_trip(&brokers, INPUT, OUTPUT, DEAD, Duration::from_secs(60)).await;

    let pid = service.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let status = wait_for("segmentd to exit", Duration::from_secs(30), async || {
        service.0.try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "exit status {status}:\n{}", log());
    check_committed(&brokers, GROUP, INPUT, 2, produced);
}
