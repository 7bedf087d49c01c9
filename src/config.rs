//! The one config tree: a TOML file, with every key overridable by an environment
//! variable (`SEGMENTD_` + the key path in capitals, `__` between levels:
//! `SEGMENTD_KAFKA__BROKERS`). Unknown keys are errors, durations are human-readable
//! (`"30m"`), and every default lives in this file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::rules::{RuleErrors, RuleSet, RuleText, SegmentDef};
use crate::time::partition::TimeSettings;
use crate::time::{HumanDuration, MINUTE, SECOND};

/// Why a config did not load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key is unknown, missing or of the wrong type (in the file or the environment).
    #[error("invalid config {origin}: {source}")]
    Invalid {
        /// Where the config came from.
        origin: String,
        /// What figment found.
        source: Box<figment::Error>,
    },
    /// A value is well-typed but not acceptable.
    #[error("invalid config {origin}: {message}")]
    Value {
        /// Where the config came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The segment rules do not compile.
    #[error("invalid rules in {origin}:\n{errors}")]
    Rules {
        /// Where the config came from.
        origin: String,
        /// Every rule error.
        errors: RuleErrors,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Brokers, topics and client properties.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The HTTP endpoint.
    #[serde(default)]
    pub http: HttpConfig,
    /// Event-time settings.
    #[serde(default)]
    pub time: TimeConfig,
    /// Delivery guarantee.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Input limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How customers' state is held in memory.
    #[serde(default)]
    pub state: StateConfig,
    /// The segments, in evaluation-independent order.
    #[serde(default)]
    pub segments: Vec<SegmentConfig>,
    /// Where each segment's rules start in the config file (not a config key: filled in
    /// by [`Config::load`] so that rule errors point into the file).
    #[serde(skip)]
    rule_origins: Vec<RuleOrigins>,
    /// Where the config came from, for error messages.
    #[serde(skip)]
    pub origin: String,
}

/// `[kafka]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The consumer group: instances with the same group share the partitions.
    pub group_id: String,
    /// The topics events are read from.
    pub input_topics: Vec<String>,
    /// The topic segment changes are written to.
    pub output_topic: String,
    /// The topic rejected input is copied to, untouched, with the reason in headers.
    pub dead_letter_topic: String,
    /// The compacted topic each customer's state is written to and restored from when a
    /// partition is assigned; empty: state lives in memory only (lost on a restart or a
    /// rebalance). Created at start-up if missing.
    pub changelog_topic: String,
    /// Replication factor of the topics segmentd creates (the changelog, the internal
    /// topic of re-keyed events); -1: the brokers' default.
    pub changelog_replication: i32,
    /// Input topics *not* keyed by customer id (e.g. keyed by session or device): a
    /// re-keying stage reads them and writes each message, keyed by its customer id, to
    /// `rekeyed_topic`, which the service reads as one more input topic — so a
    /// customer's events still meet on one instance when it scales out.
    pub rekey_topics: Vec<String>,
    /// The internal topic re-keyed events go through; empty: `{group_id}-rekeyed`.
    /// Created at start-up if missing, with the input topics' partition count.
    pub rekeyed_topic: String,
    /// librdkafka consumer properties, passed through as they are.
    pub consumer: BTreeMap<String, String>,
    /// librdkafka producer properties, passed through as they are.
    pub producer: BTreeMap<String, String>,
    /// How often processed offsets are committed to the group.
    pub commit_interval: HumanDuration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "segmentd".into(),
            input_topics: vec!["clickstream".into(), "purchases".into()],
            output_topic: "segment-changes".into(),
            dead_letter_topic: "segmentd-dead-letter".into(),
            changelog_topic: "segmentd-changelog".into(),
            changelog_replication: -1,
            rekey_topics: Vec::new(),
            rekeyed_topic: String::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            commit_interval: HumanDuration(1_000),
        }
    }
}

