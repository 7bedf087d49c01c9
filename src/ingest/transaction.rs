//! Exactly-once delivery with Kafka transactions.
//!
//! In `exactly_once` mode the producer is transactional and the consume loop works in
//! transactions of one commit interval each. Everything a transaction holds — segment
//! changes, dead-letter copies, changelog checkpoints and the input offsets they complete
//! — becomes visible to `read_committed` readers together, or not at all.
//!
//! The at-least-once machinery decides *which* offsets a transaction commits: an offset
//! is stored once its outputs are acknowledged and a checkpoint including it is written
//! (see [`super::changelog`]). Here a stored offset is not handed to the consumer's
//! auto-commit but kept until the transaction commits: [`Transactions::store`]. A commit
//! ([`super::consumer::IngestContext::commit_transaction`]) first checkpoints every owned
//! partition and waits for the checkpoints, so the committed offsets, the committed
//! changelog states and the committed outputs always describe the same instant.
//!
//! # Failures
//!
//! - A transaction that cannot commit but may be aborted (a record the brokers refused, a
//!   rebalance that outdated the group generation) is aborted: the brokers discard its
//!   records and offsets, and the consume loop rewinds every owned partition — drops its
//!   customers, restores them from the changelog's committed states and reads the input
//!   again from the committed offsets. Readers see each change once.
//! - A fatal error — above all a *fenced* producer: another instance started with the
//!   same transactional id, or the group moved our partitions to a newer member — stops
//!   the service with an error; nothing more is committed by this instance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ThreadedProducer};

use super::delivery::Acknowledger;
use super::offsets::PartitionKey;
use crate::telemetry::Metrics;

/// How long one transactional request (init, send offsets, commit, abort) may take.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a commit failing with a retriable error is tried again.
const COMMIT_ATTEMPTS: u32 = 3;

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TransactionFailure {
    /// The transaction was aborted: nothing of it is visible; the caller rewinds.
    #[error("the transaction was aborted: {0}")]
    Aborted(String),
    /// The producer cannot go on (fenced by a newer instance, or a fatal broker error).
    #[error("the transactional producer cannot go on: {0}")]
    Fatal(KafkaError),
}

/// The transactional producer's state as the consume loop, the rebalance callback and the
/// delivery callback share it.
pub struct Transactions {
    /// The transactional id (for log lines and errors).
    id: String,
    /// Input offsets completed since the last commit (the last completed message per
    /// partition), committed with the next transaction.
    pending: Mutex<BTreeMap<PartitionKey, i64>>,
    /// A record of the open transaction was refused: it cannot commit, so the next commit
    /// aborts at once instead of waiting for outputs that will never be acknowledged.
    poisoned: AtomicBool,
    /// A transaction was aborted where the consume loop could not rewind at once (the
    /// rebalance callback): it rewinds before it processes another message.
    rewind: AtomicBool,
    /// A fatal error met where the consume loop could not stop at once (the rebalance
    /// callback): it stops before it processes another message.
    fatal: Mutex<Option<KafkaError>>,
    metrics: Arc<Metrics>,
}

