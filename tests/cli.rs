//! The `segmentd` binary as a user runs it: `check`, `replay`, `generate`, `demo`, and
//! `run` stopped by a real SIGTERM.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_segmentd");
const CART_CASE: &str = "tests/golden/cart_exit_intent_abandoned_product";

fn segmentd(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("segmentd-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `check` accepts the reference config and says what each rule needs.
#[test]
fn check_describes_the_reference_rules() {
    let out = segmentd(&["check", "-c", "config/segmentd.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("OK, 8 segments"), "{stdout}");
    assert!(stdout.contains("delivery: at_least_once"), "{stdout}");
    assert!(
        stdout.contains("state: changelog segmentd-changelog, idle customers encoded after 30s"),
        "{stdout}"
    );
    assert!(stdout.contains("segment vip_mobile_de"));
    assert!(stdout.contains("reads segments: high_value"));
    assert!(
        stdout.contains("keeps per customer: events of purchase.revenue over 90d"),
        "{stdout}"
    );
}

/// `check` rejects a broken rule with the file, segment, line and column, and a missing
/// or malformed file with a clear message — each with a failing exit status.
#[test]
fn check_rejects_bad_configs_precisely() {
    let dir = temp_dir("check");
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        "[[segments]]\nid = \"a\"\nenter = \"count(purchase) >= 1 and cart.valu > 3\"\n",
    )
    .unwrap();
    let out = segmentd(&["check", "-c", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("segment `a` (enter), line 3, column 35: unknown name `cart.valu`"),
        "{stderr}"
    );

    let out = segmentd(&["check", "-c", "/nonexistent/segmentd.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read config file"));

    let garbage = dir.join("garbage.toml");
    std::fs::write(&garbage, "[kafka\nbrokers = ").unwrap();
    let out = segmentd(&["check", "-c", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid config"),
        "{}",
        text(&out.stderr)
    );

    let out = segmentd(&["replay", "-c", "config/segmentd.toml"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing flag is a usage error"
    );
    assert!(text(&out.stderr).contains("--input"));
}

/// `replay` over a plain and a gzipped file gives the golden changes, skips and reports
/// invalid lines, and `--dump-state` writes every customer's segments and state.
#[test]
fn replay_writes_changes_and_state_from_plain_and_gzipped_input() {
    let dir = temp_dir("replay");
    let mut input = std::fs::read(format!("{CART_CASE}/events.jsonl")).unwrap();
    input.extend_from_slice(b"this line is not json\n\n{\"type\":\"page_view\"}\n");
    let plain = dir.join("events.jsonl");
    std::fs::write(&plain, &input).unwrap();
    let gz = dir.join("events.jsonl.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    encoder.write_all(&input).unwrap();
    encoder.finish().unwrap();

    let expected: Vec<Value> = std::fs::read_to_string(format!("{CART_CASE}/expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for source in [&plain, &gz] {
        let output = dir.join("changes.jsonl");
        let state = dir.join("state.jsonl");
        let out = segmentd(&[
            "replay",
            "-c",
            "config/segmentd.toml",
            "--input",
            source.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--dump-state",
            state.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(
                "9 events applied (0 late), 1 duplicates, 2 invalid, 7 segment changes, 4 timers fired, 2 customers"
            ),
            "{stderr}"
        );
        assert!(
            stderr.contains("invalid invalid_json: 1")
                && stderr.contains("invalid missing_customer_id: 1"),
            "{stderr}"
        );
        let changes: Vec<Value> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(changes.len(), expected.len());
        for (got, want) in changes.iter().zip(&expected) {
            for key in ["customer_id", "segment", "transition", "at", "seq"] {
                assert_eq!(got[key], want[key]);
            }
        }
        let customers: Vec<Value> = std::fs::read_to_string(&state)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(customers.len(), 2);
        assert_eq!(customers[0]["customer_id"], "c-10");
        assert_eq!(customers[0]["segments"], serde_json::json!([]));
        assert_eq!(customers[0]["state"]["customer"]["purchases"], 1);
        assert_eq!(customers[0]["state"]["customer"]["events"], 5);
        assert_eq!(customers[1]["segments"][0]["segment"], "abandoned_product");
        for key in ["customer", "cart", "session", "traits", "context"] {
            assert!(customers[1]["state"].get(key).is_some(), "state has {key}");
        }
    }
}

/// `replay --input -` reads stdin.
#[test]
fn replay_reads_stdin() {
    let mut child = Command::new(BIN)
        .args(["replay", "-c", "config/segmentd.toml", "--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(format!("{CART_CASE}/events.jsonl")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().count(), 7);
}

/// `generate` writes the requested number of parseable events, deterministically per seed.
#[test]
fn generate_writes_seeded_parseable_events() {
    let args = [
        "generate",
        "--count",
        "300",
        "--seed",
        "9",
        "--format",
        "mixed",
        "--start",
        "2026-01-01T00:00:00Z",
    ];
    let out = segmentd(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&[u8]> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 300);
    for line in &lines {
        segmentd::event::parse_event(line, 1 << 16).expect("every generated event parses");
    }
    let again = segmentd(&args);
    assert_eq!(out.stdout, again.stdout);
    let bad = segmentd(&["generate", "--invalid-share", "2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("--invalid-share"));
}

/// The demo runs with no set-up and shows segment changes read back from the output topic.
#[test]
fn demo_shows_segment_changes() {
    let out = segmentd(&["demo", "--duration", "12s", "--listen", "127.0.0.1:0"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("segmentd demo: embedded broker at"));
    // A change read back from the output topic: `c-205  entered runner  seq 1 (on …) facts …`.
    let shown = stdout
        .lines()
        .map(str::trim)
        .any(|l| l.starts_with("c-") && l.contains(" entered ") && l.contains(" seq "));
    assert!(shown, "no change from the output topic shown:\n{stdout}");
    assert!(stdout.contains("demo stopped."));
    // The last summary is taken before the service lets its customers go.
    let last = stdout
        .lines()
        .rfind(|l| l.contains("segmentd demo —"))
        .expect("a summary");
    let customers: u64 = last
        .rsplit(", ")
        .next()
        .and_then(|part| part.strip_suffix(" customers"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no customer count in {last:?}"));
    assert!(customers > 0, "{last}");
}

/// `run` stops on a real SIGTERM: it finishes, commits and exits 0. Periodic commits are
/// pushed out to an hour, so the committed offset afterwards is the shutdown's own commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_cleanly_on_sigterm() {
    let mock = common::embedded_broker(1, 1);
    let dir = temp_dir("run");
    let config = dir.join("segmentd.toml");
    let reference = std::fs::read_to_string("config/segmentd.toml").unwrap();
    std::fs::write(&config, reference.replace("0.0.0.0:9464", "127.0.0.1:0")).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "-c", config.to_str().unwrap()])
        .env("SEGMENTD_KAFKA__BROKERS", mock.bootstrap_servers())
        .env("SEGMENTD_KAFKA__INPUT_TOPICS", "[clickstream]")
        .env("SEGMENTD_KAFKA__COMMIT_INTERVAL", "1h")
        // Event time only: the purchase dated 1970 would otherwise lapse by the wall clock.
        .env("SEGMENTD_TIME__IDLE_TIMEOUT", "100000d")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let producer = common::producer(&mock.bootstrap_servers());
    common::produce(
        &producer,
        "clickstream",
        Some("c-1"),
        br#"{"type":"purchase","customer_id":"c-1","ts":0,"properties":{"revenue":600}}"#,
    )
    .await;

    // The purchase's change (entering `high_value`) on the output topic: it was processed.
    common::read_records(
        &mock.bootstrap_servers(),
        common::OUTPUT,
        1,
        Duration::from_secs(30),
    )
    .await;
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .unwrap();
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log)
        .await
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("SIGTERM received") && log.contains("Stopped."),
        "{log}"
    );
    let committed =
        common::committed_offset(&mock.bootstrap_servers(), "segmentd", common::INPUT, 0);
    assert_eq!(
        committed,
        Some(1),
        "the shutdown committed the processed message"
    );
}
