//! The end-to-end load harness: the real `segmentd run` binary against a Tansu broker on
//! loopback, both on this machine, fed by `segmentd::generate`'s traffic.
//!
//! Run: `cargo bench --bench e2e` (options after `--`, see `--help`). Phases:
//! 1. **Throughput**: `--events` generated events (a recorded history ending now) are
//!    written to the input topic first; then segmentd starts and drains them. Sustained
//!    throughput is the events applied between the first and the last metrics scrape
//!    that saw progress, over that time (start-up and group join excluded). CPU seconds
//!    of segmentd and of the broker over the same interval, and segmentd's resident
//!    memory at the end, are read from `/proc`.
//! 2. **Latency at a fixed rate**: with segmentd caught up, live events (generated
//!    beforehand, each with the event time it is sent at) are produced at `--rate` for
//!    `--live` (the producer batches for up to `--client-wait-ms`, 5 by default,
//!    librdkafka's default); a consumer reads the output topic (its fetches held as long).
//!    Latency is an output change's arrival at that consumer minus the moment its
//!    causing event was handed to the producer (one clock, one process), also split at
//!    the change's `emitted_at` (segmentd's clock, same machine): event to change made
//!    (input client, broker, segmentd's consumer and engine), and change made to arrival
//!    (segmentd's producer, broker, harness consumer); and by the quarter of the phase
//!    its event was sent in (Tansu's in-memory engine lists every batch a partition
//!    holds on each fetch, so its cost, and latency with it, grow through a phase),
//!    with segmentd's and the broker's CPU while sending. segmentd's own histogram
//!    `segmentd_event_to_emit_seconds` (from reading a message to the broker's
//!    acknowledgement of its last output), scraped before and after the phase, gives the
//!    part of the path inside segmentd and its producer, to the histogram's bucket bounds.
//!    Timer-caused changes report how long after the watermark passed their deadline they
//!    arrived (the watermark trails live event time by `time.allowed_lateness`).
//! 3. **Latency at saturation**: the same, offered at the throughput phase 1 measured.
//! 4. **Restore** (with `--restore-customers N`; `--restore-only` skips phases 1–3): N
//!    customers' state records (states of generated traffic under distinct ids, encoded
//!    as segmentd writes them) are written to a fresh changelog topic; a fresh instance
//!    starts on it. Reported: the time from its first `/readyz` answer "restoring" to
//!    "ready" (every partition restored, in parallel, through the broker), customers per
//!    second over it, and the broker's and segmentd's CPU meanwhile.
//!
//! 5. **The floor** (with `--relay`, instead of segmentd): a minimal relay — this harness
//!    run again as a process of its own — reads the input topic and, for a share of the
//!    events (`--relay-share`), writes a change-shaped record naming the event, through
//!    segmentd's own producer settings and the configuration's client properties. No
//!    rules, no state: what any processor on this broker and these clients pays at least.
//!    The history is preloaded as for segmentd (the broker holds the same batches), then
//!    the fixed-rate phase runs; there is no throughput or saturation phase.
//!
//! **Rounds and comparisons.** `--rounds N` runs all of it N times, each on a fresh broker,
//! and ends with each figure's median and spread over the rounds. `--against BINARY`
//! and/or `--against-config FILE` measure a second segmentd (another build, other
//! settings) in the same rounds, alternating with the first (each goes first in every
//! other round), and add the median of the rounds' ratios: on a shared, noisy machine a
//! comparison holds only when measured side by side. `--against-relay` makes the relay
//! (5.) the second: segmentd against the floor.
//!
//! Everything runs on one 2-core machine: broker, producer, consumer and segmentd share
//! it, as SPEC §6's end-to-end targets say. Results and commands: BENCHMARKS.md.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use segmentd::cli::generate::{EventClock, Pace, TopicSink, pump};
use segmentd::config::Config;
use segmentd::emit::producer::{create_producer, send_blocking};
use segmentd::generate::{Format, Generated, Generator, GeneratorConfig};
use segmentd::time::{format_timestamp, parse_timestamp, wall_clock_now};

