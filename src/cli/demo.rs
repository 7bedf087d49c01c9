//! `segmentd demo`: everything on one machine with no set-up — an embedded
//! Kafka-protocol broker (librdkafka's mock cluster on a real loopback port), generated
//! live traffic, the service with the demo rules, a live summary on the terminal and the
//! HTTP endpoints.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;

use super::generate::{EventClock, Pace, TopicSink, pump};
use crate::config::Config;
use crate::event::InvalidReason;
use crate::generate::{Format, Generator, GeneratorConfig};
use crate::ingest::Started;
use crate::time::{HumanDuration, WallClock};

/// The demo's rules and settings, embedded so the demo needs no files.
const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");
/// The input topic the demo generates to.
const INPUT_TOPIC: &str = "clickstream";

/// Arguments of `segmentd demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<HumanDuration>,
    /// Generated events per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Simulated customers.
    #[arg(long, default_value_t = 2_000)]
    customers: u32,
    /// HTTP address (default: the demo config's, 127.0.0.1:9464).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(run_demo(args))
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("cannot start the embedded broker")?;
    let mut config = Config::from_toml(DEMO_CONFIG, "the embedded demo config")?;
    config.kafka.brokers = mock.bootstrap_servers();
    config.kafka.input_topics = vec![INPUT_TOPIC.into()];
    if let Some(listen) = args.listen {
        config.http.listen = listen;
    }
    for (topic, partitions) in [
        (INPUT_TOPIC, 4),
        (config.kafka.output_topic.as_str(), 4),
        (config.kafka.dead_letter_topic.as_str(), 1),
        (config.kafka.changelog_topic.as_str(), 4),
    ] {
        mock.create_topic(topic, partitions, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    let rules = config.rule_set()?;
    println!(
        "segmentd demo: embedded broker at {}, {} segments",
        config.kafka.brokers,
        rules.segments.len()
    );

    let service = crate::ingest::spawn(config.clone(), rules, WallClock::system()).await?;
    let started = service.started.clone();
    let http_addr = started.http_addr;
    println!("HTTP: http://{http_addr}/metrics  /segments  /customers/c-0  /healthz  /readyz");

    let stop_generator = Arc::new(AtomicBool::new(false));
    let generator = {
        let stop = stop_generator.clone();
        let brokers = config.kafka.brokers.clone();
        let pace = Pace {
            count: 0,
            rate: args.rate,
            clock: EventClock::Live,
        };
        let generator = Generator::new(GeneratorConfig {
            seed: 42,
            customers: args.customers,
            format: Format::Mixed,
            invalid_share: 0.002,
        });
        std::thread::spawn(move || -> anyhow::Result<()> {
            let sink = TopicSink::new(&brokers, INPUT_TOPIC)?;
            pump(generator, &pace, &stop, |m| sink.send(&m.key, &m.payload))?;
            sink.finish()?;
            Ok(())
        })
    };
    let tail = tail_output(&config.kafka.brokers, &config.kafka.output_topic)?;

    let deadline = args
        .duration
        .map(|d| tokio::time::Instant::now() + d.as_std());
    let mut summary = Summary::new(std::io::stdout().is_terminal());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let interrupted = crate::ingest::shutdown_signal();
    tokio::pin!(interrupted);
    let mut recent = Vec::new();
    loop {
        tokio::select! {
            () = &mut interrupted => break,
            () = sleep_until(deadline) => break,
            message = tail.recv() => {
                if let Some(line) = message.ok().and_then(|m| m.payload().and_then(describe_change)) {
                    recent.push(line);
                    let excess = recent.len().saturating_sub(8);
                    recent.drain(..excess);
                }
            }
            _ = tick.tick() => summary.print(&started, &recent),
        }
    }
    stop_generator.store(true, Ordering::Relaxed);
    let generated = tokio::task::spawn_blocking(move || generator.join()).await?;
    // The last view before the service stops (and lets its customers go).
    summary.print(&started, &recent);
    service.stop().await?;
    println!("demo stopped.");
    match generated {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the traffic generator panicked"),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A consumer of the output topic, so the summary shows changes as subscribers see them.
fn tail_output(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "segmentd-demo-tail")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("cannot create the output consumer")?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// One line for a change record read back from the output topic.
fn describe_change(payload: &[u8]) -> Option<String> {
    let change: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let cause = change["cause"]["type"]
        .as_str()
        .or(change["cause"]["kind"].as_str())
        .unwrap_or("?");
    Some(format!(
        "{} {:>8} {:<22} seq {:<3} (on {cause}) facts {}",
        change["customer_id"].as_str()?,
        change["transition"].as_str()?,
        change["segment"].as_str()?,
        change["seq"],
        change["facts"]
    ))
}

/// The live terminal summary.
struct Summary {
    redraw: bool,
    started: Instant,
    last: Option<(Instant, u64)>,
}

impl Summary {
    fn new(redraw: bool) -> Self {
        Summary {
            redraw,
            started: Instant::now(),
            last: None,
        }
    }

    fn print(&mut self, service: &Started, recent: &[String]) {
        let rules = service.engine.rules();
        let m = &service.metrics;
        let events: u64 = (0..rules.types.id_count() as u16)
            .map(|t| {
                m.events
                    .with_label_values(&[INPUT_TOPIC, rules.types.name(t)])
                    .get()
            })
            .sum();
        let invalid: u64 = InvalidReason::ALL
            .iter()
            .map(|r| m.events_invalid.with_label_values(&[r.as_str()]).get())
            .sum();
        let now = Instant::now();
        let rate = match self.last {
            Some((at, before)) => {
                (events - before) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
            }
            None => 0.0,
        };
        self.last = Some((now, events));
        let mut out = String::new();
        if self.redraw {
            out.push_str("\x1b[2J\x1b[H");
        }
        out.push_str(&format!(
            "segmentd demo — {:.0}s — {:.0} events/s — {events} events, {invalid} invalid (dead-lettered), {} duplicates, {} customers\n\n",
            self.started.elapsed().as_secs_f64(),
            rate,
            m.events_duplicate.get(),
            service.engine.store().len(),
        ));
        out.push_str(&format!(
            "{:<24} {:>8} {:>8} {:>8}\n",
            "segment", "members", "entered", "exited"
        ));
        for (segment, members) in rules.segments.iter().zip(service.engine.member_counts()) {
            let entered = m
                .transitions
                .with_label_values(&[&*segment.id, "entered"])
                .get();
            let exited = m
                .transitions
                .with_label_values(&[&*segment.id, "exited"])
                .get();
            out.push_str(&format!(
                "{:<24} {members:>8} {entered:>8} {exited:>8}\n",
                &*segment.id
            ));
        }
        out.push_str("\nlatest changes on the output topic:\n");
        for line in recent {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str(&format!(
            "\nhttp://{}/metrics — Ctrl-C to stop\n",
            service.http_addr
        ));
        print!("{out}");
        if !self.redraw {
            println!();
        }
    }
}
