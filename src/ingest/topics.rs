//! Start-up checks of the topics the service depends on: the input topics are
//! co-partitioned (a customer's events from every input topic meet in one partition
//! number), and the changelog topic exists, is compacted and has a partition for every
//! input partition — created with those settings when missing.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;

use crate::config::Config;

/// How long a metadata or admin request may take at start-up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long describing the changelog topic's configuration may take: a broker that does
/// not answer (librdkafka's embedded one) is warned about after this.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the topics are not usable.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// An input topic does not exist.
    #[error(
        "input topic `{0}` does not exist: create it (every input topic with the same number of partitions)"
    )]
    MissingInput(String),
    /// Input topics with different partition counts: a customer's events would not meet.
    #[error(
        "input topics are not co-partitioned: `{topic}` has {partitions} partitions, `{first}` has {first_partitions}; every input topic must have the same number of partitions (and be keyed by customer id)"
    )]
    NotCoPartitioned {
        /// The first input topic.
        first: String,
        /// Its partitions.
        first_partitions: i32,
        /// The topic that differs.
        topic: String,
        /// Its partitions.
        partitions: i32,
    },
    /// The changelog topic is not compacted: old states would be deleted by retention.
    #[error(
        "changelog topic `{topic}` has cleanup.policy={policy}; it must be compacted (cleanup.policy=compact), or every customer older than the retention would be lost"
    )]
    NotCompacted {
        /// The topic.
        topic: String,
        /// Its policy.
        policy: String,
    },
    /// The changelog topic has fewer partitions than the input.
    #[error(
        "changelog topic `{topic}` has {partitions} partitions but the input topics have {input}: it needs one per input partition (delete it, or name another with kafka.changelog_topic)"
    )]
    TooFewPartitions {
        /// The topic.
        topic: String,
        /// Its partitions.
        partitions: i32,
        /// The input topics' partitions.
        input: i32,
    },
    /// The changelog topic (or the internal topic of re-keyed events) could not be
    /// created.
    #[error("cannot create topic `{topic}`: {error}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's answer.
        error: String,
    },
    /// A request to the brokers failed.
    #[error("topic metadata: {0}")]
    Kafka(#[from] KafkaError),
}

/// Checks the input topics and prepares the changelog. Returns the input topics' number
/// of partitions.
pub async fn prepare(config: &Config) -> Result<i32, TopicError> {
    let admin = Arc::new(admin_client(config)?);
    let mut metadata = fetch_metadata(&admin).await?;
    if prepare_rekeyed(&admin, &metadata, config).await? {
        metadata = fetch_metadata(&admin).await?;
    }
    let partitions = input_partitions(&metadata, &config.kafka.input_topics)?;
    let changelog = &config.kafka.changelog_topic;
    if changelog.is_empty() {
        tracing::warn!(
            "No changelog topic: state lives in memory only and is lost on a restart or a rebalance."
        );
        return Ok(partitions);
    }
    match partition_count(&metadata, changelog) {
        None => {
            let settings = [
                ("cleanup.policy", "compact"),
                // Compact promptly: a restore reads every record not yet compacted away.
                ("min.cleanable.dirty.ratio", "0.1"),
                ("segment.ms", "3600000"),
            ];
            create_topic(&admin, config, changelog, partitions, &settings).await?;
            tracing::info!(topic = %changelog, partitions, "Created the changelog topic (compacted).");
        }
        Some(existing) if existing < partitions => {
            return Err(TopicError::TooFewPartitions {
                topic: changelog.clone(),
                partitions: existing,
                input: partitions,
            });
        }
        Some(_) => check_compacted(&admin, changelog).await?,
    }
    Ok(partitions)
}

/// An admin client with the producer's properties (security settings live there too).
fn admin_client(config: &Config) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (key, value) in &config.kafka.producer {
        client.set(key, value);
    }
    client.create()
}