/// Options of the harness.
#[derive(Debug, Parser)]
#[command(about = "segmentd's end-to-end load harness (Tansu on loopback)")]
struct Args {
    /// Events written before segmentd starts, for the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Offered rate of the fixed-rate latency phase, events per second.
    #[arg(long, default_value_t = 50_000)]
    rate: u32,
    /// Length of each live (latency) phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    live: Duration,
    /// Distinct customers in the traffic (activity is heavy-tailed over them).
    #[arg(long, default_value_t = 100_000)]
    customers: u32,
    /// Partitions of each input topic and of the output topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// segmentd's configuration (brokers, group and HTTP address are overridden).
    #[arg(long, default_value = "config/segmentd.toml")]
    config: PathBuf,
    /// How long the harness's own clients wait in the latency phases, in ms: its producer's
    /// `linger.ms` and its output consumer's `fetch.wait.max.ms` (segmentd's own are in
    /// `--config`).
    #[arg(long, default_value_t = 5)]
    client_wait_ms: u32,
    /// Skip the saturation latency phase.
    #[arg(long)]
    no_saturation: bool,
    /// Customers written to a fresh changelog for the restore phase (0: no restore phase).
    #[arg(long, default_value_t = 0)]
    restore_customers: u64,
    /// Only the restore phase.
    #[arg(long)]
    restore_only: bool,
    /// Measure the floor: the minimal relay in segmentd's place (phase 5 above), alone.
    #[arg(long, conflicts_with_all = ["against", "against_config"])]
    relay: bool,
    /// The share of events the relay writes a record for. segmentd's own share (changes
    /// per event offered) is printed by its fixed-rate phase; match it for a like-for-like
    /// output load.
    #[arg(long, default_value_t = 1.0)]
    relay_share: f64,
    /// Internal: run as the relay, against this broker (`--relay` starts it so).
    #[arg(long, hide = true)]
    relay_for: Option<String>,
    /// Where the broker's and segmentd's logs go.
    #[arg(long, default_value = "target/e2e")]
    logs: PathBuf,
    /// How many times to run it all, each time on a fresh broker; with more than one, a
    /// summary of each figure's median and spread follows.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// The segmentd binary measured (default: the one built with this harness).
    #[arg(long)]
    segmentd: Option<PathBuf>,
    /// A second segmentd binary, measured in the same rounds, alternating with the first.
    #[arg(long)]
    against: Option<PathBuf>,
    /// A configuration for the second run (the same topics; with `--against` or alone,
    /// then with the first binary).
    #[arg(long)]
    against_config: Option<PathBuf>,
    /// The relay (`--relay`, with `--relay-share`) as the second run: segmentd against
    /// the floor, in the same rounds.
    #[arg(long, conflicts_with_all = ["relay", "against", "against_config"])]
    against_relay: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[path = "../tests/common/process.rs"]
mod process;

use process::{Guard, free_port, spawn_tansu};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.logs)?;
    ensure!(
        (0.0..=1.0).contains(&args.relay_share),
        "--relay-share is a share of the events, from 0 to 1 (got {})",
        args.relay_share
    );
    let built = PathBuf::from(env!("CARGO_BIN_EXE_segmentd"));
    let first = Variant::new(
        "A",
        args.segmentd.clone().unwrap_or(built),
        args.config.clone(),
        args.relay,
    )?;
    if let Some(brokers) = &args.relay_for {
        return relay(brokers, &first.config, args.relay_share);
    }
    let second = match (&args.against, &args.against_config) {
        _ if args.against_relay => Some(Variant::new(
            "B",
            first.binary.clone(),
            first.config_path.clone(),
            true,
        )?),
        (None, None) => None,
        (binary, config) => Some(Variant::new(
            "B",
            binary.clone().unwrap_or_else(|| first.binary.clone()),
            config.clone().unwrap_or_else(|| first.config_path.clone()),
            false,
        )?),
    };
    if let Some(second) = &second {
        let (a, b) = (&first.config.kafka, &second.config.kafka);
        ensure!(
            (&a.input_topics, &a.output_topic, &a.dead_letter_topic)
                == (&b.input_topics, &b.output_topic, &b.dead_letter_topic),
            "--against-config must name the same topics as --config"
        );
    }
    let variants: Vec<&Variant> = std::iter::once(&first).chain(second.as_ref()).collect();
    let several = args.rounds > 1 || variants.len() > 1;
    let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds as usize {
        // Each goes first in every other round, so a machine that slows down or speeds up
        // through the run does not favour one.
        for turn in 0..variants.len() {
            let index = (turn + round) % variants.len();
            if several {
                println!(
                    "== round {}/{}, {}",
                    round + 1,
                    args.rounds,
                    variants[index]
                );
            }
            measured[index].push(run_round(&args, variants[index])?);
        }
    }
    if several {
        print_summary(&args, &variants, &measured);
    }
    Ok(())
}

/// What is measured: a segmentd (its binary and configuration), or the relay in its
/// place (with that configuration's clients).
struct Variant {
    label: &'static str,
    binary: PathBuf,
    config_path: PathBuf,
    config: Config,
    relay: bool,
}

impl Variant {
    fn new(
        label: &'static str,
        binary: PathBuf,
        config_path: PathBuf,
        relay: bool,
    ) -> anyhow::Result<Variant> {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let config = Config::from_toml_only(&text, &config_path.display().to_string())?;
        Ok(Variant {
            label,
            binary,
            config_path,
            config,
            relay,
        })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let process = if self.relay {
            "the relay".into()
        } else {
            self.binary.display().to_string()
        };
        write!(
            f,
            "{}: {process} with {}",
            self.label,
            self.config_path.display()
        )
    }
}

/// One round: a fresh broker with the topics, then the phases asked for.
fn run_round(args: &Args, variant: &Variant) -> anyhow::Result<Measured> {
    let config = &variant.config;
    let broker = Broker::start(&args.logs.join("tansu.log"))?;
    let mut topics: Vec<(&str, i32)> = config
        .kafka
        .input_topics
        .iter()
        .map(|t| (t.as_str(), args.partitions))
        .collect();
    topics.push((&config.kafka.output_topic, args.partitions));
    topics.push((&config.kafka.dead_letter_topic, 1));
    broker.create_topics(&topics, &[])?;

    println!(
        "machine: {} cores; events {}, customers {}, partitions {}, config {}{}",
        std::thread::available_parallelism().map_or(0, usize::from),
        args.events,
        args.customers,
        args.partitions,
        variant.config_path.display(),
        if variant.relay {
            format!(
                "; the relay in segmentd's place, share {}",
                args.relay_share
            )
        } else {
            String::new()
        }
    );

    let mut measured = Measured::default();
    if !args.restore_only {
        measured = phases_1_to_3(args, variant, &broker)?;
    }
    if args.restore_customers > 0 {
        restore_phase(args, variant, &broker)?;
    }
    Ok(measured)
}