/// `[http]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, lookups).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
        }
    }
}

/// `[time]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// How far a partition's watermark trails its highest event time: events up to this
    /// much out of order are not late, and a timer fires this long after its deadline
    /// in wall-clock terms (the watermark must pass it).
    pub allowed_lateness: HumanDuration,
    /// Wall-clock time without events after which a partition's watermark follows the
    /// wall clock, so that timers fire on a quiet partition.
    pub idle_timeout: HumanDuration,
    /// Inactivity after which a session closes (`session.active` turns false) and the
    /// customer's next event starts a new one.
    pub session_gap: HumanDuration,
    /// When events are applied: on arrival (lowest latency), or held until the watermark
    /// passes them and applied in event-time order (exact under disorder within
    /// `allowed_lateness`, at the cost of that much latency).
    pub order: EventOrder,
}

/// `time.order`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventOrder {
    /// Apply each event as it arrives.
    #[default]
    Arrival,
    /// Hold each event until the watermark passes it; apply in event-time order.
    EventTime,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            allowed_lateness: HumanDuration(5 * SECOND),
            idle_timeout: HumanDuration(10 * SECOND),
            session_gap: HumanDuration(30 * MINUTE),
            order: EventOrder::Arrival,
        }
    }
}

impl TimeConfig {
    /// The watermark settings of `run`: the wall clock moves idle partitions on.
    pub fn live(&self) -> TimeSettings {
        TimeSettings {
            allowed_lateness: self.allowed_lateness.millis(),
            idle_timeout: Some(self.idle_timeout.millis()),
            hold: self.order == EventOrder::EventTime,
        }
    }

    /// The watermark settings of `replay`: time advances by the events alone.
    pub fn replay(&self) -> TimeSettings {
        TimeSettings {
            idle_timeout: None,
            ..self.live()
        }
    }
}

/// `[delivery]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The delivery guarantee.
    pub mode: DeliveryMode,
    /// `exactly_once`: the producer's transactional id. It must be unique per instance
    /// and stable across its restarts (a restarted instance then fences its old self and
    /// aborts its open transaction at once). Empty: `{group_id}-{hostname}-{HTTP port}`.
    pub transactional_id: String,
}

/// Delivery guarantees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// An input offset is committed only after every record it caused is acknowledged.
    #[default]
    AtLeastOnce,
    /// Kafka transactions: output, dead letters and offsets committed together.
    ExactlyOnce,
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest input message accepted, in bytes; larger ones are dead-lettered.
    pub max_event_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_event_bytes: 64 * 1024,
        }
    }
}

/// `[state]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// A customer with no event or timer for this long (between once and twice this, as
    /// the store is swept every `idle_after`) is kept encoded and compressed — about a
    /// seventh of the memory — until its next event; "0s": every customer stays decoded.
    pub idle_after: HumanDuration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            idle_after: HumanDuration(30 * SECOND),
        }
    }
}

/// `[[segments]]`: one segment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Unique id.
    pub id: String,
    /// What it means.
    pub description: Option<String>,
    /// When a customer enters.
    pub enter: String,
    /// When a member leaves (default: when `enter` is false).
    pub exit: Option<String>,
}

/// Where a segment's `enter` and `exit` texts start in the file: 1-based (line, column).
type RuleOrigins = (Option<(usize, usize)>, Option<(usize, usize)>);

/// Just the segment rules' positions in a file, read with spans.
#[derive(Deserialize)]
struct SpannedSegments {
    #[serde(default)]
    segments: Vec<SpannedSegment>,
}

#[derive(Deserialize)]
struct SpannedSegment {
    enter: Option<toml::Spanned<String>>,
    exit: Option<toml::Spanned<String>>,
}

