//! `segmentd generate`: synthetic traffic to a Kafka topic or stdout.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::emit::producer::send_blocking;
use crate::generate::{Format, Generator, GeneratorConfig};
use crate::time::{HumanDuration, Millis, parse_timestamp, wall_clock_now};

/// Arguments of `segmentd generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// How many events to write (0: until interrupted).
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Events per second (0: as fast as possible). With a rate, event times are the wall
    /// clock at sending (live traffic); without, they start at `--start` and advance by
    /// `--spacing` (a recorded history).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// How many distinct customers.
    #[arg(long, default_value_t = 10_000)]
    customers: u32,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Input format to write.
    #[arg(long, value_enum, default_value_t = Format::Native)]
    format: Format,
    /// Share of deliberately malformed messages, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    invalid_share: f64,
    /// Event time of the first event without `--rate` (RFC 3339; default: now).
    #[arg(long)]
    start: Option<String>,
    /// Event-time gap between consecutive events without `--rate`.
    #[arg(long, default_value = "10ms")]
    spacing: HumanDuration,
    /// Write to this Kafka topic (keyed by customer id) instead of stdout.
    #[arg(long)]
    topic: Option<String>,
    /// Brokers for `--topic`.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
}

/// Runs `segmentd generate`: writes the requested traffic, then reports how much.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.invalid_share),
        "--invalid-share must be between 0 and 1"
    );
    anyhow::ensure!(args.customers > 0, "--customers must be positive");
    let start = match &args.start {
        Some(text) => parse_timestamp(text)
            .with_context(|| format!("--start {text:?} is not an RFC 3339 timestamp"))?,
        None => wall_clock_now(),
    };
    let generator = Generator::new(GeneratorConfig {
        seed: args.seed,
        customers: args.customers,
        format: args.format,
        invalid_share: args.invalid_share,
    });
    let clock = if args.rate > 0 {
        EventClock::Live
    } else {
        EventClock::History {
            start,
            spacing: args.spacing.millis(),
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = stop.clone();
    // Ctrl-C stops cleanly: what was generated is flushed.
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            stopper.store(true, Ordering::Relaxed);
        }
    });
    let pace = Pace {
        count: args.count,
        rate: args.rate,
        clock,
    };
    match &args.topic {
        Some(topic) => {
            let sink = TopicSink::new(&args.brokers, topic)?;
            let written = pump(generator, &pace, &stop, |message| {
                sink.send(&message.key, &message.payload)
            })?;
            let failed = sink.finish()?;
            eprintln!("generated {written} events to {topic} ({failed} not delivered)");
            anyhow::ensure!(failed == 0, "{failed} events were not delivered");
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let written = pump(generator, &pace, &stop, |message| {
                out.write_all(&message.payload)?;
                out.write_all(b"\n")?;
                Ok(())
            })?;
            out.flush()?;
            eprintln!("generated {written} events");
        }
    }
    Ok(())
}

/// Where generated events take their time from.
#[derive(Clone, Copy, Debug)]
pub enum EventClock {
    /// The wall clock at sending: live traffic.
    Live,
    /// A fixed start, advancing a fixed step per event: a recorded history.
    History {
        /// First event's time.
        start: Millis,
        /// Step between events.
        spacing: Millis,
    },
}

/// How much and how fast to generate.
pub struct Pace {
    /// Events to write (0: until stopped).
    pub count: u64,
    /// Events per second (0: unpaced).
    pub rate: u32,
    /// Event times.
    pub clock: EventClock,
}

/// Feeds generated messages to `write` at the requested pace until `count` or `stop`.
/// Returns how many were written.
pub fn pump(
    mut generator: Generator,
    pace: &Pace,
    stop: &AtomicBool,
    mut write: impl FnMut(crate::generate::Generated) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut written = 0u64;
    while (pace.count == 0 || written < pace.count) && !stop.load(Ordering::Relaxed) {
        if pace.rate > 0 {
            let due = Duration::from_secs_f64(written as f64 / f64::from(pace.rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
        }
        let ts = match pace.clock {
            EventClock::Live => wall_clock_now(),
            EventClock::History { start, spacing } => start + written as Millis * spacing,
        };
        write(generator.next_at(ts))?;
        written += 1;
    }
    Ok(written)
}

/// Counts records the brokers did not acknowledge.
struct CountFailures(Arc<AtomicU64>);

impl ClientContext for CountFailures {}

impl ProducerContext for CountFailures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, _)) = result {
            self.0.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "A generated event was not delivered.");
        }
    }
}

/// A topic to write generated events to.
pub struct TopicSink {
    producer: ThreadedProducer<CountFailures>,
    topic: String,
    failures: Arc<AtomicU64>,
}

impl TopicSink {
    /// A sink on `topic` at `brokers`, batching for up to 5 ms.
    pub fn new(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        Self::with_linger(brokers, topic, 5)
    }

    /// A sink on `topic` at `brokers`, batching for up to `linger_ms` (0: each message is
    /// sent as soon as the connection is free, for the lowest latency).
    pub fn with_linger(brokers: &str, topic: &str, linger_ms: u32) -> anyhow::Result<Self> {
        let failures = Arc::new(AtomicU64::new(0));
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", linger_ms.to_string())
            .set("enable.idempotence", "true")
            .create_with_context(CountFailures(failures.clone()))
            .context("cannot create the producer")?;
        Ok(TopicSink {
            producer,
            topic: topic.to_owned(),
            failures,
        })
    }

    /// Sends one message keyed by customer id, waiting while the producer's queue is full.
    pub fn send(&self, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        let record = BaseRecord::to(&self.topic).key(key).payload(payload);
        send_blocking(&self.producer, record).context("cannot produce")
    }

    /// Waits for every message to be acknowledged; returns how many failed.
    pub fn finish(&self) -> anyhow::Result<u64> {
        self.producer
            .flush(Duration::from_secs(60))
            .context("not every event was delivered within 60s")?;
        Ok(self.failures.load(Ordering::Relaxed))
    }
}