/// What a round measured, for the summary of several.
#[derive(Clone, Default)]
struct Measured {
    /// Sustained throughput, events per second.
    throughput: Option<f64>,
    /// The fixed-rate latency phase.
    fixed: Option<FixedRate>,
}

/// The fixed-rate phase's headline figures.
#[derive(Clone, Copy)]
struct FixedRate {
    /// Event → change latency quantiles, ms.
    p50: f64,
    p99: f64,
    p999: f64,
    /// p99 of each half, split at the change's `emitted_at`, ms (if it has one).
    to_made_p99: Option<f64>,
    made_to_arrived_p99: Option<f64>,
    /// The process's CPU while the events were sent, cores.
    cores: f64,
}

/// Each figure's median and range over the rounds, per variant; with two, the median of
/// the rounds' ratios (second / first).
fn print_summary(args: &Args, variants: &[&Variant], measured: &[Vec<Measured>]) {
    type Figure = fn(&Measured) -> Option<f64>;
    let figures: [(&str, usize, Figure); 7] = [
        ("throughput, events/s", 0, |m| m.throughput),
        ("p50 at the fixed rate, ms", 1, |m| m.fixed.map(|f| f.p50)),
        ("p99 at the fixed rate, ms", 1, |m| m.fixed.map(|f| f.p99)),
        ("p99.9 at the fixed rate, ms", 1, |m| {
            m.fixed.map(|f| f.p999)
        }),
        ("  its event -> change made, p99, ms", 1, |m| {
            m.fixed.and_then(|f| f.to_made_p99)
        }),
        ("  its change made -> arrived, p99, ms", 1, |m| {
            m.fixed.and_then(|f| f.made_to_arrived_p99)
        }),
        ("CPU at the fixed rate, cores", 2, |m| {
            m.fixed.map(|f| f.cores)
        }),
    ];
    println!(
        "summary over {} round{} at {} events/s: median (min-max)",
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        args.rate
    );
    for (name, decimals, figure) in figures {
        let mut line = format!("  {name}:");
        for (variant, rounds) in variants.iter().zip(measured) {
            let values: Vec<f64> = rounds.iter().filter_map(figure).collect();
            if let (Some(median), Some(min), Some(max)) = (
                median(&values),
                values.iter().copied().reduce(f64::min),
                values.iter().copied().reduce(f64::max),
            ) {
                line += &format!(
                    " {} {median:.decimals$} ({min:.decimals$}-{max:.decimals$});",
                    variant.label
                );
            }
        }
        if let [first, second] = measured {
            let ratios: Vec<f64> = first
                .iter()
                .zip(second)
                .filter_map(|(a, b)| Some(figure(b)? / figure(a)?))
                .collect();
            if let Some(ratio) = median(&ratios) {
                line += &format!(" B/A {ratio:.3}");
            }
        }
        println!("{}", line.trim_end_matches(';'));
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[middle]),
        _ => Some((sorted[middle - 1] + sorted[middle]) / 2.0),
    }
}