/// Every topic's metadata (asking for all topics never auto-creates one). The request
/// blocks, so it runs off the async workers.
async fn fetch_metadata(
    admin: &Arc<AdminClient<DefaultClientContext>>,
) -> Result<Metadata, KafkaError> {
    let admin = admin.clone();
    tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, REQUEST_TIMEOUT))
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// A topic's partition count, if it exists.
fn partition_count(metadata: &Metadata, topic: &str) -> Option<i32> {
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
}

/// The input topics' shared partition count.
pub fn input_partitions(metadata: &Metadata, topics: &[String]) -> Result<i32, TopicError> {
    let mut first: Option<(&str, i32)> = None;
    for topic in topics {
        let partitions = partition_count(metadata, topic)
            .ok_or_else(|| TopicError::MissingInput(topic.clone()))?;
        match first {
            None => first = Some((topic, partitions)),
            Some((name, count)) if count != partitions => {
                return Err(TopicError::NotCoPartitioned {
                    first: name.to_owned(),
                    first_partitions: count,
                    topic: topic.clone(),
                    partitions,
                });
            }
            Some(_) => {}
        }
    }
    Ok(first.map_or(0, |(_, count)| count))
}

/// With re-keying: checks that the re-keyed topics exist and creates the internal topic
/// if missing, with the other input topics' partition count (or, with none, the first
/// re-keyed topic's). Returns whether it created it.
async fn prepare_rekeyed(
    admin: &AdminClient<DefaultClientContext>,
    metadata: &Metadata,
    config: &Config,
) -> Result<bool, TopicError> {
    let kafka = &config.kafka;
    for topic in &kafka.rekey_topics {
        if partition_count(metadata, topic).is_none() {
            return Err(TopicError::MissingInput(topic.clone()));
        }
    }
    if kafka.rekey_topics.is_empty() || partition_count(metadata, &kafka.rekeyed_topic).is_some() {
        return Ok(false);
    }
    let others: Vec<String> = kafka
        .input_topics
        .iter()
        .filter(|t| **t != kafka.rekeyed_topic)
        .cloned()
        .collect();
    let partitions = if others.is_empty() {
        partition_count(metadata, &kafka.rekey_topics[0]).unwrap_or(1)
    } else {
        input_partitions(metadata, &others)?
    };
    create_topic(admin, config, &kafka.rekeyed_topic, partitions, &[]).await?;
    tracing::info!(topic = %kafka.rekeyed_topic, partitions, "Created the internal topic of re-keyed events.");
    Ok(true)
}

/// Creates `topic` with `partitions`, the changelog's replication factor and `settings`;
/// one that appeared meanwhile (another instance) is fine.
async fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    config: &Config,
    topic: &str,
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<(), TopicError> {
    // -1 asks the brokers for their default.
    let replication = TopicReplication::Fixed(config.kafka.changelog_replication);
    let mut new = NewTopic::new(topic, partitions, replication);
    for (key, value) in settings {
        new = new.set(key, value);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(TopicError::Create {
                    topic: topic.to_owned(),
                    error: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a changelog topic whose cleanup policy does not compact. A broker that cannot
/// describe topic configurations is warned about, not refused.
async fn check_compacted(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<(), TopicError> {
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT)),
        )
        .await;
    let resource = match described.as_deref() {
        Ok([Ok(resource), ..]) => resource,
        other => {
            tracing::warn!(topic, answer = ?other.map(|r| r.len()), "Cannot read the changelog topic's configuration; assuming it is compacted.");
            return Ok(());
        }
    };
    let policy = resource
        .get("cleanup.policy")
        .and_then(|entry| entry.value.clone())
        .unwrap_or_else(|| "delete".into());
    if policy.split(',').any(|p| p.trim() == "compact") {
        Ok(())
    } else {
        Err(TopicError::NotCompacted {
            topic: topic.to_owned(),
            policy,
        })
    }
}