impl Transactions {
    /// Transactions under `id`, counted in `metrics`.
    pub fn new(id: &str, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Transactions {
            id: id.to_owned(),
            pending: Mutex::default(),
            poisoned: AtomicBool::new(false),
            rewind: AtomicBool::new(false),
            fatal: Mutex::default(),
            metrics,
        })
    }

    /// Registers the id with the brokers through `producer` (fencing any older producer
    /// with it and aborting its open transaction) and opens the first transaction.
    /// Blocking.
    pub fn start(&self, producer: &ThreadedProducer<Acknowledger>) -> Result<(), KafkaError> {
        producer.init_transactions(TRANSACTION_TIMEOUT)?;
        producer.begin_transaction()?;
        tracing::info!(transactional_id = %self.id, "Transactions started.");
        Ok(())
    }

    /// Keeps a completed input offset for the next commit (the next message to read is
    /// `offset + 1`).
    pub fn store(&self, partition: &PartitionKey, offset: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let last = pending.entry(partition.clone()).or_insert(offset);
        *last = (*last).max(offset);
    }

    /// Marks the open transaction as unable to commit (a record was refused, or partitions
    /// were lost to another member).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }

    /// Whether an abort happened that the consume loop has not rewound yet; clears it.
    pub fn take_rewind(&self) -> bool {
        self.rewind.swap(false, Ordering::Relaxed)
    }

    /// Asks the consume loop to rewind before its next message.
    pub fn request_rewind(&self) {
        self.rewind.store(true, Ordering::Relaxed);
    }

    /// Asks the consume loop to stop with `error` before its next message.
    pub fn fail(&self, error: KafkaError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(error);
    }

    /// The fatal error the consume loop must stop with, if one was met.
    pub fn take_failure(&self) -> Option<KafkaError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Commits `producer`'s open transaction with the stored offsets, in `group`'s
    /// generation (so that a member the group has replaced cannot commit), and opens the
    /// next one — unless `prepared` says why it cannot (its checkpoint failed). On an
    /// abortable failure the transaction is aborted and the next one opened; the caller
    /// must then rewind. Blocking.
    pub fn commit(
        &self,
        producer: &ThreadedProducer<Acknowledger>,
        group: Option<ConsumerGroupMetadata>,
        prepared: Result<(), String>,
    ) -> Result<(), TransactionFailure> {
        let offsets = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let completed: Vec<(PartitionKey, i64)> =
                pending.iter().map(|(k, v)| (k.clone(), *v)).collect();
            super::consumer::commit_list(&completed)
        };
        let result = if self.poisoned.load(Ordering::Relaxed) {
            Err(TransactionFailure::Aborted(
                "a record of the transaction was refused, or partitions were lost".into(),
            ))
        } else {
            prepared
                .map_err(TransactionFailure::Aborted)
                .and_then(|()| commit_once(producer, &offsets, group))
        };
        match result {
            Ok(()) => self.next(producer, "committed"),
            Err(TransactionFailure::Aborted(reason)) => {
                tracing::warn!(transactional_id = %self.id, reason = %reason, "Aborting the transaction; rewinding to the last commit.");
                self.abort(producer)?;
                Err(TransactionFailure::Aborted(reason))
            }
            Err(fatal) => {
                tracing::error!(transactional_id = %self.id, error = %fatal, "The transactional producer cannot go on: stopping.");
                Err(fatal)
            }
        }
    }

    /// Aborts the open transaction, forgets its offsets and opens the next one.
    fn abort(&self, producer: &ThreadedProducer<Acknowledger>) -> Result<(), TransactionFailure> {
        producer
            .abort_transaction(TRANSACTION_TIMEOUT)
            .map_err(TransactionFailure::Fatal)?;
        self.poisoned.store(false, Ordering::Relaxed);
        self.next(producer, "aborted")
    }

    /// After a transaction ended (`result`: committed or aborted): counts it, forgets its
    /// offsets and opens the next one.
    fn next(
        &self,
        producer: &ThreadedProducer<Acknowledger>,
        result: &str,
    ) -> Result<(), TransactionFailure> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.metrics.transactions.with_label_values(&[result]).inc();
        producer
            .begin_transaction()
            .map_err(TransactionFailure::Fatal)
    }
}

/// Sends the offsets and commits, retrying what librdkafka calls retriable.
fn commit_once(
    producer: &ThreadedProducer<Acknowledger>,
    offsets: &rdkafka::TopicPartitionList,
    group: Option<ConsumerGroupMetadata>,
) -> Result<(), TransactionFailure> {
    if offsets.count() > 0 {
        let Some(group) = group else {
            return Err(TransactionFailure::Aborted(
                "the consumer has no group metadata (not in the group)".into(),
            ));
        };
        retried(|| producer.send_offsets_to_transaction(offsets, &group, TRANSACTION_TIMEOUT))?;
    }
    retried(|| producer.commit_transaction(TRANSACTION_TIMEOUT))
}

/// Runs a transactional request, again while it fails with a retriable error; classifies
/// the final error.
fn retried(mut request: impl FnMut() -> Result<(), KafkaError>) -> Result<(), TransactionFailure> {
    let mut attempt = 1;
    loop {
        let Err(err) = request() else { return Ok(()) };
        match &err {
            KafkaError::Transaction(e) if e.is_retriable() && attempt < COMMIT_ATTEMPTS => {
                attempt += 1;
            }
            KafkaError::Transaction(e) if e.txn_requires_abort() => {
                return Err(TransactionFailure::Aborted(err.to_string()));
            }
            KafkaError::Transaction(e) if !e.is_fatal() => {
                return Err(TransactionFailure::Aborted(err.to_string()));
            }
            _ => return Err(TransactionFailure::Fatal(err)),
        }
    }
}
