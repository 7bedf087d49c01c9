//! `segmentd replay`: the engine over a recorded file, in event time — for trying a rule
//! change on real traffic before it goes live.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::config::Config;
use crate::emit::change::SegmentChange;
use crate::engine::{Engine, Outcome};
use crate::event::parse_event;
use crate::state::new_store;
use crate::time::partition::{PartitionTime, Released};
use crate::time::{Millis, parse_timestamp, wall_clock_now};

/// Arguments of `segmentd replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The config file (its segments are replayed).
    #[arg(short, long)]
    config: PathBuf,
    /// Events, one JSON object per line; `.gz` (or gzip content) is decompressed; `-` reads
    /// stdin.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the segment changes, one JSON object per line (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write every customer's final segments and state here, one JSON object per line.
    #[arg(long)]
    dump_state: Option<PathBuf>,
    /// After the last event, advance time to this instant (RFC 3339) so that the timers
    /// due by then fire (default: the latest event time).
    #[arg(long, value_parser = parse_until)]
    until: Option<Millis>,
}

fn parse_until(text: &str) -> Result<Millis, String> {
    parse_timestamp(text).ok_or_else(|| {
        format!("`{text}` is not a timestamp; use RFC 3339, e.g. 2026-11-23T10:51:14Z")
    })
}

/// Totals of a replay, printed at the end.
#[derive(Default)]
struct Totals {
    lines: u64,
    events: u64,
    duplicates: u64,
    changes: u64,
    timers_fired: u64,
    late: u64,
    invalid: BTreeMap<&'static str, u64>,
}

impl Totals {
    /// Counts the events the engine applied (or recognised as replays).
    fn count(&mut self, released: &[Released<()>]) {
        for event in released {
            match event.outcome {
                Outcome::Duplicate => self.duplicates += 1,
                Outcome::Applied { .. } => self.events += 1,
            }
        }
    }
}

/// How many rejected lines are described individually before only counting.
const SHOWN_REJECTIONS: u64 = 5;

pub fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let rules = Arc::new(config.rule_set()?);
    let engine = Engine::new(rules, new_store(), config.time.session_gap.millis());
    // One time line: the recorded events, in file order, advance the watermark.
    let mut time = PartitionTime::new(config.time.replay(), 0);
    let mut latest = Millis::MIN;
    let mut released = Vec::new();
    let (input, size) = open_input(&args.input)?;
    let progress = progress_bar(size);
    let mut reader = BufReader::with_capacity(1 << 16, progress.wrap_read(input));
    let mut output: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };

    let started = Instant::now();
    let mut totals = Totals::default();
    let mut line = Vec::new();
    let mut changes = Vec::new();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {}", args.input.display()))?
            == 0
        {
            break;
        }
        totals.lines += 1;
        let payload = line.trim_ascii();
        if payload.is_empty() {
            continue;
        }
        match parse_event(payload, config.limits.max_event_bytes) {
            Err(err) => {
                let count = totals.invalid.entry(err.reason.as_str()).or_default();
                *count += 1;
                if totals.invalid.values().sum::<u64>() <= SHOWN_REJECTIONS {
                    progress.suspend(|| eprintln!("line {}: rejected: {err}", totals.lines));
                }
            }
            Ok(event) => {
                changes.clear();
                released.clear();
                latest = latest.max(event.ts);
                let step = time.take(&engine, event, (), 0, &mut changes, &mut released);
                totals.late += u64::from(step.late);
                totals.timers_fired += step.timers_fired;
                totals.count(&released);
                write_changes(&mut output, &changes, &mut totals)?;
            }
        }
    }
    changes.clear();
    released.clear();
    let until = args.until.unwrap_or(latest);
    totals.timers_fired += time.finish(&engine, until, &mut changes, &mut released);
    totals.count(&released);
    write_changes(&mut output, &changes, &mut totals)?;
    output.flush()?;
    progress.finish_and_clear();
    if let Some(path) = &args.dump_state {
        dump_state(&engine, path)?;
    }
    report(&totals, started, engine.store().len());
    Ok(())
}

/// Writes changes as JSON lines, stamped with the wall-clock time of writing.
fn write_changes(
    output: &mut dyn Write,
    changes: &[SegmentChange],
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let emitted_at = wall_clock_now();
    for change in changes {
        serde_json::to_writer(&mut *output, &change.record(emitted_at))?;
        output.write_all(b"\n")?;
    }
    totals.changes += changes.len() as u64;
    Ok(())
}

/// Opens the input, decompressing gzip (recognised by its magic bytes, so it works on
/// stdin too). Returns the reader and the compressed size when known.
fn open_input(path: &PathBuf) -> anyhow::Result<(Box<dyn Read>, Option<u64>)> {
    let (raw, size): (Box<dyn Read>, Option<u64>) = if path.as_os_str() == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata().ok().map(|m| m.len());
        (Box::new(file), size)
    };
    let mut buffered = BufReader::new(raw);
    let is_gzip = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    if is_gzip {
        Ok((
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            size,
        ))
    } else {
        Ok((Box::new(buffered), size))
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
fn progress_bar(size: Option<u64>) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    match size {
        Some(size) => ProgressBar::new(size).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec}")
                .expect("a valid template"),
        ),
    }
}

/// Writes one JSON object per customer, sorted by id so dumps can be compared.
fn dump_state(engine: &Engine, path: &PathBuf) -> anyhow::Result<()> {
    let mut customers: Vec<(Box<str>, Value)> = Vec::with_capacity(engine.store().len());
    engine.store().for_each(|id, state| {
        customers.push((id.into(), engine.customer_json(id, state)));
    });
    customers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = BufWriter::new(
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for (_, customer) in customers {
        serde_json::to_writer(&mut out, &customer)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn report(totals: &Totals, started: Instant, customers: usize) {
    let seconds = started.elapsed().as_secs_f64();
    let invalid: u64 = totals.invalid.values().sum();
    eprintln!(
        "replayed {} lines: {} events applied ({} late), {} duplicates, {} invalid, {} segment changes, {} timers fired, {} customers in {:.2}s ({:.0} events/s)",
        totals.lines,
        totals.events,
        totals.late,
        totals.duplicates,
        invalid,
        totals.changes,
        totals.timers_fired,
        customers,
        seconds,
        totals.events as f64 / seconds.max(1e-9)
    );
    for (reason, count) in &totals.invalid {
        eprintln!("  invalid {reason}: {count}");
    }
}