/// Throughput, then latency at a fixed rate and at saturation.
fn phases_1_to_3(args: &Args, variant: &Variant, broker: &Broker) -> anyhow::Result<Measured> {
    let config = &variant.config;
    let input = config.kafka.input_topics[0].clone();
    // Phase 1: a recorded history, one event per millisecond, ending now.
    let started = Instant::now();
    let history = Pace {
        count: args.events,
        rate: 0,
        clock: EventClock::History {
            start: wall_clock_now() - args.events as i64,
            spacing: 1,
        },
    };
    let sink = TopicSink::new(&broker.address, &input)?;
    pump(
        generator(1, args.customers),
        &history,
        &AtomicBool::new(false),
        |m| sink.send(&m.key, &m.payload),
    )?;
    ensure!(sink.finish()? == 0, "the broker refused preloaded events");
    println!(
        "preloaded {} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );

    if variant.relay {
        let output = OutputReader::start(
            &broker.address,
            &config.kafka.output_topic,
            args.client_wait_ms,
        )?;
        let relay = Service::start_relay(args, variant, broker)?;
        relay.wait_until_relaying(broker, config, &output)?;
        let fixed = live_phase(broker, &relay, config, &output, 2, args, args.rate)?;
        fixed.print(&format!("at {} events/s", args.rate), 0);
        return Ok(Measured {
            throughput: None,
            fixed: fixed.figures(),
        });
    }
    let service = Service::start(args, variant, broker, "segmentd-e2e", &[])?;
    let drained = service.drain(args.events, broker)?;
    println!(
        "throughput: {:.0} events/s over {:.1} s ({} events); CPU segmentd {:.2} cores \
         ({:.2} µs per event), broker {:.2} cores; segmentd RSS {} MiB (peak {} MiB)",
        drained.events as f64 / drained.seconds,
        drained.seconds,
        drained.events,
        drained.segmentd_cpu / drained.seconds,
        drained.segmentd_cpu / drained.events as f64 * 1e6,
        drained.broker_cpu / drained.seconds,
        drained.rss_kib / 1024,
        drained.peak_kib / 1024,
    );

    let lateness = config.time.allowed_lateness.millis();
    let output = OutputReader::start(
        &broker.address,
        &config.kafka.output_topic,
        args.client_wait_ms,
    )?;
    let fixed = live_phase(broker, &service, config, &output, 2, args, args.rate)?;
    fixed.print(&format!("at {} events/s", args.rate), lateness);
    if !args.no_saturation {
        // Offered at the throughput just measured: the most it carries, not more (a rate
        // above it only grows a backlog, and the latency with it, without bound).
        let capacity = (drained.events as f64 / drained.seconds) as u32;
        let saturated = live_phase(broker, &service, config, &output, 3, args, capacity)?;
        saturated.print(&format!("at saturation ({capacity} events/s)"), lateness);
    }
    let (rss, peak) = memory_kib(service.child.0.id())?;
    println!(
        "segmentd RSS at the end {} MiB (peak {} MiB)",
        rss / 1024,
        peak / 1024
    );
    Ok(Measured {
        throughput: Some(drained.events as f64 / drained.seconds),
        fixed: fixed.figures(),
    })
}

/// Phase 4: a fresh instance restoring `--restore-customers` customers through the
/// broker.
fn restore_phase(args: &Args, variant: &Variant, broker: &Broker) -> anyhow::Result<()> {
    use segmentd::state::codec::{Snapshot, encode};
    let config = &variant.config;
    const TOPIC: &str = "segmentd-e2e-restore-changelog";
    broker.create_topics(
        &[(TOPIC, args.partitions)],
        &[("cleanup.policy", "compact")],
    )?;
    // Realistic states: those generated traffic leaves behind, under distinct ids.
    let engine = segmentd::engine::Engine::new(
        Arc::new(config.rule_set()?),
        segmentd::state::new_store(),
        config.time.session_gap.millis(),
    );
    let mut traffic = generator(7, 20_000);
    let mut changes = Vec::new();
    let start = wall_clock_now() - 200_000_000;
    for i in 0..200_000 {
        let message = traffic.next_at(start + i * 1_000);
        if let Ok(event) = segmentd::event::parse_event(&message.payload, 1 << 16) {
            engine.apply(&event, &mut changes);
            changes.clear();
        }
    }
    let mut states = Vec::new();
    engine
        .store()
        .for_each(|_, state| states.push(state.clone()));
    let fingerprint = engine.rules().fingerprint;
    let written = Instant::now();
    let sink = TopicSink::new(&broker.address, TOPIC)?;
    let mut bytes = 0;
    for i in 0..args.restore_customers as usize {
        let snapshot = Snapshot::new(fingerprint, Vec::new(), states[i % states.len()].clone());
        let value = encode(&snapshot);
        bytes += value.len();
        sink.send(&format!("customer-{i}"), &value)?;
    }
    ensure!(sink.finish()? == 0, "the broker refused state records");
    println!(
        "restore: wrote {} state records ({} bytes on average, {} distinct states) in {:.1} s",
        args.restore_customers,
        bytes / args.restore_customers as usize,
        states.len(),
        written.elapsed().as_secs_f64()
    );

    let service = Service::start(
        args,
        variant,
        broker,
        "segmentd-e2e-restore",
        &[("SEGMENTD_KAFKA__CHANGELOG_TOPIC", TOPIC)],
    )?;
    let pid = service.child.0.id();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut restoring: Option<(Instant, f64, f64)> = None;
    loop {
        ensure!(Instant::now() < deadline, "not ready within 15 min");
        match service.get("/readyz") {
            Some((200, _)) => break,
            Some((_, body)) if restoring.is_none() && body.contains("restoring") => {
                restoring = Some((
                    Instant::now(),
                    cpu_seconds(pid)?,
                    cpu_seconds(broker.child.0.id())?,
                ));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (since, cpu, broker_cpu) = restoring.context("never saw the restoring state")?;
    let seconds = since.elapsed().as_secs_f64();
    let (rss, _) = memory_kib(pid)?;
    println!(
        "restore: {} customers over {} partitions in {:.2} s = {:.0} customers/s (assignment to ready); CPU segmentd {:.2} cores, broker {:.2} cores; segmentd RSS {} MiB",
        args.restore_customers,
        args.partitions,
        seconds,
        args.restore_customers as f64 / seconds,
        (cpu_seconds(pid)? - cpu) / seconds,
        (cpu_seconds(broker.child.0.id())? - broker_cpu) / seconds,
        rss / 1024,
    );
    Ok(())
}

fn generator(seed: u64, customers: u32) -> Generator {
    Generator::new(GeneratorConfig {
        seed,
        customers,
        format: Format::Native,
        invalid_share: 0.0,
    })
}

/// What a live phase measured.
struct LivePhase {
    offered: u64,
    seconds: f64,
    /// Event → change latencies, microseconds, sorted.
    latencies: Vec<i64>,
    /// The same split at the change's `emitted_at`: from the event's hand-over to its
    /// change being made (the input's client and broker, segmentd's consumer and engine),
    /// microseconds, sorted; the change's timestamp has millisecond precision.
    to_emitted: Vec<i64>,
    /// ... and from the change being made to its arrival (segmentd's producer, the
    /// broker, the harness's consumer).
    emitted_to_arrived: Vec<i64>,
    /// Timer changes: arrival after the watermark passed the deadline, microseconds, sorted.
    timer_delays: Vec<i64>,
    /// Changes caused by events produced before the phase (not measured).
    unmatched: usize,
    /// Event → change latencies by the quarter of the phase their event was sent in,
    /// microseconds, each sorted: a latency that grows through the phase is a cost that
    /// grows with what the broker holds, not with the rate.
    by_quarter: [Vec<i64>; 4],
    /// What was measured: "segmentd" or "relay".
    processor: &'static str,
    /// CPU seconds of segmentd (or the relay) and of the broker while the phase's events
    /// were sent.
    segmentd_cpu: f64,
    broker_cpu: f64,
    /// segmentd's `segmentd_event_to_emit_seconds` over the phase: cumulative counts by
    /// bucket bound (seconds), the scrape after minus the scrape before.
    read_to_acknowledged: Vec<(f64, f64)>,
    /// Customer states segmentd wrote to its changelog over the phase (to the output
    /// going quiet).
    changelog_records: Option<u64>,
    /// Input events segmentd found already applied, over the phase.
    duplicates: Option<u64>,
}

/// The counters a live phase reads before and after: changelog records, duplicates.
const COUNTERS: [&str; 2] = [
    "segmentd_changelog_records_total",
    "segmentd_events_duplicate_total",
];

impl LivePhase {
    /// The headline figures, if any change arrived.
    fn figures(&self) -> Option<FixedRate> {
        let quantile = |sorted: &[i64], q| Some(percentile(sorted, q)? as f64 / 1000.0);
        Some(FixedRate {
            p50: quantile(&self.latencies, 0.50)?,
            p99: quantile(&self.latencies, 0.99)?,
            p999: quantile(&self.latencies, 0.999)?,
            to_made_p99: quantile(&self.to_emitted, 0.99),
            made_to_arrived_p99: quantile(&self.emitted_to_arrived, 0.99),
            cores: self.segmentd_cpu / self.seconds,
        })
    }

    fn print(&self, label: &str, lateness_ms: i64) {
        println!(
            "latency {label}: offered {:.0} events/s for {:.0} s; {} changes ({:.3} per event): \
             p50 {} p99 {} p99.9 {} max {} (ms); {} not matched to a phase event",
            self.offered as f64 / self.seconds,
            self.seconds,
            self.latencies.len(),
            self.latencies.len() as f64 / self.offered.max(1) as f64,
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            ms(percentile(&self.latencies, 0.999)),
            ms(self.latencies.last().copied()),
            self.unmatched,
        );
        println!(
            "  split at emitted_at: event -> change made p50 {} p99 {}; change made -> \
             arrived p50 {} p99 {} (ms)",
            ms(percentile(&self.to_emitted, 0.50)),
            ms(percentile(&self.to_emitted, 0.99)),
            ms(percentile(&self.emitted_to_arrived, 0.50)),
            ms(percentile(&self.emitted_to_arrived, 0.99)),
        );
        if let (Some(records), Some(duplicates)) = (self.changelog_records, self.duplicates) {
            println!(
                "  changelog: {records} customer states written ({:.3} per event offered); \
                 {duplicates} events found already applied",
                records as f64 / self.offered.max(1) as f64
            );
        }
        if !self.read_to_acknowledged.is_empty() {
            println!(
                "  inside segmentd, read -> outputs acknowledged (its histogram, to bucket \
                 bounds): p50 <= {} p99 <= {} (ms)",
                bucket_bound_ms(&self.read_to_acknowledged, 0.50),
                bucket_bound_ms(&self.read_to_acknowledged, 0.99),
            );
        }
        let quarters: Vec<String> = self
            .by_quarter
            .iter()
            .map(|q| format!("{}/{}", ms(percentile(q, 0.50)), ms(percentile(q, 0.99))))
            .collect();
        println!(
            "  by quarter of the phase, p50/p99 (ms): {}; CPU {} {:.2} cores, broker {:.2} \
             cores",
            quarters.join(" "),
            self.processor,
            self.segmentd_cpu / self.seconds,
            self.broker_cpu / self.seconds,
        );
        println!(
            "timers {label}: {} fired; after the watermark passed the deadline \
             (= deadline + {lateness_ms} ms): p50 {} p99 {} max {} (ms)",
            self.timer_delays.len(),
            ms(percentile(&self.timer_delays, 0.50)),
            ms(percentile(&self.timer_delays, 0.99)),
            ms(self.timer_delays.last().copied()),
        );
    }
}

/// The smallest bucket bound (ms) of cumulative `buckets` holding quantile `q` of the
/// observations.
fn bucket_bound_ms(buckets: &[(f64, f64)], q: f64) -> String {
    let total = buckets.last().map_or(0.0, |&(_, count)| count);
    buckets
        .iter()
        .find(|&&(_, count)| total > 0.0 && count >= q * total)
        .map_or("-".to_owned(), |&(bound, _)| {
            if bound.is_finite() {
                format!("{}", bound * 1000.0)
            } else {
                "inf".to_owned()
            }
        })
}

fn ms(micros: Option<i64>) -> String {
    micros.map_or("-".to_owned(), |us| format!("{:.2}", us as f64 / 1000.0))
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Produces live events at `rate` for `args.live` to the first input topic, then waits
/// for the output to go quiet and matches changes to their events. A timer's watermark
/// passes its deadline `time.allowed_lateness` after it (in live event time). Measures
/// segmentd's and the broker's CPU while sending.
fn live_phase(
    broker: &Broker,
    service: &Service,
    config: &Config,
    output: &OutputReader,
    seed: u64,
    args: &Args,
    rate: u32,
) -> anyhow::Result<LivePhase> {
    let (input, lateness_ms) = (
        &config.kafka.input_topics[0],
        config.time.allowed_lateness.millis(),
    );
    output.take();
    // Generated before the clock starts, each stamped with the instant it is due to be
    // sent, so that generating does not compete with segmentd for the CPU.
    let planned_rate = u64::from(rate.max(1));
    let count = (args.live.as_secs_f64() * planned_rate as f64) as u64;
    let lead = Duration::from_secs(2) + Duration::from_secs_f64(count as f64 / 200_000.0);
    let t0 = wall_clock_now() + lead.as_millis() as i64;
    let mut generator = generator(seed, args.customers);
    let events: Vec<Generated> = (0..count)
        .map(|i| generator.next_at(t0 + (i * 1000 / planned_rate) as i64))
        .collect();
    let sink = TopicSink::with_linger(&broker.address, input, args.client_wait_ms)?;
    while wall_clock_now() < t0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let phase_start = wall_clock_now();
    let histogram_before = service.histogram("segmentd_event_to_emit_seconds")?;
    let counters_before = COUNTERS.map(|name| service.counter(name));
    let (first_sent, pids) = (now_micros(), [service.child.0.id(), broker.child.0.id()]);
    let cpu_before = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    let started = Instant::now();
    let mut sent_at = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / planned_rate as f64);
        // Sleeping only when a millisecond ahead keeps the pacing cheap.
        if let Some(ahead) = due.checked_sub(started.elapsed())
            && ahead >= Duration::from_millis(1)
        {
            std::thread::sleep(ahead);
        }
        sent_at.push(now_micros());
        sink.send(&event.key, &event.payload)?;
    }
    let offered = events.len() as u64;
    let sent: HashMap<&str, i64> = events
        .iter()
        .zip(sent_at)
        .filter_map(|(event, at)| Some((event_id(&event.payload)?, at)))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let segmentd_cpu = cpu_seconds(pids[0])? - cpu_before[0];
    let broker_cpu = cpu_seconds(pids[1])? - cpu_before[1];
    ensure!(sink.finish()? == 0, "the broker refused live events");
    output.wait_quiet(Duration::from_secs(3), Duration::from_secs(120));
    let [changelog_records, duplicates] = [0, 1].map(|i| {
        counters_before[i]
            .zip(service.counter(COUNTERS[i]))
            .map(|(before, after)| after - before)
    });
    let read_to_acknowledged: Vec<(f64, f64)> = service
        .histogram("segmentd_event_to_emit_seconds")?
        .into_iter()
        .zip(histogram_before)
        .map(|((bound, after), (_, before))| (bound, after - before))
        .collect();

    let mut latencies = Vec::new();
    let mut to_emitted = Vec::new();
    let mut emitted_to_arrived = Vec::new();
    let mut timer_delays = Vec::new();
    let mut unmatched = 0;
    let mut by_quarter: [Vec<i64>; 4] = Default::default();
    let quarter_micros = (seconds * 250_000.0).max(1.0) as i64;
    for change in output.take() {
        match change.cause {
            Cause::Event(id) => match sent.get(&*id) {
                Some(at) => {
                    latencies.push(change.arrived - at);
                    let quarter = ((at - first_sent) / quarter_micros).clamp(0, 3) as usize;
                    by_quarter[quarter].push(change.arrived - at);
                    if let Some(emitted) = change.emitted {
                        to_emitted.push(emitted - at);
                        emitted_to_arrived.push(change.arrived - emitted);
                    }
                }
                None => unmatched += 1,
            },
            Cause::Timer(deadline) if deadline >= phase_start => {
                timer_delays.push(change.arrived - (deadline + lateness_ms) * 1000);
            }
            Cause::Timer(_) | Cause::Other => {}
        }
    }
    latencies.sort_unstable();
    to_emitted.sort_unstable();
    emitted_to_arrived.sort_unstable();
    timer_delays.sort_unstable();
    by_quarter.iter_mut().for_each(|q| q.sort_unstable());
    Ok(LivePhase {
        offered,
        seconds,
        latencies,
        to_emitted,
        emitted_to_arrived,
        timer_delays,
        unmatched,
        by_quarter,
        processor: if service.http.is_some() {
            "segmentd"
        } else {
            "relay"
        },
        segmentd_cpu,
        broker_cpu,
        read_to_acknowledged,
        changelog_records,
        duplicates,
    })
}

/// The `event_id` of a generated native event, found without parsing the whole event
/// (the harness's producer must not compete with segmentd for the CPU more than needed).
fn event_id(payload: &[u8]) -> Option<&str> {
    const FIELD: &[u8] = b"\"event_id\":\"";
    let start = payload.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let length = payload[start..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&payload[start..start + length]).ok()
}

/// Assigns every partition of `topic` to `consumer`, from the partition's end.
fn read_from_end(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<()> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::End)?;
    }
    Ok(consumer.assign(&assignment)?)
}

/// The key of the harness's probes, which the relay writes a record for whatever its share.
const PROBE_KEY: &str = "e2e-relay-probe";

/// The relay (`--relay-for`): reads every partition of the first input topic from its
/// end and writes, for `share` of the events (and for every probe), a record as the
/// harness reads a change — the event's id as its cause, the moment the relay read it as
/// `emitted_at` — keyed as the event, through segmentd's producer settings, with the
/// configuration's client properties on both clients. Runs until killed.
fn relay(brokers: &str, config: &Config, share: f64) -> anyhow::Result<()> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", "e2e-relay")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (key, value) in &config.kafka.consumer {
        client.set(key, value);
    }
    let consumer: BaseConsumer = client.create()?;
    read_from_end(&consumer, &config.kafka.input_topics[0])?;
    let producer = create_producer(brokers, &config.kafka.producer, DefaultProducerContext)?;
    // Whole records owed so far: `share` more for each event read.
    let mut owed = 0.0;
    // The next offset of each partition, and how many records came again below it:
    // through Tansu, a consumer assigned at the end is sometimes handed the first batches
    // twice; they are relayed once, as a processor that tracks offsets would.
    let (mut next_offsets, mut again) = (HashMap::new(), 0u64);
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let next = next_offsets.entry(message.partition()).or_insert(0);
        if message.offset() < *next {
            again += 1;
            if again.is_power_of_two() {
                eprintln!(
                    "{again} records read again (partition {}, offset {})",
                    message.partition(),
                    message.offset()
                );
            }
            continue;
        }
        *next = message.offset() + 1;
        let key = message.key().unwrap_or_default();
        if key != PROBE_KEY.as_bytes() {
            owed += share;
            if owed < 1.0 {
                continue;
            }
            owed -= 1.0;
        }
        let Some(id) = message.payload().and_then(event_id) else {
            continue;
        };
        let payload = format!(
            r#"{{"cause":{{"kind":"event","event_id":"{id}"}},"emitted_at":"{}"}}"#,
            format_timestamp(wall_clock_now())
        );
        let record = BaseRecord::to(&config.kafka.output_topic)
            .key(key)
            .payload(&payload);
        send_blocking(&producer, record)?;
    }
}