impl Config {
    /// The transactional id of `exactly_once` mode: the configured one, or one derived
    /// from the group, the host and the HTTP port (unique on a host: two instances cannot
    /// listen on one port); with port 0 (tests) the process id stands for the port.
    pub fn transactional_id(&self) -> String {
        if !self.delivery.transactional_id.is_empty() {
            return self.delivery.transactional_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        let port = match self.http.listen.port() {
            0 => format!("pid{}", std::process::id()),
            port => port.to_string(),
        };
        format!("{}-{host}-{port}", self.kafka.group_id)
    }

    /// Loads a config file with environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Loads config text (`origin` names it in errors) with environment overrides.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::from_figment(
            Figment::new()
                .merge(Toml::string(text))
                .merge(Env::prefixed("SEGMENTD_").split("__")),
            text,
            origin,
        )
    }

    /// Loads config text without reading the environment (tests, embedded defaults).
    pub fn from_toml_only(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(text)), text, origin)
    }

    fn from_figment(figment: Figment, text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(|source| ConfigError::Invalid {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        config.origin = origin.to_owned();
        config.rule_origins = rule_origins(text, &config.segments);
        config.validate_rekeying()?;
        let kafka = &mut config.kafka;
        if !kafka.rekey_topics.is_empty() {
            if kafka.rekeyed_topic.is_empty() {
                kafka.rekeyed_topic = format!("{}-rekeyed", kafka.group_id);
            }
            if !kafka.input_topics.contains(&kafka.rekeyed_topic) {
                kafka.input_topics.push(kafka.rekeyed_topic.clone());
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Re-keyed topics are read by the re-keying stage only: one that is also an input
    /// topic, or any topic segmentd writes, would be read twice or in a loop.
    fn validate_rekeying(&self) -> Result<(), ConfigError> {
        let kafka = &self.kafka;
        let written = [
            &kafka.output_topic,
            &kafka.dead_letter_topic,
            &kafka.changelog_topic,
            &kafka.rekeyed_topic,
        ];
        for topic in &kafka.rekey_topics {
            if topic.trim().is_empty() {
                return Err(self.value_error("kafka.rekey_topics holds an empty topic name"));
            }
            if kafka.input_topics.contains(topic) || written.contains(&topic) {
                return Err(self.value_error(&format!(
                    "kafka.rekey_topics names `{topic}`, which is also an input topic or a topic segmentd writes: a re-keyed topic is read by the re-keying stage only"
                )));
            }
        }
        if !kafka.rekeyed_topic.is_empty() && kafka.rekey_topics.is_empty() {
            return Err(self.value_error(
                "kafka.rekeyed_topic is set but kafka.rekey_topics is empty: name the topics to re-key",
            ));
        }
        Ok(())
    }

    fn value_error(&self, message: &str) -> ConfigError {
        ConfigError::Value {
            origin: self.origin.clone(),
            message: message.to_owned(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(self.value_error(&message));
        if self.delivery.mode == DeliveryMode::ExactlyOnce
            && self.kafka.changelog_topic.trim().is_empty()
        {
            return fail("delivery.mode = \"exactly_once\" needs kafka.changelog_topic: without durable state a restart could not resume exactly where the last transaction ended".into());
        }
        if self.kafka.input_topics.is_empty() {
            return fail("kafka.input_topics is empty: name at least one topic to read (or one to re-key, in kafka.rekey_topics)".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return fail("kafka.brokers is empty".into());
        }
        for (key, value) in [
            ("kafka.group_id", &self.kafka.group_id),
            ("kafka.output_topic", &self.kafka.output_topic),
            ("kafka.dead_letter_topic", &self.kafka.dead_letter_topic),
        ] {
            if value.trim().is_empty() {
                return fail(format!("{key} is empty"));
            }
        }
        if self.kafka.input_topics.iter().any(|t| {
            *t == self.kafka.output_topic
                || *t == self.kafka.dead_letter_topic
                || *t == self.kafka.changelog_topic
        }) {
            return fail("an input topic is also the output, dead-letter or changelog topic: segmentd would read its own output".into());
        }
        let changelog = &self.kafka.changelog_topic;
        if !changelog.is_empty()
            && (*changelog == self.kafka.output_topic || *changelog == self.kafka.dead_letter_topic)
        {
            return fail(format!(
                "kafka.changelog_topic `{changelog}` is also the output or dead-letter topic: it must hold state records only"
            ));
        }
        if self.kafka.changelog_replication == 0 || self.kafka.changelog_replication < -1 {
            return fail(
                "kafka.changelog_replication must be positive, or -1 for the brokers' default"
                    .into(),
            );
        }
        if self.limits.max_event_bytes == 0 {
            return fail("limits.max_event_bytes must be positive".into());
        }
        if self.segments.is_empty() {
            return fail("no [[segments]] are defined".into());
        }
        Ok(())
    }

    /// The segment definitions, with file positions for error messages.
    pub fn segment_defs(&self) -> Vec<SegmentDef> {
        self.segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (enter_origin, exit_origin) =
                    self.rule_origins.get(i).copied().unwrap_or_default();
                SegmentDef {
                    id: s.id.clone(),
                    description: s.description.clone(),
                    enter: RuleText {
                        text: s.enter.clone(),
                        origin: enter_origin,
                    },
                    exit: s.exit.as_ref().map(|text| RuleText {
                        text: text.clone(),
                        origin: exit_origin,
                    }),
                }
            })
            .collect()
    }

    /// Compiles the segment rules.
    pub fn rule_set(&self) -> Result<RuleSet, ConfigError> {
        RuleSet::compile(&self.segment_defs()).map_err(|errors| ConfigError::Rules {
            origin: self.origin.clone(),
            errors,
        })
    }
}

/// Where each segment's `enter` and `exit` text starts in the file (1-based line and
/// column of the first character inside the quotes). Only trusted when the text read with
/// spans equals the text the config holds (an environment override may replace it).
fn rule_origins(text: &str, segments: &[SegmentConfig]) -> Vec<RuleOrigins> {
    let Ok(spanned) = toml::from_str::<SpannedSegments>(text) else {
        return Vec::new();
    };
    let locate = |value: &Option<toml::Spanned<String>>, expected: Option<&String>| {
        let value = value.as_ref()?;
        if Some(value.get_ref()) != expected {
            return None;
        }
        let start = value.span().start;
        let quote = if text[start..].starts_with("\"\"\"") || text[start..].starts_with("'''") {
            3
        } else {
            1
        };
        let at = start + quote;
        let line = text[..at].matches('\n').count() + 1;
        let column = text[..at]
            .rfind('\n')
            .map_or(&text[..at], |i| &text[i + 1..at])
            .chars()
            .count()
            + 1;
        Some((line, column))
    };
    spanned
        .segments
        .iter()
        .zip(segments)
        .map(|(spans, segment)| {
            (
                locate(&spans.enter, Some(&segment.enter)),
                locate(&spans.exit, segment.exit.as_ref()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_configs_parse_and_compile() {
        for name in ["config/segmentd.toml", "config/demo.toml"] {
            let config = Config::from_toml_only(&std::fs::read_to_string(name).unwrap(), name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            config.rule_set().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml_only(
            "[kafka]\nbrokerz = 'x'\n[[segments]]\nid='a'\nenter='true'",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn bad_durations_and_addresses_are_rejected_with_the_value() {
        let err = Config::from_toml_only("[time]\nsession_gap = 'soonish'", "t").unwrap_err();
        assert!(
            err.to_string().contains("`soonish` is not a duration"),
            "{err}"
        );
        let err = Config::from_toml_only("[http]\nlisten = 'nowhere'", "t").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn rule_errors_point_into_the_file() {
        let text = "[[segments]]\nid = 'x'\nenter = \"cart.items > 0 and cart.itemz > 1\"\n";
        let err = Config::from_toml_only(text, "t.toml")
            .unwrap()
            .rule_set()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("segment `x` (enter), line 3, column 29"),
            "{err}"
        );
    }

    #[test]
    fn an_input_topic_that_is_the_output_is_refused() {
        let text =
            "[kafka]\ninput_topics = ['a']\noutput_topic = 'a'\n[[segments]]\nid='s'\nenter='true'";
        let err = Config::from_toml_only(text, "t").unwrap_err();
        assert!(err.to_string().contains("read its own output"), "{err}");
    }

    #[test]
    fn rekeyed_topics_feed_an_internal_input_topic() {
        let text = "[kafka]\ngroup_id = 'g'\ninput_topics = []\nrekey_topics = ['by-session']\n[[segments]]\nid='s'\nenter='true'";
        let config = Config::from_toml_only(text, "t").unwrap();
        assert_eq!(config.kafka.rekeyed_topic, "g-rekeyed");
        assert_eq!(config.kafka.input_topics, vec!["g-rekeyed".to_owned()]);
        let text = text.replace(
            "input_topics = []",
            "input_topics = ['clicks']\nrekeyed_topic = 'mine'",
        );
        let config = Config::from_toml_only(&text, "t").unwrap();
        assert_eq!(
            config.kafka.input_topics,
            vec!["clicks".to_owned(), "mine".to_owned()]
        );
    }

    #[test]
    fn a_rekeyed_topic_read_twice_is_refused() {
        for (keys, expected) in [
            (
                "input_topics = ['a']\nrekey_topics = ['a']",
                "also an input topic",
            ),
            (
                "rekey_topics = ['segment-changes']",
                "also an input topic or a topic segmentd writes",
            ),
            ("rekey_topics = ['']", "empty topic name"),
            ("rekeyed_topic = 'x'", "kafka.rekey_topics is empty"),
        ] {
            let text = format!("[kafka]\n{keys}\n[[segments]]\nid='s'\nenter='true'");
            let err = Config::from_toml_only(&text, "t").unwrap_err();
            assert!(err.to_string().contains(expected), "{keys}: {err}");
        }
    }

    #[test]
    fn exactly_once_needs_a_changelog() {
        let text = "[kafka]\nchangelog_topic = ''\n[delivery]\nmode = 'exactly_once'\n[[segments]]\nid='s'\nenter='true'";
        let err = Config::from_toml_only(text, "t").unwrap_err();
        assert!(
            err.to_string().contains("needs kafka.changelog_topic"),
            "{err}"
        );
    }

    #[test]
    fn exactly_once_derives_a_transactional_id_per_instance() {
        let text = "[kafka]\ngroup_id = 'g'\n[http]\nlisten = '0.0.0.0:9500'\n[delivery]\nmode = 'exactly_once'\n[[segments]]\nid='s'\nenter='true'";
        let config = Config::from_toml_only(text, "t").unwrap();
        let id = config.transactional_id();
        assert!(id.starts_with("g-") && id.ends_with("-9500"), "{id}");
        let text = text.replace("[[segments]]", "transactional_id = 'pod-3'\n[[segments]]");
        let config = Config::from_toml_only(&text, "t").unwrap();
        assert_eq!(config.transactional_id(), "pod-3");
    }

    #[test]
    fn environment_variables_override_file_keys() {
        // SAFETY: no other test in this binary reads or writes this variable; the config
        // tests that share the process use `from_toml_only`, which ignores the environment.
        unsafe { std::env::set_var("SEGMENTD_KAFKA__GROUP_ID", "from-env") };
        let config = Config::from_toml(
            "[kafka]\ngroup_id = 'from-file'\n[[segments]]\nid='s'\nenter='true'",
            "t",
        );
        unsafe { std::env::remove_var("SEGMENTD_KAFKA__GROUP_ID") };
        assert_eq!(config.unwrap().kafka.group_id, "from-env");
    }
}
