//! Golden files: each folder of `tests/golden/` holds `events.jsonl` (input, either
//! format), optionally `rules.toml` (default: the reference `config/segmentd.toml`),
//! optionally `until` (an RFC 3339 instant time advances to after the last event, as
//! `replay --until` does; default the latest event time), and `expected.jsonl`: the exact segment changes, in order. Each expected line lists the
//! fields it pins (`customer_id`, `segment`, `transition`, `at`, `seq`, `cause`, and
//! `facts` when given); the run must produce exactly as many changes, each matching.
//! The folder's README says what the case shows.

use std::path::Path;
use std::sync::Arc;

use segmentd::config::Config;
use segmentd::engine::Engine;
use segmentd::event::parse_event;
use segmentd::state::new_store;
use segmentd::time::parse_timestamp;
use segmentd::time::partition::PartitionTime;
use serde_json::Value;

fn run_case(dir: &Path) -> Result<(), String> {
    let rules_path = dir.join("rules.toml");
    let rules_path = if rules_path.exists() {
        rules_path
    } else {
        Path::new("config/segmentd.toml").to_path_buf()
    };
    let text = std::fs::read_to_string(&rules_path).map_err(|e| e.to_string())?;
    let config = Config::from_toml_only(&text, &rules_path.display().to_string())
        .map_err(|e| e.to_string())?;
    let engine = Engine::new(
        Arc::new(config.rule_set().map_err(|e| e.to_string())?),
        new_store(),
        config.time.session_gap.millis(),
    );

    let mut actual = Vec::new();
    let mut changes = Vec::new();
    let mut time = PartitionTime::new(config.time.replay(), 0);
    let mut latest = i64::MIN;
    let events = std::fs::read_to_string(dir.join("events.jsonl")).map_err(|e| e.to_string())?;
    for line in events.lines().filter(|l| !l.trim().is_empty()) {
        let event = parse_event(line.as_bytes(), config.limits.max_event_bytes)
            .map_err(|e| format!("{e}: {line}"))?;
        latest = latest.max(event.ts);
        time.take(&engine, event, (), 0, &mut changes, &mut Vec::new());
    }
    let until = match std::fs::read_to_string(dir.join("until")) {
        Ok(text) => parse_timestamp(text.trim()).ok_or(format!("bad until: {text}"))?,
        Err(_) => latest,
    };
    time.finish(&engine, until, &mut changes, &mut Vec::new());
    actual.extend(changes.iter().map(|c| c.to_json(0)));
    let expected: Vec<Value> = std::fs::read_to_string(dir.join("expected.jsonl"))
        .map_err(|e| e.to_string())?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("bad expected line {l}: {e}")))
        .collect::<Result<_, _>>()?;

    let shown = |changes: &[Value]| {
        changes
            .iter()
            .map(|c| {
                format!(
                    "  {} {} {} {} seq {} {}",
                    c["customer_id"], c["segment"], c["transition"], c["at"], c["seq"], c["facts"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if actual.len() != expected.len() {
        return Err(format!(
            "expected {} changes, got {}:\n{}\nexpected:\n{}",
            expected.len(),
            actual.len(),
            shown(&actual),
            shown(&expected)
        ));
    }
    for (i, (want, got)) in expected.iter().zip(&actual).enumerate() {
        for (key, value) in want
            .as_object()
            .ok_or("an expected line is not an object")?
        {
            if &got[key] != value {
                return Err(format!(
                    "change {}: `{key}` is {} but {value} was expected\nactual:\n{}",
                    i + 1,
                    got[key],
                    shown(&actual)
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn golden_files_produce_exactly_their_expected_changes() {
    let mut cases: Vec<_> = std::fs::read_dir("tests/golden")
        .expect("tests/golden exists")
        .map(|entry| entry.expect("readable").path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 4, "the golden cases are missing");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|dir| {
            run_case(dir)
                .err()
                .map(|e| format!("{}: {e}", dir.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