/// Why a change was made, as far as the harness cares.
enum Cause {
    Event(Box<str>),
    /// A timer, with its deadline (the change's `at`), epoch milliseconds.
    Timer(i64),
    Other,
}

/// One change read from the output topic.
struct Arrived {
    arrived: i64,
    /// The change's `emitted_at` (segmentd's clock when it made the change; milliseconds,
    /// as microseconds), if readable.
    emitted: Option<i64>,
    cause: Cause,
}

/// A consumer of the output topic on its own thread, from its end at start-up.
struct OutputReader {
    received: Arc<Mutex<Vec<Arrived>>>,
    last_arrival: Arc<Mutex<Instant>>,
}

impl OutputReader {
    fn start(brokers: &str, topic: &str, wait_ms: u32) -> anyhow::Result<OutputReader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "e2e-harness")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", wait_ms.to_string())
            .create()?;
        read_from_end(&consumer, topic)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let last_arrival = Arc::new(Mutex::new(Instant::now()));
        let (into, last) = (received.clone(), last_arrival.clone());
        std::thread::spawn(move || {
            loop {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let arrived = now_micros();
                let change = message
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok());
                let emitted = change.as_ref().and_then(|change| {
                    Some(parse_timestamp(change["emitted_at"].as_str()?)? * 1000)
                });
                let cause = change.map_or(Cause::Other, |change| {
                    match change["cause"]["kind"].as_str() {
                        Some("event") => change["cause"]["event_id"]
                            .as_str()
                            .map_or(Cause::Other, |id| Cause::Event(id.into())),
                        Some("timer") => change["at"]
                            .as_str()
                            .and_then(parse_timestamp)
                            .map_or(Cause::Other, Cause::Timer),
                        _ => Cause::Other,
                    }
                });
                into.lock().unwrap().push(Arrived {
                    arrived,
                    emitted,
                    cause,
                });
                *last.lock().unwrap() = Instant::now();
            }
        });
        Ok(OutputReader {
            received,
            last_arrival,
        })
    }

    /// Everything received since the last call.
    fn take(&self) -> Vec<Arrived> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }

    /// Waits until nothing has arrived for `quiet` (at most `limit`).
    fn wait_quiet(&self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && self.last_arrival.lock().unwrap().elapsed() < quiet {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Tansu on a free loopback port, in-memory storage.
struct Broker {
    child: Guard,
    address: String,
}

impl Broker {
    fn start(log: &Path) -> anyhow::Result<Broker> {
        let (child, address) = spawn_tansu(log);
        let broker = Broker { child, address };
        let admin = broker.admin()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin
            .inner()
            .fetch_metadata(None, Duration::from_millis(500))
            .is_err()
        {
            ensure!(
                Instant::now() < deadline,
                "Tansu did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(broker)
    }

    fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .create()?)
    }

    /// Creates `topics` (name, partitions), each with the topic `settings`.
    fn create_topics(
        &self,
        topics: &[(&str, i32)],
        settings: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, n)| {
                settings.iter().fold(
                    NewTopic::new(name, *n, TopicReplication::Fixed(1)),
                    |topic, (key, value)| topic.set(key, value),
                )
            })
            .collect();
        let runtime = tokio::runtime::Runtime::new()?;
        let admin = self.admin()?;
        for result in runtime.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
            if let Err((topic, err)) = result {
                bail!("cannot create {topic}: {err}");
            }
        }
        Ok(())
    }
}

/// The process under test: the `segmentd run` binary, or the relay (`--relay`).
struct Service {
    child: Guard,
    /// segmentd's HTTP address; the relay has none.
    http: Option<String>,
}

/// What the throughput phase measured.
struct Drained {
    events: u64,
    seconds: f64,
    segmentd_cpu: f64,
    broker_cpu: f64,
    rss_kib: u64,
    peak_kib: u64,
}

impl Service {
    /// Starts `variant`'s `segmentd run` in consumer group `group`, with `env` overriding
    /// config keys; its log goes to `{group}.log`.
    fn start(
        args: &Args,
        variant: &Variant,
        broker: &Broker,
        group: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let http = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(args.logs.join(format!("{group}.log")))?;
        let child = Command::new(&variant.binary)
            .arg("run")
            .arg("--config")
            .arg(&variant.config_path)
            .env("SEGMENTD_KAFKA__BROKERS", &broker.address)
            .env("SEGMENTD_KAFKA__GROUP_ID", group)
            .env("SEGMENTD_HTTP__LISTEN", &http)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", variant.binary.display()))?;
        Ok(Service {
            child: Guard(child),
            http: Some(http),
        })
    }

    /// Starts the relay: this harness again, with `--relay-for`; its log goes to
    /// `relay.log`.
    fn start_relay(args: &Args, variant: &Variant, broker: &Broker) -> anyhow::Result<Service> {
        let log = std::fs::File::create(args.logs.join("relay.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--relay-for")
            .arg(&broker.address)
            .arg("--relay-share")
            .arg(args.relay_share.to_string())
            .arg("--config")
            .arg(&variant.config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the relay")?;
        Ok(Service {
            child: Guard(child),
            http: None,
        })
    }

    /// Writes probes to the input topic until the relay's record of one arrives at
    /// `output` (the relay then reads its partitions from their end), for at most 60 s;
    /// then lets the output go quiet and forgets what arrived.
    fn wait_until_relaying(
        &self,
        broker: &Broker,
        config: &Config,
        output: &OutputReader,
    ) -> anyhow::Result<()> {
        let sink = TopicSink::with_linger(&broker.address, &config.kafka.input_topics[0], 0)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for probe in 0.. {
            ensure!(
                Instant::now() < deadline,
                "the relay wrote nothing within 60 s; see relay.log"
            );
            sink.send(
                PROBE_KEY,
                format!(r#"{{"event_id":"probe-{probe}"}}"#).as_bytes(),
            )?;
            std::thread::sleep(Duration::from_millis(200));
            if !output.take().is_empty() {
                break;
            }
        }
        ensure!(sink.finish()? == 0, "the broker refused a probe");
        output.wait_quiet(Duration::from_millis(500), Duration::from_secs(10));
        output.take();
        Ok(())
    }

    /// Scrapes `/metrics` until `total` events are applied; measures from the first
    /// scrape that saw events to the scrape that saw the last.
    fn drain(&self, total: u64, broker: &Broker) -> anyhow::Result<Drained> {
        let pid = self.child.0.id();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first: Option<(Instant, u64, f64, f64)> = None;
        let mut last_progress = Instant::now();
        let mut last_count = 0;
        loop {
            ensure!(
                Instant::now() < deadline,
                "segmentd did not drain in 10 min"
            );
            ensure!(
                last_progress.elapsed() < Duration::from_secs(120),
                "segmentd made no progress for 2 min (at {last_count} events); see its log"
            );
            let count = self.events_applied().unwrap_or(0);
            let now = Instant::now();
            if count > last_count {
                last_count = count;
                last_progress = now;
            }
            if count > 0 && first.is_none() {
                first = Some((
                    now,
                    count,
                    cpu_seconds(pid)?,
                    cpu_seconds(broker.child.0.id())?,
                ));
            }
            if count >= total
                && let Some((at, counted, cpu, broker_cpu)) = first
            {
                let (rss_kib, peak_kib) = memory_kib(pid)?;
                return Ok(Drained {
                    events: count - counted,
                    seconds: now.duration_since(at).as_secs_f64(),
                    segmentd_cpu: cpu_seconds(pid)? - cpu,
                    broker_cpu: cpu_seconds(broker.child.0.id())? - broker_cpu,
                    rss_kib,
                    peak_kib,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path`: the status code and the whole response (headers and body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(self.http.as_deref()?).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        Some((status, response))
    }

    /// The cumulative buckets of histogram `name` in `/metrics`: (bound in seconds,
    /// count), in the exposition's order (ascending, `+Inf` last); none for the relay.
    fn histogram(&self, name: &str) -> anyhow::Result<Vec<(f64, f64)>> {
        if self.http.is_none() {
            return Ok(Vec::new());
        }
        let (_, body) = self.get("/metrics").context("no /metrics answer")?;
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets: Vec<(f64, f64)> = body
            .lines()
            .filter_map(|line| {
                let (bound, rest) = line.strip_prefix(&prefix)?.split_once('"')?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, rest.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        ensure!(!buckets.is_empty(), "no {name} in /metrics");
        Ok(buckets)
    }

    /// The sum of `segmentd_events_total` over its labels.
    fn events_applied(&self) -> Option<u64> {
        self.counter("segmentd_events_total")
    }

    /// The sum of counter `name` over its labels (`None` without an answer, as for the
    /// relay).
    fn counter(&self, name: &str) -> Option<u64> {
        let (_, body) = self.get("/metrics")?;
        Some(
            body.lines()
                .filter(|line| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }
}

/// User + system CPU seconds a process has used (`/proc/PID/stat`, 100 ticks a second).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("unreadable /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Resident and peak resident memory of a process, KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
